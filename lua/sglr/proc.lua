-- sglr.proc: child processes. The one place that spawns, reads, signals and
-- waits for them: `sglr launch` (workers and its router), the local fleet
-- of demos and benchmarks (sglr.fleet), and the functional specs.
--
--   local proc = require "sglr.proc"
--   local p = assert(proc.spawn("python3", { "-m", "sglang.launch_server", ... },
--     { group = true, on_line = function(line, stream, p) ... end }))
--   p:wait_output("listening on http://[%d.]+:(%d+)", 10000)
--   p:stop(10000)              -- SIGTERM, SIGKILL after 10 s
--
-- A child dies with us: it is started through sglr's parent-death trampoline
-- (core/child.c), which arms a signal (SIGKILL unless told otherwise) for the
-- death of this process before it execs the command, so even a SIGKILLed
-- parent leaves no orphans behind. `group = true` also gives the child a
-- session and process group of its own (setsid), so a Ctrl-C on the
-- terminal reaches only us (we stop children in our own order), and
-- p:kill() reaches the child's own children too.
--
-- Calls that wait (wait, wait_output, stop) yield: call them from a
-- coroutine on the runtime's loop (every sglr command and script runs in one).
local core = require "sglr.core"
local uv = require "luv"

local unpack = unpack or table.unpack
local concat = table.concat
local fmt = string.format

local M = {}
local P = {}
P.__index = P

local TRAMPOLINE = "--exec-child"   -- core/child.h SGLR_CHILD_EXEC_ARG
local MAX_LINE = 64 * 1024          -- a longer line is passed on in pieces
local EOF_GRACE_MS = 500            -- output still in flight after an exit

local SIGNUM = { sigkill = 9, sigterm = 15, sigint = 2, sighup = 1 }
if uv.constants then
  for name, n in pairs(uv.constants) do
    if name:match("^SIG") then SIGNUM[name:lower()] = n end
  end
end

local function signum(sig)
  if type(sig) == "number" then return sig end
  return SIGNUM[tostring(sig):lower()] or error("unknown signal " .. tostring(sig), 3)
end

-- The executable file would run for `file`, as execvp looks it up; nil
-- when none: through the trampoline a missing command only shows as exit
-- status 127, so it is checked here to fail with a message instead.
function M.which(file)
  local function runnable(path)
    local st = uv.fs_stat(path)
    return st and st.type ~= "directory" and uv.fs_access(path, "X") and path or nil
  end
  if file:find("/", 1, true) then return runnable(file) end
  for dir in (os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin"):gmatch("[^:]+") do
    local path = runnable(dir .. "/" .. file)
    if path then return path end
  end
end

-- spawn(file, args, opts) -> proc | nil, err
-- opts:
--   env            list of "K=V" strings: the child's whole environment
--                  (default: ours)
--   cwd            working directory
--   group          own session and process group; kill() signals the group
--   parent_death   signal for the child when we die (default "sigkill");
--                  false: none (the child may outlive us)
--   on_line(line, stream, proc)  each output line, without its newline
--                  (stream "stdout" or "stderr"); a last unterminated line
--                  comes at end of output
--   keep           bytes of output kept in proc.out (the last ones;
--                  default: all, 0: none)
--   on_exit(proc)  after the exit (code and signal set)
-- proc: pid, file, args, out, exited, code, signal (a number, 0 if none)
function M.spawn(file, args, opts)
  opts = opts or {}
  args = args or {}
  local path = M.which(file)
  if not path then
    return nil, fmt("cannot run '%s': %s", file,
      file:find("/", 1, true) and "no such executable file" or "not found in PATH")
  end
  local exe, argv = path, args
  local death = opts.parent_death
  if death == nil then death = "sigkill" end
  local self_exe = death and uv.exepath()
  if self_exe then
    exe = self_exe
    argv = { TRAMPOLINE, tostring(uv.os_getpid()), tostring(signum(death)), path, unpack(args) }
  end

  local p = setmetatable({ file = file, args = args, out = "", keep = opts.keep,
    on_line = opts.on_line, on_exit = opts.on_exit, group = opts.group and true or false,
    open = 2, partial = {} }, P)
  local out_pipe, err_pipe = uv.new_pipe(false), uv.new_pipe(false)
  local handle, pid = uv.spawn(exe, { args = argv, stdio = { nil, out_pipe, err_pipe },
    env = opts.env, cwd = opts.cwd, detached = p.group }, function(code, sig)
    p.exited, p.code, p.signal = true, code, sig
    p.exited_at = core.now()
    if p.handle and not p.handle:is_closing() then p.handle:close() end
    if p.on_exit then p.on_exit(p) end
  end)
  if not handle then
    out_pipe:close()
    err_pipe:close()
    return nil, fmt("cannot run '%s': %s", file, tostring(pid))
  end
  p.handle, p.pid = handle, pid
  local function reader(stream, pipe)
    return function(err, data)
      if data then return p:feed(stream, data) end
      -- end of output (or a read error, which ends it too)
      p:feed(stream, nil)
      if not pipe:is_closing() then pipe:close() end
      p.open = p.open - 1
    end
  end
  out_pipe:read_start(reader("stdout", out_pipe))
  err_pipe:read_start(reader("stderr", err_pipe))
  p.pipes = { out_pipe, err_pipe }
  return p
end

-- Output arrives here: kept in p.out and cut into lines for on_line.
-- data nil: end of that stream.
function P:feed(stream, data)
  if data and self.keep ~= 0 then
    local out = self.out .. data
    if self.keep and #out > self.keep then out = out:sub(-self.keep) end
    self.out = out
  end
  local on_line = self.on_line
  if not on_line then return end
  local buf = (self.partial[stream] or "") .. (data or "")
  local pos = 1
  while true do
    local nl = buf:find("\n", pos, true)
    if not nl then break end
    on_line(buf:sub(pos, nl - 1), stream, self)
    pos = nl + 1
  end
  local rest = buf:sub(pos)
  if data == nil or #rest >= MAX_LINE then
    if rest ~= "" then on_line(rest, stream, self) end
    rest = ""
  end
  self.partial[stream] = rest
end

-- Send a signal ("sigterm" by default) to the child, or to its process group
-- when it has one (which can outlive the child itself, so a group is
-- signalled even after the exit). -> true | nil, err
function P:kill(sig)
  local n = signum(sig or "sigterm")
  if self.group then
    local ok, err = uv.kill(-self.pid, n)
    if ok or self.exited then return ok, err end
  end
  if self.exited then return nil, "process has exited" end
  return uv.kill(self.pid, n)
end

-- Wait for the exit and for the end of its output. -> code, signal |
-- nil, "timeout"
function P:wait(timeout_ms)
  local deadline = core.now() + (timeout_ms or math.huge)
  while not self.exited do
    if core.now() >= deadline then return nil, "timeout" end
    core.sleep(10)
  end
  -- a child's own children may hold the pipes open: do not wait for them
  while self.open > 0 and core.now() - self.exited_at < EOF_GRACE_MS do core.sleep(10) end
  return self.code, self.signal
end

-- Wait until the output kept so far matches pattern. -> the captures |
-- nil, err (the child exited first, or the timeout passed)
function P:wait_output(pattern, timeout_ms)
  local deadline = core.now() + (timeout_ms or 10000)
  while true do
    local m = { self.out:match(pattern) }
    if m[1] then return unpack(m) end
    if self.exited and self.open == 0 then
      return nil, fmt("`%s` exited (%s) before printing %s; its output:\n%s", self:cmdline(),
        self:status_text(), pattern, self.out)
    end
    if core.now() >= deadline then
      return nil, fmt("timed out waiting for %s from `%s`; its output:\n%s", pattern, self:cmdline(), self.out)
    end
    core.sleep(10)
  end
end

-- Stop the child: SIGTERM, then SIGKILL after grace_ms (default 5 s). A
-- process group is swept with SIGKILL once its leader is gone, so nothing it
-- started is left behind. -> code, signal
function P:stop(grace_ms)
  if not self.exited then
    self:kill("sigterm")
    if not self:wait(grace_ms or 5000) then
      self:kill("sigkill")
      self:wait(5000)
    end
  end
  if self.group then uv.kill(-self.pid, SIGNUM.sigkill) end
  self:wait(EOF_GRACE_MS)
  self:close()
  return self.code, self.signal
end

-- Stop several children at once: SIGTERM to all, SIGKILL to any still
-- running grace_ms later (default 5 s).
function M.stop_all(list, grace_ms)
  for _, p in ipairs(list) do
    if not p.exited then p:kill("sigterm") end
  end
  local deadline = core.now() + (grace_ms or 5000)
  for _, p in ipairs(list) do p:wait(math.max(0, deadline - core.now())) end
  for _, p in ipairs(list) do p:stop(0) end
end

-- Release the handles without waiting (output not read yet is dropped).
function P:close()
  for _, pipe in ipairs(self.pipes) do if not pipe:is_closing() then pipe:close() end end
  if not self.handle:is_closing() then self.handle:close() end
end

function P:cmdline()
  return concat({ self.file, unpack(self.args) }, " ")
end

-- "exit status 1", "signal 9", or "running"
function P:status_text()
  if not self.exited then return "running" end
  if self.signal and self.signal ~= 0 then return "signal " .. self.signal end
  return "exit status " .. tostring(self.code)
end

-- Whether pid is a live process (a zombie counts as gone: it no longer
-- runs, its parent has only not collected it yet).
function M.alive(pid)
  local f = io.open("/proc/" .. tostring(pid) .. "/stat", "r")
  if not f then return false end
  local stat = f:read("*a") or ""
  f:close()
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- The first address of host (a name is resolved on the loop's thread
-- pool; an address is taken as it is). -> ip | nil, err
local function resolve(host)
  host = host:match("^%[(.*)%]$") or host
  if host:match("^[%d.]+$") or host:find(":", 1, true) then return host end
  local done = core.event()
  local ok, err = uv.getaddrinfo(host, nil, { socktype = "stream" }, function(gerr, res)
    done:set({ err = gerr, addr = res and res[1] and res[1].addr })
  end)
  if not ok then return nil, err end
  local _, r = done:wait()
  if not r.addr then return nil, tostring(r.err or "no address") end
  return r.addr
end

-- n distinct free TCP ports on host, as the kernel hands them out. They are
-- free when this returns; a process that binds one later may still race
-- another program for it. -> { port... } | nil, err
function M.free_ports(host, n)
  local ip, rerr = resolve(host)
  if not ip then return nil, fmt("cannot resolve %s: %s", host, rerr) end
  local socks, ports = {}, {}
  local function close_all()
    for _, s in ipairs(socks) do s:close() end
  end
  for i = 1, n do
    local s = uv.new_tcp()
    socks[i] = s
    local ok, err = s:bind(ip, 0)
    local addr = ok and s:getsockname()
    if not addr then
      close_all()
      return nil, fmt("cannot find a free port on %s: %s", host, tostring(err))
    end
    ports[i] = addr.port
  end
  close_all()
  return ports
end

return M

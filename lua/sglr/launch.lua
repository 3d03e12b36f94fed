-- sglr launch: co-launch N workers and the router in front of them, as
-- `python -m sglang_router.launch_server --dp-size N` does.
--
--   sglr launch --dp-size N (--model-path M | --worker-cmd TEMPLATE)
--               [router flags] [-- worker flags]
--
-- Processes (all sglr.proc children, each in a process group of its own,
-- each armed to die with the launcher):
--
--   sglr launch ---- worker r0 (rank 0, port p0)   output prefixed "[r0] "
--               |--- worker r1 ...
--               `--- sglr run --worker-urls http://host:p0 ...   (the router)
--
-- Start: pick the ports, start every worker, wait for each one's health
-- endpoint (--worker-startup-timeout-secs, as sglr run), then start the
-- router; a worker that exits before it is healthy fails the launch. Run: a
-- worker that exits is started again on its port after a backoff (1 s,
-- doubling up to 30 s, back to 1 s once it is healthy); meanwhile the
-- router's own health checks keep it out of rotation. Stop (SIGINT or
-- SIGTERM): the router first, so it drains what is in flight
-- (--shutdown-grace-secs), then every worker with SIGTERM and SIGKILL after
-- --worker-stop-grace-secs; a second signal kills everything at once. If
-- the router exits on its own, the workers are stopped and the launcher
-- exits non-zero, for a supervisor to act on.
local core = require "sglr.core"
local uv = require "luv"
local cli = require "sglr.cli"
local log = require "sglr.log"
local http = require "sglr.http"
local proc = require "sglr.proc"

local unpack = unpack or table.unpack
local concat = table.concat
local fmt = string.format
local floor, min = math.floor, math.min

local M = {}
local L = {}
L.__index = L

local RESTART_BACKOFF_SECS, RESTART_MAX_BACKOFF_SECS = 1, 30

M.DEFAULT_WORKER_CMD = "python3 -m sglang.launch_server --model-path {model} --host {host}"
  .. " --port {port} --base-gpu-id {gpu}"

-- Flags of the launcher itself; every other word before `--` is a router flag.
local FLAGS = {
  { "--dp-size", "int", 1, "Workers (data-parallel replicas) to start", min = 1, arg = "<n>" },
  { "--model-path", "string", nil, "Model of the default worker command", arg = "<path>" },
  { "--worker-cmd", "string", nil,
    "Command of each worker, instead of SGLang's: {port}, {rank}, {host}, {gpu} and {model} are"
    .. " replaced; split into words as a shell would (quotes and backslashes), run without one;"
    .. " sglr is this sglr",
    arg = "<template>" },
  { "--worker-host", "string", "127.0.0.1", "Address the workers listen on ({host})", arg = "<host>" },
  { "--worker-base-port", "port", nil, "Worker of rank r listens on PORT + r (default: free ports)" },
  { "--worker-stop-grace-secs", "number", 10,
    "Seconds from SIGTERM to SIGKILL when stopping a worker", min = 0, arg = "<secs>" },
}
local BY_NAME = {}
for _, f in ipairs(FLAGS) do
  f.name, f.kind, f.default, f.help = f[1], f[2], f[3], f[4]
  f.key = f.name:sub(3):gsub("-", "_")
  BY_NAME[f.name] = f
end

local function convert(f, raw)
  if raw == "" then return nil, "must not be empty" end
  if f.kind == "string" then return raw end
  local n = raw:match("^%s*[+-]?[%d.]+[eE]?[+-]?%d*%s*$") and tonumber(raw)
  if f.kind == "port" then
    if not n or n ~= floor(n) or n < 1 or n > 65535 then
      return nil, fmt("expected a port number between 1 and 65535, got '%s'", raw)
    end
  elseif f.kind == "int" then
    if not n or n ~= floor(n) then return nil, fmt("expected an integer, got '%s'", raw) end
    if n < f.min then return nil, fmt("must be at least %d, got '%s'", f.min, raw) end
  elseif not n or n < f.min then
    return nil, fmt("expected a number >= %s, got '%s'", f.min, raw)
  end
  return n
end

function M.help()
  local lines = {
    "Usage: sglr launch --dp-size N (--model-path PATH | --worker-cmd TEMPLATE) [router flags] [-- worker flags]",
    "",
    "Start N workers, wait until each is healthy, then run the router (sglr run) in front of them.",
    "Each worker's output lines are prefixed with its rank ([r0] ...). A worker that exits is started",
    "again on its port, with a backoff; the router's health checks keep it out of rotation meanwhile.",
    "SIGINT or SIGTERM stops the router (it drains what is in flight), then the workers (SIGTERM, then",
    "SIGKILL after a grace period). Workers and router die with the launcher, even a SIGKILLed one.",
    "",
    "Launch flags:",
  }
  for _, f in ipairs(FLAGS) do
    local left = "  " .. f.name .. " " .. (f.arg or "<port>")
    local desc = f.help
    if f.default ~= nil then desc = desc .. " (default: " .. tostring(f.default) .. ")" end
    -- descriptions wrapped at 100 columns, under their column
    local line = fmt("%-38s", left)
    for word in desc:gmatch("%S+") do
      if #line + 1 + #word > 100 and line:match("%S$") then
        lines[#lines + 1] = line
        line = string.rep(" ", 38)
      end
      line = line .. " " .. word
    end
    lines[#lines + 1] = line
  end
  for _, l in ipairs({
    "  -h, --help                           Show this help message and exit",
    "",
    "Default worker command (SGLang; {gpu} is rank * --tp-size given after --):",
    "  " .. M.DEFAULT_WORKER_CMD,
    "",
    "Router flags: every flag of `sglr run` (see sglr run --help); --host and --port are the router's.",
    "--worker-startup-timeout-secs and --worker-startup-check-interval also bound the wait for the",
    "workers started here; --worker-urls adds workers that are not started here.",
    "",
    "Worker flags: the words after -- are added to each worker's command (SGLang's own flags).",
    "",
    "Examples:",
    "  sglr launch --dp-size 4 --model-path meta-llama/Meta-Llama-3.1-8B-Instruct --port 30000 -- --tp-size 2",
    "  sglr launch --dp-size 2 --worker-cmd 'sglr sim-worker --port {port} --id r{rank}' --policy round_robin",
  }) do lines[#lines + 1] = l end
  return concat(lines, "\n") .. "\n"
end

-- Split a command template into words as a POSIX shell would, without
-- expansions: 'single quotes' are literal, "double quotes" take \" \\ \$ \`,
-- a backslash outside quotes escapes the next character. -> words | nil, err
function M.split_words(s)
  local words, cur, i, n = {}, nil, 1, #s
  local function add(c) cur = (cur or "") .. c end
  while i <= n do
    local c = s:sub(i, i)
    if c:match("%s") then
      if cur then words[#words + 1] = cur; cur = nil end
    elseif c == "'" then
      local j = s:find("'", i + 1, true)
      if not j then return nil, "unterminated ' quote" end
      add(s:sub(i + 1, j - 1))
      i = j
    elseif c == '"' then
      local buf, j = {}, i + 1
      while true do
        if j > n then return nil, 'unterminated " quote' end
        local d = s:sub(j, j)
        if d == '"' then break end
        if d == "\\" and s:sub(j + 1, j + 1):match('["\\$`]') then
          j = j + 1
          d = s:sub(j, j)
        end
        buf[#buf + 1] = d
        j = j + 1
      end
      add(concat(buf))
      i = j
    elseif c == "\\" then
      if i == n then return nil, "trailing backslash" end
      add(s:sub(i + 1, i + 1))
      i = i + 1
    else
      add(c)
    end
    i = i + 1
  end
  if cur then words[#words + 1] = cur end
  if #words == 0 then return nil, "empty command" end
  return words
end

-- The tensor-parallel size among SGLang's flags (--tp-size N, --tp N,
-- --tensor-parallel-size N, or with =N), 1 when absent: rank r's first GPU
-- is r * tp.
local TP_FLAGS = { ["--tp-size"] = true, ["--tp"] = true, ["--tensor-parallel-size"] = true }
function M.tp_size(worker_args)
  local tp = 1
  for i, a in ipairs(worker_args) do
    local name, v = a:match("^(%-%-[%w-]+)=(.*)$")
    if not name then name, v = a, worker_args[i + 1] end
    if TP_FLAGS[name] and tonumber(v) then tp = tonumber(v) end
  end
  return tp
end

-- parse(args) -> opts | nil, message [, "help"]
-- opts: the launch flags by key, template (words), worker_args, router_args,
-- conf (the router's configuration, as sglr run reads router_args)
function M.parse(args)
  local opts, router_args, worker_args = {}, {}, {}
  for _, f in ipairs(FLAGS) do opts[f.key] = f.default end
  local i = 1
  while i <= #args do
    local a = tostring(args[i])
    if a == "--" then
      for j = i + 1, #args do worker_args[#worker_args + 1] = tostring(args[j]) end
      break
    end
    if a == "-h" or a == "--help" then return nil, M.help(), "help" end
    local name, inline = a:match("^(%-%-[%w-]+)=(.*)$")
    local f = BY_NAME[name or a]
    if f then
      local raw = inline
      if raw == nil then
        i = i + 1
        raw = args[i]
        if raw == nil then return nil, f.name .. ": expected a value" end
      end
      local v, err = convert(f, tostring(raw))
      if v == nil then return nil, f.name .. ": " .. err end
      opts[f.key] = v
    else
      router_args[#router_args + 1] = a
    end
    i = i + 1
  end

  local template, err = M.split_words(opts.worker_cmd or M.DEFAULT_WORKER_CMD)
  if not template then return nil, "--worker-cmd: " .. err end
  if not opts.worker_cmd and not opts.model_path then
    return nil, "--model-path is required to start SGLang workers (or give --worker-cmd TEMPLATE)"
  end
  if opts.worker_base_port and opts.worker_base_port + opts.dp_size - 1 > 65535 then
    return nil, fmt("--worker-base-port: %d workers from port %d go past 65535", opts.dp_size,
      opts.worker_base_port)
  end

  local conf, cerr = cli.parse_run(router_args)
  if not conf then
    -- the router's own message, without its program name: it is ours here
    return nil, (tostring(cerr):gsub("^sglr run: ", ""))
  end
  for _, k in ipairs({ "pd_disaggregation", "service_discovery" }) do
    if conf[k] then
      return nil, "--" .. k:gsub("_", "-") .. " cannot be used with sglr launch (it starts regular workers)"
    end
  end
  opts.template, opts.worker_args, opts.router_args, opts.conf = template, worker_args, router_args, conf
  opts.tp = M.tp_size(worker_args)
  return opts
end

-- The host part of a URL for workers listening on host (a wildcard address
-- is reached on loopback).
local function url_host(host)
  if host == "0.0.0.0" or host == "" then return "127.0.0.1" end
  if host == "::" or host == "[::]" then return "[::1]" end
  if host:find(":", 1, true) and not host:match("^%[") then return "[" .. host .. "]" end
  return host
end

-- A worker's command: the template with its placeholders replaced, word by
-- word (a value never splits or joins words), then the worker flags.
function M.worker_argv(opts, rank, port)
  local vars = { port = tostring(port), rank = tostring(rank), host = opts.worker_host,
    gpu = tostring(rank * opts.tp), model = opts.model_path or "" }
  local argv = {}
  for i, w in ipairs(opts.template) do
    argv[i] = w:gsub("{(%a+)}", function(k) return vars[k] end)
  end
  for _, a in ipairs(opts.worker_args) do argv[#argv + 1] = a end
  return argv
end

--------------------------------------------------------------------------------
-- The launcher
--------------------------------------------------------------------------------

function M.new(opts)
  local self = setmetatable({ opts = opts, conf = opts.conf, workers = {},
    finished = core.event() }, L)
  return self
end

-- Output of a child, passed on line by line; a worker's lines carry its rank.
local function forward(prefix)
  return function(line, stream)
    local out = stream == "stderr" and io.stderr or io.stdout
    out:write(prefix, line, "\n")
    out:flush()
  end
end

function L:start_worker(w)
  local argv = M.worker_argv(self.opts, w.rank, w.port)
  -- `sglr` in a template is this sglr (the same build, installed or not)
  if argv[1] == "sglr" then argv[1] = uv.exepath() end
  local p, err = proc.spawn(argv[1], { unpack(argv, 2) }, { group = true, keep = 0,
    on_line = forward("[" .. w.id .. "] "),
    on_exit = function(p) self:worker_exited(w, p) end })
  if not p then return nil, err end
  w.proc = p
  log.info("worker " .. w.id .. " started", { pid = p.pid, url = w.url })
  return p
end

-- One GET of the worker's health endpoint: true or nil, reason.
function L:probe(w)
  local interval = self.conf.worker_startup_check_interval * 1000
  local status, _, err = http.request({ url = w.url .. self.conf.health_check_endpoint,
    timeout_ms = min(interval, self.conf.health_check_timeout_secs * 1000) })
  if status and status >= 200 and status < 300 then return true end
  return nil, status and ("HTTP " .. status) or tostring(_ or err)
end

-- Wait until w's process p answers its health endpoint. -> true | nil, why
-- (it exited, the startup timeout passed, or the launcher is stopping)
function L:wait_healthy(w, p)
  local conf = self.conf
  local deadline = core.now() + conf.worker_startup_timeout_secs * 1000
  local interval = conf.worker_startup_check_interval * 1000
  local last = "no answer yet"
  while true do
    if self.stopping then return nil, "stopping" end
    if p.exited then return nil, "exited (" .. p:status_text() .. ")" end
    local ok, err = self:probe(w)
    if ok and not p.exited then return true end
    last = err or last
    local left = deadline - core.now()
    if left <= 0 then
      return nil, fmt("not healthy within --worker-startup-timeout-secs (%s): %s",
        conf.worker_startup_timeout_secs, last)
    end
    core.sleep(min(interval, left))
  end
end

-- A worker's process ended. Before the launch is complete that fails the
-- launch (wait_healthy sees it); later it is started again, by one
-- restarting coroutine per worker, which also sees later exits of the
-- processes it starts.
function L:worker_exited(w, p)
  if self.stopping or not self.running or w.restarting or w.proc ~= p then return end
  log.warn(fmt("worker %s exited (%s)", w.id, p:status_text()), { pid = p.pid })
  w.restarting = true
  core.spawn(function() self:restart(w) end)
end

function L:restart(w)
  local failures = 0
  while not self.stopping do
    failures = failures + 1
    local delay = min(RESTART_MAX_BACKOFF_SECS, RESTART_BACKOFF_SECS * 2 ^ (failures - 1))
    log.info(fmt("restarting worker %s in %g s", w.id, delay), { restarts = w.restarts })
    core.sleep(delay * 1000)
    if self.stopping then break end
    w.restarts = w.restarts + 1
    local p, err = self:start_worker(w)
    if not p then
      log.error("cannot restart worker " .. w.id, { error = err })
    else
      local ok, why = self:wait_healthy(w, p)
      if ok then
        log.info("worker " .. w.id .. " healthy again", { pid = p.pid, restarts = w.restarts })
        break
      end
      if self.stopping then break end
      log.warn("restarted worker " .. w.id .. " failed: " .. why, { pid = p.pid })
      if not p.exited then p:stop(self.opts.worker_stop_grace_secs * 1000) end
    end
  end
  w.restarting = false
end

function L:start_router()
  local argv = { "run" }
  for _, a in ipairs(self.opts.router_args) do argv[#argv + 1] = a end
  argv[#argv + 1] = "--worker-urls"
  for _, w in ipairs(self.workers) do argv[#argv + 1] = w.url end
  local p, err = proc.spawn(uv.exepath(), argv, { group = true, keep = 0, on_line = forward(""),
    on_exit = function(p)
      if self.stopping then return end
      log.error("the router exited (" .. p:status_text() .. "); stopping the workers")
      core.spawn(function() self:shutdown(p.code ~= 0 and p.code or 1) end)
    end })
  if not p then return nil, err end
  self.router = p
  log.info("router started", { pid = p.pid })
  return p
end

-- Start everything; returns when the launcher is done, with its exit status.
function L:run()
  local opts = self.opts
  local ports = {}
  if opts.worker_base_port then
    for r = 0, opts.dp_size - 1 do ports[r + 1] = opts.worker_base_port + r end
  else
    local err
    ports, err = proc.free_ports(opts.worker_host, opts.dp_size)
    if not ports then
      log.error(err)
      return 1
    end
  end
  log.info(fmt("starting %d worker(s)", opts.dp_size), { cmd = concat(M.worker_argv(opts, 0, ports[1]), " ") })
  for r = 0, opts.dp_size - 1 do
    local w = { rank = r, id = "r" .. r, port = ports[r + 1], restarts = 0 }
    w.url = fmt("http://%s:%d", url_host(opts.worker_host), w.port)
    self.workers[r + 1] = w
    local ok, err = self:start_worker(w)
    if not ok then
      log.error("cannot start worker " .. w.id .. ": " .. err)
      self:shutdown(1)
      return self:done()
    end
  end

  -- every worker healthy, or the first failure
  local pending, failure = #self.workers, nil
  local all = core.event()
  for _, w in ipairs(self.workers) do
    core.spawn(function()
      local ok, why = self:wait_healthy(w, w.proc)
      if ok then
        log.info("worker " .. w.id .. " healthy", { url = w.url })
      elseif not failure then
        failure = "worker " .. w.id .. " " .. why
      end
      pending = pending - 1
      if pending == 0 or failure then all:set(true) end
    end)
  end
  all:wait()
  if self.stopping then return self:done() end
  if failure then
    log.error(failure .. "; stopping")
    self:shutdown(1)
    return self:done()
  end

  self.running = true
  -- exits while waiting for the others were not restarts: catch up
  for _, w in ipairs(self.workers) do
    if w.proc.exited then self:worker_exited(w, w.proc) end
  end
  local ok, err = self:start_router()
  if not ok then
    log.error("cannot start the router: " .. err)
    self:shutdown(1)
    return self:done()
  end
  return self:done()
end

-- Wait for the end (a shutdown sets the exit status). Only the coroutine
-- of run() waits here.
function L:done()
  local _, code = self.finished:wait()
  return code
end

-- Stop the router (it drains), then the workers, and set the exit status.
-- The first call does the work in its coroutine; later ones return at once.
function L:shutdown(code, signame)
  if self.stopping then return end
  self.stopping = true
  if signame then log.info("stopping on " .. signame) end
  local r = self.router
  if r and not r.exited then
    log.info("stopping the router", { pid = r.pid })
    r:kill("sigterm")
    if not r:wait((self.conf.shutdown_grace_secs + 5) * 1000) then
      log.warn("the router did not stop within its grace period; killing it")
    end
  end
  if r then r:stop(0) end
  local list = {}
  for _, w in ipairs(self.workers) do
    if w.proc then list[#list + 1] = w.proc end
  end
  if #list > 0 then
    log.info(fmt("stopping %d worker(s)", #list))
    proc.stop_all(list, self.opts.worker_stop_grace_secs * 1000)
  end
  log.info("stopped")
  self.finished:set(code)
end

-- A second signal while stopping: no more waiting.
function L:kill_all()
  log.warn("second signal: killing the router and the workers")
  if self.router then self.router:kill("sigkill") end
  for _, w in ipairs(self.workers) do
    if w.proc then w.proc:kill("sigkill") end
  end
end

function M.main(args)
  local opts, err, kind = M.parse(args)
  if not opts then
    if kind == "help" then
      io.stdout:write(err)
      return core.exit(0)
    end
    io.stderr:write("sglr launch: ", tostring(err), "\n")
    return core.exit(2)
  end
  log.configure(opts.conf)
  local l = M.new(opts)
  core.on_signal(function(sig)
    if l.stopping then return l:kill_all() end
    l:shutdown(0, sig)
  end)
  local code = l:run()
  io.stdout:flush()
  core.exit(code)
end

return M

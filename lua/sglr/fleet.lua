-- A local fleet for demos, benchmarks and soak runs: sim workers and routers
-- started as child processes of this sglr on 127.0.0.1 (ports chosen by the
-- kernel), and stopped by pid. Call from a coroutine (sglr lua scripts run
-- in one).
--
--   local fleet = require("sglr.fleet").new()
--   local urls = fleet:workers(4, { "--kv-tokens", "40000" })
--   local url = fleet:router(urls, { "--policy", "cache_aware" })
--   ...
--   fleet:stop()
local core = require "sglr.core"
local uv = require "luv"

local unpack = unpack or table.unpack

local M = {}
M.__index = M

function M.new(bin)
  return setmetatable({ bin = bin or os.getenv("SGLR_BIN") or uv.exepath(),
    procs = {} }, M)
end

-- spawn(args) -> proc { handle, pid, out (last 64 KB of stdout+stderr), exited, code }
function M:spawn(args)
  local p = { out = "", args = args }
  local o, e = uv.new_pipe(false), uv.new_pipe(false)
  p.handle, p.pid = uv.spawn(self.bin, { args = args, stdio = { nil, o, e } }, function(code)
    p.exited, p.code = true, code
  end)
  if not p.handle then error("cannot start " .. self.bin .. ": " .. tostring(p.pid), 2) end
  local function rd(_, d)
    if d then
      p.out = p.out .. d
      if #p.out > 65536 then p.out = p.out:sub(-32768) end
    end
  end
  o:read_start(rd)
  e:read_start(rd)
  p.pipes = { o, e }
  self.procs[#self.procs + 1] = p
  return p
end

function M.wait_for(p, pattern, timeout_ms)
  local deadline = core.now() + (timeout_ms or 20000)
  while core.now() < deadline do
    local m = p.out:match(pattern)
    if m then return m end
    if p.exited then break end
    core.sleep(10)
  end
  error("timed out waiting for `" .. table.concat(p.args, " ") .. "`:\n" .. p.out, 2)
end

-- A sim worker; returns its URL and process. port may be nil (any).
function M:worker(extra, port)
  local args = { "sim-worker", "--port", tostring(port or 0) }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local p = self:spawn(args)
  local got = M.wait_for(p, "listening on http://127%.0%.0%.1:(%d+)")
  return "http://127.0.0.1:" .. got, p, tonumber(got)
end

-- n sim workers named worker-1..n; returns their URLs.
function M:workers(n, extra)
  local urls = {}
  for i = 1, n do
    local args = { "--id", "worker-" .. i }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    urls[i] = self:worker(args)
  end
  return urls
end

-- A prefill sim worker with a bootstrap port; returns { url, bootstrap_port },
-- its process.
function M:prefill(extra)
  local args = { "--role", "prefill", "--bootstrap-port", "0" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local url, p = self:worker(args)
  local bp = M.wait_for(p, "bootstrap on http://127%.0%.0%.1:(%d+)")
  return { url = url, bootstrap_port = tonumber(bp) }, p
end

local function start_router(self, args, extra, tail)
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  for _, a in ipairs(tail) do args[#args + 1] = a end
  local p = self:spawn(args)
  return "http://127.0.0.1:" .. M.wait_for(p, "router listening on http:\\?/\\?/127%.0%.0%.1:(%d+)"), p
end

local ROUTER_ARGS = { "run", "--port", "0", "--prometheus-port", "0", "--worker-startup-check-interval", "0.1" }

-- A router in front of urls; returns its URL and process.
function M:router(urls, extra)
  local tail = { "--worker-urls" }
  for _, u in ipairs(urls) do tail[#tail + 1] = u end
  return start_router(self, { unpack(ROUTER_ARGS) }, extra, tail)
end

-- A PD router: prefills as M:prefill returns them, decodes as URLs.
function M:pd_router(prefills, decodes, extra)
  local tail = { "--pd-disaggregation" }
  for _, pf in ipairs(prefills) do
    tail[#tail + 1] = "--prefill"
    tail[#tail + 1] = pf.url
    tail[#tail + 1] = pf.bootstrap_port and tostring(pf.bootstrap_port) or "none"
  end
  for _, u in ipairs(decodes) do
    tail[#tail + 1] = "--decode"
    tail[#tail + 1] = u
  end
  return start_router(self, { unpack(ROUTER_ARGS) }, extra, tail)
end

function M.kill(p, sig)
  if not p.exited then uv.process_kill(p.handle, sig or "sigterm") end
end

-- Stop every process started here (SIGTERM, then SIGKILL after 5 s).
function M:stop()
  for _, p in ipairs(self.procs) do M.kill(p) end
  local deadline = core.now() + 5000
  for _, p in ipairs(self.procs) do
    while not p.exited and core.now() < deadline do core.sleep(10) end
    if not p.exited then M.kill(p, "sigkill") end
    for _, pipe in ipairs(p.pipes) do if not pipe:is_closing() then pipe:close() end end
    if not p.handle:is_closing() then p.handle:close() end
  end
  self.procs = {}
end

return M

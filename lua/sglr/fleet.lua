-- A local fleet for demos, benchmarks and soak runs: sim workers and routers
-- started as child processes of this sglr on 127.0.0.1 (ports chosen by the
-- kernel), and stopped by pid. Processes are sglr.proc children: they die
-- with this process. Call from a coroutine (sglr lua scripts run in one).
--
--   local fleet = require("sglr.fleet").new()
--   local urls = fleet:workers(4, { "--kv-tokens", "40000" })
--   local url = fleet:router(urls, { "--policy", "cache_aware" })
--   ...
--   fleet:stop()
local proc = require "sglr.proc"
local uv = require "luv"

local unpack = unpack or table.unpack

local M = {}
M.__index = M

function M.new(bin)
  return setmetatable({ bin = bin or os.getenv("SGLR_BIN") or uv.exepath(),
    procs = {} }, M)
end

-- spawn(args) -> proc (sglr.proc; out holds the last 64 KB of its output)
function M:spawn(args)
  local p, err = proc.spawn(self.bin, args, { keep = 65536 })
  if not p then error(err, 2) end
  self.procs[#self.procs + 1] = p
  return p
end

function M.wait_for(p, pattern, timeout_ms)
  local m, err = p:wait_output(pattern, timeout_ms or 20000)
  if not m then error(err, 2) end
  return m
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
  p:kill(sig)
end

-- Stop every process started here (SIGTERM, then SIGKILL after 5 s).
function M:stop()
  proc.stop_all(self.procs, 5000)
  self.procs = {}
end

return M

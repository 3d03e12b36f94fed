-- Helpers for functional specs: start the real sglr binary (router and sim
-- workers) on loopback, talk HTTP to it, and stop everything in teardown.
-- Specs run inside `sglr test`, i.e. in a coroutine on the runtime's loop,
-- so the waits below yield instead of blocking.
local core = require "sglr.core"
local uv = require "luv"
local cjson = require "cjson.safe"
local process = require "sglr.proc"

local H = {}

H.bin = os.getenv("SGLR_BIN") or "build/sglr"
-- the sim workers' binary, when it is not the router's (SGLR_SIM_BIN: run
-- an older router against today's sims)
H.sim_bin = os.getenv("SGLR_SIM_BIN")
local procs = {}

-- spawn(args, opts) -> proc (sglr.proc: pid, out = all its output so far,
-- exited, code, signal). opts.bin: another program than sglr; opts.env,
-- opts.group, opts.cwd as sglr.proc takes them. Children die with the spec runner.
function H.spawn(args, opts)
  opts = opts or {}
  local verbose = os.getenv("SGLR_SPEC_VERBOSE")
  local p = assert(process.spawn(opts.bin or H.bin, args, { env = opts.env, group = opts.group, cwd = opts.cwd,
    on_line = verbose and function(line) io.stderr:write(line, "\n") end }))
  procs[#procs + 1] = p
  return p
end

-- Wait until pred() is true, polling; fails the spec after timeout_ms.
function H.wait_for(pred, timeout_ms, what)
  local deadline = core.now() + (timeout_ms or 5000)
  while true do
    local v = pred()
    if v then return v end
    if core.now() > deadline then error("timed out waiting for " .. (what or "condition"), 2) end
    core.sleep(10)
  end
end

function H.wait_output(p, pattern, timeout_ms)
  local m, err = p:wait_output(pattern, timeout_ms or 10000)
  if not m then error(err, 2) end
  return m
end

function H.kill(p, sig)
  if not p.exited then p:kill(sig or "sigterm") end
end

function H.wait_stopped(p, timeout_ms)
  local code, sig = p:wait(timeout_ms or 10000)
  if not code then error("timed out waiting for `" .. p:cmdline() .. "` to exit", 2) end
  return code, sig
end

function H.stop(p)
  p:stop(0)
end

function H.stop_all()
  for _, p in ipairs(procs) do H.stop(p) end
  procs = {}
end

-- sim(extra_args) -> { url, port, proc }
function H.sim(extra)
  local args = { "sim-worker", "--port", "0" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local proc = H.spawn(args, { bin = H.sim_bin })
  local port = tonumber(H.wait_output(proc, "listening on http://127%.0%.0%.1:(%d+)"))
  return { url = "http://127.0.0.1:" .. port, port = port, proc = proc }
end

-- router(args) -> { url, port, metrics_port, proc }; waits until it serves.
function H.router(extra, opts)
  local args = { "run", "--port", "0", "--prometheus-port", "0",
    "--worker-startup-check-interval", "0.1", "--log-level", "info" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local proc = H.spawn(args, opts)
  -- (JSON log lines escape the slashes)
  local port = tonumber(H.wait_output(proc, "router listening on http:\\?/\\?/127%.0%.0%.1:(%d+)",
    (opts and opts.timeout_ms) or 15000))
  local mport = tonumber(proc.out:match("metrics on http:\\?/\\?/[%d%.]+:(%d+)"))
  return { url = "http://127.0.0.1:" .. port, port = port, metrics_port = mport, proc = proc }
end

local pools = {}
local function pool_for(base)
  local p = pools[base]
  if not p then
    p = assert(core.upstream(base))
    pools[base] = p
  end
  return p
end

-- request(base, method, path, body, headers, timeout_ms) -> res | nil, err
-- res: { status, headers, body, json (decoded or nil), ttfb_ms, first_body_ms, total_ms }
function H.request(base, method, path, body, headers, timeout_ms)
  if type(body) == "table" then body = cjson.encode(body) end
  local h = headers or {}
  if body and not h["content-type"] then h["content-type"] = "application/json" end
  local res, err = core.request(pool_for(base), { method = method, path = path, body = body,
    headers = h, timeout_ms = timeout_ms or 20000 })
  if not res then return nil, err end
  res.json = cjson.decode(res.body)
  return res
end

function H.get(base, path, headers) return H.request(base, "GET", path, nil, headers) end
function H.post(base, path, body, headers) return H.request(base, "POST", path, body or "", headers) end

-- Raw TCP exchange: send bytes, collect what comes back until the peer
-- closes, `until_pattern` is seen, or timeout_ms passes. close_after_ms
-- closes the socket early (a client going away mid-response).
function H.raw(port, bytes, opts)
  opts = opts or {}
  local tcp = uv.new_tcp()
  local state = { data = "", done = false }
  tcp:connect("127.0.0.1", port, function(err)
    if err then state.err = err; state.done = true; return end
    if type(bytes) == "table" then
      -- pieces written with a pause between them (split reads on the server)
      core.spawn(function()
        for _, piece in ipairs(bytes) do
          if tcp:is_closing() then return end
          tcp:write(piece)
          core.sleep(opts.gap_ms or 20)
        end
      end)
    else
      tcp:write(bytes)
    end
    tcp:read_start(function(rerr, chunk)
      if chunk then
        state.data = state.data .. chunk
        if opts.until_pattern and state.data:find(opts.until_pattern, 1, true) then state.done = true end
      else
        state.done = true
      end
    end)
  end)
  local deadline = core.now() + (opts.timeout_ms or 5000)
  local close_at = opts.close_after_ms and core.now() + opts.close_after_ms
  while not state.done and core.now() < deadline do
    if close_at and core.now() >= close_at then break end
    core.sleep(5)
  end
  if not tcp:is_closing() then tcp:close() end
  return state.data, state.err
end

function H.gen_body(text, extra)
  local t = { text = text, sampling_params = { max_new_tokens = 4 } }
  if extra then for k, v in pairs(extra) do t[k] = v end end
  return cjson.encode(t)
end

-- Run fns concurrently, wait for all; returns their first results.
function H.parallel(fns)
  local results, left = {}, #fns
  local done = core.event()
  for i, fn in ipairs(fns) do
    core.spawn(function()
      local ok, r = pcall(fn)
      results[i] = ok and r or { error = r }
      left = left - 1
      if left == 0 then done:set(true) end
    end)
  end
  if left > 0 then done:wait(60000) end
  return results
end

-- The router's /metrics text, and the value of one series in it (0 when
-- absent), e.g. H.metric(text, 'sgl_router_requests_total{route="generate"}')
function H.scrape(router)
  local res = assert(H.get("http://127.0.0.1:" .. router.metrics_port, "/metrics"))
  assert(res.status == 200, "GET /metrics answered " .. res.status)
  return res.body
end

function H.metric(text, series)
  for line in text:gmatch("[^\n]+") do
    if line:sub(1, #series + 1) == series .. " " then return tonumber(line:sub(#series + 2)) end
  end
  return 0
end

function H.worker_of(res)
  return res and res.headers and res.headers["x-sim-worker"]
end

function H.list_workers(router)
  local res = assert(H.get(router.url, "/list_workers"))
  return res.json
end

function H.tmpfile(content, suffix)
  local name = os.tmpname() .. (suffix or "")
  local f = assert(io.open(name, "w"))
  f:write(content)
  f:close()
  return name
end

-- A sim worker in the PD prefill role, serving its bootstrap port too:
-- { url, port, bootstrap_port, proc }
function H.prefill_sim(id, extra)
  local args = { "--id", id, "--role", "prefill", "--bootstrap-port", "0" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local w = H.sim(args)
  -- printed in the same write as the listening line
  w.bootstrap_port = tonumber(H.wait_output(w.proc, id:gsub("%p", "%%%0") .. " bootstrap on http://127%.0%.0%.1:(%d+)"))
  return w
end

-- The data events of an SSE body, decoded ([DONE] left out).
function H.sse_events(body)
  local list = {}
  for data in body:gmatch("data: ([^\n]*)\n\n") do
    if data ~= "[DONE]" then list[#list + 1] = assert(cjson.decode(data), data) end
  end
  return list
end

-- A sim worker's /sim/stats, decoded.
function H.sim_stats(w)
  local res = assert(H.get(w.url, "/sim/stats"))
  assert(res.status == 200, "GET /sim/stats answered " .. res.status)
  return res.json
end

return H

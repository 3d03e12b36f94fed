-- Soak test (a command, not a test): load through the router while workers
-- are killed and restarted; reports requests lost.
--
--   build/sglr lua examples/benchmarks/soak.lua [minutes=10] [concurrency=16]
--
-- Four sim workers on loopback; every 15 s one random worker is killed
-- (SIGKILL) and restarted 5 s later on the same port, so at least three are
-- up at any time (SGLR_SOAK_KILL=3: three at once, one left up). A non-streaming request is lost when the client gets
-- anything but 200. Exit status 0 when none was lost.
--
-- SGLR_SOAK_MODE=pd: the router in PD mode over 2 prefill and 2 decode sim
-- workers (the decodes check every bootstrap room with their prefill);
-- every 15 s one worker is killed, prefill and decode in turn, so one of
-- each role is always up.
local core = require "sglr.core"
local cjson = require "cjson.safe"
local fleet_mod = require "sglr.fleet"

local minutes = tonumber(arg and arg[1]) or 10
local concurrency = tonumber(arg and arg[2]) or 16
local fleet = fleet_mod.new()
local SIM = { "--decode-ms-per-token", "1" }

local pd = os.getenv("SGLR_SOAK_MODE") == "pd"
local workers = {}
for i = 1, 4 do
  local args = { "--id", "w" .. i, unpack(SIM) }
  local role = pd and (i <= 2 and "prefill" or "decode") or nil
  if role == "prefill" then
    local pf, proc = fleet:prefill(args)
    workers[i] = { url = pf.url, proc = proc, port = tonumber(pf.url:match(":(%d+)$")), role = role,
      bootstrap_port = pf.bootstrap_port }
  else
    if role then
      args[#args + 1] = "--role"
      args[#args + 1] = role
    end
    local url, proc, port = fleet:worker(args)
    workers[i] = { url = url, proc = proc, port = port, role = role }
  end
end
local urls = {}
for i, w in ipairs(workers) do urls[i] = w.url end
local router_args = { "--policy", "cache_aware", "--log-level", os.getenv("SGLR_SOAK_LOG_LEVEL") or "warn",
  "--health-check-interval-secs", "1", "--health-failure-threshold", "1", "--health-success-threshold", "1",
  "--retry-initial-backoff-ms", "20", "--retry-max-retries", "5", "--cb-timeout-duration-secs", "2" }
-- SGLR_SOAK_LOG_DIR=DIR keeps the router's log in DIR for a look afterwards
-- (SGLR_SOAK_LOG_LEVEL=info for more than warnings)
if os.getenv("SGLR_SOAK_LOG_DIR") then
  router_args[#router_args + 1] = "--log-dir"
  router_args[#router_args + 1] = os.getenv("SGLR_SOAK_LOG_DIR")
end
-- SGLR_SOAK_ARGS="--max-tree-size 1000000 ..." adds router flags (split on spaces)
for a in (os.getenv("SGLR_SOAK_ARGS") or ""):gmatch("%S+") do router_args[#router_args + 1] = a end
local rurl, rproc
if pd then
  rurl, rproc = fleet:pd_router({ workers[1], workers[2] }, { workers[3].url, workers[4].url }, router_args)
else
  rurl, rproc = fleet:router(urls, router_args)
end
local pool = assert(core.upstream(rurl))

local stop_at = core.now() + minutes * 60000
local sent, ok, lost, statuses, kills = 0, 0, 0, {}, 0
local lat = {}

local function client(id)
  local n = 0
  while core.now() < stop_at do
    n = n + 1
    local body = cjson.encode({ text = ("user %d turn %d: "):format(id, n) .. string.rep("context ", 30),
      sampling_params = { max_new_tokens = 8 } })
    sent = sent + 1
    local t0 = core.now()
    local res, err = core.request(pool, { method = "POST", path = "/generate", body = body,
      headers = { ["content-type"] = "application/json" }, timeout_ms = 30000 })
    local st = res and res.status or err
    statuses[st] = (statuses[st] or 0) + 1
    if res and res.status == 200 then
      ok = ok + 1
      lat[#lat + 1] = core.now() - t0
    else
      lost = lost + 1
    end
  end
end

local done = core.event()
local running = concurrency
for i = 1, concurrency do
  core.spawn(function()
    client(i)
    running = running - 1
    if running == 0 then done:set(true) end
  end)
end

-- SGLR_SOAK_KILL=N kills N workers at once (1 to 3; default 1), so that
-- only 4 - N stay up while they are down
local nkill = math.max(1, math.min(#workers - 1, tonumber(os.getenv("SGLR_SOAK_KILL")) or 1))
if pd then nkill = 1 end
local round = 0
core.spawn(function()
  math.randomseed(os.time())
  while core.now() < stop_at - 10000 do
    core.sleep(15000)
    round = round + 1
    local order = {}
    for i = 1, #workers do order[i] = i end
    if pd then    -- prefill and decode in turn: one of the role's two
      local first = round % 2 == 1 and 1 or 3
      order = { first + math.random(0, 1) }
    end
    for i = #order, 2, -1 do
      local j = math.random(1, i)
      order[i], order[j] = order[j], order[i]
    end
    local down = {}
    for k = 1, nkill do
      local w = workers[order[k]]
      down[k] = w
      w.proc.killed_by_soak = true
      fleet_mod.kill(w.proc, "sigkill")
      kills = kills + 1
      io.stderr:write(("[soak] killed %s; %d sent, %d lost so far\n"):format(w.url, sent, lost))
    end
    core.sleep(5000)
    for _, w in ipairs(down) do
      local args = { "--id", "w-restarted", unpack(SIM) }
      if w.role then
        for _, a in ipairs({ "--role", w.role }) do args[#args + 1] = a end
      end
      if w.bootstrap_port then
        for _, a in ipairs({ "--bootstrap-port", tostring(w.bootstrap_port) }) do args[#args + 1] = a end
      end
      local _, proc = fleet:worker(args, w.port)
      w.proc = proc
      io.stderr:write(("[soak] restarted %s\n"):format(w.url))
    end
  end
end)

done:wait()

-- the router's own view: how often its event loop stalled (lag histogram)
local function loop_lag()
  local mport = rproc.out:match("metrics on http:\\?/\\?/[%d%.]+:(%d+)")
  local mpool = mport and core.upstream("http://127.0.0.1:" .. mport)
  local res = mpool and core.request(mpool, { method = "GET", path = "/metrics", timeout_ms = 5000 })
  if not (res and res.status == 200) then return "router metrics not available" end
  local b = {}
  for le, n in res.body:gmatch('sgl_router_event_loop_lag_seconds_bucket{le="([^"]+)"} (%d+)') do b[le] = tonumber(n) end
  local total = b["+Inf"] or 0
  return ("router event loop: %d lag samples, %d over 25 ms, %d over 100 ms, %d over 1 s")
    :format(total, total - (b["0.025"] or 0), total - (b["0.1"] or 0), total - (b["1"] or 0))
end
local lag_line = loop_lag()

table.sort(lat)
local function pct(p) return lat[math.max(1, math.ceil(#lat * p))] or 0 end
print(("soak: %.1f min, %d workers%s, %d clients, %d worker kills"):format(minutes, #workers,
  pd and " (PD: 2 prefill, 2 decode)" or "", concurrency, kills))
print(("requests sent %d, ok %d, lost %d (%.4f%%)"):format(sent, ok, lost, sent > 0 and 100 * lost / sent or 0))
print(("latency p50 %.1f ms, p99 %.1f ms, max %.1f ms"):format(pct(0.5), pct(0.99), lat[#lat] or 0))
print(lag_line)
for st, n in pairs(statuses) do print(("  status %s: %d"):format(tostring(st), n)) end
-- anything that died without being killed here is a finding of its own
local died = 0
for _, p in ipairs(fleet.procs) do
  if p.exited and not p.killed_by_soak then
    died = died + 1
    print(("process `%s` exited on its own (code %s); its last output:\n%s")
      :format(table.concat(p.args, " "), tostring(p.code), p.out:sub(-2000)))
  end
end
fleet:stop()
core.exit((lost == 0 and died == 0) and 0 or 1)

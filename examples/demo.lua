-- make demo: start sim workers and the router on loopback, send a few
-- requests (one streaming), show which worker served each and the router's
-- view of its workers, then compare round_robin and cache_aware on a
-- shared-prefix workload. Everything started here is stopped at the end.
--
--   build/sglr lua examples/demo.lua [--quick]
local core = require "sglr.core"
local uv = require "luv"
local cjson = require "cjson.safe"

local BIN = os.getenv("SGLR_BIN") or "build/sglr"
local quick = arg and arg[1] == "--quick"
local procs = {}

local function spawn(args)
  local p = { out = "", args = args }
  local o, e = uv.new_pipe(false), uv.new_pipe(false)
  p.handle, p.pid = uv.spawn(BIN, { args = args, stdio = { nil, o, e } }, function(code)
    p.exited, p.code = true, code
  end)
  assert(p.handle, "cannot start " .. BIN .. ": " .. tostring(p.pid))
  local function rd(_, d) if d then p.out = p.out .. d end end
  o:read_start(rd)
  e:read_start(rd)
  p.pipes = { o, e }
  procs[#procs + 1] = p
  return p
end

local function wait_for(p, pattern)
  local deadline = core.now() + 20000
  while core.now() < deadline do
    local m = p.out:match(pattern)
    if m then return m end
    if p.exited then break end
    core.sleep(10)
  end
  error("timed out waiting for " .. table.concat(p.args, " ") .. ":\n" .. p.out)
end

local function stop_all()
  for _, p in ipairs(procs) do
    if not p.exited then uv.process_kill(p.handle, "sigterm") end
  end
  local deadline = core.now() + 5000
  for _, p in ipairs(procs) do
    while not p.exited and core.now() < deadline do core.sleep(10) end
    if not p.exited then uv.process_kill(p.handle, "sigkill") end
    for _, pipe in ipairs(p.pipes) do pipe:close() end
    p.handle:close()
  end
  procs = {}
end

local function start_workers(n, extra)
  local ws = {}
  for i = 1, n do
    local args = { "sim-worker", "--port", "0", "--id", "worker-" .. i }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    local p = spawn(args)
    local port = wait_for(p, "listening on http://127%.0%.0%.1:(%d+)")
    ws[i] = "http://127.0.0.1:" .. port
  end
  return ws
end

local function router_url(p)
  return "http://127.0.0.1:" .. wait_for(p, "listening on http://127%.0%.0%.1:(%d+)")
end

local function main()
  print("== sglr demo: 3 simulated workers behind the router (round_robin)")
  local ws = start_workers(3, { "--decode-ms-per-token", "20" })
  local args = { "run", "--port", "0", "--prometheus-port", "0", "--policy", "round_robin",
    "--worker-startup-check-interval", "0.1", "--worker-urls", ws[1], ws[2], ws[3] }
  local rp = spawn(args)
  local base = router_url(rp)
  print("router at " .. base .. "\n")
  local pool = assert(core.upstream(base))
  local function post(path, body)
    return assert(core.request(pool, { method = "POST", path = path, body = cjson.encode(body),
      headers = { ["content-type"] = "application/json" } }))
  end
  local reqs = {
    { "/generate", { text = "What is the capital of France?", sampling_params = { max_new_tokens = 8 } } },
    { "/v1/chat/completions", { model = "sim-model", max_tokens = 6,
      messages = { { role = "user", content = "Say hello" } } } },
    { "/v1/completions", { prompt = "Once upon a time", max_tokens = 5 } },
    { "/generate", { text = "What is the capital of France? And Spain?", sampling_params = { max_new_tokens = 4 } } },
  }
  for _, r in ipairs(reqs) do
    local res = post(r[1], r[2])
    print(string.format("POST %-22s -> %d from %s (request id %s)", r[1], res.status,
      res.headers["x-sim-worker"], res.headers["x-request-id"]))
  end
  local res = post("/generate", { text = "Stream a story", stream = true, sampling_params = { max_new_tokens = 12 } })
  local events = 0
  for _ in res.body:gmatch("data: {") do events = events + 1 end
  print(string.format("POST %-22s -> %d from %s: %d SSE events, first after %.0f ms, done after %.0f ms",
    "/generate (stream)", res.status, res.headers["x-sim-worker"], events, res.first_body_ms, res.total_ms))
  local lw = assert(core.request(pool, { method = "GET", path = "/list_workers" }))
  print("\nrouter's view (GET /list_workers):")
  for _, w in ipairs(cjson.decode(lw.body).workers) do
    print(string.format("  %-28s healthy=%s load=%d processed=%d circuit=%s", w.url, tostring(w.healthy),
      w.load, w.processed, w.circuit))
  end
  stop_all()

  local ok_bench, bench = pcall(require, "sglr.bench")
  if not ok_bench or not bench.run then
    print("\n(sglr bench is not available in this build; skipping the policy comparison)")
    return
  end
  local groups, per = quick and 8 or 32, quick and 4 or 8
  print(string.format("\n== round_robin vs cache_aware: %d groups x %d prompts sharing a 2048-token system prompt,", groups, per))
  print("   4 workers whose KV cache holds about a quarter of the prefixes")
  local summaries = {}
  for _, policy in ipairs({ "round_robin", "cache_aware" }) do
    ws = start_workers(4, { "--kv-tokens", "20000", "--prefill-us-per-token", "50",
      "--decode-ms-per-token", "0.2" })
    local p = spawn({ "run", "--port", "0", "--prometheus-port", "0", "--policy", policy,
      "--worker-startup-check-interval", "0.1", "--worker-urls", ws[1], ws[2], ws[3], ws[4] })
    local url = router_url(p)
    summaries[policy] = bench.run({ url = url, workload = "shared-prefix", groups = groups,
      prompts_per_group = per, system_tokens = 2048, question_tokens = 128, output_tokens = 16,
      concurrency = 16, seed = 1, quiet = true, route = "generate" })
    stop_all()
  end
  print(bench.compare({ round_robin = summaries.round_robin, cache_aware = summaries.cache_aware }))
end

local ok, err = xpcall(main, debug.traceback)
if not ok then io.stderr:write("demo failed: ", tostring(err), "\n") end
stop_all()
io.stdout:flush()
core.exit(ok and 0 or 1)

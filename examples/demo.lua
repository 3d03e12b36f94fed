-- make demo: start sim workers and the router on loopback, send a few
-- requests (one streaming), show which worker served each and the router's
-- view of its workers; then a prefill/decode (PD) fleet, showing which pair
-- served each request; then compare round_robin and cache_aware on a
-- shared-prefix workload. Everything started here is stopped at the end.
--
--   build/sglr lua examples/demo.lua [--quick]
local core = require "sglr.core"
local cjson = require "cjson.safe"
local fleet_mod = require "sglr.fleet"
local bench = require "sglr.bench"

local quick = arg and arg[1] == "--quick"
local fleet = fleet_mod.new()

local function part1()
  print("== sglr demo: 3 simulated workers behind the router (round_robin)")
  local urls = fleet:workers(3, { "--decode-ms-per-token", "20" })
  local base = fleet:router(urls, { "--policy", "round_robin" })
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
  fleet:stop()
end

-- PD: 2 prefill + 2 decode sim workers. The decode sims refuse a request
-- whose bootstrap room their prefill did not serve, so every 200 below is a
-- pair that met; the pair is read back from the workers' room lists.
local function part_pd()
  print("\n== PD disaggregation: 2 prefill + 2 decode workers (prefill: cache_aware, decode: round_robin)")
  local prefills, decodes = {}, {}
  for i = 1, 2 do
    prefills[i] = fleet:prefill({ "--id", "prefill-" .. i })
    decodes[i] = fleet:worker({ "--role", "decode", "--id", "decode-" .. i, "--decode-ms-per-token", "5" })
  end
  local base = fleet:pd_router(prefills, decodes, { "--prefill-policy", "cache_aware",
    "--decode-policy", "round_robin", "--log-level", "warn" })
  print("router at " .. base)
  local pool = assert(core.upstream(base))
  local prompts = { "Summarize the plot of Hamlet.", "Summarize the plot of Hamlet in one line.",
    "Translate 'good morning' to French.", "List three prime numbers.",
    "Summarize the plot of Hamlet for a child." }
  local by_id = {}
  for _, w in ipairs({ prefills[1].url, prefills[2].url, decodes[1], decodes[2] }) do
    by_id[#by_id + 1] = assert(core.upstream(w))
  end
  local function stats(p)
    return cjson.decode(assert(core.request(p, { path = "/sim/stats" })).body)
  end
  for i, text in ipairs(prompts) do
    local res = assert(core.request(pool, { method = "POST", path = "/generate",
      body = cjson.encode({ text = text, stream = i == 4, sampling_params = { max_new_tokens = 6 } }),
      headers = { ["content-type"] = "application/json" } }))
    -- the room the answering decode saw last, and the prefill that saw it too
    local decode, prefill, room = res.headers["x-sim-worker"], "?", "?"
    for _, p in ipairs(by_id) do
      local st = stats(p)
      if st.id == decode then room = st.rooms[#st.rooms] end
    end
    for _, p in ipairs(by_id) do
      local st = stats(p)
      if st.role == "prefill" then
        for _, r in ipairs(st.rooms) do if r == room then prefill = st.id end end
      end
    end
    print(string.format("POST /generate%-9s -> %d  %s + %s  (bootstrap_room %s)", i == 4 and " (stream)" or "",
      res.status, prefill, tostring(decode), room))
  end
  fleet:stop()
end

local function part2()
  local groups, per = quick and 8 or 32, quick and 4 or 8
  print(string.format("\n== round_robin vs cache_aware: %d groups x %d prompts sharing a 2048-token system prompt,", groups, per))
  print("   4 workers whose KV cache holds about a quarter of the prefixes")
  local summaries = {}
  for _, policy in ipairs({ "round_robin", "cache_aware" }) do
    local urls = fleet:workers(4, { "--kv-tokens", "20000", "--prefill-us-per-token", "50",
      "--decode-ms-per-token", "0.2" })
    local url = fleet:router(urls, { "--policy", policy, "--log-level", "warn" })
    summaries[#summaries + 1] = { policy, assert(bench.run({ url = url, workload = "shared-prefix",
      groups = groups, prompts_per_group = per, system_tokens = 2048, question_tokens = 128,
      output_tokens = 16, concurrency = 16, seed = 1, quiet = true })) }
    fleet:stop()
  end
  io.write(bench.compare(summaries))
end

local ok, err = xpcall(function() part1(); part_pd(); part2() end, debug.traceback)
if not ok then io.stderr:write("demo failed: ", tostring(err), "\n") end
fleet:stop()
io.stdout:flush()
core.exit(ok and 0 or 1)

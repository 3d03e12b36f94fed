-- sglr sim against the live router: the same policy file runs in both,
-- live traffic captured with --trace-out replays offline, and the offline
-- numbers match what the live fleet of sim-workers measures.
local H = require "spec.helpers"
local cjson = require "cjson.safe"
local bench = require "sglr.bench"
local simulate = require "sglr.simulate"

-- Run `sglr sim ARGS --json` as a process: -> decoded object, output
local function sim_cli(args)
  local t = { "sim", "--json" }
  for _, a in ipairs(args) do t[#t + 1] = a end
  local p = H.spawn(t)
  local code = H.wait_stopped(p, 60000)
  assert.equal(0, code, p.out)
  local obj = cjson.decode(p.out:match("({\"policies\".*})"))
  assert(obj, p.out)
  return obj, p.out
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

describe("sglr sim with the router's policy files", function()
  teardown(H.stop_all)

  it("runs examples/custom_policy.lua unchanged in run and in sim", function()
    local w1, w2 = H.sim({ "--id", "w1" }), H.sim({ "--id", "w2" })
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "examples/custom_policy.lua" })
    local first
    for i = 1, 6 do
      local res = assert(H.post(r.url, "/generate", H.gen_body("q" .. i), { ["x-session-id"] = "alice" }))
      assert.equal(200, res.status)
      first = first or H.worker_of(res)
      assert.equal(first, H.worker_of(res))
    end
    H.stop_all()
    -- offline: multi-turn users carry x-session-id, so each conversation
    -- stays on one worker and its history is a cache hit
    local obj = sim_cli({ "--policy", "examples/custom_policy.lua", "--policy", "round_robin",
      "--workload", "multi-turn", "--users", "8", "--turns", "4", "--turn-tokens", "64",
      "--output-tokens", "8", "--workers", "3" })
    local custom = obj.policies.session_affinity
    assert.equal(32, custom.requests)
    assert.equal(32, custom.ok)
    assert.is_true(custom.cache_hit_rate > obj.policies.round_robin.cache_hit_rate)
  end)
end)

describe("capture with sglr run --trace-out, replay with sglr sim --trace", function()
  local file
  after_each(function()
    H.stop_all()
    if file then os.remove(file); os.remove(file .. ".1") end
  end)

  it("replays the captured requests: same count and routes, no prompt text kept", function()
    file = os.tmpname() .. ".jsonl"
    local w1, w2 = H.sim({ "--id", "w1" }), H.sim({ "--id", "w2" })
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "cache_aware",
      "--trace-out", file })
    local system = ("secret system prompt "):rep(40)
    for i = 1, 8 do
      local res = assert(H.post(r.url, "/generate", H.gen_body(system .. "question " .. i)))
      assert.equal(200, res.status)
    end
    for i = 1, 4 do
      local res = assert(H.post(r.url, "/v1/chat/completions", cjson.encode({ model = "m", max_tokens = 3,
        messages = { { role = "system", content = system }, { role = "user", content = "chat " .. i } } })))
      assert.equal(200, res.status)
    end
    H.kill(r.proc)
    assert.equal(0, H.wait_stopped(r.proc))
    local text = read(file)
    assert.is_nil(text:find("secret", 1, true))
    local lines, routes = 0, {}
    for line in text:gmatch("[^\n]+") do
      lines = lines + 1
      local rec = assert(cjson.decode(line))
      routes[rec.route] = (routes[rec.route] or 0) + 1
      assert.is_true(#rec.blocks >= 3)
      assert.truthy(rec.worker == w1.url or rec.worker == w2.url)
      assert.equal(200, rec.status)
      assert.is_number(rec.ttft_ms)
      assert.is_true(rec.latency_ms >= rec.ttft_ms)
    end
    assert.equal(12, lines)
    assert.same({ generate = 8, chat = 4 }, routes)
    local obj = sim_cli({ "--trace", file, "--workers", "2", "--policy", "cache_aware" })
    local s = obj.policies.cache_aware
    assert.equal(12, s.requests)
    assert.equal(12, s.ok)
    assert.same({ generate = 8, chat = 4 }, s.routes)
    -- the shared system prompt is found again in the replay
    assert.is_true(s.cache_hit_rate > 50, tostring(s.cache_hit_rate))
  end)
end)

-- sim vs live: the same workload through sglr run in front of sim-worker
-- processes, and through sglr sim with the same model flags.
describe("sglr sim fidelity", function()
  teardown(H.stop_all)

  -- service times of tens of ms, so the router hop and timer rounding
  -- (a millisecond or two, more under sanitizers) stay small beside them
  local MODEL = { "--prefill-us-per-token", "80", "--decode-ms-per-token", "2.5", "--kv-tokens", "6000",
    "--max-running-requests", "3", "--decode-batch-ms", "0.5" }
  local WL = { workload = "shared-prefix", groups = 25, prompts_per_group = 20, system_tokens = 600,
    question_tokens = 60, output_tokens = 16, concurrency = 24, seed = 3, quiet = true }

  it("is within 3 points of hit rate and 15% of mean TTFT of a live run (500 requests)", function()
    local workers, urls = {}, {}
    for i = 1, 4 do
      workers[i] = H.sim(MODEL)
      urls[i] = workers[i].url
    end
    local report = {}
    for _, policy in ipairs({ "round_robin", "cache_aware" }) do
      for _, w in ipairs(workers) do assert.equal(200, assert(H.post(w.url, "/flush_cache")).status) end
      local args = { "--policy", policy, "--worker-urls" }
      for _, u in ipairs(urls) do args[#args + 1] = u end
      local r = H.router(args)
      local o = {}
      for k, v in pairs(WL) do o[k] = v end
      o.url = r.url
      local live = assert(bench.run(o))
      H.kill(r.proc)
      H.wait_stopped(r.proc)
      local sargs = { "--workers", "4", "--policy", policy, "--groups", "25", "--prompts-per-group", "20",
        "--system-tokens", "600", "--question-tokens", "60", "--output-tokens", "16",
        "--concurrency", "24", "--seed", "3" }
      for _, a in ipairs(MODEL) do sargs[#sargs + 1] = a end
      local so = assert(simulate.parse_args(sargs))
      local cols = assert(simulate.run(so))
      local off = cols[1][2]
      report[#report + 1] = string.format("%s: hit live %.1f sim %.1f, TTFT mean live %.1f sim %.1f",
        policy, live.cache_hit_rate, off.cache_hit_rate, live.ttft_ms.mean, off.ttft_ms.mean)
      assert.equal(500, live.ok)
      assert.equal(500, off.ok)
      assert.is_true(math.abs(live.cache_hit_rate - off.cache_hit_rate) <= 3, report[#report])
      assert.is_true(math.abs(live.ttft_ms.mean - off.ttft_ms.mean) <= 0.15 * live.ttft_ms.mean,
        report[#report])
    end
    if os.getenv("SGLR_SPEC_VERBOSE") then io.stderr:write(table.concat(report, "\n"), "\n") end
  end)
end)

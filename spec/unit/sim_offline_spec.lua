-- sglr sim in process: the virtual clock, traces, the policy runtime.
local simulate = require "sglr.simulate"
local trace = require "sglr.trace"
local cjson = require "cjson.safe"

-- Run sglr sim's flags in process: -> { name = summary }
local function sim(args)
  local o = assert(simulate.parse_args(args))
  local warnings = {}
  local cols, err = simulate.run(o, function(m) warnings[#warnings + 1] = m end)
  assert(cols, err)
  local out = {}
  for _, c in ipairs(cols) do
    c[2].timeline = nil
    out[c[1]] = c[2]
  end
  return out, warnings
end

local function tmpfile(content)
  local name = os.tmpname()
  local f = assert(io.open(name, "w"))
  f:write(content)
  f:close()
  return name
end

local MODEL = { "--workers", "4", "--prefill-us-per-token", "50", "--decode-ms-per-token", "1",
  "--kv-tokens", "8000", "--max-running-requests", "4", "--decode-batch-ms", "0.2" }

local function with(extra)
  local t = {}
  for _, a in ipairs(MODEL) do t[#t + 1] = a end
  for _, a in ipairs(extra) do t[#t + 1] = a end
  return t
end

describe("sglr sim on a virtual clock", function()
  it("gives the same numbers for the same seed, and others for another seed", function()
    local args = with({ "--policy", "power_of_two", "--policy", "cache_aware", "--policy", "random",
      "--policy-opt", "load_check_interval=0.05", "--groups", "12", "--prompts-per-group", "10",
      "--system-tokens", "300", "--question-tokens", "40", "--output-tokens", "8",
      "--rate", "300", "--concurrency", "24", "--seed", "7" })
    local a = cjson.encode((sim(args)))
    local b = cjson.encode((sim(args)))
    assert.equal(a, b)
    args[#args] = "8"
    local c = cjson.encode((sim(args)))
    assert.not_equal(a, c)
  end)

  it("reports bench's fields, worker shares and prefill work per policy", function()
    local res = sim(with({ "--policy", "round_robin", "--policy", "cache_aware", "--groups", "8",
      "--prompts-per-group", "8", "--system-tokens", "400", "--output-tokens", "4" }))
    for _, name in ipairs({ "round_robin", "cache_aware" }) do
      local s = res[name]
      assert.equal(64, s.requests)
      assert.equal(64, s.ok)
      assert.is_number(s.cache_hit_rate)
      assert.is_number(s.ttft_ms.mean)
      assert.is_number(s.latency_ms.p99)
      assert.is_true(s.throughput_rps > 0)
      local total = 0
      for url, share in pairs(s.worker_share) do
        assert.truthy(url:match("^http://sim%-%d+$"))
        total = total + share
      end
      assert.near(1, total, 1e-9)
      assert.equal(s.prompt_tokens - s.cached_tokens, s.prefill_tokens)
    end
    -- the point of cache-aware routing, seen offline
    assert.is_true(res.cache_aware.cache_hit_rate > res.round_robin.cache_hit_rate + 20)
    assert.is_true(res.cache_aware.prefill_tokens < res.round_robin.prefill_tokens)
  end)

  it("queues past --max-running-requests, so load shows in TTFT", function()
    local base = { "--policy", "round_robin", "--workers", "1", "--groups", "1", "--prompts-per-group",
      "32", "--system-tokens", "0", "--question-tokens", "10", "--output-tokens", "10",
      "--decode-ms-per-token", "1", "--concurrency", "8", "--prefill-us-per-token", "0",
      "--decode-batch-ms", "0" }
    local function limit(n)
      local t = {}
      for i, a in ipairs(base) do t[i] = a end
      t[#t + 1] = "--max-running-requests"; t[#t + 1] = tostring(n)
      return t
    end
    local free = sim(limit(0)).round_robin
    local capped = sim(limit(2)).round_robin
    assert.near(10, free.ttft_ms.mean, 0.01)
    assert.is_true(capped.ttft_ms.mean > 3 * free.ttft_ms.mean)
  end)

  it("closed loop keeps at most --concurrency in flight; --rate paces arrivals", function()
    local closed = sim(with({ "--policy", "round_robin", "--groups", "4", "--prompts-per-group", "25",
      "--concurrency", "5" })).round_robin
    assert.equal(5, closed.max_inflight)
    local open = sim(with({ "--policy", "round_robin", "--groups", "4", "--prompts-per-group", "25",
      "--system-tokens", "10", "--question-tokens", "10", "--output-tokens", "1", "--rate", "10" })).round_robin
    -- 100 Poisson arrivals at 10/s take about 10 virtual seconds
    assert.is_true(open.duration_s > 6 and open.duration_s < 14, tostring(open.duration_s))
  end)

  it("models dp ranks: one cache each, routed to by rank with --dp-aware", function()
    local args = with({ "--policy", "cache_aware", "--groups", "8", "--prompts-per-group", "8",
      "--system-tokens", "400", "--dp-size", "2" })
    local plain = sim(args).cache_aware
    local n = 0
    for url in pairs(plain.worker_share) do n = n + 1; assert.falsy(url:find("@", 1, true)) end
    assert.equal(4, n)
    args[#args + 1] = "--dp-aware"
    local aware = sim(args).cache_aware
    n = 0
    for url in pairs(aware.worker_share) do n = n + 1; assert.truthy(url:match("^http://sim%-%d@[01]$")) end
    assert.equal(8, n)
    -- ranks in turn scatter a group's prefix over both caches; rank-aware
    -- routing keeps it on one
    assert.is_true(aware.cache_hit_rate > plain.cache_hit_rate)
  end)

  it("models PD fleets: a prefill pool and a decode pool, one policy instance each", function()
    local res = sim({ "--prefill", "2", "--decode", "3", "--policy", "round_robin", "--policy", "cache_aware",
      "--groups", "6", "--prompts-per-group", "10", "--system-tokens", "500", "--output-tokens", "10",
      "--prefill-us-per-token", "100", "--decode-ms-per-token", "2", "--concurrency", "4" })
    for _, name in ipairs({ "round_robin", "cache_aware" }) do
      local s = res[name]
      assert.equal(60, s.ok)
      local p, d = 0, 0
      for url, share in pairs(s.worker_share) do
        if url:match("^http://prefill%-%d$") then p = p + share
        elseif url:match("^http://decode%-%d$") then d = d + share
        else error("unexpected worker " .. url) end
      end
      assert.near(1, p, 1e-9)
      assert.near(1, d, 1e-9)
      -- every answer decodes 10 tokens of 2 ms after its prefill
      assert.is_true(s.latency_ms.p50 >= 20)
    end
    -- the prefill pool holds the cache
    assert.is_true(res.cache_aware.cache_hit_rate > res.round_robin.cache_hit_rate)
    assert.is_nil(simulate.parse_args({ "--prefill", "2" }))
  end)

  it("--plot draws TTFT and each worker's load per policy as SVG", function()
    local o = assert(simulate.parse_args(with({ "--policy", "round_robin", "--policy", "cache_aware",
      "--groups", "4", "--prompts-per-group", "10", "--rate", "50" })))
    local cols = assert(simulate.run(o))
    local svg = require("sglr.simplot").render(cols)
    assert.truthy(svg:find("^<svg"))
    assert.truthy(svg:find("round_robin: TTFT", 1, true))
    assert.truthy(svg:find("cache_aware: load per worker", 1, true))
    local _, lines = svg:gsub("<polyline", "")
    assert.equal(2 * (2 + 4), lines)   -- per policy: TTFT mean and max, 4 workers
  end)

  it("validates --policy-opt against the policies' schemas", function()
    local o = assert(simulate.parse_args({ "--policy", "cache_aware", "--policy-opt", "cache_threshold=2" }))
    local cols, err = simulate.run(o)
    assert.is_nil(cols)
    assert.truthy(err:find("cache_threshold", 1, true))
    o = assert(simulate.parse_args({ "--policy", "round_robin", "--policy-opt", "nope=1" }))
    cols, err = simulate.run(o)
    assert.is_nil(cols)
    assert.truthy(err:find("nope", 1, true))
  end)

  it("gives a policy the router's runtime fields on the virtual clock", function()
    local file = tmpfile([[
local P = { name = "probe", version = "1.0.0", options = {} }
local seen = {}
package.loaded["spec.sim_probe"] = seen
function P.new(conf, rt)
  local self = setmetatable({ rt = rt }, { __index = P })
  seen.tree = rt.radix() ~= nil
  seen.metrics = rt.metrics == nil
  seen.log = type(rt.log)
  seen.ticks = 0
  rt.every(1000, function(now)
    seen.ticks = seen.ticks + 1
    seen.tick_now = seen.tick_now or now
    rt.sleep(10)
    seen.after_sleep = rt.now() - now
    seen.load_status, seen.load_body = rt.http({ method = "GET", url = "http://sim-1/get_load" })
    seen.other = select(2, rt.http({ method = "GET", url = "http://example.com/" }))
  end)
  return self
end
function P:select(req, workers)
  seen.text = seen.text or req.text
  return workers[self.rt.random(#workers)]
end
function P:on_done(req, w, status, ms)
  seen.done = (seen.done or 0) + 1
  seen.status = status
  seen.ms = ms
end
return P
]])
    local renamed = file .. ".lua"
    os.rename(file, renamed)
    local res = sim(with({ "--policy", renamed, "--groups", "2", "--prompts-per-group", "50",
      "--system-tokens", "100", "--output-tokens", "50", "--rate", "20" }))
    os.remove(renamed)
    local seen = package.loaded["spec.sim_probe"]
    package.loaded["spec.sim_probe"] = nil
    assert.equal(100, res.probe.ok)
    assert.is_true(seen.tree)
    assert.is_true(seen.metrics)
    assert.equal("function", seen.log)
    -- 100 arrivals at 20/s: about 5 virtual seconds of 1-second ticks
    assert.is_true(seen.ticks >= 3 and seen.ticks <= 8, tostring(seen.ticks))
    assert.equal(1000, seen.tick_now)
    assert.equal(10, seen.after_sleep)
    assert.equal(200, seen.load_status)
    assert.truthy(seen.load_body:find('"load"', 1, true))
    assert.truthy(seen.other:find("no network", 1, true))
    assert.equal(4 * (100 + 128), #seen.text)   -- system prompt and question, as routed
    assert.equal(100, seen.done)
    assert.equal(200, seen.status)
    assert.is_true(seen.ms > 0)
  end)
end)

describe("trace files", function()
  it("Mooncake: equal hash_ids give equal prefixes of 512-token blocks", function()
    local text = table.concat({
      cjson.encode({ timestamp = 100, input_length = 1500, output_length = 7, hash_ids = { 1, 2, 3 } }),
      cjson.encode({ timestamp = 0, input_length = 1200, output_length = 9, hash_ids = { 1, 2, 4 } }),
      cjson.encode({ timestamp = 50, input_length = 300, output_length = 1, hash_ids = { 5 } }),
    }, "\n")
    local wl = assert(trace.parse(text))
    assert.equal(3, wl.total)
    assert.is_true(wl.timed)
    local a, b, c = wl.sessions[1][1], wl.sessions[2][1], wl.sessions[3][1]
    -- sorted by timestamp, relative to the first
    assert.same({ 0, 50, 100 }, { a.at, b.at, c.at })
    assert.equal(1200 * 4, #a.text)
    assert.equal(300 * 4, #b.text)
    assert.equal(1500 * 4, #c.text)
    assert.equal(9, a.output_tokens)
    -- two shared blocks of 512 tokens (2048 bytes), then different
    local shared = 2 * 512 * 4
    assert.equal(a.text:sub(1, shared), c.text:sub(1, shared))
    assert.not_equal(a.text:sub(shared + 1, shared + 64), c.text:sub(shared + 1, shared + 64))
    assert.not_equal(a.text:sub(1, 64), b.text:sub(1, 64))
    -- the same id is the same text on every read
    assert.equal(a.text, a.text)
  end)

  it("reports bad lines with their numbers and skips them", function()
    local warned = {}
    local text = table.concat({
      cjson.encode({ timestamp = 0, input_length = 100, output_length = 1, hash_ids = { 1 } }),
      "{not json",
      cjson.encode({ timestamp = 5, input_length = "many", hash_ids = { 1 } }),
      "",
      cjson.encode({ hello = "world" }),
      cjson.encode({ timestamp = 9, input_length = 100, output_length = 1, hash_ids = { 1, "x" } }),
      cjson.encode({ t = 3, blocks = { "00ff00ff" }, text_chars = 200, route = "chat", output_tokens = 2 }),
    }, "\n")
    local wl = assert(trace.parse(text, { warn = function(m) warned[#warned + 1] = m end }))
    assert.equal(2, wl.total)
    assert.equal(4, wl.skipped)
    assert.equal(4, #warned)
    assert.truthy(warned[1]:find("^trace line 2: invalid JSON"))
    assert.truthy(warned[2]:find("^trace line 3: .*input_length"))
    assert.truthy(warned[3]:find("^trace line 5: "))
    assert.truthy(warned[4]:find("^trace line 6: .*hash_ids"))
    assert.is_nil(trace.parse("{bad\n", {}))
  end)

  it("replays a Mooncake trace in sglr sim, where shared blocks hit the cache", function()
    local lines = {}
    for i = 1, 60 do
      lines[i] = cjson.encode({ timestamp = i * 20, input_length = 1100, output_length = 4,
        hash_ids = { i % 3, 100 + i % 3, 1000 + i } })
    end
    local file = tmpfile(table.concat(lines, "\n"))
    local res = sim({ "--workers", "4", "--trace", file, "--policy", "cache_aware",
      "--policy", "round_robin", "--prefill-us-per-token", "10" })
    os.remove(file)
    assert.equal(60, res.cache_aware.ok)
    -- 2 of 3 blocks (1024 of 1100 tokens) are shared within each of 3 groups
    assert.is_true(res.cache_aware.cache_hit_rate > 85, tostring(res.cache_aware.cache_hit_rate) .. " " .. tostring(res.round_robin.cache_hit_rate))
    assert.is_true(res.round_robin.cache_hit_rate < res.cache_aware.cache_hit_rate)
  end)

  it("capture files move to FILE.1 past their size limit", function()
    local path = os.tmpname()
    os.remove(path)
    local w = assert(trace.open(path, 1000, function() return 0 end))
    local line = ("x"):rep(99)
    for _ = 1, 25 do assert.is_true(w:write(line)) end
    w:close()
    local function size(p)
      local f = io.open(p, "rb")
      if not f then return nil end
      local n = #f:read("*a")
      f:close()
      return n
    end
    assert.equal(500, size(path))          -- 5 lines of 100 bytes since the last move
    assert.equal(1000, size(path .. ".1"))
    os.remove(path)
    os.remove(path .. ".1")
  end)

  it("chained block hashes: a shared prefix shares its leading blocks only", function()
    local a = trace.block_hashes(("x"):rep(600) .. "tail-a")
    local b = trace.block_hashes(("x"):rep(600) .. "tail-b")
    local c = trace.block_hashes(("y"):rep(256) .. ("x"):rep(344))
    assert.equal(3, #a)
    assert.same({ a[1], a[2] }, { b[1], b[2] })
    assert.not_equal(a[3], b[3])
    assert.not_equal(a[2], c[2])
    assert.truthy(a[1]:match("^%x%x%x%x%x%x%x%x$"))
  end)
end)

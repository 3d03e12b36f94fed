-- policies/power_of_two.lua: of two distinct random workers the less loaded
-- one wins, loads come from /get_load polls when there are any.

local policy = require "sglr.policy"

local function workers(loads)
  local list = {}
  for i, l in ipairs(loads) do
    list[i] = { url = "http://w" .. i, load = l, role = "regular", healthy = true }
  end
  return list
end

-- rolls: the values rt.random returns in turn (math.random when exhausted).
-- bodies: url -> { status, body } answered by rt.http.
local function runtime(rolls, bodies)
  local rt = { timers = {}, calls = {}, requests = {} }
  local k = 0
  rt.random = function(n)
    rt.calls[#rt.calls + 1] = n
    k = k + 1
    local v = rolls and rolls[k]
    if v then
      assert(v >= 1 and v <= n, "roll out of range")
      return v
    end
    return math.random(n)
  end
  rt.now = function() return 0 end
  rt.log = function() end
  rt.every = function(ms, fn) rt.timers[#rt.timers + 1] = { ms = ms, fn = fn } end
  rt.http = function(req)
    rt.requests[#rt.requests + 1] = req
    local url = req.url:gsub("/get_load$", "")
    local answer = bodies and bodies[url]
    if not answer then return nil, "connection refused" end
    return answer[1], answer[2]
  end
  return rt
end

local function new(rt, opts)
  local P = assert(policy.load("power_of_two"))
  return assert(policy.instantiate(P, opts or {}, rt))
end

describe("power_of_two policy", function()
  it("declares its shape", function()
    local P = require "policies.power_of_two"
    assert.equal("power_of_two", P.name)
    assert.is_string(P.version)
    assert.equal(10, P.options.load_check_interval.default)
  end)

  it("returns nil and a reason without workers", function()
    local w, reason = new(runtime()):select({}, {})
    assert.is_nil(w)
    assert.is_string(reason)
  end)

  it("returns the only worker without rolling", function()
    local rt = runtime()
    local ws = workers({ 7 })
    assert.equal(ws[1], new(rt):select({}, ws))
    assert.same({}, rt.calls)
  end)

  it("picks the lower load of the two sampled", function()
    local ws = workers({ 5, 1, 9 })
    -- rolls 1 then 1: the second draw skips the first pick, so w1 vs w2
    assert.equal("http://w2", new(runtime({ 1, 1 })):select({}, ws).url)
    -- rolls 3 then 1: w3 vs w1
    assert.equal("http://w1", new(runtime({ 3, 1 })):select({}, ws).url)
    -- rolls 3 then 2: w3 vs w2
    assert.equal("http://w2", new(runtime({ 3, 2 })):select({}, ws).url)
    local rt = runtime({ 2, 2 })
    new(rt):select({}, ws)
    assert.same({ 3, 2 }, rt.calls)
  end)

  it("never samples the same worker twice", function()
    -- with two workers both are always compared, so the idle one always wins
    local p, ws = new(runtime()), workers({ 0, 10 })
    for _ = 1, 200 do assert.equal("http://w1", p:select({}, ws).url) end
    ws[1].load, ws[2].load = 10, 0
    for _ = 1, 200 do assert.equal("http://w2", p:select({}, ws).url) end
  end)

  it("spreads evenly when loads are equal", function()
    local p, ws = new(runtime()), workers({ 0, 0, 0, 0 })
    local count = {}
    for _ = 1, 4000 do
      local w = p:select({}, ws).url
      count[w] = (count[w] or 0) + 1
    end
    for i = 1, 4 do assert.is_true(count["http://w" .. i] > 800) end
  end)

  it("polls /get_load on its timer and prefers the polled loads", function()
    local rt = runtime(nil, {
      ["http://w1"] = { 200, '{"load": 1}' },
      ["http://w2"] = { 200, '{"load": 50}' },
    })
    local p = new(rt, { load_check_interval = 3 })
    assert.equal(1, #rt.timers)
    assert.equal(3000, rt.timers[1].ms)
    local ws = workers({ 100, 0 })                        -- local counts say w2
    assert.equal("http://w2", p:select({}, ws).url)
    rt.timers[1].fn(0)
    assert.equal(2, #rt.requests)
    for _, req in ipairs(rt.requests) do
      assert.equal("GET", req.method)
      assert.truthy(req.url:match("^http://w[12]/get_load$"))
      assert.is_number(req.timeout_ms)
    end
    for _ = 1, 20 do assert.equal("http://w1", p:select({}, ws).url) end
  end)

  it("keeps the polled loads across a reload (migrate)", function()
    local rt = runtime(nil, {
      ["http://w1"] = { 200, '{"load": 1}' },
      ["http://w2"] = { 200, '{"load": 50}' },
    })
    local old = new(rt, { load_check_interval = 3 })
    local ws = workers({ 100, 0 })                        -- local counts say w2
    old:select({}, ws)
    rt.timers[1].fn(0)
    local p = new(runtime(), { load_check_interval = 3 })
    p:migrate(old)
    for _ = 1, 20 do assert.equal("http://w1", p:select({}, ws).url) end
  end)

  it("falls back to the local count when a poll fails", function()
    local bodies = { ["http://w1"] = { 200, '{"load": 1}' }, ["http://w2"] = { 200, '{"load": 50}' } }
    local rt = runtime(nil, bodies)
    local p = new(rt)
    local ws = workers({ 100, 0 })
    p:select({}, ws)
    rt.timers[1].fn(0)
    assert.equal("http://w1", p:select({}, ws).url)
    bodies["http://w1"] = nil                            -- refused
    bodies["http://w2"] = { 503, "busy" }
    rt.timers[1].fn(0)
    assert.equal("http://w2", p:select({}, ws).url)
    bodies["http://w1"] = { 200, "not json" }
    rt.timers[1].fn(0)
    assert.equal("http://w2", p:select({}, ws).url)
  end)

  it("mixes polled and local loads per worker", function()
    local rt = runtime(nil, { ["http://w1"] = { 200, '{"load": 30}' } })
    local p = new(rt)
    local ws = workers({ 0, 20 })
    p:select({}, ws)
    rt.timers[1].fn(0)                                   -- w1 polled 30, w2 unknown: 20
    assert.equal("http://w2", p:select({}, ws).url)
  end)

  it("polls workers announced by on_add and stops for removed ones", function()
    local rt = runtime(nil, { ["http://a"] = { 200, '{"load": 0}' } })
    local p = new(rt)
    p:on_add({ url = "http://a" })
    p:on_add({ url = "http://b" })
    rt.timers[1].fn(0)
    assert.equal(2, #rt.requests)
    assert.equal(0, p:stats().polled_loads["http://a"])
    p:on_remove({ url = "http://a" })
    rt.requests = {}
    rt.timers[1].fn(0)
    assert.equal(1, #rt.requests)
    assert.equal("http://b/get_load", rt.requests[1].url)
    assert.is_nil(p:stats().polled_loads["http://a"])
  end)

  it("polls a dp-aware worker once and gives each rank its own load", function()
    local rt = runtime(nil, { ["http://a"] = { 200,
      '[{"dp_rank": 0, "num_reqs": 9, "num_waiting_reqs": 1}, {"dp_rank": 1, "num_reqs": 2}]' } })
    local p = new(rt)
    local ws = {
      { url = "http://a@0", base_url = "http://a", dp_rank = 0, load = 0 },
      { url = "http://a@1", base_url = "http://a", dp_rank = 1, load = 5 },
    }
    p:on_add(ws[1])
    p:on_add(ws[2])
    rt.timers[1].fn(0)
    assert.equal(1, #rt.requests)
    assert.equal("http://a/get_load", rt.requests[1].url)
    assert.same({ ["http://a@0"] = 10, ["http://a@1"] = 2 }, p:stats().polled_loads)
    for _ = 1, 10 do assert.equal("http://a@1", p:select({}, ws).url) end
  end)

  it("does not poll when the interval is 0", function()
    local rt = runtime()
    new(rt, { load_check_interval = 0 })
    assert.equal(0, #rt.timers)
  end)

  it("reads the load shapes SGLang has used", function()
    local parse = require("policies.power_of_two").parse_load
    assert.equal(3, parse('{"load": 3}'))
    assert.equal(3, parse('[{"dp_rank": 0, "load": 1}, {"dp_rank": 1, "load": 2}]'))
    assert.equal(7, parse("7"))
    assert.equal(2.5, parse(" 2.5\n"))
    assert.equal(5, parse('{"num_reqs": 2, "num_waiting_reqs": 3, "num_tokens": 900}'))
    assert.equal(0, parse('{"load":0}'))
    assert.is_nil(parse("<html>busy</html>"))
    assert.is_nil(parse(""))
    assert.is_nil(parse(nil))
    -- one rank's entry
    local list = '[{"dp_rank": 0, "load": 1}, {"dp_rank": 1, "num_reqs": 4, "num_waiting_reqs": 2}]'
    assert.equal(1, parse(list, 0))
    assert.equal(6, parse(list, 1))
    assert.is_nil(parse(list, 2))
    assert.equal(3, parse('[{"load": 5}, {"load": 3}]', 1))   -- no dp_rank: by position
    assert.is_nil(parse('{"load": 3}', 0))                    -- a total says nothing of a rank
  end)
end)

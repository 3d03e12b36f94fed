-- sglr.decisions: each policy's reason, the explanation payload and the
-- decision ring, with a fake runtime (no router, no workers).
local cjson = require "cjson.safe"
local policy = require "sglr.policy"
local decisions = require "sglr.decisions"

-- A fake runtime: a real tree, a fixed coin, no timers or metrics.
local function runtime(rolls)
  return {
    radix = function() return require("sglr.radix").new() end,
    now = function() return 0 end,
    random = function(n)
      if rolls and #rolls > 0 then return table.remove(rolls, 1) end
      return n and 1 or 0
    end,
  }
end

local function new(name, opts, rolls)
  return assert(policy.create(name, opts or {}, runtime(rolls)))
end

local function workers(loads)
  local list = {}
  for i, l in ipairs(loads) do list[i] = { url = "http://w" .. i, load = l, role = "regular", healthy = true } end
  return list
end

local function req(text, retries)
  return { id = "req-1", route = "generate", text = text, retries = retries or 0 }
end

-- select, then the explanation it makes: (decoded header, worker)
local function explain(p, r, ws)
  local w, reason, matched, total = p:select(r, ws)
  assert.truthy(w, reason)
  local leg = decisions.explain_leg(p, w, reason, matched, total, ws, r.retries + 1)
  return assert(cjson.decode(decisions.explain_json(r, leg))), w
end

describe("policy reasons", function()
  it("cache_aware: cache_miss, then cache_hit with the matched prefix", function()
    local p, ws = new("cache_aware"), workers({ 0, 0 })
    local d, w = explain(p, req("shared prefix and a question"), ws)
    assert.equal("cache_miss", d.reason)
    assert.equal(0, d.matched_chars)
    assert.equal(28, d.total_chars)
    assert.equal(0, d.match_ratio)
    local d2, w2 = explain(p, req("shared prefix and another one"), ws)
    assert.equal(w, w2)
    assert.equal("cache_hit", d2.reason)
    assert.equal(19, d2.matched_chars)            -- "shared prefix and a"
    assert.equal(29, d2.total_chars)
    assert.near(19 / 29, d2.match_ratio, 1e-4)
  end)

  it("cache_aware: imbalance and shortest_queue, without a match looked up", function()
    local p = new("cache_aware")
    local d = explain(p, req("x"), workers({ 100, 0 }))
    assert.equal("imbalance", d.reason)
    assert.equal("http://w2", d.worker)
    assert.is_nil(d.matched_chars)
    local q = new("cache_aware", { cache_routing_prob = 0.5 }, { 0.9 })
    d = explain(q, req("x"), workers({ 1, 0 }))
    assert.equal("shortest_queue", d.reason)
  end)

  it("cache_aware writes nothing on the request", function()
    local p, r = new("cache_aware"), req("text")
    p:select(r, workers({ 0, 0 }))
    assert.same({ "id", "retries", "route", "text" }, (function()
      local keys = {}
      for k in pairs(r) do keys[#keys + 1] = k end
      table.sort(keys)
      return keys
    end)())
  end)

  it("round_robin: next_in_turn, only_choice", function()
    local p = new("round_robin")
    assert.equal("next_in_turn", explain(p, req(""), workers({ 0, 0 })).reason)
    assert.equal("only_choice", explain(p, req(""), workers({ 0 })).reason)
  end)

  it("random: random, only_choice", function()
    local p = new("random")
    assert.equal("random", explain(p, req(""), workers({ 0, 0 })).reason)
    assert.equal("only_choice", explain(p, req(""), workers({ 0 })).reason)
  end)

  it("power_of_two: lower_load, tie, only_choice", function()
    local p = new("power_of_two", { load_check_interval = 0 }, { 1, 1, 1, 1 })
    local d = explain(p, req(""), workers({ 5, 2 }))
    assert.equal("lower_load", d.reason)
    assert.equal("http://w2", d.worker)
    assert.equal("tie", explain(p, req(""), workers({ 3, 3 })).reason)
    assert.equal("only_choice", explain(p, req(""), workers({ 3 })).reason)
  end)

  it("a policy that returns only a worker is 'unspecified'", function()
    local P = { name = "bare", options = {} }
    function P.new() return setmetatable({}, { __index = P }) end
    function P:select(_, ws) return ws[1] end
    local p = assert(policy.instantiate(P, {}, runtime()))
    local d = explain(p, req("t"), workers({ 0 }))
    assert.equal("unspecified", d.reason)
    assert.equal("bare", d.policy)
    assert.is_nil(d.version)
  end)

  it("a policy that chooses none still answers nil and why", function()
    for _, name in ipairs({ "cache_aware", "round_robin", "random", "power_of_two" }) do
      local w, why = new(name):select(req("t"), {})
      assert.is_nil(w)
      assert.is_string(why)
    end
  end)
end)

describe("the explanation", function()
  it("names the policy, its version, the worker, the loads and the attempt", function()
    local p, ws = new("round_robin"), workers({ 2, 7 })
    local d = explain(p, req("t"), ws)
    assert.equal("round_robin", d.policy)
    assert.equal("1.0.0", d.version)
    assert.equal("http://w1", d.worker)
    assert.same({ ["http://w1"] = 2, ["http://w2"] = 7 }, d.loads)
    assert.equal(2, d.candidates)
    assert.equal(1, d.attempt)
    assert.equal("req-1", d.request_id)
  end)

  it("says retry on a later attempt, with the policy's own reason", function()
    local p = new("round_robin")
    local d = explain(p, req("t", 1), workers({ 0, 0 }))
    assert.equal("retry", d.reason)
    assert.equal("next_in_turn", d.policy_reason)
    assert.equal(2, d.attempt)
  end)

  it("holds both legs in PD mode, and the shadow choices", function()
    local pp, dp = new("cache_aware"), new("round_robin")
    local r, pws, dws = req("prompt"), workers({ 1, 0 }), { { url = "http://d1", load = 4 } }
    local pw, preason, pm, pt = pp:select(r, pws)
    local dw, dreason = dp:select(r, dws)
    local shadow = { nsh = 1, sh = { "random", pw.url } }
    local d = assert(cjson.decode(decisions.explain_json(r,
      decisions.explain_leg(pp, pw, preason, pm, pt, pws, 1),
      decisions.explain_leg(dp, dw, dreason, nil, nil, dws, 1), shadow)))
    assert.equal("pd", d.mode)
    assert.equal("cache_aware", d.prefill.policy)
    assert.equal("cache_miss", d.prefill.reason)
    assert.equal("http://d1", d.decode.worker)
    assert.equal("only_choice", d.decode.reason)
    assert.same({ ["http://d1"] = 4 }, d.decode.loads)
    assert.same({ { candidate = "random", worker = pw.url, agree = true } }, d.shadow)
  end)

  it("is JSON a header can carry: one line, URLs unescaped", function()
    local p = new("round_robin")
    local w, reason = p:select(req(""), workers({ 0 }))
    local s = decisions.explain_json(req(""), decisions.explain_leg(p, w, reason, nil, nil, workers({ 0 }), 1))
    assert.is_nil(s:find("\n", 1, true))
    assert.truthy(s:find('"http://w1"', 1, true))
  end)
end)

describe("the decision ring", function()
  local function record(ring, i)
    return ring:record(1000 + i, { id = "r" .. i, route = "chat", retries = 0 },
      { name = "rr", version = "1" }, { url = "http://w" .. i }, "next_in_turn", nil, 10)
  end

  it("keeps the last N, newest first, and reuses its slots", function()
    local ring = decisions.new(3)
    local slots = {}
    for i = 1, 5 do slots[i] = record(ring, i) end
    assert.equal(slots[1], slots[4])              -- the oldest slot is reused
    local list = ring:last(10, 1e6, 2000)
    assert.equal(3, #list)
    assert.same({ "r5", "r4", "r3" }, { list[1].request_id, list[2].request_id, list[3].request_id })
    assert.equal("rr", list[1].policy)
    assert.equal("http://w5", list[1].worker)
    assert.equal(10, list[1].total_chars)
    assert.is_nil(list[1].matched_chars)
    assert.equal(1e6 - (2000 - 1005), list[1].time_ms)
    assert.equal(2, #ring:last(2, 0, 0))
  end)

  it("keeps a request id up to 63 bytes and bounds the strings it remembers", function()
    local ring = decisions.new(2)
    local long = ("x"):rep(100)
    ring:record(1, { id = long, route = "chat", retries = 0 }, { name = "p" }, { url = "http://w" }, "r")
    assert.equal(long:sub(1, 63), ring:last(1, 0, 0)[1].request_id)
    -- a policy that makes a reason per request cannot grow the router
    for i = 1, 5000 do
      ring:record(i, { id = "r" .. i, route = "chat", retries = 0 }, { name = "p" }, { url = "http://w" },
        "reason-" .. i)
    end
    assert.is_true(ring.nstr <= 4096)
    assert.equal("(other)", ring:last(1, 0, 0)[1].reason)
    assert.equal("r5000", ring:last(1, 0, 0)[1].request_id)
    assert.equal("http://w", ring:last(1, 0, 0)[1].worker)
  end)

  it("clears a reused slot's decode leg and shadow choices", function()
    local ring = decisions.new(1)
    local pos = record(ring, 1)
    ring:record_decode(pos, { name = "rr" }, { url = "http://d1" }, "only_choice")
    local s = ring:shadow_of(pos)
    s.nsh, s.sh[1], s.sh[2] = 1, "cand", "http://w1"
    local v = ring:last(1, 0, 0)[1]
    assert.equal("pd", v.mode)
    assert.equal("http://d1", v.decode.worker)
    assert.equal("cand", v.shadow[1].candidate)
    record(ring, 2)
    v = ring:last(1, 0, 0)[1]
    assert.is_nil(v.mode)
    assert.is_nil(v.shadow)
  end)
end)

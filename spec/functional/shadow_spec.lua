-- Shadow policy candidates, explained decisions and the decision log,
-- against the real router and sim workers.
local H = require "spec.helpers"
local cjson = require "cjson.safe"

local ADMIN = { authorization = "Bearer adm" }

local function shadow_list(r, headers)
  local res = assert(H.get(r.url, "/admin/policy/shadow", headers))
  assert.equal(200, res.status, res.body)
  local by_name = {}
  for _, c in ipairs(res.json.candidates) do by_name[c.name] = c end
  return by_name, res.json.candidates
end

local function generate(r, text, headers)
  local res = assert(H.post(r.url, "/generate", H.gen_body(text), headers))
  assert.equal(200, res.status, res.body)
  return res
end

describe("a shadow cache_aware candidate under a round_robin live policy", function()
  local w1, w2, r
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    w2 = H.sim({ "--id", "w2" })
    r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "round_robin",
      "--shadow-policy", "cache_aware" })
  end)
  teardown(H.stop_all)

  it("is offered every request, never served, and counts agreement and its matched prefix", function()
    local text = "a system prompt that every request of this conversation shares"
    local served = {}
    for _ = 1, 6 do
      local w = H.worker_of(generate(r, text))
      served[w] = (served[w] or 0) + 1
    end
    -- the live policy alone decides: round robin over both workers
    assert.same({ w1 = 3, w2 = 3 }, served)
    local m = H.scrape(r)
    -- the candidate keeps the text on one worker (its own tree, fed by its
    -- own choices): it agrees with the alternating live choice every other time
    assert.equal(3, H.metric(m, 'sgl_router_shadow_decisions_total{candidate="cache_aware",agree="true"}'))
    assert.equal(3, H.metric(m, 'sgl_router_shadow_decisions_total{candidate="cache_aware",agree="false"}'))
    -- a miss first, then five hits on the whole text
    assert.equal(5 * #text, H.metric(m, 'sgl_router_shadow_matched_chars_total{candidate="cache_aware"}'))
    assert.equal(6 * #text, H.metric(m, 'sgl_router_shadow_text_chars_total{candidate="cache_aware"}'))
    -- and the live policy's cache metrics never saw the candidate's decisions
    assert.equal(0, H.metric(m, "sgl_router_cache_hits_total"))

    local c = shadow_list(r).cache_aware
    assert.equal("active", c.state)
    assert.equal(6, c.decisions)
    assert.equal(3, c.agree)
    assert.equal(5 * #text, c.matched_chars)
    assert.equal(5, c.policy_stats.hits)
    -- loads and counts are the live choice's only
    local lw = H.list_workers(r)
    for _, w in ipairs(lw.workers) do
      assert.equal(0, w.load)
      assert.equal(3, w.processed)
    end
  end)
end)

describe("a shadow candidate that fails", function()
  local w1, r, boom, slow
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    -- raises on its second request
    boom = H.tmpfile([[
local P = { name = "boom", version = "0.1.0", options = {} }
function P.new() return setmetatable({ n = 0 }, { __index = P }) end
function P:select(req, workers)
  self.n = self.n + 1
  if self.n == 2 then error("boom on request two") end
  return workers[1], "first"
end
return P
]], ".lua")
    -- busy for 5 ms on every request: over a 1 ms budget
    slow = H.tmpfile([[
local P = { name = "slow", version = "0.1.0", options = {} }
function P.new(conf, rt) return setmetatable({ rt = rt }, { __index = P }) end
function P:select(req, workers)
  local t = os.clock() + 0.005
  while os.clock() < t do end
  return workers[1]
end
return P
]], ".lua")
    r = H.router({ "--worker-urls", w1.url, "--policy", "round_robin", "--shadow-policy", boom,
      "--shadow-policy", slow, "--shadow-policy", "power_of_two", "--shadow-budget-us", "1000" })
  end)
  teardown(function()
    H.stop_all()
    os.remove(boom)
    os.remove(slow)
  end)

  it("is dropped (logged, counted, listed) while every request is still served", function()
    for i = 1, 5 do generate(r, "q" .. i) end
    local c = shadow_list(r)
    assert.equal("dropped", c.boom.state)
    assert.truthy(c.boom.reason:find("boom on request two", 1, true), c.boom.reason)
    assert.equal(1, c.boom.decisions)
    assert.equal("dropped", c.slow.state)
    assert.truthy(c.slow.reason:find("3 times in a row", 1, true), c.slow.reason)
    assert.equal(3, c.slow.decisions)
    -- a well-behaved candidate stays
    assert.equal("active", c.power_of_two.state)
    assert.equal(5, c.power_of_two.decisions)
    assert.equal(5, c.power_of_two.agree)         -- one worker: every choice agrees
    local m = H.scrape(r)
    assert.equal(1, H.metric(m, 'sgl_router_shadow_dropped_total{candidate="boom",reason="error"}'))
    assert.equal(1, H.metric(m, 'sgl_router_shadow_dropped_total{candidate="slow",reason="slow"}'))
    assert.truthy(r.proc.out:find("shadow policy candidate dropped", 1, true))
  end)
end)

describe("shadow candidates added and removed at run time", function()
  local w1, w2, r
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    w2 = H.sim({ "--id", "w2" })
    r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "round_robin", "--admin-api-key", "adm" })
  end)
  teardown(H.stop_all)

  it("needs the admin key", function()
    local body = cjson.encode({ policy = "random" })
    assert.equal(401, assert(H.get(r.url, "/admin/policy/shadow")).status)
    assert.equal(401, assert(H.post(r.url, "/admin/policy/shadow", body)).status)
    assert.equal(401, assert(H.request(r.url, "DELETE", "/admin/policy/shadow?name=random")).status)
    assert.equal(401, assert(H.get(r.url, "/admin/decisions")).status)
    local _, list = shadow_list(r, ADMIN)
    assert.same({}, list)
  end)

  it("adds a candidate with options, counts it, and removes it with its series", function()
    local res = assert(H.post(r.url, "/admin/policy/shadow",
      cjson.encode({ policy = "cache_aware", name = "ca_strict", options = { cache_threshold = 0.9 } }), ADMIN))
    assert.equal(200, res.status, res.body)
    assert.equal("ca_strict", res.json.name)
    assert.equal("active", res.json.state)
    for i = 1, 4 do generate(r, "prompt " .. i) end
    local c = shadow_list(r, ADMIN).ca_strict
    assert.equal(4, c.decisions)
    assert.equal(0.9, c.options.cache_threshold)
    local m = H.scrape(r)
    local agree = H.metric(m, 'sgl_router_shadow_decisions_total{candidate="ca_strict",agree="true"}')
    local disagree = H.metric(m, 'sgl_router_shadow_decisions_total{candidate="ca_strict",agree="false"}')
    assert.equal(4, agree + disagree)
    -- GET /admin/policy shows the candidates beside the live policy
    local pol = assert(H.get(r.url, "/admin/policy", ADMIN))
    assert.equal(200, pol.status)
    local names = {}
    for _, cand in ipairs(pol.json.shadows) do names[#names + 1] = cand.name end
    assert.same({ "ca_strict" }, names)

    res = assert(H.request(r.url, "DELETE", "/admin/policy/shadow?name=ca_strict", nil, ADMIN))
    assert.equal(200, res.status, res.body)
    local _, list = shadow_list(r, ADMIN)
    assert.same({}, list)
    assert.is_nil(H.scrape(r):find("ca_strict", 1, true))
    generate(r, "after removal")
    assert.equal(404, assert(H.request(r.url, "DELETE", "/admin/policy/shadow?name=ca_strict", nil, ADMIN)).status)
  end)

  it("refuses an unknown policy, bad options and a name taken", function()
    local function post(t)
      return assert(H.post(r.url, "/admin/policy/shadow", cjson.encode(t), ADMIN))
    end
    assert.equal(400, post({ policy = "no_such_policy" }).status)
    assert.equal(400, post({ policy = "cache_aware", options = { cache_threshold = 7 } }).status)
    assert.equal(400, post({ nothing = true }).status)
    assert.equal(200, post({ policy = "random" }).status)
    assert.equal(400, post({ policy = "random", name = "random" }).status)
    -- the same policy twice gets a second name
    local res = post({ policy = "random" })
    assert.equal(200, res.status)
    assert.equal("random#2", res.json.name)
  end)
end)

describe("explained decisions", function()
  local w1, w2
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    w2 = H.sim({ "--id", "w2" })
  end)
  teardown(H.stop_all)

  local EXPLAIN = { ["x-sglr-explain"] = "1" }

  describe("with --explain", function()
    local r
    setup(function()
      r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "cache_aware", "--explain",
        "--shadow-policy", "round_robin" })
    end)
    teardown(function() if r then H.stop(r.proc) end end)

    it("puts one JSON object in x-sglr-decision: policy, worker, reason, match, loads, shadows", function()
      local text = "explain this routing decision to me, please"
      local res = generate(r, text, EXPLAIN)
      local d = assert(cjson.decode(res.headers["x-sglr-decision"]))
      assert.equal("cache_aware", d.policy)
      assert.equal("1.0.0", d.version)
      assert.equal("cache_miss", d.reason)
      assert.equal(0, d.matched_chars)
      assert.equal(#text, d.total_chars)
      assert.equal(1, d.attempt)
      assert.equal(res.headers["x-request-id"], d.request_id)
      local served = H.worker_of(res) == "w1" and w1.url or w2.url
      assert.equal(served, d.worker)
      assert.same({ [w1.url] = 0, [w2.url] = 0 }, d.loads)
      assert.equal("round_robin", d.shadow[1].candidate)

      res = generate(r, text, EXPLAIN)
      d = assert(cjson.decode(res.headers["x-sglr-decision"]))
      assert.equal("cache_hit", d.reason)
      assert.equal(#text, d.matched_chars)
      assert.equal(1, d.match_ratio)
      assert.equal(served, d.worker)
    end)

    it("answers a streamed request with the header too", function()
      local res = assert(H.post(r.url, "/generate", H.gen_body("stream me", { stream = true }), EXPLAIN))
      assert.equal(200, res.status)
      assert.truthy(#H.sse_events(res.body) > 0)
      local d = assert(cjson.decode(res.headers["x-sglr-decision"]))
      assert.equal("cache_aware", d.policy)
    end)

    it("leaves requests that do not ask alone", function()
      local res = generate(r, "no explanation wanted")
      assert.is_nil(res.headers["x-sglr-decision"])
    end)
  end)

  describe("without --explain", function()
    local r
    setup(function()
      r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "round_robin", "--admin-api-key", "adm" })
    end)
    teardown(function() if r then H.stop(r.proc) end end)

    it("ignores x-sglr-explain unless the request carries the admin key", function()
      assert.is_nil(generate(r, "q", EXPLAIN).headers["x-sglr-decision"])
      local h = { ["x-sglr-explain"] = "1", authorization = "Bearer wrong" }
      assert.is_nil(generate(r, "q", h).headers["x-sglr-decision"])
      h.authorization = ADMIN.authorization
      local d = assert(cjson.decode(generate(r, "q", h).headers["x-sglr-decision"]))
      assert.equal("round_robin", d.policy)
      assert.equal("next_in_turn", d.reason)
      local res = assert(H.post(r.url, "/generate", H.gen_body("s", { stream = true }), h))
      assert.truthy(res.headers["x-sglr-decision"])
    end)
  end)
end)

describe("the decision log", function()
  local w1, r
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    r = H.router({ "--worker-urls", w1.url, "--policy", "round_robin", "--decision-log-size", "3",
      "--shadow-policy", "random" })
  end)
  teardown(H.stop_all)

  it("keeps the last N decisions, newest first, with the shadow choices", function()
    local ids = {}
    for i = 1, 5 do ids[i] = generate(r, "q" .. i).headers["x-request-id"] end
    local res = assert(H.get(r.url, "/admin/decisions?n=10"))
    assert.equal(200, res.status)
    assert.equal(3, res.json.size)
    local list = res.json.decisions
    assert.equal(3, #list)                           -- bounded, and n capped to the size
    assert.same({ ids[5], ids[4], ids[3] }, { list[1].request_id, list[2].request_id, list[3].request_id })
    local d = list[1]
    assert.equal("round_robin", d.policy)
    assert.equal(w1.url, d.worker)
    assert.equal("only_choice", d.reason)
    assert.equal("generate", d.route)
    assert.equal("random", d.shadow[1].candidate)
    assert.equal(w1.url, d.shadow[1].worker)
    assert.is_true(d.shadow[1].agree)
    assert.is_number(d.time_ms)

    res = assert(H.get(r.url, "/admin/decisions?n=2"))
    assert.equal(2, #res.json.decisions)
    assert.equal(ids[5], res.json.decisions[1].request_id)
  end)

  it("answers 400 to a bad n", function()
    for _, n in ipairs({ "0", "-1", "abc", "1.5", "" }) do
      local res = assert(H.get(r.url, "/admin/decisions?n=" .. n))
      assert.equal(400, res.status, "n=" .. n)
    end
    assert.equal(405, assert(H.post(r.url, "/admin/decisions")).status)
  end)
end)

describe("explained decisions in PD mode", function()
  local p1, d1, r
  setup(function()
    p1 = H.prefill_sim("p1")
    d1 = H.sim({ "--id", "d1", "--role", "decode" })
    r = H.router({ "--pd-disaggregation", "--prefill", p1.url, tostring(p1.bootstrap_port),
      "--decode", d1.url, "--prefill-policy", "cache_aware", "--decode-policy", "round_robin",
      "--explain", "--shadow-policy", "random" })
  end)
  teardown(H.stop_all)

  it("explains both legs, streamed or not, and logs both", function()
    for _, stream in ipairs({ false, true }) do
      local res = assert(H.post(r.url, "/generate", H.gen_body("pd prompt", { stream = stream }),
        { ["x-sglr-explain"] = "1" }))
      assert.equal(200, res.status, res.body)
      local d = assert(cjson.decode(res.headers["x-sglr-decision"] or ""), "a decision header")
      assert.equal("pd", d.mode)
      assert.equal("cache_aware", d.prefill.policy)
      assert.equal(p1.url, d.prefill.worker)
      assert.equal("round_robin", d.decode.policy)
      assert.equal(d1.url, d.decode.worker)
      assert.equal("only_choice", d.decode.reason)
      assert.equal("random", d.shadow[1].candidate)       -- candidates shadow the prefill policy
      assert.is_true(d.shadow[1].agree)
    end
    local last = assert(H.get(r.url, "/admin/decisions?n=1")).json.decisions[1]
    assert.equal("pd", last.mode)
    assert.equal(p1.url, last.prefill.worker)
    assert.equal(d1.url, last.decode.worker)
  end)
end)

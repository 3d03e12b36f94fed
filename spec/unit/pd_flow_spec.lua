-- The PD dispatcher of the request flow (lua/sglr/flow.lua, pd.pick and
-- pd.dispatch) in one process: listeners play the prefill and decode
-- workers, and a router table holds only what the flow reads. What the
-- functional specs cannot see is checked here: which policy instance hears
-- of which leg, each leg's breaker outcome, and the loads after every
-- ending.
local core = require "sglr.core"
local H = require "spec.helpers"
local cjson = require "cjson.safe"
local flow_mod = require "sglr.flow"
local workers_mod = require "sglr.workers"
local retry = require "sglr.retry"
local stats = require "sglr.stats"
local router = require "sglr.router"

-- A policy that picks the first candidate and records what reaches it.
local function recording_policy(name)
  local p = { name = name, picked = {}, done = {} }
  function p.select(self, _, workers)
    self.picked[#self.picked + 1] = workers[1].url
    return workers[1]
  end
  function p.on_done(self, _, w, status)
    self.done[#self.done + 1] = { worker = w.url, status = status }
  end
  return p
end

-- a condition met within 2 s (H.wait_for raises otherwise)
local function await(cond) return H.wait_for(cond, 2000) end

describe("PD request flow", function()
  local servers = {}
  after_each(function()
    for _, s in ipairs(servers) do s:close() end
    servers = {}
  end)

  local function listen(handler)
    local srv = assert(core.listen("127.0.0.1", 0, {}, handler))
    servers[#servers + 1] = srv
    return srv
  end

  -- A worker: answers `status` with `body` (after `delay` ms); `hang`
  -- holds the request until the router lets go. It records the rooms it
  -- was sent and how many requests are still open.
  local function worker(opts)
    opts.rooms, opts.open = {}, 0
    local srv = listen(function(x)
      opts.open = opts.open + 1
      opts.rooms[#opts.rooms + 1] = x:body():match('"bootstrap_room":(%d+)')
      if opts.delay then core.sleep(opts.delay) end
      if opts.hang then
        while not x:closed() do core.sleep(5) end
      else
        x:respond(opts.status or 200, { ["content-type"] = "application/json" },
          opts.body or '{"text":"ok","meta_info":{}}')
      end
      opts.open = opts.open - 1
    end)
    opts.url = "http://127.0.0.1:" .. srv:port()
    return opts
  end

  -- prefills and decodes: lists of worker opts
  local function fake_router(prefills, decodes, conf)
    conf = conf or {}
    conf.pd_disaggregation = true
    local r = { conf = conf, cors_check = false, merge = router.merge, retry = retry.new(conf),
      policy = recording_policy("prefill"), dpolicy = recording_policy("decode"),
      limiter = { acquire = function() return true end, release = function() end,
                  depth = function() return 0 end } }
    function r.send_error(_, x, status, message, etype, extra)
      x:respond(status, router.merge({ ["content-type"] = "application/json" }, extra),
        cjson.encode({ error = { message = message, type = etype } }))
    end
    r.workers = workers_mod.new(conf, {
      added = function(w) w.m = stats.for_worker(w.url, "test", w.role) end })
    for _, p in ipairs(prefills) do assert(r.workers:add(p.url, { role = "prefill", bootstrap_port = 8998 })) end
    for _, d in ipairs(decodes) do assert(r.workers:add(d.url, { role = "decode" })) end
    r.flow = flow_mod.new(r)
    local front = listen(function(x) r.flow:infer(x, "generate") end)
    r.port = front:port()
    r.url = "http://127.0.0.1:" .. r.port
    return r
  end

  local function post(r, body)
    return core.request(assert(core.upstream(r.url)), { method = "POST", path = "/generate",
      body = body or '{"text":"hi"}', headers = { ["content-type"] = "application/json" } })
  end

  local function w_of(r, wk) return r.workers:get(wk.url) end

  local function assert_settled(r)
    for _, w in ipairs(r.workers.list) do assert.equal(0, w.load, w.url) end
  end

  it("tells each pool's policy of its own leg, with one room for both", function()
    local p, d = worker({}), worker({})
    local r = fake_router({ p }, { d })
    local res = post(r)
    assert.equal(200, res.status, res.body)
    assert.same({ p.url }, r.policy.picked)
    assert.same({ d.url }, r.dpolicy.picked)
    assert.same({ { worker = p.url, status = 200 } }, r.policy.done)
    assert.same({ { worker = d.url, status = 200 } }, r.dpolicy.done)
    assert.is_string(p.rooms[1])
    assert.equal(p.rooms[1], d.rooms[1])
    assert_settled(r)
  end)

  it("gives every PD request a table of its own, even when both policies keep none", function()
    local p, d = worker({}), worker({})
    local r = fake_router({ p }, { d })
    local seen = {}
    for _, pol in ipairs({ r.policy, r.dpolicy }) do
      pol.transient_req = true
      local select = pol.select
      function pol.select(self, req, workers)
        seen[#seen + 1] = req
        return select(self, req, workers)
      end
    end
    assert.equal(200, post(r).status)
    assert.equal(200, post(r).status)
    -- prefill and decode see one table a request; the second request another
    assert.is_true(rawequal(seen[1], seen[2]))
    assert.is_false(rawequal(seen[1], seen[3]))
    assert.equal(0, #r.flow.req_pool)
    assert_settled(r)
  end)

  it("settles both legs with the instances captured at the start", function()
    local p, d = worker({ delay = 60 }), worker({})
    local r = fake_router({ p }, { d })
    local first_p, first_d = r.policy, r.dpolicy
    local res
    core.spawn(function() res = post(r) end)
    assert.is_true(await(function() return p.open == 1 end))
    r.policy, r.dpolicy = recording_policy("p2"), recording_policy("d2")
    assert.is_true(await(function() return res ~= nil end))
    assert.equal(200, res.status)
    assert.equal(1, #first_p.done)
    assert.equal(1, #first_d.done)
    assert.same({}, r.policy.done)
    assert.same({}, r.dpolicy.done)
    assert_settled(r)
  end)

  it("retries a prefill's 5xx on another prefill with a fresh room; the decode is not blamed", function()
    local bad, good, d = worker({ status = 503 }), worker({}), worker({})
    local r = fake_router({ bad, good }, { d }, { retry_initial_backoff_ms = 1 })
    local res = post(r)
    assert.equal(200, res.status, res.body)
    assert.same({ bad.url, good.url }, r.policy.picked)
    assert.equal(2, #r.dpolicy.picked)
    assert.equal(1, #w_of(r, bad).breaker.failures)
    assert.equal(0, #w_of(r, good).breaker.failures)
    assert.equal(0, #w_of(r, d).breaker.failures)
    assert.not_equal(bad.rooms[1], good.rooms[1])
    assert.equal(2, #r.dpolicy.done)
    assert_settled(r)
  end)

  it("answers a prefill's 4xx at once and counts it against nobody", function()
    local p = worker({ status = 400, body = '{"error":{"message":"bad input"}}' })
    local d = worker({ hang = true })
    local r = fake_router({ p }, { d }, { retry_initial_backoff_ms = 1 })
    local res = post(r)
    assert.equal(400, res.status)
    assert.equal('{"error":{"message":"bad input"}}', res.body)
    assert.equal(1, #r.policy.picked)
    assert.equal(0, #w_of(r, p).breaker.failures)
    assert.equal(0, #w_of(r, d).breaker.failures)
    -- the decode leg was let go
    assert.is_true(await(function() return d.open == 0 end))
    assert_settled(r)
  end)

  it("retries a decode's 5xx on another decode and blames only it", function()
    local p, bad, good = worker({}), worker({ status = 500 }), worker({})
    local r = fake_router({ p }, { bad, good }, { retry_initial_backoff_ms = 1 })
    local res = post(r)
    assert.equal(200, res.status, res.body)
    assert.same({ bad.url, good.url }, r.dpolicy.picked)
    assert.equal(1, #w_of(r, bad).breaker.failures)
    assert.equal(0, #w_of(r, p).breaker.failures)
    assert_settled(r)
  end)

  it("lets both legs go when the client leaves", function()
    local p, d = worker({ hang = true }), worker({ hang = true })
    local r = fake_router({ p }, { d })
    local tcp = require("luv").new_tcp()
    local body = '{"text":"bye"}'
    tcp:connect("127.0.0.1", r.port, function()
      tcp:write(("POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"):format(#body, body))
    end)
    assert.is_true(await(function() return p.open == 1 and d.open == 1 end))
    tcp:close()
    assert.is_true(await(function() return p.open == 0 and d.open == 0 end))
    assert.is_true(await(function() return w_of(r, p).load == 0 and w_of(r, d).load == 0 end))
    assert.equal(0, #w_of(r, p).breaker.failures)
    assert.equal(0, #w_of(r, d).breaker.failures)
  end)

  it("prepends the prefill's input_token_logprobs to the decode's", function()
    local p = worker({ body = '{"meta_info":{"input_token_logprobs":[[-0.5,11,null],[-0.25,12,null]]}}' })
    local d = worker({ body = '{"text":"out","meta_info":{"input_token_logprobs":[[-1,13,null]]}}' })
    local r = fake_router({ p }, { d })
    local res = post(r, '{"text":"hi","return_logprob":true}')
    assert.equal(200, res.status, res.body)
    assert.equal('{"text":"out","meta_info":{"input_token_logprobs":[[-0.5,11,null],[-0.25,12,null],[-1,13,null]]}}',
      res.body)
    -- not asked for: the decode's bytes
    res = post(r, '{"text":"hi"}')
    assert.equal('{"text":"out","meta_info":{"input_token_logprobs":[[-1,13,null]]}}', res.body)
  end)
end)

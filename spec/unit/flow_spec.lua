-- The request flow (lua/sglr/flow.lua) in one process: a listener whose
-- handler runs the flow, a worker played by another listener, and a router
-- table with only what the flow reads.
local core = require "sglr.core"
local H = require "spec.helpers"
local cjson = require "cjson.safe"
local flow_mod = require "sglr.flow"
local workers_mod = require "sglr.workers"
local retry = require "sglr.retry"
local stats = require "sglr.stats"
local router = require "sglr.router"

-- A policy that records what reaches it.
local function recording_policy(name)
  local p = { name = name, selected = 0, done = {} }
  function p.select(self, _, workers)
    self.selected = self.selected + 1
    return workers[1]
  end
  function p.on_done(self, _, w, status)
    self.done[#self.done + 1] = { worker = w.url, status = status }
  end
  return p
end

local function listen(handler)
  return assert(core.listen("127.0.0.1", 0, {}, handler))
end

-- a condition met within 2 s (H.wait_for raises otherwise)
local function await(cond) return H.wait_for(cond, 2000) end

describe("request flow", function()
  local servers = {}
  after_each(function()
    for _, s in ipairs(servers) do s:close() end
    servers = {}
  end)

  -- a worker that answers after `delay` ms (set by the test) with `status`
  local function worker(opts)
    local srv = listen(function(x)
      opts.seen = (opts.seen or 0) + 1
      opts.headers = x:headers()
      if opts.delay then core.sleep(opts.delay) end
      x:respond(opts.status or 200, { ["content-type"] = "application/json" }, '{"ok":true}')
    end)
    servers[#servers + 1] = srv
    return "http://127.0.0.1:" .. srv:port()
  end

  local function fake_router(urls, policy, conf)
    conf = conf or {}
    local r = { conf = conf, policy = policy, cors_check = false, merge = router.merge,
      retry = retry.new(conf),
      limiter = { acquire = function() return true end, release = function() end,
                  depth = function() return 0 end } }
    function r.send_error(_, x, status, message, etype, extra)
      x:respond(status, router.merge({ ["content-type"] = "application/json" }, extra),
        cjson.encode({ error = { message = message, type = etype } }))
    end
    r.workers = workers_mod.new(conf, { added = function(w) w.m = stats.for_worker(w.url, "test") end })
    for _, u in ipairs(urls) do assert(r.workers:add(u)) end
    r.flow = flow_mod.new(r)
    local front = listen(function(x) r.flow:infer(x, "generate") end)
    servers[#servers + 1] = front
    r.url = "http://127.0.0.1:" .. front:port()
    return r
  end

  local function post(url, headers)
    headers = headers or {}
    headers["content-type"] = "application/json"
    return core.request(assert(core.upstream(url)), { method = "POST", path = "/generate",
      body = '{"text":"hi"}', headers = headers })
  end

  it("settles a request with the policy instance that picked its worker", function()
    local w = { delay = 60 }
    local a, b = recording_policy("a"), recording_policy("b")
    local r = fake_router({ worker(w) }, a)
    local res
    core.spawn(function() res = post(r.url) end)
    -- while the worker holds the request, the router's policy is replaced
    assert.is_true(await(function() return w.seen == 1 end))
    r.policy = b
    assert.is_true(await(function() return res ~= nil end))
    assert.equal(200, res.status)
    assert.equal(1, a.selected)
    assert.same({ { worker = r.workers.list[1].url, status = 200 } }, a.done)
    assert.equal(0, b.selected)
    assert.same({}, b.done)
    -- the next request belongs to the new instance
    assert.equal(200, post(r.url).status)
    assert.equal(1, b.selected)
    assert.equal(1, #b.done)
    assert.equal(0, r.workers.list[1].load)
  end)

  it("checks a body through the FFI as extract.check does, the routing text kept alike", function()
    local extract = require "sglr.extract"
    local bodies = {
      { "generate", '{"text":"hello world","sampling_params":{"max_new_tokens":1}}' },
      { "generate", '{"text":"caf\\u00e9 \\ud83d\\ude00","stream":true,"model":"m-1"}' },
      { "chat", '{"model":"llama","messages":[{"role":"user","content":"hi there"}],"stream":false}' },
      { "chat", '{"messages":[{"role":"system","content":"' .. ("s"):rep(3000) .. '"},{"role":"user","content":"q"}]}' },
      { "completions", '{"prompt":"once upon","model":"' .. ("m"):rep(300) .. '","stream":true}' },
      { "generate", '{"text":"a"' },                              -- cut short
      { "chat", '{"messages":"no"}' },                           -- wrong type
      { "completions", '{"model":"x"}' },                        -- no prompt
      { "generate", '[1,2]' },
      { "chat", '' },
    }
    local function pack(...) return { n = select("#", ...), ... } end
    local got, n = {}, 0
    local srv = listen(function(x)
      n = n + 1
      local route = bodies[n][1]
      local body = x:body()
      local r = { pack = pack(flow_mod.check_body(route, x)),
                  want = pack(extract.check(route, body)) }
      -- keep: the text into the exchange (its length returned), capped
      -- at a character boundary
      r.kept = pack(flow_mod.check_body(route, x, 20, true))
      r.kept_text = r.kept[1] and x:route_text() or nil
      r.want_text = pack(extract.check(route, body, 20))
      got[n] = r
      x:respond(200, {}, "")
    end)
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    for _, b in ipairs(bodies) do
      assert(core.request(pool, { method = "POST", path = "/", body = b[2] }))
    end
    srv:close()
    assert.equal(#bodies, n)
    for i, r in ipairs(got) do
      assert.same(r.want, r.pack, "body " .. i)
      local w = r.want_text
      if w[1] then
        assert.same({ w[1], w[2], w[3], #w[4] }, { r.kept[1], r.kept[2], r.kept[3], r.kept[4] }, "body " .. i)
        assert.equal(w[4], r.kept_text, "body " .. i)
      else
        assert.same(w, r.kept, "body " .. i)
      end
    end
    -- not an exchange: the classic call answers
    assert.same({ extract.check("chat", '{"messages":[]}') }, { flow_mod.check_body("chat", '{"messages":[]}') })
  end)

  it("shows a policy false, not nil, for request fields not set yet", function()
    local seen = {}
    local p = recording_policy("f")
    function p.select(_, req, workers)
      for _, k in ipairs({ "decision", "match_ratio", "prefill", "dpolicy", "explain", "failed", "error",
                           "ttfb", "shadow", "text_source", "text_len", "stream", "model", "worker" }) do
        seen[k] = req[k]
      end
      seen.route, seen.id = req.route, req.id
      req.decision, req.match_ratio = "mine", 0.5     -- the fields a policy may write
      seen.after = { req.decision, req.match_ratio }
      return workers[1]
    end
    local r = fake_router({ worker({}) }, p)
    local res = core.request(assert(core.upstream(r.url)), { method = "POST", path = "/generate",
      body = '{"text":"hi"}', headers = { ["content-type"] = "application/json", ["x-request-id"] = "rq-7" } })
    assert.equal(200, res.status)
    for _, k in ipairs({ "decision", "match_ratio", "prefill", "dpolicy", "explain", "failed", "error",
                         "ttfb", "shadow", "text_source", "text_len", "stream", "model", "worker" }) do
      assert.is_false(seen[k], k)
    end
    assert.equal("generate", seen.route)
    assert.equal("rq-7", seen.id)
    assert.same({ "mine", 0.5 }, seen.after)
  end)

  it("keeps a wants_text policy's routing text in the exchange, where the tree and req.text read it", function()
    local radix = require "sglr.radix"
    local seen = {}
    local p = recording_policy("t")
    p.wants_text = true
    p.tree = radix.new()
    function p.select(self, req, workers)
      seen.source_is_string = type(req.text_source) == "string"
      seen.len = req.text_len
      -- the tree takes the exchange where it takes a string
      self.tree:insert(req.text_source, workers[1].url)
      seen.matched = { self.tree:match(req.text_source, workers) }
      seen.by_string = { self.tree:match(req.text, workers) }
      seen.text = req.text
      seen.source = req.text_source
      return workers[1]
    end
    local r = fake_router({ worker({}) }, p)
    local res = core.request(assert(core.upstream(r.url)), { method = "POST", path = "/generate",
      body = '{"text":"the routing text \\u00e9"}', headers = { ["content-type"] = "application/json" } })
    assert.equal(200, res.status)
    local text = "the routing text \u{e9}"
    assert.is_false(seen.source_is_string)
    assert.equal(#text, seen.len)
    assert.equal(text, seen.text)
    assert.same({ #text, r.workers.list[1].url }, seen.matched)
    assert.same(seen.matched, seen.by_string)
    -- kept past select (the request has ended): a clear error, not a stale text
    local ok, err = pcall(p.tree.match, p.tree, seen.source)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("only during select", 1, true), err)
  end)

  it("hands a finished request's table to the next request when its policy keeps none (transient_req)", function()
    local seen = {}
    local p = recording_policy("t")
    p.transient_req = true
    function p.select(_, req, workers)
      -- (kept here only to watch the reuse: a transient_req policy keeps nothing)
      local tag = req.retries == 0 and seen.read_headers and req.headers["x-tag"] or false
      seen[#seen + 1] = { t = req, x = req._x, id = req.id, worker = req.worker, error = req.error,
        ttfb = req.ttfb, explain = req.explain, failed = req.failed, tag = tag }
      return workers[1]
    end
    local r = fake_router({ worker({}) }, p)
    assert.equal(200, post(r.url, { ["x-request-id"] = "first" }).status)
    local res = post(r.url)        -- no id of its own: the router makes one
    assert.equal(200, res.status)
    assert.equal("first", seen[1].id)
    assert.is_true(rawequal(seen[1].t, seen[2].t), "the second request got the first one's table")
    -- and its exchange's box (userdata), now around the second exchange
    assert.is_true(rawequal(seen[1].x, seen[2].x), "the second request got the first one's box")
    -- and nothing of the first request in it
    assert.equal(res.headers["x-request-id"], seen[2].id)
    assert.not_equal("first", seen[2].id)
    for _, k in ipairs({ "worker", "error", "ttfb", "explain", "failed" }) do assert.is_false(seen[2][k], k) end
    -- a table that took a field made on first read (req.headers) grew past
    -- its 16 slots: left to the collector, the next request gets another
    seen.read_headers = true
    assert.equal(200, post(r.url, { ["x-tag"] = "three" }).status)
    assert.equal(200, post(r.url, { ["x-tag"] = "four" }).status)
    assert.equal("three", seen[3].tag)
    assert.equal("four", seen[4].tag)
    assert.is_false(rawequal(seen[3].t, seen[4].t))
  end)

  it("never hands a later request a field a policy wrote, nor a pooled table an exchange", function()
    local seen = {}
    local p = recording_policy("w")
    p.transient_req = true
    p.wants_text = true
    function p.select(_, req, workers)
      seen[#seen + 1] = { t = req, note = req.note, id = req.id }
      return workers[1]
    end
    function p.on_done(_, req)
      req.note = "from " .. tostring(req.id)    -- (a policy may not, but one can)
    end
    local r = fake_router({ worker({}) }, p)
    assert.equal(200, post(r.url, { ["x-request-id"] = "A" }).status)
    assert.equal(200, post(r.url, { ["x-request-id"] = "B" }).status)
    assert.equal(200, post(r.url, { ["x-request-id"] = "C" }).status)
    assert.is_nil(seen[2].note)
    assert.is_nil(seen[3].note)
    assert.is_false(rawequal(seen[1].t, seen[2].t))
    -- a table in the pool holds no exchange (its box went back to the core)
    function p.on_done() end
    assert.equal(200, post(r.url, { ["x-request-id"] = "D" }).status)
    local pooled = r.flow.req_pool[#r.flow.req_pool]
    assert.is_false(pooled._x)
    assert.is_false(pooled.text_source)
  end)

  it("never reuses a request's table a policy may keep, or one shadow candidates saw", function()
    local kept = {}
    local p = recording_policy("k")        -- no transient_req: it may keep req
    function p.select(_, req, workers)
      kept[#kept + 1] = req
      local _ = req.id       -- read while in flight: the table keeps it
      return workers[1]
    end
    local r = fake_router({ worker({}) }, p)
    assert.equal(200, post(r.url, { ["x-request-id"] = "one" }).status)
    assert.equal(200, post(r.url, { ["x-request-id"] = "two" }).status)
    assert.is_false(rawequal(kept[1], kept[2]))
    assert.equal("one", kept[1].id)
    assert.equal("generate", kept[1].route)
    assert.equal(r.workers.list[1].url, kept[1].worker)
    -- its exchange's box stays the first request's: closed, not another's
    assert.is_false(rawequal(kept[1]._x, kept[2]._x))
    assert.has_error(function() kept[1]._x:path() end)
    -- transient_req, but shadow candidates (the operator's policies) are offered each request
    local p2 = recording_policy("s")
    p2.transient_req = true
    function p2.select(_, req, workers)
      kept[#kept + 1] = req
      local _ = req.id
      return workers[1]
    end
    local r2 = fake_router({ worker({}) }, p2)
    local settled = 0
    r2.flow.shadow = { n = 1, offer = function() end, settle = function() settled = settled + 1 end }
    assert.equal(200, post(r2.url, { ["x-request-id"] = "three" }).status)
    assert.equal(200, post(r2.url, { ["x-request-id"] = "four" }).status)
    assert.is_false(rawequal(kept[3], kept[4]))
    assert.equal("three", kept[3].id)
    assert.equal(2, settled)
    -- and when the candidate is gone before the request ends (dropped for
    -- an error or its time, or removed by the operator)
    function r2.flow.shadow.offer(sh) sh.n = 0 end
    assert.equal(200, post(r2.url, { ["x-request-id"] = "five" }).status)
    r2.flow.shadow.n = 1
    assert.equal(200, post(r2.url, { ["x-request-id"] = "six" }).status)
    assert.is_false(rawequal(kept[5], kept[6]))
    assert.equal("five", kept[5].id)
  end)

  it("lets the tree go on from a request's match when it inserts the same kept text", function()
    local radix = require "sglr.radix_ffi"
    local p = recording_policy("m")
    p.wants_text = true
    p.tree = radix.new()
    function p.select(self, req, workers)
      local source = p.by_string and req.text or req.text_source
      self.tree:match(source, workers)
      self.tree:insert(source, workers[1].url)
      return workers[1]
    end
    local r = fake_router({ worker({}) }, p)
    local function send(text)
      local res = core.request(assert(core.upstream(r.url)), { method = "POST", path = "/generate",
        body = cjson.encode({ text = text }), headers = { ["content-type"] = "application/json" } })
      assert.equal(200, res.status)
    end
    send("a shared system prompt, then question one")
    local first = p.tree:stats().resumed    -- (the tree did not know the worker yet: the C method matched)
    send("a shared system prompt, then question two")
    send("a shared system prompt, then question tw0")
    -- each insert took the path its match walked
    assert.equal(first + 2, p.tree:stats().resumed)
    local m = { p.tree:match("a shared system prompt, then question two", r.workers.list) }
    assert.same({ #"a shared system prompt, then question two", r.workers.list[1].url }, m)
    -- a string has no key: walked again
    p.by_string = true
    send("a shared system prompt, then question three")
    assert.equal(first + 2, p.tree:stats().resumed)
    assert.equal(#"a shared system prompt, then question three",
      p.tree:match("a shared system prompt, then question three", r.workers.list))
  end)

  it("skips an empty name among the request id headers", function()
    local r = fake_router({ worker({}) }, recording_policy("a"), { request_id_headers = { "", "x-trace-id" } })
    local res = post(r.url, { ["x-trace-id"] = "t-1" })
    assert.equal("t-1", res.headers["x-request-id"])
  end)

  it("asks an unlimited limiter nothing, and a limited one once each way", function()
    local w = worker({})
    local r = fake_router({ w }, recording_policy("a"))
    local calls = 0
    r.flow.limiter = { max = 0, acquire = function() calls = calls + 1; return true end,
      release = function() calls = calls + 1 end, depth = function() return 0 end }
    assert.equal(200, post(r.url).status)
    assert.equal(0, calls)
    r.flow.limiter.max = 4
    assert.equal(200, post(r.url).status)
    assert.equal(2, calls)
  end)

  it("drops the headers a client names in Connection, and keeps the others", function()
    local w = {}
    local r = fake_router({ worker(w) }, recording_policy("p"))
    local res = post(r.url, { connection = "keep-alive, X-Hop", ["x-hop"] = "secret", ["x-keep"] = "1" })
    assert.equal(200, res.status)
    assert.is_nil(w.headers["x-hop"])
    assert.equal("1", w.headers["x-keep"])
  end)

  it("re-picks after a retryable status and settles each attempt once", function()
    local bad, good = { status = 503 }, {}
    local p = recording_policy("p")
    local r = fake_router({ worker(bad), worker(good) }, p, { retry_initial_backoff_ms = 1 })
    local res = post(r.url)
    assert.equal(200, res.status)
    assert.equal(2, p.selected)
    assert.equal(2, #p.done)
    assert.equal(503, p.done[1].status)
    assert.equal(200, p.done[2].status)
    for _, wk in ipairs(r.workers.list) do assert.equal(0, wk.load) end
  end)
end)

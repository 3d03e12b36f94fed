-- The router in prefill/decode (PD) disaggregation mode, against sim
-- workers in the prefill and decode roles. What the client gets is checked
-- together with what each worker saw: the sims record the bootstrap fields
-- of every request (rooms as exact digit strings), and a decode answers
-- 200 only when the prefill at bootstrap_host:bootstrap_port was sent the
-- same room, so a leg that got the wrong room fails the request.
local H = require "spec.helpers"
local core = require "sglr.core"
local cjson = require "cjson.safe"

local TWO_53 = "9007199254740992"

-- --- what the workers saw ----------------------------------------------------------

-- rooms_total of each worker: mark(list) before, new_rooms(list, m) after
local function mark(list)
  local m = {}
  for i, w in ipairs(list) do m[i] = H.sim_stats(w).rooms_total end
  return m
end

-- The rooms the workers of `list` were sent since `m`, in one list, and
-- how many each worker got (by id).
local function new_rooms(list, m)
  local out, by = {}, {}
  for i, w in ipairs(list) do
    local st = H.sim_stats(w)
    local n = st.rooms_total - m[i]
    by[st.id] = n
    for k = #st.rooms - n + 1, #st.rooms do out[#out + 1] = st.rooms[k] end
  end
  return out, by
end

local function sorted(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c
end

local function assert_distinct(rooms)
  local seen = {}
  for _, r in ipairs(rooms) do
    assert.is_nil(seen[r], "room " .. r .. " given twice")
    seen[r] = true
  end
end

-- A room no double holds: odd and above 2^53 (compared as digit strings).
local function beyond_double(room)
  local above = #room > #TWO_53 or (#room == #TWO_53 and room > TWO_53)
  return above and ("13579"):find(room:sub(-1), 1, true) ~= nil
end

local function inflight(w) return H.sim_stats(w).inflight end

-- Wait until none of the workers has a request in flight.
local function await_idle(list, timeout_ms, what)
  H.wait_for(function()
    for _, w in ipairs(list) do
      if inflight(w) ~= 0 then return false end
    end
    return true
  end, timeout_ms or 3000, what or "workers idle")
end

-- --- requests ------------------------------------------------------------------------

local function gen(text, extra, tokens)
  local t = { text = text, sampling_params = { max_new_tokens = tokens or 2 } }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- The request `req` (a table) with members appended as JSON text: fields a
-- Lua table cannot carry (duplicate keys, exact big integers).
local function with_raw(req, raw)
  return cjson.encode(req):sub(1, -2) .. "," .. raw .. "}"
end

local events = H.sse_events

local function expect_error(res, status, pattern)
  assert.equal(status, res.status, res.body)
  assert.is_table(res.json, "body is not JSON: " .. res.body)
  assert.is_table(res.json.error, res.body)
  if pattern then assert.truthy(tostring(res.json.error.message):find(pattern), res.json.error.message) end
end

local function http_request(path, body)
  return ("POST %s HTTP/1.1\r\nhost: pd\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s")
    :format(path, #body, body)
end

local function mseries(name, label, value)
  return ('%s{%s="%s"}'):format(name, label, value)
end

local function decisions(policy, w)
  return ('sgl_router_policy_decisions_total{policy="%s",worker="%s"}'):format(policy, w.url)
end

local function find_worker(r, url)
  for _, w in ipairs(H.list_workers(r).workers) do
    if w.url == url then return w end
  end
end

-- -----------------------------------------------------------------------------------------

describe("a PD router", function()
  -- p1 announces its bootstrap port, p2 none (bootstrap_port null: the
  -- decode skips the transfer check for its rooms)
  local p1, p2, d1, d2, P, D, ALL, r

  local function pd_args(policy_args)
    local args = { "--pd-disaggregation",
      "--prefill", p1.url, tostring(p1.bootstrap_port), "--prefill", p2.url, "none",
      "--decode", d1.url, "--decode", d2.url, "--retry-initial-backoff-ms", "1" }
    for _, a in ipairs(policy_args) do args[#args + 1] = a end
    return args
  end

  setup(function()
    p1 = H.prefill_sim("p1", { "--model", "prefill-model" })
    p2 = H.sim({ "--id", "p2", "--role", "prefill", "--model", "prefill-model" })
    d1 = H.sim({ "--id", "d1", "--role", "decode", "--model", "decode-model" })
    d2 = H.sim({ "--id", "d2", "--role", "decode", "--model", "decode-model" })
    P, D = { p1, p2 }, { d1, d2 }
    ALL = { p1, p2, d1, d2 }
    r = H.router(pd_args({ "--policy", "round_robin" }))
  end)
  teardown(H.stop_all)

  -- Send one request; both legs must have been sent the same fresh rooms
  -- (as many as the batch has). -> res, rooms, the prefill and decode stats
  local function routed(path, body, nrooms)
    local pm, dm = mark(P), mark(D)
    local res = assert(H.post(r.url, path, body))
    local prooms, pby = new_rooms(P, pm)
    local drooms, dby = new_rooms(D, dm)
    assert.equal(nrooms, #prooms, ("%s %s -> %d %s; rooms %s"):format(path, body, res.status, res.body,
      cjson.encode(prooms)))
    assert.same(sorted(prooms), sorted(drooms))
    assert_distinct(prooms)
    local pw = pby.p1 > 0 and p1 or p2
    local dw = dby.d1 > 0 and d1 or d2
    return res, prooms, H.sim_stats(pw), H.sim_stats(dw), pw, dw
  end

  describe("splices the bootstrap fields", function()
    it("into both legs: one fresh room, the prefill's host and bootstrap port", function()
      -- the client's own fields, of the right types or not, are dropped
      local bodies = {
        with_raw(gen("bootstrap"), '"bootstrap_host":"10.9.9.9","bootstrap_port":1,"bootstrap_room":5'),
        with_raw(gen("bootstrap"), '"bootstrap_room":"five","bootstrap_port":[1],"bootstrap_host":{"h":1}'),
        with_raw(gen("bootstrap"), '"bootstrap_room":6,"bootstrap_room":7'),
        cjson.encode(gen("bootstrap")),
      }
      local all, seen = {}, {}
      for _ = 1, 2 do
        for _, body in ipairs(bodies) do
          local res, rooms, pst, dst, pw, dw = routed("/generate", body, 1)
          assert.equal(200, res.status, res.body)
          assert.equal(dw == d1 and "d1" or "d2", H.worker_of(res))   -- the decode answered
          assert.not_same({ "5" }, rooms)
          all[#all + 1] = rooms[1]
          seen[pw] = true
          -- round robin over p1 (port announced) and p2 (none)
          local want_port = pw == p1 and p1.bootstrap_port or cjson.null
          for _, st in ipairs({ pst, dst }) do
            assert.equal("127.0.0.1", st.last_bootstrap_host)
            assert.equal(want_port, st.last_bootstrap_port)
          end
        end
      end
      assert.is_true(seen[p1] and seen[p2] or false, "round robin skipped a prefill")
      assert_distinct(all)
      for _, room in ipairs(all) do assert.truthy(room:find("^%d+$"), room) end
    end)

    it("into every element of a batch, rooms above 2^53 kept exact", function()
      local texts = {}
      for i = 1, 64 do texts[i] = "element " .. i end
      -- and the client's own array of rooms dropped
      local body = with_raw({ text = texts, sampling_params = { max_new_tokens = 1 } },
        '"bootstrap_room":[' .. ("1,"):rep(63) .. '1],"bootstrap_host":"x","bootstrap_port":null')
      local res, rooms, pst, dst, pw = routed("/generate", body, 64)
      assert.equal(200, res.status, res.body)
      local beyond = 0
      for _, room in ipairs(rooms) do
        if beyond_double(room) then beyond = beyond + 1 end
      end
      -- 64 rooms drawn from [0, 2^63): about half are odd integers past
      -- 2^53, which a detour through a double would have made even
      assert.is_true(beyond > 0, cjson.encode(rooms))
      local port = pw == p1 and p1.bootstrap_port or cjson.null
      for _, st in ipairs({ pst, dst }) do
        assert.equal(64, #st.last_bootstrap_host)
        assert.equal(64, #st.last_bootstrap_port)
        for i = 1, 64 do
          assert.equal("127.0.0.1", st.last_bootstrap_host[i])
          assert.equal(port, st.last_bootstrap_port[i])
        end
      end
    end)
  end)

  describe("sends batches with one room per element", function()
    local cases = {
      { "/generate text list", "/generate", { text = { "a", "b", "c" } }, 3 },
      { "/generate input_ids list of lists", "/generate", { input_ids = { { 1, 2, 3 }, { 4, 5 } } }, 2 },
      { "/v1/completions prompt list", "/v1/completions", { prompt = { "x", "y" }, max_tokens = 2 }, 2 },
      { "/v1/completions list of token lists", "/v1/completions",
        { prompt = { { 1, 2 }, { 3 }, { 4 } }, max_tokens = 2 }, 3 },
      { "chat with n > 1", "/v1/chat/completions",
        { n = 3, max_tokens = 2, messages = { { role = "user", content = "hi" } } }, 3 },
    }
    for _, c in ipairs(cases) do
      local name, path, req, n = c[1], c[2], c[3], c[4]
      it(name, function()
        local res, _, pst, dst = routed(path, cjson.encode(req), n)
        assert.equal(200, res.status, res.body)
        for _, st in ipairs({ pst, dst }) do
          assert.is_table(st.last_bootstrap_host)
          assert.equal(n, #st.last_bootstrap_host)
          assert.equal(n, #st.last_bootstrap_port)
        end
      end)
    end

    it("and refuses a batch it cannot give rooms to, before any worker sees it", function()
      local bad = {
        { "/generate", { text = {} } },
        { "/generate", { input_ids = {} } },
        { "/v1/completions", { prompt = {} } },
        { "/v1/chat/completions", { n = 65537, messages = { { role = "user", content = "hi" } } } },
      }
      local texts = {}
      for i = 1, 65537 do texts[i] = "t" end
      bad[#bad + 1] = { "/generate", { text = texts } }
      local before, requests = H.scrape(r), {}
      for i, w in ipairs(ALL) do requests[i] = H.sim_stats(w).requests end
      for _, b in ipairs(bad) do
        local body = cjson.encode(b[2]):gsub("{}", "[]")
        expect_error(assert(H.post(r.url, b[1], body)), 400)
      end
      for i, w in ipairs(ALL) do assert.equal(requests[i], H.sim_stats(w).requests, w.url) end
      -- nothing was dispatched, so nothing is counted as sent
      local after = H.scrape(r)
      for _, w in ipairs(ALL) do
        for _, name in ipairs({ "sgl_router_pd_prefill_requests_total", "sgl_router_pd_decode_requests_total",
                                "sgl_router_processed_requests_total" }) do
          local s = mseries(name, "worker", w.url)
          assert.equal(H.metric(before, s), H.metric(after, s), s)
        end
      end
    end)

    it("and scalars for a single request in any shape", function()
      local singles = {
        { "/generate", { input_ids = { 1, 2, 3 } } },
        { "/v1/completions", { prompt = { 1, 2, 3 }, max_tokens = 2 } },
        { "/v1/completions", { prompt = "one", max_tokens = 2 } },
        { "/v1/chat/completions", { n = 1, max_tokens = 2, messages = { { role = "user", content = "hi" } } } },
      }
      for _, s in ipairs(singles) do
        local res, _, pst, dst = routed(s[1], cjson.encode(s[2]), 1)
        assert.equal(200, res.status, res.body)
        assert.equal("127.0.0.1", pst.last_bootstrap_host)
        assert.equal("127.0.0.1", dst.last_bootstrap_host)
      end
    end)
  end)

  describe("with logprobs asked for", function()
    local text = "The quick brown fox jumps over"   -- 30 bytes: 8 tokens as the sim counts

    -- the prefill's own entries for this prompt (the sim derives them from
    -- the text, so any prefill gives the same)
    local function prefill_logprobs(path, req)
      local res = assert(H.post(p1.url, path, cjson.encode(req)))
      assert.equal(200, res.status, res.body)
      local lp = res.json.meta_info.input_token_logprobs
      assert.equal(8, #lp)
      return lp
    end

    it("on /generate the client gets the prefill's input_token_logprobs first", function()
      local want = prefill_logprobs("/generate", gen(text, { return_logprob = true }))
      local res = routed("/generate", cjson.encode(gen(text, { return_logprob = true })), 1)
      assert.equal(200, res.status, res.body)
      assert.same(want, res.json.meta_info.input_token_logprobs)
      assert.equal("tok1 tok2", res.json.text)
    end)

    it("on a streamed /generate in every event", function()
      local want = prefill_logprobs("/generate", gen(text, { return_logprob = true }))
      local res = routed("/generate", cjson.encode(gen(text, { return_logprob = true, stream = true }, 3)), 1)
      assert.equal(200, res.status, res.body)
      assert.truthy(res.headers["content-type"]:find("text/event-stream", 1, true))
      local evs = events(res.body)
      assert.equal(3, #evs)
      for _, ev in ipairs(evs) do assert.same(want, ev.meta_info.input_token_logprobs) end
      assert.truthy(res.body:find("data: [DONE]\n\n", 1, true))
    end)

    it("on /v1/completions, plain and streamed", function()
      local req = { prompt = text, max_tokens = 2, logprobs = 0 }
      local want = prefill_logprobs("/v1/completions", req)
      local res = routed("/v1/completions", cjson.encode(req), 1)
      assert.equal(200, res.status, res.body)
      assert.same(want, res.json.meta_info.input_token_logprobs)

      req.stream = true
      res = routed("/v1/completions", cjson.encode(req), 1)
      assert.equal(200, res.status, res.body)
      local evs = events(res.body)
      assert.equal(3, #evs)   -- two tokens and the usage chunk
      for _, ev in ipairs(evs) do assert.same(want, ev.meta_info.input_token_logprobs) end
    end)

    it("not asked for, the decode's body is passed as it is", function()
      -- what the decode answers to the same request sent to it directly
      local room = 600
      local function direct(path, req)
        room = room + 1
        local res = assert(H.post(d1.url, path, with_raw(req,
          '"bootstrap_host":"127.0.0.1","bootstrap_port":null,"bootstrap_room":' .. room)))
        assert.equal(200, res.status, res.body)
        return res
      end
      local function strip(obj)   -- per-response and per-worker values
        obj.id, obj.created, obj.worker_id = nil, nil, nil
        local m = obj.meta_info
        if m then m.id, m.e2e_latency, m.cached_tokens, m.worker_id = nil, nil, nil, nil end
        if obj.usage then obj.usage.prompt_tokens_details = nil end
        return obj
      end
      for _, c in ipairs({
        { "/generate", gen(text) },
        { "/generate", gen(text, { return_logprob = false }) },
        { "/v1/completions", { prompt = text, max_tokens = 2, logprobs = cjson.null } },
        { "/v1/chat/completions", { max_tokens = 2, logprobs = false, messages = { { role = "user", content = text } } } },
      }) do
        local res = routed(c[1], cjson.encode(c[2]), 1)
        assert.equal(200, res.status, res.body)
        assert.equal("application/json", res.headers["content-type"])
        local wid = res.json.worker_id or res.json.meta_info.worker_id
        assert.truthy(wid == "d1" or wid == "d2", res.body)
        local want = strip(direct(c[1], c[2]).json)
        local got = strip(res.json)
        assert.same(want, got)
        assert.is_nil((got.meta_info or {}).input_token_logprobs)
      end
      -- streamed: the decode's events one for one
      local res = routed("/generate", cjson.encode(gen(text, { stream = true }, 3)), 1)
      local evs = events(res.body)
      assert.equal(3, #evs)
      for i, ev in ipairs(evs) do
        assert.equal(i, ev.meta_info.completion_tokens)
        assert.is_nil(ev.meta_info.input_token_logprobs)
      end
    end)
  end)

  describe("serves the endpoints", function()
    it("/health and /readiness with both roles healthy", function()
      local res = assert(H.get(r.url, "/health"))
      assert.equal(200, res.status, res.body)
      res = assert(H.get(r.url, "/readiness"))
      assert.equal(200, res.status, res.body)
      assert.equal("ready", res.json.status)
      assert.equal(2, res.json.healthy_prefill_workers)
      assert.equal(2, res.json.healthy_decode_workers)
    end)

    it("/list_workers with roles, bootstrap ports and both policies", function()
      local lw = H.list_workers(r)
      assert.same({ p1.url, p2.url, d1.url, d2.url }, lw.urls)
      local want = {
        [p1.url] = { "prefill", p1.bootstrap_port }, [p2.url] = { "prefill", cjson.null },
        [d1.url] = { "decode", nil }, [d2.url] = { "decode", nil },
      }
      for _, w in ipairs(lw.workers) do
        assert.equal(want[w.url][1], w.role, w.url)
        assert.equal(want[w.url][2], w.bootstrap_port, w.url)
      end
      assert.equal("round_robin", lw.prefill_policy)
      assert.equal("round_robin", lw.decode_policy)
    end)

    it("/get_loads with every worker, its role, and per-role lists", function()
      assert.equal(200, assert(H.get(p2.url, "/sim/set?load_offset=7")).status)
      assert.equal(200, assert(H.get(d1.url, "/sim/set?load_offset=3")).status)
      local res = assert(H.get(r.url, "/get_loads"))
      H.get(p2.url, "/sim/set?load_offset=0")
      H.get(d1.url, "/sim/set?load_offset=0")
      assert.equal(200, res.status, res.body)
      local by = {}
      for _, e in ipairs(res.json.workers) do by[e.worker] = e end
      assert.same({ worker = p1.url, role = "prefill", load = 0 }, by[p1.url])
      assert.same({ worker = p2.url, role = "prefill", load = 7 }, by[p2.url])
      assert.same({ worker = d1.url, role = "decode", load = 3 }, by[d1.url])
      assert.same({ worker = d2.url, role = "decode", load = 0 }, by[d2.url])
      assert.same({ { worker = p1.url, load = 0 }, { worker = p2.url, load = 7 } }, res.json.prefill)
      assert.same({ { worker = d1.url, load = 3 }, { worker = d2.url, load = 0 } }, res.json.decode)
    end)

    it("/flush_cache on every worker", function()
      local seq = 0
      -- cached tokens a worker reports for the prompt, asked directly
      local function cached(w, prompt)
        local req = gen(prompt, nil, 1)
        local body = cjson.encode(req)
        if w == d1 or w == d2 then
          seq = seq + 1
          body = with_raw(req, '"bootstrap_host":"127.0.0.1","bootstrap_port":null,"bootstrap_room":' .. (700 + seq))
        end
        local res = assert(H.post(w.url, "/generate", body))
        assert.equal(200, res.status, res.body)
        return res.json.meta_info.cached_tokens
      end
      local prompt = "a prompt every worker has seen before the flush"
      for _, w in ipairs(ALL) do
        cached(w, prompt)
        assert.is_true(cached(w, prompt) > 0, w.url .. " did not cache the prompt")
      end
      local res = assert(H.post(r.url, "/flush_cache"))
      assert.equal(200, res.status, res.body)
      for _, w in ipairs(ALL) do assert.equal(0, cached(w, prompt), w.url) end
    end)

    it("/get_server_info, /get_model_info and /v1/models from a prefill", function()
      for _, path in ipairs({ "/get_server_info", "/get_model_info" }) do
        local res = assert(H.get(r.url, path))
        assert.equal(200, res.status, res.body)
        assert.equal("prefill-model", res.json.model_path)
        assert.truthy(res.json.worker_id == "p1" or res.json.worker_id == "p2", res.body)
      end
      local res = assert(H.get(r.url, "/v1/models"))
      assert.equal(200, res.status, res.body)
      assert.equal("prefill-model", res.json.data[1].id)
    end)

    it("/health_generate asking one prefill and one decode", function()
      local res = assert(H.get(r.url, "/health_generate"))
      assert.equal(200, res.status, res.body)
      -- one side of the pair failing fails it, and is named; the router's
      -- own health checks (every 60 s) do not run meanwhile
      for _, w in ipairs({ d1, p1 }) do
        assert.equal(200, assert(H.get(w.url, "/sim/set?healthy=0")).status)
        res = assert(H.get(r.url, "/health_generate"))
        H.get(w.url, "/sim/set?healthy=1")
        expect_error(res, 503)
        local st = {}
        for _, e in ipairs(res.json.error.workers) do st[e.worker] = e end
        assert.equal(503, st[w.url].status, res.body)
        local other = w == d1 and st[p1.url] or st[d1.url]
        assert.equal(200, other.status, res.body)
      end
      assert.equal(200, assert(H.get(r.url, "/health_generate")).status)
    end)

    it("/add_worker with a role and bootstrap port, and /remove_worker", function()
      local p3 = H.prefill_sim("p3")
      local d3 = H.sim({ "--id", "d3", "--role", "decode" })
      -- a role is required, and a bootstrap port must be one
      for _, q in ipairs({ "", "&role=", "&role=regular", "&role=worker",
                           "&role=prefill&bootstrap_port=http", "&role=prefill&bootstrap_port=0",
                           "&role=prefill&bootstrap_port=70000", "&role=prefill&bootstrap_port=1.5" }) do
        local res = assert(H.post(r.url, "/add_worker?url=" .. p3.url .. q))
        expect_error(res, 400)
      end
      assert.equal(4, #H.list_workers(r).urls)

      local res = assert(H.post(r.url, ("/add_worker?url=%s&role=prefill&bootstrap_port=%d")
        :format(p3.url, p3.bootstrap_port)))
      assert.equal(200, res.status, res.body)
      res = assert(H.post(r.url, "/add_worker?url=" .. d3.url .. "&role=decode"))
      assert.equal(200, res.status, res.body)
      local w = find_worker(r, p3.url)
      assert.equal("prefill", w.role)
      assert.equal(p3.bootstrap_port, w.bootstrap_port)
      assert.equal("decode", find_worker(r, d3.url).role)

      -- round robin over three of each: the new pair takes a request
      local pm, dm = mark({ p3 }), mark({ d3 })
      for i = 1, 3 do
        assert.equal(200, assert(H.post(r.url, "/generate", cjson.encode(gen("added " .. i)))).status)
      end
      local p3rooms = new_rooms({ p3 }, pm)
      local d3rooms = new_rooms({ d3 }, dm)
      assert.equal(1, #p3rooms)
      assert.equal(1, #d3rooms)
      assert.equal(p3.bootstrap_port, H.sim_stats(p3).last_bootstrap_port)

      for _, x in ipairs({ p3, d3 }) do
        res = assert(H.post(r.url, "/remove_worker?url=" .. x.url))
        assert.equal(200, res.status, res.body)
      end
      expect_error(assert(H.post(r.url, "/remove_worker?url=" .. p3.url)), 404)
      assert.same({ p1.url, p2.url, d1.url, d2.url }, H.list_workers(r).urls)
      pm, dm = mark({ p3 }), mark({ d3 })
      for i = 1, 4 do
        assert.equal(200, assert(H.post(r.url, "/generate", cjson.encode(gen("removed " .. i)))).status)
      end
      assert.equal(0, #new_rooms({ p3 }, pm))
      assert.equal(0, #new_rooms({ d3 }, dm))
      H.stop(p3.proc)
      H.stop(d3.proc)
    end)
  end)

  describe("spreads a burst of requests", function()
    local function burst(router, n)
      local pm, dm = mark(P), mark(D)
      local fns = {}
      for i = 1, n do
        fns[i] = function()
          -- no two share a prefix: cache_aware has no hit to follow
          return H.post(router.url, "/generate", cjson.encode(gen(core.random_id("") .. " burst " .. i)))
        end
      end
      for _, res in ipairs(H.parallel(fns)) do assert.equal(200, res.status, res.body or res.error) end
      local _, pby = new_rooms(P, pm)
      local _, dby = new_rooms(D, dm)
      return pby, dby
    end

    it("over both prefill and both decode workers with round_robin", function()
      local pby, dby = burst(r, 16)
      assert.same({ p1 = 8, p2 = 8 }, pby)
      assert.same({ d1 = 8, d2 = 8 }, dby)
    end)

    it("over both prefill and both decode workers with cache_aware", function()
      local rc = H.router(pd_args({ "--policy", "cache_aware" }))
      local pby, dby = burst(rc, 16)
      H.stop(rc.proc)
      assert.equal(16, pby.p1 + pby.p2)
      assert.is_true(pby.p1 > 0 and pby.p2 > 0, cjson.encode(pby))
      assert.is_true(dby.d1 > 0 and dby.d2 > 0, cjson.encode(dby))
    end)
  end)

  describe("picks each pool's policy as SGLang does", function()
    -- Start a router with the policy flags, send n requests; -> its
    -- /list_workers and /metrics text
    local function run(flags, n)
      local rp = H.router(pd_args(flags))
      for i = 1, n do
        local res = assert(H.post(rp.url, "/generate", cjson.encode(gen("policy " .. i))))
        assert.equal(200, res.status, res.body)
      end
      local lw, text = H.list_workers(rp), H.scrape(rp)
      H.stop(rp.proc)
      return lw, text
    end

    local function count(text, policy, list)
      local n = 0
      for _, w in ipairs(list) do n = n + H.metric(text, decisions(policy, w)) end
      return n
    end

    -- every decision line names one of the policies
    local function only(text, names)
      for line in text:gmatch("sgl_router_policy_decisions_total{policy=\"([^\"]+)\"") do
        assert.truthy(names[line], "a decision by " .. line)
      end
    end

    it("only --policy: both pools use it", function()
      local lw, text = run({ "--policy", "round_robin" }, 4)
      assert.equal("round_robin", lw.prefill_policy)
      assert.equal("round_robin", lw.decode_policy)
      assert.equal(4, count(text, "round_robin", P))
      assert.equal(4, count(text, "round_robin", D))
      assert.equal(2, H.metric(text, decisions("round_robin", p1)))
      only(text, { round_robin = true })
    end)

    it("--policy and --prefill-policy: the decode pool uses --policy", function()
      local lw, text = run({ "--policy", "round_robin", "--prefill-policy", "random" }, 4)
      assert.equal("random", lw.prefill_policy)
      assert.equal("round_robin", lw.decode_policy)
      assert.equal(4, count(text, "random", P))
      assert.equal(4, count(text, "round_robin", D))
      only(text, { round_robin = true, random = true })
      assert.equal(0, count(text, "round_robin", P))
    end)

    it("--policy and --decode-policy: the prefill pool uses --policy", function()
      local lw, text = run({ "--policy", "round_robin", "--decode-policy", "power_of_two" }, 4)
      assert.equal("round_robin", lw.prefill_policy)
      assert.equal("power_of_two", lw.decode_policy)
      assert.equal(4, count(text, "round_robin", P))
      assert.equal(4, count(text, "power_of_two", D))
      assert.equal(0, count(text, "round_robin", D))
    end)

    it("all three: --policy is not used", function()
      local lw, text = run({ "--policy", "cache_aware", "--prefill-policy", "round_robin",
        "--decode-policy", "random" }, 4)
      assert.equal("round_robin", lw.prefill_policy)
      assert.equal("random", lw.decode_policy)
      assert.equal(4, count(text, "round_robin", P))
      assert.equal(4, count(text, "random", D))
      only(text, { round_robin = true, random = true })
    end)

    describe("from a file", function()
      local file
      setup(function()
        -- the last candidate: p2 among the prefills, d2 among the decodes
        file = H.tmpfile([[
local P = { name = "last_one", version = "1.0.0", options = {} }
function P.new(conf, rt) return setmetatable({}, { __index = P }) end
function P:select(req, workers) return workers[#workers] end
return P
]], ".lua")
      end)
      teardown(function() os.remove(file) end)

      for _, role in ipairs({ "prefill", "decode" }) do
        it("for the " .. role .. " pool", function()
          local pm, dm = mark(P), mark(D)
          local lw, text = run({ "--policy", "round_robin", "--" .. role .. "-policy", file }, 4)
          local _, pby = new_rooms(P, pm)
          local _, dby = new_rooms(D, dm)
          assert.equal("last_one", lw[role .. "_policy"])
          if role == "prefill" then
            assert.same({ p1 = 0, p2 = 4 }, pby)
            assert.same({ d1 = 2, d2 = 2 }, dby)
            assert.equal(4, H.metric(text, decisions("last_one", p2)))
          else
            assert.same({ p1 = 2, p2 = 2 }, pby)
            assert.same({ d1 = 0, d2 = 4 }, dby)
            assert.equal(4, H.metric(text, decisions("last_one", d2)))
          end
        end)
      end
    end)
  end)

  it("counts PD requests, legs and durations in its metrics", function()
    local before = H.scrape(r)
    local body = cjson.encode(gen("metrics"))
    for _ = 1, 2 do assert.equal(200, assert(H.post(r.url, "/generate", body)).status) end
    assert.equal(200, assert(H.post(r.url, "/v1/chat/completions",
      cjson.encode({ max_tokens = 2, messages = { { role = "user", content = "m" } } }))).status)
    local after = H.scrape(r)
    local function delta(series) return H.metric(after, series) - H.metric(before, series) end
    assert.equal(2, delta(mseries("sgl_router_pd_requests_total", "route", "generate")))
    assert.equal(1, delta(mseries("sgl_router_pd_requests_total", "route", "chat")))
    local function legs(name, list)
      local n = 0
      for _, w in ipairs(list) do n = n + delta(mseries(name, "worker", w.url)) end
      return n
    end
    assert.equal(3, legs("sgl_router_pd_prefill_requests_total", P))
    assert.equal(3, legs("sgl_router_pd_decode_requests_total", D))
    assert.equal(0, legs("sgl_router_pd_prefill_requests_total", D))
    assert.equal(2, delta(mseries("sgl_router_pd_request_duration_seconds_count", "route", "generate")))
    assert.equal(1, delta(mseries("sgl_router_pd_request_duration_seconds_count", "route", "chat")))
    assert.is_true(delta(mseries("sgl_router_pd_request_duration_seconds_sum", "route", "generate")) > 0)
  end)
end)

-- -----------------------------------------------------------------------------------------

describe("a PD router when a leg fails", function()
  teardown(H.stop_all)

  -- every leg settled: no worker keeps a load from a failed request
  local function await_unloaded(r)
    H.wait_for(function()
      for _, w in ipairs(H.list_workers(r).workers) do
        if w.load ~= 0 then return false end
      end
      return true
    end, 3000, "loads back to 0")
  end

  local function router(p, d, extra, p_port)
    local args = { "--pd-disaggregation", "--prefill", p.url, p_port or tostring(p.bootstrap_port),
      "--decode", d.url, "--policy", "round_robin", "--retry-initial-backoff-ms", "1",
      "--health-check-interval-secs", "3600" }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    return H.router(args)
  end

  -- a stream the decode would take 10 s over
  local long_stream = cjson.encode(gen("long", { stream = true }, 100))

  it("answers with the prefill's 5xx at once when retries are off, cancelling the decode", function()
    -- the prefill fails after 300 ms, once the decode is streaming; its
    -- bootstrap port is not announced, so the decode does not wait on it
    local p = H.sim({ "--id", "pf", "--role", "prefill", "--latency-ms", "300",
      "--fail-rate", "1", "--fail-status", "503" })
    local d = H.sim({ "--id", "dl", "--role", "decode", "--decode-ms-per-token", "100" })
    local r = router(p, d, { "--disable-retries" }, "none")
    local res = assert(H.post(r.url, "/generate", long_stream))
    expect_error(res, 503, "injected failure")
    assert.is_true(res.total_ms < 3000, "took " .. res.total_ms .. " ms")
    assert.equal(1, H.sim_stats(p).requests)
    assert.equal(1, H.sim_stats(d).requests)
    await_idle({ d }, 3000, "the decode leg cancelled")
    await_unloaded(r)
    local text = H.scrape(r)
    assert.equal(1, H.metric(text, mseries("sgl_router_pd_errors_total", "error_type", "status_503")))
    assert.equal(1, H.metric(text, "sgl_router_pd_prefill_errors_total"))
    assert.equal(0, H.metric(text, "sgl_router_pd_decode_errors_total"))
    -- the breaker counts the prefill's failure, not the cancelled decode's
    assert.equal(1, H.metric(text, ('sgl_router_cb_outcomes_total{worker="%s",outcome="failure"}'):format(p.url)))
    assert.equal(0, H.metric(text, ('sgl_router_cb_outcomes_total{worker="%s",outcome="failure"}'):format(d.url)))
  end)

  it("answers with the prefill's 5xx after the retries, each decode leg cancelled", function()
    local p = H.sim({ "--id", "pf", "--role", "prefill", "--latency-ms", "100",
      "--fail-rate", "1", "--fail-status", "500" })
    local d = H.sim({ "--id", "dl", "--role", "decode", "--decode-ms-per-token", "100" })
    local r = router(p, d, { "--retry-max-retries", "2" }, "none")
    local res = assert(H.post(r.url, "/generate", long_stream))
    expect_error(res, 500, "injected failure")
    assert.equal(3, H.sim_stats(p).requests)
    await_idle({ d }, 3000, "the decode legs cancelled")
    await_unloaded(r)
    assert.equal(3, H.metric(H.scrape(r), mseries("sgl_router_pd_errors_total", "error_type", "status_500")))
  end)

  it("retries a prefill that failed once, with a fresh room", function()
    local p = H.prefill_sim("pf", { "--fail-first", "1" })
    local d = H.sim({ "--id", "d", "--role", "decode" })
    local r = router(p, d)
    local res = assert(H.post(r.url, "/generate", cjson.encode(gen("again"))))
    assert.equal(200, res.status, res.body)
    local st = H.sim_stats(p)
    assert.equal(2, st.rooms_total)
    assert.not_equal(st.rooms[1], st.rooms[2])
    assert.equal(st.rooms[2], H.sim_stats(d).rooms[#H.sim_stats(d).rooms])
    local text = H.scrape(r)
    assert.equal(1, H.metric(text, mseries("sgl_router_retries_total", "route", "generate")))
    assert.equal(2, H.metric(text, mseries("sgl_router_pd_requests_total", "route", "generate")))
  end)

  it("answers with the decode's 5xx", function()
    local p = H.prefill_sim("p")
    local d = H.sim({ "--id", "dbad", "--role", "decode", "--fail-rate", "1", "--fail-status", "500" })
    local r = router(p, d, { "--disable-retries" })
    local res = assert(H.post(r.url, "/generate", cjson.encode(gen("x"))))
    expect_error(res, 500, "injected failure")
    assert.equal("dbad", H.worker_of(res))
    local text = H.scrape(r)
    assert.equal(1, H.metric(text, mseries("sgl_router_pd_errors_total", "error_type", "status_500")))
    assert.equal(1, H.metric(text, "sgl_router_pd_decode_errors_total"))
    await_unloaded(r)

    -- and after the retries, the last decode answer
    local r2 = router(p, d, { "--retry-max-retries", "2", "--cb-failure-threshold", "100" })
    local before = H.sim_stats(d).requests
    res = assert(H.post(r2.url, "/generate", cjson.encode(gen("x"))))
    expect_error(res, 500, "injected failure")
    assert.equal(3, H.sim_stats(d).requests - before)
    -- a 429 is retried, a 400 is the client's own error
    assert.equal(200, assert(H.get(d.url, "/sim/set?fail_status=429&fail_rate=0&fail_first=1")).status)
    before = H.sim_stats(d).requests
    assert.equal(200, assert(H.post(r2.url, "/generate", cjson.encode(gen("y")))).status)
    assert.equal(2, H.sim_stats(d).requests - before)
    assert.equal(200, assert(H.get(d.url, "/sim/set?fail_status=400&fail_first=1")).status)
    res = assert(H.post(r2.url, "/generate", cjson.encode(gen("z"))))
    expect_error(res, 400, "injected failure")
  end)

  for _, role in ipairs({ "prefill", "decode" }) do
    it("answers 502 after the retries when the " .. role .. " is gone, in bounded time", function()
      local p = H.prefill_sim("p")
      local d = H.sim({ "--id", "d", "--role", "decode" })
      local r = router(p, d, { "--retry-max-retries", "2", "--request-timeout-secs", "5",
        "--cb-failure-threshold", "100" })
      -- a pooled connection to it first
      assert.equal(200, assert(H.post(r.url, "/generate", cjson.encode(gen("before")))).status)
      local gone, other = p, d
      if role == "decode" then gone, other = d, p end
      H.stop(gone.proc)
      local res = assert(H.post(r.url, "/generate", cjson.encode(gen("after"))))
      expect_error(res, 502)
      assert.equal("worker_unreachable", res.json.error.type)
      assert.is_true(res.total_ms < 4000, "took " .. res.total_ms .. " ms")
      await_idle({ other }, 3000, "the other leg ended")
      await_unloaded(r)
      local text = H.scrape(r)
      assert.equal(3, H.metric(text, "sgl_router_pd_" .. role .. "_errors_total"))
      -- the flush names the worker that is gone
      res = assert(H.post(r.url, "/flush_cache"))
      expect_error(res, 500)
      assert.equal(gone.url, res.json.error.workers[1].worker)
      assert.equal(200, assert(H.get(r.url, "/liveness")).status)
    end)
  end

  it("answers 504 within --request-timeout-secs to a prefill that hangs", function()
    local p = H.prefill_sim("ph", { "--hang" })
    local d = H.sim({ "--id", "d", "--role", "decode" })
    local r = router(p, d, { "--request-timeout-secs", "1" })
    local res = assert(H.post(r.url, "/generate", cjson.encode(gen("hang"))))
    expect_error(res, 504)
    assert.is_true(res.total_ms >= 900 and res.total_ms < 3000, "took " .. res.total_ms .. " ms")
    await_idle({ p, d }, 3000, "both legs ended")
    await_unloaded(r)
    assert.equal(1, H.metric(H.scrape(r), mseries("sgl_router_pd_errors_total", "error_type", "timeout")))
    -- and with the announced port out of the way
    local r2 = router(p, d, { "--request-timeout-secs", "1" }, "none")
    res = assert(H.post(r2.url, "/generate", cjson.encode(gen("hang"))))
    expect_error(res, 504)
    assert.is_true(res.total_ms >= 900 and res.total_ms < 3000, "took " .. res.total_ms .. " ms")
    await_idle({ p, d }, 3000, "both legs ended")
  end)

  describe("when the client goes away", function()
    local p, d, r
    setup(function()
      p = H.prefill_sim("ps", { "--decode-ms-per-token", "50" })
      d = H.sim({ "--id", "ds", "--role", "decode", "--decode-ms-per-token", "50" })
      r = router(p, d)
    end)

    local function still_serves()
      local res = assert(H.post(r.url, "/generate", cjson.encode(gen("after", nil, 1))))
      assert.equal(200, res.status, res.body)
    end

    it("mid-stream, cancels both legs", function()
      -- both legs would stream for 5 s
      local body = cjson.encode(gen("going away", { stream = true }, 100))
      local out = H.raw(r.port, http_request("/generate", body), { until_pattern = "data:", timeout_ms = 3000 })
      assert.truthy(out:find("data:", 1, true), out)
      await_idle({ p, d }, 2000, "both legs cancelled")
      await_unloaded(r)
      still_serves()
    end)

    it("while the stream waits for the prefill's logprobs, cancels both legs", function()
      local body = cjson.encode(gen("going away", { stream = true, return_logprob = true }, 100))
      local before = H.sim_stats(d).requests
      local out = H.raw(r.port, http_request("/generate", body), { close_after_ms = 300, timeout_ms = 3000 })
      assert.equal("", out)   -- nothing can be sent before the prefill ends
      assert.equal(before + 1, H.sim_stats(d).requests)
      await_idle({ p, d }, 2000, "both legs cancelled")
      await_unloaded(r)
      still_serves()
    end)

    it("before any head, cancels both legs", function()
      -- the decode streams at once (it does not wait for a transfer),
      -- the prefill has not answered yet
      local r2 = router(p, d, nil, "none")
      assert.equal(200, assert(H.get(p.url, "/sim/set?latency_ms=5000")).status)
      local before = H.sim_stats(p).requests
      local body = cjson.encode(gen("gone early", { stream = true }, 100))
      local out = H.raw(r2.port, http_request("/generate", body),
        { close_after_ms = 200, timeout_ms = 3000 })
      H.get(p.url, "/sim/set?latency_ms=0")
      assert.equal("", out)
      assert.equal(before + 1, H.sim_stats(p).requests)
      -- the prefill sleeps through its latency; the decode must not stay
      await_idle({ d }, 2000, "the decode leg cancelled")
      await_unloaded(r2)
      still_serves()
    end)
  end)
end)

-- -----------------------------------------------------------------------------------------

describe("a PD router's readiness", function()
  local p, d, r
  setup(function()
    p = H.prefill_sim("p")
    d = H.sim({ "--id", "d", "--role", "decode" })
    r = H.router({ "--pd-disaggregation", "--prefill", p.url, tostring(p.bootstrap_port), "--decode", d.url,
      "--health-check-interval-secs", "0.1", "--health-failure-threshold", "1",
      "--health-success-threshold", "1", "--health-check-timeout-secs", "1" })
  end)
  teardown(H.stop_all)

  local function readiness() return assert(H.get(r.url, "/readiness")) end

  local function await_ready(status)
    return H.wait_for(function()
      local res = readiness()
      return res.status == status and res
    end, 5000, "/readiness " .. status)
  end

  it("needs a healthy prefill and a healthy decode worker", function()
    assert.equal(200, readiness().status)
    for _, c in ipairs({ { d, "healthy_decode_workers", "healthy_prefill_workers" },
                         { p, "healthy_prefill_workers", "healthy_decode_workers" } }) do
      local w, none, one = c[1], c[2], c[3]
      assert.equal(200, assert(H.get(w.url, "/sim/set?healthy=0")).status)
      local res = await_ready(503)
      assert.equal("not_ready", res.json.status)
      assert.equal(0, res.json[none])
      assert.equal(1, res.json[one])
      -- nothing can be routed meanwhile
      expect_error(assert(H.post(r.url, "/generate", cjson.encode(gen("x")))), 503)
      local h = assert(H.get(r.url, "/health"))
      assert.equal(503, h.status)
      assert.same({ w.url }, h.json.error.unhealthy)
      assert.equal(200, assert(H.get(w.url, "/sim/set?healthy=1")).status)
      await_ready(200)
      assert.equal(200, assert(H.post(r.url, "/generate", cjson.encode(gen("x")))).status)
    end
  end)

  it("answers server info 503 without a healthy prefill", function()
    assert.equal(200, assert(H.get(p.url, "/sim/set?healthy=0")).status)
    await_ready(503)
    local res = assert(H.get(r.url, "/get_server_info"))
    H.get(p.url, "/sim/set?healthy=1")
    expect_error(res, 503, "prefill")
    await_ready(200)
  end)
end)

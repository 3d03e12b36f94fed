-- --dp-aware: each worker is routed as its data-parallel ranks ("url@rank",
-- dp_size read from its /get_server_info), and a request sent to rank r
-- carries "data_parallel_rank": r spliced into its JSON text. The sims
-- serve each rank with its own KV cache and count per rank, and show the
-- last body they received byte for byte, so what the worker got is checked
-- exactly.
local H = require "spec.helpers"
local core = require "sglr.core"
local cjson = require "cjson.safe"

-- How many top-level "data_parallel_rank" members a JSON object text has
-- (the sims' bodies are objects of scalars and small objects).
local function rank_members(body)
  local n = 0
  for _ in body:gmatch('"data_parallel_rank"') do n = n + 1 end
  return n
end

local function per_rank(w, key)
  local out = {}
  for _, r in ipairs(H.sim_stats(w).ranks) do out[r.rank] = r[key or "requests"] end
  return out
end

local function urls_of(r)
  return H.list_workers(r).urls
end

describe("--dp-aware", function()
  teardown(H.stop_all)

  describe("routing to ranks", function()
    local a, b, r
    setup(function()
      a = H.sim({ "--id", "a", "--dp-size", "2" })
      b = H.sim({ "--id", "b", "--dp-size", "3" })
      r = H.router({ "--dp-aware", "--policy", "round_robin", "--worker-urls", a.url, b.url })
    end)

    it("lists one entry per rank, with its rank and dp_size", function()
      local lw = H.list_workers(r)
      assert.same({ a.url .. "@0", a.url .. "@1", b.url .. "@0", b.url .. "@1", b.url .. "@2" }, lw.urls)
      for i, w in ipairs(lw.workers) do
        local base = i <= 2 and a.url or b.url
        assert.equal(base, w.base_url)
        assert.equal(i <= 2 and i - 1 or i - 3, w.dp_rank)
        assert.equal(i <= 2 and 2 or 3, w.dp_size)
        assert.is_true(w.healthy)
      end
    end)

    it("reaches every rank, each request carrying exactly its rank", function()
      local before_a, before_b = per_rank(a), per_rank(b)
      -- the client's own data_parallel_rank is replaced, and nothing else
      -- in the body changes: [] stays [], a 64-bit integer stays exact
      local body = '{"text":"rank check","data_parallel_rank":9,'
        .. '"sampling_params":{"max_new_tokens":1,"stop":[]},"seed":18446744073709551617}'
      local seen = {}
      for _ = 1, 10 do
        local res = assert(H.post(r.url, "/generate", body))
        assert.equal(200, res.status)
        local id, rank = H.worker_of(res), res.headers["x-sim-dp-rank"]
        local key = id .. "@" .. rank
        seen[key] = (seen[key] or 0) + 1
        local got = H.sim_stats(id == "a" and a or b).last_body
        assert.equal('{"text":"rank check","sampling_params":{"max_new_tokens":1,"stop":[]},'
          .. '"seed":18446744073709551617,"data_parallel_rank":' .. rank .. '}', got)
        assert.equal(1, rank_members(got))
      end
      -- round robin over five ranks: two requests each
      assert.same({ ["a@0"] = 2, ["a@1"] = 2, ["b@0"] = 2, ["b@1"] = 2, ["b@2"] = 2 }, seen)
      local after_a, after_b = per_rank(a), per_rank(b)
      for k = 0, 1 do assert.equal(2, after_a[k] - before_a[k]) end
      for k = 0, 2 do assert.equal(2, after_b[k] - before_b[k]) end
    end)

    it("splices the rank into chat and completions bodies and streams", function()
      local res = assert(H.post(r.url, "/v1/chat/completions",
        '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true}'))
      assert.equal(200, res.status)
      assert.truthy(res.body:find("[DONE]", 1, true))
      local w = H.worker_of(res) == "a" and a or b
      local got = H.sim_stats(w).last_body
      assert.equal('{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true,'
        .. '"data_parallel_rank":' .. res.headers["x-sim-dp-rank"] .. '}', got)
      res = assert(H.post(r.url, "/v1/completions", '{"prompt":"x","max_tokens":1}'))
      assert.equal(200, res.status)
      w = H.worker_of(res) == "a" and a or b
      assert.equal('{"prompt":"x","max_tokens":1,"data_parallel_rank":' .. res.headers["x-sim-dp-rank"] .. '}',
        H.sim_stats(w).last_body)
    end)

    it("keeps a load, metrics and /get_loads per rank", function()
      assert(H.get(a.url, "/sim/set?latency_ms=400"))
      assert(H.get(b.url, "/sim/set?latency_ms=400"))
      local loads
      local fns = {}
      for i = 1, 5 do
        fns[i] = function() return assert(H.post(r.url, "/generate", H.gen_body("load " .. i))) end
      end
      fns[6] = function()
        core.sleep(200)
        loads = { list = H.list_workers(r), get = assert(H.get(r.url, "/get_loads")).json }
        return true
      end
      H.parallel(fns)
      assert(H.get(a.url, "/sim/set?latency_ms=0"))
      assert(H.get(b.url, "/sim/set?latency_ms=0"))
      -- five requests in flight, one per rank, each counted on its own entry
      for _, w in ipairs(loads.list.workers) do assert.equal(1, w.load, w.url) end
      -- /get_loads: each rank's load as its worker reports it
      assert.equal(5, #loads.get.workers)
      for _, e in ipairs(loads.get.workers) do
        assert.truthy(e.worker:match("@%d$"))
        assert.equal(1, e.load, e.worker)
        assert.equal(tonumber(e.worker:match("@(%d)$")), e.dp_rank)
      end
      local text = H.scrape(r)
      for _, url in ipairs(urls_of(r)) do
        assert.is_true(H.metric(text, 'sgl_router_processed_requests_total{worker="' .. url .. '"}') > 0, url)
        assert.truthy(text:find('sgl_router_worker_health{worker="' .. url .. '"} 1', 1, true), url)
      end
    end)

    it("adds and removes a worker's ranks, one or all", function()
      local c = H.sim({ "--id", "c", "--dp-size", "2" })
      local res = assert(H.post(r.url, "/add_worker?url=" .. c.url))
      assert.equal(200, res.status)
      local urls = urls_of(r)
      assert.equal(7, #urls)
      assert.equal(c.url .. "@0", urls[6])
      assert.equal(c.url .. "@1", urls[7])
      assert.equal(400, assert(H.post(r.url, "/add_worker?url=" .. c.url)).status)
      assert.equal(400, assert(H.post(r.url, "/add_worker?url=" .. c.url .. "@1")).status)
      -- one rank
      res = assert(H.post(r.url, "/remove_worker?url=" .. c.url .. "@1"))
      assert.equal(200, res.status)
      assert.same({ a.url .. "@0", a.url .. "@1", b.url .. "@0", b.url .. "@1", b.url .. "@2",
        c.url .. "@0" }, urls_of(r))
      -- the rest of the worker
      res = assert(H.post(r.url, "/remove_worker?url=" .. c.url))
      assert.equal(200, res.status)
      assert.equal(5, #urls_of(r))
      -- its gauges go with it (counters stay, as counters do)
      local text = H.scrape(r)
      assert.is_nil(text:find('sgl_router_worker_health{worker="' .. c.url, 1, true))
      assert.is_nil(text:find('sgl_router_running_requests{worker="' .. c.url, 1, true))
      assert.equal(404, assert(H.post(r.url, "/remove_worker?url=" .. c.url)).status)
    end)
  end)

  it("keeps a shared prefix on one rank's cache, which round-robin ranks in the worker do not", function()
    -- the same prompts, through the same cache_aware router, with and
    -- without --dp-aware, against one worker of four ranks
    local prefix = string.rep("You are a helpful assistant for the sglr project. ", 20)
    local function cached_tokens(dp_aware)
      local w = H.sim({ "--dp-size", "4" })
      local args = { "--worker-urls", w.url }
      if dp_aware then args[#args + 1] = "--dp-aware" end
      local r = H.router(args)
      for i = 1, 8 do
        assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body(prefix .. "question " .. i))).status)
      end
      local st = H.sim_stats(w)
      H.stop(r.proc)
      H.stop(w.proc)
      local used = 0
      for _, rk in ipairs(st.ranks) do
        if rk.requests > 0 then used = used + 1 end
      end
      return st.cached_tokens, used
    end
    local with, ranks_with = cached_tokens(true)
    local without, ranks_without = cached_tokens(false)
    -- dp-aware: one rank took all eight, seven found the prefix cached;
    -- without it the worker spread them over its four ranks, four misses
    assert.equal(1, ranks_with)
    assert.equal(4, ranks_without)
    assert.is_true(with > without, with .. " <= " .. without)
    local per_prompt = with / 7
    assert.near(4 * per_prompt, without, per_prompt * 0.1)
  end)

  it("waits for a worker that is not ready at startup, then routes to its ranks", function()
    local ok = H.sim({ "--id", "ok", "--dp-size", "1" })
    local late = H.sim({ "--id", "late", "--dp-size", "2", "--unhealthy" })
    local r = H.router({ "--dp-aware", "--policy", "round_robin", "--worker-urls", ok.url, late.url,
      "--worker-startup-timeout-secs", "0.5" })
    local lw = H.list_workers(r)
    assert.same({ ok.url .. "@0" }, lw.urls)
    assert.equal(late.url, lw.pending[1].url)
    assert.equal(503, assert(H.get(r.url, "/health")).status)
    assert(H.get(late.url, "/sim/set?healthy=1"))
    H.wait_for(function() return #urls_of(r) == 3 end, 5000, "the late worker's ranks")
    assert.is_nil(H.list_workers(r).pending)
    local seen = {}
    for i = 1, 6 do
      local res = assert(H.post(r.url, "/generate", H.gen_body("late " .. i)))
      seen[H.worker_of(res) .. "@" .. res.headers["x-sim-dp-rank"]] = true
    end
    assert.same({ ["ok@0"] = true, ["late@0"] = true, ["late@1"] = true }, seen)
  end)

  it("splices each PD leg's own rank beside the bootstrap fields", function()
    local p = H.prefill_sim("p", { "--dp-size", "2" })
    local d = H.sim({ "--id", "d", "--role", "decode", "--dp-size", "3" })
    local r = H.router({ "--pd-disaggregation", "--dp-aware", "--policy", "round_robin",
      "--prefill", p.url, tostring(p.bootstrap_port), "--decode", d.url })
    local lw = H.list_workers(r)
    assert.same({ p.url .. "@0", p.url .. "@1", d.url .. "@0", d.url .. "@1", d.url .. "@2" }, lw.urls)
    local pairs_seen = {}
    for i = 1, 6 do
      local res = assert(H.post(r.url, "/generate",
        '{"text":"pd ' .. i .. '","data_parallel_rank":5,"sampling_params":{"max_new_tokens":1}}'))
      assert.equal(200, res.status)
      local pb, db = H.sim_stats(p).last_body, H.sim_stats(d).last_body
      local pj, dj = cjson.decode(pb), cjson.decode(db)
      assert.equal(1, rank_members(pb))
      assert.equal(1, rank_members(db))
      -- the same bootstrap fields on both legs, the room as sent
      local room = pb:match('"bootstrap_room":(%d+)')
      assert.equal(room, db:match('"bootstrap_room":(%d+)'))
      assert.equal(pj.bootstrap_port, p.bootstrap_port)
      assert.truthy(pb:find(',"data_parallel_rank":' .. pj.data_parallel_rank .. '}$'))
      assert.truthy(db:find(',"data_parallel_rank":' .. dj.data_parallel_rank .. '}$'))
      -- the decode answered: its rank is the one in its body
      assert.equal(tostring(dj.data_parallel_rank), res.headers["x-sim-dp-rank"])
      pairs_seen[#pairs_seen + 1] = pj.data_parallel_rank .. "/" .. dj.data_parallel_rank
    end
    -- each pool's policy went round its own ranks
    assert.same({ "0/0", "1/1", "0/2", "1/0", "0/1", "1/2" }, pairs_seen)
  end)
end)

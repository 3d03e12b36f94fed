-- policies/cache_aware.lua: hits stay on the worker holding the prefix,
-- misses go to the emptiest worker (ties shared), skew goes to the least
-- loaded, eviction and removal shrink the tree.
--
-- Every behaviour runs twice: against a small Lua model of the tree (pure
-- policy logic) and against the native sglr.radix the binary preloads.

local policy = require "sglr.policy"

-- A brute-force stand-in for sglr.radix: every text each worker was sent,
-- with the logical time it was last used.
local function fake_radix()
  local T = { texts = {}, clock = 0, evictions = {} }
  local function url_of(w) return type(w) == "table" and w.url or w end
  local function lcp(a, b)
    local n = math.min(#a, #b)
    for i = 1, n do
      if a:byte(i) ~= b:byte(i) then return i - 1 end
    end
    return n
  end
  function T:insert(text, url)
    self.clock = self.clock + 1
    self.texts[url] = self.texts[url] or {}
    self.texts[url][text] = self.clock
  end
  function T:match(text, allowed)
    local ok
    if allowed then
      ok = {}
      for _, w in ipairs(allowed) do ok[url_of(w)] = true end
    end
    local best, best_url, best_stamp = 0, nil, -1
    for url, texts in pairs(self.texts) do
      if not ok or ok[url] then
        for t, stamp in pairs(texts) do
          local l = lcp(text, t)
          if l > 0 and (l > best or (l == best and stamp > best_stamp)) then
            best, best_url, best_stamp = l, url, stamp
          end
        end
      end
    end
    if best_url then
      self.clock = self.clock + 1
      for t in pairs(self.texts[best_url]) do
        if lcp(text, t) == best then self.texts[best_url][t] = self.clock end
      end
    end
    return best, best_url
  end
  function T:size(url)
    local seen, n = {}, 0
    for t in pairs(self.texts[url] or {}) do
      for i = 1, #t do
        local p = t:sub(1, i)
        if not seen[p] then seen[p], n = true, n + 1 end
      end
    end
    return n
  end
  function T:remove_worker(url) self.texts[url] = nil end
  function T:evict(max)
    self.evictions[#self.evictions + 1] = max
    local removed = 0
    for url, texts in pairs(self.texts) do
      while self:size(url) > max do
        local oldest, os
        for t, s in pairs(texts) do
          if not os or s < os then oldest, os = t, s end
        end
        local before = self:size(url)
        texts[oldest] = nil
        removed = removed + before - self:size(url)
      end
    end
    return removed
  end
  function T:stats()
    local n = 0
    for url in pairs(self.texts) do n = n + self:size(url) end
    return { nodes = 0, chars = n }
  end
  return T
end

local function real_radix()
  return require("sglr.radix").new()
end

local function workers(loads)
  local list = {}
  for i, l in ipairs(loads) do
    list[i] = { url = "http://w" .. i, load = l, role = "regular", healthy = true }
  end
  return list
end

-- A fake runtime that records what the policy asked of it.
local function runtime(make_tree)
  local rt = { timers = {}, logs = {} }
  rt.radix = function()
    rt.tree = make_tree()
    return rt.tree
  end
  rt.now = function() return 0 end
  rt.random = function(n) return 1 end
  rt.log = function(level, msg) rt.logs[#rt.logs + 1] = { level, msg } end
  rt.every = function(ms, fn) rt.timers[#rt.timers + 1] = { ms = ms, fn = fn } end
  return rt
end

local function new(make_tree, opts)
  local P = assert(policy.load("cache_aware"))
  local rt = runtime(make_tree)
  local inst = assert(policy.instantiate(P, opts or {}, rt))
  return inst, rt
end

-- select's reason, in the short names the tests use
local SHORT = { cache_hit = "hit", cache_miss = "miss", imbalance = "balance", shortest_queue = "queue" }

-- route(p, text, ws) -> url, outcome, why (select's second value when it
-- chose none). outcome: decision (short reason), matched and total (what
-- select reported), match_ratio (matched / total).
local function route(p, text, ws)
  local req = { route = "generate", text = text }
  local w, reason, matched, total = p:select(req, ws)
  if not w then return nil, req, reason end
  assert.is_nil(rawget(req, "decision"))        -- nothing is written on the request
  assert.equal(#(text or ""), total)
  local out = { decision = SHORT[reason], reason = reason, matched = matched, total = total,
    match_ratio = matched and (total > 0 and matched / total or 0) or nil }
  assert.truthy(out.decision, "a known reason: " .. tostring(reason))
  return w.url, out
end

describe("cache_aware policy", function()
  it("declares its shape and the SGLang router defaults", function()
    local P = require "policies.cache_aware"
    assert.equal("cache_aware", P.name)
    assert.is_string(P.version)
    assert.equal(0.5, P.options.cache_threshold.default)
    assert.equal(32, P.options.balance_abs_threshold.default)
    assert.equal(1.0001, P.options.balance_rel_threshold.default)
    assert.equal(60, P.options.eviction_interval.default)
    assert.equal(16777216, P.options.max_tree_size.default)
    assert.equal(1.0, P.options.cache_routing_prob.default)
    for _, o in pairs(P.options) do assert.is_string(o.description) end
  end)

  it("has sglr.radix refuse what is not a tree, and a closed tree", function()
    local radix = require "sglr.radix"
    local t = radix.new()
    t:insert("abc", "http://w1")
    for _, other in ipairs({ {}, "x", io.stdout, newproxy and newproxy(false) or {} }) do
      local ok, err = pcall(t.match, other, "abc")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("sglr.radix expected", 1, true), tostring(err))
    end
    assert.equal(3, (t:match("abc")))
    t:close()
    local ok, err = pcall(t.match, t, "abc")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("closed", 1, true), tostring(err))
    t:close()                            -- a second close is fine
  end)

  it("uses the real sglr.radix from the runtime", function()
    local p, rt = new(real_radix)
    assert.equal("sglr.radix", getmetatable(rt.tree))
    assert.equal(rt.tree, p.tree)
  end)

  it("cuts the tree between intervals once max_tree_size characters were inserted (sglr.radix)", function()
    -- 64 Ki is the least insertion between two cuts
    local p, rt = new(real_radix, { eviction_interval = 3600, max_tree_size = 1000 })
    local ws = workers({ 0 })
    local function prompt(i) return ("%05d unique prompt "):format(i) .. string.rep("y", 1000) end
    local most = 0
    for i = 1, 140 do                      -- 140 KB inserted, no timer run
      route(p, prompt(i), ws)
      most = math.max(most, rt.tree:size("http://w1"))
    end
    assert.is_true(p:stats().early_cuts >= 2, "cuts: " .. p:stats().early_cuts)
    assert.is_true(most <= 1000 + 65536 + 1020, "the tree grew to " .. most)
    assert.is_true(p:stats().evicted_chars > 60000)
    -- the latest prompts are kept
    local _, req = route(p, prompt(140), ws)
    assert.equal("hit", req.decision)
    -- hits on prompts the tree holds add nothing: no cut however many
    local cuts = p:stats().early_cuts
    for _ = 1, 200 do route(p, prompt(140), ws) end
    assert.equal(cuts, p:stats().early_cuts)
    -- an interval of 0 (never evict) is never cut early either
    local p0, rt0 = new(real_radix, { eviction_interval = 0, max_tree_size = 1000 })
    for i = 1, 80 do route(p0, prompt(i), ws) end
    assert.equal(0, p0:stats().early_cuts)
    assert.is_true(rt0.tree:size("http://w1") > 80000)
  end)

  for _, impl in ipairs({ { "model tree", fake_radix }, { "sglr.radix", real_radix } }) do
    local name, make_tree = impl[1], impl[2]

    describe("with the " .. name, function()
      it("returns nil and a reason without workers", function()
        local p = new(make_tree)
        local w, _, reason = route(p, "x", {})
        assert.is_nil(w)
        assert.is_string(reason)
      end)

      it("sends a repeated prompt back to the same worker", function()
        local p, ws = new(make_tree), workers({ 0, 0, 0 })
        local first, req = route(p, "You are a helpful assistant. Tell me a joke.", ws)
        assert.equal("miss", req.decision)
        assert.equal(0, req.match_ratio)
        for _ = 1, 5 do
          local again, r = route(p, "You are a helpful assistant. Tell me a joke.", ws)
          assert.equal(first, again)
          assert.equal("hit", r.decision)
          assert.equal(1, r.match_ratio)
        end
      end)

      it("treats a match of exactly cache_threshold as a miss", function()
        local p, ws = new(make_tree), workers({ 0, 0 })
        local owner = route(p, "abcd", ws)
        local other, req = route(p, "abcdwxyz", ws)        -- 4/8 = 0.5
        assert.equal("miss", req.decision)
        assert.equal(0, req.match_ratio)                    -- the 4 chars are the owner's, not the choice's
        assert.not_equal(owner, other)                      -- the emptier one
        local again, req2 = route(p, "abcdwxy", { ws[1], ws[2] })
        assert.equal(other, again)                          -- 7/7 held by `other`
        assert.equal("hit", req2.decision)
      end)

      it("hits just above the threshold", function()
        local p, ws = new(make_tree), workers({ 0, 0 })
        local owner = route(p, "abcd", ws)
        local w, req = route(p, "abcdxyz", ws)              -- 4/7 > 0.5
        assert.equal(owner, w)
        assert.equal("hit", req.decision)
        assert.near(4 / 7, req.match_ratio, 1e-9)
      end)

      it("routes by cache with probability cache_routing_prob, else to the shortest queue", function()
        local ws = workers({ 0, 3 })
        local p, rt = new(make_tree, { cache_routing_prob = 0.5 })
        local rolls = { 0.2, 0.7, 0.2, 0.49, 0.5 }
        rt.random = function(n)
          assert.is_nil(n)                        -- a float in [0, 1)
          return table.remove(rolls, 1)
        end
        ws[1].load, ws[2].load = 3, 0
        route(p, "shared system prompt, question one", { ws[1] })    -- 0.2: cache (one worker)
        -- 0.7 >= 0.5: the shortest queue, although w1 holds the prefix
        local w, req = route(p, "shared system prompt, question one", ws)
        assert.equal("http://w2", w)
        assert.equal("queue", req.decision)
        -- 0.2 < 0.5: by cache; w2 now holds it as well and was recorded last
        _, req = route(p, "shared system prompt, question one", ws)
        assert.equal("hit", req.decision)
        -- 0.49: cache; 0.5: queue (strictly below the probability routes by cache)
        _, req = route(p, "shared system prompt, question one", ws)
        assert.equal("hit", req.decision)
        w, req = route(p, "shared system prompt, question one", ws)
        assert.equal("queue", req.decision)
        assert.equal("http://w2", w)
        assert.equal(2, p:stats().shortest_queue)
      end)

      it("never consults the dice at cache_routing_prob 1 (the default) and always queues at 0", function()
        local p, rt = new(make_tree)
        rt.random = function() error("rt.random called") end
        local ws = workers({ 5, 0 })
        local owner = route(p, "abcdefgh", { ws[1] })
        assert.equal(owner, (route(p, "abcdefgh", ws)))
        local q, rt0 = new(make_tree, { cache_routing_prob = 0 })
        rt0.random = function() error("rt.random called") end
        route(q, "abcdefgh", { ws[1] })
        local w, req = route(q, "abcdefgh", ws)
        assert.equal("http://w2", w)
        assert.equal("queue", req.decision)
      end)

      it("honours a configured threshold", function()
        local p, ws = new(make_tree, { cache_threshold = 0.9 }), workers({ 0, 0 })
        local owner = route(p, "0123456789", ws)
        local w, req = route(p, "0123456789ab", ws)         -- 10/12 < 0.9
        assert.not_equal(owner, w)
        assert.equal("miss", req.decision)
      end)

      it("spreads misses over equally empty workers", function()
        local p, ws = new(make_tree), workers({ 0, 0, 0 })
        local seen = {}
        for i = 1, 3 do
          local w = route(p, i .. " unique prompt", ws)
          assert.is_nil(seen[w])
          seen[w] = true
        end
        -- Empty routing text leaves every tree at 0: the cursor still rotates.
        local p2 = new(make_tree)
        local got = {}
        for i = 1, 6 do got[i] = route(p2, "", ws) end
        assert.same({ "http://w1", "http://w2", "http://w3", "http://w1", "http://w2", "http://w3" },
                    got)
      end)

      it("prefers the lower load among equally empty workers", function()
        local p, ws = new(make_tree), workers({ 3, 1, 1 })
        for _ = 1, 6 do
          local w = route(p, "", ws)
          assert.not_equal("http://w1", w)
        end
      end)

      it("goes to the least loaded worker when loads are skewed", function()
        local p = new(make_tree)
        local ws = workers({ 0, 0 })
        local owner = route(p, "shared prefix and more", ws)
        ws[1].load, ws[2].load = 0, 0
        -- make the owner the busy one: 100 vs 10 is past 32 and past 1.0001x
        local busy, idle = ws[1], ws[2]
        if owner ~= busy.url then busy, idle = idle, busy end
        busy.load, idle.load = 100, 10
        local w, req = route(p, "shared prefix and more", ws)
        assert.equal(idle.url, w)
        assert.equal("balance", req.decision)
        -- the text was still recorded under the chosen worker
        busy.load, idle.load = 0, 0
        local _, req2 = route(p, "shared prefix and more", { idle })
        assert.equal("hit", req2.decision)
      end)

      it("needs both the absolute and the relative skew", function()
        local p = new(make_tree)
        local ws = workers({ 0, 0 })
        local owner = route(p, "sticky text here", ws)
        local busy = ws[1].url == owner and ws[1] or ws[2]
        local other = busy == ws[1] and ws[2] or ws[1]
        busy.load, other.load = 40, 10                      -- diff 30 <= 32
        assert.equal(owner, (route(p, "sticky text here", ws)))
        busy.load, other.load = 1000, 999                   -- diff 1
        assert.equal(owner, (route(p, "sticky text here", ws)))
        local q = new(make_tree, { balance_rel_threshold = 2 })
        local owner2 = route(q, "sticky text here", ws)
        local b2 = ws[1].url == owner2 and ws[1] or ws[2]
        local o2 = b2 == ws[1] and ws[2] or ws[1]
        b2.load, o2.load = 100, 60                          -- diff 40, but 100 < 2 * 60
        local w, req = route(q, "sticky text here", ws)
        assert.equal(owner2, w)
        assert.equal("hit", req.decision)
        b2.load, o2.load = 130, 60                          -- 130 > 120 and 70 > 32
        w, req = route(q, "sticky text here", ws)
        assert.equal(o2.url, w)
        assert.equal("balance", req.decision)
      end)

      it("rotates among equally idle workers under skew", function()
        local p, ws = new(make_tree), workers({ 50, 0, 0 })
        local got = {}
        for i = 1, 4 do got[i] = route(p, "t" .. i, ws) end
        assert.same({ "http://w2", "http://w3", "http://w2", "http://w3" }, got)
      end)

      it("never matches a worker that is not available now", function()
        local p, ws = new(make_tree), workers({ 0, 0, 0 })
        local owner = route(p, "prefix held by one worker", ws)
        local rest = {}
        for _, w in ipairs(ws) do if w.url ~= owner then rest[#rest + 1] = w end end
        local w, req = route(p, "prefix held by one worker", rest)
        assert.not_equal(owner, w)
        assert.equal("miss", req.decision)
      end)

      it("forgets a removed worker", function()
        local p, rt = new(make_tree)
        local ws = workers({ 0, 0 })
        local owner = route(p, "remember me please", ws)
        assert.is_true(rt.tree:size(owner) > 0)
        p:on_remove({ url = owner })
        assert.equal(0, rt.tree:size(owner))
        local _, req = route(p, "remember me please", ws)
        assert.equal("miss", req.decision)
      end)

      it("treats a missing text as empty", function()
        local p, ws = new(make_tree), workers({ 0, 0 })
        local w, req = route(p, nil, ws)
        assert.is_string(w)
        assert.equal("miss", req.decision)
        assert.equal(0, req.match_ratio)
      end)

      it("evicts on its timer down to max_tree_size, oldest first", function()
        local p, rt = new(make_tree, { eviction_interval = 2, max_tree_size = 30 })
        assert.equal(1, #rt.timers)
        assert.equal(2000, rt.timers[1].ms)
        local ws = workers({ 0 })
        route(p, "first long prompt text", ws)             -- 22 chars
        route(p, "second long prompt text", ws)            -- 23 chars
        assert.equal(45, rt.tree:size("http://w1"))
        rt.timers[1].fn(0)
        assert.equal(23, rt.tree:size("http://w1"))
        assert.equal(22, p:stats().evicted_chars)
        local _, req = route(p, "second long prompt text", ws)
        assert.equal("hit", req.decision)
        _, req = route(p, "first long prompt text", ws)
        assert.equal("miss", req.decision)
      end)

      it("evicts a large excess in one pass, keeping the most recent prompts", function()
        local p, rt = new(make_tree, { eviction_interval = 1, max_tree_size = 300 })
        local ws = workers({ 0 })
        -- prompts that share no prefix, so routing one refreshes no other
        -- (a shared prefix would give many prompts the same last use, and
        -- leave which of them an eviction keeps to chance)
        local function prompt(i) return string.char(64 + i) .. " prompt " .. string.rep("x", 100) end
        for i = 1, 40 do route(p, prompt(i), ws) end
        assert.is_true(rt.tree:size("http://w1") > 4000)
        rt.timers[1].fn(0)
        assert.is_true(rt.tree:size("http://w1") <= 300)
        local _, req = route(p, prompt(40), ws)
        assert.equal("hit", req.decision)
        _, req = route(p, prompt(1), ws)
        assert.equal("miss", req.decision)
      end)

      it("schedules no eviction when the interval is 0", function()
        local _, rt = new(make_tree, { eviction_interval = 0 })
        assert.equal(0, #rt.timers)
      end)

      it("reports its decisions in stats()", function()
        local p, ws = new(make_tree), workers({ 0, 0 })
        route(p, "abc", ws)
        route(p, "abc", ws)
        local st = p:stats()
        assert.equal(1, st.hits)
        assert.equal(1, st.misses)
        assert.equal(0, st.balanced)
      end)
    end)
  end

  describe("with the native tree", function()
    it("keeps a multi-turn conversation on one worker", function()
      local p, ws = new(real_radix), workers({ 0, 0, 0, 0 })
      local convo = "system: " .. string.rep("be brief and helpful. ", 5)
      local owner = route(p, convo, ws)
      for turn = 1, 10 do
        convo = convo .. " user: question " .. turn .. " assistant: answer " .. turn
        local w, req = route(p, convo, ws)
        assert.equal(owner, w)
        assert.equal("hit", req.decision)
      end
    end)

    it("spreads distinct prompts evenly over idle workers", function()
      local p, ws = new(real_radix), workers({ 0, 0, 0, 0 })
      local count = {}
      for i = 1, 400 do
        local w = route(p, ("prompt %04d "):format(i) .. string.rep("x", 20), ws)
        count[w] = (count[w] or 0) + 1
      end
      for i = 1, 4 do
        local c = count["http://w" .. i]
        assert.is_true(c >= 90 and c <= 110, "worker " .. i .. " got " .. tostring(c))
      end
    end)

    it("counts matches in bytes without cutting a character", function()
      local p, ws = new(real_radix, { cache_threshold = 0.1 }), workers({ 0, 0 })
      route(p, "h\195\169llo", ws)                          -- héllo
      local _, req = route(p, "h\195\168llo", ws)           -- hèllo: 1 of 6 bytes
      assert.near(1 / 6, req.match_ratio, 1e-9)
    end)
  end)
end)

-- Cache-aware routing (the default policy; DESIGN.md section 5).
--
-- An approximate prefix tree over the routing text records which worker was
-- sent which prefixes, so a request goes where its prompt is most likely
-- still in the KV cache. Per request:
--
--   1. balance: when the loads are skewed (max - min > balance_abs_threshold
--      and max > balance_rel_threshold * min), the least loaded worker takes
--      it, cache or not;
--   2. otherwise match the text: if more than cache_threshold of it is held
--      by one worker, that worker ("hit"); else the worker with the smallest
--      tree, i.e. the most free cache ("miss");
--   3. the text is recorded under the chosen worker.
--
-- With cache_routing_prob below 1 (the early SGLang router's knob), a
-- request skips steps 1-2 with probability 1 - cache_routing_prob and goes
-- to the shortest queue (least in-flight requests) instead; its text is
-- still recorded under that worker, which now holds it.
--
-- Ties (equal loads, equal tree sizes) are broken by a rotating cursor so
-- that idle workers share the work instead of the first one taking all of
-- it. Every eviction_interval seconds each worker's tree is cut back to
-- max_tree_size characters, least recently used leaves first; and between
-- those, once the tree gained more characters than max_tree_size (at least
-- 64 Ki) since the last cut, so a burst of new prompts cannot grow the
-- tree (and the router's memory) with the request rate until the next
-- interval: a worker's tree stays under about twice max_tree_size.
--
-- select states its reason in its return values (no table per request):
--   worker, reason, matched, total
-- reason "cache_hit" | "cache_miss" | "imbalance" | "shortest_queue";
-- matched: characters of the text the chosen worker holds as far as the
-- tree knows (nil when the tree was not consulted: imbalance, shortest
-- queue); total: characters of the routing text. Nothing is written on
-- the request: a shadow instance sees the same request as the live one.
-- Where the runtime offers metrics (rt.metrics), decisions are counted in
-- the SGLang router's cache metrics (hits, misses, load-balancing events,
-- min/max load) and in sglr's own (matched share, characters expected to
-- hit).

local setmetatable, type = setmetatable, type

local P = {
  name = "cache_aware",
  version = "1.0.0",
  -- select reads the routing text: the runtime decodes it in the pass that
  -- checks the body, instead of a second pass, and keeps it for the tree
  -- (req.text_source)
  wants_text = true,
  -- keeps no reference to req after select returns (the tree copies the
  -- text): the router may reuse the request's table for a later request
  transient_req = true,
  description = "Send requests sharing a prompt prefix to the worker that has it cached; "
             .. "fall back to the emptiest worker, and to the least loaded one under skew.",
}

P.options = {
  cache_threshold = {
    type = "number", default = 0.5, min = 0, max = 1,
    description = "Fraction of the text a worker must already hold for a cache hit "
               .. "(strictly more than this).",
  },
  balance_abs_threshold = {
    type = "number", default = 32, min = 0,
    description = "Loads are skewed when max - min exceeds this (and the relative threshold).",
  },
  balance_rel_threshold = {
    type = "number", default = 1.0001, min = 0,
    description = "Loads are skewed when max exceeds min times this (and the absolute threshold).",
  },
  eviction_interval = {
    type = "number", default = 60, min = 0,
    description = "Seconds between evictions of least recently used prefixes (0: never).",
  },
  max_tree_size = {
    type = "number", default = 16777216, min = 0,
    description = "Characters of routing text kept per worker after an eviction (a worker's tree is also "
               .. "cut back between intervals once this many characters were inserted).",
  },
  cache_routing_prob = {
    type = "number", default = 1.0, min = 0, max = 1,
    description = "Probability that a request is routed by cache (else: to the shortest queue).",
  },
}

local mt = { __index = P }

-- The least insertion between two cuts (a tiny max_tree_size would
-- otherwise cut on every request).
local EAGER_MIN = 65536

-- the reason each decision reports
local REASON = { hit = "cache_hit", miss = "cache_miss", balance = "imbalance", queue = "shortest_queue" }

local RATIO = { 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1 }

-- the accumulator's series (P.new), a bit each: the decision's counter,
-- then the ratio, the characters hit and missed, the loads
local ACC_BITS = { hit = 1, miss = 2, balance = 4, queue = 0 }
local ACC_MATCHED = 8 + 16 + 32 + 64 + 128    -- a decision that consulted the tree
local ACC_LOADS = 64 + 128

-- The decision metrics, registered once per registry (registering the same
-- metric again returns it, so every instance shares them).
local function decision_metrics(m)
  local c = function(name, help, labels) return m.counter("sgl_router_" .. name, help, labels or {}) end
  local g = function(name, help) return m.gauge("sgl_router_" .. name, help, {}) end
  local prefix = c("cache_prefix_chars_total",
    "Routing-text characters expected to hit (matched) or miss the worker's cache.", { "result" })
  return {
    hit = c("cache_hits_total", "cache_aware decisions that followed a prefix match."):series(),
    miss = c("cache_misses_total", "cache_aware decisions without a usable prefix match."):series(),
    balance = c("load_balancing_events_total", "cache_aware decisions that fell back to least load."):series(),
    max_load = g("max_load", "Highest in-flight count among workers at the last decision."):series(),
    min_load = g("min_load", "Lowest in-flight count among workers at the last decision."):series(),
    ratio = m.histogram("sgl_router_cache_match_ratio",
      "Matched prefix share of the routing text per cache_aware decision.", {}, RATIO):series(),
    chars_hit = prefix:series("hit"),
    chars_miss = prefix:series("miss"),
  }
end
P.decision_metrics = decision_metrics

local function opt(conf, key)
  local v = conf and conf[key]
  if v == nil then v = P.options[key].default end
  return v
end

function P.new(conf, rt)
  local self = setmetatable({
    rt = rt,
    tree = rt.radix(),
    cache_threshold = opt(conf, "cache_threshold"),
    balance_abs = opt(conf, "balance_abs_threshold"),
    balance_rel = opt(conf, "balance_rel_threshold"),
    eviction_interval = opt(conf, "eviction_interval"),
    max_tree_size = opt(conf, "max_tree_size"),
    cache_routing_prob = opt(conf, "cache_routing_prob"),
    cursor = 0,               -- rotates among tied candidates
    cand = {},                -- scratch list of tied candidates, reused
    counts = { hit = 0, miss = 0, balance = 0, queue = 0 },
    urls = {},                -- workers that have entries in the tree
    evicted = 0,
    inserted = 0,             -- characters inserted since the last cut
    early_cuts = 0,           -- cuts between intervals (the insertion bound)
    m = rt.metrics and decision_metrics(rt.metrics) or false,
    apply = rt.metrics and rt.metrics.apply or false,   -- several series in one call
    acc = false,
  }, mt)
  -- where the runtime has accumulators, the decision's eight updates wait
  -- in one small block until /metrics is read, instead of touching eight
  -- series (a dozen cache lines) a request (ACC_BITS)
  -- (one that cannot be made, out of memory say, leaves apply's way)
  local mx = rt.metrics
  if self.m and mx.accumulator and mx.acc_add then
    local m = self.m
    local ok, acc = pcall(mx.accumulator, m.hit, m.miss, m.balance, m.ratio, m.chars_hit,
      m.chars_miss, m.max_load, m.min_load)
    if ok then self.acc, self.acc_add = acc, mx.acc_add end
  end
  -- characters inserted that make a cut before the interval (false: never,
  -- as with an interval of 0)
  self.eager = self.eviction_interval > 0 and math.max(self.max_tree_size, EAGER_MIN) or false
  if self.eviction_interval > 0 and rt.every then
    rt.every(self.eviction_interval * 1000, function() self:evict() end)
  end
  return self
end

-- A reload's new instance takes the old one's tree (policy hot reload,
-- sglr.slot): the prefixes routed before it keep their workers, so a
-- reload costs no cache affinity.
function P:migrate(old)
  if type(old) ~= "table" or type(old.tree) ~= "userdata" and type(old.tree) ~= "table" then return end
  self.tree = old.tree
  for url in pairs(old.urls or {}) do self.urls[url] = true end
  self.evicted = old.evicted or 0
end

-- Drop least recently used prefixes until every worker is within budget.
-- One native call: its cost is one walk over the tree plus the entries
-- removed (about 70 ms for 330k nodes holding 73M characters), so cutting
-- it into slices would only repeat the walk.
function P:evict(early)
  local t0 = self.rt.now()
  local removed = self.tree:evict(self.max_tree_size)
  self.evicted = self.evicted + removed
  self.inserted = 0
  if early then
    self.early_cuts = self.early_cuts + 1
    return removed
  end
  if removed > 0 and self.rt.log then
    self.rt.log("info", "cache_aware: evicted " .. removed .. " chars",
      { ms = math.floor((self.rt.now() - t0) * 10 + 0.5) / 10 })
  end
  return removed
end

-- The next of n tied candidates (in self.cand), rotating.
local function rotate(self, n)
  self.cursor = self.cursor + 1
  return self.cand[(self.cursor - 1) % n + 1]
end

-- Least loaded worker; ties rotate.
local function least_loaded(self, workers, min_load)
  local cand, n = self.cand, 0
  if #workers == 1 then
    -- one worker: no loop of one trip (LuaJIT cannot close a trace on
    -- one, and its attempts could leave select interpreted)
    cand[1] = workers[1]
    return rotate(self, 1)
  end
  for i = 1, #workers do
    local w = workers[i]
    if (w.load or 0) == min_load then
      n = n + 1
      cand[n] = w
    end
  end
  return rotate(self, n)
end

-- Worker with the smallest tree (most free cache); among equal sizes the
-- lower load, then rotate.
local function emptiest(self, workers)
  local tree, cand = self.tree, self.cand
  if #workers == 1 then
    cand[1] = workers[1]    -- (as in least_loaded)
    return rotate(self, 1)
  end
  local n, best_size, best_load = 0, nil, nil
  for i = 1, #workers do
    local w = workers[i]
    local size, load = tree:size(w.url), w.load or 0
    if best_size == nil or size < best_size or (size == best_size and load < best_load) then
      best_size, best_load, n = size, load, 1
      cand[1] = w
    elseif size == best_size and load == best_load then
      n = n + 1
      cand[n] = w
    end
  end
  return rotate(self, n)
end

local function by_url(workers, url)
  for i = 1, #workers do
    if workers[i].url == url then return workers[i] end
  end
end

function P:select(req, workers)
  local n = #workers
  if n == 0 then return nil, "no workers" end

  local min_load, max_load = math.huge, -math.huge
  if n == 1 then
    min_load = workers[1].load or 0    -- (as in least_loaded)
    max_load = min_load
  else
    for i = 1, n do
      local l = workers[i].load or 0
      if l < min_load then min_load = l end
      if l > max_load then max_load = l end
    end
  end

  -- the routing text as the tree takes it: where the router kept it
  -- (text_source, text_len: no Lua string is made), else req.text
  local text, len = req.text_source, req.text_len
  if not text then
    text = req.text or ""
    len = #text
  end
  local chosen, decision, ratio, held
  local prob = self.cache_routing_prob
  if prob < 1 and (prob <= 0 or self.rt.random() >= prob) then
    chosen, decision = least_loaded(self, workers, min_load), "queue"
  elseif max_load - min_load > self.balance_abs and max_load > self.balance_rel * min_load then
    chosen, decision = least_loaded(self, workers, min_load), "balance"
  else
    local matched, url = 0, nil
    if len > 0 then matched, url = self.tree:match(text, workers) end
    ratio = len > 0 and matched / len or 0
    if ratio > self.cache_threshold and url then
      chosen, decision = by_url(workers, url), "hit"
    end
    if not chosen then
      chosen, decision = emptiest(self, workers), "miss"
    end
    held = chosen.url == url and matched or 0
  end

  if len > 0 then
    self.tree:insert(text, chosen.url)
    self.urls[chosen.url] = true
    local eager = self.eager
    if eager then
      -- what the tree gained: the text less what the chosen worker held of
      -- it (all of it when the tree was not asked), so that hits on
      -- prompts already held never bring a cut
      local ins = self.inserted + len - (held or 0)
      self.inserted = ins
      if ins >= eager then self:evict(true) end
    end
  end
  self.counts[decision] = self.counts[decision] + 1
  local m = self.m
  local acc = self.acc
  if acc then
    if ratio then
      local hit = decision == "hit" and held or 0
      self.acc_add(acc, ACC_BITS[decision] + ACC_MATCHED, 1, 1, 1, ratio, hit, len - hit,
        max_load, min_load)
    else
      self.acc_add(acc, ACC_BITS[decision] + ACC_LOADS, 1, 1, 1, 0, 0, 0, max_load, min_load)
    end
  elseif m then
    -- in one call where the runtime has it (each C call ends a JIT trace)
    local apply = self.apply
    if ratio then
      local hit = decision == "hit" and held or 0
      if apply then
        apply(m[decision], 1, m.ratio, ratio, m.chars_hit, hit, m.chars_miss, len - hit,
          m.max_load, max_load, m.min_load, min_load)
      else
        m[decision]:inc()
        m.ratio:observe(ratio)
        m.chars_hit:inc(hit)
        m.chars_miss:inc(len - hit)
        m.max_load:set(max_load)
        m.min_load:set(min_load)
      end
    else
      if m[decision] then m[decision]:inc() end
      m.max_load:set(max_load)
      m.min_load:set(min_load)
    end
  end
  return chosen, REASON[decision], held, len
end

function P:on_remove(w)
  local url = type(w) == "table" and w.url or w
  self.urls[url] = nil
  self.tree:remove_worker(url)
end

-- Characters of routing text recorded for a worker (the tree_size metric).
function P:tree_size(url)
  return self.tree:size(url)
end

function P:stats()
  local st = self.tree:stats()
  return {
    hits = self.counts.hit, misses = self.counts.miss, balanced = self.counts.balance,
    shortest_queue = self.counts.queue,
    tree_nodes = st.nodes, tree_chars = st.chars, evicted_chars = self.evicted,
    early_cuts = self.early_cuts,
  }
end

return P

-- sglr sim: run a workload through routing policies against simulated
-- workers on a virtual clock, and compare the policies side by side.
--
-- Nothing here opens a socket or sleeps. Time is a number that jumps from
-- one event to the next (a binary heap of events: arrivals, request ends,
-- timers), so a run of hours of traffic takes seconds and the same seed
-- gives the same numbers. The policy is the file `sglr run` loads, built
-- through policy.instantiate with its option schema; it gets a runtime
-- (rt) with the router's fields, driven by the virtual clock:
--
--   rt.now()         virtual milliseconds
--   rt.random([n])   seeded: the same run draws the same numbers
--   rt.radix()       the native tree, as in production
--   rt.every(ms, fn) a virtual timer; fn runs in a coroutine, where
--                    rt.sleep(ms) waits on the virtual clock
--   rt.http(opts)    answers GET <worker>/get_load from the simulated
--                    worker (what power_of_two polls); anything else
--                    fails with a message: there is no network
--   rt.log, rt.stats as in the router; rt.metrics is nil (no registry)
--
-- The workers are the model of `sglr sim-worker` (sglr.simmodel: KV cache
-- with LRU, prefill and decode time, continuous batching, dp ranks), and
-- the workloads and arrivals those of `sglr bench` (closed loop with a
-- concurrency, Poisson at a rate) or a trace replayed at its timestamps.
-- A PD fleet has a prefill and a decode pool, each with its own instance
-- of the policy: a request is prefilled in one batch, then decoded in the
-- other.
local cjson = require "cjson.safe"
local bench = require "sglr.bench"
local simmodel = require "sglr.simmodel"
local policy_mod = require "sglr.policy"

local ok_extract, extract = pcall(require, "sglr.extract")

local floor, max, min = math.floor, math.max, math.min
local fmt, concat = string.format, table.concat
local co_create, co_resume, co_yield, co_running = coroutine.create, coroutine.resume,
  coroutine.yield, coroutine.running

local M = {}

-- Routing text kept per request, as the router's flow keeps it.
local MAX_TEXT = 1024 * 1024

-- --- the event heap ---------------------------------------------------------------
-- Events are { time, seq, fn, a, b }; seq breaks ties in insertion order,
-- which makes a run deterministic.

local function less(x, y)
  return x[1] < y[1] or (x[1] == y[1] and x[2] < y[2])
end

local function heap_push(h, ev)
  local n = h.n + 1
  h.n = n
  local i = n
  while i > 1 do
    local p = floor(i / 2)
    local pe = h[p]
    if not less(ev, pe) then break end
    h[i] = pe
    i = p
  end
  h[i] = ev
end

local function heap_pop(h)
  local n = h.n
  if n == 0 then return nil end
  local top = h[1]
  local last = h[n]
  h[n] = nil
  n = n - 1
  h.n = n
  if n > 0 then
    local i = 1
    while true do
      local l = i * 2
      if l > n then break end
      local r = l + 1
      local c = (r <= n and less(h[r], h[l])) and r or l
      if not less(h[c], last) then break end
      h[i] = h[c]
      i = c
    end
    h[i] = last
  end
  return top
end

-- --- one simulation -----------------------------------------------------------------

local Sim = {}
Sim.__index = Sim

function Sim:at(t, fn, a, b)
  self.seq = self.seq + 1
  heap_push(self.heap, { t, self.seq, fn, a, b })
end

-- Resume a timer coroutine; it ends, or waits again in rt.sleep.
function Sim:resume(co, ...)
  local ok, err = co_resume(co, ...)
  if not ok then self:log("error", "policy timer failed: " .. tostring(err)) end
  if coroutine.status(co) == "dead" then self.coroutines[co] = nil end
end

-- Run fn(...) as a coroutine on the virtual clock (rt.every callbacks).
function Sim:spawn(fn, ...)
  local c = co_create(fn)
  self.coroutines[c] = true
  self:resume(c, ...)
end

function Sim:log(level, msg, fields)
  if level == "error" or level == "warn" or level == "warning" then
    self.warnings = self.warnings + 1
    if self.warnings <= 5 and not self.o.quiet then
      io.stderr:write(fmt("sglr sim [%.0f ms] %s: %s%s\n", self.now, level, tostring(msg),
        fields and (" " .. tostring(cjson.encode(fields))) or ""))
    end
  end
end

-- The runtime a policy gets (the router's fields, on the virtual clock).
function Sim:runtime()
  local sim = self
  local rng = bench.rng(self.o.seed + 104729)   -- a stream apart from prompts and arrivals
  local radix = require "sglr.radix_ffi"
  local rt = {
    now = function() return sim.now end,
    random = function(n)
      if n then return rng:int(1, n) end
      return rng:float()
    end,
    log = function(level, msg, fields) sim:log(level, msg, fields) end,
    metrics = nil,
    stats = require "sglr.stats",
  }
  rt.radix = function() return radix.new() end
  rt.sleep = function(ms)
    local co, main = co_running()
    if not co or main or not sim.coroutines[co] then
      error("rt.sleep: only inside rt.every callbacks (sglr sim runs them on its virtual clock)", 2)
    end
    sim:at(sim.now + max(0, tonumber(ms) or 0), sim.resume, co)
    co_yield()
  end
  rt.every = function(ms, fn)
    ms = tonumber(ms)
    if not ms or ms <= 0 then error("rt.every: interval must be a positive number of ms", 2) end
    local timer = { active = true }
    function timer.stop() timer.active = false end
    timer.close = timer.stop
    local function tick()
      if not timer.active then return end
      -- timers do not keep a finished run going (the router's are unref'd)
      if sim.done then return end
      sim:spawn(fn, sim.now)
      sim:at(sim.now + ms, tick)
    end
    sim:at(sim.now + ms, tick)
    return timer
  end
  rt.http = function(opts)
    local url = type(opts) == "table" and opts.url or ""
    local base, path = url:match("^(https?://[^/]+)(/.*)$")
    local server = base and sim.servers[base]
    if server and path == "/get_load" and (opts.method or "GET") == "GET" then
      return 200, cjson.encode(server:load_json())
    end
    return nil, "rt.http: sglr sim has no network (it answers only GET <worker>/get_load), asked for "
      .. tostring(url)
  end
  return rt
end

-- --- simulated servers --------------------------------------------------------------

local Server = {}
Server.__index = Server

function Server:load_json()
  if #self.ranks == 1 then return { load = self.ranks[1].inflight } end
  local list = {}
  for r, rk in ipairs(self.ranks) do
    list[r] = { dp_rank = r - 1, load = rk.inflight, num_reqs = rk.inflight, num_waiting_reqs = 0 }
  end
  return list
end

function Sim:build_fleet()
  local o = self.o
  self.model = simmodel.new(o)
  self.servers, self.workers = {}, {}
  if self.pd then
    self.avail = self:add_servers("prefill", o.prefill, "http://prefill-%d")
    self.davail = self:add_servers("decode", o.decode, "http://decode-%d")
  else
    self.avail = self:add_servers("regular", o.workers, "http://sim-%d")
  end
end

-- n servers of a role -> the workers a policy picks from (one per rank
-- with --dp-aware)
function Sim:add_servers(role, n, pattern)
  local o, model = self.o, self.model
  local list = {}
  for i = 1, n do
    local base = fmt(pattern, i)
    local s = setmetatable({ base = base, ranks = {}, next_rank = 0 }, Server)
    for r = 1, o.dp_size do s.ranks[r] = model:rank() end
    self.servers[base] = s
    local ranks = (o.dp_aware and o.dp_size > 1) and o.dp_size or 1
    for r = 1, ranks do
      local aware = ranks > 1
      local w = {
        url = aware and fmt("%s@%d", base, r - 1) or base, base_url = base, server = s,
        load = 0, processed = 0, healthy = true, role = role,
        dp_rank = aware and (r - 1) or nil,
        -- accounting for the summary
        requests = 0, load_area = 0, load_since = 0, load_max = 0,
      }
      self.workers[#self.workers + 1] = w
      list[#list + 1] = w
    end
  end
  return list
end

local take

local function set_load(sim, w, delta)
  local now = sim.now
  w.load_area = w.load_area + w.load * (now - w.load_since)
  w.load_since = now
  w.load = w.load + delta
  if w.load > w.load_max then w.load_max = w.load end
end

-- --- requests -----------------------------------------------------------------------

-- req.text and req.body are computed when a policy reads them, as in the
-- router (where they come from the native extractor).
local req_mt = {
  __index = function(t, k)
    if k == "body" then
      local b = cjson.encode(t._body)
      rawset(t, "body", b)
      return b
    elseif k == "text" then
      local s
      if t.route == "generate" and type(t._body.text) == "string" then
        s = t._body.text
      elseif ok_extract then
        s = extract.route_text(t.route, t.body, MAX_TEXT) or ""
      else
        s = simmodel.prompt_text(t.route, t._body)
      end
      if #s > MAX_TEXT then s = s:sub(1, MAX_TEXT) end
      rawset(t, "text", s)
      return s
    end
  end,
}

-- One turn of a session goes to a worker.
function Sim:dispatch(item)
  local session, i, history = item[1], item[2], item[3]
  local spec = session[i]
  local o = self.o
  local route = spec.route or o.route
  local body = bench.body(route, spec, history, o)
  self.nreq = self.nreq + 1
  local req = setmetatable({ route = route, id = "sim-" .. self.nreq, t0 = self.now, retries = 0,
    stream = o.stream or false, model = body.model or false, worker = false, error = false,
    policy = self.policy, dpolicy = false, decision = false, match_ratio = false, prefill = false,
    headers = spec.headers or (session.user and { ["x-session-id"] = "user-" .. session.user } or {}),
    _body = body }, req_mt)
  local w, why = self.policy:select(req, self.avail)
  if not w then
    return self:finish_failed(why or "policy selected no worker")
  end
  local dw
  if self.pd then
    req.dpolicy = self.dpolicy
    dw, why = self.dpolicy:select(req, self.davail)
    if not dw then
      return self:finish_failed(why or "decode policy selected no worker")
    end
    req.prefill = w.url
  end
  req.worker = (dw or w).url
  local job = { item = item, req = req, w = w, dw = dw, body = body, route = route,
    ntok = self.model:output_tokens(spec.output_tokens), phase = dw and "prefill" or "full" }
  -- loads are held by both legs until the answer ends, as in the router
  job.rank = take(self, w)
  if dw then job.drank = take(self, dw) end
  if self.model:admit(job.rank, job) then self:begin(job) end
end

-- The rank of w's server that serves a request (its own with --dp-aware,
-- else the next in turn), with the load counted.
function take(sim, w)
  set_load(sim, w, 1)
  w.processed = w.processed + 1
  w.requests = w.requests + 1
  local s = w.server
  local rank
  if w.dp_rank then
    rank = s.ranks[w.dp_rank + 1]
  else
    rank = s.ranks[s.next_rank + 1]
    s.next_rank = (s.next_rank + 1) % #s.ranks
  end
  rank.requests = rank.requests + 1
  rank.inflight = rank.inflight + 1
  return rank
end

-- A job gets its place in a batch. "full": cache, prefill, decode on one
-- worker; PD: "prefill" (cache and prefill on the prefill worker), then
-- "decode" on the decode worker (the KV cache arrives with the request).
function Sim:begin(job)
  local model, now = self.model, self.now
  if job.phase == "decode" then
    local step = model:step_ms(job.drank.running)
    job.first = now + (job.ntok > 0 and step or 0)
    return self:at(now + job.ntok * step, self.complete, job)
  end
  local text = simmodel.prompt_text(job.route, job.body)
  local ptoks, cached = model:touch_cache(text, job.rank)
  local prefill = model:prefill_ms(ptoks, cached)
  job.ptoks, job.cached = ptoks, cached
  if job.phase == "prefill" then
    return self:at(now + prefill, self.prefilled, job)
  end
  local step = model:step_ms(job.rank.running)
  job.first = now + prefill + (job.ntok > 0 and step or 0)
  self:at(now + prefill + job.ntok * step, self.complete, job)
end

-- PD: the prefill is done; the prefill worker's slot frees and the
-- request joins the decode worker's batch.
function Sim:prefilled(job)
  local nxt = self.model:release(job.rank)
  if nxt then self:begin(nxt) end
  job.phase = "decode"
  if self.model:admit(job.drank, job) then self:begin(job) end
end

function Sim:complete(job)
  local model, now = self.model, self.now
  local rank = job.drank or job.rank
  local nxt = model:release(rank)
  if nxt then self:begin(nxt) end
  job.rank.inflight = job.rank.inflight - 1
  local w, req = job.w, job.req
  set_load(self, w, -1)
  local latency = now - req.t0
  local p = self.policy
  if p.on_done then p:on_done(req, w, 200, latency) end
  if job.dw then
    job.drank.inflight = job.drank.inflight - 1
    set_load(self, job.dw, -1)
    if self.dpolicy.on_done then self.dpolicy:on_done(req, job.dw, 200, latency) end
  end
  local ttft = self.o.stream and (job.first - req.t0) or latency
  self.nres = self.nres + 1
  self.results[self.nres] = { ok = true, latency_ms = latency, ttft_ms = ttft,
    prompt_tokens = job.ptoks, cached_tokens = job.cached, output_tokens = job.ntok,
    t = now, worker = req.worker, route = job.route }
  self.prefill_tokens = self.prefill_tokens + (job.ptoks - job.cached)
  self.last_done = now
  -- the next turn of a conversation carries this answer
  local item = job.item
  local session, i, history = item[1], item[2], item[3]
  if session[i + 1] then
    local h = {}
    for k = 1, #history do h[k] = history[k] end
    h[#h + 1] = { session[i].question or "", simmodel.output_text(job.ntok) }
    self:ready_push({ session, i + 1, h })
  end
  self.inflight = self.inflight - 1
  self:pump()
end

-- The policy picked no worker: the request fails (a 503 in the router).
function Sim:finish_failed(why)
  self.nres = self.nres + 1
  self.results[self.nres] = { ok = false, err = tostring(why), latency_ms = 0, t = self.now }
  self.inflight = self.inflight - 1
end

-- --- arrivals ----------------------------------------------------------------------
-- As `sglr bench` sends them: ready requests in FIFO order, at most
-- `concurrency` in flight, each dispatch first waiting for the next
-- Poisson arrival when there is a rate. A trace with timestamps is
-- replayed at them instead (and --concurrency, when given, caps it).

function Sim:ready_push(item)
  self.tail = self.tail + 1
  self.ready[self.tail] = item
end

function Sim:pump()
  if self.pumping then self.need_pump = true; return end
  self.pumping = true
  repeat
    self.need_pump = false
    self:pump_once()
  until not self.need_pump
  self.pumping = false
end

function Sim:pump_once()
  local o = self.o
  while self.dispatched < self.total do
    if self.gate == nil then
      if self.timed then
        local item = self.ready[self.head]
        if not item then return end
        local at = item[1][item[2]].at
        self.gate = at and (self.t_start + at) or self.now
      elseif o.rate then
        self.gate = self.last_gate + self.arrivals:exp(o.rate) * 1000
      else
        self.gate = self.now
      end
    end
    if self.gate > self.now then
      if not self.gate_armed then
        self.gate_armed = true
        self:at(self.gate, function(sim) sim.gate_armed = false; sim:pump() end)
      end
      return
    end
    if self.inflight >= self.cap or self.head > self.tail then return end
    local item = self.ready[self.head]
    self.ready[self.head] = nil
    self.head = self.head + 1
    self.dispatched = self.dispatched + 1
    self.inflight = self.inflight + 1
    if self.inflight > self.max_inflight then self.max_inflight = self.inflight end
    self.last_gate, self.gate = self.gate, nil
    self:dispatch(item)
  end
end

-- --- running --------------------------------------------------------------------------

-- Run one policy over the workload. -> summary | nil, err
function M.run_policy(o, wl, P, policy_opts)
  local sim = setmetatable({ o = o, now = 0, seq = 0, heap = { n = 0 }, coroutines = {},
    warnings = 0, results = {}, nres = 0, nreq = 0, prefill_tokens = 0,
    ready = {}, head = 1, tail = 0, dispatched = 0, inflight = 0, max_inflight = 0,
    total = wl.total, timed = wl.timed and not o.rate,
    arrivals = bench.rng(o.seed + 7919), t_start = 0, last_gate = 0, last_done = 0 }, Sim)
  -- a closed loop needs a concurrency; timed arrivals are capped only when asked
  sim.cap = o.concurrency or (sim.timed and math.huge) or bench.DEFAULT_CONCURRENCY
  sim.pd = (o.prefill or 0) > 0
  sim:build_fleet()
  -- the scoped runtime sglr run gives each instance: closing it stops the
  -- instance's timers, as a reload does
  -- (one instance per pool in PD mode, as sglr run builds them)
  local function pool_instance(workers)
    local rt, scope = policy_mod.scope(sim:runtime())
    local inst, err = policy_mod.instantiate(P, policy_opts, rt)
    if not inst then return nil, err end
    for _, w in ipairs(workers) do
      if inst.on_add then inst:on_add(w) end
    end
    return inst, scope
  end
  local inst, scope = pool_instance(sim.avail)
  if not inst then return nil, scope end
  sim.policy = inst
  if sim.pd then
    local dinst, dscope = pool_instance(sim.davail)
    if not dinst then return nil, dscope end
    sim.dpolicy, sim.dscope = dinst, dscope
  end
  for _, s in ipairs(wl.sessions) do sim:ready_push({ s, 1, {} }) end
  sim:pump()
  local heap = sim.heap
  while sim.nres < sim.total do
    local ev = heap_pop(heap)
    if not ev then break end      -- nothing left to happen (conversations ended)
    sim.now = ev[1]
    ev[3](sim, ev[4], ev[5])
  end
  sim.done = true
  policy_mod.close(inst, scope)
  if sim.dpolicy then policy_mod.close(sim.dpolicy, sim.dscope) end
  return sim:summary()
end

function Sim:summary()
  local o = self.o
  local duration = self.last_done / 1000
  local s = bench.summarize(self.results, duration, o)
  s.url = nil
  s.max_inflight = self.max_inflight
  s.prefill_tokens = self.prefill_tokens
  s.workers = #self.workers
  local share, loads = {}, {}
  local n = max(1, s.requests)
  local hi, lo = 0, math.huge
  local skew = 0
  -- shares add up to 1 per pool (prefill, decode) in PD mode; skew is
  -- the busiest worker's share over a fair share of its pool (1 = even)
  for _, pool in ipairs({ self.avail, self.davail or {} }) do
    local top = 0
    for _, w in ipairs(pool) do
      set_load(self, w, 0)
      share[w.url] = w.requests / n
      hi, lo, top = max(hi, w.requests), min(lo, w.requests), max(top, w.requests)
      loads[w.url] = { mean = self.now > 0 and w.load_area / self.now or 0, max = w.load_max }
    end
    if #pool > 0 then skew = max(skew, top / (n / #pool)) end
  end
  s.worker_share = share
  s.worker_load = loads
  s.skew = skew
  s.min_worker_requests, s.max_worker_requests = lo == math.huge and 0 or lo, hi
  local routes = {}
  for i = 1, self.nres do
    local r = self.results[i].route
    if r then routes[r] = (routes[r] or 0) + 1 end
  end
  s.routes = routes
  s.policy_warnings = self.warnings
  s.timeline = self.results
  return s
end

-- --- options and output ---------------------------------------------------------------

-- The worker model's defaults here (see parser); sglr sim-worker's are
-- zero times, for tests.
local SIM_MODEL_DEFAULTS = {
  ["--prefill-us-per-token"] = "50", ["--decode-ms-per-token"] = "10",
  ["--decode-batch-ms"] = "0.05", ["--max-running-requests"] = "64",
}

local function parser()
  local argparse = require "argparse"
  local p = argparse("sglr sim", "Run a workload through routing policies against simulated "
    .. "workers on a virtual clock and compare them side by side.")
    :add_help(false)
    :epilog([[
The policy is the file `sglr run` loads (a name: policies/NAME.lua, or a path
to a .lua file), with the options --policy-opt gives it (key=value; a key only
reaches the policies that declare it). The workers are the model of
`sglr sim-worker` with the same flags; the workloads are those of `sglr bench`.

Traces (--trace FILE, one JSON object per line), the format is told per line:
  Mooncake: {"timestamp": ms, "input_length": n, "output_length": m,
             "hash_ids": [...]}; 512-token blocks, equal ids give equal text
  sglr run --trace-out captures: {"t": ms, "blocks": [...], ...}
  sglr bench: {"text": "...", "output_tokens": n}
Lines that cannot be read are reported with their line number and skipped.
A trace with timestamps is replayed at them unless --rate is given.

Examples:
  sglr sim --workers 16 --policy round_robin --policy cache_aware
  sglr sim --workers 8 --policy my_policy.lua --policy-opt threshold=0.3 --rate 50
  sglr sim --workers 16 --trace mooncake.jsonl --kv-tokens 200000 --json]])
  p:flag("-h --help", "Show this help message and exit.")
  p:option("--workers", "Number of simulated workers.", "8"):convert(tonumber)
  p:option("--policy", "Routing policy: a name or a path to a .lua file (repeat to compare).")
    :count("*")
  p:option("--policy-opt", "A policy option, key=value (repeatable).")
    :count("*")
  p:flag("--dp-aware", "With --dp-size > 1, route to each rank (as sglr run --dp-aware).")
  p:option("--prefill", "PD: number of prefill workers (with --decode; replaces --workers)."):convert(tonumber)
  p:option("--decode", "PD: number of decode workers."):convert(tonumber)
  bench.add_workload_flags(p)
  -- a GPU-like server by default (sglr sim-worker's defaults answer at
  -- once): 20k prefill tokens/s, 10 ms a decode step, 64 running at once
  simmodel.add_flags(p, SIM_MODEL_DEFAULTS)
  p:option("--plot", "Draw TTFT over time and per-worker load per policy into FILE.svg.")
  p:flag("--json", "Print one JSON object: {\"policies\": {NAME: summary}}.")
  p:flag("--quiet", "No warnings from the policies on stderr.")
  return p
end

-- --policy-opt key=value list -> table | nil, err
local function policy_options(list, policies)
  local t = {}
  for _, kv in ipairs(list or {}) do
    local k, v = kv:match("^([%w_%-]+)=(.*)$")
    if not k then return nil, fmt("--policy-opt must be key=value, got '%s'", kv) end
    t[k:gsub("-", "_")] = v
  end
  for k in pairs(t) do
    local known = false
    for _, P in ipairs(policies) do known = known or (P.options and P.options[k] ~= nil) end
    if not known then
      local names = {}
      for i, P in ipairs(policies) do names[i] = tostring(P.name) end
      return nil, fmt("--policy-opt %s: no policy given declares it (%s)", k, concat(names, ", "))
    end
  end
  return t
end

-- Flags -> opts | nil, err, usage. opts.help asks for the help text.
function M.parse_args(args)
  local p = parser()
  local t, err, usage = bench.parse_flags(p, args)
  if not t or err == "help" then return t, err, usage end
  if t.trace then t.workload = "trace" end
  local concurrency = t.concurrency
  local policies = t.policy
  t.policy = nil
  local o
  o, err = bench.options(t)
  if not o then return nil, err, p:get_usage() end
  local mok, merr = simmodel.check(o)
  if not mok then return nil, merr, p:get_usage() end
  if type(o.workers) ~= "number" or o.workers < 1 or o.workers ~= floor(o.workers) then
    return nil, "--workers must be a positive integer", p:get_usage()
  end
  -- bench defaults the concurrency of a closed loop; a trace keeps its pace
  if o.workload == "trace" and concurrency == nil then o.concurrency = nil end
  if (o.prefill ~= nil) ~= (o.decode ~= nil) then
    return nil, "PD needs both --prefill N and --decode N", p:get_usage()
  end
  for _, k in ipairs({ "prefill", "decode" }) do
    local v = o[k]
    if v ~= nil and (v < 1 or v ~= floor(v)) then
      return nil, "--" .. k .. " must be a positive integer", p:get_usage()
    end
  end
  o.policies = (policies and #policies > 0) and policies or { "cache_aware" }
  return o
end

-- Load the workload: bench's generators, or a trace. -> { sessions, total, timed } | nil, err
function M.workload(o, warn)
  if o.workload ~= "trace" then return bench.workload(o) end
  local trace = require "sglr.trace"
  local wl, err = trace.load(o.trace, { output_tokens = o.output_tokens, warn = warn })
  if not wl then return nil, err end
  if o.num_requests then wl.total = min(wl.total, o.num_requests) end
  return wl
end

local ROWS = {
  { "requests ok", function(s) return tostring(s.ok) end },
  { "errors", function(s) return tostring(s.errors) end },
  { "duration (virtual s)", function(s) return fmt("%.2f", s.duration_s) end },
  { "throughput (req/s)", function(s) return fmt("%.1f", s.throughput_rps) end },
  { "cache hit rate", function(s) return s.cache_hit_rate and fmt("%.1f%%", s.cache_hit_rate) or "-" end },
  { "prefill tokens computed", function(s) return tostring(s.prefill_tokens) end },
  { "TTFT p50 (ms)", function(s) return fmt("%.1f", s.ttft_ms.p50 or 0) end },
  { "TTFT p90 (ms)", function(s) return fmt("%.1f", s.ttft_ms.p90 or 0) end },
  { "TTFT p99 (ms)", function(s) return fmt("%.1f", s.ttft_ms.p99 or 0) end },
  { "TTFT mean (ms)", function(s) return fmt("%.1f", s.ttft_ms.mean or 0) end },
  { "latency p50 (ms)", function(s) return fmt("%.1f", s.latency_ms.p50 or 0) end },
  { "latency p99 (ms)", function(s) return fmt("%.1f", s.latency_ms.p99 or 0) end },
  { "latency mean (ms)", function(s) return fmt("%.1f", s.latency_ms.mean or 0) end },
  { "requests per worker", function(s)
    return fmt("%d..%d", s.min_worker_requests, s.max_worker_requests) end },
  { "skew (max/fair share)", function(s) return fmt("%.2f", s.skew) end },
  { "load mean (busiest)", function(s)
    local hi = 0
    for _, l in pairs(s.worker_load) do hi = max(hi, l.mean) end
    return fmt("%.1f", hi)
  end },
  { "load peak", function(s)
    local hi = 0
    for _, l in pairs(s.worker_load) do hi = max(hi, l.max) end
    return tostring(hi)
  end },
}

-- The side-by-side table of { {name, summary}, ... }.
function M.format(cols, o)
  local lw = 0
  for _, r in ipairs(ROWS) do lw = max(lw, #r[1]) end
  local widths, cells = {}, {}
  for c, col in ipairs(cols) do
    widths[c] = #col[1]
    cells[c] = {}
    for i, r in ipairs(ROWS) do
      local v = r[2](col[2])
      cells[c][i] = v
      widths[c] = max(widths[c], #v)
    end
  end
  local load
  if o.workload == "trace" then
    load = o.rate and fmt("rate %g req/s", o.rate) or "trace timestamps"
  elseif o.rate then
    load = fmt("rate %g req/s", o.rate)
  else
    load = fmt("concurrency %d", o.concurrency)
  end
  local fleet = o.prefill and fmt("%d prefill + %d decode workers", o.prefill, o.decode)
    or fmt("%d workers", o.workers)
  local out = { fmt("sglr sim: %s workload, %d requests, %s%s, %s", o.workload,
    cols[1] and cols[1][2].requests or 0, fleet,
    o.dp_size > 1 and fmt(" x %d dp ranks", o.dp_size) or "", load) }
  local head = { fmt("%-" .. lw .. "s", "") }
  for c, col in ipairs(cols) do head[#head + 1] = fmt("%" .. widths[c] .. "s", col[1]) end
  out[#out + 1] = concat(head, "  ")
  for i, r in ipairs(ROWS) do
    local row = { fmt("%-" .. lw .. "s", r[1]) }
    for c = 1, #cols do row[#row + 1] = fmt("%" .. widths[c] .. "s", cells[c][i]) end
    out[#out + 1] = concat(row, "  ")
  end
  return concat(out, "\n") .. "\n"
end

-- Run every policy of opts over the workload.
-- -> { {name, summary}, ... } | nil, err
function M.run(o, warn)
  local loaded = {}
  for i, name in ipairs(o.policies) do
    local P, err = policy_mod.load(name)
    if not P then return nil, err end
    loaded[i] = P
  end
  local popts, perr = policy_options(o.policy_opt, loaded)
  if not popts then return nil, perr end
  local wl, werr = M.workload(o, warn)
  if not wl then return nil, werr end
  local cols, seen = {}, {}
  for i, P in ipairs(loaded) do
    local name = tostring(P.name or o.policies[i])
    if seen[name] then name = name .. "#" .. i end
    seen[name] = true
    local s, err = M.run_policy(o, wl, P, popts)
    if not s then return nil, err end
    s.policy = o.policies[i]
    cols[#cols + 1] = { name, s }
  end
  return cols
end

function M.main(args)
  local core = require "sglr.core"
  local o, err, usage = M.parse_args(args)
  if not o then
    io.stderr:write(usage or "", "\nerror: ", err, "\n")
    return core.exit(2)
  end
  if o.help then
    io.stdout:write(o.help_text, "\n")
    io.stdout:flush()
    return core.exit(0)
  end
  local function warn(msg) io.stderr:write("sglr sim: ", msg, "\n") end
  local cols, rerr = M.run(o, warn)
  if not cols then
    io.stderr:write("sglr sim: ", rerr, "\n")
    io.stderr:flush()
    return core.exit(2)
  end
  if o.plot then
    local okp, perr = require("sglr.simplot").write(o.plot, cols)
    if not okp then
      io.stderr:write("sglr sim: --plot: ", tostring(perr), "\n")
      return core.exit(1)
    end
  end
  for _, col in ipairs(cols) do col[2].timeline = nil end
  if o.json then
    local obj = { policies = {} }
    for _, col in ipairs(cols) do obj.policies[col[1]] = col[2] end
    io.stdout:write(cjson.encode(obj), "\n")
  else
    io.stdout:write(M.format(cols, o))
  end
  io.stdout:flush()
  return core.exit(0)
end

return M

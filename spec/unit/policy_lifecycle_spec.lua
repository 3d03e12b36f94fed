-- Policies as live code: options from the command line checked against a
-- policy's schema, the runtime scoped to one instance (close stops what it
-- started), the probe of select before an instance goes live, and the
-- slot that swaps, migrates and rolls back a pool's policy.

local policy = require "sglr.policy"
local cli = require "sglr.cli"
local slot_mod = require "sglr.slot"

local function has(s, sub)
  assert.is_string(s)
  assert(s:find(sub, 1, true), ("expected %q to contain %q"):format(s, sub))
end

-- A fake base runtime: timers and requests are records the test drives.
local function fake_base()
  local base = { timers = {}, reqs = {} }
  base.now = function() return 0 end
  base.random = function(n) return n and 1 or 0.5 end
  base.radix = function() return require("sglr.radix").new() end
  base.every = function(ms, fn)
    local t = { ms = ms, fn = fn, stopped = false }
    t.stop = function() t.stopped = true end
    base.timers[#base.timers + 1] = t
    return t
  end
  base.http = function() return 200, "{}" end
  base.http_start = function(opts)
    local req = { opts = opts, cancelled = false }
    function req.cancel() req.cancelled = true end
    function req.wait() return coroutine.yield(req) end
    base.reqs[#base.reqs + 1] = req
    return req
  end
  return base
end

local TICKER = [[
local P = { name = "ticker", version = "1.0.0", options = {
  every_ms = { type = "number", default = 100, min = 1, description = "tick period" },
} }
function P.new(conf, rt)
  local self = setmetatable({ ticks = 0, rt = rt, closed = 0 }, { __index = P })
  self.timer = rt.every(conf.every_ms, function() self.ticks = self.ticks + 1 end)
  rt.every(conf.every_ms * 2, function() end)
  return self
end
function P:select(req, workers) return workers[1] end
function P:close() self.closed = self.closed + 1 end
return P
]]

describe("policy options from the command line", function()
  it("parses --policy-opt key=value into a map, repeatable", function()
    local conf = assert(cli.parse_run({ "--policy-opt", "a=1", "b=x", "--policy-opt", "c=true" }))
    assert.same({ a = "1", b = "x", c = "true" }, conf.policy_opt)
  end)

  it("refuses a --policy-opt that is not key=value, naming it", function()
    local conf, err = cli.parse_run({ "--policy-opt", "cache_threshold" })
    assert.is_nil(conf)
    has(err, "--policy-opt")
    has(err, "cache_threshold")
  end)

  it("refuses an option given twice with two values", function()
    local _, err = cli.parse_run({ "--policy-opt", "a=1", "--policy-opt", "a=2" })
    has(err, "option 'a' given twice")
  end)

  it("keeps only the SGLang-named flags that were given as policy options", function()
    assert.same({}, assert(cli.parse_run({})).policy_options)
    assert.same({ cache_threshold = 0.3 }, assert(cli.parse_run({ "--cache-threshold", "0.3" })).policy_options)
  end)

  it("checks options against the schema: unknown key, bad type, out of range, each named", function()
    local P = assert(policy.load("cache_aware"))
    local _, err = policy.options(P, { nope = "1" }, { nope = true })
    has(err, "has no option 'nope'")
    has(err, "cache_threshold")
    _, err = policy.options(P, { cache_threshold = "high" }, { cache_threshold = true })
    has(err, "option 'cache_threshold' must be a number")
    _, err = policy.options(P, { cache_threshold = "1.5" }, { cache_threshold = true })
    has(err, "option 'cache_threshold' must be in [0, 1]")
    local opts = assert(policy.options(P, { cache_threshold = "0.25" }, { cache_threshold = true }))
    assert.equal(0.25, opts.cache_threshold)
    assert.equal(32, opts.balance_abs_threshold)
  end)

  it("lists a policy's options in sglr run --policy P --help", function()
    local _, text, kind = cli.parse_run({ "--policy", "cache_aware", "--help" })
    assert.equal("help", kind)
    has(text, "Policy cache_aware")
    has(text, "cache_threshold")
    has(text, "--policy-opt key=value")
    _, text = cli.parse_run({ "--help" })
    assert.is_nil(text:find("Policy cache_aware", 1, true))
  end)

  describe("with the SGLang-named aliases", function()
    local router = require "sglr.router"
    local function spec_of(args, pool)
      local conf = assert(cli.parse_run(args))
      return router.policy_spec({ conf = conf }, pool or "regular")
    end

    it("lets --policy-opt and the alias agree, and refuses them when they disagree", function()
      local spec = assert(spec_of({ "--cache-threshold", "0.3", "--policy-opt", "cache_threshold=0.3" }))
      assert.equal("0.3", spec.options.cache_threshold)
      local s, err = spec_of({ "--cache-threshold", "0.3", "--policy-opt", "cache_threshold=0.4" })
      assert.is_nil(s)
      has(err, "--cache-threshold 0.3 and --policy-opt cache_threshold=0.4 disagree")
    end)

    it("feeds power_of_two's poll interval from --worker-startup-check-interval unless given", function()
      local spec = assert(spec_of({ "--worker-startup-check-interval", "3" }))
      assert.equal(3, spec.options.load_check_interval)
      assert.is_nil(spec.strict.load_check_interval)
      spec = assert(spec_of({ "--worker-startup-check-interval", "3", "--policy-opt", "load_check_interval=7" }))
      assert.equal("7", spec.options.load_check_interval)
      assert.is_true(spec.strict.load_check_interval)
    end)

    it("gives each PD pool its own options over --policy-opt", function()
      local args = { "--pd-disaggregation", "--prefill", "http://p:1", "--decode", "http://d:1",
        "--policy-opt", "cache_threshold=0.2", "--decode-policy-opt", "cache_threshold=0.9" }
      assert.equal("0.2", spec_of(args, "prefill").options.cache_threshold)
      assert.equal("0.9", spec_of(args, "decode").options.cache_threshold)
    end)
  end)
end)

describe("policy.scope (a runtime per instance)", function()
  it("tracks timers: close stops every one and none fires after", function()
    local base = fake_base()
    local P = assert(policy.from_source(TICKER, "ticker"))
    local rt, scope = policy.scope(base)
    local inst = assert(policy.instantiate(P, {}, rt))
    assert.equal(2, #base.timers)
    assert.equal(2, (scope.count()))
    base.timers[1].fn()
    assert.equal(1, inst.ticks)
    assert(policy.close(inst, scope))
    assert.is_true(base.timers[1].stopped)
    assert.is_true(base.timers[2].stopped)
    assert.equal(1, inst.closed)
    base.timers[1].fn()          -- a tick already queued when it closed
    assert.equal(1, inst.ticks)
    assert.has_error(function() rt.every(10, function() end) end)
  end)

  it("returns a handle from rt.every that stops that timer alone", function()
    local base = fake_base()
    local rt, scope = policy.scope(base)
    local h = rt.every(10, function() end)
    rt.every(10, function() end)
    h.stop()
    assert.is_true(base.timers[1].stopped)
    assert.is_false(base.timers[2].stopped)
    assert.equal(1, (scope.count()))
  end)

  it("cancels the instance's requests in flight on close", function()
    local base = fake_base()
    local rt, scope = policy.scope(base)
    local co = coroutine.create(function() return rt.http({ url = "http://w/get_load" }) end)
    assert(coroutine.resume(co))
    local _, inflight = scope.count()
    assert.equal(1, inflight)
    scope.close()
    assert.is_true(base.reqs[1].cancelled)
    local _, st, err = coroutine.resume(co, nil, "cancelled")
    assert.is_nil(st)
    assert.equal("cancelled", err)
    assert.same({ nil, "cancelled" }, { rt.http({ url = "http://w/x" }) })
  end)
end)

describe("policy.probe", function()
  local function probe(src)
    local P = assert(policy.from_source(src, "probe test"))
    local inst = assert(policy.instantiate(P, {}, fake_base()))
    return policy.probe(inst)
  end
  local HEAD = "local P = { name = 'p', options = {} }\n"
    .. "function P.new() return setmetatable({}, { __index = P }) end\n"

  it("accepts a worker of the list, or nil and a reason", function()
    assert.is_true(probe(HEAD .. "function P:select(req, ws) return ws[2] end return P"))
    assert.is_true(probe(HEAD .. "function P:select(req, ws) return nil, 'none today' end return P"))
  end)

  it("refuses a select that raises", function()
    local ok, err = probe(HEAD .. "function P:select(req, ws) error('kaboom') end return P")
    assert.is_nil(ok)
    has(err, "select raised an error")
    has(err, "kaboom")
  end)

  it("refuses a select that returns something other than a worker", function()
    local _, err = probe(HEAD .. "function P:select(req, ws) return { url = 'x' } end return P")
    has(err, "not one of the workers")
    _, err = probe(HEAD .. "function P:select(req, ws) return 'http://w1' end return P")
    has(err, "not one of the workers")
    _, err = probe(HEAD .. "function P:select(req, ws) return nil end return P")
    has(err, "neither a worker nor a reason")
  end)

  it("refuses a select that writes into a worker or the request", function()
    local _, err = probe(HEAD .. "function P:select(req, ws) ws[1].load = 5 return ws[1] end return P")
    has(err, "must not write worker.load")
    _, err = probe(HEAD .. "function P:select(req, ws) req.route = 'x' return ws[1] end return P")
    has(err, "must not write req.route")
    -- its own decision fields it may set
    assert.is_true(probe(HEAD .. "function P:select(req, ws) req.decision = 'hit' return ws[1] end return P"))
  end)

  it("refuses a select that would wait (rt.sleep, rt.http): select must not yield", function()
    local function scoped_probe(src)
      local P = assert(policy.from_source(src, "probe test"))
      local base = fake_base()
      base.sleep = function() error("the base sleep must not be reached") end
      local inst = assert(policy.instantiate(P, {}, (policy.scope(base))))
      return policy.probe(inst)
    end
    local HEAD_RT = "local P = { name = 'p', options = {} }\n"
      .. "function P.new(_, rt) return setmetatable({ rt = rt }, { __index = P }) end\n"
    local _, err = scoped_probe(HEAD_RT .. "function P:select(req, ws) self.rt.sleep(1) return ws[1] end return P")
    has(err, "select must not yield")
    _, err = scoped_probe(HEAD_RT .. "function P:select(req, ws) self.rt.http({ url = 'http://x/' }) return ws[1] end "
      .. "return P")
    has(err, "select must not yield")
    -- outside select (timers, new) they still work
    assert.is_false(policy.selecting)
    local base = fake_base()
    base.http_start = nil           -- its requests wait in a coroutine
    local rt = policy.scope(base)
    assert.equal(200, (rt.http({ url = "http://x/" })))
  end)

  it("gives the probe metrics that count nothing", function()
    local m = policy.NOP_METRICS
    local c = m.counter("x_total", "help", { "a" })
    c:inc(1, "a")
    c:series("a"):inc()
    m.histogram("h", "help", {}, { 1 }):series():observe(2)
    assert.equal(m, m.worker_load:set(1, "w"))
  end)

  it("passes every built-in policy", function()
    for _, name in ipairs(policy.BUILTIN) do
      local P = assert(policy.load(name))
      local inst = assert(policy.instantiate(P, {}, (policy.scope(fake_base()))))
      assert(policy.probe(inst))
    end
  end)
end)

describe("sglr.slot", function()
  local files = {}
  local function file(src)
    local name = os.tmpname() .. ".lua"
    files[#files + 1] = name
    local fh = assert(io.open(name, "w"))
    fh:write(src)
    fh:close()
    return name
  end
  teardown(function() for _, f in ipairs(files) do os.remove(f) end end)

  local function new_slot(workers, conf)
    local s = { live = nil, base = fake_base() }
    s.slot = slot_mod.new({ pool = "regular", conf = conf,
      base_rt = function() return s.base end,
      workers = function() return workers or {} end,
      swap = function(inst) s.live = inst end })
    return s
  end

  it("swaps to new code, closes the old instance's timers and calls its close hook", function()
    local path = file(TICKER)
    local s = new_slot()
    assert(s.slot:load({ policy = path }, "start"))
    local first = s.live
    assert(s.slot:load({ policy = path, options = { every_ms = "50" }, strict = { every_ms = true } }, "ok"))
    assert.are_not.equal(first, s.live)
    assert.equal(1, first.closed)
    -- the probe's timers and the first instance's are stopped; the live one's run
    local running = 0
    for _, t in ipairs(s.base.timers) do if not t.stopped then running = running + 1 end end
    assert.equal(2, running)
    assert.equal(50, s.slot:view().options.every_ms)
    assert.equal("ticker", s.slot:view().previous_good.name)
  end)

  it("refuses code that does not load, options that do not check, a select that raises", function()
    local s = new_slot()
    assert(s.slot:load({ policy = "round_robin" }, "start"))
    local live = s.live
    local bad = {
      { code = "return {" },
      { policy = "round_robin", options = { x = 1 }, strict = { x = true } },
      { code = "local P = { name = 'b' } function P.new() return setmetatable({}, { __index = P }) end "
        .. "function P:select() error('no') end return P" },
    }
    for _, spec in ipairs(bad) do
      local ok, err = s.slot:load(spec, "ok")
      assert.is_nil(ok)
      assert.is_string(err)
      assert.equal(live, s.live)
    end
    local evs = s.slot:view().events
    assert.equal(4, #evs)
    for i = 2, 4 do assert.equal("refused", evs[i].result) end
  end)

  it("lets cache_aware's new instance keep the old one's tree", function()
    local s = new_slot()
    assert(s.slot:load({ policy = "cache_aware" }, "start"))
    local ws = { { url = "http://a", load = 0 }, { url = "http://b", load = 0 } }
    local placed = {}
    for i = 1, 6 do
      local text = ("prefix %d "):format(i):rep(20)
      placed[i] = s.live:select({ text = text }, ws).url
    end
    assert(s.slot:load({ policy = "cache_aware" }, "ok"))
    for i = 1, 6 do
      local text = ("prefix %d "):format(i):rep(20) .. "and more"
      assert.equal(placed[i], s.live:select({ text = text }, ws).url, "prefix " .. i)
    end
  end)

  it("rolls back to the last good version when select raises on too many requests", function()
    local ws = { { url = "http://a", processed = 0 } }
    local s = new_slot(ws, { policy_rollback_error_rate = 0.5, policy_rollback_window_secs = 10,
      policy_rollback_min_requests = 4 })
    assert(s.slot:load({ policy = "round_robin" }, "start"))
    local good = s.live
    assert(s.slot:load({ code = "local P = { name = 'flaky', options = {} }\n"
      .. "function P.new() return setmetatable({}, { __index = P }) end\n"
      .. "function P:select(req, ws) if req.text == 'boom' then error('flaky') end return ws[1] end\n"
      .. "return P" }, "ok"))
    local flaky = s.live
    -- the first errors fall back to the previous instance (whose picks
    -- bump the worker's processed count: not counted twice)
    assert.equal(good, s.slot:select_failed(flaky, "flaky"))
    ws[1].processed = 1
    assert.equal(good, s.slot:select_failed(flaky, "flaky"))
    ws[1].processed = 3     -- the fallback's pick, and one request the new code routed
    assert.equal(flaky, s.live)
    -- 3 errors of 4 requests: over half, and enough of them
    local inst = s.slot:select_failed(flaky, "flaky")
    assert.are_not.equal(flaky, inst)
    assert.equal(inst, s.live)
    assert.equal("round_robin", s.slot:view().name)
    local evs = s.slot:view().events
    assert.equal("rollback", evs[#evs].result)
    has(evs[#evs].message, "select raised on 3 of 4 requests")
  end)

  it("does not count the errors of an instance that is no longer live", function()
    local s = new_slot({}, { policy_rollback_min_requests = 1 })
    assert(s.slot:load({ policy = "round_robin" }, "start"))
    local old = s.live
    assert(s.slot:load({ policy = "random" }, "ok"))
    assert.equal(s.live, s.slot:select_failed(old, "x"))
    assert.equal("random", s.slot:view().name)
  end)
end)

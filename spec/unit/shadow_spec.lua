-- sglr.shadow with a fake router: a candidate's choices stay its own.
local shadow = require "sglr.shadow"
local policy = require "sglr.policy"

local function workers(n)
  local list = {}
  for i = 1, n do list[i] = { url = "http://w" .. i, load = 0, role = "regular", healthy = true } end
  return list
end

-- A router as the shadow set reads it, with a runtime whose timers are
-- recorded.
local function fake_router(list)
  local r = { conf = { policy_options = {} }, workers = { list = list or {} }, pd = false, timers = {} }
  function r.runtime()
    return {
      radix = function() return require("sglr.radix").new() end,
      now = function() return 0 end,
      random = function(n) return n and 1 or 0 end,
      metrics = "the live registry",
      every = function(ms)
        local t = { ms = ms, stopped = false, closing = false }
        function t.stop(self) self.stopped = true end
        function t.close(self) self.closing = true end
        function t.is_closing(self) return self.closing end
        r.timers[#r.timers + 1] = t
        return t
      end,
    }
  end
  return r
end

local function req(text) return { id = "r", route = "generate", text = text, retries = 0, shadow = false } end

-- a policy file's table, built here: picks the last worker, records on_done
local function last_picker()
  local P = { name = "last", version = "0.1.0", options = {} }
  function P.new(_, rt)
    return setmetatable({ rt = rt, done = {}, added = {} }, { __index = P })
  end
  function P:select(_, ws) return ws[#ws], "last" end
  function P:on_done(_, w, status) self.done[#self.done + 1] = { w.url, status } end
  function P:on_add(w) self.added[#self.added + 1] = w.url end
  return P
end

describe("shadow candidates", function()
  it("keep their own cache_aware tree; the live one is untouched", function()
    local ws = workers(2)
    local r = fake_router(ws)
    local lrt = r.runtime()
    lrt.metrics = nil                              -- (a fake registry only the candidate could misuse)
    local live = assert(policy.create("cache_aware", {}, lrt))
    local set = shadow.new(r, 1e6)
    local c = assert(set:add("cache_aware"))
    for i = 1, 4 do
      set:offer(req("shared prompt " .. (i % 2)), ws, ws[1])
    end
    assert.equal(0, live:stats().tree_chars)
    assert.is_true(c.inst:stats().tree_chars > 0)
    assert.equal(3, c.inst:stats().hits)           -- a miss, then the shared prefix hits
    assert.is_nil(c.inst.rt.metrics)              -- its decisions stay out of the live metrics
    assert.equal(4, c.decisions)
  end)

  it("tell a candidate's on_done of its own choice, not the live one", function()
    local ws = workers(2)
    local r = fake_router(ws)
    package.loaded["policies.test_last"] = last_picker()
    local set = shadow.new(r, 1e6)
    local c = assert(set:add("test_last"))
    assert.same({ "http://w1", "http://w2" }, c.inst.added)   -- the workers already there
    local rq = req("x")
    set:offer(rq, ws, ws[1])                       -- live: w1; candidate: w2
    assert.equal(0, c.agree)
    set:settle(rq, 200, 5)
    assert.same({ { "http://w2", 200 } }, c.inst.done)
    set:on_add({ url = "http://w3", role = "regular" })
    assert.equal("http://w3", c.inst.added[3])
    package.loaded["policies.test_last"] = nil
  end)

  it("note their choices in a decision slot", function()
    local ws = workers(2)
    local set = shadow.new(fake_router(ws), 1e6)
    assert(set:add("round_robin"))
    assert(set:add("round_robin"))
    local slot = { nsh = 0, sh = {} }
    set:offer(req(""), ws, ws[1], slot)
    assert.equal(2, slot.nsh)
    assert.same({ "round_robin", "http://w1", "round_robin#2", "http://w1" }, slot.sh)
  end)

  it("drop a candidate that raises, and one slower than the budget three times in a row", function()
    local ws = workers(1)
    local set = shadow.new(fake_router(ws), 1e6)
    local P = { name = "bad", options = {} }
    function P.new() return setmetatable({}, { __index = P }) end
    function P.select() error("kaput") end
    package.loaded["policies.test_bad"] = P
    local bad = assert(set:add("test_bad"))
    local ok = assert(set:add("random"))
    set:offer(req(""), ws, ws[1])
    assert.equal("dropped", bad.state)
    assert.truthy(bad.reason:find("kaput", 1, true))
    assert.equal(1, set.n)
    package.loaded["policies.test_bad"] = nil

    set.budget_ms = 0                              -- every select is over budget
    set:offer(req(""), ws, ws[1])
    set:offer(req(""), ws, ws[1])
    assert.equal("active", ok.state)
    set:offer(req(""), ws, ws[1])
    assert.equal("dropped", ok.state)
    assert.equal(0, set.n)
    local names = {}
    for _, v in ipairs(set:status()) do names[#names + 1] = v.name .. "=" .. v.state end
    assert.same({ "bad=dropped", "random=dropped" }, names)
  end)

  it("stop a removed candidate's timers", function()
    local r = fake_router(workers(1))
    local set = shadow.new(r, 1e6)
    assert(set:add("cache_aware", { eviction_interval = 5 }))
    assert.equal(1, #r.timers)
    assert(set:remove("cache_aware"))
    assert.is_true(r.timers[1].stopped)
    assert.same({}, set:status())
    assert.is_nil(set:remove("cache_aware"))
  end)
end)

-- policies/round_robin.lua: workers take requests in turn, whatever happens
-- to the worker list between calls.

local policy = require "sglr.policy"

local function workers(n, prefix)
  local list = {}
  for i = 1, n do
    list[i] = { url = (prefix or "http://w") .. i, load = 0, role = "regular", healthy = true }
  end
  return list
end

local function new()
  local P = assert(policy.load("round_robin"))
  return assert(policy.instantiate(P, {}, { random = function() return 1 end }))
end

describe("round_robin policy", function()
  it("declares its shape", function()
    local P = require "policies.round_robin"
    assert.equal("round_robin", P.name)
    assert.is_string(P.version)
    assert.same({}, P.options)
  end)

  it("cycles through the workers in order", function()
    local rr, ws = new(), workers(3)
    local got = {}
    for i = 1, 7 do got[i] = rr:select({}, ws).url end
    assert.same({ "http://w1", "http://w2", "http://w3", "http://w1", "http://w2", "http://w3",
                  "http://w1" }, got)
  end)

  it("returns the worker table itself", function()
    local rr, ws = new(), workers(2)
    assert.equal(ws[1], rr:select({}, ws))
  end)

  it("spreads requests evenly", function()
    local rr, ws = new(), workers(4)
    local count = {}
    for _ = 1, 400 do
      local w = rr:select({}, ws)
      count[w.url] = (count[w.url] or 0) + 1
    end
    for i = 1, 4 do assert.equal(100, count["http://w" .. i]) end
  end)

  it("stays in range when the list shrinks", function()
    local rr = new()
    local five = workers(5)
    for _ = 1, 4 do rr:select({}, five) end       -- cursor at worker 4
    local two = workers(2)
    for _ = 1, 10 do
      local w = rr:select({}, two)
      assert.is_table(w)
      assert.truthy(w == two[1] or w == two[2])
    end
  end)

  it("keeps taking turns over a shrunk list", function()
    local rr = new()
    local five = workers(5)
    for _ = 1, 3 do rr:select({}, five) end
    local three = { five[1], five[2], five[3] }
    local count = {}
    for _ = 1, 30 do
      local w = rr:select({}, three)
      count[w.url] = (count[w.url] or 0) + 1
    end
    assert.same({ ["http://w1"] = 10, ["http://w2"] = 10, ["http://w3"] = 10 }, count)
  end)

  it("includes workers added between calls", function()
    local rr = new()
    local ws = workers(2)
    rr:select({}, ws)
    rr:select({}, ws)
    ws[3] = { url = "http://w3", load = 0, role = "regular", healthy = true }
    assert.equal("http://w3", rr:select({}, ws).url)
    assert.equal("http://w1", rr:select({}, ws).url)
  end)

  it("returns nil and a reason with no workers, then recovers", function()
    local rr = new()
    local w, reason = rr:select({}, {})
    assert.is_nil(w)
    assert.equal("no workers", reason)
    assert.equal("http://w1", rr:select({}, workers(2)).url)
  end)

  it("skips workers marked unhealthy", function()
    local rr, ws = new(), workers(3)
    ws[2].healthy = false
    local got = {}
    for i = 1, 4 do got[i] = rr:select({}, ws).url end
    assert.same({ "http://w1", "http://w3", "http://w1", "http://w3" }, got)
  end)

  it("returns nil when every worker is unhealthy", function()
    local rr, ws = new(), workers(2)
    ws[1].healthy, ws[2].healthy = false, false
    local w, reason = rr:select({}, ws)
    assert.is_nil(w)
    assert.is_string(reason)
  end)

  it("keeps separate cursors per instance", function()
    local a, b, ws = new(), new(), workers(3)
    assert.equal("http://w1", a:select({}, ws).url)
    assert.equal("http://w2", a:select({}, ws).url)
    assert.equal("http://w1", b:select({}, ws).url)
  end)
end)

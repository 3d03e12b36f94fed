-- policies/random.lua: uniform picks through rt.random, so a seeded fake
-- makes every run reproducible.

local policy = require "sglr.policy"

local function workers(n)
  local list = {}
  for i = 1, n do
    list[i] = { url = "http://w" .. i, load = 0, role = "regular", healthy = true }
  end
  return list
end

-- Seeded linear congruential generator: rt.random(n) -> integer in [1, n].
local function fake_rt(seed)
  local state = seed or 12345
  local calls = {}
  return {
    calls = calls,
    random = function(n)
      calls[#calls + 1] = n
      state = (state * 1103515245 + 12345) % 2147483648
      return math.floor(state / 2147483648 * n) + 1
    end,
  }
end

local function new(rt)
  local P = assert(policy.load("random"))
  return assert(policy.instantiate(P, {}, rt or fake_rt()))
end

describe("random policy", function()
  it("declares its shape", function()
    local P = require "policies.random"
    assert.equal("random", P.name)
    assert.is_string(P.version)
    assert.same({}, P.options)
  end)

  it("returns the worker rt.random chooses", function()
    local ws = workers(5)
    local r = new({ random = function(n) assert.equal(5, n) return 4 end })
    assert.equal(ws[4], r:select({}, ws))
  end)

  it("covers all workers over many picks, roughly evenly", function()
    local rt = fake_rt(42)
    local r, ws = new(rt), workers(8)
    local count = {}
    for _ = 1, 8000 do
      local w = r:select({}, ws)
      count[w.url] = (count[w.url] or 0) + 1
    end
    for i = 1, 8 do
      local c = count["http://w" .. i] or 0
      assert.is_true(c > 800 and c < 1200, "worker " .. i .. " got " .. c)
    end
    for _, n in ipairs(rt.calls) do assert.equal(8, n) end
  end)

  it("is reproducible with the same seed", function()
    local ws = workers(6)
    local a, b = new(fake_rt(7)), new(fake_rt(7))
    for _ = 1, 50 do assert.equal(a:select({}, ws), b:select({}, ws)) end
  end)

  it("follows the list size as it changes", function()
    local rt = fake_rt(3)
    local r = new(rt)
    local big, small = workers(10), workers(2)
    for _ = 1, 20 do r:select({}, big) end
    for _ = 1, 20 do
      local w = r:select({}, small)
      assert.truthy(w == small[1] or w == small[2])
    end
    assert.equal(2, rt.calls[#rt.calls])
  end)

  it("returns nil and a reason with no workers", function()
    local w, reason = new():select({}, {})
    assert.is_nil(w)
    assert.equal("no workers", reason)
  end)

  it("never picks a worker marked unhealthy", function()
    local r, ws = new(fake_rt(9)), workers(4)
    ws[1].healthy, ws[3].healthy = false, false
    local seen = {}
    for _ = 1, 200 do
      local w = r:select({}, ws)
      assert.is_true(w.healthy)
      seen[w.url] = true
    end
    assert.same({ ["http://w2"] = true, ["http://w4"] = true }, seen)
  end)

  it("returns nil when every worker is unhealthy", function()
    local ws = workers(2)
    ws[1].healthy, ws[2].healthy = false, false
    local w, reason = new():select({}, ws)
    assert.is_nil(w)
    assert.is_string(reason)
  end)

  it("falls back to math.random without an rt", function()
    local P = require "policies.random"
    local r = assert(policy.instantiate(P, {}, nil))
    local ws = workers(3)
    for _ = 1, 20 do assert.is_table(r:select({}, ws)) end
  end)
end)

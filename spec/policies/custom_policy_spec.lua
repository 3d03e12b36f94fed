-- examples/custom_policy.lua (session affinity) with a fake runtime.
local policy = require "sglr.policy"

describe("examples/custom_policy.lua", function()
  local P = assert(policy.load("examples/custom_policy.lua"))
  local function workers(n)
    local ws = {}
    for i = 1, n do ws[i] = { url = "http://w" .. i .. ":8000", load = 0, healthy = true } end
    return ws
  end

  it("keeps a session on one worker", function()
    local inst = assert(policy.instantiate(P, {}, {}))
    local ws = workers(4)
    local first = inst:select({ headers = { ["x-session-id"] = "alice" } }, ws)
    for _ = 1, 10 do
      assert.equal(first, inst:select({ headers = { ["x-session-id"] = "alice" } }, ws))
    end
  end)

  it("moves only the removed worker's sessions", function()
    local inst = assert(policy.instantiate(P, {}, {}))
    local ws = workers(4)
    local before = {}
    for i = 1, 40 do before[i] = inst:select({ headers = { ["x-session-id"] = "s" .. i } }, ws).url end
    local gone = ws[2].url
    table.remove(ws, 2)
    for i = 1, 40 do
      local now = inst:select({ headers = { ["x-session-id"] = "s" .. i } }, ws).url
      if before[i] ~= gone then assert.equal(before[i], now) end
    end
  end)

  it("sends requests without a session to the least loaded worker", function()
    local inst = assert(policy.instantiate(P, {}, {}))
    local ws = workers(3)
    ws[1].load, ws[2].load, ws[3].load = 5, 1, 3
    assert.equal(ws[2], inst:select({ headers = {} }, ws))
  end)
end)

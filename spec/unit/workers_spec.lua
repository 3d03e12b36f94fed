local core = require "sglr.core"
local workers = require "sglr.workers"

describe("worker registry", function()
  local function urls(list)
    local out = {}
    for i, w in ipairs(list) do out[i] = w.url end
    return out
  end

  it("gives each caller of available() a list that no later call changes", function()
    local ws = workers.new({})
    assert(ws:add("http://127.0.0.1:1"))
    assert(ws:add("http://127.0.0.1:2"))
    -- a policy that yields (say, awaiting rt.http) between getting its
    -- candidates and choosing among them, while another request routes
    local seen
    core.spawn(function()
      local avail = ws:available(core.now(), { ["http://127.0.0.1:1"] = true })
      core.sleep(5)
      seen = urls(avail)
    end)
    local other = ws:available(core.now(), { ["http://127.0.0.1:2"] = true })
    assert.same({ "http://127.0.0.1:1" }, urls(other))
    local t = core.now()
    while not seen and core.now() - t < 2000 do core.sleep(5) end
    assert.same({ "http://127.0.0.1:2" }, seen)
    assert.same({ "http://127.0.0.1:1" }, urls(other))
  end)
end)

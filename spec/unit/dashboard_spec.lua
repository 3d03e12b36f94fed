-- The Grafana example must only query metrics sglr exports.
local cjson = require "cjson.safe"
local stats = require "sglr.stats"

describe("examples/grafana/sglr-dashboard.json", function()
  it("queries only exported metric names", function()
    local f = assert(io.open("examples/grafana/sglr-dashboard.json"))
    local dash = assert(cjson.decode(f:read("*a")))
    f:close()
    local exported = {}
    for _, m in pairs(stats) do
      if type(m) == "userdata" and m.name then exported[m:name()] = true end
    end
    -- and the default policy's own, registered by the policy
    require("policies.cache_aware").decision_metrics(stats.metrics)
    for name in stats.render():gmatch("# TYPE (sgl_router_[%w_]+)") do exported[name] = true end
    local used = 0
    for _, p in ipairs(dash.panels) do
      for _, t in ipairs(p.targets) do
        for name in t.expr:gmatch("sgl_router_[%w_]+") do
          local base = name:gsub("_bucket$", ""):gsub("_sum$", ""):gsub("_count$", "")
          assert.is_true(exported[base] == true, "dashboard uses unknown metric " .. name)
          used = used + 1
        end
      end
    end
    assert.is_true(used >= 16)
  end)
end)

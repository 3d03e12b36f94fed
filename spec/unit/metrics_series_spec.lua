-- Series handles (m:series(...)) update the same series as labelled calls,
-- and keep working, unexported, after the series is removed.
local metrics = require "sglr.metrics"

describe("metric series handles", function()
  -- a counter, a gauge and a histogram (bucket 1) series named after name
  local function three(name)
    return metrics.counter("spec_" .. name .. "_total", "Spec counter.", {}):series(),
      metrics.gauge("spec_" .. name .. "_gauge", "Spec gauge.", {}):series(),
      metrics.histogram("spec_" .. name .. "_seconds", "Spec histogram.", {}, { 1 }):series()
  end

  it("share the series with labelled updates", function()
    local c = metrics.counter("spec_handle_total", "Spec counter.", { "route" })
    local h = c:series("generate")
    h:inc()
    h:inc(2)
    c:inc(1, "generate")
    assert.equal(4, c:get("generate"))
    assert.equal(4, h:get())
    assert.truthy(metrics.render():find('spec_handle_total{route="generate"} 4', 1, true))
  end)

  it("observe histograms and set gauges", function()
    local hist = metrics.histogram("spec_handle_seconds", "Spec histogram.", { "route" }, { 0.1, 1 })
    local hh = hist:series("chat")
    hh:observe(0.05)
    hh:observe(0.5)
    local count, sum = hist:get("chat")
    assert.equal(2, count)
    assert.near(0.55, sum, 1e-9)
    local g = metrics.gauge("spec_handle_gauge", "Spec gauge.", { "worker" })
    local gh = g:series("w1")
    gh:set(7)
    assert.equal(7, g:get("w1"))
  end)

  it("update several series in one apply call, each its own way, or none when a pair is bad", function()
    local c, g, h = three("apply")
    metrics.apply(c, 2, g, 5, h, 0.5)
    metrics.apply(c, 1, g, 3, h, 2)
    assert.equal(3, c:get())
    assert.equal(3, g:get())
    local count, sum = h:get()
    assert.equal(2, count)
    assert.near(2.5, sum, 1e-9)
    -- a bad pair anywhere: an error, and nothing of the call applied
    assert.has_error(function() metrics.apply(c, 1, g, 9, c, -1) end)
    assert.has_error(function() metrics.apply(c, 1, g) end)
    assert.has_error(function() metrics.apply(c, 1, {}, 1) end)
    assert.has_error(function() metrics.apply(c, "x") end)
    assert.equal(3, c:get())
    assert.equal(3, g:get())
  end)

  it("apply through the FFI (sglr.stats) as the classic call does, up to six pairs and past", function()
    local stats = require "sglr.stats"
    assert.equal(stats.metrics, metrics)
    local c, g, h = three("apply2")
    metrics.apply(c, 1)
    metrics.apply(c, 1, g, 4, h, 0.5, c, 2, g, 6, h, 1.5)          -- six pairs: one FFI call
    metrics.apply(c, 1, c, 1, c, 1, c, 1, c, 1, c, 1, c, 1)         -- seven: the classic call
    assert.equal(11, c:get())
    assert.equal(6, g:get())
    local count, sum = h:get()
    assert.equal(2, count)
    assert.near(2, sum, 1e-9)
    -- whatever the FFI path does not take is refused as before, with
    -- nothing of the call applied
    assert.has_error(function() metrics.apply(c, 1, g, 9, c, -1) end)
    assert.has_error(function() metrics.apply(c, 1, nil, nil) end)
    assert.has_error(function() metrics.apply(c, 1, g) end)
    assert.has_error(function() metrics.apply(c, 1, {}, 1) end)
    assert.has_error(function() metrics.apply(c, 1, g, "x") end)
    assert.has_error(function() metrics.apply(c, 1, io.stdout, 1) end)    -- another userdata
    assert.equal(11, c:get())
    assert.equal(6, g:get())
    local gone = metrics.gauge("spec_apply2_removed", "Spec gauge.", { "worker" })
    local gh = gone:series("w9")
    gone:remove("w9")
    assert.has_no_error(function() metrics.apply(gh, 1, c, 1) end)   -- unexported, still counts
    assert.equal(12, c:get())
  end)

  it("accumulate updates of several series until the registry is read (FFI and classic)", function()
    require "sglr.stats"     -- puts the FFI acc_add in place
    local c, g, h = three("acc")
    local c2 = metrics.counter("spec_acc_second_total", "Spec counter.", {}):series()
    local a = metrics.accumulator(c, g, h, c2)
    -- bits pick the series: counter +1, gauge, histogram; then the gauge
    -- alone, then the second counter
    metrics.acc_add(a, 7, 1, 4, 0.5)
    metrics.acc_add(a, 7, 1, 5, 2)
    metrics.acc_add(a, 2, 0, 6)
    assert.truthy(debug.getinfo(metrics.acc_add, "S").what == "Lua")      -- stats' FFI wrapper
    metrics.acc_add(a, 8, nil, nil, nil, 3)     -- what the mask does not name may be missing
    assert.equal(2, c:get())          -- get applies what waits
    assert.equal(6, g:get())
    local count, sum = h:get()
    assert.equal(2, count)
    assert.near(2.5, sum, 1e-9)
    assert.equal(3, c2:get())
    metrics.acc_add(a, 1, 5)
    local text = metrics.render()
    assert.truthy(text:find("spec_acc_total 7\n", 1, true))
    assert.truthy(text:find('spec_acc_seconds_bucket{le="1"} 1\n', 1, true))
    assert.truthy(text:find('spec_acc_seconds_bucket{le="+Inf"} 2\n', 1, true))
    -- refused whole, with nothing applied: a counter going down, not a
    -- number, not an accumulator, too many or no series
    assert.has_error(function() metrics.acc_add(a, 3, -1, 9) end)
    assert.has_error(function() metrics.acc_add(a, 1, 0 / 0) end)
    assert.has_error(function() metrics.acc_add(a, 2, 0, "x") end)
    assert.has_error(function() metrics.acc_add(c, 1, 1) end)
    assert.has_error(function() metrics.acc_add(a, 16, 0, 0, 0, 0, 1) end)  -- no fifth series
    assert.has_error(function() metrics.acc_add(a, 3, 1) end)               -- the gauge's value missing
    assert.has_error(function() metrics.acc_add(a, 1, nil, 2) end)
    assert.has_error(function() metrics.accumulator() end)
    assert.has_error(function() metrics.accumulator(c, c, c, c, c, c, c, c, c) end)
    assert.has_error(function() metrics.accumulator(h, h) end)              -- two histograms
    assert.has_error(function() metrics.accumulator(c, {}) end)
    assert.equal(7, c:get())
    assert.equal(6, g:get())
    -- collected or not, nothing it held is lost
    metrics.acc_add(a, 1, 10)
    a = nil   -- luacheck: ignore 311
    collectgarbage()
    collectgarbage()
    assert.equal(17, c:get())
  end)

  it("refuse updates that do not fit the metric type", function()
    local c = metrics.counter("spec_handle2_total", "Spec counter.", {})
    local h = c:series()
    assert.has_error(function() h:set(3) end)
    assert.has_error(function() h:inc(-1) end)
    assert.has_error(function() c:series("extra") end)
  end)

  it("keep working after the series is removed, without exporting it", function()
    local g = metrics.gauge("spec_handle_removed", "Spec gauge.", { "worker" })
    local h = g:series("gone")
    h:set(1)
    assert.is_true(g:remove("gone"))
    h:set(2)
    assert.is_nil(metrics.render():find('spec_handle_removed{worker="gone"}', 1, true))
  end)
end)

-- The request path's updates (stats.bump / stats.record, through the FFI
-- where LuaJIT has it): the same series as the handle's methods, and an
-- update a series does not take changes nothing.
describe("request path updates", function()
  local stats = require "sglr.stats"

  it("bump counters and record histograms through their handles", function()
    local c = metrics.counter("spec_bump_total", "Spec counter.", { "route" })
    local hist = metrics.histogram("spec_record_seconds", "Spec histogram.", { "route" }, { 0.1, 1 })
    local ch, hh = c:series("generate"), hist:series("generate")
    stats.bump(ch)
    stats.bump(ch)
    stats.record(hh, 0.05)
    stats.record(hh, 0.5)
    assert.equal(2, ch:get())
    local count, sum = hh:get()
    assert.equal(2, count)
    assert.near(0.55, sum, 1e-9)
    assert.truthy(metrics.render():find('spec_record_seconds_bucket{route="generate",le="0.1"} 1', 1, true))
  end)

  it("leave a series alone when the update is not its kind", function()
    local c = metrics.counter("spec_bump2_total", "Spec counter.")
    local hist = metrics.histogram("spec_record2_seconds", "Spec histogram.", {}, { 1 })
    local ch, hh = c:series(), hist:series()
    stats.record(ch, 3)
    stats.bump(hh)
    assert.equal(0, ch:get())
    assert.equal(0, (hh:get()))
  end)

  it("keep counting into a removed series, unexported", function()
    local c = metrics.counter("spec_bump3_total", "Spec counter.", { "worker" })
    local h = c:series("http://w:1")
    stats.bump(h)
    assert.equal(1, metrics.remove_label("worker", "http://w:1"))
    stats.bump(h)
    assert.equal(2, h:get())
    assert.falsy(metrics.render():find("spec_bump3_total{", 1, true))
  end)
end)

local breaker = require "sglr.breaker"

describe("circuit breaker", function()
  local conf = { cb_failure_threshold = 3, cb_success_threshold = 2, cb_timeout_duration_secs = 1,
    cb_window_duration_secs = 10 }

  it("opens after the threshold of failures within the window", function()
    local changes = {}
    local b = breaker.new(conf, function(from, to) changes[#changes + 1] = from .. ">" .. to end)
    b:failure(0); b:failure(100)
    assert.equal("closed", b.state)
    b:failure(200)
    assert.equal("open", b.state)
    assert.same({ "closed>open" }, changes)
    assert.is_false(b:allow(500))
  end)

  it("forgets failures that left the window", function()
    local b = breaker.new(conf)
    b:failure(0); b:failure(1000)
    b:failure(20000)
    assert.equal("closed", b.state)
  end)

  it("admits one probe at a time when half-open and closes after the success threshold", function()
    local b = breaker.new(conf)
    for t = 1, 3 do b:failure(t) end
    assert.is_true(b:allow(1100))
    assert.equal("half_open", b.state)
    b:dispatched()
    assert.is_false(b:allow(1100))
    b:success(1150)
    assert.equal("half_open", b.state)
    assert.is_true(b:allow(1160))
    b:dispatched()
    b:success(1200)
    assert.equal("closed", b.state)
  end)

  it("reopens when a probe fails", function()
    local b = breaker.new(conf)
    for t = 1, 3 do b:failure(t) end
    assert.is_true(b:allow(2000))
    b:dispatched()
    b:failure(2001)
    assert.equal("open", b.state)
    assert.is_false(b:allow(2500))
    assert.is_true(b:allow(3002))
  end)

  it("admits a new probe when the last one ended without a verdict", function()
    local b = breaker.new(conf)
    for t = 1, 3 do b:failure(t) end
    assert.is_true(b:allow(2000))
    b:dispatched()
    assert.is_false(b:allow(2000))
    b:cancelled()
    assert.is_true(b:allow(2001))
  end)

  it("never blocks when disabled", function()
    local b = breaker.new({ disable_circuit_breaker = true, cb_failure_threshold = 1 })
    for t = 1, 10 do b:failure(t) end
    assert.is_true(b:allow(11))
  end)
end)

local core = require "sglr.core"
local ratelimit = require "sglr.ratelimit"

describe("concurrency limiter", function()
  it("admits up to the limit, queues FIFO, rejects when the queue is full", function()
    local rl = ratelimit.new({ max_concurrent_requests = 1, queue_size = 2, queue_timeout_secs = 5 })
    assert.is_true(rl:acquire())
    local order = {}
    for i = 1, 2 do
      core.spawn(function()
        assert(rl:acquire())
        order[#order + 1] = i
        core.sleep(5)
        rl:release()
      end)
    end
    local ok, status = rl:acquire()
    assert.is_nil(ok)
    assert.equal(429, status)
    assert.equal(2, rl:depth())
    rl:release()
    local t = core.now()
    while #order < 2 and core.now() - t < 2000 do core.sleep(5) end
    assert.same({ 1, 2 }, order)
    core.sleep(20)
    assert.equal(0, rl.inflight)
  end)

  it("answers 408 after the queue timeout and frees the queue slot", function()
    local rl = ratelimit.new({ max_concurrent_requests = 1, queue_size = 1, queue_timeout_secs = 0.05 })
    assert.is_true(rl:acquire())
    local ok, status = rl:acquire()
    assert.is_nil(ok)
    assert.equal(408, status)
    rl:release()
    assert.equal(0, rl.inflight)
    assert.is_true(rl:acquire())
  end)

  it("does not count waiters that timed out against the queue", function()
    local rl = ratelimit.new({ max_concurrent_requests = 1, queue_size = 2, queue_timeout_secs = 0.05 })
    assert.is_true(rl:acquire())   -- the slot stays taken throughout
    local results = {}
    for i = 1, 2 do
      core.spawn(function() results[i] = select(2, rl:acquire()) end)
    end
    local t = core.now()
    while #results < 2 and core.now() - t < 2000 do core.sleep(5) end
    assert.same({ 408, 408 }, results)
    assert.equal(0, rl:depth())
    -- nobody waits now: the next request queues (and times out), not 429
    local ok, status = rl:acquire()
    assert.is_nil(ok)
    assert.equal(408, status)
    assert.equal(0, rl:depth())
    -- and the slot still goes back to the pool when the holder leaves
    rl:release()
    assert.equal(0, rl.inflight)
    assert.is_true(rl:acquire())
  end)
end)

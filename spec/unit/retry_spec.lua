local retry = require "sglr.retry"

describe("retry policy", function()
  it("retries the statuses and errors the SGLang router retries", function()
    for _, st in ipairs({ 408, 429, 500, 502, 503, 504 }) do assert.is_true(retry.retryable_status(st)) end
    for _, st in ipairs({ 200, 400, 401, 404, 413, 501 }) do assert.is_false(retry.retryable_status(st)) end
    assert.is_true(retry.retryable_error("connect"))
    assert.is_true(retry.retryable_error("reset"))
    assert.is_false(retry.retryable_error("timeout"))
    assert.is_false(retry.retryable_error("client_closed"))
  end)

  it("backs off exponentially up to the maximum", function()
    local r = retry.new({ retry_initial_backoff_ms = 100, retry_backoff_multiplier = 2, retry_max_backoff_ms = 500,
      retry_jitter_factor = 0 })
    assert.equal(100, r:backoff_ms(0))
    assert.equal(200, r:backoff_ms(1))
    assert.equal(400, r:backoff_ms(2))
    assert.equal(500, r:backoff_ms(3))
  end)

  it("adds jitter within the factor", function()
    local vals = { 0, 1, 0.5 }
    local i = 0
    local r = retry.new({ retry_initial_backoff_ms = 100, retry_jitter_factor = 0.1 }, function()
      i = i + 1
      return vals[i]
    end)
    assert.equal(90, r:backoff_ms(0))
    assert.equal(110, r:backoff_ms(0))
    assert.equal(100, r:backoff_ms(0))
  end)

  it("counts attempts, and one only when retries are disabled", function()
    assert.equal(4, retry.new({ retry_max_retries = 3 }):attempts())
    assert.equal(1, retry.new({ retry_max_retries = 3, disable_retries = true }):attempts())
  end)
end)

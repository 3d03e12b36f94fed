-- Retry policy: which outcomes are retried and how long to wait between
-- attempts. backoff(n) = min(initial * multiplier^n, max) +/- jitter.
local M = {}
M.__index = M

local RETRYABLE = { [408] = true, [429] = true, [500] = true, [502] = true, [503] = true, [504] = true }

function M.new(conf, random)
  return setmetatable({
    max_retries = conf.disable_retries and 0 or (conf.retry_max_retries or 3),
    initial_ms = conf.retry_initial_backoff_ms or 100,
    max_ms = conf.retry_max_backoff_ms or 10000,
    multiplier = conf.retry_backoff_multiplier or 2.0,
    jitter = conf.retry_jitter_factor or 0.1,
    random = random or math.random,
  }, M)
end

-- Total attempts: the first plus max_retries retries.
function M:attempts() return 1 + self.max_retries end

function M.retryable_status(status) return RETRYABLE[status] == true end

-- Transport errors from the forward primitive that are safe to retry: the
-- request never produced a response. "timeout" is the request's own deadline
-- and is not retried.
function M.retryable_error(err) return err == "connect" or err == "reset" or err == "protocol" end

function M:backoff_ms(attempt)
  local d = math.min(self.initial_ms * self.multiplier ^ attempt, self.max_ms)
  if self.jitter > 0 then
    d = d + d * self.jitter * (2 * self.random() - 1)
  end
  return math.max(0, d)
end

return M

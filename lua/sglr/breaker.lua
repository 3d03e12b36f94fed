-- Per-worker circuit breaker.
--
--   closed --(failure_threshold failures within window)--> open
--   open --(timeout elapsed)--> half_open: one probe request at a time
--   half_open --(success_threshold successes)--> closed
--   half_open --(any failure)--> open
--
-- Time is passed in (ms) so the same code runs under a virtual clock.
local M = {}
M.__index = M

M.STATES = { closed = 0, open = 1, half_open = 2 }

function M.new(conf, on_change)
  return setmetatable({
    state = "closed",
    failure_threshold = conf.cb_failure_threshold or 5,
    success_threshold = conf.cb_success_threshold or 2,
    timeout_ms = (conf.cb_timeout_duration_secs or 30) * 1000,
    window_ms = (conf.cb_window_duration_secs or 60) * 1000,
    disabled = conf.disable_circuit_breaker or false,
    failures = {},        -- timestamps of recent failures (closed state)
    successes = 0,        -- consecutive successes (half-open)
    opened_at = 0,
    probing = false,
    on_change = on_change,
  }, M)
end

function M:set_state(to, now)
  local from = self.state
  if from == to then return end
  self.state = to
  if to == "open" then
    self.opened_at = now
  elseif to == "closed" then
    self.failures = {}
  end
  self.successes = 0
  self.probing = false
  if self.on_change then self.on_change(from, to) end
end

-- May a request be sent now? Moves open -> half_open once the timeout passed.
function M:allow(now)
  if self.disabled then return true end
  local s = self.state
  if s == "closed" then return true end
  if s == "open" then
    if now - self.opened_at < self.timeout_ms then return false end
    self:set_state("half_open", now)
  end
  return not self.probing
end

-- A request was sent (in half-open state it is the probe).
function M:dispatched()
  if self.state == "half_open" then self.probing = true end
end

-- The request ended without a verdict on the worker (the client left, the
-- deadline passed first): a half-open breaker may send its next probe.
function M:cancelled()
  if self.state == "half_open" then self.probing = false end
end

function M:success(now)
  if self.disabled then return end
  if self.state == "half_open" then
    self.probing = false
    self.successes = self.successes + 1
    if self.successes >= self.success_threshold then self:set_state("closed", now) end
  end
end

function M:failure(now)
  if self.disabled then return end
  if self.state == "half_open" then
    self:set_state("open", now)
    return
  end
  if self.state == "open" then return end
  local f = self.failures
  f[#f + 1] = now
  -- forget failures that left the window
  local cut = now - self.window_ms
  local keep = 1
  while f[keep] and f[keep] < cut do keep = keep + 1 end
  if keep > 1 then
    local nf = {}
    for i = keep, #f do nf[#nf + 1] = f[i] end
    self.failures = nf
    f = nf
  end
  if #f >= self.failure_threshold then self:set_state("open", now) end
end

return M

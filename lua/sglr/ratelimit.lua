-- Concurrency limiter with a FIFO wait queue for the inference routes.
-- acquire() -> true | nil, status, message (429 queue full, 408 waited too
-- long); every successful acquire is paired with one release().
local core = require "sglr.core"

local M = {}
M.__index = M

function M.new(conf)
  return setmetatable({
    max = conf.max_concurrent_requests or 64,
    queue_size = conf.queue_size or 100,
    timeout_ms = (conf.queue_timeout_secs or 60) * 1000,
    inflight = 0,
    -- FIFO of events; an entry is false once its waiter timed out, so
    -- `waiting` (not tail - head) is what the queue holds
    queue = {}, head = 1, tail = 0, waiting = 0,
    rejected = 0, timed_out = 0,
  }, M)
end

function M:depth() return self.waiting end

function M:acquire()
  if self.max <= 0 then return true end   -- unlimited
  if self.inflight < self.max and self:depth() == 0 then
    self.inflight = self.inflight + 1
    return true
  end
  if self:depth() >= self.queue_size then
    self.rejected = self.rejected + 1
    return nil, 429, "too many requests: the router queue is full"
  end
  local ev = core.event()
  self.tail = self.tail + 1
  self.queue[self.tail] = ev
  self.waiting = self.waiting + 1
  local ok = ev:wait(self.timeout_ms)
  if ok then return true end   -- the slot was handed over by release()
  -- timed out: leave the queue (mark the entry so release skips it), and
  -- drop marked entries at both ends so a queue nobody releases stays small
  local q = self.queue
  for i = self.head, self.tail do
    if q[i] == ev then q[i] = false break end
  end
  self.waiting = self.waiting - 1
  while self.head <= self.tail and q[self.head] == false do
    q[self.head] = nil
    self.head = self.head + 1
  end
  while self.tail >= self.head and q[self.tail] == false do
    q[self.tail] = nil
    self.tail = self.tail - 1
  end
  if self.head > self.tail then self.head, self.tail = 1, 0 end
  self.timed_out = self.timed_out + 1
  return nil, 408, "request timed out waiting in the router queue"
end

function M:release()
  if self.max <= 0 then return end
  -- hand the slot to the oldest waiter that is still waiting
  while self.head <= self.tail do
    local ev = self.queue[self.head]
    self.queue[self.head] = nil
    self.head = self.head + 1
    if ev then
      self.waiting = self.waiting - 1
      ev:set(true)
      return
    end
  end
  self.head, self.tail = 1, 0
  self.inflight = self.inflight - 1
end

return M

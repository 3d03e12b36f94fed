-- Worker health: the startup wait and the periodic check.
--
-- A worker is marked unhealthy after health_failure_threshold consecutive
-- failed checks and healthy again after health_success_threshold consecutive
-- good ones. Unhealthy workers stay registered and get no traffic. The
-- ranks of a dp-aware worker are one server: probed once, judged together.
local core = require "sglr.core"
local http = require "sglr.http"

local M = {}
M.__index = M

function M.new(conf, workers, hooks)
  return setmetatable({ conf = conf, workers = workers, hooks = hooks or {} }, M)
end

local function endpoint(conf) return conf.health_check_endpoint or "/health" end

-- One GET of the health endpoint: true or nil, reason.
function M:probe(url, timeout_ms)
  local status, _, err = http.worker({
    method = "GET", url = url .. endpoint(self.conf),
    timeout_ms = timeout_ms or (self.conf.health_check_timeout_secs or 5) * 1000,
  })
  if status and status >= 200 and status < 300 then return true end
  if status then return nil, "HTTP " .. status end
  return nil, tostring(_ or err)
end

-- Wait until url answers its health endpoint, checking every
-- worker_startup_check_interval seconds, for up to worker_startup_timeout_secs.
function M:wait_ready(url)
  local deadline = core.now() + (self.conf.worker_startup_timeout_secs or 300) * 1000
  local interval = (self.conf.worker_startup_check_interval or 10) * 1000
  local last
  while true do
    local ok, err = self:probe(url, math.min(interval, 5000))
    if ok then return true end
    last = err
    local left = deadline - core.now()
    if left <= 0 then return nil, last end
    core.sleep(math.min(interval, left))
  end
end

-- Wait for several URLs at once; returns the list of ready ones and a map
-- url -> reason for the others.
function M:wait_all(urls)
  local ready, failed = {}, {}
  if #urls == 0 then return ready, failed end
  local pending = #urls
  local done = core.event()
  for _, url in ipairs(urls) do
    core.spawn(function()
      local ok, err = self:wait_ready(url)
      if ok then ready[#ready + 1] = url else failed[url] = err or "not ready" end
      pending = pending - 1
      if pending == 0 then done:set(true) end
    end)
  end
  done:wait()
  return ready, failed
end

function M:record(w, ok, err)
  local conf = self.conf
  if ok then
    w.health_failures = 0
    w.health_successes = w.health_successes + 1
    if not w.healthy and w.health_successes >= (conf.health_success_threshold or 2) then
      w.healthy = true
      if self.hooks.changed then self.hooks.changed(w, true) end
    end
  else
    w.health_successes = 0
    w.health_failures = w.health_failures + 1
    w.last_health_error = err
    if w.healthy and w.health_failures >= (conf.health_failure_threshold or 3) then
      w.healthy = false
      if self.hooks.changed then self.hooks.changed(w, false, err) end
    end
  end
end

function M:check_all()
  -- one probe per server: a dp-aware worker's ranks share the answer
  local groups, order = {}, {}
  for _, w in ipairs(self.workers.list) do
    local g = groups[w.base_url]
    if not g then
      g = {}
      groups[w.base_url] = g
      order[#order + 1] = w.base_url
    end
    g[#g + 1] = w
  end
  for _, base in ipairs(order) do
    local g = groups[base]
    if not g[1].checking then
      for _, w in ipairs(g) do w.checking = true end
      core.spawn(function()
        local ok, err = self:probe(base)
        for _, w in ipairs(g) do
          w.checking = false
          if not w.removed then self:record(w, ok, err) end
        end
      end)
    end
  end
end

function M:start()
  local uv = require "luv"
  local ms = (self.conf.health_check_interval_secs or 60) * 1000
  if ms <= 0 then return end
  self.timer = uv.new_timer()
  self.timer:start(ms, ms, function() self:check_all() end)
  self.timer:unref()
end

function M:stop()
  if self.timer then self.timer:stop(); self.timer:close(); self.timer = nil end
end

return M

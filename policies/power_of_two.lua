-- Power of two choices: sample two distinct workers at random and send the
-- request to the less loaded one. Two random probes keep the maximum load
-- far below that of one random pick, at the cost of knowing only two loads.
--
-- A worker's load is what its GET /get_load last reported, polled every
-- load_check_interval seconds; until a poll has answered (or after one
-- failed) the router's own in-flight count for that worker stands in.
-- SGLang has answered /get_load with {"load": n}, with one such object per
-- data-parallel rank in a list, and with per-rank request counts; every
-- "load" (else "num_reqs" + "num_waiting_reqs") found is summed.

local setmetatable, type, tonumber, pairs = setmetatable, type, tonumber, pairs
local gmatch, match = string.gmatch, string.match

local P = {
  name = "power_of_two",
  version = "1.0.0",
  description = "Pick two workers at random and send to the less loaded one.",
}

P.options = {
  load_check_interval = {
    type = "number", default = 10, min = 0,
    description = "Seconds between polls of each worker's GET /get_load (0: never poll, "
               .. "use the router's in-flight counts).",
  },
}

local mt = { __index = P }

-- The load in a /get_load body, or nil when it has none we can read.
function P.parse_load(body)
  if type(body) ~= "string" then return nil end
  local bare = tonumber(match(body, "^%s*(%-?[%d.eE+]+)%s*$"))
  if bare then return bare end
  local total, found = 0, false
  for v in gmatch(body, '"load"%s*:%s*(%-?[%d.eE+]+)') do
    local n = tonumber(v)
    if n then total, found = total + n, true end
  end
  if found then return total end
  for _, key in pairs({ "num_reqs", "num_waiting_reqs" }) do
    for v in gmatch(body, '"' .. key .. '"%s*:%s*(%-?[%d.eE+]+)') do
      local n = tonumber(v)
      if n then total, found = total + n, true end
    end
  end
  if found then return total end
  return nil
end

function P.new(conf, rt)
  local interval = conf and conf.load_check_interval
  if interval == nil then interval = P.options.load_check_interval.default end
  local self = setmetatable({
    rt = rt,
    interval = interval,
    polled = {},      -- url -> last load read from the worker
    known = {},       -- url -> true: workers to poll
    polling = false,
  }, mt)
  if interval > 0 and rt.every and rt.http then
    rt.every(interval * 1000, function() self:poll() end)
  end
  return self
end

-- Poll every known worker once (inside a timer coroutine: rt.http yields).
-- A poll still running when the timer fires again is not doubled.
function P:poll()
  if self.polling then return end
  self.polling = true
  local timeout = math.min(self.interval * 1000, 5000)
  local urls = {}
  for url in pairs(self.known) do urls[#urls + 1] = url end
  for i = 1, #urls do
    local url = urls[i]
    local ok, status, body = pcall(self.rt.http, {
      method = "GET", url = url .. "/get_load", timeout_ms = timeout,
    })
    local load = ok and status == 200 and P.parse_load(body) or nil
    if self.known[url] then self.polled[url] = load end
  end
  self.polling = false
end

function P:load_of(w)
  return self.polled[w.url] or w.load or 0
end

function P:select(req, workers)
  local n = #workers
  if n == 0 then return nil, "no workers" end
  local known = self.known
  for i = 1, n do
    local url = workers[i].url
    if not known[url] then known[url] = true end
  end
  if n == 1 then return workers[1] end
  local i = self.rt.random(n)
  local j = self.rt.random(n - 1)
  if j >= i then j = j + 1 end
  local a, b = workers[i], workers[j]
  if self:load_of(b) < self:load_of(a) then return b end
  return a
end

function P:on_add(w)
  self.known[w.url] = true
end

function P:on_remove(w)
  local url = type(w) == "table" and w.url or w
  self.known[url] = nil
  self.polled[url] = nil
end

function P:stats()
  local loads = {}
  for url, l in pairs(self.polled) do loads[url] = l end
  return { polled_loads = loads }
end

return P

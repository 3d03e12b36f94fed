-- Power of two choices: sample two distinct workers at random and send the
-- request to the less loaded one. Two random probes keep the maximum load
-- far below that of one random pick, at the cost of knowing only two loads.
--
-- A worker's load is what its GET /get_load last reported, polled every
-- load_check_interval seconds; until a poll has answered (or after one
-- failed) the router's own in-flight count for that worker stands in.
-- SGLang has answered /get_load with {"load": n}, with one such object per
-- data-parallel rank in a list, and with per-rank request counts; every
-- "load" (else "num_reqs" + "num_waiting_reqs") found is summed. With
-- --dp-aware each rank is a worker of its own (w.dp_rank, w.base_url): the
-- server is polled once and each rank takes its own entry of the list.
--
-- select returns the worker and its reason: "only_choice" when one worker
-- is available, "lower_load" when the other probe was more loaded, "tie"
-- when both probes were equally loaded.

local setmetatable, type, tonumber, pairs, ipairs = setmetatable, type, tonumber, pairs, ipairs
local gmatch, match = string.gmatch, string.match
local cjson = require "cjson.safe"

local P = {
  name = "power_of_two",
  version = "1.0.0",
  -- keeps no reference to req after select returns: the router may reuse
  -- the request's table for a later request
  transient_req = true,
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

-- One rank's load in a /get_load body listing the ranks, or nil.
local function rank_load(body, rank)
  local list = cjson.decode(body)
  if type(list) ~= "table" or type(list[1]) ~= "table" then return nil end
  for i, e in ipairs(list) do
    if type(e) == "table" and (tonumber(e.dp_rank) or i - 1) == rank then
      local l = tonumber(e.load)
      if l then return l end
      local n, q = tonumber(e.num_reqs), tonumber(e.num_waiting_reqs)
      if n or q then return (n or 0) + (q or 0) end
      return nil
    end
  end
end

-- The load in a /get_load body (of one data-parallel rank when rank is
-- given), or nil when it has none we can read.
function P.parse_load(body, rank)
  if type(body) ~= "string" then return nil end
  if rank then return rank_load(body, rank) end
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
    known = {},       -- url -> { base = URL polled, rank = dp rank or false }
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
  -- one request per server: the ranks of a dp-aware worker share it
  local by_base, bases = {}, {}
  for url, k in pairs(self.known) do
    local list = by_base[k.base]
    if not list then
      list = {}
      by_base[k.base] = list
      bases[#bases + 1] = k.base
    end
    list[#list + 1] = url
  end
  for i = 1, #bases do
    local base = bases[i]
    local ok, status, body = pcall(self.rt.http, {
      method = "GET", url = base .. "/get_load", timeout_ms = timeout,
    })
    for _, url in ipairs(by_base[base]) do
      local k = self.known[url]
      if k then self.polled[url] = ok and status == 200 and P.parse_load(body, k.rank or nil) or nil end
    end
  end
  self.polling = false
end

-- A reload's new instance takes the loads polled so far, so it does not
-- route on in-flight counts alone until its first poll.
function P:migrate(old)
  if type(old) ~= "table" or type(old.polled) ~= "table" or type(old.known) ~= "table" then return end
  for url, l in pairs(old.polled) do self.polled[url] = l end
  for url, k in pairs(old.known) do self.known[url] = k end
end

function P:load_of(w)
  return self.polled[w.url] or w.load or 0
end

function P:select(req, workers)
  local n = #workers
  if n == 0 then return nil, "no workers" end
  local known = self.known
  for i = 1, n do
    local w = workers[i]
    if not known[w.url] then self:on_add(w) end
  end
  if n == 1 then return workers[1], "only_choice" end
  local i = self.rt.random(n)
  local j = self.rt.random(n - 1)
  if j >= i then j = j + 1 end
  local a, b = workers[i], workers[j]
  local la, lb = self:load_of(a), self:load_of(b)
  if lb < la then return b, "lower_load" end
  return a, la < lb and "lower_load" or "tie"
end

function P:on_add(w)
  self.known[w.url] = { base = w.base_url or w.url, rank = w.dp_rank or false }
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

-- The worker registry: every worker the router knows, with its upstream
-- pool, in-flight load, health and breaker. Workers come from sources: the
-- command line ("static"), the admin API ("admin"), Kubernetes discovery
-- ("discovery"). Every source adds and removes through add() and remove(),
-- whose hooks (the router's) run the rest of the path: metric series made
-- and removed, policy on_add / on_remove, logs. Health checks and breakers
-- cover every registered worker alike.
--
-- With --dp-aware a worker of dp_size N is N entries, one per
-- data-parallel rank, so that policies, loads, breakers and metrics see
-- each rank on its own:
--
--   http://w1:8000 (dp_size 2) -> { url = "http://w1:8000@0", base_url = "http://w1:8000", dp_rank = 0 }
--                                 { url = "http://w1:8000@1", base_url = "http://w1:8000", dp_rank = 1 }
--
-- The entries share one connection pool and are health-checked as one
-- (base_url is what is probed and sent to). Every other worker's base_url
-- is its url.
local core = require "sglr.core"
local breaker = require "sglr.breaker"

local M = {}
M.__index = M

M.SOURCES = { static = true, admin = true, discovery = true }

-- URL check shared by the CLI and /add_worker: http(s)://host[:port][/path]
function M.check_url(url)
  if type(url) ~= "string" or url == "" then return nil, "worker URL is empty" end
  local scheme, rest = url:match("^(https?)://(.+)$")
  if not scheme then return nil, "invalid worker URL '" .. url .. "': must start with http:// or https://" end
  if rest:find("[%c%s?#]") then
    return nil, "invalid worker URL '" .. url:gsub("%c", "?") .. "': no spaces, control bytes, query or fragment allowed"
  end
  local host = rest:match("^%[[^%]]+%]") or rest:match("^[^:/]+")
  if not host or host == "" then return nil, "invalid worker URL '" .. url .. "': missing host" end
  local tail = rest:sub(#host + 1)
  local port = tail:match("^:(%d*)")
  if port ~= nil then
    local p = tonumber(port)
    if not p or p < 1 or p > 65535 then return nil, "invalid worker URL '" .. url .. "': bad port" end
  end
  -- scheme and host are case-insensitive: one spelling
  return ((scheme .. "://" .. host:lower() .. tail):gsub("/+$", ""))
end

-- The address a checked URL dials, "scheme://host:port" with the scheme's
-- port made explicit: two URLs with the same address are one worker.
function M.address_of(norm)
  local scheme, host, port = norm:match("^(https?)://(%[[^%]]+%])(:?%d*)")
  if not scheme then scheme, host, port = norm:match("^(https?)://([^:/@]+)(:?%d*)") end
  if not scheme then return norm end
  if port == "" then port = scheme == "https" and ":443" or ":80" end
  return scheme .. "://" .. host .. port
end

function M.new(conf, hooks)
  return setmetatable({ conf = conf, list = {}, by_url = {}, by_addr = {}, hooks = hooks or {} }, M)
end

-- A URL as the registry keys it (checked when it can be, so a spelling
-- that check_url would change still finds its worker).
local function key_of(url)
  url = url or ""
  local norm = M.check_url((url:gsub("@%d+$", "")))
  if norm then return norm .. (url:match("@%d+$") or "") end
  return (url:gsub("/+$", ""))
end

function M:get(url)
  local key = key_of(url)
  return self.by_url[key] or self.by_addr[M.address_of((key:gsub("@%d+$", ""))) .. (key:match("@%d+$") or "")]
end

-- A pod's identity, copied: { namespace =, name =, uid = } (strings).
local function pod_of(pod)
  if pod == nil then return nil end
  if type(pod) ~= "table" then error("workers:add: opts.pod must be a table", 3) end
  local out = {}
  for _, k in ipairs({ "namespace", "name", "uid" }) do
    local v = pod[k]
    if type(v) ~= "string" or v == "" then
      error("workers:add: opts.pod." .. k .. " must be a non-empty string", 3)
    end
    out[k] = v
  end
  return out
end

-- The entries of a worker: its ranks for a base URL, the worker itself
-- for a plain URL or one rank's "url@rank". Registration order.
function M:entries(url)
  local norm = key_of(url)
  local rank = norm:match("@%d+$")
  local base_addr = M.address_of((norm:gsub("@%d+$", "")))
  local w = self.by_url[norm] or self.by_addr[base_addr .. (rank or "")]
  if w then return { w } end
  local out = {}
  if rank then return out end
  for _, e in ipairs(self.list) do
    if e.base_addr == base_addr then out[#out + 1] = e end
  end
  return out
end

-- add(url, { source = "static"|"admin"|"discovery" (default "static"),
--            pod = { namespace =, name =, uid = }, role =, healthy =,
--            bootstrap_port =, dp_rank =, dp_size =, pool =, labels = }) -> worker | nil, err.
-- With dp_rank the entry is "url@rank" (pool: the connections shared with
-- the worker's other ranks).
function M:add(url, opts)
  opts = opts or {}
  local source = opts.source or "static"
  if not M.SOURCES[source] then error("workers:add: unknown source '" .. tostring(source) .. "'", 2) end
  local pod = pod_of(opts.pod)
  local norm, err = M.check_url(url)
  if not norm then return nil, err end
  local rank = opts.dp_rank
  local key = rank and (norm .. "@" .. rank) or norm
  local addr = M.address_of(norm) .. (rank and "@" .. rank or "")
  local known = self.by_url[key] or self.by_addr[addr]
  if known then
    return nil, "worker " .. key .. " is already registered" ..
      (known.url ~= key and " as " .. known.url or "") ..
      (known.source ~= source and " (from " .. known.source .. ")" or "")
  end
  if not norm:match("^http://") then
    return nil, "worker " .. norm .. ": only http:// workers can be proxied (https is used for discovery only)"
  end
  local pool = opts.pool
  if not pool then
    pool, err = core.upstream(norm)
    if not pool then return nil, err end
  end
  local w = {
    url = key, base_url = norm, pool = pool, load = 0, processed = 0,
    dp_size = opts.dp_size,
    -- the host as the URL writes it (an IPv6 address in brackets): PD sends
    -- it to the decode as bootstrap_host
    bootstrap_host = norm:match("^https?://(%[[^%]]+%])") or norm:match("^https?://([^:/]+)"),
    role = opts.role or "regular", bootstrap_port = opts.bootstrap_port, dp_rank = opts.dp_rank,
    source = source, pod = pod,
    healthy = opts.healthy ~= false,
    health_failures = 0, health_successes = 0,
    -- what policies read besides the above (README "What select sees"):
    -- the breaker's state, the pod's labels, the load the worker last
    -- reported in /get_load (false until then) and a moving average of
    -- its request latency in ms (false until a request settled)
    circuit = "closed", labels = opts.labels or {}, reported_load = false, latency_ms = false,
  }
  w.breaker = breaker.new(self.conf, function(from, to)
    w.circuit = to
    if self.hooks.breaker_change then self.hooks.breaker_change(w, from, to) end
  end)
  self.list[#self.list + 1] = w
  self.by_url[key] = w
  w.addr, w.base_addr = addr, M.address_of(norm)
  self.by_addr[addr] = w
  if self.hooks.added then self.hooks.added(w) end
  return w
end

-- One entry per rank 0..dp_size-1 of the worker at url, sharing a pool.
-- -> list of entries | nil, err (then none was added)
function M:add_ranks(url, dp_size, opts)
  local norm, err = M.check_url(url)
  if not norm then return nil, err end
  if #self:entries(norm) > 0 then return nil, "worker " .. norm .. " is already registered" end
  local pool
  pool, err = core.upstream(norm)
  if not pool then return nil, err end
  local out = {}
  for r = 0, dp_size - 1 do
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.dp_rank, o.dp_size, o.pool = r, dp_size, pool
    local w
    w, err = self:add(norm, o)
    if not w then
      for _, e in ipairs(out) do self:remove(e.url) end
      return nil, err
    end
    out[#out + 1] = w
  end
  return out
end

-- remove(url [, { source =, uid = }]) -> list of the removed entries | nil,
-- err: every rank of a dp-aware worker given by its base URL, or one entry.
-- With source (or a pod's uid), only entries from that source (that pod) go:
-- a source never takes away a worker another one gave, nor a pod's
-- successor at the same address.
function M:remove(url, opts)
  local gone = self:entries(url)
  if #gone == 0 then return nil, "worker " .. tostring(url) .. " is not registered" end
  local w = gone[1]
  if opts and opts.source and opts.source ~= w.source then
    return nil, "worker " .. w.url .. " came from " .. w.source .. ", not " .. opts.source
  end
  if opts and opts.uid and (not w.pod or w.pod.uid ~= opts.uid) then
    return nil, "worker " .. w.url .. " is not pod " .. opts.uid
  end
  for _, e in ipairs(gone) do
    for i, v in ipairs(self.list) do
      if v == e then table.remove(self.list, i) break end
    end
    self.by_url[e.url] = nil
    if self.by_addr[e.addr] == e then self.by_addr[e.addr] = nil end
    e.removed = true
    if self.hooks.removed then self.hooks.removed(e) end
  end
  return gone
end

-- Workers that may take a request now. `exclude` (base URL -> true) drops
-- the workers that already failed this request (every rank of one), unless
-- nothing else is left.
-- The list belongs to the caller: a policy may yield (await rt.http) while
-- other requests route, so a list shared between calls would change under it.
-- `out`, when given, is an empty list of the caller's to fill (the flow
-- recycles its lists instead of making one per request).
function M:available(now, exclude, role, out)
  local excluded = 0
  out = out or {}
  local list = self.list
  if #list == 1 and not exclude then
    -- one worker: no loop of one trip (see flow.give_list)
    local w = list[1]
    if w.healthy and (not role or w.role == role) and w.breaker:allow(now) then out[1] = w end
    return out
  end
  for _, w in ipairs(list) do
    if w.healthy and (not role or w.role == role) and w.breaker:allow(now) then
      if exclude and exclude[w.base_url] then
        excluded = excluded + 1
      else
        out[#out + 1] = w
      end
    end
  end
  if #out == 0 and excluded > 0 then
    for _, w in ipairs(self.list) do
      if w.healthy and (not role or w.role == role) and w.breaker:allow(now) then out[#out + 1] = w end
    end
  end
  return out
end

-- The workers a source gave, in registration order.
function M:from_source(source)
  local out = {}
  for _, w in ipairs(self.list) do
    if w.source == source then out[#out + 1] = w end
  end
  return out
end

function M:healthy_count()
  local n = 0
  for _, w in ipairs(self.list) do if w.healthy then n = n + 1 end end
  return n
end

function M:first_healthy()
  for _, w in ipairs(self.list) do if w.healthy then return w end end
end

return M

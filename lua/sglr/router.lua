-- The router: HTTP surface, request flow (policy, forward, retry, breaker),
-- admin endpoints and lifecycle. Each request runs in its own coroutine; the
-- waits below (forward, sleep, queue) are native primitives that yield.
local core = require "sglr.core"
local cjson = require "cjson.safe"
local log = require "sglr.log"
local stats = require "sglr.stats"
local http = require "sglr.http"
local retry = require "sglr.retry"
local ratelimit = require "sglr.ratelimit"
local flow_mod = require "sglr.flow"
local workers_mod = require "sglr.workers"
local health_mod = require "sglr.health"
local policy_mod = require "sglr.policy"
local shadow_mod = require "sglr.shadow"
local decisions_mod = require "sglr.decisions"
local slot_mod = require "sglr.slot"

local floor, min = math.floor, math.min
local concat = table.concat
local byte = string.byte
local bor, bxor = bit.bor, bit.bxor

local M = {}
M.__index = M

local ROUTES = {
  ["/generate"] = "generate",
  ["/v1/chat/completions"] = "chat",
  ["/v1/completions"] = "completions",
}
-- The same by the number sglr_lua_x_inference gives a POST to one of them
-- (through the FFI: no path or method string per request); false when
-- the FFI cannot reach it, and then the path and method decide.
local INFERENCE = { "generate", "chat", "completions" }
local x_inference = false
do
  local ok, ffi = pcall(require, "ffi")
  if ok and pcall(ffi.cdef, "int sglr_lua_x_inference(void *x);")
      and pcall(function() return ffi.C.sglr_lua_x_inference end) then
    local f = ffi.C.sglr_lua_x_inference
    x_inference = function(x) return type(x) == "userdata" and f(x) or -1 end
  end
end

local JSON_HDR = { ["content-type"] = "application/json" }

-- Routes behind --admin-api-key (every route that changes the fleet).
local ADMIN_ROUTES = { ["/add_worker"] = true, ["/remove_worker"] = true, ["/flush_cache"] = true,
  ["/admin/policy"] = true, ["/admin/policy/shadow"] = true, ["/admin/decisions"] = true }

-- Largest dp_size believed from a worker's /get_server_info.
local MAX_DP_SIZE = 1024

-- --- small helpers --------------------------------------------------------------

local function merge(a, b)
  local out = {}
  if a then for k, v in pairs(a) do out[k] = v end end
  if b then for k, v in pairs(b) do out[k] = v end end
  return out
end
M.merge = merge

local function error_body(status, message, etype)
  return cjson.encode({ error = { message = message, type = etype or "router_error", code = status } })
end

-- Whether a client's secret equals ours, in time that depends on the
-- length of what the client sent only (never on where they differ, nor on
-- our key's length).
local function same_secret(given, want)
  local n, m = #given, #want
  local diff = n == m and 0 or 1
  for i = 1, n do
    diff = bor(diff, bxor(byte(given, i), byte(want, (i - 1) % m + 1)))
  end
  return diff == 0
end
M.same_secret = same_secret

-- The token of an "Authorization: Bearer TOKEN" header, or nil.
local function bearer(value)
  return value and value:match("^%s*[Bb][Ee][Aa][Rr][Ee][Rr]%s+(.-)%s*$")
end

local function query_param(q, key)
  if not q then return nil end
  for part in q:gmatch("[^&]+") do
    local k, v = part:match("^([^=]*)=?(.*)$")
    if k == key then
      return (v:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
    end
  end
end

-- --- construction ---------------------------------------------------------------------

function M.new(conf)
  local self = setmetatable({ conf = conf, started = core.now() }, M)
  self.retry = retry.new(conf)
  self.limiter = ratelimit.new(conf)
  self.cors = {}
  self.cors_any = false
  for _, o in ipairs(conf.cors_allowed_origins or {}) do
    if o == "*" then self.cors_any = true end
    self.cors[o] = true
  end
  -- no CORS headers at all unless origins are configured (a router that
  -- answered every Origin with * would let any web page drive it)
  self.cors_enabled = conf.cors_allowed_origins ~= nil and #conf.cors_allowed_origins > 0
  self.cors_check = self.cors_enabled
  self.pending_adds = {}     -- URLs whose admission waits for their health
  self.pending = {}          -- dp-aware: URLs waiting to report their dp_size -> { error = }
  self.pd = conf.pd_disaggregation or false
  self.dp_aware = conf.dp_aware or false
  -- keys: what workers get (--api-key), what clients must send
  http.set_api_key(conf.api_key)
  self.admin_key = conf.admin_api_key or false
  self.inference_key = conf.inference_api_key or false
  -- the Authorization header of requests forwarded for a client: ours,
  -- none (the client's inference key stays here), or the client's (nil)
  self.forward_auth = http.worker_auth()
  if not self.forward_auth and conf.inference_api_key then self.forward_auth = false end
  -- the decision log (--decision-log-size, 0: none) and shadow candidates
  local dsize = conf.decision_log_size or 1000
  self.decisions = dsize > 0 and decisions_mod.new(dsize) or false
  self.shadow = shadow_mod.new(self, conf.shadow_budget_us)

  self.workers = workers_mod.new(conf, {
    added = function(w)
      log.info("worker added", { worker = w.url, healthy = w.healthy, source = w.source,
        pod = w.pod and (w.pod.namespace .. "/" .. w.pod.name) or nil })
      local policy, pname = self:policy_for(w)
      w.m = stats.for_worker(w.url, pname, w.role)
      stats.worker_health:set(w.healthy and 1 or 0, w.url)
      stats.cb_state:set(0, w.url)
      stats.running:set(0, w.url)
      if policy and policy.on_add then policy:on_add(w) end
      self.shadow:on_add(w)
      stats.active_workers:set(#self.workers.list)
    end,
    removed = function(w)
      local policy = self:policy_for(w)
      if policy and policy.on_remove then policy:on_remove(w) end
      self.shadow:on_remove(w)
      -- every series of it, a policy's own included; w.m's handles still
      -- count what requests in flight settle, into series no longer shown
      stats.remove_worker(w.url)
      stats.active_workers:set(#self.workers.list)
      log.info("worker removed", { worker = w.url, source = w.source,
        pod = w.pod and (w.pod.namespace .. "/" .. w.pod.name) or nil })
    end,
    breaker_change = function(w, from, to)
      -- a request in flight may settle after its worker went: its series
      -- must not come back
      if w.removed then return end
      stats.cb_state:set(require("sglr.breaker").STATES[to], w.url)
      stats.cb_transitions:inc(1, w.url, from, to)
      local lvl = to == "open" and "warn" or "info"
      log.log(lvl, "circuit breaker " .. from .. " -> " .. to, { worker = w.url })
    end,
  })
  self.health = health_mod.new(conf, self.workers, {
    changed = function(w, healthy, err)
      stats.worker_health:set(healthy and 1 or 0, w.url)
      if healthy then
        log.info("worker healthy again", { worker = w.url })
      else
        log.warn("worker unhealthy", { worker = w.url, error = err })
      end
    end,
  })
  self.flow = flow_mod.new(self)
  return self
end

-- The runtime API handed to policies: the only way a policy touches the
-- world. Each instance gets it through policy.scope, which tracks what the
-- instance starts (timers, requests) so that closing it stops them.
function M:runtime()
  local uv = require "luv"
  local rt = {
    now = core.now,
    random = function(n)      -- an integer in [1, n]; without n a float in [0, 1)
      if n then return math.random(n) end
      return math.random()
    end,
    log = function(level, msg, fields) log.log(level, msg, fields) end,
    metrics = stats.enabled and stats.metrics or nil,
    stats = stats,
    http = http.worker,       -- a policy's requests go to workers: they carry --api-key
    http_start = http.has_curl and http.worker_start or nil,
    sleep = core.sleep,     -- only inside rt.every callbacks (they run in coroutines)
  }
  rt.radix = function()
    return require("sglr.radix_ffi").new()
  end
  rt.every = function(ms, fn)
    local t = uv.new_timer()
    t:start(ms, ms, function() core.spawn(fn, core.now()) end)
    t:unref()
    return { stop = function()
      if not t:is_closing() then
        t:stop()
        t:close()
      end
    end }
  end
  return rt
end

local POOL_FLAG = { regular = "--policy", prefill = "--prefill-policy", decode = "--decode-policy" }

-- What a pool's policy is built from at start: its name or path, and its
-- options. --policy-opt (and in PD mode the pool's --prefill-policy-opt /
-- --decode-policy-opt, which win over it) name options the policy must
-- declare; the SGLang-named flags (--cache-threshold ...) apply to the
-- policies that declare them, and contradicting --policy-opt is an error.
-- power_of_two's poll interval defaults to --worker-startup-check-interval,
-- as in SGLang's router. -> spec | nil, err
function M:policy_spec(pool)
  local conf = self.conf
  local given = merge(conf.policy_opt, pool ~= "regular" and conf[pool .. "_policy_opt"] or nil)
  local opts = merge({ load_check_interval = conf.worker_startup_check_interval }, conf.policy_options)
  for key, alias in pairs(conf.policy_options or {}) do
    local v = given[key]
    if v ~= nil and tonumber(v) ~= alias then
      return nil, string.format("--%s %s and --policy-opt %s=%s disagree (give one of them)",
        (key:gsub("_", "-")), tostring(alias), key, tostring(v))
    end
  end
  local strict = {}
  for key, v in pairs(given) do
    opts[key] = v
    strict[key] = true
  end
  local name = pool == "regular" and conf.policy or conf[pool .. "_policy"] or conf.policy
  return { policy = name or "cache_aware", options = opts, strict = strict, aliases = conf.policy_options }
end

-- The registered workers a pool's policy routes to.
function M:pool_workers(pool)
  local out = {}
  for _, w in ipairs(self.workers.list) do
    if w.role == pool then out[#out + 1] = w end
  end
  return out
end

-- A slot's new instance goes live: new requests capture it (flow's
-- req.policy / req.dpolicy).
function M:swap_policy(pool, inst, entry)
  if pool == "decode" then
    self.dpolicy, self.policy_names.decode = inst, entry.name
  else
    self.policy = inst
    if self.pd then self.policy_names.prefill = entry.name end
  end
  if self.pd then
    local pn, dn = self.policy_names.prefill, self.policy_names.decode
    self.policy_name = (pn == dn or not dn) and pn or ((pn or "?") .. "/" .. dn)
  else
    self.policy_name = entry.name
  end
end

-- Regular mode has one pool ("regular"); PD mode two, "prefill" and
-- "decode" (--prefill-policy and --decode-policy, each falling back to
-- --policy). Each pool's policy lives in a slot (sglr.slot), which swaps
-- it on reload.
function M:load_policy()
  self.slots, self.policy_names = {}, {}
  for _, pool in ipairs(self.pd and { "prefill", "decode" } or { "regular" }) do
    local spec, err = self:policy_spec(pool)
    if not spec then return nil, err end
    local slot = slot_mod.new({ pool = pool, conf = self.conf,
      base_rt = function() return self:runtime() end,
      workers = function() return self:pool_workers(pool) end,
      swap = function(inst, entry) self:swap_policy(pool, inst, entry) end })
    self.slots[pool] = slot
    local ok
    ok, err = slot:load(spec, "start")
    if not ok then return nil, (self.pd and POOL_FLAG[pool] .. ": " or "") .. tostring(err) end
  end
  return true
end

-- Reload the policies while serving. `change` (nil: every pool's code read
-- again from disk, with its options) may carry:
--   pool     "regular" | "prefill" | "decode" (default: every pool)
--   code     Lua source of a policy, or
--   policy   a built-in name or a path to a .lua file
--   options  { key = value }: the policy must declare each; without it,
--            the pool's options are kept where the new policy declares them;
--            alone, the live code is instantiated again with them
-- A pool's new instance goes live only when it loads, its options check and
-- its select answers on synthetic workers; else the pool keeps its policy.
-- -> true, views | nil, err, views
function M:reload_policy(change, why)
  change = change or {}
  local pools = {}
  if change.pool ~= nil then
    if not self.slots[change.pool] then
      local have = {}
      for p in pairs(self.slots) do have[#have + 1] = p end
      table.sort(have)
      return nil, "unknown pool '" .. tostring(change.pool) .. "' (this router has: " .. concat(have, ", ") .. ")"
    end
    pools[1] = change.pool
  else
    for _, p in ipairs({ "regular", "prefill", "decode" }) do
      if self.slots[p] then pools[#pools + 1] = p end
    end
  end
  if change.options ~= nil and type(change.options) ~= "table" then
    return nil, "options must be an object { key: value }"
  end
  if change.code ~= nil and type(change.code) ~= "string" then return nil, "code must be a string" end
  if change.policy ~= nil and (type(change.policy) ~= "string" or change.policy == "") then
    return nil, "policy must be a built-in name or a path to a .lua file"
  end
  local errs, views = {}, {}
  for _, pool in ipairs(pools) do
    local slot = self.slots[pool]
    local cur = slot.current.spec
    local spec = { policy = cur.policy, code = cur.code, options = cur.options, strict = cur.strict,
      aliases = cur.aliases, source = cur.source }
    if change.code or change.policy then
      spec.code, spec.policy, spec.source = change.code, change.policy, change.policy or "posted code"
      spec.strict = nil   -- the old options carry over only where the new code declares them
    end
    if change.options then
      local opts = merge({ load_check_interval = self.conf.worker_startup_check_interval }, cur.aliases)
      local strict = {}
      for k, v in pairs(change.options) do
        if type(v) == "table" then return nil, "option '" .. tostring(k) .. "' must be a number, string or boolean" end
        opts[k], strict[k] = v, true
      end
      spec.options, spec.strict = opts, strict
      -- options alone: the live code with them, not the file as it is now
      if not (change.code or change.policy) then spec.reuse_src = slot.current.src end
    end
    log.info("policy reload", { pool = pool, by = why, policy = spec.policy or "posted code" })
    local ok, err = slot:load(spec, "ok")
    if not ok then errs[#errs + 1] = pool .. ": " .. tostring(err) end
    views[pool] = slot:view()
  end
  if #errs > 0 then return nil, concat(errs, "; "), views end
  return true, views
end

-- GET /admin/policy: every pool's live policy, its last good version and
-- recent events.
function M:policy_view()
  local pools = {}
  for pool, slot in pairs(self.slots) do
    local v = slot:view()
    v.events = setmetatable(v.events, cjson.array_mt)
    pools[pool] = v
  end
  -- the shadow candidates beside the live policies (POST/DELETE
  -- /admin/policy/shadow change them)
  return { pools = pools, shadows = setmetatable(self:shadow_status(), cjson.array_mt) }
end

function M:admin_policy_get(x)
  self:send_json(x, 200, self:policy_view())
end

-- POST /admin/policy: an empty body reloads every pool from disk; a JSON
-- body says what to change (reload_policy).
function M:admin_policy_post(x)
  local body = x:body()
  local change
  if body and body:match("%S") then
    change = cjson.decode(body)
    if type(change) ~= "table" then
      return self:send_error(x, 400, "body must be a JSON object: {\"code\": ...} or {\"policy\": ..., \"options\": {...}}",
        "invalid_request_error")
    end
  end
  local ok, err, views = self:reload_policy(change, "POST /admin/policy")
  if not ok then
    return self:send_json(x, 422, { error = { message = "policy refused: " .. tostring(err), type = "policy_refused",
      code = 422 }, pools = views })
  end
  self:send_json(x, 200, { result = "ok", pools = err })
end

-- The policy instance (and its name) that routes to worker w.
function M:policy_for(w)
  if self.pd and w.role == "decode" then return self.dpolicy, self.policy_names.decode end
  if self.pd then return self.policy, self.policy_names.prefill end
  return self.policy, self.policy_name
end

-- --- responses --------------------------------------------------------------------

function M:cors_headers(x, h)
  if not self.cors_enabled then return h end
  local origin = x:header("origin")
  if not origin then return h end
  if self.cors_any or self.cors[origin] then
    h = h or {}
    h["access-control-allow-origin"] = self.cors_any and "*" or origin
    h["access-control-expose-headers"] = "x-request-id"
    h["vary"] = "origin"
  end
  return h
end

function M:send_error(x, status, message, etype, extra)
  if x:state() ~= "handling" then return end
  x:respond(status, merge(JSON_HDR, extra), error_body(status, message, etype))
end

function M:send_json(x, status, obj, extra)
  x:respond(status, merge(JSON_HDR, extra), cjson.encode(obj))
end

-- --- other endpoints ---------------------------------------------------------------------

-- Proxy a GET to the first healthy worker that answers (next one on a
-- connect failure; a dp-aware worker's ranks are one server).
function M:first_worker(x, path, role)
  local tried, seen = 0, {}
  local headers = self.forward_auth ~= nil and { authorization = self.forward_auth } or nil
  for _, w in ipairs(self.workers.list) do
    if w.healthy and (not role or w.role == role) and not seen[w.base_url] then
      seen[w.base_url] = true
      tried = tried + 1
      local resp, err = x:forward(w.pool, { method = "GET", path = path, body = "",
        timeout_ms = (self.conf.request_timeout_secs or 600) * 1000,
        connect_timeout_ms = self.conf.connect_timeout_ms or 5000, headers = headers })
      if resp then
        resp:pipe(self:cors_headers(x, nil))
        resp:close()
        return
      end
      if err == "client_closed" then return end
    end
  end
  if tried == 0 then
    return self:send_error(x, 503, "no healthy " .. (role and role .. " " or "") .. "workers available",
      "no_workers")
  end
  self:send_error(x, 502, "no worker answered", "worker_unreachable")
end

-- PD /health_generate: one healthy pair, both asked at once; healthy only
-- when both answer 2xx.
function M:health_generate_pd(x)
  local pair = {}
  for _, role in ipairs({ "prefill", "decode" }) do
    for _, w in ipairs(self.workers.list) do
      if w.healthy and w.role == role then pair[#pair + 1] = w break end
    end
    if #pair == 0 or pair[#pair].role ~= role then
      return self:send_error(x, 503, "no healthy " .. role .. " worker", "no_workers")
    end
  end
  local timeout = (self.conf.health_check_timeout_secs or 5) * 1000
  local results = self:fan_out(pair, function(w)
    return http.worker({ method = "GET", url = w.base_url .. "/health_generate", timeout_ms = timeout })
  end)
  local out, ok = {}, true
  for i, w in ipairs(pair) do
    local st = results[i][1]
    local good = st and st >= 200 and st < 300
    ok = ok and good
    out[i] = { worker = w.url, role = w.role, status = st, error = not st and tostring(results[i][2]) or nil }
  end
  if ok then return x:respond(200, { ["content-type"] = "text/plain" }, "OK\n") end
  self:send_json(x, 503, { error = { message = "health_generate failed on the prefill/decode pair",
    type = "unhealthy_workers", workers = setmetatable(out, cjson.array_mt) } })
end

-- Run fn(w) for every worker concurrently; returns the results by index.
function M:fan_out(list, fn)
  local results, pending = {}, #list
  if pending == 0 then return results end
  local done = core.event()
  for i, w in ipairs(list) do
    core.spawn(function()
      local ok, a, b = pcall(fn, w)
      results[i] = ok and { a, b } or { nil, a }
      pending = pending - 1
      if pending == 0 then done:set(true) end
    end)
  end
  done:wait()
  return results
end

-- The servers behind the registry: one per base URL (a dp-aware worker's
-- ranks are one server), in registration order.
function M:servers()
  local out, seen = {}, {}
  for _, w in ipairs(self.workers.list) do
    if not seen[w.base_url] then
      seen[w.base_url] = true
      out[#out + 1] = w.base_url
    end
  end
  return out
end

function M:flush_cache(x)
  local list = self:servers()
  local results = self:fan_out(list, function(url)
    local st, body = http.worker({ method = "POST", url = url .. "/flush_cache", body = "",
      timeout_ms = (self.conf.health_check_timeout_secs or 5) * 1000 })
    return st, body
  end)
  local failed = {}
  for i, url in ipairs(list) do
    local st = results[i][1]
    if not st or st < 200 or st >= 300 then
      failed[#failed + 1] = { worker = url, status = st, error = st and nil or tostring(results[i][2]) }
    end
  end
  if #failed == 0 then
    return x:respond(200, { ["content-type"] = "text/plain" }, "Cache flushed on all servers\n")
  end
  self:send_json(x, 500, { error = { message = "cache flush failed on " .. #failed .. " worker(s)",
    type = "flush_failed", workers = failed } })
end

-- A /get_load body: the total load, and per rank (rank -> load) when the
-- worker lists its data-parallel ranks; nil when unreadable.
local function parse_load(body)
  local obj = cjson.decode(body or "")
  if type(obj) ~= "table" then return nil end
  if type(obj.load) == "number" then return obj.load end
  if type(obj[1]) == "table" then   -- a list of per-rank entries
    local sum, ranks = 0, {}
    for i, e in ipairs(obj) do
      local l = tonumber(e.load) or ((tonumber(e.num_reqs) or 0) + (tonumber(e.num_waiting_reqs) or 0))
      sum = sum + l
      ranks[tonumber(e.dp_rank) or (i - 1)] = l
    end
    return sum, ranks
  end
end

function M:get_loads(x)
  local list = {}      -- the workers as they are now: the fan-out yields
  for i, w in ipairs(self.workers.list) do list[i] = w end
  local servers = self:servers()
  local results = self:fan_out(servers, function(url)
    local st, body = http.worker({ method = "GET", url = url .. "/get_load",
      timeout_ms = (self.conf.health_check_timeout_secs or 5) * 1000 })
    if st ~= 200 then return nil end
    return parse_load(body)
  end)
  local by_server = {}
  for i, url in ipairs(servers) do by_server[url] = results[i] end
  local out, by_role = {}, { prefill = {}, decode = {} }
  for i, w in ipairs(list) do
    local res = by_server[w.base_url] or {}
    local load = res[1] or -1
    if w.dp_rank and res[2] then load = res[2][w.dp_rank] or -1 end
    out[i] = { worker = w.url, load = load, role = w.role, dp_rank = w.dp_rank }
    if load >= 0 and not w.removed then
      stats.worker_load:set(load, w.url)
      w.reported_load = load      -- what policies see (w.reported_load)
    end
    local r = by_role[w.role]
    if r then r[#r + 1] = { worker = w.url, load = load } end
  end
  local body = { workers = setmetatable(out, cjson.array_mt) }
  if self.pd then    -- and the SGLang router's PD shape
    body.prefill = setmetatable(by_role.prefill, cjson.array_mt)
    body.decode = setmetatable(by_role.decode, cjson.array_mt)
  end
  self:send_json(x, 200, body)
end

function M:worker_view(w)
  local pool = w.pool:stats()
  return { url = w.url, healthy = w.healthy, load = w.load, processed = w.processed,
    role = w.role, bootstrap_port = w.role == "prefill" and (w.bootstrap_port or cjson.null) or nil,
    circuit = w.breaker.state, last_health_error = w.last_health_error,
    source = w.source, pod = w.pod, address = pool.address, resolve_error = pool.resolve_error,
    base_url = w.dp_rank and w.base_url or nil, dp_rank = w.dp_rank, dp_size = w.dp_size }
end

function M:list_workers(x)
  local urls, details = {}, {}
  for i, w in ipairs(self.workers.list) do
    urls[i] = w.url
    details[i] = self:worker_view(w)
  end
  local function pstats(p) return p.stats and p:stats() or nil end
  local body = { urls = setmetatable(urls, cjson.array_mt),
    workers = setmetatable(details, cjson.array_mt), policy = self.policy_name,
    policy_stats = pstats(self.policy) }
  if self.pd then
    body.prefill_policy, body.decode_policy = self.policy_names.prefill, self.policy_names.decode
    body.decode_policy_stats = pstats(self.dpolicy)
  end
  if next(self.pending) then
    -- dp-aware workers that have not reported a dp_size yet (not routed to)
    local pending = {}
    for url, p in pairs(self.pending) do
      pending[#pending + 1] = { url = url, role = p.opts.role, error = p.error }
    end
    table.sort(pending, function(a, b) return a.url < b.url end)
    body.pending = pending
  end
  self:send_json(x, 200, body)
end

-- --dp-aware: the dp_size a worker reports in /get_server_info, asked
-- every --worker-startup-check-interval until deadline (a worker may
-- answer /health before its server info is complete). A worker that
-- reports none serves as one rank. -> n | nil, err
function M:dp_size_of(url, deadline)
  local interval = (self.conf.worker_startup_check_interval or 10) * 1000
  local last
  while true do
    local st, body, err = http.worker({ method = "GET", url = url .. "/get_server_info",
      timeout_ms = min(interval, 5000) })
    local info = st == 200 and cjson.decode(body or "")
    if type(info) == "table" then
      local n = info.dp_size
      if n == nil or n == cjson.null then
        log.warn("worker reports no dp_size in /get_server_info; routing to it as one rank",
          { worker = url })
        return 1
      end
      if type(n) ~= "number" or n ~= floor(n) or n < 1 or n > MAX_DP_SIZE then
        return nil, "/get_server_info reports dp_size " .. tostring(n) .. " (expected 1.." .. MAX_DP_SIZE .. ")"
      end
      return n
    end
    last = st and ("/get_server_info answered " .. st .. (st == 200 and " without a JSON object" or ""))
      or ("/get_server_info: " .. tostring(err))
    local left = deadline - core.now()
    if left <= 0 then return nil, last end
    core.sleep(min(interval, left))
  end
end

-- Register a worker: its ranks with --dp-aware (dp_size asked until
-- deadline unless given as n), else the worker itself. -> true | nil, err
function M:register(url, opts, deadline, n)
  if not self.dp_aware then
    local w, err = self.workers:add(url, opts)
    return w ~= nil or nil, err
  end
  local err
  if not n then
    n, err = self:dp_size_of(url, deadline)
    if not n then return nil, err end
  end
  local ranks
  ranks, err = self.workers:add_ranks(url, n, opts)
  if not ranks then return nil, err end
  log.info("worker has " .. n .. " data-parallel rank(s)", { worker = url, dp_size = n })
  return true
end

-- --dp-aware: a worker that was not ready at startup waits here (listed as
-- pending, not routed to) and is checked again every
-- --worker-startup-check-interval until it answers its health check and
-- reports a dp_size, or is removed.
function M:join_later(url, opts, why)
  local entry = { opts = opts, error = why }
  self.pending[url] = entry
  local interval = (self.conf.worker_startup_check_interval or 10) * 1000
  core.spawn(function()
    while self.pending[url] == entry and not self.stopping do
      local ok, err = self.health:probe(url)
      if ok then
        local n
        n, err = self:dp_size_of(url, core.now())
        if n and self.pending[url] == entry then
          self.pending[url] = nil
          local o = {}
          for k, v in pairs(opts) do o[k] = v end
          o.healthy = true
          local ranks, aerr = self.workers:add_ranks(url, n, o)
          if ranks then
            log.info("worker is ready with " .. n .. " data-parallel rank(s)", { worker = url })
          else
            log.warn("worker could not be added", { worker = url, error = aerr })
          end
          return
        end
      end
      entry.error = err
      core.sleep(interval)
    end
  end)
end

function M:add_worker(x, query)
  local url = query_param(query, "url")
  if not url or url == "" then
    return self:send_error(x, 400, "missing url parameter: POST /add_worker?url=http://host:port", "invalid_request_error")
  end
  local norm, err = workers_mod.check_url(url)
  if not norm then return self:send_error(x, 400, err, "invalid_request_error") end
  if norm:find("@", 1, true) then
    return self:send_error(x, 400, "invalid worker URL '" .. url .. "': user info or a rank (@) is not allowed",
      "invalid_request_error")
  end
  -- PD mode: role=prefill|decode (required), bootstrap_port=N|none for a prefill
  local opts = {}
  local role, bport = query_param(query, "role"), query_param(query, "bootstrap_port")
  if self.pd then
    if role ~= "prefill" and role ~= "decode" then
      return self:send_error(x, 400, "PD mode: add_worker needs role=prefill or role=decode", "invalid_request_error")
    end
    opts.role = role
    if bport and bport ~= "" and bport:lower() ~= "none" then
      local p = role == "prefill" and tonumber(bport)
      if not p or p ~= math.floor(p) or p < 1 or p > 65535 then
        return self:send_error(x, 400, "bootstrap_port must be a port number (1-65535) or none, for a prefill worker",
          "invalid_request_error")
      end
      opts.bootstrap_port = p
    end
  elseif (role and role ~= "regular") or bport then
    return self:send_error(x, 400, "role and bootstrap_port are for PD mode (--pd-disaggregation)",
      "invalid_request_error")
  end
  opts.source = "admin"
  local w, aerr, why = self:admit(norm, opts)
  if not w then
    return self:send_error(x, 400, aerr, why == "not_ready" and "worker_not_ready" or "invalid_request_error")
  end
  x:respond(200, { ["content-type"] = "text/plain" }, "Successfully added worker: " .. w.base_url .. "\n")
end

-- A worker joins at run time, from any source (the admin API, discovery):
-- refused when malformed or already known (or being admitted), else its
-- health is waited for (--worker-startup-timeout-secs, checked every
-- --worker-startup-check-interval), then it is registered with opts
-- (source, pod, role, bootstrap_port): with --dp-aware, one entry per rank.
-- admit(url, opts) -> worker (the first entry) | nil, err, why
-- ("invalid"|"duplicate"|"not_ready")
-- A worker URL that is this router's own listener (a request sent there
-- would come straight back).
function M:is_self(norm)
  local port = self.server and self.server:port() or self.conf.port
  if not port or port == 0 then return false end
  local addr = workers_mod.address_of(norm)
  for _, h in ipairs({ self.conf.host or "127.0.0.1", "127.0.0.1", "localhost", "[::1]", "0.0.0.0" }) do
    if addr == "http://" .. h .. ":" .. port then return true end
  end
  return false
end

function M:admit(url, opts)
  local norm, err = workers_mod.check_url(url)
  if not norm then return nil, err, "invalid" end
  if self:is_self(norm) then
    return nil, "worker " .. norm .. " is this router itself", "invalid"
  end
  if norm:find("@", 1, true) then
    return nil, "invalid worker URL '" .. url .. "': user info or a rank (@) is not allowed", "invalid"
  end
  if #self.workers:entries(norm) > 0 or self.pending_adds[norm] or self.pending[norm] then
    return nil, "worker " .. norm .. " is already registered", "duplicate"
  end
  self.pending_adds[norm] = true
  local deadline = core.now() + (self.conf.worker_startup_timeout_secs or 300) * 1000
  local ok, herr = self.health:wait_ready(norm)
  local aerr
  if ok then ok, aerr = self:register(norm, opts, deadline) end
  self.pending_adds[norm] = nil
  if herr then
    return nil, "worker " .. norm .. " did not become healthy within --worker-startup-timeout-secs: "
      .. tostring(herr), "not_ready"
  end
  if not ok then return nil, "worker " .. norm .. ": " .. tostring(aerr), "invalid" end
  return self.workers:entries(norm)[1]
end

function M:remove_worker(x, query)
  local url = query_param(query, "url")
  if not url or url == "" then
    return self:send_error(x, 400, "missing url parameter: POST /remove_worker?url=http://host:port", "invalid_request_error")
  end
  local norm = url:gsub("/+$", "")
  if self.pending[norm] then
    self.pending[norm] = nil
    return x:respond(200, { ["content-type"] = "text/plain" }, "Successfully removed worker: " .. norm .. "\n")
  end
  local gone, err = self.workers:remove(url)
  if not gone then return self:send_error(x, 404, err, "not_found") end
  local what = #gone == 1 and gone[1].url or (gone[1].base_url .. " (" .. #gone .. " ranks)")
  x:respond(200, { ["content-type"] = "text/plain" }, "Successfully removed worker: " .. what .. "\n")
end

function M:health_endpoint(x)
  local bad = {}
  for _, w in ipairs(self.workers.list) do
    if not w.healthy then bad[#bad + 1] = w.url end
  end
  for url in pairs(self.pending) do bad[#bad + 1] = url end
  if #self.workers.list == 0 and #bad == 0 then
    return self:send_error(x, 503, "no workers are registered", "no_workers")
  end
  if #bad == 0 then
    return x:respond(200, { ["content-type"] = "text/plain" }, "All servers healthy\n")
  end
  self:send_json(x, 503, { error = { message = "Unhealthy servers: " .. concat(bad, ", "),
    type = "unhealthy_workers", unhealthy = bad } })
end

-- Ready with a worker that can take a request now; in PD mode, with a
-- prefill and a decode worker.
function M:readiness(x)
  local healthy, total = 0, #self.workers.list
  local by_role = { prefill = 0, decode = 0, regular = 0 }
  local now = core.now()
  for _, w in ipairs(self.workers.list) do
    if w.healthy and w.breaker:allow(now) then
      healthy = healthy + 1
      by_role[w.role] = (by_role[w.role] or 0) + 1
    end
  end
  local ready = healthy > 0
  local body = { healthy_workers = healthy, total_workers = total }
  if self.pd then
    ready = by_role.prefill > 0 and by_role.decode > 0
    body.healthy_prefill_workers, body.healthy_decode_workers = by_role.prefill, by_role.decode
  end
  body.status = ready and "ready" or "not_ready"
  self:send_json(x, ready and 200 or 503, body)
end

function M:preflight(x)
  local origin = x:header("origin")
  if not origin then return self:send_error(x, 400, "CORS preflight without an Origin header", "invalid_request_error") end
  if not self.cors_enabled then
    return self:send_error(x, 403, "CORS is not enabled on this router (--cors-allowed-origins)", "cors_forbidden")
  end
  if not self.cors_any and not self.cors[origin] then
    return self:send_error(x, 403, "origin " .. origin .. " is not allowed", "cors_forbidden")
  end
  x:respond(204, {
    ["access-control-allow-origin"] = self.cors_any and "*" or origin,
    ["access-control-allow-methods"] = "GET, POST, OPTIONS",
    ["access-control-allow-headers"] = "content-type, authorization, x-request-id",
    ["access-control-expose-headers"] = "x-request-id",
    ["access-control-max-age"] = "3600",
    ["vary"] = "origin",
  }, "")
end

local OBSERVE_HANDLERS      -- below: method -> handler per path

local GET_PROXIED = {
  ["/health_generate"] = true, ["/get_server_info"] = true, ["/get_model_info"] = true,
  ["/v1/models"] = true,
}

-- Non-inference endpoints: method -> handler per path (a known path with
-- another method is a 405).
local GET_HANDLERS = {
  ["/health"] = function(s, x) return s:health_endpoint(x) end,
  ["/liveness"] = function(_, x) x:respond(200, { ["content-type"] = "text/plain" }, "OK\n") end,
  ["/readiness"] = function(s, x) return s:readiness(x) end,
  ["/get_loads"] = function(s, x) return s:get_loads(x) end,
  ["/list_workers"] = function(s, x) return s:list_workers(x) end,
  ["/admin/policy"] = function(s, x) return s:admin_policy_get(x) end,
}
local POST_HANDLERS = {
  ["/flush_cache"] = function(s, x) return s:flush_cache(x) end,
  ["/add_worker"] = function(s, x, q) return s:add_worker(x, q) end,
  ["/remove_worker"] = function(s, x, q) return s:remove_worker(x, q) end,
  ["/admin/policy"] = function(s, x) return s:admin_policy_post(x) end,
}

-- --- shadow candidates and decisions (admin) ------------------------------------------

-- The shadow candidates and their counts (also for GET /admin/policy).
function M:shadow_status()
  return setmetatable(self.shadow:status(), cjson.array_mt)
end

local DEFAULT_DECISIONS = 100

-- GET /admin/decisions?n=N: the last N decisions, newest first (N: 1 to
-- the log's size, default 100; a larger N is capped).
function M:decisions_endpoint(x, query)
  local raw = query_param(query, "n")
  local n = DEFAULT_DECISIONS
  if raw ~= nil then
    n = tonumber(raw)
    if not raw:match("^%d+$") or not n or n < 1 then
      return self:send_error(x, 400, "n must be a positive integer, got '" .. raw .. "'", "invalid_request_error")
    end
  end
  local ring = self.decisions
  local size = ring and ring.size or 0
  if n > size then n = size end
  local sec, usec = require("luv").gettimeofday()
  local list = ring and ring:last(n, sec * 1000 + floor(usec / 1000), core.now())
    or setmetatable({}, cjson.array_mt)
  self:send_json(x, 200, { size = size, recorded = ring and ring.n or 0, decisions = list })
end

function M:shadow_add(x)
  local body = cjson.decode(x:body() or "")
  if type(body) ~= "table" or type(body.policy) ~= "string" then
    return self:send_error(x, 400, 'expected a JSON object {"policy": NAME|PATH, "options": {...}, "name": ...}',
      "invalid_request_error")
  end
  local options = body.options
  if options == cjson.null then options = nil end
  local name = body.name
  if name == cjson.null then name = nil end
  local c, err = self.shadow:add(body.policy, options, name)
  if not c then return self:send_error(x, 400, err, "invalid_request_error") end
  for _, v in ipairs(self.shadow:status()) do
    if v.name == c.name then return self:send_json(x, 200, v) end
  end
end

function M:shadow_remove(x, query)
  local name = query_param(query, "name")
  if not name or name == "" then
    return self:send_error(x, 400, "missing name parameter: DELETE /admin/policy/shadow?name=NAME",
      "invalid_request_error")
  end
  local ok, err = self.shadow:remove(name)
  if not ok then return self:send_error(x, 404, err, "not_found") end
  self:send_json(x, 200, { removed = name })
end

OBSERVE_HANDLERS = {
  ["/admin/policy/shadow"] = { methods = "GET, POST or DELETE",
    GET = function(s, x) return s:send_json(x, 200, { candidates = s:shadow_status() }) end,
    POST = function(s, x) return s:shadow_add(x) end,
    DELETE = function(s, x, q) return s:shadow_remove(x, q) end },
  ["/admin/decisions"] = { methods = "GET", GET = function(s, x, q) return s:decisions_endpoint(x, q) end },
}

-- Whether x carries "Authorization: Bearer KEY".
function M:authorized(x, key)
  local token = bearer(x:header("authorization"))
  return token ~= nil and same_secret(token, key)
end

function M:unauthorized(x, what)
  x:respond(401, merge(JSON_HDR, self:cors_headers(x, { ["www-authenticate"] = "Bearer" })),
    error_body(401, "missing or wrong API key: " .. what .. " needs 'Authorization: Bearer KEY'",
      "unauthorized"))
end

function M:handle(x)
  local path, query, method, route
  local i = x_inference and x_inference(x) or -1
  if i > 0 then
    route = INFERENCE[i]
  else
    path, query = x:path()
    method = x:method()
    route = ROUTES[path]
    if method ~= "POST" then i = 0 end
  end
  if route and i ~= 0 then
    if self.inference_key and not self:authorized(x, self.inference_key) then
      stats.errors:inc(1, route, "unauthorized")
      self:unauthorized(x, "the inference API (--inference-api-key)")
      if log.enabled("info") then
        log.fields("info", "request", "error", "unauthorized", "request_id", x:header("x-request-id"),
          "route", route, "status", 401)
      end
      return
    end
    return self.flow:infer(x, route)
  end
  -- everything else gets its access line here (inference logs its own)
  local t0 = core.now()
  self:dispatch_other(x, method, path, query, route)
  if log.enabled("info") then
    log.fields("info", "request", "duration_ms", floor((core.now() - t0) * 10) / 10, "method", method,
      "request_id", x:header("x-request-id"), "route", path, "status", x:status())
  end
end

function M:dispatch_other(x, method, path, query, route)
  if method == "OPTIONS" then return self:preflight(x) end
  if route then return self:send_error(x, 405, "use POST for " .. path, "method_not_allowed") end
  if self.admin_key and ADMIN_ROUTES[path] and not self:authorized(x, self.admin_key) then
    return self:unauthorized(x, path .. " (--admin-api-key)")
  end
  local observe = OBSERVE_HANDLERS[path]
  if observe then
    local h = observe[method]
    if h then return h(self, x, query) end
    return self:send_error(x, 405, "use " .. observe.methods .. " for " .. path, "method_not_allowed")
  end
  if GET_PROXIED[path] then
    -- answered by a worker: inference clients only
    if self.inference_key and not self:authorized(x, self.inference_key) then
      return self:unauthorized(x, path .. " (--inference-api-key)")
    end
    if method ~= "GET" then return self:send_error(x, 405, "use GET for " .. path, "method_not_allowed") end
    if not self.pd then return self:first_worker(x, path) end
    if path == "/health_generate" then return self:health_generate_pd(x) end
    return self:first_worker(x, path, "prefill")    -- server and model info: a prefill's
  end
  local h = (method == "GET" and GET_HANDLERS[path]) or (method == "POST" and POST_HANDLERS[path])
  if h then return h(self, x, query) end
  if GET_HANDLERS[path] or POST_HANDLERS[path] then
    return self:send_error(x, 405, "use " .. (GET_HANDLERS[path] and "GET" or "POST") .. " for " .. path,
      "method_not_allowed")
  end
  self:send_error(x, 404, "no route for " .. method .. " " .. path, "not_found")
end

-- --- lifecycle -------------------------------------------------------------------------

function M:serve_metrics()
  if not stats.enabled then
    log.warn("this build has no metrics primitive; /metrics is not served")
    return true
  end
  local conf = self.conf
  local srv, err = core.listen(conf.prometheus_host or "127.0.0.1", conf.prometheus_port or 29000, {}, function(x)
    local path = x:path()
    if path == "/metrics" then
      local now = core.now()
      -- gauges of the moment are read here, not kept up per request
      stats.inflight_h:set(self.limiter.inflight)
      stats.body_bytes:set(core.body_bytes())
      stats.queue_depth_h:set(self.limiter:depth())
      if self.discovery then
        local age = self.discovery:sync_age()
        if age then stats.discovery_sync_age:set(age) end
      end
      local pools = {}
      for _, w in ipairs(self.workers.list) do
        w.m.running:set(w.load)
        local policy = self:policy_for(w)
        if policy.tree_size then stats.tree_size:set(policy:tree_size(w.url) or 0, w.url) end
        w.breaker:allow(now)
        -- the pool counts its replays; add what is new since the last render
        -- (per worker object, so a worker added again does not go back;
        -- a dp-aware worker's ranks share a pool: counted on the first)
        if not pools[w.pool] then
          pools[w.pool] = true
          local replays = w.pool:stats().replays
          stats.upstream_replays:inc(replays - (w.replays_reported or 0), w.url)
          w.replays_reported = replays
        end
      end
      x:respond(200, { ["content-type"] = "text/plain; version=0.0.4; charset=utf-8" }, stats.render())
    else
      x:respond(404, { ["content-type"] = "text/plain" }, "not found; try /metrics\n")
    end
  end)
  if not srv then return nil, err end
  self.metrics_server = srv
  log.always("metrics on http://" .. (conf.prometheus_host or "127.0.0.1") .. ":" .. srv:port() .. "/metrics")
  return true
end

function M:start()
  local conf = self.conf
  -- the hop this router adds to what it forwards: a request that comes
  -- back carrying it (through other routers, or the router listed as its
  -- own worker) is refused with 508 instead of looping until it times out
  core.set_via("1.1 sglr-" .. core.random_id(""))
  local ok, err = self:load_policy()
  if not ok then return nil, err end
  for _, name in ipairs(conf.shadow_policy or {}) do
    local c, serr = self.shadow:add(name)
    if not c then return nil, "--shadow-policy " .. name .. ": " .. tostring(serr) end
  end
  if conf.trace_out then
    ok, err = self.flow:start_capture(conf.trace_out, conf.trace_out_max_mb or 100)
    if not ok then return nil, "--trace-out: " .. tostring(err) end
    -- lines reach the file within a second even when traffic stops
    local t = require("luv").new_timer()
    t:start(1000, 1000, function() self.flow.capture:flush() end)
    t:unref()
    log.info("capturing requests", { file = conf.trace_out })
  end

  -- wait for the listed workers (in parallel), then serve with the healthy ones
  local urls, opts = {}, {}
  if self.pd then
    for _, e in ipairs(conf.prefill or {}) do
      urls[#urls + 1] = e.url
      opts[#urls] = { source = "static", role = "prefill", bootstrap_port = e.bootstrap_port }
    end
    for _, u in ipairs(conf.decode or {}) do
      urls[#urls + 1] = u
      opts[#urls] = { source = "static", role = "decode" }
    end
  else
    for i, u in ipairs(conf.worker_urls or {}) do urls[i], opts[i] = u, { source = "static" } end
  end
  if #urls > 0 then
    log.info("waiting for " .. #urls .. " worker(s) to become healthy")
  end
  local deadline = core.now() + (conf.worker_startup_timeout_secs or 300) * 1000
  -- discovery lists pods while the listed workers are awaited; both sets
  -- are waited for before the router serves
  local disc_done
  if conf.service_discovery then
    local d, derr = require("sglr.discovery").new(self)
    if not d then return nil, "--service-discovery: " .. derr end
    self.discovery = d
    disc_done = core.event()
    core.spawn(function()
      d:start()
      disc_done:set(true)
    end)
  end
  for _, u in ipairs(urls) do
    local norm = workers_mod.check_url(u)
    if norm and self:is_self(norm) then return nil, "worker " .. norm .. " is this router itself" end
  end
  local ready, failed = self.health:wait_all(urls)
  if disc_done then disc_done:wait() end
  local ready_set = {}
  for _, u in ipairs(ready) do ready_set[u] = true end
  -- dp-aware: the ready workers' dp_size, asked of all at once
  local dp_sizes = {}
  if self.dp_aware then
    local res = self:fan_out(ready, function(u) return self:dp_size_of(u, deadline) end)
    for i, u in ipairs(ready) do
      dp_sizes[u] = res[i][1]
      if not res[i][1] then failed[u] = res[i][2] end
    end
  end
  local healthy_roles = {}
  for i, u in ipairs(urls) do
    opts[i].healthy = ready_set[u] == true
    if self.dp_aware then
      if dp_sizes[u] then
        local added, aerr = self:register(u, opts[i], deadline, dp_sizes[u])
        if not added then return nil, aerr end
        healthy_roles[opts[i].role or "regular"] = true
      else
        log.warn("worker is not ready; it is routed to once it answers its health check and reports a dp_size",
          { worker = u, error = failed[u] })
        opts[i].healthy = nil
        self:join_later(u, opts[i], failed[u])
      end
    else
      local w, aerr = self.workers:add(u, opts[i])
      if not w then return nil, aerr end
      if ready_set[u] then
        healthy_roles[w.role] = true
      else
        log.warn("worker did not become healthy; it stays registered as unhealthy", { worker = u, error = failed[u] })
      end
    end
  end
  if self.dp_aware and #urls > 0 and next(healthy_roles) == nil and not conf.service_discovery then
    return nil, "none of the workers became ready (healthy, with a dp_size) within --worker-startup-timeout-secs: "
      .. concat(urls, ", ")
  end
  if #urls > 0 and #ready == 0 and not conf.service_discovery then
    return nil, "none of the workers became healthy within --worker-startup-timeout-secs: " .. concat(urls, ", ")
  end
  if self.pd and #urls > 0 and not conf.service_discovery then
    for _, role in ipairs({ "prefill", "decode" }) do
      if not healthy_roles[role] then
        return nil, "none of the " .. role .. " workers became healthy within --worker-startup-timeout-secs"
      end
    end
  end

  local srv
  srv, err = core.listen(conf.host or "127.0.0.1", conf.port or 30000, {
    max_body = conf.max_payload_size or 256 * 1024 * 1024,
    header_timeout = conf.client_header_timeout_secs,
    body_timeout = conf.client_body_timeout_secs,
    keepalive_timeout = conf.keepalive_timeout_secs,
    write_timeout = conf.client_write_timeout_secs,
    max_connections = conf.max_connections or -1,
  }, function(x)
    local okh, herr = xpcall(self.handle, debug.traceback, self, x)
    if not okh then
      stats.script_errors:inc()
      log.error("handler error", { error = tostring(herr) })
      self:send_error(x, 500, "internal router error", "internal_error")
    end
  end)
  if not srv then return nil, err end
  self.server = srv
  ok, err = self:serve_metrics()
  if not ok then return nil, err end
  self.health:start()
  self:watch_loop()
  self:watch_sighup()

  log.always(string.format("sglr router listening on http://%s:%d (policy %s, %d worker(s))",
    conf.host or "127.0.0.1", srv:port(), self.policy_name, #self.workers.list), { port = srv:port() })
  return true
end

-- The event loop's health: a 100 ms timer measures how late it fires. Lag
-- is a histogram metric; a stall of a second or more is logged, since it
-- delays every request and health check in flight.
function M:watch_loop()
  local uv = require "luv"
  local period = 100
  local last = core.now()
  local series = stats.loop_lag:series()
  local t = uv.new_timer()
  t:start(period, period, function()
    local now = core.now()
    local lag = now - last - period
    last = now
    if lag < 0 then lag = 0 end
    series:observe(lag / 1000)
    if lag >= 1000 then log.warn("event loop blocked", { ms = floor(lag) }) end
  end)
  t:unref()
  self.loop_timer = t
end

-- SIGHUP reloads every pool's policy from disk (as POST /admin/policy
-- with no body does).
function M:watch_sighup()
  local uv = require "luv"
  local sig = uv.new_signal()
  if not sig then return end
  sig:start("sighup", function()
    core.spawn(function()
      local ok, err = self:reload_policy(nil, "SIGHUP")
      if not ok then log.warn("policy reload on SIGHUP refused", { error = err }) end
    end)
  end)
  sig:unref()
  self.hup_signal = sig
end

-- Graceful shutdown: stop accepting, let requests in flight finish for up
-- to the grace period, then exit 0.
function M:shutdown(signame)
  if self.stopping then return end
  self.stopping = true
  log.info("shutting down on " .. tostring(signame) .. ", draining " .. core.active() .. " request(s)")
  if self.server then self.server:close() end
  if self.metrics_server then self.metrics_server:close() end
  self.health:stop()
  if self.discovery then self.discovery:stop() end
  local deadline = core.now() + (self.conf.shutdown_grace_secs or 30) * 1000
  -- in flight: requests still being answered, and connections still
  -- flushing answers already given (the server closes them when done)
  local function busy()
    return core.active() > 0 or (self.server and self.server:connections() > 0)
  end
  while busy() and core.now() < deadline do core.sleep(20) end
  if core.active() > 0 then
    log.warn("grace period over with " .. core.active() .. " request(s) still in flight")
  end
  if self.flow.capture then self.flow.capture:close() end
  log.info("bye")
  core.exit(0)
end

function M.main(args)
  local cli = require "sglr.cli"
  local conf, err, kind = cli.parse_run(args)
  if not conf then
    if kind == "help" or kind == "version" then
      io.stdout:write(err, kind == "version" and "\n" or "")
      return core.exit(0)
    end
    -- the message names the program and the flag already
    io.stderr:write(tostring(err), "\n")
    return core.exit(2)
  end
  if conf.lua_path then
    package.sglr_path = conf.lua_path .. "/?.lua;" .. conf.lua_path .. "/?/init.lua;" .. (package.sglr_path or "")
  end
  log.configure(conf)
  math.randomseed(os.time() + floor(core.now()))
  local r = M.new(conf)
  core.on_signal(function(sig) r:shutdown(sig) end)
  local ok, serr = r:start()
  if not ok then
    log.error(serr)
    io.stderr:write("sglr run: ", tostring(serr), "\n")
    return core.exit(1)
  end
  M.current = r
end

-- `sglr reload`: ask a running router to reload its policies (POST
-- /admin/policy). Exits 0 when every pool took the new code, 1 when it
-- was refused (the router says why), 2 on a usage error.
local RELOAD_USAGE = [[
usage: sglr reload [--url http://127.0.0.1:30000] [--admin-api-key KEY] [--pool POOL]
                   [--policy NAME|PATH.lua | --code FILE.lua] [--policy-opt key=value ...]

Reloads the router's policies: with no --policy or --code every pool's code
is read again from disk. --code sends FILE's source to the router (which
need not see the file). POOL: regular, or prefill / decode in PD mode.
The admin key is also read from $SGLR_ADMIN_API_KEY.
]]

function M.reload_main(args)
  local url, key, change, opts = "http://127.0.0.1:30000", os.getenv("SGLR_ADMIN_API_KEY"), {}, nil
  local i = 1
  local function value(name)
    local v = args[i + 1]
    if v == nil then
      io.stderr:write("sglr reload: ", name, " needs a value\n", RELOAD_USAGE)
      return core.exit(2)
    end
    i = i + 1
    return v
  end
  while i <= #args do
    local a = args[i]
    if a == "--help" or a == "-h" then
      io.stdout:write(RELOAD_USAGE)
      return core.exit(0)
    elseif a == "--url" then url = value(a)
    elseif a == "--admin-api-key" then key = value(a)
    elseif a == "--pool" then change.pool = value(a)
    elseif a == "--policy" then change.policy = value(a)
    elseif a == "--code" then
      local file = value(a)
      local fh, err = io.open(file, "rb")
      if not fh then
        io.stderr:write("sglr reload: --code: ", tostring(err), "\n")
        return core.exit(2)
      end
      change.code = fh:read("*a")
      fh:close()
    elseif a == "--policy-opt" then
      local k, v = policy_mod.parse_opt(value(a))
      if not k then
        io.stderr:write("sglr reload: --policy-opt: ", v, "\n")
        return core.exit(2)
      end
      opts = opts or {}
      opts[k] = v
    else
      io.stderr:write("sglr reload: unknown argument '", tostring(a), "'\n", RELOAD_USAGE)
      return core.exit(2)
    end
    i = i + 1
  end
  change.options = opts
  local headers = { ["content-type"] = "application/json" }
  if key and key ~= "" then headers.authorization = "Bearer " .. key end
  local st, body = http.request({ method = "POST", url = url:gsub("/+$", "") .. "/admin/policy",
    headers = headers, body = next(change) and cjson.encode(change) or "", timeout_ms = 30000 })
  if not st then
    io.stderr:write("sglr reload: ", url, ": ", tostring(body), "\n")
    return core.exit(1)
  end
  local res = cjson.decode(body or "")
  if st ~= 200 then
    local msg = type(res) == "table" and type(res.error) == "table" and res.error.message or body
    io.stderr:write("sglr reload: ", st, " ", tostring(msg), "\n")
    return core.exit(1)
  end
  local pools = {}
  for pool, v in pairs(type(res) == "table" and res.pools or {}) do
    pools[#pools + 1] = string.format("%s: %s %s (%s)", pool, tostring(v.name), tostring(v.version), tostring(v.hash))
  end
  table.sort(pools)
  io.stdout:write("reloaded: ", concat(pools, ", "), "\n")
  return core.exit(0)
end

return M

-- The request flow of the inference routes. Each request runs in its own
-- coroutine through:
--
--   admit (concurrency limit) -> validate -> attempt* -> answer -> access line
--
-- and an attempt is
--
--   pick      the dispatcher asks its policies for the workers of each leg
--   dispatch  the legs run (a native primitive that yields) until the
--             request is committed to the client or the attempt failed
--   settle    each leg's worker gets its load, breaker and policy update
--
-- retried with backoff while the failure is retryable. The policy
-- instances a request uses are captured when it starts (req.policy), so
-- select and on_done of one request always reach the same instance, even
-- if the router's policy is swapped meanwhile. Regular mode is one
-- dispatcher (one leg per attempt); a dispatcher is a table with pick and
-- dispatch (below), so other modes plug in beside it.
local core = require "sglr.core"
local cjson = require "cjson.safe"
local log = require "sglr.log"
local stats = require "sglr.stats"
local retry = require "sglr.retry"
local decisions = require "sglr.decisions"
local call_select = require("sglr.policy").call_select

local ok_extract, extract = pcall(require, "sglr.extract")

local floor, min, max = math.floor, math.min, math.max
local bump, record = stats.bump, stats.record

-- The clock through LuaJIT's FFI: compiled into the trace, where core.now
-- (a classic C call) ends it. Read several times per request.
-- The exchange's status, closed and body_size the same way, for a userdata
-- exchange (else, or when it is not a live one, its methods answer).
local now_ms = core.now
local x_request_id = false     -- through the FFI when it loads (below)
local function x_status(x) return x:status() end
local function x_closed(x) return x:closed() end
local function x_body_size(x) return x:body_size() end
local x_reuse = false          -- (through the FFI only)
do
  local ok, ffi = pcall(require, "ffi")
  if ok and pcall(ffi.cdef, [[
      double sglr_clock_ms(void);
      int sglr_lua_x_status(void *x);
      int sglr_lua_x_closed(void *x);
      double sglr_lua_x_body_size(void *x);
      int sglr_lua_x_set_request_id(void *x, const char *names, const char *prefix);
      int sglr_lua_x_reuse(void *x);
    ]]) and pcall(function()
      return ffi.C.sglr_clock_ms, ffi.C.sglr_lua_x_status, ffi.C.sglr_lua_x_closed, ffi.C.sglr_lua_x_body_size,
        ffi.C.sglr_lua_x_set_request_id, ffi.C.sglr_lua_x_reuse
    end) then
    local C = ffi.C
    now_ms = C.sglr_clock_ms
    -- names: the header names, each followed by a zero byte (flow.new).
    -- true: the id is kept in x (x:request_id() reads it)
    x_request_id = function(x, names, prefix)
      return type(x) == "userdata" and C.sglr_lua_x_set_request_id(x, names, prefix) >= 0
    end
    x_status = function(x)
      local v = type(x) == "userdata" and C.sglr_lua_x_status(x) or -1
      if v < 0 then return x:status() end
      return v
    end
    x_closed = function(x)
      local v = type(x) == "userdata" and C.sglr_lua_x_closed(x) or -1
      if v < 0 then return x:closed() end
      return v == 1
    end
    -- the exchange's box (userdata) goes to a later request once this
    -- one is done (recycle_req)
    x_reuse = function(x)
      if type(x) == "userdata" then C.sglr_lua_x_reuse(x) end
    end
    x_body_size = function(x)
      local v = type(x) == "userdata" and C.sglr_lua_x_body_size(x) or -1
      if v < 0 then return x:body_size() end
      return v
    end
  end
end
local unpack = unpack or table.unpack

local M = {}
M.__index = M

local ID_PREFIX = { generate = "gnt-", chat = "chatcmpl-", completions = "cmpl-" }
-- Routing text kept per request: a prefix this long already tells where a
-- prompt's cache is, and a 200 MB prompt must not put 200 MB in the tree.
local MAX_TEXT = 1024 * 1024
-- Bodies above this are read on the thread pool, not on the loop.
local BIG_BODY = 1024 * 1024
local SSE_TIMEOUT = 'data: {"error":{"message":"worker timed out","type":"timeout","code":504}}\n\n'

-- a router without shadow candidates (one built by hand in a spec)
local NO_SHADOW = { n = 0 }

-- r: the router (conf, workers, limiter, retry, policy, error helpers)
function M.new(r)
  local conf = r.conf
  local self = setmetatable({
    r = r,
    workers = r.workers,
    limiter = r.limiter,
    retry = r.retry,
    request_timeout_ms = (conf.request_timeout_secs or 600) * 1000,
    connect_timeout_ms = conf.connect_timeout_ms or 5000,
    spare = {},               -- candidate lists (take_list / give_list)
    req_pool = {},            -- finished requests' tables (recycle_req)
    -- Authorization sent to workers (x:relay): --api-key's, false (drop
    -- the client's: it holds our inference key), or nil (the client's
    -- passes).
    relay_auth = r.forward_auth,
    -- what each decision feeds besides the dispatch: the decision log (or
    -- false), the shadow candidates (r.shadow.n > 0 when any), and whether
    -- a request may ask for an explanation ("all" with --explain, "key"
    -- when only a request carrying --admin-api-key may, else false)
    ring = r.decisions or false,
    shadow = r.shadow or NO_SHADOW,
    explain_mode = conf.explain and "all" or (r.admin_key and "key") or false,
  }, M)
  self.request_id_headers = conf.request_id_headers or
    { "x-request-id", "x-correlation-id", "x-trace-id", "request-id" }
  for i, h in ipairs(self.request_id_headers) do self.request_id_headers[i] = h:lower() end
  -- the same for the FFI: each name ends in a zero byte, an empty one ends
  -- the list
  local names = {}
  for _, h in ipairs(self.request_id_headers) do
    if h ~= "" then names[#names + 1] = h end     -- an empty name would end the list
  end
  self.request_id_names = table.concat(names, "\0") .. "\0\0"
  self.dispatcher = conf.pd_disaggregation and M.pd or M.regular
  self.pd_mode = self.dispatcher == M.pd
  -- which statuses x:relay_pipe keeps for a retry (its hold): 1, the set
  -- core knows, when it is retry.retryable_status's; else 2, every error
  -- status, for retryable_status to sort
  local same = core.relay_held ~= nil
  for s = 100, 599 do
    if same and core.relay_held(s) ~= retry.retryable_status(s) then same = false end
  end
  self.hold = same and 1 or 2
  return self
end

-- --trace-out: every request also leaves a capture line (sglr.trace). The
-- access method is swapped only then, so without the flag a request does
-- no capture work at all. -> true | nil, err
function M:start_capture(path, max_mb)
  local trace = require "sglr.trace"
  local w, err = trace.open(path, max_mb * 1024 * 1024, now_ms)
  if not w then return nil, err end
  self.capture = w
  self.access = function(flow, x, req)
    M.access(flow, x, req)
    local ok, cerr = pcall(w.record, w, req, x_status(x), now_ms())
    if not ok then log.warn("trace capture failed", { error = tostring(cerr) }) end
  end
  return true
end

-- A request's id: false when it is kept in its exchange (no Lua string
-- of it is made unless something reads req.id), else the string.
function M:request_id(x, route)
  local prefix = ID_PREFIX[route] or "req-"
  if x_request_id and x_request_id(x, self.request_id_names, prefix) then return false end
  local v = x:header(unpack(self.request_id_headers))
  if v then return v end
  return core.random_id(prefix)
end

-- extract.check(route, x [, max, keep]) for a request's exchange, through
-- the FFI when it loads: one call compiled into the flow's trace (the
-- classic call ended the trace); anything else goes to extract.check.
local check = ok_extract and extract.check
do
  local ok, ffi = pcall(require, "ffi")
  if ok_extract and ok and pcall(ffi.cdef, [[
      int sglr_extract_ffi_check(void *x, int route, double max, int keep, double *text_len);
      const char *sglr_extract_ffi_model(int *len);
      const char *sglr_extract_ffi_error(void);
    ]]) and pcall(function()
      return ffi.C.sglr_extract_ffi_check, ffi.C.sglr_extract_ffi_model, ffi.C.sglr_extract_ffi_error
    end) then
    local C, ffi_string = ffi.C, ffi.string
    local ROUTE = { generate = 0, chat = 1, completions = 2 }
    local tlen, mlen = ffi.new("double[1]"), ffi.new("int[1]")
    local classic = extract.check
    check = function(route, x, cap, keep)
      local id = ROUTE[route]
      local r = id and type(x) == "userdata" and (cap == nil or keep) and
        C.sglr_extract_ffi_check(x, id, cap or 0, keep and 1 or 0, tlen) or -1
      if r >= 0 then
        local model = nil
        if r >= 2 then
          local m = C.sglr_extract_ffi_model(mlen)
          model = ffi_string(m, mlen[0])
        end
        if keep then return true, r % 2 == 1, model, tlen[0] end
        return true, r % 2 == 1, model
      elseif r == -2 then
        return nil, ffi_string(C.sglr_extract_ffi_error())
      elseif r == -3 then
        error("extract: out of memory")
      end
      return classic(route, x, cap, keep)
    end
  end
end

-- The tokens a request asks for at most, from its body: max_tokens,
-- max_completion_tokens, or sampling_params.max_new_tokens; false if none.
local function max_tokens_of(body)
  local obj = cjson.decode(body)
  if type(obj) ~= "table" then return false end
  local n = obj.max_tokens or obj.max_completion_tokens
  if n == nil and type(obj.sampling_params) == "table" then n = obj.sampling_params.max_new_tokens end
  return type(n) == "number" and n or false
end

-- The fields of a request that read false until set, where a request's
-- table does not hold them from the start (see infer).
-- (the fields both modes' tables hold from the start are not here)
local REQ_FALSE = { dpolicy = false, decision = false, match_ratio = false, prefill = false,
  ttfb = false, explain = false, shadow = false, pd_shape = false, failed = false, error = false }

-- req.text, req.body, req.headers, req.path, req.client (the client's IP
-- address), req.max_tokens and req.id (kept in the exchange) are made on
-- first read only: most policies need none of them.
local req_mt = {
  __index = function(t, k)
    if k == "text" then
      -- kept in the exchange by the validating pass (text_source), else
      -- decoded now
      local s
      if rawget(t, "text_source") then
        s = t._x:route_text() or ""
      else
        s = ok_extract and extract.route_text(t.route, t._x, MAX_TEXT) or ""
      end
      rawset(t, "text", s)
      return s
    elseif k == "body" then
      local b = t._x:body()
      rawset(t, "body", b)
      return b
    elseif k == "headers" then
      local h = t._x:headers()
      rawset(t, "headers", h)
      return h
    elseif k == "client" then
      local addr = t._x:peer() or false
      rawset(t, "client", addr)
      return addr
    elseif k == "path" then
      local path = t._x:path()
      rawset(t, "path", path)
      return path
    elseif k == "max_tokens" then
      local n = max_tokens_of(t.body)
      rawset(t, "max_tokens", n)
      return n
    elseif k == "id" then
      -- kept in the exchange (M:request_id)
      local id = t._x:request_id() or false
      rawset(t, "id", id)
      return id
    end
    return REQ_FALSE[k]
  end,
  -- a field the table does not hold yet (the common ones are there from
  -- the start, false): the table grows past its 16 slots, and recycle_req
  -- leaves it to the collector. Whatever wrote it (a policy may write
  -- decision and match_ratio; one that writes anything else breaks the
  -- read-only rule, which only the probe checks) never reaches a later
  -- request. The request id, the 16th, is no such field.
  __newindex = function(t, k, v)
    rawset(t, k, v)
    if k ~= "id" then rawset(t, "_grown", true) end
  end,
}

-- Validate the body before anything is routed: bad JSON and wrong field
-- types are the client's error (400) and never reach a worker.
-- -> true, stream, model | nil, message
local function inspect(route, x)
  if ok_extract then return check(route, x) end
  local obj, err = cjson.decode(x:body())
  if type(obj) ~= "table" then return nil, "invalid JSON body: " .. tostring(err or "not an object") end
  if route == "chat" and type(obj.messages) ~= "table" then return nil, "field 'messages' must be an array" end
  if route == "completions" and obj.prompt == nil then return nil, "field 'prompt' is required" end
  return true, obj.stream == true, obj.model
end

-- The request's extra answer headers (see infer), made on first need.
local function extra_of(req)
  local e = req.extra
  if not e then
    e = { ["x-request-id"] = req.id }
    req.extra = e
  end
  return e
end

-- --- one request ------------------------------------------------------------------

-- Request tables kept for the next requests (infer), at most this many.
local REQ_POOL_MAX = 512

-- A finished request's table into the flow's pool, when nothing but the
-- router can still hold it: its policy (the one that picked, which a
-- failed select may have replaced) declared transient_req, and no shadow
-- candidate was offered it (req.shadow, set by note: their policies
-- are the operator's, and a candidate may be gone by now); and so its
-- exchange's box, which goes back to the core for a later request. Only a
-- regular-mode table of the common shape: one that took a field beyond
-- the 16 it starts with (the request id is the 16th) was rehashed, and
-- code compiled for the common table would leave its traces on each of
-- its fields; the collector takes it. The references it holds are
-- dropped: a pooled table keeps no exchange, policy instance or answer
-- headers alive.
local function recycle_req(flow, req)
  local pool = flow.req_pool
  local n = #pool
  if n >= REQ_POOL_MAX or flow.pd_mode or req.shadow or not req.policy.transient_req then return end
  -- a field written beyond the common ones (req_mt.__newindex marks the
  -- table), or one made on first read (rawset, below)
  if rawget(req, "_grown") or rawget(req, "text") ~= nil or rawget(req, "body") ~= nil
    or rawget(req, "headers") ~= nil or rawget(req, "client") ~= nil or rawget(req, "path") ~= nil
    or rawget(req, "max_tokens") ~= nil then
    return
  end
  if rawget(req, "id") ~= nil then req.id = nil end
  -- the exchange's box too: nothing else holds it either
  if x_reuse then x_reuse(req._x) end
  req._x, req.text_source, req.extra, req.policy, req.rs, req.worker = false, false, false, false, false, false
  pool[n + 1] = req
end

function M:infer(x, route)
  local r = self.r
  local t0 = now_ms()
  local rid = self:request_id(x, route)
  -- the headers the router adds to the answer: x-request-id, CORS, an
  -- explanation. Made when the answer needs more than x-request-id (which
  -- pipe adds from req.id): CORS here, the rest where they arise (extra_of)
  local extra = false
  if r.cors_check then
    extra = { ["x-request-id"] = rid or x:request_id() }
    r:cors_headers(x, extra)
  end
  local rs = stats.for_route(route)
  bump(rs.requests)
  -- one table per request: the policy's view and the access log's record.
  -- The fields a request of this mode sets on its way are present from the
  -- start (false), 15 in all, so the table is allocated once at its final
  -- size (16 hash slots, the last for id when it is a string; 17 fields
  -- would take 32) and a read of one never reaches the metatable. The
  -- rest (REQ_FALSE: an error, the workers a retry avoids, an
  -- explanation...) read false through the metatable until a rarer path
  -- sets them; id is read from the exchange on first need.
  --
  -- A request whose policy keeps no reference to it once select and
  -- on_done returned (the policy says so with transient_req = true, as
  -- the built-in ones do) leaves its table to the next request
  -- (recycle_req): without it, that table was most of what a request
  -- left to the collector, and the collector's cycles (marking and
  -- sweeping a heap that no longer fits the caches) cost more than the
  -- rest of the Lua a request runs.
  local req
  local pool = self.req_pool
  local np = #pool
  local reuse = r.policy.transient_req
  if self.pd_mode then
    req = setmetatable({ route = route, _x = x, t0 = t0, retries = 0, rs = rs,
      extra = extra, stream = false, model = false, worker = false, policy = r.policy,
      dpolicy = r.dpolicy or false, prefill = false, pd_shape = false, text_source = false, text_len = false },
      req_mt)
  elseif np > 0 then
    -- every field the fresh table below starts with, set again (the rest
    -- were never set, or cleared: recycle_req)
    req = pool[np]
    pool[np] = nil
    req.route, req._x, req.t0, req.retries, req.rs = route, x, t0, 0, rs
    req.extra, req.stream, req.model, req.worker, req.policy = extra, false, false, false, r.policy
    req.ttfb, req.error, req.shadow, req.text_source, req.text_len = false, false, false, false, false
  else
    req = setmetatable({ route = route, _x = x, t0 = t0, retries = 0, rs = rs,
      extra = extra, stream = false, model = false, worker = false, policy = r.policy,
      ttfb = false, error = false, shadow = false, text_source = false, text_len = false }, req_mt)
  end
  if rid then req.id = rid end
  local em = self.explain_mode
  if em then
    local v = x:header("x-sglr-explain")
    if v == "1" or v == "true" then req.explain = em == "all" or r:authorized(x, r.admin_key) end
  end

  -- without a limit (--max-concurrent-requests 0) there is nothing to
  -- take or give back: decided once, so acquire and release pair up
  local limiter = self.limiter
  local lmax = limiter.max
  local limited = not (lmax and lmax <= 0)
  local ok, status, msg = true, nil, nil
  if limited then ok, status, msg = limiter:acquire() end
  if not ok then
    stats.queue_depth_h:set(limiter:depth())
    stats.rejections:inc(1, status == 429 and "queue_full" or "queue_timeout")
    stats.errors:inc(1, route, status == 429 and "rate_limited" or "queue_timeout")
    r:send_error(x, status, msg, status == 429 and "rate_limited" or "queue_timeout", extra_of(req))
    return self:access(x, req)
  end
  local okr, err = true, nil
  if x_closed(x) then
    req.error = "client_closed"    -- gave up while queued: do not bother a worker
  else
    okr, err = pcall(self.run, self, x, req)
  end
  if limited then limiter:release() end
  if not okr then
    stats.script_errors:inc()
    log.error("request failed in script", { request_id = req.id, error = tostring(err) })
    r:send_error(x, 500, "internal router error", "internal_error", extra_of(req))
  end
  self:access(x, req)
  if reuse and okr then recycle_req(self, req) end
end

function M:access(x, req)
  local dur = (now_ms() - req.t0) / 1000
  record(req.rs.duration, dur)
  -- (rawget: a field the request's table may not hold is read without
  -- the metatable, here and below)
  if rawget(req, "dpolicy") then record(stats.for_pd_route(req.route).duration, dur) end
  -- keys in sorted order: the line log.info("request", {...}) printed
  log.access(x, floor(dur * 1e4) / 10, rawget(req, "error") or nil, rawget(req, "prefill") or nil,
    rawget(req, "id") or nil, req.retries,
    req.route, req.stream, req.worker or "-")
end

-- The start of one leg on worker w, picked by policy: load and breaker
-- bookkeeping, undone once by settle.
function M:take(req, w)
  req.worker = w.url
  local wm = w.m
  bump(wm.decisions)
  w.breaker:dispatched()
  w.load = w.load + 1
  w.processed = w.processed + 1
  bump(wm.processed)
end

-- The end of one leg on worker w: outcome "success", "failure" or nil
-- (cancelled: neither), and the policy that picked w hears of it.
function M:settle(req, w, policy, outcome, status)
  w.load = w.load - 1
  local wm = w.m
  local now = now_ms()
  if outcome == "success" then
    w.breaker:success(now)
    bump(wm.success)
  elseif outcome == "failure" then
    w.breaker:failure(now)
    bump(wm.failure)
  else
    w.breaker:cancelled()
  end
  -- the latency policies see: a moving average over about ten requests
  local ms, lat = now - req.t0, w.latency_ms
  w.latency_ms = lat and lat + (ms - lat) * 0.1 or ms
  if policy.on_done then policy:on_done(req, w, status, ms) end
  if rawget(req, "shadow") and policy == req.policy then self.shadow:settle(req, status, ms) end
end

-- What one policy decided for an attempt (role: nil in regular mode, else
-- "prefill" or "decode"): into the decision log, offered to the shadow
-- candidates (they shadow the regular or prefill policy), and for a
-- request that asked, into its x-sglr-decision header. Between the
-- prefill's note and the decode's nothing yields, so the attempt's log
-- position, shadow choices and explanation wait on the flow.
function M:note(req, now, policy, w, reason, matched, total, avail, role)
  local ring = self.ring
  local shadows = nil
  if role == "decode" then
    local pos = self.cur_pos
    if pos then ring:record_decode(pos, policy, w, reason, matched, total) end
    shadows = self.cur_shadows
  else
    local pos = false
    if ring then pos = ring:record(now, req, policy, w, reason, matched, total) end
    local sh = self.shadow
    if sh.n > 0 then
      if pos then
        shadows = ring:shadow_of(pos)
      elseif rawget(req, "explain") then
        shadows = { nsh = 0, sh = {} }
      end
      -- the candidates' picks (for their on_done) gather here; it also
      -- tells recycle_req that the operator's policies saw this request
      if not req.shadow then req.shadow = { n = 0 } end
      sh:offer(req, avail, w, shadows)
    end
    if role then self.cur_pos, self.cur_shadows = pos, shadows end
  end
  if rawget(req, "explain") then
    local leg = decisions.explain_leg(policy, w, reason, matched, total, avail, req.retries + 1)
    if role == "prefill" then
      self.cur_leg = leg
    elseif role == "decode" then
      extra_of(req)["x-sglr-decision"] = decisions.explain_json(req, self.cur_leg, leg, shadows)
    else
      extra_of(req)["x-sglr-decision"] = decisions.explain_json(req, leg, nil, shadows)
    end
  end
end

-- Candidate lists for the policies, recycled: a list is the caller's from
-- take_list until give_list (after select has returned, even if it yielded
-- meanwhile), so no request sees another's, and none costs an allocation.
function M:take_list()
  local spare = self.spare
  local n = #spare
  if n == 0 then return {} end
  local t = spare[n]
  spare[n] = nil
  return t
end

function M:give_list(t)
  -- a list of one (a single worker) cleared without a loop: a loop of one
  -- trip is never hot the way LuaJIT needs (it cannot loop back to close a
  -- trace of its own), its attempts abort again and again, and in some
  -- router processes the code around it was then left interpreted: about a
  -- third more CPU a request than in the others. So in the per-request
  -- path a loop over the candidates has a branch for one.
  local n = #t
  if n == 1 then
    t[1] = nil
  else
    for i = n, 1, -1 do t[i] = nil end
  end
  local spare = self.spare
  if #spare < 64 then spare[#spare + 1] = t end
end

-- select of policy (req[field], the pool's instance) raised err: the
-- pool's slot counts it (and may roll back) and names the instance to
-- route with instead, which the request keeps from here on (its on_done
-- goes there too). With none, the error goes on to infer's handler: a
-- logged 500 for this request. -> worker | nil, why
function M:select_failed(req, field, pool, policy, err, avail)
  local slot = self.r.slots and self.r.slots[pool]
  local inst = slot and slot:select_failed(policy, err)
  if inst and inst ~= policy then
    req[field] = inst
    local ok, w, why = call_select(inst, req, avail)
    if ok then return w, why end
    err = w
  end
  self:give_list(avail)
  error(pool .. " policy select failed: " .. tostring(err), 0)
end

-- Validate, then attempt until the request is answered or out of attempts.
function M:run(x, req)
  local r = self.r
  local route = req.route
  local ok, stream_or_err, model, text
  if ok_extract and x_body_size(x) > BIG_BODY then
    ok, stream_or_err, model, text = extract.check_text(route, x, MAX_TEXT)
    if ok then rawset(req, "text", text) end
  elseif ok_extract and req.policy.wants_text then
    -- a policy that matches on the routing text gets it from the same pass,
    -- kept in the exchange: the radix tree reads it there (req.text_source),
    -- and no Lua string of it is made unless req.text is read
    ok, stream_or_err, model, text = check(route, x, MAX_TEXT, true)
    if ok then
      if type(text) == "number" then
        req.text_source, req.text_len = x, text
      else
        rawset(req, "text", text)
      end
    end
  else
    ok, stream_or_err, model = inspect(route, x)
  end
  if not ok then
    stats.errors:inc(1, route, "bad_request")
    req.error = "bad_request"
    return r:send_error(x, 400, stream_or_err, "invalid_request_error", extra_of(req))
  end
  req.stream, req.model = stream_or_err, model or false

  local deadline = req.t0 + self.request_timeout_ms
  local attempts = self.retry:attempts()
  local d = self.dispatcher
  if d.prepare then
    local okp, msg = d.prepare(self, x, req)
    if not okp then
      stats.errors:inc(1, route, "bad_request")
      req.error = "bad_request"
      return r:send_error(x, 400, msg, "invalid_request_error", extra_of(req))
    end
  end
  -- the last failure, answered when no attempt succeeds
  local last_status, last_body, last_ctype, last_err

  for attempt = 1, attempts do
    local now = now_ms()
    local a, b = d.pick(self, req, now)
    if not a then
      last_err = b or last_err
      break
    end
    local verdict, status, body, ctype, err = d.dispatch(self, x, req, deadline,
      attempt < attempts, a, b)
    if verdict == "done" then return end
    last_status, last_body, last_ctype, last_err = status, body, ctype, err
    if verdict == "fail" then break end
    if attempt < attempts then
      req.retries = req.retries + 1
      req.rs.retries:inc()
      local wait = self.retry:backoff_ms(attempt - 1)
      wait = min(wait, max(0, deadline - core.now()))
      stats.retry_backoff:observe(wait / 1000, tostring(attempt))
      if wait > 0 then core.sleep(wait) end
      if x:closed() then req.error = "client_closed"; return end
    end
  end
  self:fail(x, req, last_status, last_body, last_ctype, last_err)
end

-- Every attempt failed, or nothing could be tried: answer with what the
-- last attempt left, or 503 when no worker could take the request.
function M:fail(x, req, status, body, ctype, last_err)
  local r = self.r
  local route, extra = req.route, extra_of(req)
  if status and body then
    stats.errors:inc(1, route, "worker_" .. status)
    req.rs.exhausted:inc()
    req.error = "retries_exhausted"
    return x:respond(status, r.merge(extra, { ["content-type"] = ctype or "application/json" }), body)
  end
  if status then
    stats.errors:inc(1, route, last_err == "timeout" and "timeout" or "worker_unreachable")
    if req.retries > 0 then req.rs.exhausted:inc() end
    req.error = last_err
    local emsg = last_err == "timeout" and "worker did not answer within --request-timeout-secs"
      or ("worker unreachable (" .. tostring(last_err) .. ")")
    return r:send_error(x, status, emsg, last_err == "timeout" and "timeout" or "worker_unreachable", extra)
  end
  stats.errors:inc(1, route, "no_workers")
  req.error = "no_workers"
  local emsg
  if #self.workers.list == 0 then
    emsg = "no workers are registered"
  elseif self.workers:healthy_count() == 0 then
    emsg = "no healthy workers available"
  elseif last_err then
    emsg = "no worker available: " .. tostring(last_err)
  else
    emsg = "no available workers (all circuits open or unhealthy)"
  end
  return r:send_error(x, 503, emsg, "no_workers", extra)
end

-- A committed response that did not end well (perr from pipe): a timed-out
-- stream ends with an error event, a reset one is cut so the client sees
-- the truncation. -> true when the worker is to blame (not the client).
local function cut_off(flow, x, req, perr)
  req.error = perr
  if perr == "client_closed" then return false end
  local timeout = perr == "timeout"
  stats.errors:inc(1, req.route, timeout and "timeout" or "worker_reset")
  local state = x:state()
  if state == "handling" then       -- nothing was sent yet (a PD merge read the body first)
    flow.r:send_error(x, timeout and 504 or 502, "worker " .. (timeout and "timed out" or "failed: " .. perr),
      timeout and "timeout" or "worker_unreachable", extra_of(req))
  elseif timeout then
    if state == "streaming" then
      if req.stream then x:write(SSE_TIMEOUT) end
      x:finish()
    end
  else
    x:abort()
  end
  return true
end

-- A worker failed this request: later attempts avoid it (every rank of a
-- dp-aware worker: they are one server) while others remain.
local function avoid(req, w)
  local f = rawget(req, "failed")
  if not f then
    f = {}
    req.failed = f
  end
  f[w.base_url] = true
end

-- --- regular mode: one worker per attempt --------------------------------------------

-- A dispatcher is { pick, dispatch [, prepare] }:
--   prepare(flow, x, req) -> true | nil, message (a 400), once per
--     request before any worker is picked
--   pick(flow, req, now) -> the attempt's workers (up to two values) | nil, why
--   dispatch(flow, x, req, deadline, can_retry, ...workers) ->
--     "done"                                  answered (or the client left)
--     "retry"|"fail", status, body, ctype, err  failed before the commit;
--                                             "fail" when not worth another
local regular = {}
M.regular = regular
-- the body check the flow makes (extract.check's results; exported for
-- its spec)
M.check_body = check

function regular.pick(flow, req, now)
  local avail = flow.workers:available(now, rawget(req, "failed"), nil, flow:take_list())
  if #avail == 0 then
    flow:give_list(avail)
    return nil
  end
  local policy = req.policy
  local ok, w, why, matched, total = call_select(policy, req, avail)
  if not ok then
    w, why = flow:select_failed(req, "policy", "regular", policy, w, avail)
    policy, matched, total = req.policy, nil, nil
  end
  if not w then
    flow:give_list(avail)
    return nil, why or "policy selected no worker"
  end
  flow:note(req, now, policy, w, why, matched, total, avail)
  flow:give_list(avail)
  return w
end

local regular_after

-- Forward to the worker. Before the response head the attempt can still
-- fail over: a transport error or a retryable status ends it with "retry".
-- Otherwise the response is committed: streamed to the client as it comes.
function regular.dispatch(flow, x, req, deadline, can_retry, w)
  local policy = req.policy
  flow:take(req, w)
  local now = now_ms()
  local left = deadline - now
  if left <= 0 then
    flow:settle(req, w, policy, nil, 504)
    return "fail", nil, nil, nil, "timeout"
  end
  -- x:forward without its options table: x-request-id set, authorization
  -- as --api-key says (relay_auth: a string, false to drop the client's,
  -- nil to pass it); --dp-aware: the rank is spliced into the body in C
  -- x:relay_pipe: the response goes to the client as soon as its head is
  -- in (x-request-id and req.extra added in C), with no response object,
  -- unless a retry may still take it (its status retryable: held, resp).
  -- A stream is held whatever its status: its time to first byte is
  -- recorded when the head comes, not when the stream ends.
  local status, resp, perr, t_head = x:relay_pipe(w.pool, w.dp_rank, left,
    min(flow.connect_timeout_ms, left), rawget(req, "id"), flow.relay_auth, req.extra or nil,
    req.stream and 3 or can_retry and flow.hold or nil)
  -- the rest in a function of its own: code after a call that yielded
  -- is compiled only from a function's start (a trace begun after the
  -- call cannot return to its caller), so here it would be interpreted
  return regular_after(flow, x, req, can_retry, w, policy, now, status, resp, perr, t_head)
end

-- regular.dispatch after its relay_pipe returned.
function regular_after(flow, x, req, can_retry, w, policy, now, status, resp, perr, t_head)
  local route, rs = req.route, req.rs
  if not status then
    local ferr = resp
    if ferr == "client_closed" then
      flow:settle(req, w, policy, nil, 499)
      req.error = "client_closed"
      return "done"
    end
    flow:settle(req, w, policy, "failure", 502)
    record(rs.upstream, (now_ms() - now) / 1000)
    log.warn("worker request failed", { request_id = req.id, worker = w.url, error = ferr,
      attempt = req.retries + 1 })
    local fstatus = ferr == "timeout" and 504 or 502
    if ferr == "timeout" or not retry.retryable_error(ferr) then
      return "fail", fstatus, nil, nil, ferr
    end
    avoid(req, w)
    return "retry", fstatus, nil, nil, ferr
  end
  local ttfb = t_head - req.t0
  req.ttfb = ttfb
  record(rs.ttfb, ttfb / 1000)
  local okp = resp
  if type(resp) == "userdata" then
    -- held (a stream, or an error status when it can be retried): not
    -- sent to the client yet
    if can_retry and retry.retryable_status(status) then
      -- drain it and try elsewhere
      local body = resp:read()
      local ctype = resp:header("content-type")
      resp:close()
      flow:settle(req, w, policy, "failure", status)
      avoid(req, w)
      log.warn("worker answered " .. status .. ", retrying", { request_id = req.id, worker = w.url,
        attempt = req.retries + 1 })
      return "retry", status, body, ctype
    end
    -- commit: from here on the client sees this worker's response
    okp, perr = resp:pipe(req.extra or nil, req.id)
    resp:close()
  end
  record(rs.upstream, (now_ms() - now) / 1000)
  flow:settle(req, w, policy, (status >= 500 or not okp and perr ~= "client_closed") and "failure" or "success",
    status)
  if status >= 400 then
    stats.errors:inc(1, route, "worker_" .. status)
    if retry.retryable_status(status) and flow.retry.max_retries > 0 then rs.exhausted:inc() end
  end
  if not okp then cut_off(flow, x, req, perr) end
  return "done"
end

-- --- PD mode: a prefill and a decode worker per attempt ---------------------------------

-- The request goes to both at once (x:relay_pd splices the bootstrap
-- fields in C); the client gets the decode's response. Each pool has its
-- own policy instance (req.policy for prefill, req.dpolicy for decode), and
-- each leg feeds its worker's breaker, load and policy. A retry re-picks
-- both workers.
local pd = {}
M.pd = pd

local function pick_role(flow, req, now, role, field)
  local avail = flow.workers:available(now, rawget(req, "failed"), role, flow:take_list())
  if #avail == 0 then
    flow:give_list(avail)
    local registered, healthy = 0, 0
    for _, w in ipairs(flow.workers.list) do
      if w.role == role then
        registered = registered + 1
        if w.healthy then healthy = healthy + 1 end
      end
    end
    return nil, registered == 0 and ("no " .. role .. " workers are registered")
      or healthy == 0 and ("no healthy " .. role .. " workers")
      or ("no available " .. role .. " workers (all circuits open)")
  end
  local policy = req[field]
  local ok, w, why, matched, total = call_select(policy, req, avail)
  if not ok then
    w, why = flow:select_failed(req, field, role, policy, w, avail)
    policy, matched, total = req[field], nil, nil
  end
  if not w then
    flow:give_list(avail)
    return nil, why or (role .. " policy selected no worker")
  end
  flow:note(req, now, policy, w, why, matched, total, avail, role)
  flow:give_list(avail)
  return w
end

-- The body's batch shape decides whether PD can split it: checked before
-- any policy sees the request (a refused body moves no counter and no tree).
function pd.prepare(_, x, req)
  local batch, flags = x:pd_check(req.route)
  if not batch then return nil, flags end
  req.pd_shape = batch * 4 + flags    -- flags: two bits
  return true
end

function pd.pick(flow, req, now)
  local pw, why = pick_role(flow, req, now, "prefill", "policy")
  if not pw then return nil, why end
  local dw
  dw, why = pick_role(flow, req, now, "decode", "dpolicy")
  if not dw then return nil, why end
  return pw, dw
end

-- A leg's outcome for its breaker: transport failures and 5xx count
-- against the worker; a cancelled leg counts neither way.
local function leg_outcome(result, status)
  if result == "ok" then return status >= 500 and "failure" or "success" end
  if result == "cancelled" or result == "client_closed" or result == nil then return nil end
  return "failure"
end

local function pd_error(leg, etype)
  stats.pd_errors:inc(1, etype)
  if leg == "prefill" then stats.pd_prefill_errors:inc() else stats.pd_decode_errors:inc() end
end

local pd_after_heads, pd_after_pipe

function pd.dispatch(flow, x, req, deadline, can_retry, pw, dw)
  local route = req.route
  flow:take(req, pw)
  flow:take(req, dw)
  req.prefill, req.worker = pw.url, dw.url
  bump(stats.for_pd_route(route).requests)
  bump(pw.m.pd_prefill)
  bump(dw.m.pd_decode)
  local now = now_ms()
  local left = deadline - now
  if left <= 0 then
    flow:settle(req, pw, req.policy, nil, 504)
    flow:settle(req, dw, req.dpolicy, nil, 504)
    return "fail", nil, nil, nil, "timeout"
  end
  -- x:forward_pd without its options table (as x:relay); --dp-aware:
  -- each leg's rank is spliced into its body in C
  -- with a hold, the commit is made in C at the heads when nothing is
  -- left to decide (the prefill said 2xx, the decode's status is not one
  -- a retry takes), and the call returns when both legs ended; a stream
  -- is held, so that its time to first byte is recorded at its head
  local pdx, ferr, leg, t_head, okp, perr, _, pres, dres = x:relay_pd(pw.pool, dw.pool, pw.dp_rank,
    dw.dp_rank, left, min(flow.connect_timeout_ms, left), rawget(req, "id"), flow.relay_auth, req.route,
    pw.bootstrap_host, pw.bootstrap_port, floor(req.pd_shape / 4), req.pd_shape % 4,
    req.extra or nil, req.stream and 3 or can_retry and flow.hold or 0)
  -- the rest in functions of their own (see regular.dispatch)
  if t_head then
    record(req.rs.ttfb, (t_head - req.t0) / 1000)
    return pd_after_pipe(flow, x, req, pw, dw, now, pdx, ferr, leg, okp, perr, pres, dres)
  end
  return pd_after_heads(flow, x, req, can_retry, pw, dw, now, pdx, ferr, leg)
end

-- pd.dispatch after its relay_pd returned without a commit.
function pd_after_heads(flow, x, req, can_retry, pw, dw, now, pdx, ferr, leg)
  local route, rs = req.route, req.rs
  if not pdx then
    if ferr == "bad_request" then
      flow:settle(req, pw, req.policy, nil, 400)
      flow:settle(req, dw, req.dpolicy, nil, 400)
      stats.errors:inc(1, route, "bad_request")
      req.error = "bad_request"
      flow.r:send_error(x, 400, leg, "invalid_request_error", extra_of(req))
      return "done"
    end
    if ferr == "client_closed" then
      flow:settle(req, pw, req.policy, nil, 499)
      flow:settle(req, dw, req.dpolicy, nil, 499)
      req.error = "client_closed"
      return "done"
    end
    -- a transport failure on one leg: the other was cancelled
    local bad = leg == "prefill" and pw or dw
    flow:settle(req, pw, req.policy, leg == "prefill" and "failure" or nil, 502)
    flow:settle(req, dw, req.dpolicy, leg == "decode" and "failure" or nil, 502)
    record(rs.upstream, (now_ms() - now) / 1000)
    pd_error(leg, ferr)
    log.warn(leg .. " worker request failed", { request_id = req.id, worker = bad.url, error = ferr,
      attempt = req.retries + 1 })
    local status = ferr == "timeout" and 504 or 502
    if ferr == "timeout" or not retry.retryable_error(ferr) then
      return "fail", status, nil, nil, leg .. " " .. ferr
    end
    avoid(req, bad)
    return "retry", status, nil, nil, leg .. " " .. ferr
  end
  record(rs.ttfb, (now_ms() - req.t0) / 1000)

  local pst, dst = ferr, leg           -- both heads' statuses (dst 0: not in yet)
  if pst < 200 or pst >= 300 then
    -- the prefill refused: its answer is the request's, the decode goes
    local body = pdx:read_prefill()
    local ctype = pdx:prefill_header("content-type")
    pdx:close()
    flow:settle(req, pw, req.policy, pst >= 500 and "failure" or "success", pst)
    flow:settle(req, dw, req.dpolicy, nil, pst)
    pd_error("prefill", "status_" .. pst)
    log.warn("prefill worker answered " .. pst, { request_id = req.id, worker = pw.url,
      attempt = req.retries + 1 })
    if retry.retryable_status(pst) and can_retry then
      avoid(req, pw)
      return "retry", pst, body or "", ctype
    end
    stats.errors:inc(1, route, "worker_" .. pst)
    req.error = "prefill_" .. pst
    x:respond(pst, flow.r.merge(extra_of(req), { ["content-type"] = ctype or "application/json" }), body or "")
    return "done"
  end

  if dst >= 400 and retry.retryable_status(dst) and can_retry then
    local body = pdx:read()
    local ctype = pdx:header("content-type")
    -- a prefill still running reads nil here and "cancelled" after the
    -- close: neither counts for its breaker
    local pres = pdx:outcome()
    pdx:close()
    flow:settle(req, pw, req.policy, leg_outcome(pres, pst), pst)
    flow:settle(req, dw, req.dpolicy, "failure", dst)
    pd_error("decode", "status_" .. dst)
    avoid(req, dw)
    log.warn("decode worker answered " .. dst .. ", retrying", { request_id = req.id, worker = dw.url,
      attempt = req.retries + 1 })
    return "retry", dst, body or "", ctype
  end

  -- commit: the client gets the decode's response
  local okp, perr, _, pres, dres = pdx:pipe(req.extra or nil, req.id)
  return pd_after_pipe(flow, x, req, pw, dw, now, pdx, pst, dst, okp, perr, pres, dres)
end

-- pd.dispatch after its pipe returned.
function pd_after_pipe(flow, x, req, pw, dw, now, pdx, pst, dst, okp, perr, pres, dres)
  local route, rs = req.route, req.rs
  record(rs.upstream, (now_ms() - now) / 1000)
  flow:settle(req, pw, req.policy, leg_outcome(pres, pst), pst)
  flow:settle(req, dw, req.dpolicy, okp and leg_outcome("ok", dst) or leg_outcome(dres, dst), dst)
  if pres ~= "ok" and pres ~= "cancelled" and pres ~= "client_closed" then pd_error("prefill", pres) end
  if dst >= 400 then
    stats.errors:inc(1, route, "worker_" .. dst)
    pd_error("decode", "status_" .. dst)
  end
  if not okp and cut_off(flow, x, req, perr) then
    pd_error("decode", perr)
    if perr ~= "timeout" then stats.pd_stream_errors:inc() end
  end
  -- freed now, not at the next collection; last, as a trace recorded
  -- from after the pipe can end at this call (one that ran on to the
  -- return would be given up, and all of this interpreted)
  pdx:close()
  return "done"
end

return M

-- The router's Prometheus metrics, named after the SGLang router's so that
-- existing dashboards work. Backed by the native sglr.metrics registry.
-- A policy's own metrics live in the policy (cache_aware's decision metrics
-- in policies/cache_aware.lua), registered through rt.metrics.
local ok, metrics = pcall(require, "sglr.metrics")

local M = { enabled = ok }

local LAT = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 45,
  60, 90, 120, 180, 240 }

if not ok then
  -- a build without the metrics primitive: every update is a no-op
  local nop
  nop = setmetatable({}, { __index = function() return function() return nop end end })
  return setmetatable(M, { __index = function() return function() return nop end end })
end

local function c(name, help, labels) return metrics.counter("sgl_router_" .. name, help, labels or {}) end
local function g(name, help, labels) return metrics.gauge("sgl_router_" .. name, help, labels or {}) end
local function h(name, help, labels, b) return metrics.histogram("sgl_router_" .. name, help, labels or {}, b or LAT) end

M.requests = c("requests_total", "Requests received, by route.", { "route" })
M.duration = h("request_duration_seconds", "Time from request to the end of the response.", { "route" })
M.errors = c("request_errors_total", "Requests answered with an error, by route and error type.", { "route", "error_type" })
M.retries = c("retries_total", "Attempts that were retried, by route.", { "route" })
M.retry_backoff = h("retry_backoff_duration_seconds", "Backoff waited before a retry.", { "attempt" })
M.retries_exhausted = c("retries_exhausted_total", "Requests that failed after every attempt.", { "route" })
M.cb_state = g("cb_state", "Circuit breaker state per worker (0 closed, 1 open, 2 half-open).", { "worker" })
M.cb_transitions = c("cb_state_transitions_total", "Circuit breaker state changes.", { "worker", "from", "to" })
M.cb_outcomes = c("cb_outcomes_total", "Request outcomes recorded by the circuit breakers.", { "worker", "outcome" })
M.active_workers = g("active_workers", "Workers registered with the router.")
M.worker_health = g("worker_health", "Worker health (1 healthy, 0 unhealthy).", { "worker" })
M.worker_load = g("worker_load", "Load reported by the worker's /get_load.", { "worker" })
M.running = g("running_requests", "Requests in flight per worker.", { "worker" })
M.processed = c("processed_requests_total", "Requests sent to each worker.", { "worker" })
M.upstream_replays = c("upstream_replays_total",
  "Requests sent again on a new connection after a reused keep-alive connection failed before any response byte.",
  { "worker" })
M.decisions = c("policy_decisions_total", "Routing decisions by policy and chosen worker.", { "policy", "worker" })
M.tree_size = g("tree_size", "Characters in the approximate radix tree per worker.", { "worker" })
M.pd_requests = c("pd_requests_total", "PD requests dispatched (one per attempt), by route.", { "route" })
M.pd_prefill = c("pd_prefill_requests_total", "PD requests sent to each prefill worker.", { "worker" })
M.pd_decode = c("pd_decode_requests_total", "PD requests sent to each decode worker.", { "worker" })
M.pd_errors = c("pd_errors_total", "PD attempts that failed, by error type.", { "error_type" })
M.pd_prefill_errors = c("pd_prefill_errors_total", "PD attempts whose prefill leg failed.")
M.pd_decode_errors = c("pd_decode_errors_total", "PD attempts whose decode leg failed.")
M.pd_stream_errors = c("pd_stream_errors_total", "PD decode streams cut off after they started.")
M.pd_duration = h("pd_request_duration_seconds", "Time from a PD request to the end of its response.", { "route" })
M.ttfb = h("time_to_first_byte_seconds", "Time from request to the worker's response head.", { "route" })
M.upstream = h("upstream_duration_seconds", "Duration of each attempt against a worker.", { "route" })
M.queue_depth = g("rate_limit_queue_depth", "Requests waiting for a concurrency slot.")
M.rejections = c("rate_limit_rejections_total", "Requests refused by the concurrency limiter.", { "reason" })
M.inflight = g("inflight_requests", "Inference requests holding a concurrency slot.")
M.body_bytes = g("request_body_bytes", "Bytes of request bodies held by requests not finished yet.")
M.script_errors = c("script_errors_total", "Lua errors raised while handling requests.")
M.discovery_pods = g("discovery_pods", "Pods discovery tracks as workers or candidates (matching the selector, seen alive), by role.", { "role" })
M.discovery_added = c("discovery_workers_added_total", "Workers added by Kubernetes discovery, by role.", { "role" })
M.discovery_removed = c("discovery_workers_removed_total",
  "Workers removed by Kubernetes discovery, by reason (deleted, terminating, not_ready, label_changed, ip_changed, replaced, ...).",
  { "reason" })
M.discovery_events = c("discovery_events_total", "Watch events received, by type (malformed and unknown: skipped).", { "type" })
M.discovery_watch_restarts = c("discovery_watch_restarts_total", "Pod watches that ended early, by reason (gone: 410, error).",
  { "reason" })
M.discovery_relists = c("discovery_relists_total", "Full pod lists, by reason (start, periodic, gone, watch_failed, retry).",
  { "reason" })
M.discovery_errors = c("discovery_errors_total", "Failed pod lists and watches.", { "op" })
M.discovery_sync_age = g("discovery_last_sync_age_seconds",
  "Seconds since the pod view was last confirmed by a list or a watch event (bookmarks included).")
M.policy_reloads = c("policy_reloads_total", "Policy reloads by pool and result (ok, refused, rollback).",
  { "pool", "result" })
M.policy_info = g("policy_info", "The live policy of each pool: 1 for its name, version and source hash.",
  { "pool", "name", "version", "hash" })
M.policy_errors = c("policy_select_errors_total", "Requests whose policy select raised an error, by pool.",
  { "pool" })
M.loop_lag = h("event_loop_lag_seconds", "How late a 100 ms timer fired: time the event loop spent busy without polling.")

-- Handles of the per-route and per-worker series, looked up once: the
-- request path updates them with no label hashing.
local route_cache = {}
function M.for_route(route)
  local handles = route_cache[route]
  if not handles then
    handles = {
      requests = M.requests:series(route), duration = M.duration:series(route),
      ttfb = M.ttfb:series(route), upstream = M.upstream:series(route),
      retries = M.retries:series(route), exhausted = M.retries_exhausted:series(route),
    }
    route_cache[route] = handles
  end
  return handles
end

-- PD mode's per-route handles, made on first use so regular mode exports no
-- PD series (kept apart from for_route's table, which stays a plain one)
local pd_route_cache = {}
function M.for_pd_route(route)
  local handles = pd_route_cache[route]
  if not handles then
    handles = { requests = M.pd_requests:series(route), duration = M.pd_duration:series(route) }
    pd_route_cache[route] = handles
  end
  return handles
end

function M.for_worker(url, policy, role)
  return {
    running = M.running:series(url), processed = M.processed:series(url),
    pd_prefill = role == "prefill" and M.pd_prefill:series(url) or nil,
    pd_decode = role == "decode" and M.pd_decode:series(url) or nil,
    decisions = M.decisions:series(policy or "unknown", url),
    success = M.cb_outcomes:series(url, "success"), failure = M.cb_outcomes:series(url, "failure"),
  }
end

-- Remove every series of a worker (labelled worker=url), whatever metric
-- it is in, a policy's own included: a removed worker leaves nothing
-- behind in /metrics. Returns how many went.
function M.remove_worker(url) return metrics.remove_label("worker", url) end

M.inflight_h = M.inflight:series()
M.queue_depth_h = M.queue_depth:series()

-- The request path's updates of a series handle: M.bump(h) adds 1,
-- M.add(h, v) adds v, M.record(h, v) observes v. Through LuaJIT's FFI the JIT compiles them
-- into its trace (a classic C call ends the trace); elsewhere they are the
-- handle's own methods.
local ffi_ok, ffi = pcall(require, "ffi")
if ffi_ok then
  ffi_ok = pcall(ffi.cdef, [[
    int sglr_lua_series_inc(void *h, double v);
    int sglr_lua_series_observe(void *h, double v);
  ]])
  ffi_ok = ffi_ok and pcall(function() return ffi.C.sglr_lua_series_inc, ffi.C.sglr_lua_series_observe end)
end
if ffi_ok then
  local C = ffi.C
  function M.bump(s) C.sglr_lua_series_inc(s, 1) end
  function M.add(s, v) C.sglr_lua_series_inc(s, v) end
  function M.record(s, v) C.sglr_lua_series_observe(s, v) end
  -- metrics.apply(s1, v1, ...), a policy's several updates in one call
  -- (rt.metrics.apply): up to six pairs in one FFI call the JIT compiles
  -- into the policy's trace, where the classic call ended it. Anything
  -- else (more pairs, a value that is no series or number, a counter
  -- going down) goes to the classic apply, which checks it as before.
  if pcall(ffi.cdef, [[
      int sglr_lua_series_apply6(void *h1, double v1, void *h2, double v2, void *h3, double v3,
                                 void *h4, double v4, void *h5, double v5, void *h6, double v6);
    ]]) and pcall(function() return C.sglr_lua_series_apply6 end) then
    local classic_apply, SERIES = metrics.apply, getmetatable(M.inflight_h)
    -- pair i of k is a series and a number (a pair past k: nothing)
    local function pair(i, k, s, v)
      return i > k or type(s) == "userdata" and getmetatable(s) == SERIES and type(v) == "number"
    end
    metrics.apply = function(...)
      local n = select("#", ...)
      local k = n / 2
      local h1, v1, h2, v2, h3, v3, h4, v4, h5, v5, h6, v6 = ...
      if n >= 2 and n <= 12 and n % 2 == 0 and pair(1, k, h1, v1) and pair(2, k, h2, v2)
          and pair(3, k, h3, v3) and pair(4, k, h4, v4) and pair(5, k, h5, v5) and pair(6, k, h6, v6)
          and C.sglr_lua_series_apply6(h1, v1, h2, v2 or 0, h3, v3 or 0, h4, v4 or 0, h5, v5 or 0,
            h6, v6 or 0) == 0 then
        return
      end
      return classic_apply(...)
    end
  end
  -- metrics.acc_add(acc, mask, v1, ..., v8) (an accumulator: metrics.h),
  -- a policy's several updates a request into one warm block, through
  -- the FFI; anything it refuses goes to the classic call, which says why
  if pcall(ffi.cdef, [[
      int sglr_lua_acc_add8(void *a, unsigned mask, double v1, double v2, double v3, double v4,
                            double v5, double v6, double v7, double v8);
    ]]) and pcall(function() return C.sglr_lua_acc_add8 end) then
    local classic_add, ACC = metrics.acc_add, debug.getregistry()["sglr.metrics.accumulator"]
    local band = bit.band
    -- value v for the series of bit b: a number where the mask names it,
    -- else a number or nothing
    local function num(mask, b, v)
      return type(v) == "number" or v == nil and band(mask, b) == 0
    end
    metrics.acc_add = function(a, mask, v1, v2, v3, v4, v5, v6, v7, v8)
      if type(a) == "userdata" and getmetatable(a) == ACC and type(mask) == "number"
          and mask >= 0 and mask < 256 and mask % 1 == 0
          and num(mask, 1, v1) and num(mask, 2, v2) and num(mask, 4, v3) and num(mask, 8, v4)
          and num(mask, 16, v5) and num(mask, 32, v6) and num(mask, 64, v7) and num(mask, 128, v8)
          and C.sglr_lua_acc_add8(a, mask, v1 or 0, v2 or 0, v3 or 0, v4 or 0, v5 or 0, v6 or 0,
            v7 or 0, v8 or 0) == 0 then
        return
      end
      return classic_add(a, mask, v1, v2, v3, v4, v5, v6, v7, v8)
    end
  end
else
  function M.bump(s) s:inc() end
  function M.add(s, v) s:inc(v) end
  function M.record(s, v) s:observe(v) end
end

function M.render() return metrics.render() end
M.metrics = metrics

return M

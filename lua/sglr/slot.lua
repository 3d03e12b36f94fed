-- sglr.slot: the live policy of one pool ("regular", or "prefill" and
-- "decode" in PD mode), and its lifecycle while the router serves:
--
--   load     read the code (a file, a built-in name, or posted source),
--            check its options, probe select on synthetic workers
--   install  the new instance takes the old one's state (migrate(old)),
--            hears of the pool's workers (on_add), and routes new requests;
--            the old one is closed at once: its timers stop, its requests
--            are cancelled, its close hook runs. Requests in flight keep
--            the instance that picked their worker (flow's req.policy), so
--            a closed instance must still answer select and on_done.
--   rollback when select raises on more than --policy-rollback-error-rate
--            of the pool's requests within --policy-rollback-window-secs
--            (and at least --policy-rollback-min-requests of them), the
--            last good version comes back, taking the failing one's state.
--
-- A request whose select raised is still routed: by the previous instance
-- while there is one, else it is answered 503 naming the error.
--
-- Every load, swap, refusal and rollback is logged, counted
-- (sgl_router_policy_reloads_total{pool,result}) and kept in the slot's
-- recent events (GET /admin/policy).
local policy = require "sglr.policy"
local core = require "sglr.core"
local log = require "sglr.log"
local stats = require "sglr.stats"

local pairs, ipairs, pcall, tostring, type = pairs, ipairs, pcall, tostring, type
local fmt = string.format

local M = {}
M.__index = M

local MAX_EVENTS = 20

local function copy(t)
  local out = {}
  for k, v in pairs(t or {}) do out[k] = v end
  return out
end

-- new{ pool =, base_rt = function() -> runtime (every, http_start, ...),
--      workers = function() -> the pool's workers, swap = function(inst, entry),
--      conf = router conf (rollback thresholds) }
function M.new(o)
  return setmetatable({
    pool = o.pool, role = o.pool, base_rt = o.base_rt, workers_of = o.workers, on_swap = o.swap,
    rate = o.conf and o.conf.policy_rollback_error_rate or 0.5,
    window_ms = (o.conf and o.conf.policy_rollback_window_secs or 10) * 1000,
    min_requests = o.conf and o.conf.policy_rollback_min_requests or 20,
    current = false,   -- the live entry
    good = false,      -- the entry live before it: the last good version
    events = {},
    -- the error window: its start, errors, the pool's routed count at its
    -- start, and the requests in it routed by a fallback after an error
    win_start = 0, win_errors = 0, win_base = 0, win_fallback = 0,
  }, M)
end

function M:event(result, entry, message)
  local ev = { at = os.date("!%Y-%m-%dT%H:%M:%SZ"), result = result, pool = self.pool,
    name = entry and entry.name or nil, version = entry and entry.version or nil,
    hash = entry and entry.hash or nil, source = entry and entry.source or nil, message = message }
  local evs = self.events
  evs[#evs + 1] = ev
  if #evs > MAX_EVENTS then table.remove(evs, 1) end
  local lvl = (result == "ok" or result == "start") and "info" or "warn"
  log.log(lvl, "policy " .. result, { pool = self.pool, policy = ev.name, version = ev.version,
    hash = ev.hash, source = ev.source, error = message })
  if result ~= "start" then stats.policy_reloads:inc(1, self.pool, result) end
end

-- Build and check an entry (not live yet).
-- spec = { policy = name or path | code = source, options = map,
--          strict = set of option keys the operator named, source = label,
--          reuse_src = the live code's source (a change of options only) }
-- -> entry | nil, err
function M:prepare(spec)
  local P, src, err
  if spec.code then
    src = spec.code
    P, err = policy.from_source(src, "posted policy code", "posted")
  elseif spec.reuse_src then
    src = spec.reuse_src
    P, err = policy.from_source(src, "policy '" .. tostring(spec.policy) .. "'",
      tostring(spec.policy):match("([^/\\]+)%.lua$") or spec.policy)
  else
    P, src = policy.fetch(spec.policy)
    if not P then err = src end
  end
  if not P then return nil, err end
  local opts
  opts, err = policy.options(P, spec.options, spec.strict)
  if not opts then return nil, err end
  -- the probe: a throwaway instance, closed before the live one is made
  local prt, pscope = policy.scope(self.base_rt())
  if prt.metrics then prt.metrics = policy.NOP_METRICS end
  if prt.stats then prt.stats = policy.NOP_METRICS end
  local probe
  probe, err = policy.instantiate(P, opts, prt)
  if not probe then
    pscope.close()
    return nil, err
  end
  local ok
  ok, err = policy.probe(probe, self.role)
  policy.close(probe, pscope)
  if not ok then return nil, err end
  return self:instantiate(P, src, opts, spec)
end

function M:instantiate(P, src, opts, spec)
  local rt, scope = policy.scope(self.base_rt())
  local inst, err = policy.instantiate(P, opts, rt)
  if not inst then
    scope.close()
    return nil, err
  end
  return { P = P, inst = inst, scope = scope, src = src, options = opts, spec = spec,
    name = tostring(P.name or spec.policy or "?"), version = tostring(P.version or ""),
    hash = policy.hash(src), loaded_at = os.date("!%Y-%m-%dT%H:%M:%SZ"),
    source = spec.source or spec.policy or "posted code" }
end

-- Make entry live: migrate, on_add, swap, close the old one.
-- -> true | nil, err (entry is closed then, the old one stays)
function M:install(entry, result, message)
  local old = self.current
  local inst = entry.inst
  if old and type(inst.migrate) == "function" then
    local ok, err = pcall(inst.migrate, inst, old.inst)
    if not ok then
      policy.close(inst, entry.scope)
      return nil, fmt("policy '%s': migrate raised an error: %s", entry.name, tostring(err))
    end
  end
  if type(inst.on_add) == "function" then
    for _, w in ipairs(self.workers_of()) do
      local ok, err = pcall(inst.on_add, inst, w)
      if not ok then
        policy.close(inst, entry.scope)
        return nil, fmt("policy '%s': on_add raised an error: %s", entry.name, tostring(err))
      end
    end
  end
  self.current = entry
  if result ~= "rollback" then self.good = old or false end
  if result == "rollback" then self.good = false end
  self.win_start, self.win_errors = 0, 0
  self.on_swap(inst, entry)
  if old then
    local ok, err = policy.close(old.inst, old.scope)
    if not ok then log.warn("policy close hook raised an error", { pool = self.pool, error = err }) end
    -- a closed instance stays usable for requests in flight and as the
    -- fallback of the new one
    old.closed = true
  end
  if old and stats.enabled then stats.policy_info:remove(self.pool, old.name, old.version, old.hash) end
  if stats.enabled then stats.policy_info:set(1, self.pool, entry.name, entry.version, entry.hash) end
  self:event(result or "ok", entry, message)
  return true
end

-- Load spec and make it live, or refuse it (the live policy stays).
-- -> entry | nil, err
function M:load(spec, result)
  local entry, err = self:prepare(spec)
  if entry then
    local ok
    ok, err = self:install(entry, result)
    if ok then return entry end
  end
  if result ~= "start" then
    self:event("refused", { name = spec.policy or "posted code", source = spec.source or spec.policy }, err)
  end
  return nil, err
end

-- The pool's requests routed so far (every pick bumps a worker's
-- processed count): the error share's denominator, read only when an
-- error happens, so the request path pays nothing for it.
local function routed(self)
  local n = 0
  for _, w in ipairs(self.workers_of()) do n = n + w.processed end
  return n
end

-- select of inst raised err while routing a request of this pool.
-- Counts it, rolls back when the share is over the threshold, and returns
-- the instance to route the request with instead, or nil.
function M:select_failed(inst, err)
  stats.policy_errors:inc(1, self.pool)
  local cur = self.current
  if not cur or inst ~= cur.inst then
    -- an instance already replaced (a request in flight): not the live one's fault
    return cur and cur.inst or nil
  end
  local now = core.now()
  if now - self.win_start > self.window_ms then
    self.win_start, self.win_errors, self.win_base, self.win_fallback = now, 0, routed(self), 0
    log.warn("policy select raised an error", { pool = self.pool, policy = cur.name, error = tostring(err) })
  end
  self.win_errors = self.win_errors + 1
  -- requests of the window: the ones that raised, and the others routed
  -- (not counting the raised ones a fallback routed)
  local total = self.win_errors + routed(self) - self.win_base - self.win_fallback
  local good = self.good
  if good and total >= self.min_requests and self.win_errors > self.rate * total then
    local msg = fmt("select raised on %d of %d requests in %gs: %s", self.win_errors, total,
      self.window_ms / 1000, tostring(err))
    local entry, ierr = self:instantiate(good.P, good.src, good.options, good.spec)
    if entry then
      entry.source = good.source
      local ok
      ok, ierr = self:install(entry, "rollback", msg)
      if ok then return entry.inst
      end
    end
    log.error("policy rollback failed", { pool = self.pool, error = ierr })
  end
  if good then self.win_fallback = self.win_fallback + 1 end
  return good and good.inst or nil
end

-- The JSON view of GET /admin/policy.
local function entry_view(e)
  if not e then return nil end
  return { name = e.name, version = e.version, hash = e.hash, loaded_at = e.loaded_at,
    source = e.source, options = copy(e.options) }
end

function M:view()
  local v = entry_view(self.current)
  v.previous_good = entry_view(self.good) or nil
  v.events = self.events
  return v
end

return M

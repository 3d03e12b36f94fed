-- sglr.decisions: what a policy decided and why.
--
-- Two views of one decision:
--
--   the decision log   a ring of the last N routing decisions (one per
--                      attempt), read by GET /admin/decisions
--   the explanation    one JSON object in the x-sglr-decision response
--                      header of a request that asked for it
--
-- The ring is written on every attempt, so writing costs no allocation
-- and no encoding: its slots are tables made once, at their final size,
-- and recording is a handful of field stores. Encoding happens on read.
--
--   slot fields   t (monotonic ms), id, route, attempt, policy (the
--                 instance: its name and version are read on read),
--                 worker (URL), reason, matched, total (the leg of a
--                 regular attempt or the prefill of a PD one), d_policy,
--                 d_worker, d_reason, d_matched, d_total (a PD decode leg;
--                 d_worker false: none), nsh + sh = { name1, url1, name2,
--                 url2, ... } (the shadow candidates' choices; url false:
--                 none)
--
-- A policy reports its reason through select's extra return values
-- (worker, reason, matched, total); one that returns only a worker is
-- "unspecified". A retried attempt's reason is "retry", with the policy's
-- own as policy_reason.

local type, floor = type, math.floor
local cjson = require "cjson.safe"

local M = {}
M.__index = M

M.UNSPECIFIED = "unspecified"
-- Largest --decision-log-size and n of GET /admin/decisions.
M.MAX_SIZE = 100000

local function new_slot()
  return { t = 0, id = false, route = false, attempt = 0,
    policy = false, worker = false, reason = false, matched = false, total = false,
    d_policy = false, d_worker = false, d_reason = false, d_matched = false, d_total = false,
    nsh = 0, sh = {} }
end

-- A ring of `size` decisions (size 0: none kept).
function M.new(size)
  local self = setmetatable({ size = size, n = 0, pos = 0, slots = {} }, M)
  for i = 1, size do self.slots[i] = new_slot() end
  return self
end

-- Record the first leg of a decision in the next slot (the oldest once the
-- ring is full) and return the slot. Called on every attempt: plain
-- stores, no call, no allocation.
function M:record(now, req, policy, w, reason, matched, total)
  local pos, size = self.pos + 1, self.size
  if pos > size then pos = 1 end
  self.pos = pos
  if self.n < size then self.n = self.n + 1 end
  local s = self.slots[pos]
  s.t, s.id, s.route, s.attempt = now, req.id, req.route, req.retries + 1
  s.policy, s.worker, s.reason, s.matched, s.total = policy, w.url, reason or false, matched or false,
    total or false
  s.d_worker, s.nsh = false, 0
  return s
end

-- Record the decode leg of a PD decision.
function M.record_decode(s, policy, w, reason, matched, total)
  s.d_policy, s.d_worker, s.d_reason, s.d_matched, s.d_total = policy, w.url, reason or false,
    matched or false, total or false
end

local function nz(v)
  if v == false then return nil end
  return v
end

local function ratio(matched, total)
  if type(matched) == "number" and type(total) == "number" and total > 0 then
    return floor(matched / total * 10000 + 0.5) / 10000
  end
  return nil
end

local function leg_view(policy, version, worker, reason, matched, total, attempt)
  local v = { policy = nz(policy), version = nz(version), worker = nz(worker),
    reason = reason or M.UNSPECIFIED, matched_chars = nz(matched), total_chars = nz(total),
    match_ratio = ratio(matched, total) }
  if attempt and attempt > 1 then v.reason, v.policy_reason = "retry", reason end
  return v
end

local function shadow_view(s, live_url)
  if s.nsh == 0 then return nil end
  local out = {}
  for i = 1, s.nsh do
    local url = s.sh[2 * i]
    out[i] = { candidate = s.sh[2 * i - 1], worker = url or cjson.null, agree = url == live_url }
  end
  return out
end

-- A slot as a plain table (for JSON); wall: ms since the epoch at mono_now.
function M.view(s, wall_now, mono_now)
  local p, dp = s.policy, s.d_policy
  local v = leg_view(p.name or false, p.version or false, s.worker, s.reason, s.matched, s.total, s.attempt)
  v.time_ms = floor(wall_now - (mono_now - s.t))
  v.request_id, v.route, v.attempt = nz(s.id), nz(s.route), s.attempt
  if s.d_worker then
    v = { time_ms = v.time_ms, request_id = v.request_id, route = v.route, attempt = v.attempt, mode = "pd",
      prefill = v,
      decode = leg_view(dp.name or false, dp.version or false, s.d_worker, s.d_reason, s.d_matched, s.d_total,
        s.attempt) }
    v.prefill.time_ms, v.prefill.request_id, v.prefill.route, v.prefill.attempt = nil, nil, nil, nil
  end
  v.shadow = shadow_view(s, s.worker)
  return v
end

-- The last n decisions, newest first, as plain tables.
function M:last(n, wall_now, mono_now)
  local out = {}
  if n > self.n then n = self.n end
  local pos = self.pos
  for i = 1, n do
    out[i] = M.view(self.slots[pos], wall_now, mono_now)
    pos = pos - 1
    if pos < 1 then pos = self.size end
  end
  return setmetatable(out, cjson.array_mt)
end

-- --- the explanation ----------------------------------------------------------------

-- One leg of an explanation: what policy chose among avail, and why. Only
-- built for a request that asked (it allocates).
function M.explain_leg(policy, w, reason, matched, total, avail, attempt)
  local v = leg_view(policy.name or false, policy.version or false, w.url, reason or M.UNSPECIFIED,
    matched or false, total or false, attempt)
  local loads = {}
  for i = 1, #avail do
    local c = avail[i]
    loads[c.url] = c.load or 0
  end
  v.loads = loads
  v.candidates = #avail
  return v
end

-- The header value: one JSON object. legs: the regular leg, or prefill and
-- decode; shadow: a slot-like table (nsh, sh) or nil.
function M.explain_json(req, leg, dleg, shadow)
  local v
  if dleg then
    v = { mode = "pd", prefill = leg, decode = dleg }
  else
    v = leg
  end
  v.request_id, v.attempt = req.id, req.retries + 1
  if shadow then v.shadow = shadow_view(shadow, leg.worker) end
  -- cjson escapes every "/" (URLs); a header reads better without
  return (cjson.encode(v):gsub("\\/", "/"))
end

return M

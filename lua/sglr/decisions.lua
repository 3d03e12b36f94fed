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
-- and no encoding: it is one flat array made at startup, STRIDE entries
-- per decision, written with integer-indexed stores. Encoding happens on
-- read. The entries of decision pos, at b = (pos - 1) * STRIDE:
--
--   b+1 t (monotonic ms)   b+2 request id   b+3 route   b+4 attempt
--   b+5 policy (the instance: name and version are read on read)
--   b+6 worker URL   b+7 reason   b+8 matched   b+9 total
--   b+10..14 the decode leg of a PD attempt: policy, worker URL (false:
--            none), reason, matched, total
--   b+15 the shadow candidates' choices (false: none): a table per
--        slot, made the first time candidates are offered its decision,
--        { nsh = n, sh = { name1, url1, ... } } (url false: that candidate
--        chose none)
--
-- What recording costs grows with the ring's size, not with the stores:
-- measured by callgrind, 1000 decisions add about 1,300 instructions a
-- request and 10 decisions about 200. Neither keeping the numbers in a C
-- array (3 Lua values a decision instead of 15) nor dropping the request
-- id changed it by more than 400, so the cause is not pinned down yet
-- (the collector's work on a large, often written table is the suspect).
-- Per-slot tables are made only when shadows need them.
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

local STRIDE = 15

-- A ring of `size` decisions (size 0: none kept).
function M.new(size)
  local a = {}
  for i = 1, size * STRIDE do a[i] = false end
  return setmetatable({ size = size, n = 0, pos = 0, a = a, shs = {} }, M)
end

-- Record the first leg of a decision in the next slot (the oldest once the
-- ring is full) -> its position.
function M:record(now, req, policy, w, reason, matched, total)
  local pos, size = self.pos + 1, self.size
  if pos > size then pos = 1 end
  self.pos = pos
  if self.n < size then self.n = self.n + 1 end
  local a, b = self.a, (pos - 1) * 15
  a[b + 1], a[b + 2], a[b + 3], a[b + 4], a[b + 5] = now, req.id, req.route, req.retries + 1, policy
  a[b + 6], a[b + 7], a[b + 8], a[b + 9] = w.url, reason or false, matched or false, total or false
  a[b + 11], a[b + 15] = false, false
  return pos
end

-- Record the decode leg of the PD decision at pos.
function M:record_decode(pos, policy, w, reason, matched, total)
  local a, b = self.a, (pos - 1) * 15
  a[b + 10], a[b + 11], a[b + 12], a[b + 13], a[b + 14] = policy, w.url, reason or false, matched or false,
    total or false
end

-- The table the shadow candidates' choices of the decision at pos go in.
function M:shadow_of(pos)
  local s = self.shs[pos]
  if not s then
    s = { nsh = 0, sh = {} }
    self.shs[pos] = s
  end
  s.nsh = 0
  self.a[(pos - 1) * 15 + 15] = s
  return s
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

-- The decision at pos as a plain table (for JSON); wall: ms since the
-- epoch at mono_now.
function M:view(pos, wall_now, mono_now)
  local a, b = self.a, (pos - 1) * STRIDE
  local p, attempt = a[b + 5], a[b + 4]
  local v = leg_view(p.name or false, p.version or false, a[b + 6], a[b + 7], a[b + 8], a[b + 9], attempt)
  local head = v
  if a[b + 11] then
    local dp = a[b + 10]
    head = { mode = "pd", prefill = v,
      decode = leg_view(dp.name or false, dp.version or false, a[b + 11], a[b + 12], a[b + 13], a[b + 14], attempt) }
  end
  head.time_ms = floor(wall_now - (mono_now - a[b + 1]))
  head.request_id, head.route, head.attempt = nz(a[b + 2]), nz(a[b + 3]), attempt
  local sh = a[b + 15]
  if sh then head.shadow = shadow_view(sh, a[b + 6]) end
  return head
end

-- The last n decisions, newest first, as plain tables.
function M:last(n, wall_now, mono_now)
  local out = {}
  if n > self.n then n = self.n end
  local pos = self.pos
  for i = 1, n do
    out[i] = self:view(pos, wall_now, mono_now)
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
-- decode; shadow: the candidates' choices (a table like shadow_of's) or nil.
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

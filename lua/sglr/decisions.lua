-- sglr.decisions: what a policy decided and why.
--
-- Two views of one decision:
--
--   the decision log   a ring of the last N routing decisions (one per
--                      attempt), read by GET /admin/decisions
--   the explanation    one JSON object in the x-sglr-decision response
--                      header of a request that asked for it
--
-- The ring is written on every attempt, so writing costs no allocation,
-- no encoding and no work for the collector: the decisions live in one
-- FFI array made at startup (the collector never walks into it), strings
-- as small ids into an intern table (URLs, reasons, policy names: a few
-- of each), the request id copied into the slot. A Lua table of 15 values
-- per decision cost about 1,300 instructions a request at 1000 decisions
-- (the collector walked it every cycle); this costs about the same at any
-- size. Encoding happens on read. Shadow choices, when candidates are
-- configured, go in a table per slot, made the first time one is needed.
--
-- A policy reports its reason through select's extra return values
-- (worker, reason, matched, total); one that returns only a worker is
-- "unspecified". A retried attempt's reason is "retry", with the policy's
-- own as policy_reason.

local type, floor, min = type, math.floor, math.min
local cjson = require "cjson.safe"
local ffi = require "ffi"

local M = {}
M.__index = M

M.UNSPECIFIED = "unspecified"
-- Largest --decision-log-size and n of GET /admin/decisions.
M.MAX_SIZE = 100000


-- the slot's struct, as the runtime defines it (core/sglr.h)
ffi.cdef "const char *sglr_decision_cdef(void);"
ffi.cdef(ffi.string(ffi.C.sglr_decision_cdef()))
local slots_t = ffi.typeof("sglr_decision_t[?]")
-- a decision's first leg and its request id are written by C calls (the
-- id cut to the slot's 63 bytes)
ffi.cdef [[
  void sglr_decision_put(sglr_decision_t *a, int i, double t, int attempt, int route, int pname,
    int pversion, int worker, int reason, double matched, double total);
  int sglr_decision_put_id(sglr_decision_t *a, int i, void *x, const char *id, int idlen);
]]
local put, put_id = ffi.C.sglr_decision_put, ffi.C.sglr_decision_put_id
local string_of = ffi.string
local NAN = 0 / 0

-- Strings by small id (0: none). Bounded: past MAX_STRINGS distinct ones
-- (a custom policy could make a reason per request) every new one reads
-- back as "(other)".
local MAX_STRINGS = 4096
local OTHER = 1

local function intern(self, s)
  if not s then return 0 end
  local id = self.ids[s]
  if id then return id end
  local n = self.nstr
  if n >= MAX_STRINGS then return OTHER end
  n = n + 1
  self.nstr, self.ids[s], self.strs[n] = n, n, s
  return n
end

local function str(self, id)
  if id == 0 then return false end
  return self.strs[id]
end

local function num(v)
  if v ~= v then return false end      -- NaN: not given
  return v
end

-- A ring of `size` decisions (size 0: none kept).
function M.new(size)
  local self = setmetatable({ size = size, n = 0, pos = 0, shs = {},
    ids = { ["(other)"] = OTHER }, strs = { "(other)" }, nstr = OTHER }, M)
  self.a = size > 0 and slots_t(size) or false
  return self
end

-- Record the first leg of a decision in the next slot (the oldest once the
-- ring is full) -> its position.
function M:record(now, req, policy, w, reason, matched, total)
  -- without branches: one that flips after a while (the ring wrapping
  -- every size decisions, or full from then on) left the JIT a side trace
  -- it could not compile from inside the flow's ("register coalescing too
  -- complex"), and every request after it interpreted the rest of record
  -- and of the flow, the JIT trying again and again
  local size = self.size
  local pos = self.pos % size + 1
  self.pos = pos
  self.n = min(self.n + 1, size)
  -- C calls: the FFI's field stores cost thousands of instructions
  -- wherever the JIT leaves this function to the interpreter. The id
  -- last, once the leg's many values are dead: a side trace from a
  -- branch with them all live could not be compiled ("register
  -- coalescing too complex") and was tried again and again.
  local a, i = self.a, pos - 1
  put(a, i, now, req.retries + 1, intern(self, req.route), intern(self, policy.name),
    intern(self, policy.version), intern(self, w.url), intern(self, reason), matched or NAN, total or NAN)
  -- the id straight from the request's exchange when it is kept there
  -- (no Lua string of it made), else req.id
  local id = rawget(req, "id")
  if id then
    put_id(a, i, nil, id, #id)
  else
    local x = rawget(req, "_x")
    if type(x) ~= "userdata" or put_id(a, i, x, nil, 0) < 0 then
      id = req.id
      put_id(a, i, nil, id, #id)
    end
  end
  return pos
end

-- Record the decode leg of the PD decision at pos.
function M:record_decode(pos, policy, w, reason, matched, total)
  local d = self.a[pos - 1]
  d.dpname, d.dpversion = intern(self, policy.name), intern(self, policy.version)
  d.dworker, d.dreason = intern(self, w.url), intern(self, reason)
  d.dmatched, d.dtotal = matched or NAN, total or NAN
end

-- The table the shadow candidates' choices of the decision at pos go in.
function M:shadow_of(pos)
  local s = self.shs[pos]
  if not s then
    s = { nsh = 0, sh = {} }
    self.shs[pos] = s
  end
  s.nsh = 0
  self.a[pos - 1].has_shadow = 1
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
  local d = self.a[pos - 1]
  local attempt = d.attempt
  local v = leg_view(str(self, d.pname), str(self, d.pversion), str(self, d.worker), str(self, d.reason) or nil,
    num(d.matched), num(d.total), attempt)
  local head = v
  if d.dworker ~= 0 then
    head = { mode = "pd", prefill = v,
      decode = leg_view(str(self, d.dpname), str(self, d.dpversion), str(self, d.dworker),
        str(self, d.dreason) or nil, num(d.dmatched), num(d.dtotal), attempt) }
  end
  head.time_ms = floor(wall_now - (mono_now - d.t))
  head.request_id, head.route, head.attempt = string_of(d.id, d.idlen), nz(str(self, d.route)), attempt
  if d.has_shadow ~= 0 and self.shs[pos] then head.shadow = shadow_view(self.shs[pos], str(self, d.worker)) end
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

-- sglr.shadow: shadow policy candidates.
--
-- A candidate is a policy instance that is offered every routed request
-- on the same snapshot as the live policy (the same request, the same
-- list of available workers, the same loads) right after the live one
-- chose. Its choice is recorded, never served:
--
--   live select -> worker served
--        |
--        +-> candidate 1 select -> counted: agree / disagree, matched chars
--        +-> candidate 2 select -> ...
--
-- Isolation from the live policy: a candidate is its own instance (a
-- cache_aware candidate keeps its own tree, fed by its own choices, since
-- cache_aware records on select); worker loads are taken for the live
-- choice only; a candidate's on_done hears its own choice; its runtime
-- has no metrics registry (a policy's decision metrics stay the live
-- policy's) and its timers are stopped when it goes.
--
-- A candidate that raises an error is dropped at once; one whose select
-- takes longer than the budget (--shadow-budget-us) SLOW_STRIKES times in
-- a row is dropped too. Dropped candidates stay listed (with the reason)
-- until removed. In PD mode candidates shadow the prefill policy.

local pcall, type, tostring, ipairs, pairs = pcall, type, tostring, ipairs, pairs
local floor = math.floor
local policy_mod = require "sglr.policy"
local log = require "sglr.log"
local stats = require "sglr.stats"
local core = require "sglr.core"

local now_ms = core.now
do
  local ok, ffi = pcall(require, "ffi")
  if ok then
    pcall(ffi.cdef, "double sglr_now_ms(void);")
    local okc, f = pcall(function() return ffi.C.sglr_now_ms end)
    if okc then now_ms = f end
  end
end
local bump, add = stats.bump, stats.add

local M = {}
M.__index = M

M.SLOW_STRIKES = 3

local metrics
local function candidate_metrics()
  if metrics ~= nil then return metrics end
  metrics = false
  if stats.enabled then
    local m = stats.metrics
    metrics = {
      decisions = m.counter("sgl_router_shadow_decisions_total",
        "Requests offered to each shadow policy candidate, by whether it chose the live policy's worker.",
        { "candidate", "agree" }),
      matched = m.counter("sgl_router_shadow_matched_chars_total",
        "Routing-text characters a shadow candidate's choice held in its own view of the cache.",
        { "candidate" }),
      total = m.counter("sgl_router_shadow_text_chars_total",
        "Routing-text characters of the requests a shadow candidate matched on.", { "candidate" }),
      dropped = m.counter("sgl_router_shadow_dropped_total",
        "Shadow candidates dropped for an error or for exceeding --shadow-budget-us.", { "candidate", "reason" }),
    }
  end
  return metrics
end

-- r: the router (runtime(), conf, workers, pd).
function M.new(r, budget_us)
  return setmetatable({ r = r, n = 0, list = {}, all = {}, budget_ms = (budget_us or 1000) / 1000 }, M)
end

-- A runtime for a candidate: the router's, without the metrics registry,
-- with timers the candidate's removal stops.
local function candidate_runtime(r, timers)
  local base = r:runtime()
  local rt = {}
  for k, v in pairs(base) do rt[k] = v end
  rt.metrics, rt.stats = nil, nil
  if base.every then
    rt.every = function(ms, fn)
      local t = base.every(ms, fn)
      timers[#timers + 1] = t
      return t
    end
  end
  return rt
end

-- Whether w is routed to by the policy that candidates shadow.
function M:shadows_worker(w)
  return not self.r.pd or w.role == "prefill"
end

-- add(name_or_path, options, label) -> candidate | nil, err
-- options: the policy's options (over the router's --policy options);
-- label: its name in metrics and the admin API (default: the policy's
-- name, made unique with #2, #3...).
function M:add(name_or_path, options, label)
  if type(name_or_path) ~= "string" or name_or_path == "" then
    return nil, "a shadow candidate needs a policy name or a path to a .lua file"
  end
  if options ~= nil and type(options) ~= "table" then return nil, "options must be an object" end
  if label ~= nil and (type(label) ~= "string" or not label:match("^[%w_%.%-#]+$")) then
    return nil, "name must be a word (letters, digits, _ . - #)"
  end
  local P, err = policy_mod.load(name_or_path)
  if not P then return nil, err end
  local conf = self.r.conf
  local opts = {}
  for k, v in pairs(conf.policy_options or {}) do opts[k] = v end
  if opts.load_check_interval == nil then opts.load_check_interval = conf.worker_startup_check_interval end
  for k, v in pairs(options or {}) do opts[k] = v end
  local timers = {}
  local inst
  inst, err = policy_mod.instantiate(P, opts, candidate_runtime(self.r, timers))
  if not inst then return nil, err end
  local base = tostring(P.name or name_or_path)
  if label then
    if self.all[label] then return nil, "a shadow candidate named '" .. label .. "' exists" end
  else
    label = base
    local i = 1
    while self.all[label] do
      i = i + 1
      label = base .. "#" .. i
    end
  end
  local c = { name = label, policy = base, version = P.version, source = name_or_path, inst = inst,
    select = inst.select, options = options, timers = timers, state = "active", reason = false,
    decisions = 0, agree = 0, none = 0, matched = 0, text = 0, errors = 0, slow = 0, strikes = 0,
    us_total = 0, us_max = 0, on_done = inst.on_done and true or false }
  local m = candidate_metrics()
  if m then
    c.s_agree, c.s_disagree = m.decisions:series(label, "true"), m.decisions:series(label, "false")
    c.s_matched, c.s_text = m.matched:series(label), m.total:series(label)
  end
  -- the workers it would have heard of had it been there from the start
  if inst.on_add then
    for _, w in ipairs(self.r.workers.list) do
      if self:shadows_worker(w) then pcall(inst.on_add, inst, w) end
    end
  end
  self.all[label] = c
  self.all[#self.all + 1] = c
  self.list[#self.list + 1] = c
  self.n = #self.list
  log.info("shadow policy candidate added", { candidate = label, policy = base })
  return c
end

-- A timer from rt.every: a handle with stop() (the router's), or a luv
-- timer.
local function stop_timer(t)
  if type(t) == "userdata" then
    if not t:is_closing() then
      t:stop()
      t:close()
    end
  elseif type(t) == "table" and t.stop then
    pcall(t.stop, t)
  end
end

local function stop(c)
  for _, t in ipairs(c.timers) do stop_timer(t) end
  c.timers = {}
  if c.inst.close then pcall(c.inst.close, c.inst) end
end

local function unlist(self, c)
  for i, o in ipairs(self.list) do
    if o == c then table.remove(self.list, i) break end
  end
  self.n = #self.list
end

-- Stop shadowing c (kept in the listing with the reason).
function M:drop(c, why, kind)
  if c.state ~= "active" then return end
  c.state, c.reason = "dropped", why
  unlist(self, c)
  stop(c)
  local m = candidate_metrics()
  if m then m.dropped:inc(1, c.name, kind) end
  log.warn("shadow policy candidate dropped", { candidate = c.name, reason = why })
end

-- remove(name) -> true | nil, err
function M:remove(name)
  local c = self.all[name]
  if not c then return nil, "no shadow candidate named '" .. tostring(name) .. "'" end
  if c.state == "active" then
    unlist(self, c)
    stop(c)
  end
  c.state = "removed"
  self.all[name] = nil
  for i, o in ipairs(self.all) do
    if o == c then table.remove(self.all, i) break end
  end
  if stats.enabled then stats.metrics.remove_label("candidate", name) end
  log.info("shadow policy candidate removed", { candidate = name })
  return true
end

-- Offer one request to every active candidate. live: the live choice;
-- out: a table { nsh, sh } to note the choices in (a decision log entry's), or nil.
function M:offer(req, avail, live, out)
  local list, budget = self.list, self.budget_ms
  local dropped
  local nsh = 0
  for i = 1, #list do
    local c = list[i]
    local t0 = now_ms()
    local ok, w, _, matched, total = policy_mod.call_select(c.inst, req, avail)
    local dt = now_ms() - t0
    if not ok then
      c.errors = c.errors + 1
      dropped = dropped or {}
      dropped[#dropped + 1] = { c, "select raised an error: " .. tostring(w), "error" }
    else
      if type(w) ~= "table" then w = nil end
      c.decisions = c.decisions + 1
      local us = dt * 1000
      c.us_total = c.us_total + us
      if us > c.us_max then c.us_max = us end
      if w == nil then
        c.none = c.none + 1
        if c.s_disagree then bump(c.s_disagree) end
      elseif w.url == live.url then
        c.agree = c.agree + 1
        if c.s_agree then bump(c.s_agree) end
      elseif c.s_disagree then
        bump(c.s_disagree)
      end
      if type(matched) == "number" then
        c.matched = c.matched + matched
        if c.s_matched then add(c.s_matched, matched) end
      end
      if type(total) == "number" then
        c.text = c.text + total
        if c.s_text then add(c.s_text, total) end
      end
      if dt > budget then
        c.slow = c.slow + 1
        c.strikes = c.strikes + 1
        if c.strikes >= M.SLOW_STRIKES then
          dropped = dropped or {}
          dropped[#dropped + 1] = { c, ("select took more than %d us %d times in a row (last: %d us)")
            :format(floor(budget * 1000 + 0.5), c.strikes, floor(us + 0.5)), "slow" }
        end
      else
        c.strikes = 0
      end
      if out then
        nsh = nsh + 1
        out.sh[2 * nsh - 1], out.sh[2 * nsh] = c.name, w and w.url or false
      end
      if w and c.on_done then
        -- its on_done hears its own choice, when the live attempt settles
        local picks = req.shadow
        if not picks then
          picks = { n = 0 }
          req.shadow = picks
        end
        local n = picks.n
        picks[n + 1], picks[n + 2], picks.n = c, w, n + 2
      end
    end
  end
  if out then out.nsh = nsh end
  if dropped then
    for _, d in ipairs(dropped) do self:drop(d[1], d[2], d[3]) end
  end
end

-- The live attempt settled: each candidate that chose hears of its choice.
function M:settle(req, status, ms)
  local picks = req.shadow
  for i = 1, picks.n, 2 do
    local c = picks[i]
    if c.state == "active" then
      local ok, err = pcall(c.inst.on_done, c.inst, req, picks[i + 1], status, ms)
      if not ok then self:drop(c, "on_done raised an error: " .. tostring(err), "error") end
    end
    picks[i], picks[i + 1] = nil, nil
  end
  picks.n = 0
end

-- Registry changes reach candidates as they reach the live policy.
function M:on_add(w)
  if not self:shadows_worker(w) then return end
  for _, c in ipairs(self.list) do
    if c.inst.on_add then
      local ok, err = pcall(c.inst.on_add, c.inst, w)
      if not ok then self:drop(c, "on_add raised an error: " .. tostring(err), "error") end
    end
  end
end

function M:on_remove(w)
  if not self:shadows_worker(w) then return end
  for _, c in ipairs(self.list) do
    if c.inst.on_remove then
      local ok, err = pcall(c.inst.on_remove, c.inst, w)
      if not ok then self:drop(c, "on_remove raised an error: " .. tostring(err), "error") end
    end
  end
end

local function round(v, d)
  local p = 10 ^ d
  return floor(v * p + 0.5) / p
end

-- The candidates and their counts, as plain tables (for JSON).
function M:status()
  local out = {}
  for i, c in ipairs(self.all) do
    local n = c.decisions
    local st = nil
    if c.state == "active" and c.inst.stats then
      local ok, s = pcall(c.inst.stats, c.inst)
      if ok then st = s end
    end
    out[i] = { name = c.name, policy = c.policy, version = c.version, source = c.source,
      options = c.options, state = c.state, reason = c.reason or nil,
      decisions = n, agree = c.agree, disagree = n - c.agree, no_choice = c.none,
      agreement = n > 0 and round(c.agree / n, 4) or nil,
      matched_chars = c.matched, text_chars = c.text,
      match_ratio = c.text > 0 and round(c.matched / c.text, 4) or nil,
      errors = c.errors, slow = c.slow,
      select_us_mean = n > 0 and round(c.us_total / n, 2) or nil, select_us_max = round(c.us_max, 2),
      policy_stats = st }
  end
  return out
end

return M

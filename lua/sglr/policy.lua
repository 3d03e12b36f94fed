-- sglr.policy: load a routing policy and build an instance from its declared
-- option schema.
--
--   local P, err    = policy.load("round_robin")          -- policies.round_robin
--   local P, err    = policy.load("./my_policy.lua")       -- a file
--   local inst, err = policy.instantiate(P, conf.policy_options, rt)
--   print(policy.describe(P))
--
-- A policy (DESIGN.md section 4) is a table with name, version, an options
-- schema, new(conf, rt) and select(req, workers). Each schema entry is
--   key = { type = "number"|"string"|"boolean", default = v, description = "...",
--           min = n, max = n, integer = true, choices = { ... }, required = true }
-- instantiate() hands new() only the declared keys, each checked and defaulted,
-- so a policy never sees options it did not ask for and never a wrong type.
--
-- What select(req, workers) sees, read-only (README "Policies as live code"):
--   worker  url, base_url, role, dp_rank, dp_size, bootstrap_port, load (in
--           flight here), reported_load (its last /get_load, or false),
--           healthy, circuit (breaker state), labels (the pod's), latency_ms
--           (moving average, or false), processed, source, pod
--   req     route, path, model, stream, headers, client (IP address),
--           max_tokens (or false), text (routing text), id; path, headers,
--           client, text, body and max_tokens are computed when first read
-- A policy may set req.decision and req.match_ratio (M.REQ_WRITABLE) and
-- nothing else. The read-only rule is checked by the probe that every load
-- runs (select on read-only proxies), not per request: a proxy on the hot
-- path would cost every request a metatable. select must not yield: rt.sleep
-- and rt.http raise inside it (call_select).
--
-- Optional lifecycle hooks: migrate(self, old) takes a replaced instance's
-- state on reload; close(self) runs when the instance is replaced (after
-- its scope stopped its timers and requests).

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local pcall, loadfile, require = pcall, loadfile, require
local floor = math.floor
local sort, concat = table.sort, table.concat
local fmt, byte = string.format, string.byte

local M = {}

M.BUILTIN = { "random", "round_robin", "cache_aware", "power_of_two" }

local TYPES = { number = true, string = true, boolean = true }

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- Checks the shape of a loaded policy table; `what` names it in messages.
local function check_policy(P, what)
  if type(P) ~= "table" then
    return nil, fmt("%s must return a table, got %s", what, type(P))
  end
  if type(P.new) ~= "function" then
    return nil, fmt("%s has no new(conf, rt) function", what)
  end
  if type(P.select) ~= "function" then
    return nil, fmt("%s has no select(req, workers) function", what)
  end
  if P.options ~= nil and type(P.options) ~= "table" then
    return nil, fmt("%s: options must be a table", what)
  end
  for _, key in ipairs(sorted_keys(P.options or {})) do
    local spec = P.options[key]
    if type(key) ~= "string" or type(spec) ~= "table" then
      return nil, fmt("%s: option '%s' must be a table { type = ..., default = ... }", what,
                      tostring(key))
    end
    if not TYPES[spec.type] then
      return nil, fmt("%s: option '%s' has type '%s' (use number, string or boolean)", what, key,
                      tostring(spec.type))
    end
    if spec.default ~= nil and type(spec.default) ~= spec.type then
      return nil, fmt("%s: default of option '%s' is a %s, declared %s", what, key,
                      type(spec.default), spec.type)
    end
  end
  return P
end

-- Load by name (module policies.NAME: embedded, or found on the Lua path) or
-- by path (any string ending in .lua).
function M.load(name_or_path)
  if type(name_or_path) ~= "string" or name_or_path == "" then
    error("policy.load: expected a policy name or a path to a .lua file", 2)
  end
  local P, what
  if name_or_path:match("%.lua$") then
    what = fmt("policy file '%s'", name_or_path)
    local chunk, err = loadfile(name_or_path)
    if not chunk then
      return nil, fmt("cannot load %s: %s", what, err)
    end
    local ok, res = pcall(chunk)
    if not ok then return nil, fmt("%s raised an error: %s", what, tostring(res)) end
    P = res
    if type(P) == "table" and P.name == nil then
      P.name = name_or_path:match("([^/\\]+)%.lua$")
    end
  else
    local name = name_or_path
    what = fmt("policy '%s'", name)
    if not name:match("^[%w_]+$") then
      return nil, fmt("invalid policy name '%s' (choose %s, or a path to a .lua file)",
                      name, concat(M.BUILTIN, ", "))
    end
    local module = "policies." .. name
    local ok, res = pcall(require, module)
    if not ok then
      res = tostring(res)
      if res:find("module '" .. module .. "' not found", 1, true) then
        return nil, fmt("unknown policy '%s' (choose %s, or a path to a .lua file)",
                        name, concat(M.BUILTIN, ", "))
      end
      return nil, fmt("%s failed to load: %s", what, res)
    end
    P = res
    if type(P) == "table" and P.name == nil then P.name = name end
  end
  return check_policy(P, what)
end

-- Option values may come from text (a future --policy-opt k=v, an env var):
-- numbers and booleans written as strings are accepted when declared so.
local function coerce(spec, v)
  if type(v) == "string" then
    if spec.type == "number" then
      local n = tonumber(v)
      if n then return n end
    elseif spec.type == "boolean" then
      if v == "true" then return true end
      if v == "false" then return false end
    end
  end
  return v
end

local function check_option(name, key, spec, v)
  if type(v) ~= spec.type then
    return nil, fmt("policy '%s': option '%s' must be a %s, got %s '%s'", name, key,
                    spec.type, type(v), tostring(v))
  end
  if spec.type == "number" then
    if v ~= v then return nil, fmt("policy '%s': option '%s' is not a number", name, key) end
    if spec.integer and v ~= floor(v) then
      return nil, fmt("policy '%s': option '%s' must be an integer, got %s", name, key, v)
    end
    if (spec.min and v < spec.min) or (spec.max and v > spec.max) then
      return nil, fmt("policy '%s': option '%s' must be in [%s, %s], got %s", name, key,
                      tostring(spec.min or "-inf"), tostring(spec.max or "inf"), v)
    end
  end
  if spec.choices then
    for _, c in ipairs(spec.choices) do
      if c == v then return v end
    end
    local names = {}
    for i, c in ipairs(spec.choices) do names[i] = tostring(c) end
    return nil, fmt("policy '%s': option '%s' must be one of %s, got '%s'", name, key,
                    concat(names, ", "), tostring(v))
  end
  return v
end

-- The options P declares, each checked and defaulted, from conf_options.
-- Keys of conf_options that P does not declare are ignored (the router
-- hands every policy the SGLang-named flags) unless `strict` names them:
-- strict is a set of keys the operator asked for by name (--policy-opt),
-- and one P does not declare is an error. -> opts | nil, err
function M.options(P, conf_options, strict)
  conf_options = conf_options or {}
  local name = tostring(P.name or "?")
  local schema = P.options or {}
  for _, key in ipairs(sorted_keys(strict or {})) do
    if schema[key] == nil then
      local have = sorted_keys(schema)
      return nil, fmt("policy '%s' has no option '%s' (%s)", name, tostring(key),
                      #have > 0 and "its options: " .. concat(have, ", ") or "it takes no options")
    end
  end
  local opts = {}
  for key, spec in pairs(P.options or {}) do
    local v = conf_options[key]
    if v == nil then
      v = spec.default
    else
      v = coerce(spec, v)
    end
    if v == nil then
      if spec.required then
        return nil, fmt("policy '%s': option '%s' is required", name, key)
      end
    else
      local checked, cerr = check_option(name, key, spec, v)
      if checked == nil then return nil, cerr end
      opts[key] = checked
    end
  end
  return opts
end

-- Validate and default the options P declares (M.options), then
-- P.new(opts, rt). -> instance | nil, err
function M.instantiate(P, conf_options, rt, strict)
  if type(P) ~= "table" then
    error("policy.instantiate: expected a policy table from policy.load", 2)
  end
  local ok, err = check_policy(P, fmt("policy '%s'", tostring(P.name)))
  if not ok then return nil, err end
  local name = tostring(P.name or "?")
  local opts
  opts, err = M.options(P, conf_options, strict)
  if not opts then return nil, err end

  local okc, inst, nerr = pcall(P.new, opts, rt)
  if not okc then
    return nil, fmt("policy '%s': new() raised an error: %s", name, tostring(inst))
  end
  if inst == nil then
    return nil, fmt("policy '%s': %s", name, tostring(nerr or "new() returned nothing"))
  end
  if type(inst) ~= "table" or type(inst.select) ~= "function" then
    return nil, fmt("policy '%s': new() must return an object with a select method", name)
  end
  return inst
end

-- Help text for a policy's options, one line each, sorted by key.
function M.describe(P)
  local head = fmt("Policy %s %s", tostring(P.name or "?"), tostring(P.version or ""))
  head = head:gsub("%s+$", "")
  local lines = { head }
  if P.description then lines[#lines + 1] = "  " .. P.description end
  local keys = sorted_keys(P.options or {})
  if #keys == 0 then
    lines[#lines + 1] = "  (no options)"
  end
  for _, key in ipairs(keys) do
    local spec = P.options[key]
    local extra = {}
    if spec.default ~= nil then extra[#extra + 1] = "default: " .. tostring(spec.default) end
    if spec.min or spec.max then
      extra[#extra + 1] = fmt("range: %s..%s", tostring(spec.min or ""), tostring(spec.max or ""))
    end
    if spec.choices then
      local names = {}
      for i, c in ipairs(spec.choices) do names[i] = tostring(c) end
      extra[#extra + 1] = "one of: " .. concat(names, ", ")
    end
    if spec.required then extra[#extra + 1] = "required" end
    local line = fmt("  %-24s %-8s %s", key, spec.type, spec.description or "")
    if #extra > 0 then line = line .. " (" .. concat(extra, "; ") .. ")" end
    lines[#lines + 1] = (line:gsub("%s+$", ""))
  end
  return concat(lines, "\n")
end

-- Convenience for callers: load and instantiate in one step.
function M.create(name_or_path, conf_options, rt)
  local P, err = M.load(name_or_path)
  if not P then return nil, err end
  return M.instantiate(P, conf_options, rt)
end

-- --- policies as live code ------------------------------------------------------
--
-- The router swaps policy code while it serves (sglr.slot). What that needs
-- from a policy file is here: its source read afresh (not require's cached
-- copy), a short hash of it, options from text, a runtime scoped to one
-- instance, and a probe of select before the instance goes live.

-- "key=value" -> key, value (text; M.options coerces it) | nil, err
function M.parse_opt(s)
  local k, v = tostring(s):match("^%s*([%w_]+)%s*=(.*)$")
  if not k then return nil, fmt("expected key=value, got '%s'", tostring(s)) end
  return k, v
end

-- The source text of a policy by name or path, and where it came from:
-- an override on --lua-path, the copy embedded in the binary, or the Lua
-- path. -> src, origin | nil, err
function M.source(name_or_path)
  if name_or_path:match("%.lua$") then
    local fh, err = io.open(name_or_path, "rb")
    if not fh then return nil, fmt("cannot read policy file: %s", err) end
    local src = fh:read("*a")
    fh:close()
    return src, name_or_path
  end
  if not name_or_path:match("^[%w_]+$") then
    return nil, fmt("invalid policy name '%s' (choose %s, or a path to a .lua file)",
                    name_or_path, concat(M.BUILTIN, ", "))
  end
  local module = "policies." .. name_or_path
  local file = package.sglr_path and package.searchpath(module, package.sglr_path)
  if not file then
    local okm, emb = pcall(require, "sglr.embedded")
    if okm and type(emb) == "table" and emb.source then
      local src = emb.source(module)
      if src then return src, "embedded " .. module end
    end
    file = package.searchpath(module, package.path)
  end
  if not file then
    return nil, fmt("unknown policy '%s' (choose %s, or a path to a .lua file)",
                    name_or_path, concat(M.BUILTIN, ", "))
  end
  return M.source(file)
end

-- A policy table from source text (a reload reads the file again, or an
-- operator posts the code). -> P | nil, err
function M.from_source(src, what, default_name)
  if type(src) ~= "string" or src == "" then return nil, fmt("%s is empty", what) end
  local chunk, err = loadstring(src, "=" .. what)
  if not chunk then return nil, fmt("cannot load %s: %s", what, err) end
  local ok, P = pcall(chunk)
  if not ok then return nil, fmt("%s raised an error: %s", what, tostring(P)) end
  if type(P) == "table" and P.name == nil then P.name = default_name end
  return check_policy(P, what)
end

-- Read and load a policy afresh by name or path. -> P, src | nil, err
function M.fetch(name_or_path)
  local src, origin = M.source(name_or_path)
  if not src then return nil, origin end
  local default_name = name_or_path:match("([^/\\]+)%.lua$") or name_or_path
  local what = name_or_path:match("%.lua$") and fmt("policy file '%s'", name_or_path)
    or fmt("policy '%s'", name_or_path)
  local P, err = M.from_source(src, what, default_name)
  if not P then
    if origin ~= name_or_path then err = err .. " (" .. origin .. ")" end
    return nil, err
  end
  return P, src
end

-- A short hash of a policy's source (FNV-1a, 32 bits, hex): tells versions
-- apart in /admin/policy and the info metric.
function M.hash(src)
  local h = 0x811c9dc5
  for i = 1, #src do
    h = bit.bxor(h, byte(src, i))
    h = bit.tobit(bit.lshift(h, 24) + h * 0x193)   -- h * 16777619 mod 2^32
  end
  return bit.tohex(h)
end

-- True while a select runs (the flow, the shadow candidates, the probe
-- set it around their calls): rt.sleep and rt.http raise then.
M.selecting = false

-- Call policy:select(req, workers) as the router does: protected, and with
-- the calls that would wait refused. -> pcall's results
function M.call_select(policy, req, workers)
  M.selecting = true
  local ok, w, why, matched, total = pcall(policy.select, policy, req, workers)
  M.selecting = false
  return ok, w, why, matched, total
end

-- A runtime scoped to one instance: rt.every and rt.http of the base
-- runtime, tracked, so that scope:close() stops every timer the instance
-- started and cancels its requests in flight. Everything else is the base's.
--   base.every(ms, fn) -> handle with :stop()
--   base.http_start(opts) -> req with :wait(), :cancel() (else base.http)
-- -> rt, scope
function M.scope(base)
  local scope = { closed = false, timers = {}, reqs = {} }
  local rt = {}
  for k, v in pairs(base) do rt[k] = v end

  -- select must not yield: the two calls that wait raise inside it
  if base.sleep then
    rt.sleep = function(ms)
      if M.selecting then error("rt.sleep inside select: select must not yield", 2) end
      return base.sleep(ms)
    end
  end

  -- rt.every(ms, fn) -> handle; handle:stop() ends it early
  rt.every = function(ms, fn)
    if scope.closed then error("rt.every: this policy instance is closed", 2) end
    local h
    local inner = base.every(ms, function(...)
      if not scope.closed then return fn(...) end
    end)
    h = { stop = function()
      if scope.timers[h] then
        scope.timers[h] = nil
        inner:stop()
      end
    end }
    scope.timers[h] = true
    return h
  end
  if base.http then
    rt.http = function(opts)
      if M.selecting then error("rt.http inside select: select must not yield", 2) end
      if scope.closed then return nil, "cancelled" end
      if not base.http_start then return base.http(opts) end
      local req, err = base.http_start(opts)
      if not req then return nil, err end
      scope.reqs[req] = true
      local status, body, headers = req:wait()
      scope.reqs[req] = nil
      return status, body, headers
    end
  end

  function scope.close()
    if scope.closed then return end
    scope.closed = true
    for h in pairs(scope.timers) do h.stop() end
    for req in pairs(scope.reqs) do
      scope.reqs[req] = nil
      req:cancel()
    end
  end
  function scope.count()
    local t, r = 0, 0
    for _ in pairs(scope.timers) do t = t + 1 end
    for _ in pairs(scope.reqs) do r = r + 1 end
    return t, r
  end
  return rt, scope
end

-- Close an instance: its scope (timers, requests), then its own close
-- hook. -> true | nil, err (the hook raised; the scope is closed anyway)
function M.close(inst, scope)
  if scope then scope.close() end
  if type(inst) == "table" and type(inst.close) == "function" then
    local ok, err = pcall(inst.close, inst)
    if not ok then return nil, tostring(err) end
  end
  return true
end

-- What select sees, read-only: the probe hands select these proxies, so a
-- policy that writes into a worker or the request (other than its own
-- decision fields) is refused before it goes live.
M.REQ_WRITABLE = { decision = true, match_ratio = true }

local function read_only(t, what, writable)
  return setmetatable({}, {
    __index = t,
    __newindex = function(_, k, v)
      if writable and writable[k] then rawset(t, k, v) return end
      error(fmt("select must not write %s.%s", what, tostring(k)), 2)
    end,
    __len = function() return #t end,
  })
end

-- A synthetic pool for the probe: three idle healthy workers of a role.
function M.synthetic_workers(role)
  local list = {}
  for i = 1, 3 do
    list[i] = read_only({
      url = "http://probe-" .. i .. ".invalid:8000", base_url = "http://probe-" .. i .. ".invalid:8000",
      role = role or "regular", load = 0, reported_load = false, healthy = true, circuit = "closed",
      labels = {}, latency_ms = false, processed = 0,
    }, "worker")
  end
  return list
end

local function synthetic_req()
  return read_only({
    route = "generate", path = "/generate", model = false, stream = false, id = "probe",
    headers = {}, client = "127.0.0.1", max_tokens = 16, text = "probe request text",
  }, "req", M.REQ_WRITABLE)
end

-- Metrics that count nothing: the probe's runtime has them in place of
-- the router's (rt.metrics, rt.stats), so a probed select moves no series.
-- Any field, call or method of it is itself.
local nop_metrics
nop_metrics = setmetatable({}, {
  __index = function() return nop_metrics end,
  __call = function() return nop_metrics end,
})
M.NOP_METRICS = nop_metrics

-- Ask a fresh instance (the probe: it is thrown away after, so its state
-- does not leak into the live one) to route a synthetic request. select
-- must answer with one of the workers, or nil and a reason.
-- -> true | nil, err
function M.probe(inst, role)
  local workers = M.synthetic_workers(role)
  local plain = {}
  for i = 1, #workers do plain[i] = workers[i] end
  local ok, w, why = M.call_select(inst, synthetic_req(), plain)
  local name = tostring(inst.name or "?")
  if not ok then return nil, fmt("policy '%s': select raised an error: %s", name, tostring(w)) end
  if w == nil then
    if why == nil then return nil, fmt("policy '%s': select returned neither a worker nor a reason", name) end
    return true
  end
  for i = 1, #workers do
    if w == workers[i] then return true end
  end
  return nil, fmt("policy '%s': select returned %s '%s', not one of the workers it was given", name,
                  type(w), tostring(w))
end

return M

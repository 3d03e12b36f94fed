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

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local pcall, loadfile, require = pcall, loadfile, require
local floor = math.floor
local sort, concat = table.sort, table.concat
local fmt = string.format

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

-- Validate and default the options P declares, then P.new(opts, rt).
-- Keys of conf_options that P does not declare are ignored: the router hands
-- every policy the same table (conf.policy_options).
function M.instantiate(P, conf_options, rt)
  if type(P) ~= "table" then
    error("policy.instantiate: expected a policy table from policy.load", 2)
  end
  local ok, err = check_policy(P, fmt("policy '%s'", tostring(P.name)))
  if not ok then return nil, err end
  conf_options = conf_options or {}
  local name = tostring(P.name or "?")
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

return M

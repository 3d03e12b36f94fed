-- sglr.radix_ffi: the native radix tree (sglr.radix) with t:match,
-- t:insert and t:size called through LuaJIT's FFI.
--
-- A policy's select calls them once each per request. As methods of the C
-- module each call ends the JIT trace and hands its arguments over one Lua
-- C API call at a time (match reads every candidate's URL that way); here
-- the candidates' ids are looked up in the tree's own URL -> id table and
-- the call is compiled into the trace. Same arguments, results and errors:
-- anything the fast path does not take (an unknown worker, a closed tree,
-- a finished request's text, a bad argument) goes to the C method, which
-- answers or raises as before.
--
--   local radix = require "sglr.radix_ffi"    -- sglr.radix, methods patched
local radix = require "sglr.radix"

local ok, ffi = pcall(require, "ffi")
if not ok or not pcall(ffi.cdef, [[
    int sglr_radix_ffi_match(void *t, void *x, const char *s, size_t n, const uint8_t *allowed,
                             size_t nbytes, double *matched);
    int sglr_radix_ffi_insert(void *t, void *x, const char *s, size_t n, int id);
    double sglr_radix_ffi_size(void *t, int id);
  ]]) or not pcall(function()
    return ffi.C.sglr_radix_ffi_match, ffi.C.sglr_radix_ffi_insert, ffi.C.sglr_radix_ffi_size
  end) then
  return radix
end

-- (the tree's metatable hides behind __metatable)
local probe = radix.new()
local mt = debug.getmetatable(probe)
probe:close()
local methods = type(mt) == "table" and mt.__index
if type(methods) ~= "table" or methods.ffi_patched then return radix end

local type, getmetatable = type, getmetatable
-- what FFI may be given: a tree (its metatable answers with this name)
-- and a running request's exchange (its metatable, by name in the
-- registry; an ended request's exchange has another), never some other
-- userdata, whose memory C would read as one of these
local TREE = "sglr.radix"
require "sglr.core"
local XMT = debug.getregistry()["sglr.exchange"]
local bor, lshift, rshift, band = bit.bor, bit.lshift, bit.rshift, bit.band
local C = ffi.C
local fmatch, finsert, fsize = C.sglr_radix_ffi_match, C.sglr_radix_ffi_insert, C.sglr_radix_ffi_size
local c_match, c_insert, c_size = methods.match, methods.insert, methods.size
local getfenv = debug.getfenv

-- each tree's URL <-> id table (its environment: env[url] = id, env[id] = url),
-- read as `envs[t] or env_of(t)`: env_of runs once a tree, so it never
-- becomes hot on its own. (Called every time, it could: LuaJIT then gave
-- it a trace of its own, which returns to an interpreted caller, and in
-- such a router process the rest of every select ran interpreted, about
-- a third more CPU a request.)
local envs = setmetatable({}, { __mode = "k" })
local function env_of(t)
  local e = envs[t]
  if not e then
    e = getfenv(t)
    envs[t] = e
  end
  return e
end

-- the allowed set: a bit per worker id (ids go up to 65535), set for one
-- call and cleared after it
local bits = ffi.new("uint8_t[8192]")
local matched = ffi.new("double[1]")

-- The tree's id of candidate w (a worker table or a URL), or nil
local function id_of(env, w)
  local url = w
  if type(w) == "table" then url = w.url end
  return type(url) == "string" and env[url] or nil
end

-- Set the bits of the candidates the tree knows -> the highest byte set,
-- or -1; clear_bits clears them again. Two functions, not one with a
-- flag: a function called both ways leaves a trace of one way whose exit
-- every request takes the other way, and when select runs from the
-- interpreter (called through pcall, a trace that starts inside it cannot
-- return from it) that exit could not get a side trace, so the rest of
-- select ran interpreted. Likewise one candidate without a loop: a loop of
-- one trip never closes a trace of its own (see flow.give_list).
local function set_bits(env, allowed)
  local top = -1
  local n = #allowed
  if n == 1 then
    local id = id_of(env, allowed[1])
    if id then
      top = rshift(id, 3)
      bits[top] = bor(bits[top], lshift(1, band(id, 7)))
    end
    return top
  end
  for i = 1, n do
    local id = id_of(env, allowed[i])
    if id then
      local byte = rshift(id, 3)
      bits[byte] = bor(bits[byte], lshift(1, band(id, 7)))
      if byte > top then top = byte end
    end
  end
  return top
end

local function clear_bits(env, allowed)
  local n = #allowed
  if n == 1 then
    local id = id_of(env, allowed[1])
    if id then bits[rshift(id, 3)] = 0 end
    return
  end
  for i = 1, n do
    local id = id_of(env, allowed[i])
    if id then bits[rshift(id, 3)] = 0 end
  end
end

methods.match = function(t, text, allowed)
  if getmetatable(t) ~= TREE then return c_match(t, text, allowed) end
  local x, s, n
  local tt = type(text)
  if tt == "string" then
    s, n = text, #text
  elseif tt == "userdata" and XMT and getmetatable(text) == XMT then
    x, n = text, 0
  else
    return c_match(t, text, allowed)
  end
  local env = envs[t] or env_of(t)
  local w
  if allowed == nil then
    w = fmatch(t, x, s, n, nil, 0, matched)
  elseif type(allowed) == "table" then
    -- none the tree knows: an empty set, and nothing can match
    local top = set_bits(env, allowed)
    w = fmatch(t, x, s, n, bits, top + 1, matched)
    clear_bits(env, allowed)
  else
    return c_match(t, text, allowed)
  end
  if w == -2 then return c_match(t, text, allowed) end
  local m = matched[0]
  if w < 0 then return m, nil end
  return m, env[w]
end

methods.insert = function(t, text, url)
  if getmetatable(t) == TREE and type(url) == "string" then
    local id = (envs[t] or env_of(t))[url]
    if id then
      local tt, r = type(text), -2
      if tt == "string" then
        r = finsert(t, nil, text, #text, id)
      elseif tt == "userdata" and XMT and getmetatable(text) == XMT then
        r = finsert(t, text, nil, 0, id)
      end
      if r == 0 then return end
    end
  end
  return c_insert(t, text, url)
end

-- (cache_aware asks it for every candidate when no prefix matched)
methods.size = function(t, url)
  if getmetatable(t) == TREE and type(url) == "string" then
    local id = (envs[t] or env_of(t))[url]
    if id then
      local n = fsize(t, id)
      if n >= 0 then return n end
    end
  end
  return c_size(t, url)
end

-- the methods replaced, for the specs that compare the two
methods.ffi_patched = { match = c_match, insert = c_insert, size = c_size }

return radix

-- Request traces: what `sglr run --trace-out` captures and what `sglr sim
-- --trace` replays.
--
-- Capture (one JSON object per line, no prompt text):
--   {"t": ms since the capture started, "route": "generate", "model": ...,
--    "stream": false, "text_chars": n, "block_chars": 256,
--    "blocks": ["9f3a01c2", ...], "output_tokens": n | null,
--    "worker": url, "status": 200, "ttft_ms": x, "latency_ms": y}
-- blocks are chained hashes of the routing text cut into block_chars
-- pieces: block i hashes block i-1's hash and the i-th piece, so two
-- requests share a block only if they share the whole text up to its end
-- (the last block may be shorter). Replay writes each block's text from
-- its hash, so equal blocks give equal prefixes and a cache behaves as it
-- did on the captured text.
--
-- Mooncake traces ({"timestamp", "input_length", "output_length",
-- "hash_ids"}) are read the same way with 512-token blocks, and the lines
-- `sglr bench --workload trace` takes ({"text" | "messages",
-- "output_tokens"}) pass through as they are.
local cjson = require "cjson.safe"
local bit = require "bit"

local bxor, band, lshift, tobit, tohex = bit.bxor, bit.band, bit.lshift, bit.tobit, bit.tohex
local byte, fmt, concat, sort = string.byte, string.format, table.concat, table.sort
local floor, min = math.floor, math.min

local M = {}

-- A bench trace line's request (text or prompt, else messages) | nil; shared
-- with sglr bench's own trace reader.
function M.bench_spec(obj, output_tokens)
  local spec = { output_tokens = tonumber(obj.output_tokens) or output_tokens }
  local t = obj.text or obj.prompt
  if type(t) == "string" then
    spec.text = t
  elseif type(obj.messages) == "table" and #obj.messages > 0 then
    spec.messages = obj.messages
  else
    return nil
  end
  return spec
end

M.BLOCK_CHARS = 256          -- capture: characters of routing text per block
M.MOONCAKE_BLOCK_TOKENS = 512
local BYTES_PER_TOKEN = 4

-- --- hashing ------------------------------------------------------------------------

-- FNV-1a, 32 bits, over s[i..j], starting from h. The multiply by the FNV
-- prime (2^24 + 403) is split so every intermediate stays exact in a double.
local function fnv(h, s, i, j)
  for k = i, j do
    h = bxor(h, byte(s, k))
    h = tobit(h * 403 + lshift(h, 24))
  end
  return h
end

-- The chained block hashes of a text, as 8-digit hex strings.
function M.block_hashes(text, block_chars)
  block_chars = block_chars or M.BLOCK_CHARS
  local out, h = {}, tobit(2166136261)
  local n = #text
  local i = 1
  while i <= n do
    local j = min(n, i + block_chars - 1)
    h = fnv(h, text, i, j)
    out[#out + 1] = tohex(h)
    i = j + 1
  end
  return out
end

-- --- capture writer -----------------------------------------------------------------

local Writer = {}
Writer.__index = Writer

-- Open a capture file, appending. Past max_bytes the file is moved to
-- PATH.1 (replacing an older one) and a new one started.
-- -> writer | nil, err
function M.open(path, max_bytes, clock)
  local f, err = io.open(path, "ab")
  if not f then return nil, err end
  f:setvbuf("full", 64 * 1024)
  local size = f:seek("end") or 0
  return setmetatable({ path = path, f = f, size = size, max_bytes = max_bytes or 0,
    clock = clock, t0 = clock and clock() or 0, lines = 0 }, Writer)
end

function Writer:write(line)
  if self.max_bytes > 0 and self.size > 0 and self.size + #line + 1 > self.max_bytes then
    self.f:close()
    os.rename(self.path, self.path .. ".1")
    self.f = io.open(self.path, "wb")
    if not self.f then return nil end
    self.f:setvbuf("full", 64 * 1024)
    self.size = 0
  end
  self.f:write(line, "\n")
  self.size = self.size + #line + 1
  self.lines = self.lines + 1
  return true
end

function Writer:flush()
  if self.f then self.f:flush() end
end

function Writer:close()
  if self.f then self.f:close(); self.f = nil end
end

-- Output tokens asked for in a request body (nil when it does not say).
local function asked_tokens(body)
  local obj = cjson.decode(body)
  if type(obj) ~= "table" then return nil end
  local sp = obj.sampling_params
  local n = type(sp) == "table" and sp.max_new_tokens or obj.max_tokens or obj.max_completion_tokens
  return tonumber(n)
end

-- One finished request as a capture line. req: the flow's request (route,
-- model, stream, text, body, worker, t0, ttfb); status: the answer's.
function Writer:record(req, status, now)
  local text = req.text or ""
  local rec = {
    t = floor((req.t0 - self.t0) * 1000 + 0.5) / 1000,
    route = req.route, model = req.model or nil, stream = req.stream or false,
    text_chars = #text, block_chars = M.BLOCK_CHARS, blocks = M.block_hashes(text),
    output_tokens = asked_tokens(req.body),
    worker = req.worker or nil, status = status,
    ttft_ms = req.ttfb and floor(req.ttfb * 1000 + 0.5) / 1000 or nil,
    latency_ms = floor((now - req.t0) * 1000 + 0.5) / 1000,
  }
  if #rec.blocks == 0 then rec.blocks = cjson.empty_array end
  return self:write(cjson.encode(rec))
end

-- --- synthesised text ---------------------------------------------------------------

local CONSONANTS = "bcdfghjklmnprstvwz"
local VOWELS = "aeiou"

-- n pseudo-words of 4 bytes from a seed (xorshift, cheap and exact).
local function words(seed, n)
  local s = band(seed, 0x7fffffff)
  if s == 0 then s = 1 end
  local t = {}
  for i = 1, n do
    s = bxor(s, lshift(s, 13)); s = bxor(s, bit.rshift(s, 17)); s = bxor(s, lshift(s, 5))
    local u = band(s, 0x7fffffff)
    local a, b, c = u % 18 + 1, floor(u / 18) % 5 + 1, floor(u / 90) % 18 + 1
    t[i] = CONSONANTS:sub(a, a) .. VOWELS:sub(b, b) .. CONSONANTS:sub(c, c) .. " "
  end
  return concat(t)
end

-- Blocks are strung together from 1024 pieces of 16 words, picked by a
-- generator seeded with the block's id: 32 picks for a Mooncake block
-- instead of 512 words. Two blocks start alike with odds 1/1024, and
-- then share 16 tokens at most.
local PIECE_WORDS = 16
local pieces
local function piece_table()
  if not pieces then
    pieces = {}
    for i = 1, 1024 do pieces[i] = words(i * 7919, PIECE_WORDS) end
  end
  return pieces
end

-- A block's text from its id (a number or a hex string). Ids that occur
-- more than once in the trace (cache.shared) are kept; the rest are made
-- each time they are needed, so a long trace does not pile up text.
local function block_text(cache, id, chars)
  local t = cache[id]
  if t then return t end
  local s
  if type(id) == "number" then
    s = tobit(floor(id) % 2147483647 * 7919 + 17)
  else
    s = tonumber(id, 16) or fnv(tobit(2166136261), tostring(id), 1, #tostring(id))
  end
  local p = piece_table()
  local nwords = floor(chars / BYTES_PER_TOKEN)
  local parts = {}
  for i = 1, floor((nwords + PIECE_WORDS - 1) / PIECE_WORDS) do
    s = bxor(s, lshift(s, 13)); s = bxor(s, bit.rshift(s, 17)); s = bxor(s, lshift(s, 5))
    parts[i] = p[band(s, 1023) + 1]
  end
  t = concat(parts)
  if #t > nwords * BYTES_PER_TOKEN then t = t:sub(1, nwords * BYTES_PER_TOKEN) end
  if cache.shared[id] then cache[id] = t end
  return t
end

-- The text of `chars` characters made of the blocks (ids), each
-- block_chars long, the last cut short; past the blocks, words unique to
-- `salt` (so they are shared with no other request).
local function synth(cache, ids, block_chars, chars, salt)
  local parts, have = {}, 0
  for i = 1, #ids do
    if have >= chars then break end
    local b = block_text(cache, ids[i], block_chars)
    local take = min(#b, chars - have)
    parts[#parts + 1] = take < #b and b:sub(1, take) or b
    have = have + take
  end
  if have < chars then
    local pad = words(tobit(salt * 2654435761 % 2147483647 + 1), floor((chars - have + 3) / 4))
    parts[#parts + 1] = pad:sub(1, chars - have)
  end
  return concat(parts)
end

-- A request spec whose text is made when it is sent (a long trace would
-- not fit in memory as text).
local lazy_mt = {
  __index = function(t, k)
    if k == "text" then
      local g = t._gen
      return synth(g[1], g[2], g[3], g[4], g[5])
    end
  end,
}

-- --- parsing ------------------------------------------------------------------------

local function is_list(v)
  return type(v) == "table" and (next(v) == nil or v[1] ~= nil)
end

local function num(v)
  return type(v) == "number" and v == v and v >= 0 and v or nil
end

-- One decoded line -> spec | nil, reason
local function spec_of(obj, n, cache, o)
  if obj.hash_ids ~= nil or obj.input_length ~= nil then
    local len, ids = num(obj.input_length), obj.hash_ids
    if not len then return nil, "Mooncake line needs input_length (a non-negative number)" end
    if not is_list(ids) then return nil, "Mooncake line needs hash_ids (a list)" end
    for _, id in ipairs(ids) do
      if type(id) ~= "number" then return nil, "hash_ids must be numbers" end
    end
    local out = obj.output_length
    if out ~= nil and not num(out) then return nil, "output_length must be a non-negative number" end
    local ts = obj.timestamp
    if ts ~= nil and not num(ts) then return nil, "timestamp must be a non-negative number (ms)" end
    local bc = M.MOONCAKE_BLOCK_TOKENS * BYTES_PER_TOKEN
    return setmetatable({ output_tokens = out or o.output_tokens, at = ts,
      _gen = { cache, ids, bc, floor(len) * BYTES_PER_TOKEN, n } }, lazy_mt)
  end
  if obj.blocks ~= nil then
    local ids, chars = obj.blocks, num(obj.text_chars)
    if not is_list(ids) then return nil, "capture line needs blocks (a list)" end
    if not chars then return nil, "capture line needs text_chars (a non-negative number)" end
    for _, id in ipairs(ids) do
      if type(id) ~= "string" then return nil, "blocks must be hex strings" end
    end
    local bc = num(obj.block_chars) or M.BLOCK_CHARS
    if bc < 4 then return nil, "block_chars must be at least 4" end
    local t = obj.t
    if t ~= nil and not num(t) then return nil, "t must be a non-negative number (ms)" end
    local route = obj.route
    if route ~= nil and route ~= "generate" and route ~= "chat" and route ~= "completions" then
      return nil, "route must be generate, chat or completions"
    end
    local out = obj.output_tokens
    if out == cjson.null then out = nil end
    if out ~= nil and not num(out) then return nil, "output_tokens must be a non-negative number" end
    return setmetatable({ output_tokens = out or o.output_tokens, at = t, route = route,
      captured_worker = type(obj.worker) == "string" and obj.worker or nil,
      _gen = { cache, ids, bc, floor(chars), n } }, lazy_mt)
  end
  local spec = M.bench_spec(obj, o.output_tokens)
  if not spec then
    return nil, "not a Mooncake, capture or bench trace line (needs hash_ids, blocks, text or messages)"
  end
  return spec
end

-- Parse trace text. opts: output_tokens (default), warn(msg) for each bad
-- line (skipped). -> { sessions, total, timed, skipped } | nil, err
function M.parse(text, opts)
  opts = opts or {}
  local cache = { shared = {} }
  local specs, skipped = {}, 0
  local n = 0
  local warn = opts.warn
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if line:match("%S") then
      local obj, err = cjson.decode(line)
      local spec, why
      if type(obj) ~= "table" then
        why = "invalid JSON: " .. tostring(err or "not an object")
      else
        spec, why = spec_of(obj, n, cache, opts)
      end
      if spec then
        spec.line = n
        specs[#specs + 1] = spec
      else
        skipped = skipped + 1
        if warn then warn(fmt("trace line %d: %s (skipped)", n, why)) end
      end
    end
  end
  if #specs == 0 then return nil, "trace has no usable requests" end
  -- the block ids used more than once: their text is kept
  local seen, shared = {}, {}
  for _, sp in ipairs(specs) do
    local g = sp._gen
    if g then
      for _, id in ipairs(g[2]) do
        if seen[id] then shared[id] = true else seen[id] = true end
      end
    end
  end
  cache.shared = shared
  -- timestamps: replayed relative to the first, in order
  local timed = false
  for _, s in ipairs(specs) do timed = timed or s.at ~= nil end
  if timed then
    local t0 = math.huge
    for _, s in ipairs(specs) do
      if s.at == nil then s.at = 0 end
      if s.at < t0 then t0 = s.at end
    end
    for _, s in ipairs(specs) do s.at = s.at - t0 end
    sort(specs, function(a, b) return a.at < b.at or (a.at == b.at and a.line < b.line) end)
  end
  local sessions = {}
  for i, s in ipairs(specs) do sessions[i] = { s } end
  return { sessions = sessions, total = #sessions, timed = timed, skipped = skipped }
end

function M.load(path, opts)
  local f, err = io.open(path, "rb")
  if not f then return nil, "cannot read trace: " .. tostring(err) end
  local text = f:read("*a")
  f:close()
  return M.parse(text, opts)
end

return M

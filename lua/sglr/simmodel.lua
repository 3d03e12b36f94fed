-- The simulated worker's model: one source of truth for `sglr sim-worker`
-- (live, on the runtime's clock) and `sglr sim` (offline, on a virtual
-- clock), so that what the offline simulator predicts is what the live
-- simulated fleet does.
--
-- Per data-parallel rank:
--   KV cache   a prefix tree over prompt text holding at most kv_tokens
--              tokens, least recently used prefixes evicted first; a
--              request's cached tokens are the prefix already there
--   scheduler  continuous batching: at most max_running requests run at
--              once (0: no limit), the rest wait in arrival order
--   timing     prefill: prefill_us_per_token per uncached prompt token;
--              decode: one step per output token, a step taking
--              decode_ms_per_token plus decode_batch_ms per other request
--              running beside it (the batch it joins when it starts)
--
-- Tokens are approximated as 4 bytes of text, the usual ratio for English
-- with BPE tokenizers.
local floor, max, min, ceil = math.floor, math.max, math.min, math.ceil
local concat = table.concat

local M = {}

M.BYTES_PER_TOKEN = 4
local BYTES_PER_TOKEN = M.BYTES_PER_TOKEN

-- --- request text ---------------------------------------------------------------------

-- A prompt list as text: strings as they are, id lists as decimal ids.
local function join_prompts(list)
  local out = {}
  for i, e in ipairs(list) do
    if type(e) == "table" then
      local ids = {}
      for j, id in ipairs(e) do ids[j] = tostring(id) end
      out[i] = concat(ids, " ")
    else
      out[i] = tostring(e)
    end
  end
  return concat(out, " ")
end

-- Text of a request, as the worker would tokenize it.
function M.prompt_text(route, req)
  if route == "generate" then
    local t = req.text or req.prompt
    if type(t) == "table" then return join_prompts(t) end
    if type(t) == "string" then return t end
    if type(req.input_ids) == "table" then
      local ids = req.input_ids
      if type(ids[1]) == "table" then ids = ids[1] end
      local out = {}
      for i = 1, #ids do out[i] = tostring(ids[i]) end
      return concat(out, " ")
    end
    return ""
  elseif route == "chat" then
    local parts = {}
    for _, m in ipairs(req.messages or {}) do
      local c = m.content
      if type(c) == "string" then
        parts[#parts + 1] = c
      elseif type(c) == "table" then
        for _, part in ipairs(c) do
          if type(part) == "table" and part.type == "text" then parts[#parts + 1] = part.text end
        end
      end
    end
    return concat(parts, " ")
  else
    local p = req.prompt
    if type(p) == "table" then return join_prompts(p) end
    return type(p) == "string" and p or ""
  end
end

-- The answer text of n output tokens ("tok1 tok2 ..."): a multi-turn
-- client resends it, so both simulators must produce the same bytes.
function M.output_text(n)
  local words = {}
  for i = 1, n do words[i] = "tok" .. (i % 10) end
  return concat(words, " ")
end

-- --- the model ------------------------------------------------------------------------

-- The model's flags, shared by both commands' parsers: { flag, help, default }.
M.FLAGS = {
  { "--kv-tokens", "KV cache capacity in tokens (per data-parallel rank).", "1000000" },
  { "--prefill-us-per-token", "Prefill time per uncached prompt token (microseconds).", "0" },
  { "--decode-ms-per-token", "Decode time per output token (milliseconds) of a request running alone.", "0" },
  { "--decode-batch-ms", "Extra decode time per output token for each other request running "
    .. "in the same batch (milliseconds).", "0" },
  { "--max-running-requests", "Requests a rank runs at once (continuous batching); the rest "
    .. "queue (0: no limit).", "0" },
  { "--max-new-tokens", "Output tokens when the request does not say.", "16" },
  { "--dp-size", "Data-parallel ranks, each with its own KV cache and batch.", "1" },
}

-- defaults: flag -> default text, for a command whose defaults differ
-- (sglr sim models a GPU; sglr sim-worker answers at once for tests).
function M.add_flags(p, defaults)
  for _, f in ipairs(M.FLAGS) do
    p:option(f[1], f[2], defaults and defaults[f[1]] or f[3]):convert(tonumber)
  end
end

-- The model's options as parsed flags give them (opts.kv_tokens, ...).
-- -> true | nil, message
function M.check(opts)
  for _, f in ipairs(M.FLAGS) do
    local key = f[1]:sub(3):gsub("-", "_")
    local v = opts[key]
    if type(v) ~= "number" or v ~= v or v < 0 then
      return nil, f[1] .. " must be a non-negative number"
    end
  end
  if opts.dp_size < 1 or opts.dp_size ~= floor(opts.dp_size) then
    return nil, "--dp-size must be a positive integer"
  end
  return true
end

local Model = {}
Model.__index = Model

-- opts: the model flags' values (kv_tokens, prefill_us_per_token, ...).
-- `radix` is the native tree module (nil: no KV cache is modelled).
function M.new(opts, radix)
  if radix == nil then
    local ok, r = pcall(require, "sglr.radix")
    radix = ok and r or false
  end
  return setmetatable({ opts = opts, radix = radix }, Model)
end

-- A fresh rank: its cache, its batch and counters.
function Model:rank()
  return { requests = 0, prompt_tokens = 0, cached_tokens = 0, inflight = 0,
    running = 0, waiting = {}, whead = 1, wtail = 0,
    cache = self.radix and self.radix.new() or nil }
end

function Model:flush(rank)
  if rank.cache then
    rank.cache:close()
    rank.cache = self.radix.new()
  end
end

function Model:prompt_tokens(text)
  return ceil(#text / BYTES_PER_TOKEN)
end

-- Look the prompt up in the rank's KV cache, then insert it (as a worker
-- does after prefill) and evict down to the budget. Counts the request on
-- the rank. -> prompt tokens, cached tokens
function Model:touch_cache(text, rank)
  local ptoks = ceil(#text / BYTES_PER_TOKEN)
  local cached = 0
  local cache = rank.cache
  if cache and #text > 0 then
    local matched = cache:match(text)
    cache:insert(text, "self")
    local budget = self.opts.kv_tokens * BYTES_PER_TOKEN
    if cache:size("self") > budget then cache:evict(budget) end
    cached = min(floor(matched / BYTES_PER_TOKEN), ptoks)
  end
  rank.prompt_tokens = rank.prompt_tokens + ptoks
  rank.cached_tokens = rank.cached_tokens + cached
  return ptoks, cached
end

-- Output tokens of a request that asked for n (nil: the default).
function Model:output_tokens(n)
  n = tonumber(n) or self.opts.max_new_tokens
  return max(0, floor(n))
end

function Model:prefill_ms(ptoks, cached)
  return (ptoks - cached) * self.opts.prefill_us_per_token / 1000
end

-- Time of one decode step for a request running in a batch of `running`
-- (itself included).
function Model:step_ms(running)
  return self.opts.decode_ms_per_token + self.opts.decode_batch_ms * max(0, running - 1)
end

function Model:full(rank)
  local cap = self.opts.max_running_requests
  return cap > 0 and rank.running >= cap
end

-- Continuous batching. admit(rank, item) -> true when the request runs now,
-- false when it waits (item is queued and handed back by release).
function Model:admit(rank, item)
  local cap = self.opts.max_running_requests
  if cap <= 0 or rank.running < cap then
    rank.running = rank.running + 1
    return true
  end
  rank.wtail = rank.wtail + 1
  rank.waiting[rank.wtail] = item
  return false
end

-- A running request ended: -> the waiting item that runs next, or nil.
function Model:release(rank)
  rank.running = rank.running - 1
  if rank.whead <= rank.wtail then
    local item = rank.waiting[rank.whead]
    rank.waiting[rank.whead] = nil
    rank.whead = rank.whead + 1
    rank.running = rank.running + 1
    return item
  end
  return nil
end

function Model:queued(rank)
  return rank.wtail - rank.whead + 1
end

return M

-- What cache-aware routing costs per request, measured on the native parts:
-- extract the routing text from a chat body, match it against the tree,
-- insert it. The tree first holds ~16M characters over 16 workers (the
-- default max_tree_size is 16M per worker; this is a realistic fill, not the
-- worst case), then:
--
--   * a 4 KB prompt (1 KB shared system prompt + 3 KB unique), many runs;
--   * a 200 KB prompt (192 KB shared document + 8 KB unique), fewer runs;
--   * one eviction that removes ~1M characters;
--   * evictions from a tree of many small prompts (330k nodes, the shape a
--     chat fleet of short conversations builds): the cost is one walk over
--     every node, so this is the worst stall an eviction causes.
--
-- Medians are reported in microseconds. "inspect alone" is the same body
-- validated without building the text string: the difference to "extract"
-- is the cost of handing a fresh string to Lua (for big strings LuaJIT's
-- allocator maps new pages, so it is mostly page faults).
--
--   build/sglr lua examples/benchmarks/policy_cost.lua

local radix = require "sglr.radix"
local extract = require "sglr.extract"

local ok_uv, uv = pcall(require, "luv")
local function now_us()
  if ok_uv then return uv.hrtime() / 1e3 end
  return os.clock() * 1e6
end

local random, floor, concat, sort = math.random, math.floor, table.concat, table.sort
math.randomseed(42)

-- 4 MB of word-like text to cut prompts from (no JSON escapes needed).
local WORDS = {}
for i = 1, 2000 do
  local n, w = 2 + random(8), {}
  for j = 1, n do w[j] = string.char(96 + random(26)) end
  WORDS[i] = concat(w)
end
local function text_of(len)
  local parts, n = {}, 0
  while n < len do
    local w = WORDS[random(#WORDS)]
    parts[#parts + 1] = w
    n = n + #w + 1
  end
  return concat(parts, " "):sub(1, len)
end

local function chat_body(system, user)
  return '{"model":"bench","stream":true,"messages":[{"role":"system","content":"' .. system
    .. '"},{"role":"user","content":"' .. user .. '"}]}'
end

local NW = 16
local workers = {}
for i = 1, NW do workers[i] = { url = ("http://10.0.0.%d:8000"):format(i), load = 0 } end

-- Fill: 64 system prompts, each request = one of them + a unique question.
local t = radix.new()
local systems = {}
for i = 1, 64 do systems[i] = text_of(1024) end
local t0 = now_us()
local filled, inserts = 0, 0
while filled < 16 * 1024 * 1024 do
  local s = random(#systems)
  local text = systems[s] .. " " .. text_of(3072)
  t:insert(text, workers[(s - 1) % NW + 1].url)
  inserts = inserts + 1
  if inserts % 256 == 0 then filled = t:stats().chars end
end
local st = t:stats()
print(("tree: %d chars, %d nodes over %d workers (%d inserts, %.1f s to fill)")
  :format(st.chars, st.nodes, NW, inserts, (now_us() - t0) / 1e6))

local function median(xs)
  sort(xs)
  return xs[floor((#xs + 1) / 2)]
end

local function bench(label, runs, make)
  local total, ex, ma, ins, val = {}, {}, {}, {}, {}
  local hits = 0
  for r = 1, runs do
    local body, size = make(r)
    local v = now_us()
    assert(extract.inspect("chat", body))
    val[r] = now_us() - v
    local a = now_us()
    local text = extract.route_text("chat", body)
    local b = now_us()
    local matched, url = t:match(text, workers)
    local c = now_us()
    t:insert(text, url or workers[r % NW + 1].url)
    local d = now_us()
    total[r], ex[r], ma[r], ins[r] = d - a, b - a, c - b, d - c
    if matched / #text > 0.5 then hits = hits + 1 end
    assert(#text > size * 0.9)
  end
  print(("%-14s median %7.1f us = extract %6.1f + match %5.1f + insert %5.1f   "
         .. "[inspect alone %6.1f]  hits %d/%d")
    :format(label, median(total), median(ex), median(ma), median(ins), median(val), hits, runs))
end

bench("4 KB prompt", 5000, function()
  local s = systems[random(#systems)]
  return chat_body(s, text_of(3072)), 4096
end)

local docs = {}
for i = 1, 4 do docs[i] = text_of(192 * 1024) end
for i = 1, 4 do t:insert(docs[i] .. " warm", workers[i].url) end
bench("200 KB prompt", 300, function()
  return chat_body(docs[random(#docs)], text_of(8 * 1024)), 200 * 1024
end)

-- Evict ~1M chars: find the per-worker budget that removes that much.
local sizes = {}
for i = 1, NW do sizes[i] = t:size(workers[i].url) end
local function excess(max)
  local e = 0
  for i = 1, NW do if sizes[i] > max then e = e + sizes[i] - max end end
  return e
end
local lo, hi = 0, 0
for i = 1, NW do if sizes[i] > hi then hi = sizes[i] end end
while hi - lo > 1 do
  local mid = floor((lo + hi) / 2)
  if excess(mid) > 1024 * 1024 then lo = mid else hi = mid end
end
local before = t:stats().chars
local a = now_us()
local removed = t:evict(hi)
local ms = (now_us() - a) / 1e3
print(("evict to %d chars/worker: %d chars of attribution removed (%d of %d stored) in %.2f ms")
  :format(hi, removed, before - t:stats().chars, before, ms))

t:close()

-- Many small prompts: 300k of ~260 chars over 4 workers (73M chars).
local small = radix.new()
local ctx = string.rep("context ", 30)
local su = {}
for i = 1, 4 do su[i] = "http://small-" .. i end
for i = 0, 299999 do
  small:insert(("user %d turn %d: %s"):format(i % 16, floor(i / 16), ctx), su[i % 4 + 1])
end
local sst = small:stats()
local budget = small:size(su[1])
local times = {}
for k = 1, 5 do
  budget = budget - 65536
  local b = now_us()
  small:evict(budget)
  times[k] = (now_us() - b) / 1e3
end
table.sort(times)
print(("evict 256k chars from a tree of %d nodes / %d chars: median %.1f ms, worst %.1f ms")
  :format(sst.nodes, sst.chars, times[3], times[5]))
small:close()

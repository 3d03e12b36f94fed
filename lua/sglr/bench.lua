-- sglr bench: replays a workload against a router or worker URL and reports
-- throughput, latency and TTFT percentiles and the workers' cache hit rate.
--
-- Workloads:
--   shared-prefix  G groups of P requests; every request of a group starts
--                  with the group's system prompt (after SGLang's
--                  generated-shared-prefix benchmark). Requests are shuffled
--                  across groups with the seed, so a cache-aware router has
--                  to find the prefix rather than see a group arrive in a row.
--   multi-turn     U users talk for T turns; turn i resends the conversation
--                  so far (questions and the answers received) plus a new
--                  question, so each turn extends the previous prompt.
--   trace          one request per JSONL line: {"text": ..., "output_tokens": n}
--                  or {"messages": [...], "output_tokens": n}.
--
-- Prompts are pseudo-words of exactly 4 bytes (3 letters and a space), the
-- ratio the simulated worker (and roughly a BPE tokenizer on English) uses,
-- so "S tokens" of prompt is 4*S bytes.
--
-- Scheduling: one dispatcher coroutine hands ready requests to runner
-- coroutines, at most --concurrency in flight, optionally paced by Poisson
-- arrivals (--rate). A multi-turn user's next turn becomes ready only when
-- the previous answer has arrived.
local core = require "sglr.core"
local cjson = require "cjson.safe"

local floor, max, min, log = math.floor, math.max, math.min, math.log
local concat, sort = table.concat, table.sort
local fmt = string.format

local M = {}

M.WORKLOADS = { "shared-prefix", "multi-turn", "trace" }
M.ROUTES = { generate = "/generate", chat = "/v1/chat/completions", completions = "/v1/completions" }

-- Defaults, shared by the flag parser and bench.run(opts) callers.
M.DEFAULTS = {
  url = "http://127.0.0.1:30000",
  workload = "shared-prefix",
  route = "generate",
  groups = 64,
  prompts_per_group = 16,
  system_tokens = 2048,
  question_tokens = 128,
  output_tokens = 256,
  users = 16,
  turns = 4,
  turn_tokens = 128,
  seed = 1,
  timeout_secs = 600,
  model = "default",
  stream = false,
  json = false,
  quiet = false,
}
local DEFAULT_CONCURRENCY = 32
M.DEFAULT_CONCURRENCY = DEFAULT_CONCURRENCY

-- --- deterministic random numbers ---------------------------------------------------
-- Park-Miller "minimal standard" generator: pure Lua, exact in doubles, and
-- independent of math.random, which other code in the process may reseed.

local RNG_M, RNG_A = 2147483647, 48271

local Rng = {}
Rng.__index = Rng

function M.rng(seed)
  local s = floor(tonumber(seed) or 1) % (RNG_M - 1)
  if s < 0 then s = s + RNG_M - 1 end
  return setmetatable({ s = s + 1 }, Rng)
end

-- Uniform in (0, 1).
function Rng:float()
  self.s = (self.s * RNG_A) % RNG_M
  return self.s / RNG_M
end

-- Uniform integer in [lo, hi].
function Rng:int(lo, hi)
  return lo + floor(self:float() * (hi - lo + 1))
end

function Rng:shuffle(t)
  for i = #t, 2, -1 do
    local j = self:int(1, i)
    t[i], t[j] = t[j], t[i]
  end
  return t
end

-- Exponential inter-arrival time (seconds) for a Poisson process of `rate`/s.
function Rng:exp(rate)
  return -log(self:float()) / rate
end

-- --- prompts ------------------------------------------------------------------------

local CONSONANTS = "bcdfghjklmnprstvwz"
local VOWELS = "aeiou"

-- n pseudo-words of 4 bytes each ("kal pot ..."), ending with a space.
function M.words(rng, n)
  local t = {}
  local nc, nv = #CONSONANTS, #VOWELS
  for i = 1, n do
    local a, b, c = rng:int(1, nc), rng:int(1, nv), rng:int(1, nc)
    t[i] = CONSONANTS:sub(a, a) .. VOWELS:sub(b, b) .. CONSONANTS:sub(c, c) .. " "
  end
  return concat(t)
end

-- --- workloads ----------------------------------------------------------------------
-- A workload is { sessions = {...}, total = n }. A session is a list of turn
-- specs sent in order; a turn spec has output_tokens and either
--   system + question   (shared-prefix),
--   question            (multi-turn: history is built from earlier turns),
--   text or messages    (trace).

local function shared_prefix(o)
  local rng = M.rng(o.seed)
  local reqs = {}
  for g = 1, o.groups do
    local system = M.words(rng, o.system_tokens)
    for _ = 1, o.prompts_per_group do
      reqs[#reqs + 1] = { { group = g, system = system,
        question = M.words(rng, o.question_tokens), output_tokens = o.output_tokens } }
    end
  end
  rng:shuffle(reqs)
  return reqs
end

local function multi_turn(o)
  local rng = M.rng(o.seed)
  local users = {}
  for u = 1, o.users do
    local turns = { user = u }
    for i = 1, o.turns do
      turns[i] = { user = u, turn = i, question = M.words(rng, o.turn_tokens),
        output_tokens = o.output_tokens }
    end
    users[u] = turns
  end
  return users
end

-- Parse a JSONL trace; returns sessions (one request each) or nil, err.
function M.parse_trace(text, output_tokens)
  local reqs = {}
  local n = 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if line:match("%S") then
      local obj, err = cjson.decode(line)
      if type(obj) ~= "table" then
        return nil, fmt("trace line %d: invalid JSON: %s", n, tostring(err or "not an object"))
      end
      local spec = require("sglr.trace").bench_spec(obj, output_tokens)
      if not spec then
        return nil, fmt("trace line %d: needs \"text\" (a string) or \"messages\" (a list)", n)
      end
      reqs[#reqs + 1] = { spec }
    end
  end
  if #reqs == 0 then return nil, "trace has no requests" end
  return reqs
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

-- Build the workload of validated options: { sessions, total } or nil, err.
function M.workload(o)
  local sessions
  if o.workload == "shared-prefix" then
    sessions = shared_prefix(o)
  elseif o.workload == "multi-turn" then
    sessions = multi_turn(o)
  else
    local text, err = read_file(o.trace)
    if not text then return nil, "cannot read trace: " .. tostring(err) end
    local serr
    sessions, serr = M.parse_trace(text, o.output_tokens)
    if not sessions then return nil, serr end
  end
  local total = 0
  for _, s in ipairs(sessions) do total = total + #s end
  if o.num_requests then total = min(total, o.num_requests) end
  return { sessions = sessions, total = total }
end

-- --- request bodies -----------------------------------------------------------------

local function content_text(c)
  if type(c) == "string" then return c end
  if type(c) == "table" then
    local parts = {}
    for _, p in ipairs(c) do
      if type(p) == "table" and type(p.text) == "string" then parts[#parts + 1] = p.text end
    end
    return concat(parts, " ")
  end
  return ""
end

-- Messages of a turn: history holds the earlier {question, answer} pairs.
local function turn_messages(spec, history)
  if spec.messages then return spec.messages end
  if spec.text then return { { role = "user", content = spec.text } } end
  local msgs = {}
  if spec.system then msgs[1] = { role = "system", content = spec.system } end
  for _, h in ipairs(history or {}) do
    msgs[#msgs + 1] = { role = "user", content = h[1] }
    msgs[#msgs + 1] = { role = "assistant", content = h[2] }
  end
  msgs[#msgs + 1] = { role = "user", content = spec.question }
  return msgs
end

-- Prompt text of a turn for the text routes (generate, completions). The
-- system prompt and the question are concatenated as is, so a group's
-- requests share exactly the system prompt's bytes as a prefix.
function M.turn_text(spec, history)
  if spec.text then return spec.text end
  if spec.system then return spec.system .. spec.question end
  local parts = {}
  if spec.messages then
    for _, m in ipairs(spec.messages) do parts[#parts + 1] = content_text(m.content) end
    return concat(parts, "\n")
  end
  for _, h in ipairs(history or {}) do
    parts[#parts + 1] = h[1]
    parts[#parts + 1] = h[2]
  end
  parts[#parts + 1] = spec.question
  return concat(parts, "\n")
end

-- The JSON body of a turn for a route. ignore_eos makes a real SGLang
-- worker produce exactly output_tokens, as SGLang's own benchmarks do.
function M.body(route, spec, history, o)
  local n = spec.output_tokens
  local b
  if route == "generate" then
    b = { text = M.turn_text(spec, history),
      sampling_params = { max_new_tokens = n, ignore_eos = true, temperature = 0 } }
  elseif route == "chat" then
    b = { model = o.model, messages = turn_messages(spec, history), max_tokens = n,
      ignore_eos = true, temperature = 0 }
  else
    b = { model = o.model, prompt = M.turn_text(spec, history), max_tokens = n,
      ignore_eos = true, temperature = 0 }
  end
  if o.stream then
    b.stream = true
    if route ~= "generate" then b.stream_options = { include_usage = true } end
  end
  return b
end

-- --- responses ----------------------------------------------------------------------

-- Decoded JSON events of an SSE body ("data: {...}" lines; [DONE] and
-- anything that is not a JSON object are skipped).
function M.parse_sse(body)
  local events = {}
  for line in body:gmatch("[^\r\n]+") do
    local data = line:match("^data:%s?(.*)$")
    if data and data ~= "[DONE]" then
      local ev = cjson.decode(data)
      if type(ev) == "table" then events[#events + 1] = ev end
    end
  end
  return events
end

local function num(v)
  return type(v) == "number" and v or nil
end

local function usage_info(info, u)
  if type(u) ~= "table" then return end
  info.prompt_tokens = num(u.prompt_tokens) or info.prompt_tokens
  info.output_tokens = num(u.completion_tokens) or info.output_tokens
  local d = u.prompt_tokens_details
  if type(d) == "table" then info.cached_tokens = num(d.cached_tokens) or info.cached_tokens end
end

local function meta_info(info, m)
  if type(m) ~= "table" then return end
  info.prompt_tokens = num(m.prompt_tokens) or info.prompt_tokens
  info.output_tokens = num(m.completion_tokens) or info.output_tokens
  info.cached_tokens = num(m.cached_tokens) or info.cached_tokens
end

local function error_message(obj)
  local e = obj.error
  if e == nil or e == cjson.null then return nil end
  if type(e) == "table" then return tostring(e.message or e.type or "error") end
  return tostring(e)
end

-- What a 2xx response says: { prompt_tokens, cached_tokens, output_tokens,
-- text } (counts may be nil when the server does not report them), or
-- nil, err for a body that is not a response or carries an error event.
function M.parse_response(route, stream, body)
  local info = { text = "" }
  if stream then
    local events = M.parse_sse(body)
    if #events == 0 then return nil, "no events in stream" end
    local pieces = {}
    for _, ev in ipairs(events) do
      local e = error_message(ev)
      if e then return nil, "error event: " .. e end
      if route == "generate" then
        -- SGLang sends text and meta_info cumulatively: the last event wins
        if type(ev.text) == "string" then info.text = ev.text end
        meta_info(info, ev.meta_info)
      else
        local c = type(ev.choices) == "table" and ev.choices[1]
        if type(c) == "table" then
          local piece = route == "chat" and type(c.delta) == "table" and c.delta.content or c.text
          if type(piece) == "string" then pieces[#pieces + 1] = piece end
        end
        usage_info(info, ev.usage)
      end
    end
    if route ~= "generate" then info.text = concat(pieces) end
    return info
  end
  local obj = cjson.decode(body)
  if type(obj) ~= "table" then return nil, "response is not JSON" end
  local e = error_message(obj)
  if e then return nil, e end
  if route == "generate" then
    if obj[1] ~= nil then obj = obj[1] end   -- batch form: first item
    if type(obj.text) == "string" then info.text = obj.text end
    meta_info(info, obj.meta_info)
  else
    local c = type(obj.choices) == "table" and obj.choices[1]
    if type(c) == "table" then
      local t = route == "chat" and type(c.message) == "table" and c.message.content or c.text
      if type(t) == "string" then info.text = t end
    end
    usage_info(info, obj.usage)
  end
  return info
end

-- --- statistics ---------------------------------------------------------------------

-- Percentile p (0..100) of an ascending array, interpolating linearly
-- between closest ranks (numpy's default); nil for an empty array.
function M.percentile(sorted, p)
  local n = #sorted
  if n == 0 then return nil end
  local r = (p / 100) * (n - 1) + 1
  local lo = floor(r)
  if lo >= n then return sorted[n] end
  local frac = r - lo
  return sorted[lo] + (sorted[lo + 1] - sorted[lo]) * frac
end

-- { p50, p90, p99, mean } of an array of numbers (sorted in place).
function M.distribution(xs)
  if #xs == 0 then return {} end
  sort(xs)
  local sum = 0
  for i = 1, #xs do sum = sum + xs[i] end
  return { p50 = M.percentile(xs, 50), p90 = M.percentile(xs, 90),
    p99 = M.percentile(xs, 99), mean = sum / #xs }
end

-- Summary of per-request results ({ ok, err, latency_ms, ttft_ms,
-- prompt_tokens, cached_tokens, output_tokens }) over duration_s.
function M.summarize(results, duration_s, o)
  local lat, ttft, kinds = {}, {}, {}
  local nok, nerr, out, ptok, ctok = 0, 0, 0, 0, 0
  for _, r in ipairs(results) do
    if r.ok then
      nok = nok + 1
      lat[#lat + 1] = r.latency_ms
      ttft[#ttft + 1] = r.ttft_ms
      out = out + (r.output_tokens or 0)
      ptok = ptok + (r.prompt_tokens or 0)
      ctok = ctok + (r.cached_tokens or 0)
    else
      nerr = nerr + 1
      kinds[r.err] = (kinds[r.err] or 0) + 1
    end
  end
  o = o or {}
  local d = duration_s > 0 and duration_s or nil
  return {
    url = o.url, workload = o.workload, route = o.route, stream = o.stream or false,
    concurrency = o.concurrency, rate = o.rate, seed = o.seed,
    requests = #results, ok = nok, errors = nerr, error_kinds = kinds,
    duration_s = duration_s,
    throughput_rps = d and nok / d or 0,
    output_tokens = out,
    output_tps = d and out / d or 0,
    prompt_tokens = ptok, cached_tokens = ctok,
    cache_hit_rate = ptok > 0 and 100 * ctok / ptok or nil,
    latency_ms = M.distribution(lat),
    ttft_ms = M.distribution(ttft),
  }
end

-- --- text output --------------------------------------------------------------------

local function ms(v)
  if v == nil then return "-" end
  return fmt("%.1f", v)
end

local function pct(v)
  if v == nil then return "-" end
  return fmt("%.1f%%", v)
end

local function dist_line(d)
  return fmt("p50 %s  p90 %s  p99 %s  mean %s", ms(d.p50), ms(d.p90), ms(d.p99), ms(d.mean))
end

local function sorted_keys(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  sort(ks, function(a, b) return tostring(a) < tostring(b) end)
  return ks
end

-- The summary as the table `sglr bench` prints.
function M.format(s)
  local lines = {}
  local function add(label, value) lines[#lines + 1] = fmt("  %-18s %s", label, value) end
  local load
  if s.rate then
    load = fmt("rate %g req/s%s", s.rate, s.concurrency and fmt(", max %d in flight", s.concurrency) or "")
  else
    load = fmt("concurrency %s", tostring(s.concurrency or "-"))
  end
  lines[1] = fmt("sglr bench: %s workload on %s%s (%s%s)", s.workload or "?",
    s.url or "?", M.ROUTES[s.route] or "", load, s.stream and ", streamed" or "")
  local errs = fmt("%d ok, %d errors", s.ok, s.errors)
  if s.errors > 0 then
    local parts = {}
    for _, k in ipairs(sorted_keys(s.error_kinds or {})) do
      parts[#parts + 1] = fmt("%s: %d", k, s.error_kinds[k])
    end
    errs = errs .. " (" .. concat(parts, ", ") .. ")"
  end
  add("requests", errs)
  add("duration", fmt("%.2f s", s.duration_s))
  add("throughput", fmt("%.1f req/s, %.0f output tok/s", s.throughput_rps, s.output_tps))
  add("latency (ms)", dist_line(s.latency_ms or {}))
  add("TTFT (ms)", dist_line(s.ttft_ms or {}))
  local hit = pct(s.cache_hit_rate)
  if s.cache_hit_rate then
    hit = fmt("%s (%d of %d prompt tokens cached)", hit, s.cached_tokens, s.prompt_tokens)
  else
    hit = "- (the server reported no prompt tokens)"
  end
  add("cache hit rate", hit)
  return concat(lines, "\n") .. "\n"
end

local COMPARE_ROWS = {
  { "requests ok", function(s) return tostring(s.ok) end },
  { "errors", function(s) return tostring(s.errors) end },
  { "duration (s)", function(s) return fmt("%.2f", s.duration_s) end },
  { "throughput (req/s)", function(s) return fmt("%.1f", s.throughput_rps) end },
  { "output tok/s", function(s) return fmt("%.0f", s.output_tps) end },
  { "latency p50 (ms)", function(s) return ms(s.latency_ms.p50) end },
  { "latency p90 (ms)", function(s) return ms(s.latency_ms.p90) end },
  { "latency p99 (ms)", function(s) return ms(s.latency_ms.p99) end },
  { "latency mean (ms)", function(s) return ms(s.latency_ms.mean) end },
  { "TTFT p50 (ms)", function(s) return ms(s.ttft_ms.p50) end },
  { "TTFT p90 (ms)", function(s) return ms(s.ttft_ms.p90) end },
  { "TTFT p99 (ms)", function(s) return ms(s.ttft_ms.p99) end },
  { "TTFT mean (ms)", function(s) return ms(s.ttft_ms.mean) end },
  { "cache hit rate", function(s) return pct(s.cache_hit_rate) end },
}

-- Side-by-side table of named summaries: { name = summary, ... } (columns
-- sorted by name) or an array { { name, summary }, ... } (columns in order).
function M.compare(named)
  local cols = {}
  if named[1] ~= nil then
    for _, p in ipairs(named) do cols[#cols + 1] = { p[1] or p.name, p[2] or p.summary } end
  else
    for _, k in ipairs(sorted_keys(named)) do cols[#cols + 1] = { k, named[k] } end
  end
  local lw = 0
  for _, r in ipairs(COMPARE_ROWS) do lw = max(lw, #r[1]) end
  local cells, widths = {}, {}
  for c, col in ipairs(cols) do
    widths[c] = #tostring(col[1])
    cells[c] = {}
    for i, r in ipairs(COMPARE_ROWS) do
      local s = col[2]
      local v = r[2]({ ok = s.ok or 0, errors = s.errors or 0, duration_s = s.duration_s or 0,
        throughput_rps = s.throughput_rps or 0, output_tps = s.output_tps or 0,
        latency_ms = s.latency_ms or {}, ttft_ms = s.ttft_ms or {}, cache_hit_rate = s.cache_hit_rate })
      cells[c][i] = v
      widths[c] = max(widths[c], #v)
    end
  end
  local out = {}
  local head = { fmt("%-" .. lw .. "s", "") }
  for c, col in ipairs(cols) do head[#head + 1] = fmt("%" .. widths[c] .. "s", tostring(col[1])) end
  out[1] = concat(head, "  ")
  for i, r in ipairs(COMPARE_ROWS) do
    local row = { fmt("%-" .. lw .. "s", r[1]) }
    for c = 1, #cols do row[#row + 1] = fmt("%" .. widths[c] .. "s", cells[c][i]) end
    out[#out + 1] = concat(row, "  ")
  end
  return concat(out, "\n") .. "\n"
end

-- --- options ------------------------------------------------------------------------

local function positive_int(o, key, allow_zero)
  local v = o[key]
  if v == nil then return true end
  if type(v) ~= "number" or v ~= floor(v) or v < (allow_zero and 0 or 1) then
    return nil, fmt("--%s must be a %s integer", key:gsub("_", "-"),
      allow_zero and "non-negative" or "positive")
  end
  return true
end

-- Options with defaults filled in and checked: opts or nil, err. Used by
-- the flag parser and by callers of bench.run (make demo).
function M.options(t)
  local o = {}
  for k, v in pairs(M.DEFAULTS) do o[k] = v end
  for k, v in pairs(t or {}) do o[k] = v end
  local okw = false
  for _, w in ipairs(M.WORKLOADS) do okw = okw or w == o.workload end
  if not okw then
    return nil, fmt("unknown workload '%s' (choose %s)", tostring(o.workload), concat(M.WORKLOADS, ", "))
  end
  if not M.ROUTES[o.route] then
    return nil, fmt("unknown route '%s' (choose generate, chat, completions)", tostring(o.route))
  end
  if type(o.url) ~= "string" or not o.url:match("^http://[^/]") then
    return nil, fmt("--url must be an http:// URL, got '%s'", tostring(o.url))
  end
  for _, k in ipairs({ "groups", "prompts_per_group", "users", "turns", "concurrency",
                       "num_requests", "timeout_secs" }) do
    local ok, err = positive_int(o, k)
    if not ok then return nil, err end
  end
  for _, k in ipairs({ "system_tokens", "question_tokens", "output_tokens", "turn_tokens", "seed" }) do
    local ok, err = positive_int(o, k, true)
    if not ok then return nil, err end
  end
  if o.rate ~= nil and (type(o.rate) ~= "number" or not (o.rate > 0) or o.rate == math.huge) then  -- luacheck: ignore (NaN-safe on purpose)
    return nil, "--rate must be a positive number of requests per second"
  end
  if o.workload == "trace" and not o.trace then
    return nil, "the trace workload needs --trace FILE.jsonl"
  end
  if o.trace and o.workload ~= "trace" then
    return nil, "--trace needs --workload trace"
  end
  -- With --rate, arrivals set the pace and --concurrency only caps it when
  -- given; without, the concurrency is the load.
  if o.concurrency == nil and not o.rate then o.concurrency = DEFAULT_CONCURRENCY end
  return o
end

local function parser()
  local argparse = require "argparse"
  local p = argparse("sglr bench", "Replay a workload against a router or worker and report "
    .. "throughput, latency, TTFT and the workers' cache hit rate.")
    :add_help(false)
    :epilog([[
Trace files (--workload trace) hold one JSON object per line:
  {"text": "...", "output_tokens": 128}
  {"messages": [{"role": "user", "content": "..."}], "output_tokens": 64}
"prompt" is accepted for "text"; output_tokens defaults to --output-tokens.
For the text routes (generate, completions) messages are joined with newlines;
for chat, text becomes one user message.

Examples:
  sglr bench --url http://127.0.0.1:30000 --groups 16 --prompts-per-group 8
  sglr bench --workload multi-turn --route chat --stream --rate 20
  sglr bench --workload trace --trace requests.jsonl --json]])
  p:flag("-h --help", "Show this help message and exit.")
  p:option("--url", "Base URL of the router or worker.", M.DEFAULTS.url)
  M.add_workload_flags(p)
  p:option("--timeout-secs", "Per-request timeout.", tostring(M.DEFAULTS.timeout_secs)):convert(tonumber)
  p:flag("--json", "Print the summary as one JSON object.")
  p:flag("--quiet", "No progress line.")
  return p
end

-- The workload and arrival flags, shared with `sglr sim`.
function M.add_workload_flags(p)
  local D = M.DEFAULTS
  p:option("--workload", "Workload: shared-prefix, multi-turn or trace.", D.workload)
    :choices(M.WORKLOADS)
  p:option("--route", "API route: generate (/generate), chat (/v1/chat/completions), "
    .. "completions (/v1/completions).", D.route):choices({ "generate", "chat", "completions" })
  p:option("--model", "Model name sent on the OpenAI routes.", D.model)
  p:option("--groups", "shared-prefix: number of system prompts.", tostring(D.groups))
    :convert(tonumber)
  p:option("--prompts-per-group", "shared-prefix: requests per system prompt.",
    tostring(D.prompts_per_group)):convert(tonumber)
  p:option("--system-tokens", "shared-prefix: tokens of each system prompt.",
    tostring(D.system_tokens)):convert(tonumber)
  p:option("--question-tokens", "shared-prefix: tokens of each question.",
    tostring(D.question_tokens)):convert(tonumber)
  p:option("--output-tokens", "Output tokens per request.", tostring(D.output_tokens))
    :convert(tonumber)
  p:option("--users", "multi-turn: concurrent conversations.", tostring(D.users)):convert(tonumber)
  p:option("--turns", "multi-turn: turns per conversation.", tostring(D.turns)):convert(tonumber)
  p:option("--turn-tokens", "multi-turn: tokens of each new question.", tostring(D.turn_tokens))
    :convert(tonumber)
  p:option("--trace", "trace: JSONL file of requests (format below).")
  p:option("--concurrency", "Requests in flight (default 32; with --rate, a cap only if given).")
    :convert(tonumber)
  p:option("--rate", "Requests per second, Poisson arrivals (default: as fast as "
    .. "--concurrency allows)."):convert(tonumber)
  p:option("--num-requests", "Send at most N requests."):convert(tonumber)
  p:flag("--stream", "Ask for streamed (SSE) responses; TTFT is then the first body byte.")
  p:option("--seed", "Seed for prompts, request order and arrivals.", tostring(D.seed))
    :convert(tonumber)
end

-- Parse args with the argparse parser p: the given flags as a table
-- (without help) | nil, err, usage | { help = true, help_text }, "help".
-- Shared by sglr bench and sglr sim.
function M.parse_flags(p, args)
  local ok, res = p:pparse(args)
  if not ok then return nil, res, p:get_usage() end
  if res.help then return { help = true, help_text = p:get_help() }, "help" end
  local t = {}
  for k, v in pairs(res) do
    if v ~= nil and k ~= "help" then t[k] = v end
  end
  return t
end

-- Flags to options: opts, or nil, err, usage. opts.help asks for the help.
function M.parse_args(args)
  local p = parser()
  local t, err, usage = M.parse_flags(p, args)
  if not t or err == "help" then return t, err, usage end
  local o
  o, err = M.options(t)
  if not o then return nil, err, p:get_usage() end
  return o
end

-- --- running ------------------------------------------------------------------------

local function is_tty()
  local ok, uv = pcall(require, "luv")
  return ok and uv.guess_handle(2) == "tty"
end

-- One request: returns a result record and the answer text (for the next turn).
local function send(pool, path, route, body, o)
  local t0 = core.now()
  local res, err = core.request(pool, {
    method = "POST", path = path, body = body,
    headers = { ["content-type"] = "application/json" },
    timeout_ms = o.timeout_secs * 1000,
  })
  if not res then
    return { ok = false, err = tostring(err), latency_ms = core.now() - t0 }
  end
  if res.status < 200 or res.status > 299 then
    return { ok = false, err = "http " .. res.status, latency_ms = res.total_ms }
  end
  local info, perr = M.parse_response(route, o.stream, res.body)
  if not info then
    return { ok = false, err = "bad response: " .. perr, latency_ms = res.total_ms }
  end
  local ttft = res.total_ms
  if o.stream and res.first_body_ms and res.first_body_ms >= 0 then ttft = res.first_body_ms end
  return { ok = true, latency_ms = res.total_ms, ttft_ms = ttft,
    prompt_tokens = info.prompt_tokens, cached_tokens = info.cached_tokens,
    output_tokens = info.output_tokens }, info.text
end

-- Is the base URL there at all? Any HTTP answer to GET /health counts (a
-- router with no healthy worker says 503 and the run then reports errors);
-- only a transport failure does not.
local function probe(pool)
  local res, err = core.request(pool, { method = "GET", path = "/health",
    timeout_ms = 10000, connect_timeout_ms = 5000 })
  if not res then return nil, err end
  return res.status
end

-- Run a workload: opts as from bench.options / parse_args. Returns the
-- summary, or nil, err, kind where kind is "unreachable" (the URL did not
-- answer) or "options" (bad options or workload). Must run inside a
-- coroutine.
function M.run(opts)
  local o, oerr = M.options(opts)
  if not o then return nil, oerr, "options" end
  local wl, werr = M.workload(o)
  if not wl then return nil, werr, "options" end
  local pool, perr = core.upstream(o.url)
  if not pool then return nil, fmt("cannot reach %s: %s", o.url, perr), "unreachable" end
  local status, herr = probe(pool)
  if not status then return nil, fmt("cannot reach %s: %s", o.url, herr), "unreachable" end

  local route, path = o.route, M.ROUTES[o.route]
  local ready = {}            -- FIFO of { session, turn index, history }
  local head, tail = 1, 0
  for _, s in ipairs(wl.sessions) do tail = tail + 1; ready[tail] = { s, 1, {} } end
  local results = {}
  local dispatched, inflight, done, nerr, max_inflight = 0, 0, 0, 0, 0
  local wake                  -- event the dispatcher waits on, if it waits
  local function notify()
    if wake then
      local w = wake
      wake = nil
      w:set(true)
    end
  end
  -- The waiter keeps its own reference: a yielded C call does not anchor
  -- its arguments, and an event collected while waited on never fires.
  local function wait_for_change()
    local ev = core.event()
    wake = ev
    ev:wait()
  end

  local function runner(item)
    local session, i, history = item[1], item[2], item[3]
    local spec = session[i]
    local body = cjson.encode(M.body(route, spec, history, o))
    local ok, r, answer = pcall(send, pool, path, route, body, o)
    if not ok then r = { ok = false, err = "bench error: " .. tostring(r) } end
    results[#results + 1] = r
    done = done + 1
    if not r.ok then nerr = nerr + 1 end
    inflight = inflight - 1
    -- the next turn of a conversation goes out after this answer; a failed
    -- turn ends the conversation (its history would be wrong)
    if r.ok and session[i + 1] then
      local h = {}
      for k = 1, #history do h[k] = history[k] end
      h[#h + 1] = { spec.question or "", answer or "" }
      tail = tail + 1
      ready[tail] = { session, i + 1, h }
    end
    notify()
  end

  local tty = not o.quiet and is_tty()
  local finished = false
  local t_start = core.now()
  if tty then
    core.spawn(function()
      while not finished do
        local el = (core.now() - t_start) / 1000
        io.stderr:write(fmt("\r\27[K  %d/%d done, %d errors, %d in flight, %.1f req/s, %.1f s",
          done, wl.total, nerr, inflight, el > 0 and done / el or 0, el))
        io.stderr:flush()
        core.sleep(100)
      end
    end)
  end

  local rng = M.rng(o.seed + 7919)   -- arrivals: a stream apart from the prompts'
  local next_arrival = t_start
  local cap = o.concurrency or math.huge
  while dispatched < wl.total do
    if o.rate then
      next_arrival = next_arrival + rng:exp(o.rate) * 1000
      local d = next_arrival - core.now()
      if d >= 1 then core.sleep(d) end
    end
    -- wait for a slot and a ready request; stop early when nothing is in
    -- flight and nothing is ready (conversations ended by errors)
    while inflight >= cap or head > tail do
      if head > tail and inflight == 0 then break end
      wait_for_change()
    end
    if head > tail then break end
    local item = ready[head]
    ready[head] = nil
    head = head + 1
    dispatched = dispatched + 1
    inflight = inflight + 1
    if inflight > max_inflight then max_inflight = inflight end
    core.spawn(runner, item)
  end
  while inflight > 0 do
    wait_for_change()
  end
  local duration = (core.now() - t_start) / 1000
  finished = true
  if tty then io.stderr:write("\r\27[K"); io.stderr:flush() end
  pool:close()
  local s = M.summarize(results, duration, o)
  s.max_inflight = max_inflight
  s.health_status = status
  return s
end

function M.main(args)
  local o, err, usage = M.parse_args(args)
  if not o then
    io.stderr:write(usage or "", "\nerror: ", err, "\n")
    return core.exit(2)
  end
  if o.help then
    io.stdout:write(o.help_text, "\n")
    io.stdout:flush()
    return core.exit(0)
  end
  local s, rerr, kind = M.run(o)
  if not s then
    io.stderr:write("sglr bench: ", rerr, "\n")
    io.stderr:flush()
    return core.exit(kind == "unreachable" and 1 or 2)
  end
  if o.json then
    io.stdout:write(cjson.encode(s), "\n")
  else
    io.stdout:write(M.format(s))
  end
  io.stdout:flush()
  return core.exit(0)
end

return M

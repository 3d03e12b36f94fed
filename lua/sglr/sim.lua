-- sglr sim-worker: a simulated SGLang server on the sglr runtime.
--
-- It speaks the parts of the SGLang HTTP API a router touches, models a KV
-- cache (a prefix tree over prompt text with a token budget and LRU
-- eviction) and a latency model (prefill per uncached token, decode per
-- output token), and injects faults on demand. Tokens are approximated as
-- 4 bytes of text, the usual ratio for English with BPE tokenizers.
--
-- Roles, for prefill/decode (PD) disaggregation: a router sends one request
-- body to a prefill and a decode worker at once, with bootstrap_host,
-- bootstrap_port and bootstrap_room spliced in (arrays, one room per element,
-- for a batch). A prefill worker records the rooms it is sent and, with
-- --bootstrap-port, answers on that port whether it has served a room; a
-- decode worker refuses a request without the fields and, as a KV transfer
-- would, asks the prefill named in them for each room before answering:
--
--   router --body+room R--> prefill  (records R: pending, then ready)
--   router --body+room R--> decode --GET /sim/room?room=R&wait_ms=T-->
--                                    prefill's bootstrap port: 200 | 404 | 410
--
-- Rooms go up to 2^63-1, past the integers a double holds, so they are read
-- as digit strings from the body text and never become Lua numbers.
--
-- Data parallelism: with --dp-size N the worker stands for N ranks, each
-- with its own KV cache (of --kv-tokens) and its own counters. A request
-- with "data_parallel_rank": r (what a dp-aware router splices in) is
-- served by rank r; one without goes to the ranks in turn, as SGLang's
-- data-parallel controller spreads them by default, so its prefix is
-- cached on whichever rank it landed on.
--
-- For tests, /sim/stats also shows the Authorization header of the last
-- request on each path and the last inference body as received.
local core = require "sglr.core"
local cjson = require "cjson.safe"
local argparse = require "argparse"
local simmodel = require "sglr.simmodel"

local M = {}

local BYTES_PER_TOKEN = simmodel.BYTES_PER_TOKEN
local floor, max, min, ceil = math.floor, math.max, math.min, math.ceil
local concat = table.concat
local byte, sub, find, fmt = string.byte, string.sub, string.find, string.format

local ROOMS_KEPT = 1000          -- rooms remembered (and listed on /sim/stats)
local MAX_ROOM = "9223372036854775807"   -- 2^63-1, the largest room
local MAX_ROOM_WAIT_MS = 30000   -- longest long-poll on the bootstrap port
local MAX_ROOM_WAITERS = 10000   -- long-polls in flight at once
local MAX_POOLS = 64             -- bootstrap servers a decode worker keeps connections to

local function parser()
  local p = argparse("sglr sim-worker", "Simulated SGLang worker for demos, tests and benchmarks.")
  p:option("--host", "Address to listen on.", "127.0.0.1")
  p:option("--port", "Port to listen on (0 picks a free one; printed on stdout).", "30001"):convert(tonumber)
  p:option("--id", "Name reported in responses (x-sim-worker header, meta_info.worker_id).")
  p:option("--model", "Model name reported by the worker.", "sim-model")
  simmodel.add_flags(p)
  p:option("--latency-ms", "Fixed extra latency before every inference response.", "0"):convert(tonumber)
  p:option("--fail-first", "Answer the first N inference requests with --fail-status.", "0"):convert(tonumber)
  p:option("--fail-rate", "Answer this fraction of inference requests with --fail-status.", "0"):convert(tonumber)
  p:option("--fail-status", "HTTP status of injected failures.", "500"):convert(tonumber)
  p:option("--reset-rate", "Drop this fraction of inference connections without answering.", "0"):convert(tonumber)
  p:option("--crash-after-tokens", "Drop the connection after N streamed tokens (0 = never).", "0"):convert(tonumber)
  p:flag("--hang", "Never answer inference requests (for timeout tests).")
  p:flag("--unhealthy", "Answer /health with 503.")
  p:option("--load-offset", "Added to the load reported on /get_load.", "0"):convert(tonumber)
  p:option("--seed", "Random seed for --fail-rate.", "1"):convert(tonumber)
  p:option("--role", "PD role: regular (no PD), prefill or decode.", "regular")
    :choices({ "regular", "prefill", "decode" })
  p:option("--bootstrap-port", "Prefill only: also serve the bootstrap endpoint on this port "
    .. "(0 picks a free one; printed on stdout).")
    :convert(tonumber)
  p:option("--bootstrap-timeout-ms", "Decode only: how long to wait for the prefill to have "
    .. "served a room before failing the request as a failed KV transfer.", "5000"):convert(tonumber)
  return p
end

-- cjson writes an empty table as {}: a field that must be a JSON array is
-- set to RAW_SLOT and its text spliced in after encoding.
local RAW_SLOT = "@@sim-raw-json@@"

local function encode(obj, raw)
  local s = cjson.encode(obj)
  if raw then
    local i, j = find(s, '"' .. RAW_SLOT .. '"', 1, true)
    if i then s = sub(s, 1, i - 1) .. raw .. sub(s, j + 1) end
  end
  return s
end

local function json_response(x, status, obj, extra, raw)
  local h = { ["content-type"] = "application/json" }
  if extra then for k, v in pairs(extra) do h[k] = v end end
  x:respond(status, h, encode(obj, raw))
end

-- fields: more members of the error object (e.g. the room a transfer failed on)
local function err(x, status, msg, id, fields)
  local e = { message = msg, type = "sim_error", code = status }
  if fields then for k, v in pairs(fields) do e[k] = v end end
  json_response(x, status, { error = e }, id and { ["x-sim-worker"] = id } or nil)
end

local function query_param(q, key)
  if not q then return nil end
  for k, v in q:gmatch("([^&=]+)=([^&]*)") do
    if k == key then return v end
  end
  return nil
end

local function rand_id()
  return core.random_id("")
end

local prompt_text = simmodel.prompt_text

-- PD request fields ----------------------------------------------------------

-- Offset just past the JSON string that opens at i.
local function skip_string(s, i)
  local j = i + 1
  while true do
    local k = find(s, '["\\]', j)
    if not k then return nil end
    if byte(s, k) == 34 then return k + 1 end
    j = k + 2
  end
end

-- Offset just past the JSON value that starts at i.
local function skip_value(s, i)
  local c = byte(s, i)
  if c == 34 then return skip_string(s, i) end
  if c ~= 123 and c ~= 91 then return find(s, "[%s,}%]]", i) or #s + 1 end
  local depth, j = 0, i
  while true do
    local k = find(s, '["{}%[%]]', j)
    if not k then return nil end
    local b = byte(s, k)
    if b == 34 then
      j = skip_string(s, k)
      if not j then return nil end
    else
      depth = depth + ((b == 123 or b == 91) and 1 or -1)
      j = k + 1
      if depth == 0 then return j end
    end
  end
end

-- Text of the value of top-level member `key` of the JSON object `s` (the
-- last one, as cjson keeps), or nil. `s` has already been decoded by cjson,
-- so it is well-formed; the scan only has to stay at depth 1.
local function raw_member(s, key)
  local i = find(s, "%S")
  if not i or byte(s, i) ~= 123 then return nil end
  local found
  i = i + 1
  while true do
    i = find(s, "[^%s,]", i)
    if not i or byte(s, i) ~= 34 then return found end
    local kend = skip_string(s, i)
    local colon = kend and find(s, "%S", kend)
    local v = colon and byte(s, colon) == 58 and find(s, "%S", colon + 1)
    local vend = v and skip_value(s, v)
    if not vend then return found end
    if sub(s, i + 1, kend - 2) == key then found = sub(s, v, vend - 1) end
    i = vend
  end
end

local function valid_room(d)
  return d and find(d, "^%d+$") and (d == "0" or byte(d, 1) ~= 48)
    and (#d < #MAX_ROOM or (#d == #MAX_ROOM and d <= MAX_ROOM)) and true or false
end

-- bootstrap_room's JSON text -> list of digit strings (one for a single
-- request), or nil.
local function parse_rooms(raw, n)
  if not n then return valid_room(raw) and { raw } or nil end
  local inner = raw:match("^%[(.*)%]$")
  if not inner then return nil end
  local rooms = {}
  if inner:find("%S") then
    for piece in (inner .. ","):gmatch("([^,]*),") do
      local d = piece:match("^%s*(%d+)%s*$")
      if not valid_room(d) then return nil end
      rooms[#rooms + 1] = d
    end
  end
  return rooms
end

-- How many requests a body carries, as a PD router counts them for the
-- bootstrap arrays (chat "n" > 1, a "prompt" or "text" list, "input_ids"
-- as a list of lists); nil for a single request.
-- The batch size of a request (nil: a single one), by the same shapes as
-- the router: generate "text" a list, or "input_ids" a list of lists;
-- completions "prompt" a list of strings or of id lists (a list of ids is
-- one tokenized prompt); chat "n" > 1.
local function batch_size(route, req)
  if route == "chat" then
    local n = req.n
    return type(n) == "number" and n > 1 and floor(n) or nil
  end
  if route == "generate" then
    if type(req.text) == "table" then return #req.text end
    local ids = req.input_ids
    if type(ids) == "table" and type(ids[1]) == "table" then return #ids end
    return nil
  end
  local p = req.prompt
  if type(p) == "table" and (type(p[1]) == "string" or type(p[1]) == "table") then return #p end
  return nil
end

local function valid_host(h)
  if type(h) ~= "string" or #h == 0 or #h > 255 then return false end
  if find(h, "[:%[%]]") then return find(h, "^%[[%x:%.]+%]$") ~= nil end
  return find(h, "^[%w%.%-_]+$") ~= nil
end

local function valid_port(p)
  return p == cjson.null or (type(p) == "number" and p == floor(p) and p >= 1 and p <= 65535)
end

-- The bootstrap fields of a request: nil when it has none, else a list of
-- { room = digits, host = string, port = number | nil }, one per element of
-- the batch; nil, reason when they are malformed.
local function bootstrap_items(route, req, body)
  local h, p, r = req.bootstrap_host, req.bootstrap_port, req.bootstrap_room
  if h == nil and p == nil and r == nil then return nil end
  if h == nil or p == nil or r == nil then
    return nil, "bootstrap_host, bootstrap_port and bootstrap_room must be sent together"
  end
  local n = batch_size(route, req)
  local what = n and ("arrays of the batch size (" .. n .. ")") or "scalars (not a batch)"
  local rooms = parse_rooms(raw_member(body, "bootstrap_room") or "", n)
  if not rooms or (n and #rooms ~= n) then
    return nil, "bootstrap_room must be an integer in [0, 2^63-1]; bootstrap fields must be " .. what
  end
  local hosts, ports = h, p
  if n then
    if type(h) ~= "table" or #h ~= n or type(p) ~= "table" or #p ~= n then
      return nil, "bootstrap_host and bootstrap_port must be " .. what
    end
  else
    hosts, ports = { h }, { p }
  end
  local items, seen = {}, {}
  for i, room in ipairs(rooms) do
    if seen[room] then return nil, "bootstrap_room " .. room .. " appears twice in the batch" end
    seen[room] = true
    if not valid_host(hosts[i]) then
      return nil, "bootstrap_host must be a host name or address (IPv6 in brackets), " .. what
    end
    if not valid_port(ports[i]) then
      return nil, "bootstrap_port must be a port number or null, " .. what
    end
    items[i] = { room = room, host = hosts[i], port = ports[i] ~= cjson.null and ports[i] or nil }
  end
  return items
end

-- meta_info.input_token_logprobs as JSON text: one [logprob, token_id, null]
-- per prompt token, made up from the token's 4 bytes of text.
local function input_logprobs_json(text, ptoks)
  local out = {}
  for i = 1, ptoks do
    local a, b, c, d = byte(text, i * BYTES_PER_TOKEN - 3, i * BYTES_PER_TOKEN)
    local id = (((a or 0) * 31 + (b or 0)) * 31 + (c or 0)) * 31 + (d or 0)
    id = id % 32000
    out[i] = fmt("[%.3f,%d,null]", -((id % 997) + 1) / 1000, id)
  end
  return "[" .. concat(out, ",") .. "]"
end

local function wants_logprobs(route, req)
  if route == "generate" then return req.return_logprob == true end
  if route == "completions" then
    local l = req.logprobs
    return l ~= nil and l ~= cjson.null and l ~= false
  end
  return false
end

function M.new(opts)
  local self = {
    opts = opts,
    id = opts.id,
    inflight = 0,
    served = 0,
    failures_left = opts.fail_first or 0,
    healthy = not opts.unhealthy,
    stats = { requests = 0, prompt_tokens = 0, cached_tokens = 0 },
    role = opts.role,
    rooms_total = 0,     -- rooms ever sent
    room_ring = {},      -- the last ROOMS_KEPT of them, slot (seq-1) % ROOMS_KEPT + 1
    room_state = {},     -- room -> { state = "pending"|"ready"|"failed", seq = latest }
    room_waiters = {},   -- room -> events of bootstrap long-polls for it
    nwaiters = 0,
    pools = {},          -- decode: "host:port" -> pool of a prefill's bootstrap port
    npools = 0,
    dp_size = max(1, floor(opts.dp_size or 1)),
    ranks = {},          -- [r + 1] = the model's rank: cache, batch, counters
    next_rank = 0,       -- the rank a request without data_parallel_rank goes to
    auth = {},           -- path -> Authorization of its last request ("" for none)
  }
  self.model = simmodel.new(opts)
  for r = 1, self.dp_size do self.ranks[r] = self.model:rank() end
  return setmetatable(self, { __index = M })
end

-- Rooms -------------------------------------------------------------------------

-- Record the rooms of a request as it arrives. A room stays "pending" until
-- the prefill got past its injected faults ("ready") or one of them hit
-- ("failed"), so that a fault on the prefill fails the transfer on the
-- decode, as a lost KV cache would.
function M:note_rooms(items, req)
  for _, it in ipairs(items) do
    local seq = self.rooms_total + 1
    self.rooms_total = seq
    local slot = (seq - 1) % ROOMS_KEPT + 1
    local old = self.room_ring[slot]
    if old then
      local e = self.room_state[old]
      if e and e.seq == seq - ROOMS_KEPT then self.room_state[old] = nil end
    end
    self.room_ring[slot] = it.room
    self.room_state[it.room] = { state = "pending", seq = seq }
  end
  self.last_bootstrap_host, self.last_bootstrap_port = req.bootstrap_host, req.bootstrap_port
end

function M:settle_rooms(items, state)
  if not items or self.role ~= "prefill" then return end
  for _, it in ipairs(items) do
    local e = self.room_state[it.room]
    if e then e.state = state end
    local waiters = self.room_waiters[it.room]
    if waiters then
      self.room_waiters[it.room] = nil
      for _, ev in ipairs(waiters) do ev:set(true) end
    end
  end
end

function M:rooms_json()
  local list = {}
  for seq = max(1, self.rooms_total - ROOMS_KEPT + 1), self.rooms_total do
    list[#list + 1] = '"' .. self.room_ring[(seq - 1) % ROOMS_KEPT + 1] .. '"'
  end
  return "[" .. concat(list, ",") .. "]"
end

-- The room's state once it is settled or wait_ms passed; nil when unknown.
function M:room_wait(room, wait_ms)
  local e = self.room_state[room]
  if (e and e.state ~= "pending") or wait_ms <= 0 then return e and e.state end
  local ev = core.event()
  local list = self.room_waiters[room]
  if not list then list = {}; self.room_waiters[room] = list end
  list[#list + 1] = ev
  self.nwaiters = self.nwaiters + 1
  ev:wait(wait_ms)
  self.nwaiters = self.nwaiters - 1
  if self.room_waiters[room] == list then
    for i = #list, 1, -1 do
      if list[i] == ev then table.remove(list, i) end
    end
    if #list == 0 then self.room_waiters[room] = nil end
  end
  e = self.room_state[room]
  return e and e.state
end

-- The prefill's bootstrap port: GET /sim/room?room=DIGITS[&wait_ms=N] waits
-- up to N ms (at most MAX_ROOM_WAIT_MS) for the room to settle and answers
-- 200 {"room", "state": "ready"}, 410 {"state": "failed"} or 404 {"state":
-- "pending" | "unknown"}; 503 {"state": "busy"} past MAX_ROOM_WAITERS.
function M:handle_bootstrap(x)
  local path, query = x:path()
  if path == "/health" then return x:respond(200, { ["content-type"] = "text/plain" }, "") end
  if path ~= "/sim/room" then return err(x, 404, "no route for " .. path .. " on the bootstrap port") end
  local room = query_param(query, "room")
  if not valid_room(room) then return err(x, 400, "room must be an integer in [0, 2^63-1]") end
  local wait = tonumber(query_param(query, "wait_ms") or "0")
  if not wait then return err(x, 400, "wait_ms must be a number") end
  wait = min(max(wait, 0), MAX_ROOM_WAIT_MS)
  if wait > 0 and self.nwaiters >= MAX_ROOM_WAITERS then
    return json_response(x, 503, { room = room, state = "busy" })
  end
  local state = self:room_wait(room, wait)
  local status = (state == "ready" and 200) or (state == "failed" and 410) or 404
  json_response(x, status, { room = room, state = state or "unknown" })
end

-- Decode: the pool for a prefill's bootstrap port, kept for the next rooms.
function M:bootstrap_pool(host, port)
  local key = host .. ":" .. port
  local pool = self.pools[key]
  if pool then return pool end
  local perr
  pool, perr = core.upstream("http://" .. key)
  if not pool then return nil, perr end
  if self.npools >= MAX_POOLS then self.pools, self.npools = {}, 0 end
  self.pools[key], self.npools = pool, self.npools + 1
  return pool
end

-- Decode: wait, like a KV transfer, until the prefill named in `it` has
-- served its room, or `deadline` passes. true | nil, reason
function M:await_room(it, deadline)
  local where = it.host .. ":" .. it.port
  local pool, perr = self:bootstrap_pool(it.host, it.port)
  if not pool then return nil, "bad bootstrap address " .. where .. ": " .. perr end
  while true do
    local left = ceil(deadline - core.now())
    if left <= 0 then
      return nil, fmt("the prefill at %s did not serve it within %d ms", where,
        self.opts.bootstrap_timeout_ms)
    end
    local wait = min(left, MAX_ROOM_WAIT_MS)
    local res, rerr = core.request(pool, { method = "GET",
      path = "/sim/room?room=" .. it.room .. "&wait_ms=" .. wait,
      connect_timeout_ms = left, timeout_ms = left + 2000, max_body = 64 * 1024 })
    if not res then
      return nil, fmt("the prefill's bootstrap server at %s is unreachable (%s)", where, rerr)
    end
    local ans = cjson.decode(res.body)
    local state = type(ans) == "table" and ans.room == it.room and ans.state
    if res.status == 200 and state == "ready" then return true end
    if res.status == 410 and state == "failed" then
      return nil, "the prefill at " .. where .. " failed the request"
    end
    if not state then
      return nil, fmt("%s is not a prefill bootstrap server (answered %d)", where, res.status)
    end
    if res.status ~= 404 then
      return nil, fmt("the bootstrap server at %s answered %d (%s)", where, res.status, state)
    end
    -- a 404 before the wait is over breaks the protocol: asking again
    -- would spin until the deadline
    if res.total_ms < wait - 1 then
      return nil, fmt("the bootstrap server at %s gave up before the wait was over", where)
    end
  end
end

-- Decode: every room of a request, within one --bootstrap-timeout-ms.
-- A null bootstrap_port skips the check, as SGLang's fake transfer backend
-- does. true | nil, reason, room
function M:await_transfer(items)
  local deadline = core.now() + self.opts.bootstrap_timeout_ms
  for _, it in ipairs(items) do
    if it.port then
      local ok, why = self:await_room(it, deadline)
      if not ok then return nil, why, it.room end
    end
  end
  return true
end

-- The rank that serves a request: its data_parallel_rank, else the next in
-- turn. -> rank number, rank table | nil, reason
function M:pick_rank(req)
  local r = req.data_parallel_rank
  if r == nil or r == cjson.null then
    r = self.next_rank
    self.next_rank = (r + 1) % self.dp_size
  elseif type(r) ~= "number" or r ~= floor(r) or r < 0 or r >= self.dp_size then
    return nil, fmt("data_parallel_rank must be an integer in [0, %d), got %s", self.dp_size,
      tostring(r))
  end
  return r, self.ranks[r + 1]
end

local output_text = simmodel.output_text

function M:inject_failure()
  if self.failures_left > 0 then
    self.failures_left = self.failures_left - 1
    return true
  end
  return self.opts.fail_rate > 0 and math.random() < self.opts.fail_rate
end

-- The PD part of a request, before it is served: true, its bootstrap rooms
-- (if any) when it may go on; nil when an error was answered.
function M:pd_check(x, route, req, body)
  if self.role == "regular" then return true end
  local items, why = bootstrap_items(route, req, body)
  if why then return nil, err(x, 400, why, self.id) end
  if not items and self.role == "decode" then
    return nil, err(x, 400, "a decode worker needs bootstrap_host, bootstrap_port and "
      .. "bootstrap_room (spliced in by a PD router)", self.id)
  end
  if items then self:note_rooms(items, req) end
  return true, items
end

function M:infer(x, route)
  local body = x:body()
  local req, perr = cjson.decode(body)
  if type(req) ~= "table" then
    return err(x, 400, "invalid JSON body: " .. tostring(perr))
  end
  self.stats.requests = self.stats.requests + 1
  self.last_body = body
  local rank_no, rank = self:pick_rank(req)
  if not rank_no then return err(x, 400, rank, self.id) end
  rank.requests = rank.requests + 1
  rank.inflight = rank.inflight + 1
  local ok, e = pcall(self.serve, self, x, route, req, body, rank_no, rank)
  rank.inflight = rank.inflight - 1
  if not ok then error(e, 0) end
end

function M:serve(x, route, req, body, rank_no, rank)
  local go, rooms = self:pd_check(x, route, req, body)
  if not go then return end
  if self.opts.hang then
    while not x:closed() do core.sleep(50) end
    return self:settle_rooms(rooms, "failed")
  end
  if self.opts.latency_ms > 0 then core.sleep(self.opts.latency_ms) end
  if self.opts.reset_rate and self.opts.reset_rate > 0 and math.random() < self.opts.reset_rate then
    self:settle_rooms(rooms, "failed")
    return x:abort()   -- drop the connection without an answer
  end
  if self:inject_failure() then
    self:settle_rooms(rooms, "failed")
    return err(x, self.opts.fail_status, "injected failure", self.id)
  end
  self:settle_rooms(rooms, "ready")
  if rooms and self.role == "decode" then
    local ok, why, room = self:await_transfer(rooms)
    if not ok then
      return err(x, 500, "KV transfer failed for bootstrap_room " .. room .. ": " .. why, self.id,
        { bootstrap_room = room })
    end
    if x:closed() then return end
  end
  -- continuous batching: wait for a slot in the rank's batch
  local model = self.model
  local ev = model:full(rank) and core.event() or nil
  if not model:admit(rank, ev) then
    ev:wait()
    if x:closed() then
      local nxt = model:release(rank)
      if nxt then nxt:set(true) end
      return
    end
  end
  local ok, e = pcall(self.respond, self, x, route, req, rank_no, rank)
  local nxt = model:release(rank)
  if nxt then nxt:set(true) end
  if not ok then error(e, 0) end
end

-- Serve an admitted request: the KV cache, then prefill and decode time.
function M:respond(x, route, req, rank_no, rank)
  local model = self.model
  local text = prompt_text(route, req)
  local ptoks, cached = model:touch_cache(text, rank)
  self.stats.prompt_tokens = self.stats.prompt_tokens + ptoks
  self.stats.cached_tokens = self.stats.cached_tokens + cached
  -- meta_info.input_token_logprobs (JSON text) in PD roles when asked for:
  -- the prefill's, and an empty list from the decode, which a router
  -- appends to the prefill's
  local itl
  if self.role ~= "regular" and wants_logprobs(route, req) then
    itl = self.role == "prefill" and input_logprobs_json(text, ptoks) or "[]"
  end
  local sp = req.sampling_params or {}
  local ntok = model:output_tokens(sp.max_new_tokens or req.max_tokens or req.max_completion_tokens)
  local prefill_ms = model:prefill_ms(ptoks, cached)
  local decode_ms = model:step_ms(rank.running)
  local started = core.now()
  local hdrs = { ["x-sim-worker"] = self.id, ["x-sim-request-id"] = x:header("x-request-id"),
    ["x-sim-dp-rank"] = tostring(rank_no) }
  if req.stream then
    if prefill_ms > 0 then core.sleep(prefill_ms) end
    return self:stream(x, route, req, ntok, ptoks, cached, decode_ms, hdrs, rank_no, itl)
  end
  local total = prefill_ms + ntok * decode_ms
  if total > 0 then core.sleep(total) end
  local out = output_text(ntok)
  local e2e = (core.now() - started) / 1000
  local id = rand_id()
  if route == "generate" then
    json_response(x, 200, {
      text = out,
      meta_info = {
        id = id, prompt_tokens = ptoks, completion_tokens = ntok, cached_tokens = cached,
        finish_reason = { type = "length", length = ntok }, e2e_latency = e2e,
        worker_id = self.id, dp_rank = rank_no, input_token_logprobs = itl and RAW_SLOT,
      },
    }, hdrs, itl)
  else
    local usage = {
      prompt_tokens = ptoks, completion_tokens = ntok, total_tokens = ptoks + ntok,
      prompt_tokens_details = { cached_tokens = cached },
    }
    local choice = route == "chat"
      and { index = 0, message = { role = "assistant", content = out }, finish_reason = "length" }
      or { index = 0, text = out, finish_reason = "length" }
    json_response(x, 200, {
      id = (route == "chat" and "chatcmpl-" or "cmpl-") .. id,
      object = route == "chat" and "chat.completion" or "text_completion",
      created = floor(core.wall()), model = req.model or self.opts.model,
      choices = { choice }, usage = usage, worker_id = self.id,
      meta_info = itl and { input_token_logprobs = RAW_SLOT },
    }, hdrs, itl)
  end
end

-- Stream ntok tokens, one SSE event each, paced at decode_ms per token.
-- Tokens that fall due within the same millisecond (libuv timers have 1 ms
-- resolution) go out in one write; events are formatted directly, since the
-- token text needs no JSON escaping, so the simulator's own CPU use stays
-- small next to what it simulates. itl: input_token_logprobs (JSON text)
-- to repeat in every event's meta_info, as SGLang does, or nil.
function M:stream(x, route, req, ntok, ptoks, cached, decode_ms, hdrs, rank, itl)
  hdrs["content-type"] = "text/event-stream"
  hdrs["cache-control"] = "no-cache"
  x:start(200, hdrs)
  local id = rand_id()
  local crash = self.opts.crash_after_tokens
  local model = cjson.encode(req.model or self.opts.model)
  local text, batch = {}, {}
  local start = core.now()
  local meta_tail = (',"cached_tokens":%d,"worker_id":%s%s%s}}'):format(cached, cjson.encode(self.id),
    rank and (',"dp_rank":' .. tonumber(rank)) or "", itl and (',"input_token_logprobs":' .. itl) or "")
  local oai_tail = itl and (',"meta_info":{"input_token_logprobs":' .. itl .. '}}\n\n') or "}\n\n"
  local i = 0
  while i < ntok do
    if decode_ms > 0 then
      local wait = start + (i + 1) * decode_ms - core.now()
      if wait >= 1 then core.sleep(wait) end
    end
    if x:closed() then return end
    -- every token due by now
    local due = decode_ms > 0 and math.min(ntok, floor((core.now() - start) / decode_ms)) or ntok
    if due <= i then due = i + 1 end
    local nb = 0
    while i < due do
      i = i + 1
      if crash > 0 and i > crash then
        if nb > 0 then x:write(concat(batch, "", 1, nb)) end
        x:abort()
        return
      end
      local piece = (i > 1 and " " or "") .. "tok" .. (i % 10)
      text[i] = piece
      local ev
      if route == "generate" then
        ev = ('data: {"text":"%s","meta_info":{"id":"%s","prompt_tokens":%d,"completion_tokens":%d%s\n\n')
          :format(concat(text, "", 1, i), id, ptoks, i, meta_tail)
      elseif route == "chat" then
        ev = ('data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","model":%s,'
          .. '"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\n\n'):format(id, model, piece)
      else
        ev = ('data: {"id":"cmpl-%s","object":"text_completion","model":%s,'
          .. '"choices":[{"index":0,"text":"%s","finish_reason":null}]%s'):format(id, model, piece, oai_tail)
      end
      nb = nb + 1
      batch[nb] = ev
    end
    x:write(concat(batch, "", 1, nb))
  end
  if route ~= "generate" then
    local final = {
      id = (route == "chat" and "chatcmpl-" or "cmpl-") .. id,
      object = route == "chat" and "chat.completion.chunk" or "text_completion",
      model = req.model or self.opts.model,
      choices = { { index = 0, delta = {}, text = "", finish_reason = "length" } },
      usage = { prompt_tokens = ptoks, completion_tokens = ntok, total_tokens = ptoks + ntok,
        prompt_tokens_details = { cached_tokens = cached } },
      meta_info = itl and { input_token_logprobs = RAW_SLOT },
    }
    x:write("data: " .. encode(final, itl) .. "\n\n")
  end
  x:write("data: [DONE]\n\n")
  x:finish()
end

-- /get_load: {"load": n}; with several ranks SGLang's list, one entry per
-- rank.
function M:load_json()
  local off = self.opts.load_offset
  if self.dp_size == 1 then
    return { load = self.inflight + off, worker_id = self.id }
  end
  local list = {}
  for r, rk in ipairs(self.ranks) do
    list[r] = { dp_rank = r - 1, load = rk.inflight + off, num_reqs = rk.inflight,
      num_waiting_reqs = 0, num_tokens = 0 }
  end
  return list
end

function M:ranks_view()
  local list = {}
  for r, rk in ipairs(self.ranks) do
    list[r] = { rank = r - 1, requests = rk.requests, prompt_tokens = rk.prompt_tokens,
      cached_tokens = rk.cached_tokens, inflight = rk.inflight }
  end
  return list
end

function M:handle(x)
  local path, query = x:path()
  local method = x:method()
  if path ~= "/sim/stats" and path ~= "/sim/set" then
    self.auth[path] = x:header("authorization") or ""
  end
  if path == "/health" or path == "/health_generate" then
    if not self.healthy then return err(x, 503, "unhealthy") end
    return x:respond(200, { ["content-type"] = "text/plain" }, "")
  elseif path == "/liveness" or path == "/readiness" then
    return x:respond(200, { ["content-type"] = "text/plain" }, "")
  elseif path == "/get_server_info" then
    return json_response(x, 200, { model_path = self.opts.model, dp_size = self.opts.dp_size,
      worker_id = self.id, version = "sim" })
  elseif path == "/get_model_info" then
    return json_response(x, 200, { model_path = self.opts.model, is_generation = true,
      worker_id = self.id })
  elseif path == "/v1/models" then
    return json_response(x, 200, { object = "list", data = { { id = self.opts.model,
      object = "model", owned_by = "sglr-sim", root = self.opts.model } } })
  elseif path == "/get_load" then
    return json_response(x, 200, self:load_json())
  elseif path == "/flush_cache" then
    if method ~= "POST" and method ~= "GET" then return err(x, 405, "use POST") end
    for _, rk in ipairs(self.ranks) do self.model:flush(rk) end
    return x:respond(200, { ["content-type"] = "text/plain" }, "Cache flushed.\n")
  elseif path == "/sim/stats" then
    return json_response(x, 200, { id = self.id, served = self.served, inflight = self.inflight,
      requests = self.stats.requests, prompt_tokens = self.stats.prompt_tokens,
      cached_tokens = self.stats.cached_tokens, healthy = self.healthy,
      role = self.role, bootstrap_port = self.bootstrap and self.bootstrap:port() or cjson.null,
      rooms = RAW_SLOT, rooms_total = self.rooms_total, room_waiters = self.nwaiters,
      last_bootstrap_host = self.last_bootstrap_host, last_bootstrap_port = self.last_bootstrap_port,
      dp_size = self.dp_size, ranks = self:ranks_view(), auth = self.auth,
      last_body = self.last_body,
    }, nil, self:rooms_json())
  elseif path == "/sim/set" then
    -- runtime fault switches for tests: /sim/set?healthy=0&fail_rate=1&fail_first=3
    local h = query_param(query, "healthy")
    if h then self.healthy = h == "1" or h == "true" end
    for _, key in ipairs({ "fail_rate", "fail_status", "latency_ms", "load_offset", "reset_rate",
                           "decode_ms_per_token", "crash_after_tokens" }) do
      local v = tonumber(query_param(query, key))
      if v then self.opts[key] = v end
    end
    local ff = tonumber(query_param(query, "fail_first"))
    if ff then self.failures_left = ff end
    return json_response(x, 200, { ok = true })
  end
  local route = (path == "/generate" and "generate") or (path == "/v1/chat/completions" and "chat")
    or (path == "/v1/completions" and "completions")
  if not route then return err(x, 404, "no route for " .. path) end
  if method ~= "POST" then return err(x, 405, "use POST") end
  self.inflight = self.inflight + 1
  local ok, e = pcall(self.infer, self, x, route)
  self.inflight = self.inflight - 1
  self.served = self.served + 1
  if not ok then error(e, 0) end
end

function M.main(args)
  local p = parser()
  local ok, opts = p:pparse(args)
  if not ok then
    io.stderr:write(p:get_usage(), "\nerror: ", opts, "\n")
    return core.exit(2)
  end
  if opts.bootstrap_port and opts.role ~= "prefill" then
    io.stderr:write(p:get_usage(), "\nerror: --bootstrap-port needs --role prefill\n")
    return core.exit(2)
  end
  math.randomseed(opts.seed)
  local sim = M.new(opts)
  local srv, lerr = core.listen(opts.host, opts.port, { max_body = 1024 * 1024 * 1024 }, function(x)
    local okh, e = pcall(sim.handle, sim, x)
    if not okh then
      io.stderr:write("sim-worker: ", tostring(e), "\n")
      if x:state() == "handling" then err(x, 500, "sim-worker error") end
    end
  end)
  if not srv then
    io.stderr:write("sglr sim-worker: ", lerr, "\n")
    return core.exit(1)
  end
  sim.server = srv
  sim.id = sim.id or ("sim-" .. srv:port())
  local out = { fmt("sim-worker %s listening on http://%s:%d\n", sim.id, opts.host, srv:port()) }
  if opts.bootstrap_port then
    local bsrv, berr = core.listen(opts.host, opts.bootstrap_port, { max_body = 64 * 1024 }, function(x)
      local okh, e = pcall(sim.handle_bootstrap, sim, x)
      if not okh then
        io.stderr:write("sim-worker bootstrap: ", tostring(e), "\n")
        if x:state() == "handling" then err(x, 500, "sim-worker error") end
      end
    end)
    if not bsrv then
      io.stderr:write("sglr sim-worker: bootstrap port: ", berr, "\n")
      return core.exit(1)
    end
    sim.bootstrap = bsrv
    out[2] = fmt("sim-worker %s bootstrap on http://%s:%d\n", sim.id, opts.host, bsrv:port())
  end
  -- one write, so a reader that has the first line has the second
  io.stdout:write(concat(out))
  io.stdout:flush()
  core.on_signal(function()
    srv:close()
    if sim.bootstrap then sim.bootstrap:close() end
    core.exit(0)
  end)
  M.current = sim
end

return M

-- sglr sim-worker: a simulated SGLang server on the sglr runtime.
--
-- It speaks the parts of the SGLang HTTP API a router touches, models a KV
-- cache (a prefix tree over prompt text with a token budget and LRU
-- eviction) and a latency model (prefill per uncached token, decode per
-- output token), and injects faults on demand. Tokens are approximated as
-- 4 bytes of text, the usual ratio for English with BPE tokenizers.
local core = require "sglr.core"
local cjson = require "cjson.safe"
local argparse = require "argparse"

local M = {}

local BYTES_PER_TOKEN = 4
local floor, max, min, ceil = math.floor, math.max, math.min, math.ceil
local concat = table.concat

local function parser()
  local p = argparse("sglr sim-worker", "Simulated SGLang worker for demos, tests and benchmarks.")
  p:option("--host", "Address to listen on.", "127.0.0.1")
  p:option("--port", "Port to listen on (0 picks a free one; printed on stdout).", "30001"):convert(tonumber)
  p:option("--id", "Name reported in responses (x-sim-worker header, meta_info.worker_id).")
  p:option("--model", "Model name reported by the worker.", "sim-model")
  p:option("--kv-tokens", "KV cache capacity in tokens.", "1000000"):convert(tonumber)
  p:option("--prefill-us-per-token", "Prefill time per uncached prompt token (microseconds).", "0"):convert(tonumber)
  p:option("--decode-ms-per-token", "Decode time per output token (milliseconds).", "0"):convert(tonumber)
  p:option("--max-new-tokens", "Output tokens when the request does not say.", "16"):convert(tonumber)
  p:option("--latency-ms", "Fixed extra latency before every inference response.", "0"):convert(tonumber)
  p:option("--fail-first", "Answer the first N inference requests with --fail-status.", "0"):convert(tonumber)
  p:option("--fail-rate", "Answer this fraction of inference requests with --fail-status.", "0"):convert(tonumber)
  p:option("--fail-status", "HTTP status of injected failures.", "500"):convert(tonumber)
  p:option("--reset-rate", "Drop this fraction of inference connections without answering.", "0"):convert(tonumber)
  p:option("--crash-after-tokens", "Drop the connection after N streamed tokens (0 = never).", "0"):convert(tonumber)
  p:flag("--hang", "Never answer inference requests (for timeout tests).")
  p:flag("--unhealthy", "Answer /health with 503.")
  p:option("--dp-size", "Data-parallel size reported in /get_server_info.", "1"):convert(tonumber)
  p:option("--load-offset", "Added to the load reported on /get_load.", "0"):convert(tonumber)
  p:option("--seed", "Random seed for --fail-rate.", "1"):convert(tonumber)
  return p
end

local function json_response(x, status, obj, extra)
  local h = { ["content-type"] = "application/json" }
  if extra then for k, v in pairs(extra) do h[k] = v end end
  x:respond(status, h, cjson.encode(obj))
end

local function err(x, status, msg, id)
  json_response(x, status, { error = { message = msg, type = "sim_error", code = status } },
    id and { ["x-sim-worker"] = id } or nil)
end

local function rand_id()
  return core.random_id("")
end

-- Text of a request, as the worker would tokenize it.
local function prompt_text(route, req)
  if route == "generate" then
    local t = req.text or req.prompt
    if type(t) == "table" then return concat(t, " ") end
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
    if type(p) == "table" then return concat(p, " ") end
    return type(p) == "string" and p or ""
  end
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
  }
  local ok, radix = pcall(require, "sglr.radix")
  if ok then self.cache = radix.new() end
  return setmetatable(self, { __index = M })
end

-- Look the prompt up in the KV cache, then insert it (as a worker does after
-- prefill) and evict down to the budget. Returns prompt and cached tokens.
function M:touch_cache(text)
  local ptoks = ceil(#text / BYTES_PER_TOKEN)
  if not self.cache or #text == 0 then return ptoks, 0 end
  local matched = self.cache:match(text)
  self.cache:insert(text, "self")
  local budget = self.opts.kv_tokens * BYTES_PER_TOKEN
  if self.cache:size("self") > budget then self.cache:evict(budget) end
  local cached = floor(matched / BYTES_PER_TOKEN)
  return ptoks, min(cached, ptoks)
end

local function output_text(n)
  local words = {}
  for i = 1, n do words[i] = "tok" .. (i % 10) end
  return concat(words, " ")
end

function M:inject_failure()
  if self.failures_left > 0 then
    self.failures_left = self.failures_left - 1
    return true
  end
  return self.opts.fail_rate > 0 and math.random() < self.opts.fail_rate
end

function M:infer(x, route)
  local body = x:body()
  local req, perr = cjson.decode(body)
  if type(req) ~= "table" then
    return err(x, 400, "invalid JSON body: " .. tostring(perr))
  end
  self.stats.requests = self.stats.requests + 1
  if self.opts.hang then
    while not x:closed() do core.sleep(50) end
    return
  end
  if self.opts.latency_ms > 0 then core.sleep(self.opts.latency_ms) end
  if self.opts.reset_rate and self.opts.reset_rate > 0 and math.random() < self.opts.reset_rate then
    return x:abort()   -- drop the connection without an answer
  end
  if self:inject_failure() then
    return err(x, self.opts.fail_status, "injected failure", self.id)
  end
  local text = prompt_text(route, req)
  local ptoks, cached = self:touch_cache(text)
  self.stats.prompt_tokens = self.stats.prompt_tokens + ptoks
  self.stats.cached_tokens = self.stats.cached_tokens + cached
  local sp = req.sampling_params or {}
  local ntok = tonumber(sp.max_new_tokens or req.max_tokens or req.max_completion_tokens)
    or self.opts.max_new_tokens
  ntok = max(0, floor(ntok))
  local prefill_ms = (ptoks - cached) * self.opts.prefill_us_per_token / 1000
  local decode_ms = self.opts.decode_ms_per_token
  local started = core.now()
  local hdrs = { ["x-sim-worker"] = self.id, ["x-sim-request-id"] = x:header("x-request-id") }
  local rank = req.data_parallel_rank
  if req.stream then
    if prefill_ms > 0 then core.sleep(prefill_ms) end
    return self:stream(x, route, req, ntok, ptoks, cached, decode_ms, hdrs, rank)
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
        worker_id = self.id, dp_rank = rank,
      },
    }, hdrs)
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
    }, hdrs)
  end
end

-- Stream ntok tokens, one SSE event each, paced at decode_ms per token.
-- Tokens that fall due within the same millisecond (libuv timers have 1 ms
-- resolution) go out in one write; events are formatted directly, since the
-- token text needs no JSON escaping, so the simulator's own CPU use stays
-- small next to what it simulates.
function M:stream(x, route, req, ntok, ptoks, cached, decode_ms, hdrs, rank)
  hdrs["content-type"] = "text/event-stream"
  hdrs["cache-control"] = "no-cache"
  x:start(200, hdrs)
  local id = rand_id()
  local crash = self.opts.crash_after_tokens
  local model = cjson.encode(req.model or self.opts.model)
  local text, batch = {}, {}
  local start = core.now()
  local meta_tail = (',"cached_tokens":%d,"worker_id":%s%s}}'):format(cached, cjson.encode(self.id),
    rank and (',"dp_rank":' .. tonumber(rank)) or "")
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
          .. '"choices":[{"index":0,"text":"%s","finish_reason":null}]}\n\n'):format(id, model, piece)
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
    }
    x:write("data: " .. cjson.encode(final) .. "\n\n")
  end
  x:write("data: [DONE]\n\n")
  x:finish()
end

local function query_param(q, key)
  if not q then return nil end
  for k, v in q:gmatch("([^&=]+)=([^&]*)") do
    if k == key then return v end
  end
  return nil
end

function M:handle(x)
  local path, query = x:path()
  local method = x:method()
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
    return json_response(x, 200, { load = self.inflight + self.opts.load_offset,
      worker_id = self.id })
  elseif path == "/flush_cache" then
    if method ~= "POST" and method ~= "GET" then return err(x, 405, "use POST") end
    if self.cache then self.cache:close(); self.cache = require("sglr.radix").new() end
    return x:respond(200, { ["content-type"] = "text/plain" }, "Cache flushed.\n")
  elseif path == "/sim/stats" then
    return json_response(x, 200, { id = self.id, served = self.served, inflight = self.inflight,
      requests = self.stats.requests, prompt_tokens = self.stats.prompt_tokens,
      cached_tokens = self.stats.cached_tokens, healthy = self.healthy })
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
  io.stdout:write(string.format("sim-worker %s listening on http://%s:%d\n", sim.id, opts.host, srv:port()))
  io.stdout:flush()
  core.on_signal(function()
    srv:close()
    core.exit(0)
  end)
  M.current = sim
end

return M

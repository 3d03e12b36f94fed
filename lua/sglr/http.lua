-- Control-plane HTTP client used by health checks, load polls, fan-outs,
-- policies (rt.http) and the Kubernetes API. It runs on libcurl's multi
-- interface (sglr.httpc), which also speaks https; the native proxy client
-- is the fallback for a build without it.
--   request{ method=, url=, headers=, body=, timeout_ms=, connect_timeout_ms=,
--            ca_file=, ca_data=, cert_file=, key_file=, cert_data=, key_data=,
--            bearer_token=, insecure=, on_chunk= } -> status, body, headers | nil, err
--   start{ same } -> req (req:wait(), req:cancel(), req:done()) | nil, err
--   lines(on_line [, max_line]) -> on_chunk that calls on_line(line) per line
--   worker{ ... }: request{...} to a worker: it carries the router's
--     --api-key (set_api_key) as "Authorization: Bearer KEY"
local core = require "sglr.core"

local find, sub, byte = string.find, string.sub, string.byte
local concat = table.concat

local M = {}

local ok_httpc, httpc = pcall(require, "sglr.httpc")
local pools = setmetatable({}, { __mode = "v" })

local function native(opts)
  local base, path = opts.url:match("^(https?://[^/]+)(.*)$")
  if not base then return nil, "invalid URL " .. tostring(opts.url) end
  local pool = pools[base]
  if not pool then
    local err
    pool, err = core.upstream(base)
    if not pool then return nil, err end
    pools[base] = pool
  end
  local res, err = core.request(pool, {
    method = opts.method or "GET", path = path ~= "" and path or "/",
    headers = opts.headers, body = opts.body,
    timeout_ms = opts.timeout_ms or 5000,
    connect_timeout_ms = opts.connect_timeout_ms or opts.timeout_ms or 5000,
  })
  if not res then return nil, err end
  return res.status, res.body, res.headers
end

function M.request(opts)
  if ok_httpc and not opts.native then
    return httpc.request(opts)
  end
  return native(opts)
end

-- A request that runs while the caller goes on, for a body that arrives
-- over minutes (a watch): the caller keeps req to cancel it or wait for its
-- end. A req that is collected while it runs cancels it. on_chunk(chunk,
-- status) is a plain call from the loop: it cannot wait (core.spawn what
-- must), and an error in it ends the request with that error.
function M.start(opts)
  if not ok_httpc then return nil, "this build has no streaming HTTP client (libcurl)" end
  return httpc.start(opts)
end

-- An on_chunk that splits a body arriving in pieces into lines, as the
-- newline-delimited JSON of a Kubernetes watch: on_line(line) for every
-- complete line ("\n" or "\r\n" ends one, and is not part of it; empty
-- lines are passed too). Calling the returned function with nil (at the end
-- of the body) hands over a last line that had no newline. A line longer
-- than max_line bytes (default 16 MiB) raises, which ends the request.
function M.lines(on_line, max_line)
  max_line = max_line or 16 * 1024 * 1024
  local parts, n, held = {}, 0, 0     -- pieces of a line not ended yet
  local function take(last)
    local line
    if n == 0 then
      line = last
    else
      parts[n + 1] = last
      line = concat(parts, "", 1, n + 1)
      for i = n + 1, 1, -1 do parts[i] = nil end
      n, held = 0, 0
    end
    if byte(line, -1) == 13 then line = sub(line, 1, -2) end
    return line
  end
  return function(chunk)
    if chunk == nil then
      if n > 0 then on_line(take("")) end
      return
    end
    local pos = 1
    while true do
      local nl = find(chunk, "\n", pos, true)
      if not nl then break end
      if held + nl - pos > max_line then error("line longer than " .. max_line .. " bytes", 0) end
      on_line(take(sub(chunk, pos, nl - 1)))
      pos = nl + 1
    end
    if pos <= #chunk then
      held = held + #chunk - pos + 1
      if held > max_line then error("line longer than " .. max_line .. " bytes", 0) end
      n = n + 1
      parts[n] = sub(chunk, pos)
    end
  end
end

-- "Bearer KEY" for every request to a worker, or nil (--api-key unset)
local worker_auth

function M.set_api_key(key)
  worker_auth = key and ("Bearer " .. key) or nil
end

function M.worker_auth() return worker_auth end

local function with_auth(opts)
  if not worker_auth then return opts end
  local h = { authorization = worker_auth }
  for k, v in pairs(opts.headers or {}) do
    if k:lower() ~= "authorization" then h[k] = v end
  end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.headers = h
  return o
end

function M.worker(opts)
  return M.request(with_auth(opts))
end

-- start{...} to a worker (with --api-key): a request its caller can cancel
function M.worker_start(opts)
  return M.start(with_auth(opts))
end

M.has_curl = ok_httpc

return M

-- Control-plane HTTP client used by health checks, load polls, fan-outs and
-- policies (rt.http). It runs on libcurl's multi interface (sglr.httpc),
-- which also speaks https; the native proxy client is the fallback for a
-- build without it.
--   request{ method=, url=, headers=, body=, timeout_ms= } -> status, body, headers | nil, err
--   worker{ ... }: the same, for a request to a worker: it carries the
--     router's --api-key (set_api_key) as "Authorization: Bearer KEY"
local core = require "sglr.core"

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

-- "Bearer KEY" for every request to a worker, or nil (--api-key unset)
local worker_auth

function M.set_api_key(key)
  worker_auth = key and ("Bearer " .. key) or nil
end

function M.worker_auth() return worker_auth end

function M.worker(opts)
  if worker_auth then
    local h = { authorization = worker_auth }
    for k, v in pairs(opts.headers or {}) do
      if k:lower() ~= "authorization" then h[k] = v end
    end
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.headers = h
    opts = o
  end
  return M.request(opts)
end

M.has_curl = ok_httpc

return M

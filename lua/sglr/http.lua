-- Control-plane HTTP client used by health checks, load polls, fan-outs and
-- policies (rt.http). It runs on libcurl's multi interface (sglr.httpc),
-- which also speaks https; the native proxy client is the fallback for a
-- build without it.
--   request{ method=, url=, headers=, body=, timeout_ms= } -> status, body, headers | nil, err
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

M.has_curl = ok_httpc

return M

-- Logging: human-readable lines on stderr or JSON lines (--log-json), and
-- optionally daily files in --log-dir (sglr.log.YYYY-MM-DD). File writes go
-- through libuv's thread pool (luv fs calls with callbacks), so a slow disk
-- never blocks the loop; lines queue in memory meanwhile (bounded).
local core = require "sglr.core"

local M = {}

local LEVELS = { debug = 0, info = 1, warn = 2, warning = 2, error = 3, critical = 3 }
local NAMES = { [0] = "debug", "info", "warn", "error" }
local level = 1
local json_mode = false
local cjson
local dir, file_day, fd, opening
local queue, queued_bytes, writing = {}, 0, false
local MAX_QUEUE = 8 * 1024 * 1024
local dropped = 0

function M.configure(opts)
  level = LEVELS[opts.log_level or "info"] or 1
  core.set_log_level(level)
  json_mode = opts.log_json and true or false
  if json_mode then cjson = require "cjson" end
  dir = opts.log_dir
  if dir then
    local uv = require "luv"
    uv.fs_mkdir(dir, tonumber("755", 8))
  end
end

function M.enabled(lvl) return (LEVELS[lvl] or 1) >= level end

local function flush_file()
  if writing or #queue == 0 or not fd then return end
  writing = true
  local data = table.concat(queue)
  queue, queued_bytes = {}, 0
  local uv = require "luv"
  uv.fs_write(fd, data, -1, function()
    writing = false
    flush_file()
  end)
end

local function to_file(line)
  local day = os.date("!%Y-%m-%d")
  if queued_bytes + #line > MAX_QUEUE then
    dropped = dropped + 1
    return
  end
  queue[#queue + 1] = line
  queued_bytes = queued_bytes + #line
  if day ~= file_day and not opening then
    opening = true
    local uv = require "luv"
    local old = fd
    uv.fs_open(dir .. "/sglr.log." .. day, "a", tonumber("644", 8), function(err, newfd)
      opening = false
      if newfd then
        fd, file_day = newfd, day
        if old then uv.fs_close(old, function() end) end
      else
        io.stderr:write("sglr: cannot open log file in ", dir, ": ", tostring(err), "\n")
        dir = nil
      end
      flush_file()
    end)
    return
  end
  flush_file()
end

-- A field value for a text line: as it is when it has no space, quote, '=',
-- backslash or control byte; else quoted with those escaped, so a value a
-- client chose (a request id, a path) cannot forge fields or lines.
local ESC = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
local function text_value(v)
  local s = tostring(v)
  if not s:find('[%s="\\%c]') and s ~= "" then return s end
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESC[c] or ("\\x%02x"):format(c:byte())
  end) .. '"'
end
M.text_value = text_value

-- log(level, msg [, fields]): fields is a flat table added to JSON lines and
-- appended as key=value pairs to text lines.
function M.log(lvl, msg, fields)
  local n = LEVELS[lvl] or 1
  if n < level then return end
  local line
  local wall = core.wall()
  local ts = os.date("!%Y-%m-%dT%H:%M:%S", math.floor(wall)) .. (".%03dZ"):format(math.floor(wall % 1 * 1000))
  if json_mode then
    local rec = { ts = ts, level = NAMES[n], msg = msg }
    if fields then for k, v in pairs(fields) do rec[k] = v end end
    line = cjson.encode(rec) .. "\n"
  else
    local parts = { ts, " ", string.format("%-5s", NAMES[n]), " ", msg }
    if fields then
      local keys = {}
      for k in pairs(fields) do keys[#keys + 1] = k end
      table.sort(keys)
      for _, k in ipairs(keys) do
        parts[#parts + 1] = " " .. k .. "=" .. text_value(fields[k])
      end
    end
    parts[#parts + 1] = "\n"
    line = table.concat(parts)
  end
  core.log_flush()     -- request lines queued in C go first
  io.stderr:write(line)
  if dir then to_file(line) end
end

-- The access line of an inference request (flow.lua): what
-- log.fields("info", "request", "duration_ms", dur, "error", err, "prefill",
-- prefill, "request_id", rid, "retries", retries, "route", route, "status",
-- x's status, "stream", stream, "worker", worker) writes (rid nil: the id
-- x keeps, x:request_id()). A text line to
-- stderr is formatted in C in one FFI call (sglr_log_access), not one Lua C
-- call per argument; JSON lines, --log-dir and any value of another type
-- take the general path.
local access_c = false
do
  local ok, ffi = pcall(require, "ffi")
  if ok and pcall(ffi.cdef, [[
      int sglr_log_access(void *x, double dur, const char *err, size_t errl, const char *prefill,
                          size_t pl, const char *rid, size_t ridl, double retries, const char *route,
                          size_t routel, int stream, const char *worker, size_t wl);
    ]]) and pcall(function() return ffi.C.sglr_log_access end) then
    access_c = ffi.C.sglr_log_access
  end
end

function M.access(x, dur, err, prefill, rid, retries, route, stream, worker)
  if level > 1 then return end
  if access_c and not json_mode and not dir and type(x) == "userdata" and type(dur) == "number"
      and (err == nil or type(err) == "string") and (prefill == nil or type(prefill) == "string")
      and (rid == nil or type(rid) == "string") and type(retries) == "number" and type(route) == "string"
      and type(worker) == "string"
      and access_c(x, dur, err, err and #err or 0, prefill, prefill and #prefill or 0, rid, rid and #rid or 0,
        retries, route, #route, stream and 1 or 0, worker, #worker) >= 0 then
    return
  end
  if rid == nil then rid = x:request_id() or "" end
  M.fields("info", "request", "duration_ms", dur, "error", err, "prefill", prefill, "request_id", rid,
    "retries", retries, "route", route, "status", x:status(), "stream", stream and true or false,
    "worker", worker)
end

-- log.fields(level, msg, k1, v1, k2, v2, ...): the line log.log(level, msg,
-- { k1 = v1, ... }) prints, for the request path: keys given in sorted
-- order, a nil value left out. A text line is formatted and queued in C
-- (written once per loop turn) with no table or string built here.
function M.fields(lvl, msg, ...)
  local n = LEVELS[lvl] or 1
  if n < level then return end
  if json_mode then
    local f = {}
    for i = 1, select("#", ...), 2 do
      local k, v = select(i, ...)
      f[k] = v
    end
    return M.log(lvl, msg, f)
  end
  if dir then
    to_file(core.log_line(NAMES[n], msg, 1, ...))
  else
    core.log_line(NAMES[n], msg, 0, ...)
  end
end

-- Startup and shutdown lines: printed whatever the level, tagged info.
function M.always(msg, f)
  local saved = level
  level = 0
  M.log("info", msg, f)
  level = saved
end

function M.debug(msg, f) M.log("debug", msg, f) end
function M.info(msg, f) M.log("info", msg, f) end
function M.warn(msg, f) M.log("warn", msg, f) end
function M.error(msg, f) M.log("error", msg, f) end

return M

-- sglr.cli: command line of `sglr run` (the router) and validation of the
-- resulting configuration.
--
-- Flag names and defaults follow `python -m sglang_router.launch_router` so
-- an operator can swap one router for the other without touching scripts.
--
-- Every flag is one row of FLAGS below: name, kind, default, description.
-- The argparse parser, the --help text, the defaults and the validation are
-- all derived from that table, so adding a flag is adding one row.
--
-- argparse only splits words here. Conversion and range checks are ours,
-- because argparse's own messages do not say which flag was wrong and its
-- help/error paths print and call os.exit (a caller of parse_run prints the
-- message and exits itself).
--
--   local conf, err = cli.parse_run(args)   -- conf table | nil, message
--   local _, text, what = cli.parse_run({ "--help" })  -- nil, help, "help"
--   local _, text, what = cli.parse_run({ "--version" })  -- nil, "sglr 0.1.0", "version"
--
-- Secrets can come from the environment instead of the command line, so
-- they stay out of `ps`: a flag in FLAGS with env = "NAME" takes $NAME
-- when it is not given (an empty variable counts as unset).

local argparse = require "argparse"

local type, tostring, tonumber, ipairs, next = type, tostring, tonumber, ipairs, next
local unpack = unpack or table.unpack
local floor, huge = math.floor, math.huge
local concat = table.concat
local fmt = string.format

local M = {}

local PROG = "sglr run"

-- Built-in policy names (policies/NAME.lua, embedded into the binary).
M.POLICIES = { "random", "round_robin", "cache_aware", "power_of_two" }

M.DEFAULT_REQUEST_ID_HEADERS = { "x-request-id", "x-correlation-id", "x-trace-id", "request-id" }

-- The SGLang-named flags that are aliases of policy options: those given on
-- the command line are copied into conf.policy_options, and a policy takes
-- the ones its schema declares (see sglr.policy.options; --policy-opt
-- names options the policy must declare).
M.POLICY_OPTION_KEYS = {
  "cache_threshold", "balance_abs_threshold", "balance_rel_threshold",
  "eviction_interval", "max_tree_size", "cache_routing_prob",
}

local LOG_LEVELS = { debug = "debug", info = "info", warn = "warn", warning = "warn",
                     error = "error", critical = "error" }

--------------------------------------------------------------------------------
-- Flags. Kinds:
--   flag      boolean switch, default false
--   string    one word                      (nonempty)
--   int       one integer                   (min/max inclusive)
--   number    one number                    (min/max, gt = exclusive lower bound)
--   port      one integer in 1..65535       (zero = true also allows 0)
--   size      bytes, optional suffix K/M/G (KB/KiB...: all powers of 1024)
--   level     log level
--   policy    builtin policy name or path to a .lua file
--   urls      zero or more worker URLs, also comma separated; repeatable
--   words     zero or more words, also comma separated; repeatable
--   selector  zero or more key=value words -> map; repeatable
--   opts      policy options, key=value words -> map (values as text); repeatable
--   prefill   URL [BOOTSTRAP_PORT|none]; repeatable -> {url=, bootstrap_port=}
--   decode    URL; repeatable -> array of URLs
--------------------------------------------------------------------------------

local FLAGS = {
  { group = "Router" },
  { "--host", "string", "127.0.0.1", "Router server host address", arg = "<host>" },
  { "--port", "port", 30000, "Router server port (0 picks a free port)", zero = true },
  { "--worker-urls", "urls", {}, "Worker URLs for separate launch mode (space or comma separated)" },
  { "--policy", "policy", "cache_aware",
    "Routing policy: random, round_robin, cache_aware, power_of_two, or a path to a .lua file" },
  { "--policy-opt", "opts", {},
    "Option of the policy, key=value (repeatable; 'sglr run --policy P --help' lists them)" },
  { "--max-payload-size", "size", 268435456,
    "Maximum request body in bytes (suffixes K, M, G accepted: 256MB = 268435456)" },
  { "--request-timeout-secs", "number", 600, "Request timeout in seconds", gt = 0 },
  { "--shutdown-grace-secs", "number", 30,
    "Seconds to let in-flight requests finish after SIGINT/SIGTERM", min = 0 },
  { "--connect-timeout-ms", "int", 5000, "Timeout for connecting to a worker, in milliseconds", min = 1 },

  { group = "Client connections" },
  { "--client-header-timeout-secs", "number", 30,
    "A request's line and headers must arrive within this many seconds (else 408 and close; 0: no limit)",
    min = 0 },
  { "--client-body-timeout-secs", "number", 60,
    "A request body may stall this long between reads (else 408 and close; 0: no limit)", min = 0 },
  { "--keepalive-timeout-secs", "number", 75,
    "An idle keep-alive connection is closed after this many seconds (0: never)", min = 0 },
  { "--client-write-timeout-secs", "number", 60,
    "A client that takes none of its response for this long is cut off, freeing its request (0: never)",
    min = 0 },
  { "--max-connections", "int", nil,
    "Client connections served at once; above it a new one gets 503 and is closed "
    .. "(default: half the open-file limit; 0: no cap)", min = 0, arg = "<n>" },
  { "--lua-path", "string", nil,
    "Extra Lua search directory (';' separated); its files override the embedded scripts",
    arg = "<dir>" },

  { group = "Cache-aware routing" },
  { "--cache-threshold", "number", 0.5,
    "Minimum prefix match ratio for cache routing (0.0-1.0)", min = 0, max = 1 },
  { "--cache-routing-prob", "number", 1.0,
    "Probability of cache-aware routing rather than shortest queue (0.0-1.0)", min = 0, max = 1,
    show = "1.0" },
  { "--balance-abs-threshold", "int", 32, "Absolute load difference threshold", min = 0 },
  { "--balance-rel-threshold", "number", 1.0001, "Relative load ratio threshold", min = 0 },
  { "--eviction-interval", "number", 60, "Seconds between cache eviction cycles", gt = 0,
    arg = "<secs>" },
  { "--max-tree-size", "int", 16777216, "Maximum characters per worker in the routing tree", min = 1 },

  { group = "Rate limiting" },
  { "--max-concurrent-requests", "int", 64, "Maximum concurrent requests (0: no limit)", min = 0 },
  { "--queue-size", "int", 100, "Requests that may wait for a slot (0: reject at once with 429)", min = 0 },
  { "--queue-timeout-secs", "number", 60, "Seconds a queued request may wait before 408", gt = 0 },

  { group = "Worker health" },
  { "--worker-startup-timeout-secs", "number", 300, "Timeout for worker startup", gt = 0 },
  { "--worker-startup-check-interval", "number", 10, "Seconds between startup checks", gt = 0,
    arg = "<secs>" },
  { "--health-check-interval-secs", "number", 60, "Seconds between health checks", gt = 0 },
  { "--health-failure-threshold", "int", 3, "Failed checks before a worker is unhealthy", min = 1 },
  { "--health-success-threshold", "int", 2, "Passed checks before a worker is healthy again", min = 1 },
  { "--health-check-timeout-secs", "number", 5, "Timeout of one health check in seconds", gt = 0 },
  { "--health-check-endpoint", "string", "/health", "Path probed by health checks", path = true,
    arg = "<path>" },

  { group = "Retries" },
  { "--retry-max-retries", "int", 3, "Maximum retry attempts per request", min = 0 },
  { "--retry-initial-backoff-ms", "int", 100, "Initial retry backoff in milliseconds", min = 0 },
  { "--retry-max-backoff-ms", "int", 10000, "Maximum retry backoff in milliseconds", min = 0 },
  { "--retry-backoff-multiplier", "number", 2.0, "Backoff multiplier between retries", min = 1,
    show = "2.0" },
  { "--retry-jitter-factor", "number", 0.1, "Random jitter factor for retries (0.0-1.0)", min = 0, max = 1 },
  { "--disable-retries", "flag", false, "Disable retries" },

  { group = "Circuit breaker" },
  { "--cb-failure-threshold", "int", 5, "Consecutive failures before the circuit opens", min = 1 },
  { "--cb-success-threshold", "int", 2, "Successes in half-open state to close the circuit", min = 1 },
  { "--cb-timeout-duration-secs", "number", 30, "Seconds an open circuit waits before half-open", gt = 0 },
  { "--cb-window-duration-secs", "number", 60, "Circuit breaker window duration in seconds", gt = 0 },
  { "--disable-circuit-breaker", "flag", false, "Disable the circuit breaker" },

  { group = "Prefill-decode disaggregation" },
  { "--pd-disaggregation", "flag", false, "Enable PD disaggregated mode" },
  { "--prefill", "prefill", {}, "Prefill server URL with optional bootstrap port (repeatable)" },
  { "--decode", "decode", {}, "Decode server URL (repeatable)" },
  { "--prefill-policy", "policy", nil, "Routing policy for prefill nodes (default: --policy)" },
  { "--decode-policy", "policy", nil, "Routing policy for decode nodes (default: --policy)" },
  { "--prefill-policy-opt", "opts", {}, "Option of the prefill policy, key=value (over --policy-opt)" },
  { "--decode-policy-opt", "opts", {}, "Option of the decode policy, key=value (over --policy-opt)" },

  { group = "Policy reload and rollback" },
  { "--policy-rollback-error-rate", "number", 0.5,
    "Roll a reloaded policy back when its select raises on more than this share of requests", min = 0, max = 1 },
  { "--policy-rollback-window-secs", "number", 10, "Window over which that share is measured", gt = 0 },
  { "--policy-rollback-min-requests", "int", 20, "Requests a window needs before it can roll back", min = 1 },

  { group = "Kubernetes service discovery" },
  { "--service-discovery", "flag", false, "Enable Kubernetes service discovery" },
  { "--selector", "selector", {}, "Label selector for workers (key1=value1 key2=value2)" },
  { "--prefill-selector", "selector", {}, "Label selector for prefill servers in PD mode" },
  { "--decode-selector", "selector", {}, "Label selector for decode servers in PD mode" },
  { "--service-discovery-port", "port", 80, "Port for discovered pods" },
  { "--service-discovery-namespace", "string", nil, "Kubernetes namespace to watch (default: all)",
    arg = "<namespace>" },
  { "--bootstrap-port-annotation", "string", "sglang.ai/bootstrap-port",
    "Annotation for bootstrap ports of prefill pods", arg = "<key>" },
  { "--kubeconfig", "string", nil,
    "Kubeconfig file for the API server (default: $KUBECONFIG, else the in-cluster service account)",
    arg = "<path>" },
  { "--service-discovery-relist-secs", "number", 60,
    "Seconds between full pod lists, so that a watch that stopped delivering cannot keep dead workers",
    gt = 0, arg = "<secs>" },

  { group = "Observability" },
  { "--prometheus-host", "string", "127.0.0.1", "Prometheus metrics host", arg = "<host>" },
  { "--prometheus-port", "port", 29000, "Prometheus metrics port (0 picks a free port)", zero = true },
  { "--log-dir", "string", nil, "Directory for log files (default: stderr only)", arg = "<dir>" },
  { "--log-level", "level", "info", "Logging level: debug, info, warn(ing), error, critical" },
  { "--log-json", "flag", false, "Write log lines as JSON" },
  { "--trace-out", "string", nil,
    "Capture every request, hashes only (no prompt text), for `sglr sim --trace` (default: off)",
    arg = "<file>" },
  { "--trace-out-max-mb", "number", 100, "Size at which the capture moves to FILE.1 and starts over",
    gt = 0, arg = "<mb>" },
  { "--request-id-headers", "words", M.DEFAULT_REQUEST_ID_HEADERS, "Headers carrying a request id (at most 32)",
    lower = true, arg = "<header>" },

  { group = "Security and data parallelism" },
  { "--cors-allowed-origins", "words", {}, "Allowed CORS origins (default: any)", arg = "<origin>" },
  { "--api-key", "string", nil, "API key sent to workers as 'Authorization: Bearer KEY' (or $SGLR_API_KEY)",
    arg = "<key>", env = "SGLR_API_KEY" },
  { "--admin-api-key", "string", nil,
    "Key clients must send as a bearer token to /add_worker, /remove_worker and /flush_cache "
    .. "(or $SGLR_ADMIN_API_KEY)", arg = "<key>", env = "SGLR_ADMIN_API_KEY" },
  { "--inference-api-key", "string", nil,
    "Key clients must send as a bearer token to the inference routes; never forwarded to workers "
    .. "(or $SGLR_INFERENCE_API_KEY)", arg = "<key>", env = "SGLR_INFERENCE_API_KEY" },
  { "--dp-aware", "flag", false,
    "Route to each data-parallel rank of a worker (dp_size from its /get_server_info)" },

  { group = "Shadow policies and explained decisions" },
  { "--shadow-policy", "words", {},
    "Policy (name or .lua path) offered every request beside the live one; its choice is counted, "
    .. "never served (repeatable; also POST /admin/policy/shadow)", arg = "<policy>" },
  { "--shadow-budget-us", "number", 1000,
    "A shadow candidate whose select takes longer than this 3 times in a row is dropped", gt = 0,
    arg = "<us>" },
  { "--explain", "flag", false,
    "Answer x-sglr-explain: 1 with an x-sglr-decision header (without it, only requests carrying "
    .. "--admin-api-key may ask)" },
  { "--decision-log-size", "int", 1000,
    "Routing decisions kept for GET /admin/decisions (0: none)", min = 0, max = 100000 },
}

-- Row accessors, with the config key: "--worker-urls" -> "worker_urls".
for _, f in ipairs(FLAGS) do
  if f[1] then
    f.name, f.kind, f.default, f.help = f[1], f[2], f[3], f[4]
    f.key = f.name:sub(3):gsub("-", "_")
  end
end

M.FLAGS = FLAGS

local ARGNAME = {
  string = "<string>", int = "<int>", number = "<number>", port = "<port>", size = "<bytes>",
  level = "<level>", policy = "<policy>", urls = "<url>", words = "<word>",
  selector = "<key=value>", opts = "<key=value>", prefill = { "<url>", "<bootstrap_port>|none" }, decode = "<url>",
}

local LIST_KINDS = { urls = true, words = true, selector = true, opts = true }

--------------------------------------------------------------------------------
-- Helpers
--------------------------------------------------------------------------------

local function copy_list(t)
  local r = {}
  for i = 1, #t do r[i] = t[i] end
  return r
end

local function show_default(f)
  local d = f.default
  if f.show then return f.show end
  if f.kind == "flag" or d == nil then return nil end
  if type(d) == "table" then
    if #d == 0 then return nil end
    return concat(d, " ")
  end
  return tostring(d)
end

-- Split words that carry comma separated values ("a,b c" -> a b c).
local function split_words(list)
  local out = {}
  for _, w in ipairs(list) do
    for part in w:gmatch("[^,]+") do
      part = part:match("^%s*(.-)%s*$")
      if part ~= "" then out[#out + 1] = part end
    end
  end
  return out
end

-- A number as an operator would type it: decimal, optional fraction and
-- exponent. Rejects hex, inf and nan, which tonumber would let through.
local function parse_number(s)
  if type(s) ~= "string" or not s:match("^%s*[+-]?[%d.]+[eE]?[+-]?%d*%s*$") then
    return nil
  end
  local n = tonumber(s)
  if not n or n ~= n or n == huge or n == -huge then return nil end
  return n
end

local function range_text(f)
  if f.min and f.max then return fmt("between %s and %s", f.min, f.max) end
  if f.gt then return "> " .. f.gt end
  if f.min then return ">= " .. f.min end
  if f.max then return "<= " .. f.max end
  return ""
end

local function check_range(f, n, raw, what)
  if (f.min and n < f.min) or (f.max and n > f.max) or (f.gt and n <= f.gt) then
    return nil, fmt("must be %s %s, got '%s'", what, range_text(f), raw)
  end
  return n
end

local SIZE_UNITS = {
  [""] = 1, b = 1,
  k = 1024, kb = 1024, kib = 1024,
  m = 1024 ^ 2, mb = 1024 ^ 2, mib = 1024 ^ 2,
  g = 1024 ^ 3, gb = 1024 ^ 3, gib = 1024 ^ 3,
}

local function parse_size(s)
  local num, unit = s:match("^%s*(%d+%.?%d*)%s*(%a*)%s*$")
  local mult = unit and SIZE_UNITS[unit:lower()]
  if not num or not mult then return nil end
  return floor(tonumber(num) * mult)
end

-- Worker URL: http(s)://host[:port][/path], no userinfo, query or fragment.
-- Returns the URL with trailing slashes dropped (so http://w:8000/ and
-- http://w:8000 are the same worker) and a key for duplicate detection.
local function parse_url(s)
  if s:find("%s") then return nil, "contains whitespace" end
  local scheme, rest = s:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme then return nil, "expected http://host[:port] or https://host[:port]" end
  scheme = scheme:lower()
  if scheme ~= "http" and scheme ~= "https" then
    return nil, fmt("unsupported scheme '%s' (use http or https)", scheme)
  end
  if rest:find("[?#]") then return nil, "query strings and fragments are not allowed" end
  local authority, path = rest:match("^([^/]*)(.*)$")
  if authority:find("@", 1, true) then return nil, "user info is not allowed" end
  local host, port
  if authority:sub(1, 1) == "[" then
    host, port = authority:match("^(%[[%x:.]+%])(.*)$")
    if not host then return nil, "malformed IPv6 address" end
  else
    host, port = authority:match("^([^:]*)(.*)$")
  end
  if host == "" then return nil, "missing host" end
  if not host:match("^%[") and not host:match("^[%w._-]+$") then
    return nil, fmt("invalid host '%s'", host)
  end
  if port ~= "" then
    local p = port:match("^:(%d+)$")
    p = p and tonumber(p)
    if not p or p < 1 or p > 65535 then
      return nil, fmt("invalid port '%s'", port:sub(2))
    end
  end
  path = path:gsub("/+$", "")
  local url = scheme .. "://" .. host .. port .. path
  return url, scheme .. "://" .. host:lower() .. port .. path
end

local function known_policy_on_path(name, lua_path)
  if not lua_path then return false end
  for dir in lua_path:gmatch("[^;]+") do
    local fh = io.open(dir .. "/policies/" .. name .. ".lua", "r")
    if fh then fh:close() return true end
  end
  return false
end

local function check_policy(v, conf)
  if v:match("%.lua$") then
    local fh, err = io.open(v, "r")
    if not fh then return nil, fmt("cannot read policy file: %s", err) end
    fh:close()
    return v
  end
  for _, name in ipairs(M.POLICIES) do
    if v == name then return v end
  end
  if v:match("^[%w_]+$") and known_policy_on_path(v, conf.lua_path) then return v end
  return nil, fmt("unknown policy '%s' (choose %s, or a path to a .lua file)",
                  v, concat(M.POLICIES, ", "))
end

--------------------------------------------------------------------------------
-- Conversion of one flag's raw argparse value. Returns value or nil, message.
--------------------------------------------------------------------------------

local convert = {}

function convert.flag(_, raw) return raw and true or false end

function convert.string(f, raw)
  if raw == "" then return nil, "must not be empty" end
  if f.path and raw:sub(1, 1) ~= "/" then
    return nil, fmt("must be a path starting with '/', got '%s'", raw)
  end
  return raw
end

function convert.int(f, raw)
  local n = parse_number(raw)
  if not n or n ~= floor(n) then return nil, fmt("expected an integer, got '%s'", raw) end
  return check_range(f, n, raw, "an integer")
end

function convert.number(f, raw)
  local n = parse_number(raw)
  if not n then return nil, fmt("expected a number, got '%s'", raw) end
  return check_range(f, n, raw, "a number")
end

function convert.port(f, raw)
  local n = parse_number(raw)
  local lo = f.zero and 0 or 1
  if not n or n ~= floor(n) or n < lo or n > 65535 then
    return nil, fmt("expected a port number between %d and 65535, got '%s'", lo, raw)
  end
  return n
end

function convert.size(_, raw)
  local n = parse_size(raw)
  if not n or n < 1 then
    return nil, fmt("expected a size in bytes such as 268435456, 256MB or 1GiB, got '%s'", raw)
  end
  return n
end

function convert.level(_, raw)
  local l = LOG_LEVELS[raw:lower()]
  if not l then
    return nil, fmt("expected one of debug, info, warn, warning, error, critical, got '%s'", raw)
  end
  return l
end

-- Policies are checked after all flags are converted (they need --lua-path).
function convert.policy(_, raw)
  if raw == "" then return nil, "must not be empty" end
  return raw
end

function convert.urls(_, raw)
  local out = {}
  for _, w in ipairs(split_words(raw)) do
    local url, err = parse_url(w)
    if not url then return nil, fmt("invalid worker URL '%s': %s", w, err) end
    out[#out + 1] = url
  end
  return out
end

function convert.words(f, raw)
  local out = split_words(raw)
  if f.lower then
    for i, w in ipairs(out) do out[i] = w:lower() end
  end
  return out
end

function convert.selector(_, raw)
  local map = {}
  for _, w in ipairs(raw) do
    local k, v = w:match("^([^=]+)=(.*)$")
    if not k or k:match("^%s*$") then
      return nil, fmt("expected key=value, got '%s'", w)
    end
    if map[k] ~= nil and map[k] ~= v then
      return nil, fmt("label '%s' given twice ('%s' and '%s')", k, map[k], v)
    end
    map[k] = v
  end
  return map
end

function convert.opts(_, raw)
  local map = {}
  for _, w in ipairs(raw) do
    local k, v = w:match("^%s*([%w_]+)%s*=(.*)$")
    if not k then return nil, fmt("expected key=value (an option name, '=', a value), got '%s'", w) end
    if map[k] ~= nil and map[k] ~= v then
      return nil, fmt("option '%s' given twice ('%s' and '%s')", k, map[k], v)
    end
    map[k] = v
  end
  return map
end

function convert.prefill(_, raw)
  local out = {}
  for _, entry in ipairs(raw) do
    local url, err = parse_url(entry[1])
    if not url then return nil, fmt("invalid worker URL '%s': %s", entry[1], err) end
    local bp, p = entry[2], nil
    if bp ~= nil and bp:lower() ~= "none" then
      p = parse_number(bp)
      if not p or p ~= floor(p) or p < 1 or p > 65535 then
        return nil, fmt("bootstrap port for '%s' must be a port number (1-65535) or 'none', got '%s'",
                        entry[1], bp)
      end
    end
    out[#out + 1] = { url = url, bootstrap_port = p }
  end
  return out
end

function convert.decode(_, raw)
  local out = {}
  for _, w in ipairs(raw) do
    local url, err = parse_url(w)
    if not url then return nil, fmt("invalid worker URL '%s': %s", w, err) end
    out[#out + 1] = url
  end
  return out
end

--------------------------------------------------------------------------------
-- Parser and help
--------------------------------------------------------------------------------

local function build_parser()
  local p = argparse(PROG)
    :description("Route inference requests across SGLang-compatible workers.")
    :usage("Usage: sglr run [options]")
    :epilog("Example:\n  sglr run --worker-urls http://w1:8000 http://w2:8000 --policy cache_aware")
    :add_help(false)
    :help_max_width(100)
    :help_description_margin(46)

  -- Words that are not flag values: caught so the message names them.
  p:argument("extra"):args("*"):hidden(true)

  local group_name, members = nil, {}
  local function close_group()
    if group_name and #members > 0 then p:group(group_name, unpack(members)) end
    members = {}
  end

  for _, f in ipairs(FLAGS) do
    if f.group then
      close_group()
      group_name = f.group
    else
      local desc = f.help
      local d = show_default(f)
      if d then desc = desc .. " (default: " .. d .. ")" end
      local o
      if f.kind == "flag" then
        o = p:flag(f.name, desc)
      else
        local argname = f.arg or ARGNAME[f.kind]
        if f.kind == "number" or f.kind == "int" then
          if f.name:match("%-secs$") then argname = "<secs>"
          elseif f.name:match("%-ms$") then argname = "<ms>" end
        end
        o = p:option(f.name, desc):argname(argname)
        -- init(nil): an unused option stays nil so its default applies.
        if LIST_KINDS[f.kind] then
          o:args("*"):count("*"):action("concat"):init(nil)
        elseif f.kind == "prefill" then
          o:args("1-2"):count("*"):init(nil)
        elseif f.kind == "decode" then
          o:count("*"):init(nil)
        end
      end
      o:target(f.key)
      members[#members + 1] = o
    end
  end
  close_group()

  local h = p:flag("-h --help", "Show this help message and exit")
  p:group("Help", h)
  return p
end

local parser_cache

local function parser()
  parser_cache = parser_cache or build_parser()
  return parser_cache
end

function M.run_help()
  return parser():get_help()
end

-- `sglr run --policy P --help`: the options of the policies named on the
-- command line, from their schemas.
function M.policy_help(words)
  local out, seen = {}, {}
  for i, w in ipairs(words) do
    local flag, v = w:match("^(%-%-[%w-]*policy)=(.+)$")
    if not flag and (w == "--policy" or w == "--prefill-policy" or w == "--decode-policy") then
      flag, v = w, words[i + 1]
    end
    if flag and v and not seen[v] then
      seen[v] = true
      local policy = require "sglr.policy"
      local P, err = policy.load(v)
      out[#out + 1] = P and policy.describe(P) or ("Policy " .. v .. ": " .. tostring(err))
    end
  end
  if #out == 0 then return "" end
  return "\n\n" .. concat(out, "\n\n") .. "\n\nSet them with --policy-opt key=value (PD mode: also "
    .. "--prefill-policy-opt, --decode-policy-opt).\n"
end

-- Option names that take exactly one value: "--port -1" is handed to
-- argparse as "--port=-1", or it would read -1 as an unknown short option.
local SINGLE = {}
for _, f in ipairs(FLAGS) do
  if f.kind and f.kind ~= "flag" and not LIST_KINDS[f.kind]
     and f.kind ~= "prefill" and f.kind ~= "decode" then
    SINGLE[f.name] = true
  end
end

local function join_negative_values(args)
  local out, i = {}, 1
  while i <= #args do
    local a, b = args[i], args[i + 1]
    if SINGLE[a] and b and b:match("^%-[%d.]") then
      out[#out + 1] = a .. "=" .. b
      i = i + 2
    else
      out[#out + 1] = a
      i = i + 1
    end
  end
  return out
end

--------------------------------------------------------------------------------
-- Cross-flag checks, after every flag has been converted.
--------------------------------------------------------------------------------

local function fail(flag, msg, ...)
  if flag then
    return nil, fmt("%s: %s: " .. msg, PROG, flag, ...)
  end
  return nil, fmt("%s: " .. msg, PROG, ...)
end

local function check_duplicates(conf)
  local seen = {}
  local function see(flag, url)
    local _, key = parse_url(url)
    if seen[key] then
      if seen[key] == flag then
        return fail(flag, "duplicate worker URL '%s'", url)
      end
      return fail(flag, "worker URL '%s' is also given to %s", url, seen[key])
    end
    seen[key] = flag
    return true
  end
  for _, u in ipairs(conf.worker_urls) do
    local ok, err = see("--worker-urls", u)
    if not ok then return nil, err end
  end
  for _, e in ipairs(conf.prefill) do
    local ok, err = see("--prefill", e.url)
    if not ok then return nil, err end
  end
  for _, u in ipairs(conf.decode) do
    local ok, err = see("--decode", u)
    if not ok then return nil, err end
  end
  return true
end

local function check_conf(conf)
  for _, key in ipairs({ "policy", "prefill_policy", "decode_policy" }) do
    if conf[key] then
      local ok, err = check_policy(conf[key], conf)
      if not ok then return fail("--" .. key:gsub("_", "-"), "%s", err) end
    end
  end

  local ok, err = check_duplicates(conf)
  if not ok then return nil, err end

  -- the request id is looked up among the first 32 names only (one pass
  -- over the headers in C): more would be ignored without a word
  if conf.request_id_headers and #conf.request_id_headers > 32 then
    return fail("--request-id-headers", "takes at most 32 names, got %d", #conf.request_id_headers)
  end

  if conf.retry_max_backoff_ms < conf.retry_initial_backoff_ms then
    return fail("--retry-max-backoff-ms", "must be at least --retry-initial-backoff-ms (%d), got %d",
                conf.retry_initial_backoff_ms, conf.retry_max_backoff_ms)
  end

  local pd, sd = conf.pd_disaggregation, conf.service_discovery
  if pd then
    if #conf.worker_urls > 0 then
      return fail("--worker-urls", "cannot be used with --pd-disaggregation; use --prefill and --decode")
    end
    if not sd then
      if #conf.prefill == 0 then
        return fail("--pd-disaggregation", "needs at least one --prefill URL (or --service-discovery)")
      end
      if #conf.decode == 0 then
        return fail("--pd-disaggregation", "needs at least one --decode URL (or --service-discovery)")
      end
    else
      if #conf.prefill == 0 and next(conf.prefill_selector) == nil then
        return fail("--prefill-selector", "PD service discovery needs --prefill-selector or --prefill")
      end
      if #conf.decode == 0 and next(conf.decode_selector) == nil then
        return fail("--decode-selector", "PD service discovery needs --decode-selector or --decode")
      end
    end
  else
    if #conf.prefill > 0 then return fail("--prefill", "requires --pd-disaggregation") end
    if #conf.decode > 0 then return fail("--decode", "requires --pd-disaggregation") end
    if sd and next(conf.selector) == nil then
      return fail("--service-discovery", "needs --selector key=value to choose worker pods")
    end
  end

  if not sd then
    for _, key in ipairs({ "selector", "prefill_selector", "decode_selector" }) do
      if next(conf[key]) ~= nil then
        return fail("--" .. key:gsub("_", "-"), "requires --service-discovery")
      end
    end
  end
  for _, v in ipairs(conf.shadow_policy) do
    local okp, perr = check_policy(v, conf)
    if not okp then return fail("--shadow-policy", "%s", perr) end
  end
  return true
end

--------------------------------------------------------------------------------
-- Entry point
--------------------------------------------------------------------------------

function M.parse_run(args)
  if type(args) ~= "table" then
    error("cli.parse_run: args must be an array of strings", 2)
  end
  local words = {}
  for i = 1, #args do
    words[i] = tostring(args[i])
    if words[i] == "--help" or words[i] == "-h" then
      return nil, M.run_help() .. M.policy_help(words), "help"
    end
    if words[i] == "--version" or words[i] == "-V" then
      return nil, "sglr " .. require("sglr.version"), "version"
    end
  end

  local ok, raw = parser():pparse(join_negative_values(words))
  if not ok then
    return nil, fmt("%s: %s", PROG, raw)
  end
  if #raw.extra > 0 then
    return fail(nil, "unexpected argument '%s' (flags start with --; see 'sglr run --help')",
                raw.extra[1])
  end

  local conf, given = {}, {}
  for _, f in ipairs(FLAGS) do
    if f.kind then
      local v = raw[f.key]
      given[f.key] = v ~= nil
      if v == nil and f.env then
        v = M.getenv(f.env)
        if v == "" then v = nil end
      end
      if v == nil then
        v = f.default
        if type(v) == "table" then v = copy_list(v) end
      else
        local err
        v, err = convert[f.kind](f, v)
        if v == nil then return fail(f.name, "%s", err) end
      end
      conf[f.key] = v
    end
  end

  local okc, err = check_conf(conf)
  if not okc then return nil, err end

  -- PD mode: prefill and decode fall back to --policy.
  conf.prefill_policy = conf.prefill_policy or conf.policy
  conf.decode_policy = conf.decode_policy or conf.policy

  local po = {}
  for _, key in ipairs(M.POLICY_OPTION_KEYS) do
    if given[key] then po[key] = conf[key] end
  end
  conf.policy_options = po
  return conf
end

-- Environment lookup for env flags (replaceable in tests).
M.getenv = os.getenv

-- The configuration of `sglr run` with no flags.
function M.defaults()
  return assert(M.parse_run({}))
end

return M

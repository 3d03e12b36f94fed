-- --dp-aware against plain routing, measured side by side in one run (a
-- command, not a test): the same shared-prefix workload through a
-- cache_aware router in front of fresh sim workers of several data-parallel
-- ranks each, once routing to the workers (each worker then spreads its
-- requests over its ranks in turn, as SGLang's data-parallel controller
-- does) and once to their ranks.
--
--   build/sglr lua examples/benchmarks/compare_dp_aware.lua [--stream] [--workers N]
--       [--dp-size N] [--kv-tokens N] [--groups N] [--prompts-per-group N]
--       [--output-tokens N] [--concurrency N]
--
-- Defaults: 2 workers of 4 ranks, each rank 40000 KV tokens, prefill 50 us
-- per uncached token, decode 0.2 ms per output token; SGLang's
-- generated-shared-prefix workload (64 groups x 16 prompts, 2048-token
-- system prompt, 128-token question, 256 output tokens), concurrency 32.
local core = require "sglr.core"
local fleet_mod = require "sglr.fleet"
local bench = require "sglr.bench"

local opts = { workers = 2, dp_size = 4, kv_tokens = 40000, groups = 64, prompts_per_group = 16,
  output_tokens = 256, concurrency = 32 }
local i = 1
while arg and arg[i] do
  local a = arg[i]
  if a == "--stream" then
    opts.stream = true
  else
    local key = a:match("^%-%-([%w%-]+)$")
    if not key or arg[i + 1] == nil or not tonumber(arg[i + 1]) then
      io.stderr:write("compare_dp_aware.lua: bad argument ", a, "\n")
      return core.exit(2)
    end
    opts[key:gsub("%-", "_")] = tonumber(arg[i + 1])
    i = i + 1
  end
  i = i + 1
end

local fleet = fleet_mod.new()
local results = {}
local ok, err = xpcall(function()
  for _, mode in ipairs({ "workers", "dp-aware" }) do
    local urls = fleet:workers(opts.workers, { "--dp-size", tostring(opts.dp_size),
      "--kv-tokens", tostring(opts.kv_tokens), "--prefill-us-per-token", "50",
      "--decode-ms-per-token", "0.2" })
    local args = { "--policy", "cache_aware", "--log-level", "warn", "--max-concurrent-requests", "0" }
    if mode == "dp-aware" then args[#args + 1] = "--dp-aware" end
    local url = fleet:router(urls, args)
    io.stderr:write("running ", mode, " ...\n")
    results[#results + 1] = { mode, assert(bench.run({ url = url, workload = "shared-prefix",
      groups = opts.groups, prompts_per_group = opts.prompts_per_group, system_tokens = 2048,
      question_tokens = 128, output_tokens = opts.output_tokens, concurrency = opts.concurrency,
      stream = opts.stream, seed = 1, quiet = true })) }
    fleet:stop()
  end
end, debug.traceback)
fleet:stop()
if not ok then
  io.stderr:write(tostring(err), "\n")
  return core.exit(1)
end
print(("shared-prefix: %d groups x %d prompts, %d output tokens, %s; %d workers x %d ranks x %d KV tokens")
  :format(opts.groups, opts.prompts_per_group, opts.output_tokens, opts.stream and "streamed" or "not streamed",
    opts.workers, opts.dp_size, opts.kv_tokens))
io.write(bench.compare(results))
local a, b = results[1][2], results[2][2]
if (a.cache_hit_rate or 0) > 0 then
  print(("cache hit rate: dp-aware is %.2fx workers"):format((b.cache_hit_rate or 0) / a.cache_hit_rate))
end
core.exit(0)

-- Cache-aware vs round-robin, measured side by side in one run (a command,
-- not a test): the same shared-prefix workload through the router with each
-- policy, in front of fresh sim workers whose KV cache holds only part of
-- the workload.
--
--   build/sglr lua examples/benchmarks/compare_policies.lua [--stream] [--groups N]
--       [--prompts-per-group N] [--output-tokens N] [--workers N] [--kv-tokens N]
--       [--concurrency N] [--policies round_robin,cache_aware,...]
--
-- Defaults: SGLang's generated-shared-prefix workload (64 groups x 16
-- prompts, 2048-token system prompt, 128-token question, 256 output tokens),
-- 4 workers of 40000 KV tokens, prefill 50 us per uncached token, decode
-- 0.2 ms per output token, concurrency 32.
local core = require "sglr.core"
local fleet_mod = require "sglr.fleet"
local bench = require "sglr.bench"

local opts = { groups = 64, prompts_per_group = 16, output_tokens = 256, workers = 4, kv_tokens = 40000,
  concurrency = 32, policies = "round_robin,cache_aware" }
local i = 1
while arg and arg[i] do
  local a = arg[i]
  if a == "--stream" then
    opts.stream = true
  else
    local key = a:match("^%-%-([%w%-]+)$")
    if not key or arg[i + 1] == nil then
      io.stderr:write("compare_policies.lua: bad argument ", a, "\n")
      return core.exit(2)
    end
    key = key:gsub("%-", "_")
    opts[key] = tonumber(arg[i + 1]) or arg[i + 1]
    i = i + 1
  end
  i = i + 1
end

local fleet = fleet_mod.new()
local results = {}
local ok, err = xpcall(function()
  for policy in tostring(opts.policies):gmatch("[^,]+") do
    local urls = fleet:workers(opts.workers, { "--kv-tokens", tostring(opts.kv_tokens),
      "--prefill-us-per-token", "50", "--decode-ms-per-token", "0.2" })
    local url = fleet:router(urls, { "--policy", policy, "--log-level", "warn", "--max-concurrent-requests", "0" })
    io.stderr:write("running ", policy, " ...\n")
    results[#results + 1] = { policy, assert(bench.run({ url = url, workload = "shared-prefix",
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
print(("shared-prefix: %d groups x %d prompts, 2048-token system prompt, %d output tokens, %s, %d workers x %d KV tokens")
  :format(opts.groups, opts.prompts_per_group, opts.output_tokens, opts.stream and "streamed" or "not streamed",
    opts.workers, opts.kv_tokens))
io.write(bench.compare(results))
if #results == 2 then
  local a, b = results[1][2], results[2][2]
  local ha, hb = a.cache_hit_rate or 0, b.cache_hit_rate or 0
  local ta, tb = (a.ttft_ms or {}).mean or 0, (b.ttft_ms or {}).mean or 0
  if ha > 0 then print(("cache hit rate: %s is %.2fx %s"):format(results[2][1], hb / ha, results[1][1])) end
  if ta > 0 then print(("mean TTFT: %s is %.0f%% lower than %s"):format(results[2][1], 100 * (1 - tb / ta), results[1][1])) end
end
core.exit(0)

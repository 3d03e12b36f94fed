#!/usr/bin/env bash
# Router instructions per proxied request, counted by callgrind: unlike CPU
# time this is repeatable on a busy machine, so two builds compare exactly.
#
# Starts sim workers and, under valgrind --tool=callgrind, a router
# (round_robin unless POLICIES says, logs off); warms it up, zeroes the counters, sends N small
# POST /generate requests over keep-alive connections, and prints the
# router's instructions per request. Mode "regular": one worker; mode "pd":
# --pd-disaggregation with one prefill (with a bootstrap port) and one
# decode worker, so the two rows of one binary give what PD dispatch adds.
# Everything listens on 127.0.0.1; every process started here is stopped
# by its pid on exit.
#
# usage: examples/benchmarks/proxy_cost.sh [SGLR_BIN...]
# env:   N (2000 requests), WARMUP (2000 requests first, not counted: the
#        JIT has compiled every path by then, so what is counted is the
#        steady state, not trace compilation), CONNS (8), MODES ("regular pd"), WORKER_PORT (31811),
#        ROUTER_PORT (31812), PREFILL_PORT (31813), BOOTSTRAP_PORT (31814),
#        DECODE_PORT (31815), ROUTER_ARGS (extra router flags, e.g.
#        "--log-level info"), SIM_BIN (the sglr that runs the sim workers;
#        default build/sglr, so an older build can be measured beside it),
#        KEEP_DIR (keep each run's callgrind file there, named
#        callgrind.BIN-INDEX.MODE.POLICY, for callgrind_annotate), POLICIES
#        ("round_robin"; e.g. "round_robin cache_aware" for one row each),
#        PROMPT (small; chat4k, chat32k, any chatNk: /v1/chat/completions
#        bodies of about N KB, each request its own prompt after a shared
#        system prompt)
set -euo pipefail

N=${N:-2000}
WARMUP=${WARMUP:-2000}
CONNS=${CONNS:-8}
WORKER_PORT=${WORKER_PORT:-31811}
ROUTER_PORT=${ROUTER_PORT:-31812}
PREFILL_PORT=${PREFILL_PORT:-31813}
BOOTSTRAP_PORT=${BOOTSTRAP_PORT:-31814}
DECODE_PORT=${DECODE_PORT:-31815}
MODES=${MODES:-regular pd}
ROUTER_ARGS=${ROUTER_ARGS:---log-level warn}
POLICIES=${POLICIES:-round_robin}
PROMPT=${PROMPT:-small}
[[ $PROMPT =~ ^(small|chat[0-9]+k)$ ]] || { echo "proxy_cost.sh: PROMPT is small or chatNk (chat4k, chat32k...)" >&2; exit 2; }
[ $# -gt 0 ] || set -- build/sglr
SIM_BIN=${SIM_BIN:-build/sglr}
[ -x "$SIM_BIN" ] || SIM_BIN=$1
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null ||
  { echo "proxy_cost.sh: valgrind (callgrind) not found" >&2; exit 1; }

. "$(dirname "$0")/lib.sh"
bench_setup proxy-cost


# the load: N requests over CONNS coroutines, each on its own connection
cat >"$TMP/load.lua" <<'LUA'
local core = require "sglr.core"
local url, n, conns, prompt = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4]
local path, bodies = "/generate", { '{"text":"hello","sampling_params":{"max_new_tokens":1}}' }
local system = ("You are a careful assistant for a GPU fleet. "):rep(20)
local kb = tonumber(prompt:match("^chat(%d+)k$"))
local filler = ("how do I size the KV cache for this model? "):rep(kb and kb * 25 or 0)
if kb then path = "/v1/chat/completions" end
-- chatNk: every request its own prompt (as live traffic: a shared system
-- prompt, then a question no earlier request asked), of varying length
local function body_for(i)
  if not kb then return bodies[1] end
  local user = "Question " .. i .. ": " .. filler:sub(1, kb * 1024 - 1400 + i % 64 * 9)
  return '{"model":"m","max_tokens":1,"messages":[{"role":"system","content":"' .. system ..
    '"},{"role":"user","content":"' .. user .. '"}]}'
end
local sent = tonumber(arg[5]) or 0     -- the warm-up asks other questions
local left, running, bad = n, conns, 0
for _ = 1, conns do
  core.spawn(function()
    local pool = assert(core.upstream(url))
    while left > 0 do
      left = left - 1
      sent = sent + 1
      local r = core.request(pool, { method = "POST", path = path, body = body_for(sent),
        headers = { ["content-type"] = "application/json" } })
      if not r or r.status ~= 200 then bad = bad + 1 end
    end
    running = running - 1
    if running == 0 then
      if bad > 0 then io.stderr:write(bad, " requests failed\n") end
      core.exit(bad > 0 and 1 or 0)
    end
  end)
end
LUA

"$SIM_BIN" sim-worker --port "$WORKER_PORT" --max-new-tokens 1 >"$TMP/worker.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$WORKER_PORT/health" worker "$!" 300
"$SIM_BIN" sim-worker --role prefill --port "$PREFILL_PORT" --bootstrap-port "$BOOTSTRAP_PORT" \
  --max-new-tokens 1 >"$TMP/prefill.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$PREFILL_PORT/health" prefill "$!" 300
"$SIM_BIN" sim-worker --role decode --port "$DECODE_PORT" --max-new-tokens 1 >"$TMP/decode.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$DECODE_PORT/health" decode "$!" 300

printf '%-40s %-8s %-14s %14s\n' binary mode policy "instr/request"
bin_i=1
for bin in "$@"; do
 for mode in $MODES; do
 for policy in $POLICIES; do
  out="$TMP/callgrind.out"
  if [ "$mode" = pd ]; then
    workers=(--pd-disaggregation --prefill "http://127.0.0.1:$PREFILL_PORT" "$BOOTSTRAP_PORT"
             --decode "http://127.0.0.1:$DECODE_PORT")
  else
    workers=(--worker-urls "http://127.0.0.1:$WORKER_PORT")
  fi
  # shellcheck disable=SC2086
  valgrind --tool=callgrind --callgrind-out-file="$out.%p" "$bin" run --host 127.0.0.1 \
    --port "$ROUTER_PORT" "${workers[@]}" --policy "$policy" \
    --prometheus-port 0 --max-concurrent-requests 0 $ROUTER_ARGS >"$TMP/router.log" 2>&1 &
  rpid=$!
  PIDS+=($rpid)
  wait_http "http://127.0.0.1:$ROUTER_PORT/health" router "$rpid" 300
  "$SIM_BIN" lua "$TMP/load.lua" "http://127.0.0.1:$ROUTER_PORT" "$WARMUP" "$CONNS" "$PROMPT" 1000000      # warm-up
  callgrind_control -z "$rpid" >/dev/null 2>&1
  "$SIM_BIN" lua "$TMP/load.lua" "http://127.0.0.1:$ROUTER_PORT" "$N" "$CONNS" "$PROMPT"
  callgrind_control -d "$rpid" >/dev/null 2>&1
  kill "$rpid"; wait "$rpid" 2>/dev/null || true
  ir=$(for f in "$out".*; do awk '/^(summary|totals):/ {print $2}' "$f"; done | sort -n | tail -1)
  printf '%-40s %-8s %-14s %14.0f\n' "$bin" "$mode" "$policy" "$(awk -v i="$ir" -v n="$N" 'BEGIN { print i / n }')"
  if [ -n "${KEEP_DIR:-}" ]; then
    mkdir -p "$KEEP_DIR"
    for f in "$out".*; do cp "$f" "$KEEP_DIR/callgrind.$bin_i.$mode.$policy"; done
  fi
  rm -f "$out".*
 done
 done
 bin_i=$((bin_i + 1))
done

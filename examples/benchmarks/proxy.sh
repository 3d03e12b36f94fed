#!/usr/bin/env bash
# Proxy overhead benchmark: the same wrk load against a simulated worker
# directly, through sglr (round_robin, one worker), through nginx as a
# plain keep-alive reverse proxy and, when it is installed, through HAProxy
# (one thread, keep-alive to the worker). Prints requests/s, latency percentiles,
# what each proxy adds to the direct p50, and each proxy's CPU time per
# request (user + system, read from /proc before and after its wrk pass):
# the figure that still compares on a noisy machine.
#
# With SGLR_BASE_BIN set, a second router from that binary joins as target
# "base", so two builds are compared side by side in one run. Target "pd"
# (add it to TARGETS) is the same sglr build in --pd-disaggregation mode
# over a prefill and a decode sim worker: its cpu us/req next to sglr's is
# what PD dispatch costs the router. The prefill is given with bootstrap
# port `none` (PD_BOOTSTRAP), so the decode sim skips its KV-transfer check
# and the sims cost about what the regular one does.
#
# Everything listens on 127.0.0.1; every process started here is stopped by
# its pid on exit.
#
# Target "ca" is the same sglr build with --policy cache_aware: next to
# "sglr" it gives what prefix-aware routing costs per request. With
# PROMPT=chat4k every target gets POST /v1/chat/completions bodies of about
# 4 KB (each request its own prompt after a shared system prompt) instead of the small
# /generate body.
#
# Three passes by default: 32 and 256 connections (throughput, saturated)
# and 1 connection (the latency a proxy adds to one request, without
# queueing).
#
# usage: examples/benchmarks/proxy.sh [-d DURATION] [-c "CONNECTIONS..."] [-t THREADS]
# env:   SGLR_BIN (build/sglr), DURATION (10s), CONNECTIONS ("32 256 1"), THREADS (2),
#        NGINX_WORKERS (1), WORKER_PORT (31801), ROUTER_PORT (31802),
#        NGINX_PORT (31803), BASE_PORT (31804), PD_PORT (31805; prefill and
#        decode workers on 31806-31808), HAPROXY_PORT (31809), CA_PORT (31810),
#        TARGETS ("direct sglr nginx", plus "haproxy" when installed and
#        "base" when SGLR_BASE_BIN is set; "pd" and "ca" on request), PROMPT
#        (small; chat4k), PD_BOOTSTRAP
#        (none; a port makes the decode sim check each room with the prefill),
#        LOGS (off; "on": the routers log at the default info level, one access
#        line per request, to a file, and nginx writes its access_log to one)
set -euo pipefail

SGLR_BIN=${SGLR_BIN:-build/sglr}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32 256 1}
THREADS=${THREADS:-2}
NGINX_WORKERS=${NGINX_WORKERS:-1}
WORKER_PORT=${WORKER_PORT:-31801}
ROUTER_PORT=${ROUTER_PORT:-31802}
NGINX_PORT=${NGINX_PORT:-31803}
SGLR_BASE_BIN=${SGLR_BASE_BIN:-}
BASE_PORT=${BASE_PORT:-31804}
PD_PORT=${PD_PORT:-31805}
HAPROXY_PORT=${HAPROXY_PORT:-31809}
CA_PORT=${CA_PORT:-31810}
PROMPT=${PROMPT:-small}
HAPROXY=
command -v haproxy >/dev/null && HAPROXY=haproxy
if [ -n "$SGLR_BASE_BIN" ]; then TARGETS=${TARGETS:-direct base sglr nginx $HAPROXY}; fi
TARGETS=${TARGETS:-direct sglr nginx $HAPROXY}
case $PROMPT in small|chat4k) ;; *) echo "proxy.sh: PROMPT is small or chat4k" >&2; exit 2 ;; esac
LOGS=${LOGS:-off}
if [ "$LOGS" = on ]; then SGLR_LOG_LEVEL=info; else SGLR_LOG_LEVEL=warn; fi

usage() { sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "d:c:t:h" opt; do
  case $opt in
    d) DURATION=$OPTARG ;;
    c) CONNECTIONS=$OPTARG ;;
    t) THREADS=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

for tool in wrk nginx curl; do
  command -v "$tool" >/dev/null || { echo "proxy.sh: $tool not found (make deps installs it)" >&2; exit 1; }
done
[ -x "$SGLR_BIN" ] || { echo "proxy.sh: $SGLR_BIN not found: build first (make) or set SGLR_BIN" >&2; exit 1; }

. "$(dirname "$0")/lib.sh"
bench_setup proxy-bench

for port in "$WORKER_PORT" "$ROUTER_PORT" "$NGINX_PORT" "$BASE_PORT" "$PD_PORT" "$HAPROXY_PORT" "$CA_PORT"; do
  if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$port/"; then
    echo "proxy.sh: port $port is in use (set WORKER_PORT / ROUTER_PORT / NGINX_PORT)" >&2
    exit 1
  fi
done


"$SGLR_BIN" sim-worker --port "$WORKER_PORT" --max-new-tokens 1 >"$TMP/worker.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$WORKER_PORT/health" worker "$!"

"$SGLR_BIN" run --host 127.0.0.1 --worker-urls "http://127.0.0.1:$WORKER_PORT" --port "$ROUTER_PORT" \
  --policy round_robin --prometheus-port 0 --max-concurrent-requests 0 --log-level "$SGLR_LOG_LEVEL" \
  >"$TMP/sglr.log" 2>&1 &
PIDS+=($!)
SGLR_PID=$!
wait_http "http://127.0.0.1:$ROUTER_PORT/health" sglr "$!"

PD_PID=
if [[ " $TARGETS " == *" pd "* ]]; then
  "$SGLR_BIN" sim-worker --role prefill --port $((PD_PORT + 1)) --bootstrap-port $((PD_PORT + 2)) \
    --max-new-tokens 1 >"$TMP/prefill.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$((PD_PORT + 1))/health" prefill "$!"
  "$SGLR_BIN" sim-worker --role decode --port $((PD_PORT + 3)) --max-new-tokens 1 >"$TMP/decode.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$((PD_PORT + 3))/health" decode "$!"
  "$SGLR_BIN" run --host 127.0.0.1 --port "$PD_PORT" --pd-disaggregation \
    --prefill "http://127.0.0.1:$((PD_PORT + 1))" ${PD_BOOTSTRAP:-none} --decode "http://127.0.0.1:$((PD_PORT + 3))" \
    --policy round_robin --prometheus-port 0 --max-concurrent-requests 0 --log-level "$SGLR_LOG_LEVEL" \
    >"$TMP/pd.log" 2>&1 &
  PIDS+=($!)
  PD_PID=$!
  wait_http "http://127.0.0.1:$PD_PORT/health" pd "$!"
fi

CA_PID=
if [[ " $TARGETS " == *" ca "* ]]; then
  "$SGLR_BIN" run --host 127.0.0.1 --worker-urls "http://127.0.0.1:$WORKER_PORT" --port "$CA_PORT" \
    --policy cache_aware --prometheus-port 0 --max-concurrent-requests 0 --log-level "$SGLR_LOG_LEVEL" \
    >"$TMP/ca.log" 2>&1 &
  PIDS+=($!)
  CA_PID=$!
  wait_http "http://127.0.0.1:$CA_PORT/health" ca "$!"
fi

BASE_PID=
if [ -n "$SGLR_BASE_BIN" ]; then
  "$SGLR_BASE_BIN" run --host 127.0.0.1 --worker-urls "http://127.0.0.1:$WORKER_PORT" --port "$BASE_PORT" \
    --policy round_robin --prometheus-port 0 --max-concurrent-requests 0 --log-level "$SGLR_LOG_LEVEL" \
    >"$TMP/base.log" 2>&1 &
  PIDS+=($!)
  BASE_PID=$!
  wait_http "http://127.0.0.1:$BASE_PORT/health" base "$!"
fi

mkdir -p "$TMP/nginx"
cat >"$TMP/nginx.conf" <<EOF
daemon off;
worker_processes $NGINX_WORKERS;
pid $TMP/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  $( [ "$LOGS" = on ] && echo "access_log $TMP/nginx/access.log;" || echo "access_log off;" )
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  upstream worker {
    server 127.0.0.1:$WORKER_PORT;
    keepalive 1024;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://worker;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
nginx -e "$TMP/nginx/error.log" -c "$TMP/nginx.conf" -p "$TMP/nginx" >"$TMP/nginx.log" 2>&1 &
PIDS+=($!)
NGINX_PID=$!
wait_http "http://127.0.0.1:$NGINX_PORT/health" nginx "$!"

HAPROXY_PID=
if [[ " $TARGETS " == *" haproxy "* ]]; then
  command -v haproxy >/dev/null || { echo "proxy.sh: haproxy not found (apt-get install haproxy)" >&2; exit 1; }
  cat >"$TMP/haproxy.cfg" <<EOF
global
  maxconn 8192
  nbthread 1
$( [ "$LOGS" = on ] && echo "  log stdout format raw local0" )
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
$( [ "$LOGS" = on ] && printf '  log global\n  option httplog\n' )
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend be
backend be
  http-reuse always
  server worker 127.0.0.1:$WORKER_PORT
EOF
  haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
  PIDS+=($!)
  HAPROXY_PID=$!
  wait_http "http://127.0.0.1:$HAPROXY_PORT/health" haproxy "$!"
fi

# cpu_ticks PID: "USER SYSTEM" clock ticks of PID and its children (nginx's
# workers are children of its master)
cpu_ticks() {
  local pids="$1" p usr=0 sys=0 u s
  pids="$pids $(ps -o pid= --ppid "$1" 2>/dev/null || true)"
  for p in $pids; do
    [ -r "/proc/$p/stat" ] || continue
    read -r u s < <(awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$p/stat")
    usr=$(( usr + u )) sys=$(( sys + s ))
  done
  echo "$usr $sys"
}
CLK_TCK=$(getconf CLK_TCK)

bench_wrk_script "$PROMPT" "$TMP/post.lua"

# to_us VALUE: wrk's "812.00us" / "1.23ms" / "1.01s" in microseconds
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) u = n; else if (v ~ /ms$/) u = n * 1000; else if (v ~ /m$/) u = n * 60e6;
    else if (v ~ /s$/) u = n * 1e6; else u = n
    printf "%.0f", u }'
}

# bench CONNS: one wrk pass per target at CONNS connections, then the table
bench() {
  local conns=$1 threads=$THREADS target port out non2xx sockerr added
  [ "$threads" -gt "$conns" ] && threads=$conns
  declare -A RPS P50 P90 P99 ERRS CPU SPLIT
  local pid c0 c1 nreq u0 s0 u1 s1
  echo "wrk -t$threads -c$conns -d$DURATION, POST $PATH_Q ($PROMPT, 1 output token), $(nproc) cores" >&2
  for target in $TARGETS; do
    case $target in
      direct) port=$WORKER_PORT ;;
      sglr) port=$ROUTER_PORT ;;
      base) port=$BASE_PORT ;;
      pd) port=$PD_PORT ;;
      ca) port=$CA_PORT ;;
      nginx) port=$NGINX_PORT ;;
      haproxy) port=$HAPROXY_PORT ;;
      *) echo "proxy.sh: unknown target $target" >&2; exit 2 ;;
    esac
    echo "  $target ..." >&2
    case $target in
      sglr) pid=$SGLR_PID ;; base) pid=$BASE_PID ;; pd) pid=$PD_PID ;; ca) pid=$CA_PID ;;
      nginx) pid=$NGINX_PID ;; haproxy) pid=$HAPROXY_PID ;; *) pid= ;;
    esac
    c0=$([ -n "$pid" ] && cpu_ticks "$pid" || echo 0 0)
    out=$(wrk -t"$threads" -c"$conns" -d"$DURATION" -s "$TMP/post.lua" --latency \
      "http://127.0.0.1:$port$PATH_Q")
    c1=$([ -n "$pid" ] && cpu_ticks "$pid" || echo 0 0)
    echo "$out" >"$TMP/wrk-$target-c$conns.txt"
    nreq=$(awk '/requests in/ {print $1}' <<<"$out")
    CPU[$target]=- SPLIT[$target]=-
    if [ -n "$pid" ] && [ "${nreq:-0}" -gt 0 ]; then
      read -r u0 s0 <<<"$c0"
      read -r u1 s1 <<<"$c1"
      CPU[$target]=$(awk -v t=$(( u1 + s1 - u0 - s0 )) -v hz="$CLK_TCK" -v n="$nreq" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
      SPLIT[$target]=$(awk -v u=$(( u1 - u0 )) -v s=$(( s1 - s0 )) -v hz="$CLK_TCK" -v n="$nreq" \
        'BEGIN { printf "%.1f/%.1f", u * 1e6 / hz / n, s * 1e6 / hz / n }')
    fi
    RPS[$target]=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    P50[$target]=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    P90[$target]=$(to_us "$(awk '$1 == "90%" {print $2}' <<<"$out")")
    P99[$target]=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
    sockerr=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out")
    ERRS[$target]=$(( ${non2xx:-0} + ${sockerr:-0} ))
  done
  printf '\n%d connections\n' "$conns"
  printf '%-8s %12s %10s %10s %10s %12s %12s %12s %8s\n' target "requests/s" "p50 (us)" "p90 (us)" \
    "p99 (us)" "+p50 (us)" "cpu us/req" "usr/sys" errors
  for target in $TARGETS; do
    added="-"
    if [ "$target" != direct ] && [ -n "${P50[direct]:-}" ]; then
      added=$(( P50[$target] - P50[direct] ))
    fi
    printf '%-8s %12s %10s %10s %10s %12s %12s %12s %8s\n' "$target" "${RPS[$target]}" "${P50[$target]}" \
      "${P90[$target]}" "${P99[$target]}" "$added" "${CPU[$target]}" "${SPLIT[$target]}" "${ERRS[$target]}"
  done
  echo
}

for conns in $CONNECTIONS; do bench "$conns"; done
echo "+p50: the target's p50 minus direct's, what the proxy adds to a request. Under a"
echo "saturating load it is mostly queueing (latency = connections / throughput);"
echo "the 1-connection pass shows the per-request cost. cpu us/req: the proxy's own"
echo "user + system time per request (nginx: master and workers), from /proc;"
echo "usr/sys: the same split into user and kernel time."

#!/usr/bin/env bash
# Proxy overhead benchmark: the same wrk load against a simulated worker
# directly, through sglr (round_robin, one worker) and through nginx as a
# plain keep-alive reverse proxy. Prints requests/s and latency percentiles
# per target and what each proxy adds to the direct p50.
#
# Everything listens on 127.0.0.1; every process started here is stopped by
# its pid on exit.
#
# Two passes by default: 64 connections (throughput, saturated) and 1
# connection (the latency a proxy adds to one request, without queueing).
#
# usage: examples/benchmarks/proxy.sh [-d DURATION] [-c "CONNECTIONS..."] [-t THREADS]
# env:   SGLR_BIN (build/sglr), DURATION (10s), CONNECTIONS ("64 1"), THREADS (2),
#        NGINX_WORKERS (1), WORKER_PORT (31801), ROUTER_PORT (31802),
#        NGINX_PORT (31803), TARGETS ("direct sglr nginx")
set -euo pipefail

SGLR_BIN=${SGLR_BIN:-build/sglr}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64 1}
THREADS=${THREADS:-2}
NGINX_WORKERS=${NGINX_WORKERS:-1}
WORKER_PORT=${WORKER_PORT:-31801}
ROUTER_PORT=${ROUTER_PORT:-31802}
NGINX_PORT=${NGINX_PORT:-31803}
TARGETS=${TARGETS:-direct sglr nginx}

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
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

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sglr-proxy-bench.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in "$WORKER_PORT" "$ROUTER_PORT" "$NGINX_PORT"; do
  if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$port/"; then
    echo "proxy.sh: port $port is in use (set WORKER_PORT / ROUTER_PORT / NGINX_PORT)" >&2
    exit 1
  fi
done

# wait_http URL NAME PID: until URL answers 200, or fail if PID died
wait_http() {
  for _ in $(seq 1 100); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)" = 200 ]; then return 0; fi
    kill -0 "$3" 2>/dev/null || { echo "proxy.sh: $2 exited; its log:" >&2; cat "$TMP/$2.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "proxy.sh: $2 did not answer $1" >&2
  exit 1
}

"$SGLR_BIN" sim-worker --port "$WORKER_PORT" --max-new-tokens 1 >"$TMP/worker.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$WORKER_PORT/health" worker "$!"

"$SGLR_BIN" run --host 127.0.0.1 --worker-urls "http://127.0.0.1:$WORKER_PORT" --port "$ROUTER_PORT" \
  --policy round_robin --prometheus-port 0 --max-concurrent-requests 0 --log-level warn \
  >"$TMP/sglr.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$ROUTER_PORT/health" sglr "$!"

mkdir -p "$TMP/nginx"
cat >"$TMP/nginx.conf" <<EOF
daemon off;
worker_processes $NGINX_WORKERS;
pid $TMP/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  upstream worker {
    server 127.0.0.1:$WORKER_PORT;
    keepalive 64;
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
wait_http "http://127.0.0.1:$NGINX_PORT/health" nginx "$!"

cat >"$TMP/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"text":"hello","sampling_params":{"max_new_tokens":1}}'
wrk.headers["Content-Type"] = "application/json"
EOF

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
  declare -A RPS P50 P90 P99 ERRS
  echo "wrk -t$threads -c$conns -d$DURATION, POST /generate (max_new_tokens 1), $(nproc) cores" >&2
  for target in $TARGETS; do
    case $target in
      direct) port=$WORKER_PORT ;;
      sglr) port=$ROUTER_PORT ;;
      nginx) port=$NGINX_PORT ;;
      *) echo "proxy.sh: unknown target $target" >&2; exit 2 ;;
    esac
    echo "  $target ..." >&2
    out=$(wrk -t"$threads" -c"$conns" -d"$DURATION" -s "$TMP/post.lua" --latency \
      "http://127.0.0.1:$port/generate")
    echo "$out" >"$TMP/wrk-$target-c$conns.txt"
    RPS[$target]=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    P50[$target]=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    P90[$target]=$(to_us "$(awk '$1 == "90%" {print $2}' <<<"$out")")
    P99[$target]=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
    sockerr=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out")
    ERRS[$target]=$(( ${non2xx:-0} + ${sockerr:-0} ))
  done
  printf '\n%d connections\n' "$conns"
  printf '%-8s %12s %10s %10s %10s %12s %8s\n' target "requests/s" "p50 (us)" "p90 (us)" \
    "p99 (us)" "+p50 (us)" errors
  for target in $TARGETS; do
    added="-"
    if [ "$target" != direct ] && [ -n "${P50[direct]:-}" ]; then
      added=$(( P50[$target] - P50[direct] ))
    fi
    printf '%-8s %12s %10s %10s %10s %12s %8s\n' "$target" "${RPS[$target]}" "${P50[$target]}" \
      "${P90[$target]}" "${P99[$target]}" "$added" "${ERRS[$target]}"
  done
  echo
}

for conns in $CONNECTIONS; do bench "$conns"; done
echo "+p50: the target's p50 minus direct's, what the proxy adds to a request. Under a"
echo "saturating load it is mostly queueing (latency = connections / throughput);"
echo "the 1-connection pass shows the per-request cost."

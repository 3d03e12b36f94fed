#!/usr/bin/env bash
# CPU per request of two proxies loaded at the same time, head to head.
#
# proxy.sh measures one proxy after another, so on a shared machine a
# stretch of noise lands on one of them and not the other, and runs move
# 10-20%. Here each of the two targets gets its own sim worker and its own
# wrk (-t1, CONNECTIONS connections), both loads run over the same seconds,
# and each proxy's user and system time is read from /proc before and after:
# whatever the machine does during a run, it does to both. The two share the
# cores and the caches, so the absolute figures are higher than proxy.sh's;
# the difference is what this compares. RUNS such runs, then the mean and
# median of each and the mean difference (B - A) with its standard error.
#
# A target is "nginx" (a keep-alive reverse proxy, access log off unless
# LOGS=on) or "sglr", "sglr=BIN" (another build), each optionally
# ":POLICY" (round_robin by default), e.g.
#   examples/benchmarks/cpu_pair.sh sglr=OLD_BIN sglr          two builds
#   examples/benchmarks/cpu_pair.sh sglr nginx                 sglr against nginx
#   PROMPT=chat4k examples/benchmarks/cpu_pair.sh sglr sglr:cache_aware
#
# Everything listens on 127.0.0.1; every process started here is stopped by
# its pid on exit.
#
# LuaJIT compiles a process's traces in an order that depends on timing,
# and two processes of one build can differ by a third in CPU a request
# (the README's benchmarks say more): with INSTANCES=K both targets are
# started afresh K times, RUNS runs each time, so that one lucky or
# unlucky process does not decide the comparison.
#
# usage: examples/benchmarks/cpu_pair.sh A B
# env:   SGLR_BIN (build/sglr: the sim workers, and "sglr"), RUNS (20 in
#        all, RUNS / INSTANCES per start), INSTANCES (1),
#        DURATION (4s a run), CONNECTIONS (16 each), PROMPT (small; chat4k),
#        LOGS (off; on: the routers log at info, nginx writes an access log),
#        PORT_BASE (31840: workers and proxies on the four ports from it)
set -euo pipefail

SGLR_BIN=${SGLR_BIN:-build/sglr}
RUNS=${RUNS:-20}
INSTANCES=${INSTANCES:-1}
DURATION=${DURATION:-4s}
CONNECTIONS=${CONNECTIONS:-16}
PROMPT=${PROMPT:-small}
LOGS=${LOGS:-off}
PORT_BASE=${PORT_BASE:-31840}

if [ $# -ne 2 ]; then sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; fi
case $PROMPT in small|chat4k) ;; *) echo "cpu_pair.sh: PROMPT is small or chat4k" >&2; exit 2 ;; esac
for tool in wrk curl; do
  command -v "$tool" >/dev/null || { echo "cpu_pair.sh: $tool not found (make deps installs it)" >&2; exit 1; }
done
[ -x "$SGLR_BIN" ] || { echo "cpu_pair.sh: $SGLR_BIN not found: build first (make)" >&2; exit 1; }
if [ "$LOGS" = on ]; then LEVEL=info; else LEVEL=warn; fi

. "$(dirname "$0")/lib.sh"
bench_setup cpu-pair


bench_wrk_script "$PROMPT" "$TMP/post.lua"

NAMES=() PORTS=() PROXY=() WORKER=()
start_target() {   # INDEX SPEC
  local i=$1 spec=$2 wport=$((PORT_BASE + 2 * $1)) port=$((PORT_BASE + 2 * $1 + 1))
  "$SGLR_BIN" sim-worker --host 127.0.0.1 --port "$wport" --max-new-tokens 1 >"$TMP/worker$i.log" 2>&1 &
  PIDS+=($!)
  WORKER[$i]=$!
  wait_http "http://127.0.0.1:$wport/health" "worker$i" "$!"
  local name=${spec%%:*} policy=round_robin bin=$SGLR_BIN
  [[ $spec == *:* ]] && policy=${spec#*:}
  if [ "$name" = nginx ]; then
    command -v nginx >/dev/null || { echo "cpu_pair.sh: nginx not found" >&2; exit 1; }
    mkdir -p "$TMP/nginx$i"
    cat >"$TMP/nginx$i.conf" <<EOF
daemon off;
worker_processes 1;
pid $TMP/nginx$i/nginx.pid;
error_log $TMP/nginx$i/error.log warn;
events { worker_connections 4096; }
http {
  $( [ "$LOGS" = on ] && echo "access_log $TMP/nginx$i/access.log;" || echo "access_log off;" )
  client_body_temp_path $TMP/nginx$i/body;
  proxy_temp_path $TMP/nginx$i/proxy;
  fastcgi_temp_path $TMP/nginx$i/fastcgi;
  uwsgi_temp_path $TMP/nginx$i/uwsgi;
  scgi_temp_path $TMP/nginx$i/scgi;
  upstream worker { server 127.0.0.1:$wport; keepalive 1024; }
  server {
    listen 127.0.0.1:$port;
    location / { proxy_pass http://worker; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
    nginx -e "$TMP/nginx$i/error.log" -c "$TMP/nginx$i.conf" -p "$TMP/nginx$i" >"$TMP/target$i.log" 2>&1 &
  else
    [[ $name == sglr=* ]] && bin=${name#sglr=}
    [ -x "$bin" ] || { echo "cpu_pair.sh: $bin not found" >&2; exit 1; }
    "$bin" run --host 127.0.0.1 --worker-urls "http://127.0.0.1:$wport" --port "$port" --policy "$policy" \
      --prometheus-port 0 --max-concurrent-requests 0 --log-level "$LEVEL" >"$TMP/target$i.log" 2>&1 &
  fi
  PIDS+=($!)
  PROXY[$i]=$!
  wait_http "http://127.0.0.1:$port/health" "target$i" "$!"
  NAMES[$i]=$spec
  PORTS[$i]=$port
}
# a target's proxy and sim worker stopped (by their pids), for a fresh start
stop_target() {   # INDEX
  local pid
  for pid in "${PROXY[$1]}" "${WORKER[$1]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# user and system clock ticks of a process and its children (nginx: master
# and worker)
ticks() {
  local pid tot_u=0 tot_s=0 u s
  for pid in "$1" $(pgrep -P "$1" || true); do
    read -r u s < <(awk '{ print $14, $15 }' "/proc/$pid/stat")
    tot_u=$((tot_u + u)); tot_s=$((tot_s + s))
  done
  echo "$tot_u $tot_s"
}
TCK=$(getconf CLK_TCK)

load() {   # DURATION: both targets at once
  local w=() i
  for i in 0 1; do
    wrk -t1 -c"$CONNECTIONS" -d"$1" -s "$TMP/post.lua" "http://127.0.0.1:${PORTS[$i]}$PATH_Q" >"$TMP/wrk$i.out" &
    w+=($!)
  done
  wait "${w[@]}"
}

PER=$(( (RUNS + INSTANCES - 1) / INSTANCES ))
echo "head to head: $1 (A) and $2 (B), $RUNS runs of $DURATION over $INSTANCES start(s), wrk -t1 -c$CONNECTIONS each, $PROMPT" >&2
: >"$TMP/runs"
r=0
for inst in $(seq 1 "$INSTANCES"); do
  if [ "$inst" -gt 1 ]; then stop_target 0; stop_target 1; fi
  start_target 0 "$1"
  start_target 1 "$2"
  load 2s    # warm-up: the JIT compiles, the pools fill
  for _ in $(seq 1 "$PER"); do
    [ "$r" -lt "$RUNS" ] || break
    r=$((r + 1))
    read -r u0a s0a < <(ticks "${PROXY[0]}"); read -r u0b s0b < <(ticks "${PROXY[1]}")
    load "$DURATION"
    read -r u1a s1a < <(ticks "${PROXY[0]}"); read -r u1b s1b < <(ticks "${PROXY[1]}")
    na=$(awk '/requests in/ { print $1 }' "$TMP/wrk0.out"); nb=$(awk '/requests in/ { print $1 }' "$TMP/wrk1.out")
    awk -v r="$r" -v t="$TCK" -v na="$na" -v nb="$nb" -v ua=$((u1a - u0a)) -v sa=$((s1a - s0a)) \
      -v ub=$((u1b - u0b)) -v sb=$((s1b - s0b)) 'BEGIN {
        printf "%d %.3f %.3f %.3f %.3f\n", r, (ua + sa) * 1e6 / t / na, ua * 1e6 / t / na,
          (ub + sb) * 1e6 / t / nb, ub * 1e6 / t / nb }' >>"$TMP/runs"
    awk -v r="$r" -v i="$inst" '$1 == r { printf "run %2d (start %d)   A %6.2f us (user %5.2f)   B %6.2f us (user %5.2f)\n", $1, i, $2, $3, $4, $5 }' "$TMP/runs"
  done
done

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
for col in 2 4; do
  name=A; [ "$col" = 4 ] && name=B
  mt=$(awk -v c="$col" '{ print $c }' "$TMP/runs" | median)
  mu=$(awk -v c=$((col + 1)) '{ print $c }' "$TMP/runs" | median)
  awk -v c="$col" -v n="$name" -v s="${NAMES[$([ "$col" = 2 ] && echo 0 || echo 1)]}" -v mt="$mt" -v mu="$mu" '
    { t += $c; u += $(c + 1) } END {
      printf "%s %-24s cpu us/req mean %.2f median %.2f   user mean %.2f median %.2f\n", n, s, t / NR, mt, u / NR, mu }' "$TMP/runs"
done
awk '{ d = $4 - $2; du = $5 - $3; s += d; ss += d * d; su += du; ssu += du * du; if (du < 0) lower++ } END {
  n = NR; m = s / n; mu = su / n
  se = n > 1 ? sqrt((ss - n * m * m) / (n - 1) / n) : 0
  seu = n > 1 ? sqrt((ssu - n * mu * mu) / (n - 1) / n) : 0
  printf "B - A: cpu %+.2f us/req (standard error %.2f), user %+.2f (%.2f); B used less user time in %d of %d runs\n",
    m, se, mu, seu, lower, n }' "$TMP/runs"

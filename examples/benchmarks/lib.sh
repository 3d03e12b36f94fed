# lib.sh: what the benchmark scripts share (sourced, not run).
#
#   bench_setup NAME    BENCH=NAME, TMP a fresh temp dir, PIDS the processes
#                       to stop: on exit each is killed and waited for by
#                       its pid, and TMP removed
#   wait_http URL NAME PID [TRIES]
#                       until URL answers 200 (TRIES tenths of a second,
#                       100 by default), or fail, with TMP/NAME.log shown,
#                       as soon as PID has exited

bench_setup() {
  BENCH=$1
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/sglr-$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}

wait_http() {
  local tries=${4:-100}
  for _ in $(seq 1 "$tries"); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true)" = 200 ]; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then
      echo "$BENCH: $2 exited" >&2
      [ -f "$TMP/$2.log" ] && cat "$TMP/$2.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "$BENCH: $2 did not answer $1" >&2
  exit 1
}

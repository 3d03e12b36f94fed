# lib.sh: what the benchmark scripts share (sourced, not run).
#
#   bench_setup NAME    BENCH=NAME, TMP a fresh temp dir, PIDS the processes
#                       to stop: on exit each is killed and waited for by
#                       its pid, and TMP removed
#   bench_wrk_script PROMPT FILE
#                       the wrk script of a load into FILE, PATH_Q its path:
#                       small (a short POST /generate) or chat4k (chat
#                       completions of about 4 KB, each request its own
#                       question after a shared system prompt)
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

bench_wrk_script() {
  PATH_Q=/generate
  if [ "$1" = chat4k ]; then
    PATH_Q=/v1/chat/completions
    cat >"$2" <<'LUA'
-- chat prompts of about 4 KB: a shared system prompt, then a question no
-- earlier request asked (as live traffic), of varying length
local system = ("You are a careful assistant for a GPU fleet. "):rep(20)
local filler = ("how do I size the KV cache for this model? "):rep(70)
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  n = n + 1
  local user = "Question " .. tostring(id) .. "-" .. n .. ": " .. filler:sub(1, 2700 + n % 64 * 9)
  return wrk.format(nil, nil, nil, '{"model":"m","max_tokens":1,"messages":[{"role":"system","content":"' ..
    system .. '"},{"role":"user","content":"' .. user .. '"}]}')
end
LUA
  else
    cat >"$2" <<'LUA'
wrk.method = "POST"
wrk.body = '{"text":"hello","sampling_params":{"max_new_tokens":1}}'
wrk.headers["Content-Type"] = "application/json"
LUA
  fi
}

#!/usr/bin/env bash
# perf/instructions.sh — user-space instructions per proxied request, counted by callgrind.
#
# Usage (from the project root):
#   perf/instructions.sh [--skip-build] [--duration S] [--connections C] [--top N]
#                        [--extra TOML]
#
# --extra TOML is added to the proxied route as perf/run.sh's cases do (e.g. a mapping), to
# count what a feature costs per request. Ports: BACKEND_PORT (18080), PORT (18082) and
# ADMIN_PORT (19901) in the environment override the defaults when those are taken.
#
# Runs the release gateway (one worker, io_uring) under `valgrind --tool=callgrind` in front of
# the nginx backend of perf/run.sh (port 18080), drives it with `wrk -t1 -cC -dS` on the proxied
# route, stops it, and prints total instructions / requests served, then the N functions with
# the most inclusive instructions. Unlike wall-clock or CPU-time figures this count repeats
# exactly for the same binary and inputs whatever else the machine does, so it shows the
# effect of a hot-path change that is too small to see through the machine's noise. It counts
# only user space (the kernel's share — about 80% of CPU per request — is not in it), and only
# the measured run: a 1 s warm-up comes first, and start-up and shutdown are not counted.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=6
CONNECTIONS=16
TOP=25
SKIP_BUILD=0
EXTRA=
while [[ $# -gt 0 ]]; do
    case $1 in
        --skip-build) SKIP_BUILD=1 ;;
        --duration) DURATION=$2; shift ;;
        --connections) CONNECTIONS=$2; shift ;;
        --top) TOP=$2; shift ;;
        --extra) EXTRA=$2; shift ;;
        *) die "unknown option $1 (see the head of $0)" ;;
    esac
    shift
done
command -v valgrind >/dev/null || die "valgrind is not installed"
command -v wrk >/dev/null || die "wrk is not installed"
if [[ $SKIP_BUILD == 0 ]]; then
    (cd "$ROOT_DIR" && cargo build --release --quiet) || die "cargo build --release failed"
fi

BACKEND_PORT=${BACKEND_PORT:-18080}
PORT=${PORT:-18082}
ADMIN_PORT=${ADMIN_PORT:-19901}
require_free_port $BACKEND_PORT
require_free_port $PORT
require_free_port $ADMIN_PORT
perf_setup instructions
write_nginx_backend backend $BACKEND_PORT
start_nginx backend
write_ringgate_config "$OUT/ringgate.toml" $PORT $ADMIN_PORT io_uring "$OUT/state" "$EXTRA"
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
    "$RINGGATE_BIN" --config "$OUT/ringgate.toml" >"$OUT/ringgate.log" 2>&1 &
RG_PID=$!
PERF_PIDS+=("$RG_PID")
wait_http "http://127.0.0.1:$PORT/hello" "$RG_PID" "$OUT/ringgate.log" 60
# Warm up (pools, caches), then count only the measured run: counters are zeroed before it
# and dumped after it with callgrind_control, so start-up and shutdown are left out (and the
# count does not depend on the gateway seeing a signal under valgrind, which it sometimes
# does not).
wrk -t1 -c"$CONNECTIONS" -d1s "http://127.0.0.1:$PORT/hello" >/dev/null
callgrind_control -z "$RG_PID" >/dev/null 2>&1
log "wrk -t1 -c$CONNECTIONS -d${DURATION}s under callgrind"
wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:$PORT/hello" >"$OUT/wrk.txt"
REQS=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
callgrind_control -d "$RG_PID" >/dev/null 2>&1
FILE=$(ls -t "$OUT"/callgrind.out* | head -n1)
TOTAL=$(callgrind_annotate "$FILE" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
[[ -n $TOTAL && $REQS -gt 0 ]] || die "no callgrind totals or no requests (see $OUT)"
echo "requests: $REQS"
echo "instructions: $TOTAL"
echo "instructions per request: $((TOTAL / REQS))"
echo
echo "top $TOP functions by inclusive instructions per request:"
callgrind_annotate --inclusive=yes "$FILE" 2>/dev/null \
    | awk -v r="$REQS" -v top="$TOP" '
        /^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
            n = $1; gsub(",", "", n)
            line = $0; sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", line)
            sub(/ \[.*\]$/, "", line)
            gsub(/\/rustc\/[0-9a-f]+\/library\//, "", line)
            gsub(/\/root\/\.cargo\/registry\/src\/[^\/]+\//, "", line)
            if (++k <= top + 8) printf "%8d  %s\n", n / r, line
        }' | tail -n "$TOP"
echo
echo "raw: $OUT"

#!/usr/bin/env bash
# perf/idle_conns.sh — RSS per idle keep-alive client connection: nginx vs ringgate.
#
# Usage (from the project root; does not build, uses target/release/ringgate when present):
#   perf/idle_conns.sh [--conns 10000] [--io io_uring|epoll] [--only nginx-direct,nginx-proxy,ringgate]
#
# Targets, each measured on its own (one after another, same machine state):
#   nginx-direct  nginx (1 worker) answering `return 200 "hello world\n"` itself    :18080
#   nginx-proxy   nginx (1 worker) reverse proxy to nginx-direct, upstream keepalive 256  :18081
#   ringgate      the gateway, workers = 1, proxying to nginx-direct                 :18082
# For each: open/use/close 200 warm-up connections, read VmRSS, open N connections that each
# send one `GET /hello HTTP/1.1` request, read the full response and then stay idle, wait 2 s,
# read VmRSS again; report (after - before) / N in KiB: for the worker process (the figure
# to compare: nginx's worker, ringgate's single process) and for master+worker.
# The helper perf/idle_conns.py does the connecting and measuring.
# Open files: hard limit 20,000 here; the client holds N fds and the server N (+ a few upstream).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BACKEND_PORT=18080
NGINX_PROXY_PORT=18081
RG_PORT=18082
RG_ADMIN_PORT=19901
CONNS=10000
IO=io_uring
ONLY=nginx-direct,nginx-proxy,ringgate

while [[ $# -gt 0 ]]; do
    case $1 in
        --conns) CONNS=$2; shift ;;
        --io) IO=$2; shift ;;
        --only) ONLY=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done
want() { [[ ,$ONLY, == *",$1,"* ]]; }

ulimit -n 20000 || die "cannot raise the open-files limit to 20000 (hard limit: $(ulimit -Hn))"
perf_setup idle
RESULTS=()

# measure LABEL PORT WORKER_PID ALL_PIDS [UPSTREAM_PORT]
measure() {
    local label=$1 port=$2 worker=$3 pids=$4 up=${5:-0} out
    log "$label: opening $CONNS idle connections to :$port"
    out=$(python3 "$PERF_DIR/idle_conns.py" --label "$label" --port "$port" --worker-pid "$worker" \
        --pids "$pids" --conns "$CONNS" --upstream-port "$up") || die "idle_conns.py failed for $label"
    echo "$out" | tee -a "$OUT/idle.txt" | grep -v '^RESULT'
    RESULTS+=("$(echo "$out" | grep '^RESULT')")
    sleep 1   # let the server close its side before the next target
}

# The backend always runs (nginx-proxy and ringgate need it).
require_free_port $BACKEND_PORT
write_nginx_backend backend $BACKEND_PORT
start_nginx backend
BACKEND_MASTER=$NGINX_MASTER BACKEND_WORKER=$NGINX_WORKER
wait_http "http://127.0.0.1:$BACKEND_PORT/" "$BACKEND_MASTER" "$OUT/backend/error.log"

if want nginx-direct; then
    measure nginx-direct $BACKEND_PORT "$BACKEND_WORKER" "$BACKEND_MASTER,$BACKEND_WORKER"
fi

if want nginx-proxy; then
    require_free_port $NGINX_PROXY_PORT
    write_nginx_proxy nginx-proxy $NGINX_PROXY_PORT $BACKEND_PORT
    start_nginx nginx-proxy
    wait_http "http://127.0.0.1:$NGINX_PROXY_PORT/" "$NGINX_MASTER" "$OUT/nginx-proxy/error.log"
    measure nginx-proxy $NGINX_PROXY_PORT "$NGINX_WORKER" "$NGINX_MASTER,$NGINX_WORKER" $BACKEND_PORT
fi

if want ringgate; then
    if [[ -x $RINGGATE_BIN ]]; then
        require_free_port $RG_PORT
        require_free_port $RG_ADMIN_PORT
        write_ringgate_config "$OUT/ringgate.toml" $RG_PORT $RG_ADMIN_PORT "$IO" "$OUT/state" ""
        start_ringgate ringgate "$OUT/ringgate.toml"
        wait_http "http://127.0.0.1:$RG_ADMIN_PORT/healthz" "$RG_PID" "$OUT/ringgate.log"
        wait_http "http://127.0.0.1:$RG_PORT/hello" "$RG_PID" "$OUT/ringgate.log"
        log "ringgate io driver: $(io_driver_of "$OUT/ringgate.log")"
        measure ringgate $RG_PORT "$RG_PID" "$RG_PID" $BACKEND_PORT
    else
        log "skipping ringgate: no binary at $RINGGATE_BIN"
    fi
fi

# ---------------------------------------------------------------- summary --
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"; }
echo
echo "Idle keep-alive connections: RSS growth per connection (KiB), N=$CONNS"
printf '%-14s %10s %12s %14s %10s\n' target worker/conn total/conn open-after-2s upstream
declare -A PER
for r in "${RESULTS[@]}"; do
    label=$(field "$r" label)
    PER[$label]=$(field "$r" worker_kb_per_conn)
    up=$(field "$r" upstream_conns); [[ $up == -1 ]] && up=-
    printf '%-14s %10s %12s %14s %10s\n' "$label" "${PER[$label]}" "$(field "$r" total_kb_per_conn)" \
        "$(field "$r" open_after_wait)/$(field "$r" conns)" "$up"
done
if [[ -n ${PER[ringgate]:-} && -n ${PER[nginx-proxy]:-} ]]; then
    awk -v a="${PER[ringgate]}" -v b="${PER[nginx-proxy]}" \
        'BEGIN { printf "ringgate / nginx-proxy (worker KiB per idle connection): %s / %s = %s\n", a, b, (b > 0) ? sprintf("%.2f", a / b) : "n/a (nginx grew by <= 0)" }'
fi
echo "raw: $OUT"

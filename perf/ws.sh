#!/usr/bin/env bash
# perf/ws.sh — WebSocket pass-through: ringgate vs nginx's WebSocket proxying of the same echo
# backend, interleaved in one run; then memory per idle WebSocket connection for both.
#
# Usage (from the project root):
#   perf/ws.sh [--skip-build] [--duration 5] [--rounds 2] [--conns 64] [--size 32] [--idle 9900]
#
# What runs (127.0.0.1, one worker each):
#   18085  examples/ws_echo.rs: WebSocket echo backend (one monoio thread)
#   18086  nginx (1 worker) proxying WebSocket to the backend (proxy_http_version 1.1, Upgrade)
#   18087  ringgate (workers = 1), `ANY /{proxy+}` http route to the backend: pass-through
#   18088  ringgate (workers = 1), a WebSocket API (mock $default): idle memory only
# Load: examples/ws_load.rs, one monoio thread: --conns connections each send a --size byte text
# message and wait for its echo, in a loop; messages/s, p50 and p99 round trip (µs).
# Idle: --idle connections opened through each proxy (handshake done, then silent); the proxy's
# RSS after minus before, divided by the count (nginx: the worker process). The open-files hard
# limit is 20,000 here and a proxy holds 2 fds per connection, hence 9,900 by default.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BACKEND_PORT=${WS_BACKEND_PORT:-18085}
NGINX_PORT=${WS_NGINX_PORT:-18086}
RG_PORT=${WS_RG_PORT:-18087}
RG_ADMIN=${WS_RG_ADMIN:-19905}
API_PORT=${WS_API_PORT:-18088}
API_ADMIN=${WS_API_ADMIN:-19906}
DURATION=5 ROUNDS=2 CONNS=64 SIZE=32 IDLE=9900 SKIP_BUILD=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --skip-build) SKIP_BUILD=1 ;;
        --duration) DURATION=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --conns) CONNS=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --idle) IDLE=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done
ulimit -n 20000 || die "cannot raise the open-files limit"
if [[ $SKIP_BUILD == 0 ]]; then
    (cd "$ROOT_DIR" && cargo build --release --bin ringgate --example ws_echo --example ws_load) >&2
fi
ECHO_BIN=$ROOT_DIR/target/release/examples/ws_echo
LOAD_BIN=$ROOT_DIR/target/release/examples/ws_load
perf_setup ws
for p in $BACKEND_PORT $NGINX_PORT $RG_PORT $API_PORT; do require_free_port $p; done

"$ECHO_BIN" $BACKEND_PORT >"$OUT/echo.log" 2>&1 &
ECHO_PID=$!
PERF_PIDS+=("$ECHO_PID")

mkdir -p "$OUT/nginx/tmp"
{
    _nginx_head "$OUT/nginx" | sed 's/worker_connections 16384/worker_connections 20000/'
    cat <<EOF
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://127.0.0.1:$BACKEND_PORT;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }
    }
}
EOF
} >"$OUT/nginx/nginx.conf"
start_nginx nginx
NGINX_W=$NGINX_WORKER

write_ringgate_config "$OUT/ringgate.toml" $RG_PORT $RG_ADMIN io_uring "$OUT/state" ''
# Unpinned like nginx's worker: on this shared 2-core machine a pinned worker waits whenever
# its core is busy with something else, while nginx's worker moves to the free one.
sed -i 's/^workers = 1$/workers = 1\npin_workers = false/' "$OUT/ringgate.toml"
start_ringgate ringgate "$OUT/ringgate.toml"
for i in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$RG_ADMIN/healthz" && break
    sleep 0.1
done
sleep 0.5

cat >"$OUT/api.toml" <<EOF
[server]
listen = ["127.0.0.1:$API_PORT"]
workers = 1
pin_workers = false
state_dir = "$OUT/state-api"
[admin]
listen = "127.0.0.1:$API_ADMIN"
[[apis]]
name = "chat"
protocol = "websocket"
[[apis.routes]]
route = "\$default"
integration = { type = "mock", status = 200, body = "" }
EOF
RG_PID_MAIN=$RG_PID
start_ringgate ringgate-api "$OUT/api.toml"
API_PID=$RG_PID
RG_PID=$RG_PID_MAIN
for i in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$API_ADMIN/healthz" && break
    sleep 0.1
done

SYSTEMS=(nginx ringgate)
declare -A PORT=([nginx]=$NGINX_PORT [ringgate]=$RG_PORT [ringgate-api]=$API_PORT)
declare -A PID=([nginx]=$NGINX_W [ringgate]=$RG_PID [ringgate-api]=$API_PID)
declare -A WSPATH=([nginx]=/ws [ringgate]=/ws [ringgate-api]=/)

printf 'round\tsystem\tmsgs\tmsgs_per_s\tp50_us\tp99_us\tproxy_cpu_us_per_msg\n' >"$OUT/results.tsv"
for s in "${SYSTEMS[@]}"; do
    "$LOAD_BIN" bench "127.0.0.1:${PORT[$s]}" /ws "$CONNS" 1 "$SIZE" >/dev/null   # warm-up
done
for r in $(seq "$ROUNDS"); do
    for s in "${SYSTEMS[@]}"; do
        c0=$(proc_cpu_ticks "${PID[$s]}")
        read -r msgs mps p50 p99 < <("$LOAD_BIN" bench "127.0.0.1:${PORT[$s]}" /ws "$CONNS" "$DURATION" "$SIZE")
        c1=$(proc_cpu_ticks "${PID[$s]}")
        cpu=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$msgs" 'BEGIN { printf "%.2f", n ? d / hz * 1e6 / n : 0 }')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$s" "$msgs" "$mps" "$p50" "$p99" "$cpu" | tee -a "$OUT/results.tsv"
    done
done

# Idle memory per connection.
printf 'system\tconns\trss_before_kib\trss_after_kib\tkib_per_conn\n' >"$OUT/idle.tsv"
for s in "${SYSTEMS[@]}" ringgate-api; do
    before=$(rss_kb "${PID[$s]}")
    rm -f "$OUT/ready.$s"
    "$LOAD_BIN" idle "127.0.0.1:${PORT[$s]}" "${WSPATH[$s]}" "$IDLE" "$OUT/ready.$s" &
    LP=$!
    for i in $(seq 600); do [[ -s $OUT/ready.$s ]] && break; sleep 0.1; done
    sleep 2
    after=$(rss_kb "${PID[$s]}")
    opened=$(cat "$OUT/ready.$s" 2>/dev/null || echo 0)
    kill "$LP"; wait "$LP" 2>/dev/null || true
    per=$(awk -v a="$after" -v b="$before" -v n="$opened" 'BEGIN { printf "%.2f", n ? (a - b) / n : 0 }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$s" "$opened" "$before" "$after" "$per" | tee -a "$OUT/idle.tsv"
    sleep 2
done

python3 - "$OUT/results.tsv" "$OUT/idle.tsv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = {}
for s in ("nginx", "ringgate"):
    r = [x for x in rows if x["system"] == s]
    med[s] = {k: statistics.median(float(x[k]) for x in r) for k in ("msgs_per_s", "p50_us", "p99_us", "proxy_cpu_us_per_msg")}
    print(f"{s:9s} median msgs/s {med[s]['msgs_per_s']:.0f}  p50 {med[s]['p50_us']:.0f} us  p99 {med[s]['p99_us']:.0f} us  cpu/msg {med[s]['proxy_cpu_us_per_msg']:.2f} us")
print(f"ratio ringgate/nginx: msgs/s {med['ringgate']['msgs_per_s'] / med['nginx']['msgs_per_s']:.2f}  p99 {med['ringgate']['p99_us'] / med['nginx']['p99_us']:.2f}")
idle = {x["system"]: x for x in csv.DictReader(open(sys.argv[2]), delimiter="\t")}
for s, x in idle.items():
    print(f"idle {s:9s} {x['conns']} conns: {x['kib_per_conn']} KiB/conn")
PY
log "results in $OUT"

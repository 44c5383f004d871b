# shellcheck shell=bash
# perf/lib.sh — helpers shared by perf/run.sh and perf/idle_conns.sh. Source it, don't run it.
#
# Provides:
#   perf_setup NAME            make $OUT (perf/out/NAME-<timestamp>), install the cleanup trap
#   write_nginx_backend N PORT               nginx, 1 worker, `return 200 "hello world\n"`
#   write_nginx_proxy N PORT UPSTREAM_PORT [fwd]   nginx reverse proxy, upstream keepalive 256
#                                            (fwd: with ringgate's forwarding and request-id headers)
#   write_nginx_proxy_cache N PORT UPSTREAM_PORT   the same with a proxy_cache zone (200 kept 1 h)
#   start_nginx N              start $OUT/N/nginx.conf (daemon off, background); sets NGINX_MASTER/NGINX_WORKER
#   write_ringgate_config FILE PORT ADMIN_PORT IO STATE_DIR EXTRA_TOML
#   start_ringgate N CONF      start the gateway binary ($RINGGATE_BIN); sets RG_PID
#   wait_http URL PID LOG      wait until URL answers (any HTTP status), fail if PID dies
#   proc_cpu_ticks PID         utime+stime (clock ticks) summed over /proc/PID/task/*/stat
#   machine_cpu_ticks          "busy total" ticks of the whole machine (/proc/stat)
#   children_cpu_ticks         sets CHILD_TICKS: CPU ticks of this shell's reaped children
#   rss_kb PID                 VmRSS in KiB
#   io_driver_of LOG           the "io driver: ..." line ringgate logged, or "unknown"
#
# Every process started here is recorded in PERF_PIDS and stopped (by pid) on exit.

PERF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT_DIR=$(cd "$PERF_DIR/.." && pwd)
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
RINGGATE_BIN=${RINGGATE_BIN:-$ROOT_DIR/target/release/ringgate}
CLK_TCK=$(getconf CLK_TCK)
PERF_PIDS=()

log() { printf '[perf %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

perf_setup() {
    local name=$1
    OUT=$ROOT_DIR/perf/out/$name-$(date +%Y%m%d-%H%M%S)
    mkdir -p "$OUT"
    trap perf_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    log "working directory: $OUT"
}

# Stop every process we started: TERM, wait up to 3 s, then KILL. By pid only.
perf_cleanup() {
    local pid i
    set +e
    for pid in "${PERF_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for i in $(seq 30); do
        local alive=0
        for pid in "${PERF_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for pid in "${PERF_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    done
    wait 2>/dev/null
    PERF_PIDS=()
}

# Fail early when something already listens on a port we need.
require_free_port() {
    local port=$1
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
        die "port $port is already in use (a leftover run? check: ss -ltnp 'sport = :$port')"
    fi
}

# ---------------------------------------------------------------- nginx ----

# Main-context + events + http preamble shared by every nginx instance. All paths inside $dir.
_nginx_head() {
    local dir=$1 affinity=${2:-}
    # As root, nginx would drop workers to "nobody": keep them as the current user instead.
    if [[ $EUID == 0 ]]; then echo "user $(id -un) $(id -gn);"; fi
    # A proxy under test may be pinned (PROXY_CPU_AFFINITY, e.g. "01" = core 0); the backend never is.
    if [[ -n $affinity ]]; then echo "worker_cpu_affinity $affinity;"; fi
    cat <<EOF
worker_processes 1;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events {
    worker_connections 16384;
}
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    # Never close a benchmark connection early (nginx's default is 1000 requests, 75 s).
    keepalive_timeout 300s;
    keepalive_requests 1000000;
EOF
}

write_nginx_backend() {
    local name=$1 port=$2 dir=$OUT/$1
    mkdir -p "$dir/tmp"
    {
        _nginx_head "$dir"
        cat <<EOF
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            return 200 "hello world\n";
        }
    }
}
EOF
    } >"$dir/nginx.conf"
}

write_nginx_proxy() {
    local name=$1 port=$2 upstream_port=$3 dir=$OUT/$1 fwd=
    # A 4th argument "fwd": the headers ringgate adds by contract, added by nginx too.
    if [[ ${4:-} == fwd ]]; then
        fwd='
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $request_id;
            add_header X-Request-Id $request_id;'
    fi
    mkdir -p "$dir/tmp"
    {
        _nginx_head "$dir" "${PROXY_CPU_AFFINITY:-}"
        cat <<EOF
    upstream backend {
        server 127.0.0.1:$upstream_port;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";$fwd
        }
    }
}
EOF
    } >"$dir/nginx.conf"
}

write_nginx_proxy_cache() {
    local name=$1 port=$2 upstream_port=$3 dir=$OUT/$1
    mkdir -p "$dir/tmp" "$dir/cache"
    {
        _nginx_head "$dir" "${PROXY_CPU_AFFINITY:-}"
        cat <<EOF
    proxy_cache_path $dir/cache levels=1:2 keys_zone=rg:10m max_size=64m inactive=60m use_temp_path=off;
    upstream backend {
        server 127.0.0.1:$upstream_port;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache rg;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            add_header X-Cache \$upstream_cache_status;
        }
    }
}
EOF
    } >"$dir/nginx.conf"
}

# start_nginx NAME: runs $OUT/NAME/nginx.conf in the foreground mode, in the background.
# Sets NGINX_MASTER and NGINX_WORKER (the single worker's pid).
start_nginx() {
    local name=$1 dir=$OUT/$1 i
    "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" \
        || die "nginx config $dir/nginx.conf is invalid (see $dir/error.log)"
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' \
        >"$dir/stdout.log" 2>&1 &
    NGINX_MASTER=$!
    PERF_PIDS+=("$NGINX_MASTER")
    NGINX_WORKER=
    for i in $(seq 100); do
        NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -n1 || true)
        [[ -n $NGINX_WORKER ]] && break
        kill -0 "$NGINX_MASTER" 2>/dev/null || die "nginx $name exited at start: $(tail -n5 "$dir/error.log")"
        sleep 0.05
    done
    [[ -n $NGINX_WORKER ]] || die "nginx $name: no worker process appeared"
    echo "$NGINX_MASTER" >"$dir/master.pid"
    echo "$NGINX_WORKER" >"$dir/worker.pid"
}

# ------------------------------------------------------------- ringgate ----

# write_ringgate_config FILE PORT ADMIN_PORT IO STATE_DIR EXTRA_TOML
# EXTRA_TOML is appended right after the bench route's `integration` line: bare keys
# (auth = ..., throttle = ...) land in that route; [tables]/[[arrays]] start new sections.
write_ringgate_config() {
    local file=$1 port=$2 admin=$3 io=$4 state=$5 extra=${6:-}
    cat >"$file" <<EOF
[server]
listen = ["127.0.0.1:$port"]
workers = 1
io = "$io"
state_dir = "$state"
pin_workers = ${RINGGATE_PIN:-true}

[admin]
listen = "127.0.0.1:$admin"

[[upstreams]]
name = "backend"
targets = ["127.0.0.1:$BACKEND_PORT"]
keepalive = 256

[[apis]]
name = "bench"

[[apis.routes]]
route = "ANY /{proxy+}"
integration = { type = "http", upstream = "backend" }
EOF
    if [[ -n $extra ]]; then printf '%s\n' "$extra" >>"$file"; fi
}

# start_ringgate NAME CONF: sets RG_PID; stderr/stdout go to $OUT/NAME.log
start_ringgate() {
    local name=$1 conf=$2
    [[ -x $RINGGATE_BIN ]] || die "no gateway binary at $RINGGATE_BIN (build it, or set RINGGATE_BIN)"
    "$RINGGATE_BIN" --config "$conf" >"$OUT/$name.log" 2>&1 &
    RG_PID=$!
    PERF_PIDS+=("$RG_PID")
}

io_driver_of() {
    local logf=$1 line
    line=$(grep -m1 'io driver:' "$logf" 2>/dev/null || true)
    if [[ -n $line ]]; then echo "${line#*io driver:}" | sed 's/^ *//'; else echo unknown; fi
}

# ---------------------------------------------------------------- probes ----

# wait_http URL PID LOGFILE [TIMEOUT_S]: any HTTP answer counts as up.
wait_http() {
    local url=$1 pid=$2 logf=$3 timeout=${4:-15} i code
    for i in $(seq $((timeout * 10))); do
        kill -0 "$pid" 2>/dev/null || die "process $pid exited before answering $url; log tail:
$(tail -n 20 "$logf" 2>/dev/null)"
        code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$url" || true)
        if [[ -n $code && $code != 000 ]]; then return 0; fi
        sleep 0.1
    done
    die "$url did not answer within ${timeout}s; log tail:
$(tail -n 20 "$logf" 2>/dev/null)"
}

# http_status URL [curl args...]
http_status() {
    local url=$1; shift
    curl -s -o /dev/null -m 2 -w '%{http_code}' "$@" "$url" || true
}

# utime+stime over all threads, in clock ticks. The comm field may contain spaces and ')',
# so cut everything up to the last ')' first; then utime/stime are fields 12 and 13.
proc_cpu_ticks() {
    local pid=$1 f rest total=0
    local -a fields
    for f in /proc/"$pid"/task/*/stat; do
        read -r rest 2>/dev/null <"$f" || continue   # a thread may exit meanwhile
        rest=${rest##*) }
        read -r -a fields <<<"$rest"
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# Machine-wide CPU from /proc/stat, in clock ticks: "busy total", where busy = user + nice +
# system + steal (irq/softirq time, which the kernel charges to no task, is left out) and
# total = every column but guest (already inside user).
machine_cpu_ticks() {
    awk '/^cpu / { print $2 + $3 + $4 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat
}

# Sets CHILD_TICKS: CPU ticks used by this shell's reaped children so far (bash `times`).
# Call it directly, not as $(...): `times` must run in this very shell; hence the file.
children_cpu_ticks() {
    local f=${OUT:-/tmp}/.times.$BASHPID
    times >"$f"
    CHILD_TICKS=$(awk -v hz="$CLK_TCK" 'NR == 2 {
        s = 0
        for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); s += p[1] * 60 + p[2] }
        printf "%.0f\n", s * hz }' "$f")
    rm -f "$f"
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

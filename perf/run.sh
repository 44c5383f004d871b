#!/usr/bin/env bash
# perf/run.sh — ringgate vs nginx as a reverse proxy, the method of PERF-NOTES.md.
#
# Usage (from the project root):
#   perf/run.sh [--skip-build] [--duration 8] [--rounds 2] [--io io_uring|epoll|both]
#               [--case NAME]... [--connections 64] [--self-test]
#
#   --skip-build     don't run `cargo build --release` first
#   --duration S     seconds per measured wrk run (default 8); a 2 s warm-up of each system comes first
#   --rounds N       interleaved rounds: nginx, ringgate..., nginx, ringgate... (default 2)
#   --io MODE        io driver(s) for ringgate: io_uring (default), epoll, or both (one instance each)
#   --case NAME      proxied case(s) to measure, repeatable or comma-separated (default: core);
#                    see define_case below ("core", "cache", "throttle", "auth", "auth-off",
#                    "mapping")
#   --connections C  wrk connections (default 64)
#   --pin MODE       CPU affinity of the proxies under test, the same for nginx and ringgate:
#                    "core0" (default) or "none" (both float; the backend and wrk float), or
#                    "split" (the proxies on core 0, the backend and wrk pinned to core 1, so
#                    they never share the proxy's core): core0 and split pin ringgate's worker by
#                    its pin_workers and nginx's proxy worker by worker_cpu_affinity
#   --fwd            also measure "nginx-fwd": the nginx proxy made to do what ringgate does by
#                    contract on every request (X-Forwarded-For/-Proto/-Host and a generated
#                    X-Request-Id upstream, the request id echoed to the client), port 18089;
#                    the summary then gives ringgate's ratios against it as well
#   --self-test      put a second nginx reverse proxy in every ringgate slot (checks the harness
#                    itself: the ratios should come out near 1.00); implies --skip-build
#   env RINGGATE_BIN path of the gateway binary (default target/release/ringgate)
#
# What runs (all on 127.0.0.1, one worker each):
#   18080        nginx backend: return 200 "hello world\n" (12-byte body)
#   18081        nginx reverse proxy to the backend (upstream keepalive 256)
#   18082, ...   ringgate, one instance per (case, io) variant; admin on 19901, ...
# Per run: requests/s, p50/p99 latency (ms), proxy CPU per request in µs (utime+stime of all
# threads of the proxy process — the nginx *worker* — over the run, divided by wrk's request count).
# Output: per-run lines as they finish, then a table of all runs, the medians per system and the
# ratios variant/nginx. Everything (configs, logs, wrk outputs, results.tsv) stays in perf/out/run-*/.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BACKEND_PORT=18080
NGINX_PROXY_PORT=18081
FIRST_RG_PORT=18082
FIRST_ADMIN_PORT=19901

DURATION=8
ROUNDS=2
IO_MODE=io_uring
CONNECTIONS=64
SKIP_BUILD=0
SELF_TEST=0
FWD=0
NGINX_FWD_PORT=18089
PIN=core0
SELECTED_CASES=()
ORIG_ARGS="$*"

# ---------------------------------------------------------------- cases ----
# A case is a ringgate variant of the bench API measured side by side with the others:
#   define_case NAME URL_PATH EXTRA_TOML [HEADER...]
# EXTRA_TOML is appended right after the bench route (`route = "ANY /{proxy+}"`,
# `integration = ...`): bare keys go into that route, [tables]/[[arrays]] start new sections.
# HEADERs ("name: value") are sent by wrk (and by the readiness check) with every request.
# Every case must answer 200 on URL_PATH; the run stops if it doesn't.
declare -A CASE_PATH CASE_TOML CASE_HEADERS
CASE_ORDER=()
define_case() {
    local name=$1 path=$2 toml=$3; shift 3
    CASE_PATH[$name]=$path
    CASE_TOML[$name]=$toml
    CASE_HEADERS[$name]=$(printf '%s\n' "$@")
    CASE_ORDER+=("$name")
}

# core: plain proxying, the nginx comparison. ("/{proxy+}" needs at least one segment, so
# the path is /hello; the backend answers the same 12 bytes for any path.)
define_case core /hello ''

# cache: cache hits (stage cache on; every request after the first is a hit), measured against
# nginx proxy_cache hits on the same backend: the system "nginx-cache" (port 18090, one worker,
# a proxy_cache zone, proxy_cache_valid 200 1h) is added whenever this case is selected, and
# the summary gives ringgate/cache/* ratios against it.
define_case cache /hello '
[apis.stages."$default"]
cache = { enabled = true, ttl_s = 3600, max_bytes = 67108864 }'
NGINX_CACHE_PORT=18090

# throttle: route throttle + usage-plan throttle and quota + IP allow/deny + per-IP rate + three
# regex rules (query, path, header), all configured to let every request through.
# WebSocket (issue 5) is measured by perf/ws.sh: wrk cannot drive WebSocket.

define_case throttle /hello 'throttle = { rate = 100000000, burst = 100000000 }

[[usage_plans]]
name = "bench"
apis = ["bench/$default"]
throttle = { rate = 100000000, burst = 100000000 }
quota = { limit = 1000000000000, period = "month" }

[[api_keys]]
name = "bench"
value = "perf-bench-key-0123456789abcdef"
plans = ["bench"]

[waf]
ip_allow = ["127.0.0.0/8", "::1"]
ip_deny = ["10.66.0.0/16", "192.0.2.0/24"]
rate_per_ip = { rate = 100000000, burst = 100000000 }
rules = [
  { name = "sqli", target = "query", pattern = "(?i)union\\s+select", action = "block" },
  { name = "xss", target = "path", pattern = "(?i)<\\s*script", action = "block" },
  { name = "scanner", target = "header.user-agent", pattern = "(?i)sqlmap|nikto", action = "block" },
]' 'x-api-key: perf-bench-key-0123456789abcdef'
# auth: a JWT authorizer (HS256, token verified once then served from the worker's cache, scope
# checked) plus api_key_required. The token (PyJWT, exp 2100-01-01) carries sub "perf-user",
# which goes upstream as x-principal-id. auth-off sends the very same requests (same headers)
# to the same route without auth: the "same route without auth" baseline of the auth case.
AUTH_KEY_HDR='x-api-key: perf-bench-key-0123456789abcdef'
AUTH_JWT_HDR='Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLmNvbSIsImF1ZCI6ImJlbmNoIiwic3ViIjoicGVyZi11c2VyIiwic2NvcGUiOiJiZW5jaDpyZWFkIiwiZXhwIjo0MTAyNDQ0ODAwfQ.sPH9fmlQcmBNBUMnAzbjqj6kZIBq7bdgIVsEHNB_ggs'
define_case auth /hello 'auth = "jwt:bench"
scopes = ["bench:read"]
api_key_required = true

[[authorizers]]
name = "bench"
type = "jwt"
issuer = "https://issuer.example.com"
audience = ["bench"]
secret = "perf-bench-hmac-secret-0123456789abcdef"

[[api_keys]]
name = "bench"
value = "perf-bench-key-0123456789abcdef"' "$AUTH_KEY_HDR" "$AUTH_JWT_HDR"
define_case auth-off /hello '' "$AUTH_KEY_HDR" "$AUTH_JWT_HDR"
# mapping: the core route with a request mapping (a header from a variable, a literal header, a
# query removal) and a response mapping (a header set, one removed); compare with core.
define_case mapping /hello 'request_mapping = { "header.x-rid" = "$context.requestId", "header.x-gw" = "ringgate", "query.debug" = "remove" }
response_mapping = { "header.x-served-by" = "ringgate", "header.server" = "remove" }'

# ------------------------------------------------------------ arguments ----
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --skip-build) SKIP_BUILD=1 ;;
        --duration) DURATION=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --io) IO_MODE=$2; shift ;;
        --case) IFS=, read -r -a _c <<<"$2"; SELECTED_CASES+=("${_c[@]}"); shift ;;
        --connections) CONNECTIONS=$2; shift ;;
        --pin) PIN=$2; shift ;;
        --self-test) SELF_TEST=1; SKIP_BUILD=1 ;;
        --fwd) FWD=1 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
    shift
done
case $IO_MODE in
    io_uring|epoll) IOS=("$IO_MODE") ;;
    both) IOS=(io_uring epoll) ;;
    *) die "--io must be io_uring, epoll or both" ;;
esac
case $PIN in
    none) export RINGGATE_PIN=false PROXY_CPU_AFFINITY= ;;
    core0|split) export RINGGATE_PIN=true PROXY_CPU_AFFINITY=01 ;;
    *) die "--pin must be none, core0 or split" ;;
esac
# With --pin split, wrk runs under `taskset -c 1` and the backend's worker is moved to core 1.
WRK_PREFIX=()
[[ $PIN == split ]] && WRK_PREFIX=(taskset -c 1)
[[ ${#SELECTED_CASES[@]} -gt 0 ]] || SELECTED_CASES=(core)
for c in "${SELECTED_CASES[@]}"; do
    [[ -n ${CASE_PATH[$c]+x} ]] || die "unknown case '$c' (known: ${CASE_ORDER[*]})"
done
[[ $DURATION =~ ^[0-9]+$ && $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "bad --duration/--rounds"
command -v wrk >/dev/null || die "wrk not found (apt-get install -y wrk)"
[[ -x $NGINX ]] || die "nginx not found (apt-get install -y nginx-light)"

# ------------------------------------------------------------- systems ----
# A "system" is one proxy under test. Parallel arrays, index 0 = the nginx reference.
SYS_NAME=() SYS_PID=() SYS_URL=() SYS_HEADERS=() SYS_LOG=() SYS_DRIVER=()

add_system() {  # name pid url headers log driver
    SYS_NAME+=("$1") SYS_PID+=("$2") SYS_URL+=("$3") SYS_HEADERS+=("$4") SYS_LOG+=("$5") SYS_DRIVER+=("$6")
}

start_backends() {
    require_free_port $BACKEND_PORT
    require_free_port $NGINX_PROXY_PORT
    write_nginx_backend backend $BACKEND_PORT
    start_nginx backend
    BACKEND_WORKER=$NGINX_WORKER
    if [[ $PIN == split ]]; then taskset -pc 1 "$BACKEND_WORKER" >/dev/null; fi
    wait_http "http://127.0.0.1:$BACKEND_PORT/" "$NGINX_MASTER" "$OUT/backend/error.log"
    log "nginx backend   :$BACKEND_PORT  master $NGINX_MASTER worker $NGINX_WORKER"

    write_nginx_proxy nginx $NGINX_PROXY_PORT $BACKEND_PORT
    start_nginx nginx
    wait_http "http://127.0.0.1:$NGINX_PROXY_PORT/" "$NGINX_MASTER" "$OUT/nginx/error.log"
    log "nginx proxy     :$NGINX_PROXY_PORT  master $NGINX_MASTER worker $NGINX_WORKER"
    add_system nginx "$NGINX_WORKER" "http://127.0.0.1:$NGINX_PROXY_PORT/hello" "" \
        "$OUT/nginx/error.log" "nginx (epoll)"
    if [[ $FWD == 1 ]]; then
        require_free_port $NGINX_FWD_PORT
        write_nginx_proxy nginx-fwd $NGINX_FWD_PORT $BACKEND_PORT fwd
        start_nginx nginx-fwd
        wait_http "http://127.0.0.1:$NGINX_FWD_PORT/" "$NGINX_MASTER" "$OUT/nginx-fwd/error.log"
        log "nginx proxy+fwd :$NGINX_FWD_PORT  master $NGINX_MASTER worker $NGINX_WORKER"
        add_system nginx-fwd "$NGINX_WORKER" "http://127.0.0.1:$NGINX_FWD_PORT/hello" "" \
            "$OUT/nginx-fwd/error.log" "nginx + forwarding headers (epoll)"
    fi
    if [[ " ${SELECTED_CASES[*]} " == *" cache "* ]]; then
        require_free_port $NGINX_CACHE_PORT
        write_nginx_proxy_cache nginx-cache $NGINX_CACHE_PORT $BACKEND_PORT
        start_nginx nginx-cache
        wait_http "http://127.0.0.1:$NGINX_CACHE_PORT/" "$NGINX_MASTER" "$OUT/nginx-cache/error.log"
        local xc
        curl -s -o /dev/null "http://127.0.0.1:$NGINX_CACHE_PORT/hello" || true
        xc=$(curl -s -o /dev/null -D - "http://127.0.0.1:$NGINX_CACHE_PORT/hello" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache"{print $2}')
        [[ $xc == HIT ]] || log "WARNING: nginx-cache second request was not a cache HIT (x-cache: $xc)"
        log "nginx proxy_cache :$NGINX_CACHE_PORT  master $NGINX_MASTER worker $NGINX_WORKER"
        add_system nginx-cache "$NGINX_WORKER" "http://127.0.0.1:$NGINX_CACHE_PORT/hello" "" \
            "$OUT/nginx-cache/error.log" "nginx proxy_cache (epoll)"
    fi
}

# start_variant CASE IO PORT ADMIN_PORT: one ringgate (or, in --self-test, nginx copy) instance.
start_variant() {
    local case=$1 io=$2 port=$3 admin=$4 name pid logf driver
    require_free_port "$port"
    if [[ $SELF_TEST == 1 ]]; then
        name=nginx-copy/$case/$io
        write_nginx_proxy "selftest-$case-$io" "$port" $BACKEND_PORT
        start_nginx "selftest-$case-$io"
        pid=$NGINX_WORKER logf=$OUT/selftest-$case-$io/error.log
        wait_http "http://127.0.0.1:$port/" "$NGINX_MASTER" "$logf"
        driver="self-test (nginx)"
    else
        require_free_port "$admin"
        name=ringgate/$case/$io
        local conf=$OUT/ringgate-$case-$io.toml
        write_ringgate_config "$conf" "$port" "$admin" "$io" "$OUT/state-$case-$io" "${CASE_TOML[$case]}"
        start_ringgate "ringgate-$case-$io" "$conf"
        pid=$RG_PID logf=$OUT/ringgate-$case-$io.log
        wait_http "http://127.0.0.1:$admin/healthz" "$pid" "$logf"
        wait_http "http://127.0.0.1:$port/" "$pid" "$logf"
        driver=$(io_driver_of "$logf")
    fi
    local url="http://127.0.0.1:$port${CASE_PATH[$case]}"
    local -a hdr=()
    local h
    while IFS= read -r h; do [[ -n $h ]] && hdr+=(-H "$h"); done <<<"${CASE_HEADERS[$case]}"
    local code
    code=$(http_status "$url" "${hdr[@]}")
    [[ $code == 200 ]] || die "$name answers $code (not 200) on $url; log: $logf"
    log "$(printf '%-24s :%s  pid %s  io driver: %s' "$name" "$port" "$pid" "$driver")"
    if [[ $SELF_TEST == 0 && $driver != *"$io"* ]]; then
        log "WARNING: $name was configured with io = \"$io\" but logs io driver: $driver"
    fi
    add_system "$name" "$pid" "$url" "${CASE_HEADERS[$case]}" "$logf" "$driver"
}

# ---------------------------------------------------------------- wrk -----

# wrk time units -> ms
# parse_wrk FILE -> "rps p50_ms p99_ms requests socket_errors non2xx"
parse_wrk() {
    awk '
    function ms(v,   n, u) {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") return n / 1000
        if (u == "ms") return n
        if (u == "s")  return n * 1000
        if (u == "m")  return n * 60000
        if (u == "h")  return n * 3600000
        return -1
    }
    /^ *50% / { p50 = ms($2) }
    /^ *99% / { p99 = ms($2) }
    / requests in / { reqs = $1 }
    /^Requests\/sec:/ { rps = $2 }
    /Socket errors:/ { gsub(/,/, ""); errs = $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    END {
        if (reqs == "" || rps == "") exit 1
        printf "%.0f %.3f %.3f %d %d %d\n", rps, p50, p99, reqs, errs + 0, non2xx + 0
    }' "$1"
}

# measure INDEX SECONDS OUTFILE
#   -> "rps p50 p99 reqs errs non2xx cpu_us backend_cpu_us wrk_cpu_us other_load_pct"
# cpu_us: the proxy's CPU per request. backend_cpu_us / wrk_cpu_us: the same for the backend
# worker and for wrk. other_load_pct: CPU used meanwhile by everything else on the machine
# (user+nice+system+steal from /proc/stat, irq/softirq left out), in % of one core — the machine is
# shared, so a run with a high figure is suspect.
measure() {
    local i=$1 secs=$2 outf=$3 pid=${SYS_PID[$1]} h
    local -a hdr=()
    while IFS= read -r h; do [[ -n $h ]] && hdr+=(-H "$h"); done <<<"${SYS_HEADERS[$i]}"
    local p0 b0 w0 m0 p1 b1 w1 m1
    m0=$(machine_cpu_ticks)
    p0=$(proc_cpu_ticks "$pid")
    b0=$(proc_cpu_ticks "$BACKEND_WORKER")
    children_cpu_ticks; w0=$CHILD_TICKS   # right around wrk: the probes are children too
    "${WRK_PREFIX[@]}" wrk -t1 -c"$CONNECTIONS" -d"${secs}s" --latency "${hdr[@]}" "${SYS_URL[$i]}" >"$outf" 2>&1 \
        || die "wrk failed against ${SYS_NAME[$i]}: $(tail -n3 "$outf")"
    children_cpu_ticks; w1=$CHILD_TICKS
    p1=$(proc_cpu_ticks "$pid")
    b1=$(proc_cpu_ticks "$BACKEND_WORKER")
    m1=$(machine_cpu_ticks)
    kill -0 "$pid" 2>/dev/null || die "${SYS_NAME[$i]} (pid $pid) died during the run; see ${SYS_LOG[$i]}"
    local parsed
    parsed=$(parse_wrk "$outf") || die "cannot parse wrk output $outf"
    read -r rps p50 p99 reqs errs non2xx <<<"$parsed"
    local busy0 total0 busy1 total1
    read -r busy0 total0 <<<"$m0"
    read -r busy1 total1 <<<"$m1"
    awk -v p=$((p1 - p0)) -v b=$((b1 - b0)) -v w=$((w1 - w0)) -v busy=$((busy1 - busy0)) \
        -v total=$((total1 - total0)) -v ncpu="$(nproc)" -v t="$CLK_TCK" -v r="$reqs" \
        -v head="$rps $p50 $p99 $reqs $errs $non2xx" 'BEGIN {
            us = (r > 0) ? 1e6 / t / r : 0
            other = busy - p - b - w; if (other < 0) other = 0
            printf "%s %.2f %.2f %.2f %.0f\n", head, p * us, b * us, w * us,
                (total > 0) ? other * 100 * ncpu / total : 0 }'
}

# ---------------------------------------------------------------- main -----
perf_setup run
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [[ $SKIP_BUILD == 0 ]]; then
    log "cargo build --release"
    (cd "$ROOT_DIR" && cargo build --release) || die "cargo build failed"
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "command: perf/run.sh $ORIG_ARGS"
    echo "host: $(uname -srm), $(nproc) cpus, $("$NGINX" -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "proxies pinned: $PIN (--pin)"
    [[ $SELF_TEST == 0 && -x $RINGGATE_BIN ]] && echo "ringgate: $RINGGATE_BIN ($(stat -c '%y' "$RINGGATE_BIN" | cut -d. -f1))"
} >"$OUT/meta.txt"

start_backends
port=$FIRST_RG_PORT admin=$FIRST_ADMIN_PORT
for c in "${SELECTED_CASES[@]}"; do
    for io in "${IOS[@]}"; do
        start_variant "$c" "$io" "$port" "$admin"
        port=$((port + 1)) admin=$((admin + 1))
    done
done
NSYS=${#SYS_NAME[@]}

log "warm-up: 2 s each"
for ((i = 0; i < NSYS; i++)); do measure "$i" 2 "$OUT/warmup-$i.txt" >/dev/null; done

RESULTS=$OUT/results.tsv
printf 'round\tsystem\tdriver\trps\tp50_ms\tp99_ms\trequests\tsocket_errors\tnon2xx\tcpu_us_per_req\tbackend_cpu_us_per_req\twrk_cpu_us_per_req\tother_load_pct\n' >"$RESULTS"
log "measuring: $ROUNDS round(s) x $NSYS systems x ${DURATION}s, wrk -t1 -c$CONNECTIONS"
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < NSYS; i++)); do
        line=$(measure "$i" "$DURATION" "$OUT/wrk-r$r-$i.txt")   # dies (and stops the run) on failure
        read -r rps p50 p99 reqs errs non2xx cpu bcpu wcpu other <<<"$line"
        printf '%s\t' "$r" "${SYS_NAME[$i]}" "${SYS_DRIVER[$i]}" "$rps" "$p50" "$p99" "$reqs" "$errs" \
            "$non2xx" "$cpu" "$bcpu" "$wcpu" >>"$RESULTS"
        printf '%s\n' "$other" >>"$RESULTS"
        warn=""
        if ((errs + non2xx > 0)); then warn="  !! $errs socket errors, $non2xx non-2xx"; fi
        log "$(printf 'round %d  %-24s %8s req/s  p50 %6.3f ms  p99 %6.3f ms  %6s µs CPU/req  (backend %s, wrk %s, other load %s%%)%s' \
            "$r" "${SYS_NAME[$i]}" "$rps" "$p50" "$p99" "$cpu" "$bcpu" "$wcpu" "$other" "$warn")"
    done
done

echo
cat "$OUT/meta.txt"
python3 "$PERF_DIR/summarize.py" "$RESULTS" | tee "$OUT/summary.txt"
echo
echo "raw: $OUT"

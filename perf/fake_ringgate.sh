#!/usr/bin/env bash
# perf/fake_ringgate.sh --config FILE — a stand-in for target/release/ringgate, for testing the
# harness's gateway path (config writing, /healthz wait, "io driver:" log line, CPU accounting of
# all threads of one process) before the real binary exists:
#   RINGGATE_BIN=perf/fake_ringgate.sh perf/run.sh --skip-build --io both
#   RINGGATE_BIN=perf/fake_ringgate.sh perf/idle_conns.sh
# It reads the listen/admin ports, io and upstream target from the ringgate config and execs a
# single-process nginx (master_process off) that proxies like perf/'s nginx proxy and answers
# GET /healthz on the admin port. Its figures are nginx's, not ringgate's.
set -euo pipefail
[[ ${1:-} == --config && -n ${2:-} ]] || { echo "usage: $0 --config FILE" >&2; exit 2; }
conf=$2
port=$(sed -n 's/^listen = \["127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$conf" | head -n1)
admin=$(sed -n 's/^listen = "127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$conf" | head -n1)
io=$(sed -n 's/^io = "\([a-z_]*\)".*/\1/p' "$conf" | head -n1)
target=$(sed -n 's/^targets = \["\([0-9.:]*\)".*/\1/p' "$conf" | head -n1)
[[ -n $port && -n $admin && -n $target ]] || { echo "fake ringgate: cannot read $conf" >&2; exit 1; }
dir=$(cd "$(dirname "$conf")" && pwd)/fake-ringgate-$port
mkdir -p "$dir/tmp"
user=""
if [[ $EUID == 0 ]]; then user="user $(id -un) $(id -gn);"; fi
cat >"$dir/nginx.conf" <<EOF
$user
master_process off;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream backend { server $target; keepalive 256; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        listen 127.0.0.1:$admin;
        location = /healthz { return 200 "ok\n"; }
    }
}
EOF
echo "fake ringgate (nginx): listening on 127.0.0.1:$port, admin $admin, io driver: ${io:-auto} (fake)" >&2
exec nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;'

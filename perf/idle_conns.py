#!/usr/bin/env python3
"""perf/idle_conns.py — RSS cost of idle keep-alive client connections (stdlib only).

  idle_conns.py --label NAME --port PORT --pids PID[,PID...] [--worker-pid PID]
                [--conns 10000] [--path /hello] [--wait 2] [--warmup 200] [--upstream-port P]

Opens --conns TCP connections to 127.0.0.1:PORT one after another; on each it sends one
complete `GET PATH HTTP/1.1` request, reads the whole response, and leaves the connection
open and idle. After --wait seconds it reads VmRSS again and counts how many connections
the server kept open, then closes them all.

RSS is read from /proc/PID/status (VmRSS): "worker" is --worker-pid (nginx's worker, or the
gateway's single process), "total" sums all of --pids (nginx master + worker). Before the
baseline reading, --warmup connections are opened, used and closed, so one-off lazy set-up
(first upstream connection, first buffers) is not charged to the idle connections.

Prints a human-readable report and one machine-readable line:
  RESULT label=.. conns=.. open_after_wait=.. worker_before_kb=.. worker_after_kb=..
         worker_kb_per_conn=.. total_kb_per_conn=.. upstream_conns=..
"""
import argparse
import resource
import socket
import subprocess
import sys
import time
import select


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def read_response(sock):
    """Read one HTTP/1.1 response (Content-Length or chunked). Returns the status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip().lower()
    if b"content-length" in headers:
        need = int(headers[b"content-length"])
        while len(body) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the response body")
            body += chunk
    elif headers.get(b"transfer-encoding") == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the chunked body")
            body += chunk
    return status


def open_conn(port, request):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(request)
    status = read_response(s)
    return s, status


def still_open(socks):
    """Connections the server has not closed: not readable (a closed one reads EOF)."""
    n = 0
    for s in socks:
        p = select.poll()
        p.register(s, select.POLLIN)
        if not p.poll(0):
            n += 1
            continue
        try:
            if s.recv(1, socket.MSG_PEEK):
                n += 1  # unexpected data, but open
        except OSError:
            pass
    return n


def upstream_conns(port, pid):
    """Established TCP connections from process pid towards the upstream port."""
    if not port:
        return -1
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"dport = :{port}"],
                         capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pids", required=True, help="comma-separated pids whose RSS is summed")
    ap.add_argument("--worker-pid", type=int, help="the process holding the connections (default: first of --pids)")
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--path", default="/hello")
    ap.add_argument("--wait", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--upstream-port", type=int, default=0)
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pids = [int(p) for p in a.pids.split(",") if p]
    worker = a.worker_pid or pids[0]
    request = f"GET {a.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    # Warm-up: open, use, close.
    warm = []
    for _ in range(a.warmup):
        s, _ = open_conn(a.port, request)
        warm.append(s)
    for s in warm:
        s.close()
    time.sleep(1.0)

    w0, t0 = rss_kb(worker), sum(rss_kb(p) for p in pids)
    socks, errors, non200, first_error = [], 0, 0, None
    t_start = time.monotonic()
    for i in range(a.conns):
        try:
            s, status = open_conn(a.port, request)
            socks.append(s)
            if status != 200:
                non200 += 1
        except OSError as e:  # includes ConnectionError, timeouts, EMFILE
            errors += 1
            first_error = first_error or f"connection {i}: {e!r}"
            if errors >= 50:
                break
    t_open = time.monotonic() - t_start
    time.sleep(a.wait)
    w1, t1 = rss_kb(worker), sum(rss_kb(p) for p in pids)
    n_open = still_open(socks)
    n_up = upstream_conns(a.upstream_port, worker)
    n = len(socks)
    for s in socks:
        s.close()

    per_w = (w1 - w0) / n if n else float("nan")
    per_t = (t1 - t0) / n if n else float("nan")
    print(f"{a.label}: {n} connections opened in {t_open:.1f}s ({errors} failed, {non200} non-200), "
          f"{n_open} still open after {a.wait:g}s")
    if first_error:
        print(f"  first failure: {first_error}")
    print(f"  worker pid {worker}: VmRSS {w0} KiB -> {w1} KiB  (+{w1 - w0} KiB, {per_w:.2f} KiB/conn)")
    print(f"  all pids {a.pids}: VmRSS {t0} KiB -> {t1} KiB  (+{t1 - t0} KiB, {per_t:.2f} KiB/conn)")
    if n_up >= 0:
        print(f"  connections pid {worker} holds to the upstream (:{a.upstream_port}) while idle: {n_up}")
    print(f"RESULT label={a.label} conns={n} failed={errors} non200={non200} open_after_wait={n_open} "
          f"worker_before_kb={w0} worker_after_kb={w1} worker_kb_per_conn={per_w:.3f} "
          f"total_kb_per_conn={per_t:.3f} upstream_conns={n_up}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

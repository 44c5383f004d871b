#!/usr/bin/env python3
"""perf/ws_post.py: how soon WebSocket API clients hear from the gateway's admin side.

Usage (from the project root; does not build):
  python3 perf/ws_post.py [--bin target/release/ringgate] [--posts 200]

Starts the gateway (2 workers, a WebSocket API on 127.0.0.1:18089, admin on :19907), opens 4
client connections (python `websockets`), then:
  - posts --posts messages with admin `POST /@connections/{id}` (one at a time, 3 ms apart,
    round robin over the connections) and times each from the POST until the client has the
    message: median, p90 and max in ms;
  - sends SIGTERM and times until a client receives the drain's close frame (1001).
"""
import argparse
import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import websockets

PORT, ADMIN = 18089, 19907
CONFIG = f"""
[server]
listen = ["127.0.0.1:{PORT}"]
workers = 2
[admin]
listen = "127.0.0.1:{ADMIN}"
[[apis]]
name = "chat"
protocol = "websocket"
[[apis.routes]]
route = "ping"
integration = {{ type = "mock", status = 200, body = "pong" }}
"""


async def measure(proc, posts):
    conns = []
    for _ in range(4):
        ws = await websockets.connect(f"ws://127.0.0.1:{PORT}/")
        # A message no route takes is answered with the connection's id.
        await ws.send(json.dumps({"action": "unrouted"}))
        conns.append((ws, json.loads(await ws.recv())["connectionId"]))
    admin = http.client.HTTPConnection("127.0.0.1", ADMIN)
    lat = []
    for n in range(posts):
        ws, cid = conns[n % len(conns)]
        t0 = time.perf_counter()
        admin.request("POST", f"/@connections/{cid}", body=b"hi")
        r = admin.getresponse()
        r.read()
        if r.status != 200:
            sys.exit(f"POST /@connections/{cid}: status {r.status}")
        await ws.recv()
        lat.append((time.perf_counter() - t0) * 1e3)
        await asyncio.sleep(0.003)
    lat.sort()
    print(
        f"POST /@connections -> client has it: median {lat[len(lat) // 2]:.3f} ms, "
        f"p90 {lat[len(lat) * 9 // 10]:.3f} ms, max {lat[-1]:.3f} ms ({posts} posts)"
    )
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        await conns[0][0].recv()
        print("drain: the client got a message instead of the close frame")
    except websockets.ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
        print(f"SIGTERM -> close frame {code}: {(time.perf_counter() - t0) * 1e3:.1f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/ringgate")
    ap.add_argument("--posts", type=int, default=200)
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"no gateway binary at {args.bin} (build it with cargo build --release)")
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "ws.toml")
        with open(cfg, "w") as f:
            f.write(CONFIG)
        log = open(os.path.join(d, "ringgate.log"), "w+")
        proc = subprocess.Popen([args.bin, "--config", cfg], stdout=log, stderr=log)
        try:
            for _ in range(100):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", ADMIN, timeout=1)
                    c.request("GET", "/healthz")
                    c.getresponse().read()
                    break
                except OSError:
                    if proc.poll() is not None:
                        log.seek(0)
                        sys.exit(f"the gateway exited at start:\n{log.read()}")
                    time.sleep(0.05)
            asyncio.run(measure(proc, args.posts))
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()

"""Independent WebSocket peer for ringgate's integration tests, built on the `websockets` package.

  peer.py echo-server            serve an echo WebSocket on 127.0.0.1 (prints the port, then serves)
  peer.py echo-client URL N      send N messages (text, binary, one large), expect them echoed in order
  peer.py api-client URL N       send N {"action": "echo", "n": i} messages to a WebSocket API, expect replies in order
  peer.py expect-refused URL     expect the handshake to be refused; print the HTTP status
Prints one JSON line with the outcome; exits non-zero on any failure.
"""
import asyncio
import json
import sys

import websockets


async def echo_server():
    async def echo(ws):
        try:
            async for m in ws:
                await ws.send(m)
        except websockets.ConnectionClosed:
            pass

    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None, compression=None) as srv:
        port = srv.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


async def echo_client(url, n):
    async with websockets.connect(url, max_size=None, open_timeout=5) as ws:
        sent = []
        for i in range(n):
            if i % 3 == 2:
                m = bytes([i % 256]) * (i + 1)
            else:
                m = f"message {i} " + "x" * (i % 50)
            sent.append(m)
            await ws.send(m)
        big = "B" * 200_000
        sent.append(big)
        await ws.send(big)
        for want in sent:
            got = await asyncio.wait_for(ws.recv(), 5)
            if got != want:
                raise SystemExit(f"out of order or changed: {str(got)[:40]!r} != {str(want)[:40]!r}")
        await ws.close(code=1000, reason="done")
        print(json.dumps({"ok": True, "messages": len(sent), "close_code": ws.close_code}))


async def api_client(url, n):
    async with websockets.connect(url, open_timeout=5) as ws:
        for i in range(n):
            await ws.send(json.dumps({"action": "echo", "n": i}))
        got = []
        for i in range(n):
            r = json.loads(await asyncio.wait_for(ws.recv(), 5))
            got.append(r["n"])
        if got != list(range(n)):
            raise SystemExit(f"replies out of order: {got[:10]}")
        await ws.send(json.dumps({"action": "nothing-routes-here"}))
        default = await asyncio.wait_for(ws.recv(), 5)
        await ws.close()
        print(json.dumps({"ok": True, "replies": len(got), "default": default}))


async def expect_refused(url):
    try:
        async with websockets.connect(url, open_timeout=5):
            raise SystemExit("handshake was accepted")
    except websockets.InvalidStatus as e:
        print(json.dumps({"ok": True, "status": e.response.status_code}))


def main():
    cmd = sys.argv[1]
    if cmd == "echo-server":
        asyncio.run(echo_server())
    elif cmd == "echo-client":
        asyncio.run(echo_client(sys.argv[2], int(sys.argv[3])))
    elif cmd == "api-client":
        asyncio.run(api_client(sys.argv[2], int(sys.argv[3])))
    elif cmd == "expect-refused":
        asyncio.run(expect_refused(sys.argv[2]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

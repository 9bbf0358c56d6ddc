#!/usr/bin/python3
"""Broadcast peer for `loadgen broadcast` (Debian's python3-websockets 10.x):
every message from any client goes to every connected client (the sender
included), like node_broadcast_server.js. websockets.broadcast() writes the
frame to every connection without waiting for slow ones.

Prints `LISTENING <port>` once it accepts connections; exits 0 on SIGTERM/SIGINT.

  /usr/bin/python3 bench/py_broadcast_server.py [--host H] [--port N]
"""
import argparse
import asyncio
import signal

import websockets

CLIENTS = set()


async def relay(ws):
    CLIENTS.add(ws)
    try:
        async for message in ws:
            websockets.broadcast(CLIENTS, message)
    except websockets.ConnectionClosed:
        pass
    finally:
        CLIENTS.discard(ws)


async def main(opts):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with websockets.serve(relay, opts.host, opts.port, ping_interval=None, close_timeout=1) as server:
        print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
        await stop


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="py_broadcast_server.py")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    asyncio.run(main(p.parse_args()))

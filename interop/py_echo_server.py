#!/usr/bin/python3
"""Reference echo server (Debian's python3-websockets, 10.x asyncio API).

Run it with /usr/bin/python3: that interpreter has the Debian package.
Same options and behaviour as ws_echo_server.js: prints `LISTENING <port>`
on stdout once it accepts connections, logs connection events on stderr,
exits 0 on SIGTERM/SIGINT.

  py_echo_server.py [--host H] [--port N] [--deflate] [--path P]
      [--protocol NAME] [--max-payload N] [--close-after N]
      [--close-code C [--close-reason R]] [--tls-cert F --tls-key F]

Without --protocol no subprotocol is selected.
"""
import argparse
import asyncio
import http
import signal
import ssl
import sys

import websockets

# The same default as the node peer (ws), so both accept the same messages.
DEFAULT_MAX_PAYLOAD = 100 * 1024 * 1024


def log(line):
    print(line, file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="py_echo_server.py")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--deflate", action="store_true")
    p.add_argument("--path")
    p.add_argument("--protocol")
    p.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD)
    p.add_argument("--close-after", type=int)
    p.add_argument("--close-code", type=int)
    p.add_argument("--close-reason", default="")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    return p.parse_args(argv)


def make_handler(opts):
    next_id = 0

    async def echo(ws):
        nonlocal next_id
        next_id += 1
        conn = next_id
        count = 0
        exts = ",".join(e.name for e in ws.extensions) or "-"
        log(f"open {conn} path={ws.path} protocol={ws.subprotocol or '-'} extensions={exts}")
        try:
            if opts.close_after == 0:
                await ws.close(1000)
            async for msg in ws:
                count += 1
                await ws.send(msg)
                if opts.close_code is not None and count == 1:
                    await ws.close(opts.close_code, opts.close_reason)
                elif opts.close_after is not None and count == opts.close_after:
                    await ws.close(1000)
        except websockets.ConnectionClosed:
            pass
        await ws.wait_closed()
        log(f"close {conn} {ws.close_code} {ws.close_reason or ''} messages={count}")

    return echo


def make_path_check(opts):
    async def check(path, headers):
        # Answers like ws does for a path it does not serve.
        if opts.path is not None and path.split("?", 1)[0] != opts.path:
            return http.HTTPStatus.BAD_REQUEST, [], b"wrong path\n"
        return None

    return check


async def main(opts):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    tls = None
    if opts.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(opts.tls_cert, opts.tls_key)
    async with websockets.serve(
        make_handler(opts),
        opts.host,
        opts.port,
        compression="deflate" if opts.deflate else None,
        max_size=opts.max_payload,
        subprotocols=[opts.protocol] if opts.protocol else None,
        ping_interval=None,
        close_timeout=2,
        process_request=make_path_check(opts),
        ssl=tls,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"LISTENING {port}", flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(parse_args(sys.argv[1:])))

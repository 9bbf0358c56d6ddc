#!/usr/bin/python3
"""Reference client (Debian's python3-websockets, 10.x asyncio API).

Run it with /usr/bin/python3. Same options, behaviour and JSON summary line
as ws_client.js:

  py_client.py URL [--deflate] [--protocol P] [--send-text S]...
      [--send-binary-hex H]... [--count N] [--size N] [--fragment]
      [--expect-close C] [--timeout SECONDS] [--insecure]

One difference: python sends text fragments as str, so --fragment cuts text
at character boundaries, not inside UTF-8 sequences as the node client does.
"""
import argparse
import asyncio
import json
import os
import random
import ssl
import sys

import websockets

MAX_PAYLOAD = 100 * 1024 * 1024
TEXT_PIECES = ["a", "Z", "0", " ", "~", "é", "ß", "€", "✓", "😀", "𝄞"]

summary = {"ok": False, "received": 0, "close_code": None, "close_reason": None,
           "protocol": None, "extensions": None}


class Failure(Exception):
    pass


def finish(ok, error=None):
    summary["ok"] = ok
    if error:
        summary["error"] = error
    print(json.dumps(summary, ensure_ascii=False), flush=True)
    sys.exit(0 if ok else 1)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        finish(False, f"usage: {message}")


class AddMessage(argparse.Action):
    """Keeps --send-text and --send-binary-hex in command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string == "--send-text":
            msg = value
        else:
            try:
                msg = bytes.fromhex(value)
            except ValueError:
                parser.error("--send-binary-hex needs an even number of hex digits")
        namespace.messages.append(msg)


def parse_args(argv):
    p = Parser(prog="py_client.py")
    p.add_argument("url")
    p.add_argument("--deflate", action="store_true")
    p.add_argument("--protocol")
    p.add_argument("--send-text", action=AddMessage, dest="messages", default=[])
    p.add_argument("--send-binary-hex", action=AddMessage, dest="messages")
    p.add_argument("--count", type=int)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fragment", action="store_true")
    p.add_argument("--expect-close", type=int)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--insecure", action="store_true")
    opts = p.parse_args(argv)
    opts.messages = list(opts.messages)
    if opts.count is None and not opts.messages:
        opts.count = 4
    for i in range(opts.count or 0):
        opts.messages.append(random_message(i % 2 == 1, opts.size))
    return opts


def random_message(binary, size):
    if binary:
        return os.urandom(size)
    text, used = [], 0
    while True:
        piece = random.choice(TEXT_PIECES)
        n = len(piece.encode())
        if used + n > size:
            break
        text.append(piece)
        used += n
    return "".join(text) + "x" * (size - used)


def fragments(msg):
    a, b = len(msg) // 3, 2 * len(msg) // 3 + 1
    return [msg[:a], msg[a:b], msg[b:]]


def describe(msg):
    s = msg.hex() if isinstance(msg, bytes) else msg
    kind = "binary" if isinstance(msg, bytes) else "text"
    return f"{kind} {s[:60]}..." if len(s) > 60 else f"{kind} {s}"


async def run(opts):
    tls = None
    if opts.url.startswith("wss:") and opts.insecure:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    try:
        ws = await websockets.connect(
            opts.url,
            compression="deflate" if opts.deflate else None,
            subprotocols=[opts.protocol] if opts.protocol else None,
            max_size=MAX_PAYLOAD,
            ping_interval=None,
            open_timeout=opts.timeout,
            ssl=tls,
        )
    except websockets.InvalidStatusCode as e:
        raise Failure(f"handshake refused: HTTP {e.status_code}")
    summary["protocol"] = ws.subprotocol or ""
    summary["extensions"] = ",".join(e.name for e in ws.extensions)
    try:
        await exchange(ws, opts)
    finally:
        await ws.close()
        summary["close_code"] = ws.close_code
        summary["close_reason"] = ws.close_reason


async def exchange(ws, opts):
    if opts.protocol and ws.subprotocol != opts.protocol:
        raise Failure(f"server did not select subprotocol {opts.protocol}")
    for i, msg in enumerate(opts.messages, 1):
        try:
            await ws.send(fragments(msg) if opts.fragment and len(msg) >= 3 else msg)
            got = await ws.recv()
        except websockets.ConnectionClosed:
            if opts.expect_close is not None:
                break
            raise Failure(f"connection closed after {summary['received']} of {len(opts.messages)} messages")
        if type(got) is not type(msg) or got != msg:
            raise Failure(f"message {i} came back different: sent {describe(msg)}, got {describe(got)}")
        summary["received"] += 1

    if opts.expect_close is not None:
        try:
            await ws.recv()
            raise Failure("unexpected message while waiting for the server to close")
        except websockets.ConnectionClosed:
            pass
        if ws.close_code != opts.expect_close:
            raise Failure(f"expected close code {opts.expect_close}, got {ws.close_code}")
        return

    try:
        pong = await ws.ping(os.urandom(8))
        await pong
    except websockets.ConnectionClosed:
        raise Failure("connection closed while waiting for the pong")
    await ws.close(1000)
    if ws.close_code != 1000:
        raise Failure(f"server answered the close with {ws.close_code}")


async def main(opts):
    try:
        await asyncio.wait_for(run(opts), opts.timeout)
    except asyncio.TimeoutError:
        finish(False, f"timed out after {opts.timeout:g}s")
    except Failure as e:
        finish(False, str(e))
    except (OSError, websockets.WebSocketException) as e:
        finish(False, f"{type(e).__name__}: {e}")
    finish(True)


if __name__ == "__main__":
    asyncio.run(main(parse_args(sys.argv[1:])))

#!/usr/bin/env node
// Reference client (the `ws` package) for duplex's interop specs.
//
//   node ws_client.js URL [--deflate] [--protocol P] [--send-text S]...
//        [--send-binary-hex H]... [--count N] [--size N] [--fragment]
//        [--expect-close C] [--timeout SECONDS] [--insecure]
//
// Sends each message in turn and expects it echoed back identical (same
// bytes, same text/binary type). --send-text/--send-binary-hex may repeat and
// keep their order; --count N adds N random messages of --size bytes
// (default 64), alternating text (with multi-byte UTF-8) and binary. With no
// message given it sends 4 random ones. --fragment sends each message as 3
// frames, split at byte offsets, so text is cut inside UTF-8 sequences.
// Then it pings once, expects the pong, and closes with 1000 — or, with
// --expect-close C, waits for the server to close with code C instead.
// Prints one JSON line; exits 0 when everything matched, 1 otherwise.
'use strict';
const crypto = require('crypto');
const WebSocket = require('ws');

const MAX_PAYLOAD = 100 * 1024 * 1024;

function parseArgs(argv) {
  const flags = new Set(['--deflate', '--fragment', '--insecure']);
  const opts = { messages: [], size: 64, timeout: 30 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) {
      if (opts.url) usage(`unexpected argument ${a}`);
      opts.url = a;
      continue;
    }
    const key = a.slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (flags.has(a)) { opts[key] = true; continue; }
    if (i + 1 >= argv.length) usage(`${a} needs a value`);
    const v = argv[++i];
    if (a === '--send-text') opts.messages.push({ binary: false, data: Buffer.from(v, 'utf8') });
    else if (a === '--send-binary-hex') {
      if (!/^([0-9a-fA-F]{2})*$/.test(v)) usage('--send-binary-hex needs an even number of hex digits');
      opts.messages.push({ binary: true, data: Buffer.from(v, 'hex') });
    } else opts[key] = v;
  }
  if (!opts.url) usage('URL missing');
  for (const k of ['count', 'size', 'expectClose', 'timeout']) {
    if (opts[k] === undefined) continue;
    const n = Number(opts[k]);
    if (!Number.isFinite(n) || n < 0) usage(`--${k} must be a non-negative number`);
    opts[k] = n;
  }
  if (opts.count === undefined && opts.messages.length === 0) opts.count = 4;
  for (let i = 0; i < (opts.count || 0); i++) opts.messages.push(randomMessage(i % 2 === 1, opts.size));
  return opts;
}

function randomMessage(binary, size) {
  if (binary) return { binary, data: crypto.randomBytes(size) };
  const pieces = ['a', 'Z', '0', ' ', '~', 'é', 'ß', '€', '✓', '😀', '𝄞'];
  let text = '';
  let bytes = 0;
  for (;;) {
    const p = pieces[crypto.randomInt(pieces.length)];
    const n = Buffer.byteLength(p);
    if (bytes + n > size) break;
    text += p;
    bytes += n;
  }
  return { binary, data: Buffer.from(text + 'x'.repeat(size - bytes), 'utf8') };
}

const summary = { ok: false, received: 0, close_code: null, close_reason: null, protocol: null, extensions: null };

let finished = false;
function finish(ok, error) {
  if (finished) return;
  finished = true;
  summary.ok = ok;
  if (error) summary.error = error;
  process.stdout.write(JSON.stringify(summary) + '\n', () => process.exit(ok ? 0 : 1));
}

function usage(msg) {
  summary.error = `usage: ${msg}`;
  process.stdout.write(JSON.stringify(summary) + '\n', () => process.exit(1));
  throw new Error(msg);
}

// Hands out incoming events in order: each `next()` resolves with the next
// message, or with the close once the connection is gone.
class Inbox {
  constructor() { this.items = []; this.waiters = []; this.closed = null; }
  push(item) {
    const w = this.waiters.shift();
    if (w) w(item); else this.items.push(item);
  }
  close(info) {
    this.closed = info;
    for (const w of this.waiters.splice(0)) w(info);
  }
  next() {
    if (this.items.length) return Promise.resolve(this.items.shift());
    if (this.closed) return Promise.resolve(this.closed);
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}

function extensionNames(header) {
  if (!header) return '';
  return header.split(',').map((e) => e.split(';')[0].trim()).filter(Boolean).join(',');
}

function sendMessage(ws, msg, fragment) {
  if (!fragment || msg.data.length < 3) {
    ws.send(msg.data, { binary: msg.binary });
    return;
  }
  const a = Math.floor(msg.data.length / 3);
  const b = Math.floor((2 * msg.data.length) / 3) + 1;
  ws.send(msg.data.subarray(0, a), { binary: msg.binary, fin: false });
  ws.send(msg.data.subarray(a, b), { binary: msg.binary, fin: false });
  ws.send(msg.data.subarray(b), { binary: msg.binary, fin: true });
}

function describe(buf, binary) {
  const s = binary ? buf.toString('hex') : buf.toString('utf8');
  return s.length > 60 ? `${s.slice(0, 60)}... (${buf.length} bytes)` : s;
}

async function run(opts) {
  const ws = new WebSocket(opts.url, opts.protocol ? [opts.protocol] : [], {
    perMessageDeflate: opts.deflate ? { threshold: 0 } : false,
    maxPayload: MAX_PAYLOAD,
    rejectUnauthorized: !opts.insecure,
    handshakeTimeout: opts.timeout * 1000,
  });
  const inbox = new Inbox();
  let pong = null;
  const pongSeen = new Promise((resolve) => { pong = resolve; });

  ws.on('message', (data, isBinary) => inbox.push({ type: 'message', data, binary: isBinary }));
  ws.on('pong', (data) => pong(data));
  ws.on('close', (code, reason) => {
    summary.close_code = code;
    summary.close_reason = reason.toString();
    inbox.close({ type: 'close' });
  });
  ws.on('unexpected-response', (req, res) => finish(false, `handshake refused: HTTP ${res.statusCode}`));
  ws.on('error', (err) => finish(false, `${err.code || 'error'}: ${err.message}`));

  await new Promise((resolve) => ws.once('open', resolve));
  summary.protocol = ws.protocol;
  summary.extensions = extensionNames(ws.extensions);
  if (opts.protocol && ws.protocol !== opts.protocol) {
    return finish(false, `server did not select subprotocol ${opts.protocol}`);
  }

  for (const [i, msg] of opts.messages.entries()) {
    sendMessage(ws, msg, opts.fragment);
    const got = await inbox.next();
    if (got.type === 'close') {
      if (opts.expectClose !== undefined) break;
      return finish(false, `connection closed after ${summary.received} of ${opts.messages.length} messages`);
    }
    if (got.binary !== msg.binary || !got.data.equals(msg.data)) {
      return finish(false, `message ${i + 1} came back different: sent ${msg.binary ? 'binary' : 'text'} ` +
        `${describe(msg.data, msg.binary)}, got ${got.binary ? 'binary' : 'text'} ${describe(got.data, got.binary)}`);
    }
    summary.received++;
  }

  if (opts.expectClose !== undefined) {
    const got = await inbox.next();
    if (got.type !== 'close') return finish(false, 'unexpected message while waiting for the server to close');
    if (summary.close_code !== opts.expectClose) {
      return finish(false, `expected close code ${opts.expectClose}, got ${summary.close_code}`);
    }
    return finish(true);
  }

  const payload = crypto.randomBytes(8);
  ws.ping(payload);
  const pongData = await Promise.race([pongSeen, inbox.next().then(() => null)]);
  if (!pongData) return finish(false, 'connection closed while waiting for the pong');
  if (!pongData.equals(payload)) return finish(false, 'pong payload differs from the ping');

  ws.close(1000);
  await inbox.next().then(function wait(got) { return got.type === 'close' ? got : inbox.next().then(wait); });
  if (summary.close_code !== 1000) return finish(false, `server answered the close with ${summary.close_code}`);
  return finish(true);
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  // usage() already printed the summary and is exiting.
}
if (opts) {
  setTimeout(() => finish(false, `timed out after ${opts.timeout}s`), opts.timeout * 1000);
  run(opts).catch((err) => finish(false, `${err.name}: ${err.message}`));
}

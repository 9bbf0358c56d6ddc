#!/usr/bin/env node
// Reference echo server (the `ws` package) for duplex's interop specs.
// Prints `LISTENING <port>` on stdout once it accepts connections; logs one
// line per connection event on stderr; exits 0 on SIGTERM/SIGINT.
//
//   node ws_echo_server.js [--host H] [--port N] [--deflate] [--path P]
//        [--protocol NAME] [--max-payload N] [--close-after N]
//        [--close-code C [--close-reason R]] [--tls-cert F --tls-key F]
//
// Without --protocol no subprotocol is ever selected (ws would otherwise pick
// the first one offered), so a spec knows exactly what to expect.
'use strict';
const fs = require('fs');
const http = require('http');
const https = require('https');
const { WebSocketServer } = require('ws');

function parseArgs(argv) {
  const flags = new Set(['--deflate']);
  const opts = { host: '127.0.0.1', port: 0 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) usage(`unexpected argument ${a}`);
    const key = a.slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (flags.has(a)) { opts[key] = true; continue; }
    if (i + 1 >= argv.length) usage(`${a} needs a value`);
    opts[key] = argv[++i];
  }
  for (const k of ['port', 'maxPayload', 'closeAfter', 'closeCode']) {
    if (opts[k] === undefined) continue;
    const n = Number(opts[k]);
    if (!Number.isInteger(n) || n < 0) usage(`--${k} must be a non-negative integer`);
    opts[k] = n;
  }
  return opts;
}

function usage(msg) {
  process.stderr.write(`ws_echo_server: ${msg}\n`);
  process.exit(2);
}

function log(line) {
  process.stderr.write(line + '\n');
}

const opts = parseArgs(process.argv.slice(2));

const server = opts.tlsCert
  ? https.createServer({ cert: fs.readFileSync(opts.tlsCert), key: fs.readFileSync(opts.tlsKey) })
  : http.createServer();
server.on('request', (req, res) => {
  res.writeHead(426, { 'content-type': 'text/plain' });
  res.end('websocket only\n');
});

const wss = new WebSocketServer({
  server,
  path: opts.path,
  maxPayload: opts.maxPayload,
  perMessageDeflate: opts.deflate ? { threshold: 0 } : false,
  handleProtocols: (offered) => (opts.protocol && offered.has(opts.protocol) ? opts.protocol : false),
});

let nextId = 1;
wss.on('connection', (ws, req) => {
  const id = nextId++;
  let count = 0;
  log(`open ${id} path=${req.url} protocol=${ws.protocol || '-'} extensions=${ws.extensions || '-'}`);
  if (opts.closeAfter === 0) ws.close(1000);
  ws.on('message', (data, isBinary) => {
    count++;
    ws.send(data, { binary: isBinary });
    if (opts.closeCode !== undefined && count === 1) {
      ws.close(opts.closeCode, opts.closeReason || '');
    } else if (opts.closeAfter !== undefined && count === opts.closeAfter) {
      ws.close(1000);
    }
  });
  ws.on('ping', (data) => log(`ping ${id} ${data.length}`));
  ws.on('error', (err) => log(`error ${id} ${err.code || ''} ${err.message}`));
  ws.on('close', (code, reason) => log(`close ${id} ${code} ${reason.toString()} messages=${count}`));
});
wss.on('error', (err) => { log(`server error ${err.message}`); process.exit(1); });

server.listen(opts.port, opts.host, () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

function stop() {
  for (const ws of wss.clients) ws.terminate();
  wss.close();
  server.close(() => process.exit(0));
  // An open keep-alive socket must not keep us alive.
  setTimeout(() => process.exit(0), 500).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

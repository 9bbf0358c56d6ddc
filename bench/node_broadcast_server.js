#!/usr/bin/env node
// Broadcast peer for `loadgen broadcast`: every message from any client goes
// to every connected client (the sender included), with its text/binary type.
// Prints `LISTENING <port>` on stdout once it accepts connections; exits 0 on
// SIGTERM/SIGINT. Uses the `ws` package installed in ../interop
// (`npm ci` there).
//
//   node node_broadcast_server.js [--host H] [--port N]
'use strict';
const path = require('path');
const http = require('http');
const { WebSocketServer } = require(require.resolve('ws', { paths: [path.join(__dirname, '..', 'interop')] }));

function parseArgs(argv) {
  const opts = { host: '127.0.0.1', port: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) usage(`${flag} needs a value`);
    if (flag === '--host') opts.host = value;
    else if (flag === '--port' && /^\d+$/.test(value)) opts.port = Number(value);
    else usage(`unexpected argument ${flag}`);
  }
  return opts;
}

function usage(msg) {
  process.stderr.write(`node_broadcast_server: ${msg}\n`);
  process.exit(2);
}

const opts = parseArgs(process.argv.slice(2));
const server = http.createServer((req, res) => {
  res.writeHead(426, { 'content-type': 'text/plain' });
  res.end('websocket only\n');
});
const wss = new WebSocketServer({ server, perMessageDeflate: false });

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      // A client that is closing would only raise an error on send.
      if (client.readyState === client.OPEN) client.send(data, { binary: isBinary });
    }
  });
  ws.on('error', (err) => process.stderr.write(`error ${err.message}\n`));
});
wss.on('error', (err) => {
  process.stderr.write(`server error ${err.message}\n`);
  process.exit(1);
});

server.listen(opts.port, opts.host, () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

function stop() {
  for (const ws of wss.clients) ws.terminate();
  wss.close();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 500).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

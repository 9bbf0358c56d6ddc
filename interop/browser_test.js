#!/usr/bin/env node
// Drives headless Chromium (Debian's /usr/bin/chromium) with playwright-core
// for duplex's browser specs. Prints one JSON line; exits 0 when the
// browser did everything it was asked, 1 otherwise.
//
//   node browser_test.js chat URL
//       Opens URL (the chat example's page) in two tabs, joins the same room
//       as "ann" and "ben", each says something, and checks that each tab's
//       #log shows the other's line. With --recover (a server with history
//       and presence, examples/chat) it then checks the member list and the
//       marking of own lines, drops ann's connection and checks that her
//       page reconnects and recovers what ben said meanwhile.
//   node browser_test.js echo URL [--oversize N]
//       Uses the page's own WebSocket API against an echo server: text,
//       binary (ArrayBuffer), 1 MiB, then closes with 4000 and a reason.
//       With --oversize N, a second connection sends N bytes and reports the
//       close the server answers with. Reports ws.extensions as negotiated.
//
// Options: --chromium PATH (default /usr/bin/chromium), --timeout SECONDS.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');

const summary = { ok: false };
let finished = false;
let cleanup = async () => {};

async function finish(ok, error) {
  if (finished) return;
  finished = true;
  summary.ok = ok;
  if (error) summary.error = error;
  try { await cleanup(); } catch (e) { /* the result matters more */ }
  process.stdout.write(JSON.stringify(summary) + '\n', () => process.exit(ok ? 0 : 1));
}

function parseArgs(argv) {
  const opts = { chromium: '/usr/bin/chromium', timeout: 45 };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--chromium') opts.chromium = argv[++i];
    else if (a === '--timeout') opts.timeout = Number(argv[++i]);
    else if (a === '--oversize') opts.oversize = Number(argv[++i]);
    else if (a === '--recover') opts.recover = true;
    else if (a.startsWith('--')) throw new Error(`unknown option ${a}`);
    else rest.push(a);
  }
  [opts.mode, opts.url] = rest;
  if (!['chat', 'echo'].includes(opts.mode) || !opts.url || rest.length !== 2) {
    throw new Error('usage: node browser_test.js chat|echo URL [--recover] [--oversize N] [--chromium PATH] [--timeout S]');
  }
  return opts;
}

async function launch(opts) {
  if (!fs.existsSync(opts.chromium)) throw new Error(`Chromium not found at ${opts.chromium}`);
  const { chromium } = require('playwright-core');
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'duplex-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    timeout: opts.timeout * 1000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
  cleanup = async () => {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  };
  summary.browser = context.browser() ? context.browser().version() : 'chromium';
  return context;
}

function logHas(page, text) {
  return page.waitForFunction(
    (t) => [...document.querySelectorAll('#log div')].some((d) => d.textContent === t),
    text, { timeout: 15000 });
}

async function chat(opts) {
  const context = await launch(opts);
  const people = [{ nick: 'ann', says: 'hello from ann — ✓' }, { nick: 'ben', says: 'hi ann, ben here 😀' }];
  for (const p of people) {
    p.page = await context.newPage();
    p.page.on('pageerror', (e) => { summary.page_errors = (summary.page_errors || []).concat(String(e)); });
    const res = await p.page.goto(opts.url);
    summary.status = res.status();
    await p.page.fill('#nick', p.nick);
    await p.page.fill('#room', 'browsers');
    await p.page.click('#connect');
    await p.page.waitForSelector('body[data-state="open"]', { timeout: 15000 });
  }
  // ann sees ben arrive: both are in the room before anyone speaks.
  await logHas(people[0].page, '* ben joined #browsers');
  for (const p of people) {
    await p.page.fill('#text', p.says);
    await p.page.click('#send');
    await logHas(p.page, `${p.nick}: ${p.says}`);
  }
  const [ann, ben] = people;
  await logHas(ann.page, `ben: ${ben.says}`);
  await logHas(ben.page, `ann: ${ann.says}`);
  if (!opts.recover) {
    summary.logs = {};
    for (const p of people) summary.logs[p.nick] = await p.page.$$eval('#log div', (ds) => ds.map((d) => d.textContent));
    summary.state = await ann.page.getAttribute('body', 'data-state');
    return finish(true);
  }
  // Own lines are marked; the member list names both.
  summary.own_marked = await ann.page.$$eval('#log div.me', (ds) => ds.map((d) => d.textContent));
  await ann.page.waitForFunction(() => document.getElementById('members').textContent === 'in #browsers: ann, ben',
    null, { timeout: 15000 });
  // ann's connection drops (not closed by the page): the page reconnects
  // with its last position and gets what ben said meanwhile, once.
  await ann.page.evaluate(() => ws.close(4001, 'test drop'));
  await ann.page.waitForSelector('body[data-state="closed"]', { timeout: 15000 });
  await ben.page.fill('#text', 'said while ann was away');
  await ben.page.click('#send');
  await logHas(ben.page, 'ben: said while ann was away');
  await ann.page.waitForSelector('body[data-state="open"]', { timeout: 15000 });
  await logHas(ann.page, 'ben: said while ann was away');
  summary.reconnected = await ann.page.$$eval('#log div', (ds) => ({
    copies: ds.filter((d) => d.textContent === 'ben: said while ann was away').length,
    back: ds.map((d) => d.textContent).filter((t) => t.startsWith('* back')),
    url: location.search,
  }));
  summary.logs = {};
  for (const p of people) {
    summary.logs[p.nick] = await p.page.$$eval('#log div', (ds) => ds.map((d) => d.textContent));
  }
  summary.state = await ann.page.getAttribute('body', 'data-state');
  return finish(true);
}

// Runs in the page: the browser's own WebSocket against the echo server.
async function pageEcho({ url, oversize }) {
  const out = {};
  const opened = (ws) => new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error('WebSocket error before open'));
  });
  const closed = (ws) => new Promise((resolve) => {
    ws.onclose = (ev) => resolve({ code: ev.code, reason: ev.reason, clean: ev.wasClean });
  });
  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  const inbox = [];
  let waiter = null;
  ws.onmessage = (ev) => { if (waiter) { const w = waiter; waiter = null; w(ev.data); } else inbox.push(ev.data); };
  const next = () => (inbox.length ? Promise.resolve(inbox.shift()) : new Promise((r) => { waiter = r; }));
  const done = closed(ws);
  await opened(ws);
  out.extensions = ws.extensions;
  out.protocol = ws.protocol;

  const text = 'héllo wörld — ✓ 😀 𝄞';
  ws.send(text);
  const t = await next();
  out.text_ok = typeof t === 'string' && t === text;

  const sameBytes = (a, b) => a.byteLength === b.byteLength && new Uint8Array(a).every((x, i) => x === b[i]);
  const bytes = new Uint8Array(256).map((_, i) => i);
  ws.send(bytes.buffer);
  const b = await next();
  out.binary_ok = b instanceof ArrayBuffer && sameBytes(b, bytes);

  const big = new Uint8Array(1 << 20);
  for (let i = 0; i < big.length; i += 65536) crypto.getRandomValues(big.subarray(i, i + 65536));
  ws.send(big);
  const bb = await next();
  out.big_binary_ok = bb instanceof ArrayBuffer && sameBytes(bb, big);

  const bigText = 'duplex '.repeat(150000);
  ws.send(bigText);
  out.big_text_ok = (await next()) === bigText;

  ws.close(4000, 'bye from the browser');
  out.close = await done;

  if (oversize) {
    const ws2 = new WebSocket(url);
    const done2 = closed(ws2);
    await opened(ws2);
    ws2.send(new Uint8Array(oversize));
    out.oversize_close = await done2;
  }
  return out;
}

async function echo(opts) {
  const context = await launch(opts);
  const page = await context.newPage();
  Object.assign(summary, await page.evaluate(pageEcho, { url: opts.url, oversize: opts.oversize }));
  return finish(true);
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  finish(false, e.message);
}
if (opts) {
  setTimeout(() => finish(false, `timed out after ${opts.timeout}s`), opts.timeout * 1000).unref();
  (opts.mode === 'chat' ? chat(opts) : echo(opts)).catch((e) => finish(false, `${e.name}: ${e.message}`));
}

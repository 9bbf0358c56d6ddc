-- The servers and scenarios that bench/run measures. Each scenario runs
-- every server in turn (duplex, uWS, lws, node, python, duplex, uWS, ...)
-- for `rounds` rounds on a freshly started server, and reports medians.
--
-- Server commands are argument lists relative to the repository root.
-- Server fields besides the commands:
--   short        its name in ratio columns (duplex/short)
--   flags        its options for deflate, max_size and TLS
--   cannot       scenario feature (tls, deflate) -> why this server sits
--                that scenario out (bench/run says so in its notes)
--   ours         a second duplex server (not a peer): its own column, and
--                its ratios to uWS after duplex's
--   only         scenario ids it runs (every other one it sits out)
--   needs        files that must exist (built by `make -C bench peers`);
--                if one is missing the server is skipped, with the reason
--                the build left in build/peers/ID.skipped if there is one
-- Scenario fields:
--   mode, args   loadgen mode and options (--url, --pid, --json, --warmup,
--                --duration or --hold are added by bench/run)
--   kind         "echo" (default) or "broadcast": which server programs
--   tls, deflate the server is started with a throwaway certificate / with
--                permessage-deflate on (loadgen gets wss:// / --deflate)
--   max_size     largest message the servers must accept
--   hold         seconds idle connections are held (default: bench/run's)
--   conns        "idle_max": as many connections as the fd limit allows,
--                up to 50,000 (bench/run works it out)
--   title, short table and chart labels (idle_max: made up by bench/run)
--   metric       loadgen key of the headline figure; lower is better
--   target       duplex's target for the headline figure (from issue 13):
--                {ratio = R} at most R times uWebSockets' figure, or
--                {value = V, ours = V2} at most V (V2 for the `ours` server)
local M = {}

-- Issue 13's goals: every CPU figure within 1.1x of uWebSockets'; an idle
-- connection at most 1,536 B with a coroutine handler, 512 B with callbacks.
local CPU = { ratio = 1.1 }
local IDLE = { value = 1536, ours = 512 }

M.servers = {
  { id = "duplex", name = "duplex",
    echo = { "lua5.4", "examples/echo.lua", "--port", "0" },
    broadcast = { "lua5.4", "bench/broadcast_server.lua" },
    flags = { deflate = { "--deflate" }, max_size = "--max-size", cert = "--tls-cert", key = "--tls-key" } },
  -- the same echo by on_message: no coroutine per connection
  { id = "duplex_cb", name = "duplex callbacks", short = "cb", ours = true,
    echo = { "lua5.4", "examples/echo.lua", "--port", "0", "--callbacks" },
    flags = { deflate = { "--deflate" }, max_size = "--max-size", cert = "--tls-cert", key = "--tls-key" },
    only = { echo32_c64 = true, echo32_c2000 = true, echo64k = true, connect = true, idle10k = true,
      idle_max = true } },
  { id = "uws", name = "uWebSockets", short = "uWS",
    echo = { "build/peers/bin/uws_echo" },
    broadcast = { "build/peers/bin/uws_broadcast" },
    flags = { max_size = "--max-payload" },
    needs = { "build/peers/bin/uws_echo", "build/peers/bin/uws_broadcast" },
    cannot = { tls = "built with LIBUS_NO_SSL, as the issue asks: no TLS",
      deflate = "built with UWS_NO_ZLIB (compression off, as the issue asks): no permessage-deflate" } },
  { id = "lws", name = "libwebsockets", short = "lws",
    echo = { "build/peers/bin/lws_echo" },
    broadcast = { "build/peers/bin/lws_echo", "--broadcast" },
    flags = { deflate = { "--deflate" }, max_size = "--max-payload", cert = "--tls-cert", key = "--tls-key" },
    needs = { "build/peers/bin/lws_echo" } },
  { id = "node", name = "node ws", short = "node",
    echo = { "node", "interop/ws_echo_server.js" },
    broadcast = { "node", "bench/node_broadcast_server.js" },
    flags = { deflate = { "--deflate" }, max_size = "--max-payload", cert = "--tls-cert", key = "--tls-key" } },
  { id = "python", name = "python websockets", short = "python",
    echo = { "/usr/bin/python3", "interop/py_echo_server.py" },
    broadcast = { "/usr/bin/python3", "bench/py_broadcast_server.py" },
    flags = { deflate = { "--deflate" }, max_size = "--max-payload", cert = "--tls-cert", key = "--tls-key" } },
}

M.scenarios = {
  { id = "echo32_c1", title = "echo 32 B, 1 conn", short = "32 B\n1 conn",
    mode = "echo", args = { "--conns", "1", "--size", "32" },
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
  { id = "echo32_c64", title = "echo 32 B, 64 conns", short = "32 B\n64 conns",
    mode = "echo", args = { "--conns", "64", "--size", "32" },
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
  { id = "echo32_c512", title = "echo 32 B, 512 conns", short = "32 B\n512 conns",
    mode = "echo", args = { "--conns", "512", "--size", "32" },
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
  -- issue 13: CPU per message at 2,000 connections within 1.1x of that at 64
  { id = "echo32_c2000", title = "echo 32 B, 2,000 conns", short = "32 B\n2,000 conns",
    mode = "echo", args = { "--conns", "2000", "--size", "32" },
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
  { id = "echo64k", title = "echo 64 KiB, 4 conns x 4 in flight", short = "64 KiB\n4 x 4",
    mode = "echo", args = { "--conns", "4", "--size", "65536", "--inflight", "4" },
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
  { id = "echo16m", title = "echo 16 MiB, 1 conn", short = "16 MiB\n1 conn",
    mode = "echo", args = { "--conns", "1", "--size", "16777216", "--timeout", "30" }, max_size = 32 << 20,
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
  { id = "connect", title = "connect+handshake+close, 16 at once", short = "connect\ncycle",
    mode = "connect", args = { "--conns", "16" },
    metric = "server_us_per_cycle", unit = "us/cycle", target = CPU },
  -- held 4 s: long enough to see idle CPU (bench/run reports it)
  { id = "idle10k", title = "idle 10,000 conns", short = "10k idle", hold = 4,
    mode = "idle", args = { "--conns", "10000", "--sources", "4", "--timeout", "30" },
    metric = "rss_per_conn_bytes", unit = "B/conn", target = IDLE },
  { id = "idle_max", title = "idle 50,000 conns", conns = "idle_max",
    mode = "idle", args = { "--sources", "4", "--timeout", "30" },
    metric = "rss_per_conn_bytes", unit = "B/conn", target = IDLE },
  { id = "broadcast10k", title = "broadcast to 10,000 subscribers", short = "broadcast\n10k subs", kind = "broadcast",
    mode = "broadcast", args = { "--conns", "10000", "--inflight", "4", "--timeout", "30" },
    metric = "server_us_per_delivery", unit = "us/delivery", target = CPU },
  { id = "tls_echo32_c64", title = "TLS echo 32 B, 64 conns", short = "TLS 32 B\n64 conns", tls = true,
    mode = "echo", args = { "--conns", "64", "--size", "32" },
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
  { id = "json200", title = "echo 200 B JSON, 64 conns, deflate off", short = "JSON 200 B\nplain",
    mode = "echo", args = { "--conns", "64", "--size", "200", "--payload", "json" },
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
  { id = "json200_deflate", title = "echo 200 B JSON, 64 conns, deflate on", short = "JSON 200 B\ndeflate",
    deflate = true, mode = "echo", args = { "--conns", "64", "--size", "200", "--payload", "json", "--deflate" },
    metric = "server_us_per_msg", unit = "us/msg", target = CPU },
}

-- Instruction counts of duplex's echo server per 32-byte echo over one
-- connection: (Ir(n2) - Ir(n1)) / (n2 - n1) cancels start-up, handshake and
-- close; done `repeats` times to show that the figure is steady.
M.callgrind = { n1 = 500, n2 = 2500, repeats = 2 }

return M

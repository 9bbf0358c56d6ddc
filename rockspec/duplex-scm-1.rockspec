-- Build and install duplex from a checkout:
--   luarocks make rockspec/duplex-scm-1.rockspec            (system tree)
--   luarocks make --tree /tmp/rocktree rockspec/duplex-scm-1.rockspec
-- Every C file in csrc/ and every Lua module in lua/duplex/ must be listed
-- below: a new file has to be added here too (`make` picks them up by itself).
rockspec_format = "3.0"
package = "duplex"
version = "scm-1"

source = {
  -- Built from a checkout with `luarocks make`; nothing is downloaded.
  url = "git+file://.",
}

description = {
  summary = "WebSocket (RFC 6455) client and server for Lua 5.4 with a C core",
  detailed = [[
duplex implements RFC 6455 WebSockets with permessage-deflate (RFC 7692),
TLS through OpenSSL and an event loop, with the protocol engine in C.
]],
  license = "MIT",
  labels = {"websocket", "network"},
}

dependencies = {
  "lua >= 5.4, < 5.5",
}

external_dependencies = {
  OPENSSL = {header = "openssl/ssl.h", library = "ssl"},
  ZLIB = {header = "zlib.h", library = "z"},
}

build = {
  type = "builtin",
  modules = {
    ["duplex.core"] = {
      sources = {
        "csrc/dx_buf.c",
        "csrc/dx_clock.c",
        "csrc/dx_frame.c",
        "csrc/dx_http.c",
        "csrc/dx_loop.c",
        "csrc/dx_mask.c",
        "csrc/dx_out.c",
        "csrc/dx_pmd.c",
        "csrc/dx_proto.c",
        "csrc/dx_sock.c",
        "csrc/dx_tls.c",
        "csrc/dx_utf8.c",
        "csrc/l_core.c",
        "csrc/l_engine.c",
        "csrc/l_handshake.c",
        "csrc/l_loop.c",
        "csrc/l_pmd.c",
        "csrc/l_socket.c",
        "csrc/l_util.c",
      },
      incdirs = {"csrc", "$(OPENSSL_INCDIR)", "$(ZLIB_INCDIR)"},
      libdirs = {"$(OPENSSL_LIBDIR)", "$(ZLIB_LIBDIR)"},
      libraries = {"ssl", "crypto", "z", "pthread", "m"},
    },
    ["duplex"] = "lua/duplex/init.lua",
    ["duplex.addr"] = "lua/duplex/addr.lua",
    ["duplex.client"] = "lua/duplex/client.lua",
    ["duplex.cqueues"] = "lua/duplex/cqueues.lua",
    ["duplex.handshake"] = "lua/duplex/handshake.lua",
    ["duplex.nginx"] = "lua/duplex/nginx.lua",
    ["duplex.options"] = "lua/duplex/options.lua",
    ["duplex.poll"] = "lua/duplex/poll.lua",
    ["duplex.pubsub"] = "lua/duplex/pubsub.lua",
    ["duplex.redis"] = "lua/duplex/redis.lua",
    ["duplex.resp"] = "lua/duplex/resp.lua",
    ["duplex.runtime"] = "lua/duplex/runtime.lua",
    ["duplex.server"] = "lua/duplex/server.lua",
    ["duplex.transport"] = "lua/duplex/transport.lua",
    ["duplex.url"] = "lua/duplex/url.lua",
    ["duplex.websocket"] = "lua/duplex/websocket.lua",
    ["duplex.workers"] = "lua/duplex/workers.lua",
  },
}

-- Build and install duplex from a checkout (nothing is downloaded):
--   luarocks make rockspec/duplex-scm-1.rockspec                   (system tree)
--   luarocks make --tree /tmp/rocktree rockspec/duplex-scm-1.rockspec
-- The Makefile does the work (`make` into build/, `make install` into the
-- rock's directories), so the checkout stays clean and one core.so is
-- installed. For OpenResty / LuaJIT: rockspec/duplex-openresty-*.rockspec.
rockspec_format = "3.0"
package = "duplex"
version = "scm-1"

source = {
  url = "git+file://.",
}

description = {
  summary = "WebSocket (RFC 6455) client and server for Lua 5.4 with a C core",
  detailed = [[
duplex implements RFC 6455 WebSockets with permessage-deflate (RFC 7692),
TLS through OpenSSL and an event loop, with the protocol engine in C.
Installs the duplex modules, duplex.core and the `duplex` command
(duplex connect URL, duplex serve).
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
  type = "make",
  build_variables = {
    CFLAGS = "$(CFLAGS) -I$(OPENSSL_INCDIR) -I$(ZLIB_INCDIR)",
    LDFLAGS = "-L$(OPENSSL_LIBDIR) -L$(ZLIB_LIBDIR)",
    LUA_INC = "-I$(LUA_INCDIR)",
  },
  install_variables = {
    LUA_LMOD = "$(LUADIR)",
    LUA_CMOD = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
}

-- duplex for OpenResty (nginx + lua-nginx-module, LuaJIT 2.1): the sans-I/O
-- core built against LuaJIT's headers, the modules duplex.nginx needs and
-- duplex.redis.client over cosockets (the event loop, sockets and the rest
-- need Lua 5.4). From a checkout:
--   luarocks --lua-version=5.1 make --tree /opt/duplex rockspec/duplex-openresty-0.2.0-1.rockspec \
--     LUA_INCDIR=/usr/include/luajit-2.1
-- (OpenResty's own: LUA_INCDIR=/usr/local/openresty/luajit/include/luajit-2.1), then in nginx.conf:
--   lua_package_path  "/opt/duplex/share/lua/5.1/?.lua;;";
--   lua_package_cpath "/opt/duplex/lib/lua/5.1/?.so;;";
rockspec_format = "3.0"
package = "duplex-openresty"
version = "0.2.0-1"

source = {
  url = "git+file://.",
  tag = "v0.2.0",
}

description = {
  summary = "WebSocket (RFC 6455) server for OpenResty with duplex's C protocol engine",
  detailed = [[
The OpenResty build of duplex: duplex.nginx serves WebSocket connections
over lua-nginx-module cosockets with duplex's C engine (framing, UTF-8,
permessage-deflate, heartbeats, limits), and duplex.redis.client talks to
Redis (commands, pipelines, pub/sub, reconnection) over cosockets too.
]],
  license = "MIT",
  labels = {"websocket", "network", "openresty", "nginx"},
}

dependencies = {
  "lua == 5.1",
}

external_dependencies = {
  OPENSSL = {header = "openssl/sha.h", library = "crypto"},
  ZLIB = {header = "zlib.h", library = "z"},
}

build = {
  type = "make",
  build_target = "luajit",
  build_variables = {
    CFLAGS = "$(CFLAGS) -I$(OPENSSL_INCDIR) -I$(ZLIB_INCDIR)",
    LDFLAGS = "-L$(OPENSSL_LIBDIR) -L$(ZLIB_LIBDIR)",
    LUAJIT_INC = "-I$(LUA_INCDIR)",
  },
  install_target = "install-luajit",
  install_variables = {
    LJ_LMOD = "$(LUADIR)",
    LJ_CMOD = "$(LIBDIR)",
  },
}

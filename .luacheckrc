-- luacheck settings for lua/, examples/, spec/ and bench/ (scripts/lint,
-- `make lint`; `make check` requires zero warnings).
std = "lua54"
max_line_length = 120

files["spec"] = {std = "+busted"}
-- core_test.lua is no busted file: it runs under LuaJIT and under lua5.4
-- alike, so it may use only what every Lua provides.
files["spec/luajit"] = {std = "min"}
-- These run inside nginx (lua-nginx-module, LuaJIT): ngx's API, with its
-- writable fields (ngx.status, ngx.header, ...).
files["lua/duplex/nginx.lua"] = {std = "ngx_lua"}
files["examples/nginx"] = {std = "ngx_lua"}

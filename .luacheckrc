-- luacheck settings for lua/, types/, examples/, spec/ and bench/ (scripts/lint,
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
-- The LuaLS stub of the C module: empty bodies whose parameters only
-- document, class tables that exist to hang methods on (241), and inline
-- table types that do not wrap.
files["types"] = {unused_args = false, ignore = {"241"}, max_comment_line_length = false}

/*
 * The Lua 5.4 API that the sans-I/O l_*.c files use (Makefile: LJ_SRC),
 * spelled in Lua 5.1 for LuaJIT 2.1, so that one set of sources also builds
 * the module for lua-nginx-module. For Lua 5.4 only DX_HAVE_LOOP is defined
 * here: that build compiles exactly as before.
 *
 * Left out, so not to be used in those files:
 *  - "%I" and "%U" in lua_pushfstring/luaL_error: LuaJIT's formatter does not
 *    know them and would take the following arguments for the wrong types
 *    (spec/luajit_spec.lua looks for them);
 *  - lua_getiuservalue/lua_setiuservalue with n beyond the count given to
 *    lua_newuserdatauv: 5.4 answers LUA_TNONE / 0, this does not check;
 *  - luaL_add* on a buffer from luaL_buffinitsize (only write, then push).
 */
#ifndef DX_L_COMPAT_H
#define DX_L_COMPAT_H

#include <lauxlib.h>
#include <lua.h>

/* The event loop and the sockets suspend coroutines inside C calls
 * (lua_yieldk), which 5.1 cannot do: a build for it leaves them out. */
#define DX_HAVE_LOOP (LUA_VERSION_NUM >= 503)

#if LUA_VERSION_NUM < 503

#include <stdint.h>

/* lua_Integer is ptrdiff_t there, but every Lua number is a double. */
#define LUA_MAXINTEGER PTRDIFF_MAX

#define lua_rawlen(L, i) lua_objlen(L, (i))
#define luaL_len(L, i) ((lua_Integer)lua_objlen(L, (i)))
#define luaL_pushfail(L) lua_pushnil(L)

static inline int dx_compat_absindex(lua_State *L, int i) {
  return i > 0 || i <= LUA_REGISTRYINDEX ? i : lua_gettop(L) + i + 1;
}
#define lua_absindex dx_compat_absindex

/* 5.3 made the getters return the type of the value they push. */
static inline int dx_compat_getfield(lua_State *L, int i, const char *k) {
  lua_getfield(L, i, k);
  return lua_type(L, -1);
}

static inline int dx_compat_rawget(lua_State *L, int i) {
  lua_rawget(L, i);
  return lua_type(L, -1);
}

static inline int dx_compat_rawgeti(lua_State *L, int i, lua_Integer n) {
  lua_rawgeti(L, i, (int)n);
  return lua_type(L, -1);
}

static inline int dx_compat_geti(lua_State *L, int i, lua_Integer n) {
  i = dx_compat_absindex(L, i);
  lua_pushinteger(L, n);
  lua_gettable(L, i);
  return lua_type(L, -1);
}

/* Registry keys that are addresses: a light userdata key is the same. */
static inline int dx_compat_rawgetp(lua_State *L, int i, const void *p) {
  i = dx_compat_absindex(L, i);
  lua_pushlightuserdata(L, (void *)p);
  lua_rawget(L, i);
  return lua_type(L, -1);
}

static inline void dx_compat_rawsetp(lua_State *L, int i, const void *p) {
  i = dx_compat_absindex(L, i);
  lua_pushlightuserdata(L, (void *)p);
  lua_insert(L, -2);
  lua_rawset(L, i);
}

#define lua_getfield dx_compat_getfield
#define lua_rawget dx_compat_rawget
#define lua_rawgeti dx_compat_rawgeti
#define lua_geti dx_compat_geti
#define lua_rawgetp dx_compat_rawgetp
#define lua_rawsetp dx_compat_rawsetp

/* Positive n: n steps toward the top, each one lua_insert; a negative n is
 * the same rotation the other way round. */
static inline void dx_compat_rotate(lua_State *L, int i, int n) {
  i = dx_compat_absindex(L, i);
  int len = lua_gettop(L) - i + 1;
  for (n = (n % len + len) % len; n > 0; n--) lua_insert(L, i);
}
#define lua_rotate dx_compat_rotate

/* LuaJIT's lua_tointegerx and luaL_checkinteger truncate 2.5 to 2. Options
 * and arguments must be refused as in 5.4 instead: only a number (or numeric
 * string) with an exact value in lua_Integer's range is an integer. */
static inline lua_Integer dx_compat_tointegerx(lua_State *L, int i, int *isint) {
  lua_Number n = lua_tonumber(L, i);
  int ok = lua_isnumber(L, i) && n >= (lua_Number)PTRDIFF_MIN && n < -(lua_Number)PTRDIFF_MIN &&
           (lua_Number)(lua_Integer)n == n;
  if (isint) *isint = ok;
  return ok ? (lua_Integer)n : 0;
}

static inline lua_Integer dx_compat_checkinteger(lua_State *L, int arg) {
  int ok;
  lua_Integer v = dx_compat_tointegerx(L, arg, &ok);
  if (!ok) {
    if (lua_isnumber(L, arg)) luaL_argerror(L, arg, "number has no integer representation");
    else luaL_typerror(L, arg, "number");
  }
  return v;
}

#define lua_tointegerx dx_compat_tointegerx
#define luaL_checkinteger dx_compat_checkinteger
#define luaL_optinteger(L, arg, d) luaL_opt(L, luaL_checkinteger, (arg), (d))

/* User values. A 5.1 userdata has one environment table instead; the values
 * live in it at 1..nuv. The table is always a wrapper, never a value itself,
 * so any value may be stored and each slot reads back what was set (nil
 * until then), as in 5.4. A userdata without user values gets no table. */
static inline void *dx_compat_newuserdatauv(lua_State *L, size_t size, int nuv) {
  void *p = lua_newuserdata(L, size);
  if (nuv > 0) {
    lua_createtable(L, nuv, 0);
    lua_setfenv(L, -2);
  }
  return p;
}

static inline int dx_compat_getiuservalue(lua_State *L, int i, int n) {
  lua_getfenv(L, i);
  lua_rawgeti(L, -1, n);
  lua_remove(L, -2);
  return lua_type(L, -1);
}

/* Pops the value, as in 5.4. */
static inline int dx_compat_setiuservalue(lua_State *L, int i, int n) {
  i = dx_compat_absindex(L, i);
  lua_getfenv(L, i);
  lua_insert(L, -2);
  lua_rawseti(L, -2, n);
  lua_pop(L, 1);
  return 1;
}

#define lua_newuserdatauv dx_compat_newuserdatauv
#define lua_getiuservalue dx_compat_getiuservalue
#define lua_setiuservalue dx_compat_setiuservalue

/* The callers know the size up front; 5.1's luaL_Buffer would grow in
 * LUAL_BUFFERSIZE steps. As in 5.4 one slot stays on the stack until
 * luaL_pushresultsize turns it into the string: nil while the struct's own
 * array is large enough, else a userdata block (collected if an error comes
 * first). b->p keeps the start of the block. */
static inline char *dx_compat_buffinitsize(lua_State *L, luaL_Buffer *b, size_t size) {
  b->L = L;
  b->lvl = 0;
  if (size <= LUAL_BUFFERSIZE) {
    lua_pushnil(L);
    b->p = b->buffer;
  } else {
    b->p = lua_newuserdata(L, size);
  }
  return b->p;
}

static inline void dx_compat_pushresultsize(luaL_Buffer *b, size_t size) {
  lua_pushlstring(b->L, b->p, size);
  lua_remove(b->L, -2);
}

#define luaL_buffinitsize dx_compat_buffinitsize
#define luaL_pushresultsize dx_compat_pushresultsize

#endif /* LUA_VERSION_NUM < 503 */
#endif

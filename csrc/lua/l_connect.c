/*
 * core.connect and core.getaddrinfo: name resolution on a worker thread, so
 * that a slow DNS server never blocks the loop, then a non-blocking connect
 * to each address in turn until one answers or the timeout passes.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "l_socket.h"

#define RESOLVE_MT "duplex.resolve"
#define CONNECT_MT "duplex.connect"

/* A getaddrinfo call run by a worker thread. The waiting side (a resolve
 * userdata) owns it once done; if the waiter let go first (timeout, or its
 * state was collected) the job frees itself when it finishes. The waiting
 * task may end first too (its coroutine resumed or closed from outside):
 * then the job wakes nobody. */
typedef struct resolve_job {
  dx_work work;
  dx_task *task; /* task to wake, NULL when it is gone */
  int released;  /* the resolve state let go: free on finishing */
  int finished;
  int n; /* addresses, or -1 with err set */
  int port;
  char host[DX_HOST_MAX + 1];
  char err[DX_ERR_MAX];
  dx_addr addrs[DX_ADDR_MAX];
} resolve_job;

typedef struct lresolve {
  resolve_job *job;
  dx_addr addrs[DX_ADDR_MAX];
  int n, idx;
  int phase; /* connect: 0 resolving, 1 connecting */
  int nodelay;
  int has_bind;
  dx_addr bind;
  char err[DX_ERR_MAX];
} lresolve;

static void resolve_run(dx_work *w) {
  resolve_job *job = dx_container_of(w, resolve_job, work);
  job->n = dx_addr_resolve(job->host, job->port, 0, job->addrs, job->err, sizeof job->err);
}

/* The task ended without the job (dx_task_end). */
static void resolve_forget_task(void *ud) { ((resolve_job *)ud)->task = NULL; }

static void set_task(resolve_job *job, dx_task *t) {
  if (job->task) job->task->detach = NULL, job->task->detach_ud = NULL;
  job->task = t;
  if (t) t->detach = resolve_forget_task, t->detach_ud = job;
}

static void resolve_done(dx_loop *loop, dx_work *w, int canceled) {
  resolve_job *job = dx_container_of(w, resolve_job, work);
  if (job->released) {
    set_task(job, NULL);
    free(job);
    return;
  }
  job->finished = 1;
  if (canceled) {
    job->n = -1;
    snprintf(job->err, sizeof job->err, "name resolution failed: interrupted (fork)");
  }
  dx_task *t = job->task;
  set_task(job, NULL);
  if (t && !loop->closing) dx_task_ready(loop, t, DX_WAKE_IO);
}

static void resolve_release(lresolve *r) {
  resolve_job *job = r->job;
  r->job = NULL;
  if (!job) return;
  set_task(job, NULL);
  if (job->finished)
    free(job);
  else
    job->released = 1;
}

static int resolve_gc(lua_State *L) {
  resolve_release(lua_touserdata(L, 1));
  return 0;
}

/* Push a resolve state for host:port. Numeric hosts are resolved at once
 * (r->n > 0); otherwise a job is queued for task. 0, or -1 with r->err. */
static lresolve *resolve_start(lua_State *L, const char *mt, const char *host, int port, dx_task *t) {
  lresolve *r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  luaL_setmetatable(L, mt);
  if (dx_addr_numeric(host, port, &r->addrs[0]) == 0) {
    r->n = 1;
    return r;
  }
  if (strlen(host) > DX_HOST_MAX || !*host) {
    r->n = -1;
    snprintf(r->err, sizeof r->err, "name resolution failed: bad host name");
    return r;
  }
  if (!t) t = dx_lua_begin(L, 0);
  resolve_job *job = calloc(1, sizeof *job);
  if (!job) {
    r->n = -1;
    snprintf(r->err, sizeof r->err, "name resolution failed: not enough memory");
    return r;
  }
  job->work.run = resolve_run;
  job->work.done = resolve_done;
  set_task(job, t);
  job->port = port;
  memcpy(job->host, host, strlen(host) + 1);
  if (dx_work_submit(dx_lua_loop(L), &job->work) < 0) {
    set_task(job, NULL);
    free(job);
    r->n = -1;
    snprintf(r->err, sizeof r->err, "name resolution failed: too many lookups in progress");
    return r;
  }
  r->job = job;
  return r;
}

/* After the job woke the task: take its result. */
static void resolve_collect(lresolve *r) {
  resolve_job *job = r->job;
  r->n = job->n;
  if (job->n > 0)
    memcpy(r->addrs, job->addrs, (size_t)job->n * sizeof job->addrs[0]);
  else
    memcpy(r->err, job->err, sizeof r->err);
  resolve_release(r);
}

static void push_addrs(lua_State *L, const lresolve *r) {
  lua_createtable(L, r->n, 0);
  for (int i = 0; i < r->n; i++) {
    char ip[DX_IPSTR_MAX];
    int port;
    dx_addr_text(&r->addrs[i], ip, &port);
    lua_createtable(L, 0, 3);
    lua_pushstring(L, r->addrs[i].family == AF_INET6 ? "inet6" : "inet");
    lua_setfield(L, -2, "family");
    lua_pushstring(L, ip);
    lua_setfield(L, -2, "addr");
    lua_pushinteger(L, port);
    lua_setfield(L, -2, "port");
    lua_rawseti(L, -2, i + 1);
  }
}

/* stack: host, port, resolve state */
static int getaddrinfo_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lresolve *r = luaL_checkudata(L, 3, RESOLVE_MT);
  dx_lua_woken(L, (dx_task *)ctx);
  resolve_collect(r);
  if (r->n < 0) return dx_lua_fail(L, r->err);
  push_addrs(L, r);
  return 1;
}

static int l_getaddrinfo(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int port = lua_isnoneornil(L, 2) ? 0 : dx_lua_check_port(L, 2, "getaddrinfo");
  lua_settop(L, 2);
  lresolve *r = resolve_start(L, RESOLVE_MT, host, port, NULL);
  if (r->n < 0) return dx_lua_fail(L, r->err);
  if (r->n > 0) {
    push_addrs(L, r);
    return 1;
  }
  dx_task *t = r->job->task;
  return dx_lua_wait_work(L, t, getaddrinfo_k);
}

/* ---- connect ---- */

/* stack: opts, timeout, connect state, socket being connected (or nil) */
static int connect_k(lua_State *L, int status, lua_KContext ctx) {
  dx_task *t = (dx_task *)ctx;
  lresolve *r = luaL_checkudata(L, 3, CONNECT_MT);
  dx_loop *loop = dx_lua_loop(L);
  int wake = status == LUA_YIELD ? dx_lua_woken(L, t) : DX_WAKE_NONE;
  lsock *s = luaL_testudata(L, 4, DX_SOCK_MT);
  if (wake == DX_WAKE_TIMEOUT) {
    resolve_release(r);
    if (s) dx_sock_close(s, 1, 0);
    return dx_lua_fail(L, "timeout");
  }
  if (r->phase == 0) {
    if (r->job) {
      if (!r->job->finished) return dx_lua_wait_work(L, t, connect_k);
      resolve_collect(r);
    }
    if (r->n < 0) return dx_lua_fail(L, r->err);
    r->phase = 1;
  } else if (s && !s->closed) {
    /* woken on the connecting socket */
    int rc = dx_sock_connect_result(s->io.fd);
    if (rc == 0) {
      dx_addr peer;
      if (dx_addr_of(s->io.fd, 1, &peer) == 0) goto connected;
      return dx_lua_wait_io(L, t, &s->io, EPOLLOUT, 0, connect_k); /* not yet */
    }
    char buf[128];
    snprintf(r->err, sizeof r->err, "%s", dx_sock_strerror(rc, buf, sizeof buf));
    dx_sock_close(s, 0, 0);
    r->idx++;
  }
  while (r->idx < r->n) {
    int pending;
    int fd = dx_sock_connect(&r->addrs[r->idx], r->has_bind ? &r->bind : NULL, &pending);
    if (fd < 0) {
      char buf[128];
      snprintf(r->err, sizeof r->err, "%s", dx_sock_strerror(fd, buf, sizeof buf));
      r->idx++;
      continue;
    }
    int err;
    s = dx_sock_push(L, loop, fd, UV_COUNT, &err);
    if (!s) return dx_lua_fail_errno(L, err);
    lua_replace(L, 4);
    if (pending) return dx_lua_wait_io(L, t, &s->io, EPOLLOUT, 0, connect_k);
    goto connected;
  }
  return dx_lua_fail(L, r->err[0] ? r->err : "no address to connect to");
connected:
  if (r->nodelay) dx_sock_nodelay(s->io.fd, 1);
  lua_getfield(L, 1, "host");
  lua_setiuservalue(L, 4, UV_HOST);
  lua_settop(L, 4);
  return 1;
}

static int l_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  const char *host = dx_lua_opt_string(L, 1, "host");
  if (!host) return luaL_error(L, "connect: host required");
  lua_getfield(L, 1, "port");
  int port = dx_lua_check_port(L, -1, "connect");
  lua_pop(L, 1);
  lua_getfield(L, 1, "nodelay");
  int nodelay = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 1);
  dx_addr bind_to;
  int has_bind = 0;
  lua_getfield(L, 1, "bind");
  if (!lua_isnil(L, -1)) {
    const char *bhost;
    int bport = 0;
    if (lua_istable(L, -1)) {
      bhost = dx_lua_opt_string(L, -1, "host");
      lua_getfield(L, -1, "port");
      if (!lua_isnil(L, -1)) bport = dx_lua_check_port(L, -1, "connect: bind");
      lua_pop(L, 1);
    } else {
      bhost = lua_tostring(L, -1);
    }
    if (!bhost || dx_addr_numeric(bhost, bport, &bind_to) < 0)
      return luaL_error(L, "connect: bind must be an IP address (or {host=, port=})");
    has_bind = 1;
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "timeout"); /* stack index 2 */
  dx_task *t = dx_lua_begin(L, 2);
  lresolve *r = resolve_start(L, CONNECT_MT, host, port, t);
  r->nodelay = nodelay;
  r->has_bind = has_bind;
  if (has_bind) r->bind = bind_to;
  lua_pushnil(L);
  return connect_k(L, LUA_OK, (lua_KContext)t);
}

void dx_open_connect(lua_State *L) {
  static const luaL_Reg resolve_meta[] = {{"__gc", resolve_gc}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"connect", l_connect}, {"getaddrinfo", l_getaddrinfo}, {NULL, NULL}};
  dx_lua_new_class(L, RESOLVE_MT, NULL, resolve_meta);
  dx_lua_new_class(L, CONNECT_MT, NULL, resolve_meta);
  dx_setfuncs(L, funcs);
}

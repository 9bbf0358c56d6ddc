/*
 * The event loop as Lua sees it: coroutines started by core.spawn are the
 * loop's tasks, and only core.run resumes them. A C function that would
 * block yields its coroutine with a continuation (lua_yieldk) that retries
 * the operation when the loop resumes it; see dx_loop.h.
 *
 * State lives in the registry of the Lua state: the loop userdata, a table
 * from coroutine to task (weak keys, so a coroutine parked forever and
 * unreachable is collected), the error handler and the signal handlers.
 * A task anchors its coroutine with a registry reference only while
 * something can still wake it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "l_core.h" /* before dx_loop.h: lua.h enables its Lua part */
#include "dx_loop.h"

#define LOOP_MT "duplex.loop"
#define TASK_MT "duplex.task"
#define TIMER_MT "duplex.timer"

static const char LOOP_KEY = 'L';
static const char TASKS_KEY = 'T';
static const char ONERROR_KEY = 'E';
static const char SIGNALS_KEY = 'S';

#define NOT_A_TASK "must be called from a coroutine started by duplex.spawn"

typedef struct lloop {
  dx_loop loop;
  lua_State *L; /* the thread inside core.run, else NULL */
  struct ltask *current; /* the task being resumed, else NULL */
  int running, stop, dead;
  size_t ntasks;
  int sigfd;
  dx_io sigio;
  sigset_t sigmask;            /* signals routed to the signalfd */
  unsigned char sigseen[NSIG]; /* arrived since the last dispatch */
} lloop;

typedef struct ltask ltask;
struct ltask {
  dx_task t; /* first: dx_task pointers are ltask pointers */
  lua_State *co;
  lloop *ll;
  int ref;   /* anchors co while a wake-up source exists */
  int nargs; /* values on co's stack for the next resume */
  /* core.at_end set a function (and its first argument) for the task to
   * go on with when co's function ends: the task userdata's user values
   * 1 and 2, not registry refs, which would grow the registry by two
   * slots per connection at the peak */
  int has_end;
};

typedef struct ltimer {
  dx_timer timer;
  lloop *ll;
  double interval; /* > 0: repeat */
  int ref;         /* anchors the timer (and its function) while armed */
} ltimer;

/* ---- registry helpers ---- */

static lloop *get_lloop(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  lloop *ll = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (!ll) luaL_error(L, "duplex.core: no event loop in this Lua state");
  return ll;
}

dx_loop *dx_lua_loop(lua_State *L) { return &get_lloop(L)->loop; }

/* The task of L, or NULL when L is no loop coroutine. */
static ltask *find_task(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS_KEY);
  lua_pushvalue(L, idx);
  lua_rawget(L, -2);
  ltask *task = luaL_testudata(L, -1, TASK_MT);
  lua_pop(L, 2);
  return task;
}

/* Push the userdata of co's task (whose user values hold core.at_end's
 * function and argument). */
static void push_task(lua_State *L, lua_State *co) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS_KEY);
  lua_pushthread(co);
  lua_xmove(co, L, 1);
  lua_rawget(L, -2);
  lua_remove(L, -2);
}

/* Every blocking call asks this, once per message on a busy connection:
 * the task being resumed answers without a lookup in the task table,
 * whose entry for one of thousands of coroutines is seldom in the cache.
 * Any other thread (a coroutine inside a task, one resumed outside the
 * loop) takes the lookup and its verdict. */
static ltask *running_task_in(lua_State *L, lloop *ll) {
  ltask *task = ll->current;
  if (task && task->co == L && task->t.state == DX_TASK_RUNNING) return task;
  lua_pushthread(L);
  task = find_task(L, -1);
  lua_pop(L, 1);
  if (!task || task->t.state != DX_TASK_RUNNING) luaL_error(L, NOT_A_TASK);
  return task;
}

static ltask *running_task(lua_State *L) { return running_task_in(L, get_lloop(L)); }

static void anchor(lua_State *L, ltask *task) {
  if (task->ref != LUA_NOREF) return;
  lua_pushthread(task->co);
  lua_xmove(task->co, L, 1);
  task->ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

static void unanchor(lua_State *L, ltask *task) {
  luaL_unref(L, LUA_REGISTRYINDEX, task->ref);
  task->ref = LUA_NOREF;
}

/* ---- blocking operations (see dx_loop.h) ---- */

static double check_timeout(lua_State *L, int idx) {
  if (idx == 0 || lua_isnoneornil(L, idx)) return -1;
  double s = luaL_checknumber(L, idx);
  luaL_argcheck(L, s >= 0 && s == s, idx, "timeout must be a number >= 0");
  return s;
}

static dx_task *begin(lua_State *L, lloop *ll, int timeout_idx) {
  double timeout = check_timeout(L, timeout_idx);
  ltask *task = running_task_in(L, ll);
  task->t.deadline = timeout < 0 ? DX_NO_DEADLINE : dx_now() + timeout;
  return &task->t;
}

dx_task *dx_lua_begin(lua_State *L, int timeout_idx) { return begin(L, get_lloop(L), timeout_idx); }

/* The loop of a socket or watcher is the loop of the Lua state that made
 * it: taking it from the object spares the registry lookup, on every
 * message. */
dx_task *dx_lua_begin_in(lua_State *L, dx_loop *loop, int timeout_idx) {
  return begin(L, dx_container_of(loop, lloop, loop), timeout_idx);
}

dx_task *dx_lua_begin_read(lua_State *L) {
  lua_Integer max = luaL_optinteger(L, 2, DX_LOOP_RBUF_SIZE);
  luaL_argcheck(L, max >= 1, 2, "must be >= 1");
  lua_settop(L, 3);
  lua_pushinteger(L, max);
  lua_replace(L, 2);
  return dx_lua_begin(L, 3);
}

static int yield_task(lua_State *L, dx_task *t, lua_KFunction k) {
  return lua_yieldk(L, 0, (lua_KContext)t, k);
}

static void check_yieldable(lua_State *L) {
  if (!lua_isyieldable(L)) luaL_error(L, "cannot wait here (a metamethod or C call that cannot yield)");
}

int dx_lua_wait_io(lua_State *L, dx_task *t, dx_io *io, uint32_t events, size_t low_water, lua_KFunction k) {
  check_yieldable(L);
  if (io->fd < 0 && !(events & DX_WANT_DRAIN)) return luaL_error(L, "waiting on a closed file descriptor");
  if (dx_task_wait_io(&((ltask *)t)->ll->loop, t, io, events, low_water) < 0)
    return luaL_error(L, "not enough memory");
  return yield_task(L, t, k);
}

int dx_lua_wait_work(lua_State *L, dx_task *t, lua_KFunction k) {
  check_yieldable(L);
  if (dx_task_wait(&((ltask *)t)->ll->loop, t, DX_TASK_WAIT, 1) < 0) return luaL_error(L, "not enough memory");
  return yield_task(L, t, k);
}

int dx_lua_yield(lua_State *L, dx_task *t, lua_KFunction k) {
  check_yieldable(L);
  dx_task_ready(&((ltask *)t)->ll->loop, t, DX_WAKE_YIELD);
  return yield_task(L, t, k);
}

static void finish_task(lua_State *L, ltask *task);

int dx_lua_woken(lua_State *L, dx_task *t) {
  if (t->state != DX_TASK_RUNNING || t->wake == DX_WAKE_NONE) {
    /* coroutine.resume() on a waiting loop coroutine: it dies with this
     * error, outside the loop's view, so the loop lets go of it now. */
    finish_task(L, (ltask *)t);
    return luaL_error(L, "a duplex.core coroutine was resumed outside the loop");
  }
  return t->wake;
}

/* ---- tasks ---- */

/* Start a loop coroutine running the function below nargs values on top of
 * L's stack; pops them and pushes the coroutine. */
static ltask *spawn(lua_State *L, lloop *ll, int nargs) {
  lua_State *co = lua_newthread(L);
  lua_rotate(L, -(nargs + 2), 1); /* co below the function */
  lua_xmove(L, co, nargs + 1);
  ltask *task = lua_newuserdatauv(L, sizeof *task, 2);
  dx_task_init(&task->t);
  task->co = co;
  task->ll = ll;
  task->ref = LUA_NOREF;
  task->nargs = nargs;
  task->has_end = 0;
  luaL_setmetatable(L, TASK_MT);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS_KEY);
  lua_pushvalue(L, -3);
  lua_pushvalue(L, -3);
  lua_rawset(L, -3);
  lua_pop(L, 2);
  anchor(L, task);
  ll->ntasks++;
  dx_task_ready(&ll->loop, &task->t, DX_WAKE_START);
  return task;
}

lua_State *dx_lua_state(dx_loop *loop) { return dx_container_of(loop, lloop, loop)->L; }

void dx_lua_spawn(dx_loop *loop, int nargs) {
  lloop *ll = dx_container_of(loop, lloop, loop);
  spawn(ll->L, ll, nargs);
  lua_pop(ll->L, 1);
}

static void finish_task(lua_State *L, ltask *task) {
  dx_task_end(&task->ll->loop, &task->t);
  task->t.state = DX_TASK_DONE;
  task->ll->ntasks--;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS_KEY);
  lua_pushthread(task->co);
  lua_xmove(task->co, L, 1);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  unanchor(L, task);
}

static int task_gc(lua_State *L) {
  ltask *task = luaL_checkudata(L, 1, TASK_MT);
  if (task->t.state != DX_TASK_DONE) {
    if (!task->ll->dead) dx_task_end(&task->ll->loop, &task->t);
    task->t.state = DX_TASK_DONE;
    task->ll->ntasks--;
  }
  return 0;
}

/* Hand an error of a loop coroutine to the handler set by core.on_error,
 * or print it. Called on L with the error object moved from co. */
static void report_error(lua_State *L, lua_State *co) {
  int base = lua_gettop(L);
  lua_xmove(co, L, 1);
  const char *msg = lua_tostring(L, base + 1);
  if (!msg) msg = luaL_typename(L, base + 1);
  luaL_traceback(L, co, msg, 0);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &ONERROR_KEY);
  if (lua_isfunction(L, -1)) {
    lua_pushvalue(L, base + 1);
    lua_pushvalue(L, base + 2);
    lua_pushthread(co);
    lua_xmove(co, L, 1);
    if (lua_pcall(L, 3, 0, 0) != LUA_OK)
      fprintf(stderr, "duplex: error in the on_error handler: %s\n", lua_tostring(L, -1));
  } else {
    fprintf(stderr, "duplex: error in a coroutine: %s\n", lua_tostring(L, base + 2));
  }
  lua_settop(L, base);
}

/* Empty co for a new start: its frames unwound, pending to-be-closed
 * variables closed, and its stack back to its first size (a stack only
 * shrinks once it is three times what is in use). */
static void reset_thread(lua_State *L, lua_State *co) {
#if LUA_VERSION_RELEASE_NUM >= 50406
  lua_closethread(co, L);
#else
  (void)L;
  lua_resetthread(co);
#endif
  lua_settop(co, 0);
}

/* core.at_end's function, run by the task that ended, in the same
 * coroutine started anew (resume_task resumes it at once): fn(arg, true)
 * after a return, fn(arg, false, err) after an error, err with co's
 * traceback when it is a string, as xpcall(f, debug.traceback) gives it.
 * Reusing co, not a new coroutine, leaves no hole in the heap where the
 * old one was. */
static void restart_at_end(lua_State *L, ltask *task, int status) {
  lua_State *co = task->co;
  int base = lua_gettop(L);
  push_task(L, co);
  lua_getiuservalue(L, base + 1, 1);
  lua_getiuservalue(L, base + 1, 2);
  lua_pushnil(L);
  lua_setiuservalue(L, base + 1, 1);
  lua_pushnil(L);
  lua_setiuservalue(L, base + 1, 2);
  task->has_end = 0;
  lua_pushboolean(L, status == LUA_OK);
  if (status != LUA_OK) {
    lua_xmove(co, L, 1);
    if (lua_type(L, -1) == LUA_TSTRING) {
      luaL_traceback(L, co, lua_tostring(L, -1), 0);
      lua_remove(L, -2);
    }
  }
  reset_thread(L, co);
  dx_task_end(&task->ll->loop, &task->t);
  task->t.deadline = DX_NO_DEADLINE;
  task->nargs = lua_gettop(L) - base - 2;
  lua_xmove(L, co, task->nargs + 1);
  lua_settop(L, base);
  task->t.wake = DX_WAKE_START;
}

static void resume_task(lua_State *L, ltask *task) {
  lua_State *co = task->co;
  int nres, status;
  /* an at_end function goes on at once, as a tail call would: a server
   * connection's handler starts in the pass its handshake ended in */
  for (;;) {
    int nargs = task->nargs;
    task->nargs = 0;
    task->ll->current = task;
    status = lua_resume(co, L, nargs, &nres);
    task->ll->current = NULL;
    if (status == LUA_YIELD || !task->has_end) break;
    restart_at_end(L, task, status);
  }
  if (status == LUA_YIELD) {
    lua_pop(co, nres);
    if (task->t.state == DX_TASK_RUNNING) /* coroutine.yield(): run again next pass */
      dx_task_ready(&task->ll->loop, &task->t, DX_WAKE_YIELD);
    else if (task->t.state == DX_TASK_PARKED && !dx_timer_armed(&task->t.timer))
      /* only core.wake can end this wait: let the coroutine be collected
       * once nobody can call that any more */
      unanchor(L, task);
    return;
  }
  if (status != LUA_OK) report_error(L, co);
  /* closes pending to-be-closed variables (sockets...) after an error; and
   * gives the stack back now, not when the collector gets to the dead
   * coroutine: a handshake's coroutine (a callback route's ends with it)
   * would otherwise leave its grown stack as garbage, and ten thousand
   * opening at once pile up a hole in the heap per connection */
  reset_thread(L, co);
  finish_task(L, task);
}

/* ---- core.run and friends ---- */

static void dispatch_signals(lua_State *L, lloop *ll);

/* Only the tasks ready now: those they wake run on the next pass. */
static void resume_ready(lua_State *L, lloop *ll) {
  size_t n = ll->loop.nready;
  dx_task *t;
  while (n-- > 0 && !ll->stop && (t = dx_loop_next_ready(&ll->loop)) != NULL) resume_task(L, (ltask *)t);
}

static int run_body(lua_State *L) {
  lloop *ll = lua_touserdata(L, 1);
  dx_loop *loop = &ll->loop;
  while (!ll->stop) {
    resume_ready(L, ll);
    if (ll->stop) break;
    dx_loop_flush(loop);
    if (!dx_loop_alive(loop)) break;
    int rc = dx_loop_poll(loop, -1);
    if (rc < 0) return luaL_error(L, "duplex.core.run: epoll_wait: %s", strerror(-rc));
    dispatch_signals(L, ll);
  }
  return 0;
}

/* One pass for a host that owns the main loop (a game's frame): what was
 * ready runs, queued writes go out, I/O and timers are waited for at most
 * max_ms, and the tasks that woke run and write too, all before returning. */
static int step_body(lua_State *L) {
  lloop *ll = lua_touserdata(L, 1);
  int max_ms = (int)lua_tointeger(L, 2);
  resume_ready(L, ll);
  dx_loop_flush(&ll->loop);
  if (ll->stop || !dx_loop_alive(&ll->loop)) return 0;
  int rc = dx_loop_poll(&ll->loop, max_ms);
  if (rc < 0) return luaL_error(L, "duplex.core.step: epoll_wait: %s", strerror(-rc));
  dispatch_signals(L, ll);
  resume_ready(L, ll);
  dx_loop_flush(&ll->loop);
  return 0;
}

/* Run body(ll, max_ms) protected, as the loop's one runner: the loop's
 * flags are reset whatever happens, then an error goes on to the caller. */
static void drive(lua_State *L, const char *who, lua_CFunction body, int max_ms) {
  lloop *ll = get_lloop(L);
  if (ll->running) luaL_error(L, "duplex.core.%s: the loop is already running", who);
  ll->running = 1;
  ll->stop = 0;
  ll->L = L;
  lua_pushcfunction(L, body);
  lua_pushlightuserdata(L, ll);
  lua_pushinteger(L, max_ms);
  int status = lua_pcall(L, 2, 0, 0);
  ll->running = 0;
  ll->stop = 0;
  ll->L = NULL;
  if (status != LUA_OK) lua_error(L);
}

/* core.step([timeout = 0]) -> whether the loop has anything left to do */
static int l_step(lua_State *L) {
  double timeout = luaL_optnumber(L, 1, 0);
  luaL_argcheck(L, timeout >= 0 && timeout < 86400, 1, "timeout must be 0 to 86400 seconds");
  drive(L, "step", step_body, (int)(timeout * 1000.0 + 0.5));
  lua_pushboolean(L, dx_loop_alive(&get_lloop(L)->loop));
  return 1;
}

static int l_run(lua_State *L) {
  drive(L, "run", run_body, -1);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_stop(lua_State *L) {
  get_lloop(L)->stop = 1;
  return 0;
}

/* core.at_end(fn, arg): when the running task's function ends, the task
 * goes on with fn(arg, ok, err) (restart_at_end); nil fn takes it back.
 * The task's error goes to fn instead of core.on_error. */
static int l_at_end(lua_State *L) {
  ltask *task = running_task(L);
  if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 2);
  push_task(L, L);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, -2, 2);
  task->has_end = !lua_isnil(L, 1);
  return 0;
}

static int l_spawn(lua_State *L) {
  luaL_checkany(L, 1);
  if (!lua_isfunction(L, 1)) {
    if (luaL_getmetafield(L, 1, "__call") == LUA_TNIL) return luaL_argerror(L, 1, "function expected");
    lua_pop(L, 1);
  }
  lloop *ll = get_lloop(L);
  spawn(L, ll, lua_gettop(L) - 1);
  return 1;
}

static int sleep_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  dx_lua_woken(L, (dx_task *)ctx);
  return 0;
}

static int l_sleep(lua_State *L) {
  luaL_checknumber(L, 1);
  dx_task *t = dx_lua_begin(L, 1);
  ltask *task = (ltask *)t;
  check_yieldable(L);
  if (dx_task_wait(&task->ll->loop, t, DX_TASK_WAIT, 0) < 0) return luaL_error(L, "not enough memory");
  return yield_task(L, t, sleep_k);
}

static int park_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  if (dx_lua_woken(L, (dx_task *)ctx) == DX_WAKE_TIMEOUT) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  return lua_gettop(L); /* the values given to core.wake */
}

static int l_park(lua_State *L) {
  dx_task *t = dx_lua_begin(L, 1);
  ltask *task = (ltask *)t;
  check_yieldable(L);
  lua_settop(L, 0);
  if (dx_task_wait(&task->ll->loop, t, DX_TASK_PARKED, 0) < 0) return luaL_error(L, "not enough memory");
  return yield_task(L, t, park_k);
}

static int l_wake(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  ltask *task = find_task(L, 1);
  if (!task || task->t.state != DX_TASK_PARKED) {
    lua_pushboolean(L, 0);
    return 1;
  }
  int n = lua_gettop(L) - 1;
  if (!lua_checkstack(task->co, n + 1)) return luaL_error(L, "too many values to wake with");
  lua_xmove(L, task->co, n);
  task->nargs = n;
  anchor(L, task);
  dx_task_ready(&task->ll->loop, &task->t, DX_WAKE_VALUE);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_on_error(lua_State *L) {
  if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &ONERROR_KEY);
  return 0;
}

static int l_loop_stats(lua_State *L) {
  lloop *ll = get_lloop(L);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)ll->ntasks);
  lua_setfield(L, -2, "coroutines");
  lua_pushinteger(L, (lua_Integer)ll->loop.nsockets);
  lua_setfield(L, -2, "sockets");
  lua_pushinteger(L, (lua_Integer)ll->loop.nheap);
  lua_setfield(L, -2, "timers");
  lua_pushinteger(L, (lua_Integer)ll->loop.fired);
  lua_setfield(L, -2, "timers_fired");
  lua_pushinteger(L, (lua_Integer)ll->loop.nios);
  lua_setfield(L, -2, "fds");
  lua_pushinteger(L, (lua_Integer)ll->loop.nready);
  lua_setfield(L, -2, "ready");
  lua_pushinteger(L, (lua_Integer)ll->loop.nwait);
  lua_setfield(L, -2, "waiting");
  return 1;
}

/* ---- timers ---- */

static void timer_disarm(lua_State *L, ltimer *tm) {
  dx_timer_stop(&tm->ll->loop, &tm->timer);
  luaL_unref(L, LUA_REGISTRYINDEX, tm->ref);
  tm->ref = LUA_NOREF;
}

static void timer_fire(dx_loop *loop, dx_timer *timer) {
  ltimer *tm = dx_container_of(timer, ltimer, timer);
  lua_State *L = tm->ll->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, tm->ref);
  lua_getiuservalue(L, -1, 1);
  lua_pushvalue(L, -2); /* the handler gets its timer */
  spawn(L, tm->ll, 1);
  lua_pop(L, 2);
  if (tm->interval > 0) {
    double next = timer->when + tm->interval, now = dx_now();
    if (dx_timer_start(loop, timer, next > now ? next : now) < 0) timer_disarm(L, tm);
  } else {
    timer_disarm(L, tm);
  }
}

static int l_timer(lua_State *L) {
  double after = luaL_checknumber(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  double every = luaL_optnumber(L, 3, 0);
  luaL_argcheck(L, after >= 0 && after == after, 1, "must be a number >= 0");
  luaL_argcheck(L, every >= 0 && every == every, 3, "must be a number >= 0");
  lloop *ll = get_lloop(L);
  ltimer *tm = lua_newuserdatauv(L, sizeof *tm, 1);
  dx_timer_init(&tm->timer, timer_fire);
  tm->ll = ll;
  tm->interval = every;
  tm->ref = LUA_NOREF;
  luaL_setmetatable(L, TIMER_MT);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, -2, 1);
  if (dx_timer_start(&ll->loop, &tm->timer, dx_now() + after) < 0) return luaL_error(L, "not enough memory");
  lua_pushvalue(L, -1);
  tm->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

static int timer_cancel(lua_State *L) {
  ltimer *tm = luaL_checkudata(L, 1, TIMER_MT);
  int armed = dx_timer_armed(&tm->timer);
  if (!tm->ll->dead) timer_disarm(L, tm);
  lua_pushboolean(L, armed);
  return 1;
}

static int timer_active(lua_State *L) {
  ltimer *tm = luaL_checkudata(L, 1, TIMER_MT);
  lua_pushboolean(L, dx_timer_armed(&tm->timer));
  return 1;
}

/* ---- signals ---- */

static const struct {
  const char *name;
  int signo;
} signals[] = {{"INT", SIGINT},   {"TERM", SIGTERM}, {"HUP", SIGHUP},   {"CHLD", SIGCHLD},
               {"QUIT", SIGQUIT}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {"KILL", SIGKILL},
               {"PIPE", SIGPIPE}, {"ALRM", SIGALRM}, {NULL, 0}};

#define HANDLED_SIGNALS 4 /* the first entries: the ones core.signal takes */

static int signal_number(lua_State *L, int idx, int handled_only) {
  if (lua_type(L, idx) == LUA_TNUMBER && !handled_only) return (int)dx_check_range(L, idx, 1, NSIG - 1);
  const char *name = luaL_checkstring(L, idx);
  if (strncmp(name, "SIG", 3) == 0) name += 3;
  for (int i = 0; signals[i].name && (!handled_only || i < HANDLED_SIGNALS); i++)
    if (strcmp(name, signals[i].name) == 0) return signals[i].signo;
  return luaL_argerror(L, idx, handled_only ? "expected \"INT\", \"TERM\", \"HUP\" or \"CHLD\"" : "unknown signal");
}

static void signal_ready(dx_loop *loop, dx_io *io, uint32_t revents) {
  (void)loop, (void)revents;
  lloop *ll = dx_container_of(io, lloop, sigio);
  struct signalfd_siginfo si[8];
  ssize_t n;
  while ((n = read(ll->sigfd, si, sizeof si)) > 0)
    for (size_t i = 0; i < (size_t)n / sizeof si[0]; i++)
      if (si[i].ssi_signo < NSIG) ll->sigseen[si[i].ssi_signo] = 1;
}

/* Outside epoll dispatch, so that creating coroutines (and maybe running
 * the garbage collector) cannot disturb the events being dispatched. */
static void dispatch_signals(lua_State *L, lloop *ll) {
  for (int i = 0; i < HANDLED_SIGNALS; i++) {
    int signo = signals[i].signo;
    if (!ll->sigseen[signo]) continue;
    ll->sigseen[signo] = 0;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &SIGNALS_KEY);
    if (lua_rawgeti(L, -1, signo) == LUA_TFUNCTION) {
      lua_pushstring(L, signals[i].name);
      spawn(L, ll, 1);
    }
    lua_pop(L, 2);
  }
}

static int update_signalfd(lloop *ll) {
  if (ll->sigfd < 0) {
    ll->sigfd = signalfd(-1, &ll->sigmask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (ll->sigfd < 0) return -errno;
    int rc = dx_io_add(&ll->loop, &ll->sigio, ll->sigfd, EPOLLIN);
    if (rc < 0) {
      close(ll->sigfd);
      ll->sigfd = -1;
      return rc;
    }
    return 0;
  }
  return signalfd(ll->sigfd, &ll->sigmask, 0) < 0 ? -errno : 0;
}

static int l_signal(lua_State *L) {
  int signo = signal_number(L, 1, 1);
  if (!lua_isnil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  lloop *ll = get_lloop(L);
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, signo);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SIGNALS_KEY);
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, signo);
  if (lua_isnil(L, 2)) {
    if (!sigismember(&ll->sigmask, signo)) return 0;
    sigdelset(&ll->sigmask, signo);
    if (ll->sigfd >= 0) signalfd(ll->sigfd, &ll->sigmask, 0);
    /* drop what arrived meanwhile instead of acting on it on unblock */
    struct timespec zero = {0, 0};
    while (sigtimedwait(&one, NULL, &zero) > 0) {
    }
    ll->sigseen[signo] = 0;
    signal(signo, SIG_DFL);
    pthread_sigmask(SIG_UNBLOCK, &one, NULL);
    return 0;
  }
  /* blocked first, so that the signal only ever arrives through the fd; an
   * ignored signal would be discarded before reaching it */
  pthread_sigmask(SIG_BLOCK, &one, NULL);
  signal(signo, SIG_DFL);
  sigaddset(&ll->sigmask, signo);
  int rc = update_signalfd(ll);
  if (rc < 0) return luaL_error(L, "signalfd: %s", strerror(-rc));
  return 0;
}

/* ---- processes ---- */

/* core.die_with_parent([signal = "TERM"]): in a child, get that signal when
 * the parent dies (a supervisor killed with SIGKILL must not leave its
 * workers serving the port unsupervised). Returns false when the parent is
 * already gone. */
static int l_die_with_parent(lua_State *L) {
  int signo = lua_isnoneornil(L, 1) ? SIGTERM : signal_number(L, 1, 0);
  pid_t parent = getppid();
  if (prctl(PR_SET_PDEATHSIG, signo) < 0) {
    luaL_pushfail(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
  /* the parent may have died before prctl: then we were reparented */
  lua_pushboolean(L, parent != 1 && getppid() == parent);
  return 1;
}

static int l_fork(lua_State *L) {
  lloop *ll = get_lloop(L);
  fflush(NULL); /* or buffered output is written twice */
  pid_t pid = fork();
  if (pid < 0) {
    luaL_pushfail(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
  if (pid == 0) {
    int rc = dx_loop_after_fork(&ll->loop);
    if (rc < 0) return luaL_error(L, "duplex.core.fork: new event loop in the child: %s", strerror(-rc));
  }
  lua_pushinteger(L, pid);
  return 1;
}

static int l_waitpid(lua_State *L) {
  pid_t pid = (pid_t)dx_opt_range(L, 1, -1, -INT_MAX, INT_MAX);
  int flags = lua_toboolean(L, 2) ? WNOHANG : 0, status = 0;
  pid_t r;
  while ((r = waitpid(pid, &status, flags)) < 0 && errno == EINTR) {
  }
  if (r < 0) {
    luaL_pushfail(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
  lua_pushinteger(L, r);
  if (r == 0) return 1;
  if (WIFEXITED(status)) {
    lua_pushliteral(L, "exited");
    lua_pushinteger(L, WEXITSTATUS(status));
  } else if (WIFSIGNALED(status)) {
    lua_pushliteral(L, "signaled");
    lua_pushinteger(L, WTERMSIG(status));
  } else {
    lua_pushliteral(L, "stopped");
    lua_pushinteger(L, WSTOPSIG(status));
  }
  return 3;
}

static int l_kill(lua_State *L) {
  pid_t pid = (pid_t)dx_check_range(L, 1, -INT_MAX, INT_MAX);
  int signo = lua_isnoneornil(L, 2) ? SIGTERM : signal_number(L, 2, 0);
  if (kill(pid, signo) < 0) {
    luaL_pushfail(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, getpid());
  return 1;
}

/* ---- the loop object ---- */

static int loop_gc(lua_State *L) {
  lloop *ll = luaL_checkudata(L, 1, LOOP_MT);
  if (ll->dead) return 0;
  ll->dead = 1;
  if (ll->sigfd >= 0) {
    dx_io_remove(&ll->loop, &ll->sigio);
    close(ll->sigfd);
    ll->sigfd = -1;
  }
  dx_loop_free(&ll->loop);
  return 0;
}

static void new_loop(lua_State *L) {
  lloop *ll = lua_newuserdatauv(L, sizeof *ll, 0);
  memset(ll, 0, sizeof *ll);
  ll->sigfd = -1;
  ll->dead = 1; /* until initialized: nothing to free */
  sigemptyset(&ll->sigmask);
  dx_io_init(&ll->sigio, signal_ready);
  luaL_setmetatable(L, LOOP_MT);
  int rc = dx_loop_init(&ll->loop);
  if (rc < 0) luaL_error(L, "duplex.core: cannot create the event loop: %s", strerror(-rc));
  ll->dead = 0;
  /* Writes to a reset connection must fail with EPIPE, not kill the
   * process; TLS writes go through OpenSSL's write(), which has no
   * MSG_NOSIGNAL. */
  signal(SIGPIPE, SIG_IGN);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
}

static void new_metatable(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
  luaL_newmetatable(L, name);
  if (methods) {
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
  }
  if (gc) {
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
}

void dx_open_loop(lua_State *L) {
  static const luaL_Reg timer_methods[] = {{"cancel", timer_cancel}, {"active", timer_active}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {
      {"at_end", l_at_end},
      {"run", l_run},         {"step", l_step},         {"stop", l_stop},         {"spawn", l_spawn},
      {"sleep", l_sleep},     {"park", l_park},         {"wake", l_wake},       {"timer", l_timer},
      {"on_error", l_on_error}, {"signal", l_signal},   {"loop_stats", l_loop_stats},
      {"fork", l_fork},       {"waitpid", l_waitpid},   {"kill", l_kill},       {"getpid", l_getpid},
      {"die_with_parent", l_die_with_parent},
      {NULL, NULL}};
  new_metatable(L, LOOP_MT, NULL, loop_gc);
  new_metatable(L, TASK_MT, NULL, task_gc);
  new_metatable(L, TIMER_MT, timer_methods, NULL);

  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  int have = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (!have) { /* a second require of the module shares the first one's loop */
    new_loop(L);
    dx_weak_registry(L, &TASKS_KEY);
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &SIGNALS_KEY);
  }
  dx_setfuncs(L, funcs);
}

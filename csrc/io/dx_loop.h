/*
 * dx_loop: the event loop under duplex.core, without Lua.
 *
 * One epoll instance, a min-heap of timers, a queue of tasks ready to run,
 * a list of sockets whose output must be flushed before the next wait, and a
 * small pool of worker threads for calls that can only block (getaddrinfo).
 *
 * A task is whatever the host runs when it is woken (l_loop.c: a Lua
 * coroutine). The loop never runs tasks itself: waking one only moves it to
 * the ready queue, and the host pops the queue with dx_loop_next_ready().
 * That keeps every resume at one place, outside of epoll dispatch.
 *
 * File descriptors are registered once, edge-triggered, for every event they
 * can report; a task waits only after its syscall said EAGAIN, so no edge is
 * lost and no epoll_ctl is needed per wait.
 */
#ifndef DX_LOOP_H
#define DX_LOOP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>

#include "dx_clock.h"

/* Intrusive circular doubly-linked list. */
typedef struct dx_link {
  struct dx_link *prev, *next;
} dx_link;

static inline void dx_link_init(dx_link *l) { l->prev = l->next = l; }
static inline int dx_link_empty(const dx_link *l) { return l->next == l; }
static inline int dx_link_linked(const dx_link *l) { return l->next != NULL && l->next != l; }
static inline void dx_link_push(dx_link *head, dx_link *l) {
  l->prev = head->prev;
  l->next = head;
  head->prev->next = l;
  head->prev = l;
}
static inline void dx_link_remove(dx_link *l) {
  l->prev->next = l->next;
  l->next->prev = l->prev;
  l->prev = l->next = l;
}

#define dx_container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))

typedef struct dx_loop dx_loop;
typedef struct dx_timer dx_timer;
typedef struct dx_io dx_io;
typedef struct dx_task dx_task;
typedef struct dx_dirty dx_dirty;
typedef struct dx_work dx_work;

/* ---- timers ---- */

typedef void (*dx_timer_cb)(dx_loop *loop, dx_timer *t);

#define DX_TIMER_IDLE ((size_t)-1)

struct dx_timer {
  double when;  /* monotonic seconds */
  uint64_t seq; /* equal deadlines fire in the order they were armed */
  size_t slot;  /* heap index, DX_TIMER_IDLE when not armed */
  dx_timer_cb cb;
};

static inline void dx_timer_init(dx_timer *t, dx_timer_cb cb) {
  t->when = 0;
  t->seq = 0;
  t->slot = DX_TIMER_IDLE;
  t->cb = cb;
}
static inline int dx_timer_armed(const dx_timer *t) { return t->slot != DX_TIMER_IDLE; }
int dx_timer_start(dx_loop *loop, dx_timer *t, double when); /* 0 or -1 (ENOMEM) */
void dx_timer_stop(dx_loop *loop, dx_timer *t);

/* ---- file descriptors ---- */

/* Not an epoll bit: a task waits until an output buffer drops to its low
 * water mark (dx_io_wake_drain). */
#define DX_WANT_DRAIN (1u << 27)

typedef void (*dx_io_cb)(dx_loop *loop, dx_io *io, uint32_t revents);

struct dx_io {
  int fd;          /* -1 when not registered */
  uint32_t events; /* as registered */
  dx_io_cb cb;     /* called on every event instead of dx_io_wake, when set */
  dx_link waiters; /* tasks (dx_task.link) */
  dx_link all;     /* loop->ios, to re-register after fork */
};

void dx_io_init(dx_io *io, dx_io_cb cb);
/* Register fd edge-triggered for events (EPOLLET is added). 0 or -errno. */
int dx_io_add(dx_loop *loop, dx_io *io, int fd, uint32_t events);
/* Deregister (the caller closes the fd) and wake every waiter with
 * DX_WAKE_CLOSED. */
void dx_io_remove(dx_loop *loop, dx_io *io);
/* Wake the waiters whose events intersect revents (all of them on EPOLLERR
 * or EPOLLHUP). */
void dx_io_wake(dx_loop *loop, dx_io *io, uint32_t revents);
/* Wake the DX_WANT_DRAIN waiters whose low water mark is >= buffered. */
void dx_io_wake_drain(dx_loop *loop, dx_io *io, size_t buffered);

/* ---- output that waits for the next loop pass ---- */

struct dx_dirty {
  dx_link link;
  void (*flush)(dx_loop *loop, dx_dirty *d);
};

static inline void dx_dirty_init(dx_dirty *d, void (*flush)(dx_loop *, dx_dirty *)) {
  dx_link_init(&d->link);
  d->flush = flush;
}
void dx_dirty_mark(dx_loop *loop, dx_dirty *d);
static inline void dx_dirty_clear(dx_dirty *d) {
  if (dx_link_linked(&d->link)) dx_link_remove(&d->link);
}

/* ---- tasks ---- */

enum dx_task_state {
  DX_TASK_NEW = 0,
  DX_TASK_RUNNING,
  DX_TASK_READY,  /* in the ready queue */
  DX_TASK_WAIT,   /* on an fd, a timer or outside work: keeps the loop alive */
  DX_TASK_PARKED, /* until the host wakes it (or its timer fires) */
  DX_TASK_DONE
};

enum dx_wake {
  DX_WAKE_NONE = 0, /* not woken by the loop */
  DX_WAKE_START,
  DX_WAKE_IO,      /* the fd reported an event, or outside work finished */
  DX_WAKE_TIMEOUT, /* the deadline passed */
  DX_WAKE_CLOSED,  /* the fd was deregistered while the task waited */
  DX_WAKE_VALUE,   /* the host woke a parked task */
  DX_WAKE_YIELD    /* a plain yield to let others run */
};

#define DX_NO_DEADLINE (-1.0)

struct dx_task {
  dx_link link;      /* loop->ready or io->waiters */
  dx_timer timer;    /* the deadline of the current wait */
  dx_io *io;         /* fd waited on, or NULL */
  uint32_t events;   /* what the task waits for on io */
  /* bytes, beside events: every handler connection holds a task */
  uint8_t state;     /* enum dx_task_state */
  uint8_t wake;      /* enum dx_wake: why it was last woken */
  uint8_t counted;   /* in loop->nwait */
  size_t low_water;  /* DX_WANT_DRAIN threshold */
  double deadline;   /* of the current operation, DX_NO_DEADLINE: none */
  /* Outside work that will wake this task (a dx_work) is told here when the
   * task ends without waiting for it (its coroutine resumed or closed by
   * someone else, or collected): detach(detach_ud) makes the work forget
   * the task. The work clears both when it wakes the task. */
  void (*detach)(void *ud);
  void *detach_ud;
};

void dx_task_init(dx_task *t);
/* Move t to the ready queue (dropping any wait). */
void dx_task_ready(dx_loop *loop, dx_task *t, int wake);
/* Wait for events on io (or the task's deadline). */
int dx_task_wait_io(dx_loop *loop, dx_task *t, dx_io *io, uint32_t events, size_t low_water);
/* Wait for the deadline only (sleep), or for outside work (keepalive set),
 * or park (state DX_TASK_PARKED, keeps the loop alive only by its timer). */
int dx_task_wait(dx_loop *loop, dx_task *t, int state, int keepalive);
/* Leave every list and stop the timer. */
void dx_task_unwait(dx_loop *loop, dx_task *t);
/* The task is over: leave every list, and let go of outside work. */
void dx_task_end(dx_loop *loop, dx_task *t);

/* ---- worker threads, for calls that only exist in blocking form ---- */

struct dx_work {
  dx_link owner; /* loop->works: every job not yet done, for fork and teardown */
  dx_link q;     /* pool queue / done list (under the pool mutex) */
  void (*run)(dx_work *w);                              /* in a worker thread */
  void (*done)(dx_loop *loop, dx_work *w, int canceled); /* loop thread, once; frees w */
};

/* Queue w; 0 or -1 when the job limit is reached or no thread can start. */
int dx_work_submit(dx_loop *loop, dx_work *w);

/* ---- the loop ---- */

typedef struct dx_pool dx_pool;

struct dx_loop {
  int epfd;
  dx_timer **heap;
  size_t nheap, capheap;
  uint64_t seq;
  dx_link ready;
  size_t nready;
  dx_link dirty;
  dx_link ios;
  size_t nios;
  size_t nwait;    /* tasks waiting with a wake-up source besides timers */
  size_t nblocked; /* outputs waiting for the kernel to accept more */
  uint64_t pass;   /* loop passes so far */
  uint64_t fired;  /* timers fired so far, for statistics */
  dx_link works;
  size_t nworks;
  dx_pool *pool;
  size_t nsockets; /* kept by the socket layer, for statistics */
  int closing;     /* dx_loop_free is running: jobs are canceled, not woken */
  uint8_t *rbuf; /* one receive buffer for every socket */
  size_t rbuf_size;
  /* The binding's: the engine whose unparsed input still lies in rbuf, to
   * be kept in its own memory before rbuf is read into again (l_socket.c) */
  void *rbuf_owner;
};

#define DX_LOOP_RBUF_SIZE (256u * 1024u)
#define DX_WORK_MAX 1024

int dx_loop_init(dx_loop *loop); /* 0 or -errno */
/* Release everything; pending work is joined and canceled. */
void dx_loop_free(dx_loop *loop);
/* In a child after fork(): a new epoll instance with every fd re-registered
 * (the parent's instance is shared and must not be touched), a new worker
 * pool, and every pending job canceled. 0 or -errno. */
int dx_loop_after_fork(dx_loop *loop);

dx_task *dx_loop_next_ready(dx_loop *loop);
/* Write every dirty output once. */
void dx_loop_flush(dx_loop *loop);
/* Anything that can still wake a task or needs the loop? */
int dx_loop_alive(const dx_loop *loop);
/* Wait for events (not at all when tasks are ready), dispatch them and fire
 * due timers. 0 or -errno. */
int dx_loop_poll(dx_loop *loop, int max_ms); /* max_ms < 0: as long as nothing is due */

/* ---- the Lua side of tasks, implemented in l_loop.c ----
 *
 * A blocking Lua function starts with dx_lua_begin(), tries its syscall, and
 * on EAGAIN returns dx_lua_wait_*(..., k): the running coroutine yields, and
 * when the loop resumes it Lua calls k(L, LUA_YIELD, ctx) with ctx the
 * dx_task, on the same stack. k asks dx_lua_woken() why it runs and retries.
 * The deadline set by dx_lua_begin covers every retry of the operation. */
#ifdef LUA_VERSION_NUM
dx_loop *dx_lua_loop(lua_State *L);
/* The task of the running coroutine, with its deadline set from the timeout
 * at stack index timeout_idx (0: none; nil: none). Raises an error outside a
 * coroutine started by duplex.core.spawn. */
dx_task *dx_lua_begin(lua_State *L, int timeout_idx);
/* The same when the loop is at hand (an object's): no lookup. */
dx_task *dx_lua_begin_in(lua_State *L, dx_loop *loop, int timeout_idx);
/* The same for a read(self, max, timeout) method: leaves max at stack index
 * 2 as an integer >= 1 (default DX_LOOP_RBUF_SIZE), timeout at 3. */
dx_task *dx_lua_begin_read(lua_State *L);
int dx_lua_wait_io(lua_State *L, dx_task *t, dx_io *io, uint32_t events, size_t low_water, lua_KFunction k);
/* Wait until outside work (a dx_work) wakes t with dx_task_ready(.., DX_WAKE_IO). */
int dx_lua_wait_work(lua_State *L, dx_task *t, lua_KFunction k);
/* Let the other ready tasks run first; k runs on the next pass. */
int dx_lua_yield(lua_State *L, dx_task *t, lua_KFunction k);
/* Start a loop coroutine, as core.spawn does, running the function below
 * nargs values on top of the stack of the loop's Lua state (dx_lua_state);
 * pops them. */
lua_State *dx_lua_state(dx_loop *loop);
void dx_lua_spawn(dx_loop *loop, int nargs);
/* In a continuation: the enum dx_wake reason. Raises an error when the
 * coroutine was resumed by something other than the loop. */
int dx_lua_woken(lua_State *L, dx_task *t);
#endif

#endif

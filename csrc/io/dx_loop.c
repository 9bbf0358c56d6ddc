#include "dx_loop.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define DX_POOL_THREADS 4 /* one slow DNS server must not stall every lookup */
#define DX_EPOLL_BATCH 256

/* ---- timer heap ---- */

static int timer_before(const dx_timer *a, const dx_timer *b) {
  return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

static void heap_place(dx_loop *loop, size_t i, dx_timer *t) {
  loop->heap[i] = t;
  t->slot = i;
}

static void heap_up(dx_loop *loop, size_t i) {
  dx_timer *t = loop->heap[i];
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!timer_before(t, loop->heap[parent])) break;
    heap_place(loop, i, loop->heap[parent]);
    i = parent;
  }
  heap_place(loop, i, t);
}

static void heap_down(dx_loop *loop, size_t i) {
  dx_timer *t = loop->heap[i];
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= loop->nheap) break;
    if (c + 1 < loop->nheap && timer_before(loop->heap[c + 1], loop->heap[c])) c++;
    if (!timer_before(loop->heap[c], t)) break;
    heap_place(loop, i, loop->heap[c]);
    i = c;
  }
  heap_place(loop, i, t);
}

int dx_timer_start(dx_loop *loop, dx_timer *t, double when) {
  if (dx_timer_armed(t)) dx_timer_stop(loop, t);
  if (loop->nheap == loop->capheap) {
    size_t cap = loop->capheap ? loop->capheap * 2 : 64;
    dx_timer **h = realloc(loop->heap, cap * sizeof *h);
    if (!h) return -1;
    loop->heap = h;
    loop->capheap = cap;
  }
  t->when = when;
  t->seq = loop->seq++;
  loop->heap[loop->nheap] = t;
  t->slot = loop->nheap++;
  heap_up(loop, t->slot);
  return 0;
}

void dx_timer_stop(dx_loop *loop, dx_timer *t) {
  if (!dx_timer_armed(t)) return;
  size_t i = t->slot;
  dx_timer *last = loop->heap[--loop->nheap];
  t->slot = DX_TIMER_IDLE;
  if (last == t) return;
  heap_place(loop, i, last);
  if (i > 0 && timer_before(last, loop->heap[(i - 1) / 2]))
    heap_up(loop, i);
  else
    heap_down(loop, i);
}

/* Fire the timers due now, but only those armed before this call: a timer
 * that re-arms itself for "now" waits for the next pass instead of spinning. */
static void fire_timers(dx_loop *loop) {
  double now = dx_now();
  uint64_t limit = loop->seq;
  while (loop->nheap > 0) {
    dx_timer *t = loop->heap[0];
    if (t->when > now || t->seq >= limit) break;
    dx_timer_stop(loop, t);
    loop->fired++;
    t->cb(loop, t);
  }
}

/* ---- tasks ---- */

static void task_timeout(dx_loop *loop, dx_timer *timer) {
  dx_task_ready(loop, dx_container_of(timer, dx_task, timer), DX_WAKE_TIMEOUT);
}

void dx_task_init(dx_task *t) {
  memset(t, 0, sizeof *t);
  dx_link_init(&t->link);
  dx_timer_init(&t->timer, task_timeout);
  t->deadline = DX_NO_DEADLINE;
}

void dx_task_end(dx_loop *loop, dx_task *t) {
  dx_task_unwait(loop, t);
  if (t->detach) {
    void (*detach)(void *) = t->detach;
    t->detach = NULL;
    detach(t->detach_ud);
  }
  t->detach_ud = NULL;
}

void dx_task_unwait(dx_loop *loop, dx_task *t) {
  if (dx_link_linked(&t->link)) {
    dx_link_remove(&t->link);
    if (t->state == DX_TASK_READY) loop->nready--;
  }
  if (t->counted) {
    loop->nwait--;
    t->counted = 0;
  }
  dx_timer_stop(loop, &t->timer);
  t->io = NULL;
}

void dx_task_ready(dx_loop *loop, dx_task *t, int wake) {
  dx_task_unwait(loop, t);
  t->wake = wake;
  t->state = DX_TASK_READY;
  dx_link_push(&loop->ready, &t->link);
  loop->nready++;
}

static int arm_deadline(dx_loop *loop, dx_task *t) {
  if (t->deadline < 0) return 0;
  return dx_timer_start(loop, &t->timer, t->deadline);
}

int dx_task_wait(dx_loop *loop, dx_task *t, int state, int keepalive) {
  dx_task_unwait(loop, t);
  if (arm_deadline(loop, t) < 0) return -1;
  t->state = state;
  t->wake = DX_WAKE_NONE;
  if (keepalive) {
    t->counted = 1;
    loop->nwait++;
  }
  return 0;
}

int dx_task_wait_io(dx_loop *loop, dx_task *t, dx_io *io, uint32_t events, size_t low_water) {
  if (dx_task_wait(loop, t, DX_TASK_WAIT, 1) < 0) return -1;
  t->io = io;
  t->events = events;
  t->low_water = low_water;
  dx_link_push(&io->waiters, &t->link);
  return 0;
}

dx_task *dx_loop_next_ready(dx_loop *loop) {
  if (dx_link_empty(&loop->ready)) return NULL;
  dx_task *t = dx_container_of(loop->ready.next, dx_task, link);
  dx_link_remove(&t->link);
  loop->nready--;
  t->state = DX_TASK_RUNNING;
  return t;
}

/* ---- fds ---- */

void dx_io_init(dx_io *io, dx_io_cb cb) {
  io->fd = -1;
  io->cb = cb;
  io->events = 0;
  dx_link_init(&io->waiters);
  dx_link_init(&io->all);
}

int dx_io_add(dx_loop *loop, dx_io *io, int fd, uint32_t events) {
  struct epoll_event ev = {.events = events | EPOLLET, .data.ptr = io};
  if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) return -errno;
  io->fd = fd;
  io->events = ev.events;
  dx_link_push(&loop->ios, &io->all);
  loop->nios++;
  return 0;
}

static void wake_all(dx_loop *loop, dx_io *io, int wake) {
  while (!dx_link_empty(&io->waiters))
    dx_task_ready(loop, dx_container_of(io->waiters.next, dx_task, link), wake);
}

void dx_io_remove(dx_loop *loop, dx_io *io) {
  if (io->fd >= 0) {
    /* Explicitly: a forked child may hold the same file open, and then
     * close() alone would leave the registration (and this pointer) in
     * the epoll set. */
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, io->fd, NULL);
    io->fd = -1;
    dx_link_remove(&io->all);
    loop->nios--;
  }
  wake_all(loop, io, DX_WAKE_CLOSED);
}

void dx_io_wake(dx_loop *loop, dx_io *io, uint32_t revents) {
  if (revents & (EPOLLERR | EPOLLHUP)) revents |= EPOLLIN | EPOLLOUT;
  if (revents & EPOLLRDHUP) revents |= EPOLLIN;
  dx_link *l = io->waiters.next;
  while (l != &io->waiters) {
    dx_link *next = l->next;
    dx_task *t = dx_container_of(l, dx_task, link);
    if (t->events & revents) dx_task_ready(loop, t, DX_WAKE_IO);
    l = next;
  }
}

void dx_io_wake_drain(dx_loop *loop, dx_io *io, size_t buffered) {
  dx_link *l = io->waiters.next;
  while (l != &io->waiters) {
    dx_link *next = l->next;
    dx_task *t = dx_container_of(l, dx_task, link);
    if ((t->events & DX_WANT_DRAIN) && buffered <= t->low_water) dx_task_ready(loop, t, DX_WAKE_IO);
    l = next;
  }
}

/* ---- dirty outputs ---- */

void dx_dirty_mark(dx_loop *loop, dx_dirty *d) {
  if (!dx_link_linked(&d->link)) dx_link_push(&loop->dirty, &d->link);
}

void dx_loop_flush(dx_loop *loop) {
  dx_link pass;
  if (dx_link_empty(&loop->dirty)) return;
  /* Take the list as it is: a flush that marks again waits for the next pass. */
  pass.next = loop->dirty.next;
  pass.prev = loop->dirty.prev;
  pass.next->prev = &pass;
  pass.prev->next = &pass;
  dx_link_init(&loop->dirty);
  while (!dx_link_empty(&pass)) {
    dx_link *l = pass.next;
    dx_link_remove(l);
    dx_dirty *d = dx_container_of(l, dx_dirty, link);
    d->flush(loop, d);
  }
}

/* ---- worker pool ---- */

struct dx_pool {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  dx_link queue, done;
  pthread_t threads[DX_POOL_THREADS];
  int nthreads, idle, stop;
  int efd;
  dx_io io;
};

static void *pool_main(void *arg) {
  dx_pool *pool = arg;
  pthread_mutex_lock(&pool->mu);
  for (;;) {
    while (!pool->stop && dx_link_empty(&pool->queue)) {
      pool->idle++;
      pthread_cond_wait(&pool->cv, &pool->mu);
      pool->idle--;
    }
    if (pool->stop) break;
    dx_link *l = pool->queue.next;
    dx_link_remove(l);
    pthread_mutex_unlock(&pool->mu);
    dx_work *w = dx_container_of(l, dx_work, q);
    w->run(w);
    pthread_mutex_lock(&pool->mu);
    dx_link_push(&pool->done, l);
    uint64_t one = 1;
    ssize_t r = write(pool->efd, &one, sizeof one);
    (void)r; /* an eventfd only fails to count past 2^64-2 */
  }
  pthread_mutex_unlock(&pool->mu);
  return NULL;
}

static void pool_ready(dx_loop *loop, dx_io *io, uint32_t revents) {
  (void)revents;
  dx_pool *pool = dx_container_of(io, dx_pool, io);
  uint64_t n;
  while (read(pool->efd, &n, sizeof n) < 0 && errno == EINTR) {
  }
  dx_link done;
  dx_link_init(&done);
  pthread_mutex_lock(&pool->mu);
  if (!dx_link_empty(&pool->done)) {
    done.next = pool->done.next;
    done.prev = pool->done.prev;
    done.next->prev = &done;
    done.prev->next = &done;
    dx_link_init(&pool->done);
  }
  pthread_mutex_unlock(&pool->mu);
  while (!dx_link_empty(&done)) {
    dx_link *l = done.next;
    dx_link_remove(l);
    dx_work *w = dx_container_of(l, dx_work, q);
    dx_link_remove(&w->owner);
    loop->nworks--;
    w->done(loop, w, 0);
  }
}

static dx_pool *pool_new(dx_loop *loop) {
  dx_pool *pool = calloc(1, sizeof *pool);
  if (!pool) return NULL;
  pool->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (pool->efd < 0) {
    free(pool);
    return NULL;
  }
  pthread_mutex_init(&pool->mu, NULL);
  pthread_cond_init(&pool->cv, NULL);
  dx_link_init(&pool->queue);
  dx_link_init(&pool->done);
  dx_io_init(&pool->io, pool_ready);
  if (dx_io_add(loop, &pool->io, pool->efd, EPOLLIN) < 0) {
    close(pool->efd);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    free(pool);
    return NULL;
  }
  return pool;
}

/* Called with the mutex held. Workers start with every signal blocked so
 * that signals reach the loop's signalfd, never a worker. */
static int pool_grow(dx_pool *pool) {
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int rc = pthread_create(&pool->threads[pool->nthreads], NULL, pool_main, pool);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) return -1;
  pool->nthreads++;
  return 0;
}

int dx_work_submit(dx_loop *loop, dx_work *w) {
  if (loop->nworks >= DX_WORK_MAX) return -1;
  if (!loop->pool && !(loop->pool = pool_new(loop))) return -1;
  dx_pool *pool = loop->pool;
  pthread_mutex_lock(&pool->mu);
  int queued = 0;
  for (dx_link *l = pool->queue.next; l != &pool->queue; l = l->next) queued++;
  if (pool->idle <= queued && pool->nthreads < DX_POOL_THREADS && pool_grow(pool) < 0 &&
      pool->nthreads == 0) {
    pthread_mutex_unlock(&pool->mu);
    return -1;
  }
  dx_link_init(&w->q);
  dx_link_push(&pool->queue, &w->q);
  pthread_cond_signal(&pool->cv);
  pthread_mutex_unlock(&pool->mu);
  dx_link_init(&w->owner);
  dx_link_push(&loop->works, &w->owner);
  loop->nworks++;
  return 0;
}

static void cancel_works(dx_loop *loop) {
  while (!dx_link_empty(&loop->works)) {
    dx_link *l = loop->works.next;
    dx_link_remove(l);
    loop->nworks--;
    dx_work *w = dx_container_of(l, dx_work, owner);
    w->done(loop, w, 1);
  }
}

static void pool_free(dx_loop *loop, dx_pool *pool) {
  pthread_mutex_lock(&pool->mu);
  pool->stop = 1;
  pthread_cond_broadcast(&pool->cv);
  pthread_mutex_unlock(&pool->mu);
  /* A worker in the middle of getaddrinfo finishes that call first: the code
   * it runs may be unloaded with this module right after. */
  for (int i = 0; i < pool->nthreads; i++) pthread_join(pool->threads[i], NULL);
  dx_io_remove(loop, &pool->io);
  close(pool->efd);
  pthread_mutex_destroy(&pool->mu);
  pthread_cond_destroy(&pool->cv);
  free(pool);
}

/* ---- the loop ---- */

int dx_loop_init(dx_loop *loop) {
  memset(loop, 0, sizeof *loop);
  dx_link_init(&loop->ready);
  dx_link_init(&loop->dirty);
  dx_link_init(&loop->ios);
  dx_link_init(&loop->works);
  loop->rbuf_size = DX_LOOP_RBUF_SIZE;
  loop->rbuf = malloc(loop->rbuf_size);
  if (!loop->rbuf) return -ENOMEM;
  loop->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (loop->epfd < 0) {
    int err = errno;
    free(loop->rbuf);
    loop->rbuf = NULL;
    return -err;
  }
  return 0;
}

void dx_loop_free(dx_loop *loop) {
  loop->closing = 1;
  if (loop->pool) pool_free(loop, loop->pool);
  loop->pool = NULL;
  cancel_works(loop);
  if (loop->epfd >= 0) close(loop->epfd);
  loop->epfd = -1;
  /* Owners of timers still armed may be released after the loop. */
  for (size_t i = 0; i < loop->nheap; i++) loop->heap[i]->slot = DX_TIMER_IDLE;
  free(loop->heap);
  loop->heap = NULL;
  loop->nheap = loop->capheap = 0;
  free(loop->rbuf);
  loop->rbuf = NULL;
}

int dx_loop_after_fork(dx_loop *loop) {
  close(loop->epfd);
  loop->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (loop->epfd < 0) return -errno;
  if (loop->pool) {
    /* The worker threads do not exist here, and the pool mutex may have
     * been held by one of them at the fork: leave the copy alone (a small,
     * one-time leak in the child) and start over when needed. */
    dx_pool *pool = loop->pool;
    loop->pool = NULL;
    dx_link_remove(&pool->io.all);
    loop->nios--;
    close(pool->efd);
  }
  cancel_works(loop);
  int rc = 0;
  for (dx_link *l = loop->ios.next; l != &loop->ios; l = l->next) {
    dx_io *io = dx_container_of(l, dx_io, all);
    struct epoll_event ev = {.events = io->events, .data.ptr = io};
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, io->fd, &ev) < 0) rc = -errno;
  }
  return rc;
}

int dx_loop_alive(const dx_loop *loop) {
  return loop->nready > 0 || loop->nheap > 0 || loop->nwait > 0 || loop->nblocked > 0 ||
         !dx_link_empty(&loop->dirty);
}

static int poll_timeout(const dx_loop *loop) {
  if (loop->nready > 0 || !dx_link_empty(&loop->dirty)) return 0;
  if (loop->nheap == 0) return -1;
  double ms = ceil((loop->heap[0]->when - dx_now()) * 1000.0);
  if (ms <= 0) return 0;
  if (ms > INT_MAX) return INT_MAX;
  return (int)ms;
}

int dx_loop_poll(dx_loop *loop, int max_ms) {
  struct epoll_event evs[DX_EPOLL_BATCH];
  loop->pass++;
  int ms = poll_timeout(loop);
  if (max_ms >= 0 && (ms < 0 || ms > max_ms)) ms = max_ms;
  int n = epoll_wait(loop->epfd, evs, DX_EPOLL_BATCH, ms);
  if (n < 0) {
    if (errno != EINTR) return -errno;
    n = 0;
  }
  for (int i = 0; i < n; i++) {
    dx_io *io = evs[i].data.ptr;
    if (io->cb)
      io->cb(loop, io, evs[i].events);
    else
      dx_io_wake(loop, io, evs[i].events);
  }
  fire_timers(loop);
  return 0;
}

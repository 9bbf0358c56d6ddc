/*
 * dx_clock: the one monotonic clock of duplex.core. It lives apart from
 * dx_loop so that builds without the event loop (the LuaJIT module for
 * lua-nginx-module) still have core.now, and both builds read the same clock.
 */
#ifndef DX_CLOCK_H
#define DX_CLOCK_H

double dx_now(void); /* CLOCK_MONOTONIC seconds */

#endif

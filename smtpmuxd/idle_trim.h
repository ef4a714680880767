/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_IDLE_TRIM_H
#define SMTPMUX_IDLE_TRIM_H

#include <event2/event.h>

/*
 * Gives a burst's memory back. malloc keeps what sessions freed for later
 * use, fragmented between the survivors, so a worker that served a
 * hundred clients at once stays that big long after; once it has had no
 * session for a moment, malloc_trim(0) returns every free page to the
 * kernel (glibc; elsewhere this does nothing).
 */

struct idle_trim;

struct idle_trim *idle_trim_new(struct event_base *base, unsigned delay_ms);
void idle_trim_free(struct idle_trim *);

/* The worker has no session left: trim after delay_ms unless busy again. */
void idle_trim_arm(struct idle_trim *);
/* A session started: not idle after all. */
void idle_trim_cancel(struct idle_trim *);

#endif

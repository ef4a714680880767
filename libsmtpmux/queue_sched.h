/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_QUEUE_SCHED_H
#define SMTPMUX_QUEUE_SCHED_H

#include <stdbool.h>
#include <stdint.h>

#include "config.h"

/*
 * When a queued message is tried again, as pure functions of the queue
 * settings and the clock (the caller passes the time and the randomness).
 */

/*
 * Seconds to wait after `attempts` failed attempts (1 for the first):
 * min_backoff doubling up to max_backoff, then jitter - a factor in
 * [0.75, 1.25) drawn from rnd in [0, 1) - so that messages that failed
 * together do not all come back together; never outside
 * [min_backoff, max_backoff].
 */
unsigned queue_backoff(const struct queue_cfg *q, unsigned attempts, double rnd);

/*
 * The next attempt for a message that arrived at `arrived` and whose
 * attempt number `attempts` failed at now. quota_reopens > 0 says that every
 * downstream was held back only by a full quota window, the earliest of
 * which reopens then: the message waits exactly that long, without jitter,
 * so a burst over quota drains at the configured rate. Never later than
 * the end of the message's lifetime (which gets one last attempt) and
 * never earlier than now + 1.
 */
int64_t queue_next_attempt(const struct queue_cfg *q, int64_t arrived, unsigned attempts,
    int64_t now, int64_t quota_reopens, double rnd);

/* True once the message has been queued for max_lifetime. */
bool queue_expired(const struct queue_cfg *q, int64_t arrived, int64_t now);

/* True when the optional "delayed" notice is due and has not been sent. */
bool queue_delay_warning_due(const struct queue_cfg *q, int64_t arrived, int64_t now,
    bool warned);

/* splitmix64 over a state the caller keeps (seed it from getrandom()). */
uint64_t queue_rand64(uint64_t *state);
/* A uniform number in [0, 1) from the same generator. */
double queue_random(uint64_t *state);
/* A seed from the kernel (the clock and pid if it has none to give). */
uint64_t queue_random_seed(void);

#endif

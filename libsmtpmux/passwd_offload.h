/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_PASSWD_OFFLOAD_H
#define SMTPMUX_PASSWD_OFFLOAD_H

#include <stdbool.h>
#include <stdint.h>

#include <event2/event.h>

/*
 * Password hashes checked off a worker's event loop. A yescrypt costs
 * ~20 ms of CPU (a hash with raised cost parameters, seconds): run on the
 * loop, every first login and every wrong password would stall all the
 * other sessions of the worker, and a password guesser could slow all
 * mail down. So a worker hands each such check to a few threads of its
 * own and hears the verdict back on its loop.
 *
 * The threads only compute passwd_hash_matches() on a job they own (its
 * own copies of the password and of the stored hash); the queue and the
 * list of finished jobs are the only data shared, under one mutex. Every
 * callback, the cache update and every free happen on the loop.
 *
 * A check is known to its caller by a ticket, never by a pointer into this
 * module: passwd_offload_cancel() makes sure a verdict for a caller that
 * went away is dropped, however far the job got.
 */

struct passwd_cache;
struct passwd_offload;

/* How many checks may wait or run at once per worker; one more is
 * refused (the session answers 454 rather than wait without bound). */
#define PASSWD_OFFLOAD_MAX_PENDING 64

/* The verdict of one check, on the loop, for a ticket not cancelled. */
typedef void (*passwd_offload_done_fn)(void *arg, uint64_t ticket, bool match);

/* Starts the threads. cache (may be NULL) remembers matching hashes when
 * their verdict arrives. NULL and errno on failure. */
struct passwd_offload *passwd_offload_new(struct event_base *base, struct passwd_cache *cache);

/*
 * Queues a check of given against stored (both copied). Returns its
 * ticket (never 0); 0 when PASSWD_OFFLOAD_MAX_PENDING checks are pending
 * or memory ran out. done runs later, from the loop, never from here.
 */
uint64_t passwd_offload_submit(struct passwd_offload *, const char *given, const char *stored,
    passwd_offload_done_fn done, void *arg);

/* No verdict for this ticket (unknown or finished ones are ignored). A
 * job not yet started is dropped at once. */
void passwd_offload_cancel(struct passwd_offload *, uint64_t ticket);

/* Checks pending (queued, running or finished but not delivered). */
unsigned passwd_offload_pending(const struct passwd_offload *);

/* Stops and joins the threads (a running hash finishes first), wipes
 * and frees every job. No callback runs. */
void passwd_offload_free(struct passwd_offload *);

#endif

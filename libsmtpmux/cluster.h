/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CLUSTER_H
#define SMTPMUX_CLUSTER_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include <event2/event.h>

#include "config.h"
#include "health.h"
#include "runtime.h"

/*
 * A worker's share of a cluster (`cluster:`): the operations the relay
 * makes through its link to Redis (cluster_link.h), and what it does when
 * the link is down. One per worker, on the worker's own loop; the master
 * never talks to Redis.
 *
 *  - sequence: a user's message number from one counter for all instances
 *    (INCR), for round robin and weighted selectors;
 *  - admit: an attempt's BEGIN (circuit, throttle, half-open trial and
 *    every quota window, atomically for all instances);
 *  - end: its END (stamps or frees its quota entries; counts failures and
 *    moves the circuit for all instances).
 *
 * Redis down or slow never stops mail. A call the link cannot take is
 * refused at once, one not answered within cluster.timeout_ms takes the
 * link down and is answered "decide locally", and the relay then decides
 * as a single instance does: quotas per instance, its own circuits. When
 * the link is back the cluster is reconciled with what happened meanwhile:
 *
 *  1. every attempt whose END did not reach Redis is replayed: a delivery
 *     counts in the cluster's windows from when it ended, and a reservation
 *     or half-open trial Redis may hold for an attempt that failed is given
 *     back (an attempt has one member name, so nothing counts twice);
 *  2. if Redis lost its data meanwhile (its epoch key changed: a restart
 *     without persistence), every message this instance's own windows
 *     still count is counted again instead;
 *  3. circuits this instance opened and throttles it saw join the shared
 *     ones (the later end wins), and the shared state is mirrored back.
 */

struct cluster;
struct cluster_call;                 /* a call a relay waits for */

/* NULL when rt->cfg has no `cluster:` section. Starts connecting. */
struct cluster *cluster_new(struct runtime *rt);
void cluster_free(struct cluster *);
/* At exit: lets the calls already sent be answered (at most timeout_ms). */
void cluster_flush(struct cluster *);
bool cluster_active(const struct cluster *);

/* An attempt as the cluster knows it. */
struct cluster_attempt {
	char member[48];                 /* its entry's name in the quota windows */
	bool shared;                     /* admitted by the cluster: its END goes there */
	bool uncertain;                  /* BEGIN sent, no answer: Redis may hold its place */
	bool trial;                      /* it holds the cluster's half-open trial */
	time_t reopens;                  /* refused over quota: when the cluster's full
	                                    windows have room again (our clock; 0: unknown) */
};

enum cluster_admit {
	CLUSTER_ADMIT_OK,                /* admitted for all instances */
	CLUSTER_ADMIT_LATER,             /* down, throttled or trial taken (why says) */
	CLUSTER_ADMIT_OVER_QUOTA,        /* a window of the cluster is full */
	CLUSTER_ADMIT_LOCAL              /* no answer: decide locally */
};
typedef void (*cluster_admit_fn)(void *arg, enum cluster_admit verdict, const char *why);
typedef void (*cluster_seq_fn)(void *arg, bool shared, uint64_t seq);

/*
 * Asks the cluster for the user's next message number. NULL: the link is
 * down, use the local one. Otherwise fn is called once, from the loop,
 * unless the call is cancelled.
 */
struct cluster_call *cluster_sequence(struct cluster *, const struct user_cfg *,
    cluster_seq_fn fn, void *arg);

/*
 * BEGIN for an attempt through ds (gated: an open circuit, a throttle or a
 * trial taken refuse it; else only quotas do). att (the caller's, valid
 * until fn or cancel) is filled. NULL: the link is down, decide locally.
 */
struct cluster_call *cluster_admit(struct cluster *, const struct downstream_cfg *ds,
    bool gated, struct cluster_attempt *att, cluster_admit_fn fn, void *arg);

/* fn will not be called; a BEGIN admitted meanwhile is given back. */
void cluster_call_cancel(struct cluster_call *);

/*
 * The attempt ended (or was given back). Returns true when the cluster
 * decides its circuit and throttle effects (health_end_shared() then),
 * false when the caller must (health_end_since()): the attempt was decided
 * locally, or the link is down and its END waits to be replayed.
 */
bool cluster_end(struct cluster *, const struct downstream_cfg *ds,
    struct cluster_attempt *att, enum health_outcome outcome);

/* The Redis keys of a downstream (KEYS of BEGIN/END/READ: health, minute,
 * hour, day) and of a user's sequence. */
#define CLUSTER_KEY_MAX 320
void cluster_ds_keys(const struct cluster_cfg *, const struct health_rec *,
    char keys[4][CLUSTER_KEY_MAX]);

#endif

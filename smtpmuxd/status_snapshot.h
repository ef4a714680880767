/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_STATUS_SNAPSHOT_H
#define SMTPMUXD_STATUS_SNAPSHOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "config.h"
#include "health.h"

/*
 * What the status page shows, taken at one moment: the configuration's
 * users, each with its downstreams as the shared health segment has them.
 * Copies only: no pointer into the segment or the configuration, and no
 * secret (passwords and downstream logins are never copied).
 */

struct status_downstream {
	char name[64];                   /* the user's name for it (`name:`, else addr) */
	struct health_snapshot hs;       /* state, counters, quota windows, last error */
};

struct status_user {
	char email[128];
	struct status_downstream *ds;
	size_t n_ds;
};

/*
 * The queue's figures: the page shows its queue section only when
 * `present` is true, which status_queue_summary() (status_queue.c) makes
 * it, from the queue figures file, when the daemon has a queue.
 */
struct status_queue_summary {
	bool present;
	uint64_t messages;               /* waiting in the queue, all users */
	uint64_t bytes;                  /* their size */
	uint64_t oldest_age;             /* seconds since the oldest was accepted */
	/* Since the daemon started: */
	uint64_t delivered;              /* by the queue runner */
	uint64_t bounced;                /* refused by every downstream during a retry */
	uint64_t expired;                /* given up after queue.max_lifetime */
};

/*
 * Several instances sharing state through Redis (`cluster:`): shown only
 * when present. A downstream's state and consecutive failures are then the
 * cluster's (each worker mirrors what Redis says); the rest is this
 * instance's.
 */
struct status_cluster_summary {
	bool present;
	char address[192];               /* the Redis address, without a password */
	unsigned linked, workers;        /* workers with their link up, workers */
	time_t since;                    /* the latest change of a worker's link */
	uint64_t local_decisions;        /* attempts decided locally for want of a link */
};

struct status_snapshot {
	time_t now;
	char hostname[256];
	struct status_user *users;
	size_t n_users;
	struct status_queue_summary queue;
	struct status_cluster_summary cluster;
};

/* The cluster summary of cfg's daemon from h. */
void status_cluster_take(struct status_cluster_summary *out, const struct config *cfg,
    const struct health *h);

/* Takes a snapshot of cfg's users from h at now. 0, or -1 out of memory. */
int status_snapshot_take(struct status_snapshot *out, const struct config *cfg,
    const struct health *h, time_t now);
void status_snapshot_free(struct status_snapshot *);

#endif

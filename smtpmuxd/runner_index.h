/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_RUNNER_INDEX_H
#define SMTPMUXD_RUNNER_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "spool_format.h"

/*
 * The queue runner's picture of the spool: one entry per message, found
 * by id (a hash), and the entries waiting for their next attempt in a
 * min-heap ordered by (next attempt, arrival, order of arrival), so that the runner
 * wakes for exactly the next one and messages due together go out oldest
 * first. Entries that are held, being delivered or parked (their user is
 * not in the configuration) are not in the heap.
 */

struct qentry {
	char id[SPOOL_ID_LEN + 1];
	int64_t arrived;
	int64_t next;                    /* due time while in the heap */
	uint64_t bytes;                  /* file size */
	uint64_t seq;                    /* order the runner learned of it: FIFO within a second */
	bool held;                       /* smtpmuxd -s hold */
	bool parked;                     /* its user is not in the configuration */
	bool busy;                       /* a delivery is under way (runner_job) */
	bool delete_pending;             /* delete once the delivery under way ends */
	void *job;                       /* the delivery under way */
	size_t heap_pos;                 /* SIZE_MAX: not in the heap */
	struct qentry *hnext;            /* hash chain */
};

struct qindex {
	struct qentry **buckets;
	size_t n_buckets;
	size_t count;
	uint64_t bytes;
	struct qentry **heap;
	size_t heap_len, heap_cap;
	uint64_t seq;
};

void qindex_init(struct qindex *);
void qindex_free(struct qindex *);

struct qentry *qindex_find(const struct qindex *, const char *id);
/* A new entry (not scheduled); NULL when out of memory or already there. */
struct qentry *qindex_add(struct qindex *, const char *id, int64_t arrived, uint64_t bytes);
/* Unschedules and frees e. */
void qindex_remove(struct qindex *, struct qentry *e);

/* Puts e in the heap due at next (or moves it there). -1 when out of memory. */
int qindex_schedule(struct qindex *, struct qentry *e, int64_t next);
void qindex_unschedule(struct qindex *, struct qentry *e);
/* The entry due first, or NULL when none is scheduled. */
struct qentry *qindex_first(const struct qindex *);

/* The oldest arrival, 0 when empty (a walk over every entry). */
int64_t qindex_oldest(const struct qindex *);
/* Calls fn for every entry (fn must not add or remove entries). */
void qindex_each(struct qindex *, void (*fn)(struct qentry *e, void *arg), void *arg);

#endif

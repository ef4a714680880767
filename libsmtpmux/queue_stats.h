/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_QUEUE_STATS_H
#define SMTPMUX_QUEUE_STATS_H

#include <stddef.h>
#include <stdint.h>

/*
 * Queue figures shared by the workers, the queue runner and the status
 * readers: one page of a sealed memfd that the master makes before it
 * forks (sealed_memfd.h: no path, cannot be truncated), whose read-only
 * descriptor `smtpmuxd -s status` is handed with the health segments
 * (smtpmuxd/instance.c); /metrics reads it in the prober, and every spool
 * writer sees how many octets are queued (queue.max_size). Only C11
 * atomics: a process killed at any instruction leaves nothing locked.
 *
 * Writers add a message once it is committed; the runner takes it off when
 * it leaves the queue, and resets the gauges from what it finds when it
 * scans the spool, which also corrects any drift left by a writer killed
 * between its commit and its update. The counters count since the master
 * started.
 */

struct queue_stats;

enum queue_counter {
	QUEUE_QUEUED,                    /* messages committed to the spool */
	QUEUE_DELIVERED,                 /* delivered by the runner */
	QUEUE_DEFERRED,                  /* the runner's attempts that failed temporarily */
	QUEUE_BOUNCED,                   /* refused permanently during a retry */
	QUEUE_EXPIRED,                   /* given up after max_lifetime */
	QUEUE_DELETED,                   /* removed with `smtpmuxd -s delete` */
	QUEUE_DSN,                       /* delivery status notifications queued */
	QUEUE_NCOUNTERS
};

struct queue_stats_view {
	uint64_t messages;               /* in the queue now */
	uint64_t bytes;
	int64_t oldest;                  /* arrival of the oldest message; 0: none */
	uint64_t counter[QUEUE_NCOUNTERS];
};

/* Master, before it forks: the figures, all zero. NULL (errno). */
struct queue_stats *queue_stats_create(void);
/* The read-only descriptor for status readers (the master's; do not close
 * it); -1 when there is none. */
int queue_stats_fd(const struct queue_stats *);
/* In every child: closes that descriptor. */
void queue_stats_after_fork(struct queue_stats *);
/* A status reader: maps what queue_stats_fd() gave, read-only, after
 * checking that it is this build's layout; takes fd. NULL (errno EPROTO:
 * not such a segment). */
struct queue_stats *queue_stats_attach(int fd);
void queue_stats_destroy(struct queue_stats *);

void queue_stats_added(struct queue_stats *, uint64_t bytes);
void queue_stats_removed(struct queue_stats *, uint64_t bytes);
void queue_stats_count(struct queue_stats *, enum queue_counter);
void queue_stats_reset(struct queue_stats *, uint64_t messages, uint64_t bytes, int64_t oldest);
void queue_stats_set_oldest(struct queue_stats *, int64_t oldest);
uint64_t queue_stats_bytes(const struct queue_stats *);
void queue_stats_read(const struct queue_stats *, struct queue_stats_view *out);

/* "queued", "delivered", ... */
const char *queue_counter_name(enum queue_counter);

#endif

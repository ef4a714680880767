/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_QUEUE_STATS_H
#define SMTPMUX_QUEUE_STATS_H

#include <stddef.h>
#include <stdint.h>

/*
 * Queue figures shared by the workers, the queue runner and the status
 * readers: a small file mapped MAP_SHARED by the master before it forks
 * (next to the state file: "<state_file>.queue"), so that `smtpmuxd -s
 * status` and /metrics can read it, and so that every spool writer can see
 * how many octets are queued (queue.max_size). Only C11 atomics: a process
 * killed at any instruction leaves nothing locked.
 *
 * Writers add a message once it is committed; the runner takes it off when
 * it leaves the queue, and resets the gauges from what it finds when it
 * scans the spool, which also corrects any drift left by a writer killed
 * between its commit and its update.
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

/* Master: creates (or reuses, keeping its counters) the file at path. */
struct queue_stats *queue_stats_create(const char *path);
/* Readers: maps an existing file read-only; NULL (errno) if there is none. */
struct queue_stats *queue_stats_open_readonly(const char *path);
void queue_stats_destroy(struct queue_stats *);

/* "<state_file>.queue" into buf. */
void queue_stats_path(const char *state_file, char *buf, size_t len);

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

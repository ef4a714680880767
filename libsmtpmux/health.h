/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_HEALTH_H
#define SMTPMUX_HEALTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <smtpmux/selector.h>

#include "config.h"

/*
 * Per-downstream health, counters and quotas shared by all processes.
 *
 * The master maps one shared segment (a file, state_file) before it forks
 * anything; workers and the prober inherit it, `smtpmuxd -s status` maps it
 * read-only. Records are fixed-size, cache-line
 * aligned, and updated only with C11 atomics, so a worker killed at any
 * instruction leaves no lock held. A record is keyed by the downstream's
 * identity (addr + user), so two users relaying through the same provider
 * account share one record, and a reload finds its records again by key.
 * In-flight counts are kept per worker slot so the master can drop the
 * counts of a worker that died (health_worker_gone).
 *
 * The layout is documented in doc/design.md; HEALTH_LAYOUT_VERSION changes
 * whenever it does.
 */

#define HEALTH_LAYOUT_VERSION 1
#define HEALTH_MAX_DOWNSTREAMS 1024
#define HEALTH_MAX_USERS 1024
#define HEALTH_MAX_WORKER_SLOTS 128

struct health;                       /* the mapped segment */
struct health_rec;                   /* one downstream */
struct health_user;                  /* one user: the shared message sequence */

enum health_outcome {
	HEALTH_OK,                       /* the downstream accepted the message */
	HEALTH_FAIL,                     /* connect/TLS/protocol failure or 4xx/5xx */
	HEALTH_THROTTLED,                /* a rate-limit / quota reply (smtp_reply_is_throttle) */
	HEALTH_CANCELLED                 /* no verdict (client gone, worker stopping): gives back
	                                    the quota and a half-open trial, counts nothing */
};

/*
 * Master, before forking: creates (or reuses, when its layout version and
 * size match) the segment as a file mapped MAP_SHARED at path, so that
 * `smtpmuxd -s status` can read it. NULL on failure (errno set; EBUSY when
 * another process holds the file).
 *
 * The file is flock()ed first, so that a second daemon given the same
 * state file cannot reset the counts of the one running. The lock belongs
 * to the open file, which the read-write mapping keeps open: it lasts until
 * health_destroy() here and in every child forked meanwhile (workers still
 * finishing after their master was killed keep it).
 */
struct health *health_create(const char *path);
/* For status readers: maps an existing segment read-only. */
struct health *health_open_readonly(const char *path);
void health_destroy(struct health *);

/*
 * Master, for each configuration it loads: points every downstream_cfg
 * ->health and user_cfg->health at its record, creating records for new
 * keys and keeping the counters of known ones. Returns 0, or -1 with a
 * message in err when the segment is full.
 */
int health_bind(struct health *, struct config *cfg, char *err, size_t errlen);

/* The user's next message number; shared by all workers. */
uint64_t health_user_next(struct health_user *);

/*
 * Fills a selector view of a downstream at time now (state, counters,
 * remaining quota, availability). A circuit whose cooldown has passed shows
 * as half-open.
 */
void health_view(const struct health_rec *, const struct downstream_cfg *,
    const struct health_cfg *, time_t now, struct smtpmux_downstream_view *out);

/*
 * Before a delivery attempt: reserves one message in every quota window of
 * the downstream and counts the attempt in flight for worker_slot. Returns
 * false (reserving nothing) when any window is full: the downstream is then
 * skipped for this message. Exact under concurrency: no window ever grants
 * more than its limit. Also false while the downstream is unavailable:
 * circuit open, throttled, or half-open with its one trial attempt already
 * claimed; when half-open, the attempt that gets true is the trial.
 * worker_slot < HEALTH_MAX_WORKER_SLOTS - 1 (the last slot is the prober's).
 */
bool health_begin(struct health_rec *, const struct downstream_cfg *,
    unsigned worker_slot, time_t now);

/*
 * health_begin for a downstream that every other path has already failed:
 * an open circuit, a throttle or a trial under way no longer refuse it (a
 * message must not fail while any path could work), its quota still does.
 * A free half-open trial is claimed as by health_begin.
 */
bool health_begin_last_resort(struct health_rec *, const struct downstream_cfg *,
    unsigned worker_slot, time_t now);

/*
 * After the attempt: updates counters, latency, the circuit breaker (open
 * after fail_threshold consecutive failures for cooldown seconds, doubling
 * up to max_cooldown while trial messages keep failing; closed by a
 * success) or the throttle backoff, records the error text, and ends the
 * in-flight count. A failed attempt gives its quota reservation back.
 */
void health_end(struct health_rec *, const struct downstream_cfg *,
    const struct health_cfg *, unsigned worker_slot, time_t now,
    enum health_outcome outcome, unsigned latency_ms, const char *error);
/*
 * health_end for an attempt that health_begin() started at `begun`: a
 * failure gives its quota back only to windows that have not rolled over
 * since, which keeps the limits exact even for an attempt that straddles a
 * window boundary. health_end() is health_end_since() with begun == now.
 */
void health_end_since(struct health_rec *, const struct downstream_cfg *,
    const struct health_cfg *, unsigned worker_slot, time_t begun, time_t now,
    enum health_outcome outcome, unsigned latency_ms, const char *error);

/*
 * The prober's verdict on a downstream (EHLO answered or not). Updates the
 * circuit, the latency and the last error, never quotas, counters or
 * in-flight counts: a good probe closes an open circuit, a failed one counts
 * toward fail_threshold (or re-opens a half-open circuit).
 */
void health_probe_result(struct health_rec *, const struct downstream_cfg *,
    const struct health_cfg *, time_t now, bool ok, unsigned latency_ms,
    const char *error);

/* "up", "down", "half-open", "throttled" for enum smtpmux_downstream_state. */
const char *health_state_name(uint32_t state);

/* Master: a worker died; forget its in-flight counts. */
void health_worker_gone(struct health *, unsigned worker_slot);

/* For status output: iterate over the records in use. */
size_t health_count(const struct health *);
struct health_snapshot {
	char key[160];                   /* "addr user", or "addr" without AUTH */
	char addr[160];                  /* "host:port" */
	char name[64];
	struct smtpmux_downstream_view view;
	char last_error[160];
	time_t last_error_time;
	uint32_t sent_minute, sent_hour, sent_day;
	uint32_t limit_minute, limit_hour, limit_day;
};
/*
 * Fills out for record index (view.name and view.addr point into out).
 * Returns 0 for a record bound by the latest health_bind(), 1 for one only
 * older configurations used (kept so that its counters come back with its
 * key), -1 when index >= health_count().
 */
int health_snapshot(const struct health *, size_t index, const struct health_cfg *,
    time_t now, struct health_snapshot *out);
/* health_snapshot() of the record a downstream_cfg was bound to. */
int health_snapshot_of(const struct health *, const struct health_rec *,
    const struct health_cfg *, time_t now, struct health_snapshot *out);

#endif

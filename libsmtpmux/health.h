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
 * The master creates the shared segments (two memfds) before it forks
 * anything; workers and the prober inherit them; `smtpmuxd -s status`
 * receives read-only descriptors of them from the master (smtpmuxd/
 * instance.c). Records are fixed-size, cache-line aligned, and updated only
 * with C11 atomics, so a worker killed at any instruction leaves no lock
 * held. A record is keyed by the downstream's identity (addr + user), so
 * two users relaying through the same provider account share one record,
 * and a reload finds its records again by key. In-flight counts and quota
 * reservations are kept per worker slot so the master can drop those of a
 * worker that died (health_worker_gone).
 *
 * What the master relies on (keys, quota windows, record counts) lives in a
 * control segment the children can only read; what workers write is only
 * ever read by the master as values. A compromised worker can falsify
 * health and counts, not make the master misbehave.
 *
 * The state file (config `state_file`) is only a copy, saved by the master
 * every second (health_save) and loaded at start, so that quotas and
 * counters survive a restart. Nothing maps it: truncating or deleting it
 * harms nobody.
 *
 * The layout is documented in doc/design.md and libsmtpmux/health_layout.h;
 * HEALTH_LAYOUT_VERSION changes whenever it does.
 */

#define HEALTH_LAYOUT_VERSION 3
#define HEALTH_MAX_DOWNSTREAMS 1024
#define HEALTH_MAX_USERS 1024
#define HEALTH_MAX_WORKER_SLOTS 128

/*
 * In-flight slots: workers take 0 .. HEALTH_WORKER_SLOTS - 1 (two
 * generations of them during a reload); each helper child that delivers or
 * probes has a slot of its own, named here, above those. A new helper adds
 * itself before HEALTH_HELPERS.
 */
enum health_helper {
	HEALTH_HELPER_PROBER,
	HEALTH_HELPER_TOKENS,            /* delivers nothing: its slot stays empty */
	HEALTH_HELPER_RUNNER,            /* the queue runner */
	HEALTH_HELPERS
};
#define HEALTH_WORKER_SLOTS (HEALTH_MAX_WORKER_SLOTS - HEALTH_HELPERS)

static inline unsigned
health_helper_slot(enum health_helper helper)
{
	return HEALTH_WORKER_SLOTS + (unsigned)helper;
}

struct health;                       /* the mapped segments */
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
 * Master, before forking: creates the segments and, when path names a state
 * file saved by an earlier run of this build, takes its counters, quotas
 * and sequences (in-flight counts and trials are forgotten; reservations in
 * flight then count as sent). A file that does not match, cannot be read,
 * is not a regular file owned by this user or is writable by others is
 * ignored, with a warning. NULL on failure (errno set).
 */
struct health *health_create(const char *path);

/*
 * Master: writes the segments to path (a temporary file renamed over it,
 * mode 0600) when they changed since the last save, or when the file is
 * not the one last written. *disturbed (when not NULL) tells what happened
 * to the file meanwhile: "removed", "replaced" or "truncated", else NULL.
 * Returns 0, or -1 with errno set.
 */
int health_save(struct health *, const char *path, const char **disturbed);

/*
 * In every child, right after fork and before it drops privileges: unmaps
 * the master's writable view of the control segment and closes the
 * descriptors meant for status readers.
 */
void health_after_fork(struct health *);

/*
 * Read-only descriptors of the two segments, for a status reader (the
 * master's; do not close them). -1 when unavailable.
 */
void health_export(const struct health *, int *ctl_fd, int *live_fd);
/*
 * A status reader: maps what health_export() gave, read-only, after
 * checking that it is this build's layout. Takes the descriptors (closes
 * them). NULL with errno (EPROTO: not a matching segment).
 */
struct health *health_attach(int ctl_fd, int live_fd);
void health_destroy(struct health *);

/*
 * Master, for each configuration it loads: points every downstream_cfg
 * ->health and user_cfg->health at its record, creating records for new
 * keys and keeping the counters of known ones. Downstreams that share a
 * record (same addr and user) share its quota windows: the lowest limit of
 * each window applies, and they are rolling unless all of them say
 * calendar. A window whose limit or kind changed gets new cells that keep
 * the messages counted so far. Returns 0, or -1 with a message in err when
 * the segments are full.
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
 * the downstream (recorded as worker_slot's) and counts the attempt in
 * flight for worker_slot. Returns false (reserving nothing) when any window
 * is full: the downstream is then skipped for this message. Exact under
 * concurrency: no window ever holds more than its limit. Windows are rolling
 * (no more than the limit in any 60 s, 1 h, 24 h) unless the downstream's
 * `quota_window` is calendar (UTC minutes, hours, days). Also false while
 * the downstream is unavailable: circuit open, throttled, or half-open with
 * its one trial attempt already claimed; when half-open, the attempt that
 * gets true is the trial. worker_slot < HEALTH_MAX_WORKER_SLOTS (a worker's,
 * or health_helper_slot()).
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
 * When the quotas of the downstream let a message through again, as seen
 * at now: for each full window the moment its oldest counted message stops
 * counting (rolling) or the window rolls over (calendar), the latest of
 * those; 0 when no window is full, or when a full one is held only by
 * attempts under way (their outcome decides). The queue runner sleeps
 * until then instead of retrying blindly (quota-aware deferral).
 */
time_t health_quota_reopens(const struct health_rec *, const struct downstream_cfg *,
    time_t now);

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
 * health_end for an attempt that health_begin() started at `begun` (the
 * `now` it was given): its reservation is found by that time and slot.
 * health_end() is health_end_since() with begun == now.
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

/*
 * Master: a worker (or helper) died; forget its in-flight counts, give back
 * the quota its unfinished attempts reserved and the half-open trial it
 * held. Only its own slot is touched; an invalid slot is ignored.
 */
void health_worker_gone(struct health *, unsigned worker_slot);

/* --- the cluster's share (cluster.c; `cluster:`) ----------------------------
 *
 * With a link to Redis up, the cluster decides a downstream's circuit and
 * throttle and keeps its quota windows for all instances; the segment keeps
 * this instance's own counters, quota cells (its own messages: the fast
 * path and what remains when the link is down), in-flight counts, and a
 * mirror of the cluster's circuit and throttle that views and selectors
 * read.
 */

/* A downstream's circuit and throttle as the cluster has them, on this
 * host's clock. */
struct health_shared {
	bool open;                       /* circuit open or half-open */
	time_t open_until;               /* half-open from then on */
	uint32_t cooldown;               /* s */
	bool trial_taken;                /* someone holds the half-open trial */
	time_t throttled_until;          /* 0: not throttled */
	uint32_t fails;                  /* consecutive failures, all instances */
};

/*
 * health_begin() for an attempt the cluster admits: reserves its place in
 * this instance's quota windows and counts it in flight, and that is all
 * (the cluster's BEGIN checks the circuit and throttle). false: this
 * instance's own windows are full already.
 */
bool health_begin_shared(struct health_rec *, unsigned worker_slot, time_t now);
/* health_end_since() for an attempt whose circuit and throttle effects the
 * cluster decides (its END was sent): counters, latency, last error, quota
 * cells and in-flight count only. */
void health_end_shared(struct health_rec *, const struct health_cfg *, unsigned worker_slot,
    time_t begun, time_t now, enum health_outcome outcome, unsigned latency_ms,
    const char *error);
/* Copies the cluster's circuit and throttle into the record (a trial this
 * instance claimed while deciding locally stays claimed). */
void health_mirror(struct health_rec *, const struct health_shared *, time_t now);
/* What this instance knows of the record's circuit and throttle. */
void health_shared_of(const struct health_rec *, time_t now, struct health_shared *out);

/* The record's key ("addr user"), as Redis names it too. */
const char *health_rec_key(const struct health_rec *, char *buf, size_t len);
/* Its windows: limit[w] (0: none) for minute, hour, day; calendar or rolling. */
void health_rec_windows(const struct health_rec *, uint32_t limit[3], bool *calendar);
/* Calls fn for every message of this instance that counts in window w
 * (0..2) at now and is no longer under way: its cell's index and when it
 * stops counting. */
typedef void (*health_cell_fn)(void *arg, unsigned window, uint32_t index, time_t until);
void health_rec_counted(const struct health_rec *, time_t now, health_cell_fn fn, void *arg);

/* The link to Redis of the process in slot. */
enum health_link { HEALTH_LINK_NONE, HEALTH_LINK_DOWN, HEALTH_LINK_UP };
void health_link_set(struct health *, unsigned slot, enum health_link, time_t now);
struct health_link_summary {
	unsigned up, down;               /* worker slots with a link up, down */
	time_t since;                    /* the latest change among them */
	uint64_t local_decisions;        /* attempts decided locally for want of a link */
};
void health_link_summary(const struct health *, struct health_link_summary *out);
/* One attempt was decided locally although a cluster is configured. */
void health_count_local_decision(struct health *);
/* This start's id, naming its entries in Redis. */
uint64_t health_instance(const struct health *);

/* For status output: iterate over the records in use. */
size_t health_count(const struct health *);
struct health_snapshot {
	char key[160];                   /* "addr user", or "addr" without AUTH */
	char addr[160];                  /* "host:port" */
	char name[64];
	struct smtpmux_downstream_view view;
	char last_error[160];
	time_t last_error_time;
	/* a limited window: the messages it holds now (sent or under way; the
	 * last 60 s / 1 h / 24 h when rolling); an unlimited one: messages sent
	 * this UTC minute / hour / day */
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

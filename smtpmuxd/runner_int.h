/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_RUNNER_INT_H
#define SMTPMUXD_RUNNER_INT_H

#include <event2/event.h>

#include "helper_signals.h"
#include "runner.h"
#include "runner_index.h"
#include "runtime.h"
#include "spool.h"

/*
 * Shared by runner.c (the process: spool, watches, schedule) and
 * runner_job.c (one delivery and what follows from its outcome).
 */

struct rjob;

struct runner {
	struct runtime rt;               /* loop, resolver, configuration, health, writer */
	const struct config *cfg;
	struct queue_stats *stats;
	struct spool *spool;
	struct qindex index;
	struct rjob *jobs;               /* deliveries under way */
	unsigned busy;
	uint64_t rng;
	int lock_fd;
	int inotify_fd;
	int wd_msg, wd_hold, wd_ctl;
	struct event *ev_inotify;
	struct event *ev_due;            /* the first scheduled message */
	struct event *ev_rescan;         /* the safety net under inotify */
	struct event *ev_lock;           /* waiting for the previous runner's lock */
	struct helper_signals sigs;
	struct event *ev_deadline;       /* shutdown_timeout after SIGTERM */
	struct event *ev_oldest;         /* the oldest-message figure, recomputed lazily */
	bool started;                    /* the lock is ours and the spool was scanned */
	bool stopping;
};

/* runner.c */
/* Schedules e (not held, parked or busy) at next and arms the timer. */
void runner_schedule(struct runner *, struct qentry *e, int64_t next);
/* A delivery ended: e is free again (or gone); start what is due. */
void runner_job_ended(struct runner *);
/* e left the queue: forget it and update the figures. */
void runner_forget(struct runner *, struct qentry *e);
/* Reads msg/<id> into the index when it is not there yet. */
void runner_load(struct runner *, const char *id);
/* The configured user a message may be relayed for now, or NULL (logged):
 * its user is gone or its sender is no longer in the user's
 * allowed_senders. The message is then kept, parked until a reload. */
const struct user_cfg *runner_owner(struct runner *, const char *id,
    const struct spool_env *env);

/* runner_job.c */
/* Starts delivering e. false when it could not start (e is then handled). */
bool runner_job_start(struct runner *, struct qentry *e);
/* Stops the relay of e's delivery, if it is still relaying. */
void runner_job_cancel(struct qentry *e);
/* The deadline after SIGTERM: cancels every delivery still running. */
void runner_jobs_cancel_all(struct runner *);

#endif

/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SPOOL_WRITER_H
#define SMTPMUX_SPOOL_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>

#include "msgbody.h"
#include "queue_stats.h"
#include "spool_format.h"

/*
 * Commits messages to the spool without blocking the event loop: a thread
 * of the process does the writes and the fsync()s (as nginx's thread pools
 * do for file I/O) and reports back to the loop through a pipe.
 *
 * Group commit: the thread takes every job waiting when it wakes up,
 * writes all their files, fsync()s each, renames them into msg/, and
 * fsync()s msg/ once for the whole batch. A job is reported committed only
 * after that last fsync(): a 250 sent on its report is a promise kept
 * across a power cut.
 */

struct spool_writer;
struct spool_job;

struct spool_result {
	int err;                         /* 0: on disk for good; else errno (EDQUOT: queue.max_size) */
	const char *step;                /* what failed: "max_size", "create", "write", ... */
	char id[SPOOL_ID_LEN + 1];       /* the id it was committed under (see spool_publish) */
	unsigned batch;                  /* messages that shared its fsync of msg/ */
};

typedef void (*spool_done_fn)(void *arg, const struct spool_result *res);

/*
 * Starts the thread. base is the loop that gets the reports; stats (may be
 * NULL) is told of every commit and gives the queued size that max_size
 * (0: no limit) is checked against. NULL with a message in err.
 */
struct spool_writer *spool_writer_new(struct event_base *base, const char *dir,
    struct queue_stats *stats, uint64_t max_size, char *err, size_t errlen);

/*
 * Finishes every job already submitted, stops the thread and frees the
 * writer. Jobs not yet reported are freed without their callback: their
 * owners must have forgotten them.
 */
void spool_writer_free(struct spool_writer *);

/*
 * Queues env (its size is set from body) and body for writing under id.
 * The body is copied (or its file duplicated) before this returns, so the
 * caller may free it at once. done is called from the loop, exactly once,
 * unless forgotten. NULL when out of memory.
 */
struct spool_job *spool_writer_submit(struct spool_writer *, const char *id,
    const struct spool_env *env, struct msgbody *body, spool_done_fn done, void *arg);

/* The owner is gone: the write goes on (it may well succeed), done is not
 * called. */
void spool_job_forget(struct spool_job *);

#endif

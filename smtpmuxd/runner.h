/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_RUNNER_H
#define SMTPMUXD_RUNNER_H

#include "config.h"
#include "health.h"
#include "queue_stats.h"

struct token_table;

/*
 * The queue runner: a child of the master (like the prober), with its own
 * event loop, under the workers' user. It owns the spool while it runs
 * (runner.lock): it reads every queued message at start, learns of new
 * ones through inotify, and retries each through the same code the workers
 * use (relay_start: the user's selector, the shared health, circuit
 * breakers, quotas and failover), with exponential backoff and jitter, or
 * exactly when the quota window that held a message back reopens. It gives
 * up after queue.max_lifetime or a permanent refusal, with a delivery
 * status notification to the sender. The master respawns it when it dies
 * and replaces it at each reload (never two at once).
 */

/* Its process name (/proc/PID/comm), for ps and top. */
#define RUNNER_PROCESS_NAME "smtpmux-queue"

struct runner_params {
	const struct config *cfg;        /* bound to health by health_bind() */
	struct health *health;
	struct queue_stats *stats;
	struct token_table *tokens;      /* OAuth tokens, as the workers see them; may be NULL */
	unsigned slot;                   /* its in-flight slot in the health segment */
	pid_t master_pid;
};

/* The child's main: runs until SIGTERM, then lets the deliveries under way
 * finish (at most limits.shutdown_timeout). Returns the exit status. */
int runner_main(const struct runner_params *p);

#endif

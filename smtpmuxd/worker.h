/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_WORKER_H
#define SMTPMUXD_WORKER_H

#include <signal.h>
#include <sys/types.h>

#include "accept_room.h"
#include "client_table.h"
#include "config.h"
#include "health.h"
#include "queue_stats.h"
#include "privdrop.h"
#include "token_table.h"

/*
 * A worker process: one libevent loop accepting on every listener and
 * running SMTP sessions. The master forks it; the worker owns its copy of
 * the configuration (inherited by fork) and frees it when it exits.
 *
 * Signals: SIGTERM = graceful stop (stop accepting, let sessions finish
 * within limits.shutdown_timeout, then drop them and exit); SIGUSR2 =
 * retire after a reload (stop accepting, let sessions run until their
 * clients quit; after limits.shutdown_timeout, go on as for SIGTERM);
 * SIGUSR1 = reopen the log file. SIGHUP and SIGINT are ignored: they reach the whole
 * process group from a terminal, and only the master acts on them.
 */

#define WORKER_STOP_SIGNAL SIGTERM
#define WORKER_RETIRE_SIGNAL SIGUSR2

struct worker_params {
	struct config *cfg;              /* freed by the worker at exit */
	struct health *health;
	struct client_table *clients;    /* per client address, shared by all workers */
	struct accept_room *room;        /* which workers have room, shared */
	struct token_table *tokens;      /* NULL without OAuth downstreams */
	struct queue_stats *qstats;      /* queue figures; NULL without a queue */
	const int *listen_fds;           /* parallel to cfg->listen */
	unsigned slot;                   /* health in-flight slot */
	unsigned generation;
	pid_t master_pid;
	const struct privdrop *priv;
	const sigset_t *sigmask;         /* to restore once the worker handles signals */
};

/* In the child right after fork (signals blocked): serves until stopped.
 * Returns the exit status for the process. */
int worker_run(const struct worker_params *p);

#endif

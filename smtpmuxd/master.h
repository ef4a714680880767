/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_MASTER_H
#define SMTPMUXD_MASTER_H

#include <stdbool.h>

/* Exit statuses of smtpmuxd, documented in smtpmuxd(8). */
enum smtpmuxd_exit {
	SMTPMUXD_EXIT_OK = 0,
	SMTPMUXD_EXIT_CONFIG = 1,        /* the configuration does not load */
	SMTPMUXD_EXIT_USAGE = 2,         /* bad command line */
	SMTPMUXD_EXIT_RUNTIME = 3,       /* bind, pidfile, state file, fork... */
	/* The file defines no users (as installed): LSB's "program is not
	 * configured", which systemd shows as 6/NOTCONFIGURED. */
	SMTPMUXD_EXIT_NOTCONFIGURED = 6
};

struct master_options {
	const char *config_path;         /* absolute: the master chdirs to / */
	const char *pidfile;             /* absolute, or NULL for none */
	const char *user;                /* -u, overrides `user:` */
	bool foreground;                 /* -f: no fork, log to stderr */
	bool allow_core;                 /* -D: workers may dump core */
};

/*
 * Runs the master: loads the configuration, binds the listeners, detaches
 * unless foreground, forks and supervises the workers (and the prober),
 * and acts on signals until SIGTERM/SIGINT/SIGQUIT. Returns an exit
 * status.
 *
 * Signals: SIGHUP reloads the configuration (a new generation of workers;
 * listeners whose address is unchanged keep their sockets), SIGTERM,
 * SIGINT and SIGQUIT stop gracefully (a second one kills the workers),
 * SIGUSR1 reopens the log file here and in every child.
 */
int master_run(const struct master_options *opt);

#endif

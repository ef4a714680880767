/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_TOKEN_COMMAND_H
#define SMTPMUXD_TOKEN_COMMAND_H

#include <stddef.h>
#include <sys/types.h>

#include <event2/event.h>

/*
 * Runs a token_command in the token helper's event loop: fork and exec
 * (argv[0] looked up in PATH unless it holds a slash; no shell), standard
 * input and error on /dev/null, standard output collected. The command runs
 * in its own process group, which is killed when it outlives its timeout
 * or prints too much, so `sh -c 'sleep 99'` is stopped too.
 */

struct command_run;

/* out: what it printed; why: NULL when it exited 0 on its own, else
 * "timed out after 2 s", "exited with status 1", "killed by signal 9"... */
typedef void (*command_done_fn)(void *arg, const char *out, size_t len, const char *why);

/* NULL when it cannot start (then done is never called). */
struct command_run *command_start(struct event_base *base, char *const argv[],
    unsigned timeout_s, command_done_fn done, void *arg);

/*
 * The helper's SIGCHLD handler calls this for every run: when the run's
 * process has exited it is reaped, done is called and the run freed.
 */
void command_reap(struct command_run *);

/* Kills the process group, waits for the process; done is not called. */
void command_cancel(struct command_run *);

#endif

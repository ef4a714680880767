/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_HELPER_SIGNALS_H
#define SMTPMUXD_HELPER_SIGNALS_H

#include <event2/event.h>

/*
 * The signals of a helper child of the master (the prober, the token
 * helper, the queue runner): only SIGTERM, from the master that owns the helper's life, stops
 * its loop, and SIGUSR1, passed on by the master, reopens the log file; the
 * master decides what the others do (SIGPIPE is ignored: a peer closing a
 * connection must not kill a helper). The master forks with signals
 * blocked: they are let in only once they have handlers.
 */

struct helper_signals {
	struct event *term;
	struct event *reopen;
};

/* Returns 0, or -1 (then call helper_signals_stop). */
int helper_signals_start(struct helper_signals *, struct event_base *base);
/* The same, but SIGTERM calls on_term(sig, what, arg) instead of stopping
 * the loop at once: a helper with work under way (the queue runner) lets it
 * finish first. */
int helper_signals_start_with(struct helper_signals *, struct event_base *base,
    event_callback_fn on_term, void *arg);
void helper_signals_stop(struct helper_signals *);

#endif

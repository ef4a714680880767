/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <signal.h>
#include <string.h>

#include "helper_signals.h"
#include "log.h"

static void
on_stop_signal(evutil_socket_t sig, short what, void *arg)
{
	(void)what;
	log_info("signal %d, exiting", (int)sig);
	event_base_loopbreak(arg);
}

static void
on_reopen_signal(evutil_socket_t sig, short what, void *arg)
{
	(void)sig;
	(void)what;
	(void)arg;
	if (log_reopen() < 0)
		log_warn("cannot reopen the log file: %s", strerror(errno));
}

int
helper_signals_start(struct helper_signals *hs, struct event_base *base)
{
	return helper_signals_start_with(hs, base, on_stop_signal, base);
}

int
helper_signals_start_with(struct helper_signals *hs, struct event_base *base,
    event_callback_fn on_term, void *arg)
{
	sigset_t set;

	signal(SIGPIPE, SIG_IGN);
	hs->term = evsignal_new(base, SIGTERM, on_term, arg);
	hs->reopen = evsignal_new(base, SIGUSR1, on_reopen_signal, NULL);
	if (hs->term == NULL || evsignal_add(hs->term, NULL) < 0 ||
	    hs->reopen == NULL || evsignal_add(hs->reopen, NULL) < 0)
		return -1;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	return 0;
}

void
helper_signals_stop(struct helper_signals *hs)
{
	if (hs->term != NULL)
		event_free(hs->term);
	if (hs->reopen != NULL)
		event_free(hs->reopen);
	hs->term = hs->reopen = NULL;
}

/* SPDX-License-Identifier: MIT */
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "idle_trim.h"

struct idle_trim {
	struct event *ev;
	unsigned delay_ms;
};

static void
idle_trim_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
#ifdef __GLIBC__
	malloc_trim(0);
#endif
}

struct idle_trim *
idle_trim_new(struct event_base *base, unsigned delay_ms)
{
	struct idle_trim *t = calloc(1, sizeof(*t));

	if (t == NULL)
		return NULL;
	t->delay_ms = delay_ms;
	if ((t->ev = evtimer_new(base, idle_trim_cb, t)) == NULL) {
		free(t);
		return NULL;
	}
	return t;
}

void
idle_trim_free(struct idle_trim *t)
{
	if (t == NULL)
		return;
	event_free(t->ev);
	free(t);
}

void
idle_trim_arm(struct idle_trim *t)
{
	struct timeval tv;

	if (t == NULL)
		return;
	tv.tv_sec = (time_t)(t->delay_ms / 1000);
	tv.tv_usec = (suseconds_t)(t->delay_ms % 1000) * 1000;
	evtimer_add(t->ev, &tv);
}

void
idle_trim_cancel(struct idle_trim *t)
{
	if (t != NULL)
		evtimer_del(t->ev);
}

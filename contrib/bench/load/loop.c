/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "loop.h"
#include "wire.h"

/* How often silent sessions are looked for: timeouts are checked to this. */
#define LOOP_TICK_MS 100

uint64_t
load_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

unsigned
loop_take(struct load_loop *l, unsigned n)
{
	struct load_shared *sh = l->sh;
	long long left;

	if (sh->deadline_ns != 0 && load_now_ns() >= sh->deadline_ns)
		return 0;
	if (sh->opts->messages == 0)
		return n;
	left = atomic_load(&sh->remaining);
	do {
		if (left <= 0)
			return 0;
		if ((long long)n > left)
			n = (unsigned)left;
	} while (!atomic_compare_exchange_weak(&sh->remaining, &left, left - n));
	return n;
}

void
loop_give_back(struct load_loop *l, unsigned n)
{
	if (n > 0 && l->sh->opts->messages != 0)
		atomic_fetch_add(&l->sh->remaining, n);
}

void
loop_wire_idle(struct load_loop *l)
{
	if (--l->active > 0)
		return;
	l->end_ns = load_now_ns();
	event_base_loopbreak(l->base);
}

/* One timer for all the loop's sessions: cheaper than a timer each, re-armed per reply. */
static void
loop_on_tick(evutil_socket_t fd, short what, void *arg)
{
	struct load_loop *l = arg;
	uint64_t now = load_now_ns();

	for (unsigned i = 0; i < l->n_wires; i++)
		wire_check_timeout(&l->wires[i], now);
}

int
loop_init(struct load_loop *l, struct load_shared *sh, unsigned n_conns, char *err, size_t errlen)
{
	struct event_config *cfg = event_config_new();
	struct timeval tick = { 0, LOOP_TICK_MS * 1000 };

	l->sh = sh;
	l->n_wires = n_conns;
	stats_init(&l->stats);
	/* Each base belongs to one thread: no locks. */
	if (cfg != NULL && event_config_set_flag(cfg, EVENT_BASE_FLAG_NOLOCK) == 0)
		l->base = event_base_new_with_config(cfg);
	if (cfg != NULL)
		event_config_free(cfg);
	l->wires = calloc(n_conns, sizeof(*l->wires));
	if (l->base != NULL)
		l->tick = event_new(l->base, -1, EV_PERSIST, loop_on_tick, l);
	if (l->base == NULL || l->wires == NULL || l->tick == NULL) {
		snprintf(err, errlen, "cannot set up an event loop for %u connections", n_conns);
		return -1;
	}
	for (unsigned i = 0; i < n_conns; i++)
		wire_init(&l->wires[i], l);
	event_add(l->tick, &tick);
	return 0;
}

void *
loop_run(void *arg)
{
	struct load_loop *l = arg;

	for (unsigned i = 0; i < l->n_wires && wire_start(&l->wires[i]); i++)
		l->active++;
	if (l->active > 0)
		event_base_dispatch(l->base);
	else
		l->end_ns = load_now_ns();
	for (unsigned i = 0; i < l->n_wires; i++)
		wire_cleanup(&l->wires[i]);
	return NULL;
}

void
loop_free(struct load_loop *l)
{
	if (l->tick != NULL)
		event_free(l->tick);
	free(l->wires);
	if (l->base != NULL)
		event_base_free(l->base);
}

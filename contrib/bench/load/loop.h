/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_LOOP_H
#define SMTP_LOAD_LOOP_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include <event2/event.h>

#include "client.h"
#include "opts.h"
#include "stats.h"
#include "tls_client.h"

/*
 * One event loop per thread, each with its share of the connections; the
 * threads share only what is read-only during the run and one atomic
 * counter of the messages left to claim.
 */

struct load_shared {
	const struct load_opts *opts;
	struct client_cfg client_cfg;
	const struct load_tls *tls;     /* NULL without TLS */
	struct sockaddr_storage addr;
	socklen_t addrlen;
	atomic_llong remaining;         /* messages left to claim, when counted */
	uint64_t deadline_ns;           /* no message starts after it; 0: none */
};

struct wire;

struct load_loop {
	struct load_shared *sh;
	struct event_base *base;
	struct event *tick;             /* timeouts and the end of --duration */
	struct wire *wires;
	unsigned n_wires;
	unsigned active;                /* wires with a session */
	struct load_stats stats;
	uint64_t end_ns;                /* when its last session ended */
	pthread_t thread;
};

/* Monotonic nanoseconds. */
uint64_t load_now_ns(void);

int loop_init(struct load_loop *, struct load_shared *, unsigned n_conns, char *err, size_t errlen);
/* Runs every session of this loop to its end; a pthread start routine. */
void *loop_run(void *loop);
void loop_free(struct load_loop *);

/*
 * Takes up to n messages from the shared count (n when the run is not
 * counted); 0 when none is left or the --duration is over.
 */
unsigned loop_take(struct load_loop *, unsigned n);
/* Returns messages taken but never begun (their session failed first). */
void loop_give_back(struct load_loop *, unsigned n);
/* A wire's session ended and it found nothing more to do. */
void loop_wire_idle(struct load_loop *);

#endif

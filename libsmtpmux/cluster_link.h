/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CLUSTER_LINK_H
#define SMTPMUX_CLUSTER_LINK_H

#include <stdbool.h>
#include <stddef.h>

#include <event2/dns.h>
#include <event2/event.h>

#include "cluster_scripts.h"
#include "config.h"

/*
 * One asynchronous connection to Redis on a libevent loop (hiredis and
 * its libevent adapter), so that nothing ever blocks the loop on Redis:
 * the host name is resolved with evdns, the connection and every command
 * are non-blocking, and every call is bounded by cluster.timeout_ms.
 *
 * The link is up once it has logged in (AUTH, SELECT), checked that the
 * server is Redis 6 or newer (Valkey says so too), loaded the scripts
 * (cluster_scripts.h) and read the shared epoch key. Only then are calls
 * taken: while it is down or connecting, link_call() refuses at once and
 * the caller decides locally. A call not answered in time takes the whole
 * link down (the server is stuck or gone; later calls would only queue
 * behind it): every pending call is answered "no reply" at once, and the
 * link connects again every cluster.retry_interval seconds.
 *
 * It logs one warning when it goes down and one line when it is back,
 * never the password.
 */

struct cluster_link;
struct redisReply;

/* reply is NULL when none came: the link went down or the call timed out.
 * Called from the loop, never from inside link_call(). */
typedef void (*link_reply_fn)(void *arg, struct redisReply *reply);

struct link_hooks {
	/* The link is up; calls are taken. epoch_changed: the server's epoch
	 * key is not the one this link saw before (Redis lost its data). The
	 * calls made here go first. */
	void (*up)(void *arg, bool epoch_changed);
	/* The link went down (pending calls are being answered NULL). */
	void (*down)(void *arg);
};

/*
 * Starts connecting at once (from the loop). hooks may be NULL; quiet: no
 * log lines (`smtpmuxd -s status` reports itself). cfg must outlive it.
 * tmp_dir: where the private socket of a rediss:// link's TLS bridge is
 * made (cluster_tls.h).
 */
struct cluster_link *link_new(struct event_base *base, struct evdns_base *dns,
    const struct cluster_cfg *cfg, const char *tmp_dir, const struct link_hooks *hooks,
    void *arg, bool quiet);
/* Answers every pending call NULL, then frees. */
void link_free(struct cluster_link *);

bool link_is_up(const struct cluster_link *);
/* Calls sent and not answered yet. */
unsigned link_pending(const struct cluster_link *);
/* "Redis 7.0.15", "Valkey 8.0.1", or "" before the first connection. */
const char *link_server(const struct cluster_link *);
/* Why the link is down ("" while up). */
const char *link_why(const struct cluster_link *);

/*
 * Sends a command (argv[0] is its name). 0: fn will be called exactly
 * once, later, from the loop. -1: the link is not up; fn is not called.
 */
int link_call(struct cluster_link *, int argc, const char **argv, const size_t *lens,
    link_reply_fn fn, void *arg);

/* EVALSHA of one of the scripts: argv holds its keys then its arguments
 * (numkeys of them keys). Same contract as link_call(). */
int link_script(struct cluster_link *, enum cluster_script, int numkeys, int argc,
    const char **argv, const size_t *lens, link_reply_fn fn, void *arg);

#endif

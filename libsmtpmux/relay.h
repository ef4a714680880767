/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_RELAY_H
#define SMTPMUX_RELAY_H

#include <time.h>

#include "config.h"
#include "runtime.h"
#include "upstream.h"

/*
 * Relaying one message: ask the user's selector for an order (with the
 * shared health view), then try the downstreams one after another with
 * upstream_start() until one accepts, all within limits.relay_deadline.
 * Each attempt is logged and reported to the health segment; over-quota
 * downstreams are skipped, and so are downstreams that cannot take the
 * message (8BITMIME, SIZE), without counting against them. The result is
 * what the client is told.
 */

struct relay_result {
	bool ok;
	int code;                        /* 250, or 451 / the last permanent code */
	char enhanced[16];               /* "2.0.0", "4.4.1", ... */
	char text[SMTP_REPLY_TEXT_MAX];  /* never contains credentials */
	char relay[128];                 /* name of the downstream that accepted */
	/* For the queue (delivery.c), when not ok: */
	bool temporary;                  /* some failure was temporary: worth retrying */
	time_t quota_reopens;            /* no attempt was made because every downstream's
	                                    quota window was full: when the earliest one
	                                    reopens; 0 otherwise */
	char failed_relay[64];           /* the downstream of the last failed attempt, or "" */
	char failed_text[SMTP_REPLY_TEXT_MAX];  /* its reply "451 4.7.0 ..." or why, masked */
	bool queued;                     /* ok: taken into the queue, not delivered yet */
};

struct relay;
typedef void (*relay_done_fn)(void *arg, const struct relay_result *res);

/*
 * Starts relaying msg (which must stay valid until done or cancel) for
 * user; client_addr (which must stay valid as long) is passed to the
 * selector and logged. done is called exactly once unless cancelled.
 */
struct relay *relay_start(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *msg, uint64_t size, const char *client_addr,
    relay_done_fn done, void *arg);

/*
 * Early connect (at the client's first accepted RCPT): orders the
 * downstreams now - the selector runs once per message, here, seeing the
 * envelope so far (env: sender, the first recipient; size: the client's
 * SIZE= or 0) - and starts logging in to the first one of that order, so
 * that only the transaction is left at the final dot. NULL when early
 * connect is off (no connection cache, or connection_cache.early_connect
 * false): relay_start() then does everything at the dot.
 */
struct relay *relay_prepare(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *env, uint64_t size, const char *client_addr);

/* Starts relaying msg with a prepared relay, as relay_start() would. */
struct relay *relay_begin(struct relay *, const struct upstream_msg *msg, uint64_t size,
    relay_done_fn done, void *arg);

/*
 * True once an attempt has written the final dot - the one in progress, or
 * an earlier one that failed after it: that downstream may deliver whatever
 * we do now, so the relay must run to its verdict rather than be cancelled
 * (at a reload or stop, or when the client hangs up), and the message must
 * not go to the queue as well. A message whose relay has not sent the dot
 * anywhere can still be taken back.
 */
bool relay_dot_sent(const struct relay *);

/* Cancels a prepared or started relay; done is not called. An early
 * session that is logged in goes back to the connection cache. */
void relay_cancel(struct relay *);

#endif

/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_UPSTREAM_H
#define SMTPMUX_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "msgbody.h"
#include "runtime.h"
#include "smtp_parse.h"
#include "smtp_reply.h"

/*
 * One delivery attempt to one downstream, as an asynchronous client state
 * machine in the worker's event loop: resolve (evdns), connect, greeting,
 * EHLO (HELO fallback), STARTTLS or implicit TLS as configured, EHLO again
 * over TLS, AUTH when the downstream has credentials (PLAIN or LOGIN with
 * a password, XOAUTH2 or OAUTHBEARER with the token the token helper keeps
 * in the token table; `auth:` or the EHLO offer decides), MAIL, RCPT for each
 * recipient, DATA (all pipelined when the downstream offers PIPELINING),
 * the dot-stuffed body, the final dot. Every step has a timeout, capped by
 * the relay's deadline. Credentials are never sent without TLS unless the
 * downstream is configured with `tls: none` or `tls: may` (STARTTLS when
 * offered, else plain). With `rewrite_from:` the envelope sender and the
 * header From of each message are rewritten (from_rewrite.h).
 *
 * Sessions outlive attempts when the runtime has a connection cache
 * (rt->cache): after a delivery the session waits there, logged in, for
 * the next message of the same account, which starts with RSET. A reused
 * session that turns out dead before its first reply is replaced by a
 * fresh one within the same attempt; the caller never sees it.
 */

struct upstream_msg {
	const char *id;                  /* queue id, for logs */
	const char *session;             /* the client's session id, for logs; may be NULL */
	const char *mail_from;           /* validated path, "" for <> */
	const char *const *rcpts;
	size_t n_rcpts;
	enum smtp_body body;             /* 8BITMIME: only to downstreams that offer it */
	struct msgbody *data;            /* unstuffed, CRLF line ends */
	bool from_queue;                 /* a retry by the queue runner (logged queued=yes) */
};

enum upstream_status {
	UPSTREAM_OK,                     /* the final dot was answered 2xx */
	UPSTREAM_TEMPFAIL,               /* 4xx, or a network/TLS/timeout failure */
	UPSTREAM_PERMFAIL                /* 5xx */
};

struct upstream_result {
	enum upstream_status status;
	bool throttle;                   /* the reply signalled a rate limit/quota */
	/* The downstream cannot take this message (no 8BITMIME for an 8-bit
	 * body, a SIZE limit below it): nothing was sent, and it is not the
	 * downstream's fault. code/enhanced are then the reply the client
	 * should get if no downstream can take it (554 5.6.3, 552 5.3.4). */
	bool skipped;
	const char *stage;               /* "connect", "tls", "greeting", "ehlo", "auth",
	                                    "mail", "rcpt", "data", "dot" */
	int code;                        /* downstream reply code; 0 if none */
	char enhanced[16];
	char text[SMTP_REPLY_TEXT_MAX];  /* reply text or a local description */
	unsigned latency_ms;             /* start of the attempt to final reply */
	unsigned conn_use;               /* this was the session's n-th transaction */
	char tls_desc[96];               /* "" when the session was not encrypted */
};

struct upstream;
typedef void (*upstream_done_fn)(void *arg, const struct upstream_result *res);

/*
 * Starts an attempt, on an idle session from rt->cache when one is there.
 * deadline_ms (runtime_now_ms() scale, 0: none) caps every wait. done is
 * called exactly once, from the event loop, unless the attempt is
 * cancelled.
 */
struct upstream *upstream_start(struct runtime *rt, const struct downstream_cfg *ds,
    const struct upstream_msg *msg, int64_t deadline_ms, upstream_done_fn done, void *arg);

/*
 * Early connect: a session without a message yet (connect, EHLO, STARTTLS,
 * AUTH), taken from the cache or opened now. It never reports anything; a
 * failure only marks it dead. Hand it a message with upstream_adopt(), or
 * give it back with upstream_release(). No health accounting happens here:
 * an early session that is never used is no attempt.
 */
struct upstream *upstream_prepare(struct runtime *rt, const struct downstream_cfg *ds);

/*
 * Turns an early session into an attempt for msg (as upstream_start would
 * have): from where its set-up has got to, or on a fresh session if it
 * died meanwhile. done is called once, from the loop.
 */
void upstream_adopt(struct upstream *, const struct upstream_msg *msg, int64_t deadline_ms,
    upstream_done_fn done, void *arg);

/* An early session that no message will use: into the cache if it is
 * logged in and the cache has room, else closed (QUIT where allowed). */
void upstream_release(struct upstream *);

/*
 * Health probe: connect, greeting, EHLO (and STARTTLS when configured),
 * QUIT. msg-less; done reports UPSTREAM_OK when the server answered well.
 * Probes never use the cache.
 */
struct upstream *upstream_probe(struct runtime *rt, const struct downstream_cfg *ds,
    upstream_done_fn done, void *arg);

/* True once the final dot has been written to the downstream: from then
 * on, cancelling could not stop a delivery, only hide it. */
bool upstream_dot_sent(const struct upstream *);

/* Aborts an attempt: closes its connection; done is not called. */
void upstream_cancel(struct upstream *);

/* At stop, and when a reload retires the worker: QUIT to every idle
 * session, and no session is cached any more. */
void upstream_close_idle(struct runtime *rt);

/* When the event loop is over: frees the sessions still saying QUIT and
 * those idle in the cache. */
void upstream_free_lingering(struct runtime *rt);

#endif

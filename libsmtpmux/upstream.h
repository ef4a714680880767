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
 * over TLS, AUTH PLAIN or LOGIN when the downstream has credentials, MAIL,
 * RCPT for each recipient, DATA, the dot-stuffed body, the final dot,
 * QUIT. Every step has a timeout. Credentials are never sent without TLS
 * unless the downstream is configured with `tls: none`.
 */

struct upstream_msg {
	const char *id;                  /* queue id, for logs */
	const char *mail_from;           /* validated path, "" for <> */
	const char *const *rcpts;
	size_t n_rcpts;
	enum smtp_body body;
	struct msgbody *data;            /* unstuffed, CRLF line ends */
};

enum upstream_status {
	UPSTREAM_OK,                     /* the final dot was answered 2xx */
	UPSTREAM_TEMPFAIL,               /* 4xx, or a network/TLS/timeout failure */
	UPSTREAM_PERMFAIL                /* 5xx */
};

struct upstream_result {
	enum upstream_status status;
	bool throttle;                   /* the reply signalled a rate limit/quota */
	const char *stage;               /* "connect", "tls", "greeting", "ehlo", "auth",
	                                    "mail", "rcpt", "data", "dot" */
	int code;                        /* downstream reply code; 0 if none */
	char enhanced[16];
	char text[SMTP_REPLY_TEXT_MAX];  /* reply text or a local description */
	unsigned latency_ms;             /* connect to final reply */
	char tls_desc[96];               /* "" when the session was not encrypted */
};

struct upstream;
typedef void (*upstream_done_fn)(void *arg, const struct upstream_result *res);

/* Starts an attempt; done is called exactly once, unless cancelled. */
struct upstream *upstream_start(struct runtime *rt, const struct downstream_cfg *ds,
    const struct upstream_msg *msg, upstream_done_fn done, void *arg);

/*
 * Health probe: connect, greeting, EHLO (and STARTTLS when configured),
 * QUIT. msg-less; done reports UPSTREAM_OK when the server answered well.
 */
struct upstream *upstream_probe(struct runtime *rt, const struct downstream_cfg *ds,
    upstream_done_fn done, void *arg);

/* Aborts an attempt: closes its connection; done is not called. */
void upstream_cancel(struct upstream *);

/* When the event loop is over: frees the attempts that had reported their
 * result and were still waiting for the reply to QUIT. */
void upstream_free_lingering(struct runtime *rt);

#endif

/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_CLIENT_H
#define SMTP_LOAD_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "opts.h"
#include "outq.h"
#include "script.h"
#include "stats.h"

/*
 * One SMTP client session as a state machine over buffers, without I/O:
 * it is fed the server's bytes with the time they arrived, queues what to
 * send on an outq, and says when to start TLS or close. The connection
 * code (conn.c) moves the bytes; the unit tests drive it with strings.
 *
 * greeting, EHLO, [STARTTLS, EHLO], [AUTH PLAIN | AUTH LOGIN], then per
 * message MAIL, RCPT..., DATA, the message and its dot, and QUIT at the
 * end. Without PIPELINING each command waits for the reply to the one
 * before; with it (--pipelining, and the server offers it) MAIL, the RCPTs
 * and DATA go in one write, and the message with its dot goes with the
 * next message's MAIL, RCPTs and DATA, or with QUIT (RFC 2920).
 *
 * A refused MAIL, every RCPT refused, or a refused DATA fails the message
 * and the session goes on (RSET, next message); a refused greeting, EHLO,
 * STARTTLS or AUTH fails the session (QUIT); 421 closes it.
 */

struct client_cfg {
	const struct load_script *script;
	unsigned per_session;           /* 0: unlimited */
	bool pipelining;                /* use it when offered */
	bool starttls;
};

struct client_hooks {
	/* Another message for this session? The first is claimed before connecting. */
	bool (*claim)(void *arg);
	/* A claimed message's outcome; latency from MAIL to the reply to its dot. */
	void (*message)(void *arg, bool ok, uint64_t latency_ns);
	/* A negative reply at a stage ("mail"...). */
	void (*reply_error)(void *arg, int code, const char *stage, const char *text);
	/* A failure without a reply code (here: garbage from the server). */
	void (*fault)(void *arg, enum load_fault, const char *detail);
};

enum client_step {
	CLIENT_WAIT,                    /* send what is queued, wait for more replies */
	CLIENT_START_TLS,               /* discard unread input, handshake, then client_tls_ready() */
	CLIENT_CLOSE                    /* close the connection, then client_end() */
};

/* Replies awaited at once: a dot, an RSET, MAIL, every RCPT and DATA. */
#define CLIENT_EXPECT_MAX (OPTS_MAX_RCPTS + 8)

struct client_msg {
	uint64_t mail_ns;               /* when MAIL was sent */
	unsigned rcpt_ok;
	unsigned next_rcpt;             /* without pipelining: the RCPT to send next */
	bool failed;
};

struct client {
	const struct client_cfg *cfg;
	const struct client_hooks *hooks;
	void *arg;
	struct outq *out;
	struct {
		uint8_t kind;
		uint8_t msg;            /* index in msgs[] */
	} expect[CLIENT_EXPECT_MAX];
	unsigned exp_head, exp_n;
	/* With pipelining, one message awaits the reply to its dot while the
	 * next one's MAIL, RCPTs and DATA are answered. */
	struct client_msg msgs[2];
	unsigned cur;                   /* the message begun last */
	unsigned claimed;               /* claimed, outcome not yet reported */
	unsigned started;               /* messages begun in this session */
	bool tls_done;
	bool pipelined;                 /* PIPELINING offered and wanted */
	bool failed;                    /* the session failed (greeting, EHLO, TLS, AUTH) */
	bool quit_answered;
};

/* A new session, its first message already claimed; it waits for the greeting. */
void client_start(struct client *, const struct client_cfg *, const struct client_hooks *,
    void *arg, struct outq *out);

/*
 * Consumes the complete replies at the start of buf (*used says how many
 * octets) and queues the commands they call for. now: monotonic ns.
 */
enum client_step client_input(struct client *, const char *buf, size_t len, uint64_t now,
    size_t *used);

/* The STARTTLS handshake is done: EHLO again. */
void client_tls_ready(struct client *);

/*
 * The connection is closed (after CLIENT_CLOSE, or on a failure the
 * caller has reported): claimed messages without an outcome fail.
 * Returns true when the session ran to the reply to QUIT and did not fail.
 */
bool client_end(struct client *);

#endif

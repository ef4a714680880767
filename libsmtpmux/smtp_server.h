/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SMTP_SERVER_H
#define SMTPMUX_SMTP_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include <event2/buffer.h>

#include "config.h"
#include "delivery.h"
#include "runtime.h"

/*
 * The inbound SMTP session: a state machine over two buffers. It reads
 * commands from `in`, appends replies to `out`, and asks its owner (the
 * worker's connection glue, or a unit test) to do everything that touches
 * a socket through struct smtp_session_io. It never blocks and never does
 * I/O itself, so it is tested without sockets.
 */

struct smtp_session;

struct smtp_session_io {
	/* New replies are in `out`: send them. */
	void (*flush)(void *ctx);
	/* The 220 to STARTTLS is in `out`: once it is flushed, discard any
	 * unread input and start the TLS handshake; then call
	 * smtp_session_tls_ready() (or the owner closes on failure). */
	void (*starttls)(void *ctx);
	/* Close the connection once `out` is flushed (after 221 or 421). */
	void (*close)(void *ctx);
	/* Stop (true) or resume (false) reading input, e.g. while a message is
	 * being relayed: pipelined commands wait in the socket. */
	void (*pause)(void *ctx, bool paused);
	/* Read timeout for the next input, in seconds. */
	void (*set_timeout)(void *ctx, unsigned seconds);
	/* One-shot timer, not restarted by input: call smtp_session_timer()
	 * after ms milliseconds; 0 cancels it. A new call replaces the last. */
	void (*set_timer)(void *ctx, unsigned ms);
	/* Delivering the message (delivery.h in the daemon: the relay, or the
	 * queue; tests may run real relays too): the session only keeps the
	 * handle. relay_cancel also drops a prepared one. */
	struct delivery *(*relay_start)(void *ctx, struct runtime *rt,
	    const struct user_cfg *user, const struct upstream_msg *msg, uint64_t size,
	    const char *client_addr, relay_done_fn done, void *arg);
	void (*relay_cancel)(void *ctx, struct delivery *);
	/* Optional (NULL: not offered). Early connect: relay_prepare at the
	 * first accepted RCPT (NULL when off), relay_begin at the final dot
	 * with what it prepared (see relay.h). */
	struct delivery *(*relay_prepare)(void *ctx, struct runtime *rt,
	    const struct user_cfg *user, const struct upstream_msg *env, uint64_t size,
	    const char *client_addr);
	struct delivery *(*relay_begin)(void *ctx, struct delivery *prepared,
	    const struct upstream_msg *msg, uint64_t size, relay_done_fn done, void *arg);
	/* Optional: delivery_dot_sent() (NULL: never). */
	bool (*relay_dot_sent)(void *ctx, const struct delivery *);
	/* Optional (NULL: never): delivery_defer_now() at the shutdown deadline. */
	bool (*relay_defer)(void *ctx, struct delivery *);
	/* Optional (NULL: a hash is checked right here, blocking). Checks a
	 * password against a crypt(3) hash off the event loop
	 * (passwd_offload.h); returns a ticket (never 0), or 0 when too many
	 * checks are pending (the client hears 454 4.7.0). The verdict comes
	 * through smtp_session_password_checked(), possibly before this
	 * returns. check_password_cancel: the verdict is no longer wanted. */
	uint64_t (*check_password)(void *ctx, const char *given, const char *stored);
	void (*check_password_cancel)(void *ctx, uint64_t ticket);
};

struct smtp_session_params {
	struct runtime *rt;              /* rt->cfg: users, limits, hostname */
	const struct listen_cfg *listener;
	const char *client_addr;         /* "127.0.0.1" */
	bool tls_active;                 /* implicit TLS: already encrypted */
	const char *tls_desc;            /* for logs, when tls_active */
};

struct smtp_session *smtp_session_new(const struct smtp_session_params *p,
    struct evbuffer *in, struct evbuffer *out,
    const struct smtp_session_io *io, void *ctx);

/* Sends the 220 greeting. */
void smtp_session_start(struct smtp_session *);

/* Processes as much buffered input as the current state allows. */
void smtp_session_input(struct smtp_session *);

/* The STARTTLS handshake finished: forget EHLO/AUTH state (RFC 3207 4.2). */
void smtp_session_tls_ready(struct smtp_session *, const char *tls_desc);

/* The verdict of io->check_password for ticket (stale tickets are
 * ignored): 235, or the failure path of a wrong password. */
void smtp_session_password_checked(struct smtp_session *, uint64_t ticket, bool match);

/* The read timeout expired: 421 4.4.2 and close. */
void smtp_session_timeout(struct smtp_session *);

/* The set_timer timer expired: the reply to a failed AUTH is due, or a
 * client took too long for a command line (limits.command_deadline) or is
 * sending its message too slowly (limits.min_data_rate): 421 4.4.2. */
void smtp_session_timer(struct smtp_session *);

/* The server is stopping: 421 4.3.2 now if idle, else after the current
 * transaction's reply. */
void smtp_session_shutdown(struct smtp_session *);

/* The client went away or the connection failed: cancel any relay (a
 * message not yet answered is not delivered... see smtp_server.c). */
void smtp_session_abort(struct smtp_session *);

/*
 * The client closed or reset its connection while its message is relayed
 * (the owner watches for that with reading paused). Before the final dot
 * has gone to a downstream, the relay is cancelled and the session closes
 * (421, for a client that only half-closed); after it, the relay runs to
 * its verdict, which is logged as what it is, and the session then closes.
 * Ignored in other states: a hang-up is then seen as EOF when reading.
 */
void smtp_session_hangup(struct smtp_session *);

/*
 * The shutdown grace (limits.shutdown_timeout) is over. Returns true when
 * the session is finishing a relay whose final dot was sent: it ends on
 * its own, within limits.relay_deadline, and the client hears the real
 * verdict; or when its message, not sent yet, goes to the queue instead
 * (relay_defer: the client hears 250 queued, then 421). Otherwise the
 * transaction in progress, if any, is given up, the client is told 421
 * and the session closes; false.
 */
bool smtp_session_deadline(struct smtp_session *);

/* True while a message is being received or relayed. */
bool smtp_session_busy(const struct smtp_session *);

/* The session's id for log lines. */
const char *smtp_session_id(const struct smtp_session *);

void smtp_session_free(struct smtp_session *);

#endif

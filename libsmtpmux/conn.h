/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CONN_H
#define SMTPMUX_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "tls.h"

/*
 * One non-blocking connection: a socket, its read/write events, an input
 * and an output evbuffer, and optionally a GnuTLS session. The SMTP code
 * reads conn_input() and appends to conn_output() and never knows whether
 * the bytes are encrypted.
 *
 * Callbacks run from the event loop, never inside a call to this API
 * (conn_flush_now() excepted). After on_error the connection is dead: the
 * owner must conn_free() it (possibly from inside the callback).
 * conn_free() from inside any callback is allowed.
 *
 * Written with the fewest system calls a relay can afford: read interest
 * stays armed while the connection lives, output goes out in one sendmsg
 * per batch from the loop, and epoll is asked for room only when the
 * socket is full.
 */

enum conn_event {
	CONN_EOF,             /* peer closed */
	CONN_TIMEOUT,         /* no input (or connect) within the timeout */
	CONN_IO_ERROR,        /* read/write/connect failed; detail has strerror */
	CONN_TLS_ERROR        /* handshake, verification or record error */
};

struct conn;

struct conn_cbs {
	void (*on_read)(struct conn *, void *arg);       /* new bytes in conn_input() */
	void (*on_flushed)(struct conn *, void *arg);    /* conn_output() fully written; may be NULL */
	void (*on_connected)(struct conn *, void *arg);  /* outbound connect done; may be NULL */
	void (*on_tls_ready)(struct conn *, void *arg);  /* handshake (and verification) done */
	void (*on_error)(struct conn *, void *arg, enum conn_event ev, const char *detail);
	/* The peer closed or reset the connection while reading is paused
	 * (EV_CLOSED, where the backend has it); may be NULL. Once per pause. */
	void (*on_hangup)(struct conn *, void *arg);
};

/* Wraps an accepted, connected socket (made non-blocking here). */
struct conn *conn_new(struct event_base *base, int fd,
    const struct conn_cbs *cbs, void *arg);

/* Wraps a socket accept4() made non-blocking, with the peer address it
 * returned (may be NULL): no system call. */
struct conn *conn_accepted(struct event_base *base, int fd, const struct sockaddr *peer,
    socklen_t peerlen, const struct conn_cbs *cbs, void *arg);

/* Starts a non-blocking connect; on_connected or on_error follows. */
struct conn *conn_connect(struct event_base *base, const struct sockaddr *sa,
    socklen_t salen, unsigned timeout_ms, const struct conn_cbs *cbs, void *arg);

void conn_free(struct conn *);

/* Changes the callback argument (e.g. when ownership moves). */
void conn_set_cbs(struct conn *, const struct conn_cbs *cbs, void *arg);

/* Read timeout: on_error(CONN_TIMEOUT) after ms without input; 0 disables. */
void conn_set_timeout(struct conn *, unsigned ms);

struct evbuffer *conn_input(struct conn *);
struct evbuffer *conn_output(struct conn *);

/* Writes whatever is in conn_output(); call after appending to it. The
 * write happens from the loop, once, for everything appended until then. */
void conn_flush(struct conn *);
int conn_printf(struct conn *, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Writes what it can of conn_output() right away, without waiting for the
 * loop, e.g. a last QUIT before the process exits. Callbacks may run.
 */
void conn_flush_now(struct conn *);

/*
 * Stops / restarts reading from the peer (back-pressure). What the peer
 * sends meanwhile waits in the socket. The read interest itself is only
 * dropped once the peer does send while paused, so a pause in which the
 * peer waits for our reply costs no system call; on_hangup tells of a
 * peer that closes meanwhile.
 */
void conn_pause_read(struct conn *);
void conn_resume_read(struct conn *);

/*
 * Back-pressure, for a peer that sends without reading our replies or
 * faster than its input is consumed (0 turns a limit off, the default).
 * Reading stops while conn_input() holds in_max octets, until the owner
 * drains some, and while conn_output() holds out_high octets, until it is
 * down to out_low: such a peer fills its own socket buffers, not our
 * memory. When the output is down to out_low and input is still buffered,
 * on_read is called for it again (no new bytes need to arrive).
 */
void conn_set_limits(struct conn *, size_t in_max, size_t out_high, size_t out_low);

/* Bytes already written to conn_output() but not yet sent. */
size_t conn_pending_output(struct conn *);

/* How often interest in the socket changed (epoll_ctl), for tests and
 * benchmarks: a connection that only talks should not change it. */
unsigned long conn_interest_changes(const struct conn *);

/*
 * Starts a TLS handshake as server. Whatever is in conn_input() was sent
 * before the handshake and is discarded (CVE-2011-0411); so is anything
 * read later that precedes the ClientHello. Call once the 220 reply to
 * STARTTLS is flushed (on_flushed), or right away for implicit TLS.
 */
int conn_start_tls_server(struct conn *, struct tls_server_ctx *);

/*
 * Starts a TLS handshake as client: sends SNI for servername (unless it is
 * an IP literal), verifies the certificate against it per the context, and
 * resumes a previous session with the same context when possible.
 * conn_input() is discarded (response injection).
 */
int conn_start_tls_client(struct conn *, struct tls_client_ctx *, const char *servername);

bool conn_is_tls(const struct conn *);
/* "TLSv1.3 cipher=AES-256-GCM" or "" for logs; resumed sessions say so. */
const char *conn_tls_desc(const struct conn *);

/* Peer address as text ("127.0.0.1"), empty if unknown. */
const char *conn_peer(const struct conn *);

#endif

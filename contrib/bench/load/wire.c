/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "wire.h"

/* Up to this much queued output is sent corked: few TLS records, one write. */
#define WIRE_CORK_MAX (64 * 1024)
/* Plaintext per TLS record when a large message goes out uncorked. */
#define WIRE_TLS_CHUNK 16384
/* Non-fatal GnuTLS results (warning alerts) tolerated in one handshake step. */
#define WIRE_HS_RETRIES 8

static void wire_on_read(evutil_socket_t, short, void *);
static void wire_on_write(evutil_socket_t, short, void *);

/* --- the client's hooks: counting ------------------------------------------- */

/*
 * A counted run with --per-session N gives each session its N messages
 * when it starts (the last sessions may get fewer), so that sessions do
 * carry N messages; otherwise each message is taken when it is due, which
 * keeps the sessions busy to the end and lets --duration stop them.
 */
static unsigned
wire_batch(const struct wire *w)
{
	const struct load_opts *o = w->loop->sh->opts;

	return o->messages != 0 && o->duration == 0 && o->per_session > 1 ? o->per_session : 1;
}

static bool
hook_claim(void *arg)
{
	struct wire *w = arg;

	if (w->reserved > 0) {
		w->reserved--;
		return true;
	}
	return wire_batch(w) == 1 && loop_take(w->loop, 1) == 1;
}

static void
hook_message(void *arg, bool ok, uint64_t latency_ns)
{
	struct wire *w = arg;

	if (ok) {
		w->loop->stats.msgs_ok++;
		hist_add(&w->loop->stats.msg_latency, latency_ns);
	} else {
		w->loop->stats.msgs_failed++;
	}
}

static void
hook_reply_error(void *arg, int code, const char *stage, const char *text)
{
	struct wire *w = arg;

	stats_reply_error(&w->loop->stats, code, stage, text);
}

static void
hook_fault(void *arg, enum load_fault f, const char *detail)
{
	struct wire *w = arg;

	stats_fault(&w->loop->stats, f, detail);
}

static const struct client_hooks wire_hooks = {
	.claim = hook_claim,
	.message = hook_message,
	.reply_error = hook_reply_error,
	.fault = hook_fault,
};

/* --- the session's end ------------------------------------------------------ */

static void
wire_close(struct wire *w)
{
	event_del(&w->ev_read);
	if (w->write_armed)
		event_del(&w->ev_write);
	w->write_armed = false;
	if (w->tls != NULL) {
		gnutls_deinit(w->tls);
		w->tls = NULL;
	}
	if (w->fd >= 0)
		close(w->fd);
	w->fd = -1;
	w->state = WIRE_IDLE;
}

/* Closes the session, counts it, and starts the next one on this wire. */
static void
wire_finish(struct wire *w)
{
	struct load_stats *st = &w->loop->stats;
	bool clean = w->cl.quit_answered;

	/* One try at close_notify after a clean QUIT, as well-behaved clients do. */
	if (clean && w->tls != NULL)
		(void)gnutls_bye(w->tls, GNUTLS_SHUT_WR);
	wire_close(w);
	loop_give_back(w->loop, w->reserved);
	w->reserved = 0;
	if (w->cl.pipelined)
		st->sessions_pipelined++;
	if (client_end(&w->cl)) {
		st->sessions_ok++;
		/* the last read was the reply to QUIT */
		hist_add(&st->session_latency, w->last_io_ns - w->started_ns);
	} else {
		st->sessions_failed++;
	}
	if (!wire_start(w))
		loop_wire_idle(w->loop);
}

static void
wire_fail(struct wire *w, enum load_fault f, const char *detail)
{
	stats_fault(&w->loop->stats, f, detail);
	w->cl.failed = true;
	wire_finish(w);
}

/* A socket error: before the server said anything it is a failed connect. */
static void
wire_fail_errno(struct wire *w, int err, const char *what)
{
	char detail[STATS_SAMPLE_LEN];
	bool connecting = !w->got_bytes && (err == ECONNREFUSED || err == ENETUNREACH ||
	    err == EHOSTUNREACH || err == ETIMEDOUT || err == EADDRNOTAVAIL || err == EMFILE ||
	    err == ENFILE);

	snprintf(detail, sizeof(detail), "%s: %s", connecting ? "connect" : what, strerror(err));
	wire_fail(w, connecting ? FAULT_CONNECT : FAULT_RESET, detail);
}

static void
wire_fail_tls(struct wire *w, int r, int sys_errno)
{
	char detail[STATS_SAMPLE_LEN];

	if ((r == GNUTLS_E_PUSH_ERROR || r == GNUTLS_E_PULL_ERROR) && sys_errno != 0) {
		wire_fail_errno(w, sys_errno, "tls");
		return;
	}
	load_tls_strerror(w->tls, r, detail, sizeof(detail));
	wire_fail(w, FAULT_TLS, detail);
}

/* --- writing ------------------------------------------------------------------ */

static void
wire_want_write(struct wire *w)
{
	if (!w->write_armed) {
		event_add(&w->ev_write, NULL);
		w->write_armed = true;
	}
}

/* Returns false when the session ended. */
static bool
wire_flush_plain(struct wire *w)
{
	struct msghdr msg;
	ssize_t n;

	while (!outq_empty(&w->out)) {
		int iovcnt;

		memset(&msg, 0, sizeof(msg));
		msg.msg_iov = outq_iov(&w->out, &iovcnt);
		msg.msg_iovlen = (size_t)iovcnt;
		n = sendmsg(w->fd, &msg, MSG_NOSIGNAL);
		if (n >= 0) {
			outq_consume(&w->out, (size_t)n);
			continue;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			wire_want_write(w);
			return true;
		}
		wire_fail_errno(w, errno, "write");
		return false;
	}
	return true;
}

/* GnuTLS wants to be called again once the socket is ready as it says. */
static void
wire_tls_again(struct wire *w)
{
	if (gnutls_record_get_direction(w->tls) == 1)
		wire_want_write(w);
	/* else the persistent read event will call us */
}

/* Sends what GnuTLS holds corked. Returns false when the session ended. */
static bool
wire_uncork(struct wire *w)
{
	int r = gnutls_record_uncork(w->tls, 0);

	if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
		wire_tls_again(w);
		return true;
	}
	w->tls_uncorking = false;
	if (r < 0) {
		wire_fail_tls(w, r, errno);
		return false;
	}
	return true;
}

/*
 * A batch of commands goes corked, as one write of few records; a large
 * message goes record by record, so GnuTLS never holds a copy of it.
 */
static bool
wire_flush_tls(struct wire *w)
{
	ssize_t n;

	if (w->tls_uncorking) {
		if (!wire_uncork(w))
			return false;
		if (w->tls_uncorking)
			return true;
	}
	while (!outq_empty(&w->out)) {
		size_t total = outq_pending(&w->out);
		struct iovec *seg;
		int nseg;

		seg = outq_iov(&w->out, &nseg);
		if (total <= WIRE_CORK_MAX) {
			gnutls_record_cork(w->tls);
			for (int i = 0; i < nseg; i++)
				(void)gnutls_record_send(w->tls, seg[i].iov_base, seg[i].iov_len);
			outq_consume(&w->out, total);
			w->tls_uncorking = true;
			return wire_uncork(w);
		}
		/* After E_AGAIN GnuTLS must be offered the same data again: it is. */
		n = gnutls_record_send(w->tls, seg[0].iov_base,
		    seg[0].iov_len < WIRE_TLS_CHUNK ? seg[0].iov_len : WIRE_TLS_CHUNK);
		if (n > 0) {
			outq_consume(&w->out, (size_t)n);
			continue;
		}
		if (n == GNUTLS_E_INTERRUPTED)
			continue;
		if (n == GNUTLS_E_AGAIN) {
			wire_tls_again(w);
			return true;
		}
		wire_fail_tls(w, (int)n, errno);
		return false;
	}
	return true;
}

static bool
wire_flush(struct wire *w)
{
	return w->tls != NULL ? wire_flush_tls(w) : wire_flush_plain(w);
}

/* --- reading ------------------------------------------------------------------ */

/* Hands the buffered replies to the client and acts on what it says. False: session over. */
static bool
wire_process(struct wire *w)
{
	enum client_step step;
	size_t used;

	step = client_input(&w->cl, w->in, w->in_len, w->last_io_ns, &used);
	memmove(w->in, w->in + used, w->in_len - used);
	w->in_len -= used;
	switch (step) {
	case CLIENT_WAIT:
		if (w->in_len == sizeof(w->in)) {
			wire_fail(w, FAULT_PROTOCOL, "a reply longer than the input buffer (4096 octets)");
			return false;
		}
		return wire_flush(w);
	case CLIENT_START_TLS:
		/* Anything after the 220 was sent in clear: never read it as if under TLS. */
		w->in_len = 0;
		if (load_tls_session(w->loop->sh->tls, w->fd, &w->tls) < 0) {
			w->tls = NULL;
			wire_fail(w, FAULT_TLS, "cannot create a TLS session");
			return false;
		}
		w->state = WIRE_HANDSHAKE;
		return true;             /* the caller runs the handshake */
	case CLIENT_CLOSE:
		wire_finish(w);
		return false;
	}
	return false;
}

static void wire_handshake(struct wire *);

/* One recv per readiness event: a short read means the socket is drained. */
static void
wire_read_plain(struct wire *w)
{
	ssize_t n = recv(w->fd, w->in + w->in_len, sizeof(w->in) - w->in_len, 0);

	if (n > 0) {
		w->got_bytes = true;
		w->in_len += (size_t)n;
		w->last_io_ns = load_now_ns();
		if (wire_process(w) && w->state == WIRE_HANDSHAKE)
			wire_handshake(w);
		return;
	}
	if (n == 0)
		wire_fail(w, FAULT_CLOSED, "the server closed the connection");
	else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
		wire_fail_errno(w, errno, "read");
}

static void
wire_read_tls(struct wire *w)
{
	for (;;) {
		ssize_t n = gnutls_record_recv(w->tls, w->in + w->in_len, sizeof(w->in) - w->in_len);

		if (n > 0) {
			w->got_bytes = true;
			w->in_len += (size_t)n;
			w->last_io_ns = load_now_ns();
			if (!wire_process(w))
				return;
			/* Decrypted bytes GnuTLS still holds would not wake the socket. */
			if (gnutls_record_check_pending(w->tls) == 0)
				return;
			continue;
		}
		if (n == GNUTLS_E_AGAIN)
			return;
		if (n == 0 || n == GNUTLS_E_PREMATURE_TERMINATION) {
			wire_fail(w, FAULT_CLOSED, "the server closed the connection");
			return;
		}
		if (!gnutls_error_is_fatal((int)n))
			continue;
		wire_fail_tls(w, (int)n, errno);
		return;
	}
}

static void
wire_handshake(struct wire *w)
{
	int r, tries = 0;

	do
		r = gnutls_handshake(w->tls);
	while (r < 0 && r != GNUTLS_E_AGAIN && !gnutls_error_is_fatal(r) && ++tries < WIRE_HS_RETRIES);
	if (r == GNUTLS_E_AGAIN) {
		wire_tls_again(w);
		return;
	}
	if (r < 0) {
		wire_fail_tls(w, r, errno);
		return;
	}
	w->state = WIRE_OPEN;
	w->last_io_ns = load_now_ns();
	/* STARTTLS: EHLO again. Implicit TLS: the greeting comes next. */
	if (w->loop->sh->opts->tls == OPTS_TLS_STARTTLS) {
		client_tls_ready(&w->cl);
		if (!wire_flush(w))
			return;
	}
	if (gnutls_record_check_pending(w->tls) > 0)
		wire_read_tls(w);
}

static void
wire_on_read(evutil_socket_t fd, short what, void *arg)
{
	struct wire *w = arg;

	if (w->connect_errno != 0) {
		wire_fail_errno(w, w->connect_errno, "connect");
		return;
	}
	if (w->state == WIRE_HANDSHAKE) {
		wire_handshake(w);
		return;
	}
	if (w->tls == NULL) {
		wire_read_plain(w);
		return;
	}
	/* A record send may be waiting for the socket to be readable. */
	if ((w->tls_uncorking || !outq_empty(&w->out)) && !wire_flush(w))
		return;
	wire_read_tls(w);
}

static void
wire_on_write(evutil_socket_t fd, short what, void *arg)
{
	struct wire *w = arg;

	w->write_armed = false;
	/* A long message upload is progress too: it must not look like a silent server. */
	w->last_io_ns = load_now_ns();
	if (w->state == WIRE_HANDSHAKE)
		wire_handshake(w);
	else if (w->state == WIRE_OPEN)
		(void)wire_flush(w);
}

/* --- the session's start ----------------------------------------------------- */

void
wire_init(struct wire *w, struct load_loop *loop)
{
	memset(w, 0, sizeof(*w));
	w->loop = loop;
	w->fd = -1;
}

/*
 * A non-blocking connect. The greeting's arrival tells the connection is
 * up, so only the read event is armed; implicit TLS waits for the socket
 * to be writable to send its ClientHello. A failure here is reported from
 * the loop, like any other (and never recursively from wire_finish()).
 */
static void
wire_connect(struct wire *w)
{
	const struct load_shared *sh = w->loop->sh;
	int one = 1;

	w->fd = socket(sh->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (w->fd < 0) {
		w->connect_errno = errno;
	} else {
		/* The message's last segment must not wait for a delayed ACK. */
		(void)setsockopt(w->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (connect(w->fd, (const struct sockaddr *)&sh->addr, sh->addrlen) < 0 &&
		    errno != EINPROGRESS)
			w->connect_errno = errno;
	}
	event_assign(&w->ev_read, w->loop->base, w->fd, EV_READ | EV_PERSIST, wire_on_read, w);
	event_assign(&w->ev_write, w->loop->base, w->fd, EV_WRITE, wire_on_write, w);
	if (w->connect_errno != 0) {
		event_active(&w->ev_read, EV_READ, 0);
		return;
	}
	event_add(&w->ev_read, NULL);
	if (sh->opts->tls != OPTS_TLS_IMPLICIT)
		return;
	if (load_tls_session(sh->tls, w->fd, &w->tls) < 0) {
		w->tls = NULL;
		w->connect_errno = ENOMEM;
		event_active(&w->ev_read, EV_READ, 0);
		return;
	}
	w->state = WIRE_HANDSHAKE;
	wire_want_write(w);
}

bool
wire_start(struct wire *w)
{
	unsigned n = loop_take(w->loop, wire_batch(w));

	if (n == 0)
		return false;
	w->reserved = n - 1;
	w->state = WIRE_OPEN;
	w->connect_errno = 0;
	w->got_bytes = false;
	w->in_len = 0;
	w->tls_uncorking = false;
	outq_reset(&w->out);
	w->started_ns = w->last_io_ns = load_now_ns();
	client_start(&w->cl, &w->loop->sh->client_cfg, &wire_hooks, w, &w->out);
	wire_connect(w);
	return true;
}

void
wire_check_timeout(struct wire *w, uint64_t now)
{
	char detail[64];
	unsigned ms = w->loop->sh->opts->timeout_ms;

	if (w->state == WIRE_IDLE || now - w->last_io_ns < (uint64_t)ms * 1000000)
		return;
	snprintf(detail, sizeof(detail), "no reply within %u ms", ms);
	wire_fail(w, FAULT_TIMEOUT, detail);
}

void
wire_cleanup(struct wire *w)
{
	if (w->state != WIRE_IDLE || w->fd >= 0)
		wire_close(w);
}

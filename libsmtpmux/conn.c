/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <event2/util.h>
#include <gnutls/gnutls.h>

#include "buffer_wipe.h"
#include "conn.h"
#include "tls_session.h"

/*
 * A connection object in the manner of OpenSMTPD's ioev.c: libevent has no
 * GnuTLS bufferevent, so this drives gnutls_record_recv/send itself and
 * re-arms read or write interest from gnutls_record_get_direction().
 *
 * System calls are the cost of a relay, so interest in the socket changes
 * as rarely as it can: read interest stays armed for the life of the
 * connection (a pause only drops it once the peer actually sends while
 * paused), and write interest is armed only while the socket is full.
 * Output is written from the loop (an event_active, no epoll_ctl) once the
 * callbacks that queued it have returned, so each batch of replies is one
 * sendmsg. A read takes what one readv gets; only a read that filled the
 * space it was given is followed by another.
 *
 * Callbacks only ever run from the three event handlers below, each of
 * which counts itself in c->depth: conn_free() from inside a callback only
 * marks the connection, and the outermost handler frees it on the way out.
 */

/* Per readiness event, so that one busy peer cannot starve the others. */
#define CONN_IO_BUDGET  (256 * 1024)
/* One TLS record's worth of plaintext. */
#define CONN_CHUNK      16384
/* First read of a connection; a read that fills its space doubles the next
 * one, up to CONN_READ_MAX. SMTP commands are small; message data is not. */
#define CONN_READ_MIN   4096
#define CONN_READ_MAX   (64 * 1024)
/* A body in memory is a chain of ~4 KiB pieces: 64 of them go in one
 * sendmsg (a write in two parts would wait on the peer's delayed ACK). */
#define CONN_IOV_MAX    64
#define CONN_ERRLEN     512
/* Non-fatal GnuTLS results (warning alerts) tolerated in one handshake step. */
#define CONN_HS_RETRIES 8

enum conn_state {
	CONN_S_CONNECTING,
	CONN_S_HANDSHAKE,
	CONN_S_OPEN,
	CONN_S_DEAD                     /* on_error delivered; waits for conn_free() */
};

enum conn_io {
	CONN_IO_AGAIN,                  /* the socket has no more for now */
	CONN_IO_MORE,                   /* budget spent; come back next loop */
	CONN_IO_DONE,                   /* EOF on read; empty output on write */
	CONN_IO_FAIL_SYS,
	CONN_IO_FAIL_TLS
};

struct conn {
	struct event_base *base;
	int fd;
	enum conn_state state;
	struct conn_cbs cbs;
	void *arg;

	struct event *ev_read;
	struct event *ev_write;
	struct event *ev_timer;
	struct event *ev_closed;        /* EV_CLOSED while parked, for on_hangup */
	struct event *ev_flush;         /* no fd: runs a due write from the loop */
	bool read_armed;
	bool write_armed;
	bool closed_armed;
	bool write_blocked;             /* the socket took less than offered */
	unsigned long interest_changes; /* event_add/event_del on the socket */
	size_t read_size;               /* space offered to the next readv */
	unsigned timeout_ms;

	struct evbuffer *in;
	struct evbuffer *out;
	bool read_paused;
	bool read_parked;               /* paused, and the peer sent: interest dropped */

	/* Back-pressure (conn_set_limits); 0: no limit. */
	size_t in_max;
	size_t out_high, out_low;
	struct evbuffer_cb_entry *in_cb;    /* notices the owner draining `in` */
	bool in_full;                   /* reading stopped: `in` reached in_max */
	bool out_full;                  /* reading stopped: `out` reached out_high */
	bool input_owed;                /* on_read owed for input already buffered */
	bool flush_wanted;              /* on_flushed owed once out is empty */
	bool eof_seen;                  /* EOF read while paused: told on resume */
	bool eof_after_flush;           /* EOF read with output queued: told once it is out */
	int connect_errno;              /* connect() failed at once; told from the loop */

	unsigned depth;                 /* our handlers on the stack */
	bool freed;                     /* conn_free() called inside a callback */

	gnutls_session_t tls;
	bool hs_wants_write;
	bool recv_wants_write;          /* record_recv blocked on a write */
	bool send_wants_read;           /* record_send blocked on a read */
	size_t send_len;                /* record_send to repeat after E_AGAIN */
	struct tls_client_ctx *resume_ctx;  /* set until the session is remembered */
	char *servername;
	char tls_desc[96];

	char peer[INET6_ADDRSTRLEN];
	char peer_port[8];
};

static void conn_on_readable(evutil_socket_t, short, void *);
static void conn_on_writable(evutil_socket_t, short, void *);
static void conn_on_timeout(evutil_socket_t, short, void *);
static void conn_on_closed(evutil_socket_t, short, void *);
static void conn_on_flush(evutil_socket_t, short, void *);

static bool
conn_gone(const struct conn *c)
{
	return c->freed || c->state == CONN_S_DEAD;
}

static void
conn_arm(struct conn *c, struct event *ev, bool *armed, bool want)
{
	if (want == *armed)
		return;
	if (want)
		event_add(ev, NULL);
	else
		event_del(ev);
	*armed = want;
	c->interest_changes++;
}

/* Octets conn_input() may still take before reading stops. */
static size_t
conn_input_room(const struct conn *c)
{
	size_t len = evbuffer_get_length(c->in);

	if (c->in_max == 0)
		return SIZE_MAX;
	return len < c->in_max ? c->in_max - len : 0;
}

/* The owner takes input now: not paused by it, and its replies are not
 * piling up unread. */
static bool
conn_may_read(const struct conn *c)
{
	return !c->read_paused && !c->out_full;
}

/* Derives read and write interest from the state; called after any change. */
static void
conn_update_events(struct conn *c)
{
	bool rd = false, wr = false;

	if (c->out_high > 0 && evbuffer_get_length(c->out) >= c->out_high)
		c->out_full = true;

	switch (c->state) {
	case CONN_S_CONNECTING:
		wr = true;
		break;
	case CONN_S_HANDSHAKE:
		wr = c->hs_wants_write;
		rd = !wr;
		break;
	case CONN_S_OPEN:
		/* A pause alone keeps the interest: most peers wait for our
		 * answer and never make it fire (see conn_park_read()). */
		rd = (!c->out_full && !c->read_parked && !c->eof_seen &&
		    conn_input_room(c) > 0) || c->send_wants_read;
		wr = (c->write_blocked && (c->flush_wanted || c->eof_after_flush) &&
		    !c->send_wants_read) || c->recv_wants_write;
		break;
	case CONN_S_DEAD:
		break;
	}
	if (c->freed)
		rd = wr = false;
	conn_arm(c, c->ev_read, &c->read_armed, rd);
	conn_arm(c, c->ev_write, &c->write_armed, wr);
	/* The hang-up watch is armed only by conn_park_read(). */
	if (c->closed_armed && (c->freed || c->state != CONN_S_OPEN || !c->read_parked))
		conn_arm(c, c->ev_closed, &c->closed_armed, false);
}

/*
 * Output is due: written from the loop, after the callbacks that queued
 * it, in one go - without asking epoll whether the socket has room, which
 * it nearly always has. Only a socket that took less than offered is
 * watched for room (write_blocked).
 */
static void
conn_kick_write(struct conn *c)
{
	if (c->state != CONN_S_OPEN || conn_gone(c))
		return;
	if (c->write_blocked || c->send_wants_read)
		conn_update_events(c);
	else
		event_active(c->ev_flush, EV_TIMEOUT, 0);
}

/*
 * (Re)starts the timer. Connect and handshake are timed as a whole, from
 * their start; an open connection by inactivity, so this runs on every
 * read or write that moved bytes. A paused reader is waiting on us, not
 * on the peer, and is not timed.
 */
static void
conn_touch(struct conn *c)
{
	struct timeval tv;

	if (c->timeout_ms == 0 || c->state == CONN_S_DEAD || c->freed ||
	    (c->state == CONN_S_OPEN && c->read_paused)) {
		evtimer_del(c->ev_timer);
		return;
	}
	tv.tv_sec = c->timeout_ms / 1000;
	tv.tv_usec = (c->timeout_ms % 1000) * 1000;
	evtimer_add(c->ev_timer, &tv);
}

static void conn_fail(struct conn *, enum conn_event, const char *, ...)
    __attribute__((format(printf, 3, 4)));

static void
conn_fail(struct conn *c, enum conn_event ev, const char *fmt, ...)
{
	char detail[CONN_ERRLEN + 64];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	c->state = CONN_S_DEAD;
	evtimer_del(c->ev_timer);
	conn_update_events(c);
	c->cbs.on_error(c, c->arg, ev, detail);
}

/* sys_errno: errno right after the failed GnuTLS call. */
static void
conn_tls_strerror(struct conn *c, int r, int sys_errno, char *err, size_t errlen)
{
	gnutls_datum_t out;
	unsigned status;

	if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
		status = gnutls_session_get_verify_cert_status(c->tls);
		if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
			char *text = (char *)out.data;
			size_t n = strlen(text);

			/* GnuTLS ends each sentence with a blank, the last one too. */
			while (n > 0 && text[n - 1] == ' ')
				text[--n] = '\0';
			snprintf(err, errlen, "certificate verify failed: %s", text);
			gnutls_free(out.data);
			return;
		}
	}
	if (r == GNUTLS_E_FATAL_ALERT_RECEIVED) {
		snprintf(err, errlen, "TLS alert received: %s",
		    gnutls_alert_get_name(gnutls_alert_get(c->tls)));
		return;
	}
	/* "Error in the pull function" alone does not say the peer reset. */
	if ((r == GNUTLS_E_PULL_ERROR || r == GNUTLS_E_PUSH_ERROR) && sys_errno != 0) {
		snprintf(err, errlen, "%s (%s)", gnutls_strerror(r), strerror(sys_errno));
		return;
	}
	snprintf(err, errlen, "%s", gnutls_strerror(r));
}

static struct conn *
conn_alloc(struct event_base *base, int fd, const struct conn_cbs *cbs, void *arg)
{
	struct conn *c;

	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return NULL;
	c->base = base;
	c->fd = fd;
	c->cbs = *cbs;
	c->arg = arg;
	c->state = CONN_S_OPEN;
	c->read_size = CONN_READ_MIN;
	c->in = evbuffer_new();
	c->out = evbuffer_new();
	c->ev_read = event_new(base, fd, EV_READ | EV_PERSIST, conn_on_readable, c);
	c->ev_write = event_new(base, fd, EV_WRITE | EV_PERSIST, conn_on_writable, c);
	c->ev_timer = evtimer_new(base, conn_on_timeout, c);
	c->ev_flush = event_new(base, -1, 0, conn_on_flush, c);
	if (c->in == NULL || c->out == NULL || c->ev_read == NULL ||
	    c->ev_write == NULL || c->ev_timer == NULL || c->ev_flush == NULL) {
		c->fd = -1;                     /* the caller keeps its socket */
		conn_free(c);
		return NULL;
	}
	return c;
}

static void
conn_set_peer(struct conn *c, const struct sockaddr *sa, socklen_t salen)
{
	if (sa->sa_family != AF_INET && sa->sa_family != AF_INET6)
		return;
	if (getnameinfo(sa, salen, c->peer, sizeof(c->peer), c->peer_port,
	    sizeof(c->peer_port), NI_NUMERICHOST | NI_NUMERICSERV) != 0)
		c->peer[0] = c->peer_port[0] = '\0';
}

struct conn *
conn_new(struct event_base *base, int fd, const struct conn_cbs *cbs, void *arg)
{
	struct sockaddr_storage ss;
	socklen_t sslen = sizeof(ss);

	if (evutil_make_socket_nonblocking(fd) < 0)
		return NULL;
	if (getpeername(fd, (struct sockaddr *)&ss, &sslen) < 0)
		sslen = 0;
	return conn_accepted(base, fd, sslen > 0 ? (struct sockaddr *)&ss : NULL, sslen, cbs, arg);
}

struct conn *
conn_accepted(struct event_base *base, int fd, const struct sockaddr *peer, socklen_t peerlen,
    const struct conn_cbs *cbs, void *arg)
{
	struct conn *c = conn_alloc(base, fd, cbs, arg);

	if (c == NULL)
		return NULL;
	if (peer != NULL && peerlen > 0)
		conn_set_peer(c, peer, peerlen);
	conn_update_events(c);
	return c;
}

struct conn *
conn_connect(struct event_base *base, const struct sockaddr *sa, socklen_t salen,
    unsigned timeout_ms, const struct conn_cbs *cbs, void *arg)
{
	struct conn *c;
	int fd, one = 1;

	fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return NULL;
	/* Commands and the end of a message are small writes that must not
	 * wait for the ACK of what went before (Nagle with delayed ACK: 40 ms). */
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c = conn_alloc(base, fd, cbs, arg);
	if (c == NULL) {
		close(fd);
		return NULL;
	}
	conn_set_peer(c, sa, salen);
	c->state = CONN_S_CONNECTING;
	c->timeout_ms = timeout_ms;
	/* Even an immediate refusal is reported through on_error, as promised. */
	if (connect(fd, sa, salen) < 0 && errno != EINPROGRESS) {
		c->connect_errno = errno;
		event_active(c->ev_write, EV_WRITE, 0);
	}
	conn_touch(c);
	conn_update_events(c);
	return c;
}

static void
conn_destroy(struct conn *c)
{
	if (c->tls != NULL) {
		/* One try at close_notify; a non-blocking close never waits. */
		if (c->state == CONN_S_OPEN)
			gnutls_bye(c->tls, GNUTLS_SHUT_WR);
		gnutls_deinit(c->tls);
	}
	if (c->ev_read != NULL)
		event_free(c->ev_read);
	if (c->ev_write != NULL)
		event_free(c->ev_write);
	if (c->ev_timer != NULL)
		event_free(c->ev_timer);
	if (c->ev_closed != NULL)
		event_free(c->ev_closed);
	if (c->ev_flush != NULL)
		event_free(c->ev_flush);
	if (c->in != NULL) {
		if (c->in_cb != NULL)
			evbuffer_remove_cb_entry(c->in, c->in_cb);
		buffer_wipe_all(c->in);         /* unread input may be an AUTH line */
		evbuffer_free(c->in);
	}
	if (c->out != NULL)
		evbuffer_free(c->out);
	if (c->fd >= 0)
		close(c->fd);
	free(c->servername);
	free(c);
}

void
conn_free(struct conn *c)
{
	if (c == NULL)
		return;
	if (c->depth == 0) {
		conn_destroy(c);
		return;
	}
	c->freed = true;
	evtimer_del(c->ev_timer);
	conn_update_events(c);
}

static void
conn_enter(struct conn *c)
{
	c->depth++;
}

static void
conn_leave(struct conn *c)
{
	if (--c->depth > 0)
		return;
	if (c->freed)
		conn_destroy(c);
	else
		conn_update_events(c);
}

void
conn_set_cbs(struct conn *c, const struct conn_cbs *cbs, void *arg)
{
	c->cbs = *cbs;
	c->arg = arg;
}

void
conn_set_timeout(struct conn *c, unsigned ms)
{
	c->timeout_ms = ms;
	conn_touch(c);
}

struct evbuffer *
conn_input(struct conn *c)
{
	return c->in;
}

struct evbuffer *
conn_output(struct conn *c)
{
	return c->out;
}

void
conn_flush(struct conn *c)
{
	if (conn_gone(c))
		return;
	c->flush_wanted = true;
	conn_kick_write(c);
}

int
conn_printf(struct conn *c, const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = evbuffer_add_vprintf(c->out, fmt, ap);
	va_end(ap);
	conn_flush(c);
	return r;
}

void
conn_pause_read(struct conn *c)
{
	c->read_paused = true;
	if (conn_gone(c))
		return;
	if (c->state == CONN_S_OPEN)            /* connect and handshake stay timed */
		conn_touch(c);
	conn_update_events(c);
}

void
conn_resume_read(struct conn *c)
{
	if (!c->read_paused)
		return;
	c->read_paused = false;
	c->read_parked = false;
	if (conn_gone(c))
		return;
	if (c->ev_closed != NULL)
		conn_arm(c, c->ev_closed, &c->closed_armed, false);
	conn_update_events(c);
	if (c->state != CONN_S_OPEN)
		return;
	conn_touch(c);
	/* Neither a seen EOF nor bytes GnuTLS holds decrypted wake the socket again. */
	if (c->eof_seen || (c->tls != NULL && gnutls_record_check_pending(c->tls) > 0))
		event_active(c->ev_read, EV_READ, 0);
}

size_t
conn_pending_output(struct conn *c)
{
	return evbuffer_get_length(c->out);
}

unsigned long
conn_interest_changes(const struct conn *c)
{
	return c->interest_changes;
}

/*
 * The peer sent while reading is paused: now, and only now, the read
 * interest goes (conn_update_events), or level-triggered readiness would
 * wake the loop for ever; what it sent waits in the socket. A hang-up is
 * still watched for (EV_CLOSED) when the owner wants to hear of it.
 */
static void
conn_park_read(struct conn *c)
{
	if (c->read_parked)
		return;
	c->read_parked = true;
	if (c->cbs.on_hangup == NULL)
		return;
	if (c->ev_closed == NULL &&
	    (event_base_get_features(c->base) & EV_FEATURE_EARLY_CLOSE) != 0)
		c->ev_closed = event_new(c->base, c->fd, EV_CLOSED, conn_on_closed, c);
	if (c->ev_closed != NULL)
		conn_arm(c, c->ev_closed, &c->closed_armed, true);
}

/*
 * Reading was held back by a limit and may go on: decrypted bytes GnuTLS
 * holds, and (owe_input) input the owner has not been told about since it
 * stopped taking it, wake no socket event.
 */
static void
conn_reading_resumed(struct conn *c, bool owe_input)
{
	if (owe_input && evbuffer_get_length(c->in) > 0)
		c->input_owed = true;
	conn_update_events(c);
	if (c->read_paused || c->out_full)
		return;
	if (c->input_owed || (c->tls != NULL && gnutls_record_check_pending(c->tls) > 0))
		event_active(c->ev_read, EV_READ, 0);
}

/* evbuffer callback: the owner drained `in` outside our handlers (inside
 * them conn_leave() re-derives the events anyway). */
static void
conn_input_changed(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
	struct conn *c = arg;

	if (info->n_deleted == 0 || !c->in_full || conn_input_room(c) == 0 ||
	    c->depth > 0 || conn_gone(c) || c->state != CONN_S_OPEN)
		return;
	c->in_full = false;
	conn_reading_resumed(c, false);
}

void
conn_set_limits(struct conn *c, size_t in_max, size_t out_high, size_t out_low)
{
	c->in_max = in_max;
	c->out_high = out_high;
	c->out_low = out_low < out_high ? out_low : out_high;
	if (in_max > 0 && c->in_cb == NULL)
		c->in_cb = evbuffer_add_cb(c->in, conn_input_changed, c);
	if (!conn_gone(c))
		conn_update_events(c);
}

/* Offers `in` at most want octets of room, in at most two vectors:
 * with two, libevent never moves buffered data to make room (see
 * conn_read_tls()), so nothing read is left behind unwiped. */
static int
conn_reserve(struct conn *c, size_t want, struct iovec iov[2], size_t *total)
{
	struct evbuffer_iovec v[2];
	int nv = evbuffer_reserve_space(c->in, (ev_ssize_t)want, v, 2);

	*total = 0;
	for (int i = 0; i < nv; i++) {
		size_t len = v[i].iov_len < want - *total ? v[i].iov_len : want - *total;

		iov[i].iov_base = v[i].iov_base;
		iov[i].iov_len = len;
		*total += len;
	}
	return nv;
}

/* Commits the first n octets of what conn_reserve() offered. */
static void
conn_commit(struct conn *c, struct iovec iov[2], int nv, size_t n)
{
	struct evbuffer_iovec v[2];
	int used = 0;

	for (int i = 0; i < nv && n > 0; i++, used++) {
		v[i].iov_base = iov[i].iov_base;
		v[i].iov_len = n < iov[i].iov_len ? n : iov[i].iov_len;
		n -= v[i].iov_len;
	}
	evbuffer_commit_space(c->in, v, used);
}

/*
 * One readv per readiness, without asking the kernel first how much there
 * is (FIONREAD): a read that did not fill its space emptied the socket, so
 * there is no need to read on until EAGAIN. One that did doubles the space
 * for the next, as a message is coming.
 */
static enum conn_io
conn_read_plain(struct conn *c, size_t *got, char *err, size_t errlen)
{
	struct iovec iov[2];
	size_t total;
	ssize_t n;
	int nv;

	while (*got < CONN_IO_BUDGET) {
		size_t room = conn_input_room(c);

		if (room == 0) {
			c->in_full = true;
			return CONN_IO_MORE;
		}
		nv = conn_reserve(c, room < c->read_size ? room : c->read_size, iov, &total);
		if (nv < 1) {
			snprintf(err, errlen, "read: %s", strerror(ENOMEM));
			return CONN_IO_FAIL_SYS;
		}
		n = readv(c->fd, iov, nv);
		if (n > 0) {
			conn_commit(c, iov, nv, (size_t)n);
			*got += (size_t)n;
			if ((size_t)n < total)
				return CONN_IO_AGAIN;
			if (c->read_size < CONN_READ_MAX)
				c->read_size *= 2;
			continue;
		}
		if (n == 0)
			return CONN_IO_DONE;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			return CONN_IO_AGAIN;
		snprintf(err, errlen, "read: %s", strerror(errno));
		return CONN_IO_FAIL_SYS;
	}
	return CONN_IO_MORE;
}

static enum conn_io
conn_read_tls(struct conn *c, size_t *got, char *err, size_t errlen)
{
	struct evbuffer_iovec v[2];
	ssize_t n;

	c->recv_wants_write = false;
	while (*got < CONN_IO_BUDGET) {
		size_t room = conn_input_room(c);

		if (room == 0) {
			c->in_full = true;
			return CONN_IO_MORE;
		}
		/*
		 * Two vectors, of which only the first is used: with one,
		 * libevent may grow the last chain by copying it into a new one
		 * and freeing the old one unwiped (evbuffer_expand_singlechain);
		 * with more it never moves data, as evbuffer_read does not.
		 */
		if (evbuffer_reserve_space(c->in, CONN_CHUNK, v, 2) < 1) {
			snprintf(err, errlen, "read: %s", strerror(ENOMEM));
			return CONN_IO_FAIL_SYS;
		}
		n = gnutls_record_recv(c->tls, v[0].iov_base,
		    v[0].iov_len < room ? v[0].iov_len : room);
		if (n > 0) {
			v[0].iov_len = (size_t)n;
			evbuffer_commit_space(c->in, v, 1);
			*got += (size_t)n;
			continue;
		}
		/*
		 * SMTP frames its own end (QUIT), so a peer that closes
		 * without close_notify has merely closed, as most MTAs do.
		 */
		if (n == 0 || n == GNUTLS_E_PREMATURE_TERMINATION)
			return CONN_IO_DONE;
		if (n == GNUTLS_E_AGAIN) {
			c->recv_wants_write = gnutls_record_get_direction(c->tls) == 1;
			return CONN_IO_AGAIN;
		}
		/* Interrupted, a warning alert, a renegotiation request we ignore. */
		if (!gnutls_error_is_fatal((int)n))
			continue;
		if (n == GNUTLS_E_PULL_ERROR) {
			snprintf(err, errlen, "read: %s", strerror(errno));
			return CONN_IO_FAIL_SYS;
		}
		conn_tls_strerror(c, (int)n, errno, err, errlen);
		return CONN_IO_FAIL_TLS;
	}
	return CONN_IO_MORE;
}

static void
conn_remember_session(struct conn *c)
{
	if (tls_client_remember(c->resume_ctx, c->servername, c->tls))
		c->resume_ctx = NULL;
}

static void
conn_do_read(struct conn *c)
{
	char err[CONN_ERRLEN];
	size_t got = 0;
	enum conn_io r;

	if (c->eof_seen)
		r = CONN_IO_DONE;
	else if (c->tls != NULL)
		r = conn_read_tls(c, &got, err, sizeof(err));
	else
		r = conn_read_plain(c, &got, err, sizeof(err));
	/* A TLS 1.3 server's ticket arrives with (or as) the first records. */
	if (c->resume_ctx != NULL)
		conn_remember_session(c);
	if (got > 0)
		conn_touch(c);
	if (got > 0 || c->input_owed) {
		c->input_owed = false;
		c->cbs.on_read(c, c->arg);
		if (conn_gone(c) || c->state != CONN_S_OPEN)
			return;
	}
	switch (r) {
	case CONN_IO_AGAIN:
		break;
	case CONN_IO_MORE:
		/* Decrypted bytes left inside GnuTLS would not wake the socket;
		 * a full `in` waits for the owner to drain it. */
		if (conn_may_read(c) && conn_input_room(c) > 0)
			event_active(c->ev_read, EV_READ, 0);
		break;
	case CONN_IO_DONE:
		if (c->read_paused) {
			c->eof_seen = true;
		} else if (evbuffer_get_length(c->out) > 0) {
			/* The peer only half-closed and still reads: a client that
			 * sent its last command and shut its side must hear the
			 * reply (a lost 250 means the message is sent twice). */
			c->eof_seen = true;
			c->eof_after_flush = true;
			conn_kick_write(c);
		} else {
			conn_fail(c, CONN_EOF, "connection closed by peer");
		}
		break;
	case CONN_IO_FAIL_SYS:
		conn_fail(c, CONN_IO_ERROR, "%s", err);
		break;
	case CONN_IO_FAIL_TLS:
		conn_fail(c, CONN_TLS_ERROR, "%s", err);
		break;
	}
}

/* sendmsg rather than evbuffer_write: MSG_NOSIGNAL spares us SIGPIPE. */
static enum conn_io
conn_write_plain(struct conn *c, size_t *sent, char *err, size_t errlen)
{
	struct evbuffer_iovec v[CONN_IOV_MAX];
	struct iovec iov[CONN_IOV_MAX];
	struct msghdr msg;
	ssize_t n;
	int i, nv;

	while (evbuffer_get_length(c->out) > 0) {
		if (*sent >= CONN_IO_BUDGET)
			return CONN_IO_MORE;
		nv = evbuffer_peek(c->out, -1, NULL, v, CONN_IOV_MAX);
		if (nv > CONN_IOV_MAX)
			nv = CONN_IOV_MAX;
		for (i = 0; i < nv; i++) {
			iov[i].iov_base = v[i].iov_base;
			iov[i].iov_len = v[i].iov_len;
		}
		memset(&msg, 0, sizeof(msg));
		msg.msg_iov = iov;
		msg.msg_iovlen = (size_t)nv;
		n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
		if (n >= 0) {
			evbuffer_drain(c->out, (size_t)n);
			*sent += (size_t)n;
			continue;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			return CONN_IO_AGAIN;
		snprintf(err, errlen, "write: %s", strerror(errno));
		return CONN_IO_FAIL_SYS;
	}
	return CONN_IO_DONE;
}

static enum conn_io
conn_write_tls(struct conn *c, size_t *sent, char *err, size_t errlen)
{
	unsigned char *p;
	size_t len;
	ssize_t n;

	c->send_wants_read = false;
	while ((len = evbuffer_get_length(c->out)) > 0) {
		if (*sent >= CONN_IO_BUDGET)
			return CONN_IO_MORE;
		/*
		 * After E_AGAIN GnuTLS must be given the same data again. The
		 * owner only appends to conn_output(), so its first send_len
		 * bytes are still the ones we offered.
		 */
		if (c->send_len == 0)
			c->send_len = len < CONN_CHUNK ? len : CONN_CHUNK;
		p = evbuffer_pullup(c->out, (ev_ssize_t)c->send_len);
		if (p == NULL) {
			snprintf(err, errlen, "write: output buffer shrank under a pending TLS record");
			return CONN_IO_FAIL_SYS;
		}
		n = gnutls_record_send(c->tls, p, c->send_len);
		if (n >= 0) {
			evbuffer_drain(c->out, (size_t)n);
			*sent += (size_t)n;
			c->send_len = 0;
			continue;
		}
		if (n == GNUTLS_E_INTERRUPTED)
			continue;
		if (n == GNUTLS_E_AGAIN) {
			c->send_wants_read = gnutls_record_get_direction(c->tls) == 0;
			return CONN_IO_AGAIN;
		}
		/* The socket failed, not TLS: report it as plain I/O does. */
		if (n == GNUTLS_E_PUSH_ERROR) {
			snprintf(err, errlen, "write: %s", strerror(errno));
			return CONN_IO_FAIL_SYS;
		}
		conn_tls_strerror(c, (int)n, errno, err, errlen);
		return CONN_IO_FAIL_TLS;
	}
	return CONN_IO_DONE;
}

static void
conn_do_write(struct conn *c)
{
	char err[CONN_ERRLEN];
	size_t sent = 0;
	enum conn_io r;

	if (c->tls != NULL)
		r = conn_write_tls(c, &sent, err, sizeof(err));
	else
		r = conn_write_plain(c, &sent, err, sizeof(err));
	if (sent > 0)
		conn_touch(c);
	/* Room is waited for only where the socket ran out of it, or to let
	 * others have their turn after a large write (CONN_IO_MORE). */
	c->write_blocked = (r == CONN_IO_AGAIN && !c->send_wants_read) || r == CONN_IO_MORE;
	if (c->out_full && evbuffer_get_length(c->out) <= c->out_low) {
		/* The peer reads again: what it sent meanwhile is already in
		 * `in`, and no socket event will announce it. */
		c->out_full = false;
		conn_reading_resumed(c, true);
	}
	switch (r) {
	case CONN_IO_AGAIN:
	case CONN_IO_MORE:
		break;
	case CONN_IO_DONE:
		if (c->flush_wanted) {
			c->flush_wanted = false;
			if (c->cbs.on_flushed != NULL)
				c->cbs.on_flushed(c, c->arg);
			if (conn_gone(c) || c->state != CONN_S_OPEN)
				break;
		}
		if (c->eof_after_flush && evbuffer_get_length(c->out) == 0)
			conn_fail(c, CONN_EOF, "connection closed by peer");
		break;
	case CONN_IO_FAIL_SYS:
		conn_fail(c, CONN_IO_ERROR, "%s", err);
		break;
	case CONN_IO_FAIL_TLS:
		conn_fail(c, CONN_TLS_ERROR, "%s", err);
		break;
	}
}

void
conn_flush_now(struct conn *c)
{
	if (conn_gone(c) || c->state != CONN_S_OPEN || evbuffer_get_length(c->out) == 0)
		return;
	c->flush_wanted = true;
	conn_enter(c);
	conn_do_write(c);
	conn_leave(c);
}

static void
conn_describe_tls(struct conn *c)
{
	const char *proto = gnutls_protocol_get_name(gnutls_protocol_get_version(c->tls));
	const char *cipher = gnutls_cipher_get_name(gnutls_cipher_get(c->tls));
	const char *resumed = gnutls_session_is_resumed(c->tls) ? " resumed" : "";

	if (proto == NULL)
		proto = "TLS";
	if (cipher == NULL)
		cipher = "unknown";
	/* GnuTLS says "TLS1.3"; mail logs conventionally say "TLSv1.3". */
	if (strncmp(proto, "TLS1", 4) == 0)
		snprintf(c->tls_desc, sizeof(c->tls_desc), "TLSv%s cipher=%s%s",
		    proto + 3, cipher, resumed);
	else
		snprintf(c->tls_desc, sizeof(c->tls_desc), "%s cipher=%s%s",
		    proto, cipher, resumed);
}

static void
conn_tls_established(struct conn *c)
{
	c->state = CONN_S_OPEN;
	conn_describe_tls(c);
	if (c->resume_ctx != NULL)
		conn_remember_session(c);
	conn_touch(c);
	if (c->flush_wanted)
		conn_kick_write(c);
	c->cbs.on_tls_ready(c, c->arg);
	if (conn_gone(c) || c->state != CONN_S_OPEN || c->read_paused)
		return;
	/* The peer's first data may have come with its Finished, already read. */
	conn_update_events(c);
	event_active(c->ev_read, EV_READ, 0);
}

static void
conn_handshake(struct conn *c)
{
	char err[CONN_ERRLEN];
	int r, tries = 0;

	do
		r = gnutls_handshake(c->tls);
	while (r < 0 && r != GNUTLS_E_AGAIN && !gnutls_error_is_fatal(r) &&
	    ++tries < CONN_HS_RETRIES);
	if (r == GNUTLS_E_AGAIN) {
		c->hs_wants_write = gnutls_record_get_direction(c->tls) == 1;
		return;
	}
	if (r < 0) {
		conn_tls_strerror(c, r, errno, err, sizeof(err));
		/* Tell the peer why (bad certificate, unknown CA...); one try, never waits. */
		gnutls_alert_send_appropriate(c->tls, r);
		if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR)
			conn_fail(c, CONN_TLS_ERROR, "%s", err);
		else
			conn_fail(c, CONN_TLS_ERROR, "TLS handshake failed: %s", err);
		return;
	}
	conn_tls_established(c);
}

static void
conn_finish_connect(struct conn *c)
{
	socklen_t len = sizeof(int);
	int err = c->connect_errno;

	if (err == 0 && getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err != 0) {
		conn_fail(c, CONN_IO_ERROR, "connect to %s%s%s:%s: %s",
		    strchr(c->peer, ':') != NULL ? "[" : "", c->peer,
		    strchr(c->peer, ':') != NULL ? "]" : "", c->peer_port, strerror(err));
		return;
	}
	c->state = CONN_S_OPEN;
	conn_touch(c);
	if (c->flush_wanted)
		conn_kick_write(c);
	if (c->cbs.on_connected != NULL)
		c->cbs.on_connected(c, c->arg);
}

static void
conn_on_readable(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	conn_enter(c);
	if (c->state == CONN_S_HANDSHAKE) {
		conn_handshake(c);
	} else if (c->state == CONN_S_OPEN) {
		if (c->send_wants_read)
			conn_do_write(c);
		if (!conn_gone(c) && c->state == CONN_S_OPEN && c->read_paused)
			conn_park_read(c);
		else if (!conn_gone(c) && c->state == CONN_S_OPEN && conn_may_read(c))
			conn_do_read(c);
	}
	conn_leave(c);
}

/* conn_kick_write(): output is due and the socket is not known to be full. */
static void
conn_on_flush(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	(void)fd;
	(void)what;
	conn_enter(c);
	if (c->state == CONN_S_OPEN && !conn_gone(c) && !c->write_blocked &&
	    (c->flush_wanted || c->eof_after_flush))
		conn_do_write(c);
	conn_leave(c);
}

/* The peer closed or reset while reading was parked (EV_CLOSED, once). */
static void
conn_on_closed(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	(void)fd;
	(void)what;
	c->closed_armed = false;                /* not persistent: it fired */
	conn_enter(c);
	if (c->state == CONN_S_OPEN && c->read_paused && c->cbs.on_hangup != NULL)
		c->cbs.on_hangup(c, c->arg);
	conn_leave(c);
}

static void
conn_on_writable(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	conn_enter(c);
	if (c->state == CONN_S_CONNECTING) {
		conn_finish_connect(c);
	} else if (c->state == CONN_S_HANDSHAKE) {
		conn_handshake(c);
	} else if (c->state == CONN_S_OPEN) {
		if (c->recv_wants_write) {
			c->recv_wants_write = false;
			if (conn_may_read(c))
				conn_do_read(c);
		}
		if (!conn_gone(c) && c->state == CONN_S_OPEN &&
		    (c->flush_wanted || c->eof_after_flush))
			conn_do_write(c);
	}
	conn_leave(c);
}

static void
conn_on_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	conn_enter(c);
	switch (c->state) {
	case CONN_S_CONNECTING:
		conn_fail(c, CONN_TIMEOUT, "connect to %s:%s timed out after %u ms",
		    c->peer, c->peer_port, c->timeout_ms);
		break;
	case CONN_S_HANDSHAKE:
		conn_fail(c, CONN_TIMEOUT, "TLS handshake timed out after %u ms", c->timeout_ms);
		break;
	case CONN_S_OPEN:
		conn_fail(c, CONN_TIMEOUT, "no input for %u ms", c->timeout_ms);
		break;
	case CONN_S_DEAD:
		break;
	}
	conn_leave(c);
}

/* Clear-text bytes received before the handshake are never delivered as if sent under TLS. */
static void
conn_begin_handshake(struct conn *c, bool client)
{
	buffer_wipe_all(c->in);
	c->eof_seen = false;
	c->eof_after_flush = false;
	gnutls_transport_set_int(c->tls, c->fd);
	c->state = CONN_S_HANDSHAKE;
	c->hs_wants_write = client;
	conn_touch(c);
	conn_update_events(c);
}

/*
 * Output still queued would be sent after the handshake, encrypted, where
 * the peer expects it in clear (the 220 to STARTTLS): a caller bug.
 */
static bool
conn_can_start_tls(const struct conn *c)
{
	return c->tls == NULL && c->state == CONN_S_OPEN && !c->freed &&
	    evbuffer_get_length(c->out) == 0;
}

int
conn_start_tls_server(struct conn *c, struct tls_server_ctx *ctx)
{
	if (!conn_can_start_tls(c)) {
		errno = EINVAL;
		return -1;
	}
	if (tls_server_session(ctx, &c->tls) < 0) {
		c->tls = NULL;
		errno = ENOMEM;
		return -1;
	}
	conn_begin_handshake(c, false);
	return 0;
}

int
conn_start_tls_client(struct conn *c, struct tls_client_ctx *ctx, const char *servername)
{
	if (!conn_can_start_tls(c)) {
		errno = EINVAL;
		return -1;
	}
	free(c->servername);
	c->servername = NULL;
	if (servername != NULL && (c->servername = strdup(servername)) == NULL)
		return -1;
	if (tls_client_session(ctx, servername, &c->tls) < 0) {
		c->tls = NULL;
		errno = ENOMEM;
		return -1;
	}
	c->resume_ctx = ctx;
	conn_begin_handshake(c, true);
	return 0;
}

bool
conn_is_tls(const struct conn *c)
{
	return c->tls != NULL && c->tls_desc[0] != '\0';
}

const char *
conn_tls_desc(const struct conn *c)
{
	return c->tls_desc;
}

const char *
conn_peer(const struct conn *c)
{
	return c->peer;
}

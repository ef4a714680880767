/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <event2/dns.h>
#include <event2/event.h>

#include "client_table.h"
#include "accept_room.h"
#include "cluster.h"
#include "conn.h"
#include "delivery.h"
#include "idle_trim.h"
#include "log.h"
#include "passwd.h"
#include "passwd_offload.h"
#include "relay.h"
#include "runtime.h"
#include "smtp_server.h"
#include "spool.h"
#include "spool_writer.h"
#include "upstream.h"
#include "upstream_cache.h"
#include "worker.h"

#define ACCEPT_BATCH 64              /* per wakeup, so workers share the load */
#define ACCEPT_PAUSE_SECONDS 1       /* after EMFILE and friends */
#define CLIENT_LINGER_SECONDS 10     /* to flush a final reply to a slow reader */
#define FINAL_FLUSH_SECONDS 1        /* for the 421s sent at the shutdown deadline */
#define BUSY_REPLY "421 4.3.2 Too many connections\r\n"
#define IDLE_TRIM_MS 1000            /* without sessions this long: memory back */

struct worker;

/* One accepted connection and its SMTP session. Every teardown step runs
 * from ev_kick, outside the conn and session callbacks, so neither is ever
 * freed while one of its own functions is on the stack. */
struct client {
	struct worker *w;
	struct client *prev, *next;
	const struct listen_cfg *listener;
	struct conn *conn;
	int fd;                          /* owned by conn; kept for client_drain() */
	struct smtp_session *session;    /* NULL until the implicit-TLS handshake is done */
	struct event *ev_kick;           /* deferred actions below */
	struct event *ev_linger;         /* close even if the peer never reads */
	struct event *ev_idle;           /* the session's read timeout */
	struct event *ev_timer;          /* the session's one-shot timer (io->set_timer) */
	struct client_entry *address;    /* its count in the shared client table, or NULL */
	unsigned timeout_s;              /* 0: none */
	bool starttls_pending;           /* start TLS once the 220 is flushed */
	bool close_pending;              /* close once the output is flushed */
	bool input_pending;              /* reading resumed with input already buffered */
	bool paused;
	bool dead;                       /* free at the next kick */
};

struct worker_listener {
	struct worker *w;
	const struct listen_cfg *lc;
	int fd;
	struct event *ev;
};

/* A flood of refused connections is reported in one line per second. */
struct refusal_log {
	int64_t last;                    /* client_table_now() of the last line */
	unsigned unreported;             /* refusals since that line */
};

struct worker {
	struct runtime rt;
	struct config *cfg;
	unsigned generation;
	struct worker_listener *listeners;
	size_t n_listeners;
	struct client *clients;
	unsigned n_clients;
	struct event *ev_stop;
	struct event *ev_retire;
	struct event *ev_retire_end;     /* shutdown_timeout after the retire signal */
	struct event *ev_reopen;
	struct event *ev_deadline;       /* shutdown_timeout after the stop signal */
	struct event *ev_accept_resume;  /* after an accept failure such as EMFILE */
	struct accept_room *room;        /* which workers have room, shared */
	struct idle_trim *trim;          /* after a burst, memory back to the kernel */
	bool listening;                  /* listener events added */
	bool accept_paused;              /* after an accept failure such as EMFILE */
	struct refusal_log busy_log;     /* limits.max_sessions */
	struct refusal_log per_ip_log;   /* limits.max_sessions_per_ip */
	bool stopping;                   /* not accepting; exits with its last session */
	bool shutting_down;              /* sessions told 421 at their next boundary */
	bool deadline_passed;            /* the last 421s are being flushed */
	bool exiting;                    /* worker_cleanup: the loop is over */
};

static void client_kick(struct client *c);
static void client_start_session(struct client *c, bool tls_active);
static void worker_update_accept(struct worker *w);

/* --- client teardown ---------------------------------------------------- */

static void
client_unlink(struct client *c)
{
	struct worker *w = c->w;

	if (c->prev != NULL)
		c->prev->next = c->next;
	else
		w->clients = c->next;
	if (c->next != NULL)
		c->next->prev = c->prev;
	w->n_clients--;
}

/*
 * Input left unread in the socket when it is closed makes the kernel answer
 * with a reset, which can destroy our last words (a 421, a TLS alert)
 * before the peer reads them. Whatever has already arrived is discarded.
 */
static void
client_drain(struct client *c)
{
	char buf[4096];
	int i;

	for (i = 0; i < 16; i++)
		if (recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT) <= 0)
			break;
}

static void
client_free(struct client *c)
{
	struct worker *w = c->w;

	client_unlink(c);
	if (c->session != NULL)
		smtp_session_free(c->session);
	if (c->conn != NULL) {
		client_drain(c);
		conn_free(c->conn);
	}
	client_table_close(w->rt.clients, c->address, w->rt.worker_slot, client_table_now());
	event_free(c->ev_kick);
	event_free(c->ev_linger);
	event_free(c->ev_idle);
	event_free(c->ev_timer);
	free(c);
	if (w->stopping && w->n_clients == 0 && !w->exiting)
		event_base_loopexit(w->rt.base, NULL);
	else if (!w->exiting)
		worker_update_accept(w);
	if (w->n_clients == 0 && !w->exiting)
		idle_trim_arm(w->trim);
}

static void
client_kill(struct client *c)
{
	c->dead = true;
	client_kick(c);
}

/* The connection failed or the worker gives up on it: tell the session
 * (it cancels a relay in progress), then free both. */
static void
client_abort(struct client *c)
{
	if (c->dead)
		return;
	if (c->session != NULL)
		smtp_session_abort(c->session);
	client_kill(c);
}

static void
client_start_tls(struct client *c)
{
	struct tls_server_ctx *tls = c->w->cfg->tls.server;

	if (tls == NULL || conn_start_tls_server(c->conn, tls) < 0) {
		log_warn("TLS handshake with %s could not start", conn_peer(c->conn));
		client_abort(c);
	}
}

static void
client_kick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client *c = arg;
	bool flushed;

	if (c->dead) {
		client_free(c);
		return;
	}
	flushed = conn_pending_output(c->conn) == 0;
	if (c->starttls_pending && flushed) {
		c->starttls_pending = false;
		client_start_tls(c);
	} else if (c->close_pending && flushed) {
		client_free(c);
	} else if (c->input_pending && !c->paused && c->session != NULL) {
		c->input_pending = false;
		smtp_session_input(c->session);
	}
}

static void
client_kick(struct client *c)
{
	event_active(c->ev_kick, EV_TIMEOUT, 0);
}

static void
client_linger_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client *c = arg;

	log_debug("session %s: peer did not read the final reply; closing",
	    c->session ? smtp_session_id(c->session) : "-");
	client_free(c);
}

/*
 * Read timeouts are kept here rather than in the conn: a conn that times
 * out is dead, and the session still has a 421 to send.
 */
static void
client_arm_idle(struct client *c)
{
	struct timeval tv = { (time_t)c->timeout_s, 0 };

	if (c->dead || c->close_pending || c->paused || c->timeout_s == 0)
		evtimer_del(c->ev_idle);
	else
		evtimer_add(c->ev_idle, &tv);
}

static void
client_idle_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client *c = arg;

	if (c->dead || c->close_pending)
		return;
	if (c->session == NULL) {
		log_info("TLS handshake timeout from [%s]", conn_peer(c->conn));
		client_kill(c);
		return;
	}
	smtp_session_timeout(c->session);
}

/* --- conn callbacks ------------------------------------------------------ */

static void
client_on_read(struct conn *conn, void *arg)
{
	struct client *c = arg;

	if (c->dead || c->close_pending)
		return;
	client_arm_idle(c);
	if (c->session != NULL)
		smtp_session_input(c->session);
}

static void
client_on_flushed(struct conn *conn, void *arg)
{
	struct client *c = arg;

	if (!c->dead && (c->starttls_pending || c->close_pending))
		client_kick(c);
}

static void
client_on_tls_ready(struct conn *conn, void *arg)
{
	struct client *c = arg;

	if (c->dead)
		return;
	if (c->session == NULL)
		client_start_session(c, true);
	else
		smtp_session_tls_ready(c->session, conn_tls_desc(conn));
}

static void
client_on_error(struct conn *conn, void *arg, enum conn_event ev, const char *detail)
{
	struct client *c = arg;

	if (c->dead)
		return;
	if (ev == CONN_TLS_ERROR)
		log_info("%s%sconnection from [%s] failed: %s",
		    c->session ? smtp_session_id(c->session) : "", c->session ? ": " : "",
		    conn_peer(conn), detail ? detail : "TLS error");
	else if (c->session == NULL)
		log_debug("connection from [%s] lost before the session started: %s",
		    conn_peer(conn), detail ? detail : "closed");
	client_abort(c);
}

/*
 * The client closed or reset its connection while reading was paused (its
 * message is being relayed): it cannot be seen by reading, so the conn
 * watches for the kernel's "peer closed" (EPOLLRDHUP). Whatever the client
 * pipelined before closing stays unread.
 */
static void
client_on_hangup(struct conn *conn, void *arg)
{
	struct client *c = arg;

	if (!c->dead && !c->close_pending && c->session != NULL)
		smtp_session_hangup(c->session);
}

static const struct conn_cbs client_conn_cbs = {
	.on_read = client_on_read,
	.on_flushed = client_on_flushed,
	.on_connected = NULL,
	.on_tls_ready = client_on_tls_ready,
	.on_error = client_on_error,
	.on_hangup = client_on_hangup,
};

/* --- session io callbacks --------------------------------------------- */

static void
io_flush(void *ctx)
{
	struct client *c = ctx;

	if (!c->dead)
		conn_flush(c->conn);
}

static void
io_starttls(void *ctx)
{
	struct client *c = ctx;

	c->starttls_pending = true;
	conn_flush(c->conn);
	client_kick(c);
}

static void
io_close(void *ctx)
{
	struct client *c = ctx;
	struct timeval linger = { CLIENT_LINGER_SECONDS, 0 };

	if (c->close_pending)
		return;
	c->close_pending = true;
	evtimer_del(c->ev_idle);
	conn_pause_read(c->conn);
	conn_flush(c->conn);
	evtimer_add(c->ev_linger, &linger);
	client_kick(c);
}

static void
io_pause(void *ctx, bool paused)
{
	struct client *c = ctx;

	c->paused = paused;
	client_arm_idle(c);
	if (paused) {
		conn_pause_read(c->conn);
		return;
	}
	conn_resume_read(c->conn);
	/* Commands pipelined during the pause may already be buffered: no
	 * read event will announce them. */
	if (evbuffer_get_length(conn_input(c->conn)) > 0) {
		c->input_pending = true;
		client_kick(c);
	}
}

static void
io_set_timeout(void *ctx, unsigned seconds)
{
	struct client *c = ctx;

	c->timeout_s = seconds;
	client_arm_idle(c);
}

static struct delivery *
io_relay_start(void *ctx, struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *msg, uint64_t size, const char *client_addr,
    relay_done_fn done, void *arg)
{
	return delivery_start(rt, user, msg, size, client_addr, done, arg);
}

static void
io_relay_cancel(void *ctx, struct delivery *d)
{
	delivery_cancel(d);
}

static void
io_set_timer(void *ctx, unsigned ms)
{
	struct client *c = ctx;
	struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };

	if (ms == 0 || c->dead)
		evtimer_del(c->ev_timer);
	else
		evtimer_add(c->ev_timer, &tv);
}

static void
client_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client *c = arg;

	if (!c->dead && !c->close_pending && c->session != NULL)
		smtp_session_timer(c->session);
}

static struct delivery *
io_relay_prepare(void *ctx, struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *env, uint64_t size, const char *client_addr)
{
	return delivery_prepare(rt, user, env, size, client_addr);
}

static struct delivery *
io_relay_begin(void *ctx, struct delivery *d, const struct upstream_msg *msg, uint64_t size,
    relay_done_fn done, void *arg)
{
	return delivery_begin(d, msg, size, done, arg);
}

static bool
io_relay_dot_sent(void *ctx, const struct delivery *d)
{
	return delivery_dot_sent(d);
}

static bool
io_relay_defer(void *ctx, struct delivery *d)
{
	return delivery_defer_now(d);
}

/* The verdict of a hash check; a client being torn down ignores it (its
 * session cancels the ticket when it is freed). */
static void
client_password_checked(void *arg, uint64_t ticket, bool match)
{
	struct client *c = arg;

	if (!c->dead && !c->close_pending && c->session != NULL)
		smtp_session_password_checked(c->session, ticket, match);
}

static uint64_t
io_check_password(void *ctx, const char *given, const char *stored)
{
	struct client *c = ctx;

	return passwd_offload_submit(c->w->rt.pwcheck, given, stored, client_password_checked, c);
}

static void
io_check_password_cancel(void *ctx, uint64_t ticket)
{
	struct client *c = ctx;

	passwd_offload_cancel(c->w->rt.pwcheck, ticket);
}

static const struct smtp_session_io client_session_io = {
	.flush = io_flush,
	.starttls = io_starttls,
	.close = io_close,
	.pause = io_pause,
	.set_timeout = io_set_timeout,
	.set_timer = io_set_timer,
	.relay_start = io_relay_start,
	.relay_cancel = io_relay_cancel,
	.relay_prepare = io_relay_prepare,
	.relay_begin = io_relay_begin,
	.relay_dot_sent = io_relay_dot_sent,
	.relay_defer = io_relay_defer,
	.check_password = io_check_password,
	.check_password_cancel = io_check_password_cancel,
};

/* --- accepting ---------------------------------------------------------- */

static void
client_start_session(struct client *c, bool tls_active)
{
	struct smtp_session_params params = {
		.rt = &c->w->rt,
		.listener = c->listener,
		.client_addr = conn_peer(c->conn),
		.tls_active = tls_active,
		.tls_desc = tls_active ? conn_tls_desc(c->conn) : NULL,
	};

	c->session = smtp_session_new(&params, conn_input(c->conn), conn_output(c->conn),
	    &client_session_io, c);
	if (c->session == NULL) {
		log_err("cannot create a session for %s: out of memory", conn_peer(c->conn));
		client_kill(c);
		return;
	}
	smtp_session_start(c->session);
}

/* True for the refusal that may be logged now; *count: refusals it reports. */
static bool
refusal_report(struct refusal_log *rl, unsigned *count)
{
	int64_t now = client_table_now();

	rl->unreported++;
	if (rl->last != 0 && now - rl->last < 1)
		return false;
	*count = rl->unreported;
	rl->unreported = 0;
	rl->last = now;
	return true;
}

/* Only when no worker has room: a full worker otherwise stops listening. */
static void
reject_busy(struct worker *w, int fd)
{
	unsigned n;

	/* Best effort: the socket buffer of a fresh connection has room. */
	(void)send(fd, BUSY_REPLY, sizeof(BUSY_REPLY) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
	close(fd);
	if (refusal_report(&w->busy_log, &n))
		log_warn("connection refused: every worker is full, %u sessions in this one "
		    "(limits.max_sessions); %u refused since the last report", w->n_clients, n);
}

/* A client over limits.max_sessions_per_ip: told so, and closed. */
static void
client_refuse_address(struct client *c, unsigned sessions)
{
	struct worker *w = c->w;
	unsigned n;

	if (refusal_report(&w->per_ip_log, &n))
		log_warn("connection from [%s] refused: %u sessions from it (limits.max_sessions_per_ip);"
		    " %u refused since the last report", conn_peer(c->conn), sessions - 1, n);
	evbuffer_add_printf(conn_output(c->conn), "421 4.7.0 %s Too many connections from your "
	    "address\r\n", w->cfg->hostname);
	io_close(c);
}

static struct client *
client_new(struct worker *w, const struct listen_cfg *lc, int fd,
    const struct sockaddr *peer, socklen_t peerlen)
{
	struct client *c = calloc(1, sizeof(*c));

	if (c == NULL)
		return NULL;
	c->w = w;
	c->listener = lc;
	c->fd = fd;
	c->ev_kick = event_new(w->rt.base, -1, 0, client_kick_cb, c);
	c->ev_linger = evtimer_new(w->rt.base, client_linger_cb, c);
	c->ev_idle = evtimer_new(w->rt.base, client_idle_cb, c);
	c->ev_timer = evtimer_new(w->rt.base, client_timer_cb, c);
	if (c->ev_kick != NULL && c->ev_linger != NULL && c->ev_idle != NULL &&
	    c->ev_timer != NULL)
		c->conn = conn_accepted(w->rt.base, fd, peer, peerlen, &client_conn_cbs, c);
	/* What one client can make us hold: the session stops answering at
	 * max_output_buffer too, and the conn resumes at a quarter of it. */
	if (c->conn != NULL)
		conn_set_limits(c->conn, w->cfg->limits.max_input_buffer,
		    w->cfg->limits.max_output_buffer, w->cfg->limits.max_output_buffer / 4);
	if (c->conn == NULL) {
		if (c->ev_kick != NULL)
			event_free(c->ev_kick);
		if (c->ev_linger != NULL)
			event_free(c->ev_linger);
		if (c->ev_idle != NULL)
			event_free(c->ev_idle);
		if (c->ev_timer != NULL)
			event_free(c->ev_timer);
		free(c);
		return NULL;
	}
	c->next = w->clients;
	if (w->clients != NULL)
		w->clients->prev = c;
	w->clients = c;
	w->n_clients++;
	idle_trim_cancel(w->trim);
	return c;
}

static bool
worker_has_room(const struct worker *w)
{
	return w->n_clients < w->cfg->limits.max_sessions;
}

static void
worker_accept_one(struct worker_listener *l, int fd, const struct sockaddr *peer,
    socklen_t peerlen)
{
	struct worker *w = l->w;
	unsigned per_ip = w->cfg->limits.max_sessions_per_ip, sessions;
	struct client *c;

	if (!worker_has_room(w)) {
		reject_busy(w, fd);
		return;
	}
	c = client_new(w, l->lc, fd, peer, peerlen);
	if (c == NULL) {
		log_err("cannot accept a connection on %s: out of memory", l->lc->text);
		close(fd);
		return;
	}
	/* Counted in all workers at once, then checked: never more than the limit. */
	c->address = client_table_open(w->rt.clients, conn_peer(c->conn), w->rt.worker_slot,
	    client_table_now(), &sessions);
	if (per_ip != 0 && sessions > per_ip) {
		client_refuse_address(c, sessions);
		return;
	}
	if (l->lc->tls == TLS_MODE_IMPLICIT) {
		/* The greeting waits for the handshake (client_on_tls_ready). */
		c->timeout_s = w->cfg->limits.command_timeout;
		client_arm_idle(c);
		client_start_tls(c);
	} else {
		client_start_session(c, false);
	}
}

static void worker_pause_accept(struct worker *w);

/*
 * The listening sockets are shared by all workers. One at limits.max_sessions
 * stops listening while another has room, so the kernel hands new
 * connections to that one; the last to fill up keeps listening and refuses
 * with 421, so nobody waits in the backlog while every worker is full.
 */
static void
worker_update_accept(struct worker *w)
{
	bool room = !w->stopping && worker_has_room(w);
	bool listen;

	/* Ours first, then the others': see accept_room.h. */
	accept_room_set(w->room, w->rt.worker_slot, room);
	listen = !w->stopping && !w->accept_paused &&
	    (room || !accept_room_elsewhere(w->room, w->rt.worker_slot));
	if (listen == w->listening)
		return;
	w->listening = listen;
	for (size_t i = 0; i < w->n_listeners; i++) {
		if (w->listeners[i].ev == NULL)
			continue;
		if (listen)
			event_add(w->listeners[i].ev, NULL);
		else
			event_del(w->listeners[i].ev);
	}
}

static void
listener_accept_cb(evutil_socket_t lfd, short what, void *arg)
{
	struct worker_listener *l = arg;
	struct sockaddr_storage peer;
	socklen_t peerlen;
	int i, fd;

	for (i = 0; i < ACCEPT_BATCH && !l->w->stopping; i++) {
		/* Full: a worker that has made room since we last looked takes it. */
		if (!worker_has_room(l->w)) {
			worker_update_accept(l->w);
			if (!l->w->listening)
				return;
		}
		/* Non-blocking and with its peer's address at once: no fcntl,
		 * no getpeername. */
		peerlen = sizeof(peer);
		fd = accept4(lfd, (struct sockaddr *)&peer, &peerlen, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd >= 0) {
			worker_accept_one(l, fd, (struct sockaddr *)&peer, peerlen);
			continue;
		}
		if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			return;
		/* EMFILE, ENFILE, ENOBUFS, ENOMEM: the listener stays readable, so
		 * retrying at once would spin. */
		log_warn("accept on %s: %s; pausing accepts for %d s", l->lc->text,
		    strerror(errno), ACCEPT_PAUSE_SECONDS);
		worker_pause_accept(l->w);
		return;
	}
}

static void
worker_pause_accept(struct worker *w)
{
	struct timeval tv = { ACCEPT_PAUSE_SECONDS, 0 };

	w->accept_paused = true;
	worker_update_accept(w);
	evtimer_add(w->ev_accept_resume, &tv);
}

static void
worker_accept_resume_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;

	w->accept_paused = false;
	worker_update_accept(w);
}

static int
worker_open_listeners(struct worker *w, const int *fds)
{
	size_t i;

	w->n_listeners = w->cfg->n_listen;
	w->listeners = calloc(w->n_listeners ? w->n_listeners : 1, sizeof(*w->listeners));
	if (w->listeners == NULL)
		return -1;
	for (i = 0; i < w->n_listeners; i++) {
		struct worker_listener *l = &w->listeners[i];

		l->w = w;
		l->lc = &w->cfg->listen[i];
		l->fd = fds[i];
		l->ev = event_new(w->rt.base, l->fd, EV_READ | EV_PERSIST, listener_accept_cb, l);
		if (l->ev == NULL)
			return -1;
	}
	worker_update_accept(w);
	return 0;
}

/* Closing our copies of the listening sockets: the master and the next
 * generation keep theirs, so no connection is refused. */
static void
worker_close_listeners(struct worker *w)
{
	size_t i;

	for (i = 0; i < w->n_listeners; i++) {
		struct worker_listener *l = &w->listeners[i];

		if (l->ev != NULL)
			event_free(l->ev);
		l->ev = NULL;
		if (l->fd >= 0)
			close(l->fd);
		l->fd = -1;
	}
}

/* --- stopping ----------------------------------------------------------- */

/*
 * A session still busy at the deadline: its transaction is lost, but the
 * client is told so (it will retry) rather than just cut off - unless its
 * message already went to a downstream with the final dot: that relay
 * runs to its verdict (within limits.relay_deadline) and the client hears
 * it; or unless it can still go to the queue: the client hears 250 queued.
 * Returns true for such a session.
 */
static bool
client_drop(struct client *c)
{
	if (c->dead || c->close_pending)
		return false;
	if (c->session == NULL) {
		client_kill(c);
		return false;
	}
	return smtp_session_deadline(c->session);
}

static bool
client_relaying(const struct client *c)
{
	return !c->dead && !c->close_pending && c->session != NULL &&
	    smtp_session_busy(c->session);
}

static void
worker_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	struct timeval tv = { FINAL_FLUSH_SECONDS, 0 };
	struct client *c;
	unsigned finishing = 0;

	if (!w->deadline_passed) {
		log_warn("shutdown timeout (%u s): closing %u session(s)",
		    w->cfg->limits.shutdown_timeout, w->n_clients);
		w->deadline_passed = true;
		for (c = w->clients; c != NULL; c = c->next)
			finishing += client_drop(c);
		if (finishing > 0)
			log_info("shutdown timeout: %u relay(s) past the final dot, or message(s) "
			    "going to the queue, finish first", finishing);
		evtimer_add(w->ev_deadline, &tv);
		return;
	}
	/* The 421s had their second; relays past the dot end on their own. */
	for (c = w->clients; c != NULL; c = c->next)
		finishing += client_relaying(c);
	if (finishing > 0)
		evtimer_add(w->ev_deadline, &tv);
	else
		event_base_loopbreak(w->rt.base);
}

static void
worker_stop_accepting(struct worker *w)
{
	if (w->stopping)
		return;
	w->stopping = true;
	worker_update_accept(w);         /* publishes: no room here */
	worker_close_listeners(w);
	/* Idle downstream sessions get QUIT; the next generation, or nobody,
	 * opens its own. */
	upstream_close_idle(&w->rt);
	if (w->ev_accept_resume != NULL)
		event_del(w->ev_accept_resume);
}

/* Sessions end at their next transaction boundary; busy ones have until
 * the deadline. */
static void
worker_shut_down(struct worker *w)
{
	struct timeval tv = { (time_t)w->cfg->limits.shutdown_timeout, 0 };
	struct client *c, *next;

	if (w->shutting_down)
		return;
	w->shutting_down = true;
	worker_stop_accepting(w);
	log_debug("stopping: generation=%u sessions=%u", w->generation, w->n_clients);
	for (c = w->clients; c != NULL; c = next) {
		next = c->next;          /* every free below is deferred: the list is stable */
		if (c->dead)
			continue;
		if (c->session != NULL)
			smtp_session_shutdown(c->session);
		else
			client_kill(c);
	}
	if (w->n_clients == 0)
		event_base_loopexit(w->rt.base, NULL);
	else
		evtimer_add(w->ev_deadline, &tv);
}

/* SIGTERM, or the end of a retirement's grace. */
static void
worker_shut_down_cb(evutil_socket_t fd_or_sig, short what, void *arg)
{
	worker_shut_down(arg);
}

/*
 * After a reload the new generation accepts; an old worker lets its
 * sessions run until their clients quit, as a client sending a batch over
 * one connection must not see a 421 just because the config changed. Only
 * clients still connected after shutdown_timeout are wound down.
 */
static void
worker_retire_cb(evutil_socket_t sig, short what, void *arg)
{
	struct worker *w = arg;
	struct timeval tv = { (time_t)w->cfg->limits.shutdown_timeout, 0 };

	if (w->stopping)
		return;
	worker_stop_accepting(w);
	log_debug("retiring: generation=%u sessions=%u", w->generation, w->n_clients);
	if (w->n_clients == 0)
		event_base_loopexit(w->rt.base, NULL);
	else
		evtimer_add(w->ev_retire_end, &tv);
}

static void
worker_reopen_cb(evutil_socket_t sig, short what, void *arg)
{
	if (log_reopen() < 0)
		log_warn("cannot reopen the log file: %s", strerror(errno));
}

/* --- life cycle --------------------------------------------------------- */

static void
worker_set_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGPIPE, &sa, NULL);
	sa.sa_handler = SIG_DFL;
	sigaction(SIGCHLD, &sa, NULL);
	sigaction(SIGQUIT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(WORKER_RETIRE_SIGNAL, &sa, NULL);
}

/* If the master dies without stopping us (SIGKILL), stop gracefully too
 * rather than serve forever with nobody to reload or respawn. */
static void
worker_follow_master(pid_t master_pid)
{
#ifdef PR_SET_PDEATHSIG
	(void)prctl(PR_SET_PDEATHSIG, WORKER_STOP_SIGNAL, 0, 0, 0);
	if (getppid() != master_pid)
		raise(WORKER_STOP_SIGNAL);
#else
	(void)master_pid;
#endif
}

/* Without its writer the queue cannot take messages: they are refused
 * with 452 (try later), and the worker serves on. */
static void
worker_open_queue(struct worker *w, const struct worker_params *p)
{
	const struct queue_cfg *q = &w->cfg->queue;
	char err[512];

	if (!q->enabled)
		return;
	if (spool_prepare(q->dir, false, 0, 0, err, sizeof(err)) < 0) {
		log_err("queue: %s; messages that cannot be relayed are refused with 452", err);
		return;
	}
	w->rt.spool = spool_writer_new(w->rt.base, q->dir, p->qstats, q->max_size, err,
	    sizeof(err));
	if (w->rt.spool == NULL)
		log_err("queue: %s; messages that cannot be relayed are refused with 452", err);
}

static int
worker_setup(struct worker *w, const struct worker_params *p)
{
	w->rt.base = event_base_new();
	if (w->rt.base == NULL)
		return -1;
	w->rt.dns = evdns_base_new(w->rt.base,
	    EVDNS_BASE_INITIALIZE_NAMESERVERS | EVDNS_BASE_DISABLE_WHEN_INACTIVE);
	if (w->rt.dns == NULL) {
		log_warn("cannot read the resolver configuration; using 127.0.0.1");
		w->rt.dns = evdns_base_new(w->rt.base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
		if (w->rt.dns == NULL || evdns_base_nameserver_ip_add(w->rt.dns, "127.0.0.1") < 0)
			return -1;
	}
	/* Each worker its own: the cache's key never leaves the process. */
	if ((w->rt.pwcache = passwd_cache_new()) == NULL)
		return -1;
	/* Threads started after the fork and the privilege drop. */
	if ((w->rt.pwcheck = passwd_offload_new(w->rt.base, w->rt.pwcache)) == NULL)
		return -1;
	w->ev_stop = evsignal_new(w->rt.base, WORKER_STOP_SIGNAL, worker_shut_down_cb, w);
	w->ev_retire = evsignal_new(w->rt.base, WORKER_RETIRE_SIGNAL, worker_retire_cb, w);
	w->ev_retire_end = evtimer_new(w->rt.base, worker_shut_down_cb, w);
	w->ev_reopen = evsignal_new(w->rt.base, SIGUSR1, worker_reopen_cb, w);
	w->ev_deadline = evtimer_new(w->rt.base, worker_deadline_cb, w);
	w->ev_accept_resume = evtimer_new(w->rt.base, worker_accept_resume_cb, w);
	w->trim = idle_trim_new(w->rt.base, IDLE_TRIM_MS);
	if (w->cfg->connection_cache.enabled &&
	    (w->rt.cache = upstream_cache_new(&w->cfg->connection_cache)) == NULL)
		return -1;
	/* Its own link to Redis, on this loop (after the privilege drop). */
	if (w->cfg->cluster.enabled && (w->rt.cluster = cluster_new(&w->rt)) == NULL)
		return -1;
	if (w->ev_stop == NULL || w->ev_retire == NULL || w->ev_retire_end == NULL ||
	    w->ev_reopen == NULL || w->ev_deadline == NULL ||
	    w->ev_accept_resume == NULL || w->trim == NULL)
		return -1;
	if (event_add(w->ev_stop, NULL) < 0 || event_add(w->ev_retire, NULL) < 0 ||
	    event_add(w->ev_reopen, NULL) < 0)
		return -1;
	worker_open_queue(w, p);
	return worker_open_listeners(w, p->listen_fds);
}

static void
event_free_if(struct event *ev)
{
	if (ev != NULL)
		event_free(ev);
}

/* How much hashing the cache saved, once per worker, when there was any. */
static void
log_password_cache(const struct passwd_cache *c)
{
	unsigned long hits, computed;

	passwd_cache_stats(c, &hits, &computed);
	if (computed > 0)
		log_info("password hashes: computed=%lu cached=%lu", computed, hits);
}

/*
 * The loop is over. A stop or retire signal now (the master sends SIGTERM
 * to every child when it stops, retiring ones included) would find the
 * default action and kill the process halfway through freeing; there is
 * nothing left for it to stop, so it waits, blocked, until the exit.
 */
static void
worker_block_stop_signals(void)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, WORKER_STOP_SIGNAL);
	sigaddset(&set, WORKER_RETIRE_SIGNAL);
	sigprocmask(SIG_BLOCK, &set, NULL);
}

static void
worker_cleanup(struct worker *w)
{
	worker_block_stop_signals();
	w->exiting = true;
	while (w->clients != NULL) {
		struct client *c = w->clients;

		if (!c->dead && c->session != NULL)
			smtp_session_abort(c->session);
		client_free(c);
	}
	worker_close_listeners(w);
	free(w->listeners);
	event_free_if(w->ev_stop);
	event_free_if(w->ev_reopen);
	event_free_if(w->ev_deadline);
	event_free_if(w->ev_accept_resume);
	idle_trim_free(w->trim);
	event_free_if(w->ev_retire);
	event_free_if(w->ev_retire_end);
	upstream_free_lingering(&w->rt);
	upstream_cache_free(w->rt.cache);
	/* The last ENDs go out before the link does. */
	cluster_flush(w->rt.cluster);
	cluster_free(w->rt.cluster);
	/* After the sessions: they cancelled their checks; the threads are
	 * joined here. */
	passwd_offload_free(w->rt.pwcheck);
	log_password_cache(w->rt.pwcache);
	passwd_cache_free(w->rt.pwcache);
	/* Waits for the writes under way: a message the thread has begun is
	 * committed, not left half-written. */
	spool_writer_free(w->rt.spool);
	if (w->rt.dns != NULL)
		evdns_base_free(w->rt.dns, 0);
	if (w->rt.base != NULL)
		event_base_free(w->rt.base);
	config_free(w->cfg);
}

int
worker_run(const struct worker_params *p)
{
	struct worker w;
	char role[32];
	int status = 0;

	memset(&w, 0, sizeof(w));
	w.cfg = p->cfg;
	w.generation = p->generation;
	w.rt.cfg = p->cfg;
	w.rt.health = p->health;
	w.rt.clients = p->clients;
	w.room = p->room;
	w.rt.tokens = p->tokens;
	w.rt.worker_slot = p->slot;
	snprintf(role, sizeof(role), "worker[%u]", p->slot);
	log_set_role(role);
	worker_set_signals();
	if (privdrop_apply(p->priv) < 0) {
		config_free(w.cfg);
		return 3;
	}
	worker_follow_master(p->master_pid);
	if (worker_setup(&w, p) < 0) {
		log_err("worker setup failed: %s", strerror(errno));
		status = 3;
	} else {
		/* Signals that arrived since fork are delivered to the loop now. */
		sigprocmask(SIG_SETMASK, p->sigmask, NULL);
		log_debug("started: generation=%u pid=%ld", p->generation, (long)getpid());
		event_base_dispatch(w.rt.base);
		log_debug("exiting: generation=%u", p->generation);
	}
	worker_cleanup(&w);
	return status;
}

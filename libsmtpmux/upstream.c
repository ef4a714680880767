/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <event2/buffer.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <event2/util.h>

#include "auth.h"
#include "conn.h"
#include "log.h"
#include "netaddr.h"
#include "smtp_data.h"
#include "upstream.h"

/*
 * One attempt is a state machine driven by the downstream's replies. Each
 * state waits for exactly one thing (an address, a connection, a
 * handshake, a reply, room in the output buffer) under one timer, so a
 * silent or slow downstream costs a timer and a socket, never the loop.
 *
 * The result is reported as soon as it is known (the reply to the final
 * dot decides); the object then lingers briefly to say QUIT and frees
 * itself. The caller's handle is invalid from the moment done is called.
 *
 * Nothing this file sends comes from client text: commands are rebuilt
 * from fields the inbound parser validated, and send_cmd() refuses any
 * line that would still contain CR, LF or NUL.
 */

#define BODY_CHUNK      (64 * 1024)      /* one msgbody_read() */
#define BODY_HIGH_WATER (256 * 1024)     /* refill only below this much unsent */
#define REPLY_MAX       (64 * 1024)      /* a reply longer than this is garbage */
#define QUIT_LINGER_S   10               /* the result is known; 221 is courtesy */

enum up_state {
	UP_START,              /* deferred start pending (done is never synchronous) */
	UP_RESOLVING,          /* evdns_getaddrinfo */
	UP_CONNECTING,         /* non-blocking connect to ai_next */
	UP_TLS_HANDSHAKE,      /* implicit TLS, or after 220 to STARTTLS */
	UP_GREETING,           /* waiting for 220 */
	UP_EHLO,
	UP_HELO,               /* EHLO was refused with 5xx */
	UP_STARTTLS,
	UP_AUTH,               /* waiting for 235 */
	UP_AUTH_LOGIN_USER,    /* waiting for 334 to AUTH LOGIN */
	UP_AUTH_LOGIN_PASS,    /* waiting for 334 after the user name */
	UP_ENVELOPE,           /* replies to MAIL, RCPT..., DATA (maybe pipelined) */
	UP_BODY,               /* streaming the message */
	UP_DOT,                /* waiting for the reply to the final dot */
	UP_QUIT                /* result reported: QUIT sent or closing */
};

/*
 * evdns may call back after a cancel; the ticket outlives the attempt so
 * that the late callback finds no attempt rather than a freed one.
 */
struct dns_ticket {
	struct upstream *up;
};

struct upstream {
	struct runtime *rt;
	const struct downstream_cfg *ds;
	const struct upstream_msg *msg;      /* NULL for a probe */
	upstream_done_fn done;
	void *arg;

	enum up_state state;
	const char *stage;                   /* reported on failure */
	const char *waiting;                 /* for timeout texts */
	struct event *timer;
	struct conn *conn;

	struct dns_ticket *dns;              /* pending evdns request, if any */
	struct evdns_getaddrinfo_request *dns_req;
	struct evutil_addrinfo *ai_list;     /* from evdns: evutil_freeaddrinfo */
	struct evutil_addrinfo *ai_next;
	struct sockaddr_storage numeric;     /* numeric hosts skip evdns */
	socklen_t numeric_len;
	bool numeric_pending;
	char peer[INET6_ADDRSTRLEN + 16];    /* "127.0.0.1:2526" being tried */
	bool in_connect;                     /* callbacks inside conn_connect() */
	bool connect_failed, connect_early;
	char connect_err[160];

	bool tls_active;
	struct smtp_reply caps;              /* capabilities of the last EHLO */

	size_t env_total;                    /* MAIL + RCPTs + DATA */
	size_t env_sent, env_got;

	struct smtp_data_writer writer;
	uint64_t body_off;
	char *chunk;
	bool in_refill, refill_again;

	struct timeval t0;

	/* In rt->lingering while it waits for the reply to QUIT. */
	struct upstream *linger_next, **linger_prev;
};

static void up_on_read(struct conn *, void *);
static void up_on_flushed(struct conn *, void *);
static void up_on_connected(struct conn *, void *);
static void up_on_tls_ready(struct conn *, void *);
static void up_on_error(struct conn *, void *, enum conn_event, const char *);

static const struct conn_cbs up_cbs = {
	.on_read = up_on_read,
	.on_flushed = up_on_flushed,
	.on_connected = up_on_connected,
	.on_tls_ready = up_on_tls_ready,
	.on_error = up_on_error,
};

static void try_next_address(struct upstream *);

/* --- small helpers ----------------------------------------------------- */

static unsigned
limit_or(unsigned v, unsigned dflt)
{
	return v != 0 ? v : dflt;
}

static unsigned
timeout_reply(const struct upstream *up)
{
	return limit_or(up->rt->cfg != NULL ? up->rt->cfg->limits.upstream_timeout : 0, 300);
}

/* Capped so that the milliseconds handed to conn_connect() and the
 * second of slack on our own timer cannot wrap around to a tiny value. */
static unsigned
timeout_connect(const struct upstream *up)
{
	unsigned s = limit_or(up->rt->cfg != NULL ? up->rt->cfg->limits.upstream_connect_timeout : 0, 30);

	return s < UINT_MAX / 1000 ? s : UINT_MAX / 1000 - 1;
}

static unsigned
timeout_dot(const struct upstream *up)
{
	return limit_or(up->rt->cfg != NULL ? up->rt->cfg->limits.upstream_data_timeout : 0, 600);
}

static void
arm_timer(struct upstream *up, unsigned seconds, const char *waiting)
{
	struct timeval tv = { .tv_sec = seconds, .tv_usec = 0 };

	up->waiting = waiting;
	evtimer_add(up->timer, &tv);
}

static unsigned
elapsed_ms(const struct timeval *t0)
{
	struct timeval now, d;

	gettimeofday(&now, NULL);
	timersub(&now, t0, &d);
	if (d.tv_sec < 0)
		return 0;
	return (unsigned)d.tv_sec * 1000 + (unsigned)(d.tv_usec / 1000);
}

static bool
has_user(const struct downstream_cfg *ds)
{
	return ds->user != NULL && ds->user[0] != '\0';
}

static const char *
helo_name(const struct upstream *up)
{
	const struct config *cfg = up->rt->cfg;

	return cfg != NULL && cfg->hostname != NULL && cfg->hostname[0] != '\0' ?
	    cfg->hostname : "localhost";
}

/* Nothing else owns an attempt that is only saying QUIT: the runtime's
 * list lets upstream_free_lingering() reclaim it when the loop ends. */
static void
linger_add(struct upstream *up)
{
	up->linger_next = up->rt->lingering;
	if (up->linger_next != NULL)
		up->linger_next->linger_prev = &up->linger_next;
	up->linger_prev = &up->rt->lingering;
	up->rt->lingering = up;
}

static void
up_free(struct upstream *up)
{
	if (up->linger_prev != NULL) {
		*up->linger_prev = up->linger_next;
		if (up->linger_next != NULL)
			up->linger_next->linger_prev = up->linger_prev;
	}
	if (up->dns != NULL) {
		/* The callback still comes (with EVUTIL_EAI_CANCEL) and frees the ticket. */
		up->dns->up = NULL;
		up->dns = NULL;
		if (up->dns_req != NULL)
			evdns_getaddrinfo_cancel(up->dns_req);
	}
	if (up->conn != NULL)
		conn_free(up->conn);
	if (up->ai_list != NULL)
		evutil_freeaddrinfo(up->ai_list);
	if (up->timer != NULL)
		event_free(up->timer);
	free(up->chunk);
	free(up);
}

/* --- finishing ----------------------------------------------------------- */

/*
 * Reports the result once, then says QUIT when the session is at a command
 * boundary. A session stopped in the middle of DATA is closed without the
 * final dot, which is what makes the downstream drop the transaction. The
 * object never frees itself here: callers may be deep in a conn callback.
 */
static void
finish(struct upstream *up, enum upstream_status status, const char *stage,
    int code, const char *enhanced, bool throttle, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

static void
finish(struct upstream *up, enum upstream_status status, const char *stage,
    int code, const char *enhanced, bool throttle, const char *fmt, ...)
{
	struct upstream_result res;
	upstream_done_fn done = up->done;
	void *arg = up->arg;
	bool at_boundary;
	va_list ap;

	if (up->state == UP_QUIT)
		return;
	memset(&res, 0, sizeof(res));
	res.status = status;
	res.throttle = throttle;
	res.stage = stage;
	res.code = code;
	snprintf(res.enhanced, sizeof(res.enhanced), "%s", enhanced != NULL ? enhanced : "");
	va_start(ap, fmt);
	vsnprintf(res.text, sizeof(res.text), fmt, ap);
	va_end(ap);
	res.latency_ms = elapsed_ms(&up->t0);
	if (up->conn != NULL && up->tls_active)
		snprintf(res.tls_desc, sizeof(res.tls_desc), "%s", conn_tls_desc(up->conn));

	/*
	 * Not at a boundary: mid-handshake, mid-body, with a pipelined DATA
	 * whose 354 may still come (QUIT would then be message text), or with
	 * the end of the body and its final dot still unsent: flushing them now
	 * would deliver a message already reported as failed (and tried
	 * elsewhere), so they are dropped with the connection.
	 */
	at_boundary = up->conn != NULL && up->state != UP_CONNECTING &&
	    up->state != UP_TLS_HANDSHAKE && up->state != UP_BODY &&
	    !(up->state == UP_DOT && conn_pending_output(up->conn) > 0) &&
	    !(up->state == UP_ENVELOPE && up->env_sent == up->env_total &&
	    up->env_got + 1 < up->env_total);
	up->state = UP_QUIT;
	up->done = NULL;
	up->msg = NULL;                      /* the caller may free it from done */
	evtimer_del(up->timer);
	if (at_boundary) {
		evbuffer_add(conn_output(up->conn), "QUIT\r\n", 6);
		conn_flush(up->conn);
		linger_add(up);
		arm_timer(up, QUIT_LINGER_S < timeout_reply(up) ? QUIT_LINGER_S : timeout_reply(up),
		    "reply to QUIT");
	} else {
		if (up->conn != NULL) {
			conn_free(up->conn);
			up->conn = NULL;
		}
		arm_timer(up, 0, "nothing");     /* frees the object from the loop */
	}
	if (done != NULL)
		done(arg, &res);
}

static enum upstream_status
status_of(const struct smtp_reply *r)
{
	return r->code >= 500 && r->code < 600 ? UPSTREAM_PERMFAIL : UPSTREAM_TEMPFAIL;
}

/* A reply that ends the attempt: its code decides the status. */
static void
fail_reply(struct upstream *up, const char *stage, const struct smtp_reply *r)
{
	if (smtp_reply_ok(r) || r->code < 400) {
		/* e.g. 250 where 354 belongs: a confused server, not a verdict */
		finish(up, UPSTREAM_TEMPFAIL, stage, r->code, r->enhanced, false,
		    "unexpected reply: %s", r->text);
		return;
	}
	finish(up, status_of(r), stage, r->code, r->enhanced,
	    smtp_reply_is_throttle(r), "%s", r->text);
}

/* --- sending commands ------------------------------------------------- */

/*
 * Appends one command line. Fields were validated inbound; this is the last
 * line of defence against a CR, LF or NUL smuggling a second command. The
 * line is not flushed: pipelined commands go out in one write.
 */
static int
queue_cmd(struct upstream *up, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int
queue_cmd(struct upstream *up, const char *fmt, ...)
{
	char line[SMTP_CMD_LINE_MAX + 64];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(line) || strlen(line) != (size_t)n ||
	    strpbrk(line, "\r\n") != NULL) {
		log_warn("relay=%s: refusing to send a malformed %s command",
		    up->ds->name, up->stage);
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "refusing to send a command containing CR, LF or NUL");
		return -1;
	}
	evbuffer_add(conn_output(up->conn), line, (size_t)n);
	evbuffer_add(conn_output(up->conn), "\r\n", 2);
	return 0;
}

static int
send_cmd(struct upstream *up, const char *cmd)
{
	if (queue_cmd(up, "%s", cmd) == -1)
		return -1;
	conn_flush(up->conn);
	return 0;
}

static void
expect(struct upstream *up, enum up_state state, const char *stage, const char *waiting)
{
	up->state = state;
	up->stage = stage;
	arm_timer(up, timeout_reply(up), waiting);
}

/* --- connection set-up -------------------------------------------------- */

static void
start_tls(struct upstream *up)
{
	if (up->ds->tls_client == NULL) {
		finish(up, UPSTREAM_TEMPFAIL, "tls", 0, "", false,
		    "no TLS client context for this downstream");
		return;
	}
	up->state = UP_TLS_HANDSHAKE;
	up->stage = "tls";
	arm_timer(up, timeout_reply(up), "TLS handshake");
	if (conn_start_tls_client(up->conn, up->ds->tls_client, up->ds->host) == -1 &&
	    up->state == UP_TLS_HANDSHAKE)
		finish(up, UPSTREAM_TEMPFAIL, "tls", 0, "", false,
		    "TLS: cannot start the handshake");
}

static void
send_ehlo(struct upstream *up)
{
	char cmd[SMTP_DOMAIN_MAX + 8];

	memset(&up->caps, 0, sizeof(up->caps));
	snprintf(cmd, sizeof(cmd), "EHLO %s", helo_name(up));
	if (send_cmd(up, cmd) == 0)
		expect(up, UP_EHLO, "ehlo", "reply to EHLO");
}

static void
send_helo(struct upstream *up)
{
	char cmd[SMTP_DOMAIN_MAX + 8];

	memset(&up->caps, 0, sizeof(up->caps));
	snprintf(cmd, sizeof(cmd), "HELO %s", helo_name(up));
	if (send_cmd(up, cmd) == 0)
		expect(up, UP_HELO, "ehlo", "reply to HELO");
}

static void start_envelope(struct upstream *);

/*
 * Credentials go only over TLS, or in the clear when the administrator
 * wrote `tls: none` for this downstream; a default that happens to be
 * plain never leaks them.
 */
static void
start_auth(struct upstream *up)
{
	const struct downstream_cfg *ds = up->ds;

	up->stage = "auth";
	if (!up->tls_active && !(ds->tls == TLS_MODE_NONE && ds->tls_explicit)) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false,
		    "refusing to send credentials without TLS");
		return;
	}
	if (up->caps.cap_auth_plain) {
		if (auth_plain_encode(ds->user, ds->pass != NULL ? ds->pass : "",
		    conn_output(up->conn)) == -1) {
			finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false,
			    "cannot encode AUTH PLAIN credentials");
			return;
		}
		conn_flush(up->conn);
		expect(up, UP_AUTH, "auth", "reply to AUTH");
	} else if (up->caps.cap_auth_login) {
		if (send_cmd(up, "AUTH LOGIN") == 0)
			expect(up, UP_AUTH_LOGIN_USER, "auth", "reply to AUTH LOGIN");
	} else
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false,
		    "downstream offers neither AUTH PLAIN nor AUTH LOGIN");
}

/* One base64 step of AUTH LOGIN; the encoded secret is wiped after use. */
static int
send_login_step(struct upstream *up, const char *secret)
{
	char b64[2 * AUTH_FIELD_MAX + 8];
	int rc = 0;

	if (auth_b64_encode(secret, strlen(secret), b64, sizeof(b64)) == -1) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false,
		    "cannot encode AUTH LOGIN credentials");
		rc = -1;
	} else {
		evbuffer_add(conn_output(up->conn), b64, strlen(b64));
		evbuffer_add(conn_output(up->conn), "\r\n", 2);
		conn_flush(up->conn);
	}
	auth_wipe(b64, sizeof(b64));
	return rc;
}

/* After a good EHLO/HELO: STARTTLS, AUTH or the envelope, as configured. */
static void
after_ehlo(struct upstream *up)
{
	if (up->ds->tls == TLS_MODE_STARTTLS && !up->tls_active) {
		if (!up->caps.cap_starttls) {
			finish(up, UPSTREAM_TEMPFAIL, "tls", 0, "", false,
			    "downstream does not offer STARTTLS");
			return;
		}
		if (send_cmd(up, "STARTTLS") == 0)
			expect(up, UP_STARTTLS, "tls", "reply to STARTTLS");
		return;
	}
	if (up->msg == NULL) {
		finish(up, UPSTREAM_OK, "ehlo", 250, "", false, "probe ok");
		return;
	}
	if (has_user(up->ds))
		start_auth(up);
	else
		start_envelope(up);
}

/* --- the transaction ---------------------------------------------------- */

/* Queues the envelope command with index i: MAIL, RCPT..., DATA. */
static int
queue_envelope_cmd(struct upstream *up, size_t i)
{
	const struct upstream_msg *msg = up->msg;
	char size_param[32] = "";

	if (i == 0) {
		if (up->caps.cap_size)
			snprintf(size_param, sizeof(size_param), " SIZE=%llu",
			    (unsigned long long)msgbody_size(msg->data));
		return queue_cmd(up, "MAIL FROM:<%s>%s%s", msg->mail_from,
		    msg->body == SMTP_BODY_8BITMIME && up->caps.cap_8bitmime ?
		    " BODY=8BITMIME" : "", size_param);
	}
	if (i <= msg->n_rcpts)
		return queue_cmd(up, "RCPT TO:<%s>", msg->rcpts[i - 1]);
	return queue_cmd(up, "DATA");
}

static const char *
envelope_stage(const struct upstream *up, size_t i)
{
	return i == 0 ? "mail" : i <= up->msg->n_rcpts ? "rcpt" : "data";
}

static const char *
envelope_waiting(const struct upstream *up, size_t i)
{
	return i == 0 ? "reply to MAIL" : i <= up->msg->n_rcpts ?
	    "reply to RCPT" : "reply to DATA";
}

/*
 * With PIPELINING the whole envelope goes out in one write and the replies
 * are matched to the commands by position (RFC 2920 3.1).
 */
static void
start_envelope(struct upstream *up)
{
	size_t n;

	up->state = UP_ENVELOPE;
	up->env_total = up->msg->n_rcpts + 2;
	up->env_sent = up->env_got = 0;
	n = up->caps.cap_pipelining ? up->env_total : 1;
	while (up->env_sent < n) {
		up->stage = envelope_stage(up, up->env_sent);
		if (queue_envelope_cmd(up, up->env_sent) == -1)
			return;
		up->env_sent++;
	}
	conn_flush(up->conn);
	if (up->state == UP_ENVELOPE) {
		up->stage = envelope_stage(up, 0);
		arm_timer(up, timeout_reply(up), envelope_waiting(up, 0));
	}
}

static void refill_body(struct upstream *);

static void
start_body(struct upstream *up)
{
	if (up->chunk == NULL && (up->chunk = malloc(BODY_CHUNK)) == NULL) {
		finish(up, UPSTREAM_TEMPFAIL, "data", 0, "", false, "out of memory");
		return;
	}
	up->state = UP_BODY;
	up->stage = "data";
	up->body_off = 0;
	smtp_data_writer_init(&up->writer);
	refill_body(up);
}

/*
 * Keeps at most about BODY_HIGH_WATER octets queued: a 10 MB body from a
 * temp file is read and stuffed one chunk at a time as the socket drains
 * (on_flushed), never loaded whole. conn_flush() may call back into us
 * (on_flushed or on_error), hence the re-entry guard and state checks.
 */
static void
refill_body(struct upstream *up)
{
	uint64_t size;
	ssize_t n;

	if (up->in_refill) {
		up->refill_again = true;
		return;
	}
	up->in_refill = true;
	do {
		up->refill_again = false;
		size = msgbody_size(up->msg->data);
		while (up->body_off < size && conn_pending_output(up->conn) < BODY_HIGH_WATER) {
			n = msgbody_read(up->msg->data, up->body_off, up->chunk, BODY_CHUNK);
			if (n <= 0) {
				int e = n < 0 ? errno : EIO;
				up->in_refill = false;
				finish(up, UPSTREAM_TEMPFAIL, "data", 0, "", false,
				    "reading the message body: %s", strerror(e));
				return;
			}
			smtp_data_write(&up->writer, up->chunk, (size_t)n, conn_output(up->conn));
			up->body_off += (uint64_t)n;
		}
		if (up->body_off >= size) {
			smtp_data_writer_finish(&up->writer, conn_output(up->conn));
			up->state = UP_DOT;
			up->stage = "dot";
			arm_timer(up, timeout_dot(up), "reply to end of data");
		} else
			arm_timer(up, timeout_reply(up), "the downstream to accept message data");
		conn_flush(up->conn);
	} while (up->refill_again && up->state == UP_BODY);
	up->in_refill = false;
}

/* --- replies -------------------------------------------------------------- */

static void
on_envelope_reply(struct upstream *up, const struct smtp_reply *r)
{
	size_t i = up->env_got;

	up->stage = envelope_stage(up, i);
	if (i + 1 == up->env_total) {
		if (r->code == 354)
			start_body(up);
		else
			fail_reply(up, "data", r);
		return;
	}
	/*
	 * Any refused recipient fails the attempt: the client was already told
	 * 250 for every RCPT, so all recipients go through one downstream or
	 * none; a partial delivery here plus a retry elsewhere would duplicate.
	 */
	if (!smtp_reply_ok(r) || r->code >= 300) {
		fail_reply(up, up->stage, r);
		return;
	}
	up->env_got++;
	if (up->env_sent == up->env_got) {
		if (queue_envelope_cmd(up, up->env_sent) == -1)
			return;
		up->env_sent++;
		conn_flush(up->conn);
		if (up->state != UP_ENVELOPE)
			return;
	}
	up->stage = envelope_stage(up, up->env_got);
	arm_timer(up, timeout_reply(up), envelope_waiting(up, up->env_got));
}

static void
handle_reply(struct upstream *up, const struct smtp_reply *r)
{
	switch (up->state) {
	case UP_GREETING:
		if (r->code == 220)
			send_ehlo(up);
		else
			fail_reply(up, "greeting", r);
		break;
	case UP_EHLO:
		if (smtp_reply_ok(r) && r->code < 300) {
			up->caps = *r;
			after_ehlo(up);
		} else if (r->code >= 500 && r->code < 600)
			send_helo(up);
		else
			fail_reply(up, "ehlo", r);
		break;
	case UP_HELO:
		if (smtp_reply_ok(r) && r->code < 300)
			after_ehlo(up);
		else
			fail_reply(up, "ehlo", r);
		break;
	case UP_STARTTLS:
		if (r->code == 220)
			start_tls(up);
		else
			fail_reply(up, "tls", r);
		break;
	case UP_AUTH:
		if (r->code == 235)
			start_envelope(up);
		else
			fail_reply(up, "auth", r);
		break;
	case UP_AUTH_LOGIN_USER:
	case UP_AUTH_LOGIN_PASS:
		if (r->code != 334) {
			fail_reply(up, "auth", r);
			break;
		}
		if (up->state == UP_AUTH_LOGIN_USER) {
			if (send_login_step(up, up->ds->user) == 0)
				expect(up, UP_AUTH_LOGIN_PASS, "auth", "reply to AUTH LOGIN");
		} else if (send_login_step(up, up->ds->pass != NULL ? up->ds->pass : "") == 0)
			expect(up, UP_AUTH, "auth", "reply to AUTH LOGIN");
		break;
	case UP_ENVELOPE:
		on_envelope_reply(up, r);
		break;
	case UP_BODY:
		/* An early reply while we stream: the server gave up on the message. */
		fail_reply(up, "data", r);
		break;
	case UP_DOT:
		if (smtp_reply_ok(r) && r->code < 300)
			finish(up, UPSTREAM_OK, "dot", r->code, r->enhanced, false, "%s", r->text);
		else
			fail_reply(up, "dot", r);
		break;
	default:
		finish(up, UPSTREAM_TEMPFAIL, up->stage, r->code, r->enhanced, false,
		    "unexpected reply from downstream: %s", r->text);
		break;
	}
}

static bool
awaiting_reply(enum up_state s)
{
	switch (s) {
	case UP_GREETING: case UP_EHLO: case UP_HELO: case UP_STARTTLS:
	case UP_AUTH: case UP_AUTH_LOGIN_USER: case UP_AUTH_LOGIN_PASS:
	case UP_ENVELOPE: case UP_BODY: case UP_DOT:
		return true;
	default:
		return false;
	}
}

static void
up_on_read(struct conn *conn, void *arg)
{
	struct upstream *up = arg;
	struct evbuffer *in = conn_input(conn);
	struct smtp_reply r;
	size_t len;
	long n;

	if (up->state == UP_QUIT) {
		up_free(up);                 /* 221 or anything: we are done */
		return;
	}
	while (awaiting_reply(up->state) && (len = evbuffer_get_length(in)) > 0) {
		const char *data = (const char *)evbuffer_pullup(in, -1);

		memset(&r, 0, sizeof(r));
		n = smtp_reply_parse(data, len, up->state == UP_EHLO, &r);
		if (n < 0) {
			finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
			    "malformed reply from downstream");
			return;
		}
		if (n == 0) {
			if (len > REPLY_MAX)
				finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
				    "reply from downstream too long");
			return;
		}
		evbuffer_drain(in, (size_t)n);
		handle_reply(up, &r);
	}
}

static void
up_on_flushed(struct conn *conn, void *arg)
{
	struct upstream *up = arg;

	(void)conn;
	if (up->state == UP_BODY)
		refill_body(up);
}

static void
connected(struct upstream *up)
{
	conn_set_timeout(up->conn, 0);       /* our timer covers every wait */
	if (up->ds->tls == TLS_MODE_IMPLICIT)
		start_tls(up);
	else
		expect(up, UP_GREETING, "greeting", "greeting");
}

static void
up_on_connected(struct conn *conn, void *arg)
{
	struct upstream *up = arg;

	(void)conn;
	if (up->in_connect) {
		up->connect_early = true;    /* conn_connect() has not returned yet */
		return;
	}
	connected(up);
}

static void
up_on_tls_ready(struct conn *conn, void *arg)
{
	struct upstream *up = arg;

	(void)conn;
	if (up->state != UP_TLS_HANDSHAKE)
		return;
	up->tls_active = true;
	if (up->ds->tls == TLS_MODE_IMPLICIT)
		expect(up, UP_GREETING, "greeting", "greeting");
	else
		send_ehlo(up);               /* only post-TLS capabilities count */
}

static const char *
stage_event_text(enum conn_event ev)
{
	switch (ev) {
	case CONN_EOF:     return "connection closed by downstream";
	case CONN_TIMEOUT: return "timeout";
	default:           return "I/O error";
	}
}

static void
up_on_error(struct conn *conn, void *arg, enum conn_event ev, const char *detail)
{
	struct upstream *up = arg;

	if (detail == NULL)
		detail = "";
	if (up->state == UP_CONNECTING) {
		/* conn's own text already reads "connect to ADDR:PORT: reason" */
		if (ev == CONN_TIMEOUT || strncmp(detail, "connect to ", 11) != 0)
			snprintf(up->connect_err, sizeof(up->connect_err), "connect to %s: %s",
			    up->peer, ev == CONN_TIMEOUT ? "timed out" : *detail ? detail : "failed");
		else
			snprintf(up->connect_err, sizeof(up->connect_err), "%s", detail);
		if (up->in_connect) {
			up->connect_failed = true;   /* conn_connect() returns next; handled there */
			return;
		}
		conn_free(conn);
		up->conn = NULL;
		try_next_address(up);
		return;
	}
	conn_free(conn);
	up->conn = NULL;
	if (up->state == UP_QUIT) {
		up_free(up);
		return;
	}
	if (ev == CONN_TLS_ERROR)
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false, "TLS: %s", detail);
	else if (up->state == UP_BODY)
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "%s during message transfer%s%s", stage_event_text(ev),
		    *detail ? ": " : "", detail);
	else
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "%s while waiting for %s%s%s", stage_event_text(ev), up->waiting,
		    *detail ? ": " : "", detail);
}

/* --- connecting ------------------------------------------------------------ */

static void
format_peer(struct upstream *up, const struct sockaddr *sa)
{
	char host[INET6_ADDRSTRLEN];

	netaddr_ntop(sa, host, sizeof(host));
	if (sa->sa_family == AF_INET6)
		snprintf(up->peer, sizeof(up->peer), "[%s]:%s", host, up->ds->port);
	else
		snprintf(up->peer, sizeof(up->peer), "%s:%s", host, up->ds->port);
}

/* Tries the addresses in turn; a connect failure moves to the next one. */
static void
try_next_address(struct upstream *up)
{
	const struct sockaddr *sa;
	socklen_t salen;
	struct conn *c;

	for (;;) {
		if (up->connect_err[0] != '\0')
			log_debug("relay=%s: %s", up->ds->name, up->connect_err);
		if (up->numeric_pending) {
			up->numeric_pending = false;
			sa = (const struct sockaddr *)&up->numeric;
			salen = up->numeric_len;
		} else if (up->ai_next != NULL) {
			sa = up->ai_next->ai_addr;
			salen = (socklen_t)up->ai_next->ai_addrlen;
			up->ai_next = up->ai_next->ai_next;
		} else {
			finish(up, UPSTREAM_TEMPFAIL, "connect", 0, "", false, "%s",
			    up->connect_err[0] ? up->connect_err : "no address to connect to");
			return;
		}
		format_peer(up, sa);
		up->state = UP_CONNECTING;
		up->stage = "connect";
		up->connect_failed = up->connect_early = false;
		up->in_connect = true;
		c = conn_connect(up->rt->base, sa, salen, timeout_connect(up) * 1000, &up_cbs, up);
		up->in_connect = false;
		if (c == NULL) {
			snprintf(up->connect_err, sizeof(up->connect_err), "connect to %s: %s",
			    up->peer, strerror(errno));
			continue;
		}
		if (up->connect_failed) {
			conn_free(c);
			continue;
		}
		up->conn = c;
		if (up->connect_early)
			connected(up);
		else
			arm_timer(up, timeout_connect(up) + 1, "connection");
		return;
	}
}

static void
dns_done(int result, struct evutil_addrinfo *ai, void *arg)
{
	struct dns_ticket *t = arg;
	struct upstream *up = t->up;

	free(t);
	if (up == NULL) {                    /* cancelled */
		if (ai != NULL)
			evutil_freeaddrinfo(ai);
		return;
	}
	up->dns = NULL;
	up->dns_req = NULL;
	if (result != 0) {
		if (ai != NULL)
			evutil_freeaddrinfo(ai);
		finish(up, UPSTREAM_TEMPFAIL, "connect", 0, "", false,
		    "resolve %s: %s", up->ds->host, evutil_gai_strerror(result));
		return;
	}
	up->ai_list = up->ai_next = ai;
	try_next_address(up);
}

static void
start_resolve(struct upstream *up)
{
	struct evutil_addrinfo hints;
	struct evdns_getaddrinfo_request *req;
	struct dns_ticket *t;

	up->state = UP_RESOLVING;
	up->stage = "connect";
	if (netaddr_numeric(up->ds->host, up->ds->port, &up->numeric, &up->numeric_len) == 0) {
		up->numeric_pending = true;
		try_next_address(up);
		return;
	}
	if (up->rt->dns == NULL || (t = calloc(1, sizeof(*t))) == NULL) {
		finish(up, UPSTREAM_TEMPFAIL, "connect", 0, "", false,
		    "resolve %s: no resolver", up->ds->host);
		return;
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_protocol = IPPROTO_TCP;
	hints.ai_flags = EVUTIL_AI_ADDRCONFIG;
	t->up = up;
	up->dns = t;
	arm_timer(up, timeout_connect(up), "name resolution");
	req = evdns_getaddrinfo(up->rt->dns, up->ds->host, up->ds->port, &hints, dns_done, t);
	if (up->dns == t)                    /* still pending (not answered synchronously) */
		up->dns_req = req;
}

/*
 * The same check as queue_cmd(), before anything is sent: a transaction
 * that could not be completed is not begun.
 */
static bool
envelope_clean(struct upstream *up)
{
	const struct upstream_msg *msg = up->msg;
	const char *bad = NULL;

	if (strpbrk(msg->mail_from, "\r\n") != NULL)
		bad = "mail";
	for (size_t i = 0; bad == NULL && i < msg->n_rcpts; i++)
		if (strpbrk(msg->rcpts[i], "\r\n") != NULL)
			bad = "rcpt";
	if (bad == NULL)
		return true;
	log_warn("id=%s relay=%s: refusing to send a malformed %s command",
	    msg->id, up->ds->name, bad);
	finish(up, UPSTREAM_TEMPFAIL, bad, 0, "", false,
	    "refusing to send a command containing CR, LF or NUL");
	return false;
}

static void
on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct upstream *up = arg;

	(void)fd;
	(void)what;
	switch (up->state) {
	case UP_START:
		if (up->msg == NULL || envelope_clean(up))
			start_resolve(up);
		break;
	case UP_QUIT:
		up_free(up);
		break;
	case UP_RESOLVING:
		finish(up, UPSTREAM_TEMPFAIL, "connect", 0, "", false,
		    "resolve %s: timed out", up->ds->host);
		break;
	case UP_CONNECTING:
		snprintf(up->connect_err, sizeof(up->connect_err), "connect to %s: timed out", up->peer);
		conn_free(up->conn);
		up->conn = NULL;
		try_next_address(up);
		break;
	case UP_BODY:
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "timeout waiting for %s", up->waiting);
		break;
	default:
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "timeout waiting for %s", up->waiting);
		break;
	}
}

/* --- public ------------------------------------------------------------------ */

static struct upstream *
up_new(struct runtime *rt, const struct downstream_cfg *ds,
    const struct upstream_msg *msg, upstream_done_fn done, void *arg)
{
	struct upstream *up;
	struct timeval now = { 0, 0 };

	if ((up = calloc(1, sizeof(*up))) == NULL)
		return NULL;
	up->rt = rt;
	up->ds = ds;
	up->msg = msg;
	up->done = done;
	up->arg = arg;
	up->state = UP_START;
	up->stage = "connect";
	gettimeofday(&up->t0, NULL);
	if ((up->timer = evtimer_new(rt->base, on_timer, up)) == NULL) {
		free(up);
		return NULL;
	}
	/* Start from the loop, so done never runs inside upstream_start(). */
	evtimer_add(up->timer, &now);
	return up;
}

struct upstream *
upstream_start(struct runtime *rt, const struct downstream_cfg *ds,
    const struct upstream_msg *msg, upstream_done_fn done, void *arg)
{
	if (msg == NULL || msg->data == NULL)
		return NULL;
	return up_new(rt, ds, msg, done, arg);
}

struct upstream *
upstream_probe(struct runtime *rt, const struct downstream_cfg *ds,
    upstream_done_fn done, void *arg)
{
	return up_new(rt, ds, NULL, done, arg);
}

void
upstream_cancel(struct upstream *up)
{
	if (up == NULL)
		return;
	up->done = NULL;
	up_free(up);
}

void
upstream_free_lingering(struct runtime *rt)
{
	while (rt->lingering != NULL)
		up_free(rt->lingering);
}

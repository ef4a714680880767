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
#include "from_rewrite.h"
#include "log.h"
#include "netaddr.h"
#include "sasl_oauth.h"
#include "smtp_data.h"
#include "token_table.h"
#include "upstream.h"
#include "upstream_cache.h"

/*
 * A session with a downstream is a state machine driven by its replies,
 * and every wait (an address, a connection, a handshake, a reply, room in
 * the output buffer) runs under one timer, so a silent or slow downstream
 * costs a timer and a socket, never the loop.
 *
 * Replies are matched to what was asked. Every command sent pushes what it
 * awaits onto a queue (RFC 2920 pipelining is the same mechanism with more
 * entries at once), and each complete reply answers the oldest entry - but
 * only if that command had left our output buffer, and only if the reply
 * came after the command was queued. Anything else is unsolicited and
 * fails the attempt: a "250" glued to a 354 is never the reply to a final
 * dot that had not been sent, and a "250" before MAIL is never MAIL's.
 *
 * The result is reported as soon as it is known (the reply to the final
 * dot decides). The session then goes to the connection cache, logged in,
 * or says QUIT and frees itself. The caller's handle is invalid from the
 * moment done is called.
 *
 * Nothing this file sends comes from client text: commands are rebuilt
 * from fields the inbound parser validated, and queue_cmd() refuses any
 * line that would still contain CR, LF or NUL.
 */

#define BODY_CHUNK      (64 * 1024)      /* one msgbody_read() */
#define BODY_HIGH_WATER (256 * 1024)     /* refill only below this much unsent */
#define REPLY_MAX       (64 * 1024)      /* a reply longer than this is garbage */
#define QUIT_LINGER_S   10               /* the result is known; 221 is courtesy */

enum up_mode {
	MODE_ATTEMPT,          /* delivers msg */
	MODE_PROBE,            /* connect, EHLO, QUIT: a health probe */
	MODE_PREPARE           /* early connect: logs in, waits for upstream_adopt() */
};

enum up_state {
	UP_START,              /* deferred start pending (done is never synchronous) */
	UP_RESOLVING,          /* evdns_getaddrinfo */
	UP_CONNECTING,         /* non-blocking connect to ai_next */
	UP_TLS_HANDSHAKE,      /* implicit TLS, or after 220 to STARTTLS */
	UP_SETUP,              /* greeting, EHLO/HELO, STARTTLS, AUTH */
	UP_READY,              /* logged in, no message: early, or idle in the cache */
	UP_RESUME,             /* a ready session got a message; the loop starts it */
	UP_ENVELOPE,           /* replies to RSET, MAIL, RCPT..., DATA */
	UP_BODY,               /* streaming the message */
	UP_DOT,                /* waiting for the reply to the final dot */
	UP_QUIT,               /* done with: QUIT sent, or closing */
	UP_DEAD                /* an early session that failed; adopt reconnects */
};

/* What a command sent is waiting for. */
enum await_kind {
	AW_GREETING, AW_EHLO, AW_HELO, AW_STARTTLS, AW_AUTH,
	AW_RSET, AW_MAIL, AW_RCPT, AW_DATA, AW_DOT
};

struct awaited {
	enum await_kind kind;
	uint64_t in_mark;      /* input octets received when it was queued */
	uint64_t out_end;      /* output octets up to the end of the command */
};

/*
 * How to log in. auth_choose() is the one place that picks a mechanism;
 * begin sends the AUTH command (with its initial response, if any) and
 * answer replies to the server's 334 challenges, step 0 first. Both push
 * AW_AUTH for the reply they expect; the final 235 ends the exchange.
 */
struct auth_mech {
	const char *name;
	int (*begin)(struct upstream *);
	int (*answer)(struct upstream *, unsigned step, const struct smtp_reply *challenge);
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
	enum up_mode mode;
	const struct upstream_msg *msg;      /* NULL: probe, early or idle session */
	upstream_done_fn done;
	void *arg;
	int64_t deadline_ms;                 /* 0: none */

	enum up_state state;
	const char *stage;                   /* reported on failure */
	const char *waiting;                 /* for timeout texts */
	bool timer_is_deadline;              /* the timer stands for the relay deadline */
	int64_t timer_due_ms;
	struct event *timer;
	struct conn *conn;
	struct evbuffer_cb_entry *out_counter;

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
	const struct auth_mech *mech;
	unsigned auth_step;
	uint64_t token_gen;                  /* the OAuth token sent, should it be refused */
	char token_refusal[128];             /* the server's OAuth error, decoded; "": none */

	/* Replies awaited, oldest at head; and the stream offsets they are
	 * checked against (see await_answerable()). */
	struct awaited *aw;
	size_t aw_head, aw_tail, aw_cap;
	uint64_t in_consumed;                /* input octets taken as replies */
	uint64_t out_added, out_sent;        /* kept by count_output() */

	size_t env_total, env_next;          /* MAIL, RCPT..., DATA */
	bool pipelining;
	uint64_t dot_end;                    /* out_added once the dot was queued */

	unsigned n_txn;                      /* transactions begun on this connection */
	bool resuming;                       /* back from idle: not proven alive yet */
	struct upstream_cache_entry entry;

	struct smtp_data_writer writer;
	struct from_rewrite *rewrite;        /* `rewrite_from:`, per message */
	uint64_t body_off;
	char *chunk;
	bool in_refill, refill_again;

	struct timeval t0;

	/* In rt->lingering while nobody else owns it (saying QUIT, closing). */
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
static void start_transaction(struct upstream *);

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

/*
 * Every wait is capped by the relay's deadline, so that one slow step
 * cannot spend the time meant for the next downstream, and the client
 * hears from us before it gives up (RFC 5321 4.5.3.2.6).
 */
static void
arm_timer_ms(struct upstream *up, int64_t ms, const char *waiting)
{
	struct timeval tv;
	int64_t now = runtime_now_ms();

	up->waiting = waiting;
	up->timer_is_deadline = false;
	if (up->deadline_ms != 0 && up->deadline_ms - now < ms) {
		ms = up->deadline_ms > now ? up->deadline_ms - now : 0;
		up->timer_is_deadline = true;
	}
	up->timer_due_ms = now + ms;
	tv.tv_sec = (time_t)(ms / 1000);
	tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
	evtimer_add(up->timer, &tv);
}

static void
arm_timer(struct upstream *up, unsigned seconds, const char *waiting)
{
	arm_timer_ms(up, (int64_t)seconds * 1000, waiting);
}

/* The next step runs from the loop, never inside the caller's call. */
static void
kick(struct upstream *up)
{
	struct timeval now = { 0, 0 };

	up->timer_is_deadline = false;
	up->waiting = "start";
	evtimer_add(up->timer, &now);
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

static const char *
msg_id(const struct upstream *up)
{
	return up->msg != NULL ? up->msg->id : "-";
}

/* Nothing else owns a session that is only saying QUIT or closing: the
 * runtime's list lets upstream_free_lingering() reclaim it when the loop
 * ends. */
static void
linger_add(struct upstream *up)
{
	if (up->linger_prev != NULL)
		return;
	up->linger_next = up->rt->lingering;
	if (up->linger_next != NULL)
		up->linger_next->linger_prev = &up->linger_next;
	up->linger_prev = &up->rt->lingering;
	up->rt->lingering = up;
}

/* Counts what enters and leaves the output buffer: a command has been
 * sent once out_sent has passed its end (see await_answerable()). */
static void
count_output(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
	struct upstream *up = arg;

	(void)buf;
	up->out_added += info->n_added;
	up->out_sent += info->n_deleted;
}

static void
attach_conn(struct upstream *up, struct conn *c)
{
	up->conn = c;
	up->in_consumed = up->out_added = up->out_sent = 0;
	up->out_counter = evbuffer_add_cb(conn_output(c), count_output, up);
}

static void
detach_conn(struct upstream *up)
{
	if (up->conn == NULL)
		return;
	if (up->out_counter != NULL)
		evbuffer_remove_cb_entry(conn_output(up->conn), up->out_counter);
	up->out_counter = NULL;
	conn_free(up->conn);
	up->conn = NULL;
}

static void
cancel_dns(struct upstream *up)
{
	if (up->dns == NULL)
		return;
	/* The callback still comes (with EVUTIL_EAI_CANCEL) and frees the ticket. */
	up->dns->up = NULL;
	up->dns = NULL;
	if (up->dns_req != NULL)
		evdns_getaddrinfo_cancel(up->dns_req);
	up->dns_req = NULL;
}

static void
up_free(struct upstream *up)
{
	if (up->linger_prev != NULL) {
		*up->linger_prev = up->linger_next;
		if (up->linger_next != NULL)
			up->linger_next->linger_prev = up->linger_prev;
	}
	if (up->entry.cached)
		upstream_cache_remove(up->rt->cache, &up->entry);
	cancel_dns(up);
	detach_conn(up);
	if (up->ai_list != NULL)
		evutil_freeaddrinfo(up->ai_list);
	if (up->timer != NULL)
		event_free(up->timer);
	free(up->aw);
	from_rewrite_free(up->rewrite);
	free(up->chunk);
	free(up);
}

/* --- awaited replies --------------------------------------------------- */

static const char *
await_stage(enum await_kind k)
{
	static const char *const names[] = {
		[AW_GREETING] = "greeting", [AW_EHLO] = "ehlo", [AW_HELO] = "ehlo",
		[AW_STARTTLS] = "tls", [AW_AUTH] = "auth", [AW_RSET] = "rset",
		[AW_MAIL] = "mail", [AW_RCPT] = "rcpt", [AW_DATA] = "data", [AW_DOT] = "dot",
	};

	return names[k];
}

static const char *
await_waiting(enum await_kind k)
{
	static const char *const names[] = {
		[AW_GREETING] = "greeting", [AW_EHLO] = "reply to EHLO",
		[AW_HELO] = "reply to HELO", [AW_STARTTLS] = "reply to STARTTLS",
		[AW_AUTH] = "reply to AUTH", [AW_RSET] = "reply to RSET",
		[AW_MAIL] = "reply to MAIL", [AW_RCPT] = "reply to RCPT",
		[AW_DATA] = "reply to DATA", [AW_DOT] = "reply to end of data",
	};

	return names[k];
}

static size_t
await_count(const struct upstream *up)
{
	return up->aw_tail - up->aw_head;
}

static const struct awaited *
await_head(const struct upstream *up)
{
	return await_count(up) > 0 ? &up->aw[up->aw_head] : NULL;
}

static void
await_clear(struct upstream *up)
{
	up->aw_head = up->aw_tail = 0;
}

/* Call right after the command's octets were appended to the output. */
static int
await_push(struct upstream *up, enum await_kind kind)
{
	if (up->aw_head == up->aw_tail)
		await_clear(up);
	if (up->aw_tail == up->aw_cap) {
		size_t cap = up->aw_cap ? up->aw_cap * 2 : 8;
		struct awaited *grown = realloc(up->aw, cap * sizeof(*grown));

		if (grown == NULL)
			return -1;
		up->aw = grown;
		up->aw_cap = cap;
	}
	up->aw[up->aw_tail++] = (struct awaited){
		.kind = kind,
		.in_mark = up->in_consumed + evbuffer_get_length(conn_input(up->conn)),
		.out_end = up->out_added,
	};
	return 0;
}

/*
 * A reply starting at input offset in_consumed can answer a only if its
 * command had been written before (a server cannot answer what it has
 * not received) and the reply was not already with us when the command
 * was queued. Either alone catches the 354-and-250-in-one-write server;
 * both keep holding whatever the connection layer's write timing.
 */
static bool
await_answerable(const struct upstream *up, const struct awaited *a)
{
	return up->in_consumed >= a->in_mark && up->out_sent >= a->out_end;
}

static bool
await_pending(const struct upstream *up, enum await_kind kind)
{
	for (size_t i = up->aw_head; i < up->aw_tail; i++)
		if (up->aw[i].kind == kind)
			return true;
	return false;
}

/* The timer for the oldest reply awaited; a resumed session gets the
 * connect timeout to prove it is alive. */
static void
arm_for_head(struct upstream *up)
{
	const struct awaited *a = await_head(up);
	unsigned secs;

	if (a == NULL) {
		evtimer_del(up->timer);
		return;
	}
	up->stage = await_stage(a->kind);
	secs = up->resuming ? timeout_connect(up) : a->kind == AW_DOT ? timeout_dot(up) :
	    timeout_reply(up);
	arm_timer(up, secs, await_waiting(a->kind));
}

/* --- closing ------------------------------------------------------------- */

/*
 * QUIT is sent only at a command boundary. Not mid-handshake; not while a
 * greeting, a STARTTLS or an AUTH reply is awaited (QUIT would be read as
 * TLS or SASL data); not with a pipelined DATA whose 354 may still come
 * (QUIT would be message text); not with the end of the body or its final
 * dot still unsent: flushing them now would deliver a message already
 * reported as failed and tried elsewhere, so they go with the connection.
 */
static bool
quit_allowed(const struct upstream *up)
{
	if (up->conn == NULL)
		return false;
	switch (up->state) {
	case UP_SETUP:
	case UP_READY:
	case UP_RESUME:
	case UP_ENVELOPE:
		break;
	case UP_DOT:
		if (conn_pending_output(up->conn) > 0)
			return false;
		break;
	default:
		return false;
	}
	return !await_pending(up, AW_GREETING) && !await_pending(up, AW_STARTTLS) &&
	    !await_pending(up, AW_AUTH) && !await_pending(up, AW_DATA);
}

/* Ends the session: QUIT where allowed, else the connection is closed.
 * Never frees synchronously: callers may be deep in a conn callback. */
static void
up_close(struct upstream *up)
{
	bool quit = quit_allowed(up);

	if (up->entry.cached)
		upstream_cache_remove(up->rt->cache, &up->entry);
	cancel_dns(up);
	up->state = UP_QUIT;
	up->done = NULL;
	up->msg = NULL;                      /* the caller may free it */
	up->deadline_ms = 0;
	evtimer_del(up->timer);
	linger_add(up);
	if (quit) {
		evbuffer_add(conn_output(up->conn), "QUIT\r\n", 6);
		conn_flush(up->conn);
		arm_timer(up, QUIT_LINGER_S < timeout_reply(up) ? QUIT_LINGER_S : timeout_reply(up),
		    "reply to QUIT");
	} else {
		detach_conn(up);
		kick(up);                        /* frees the object from the loop */
	}
}

/*
 * After a delivery (or a skip, which sent nothing): the session waits in
 * the cache, logged in, for the next message of its account - if there is
 * a cache, the session is clean (nothing awaited, nothing unread) and it
 * has not carried max_messages yet.
 */
static bool
park_idle(struct upstream *up)
{
	struct upstream_cache *cache = up->rt->cache;

	if (cache == NULL || up->mode == MODE_PROBE || up->conn == NULL ||
	    await_count(up) > 0 || evbuffer_get_length(conn_input(up->conn)) > 0 ||
	    conn_pending_output(up->conn) > 0 ||
	    up->n_txn >= upstream_cache_cfg(cache)->max_messages)
		return false;
	up->entry.up = up;
	up->entry.ds = up->ds;
	if (!upstream_cache_put(cache, &up->entry))
		return false;
	up->state = UP_READY;
	up->mode = MODE_ATTEMPT;
	up->done = NULL;
	up->msg = NULL;
	up->deadline_ms = 0;
	up->resuming = false;
	arm_timer(up, upstream_cache_cfg(cache)->idle_timeout, "idle");
	return true;
}

/* An early session that failed before any message was handed to it: no
 * result, no health record; upstream_adopt() will start afresh. */
static void
go_dead(struct upstream *up, const char *why)
{
	log_debug("relay=%s[%s]: early session failed: %s", up->ds->name, up->ds->addr, why);
	cancel_dns(up);
	detach_conn(up);
	evtimer_del(up->timer);
	up->state = UP_DEAD;
}

/* Forgets the connection and everything learnt on it. */
static void
reset_session(struct upstream *up)
{
	cancel_dns(up);
	detach_conn(up);
	if (up->ai_list != NULL)
		evutil_freeaddrinfo(up->ai_list);
	up->ai_list = up->ai_next = NULL;
	up->numeric_pending = false;
	up->connect_err[0] = '\0';
	up->tls_active = false;
	memset(&up->caps, 0, sizeof(up->caps));
	await_clear(up);
	up->n_txn = 0;
	up->resuming = false;
}

/*
 * A session back from idle failed before its first reply (closed, reset,
 * RSET refused, silent): the server dropped it while it waited. That says
 * nothing about the downstream, so the attempt goes on over a fresh
 * session and nobody above ever hears of it.
 */
static void
reconnect(struct upstream *up, const char *why)
{
	log_info("id=%s relay=%s[%s]: reused session found dead (%s); connecting afresh",
	    msg_id(up), up->ds->name, up->ds->addr, why);
	reset_session(up);
	up->state = UP_START;
	up->stage = "connect";
	kick(up);
}

static void
report(struct upstream *up, struct upstream_result *res)
{
	upstream_done_fn done = up->done;
	void *arg = up->arg;

	res->latency_ms = elapsed_ms(&up->t0);
	res->conn_use = up->n_txn;
	if (up->conn != NULL && up->tls_active)
		snprintf(res->tls_desc, sizeof(res->tls_desc), "%s", conn_tls_desc(up->conn));
	if (!((res->status == UPSTREAM_OK || res->skipped) && park_idle(up)))
		up_close(up);
	if (done != NULL)
		done(arg, res);
}

/* Reports the result once. */
static void
finish(struct upstream *up, enum upstream_status status, const char *stage,
    int code, const char *enhanced, bool throttle, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

static void
finish(struct upstream *up, enum upstream_status status, const char *stage,
    int code, const char *enhanced, bool throttle, const char *fmt, ...)
{
	struct upstream_result res;
	va_list ap;

	if (up->state == UP_QUIT || up->state == UP_DEAD)
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
	if (up->mode == MODE_PREPARE && up->msg == NULL) {
		go_dead(up, res.text);
		return;
	}
	if (up->resuming && status != UPSTREAM_OK) {
		reconnect(up, res.text);
		return;
	}
	report(up, &res);
}

/* This downstream cannot take this message; nothing was sent. */
static void
skip(struct upstream *up, int code, const char *enhanced, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void
skip(struct upstream *up, int code, const char *enhanced, const char *fmt, ...)
{
	struct upstream_result res;
	va_list ap;

	memset(&res, 0, sizeof(res));
	res.status = UPSTREAM_TEMPFAIL;
	res.skipped = true;
	res.stage = "mail";
	res.code = code;
	snprintf(res.enhanced, sizeof(res.enhanced), "%s", enhanced);
	va_start(ap, fmt);
	vsnprintf(res.text, sizeof(res.text), fmt, ap);
	va_end(ap);
	up->resuming = false;
	report(up, &res);
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

/* A reply nothing was waiting for. A server may announce that it closes
 * (421) at any time, so the text still counts for throttling. */
static void
unsolicited(struct upstream *up, const struct smtp_reply *r)
{
	if (up->state == UP_READY && up->entry.cached) {
		log_debug("relay=%s[%s]: idle session got an unsolicited reply (%d %s); closing it",
		    up->ds->name, up->ds->addr, r->code, r->text);
		up_close(up);
		return;
	}
	finish(up, UPSTREAM_TEMPFAIL, up->stage, r->code, r->enhanced, smtp_reply_is_throttle(r),
	    "unsolicited reply from downstream: %d %s", r->code, r->text);
}

/* --- sending commands ------------------------------------------------- */

/*
 * Appends one command line and what it awaits. Fields were validated
 * inbound; this is the last line of defence against a CR, LF or NUL
 * smuggling a second command. The line is not flushed: pipelined commands
 * go out in one write.
 */
static int
queue_cmd(struct upstream *up, enum await_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int
queue_cmd(struct upstream *up, enum await_kind kind, const char *fmt, ...)
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
		    up->ds->name, await_stage(kind));
		finish(up, UPSTREAM_TEMPFAIL, await_stage(kind), 0, "", false,
		    "refusing to send a command containing CR, LF or NUL");
		return -1;
	}
	evbuffer_add(conn_output(up->conn), line, (size_t)n);
	evbuffer_add(conn_output(up->conn), "\r\n", 2);
	if (await_push(up, kind) == -1) {
		finish(up, UPSTREAM_TEMPFAIL, await_stage(kind), 0, "", false, "out of memory");
		return -1;
	}
	return 0;
}

/* One command, sent now. */
static void
send_cmd(struct upstream *up, enum await_kind kind, const char *line)
{
	if (queue_cmd(up, kind, "%s", line) == 0)
		conn_flush(up->conn);
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
send_hello(struct upstream *up, enum await_kind kind)
{
	char cmd[SMTP_DOMAIN_MAX + 8];

	memset(&up->caps, 0, sizeof(up->caps));
	snprintf(cmd, sizeof(cmd), "%s %s", kind == AW_EHLO ? "EHLO" : "HELO", helo_name(up));
	up->state = UP_SETUP;
	send_cmd(up, kind, cmd);
}

/* One base64 line of a SASL exchange; the encoded secret is wiped after use. */
static int
send_secret_line(struct upstream *up, const char *secret)
{
	char b64[2 * AUTH_FIELD_MAX + 8];
	int rc = 0;

	if (auth_b64_encode(secret, strlen(secret), b64, sizeof(b64)) == -1) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false,
		    "cannot encode %s credentials", up->mech->name);
		rc = -1;
	} else {
		evbuffer_add(conn_output(up->conn), b64, strlen(b64));
		evbuffer_add(conn_output(up->conn), "\r\n", 2);
		if (await_push(up, AW_AUTH) == -1) {
			finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false, "out of memory");
			rc = -1;
		}
	}
	auth_wipe(b64, sizeof(b64));
	return rc;
}

static int
plain_begin(struct upstream *up)
{
	const struct downstream_cfg *ds = up->ds;

	if (auth_plain_encode(ds->user, ds->pass != NULL ? ds->pass : "",
	    conn_output(up->conn)) == -1) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false,
		    "cannot encode AUTH PLAIN credentials");
		return -1;
	}
	if (await_push(up, AW_AUTH) == -1) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false, "out of memory");
		return -1;
	}
	return 0;
}

/* The credentials went with the command: a challenge now is a protocol error. */
static int
plain_answer(struct upstream *up, unsigned step, const struct smtp_reply *challenge)
{
	(void)step;
	finish(up, UPSTREAM_TEMPFAIL, "auth", challenge->code, challenge->enhanced, false,
	    "unexpected AUTH PLAIN challenge: %s", challenge->text);
	return -1;
}

static int
login_begin(struct upstream *up)
{
	return queue_cmd(up, AW_AUTH, "AUTH LOGIN");
}

static int
login_answer(struct upstream *up, unsigned step, const struct smtp_reply *challenge)
{
	if (step == 0)
		return send_secret_line(up, up->ds->user);
	if (step == 1)
		return send_secret_line(up, up->ds->pass != NULL ? up->ds->pass : "");
	finish(up, UPSTREAM_TEMPFAIL, "auth", challenge->code, challenge->enhanced, false,
	    "unexpected AUTH LOGIN challenge: %s", challenge->text);
	return -1;
}

/* An OAuth bearer token from the token table, never waited for: a worker
 * that has none fails the attempt (the relay skips such downstreams). */
static int
token_begin(struct upstream *up, enum sasl_oauth_mech mech)
{
	const struct downstream_cfg *ds = up->ds;
	char *token = malloc(TOKEN_MAX + 1), why[TOKEN_ERROR_MAX + 32];
	size_t len;
	int rc = -1;

	up->token_refusal[0] = '\0';
	if (token == NULL)
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false, "out of memory");
	else if (token_table_get(up->rt->tokens, ds, token_clock_ms(), token, TOKEN_MAX + 1,
	    &len, &up->token_gen) < 0) {
		token_table_ready(up->rt->tokens, ds, token_clock_ms(), why, sizeof(why));
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false, "%s", why);
	} else if (sasl_oauth_encode(mech, ds->user, ds->host, ds->port, token, len,
	    conn_output(up->conn)) < 0)
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false,
		    "cannot encode the AUTH %s initial response", sasl_oauth_name(mech));
	else if (await_push(up, AW_AUTH) == -1)
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false, "out of memory");
	else
		rc = 0;
	if (token != NULL) {
		auth_wipe(token, TOKEN_MAX + 1);
		free(token);
	}
	return rc;
}

/*
 * "334 <base64 JSON>": the server refused the token (RFC 7628 3.2.2). The
 * client still ends the exchange, with one more line, and then gets the
 * final failure; the error is kept for the log.
 */
static int
token_answer(struct upstream *up, unsigned step, const struct smtp_reply *challenge,
    enum sasl_oauth_mech mech)
{
	if (step > 0) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", challenge->code, challenge->enhanced, false,
		    "unexpected AUTH %s challenge: %s", sasl_oauth_name(mech), challenge->text);
		return -1;
	}
	if (sasl_oauth_error_decode(challenge->text, strlen(challenge->text), up->token_refusal,
	    sizeof(up->token_refusal)) < 0)
		snprintf(up->token_refusal, sizeof(up->token_refusal), "undecodable error");
	evbuffer_add_printf(conn_output(up->conn), "%s\r\n", sasl_oauth_abort_line(mech));
	if (await_push(up, AW_AUTH) == -1) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false, "out of memory");
		return -1;
	}
	return 0;
}

static int
xoauth2_begin(struct upstream *up)
{
	return token_begin(up, SASL_XOAUTH2);
}

static int
xoauth2_answer(struct upstream *up, unsigned step, const struct smtp_reply *challenge)
{
	return token_answer(up, step, challenge, SASL_XOAUTH2);
}

static int
oauthbearer_begin(struct upstream *up)
{
	return token_begin(up, SASL_OAUTHBEARER);
}

static int
oauthbearer_answer(struct upstream *up, unsigned step, const struct smtp_reply *challenge)
{
	return token_answer(up, step, challenge, SASL_OAUTHBEARER);
}

static const struct auth_mech mech_plain = { "PLAIN", plain_begin, plain_answer };
static const struct auth_mech mech_login = { "LOGIN", login_begin, login_answer };
static const struct auth_mech mech_xoauth2 = { "XOAUTH2", xoauth2_begin, xoauth2_answer };
static const struct auth_mech mech_oauthbearer = { "OAUTHBEARER", oauthbearer_begin,
	oauthbearer_answer };

/*
 * The one place that picks how to log in: `auth:` when it names a
 * mechanism, else the first one the downstream offers in our order of
 * preference, for a password or for a token.
 */
static const struct auth_mech *
auth_choose(const struct upstream *up)
{
	const struct smtp_reply *c = &up->caps;

	switch (up->ds->auth) {
	case DS_AUTH_PLAIN: return &mech_plain;
	case DS_AUTH_LOGIN: return &mech_login;
	case DS_AUTH_XOAUTH2: return &mech_xoauth2;
	case DS_AUTH_OAUTHBEARER: return &mech_oauthbearer;
	default: break;
	}
	if (up->ds->token != NULL)
		return c->cap_auth_xoauth2 ? &mech_xoauth2 :
		    c->cap_auth_oauthbearer ? &mech_oauthbearer : NULL;
	return c->cap_auth_plain ? &mech_plain : c->cap_auth_login ? &mech_login : NULL;
}

static bool
mech_is_oauth(const struct auth_mech *m)
{
	return m == &mech_xoauth2 || m == &mech_oauthbearer;
}

/* The server refused the token: one refresh is asked of the token helper,
 * without waiting for it; this attempt fails over as any other. */
static void
token_refused(struct upstream *up)
{
	log_info("id=%s relay=%s: AUTH %s: the OAuth token was refused; asking for a new one",
	    up->msg != NULL ? up->msg->id : "-", up->ds->name, up->mech->name);
	token_table_reject(up->rt->tokens, up->ds, up->token_gen);
}

/*
 * Credentials go only over TLS, or in the clear when the administrator
 * wrote `tls: none` for this downstream, or asked for `tls: may` (also
 * what USE_INSECURE_AUTH=true means for a downstream without `tls:`); a
 * default that happens to be plain never leaks them.
 */
static bool
plain_auth_allowed(const struct downstream_cfg *ds)
{
	return (ds->tls == TLS_MODE_NONE && ds->tls_explicit) || ds->tls == TLS_MODE_MAY;
}

static void
start_auth(struct upstream *up)
{
	const struct downstream_cfg *ds = up->ds;

	up->stage = "auth";
	if (!up->tls_active && !plain_auth_allowed(ds)) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false,
		    "refusing to send credentials without TLS");
		return;
	}
	if ((up->mech = auth_choose(up)) == NULL) {
		finish(up, UPSTREAM_TEMPFAIL, "auth", 0, "", false, ds->token != NULL ?
		    "downstream offers neither AUTH XOAUTH2 nor AUTH OAUTHBEARER" :
		    "downstream offers neither AUTH PLAIN nor AUTH LOGIN");
		return;
	}
	up->auth_step = 0;
	if (up->mech->begin(up) == 0)
		conn_flush(up->conn);
}

static void
on_auth_reply(struct upstream *up, const struct smtp_reply *r)
{
	struct smtp_reply why;

	if (up->token_refusal[0] != '\0') {    /* the end of a refused token's exchange */
		token_refused(up);
		why = *r;
		snprintf(why.text, sizeof(why.text), "%.360s (%s: %s)", r->text, up->mech->name,
		    up->token_refusal);
		fail_reply(up, "auth", &why);
		return;
	}
	if (r->code == 235) {
		start_transaction(up);
		return;
	}
	if (r->code != 334) {
		if (r->code == 535 && mech_is_oauth(up->mech))
			token_refused(up);
		fail_reply(up, "auth", r);
		return;
	}
	if (up->mech->answer(up, up->auth_step++, r) == 0)
		conn_flush(up->conn);
}

/* STARTTLS when configured, or with `tls: may` when offered. */
static bool
wants_starttls(const struct upstream *up)
{
	return !up->tls_active && (up->ds->tls == TLS_MODE_STARTTLS ||
	    (up->ds->tls == TLS_MODE_MAY && up->caps.cap_starttls));
}

/* After a good EHLO/HELO: STARTTLS, AUTH, or the transaction. */
static void
after_ehlo(struct upstream *up)
{
	if (wants_starttls(up)) {
		if (!up->caps.cap_starttls) {
			finish(up, UPSTREAM_TEMPFAIL, "tls", 0, "", false,
			    "downstream does not offer STARTTLS");
			return;
		}
		send_cmd(up, AW_STARTTLS, "STARTTLS");
		return;
	}
	if (up->mode == MODE_PROBE) {
		finish(up, UPSTREAM_OK, "ehlo", 250, "", false, "probe ok");
		return;
	}
	if (has_user(up->ds) && up->ds->auth != DS_AUTH_NONE)
		start_auth(up);
	else
		start_transaction(up);
}

/* --- the transaction ---------------------------------------------------- */

/*
 * `rewrite_from:` replaces the sender for this downstream only. The null
 * sender stays null: it marks a bounce, which must never cause another
 * (RFC 5321 4.5.5).
 */
static const char *
envelope_sender(const struct upstream *up)
{
	const char *from = up->msg->mail_from;

	return up->ds->rewrite_from != NULL && from[0] != '\0' ? up->ds->rewrite_from : from;
}

/*
 * RFC 6152: an 8-bit body goes only where 8BITMIME is offered; RFC 1870:
 * nothing larger than the SIZE a downstream announced. Known once the
 * session is logged in; the session itself stays good for other messages.
 */
static bool
message_fits(struct upstream *up)
{
	uint64_t size = msgbody_size(up->msg->data);

	if (up->msg->body == SMTP_BODY_8BITMIME && !up->caps.cap_8bitmime) {
		skip(up, 554, "5.6.3", "downstream does not offer 8BITMIME, which this "
		    "8-bit message needs");
		return false;
	}
	if (up->caps.cap_size && up->caps.size_limit > 0 && size > up->caps.size_limit) {
		skip(up, 552, "5.3.4", "message of %llu octets exceeds the downstream's "
		    "SIZE limit of %lu", (unsigned long long)size, up->caps.size_limit);
		return false;
	}
	return true;
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
	up->resuming = false;
	finish(up, UPSTREAM_TEMPFAIL, bad, 0, "", false,
	    "refusing to send a command containing CR, LF or NUL");
	return false;
}

/* Queues the next envelope command: MAIL, RCPT..., DATA. */
static int
send_envelope_cmd(struct upstream *up)
{
	const struct upstream_msg *msg = up->msg;
	size_t i = up->env_next++;
	char size_param[32] = "";

	if (i == 0) {
		if (up->caps.cap_size)
			snprintf(size_param, sizeof(size_param), " SIZE=%llu",
			    (unsigned long long)msgbody_size(msg->data));
		return queue_cmd(up, AW_MAIL, "MAIL FROM:<%s>%s%s", envelope_sender(up),
		    msg->body == SMTP_BODY_8BITMIME ? " BODY=8BITMIME" : "", size_param);
	}
	if (i <= msg->n_rcpts)
		return queue_cmd(up, AW_RCPT, "RCPT TO:<%s>", msg->rcpts[i - 1]);
	return queue_cmd(up, AW_DATA, "DATA");
}

/*
 * A session that carried a message before starts with RSET. With
 * PIPELINING everything up to DATA goes out in one write and the replies
 * are matched by position (RFC 2920 3.1); without, one command per reply.
 */
static void
start_transaction(struct upstream *up)
{
	size_t batch;

	if (up->msg == NULL) {               /* early: wait for upstream_adopt() */
		up->state = UP_READY;
		up->stage = "mail";
		evtimer_del(up->timer);
		log_debug("relay=%s[%s]: early session ready", up->ds->name, up->ds->addr);
		return;
	}
	if (!message_fits(up) || !envelope_clean(up))
		return;
	up->state = UP_ENVELOPE;
	up->env_total = up->msg->n_rcpts + 2;
	up->env_next = 0;
	up->pipelining = up->caps.cap_pipelining;
	if (up->n_txn++ > 0 && queue_cmd(up, AW_RSET, "RSET") == -1)
		return;
	batch = up->pipelining ? up->env_total : await_count(up) > 0 ? 0 : 1;
	while (up->env_next < batch)
		if (send_envelope_cmd(up) == -1)
			return;
	conn_flush(up->conn);
	arm_for_head(up);
}

/* Without PIPELINING, each good reply lets the next command go. */
static void
envelope_continue(struct upstream *up)
{
	if (up->pipelining || up->env_next >= up->env_total)
		return;
	if (send_envelope_cmd(up) == 0)
		conn_flush(up->conn);
}

static void refill_body(struct upstream *);

/* The message octets, through the From rewriter when there is one. */
static void
stuff_body(void *arg, const char *data, size_t len)
{
	struct upstream *up = arg;

	smtp_data_write(&up->writer, data, len, conn_output(up->conn));
}

static void
write_body(struct upstream *up, const char *data, size_t len)
{
	if (up->rewrite != NULL)
		from_rewrite_feed(up->rewrite, data, len);
	else
		stuff_body(up, data, len);
}

/* A body in a file is read through a buffer of our own, for the time of
 * its transfer only: an idle session keeps none. One in memory is
 * stuffed straight from where it lies. A rewritten message gets a
 * rewriter of its own, for its transfer only as well. */
static void
start_body(struct upstream *up)
{
	from_rewrite_free(up->rewrite);
	up->rewrite = NULL;
	if ((!msgbody_in_memory(up->msg->data) && up->chunk == NULL &&
	    (up->chunk = malloc(BODY_CHUNK)) == NULL) ||
	    (up->ds->rewrite_from != NULL &&
	    (up->rewrite = from_rewrite_new(up->ds->rewrite_from, stuff_body, up)) == NULL)) {
		finish(up, UPSTREAM_TEMPFAIL, "data", 0, "", false, "out of memory");
		return;
	}
	up->state = UP_BODY;
	up->stage = "data";
	up->body_off = 0;
	smtp_data_writer_init(&up->writer);
	refill_body(up);
}

/* The end of the message is queued: from now on a reply may be its verdict. */
static void
queue_dot(struct upstream *up)
{
	free(up->chunk);
	up->chunk = NULL;
	from_rewrite_free(up->rewrite);
	up->rewrite = NULL;
	smtp_data_writer_finish(&up->writer, conn_output(up->conn));
	if (await_push(up, AW_DOT) == -1) {
		finish(up, UPSTREAM_TEMPFAIL, "data", 0, "", false, "out of memory");
		return;
	}
	up->dot_end = up->out_added;
	up->state = UP_DOT;
	arm_for_head(up);
}

/*
 * The one place that streams the body. Keeps at most about
 * BODY_HIGH_WATER octets queued: a 10 MB body from a temp file is read and
 * stuffed one chunk at a time as the socket drains (on_flushed), never
 * loaded whole. conn_flush() may call back into us (on_flushed or
 * on_error), hence the re-entry guard and state checks.
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
			const void *run = up->chunk;

			if (msgbody_in_memory(up->msg->data))
				n = msgbody_peek(up->msg->data, up->body_off, &run);
			else
				n = msgbody_read(up->msg->data, up->body_off, up->chunk, BODY_CHUNK);
			if (n <= 0) {
				int e = n < 0 ? errno : EIO;
				up->in_refill = false;
				finish(up, UPSTREAM_TEMPFAIL, "data", 0, "", false,
				    "reading the message body: %s", strerror(e));
				return;
			}
			write_body(up, run, (size_t)n);
			up->body_off += (uint64_t)n;
		}
		if (up->body_off >= size) {
			if (up->rewrite != NULL)
				from_rewrite_finish(up->rewrite);
			queue_dot(up);
		} else
			arm_timer(up, timeout_reply(up), "the downstream to accept message data");
		if (up->conn != NULL)
			conn_flush(up->conn);
	} while (up->refill_again && up->state == UP_BODY);
	up->in_refill = false;
}

/* --- replies -------------------------------------------------------------- */

static void
on_hello_reply(struct upstream *up, enum await_kind kind, const struct smtp_reply *r)
{
	if (smtp_reply_ok(r) && r->code < 300) {
		if (kind == AW_EHLO)
			up->caps = *r;
		after_ehlo(up);
	} else if (kind == AW_EHLO && r->code >= 500 && r->code < 600) {
		send_hello(up, AW_HELO);
	} else {
		fail_reply(up, "ehlo", r);
	}
}

/*
 * Any refused recipient fails the attempt: the client was already told
 * 250 for every RCPT, so all recipients go through one downstream or none;
 * a partial delivery here plus a retry elsewhere would duplicate.
 */
static void
on_envelope_reply(struct upstream *up, enum await_kind kind, const struct smtp_reply *r)
{
	if (kind == AW_DATA) {
		if (r->code == 354)
			start_body(up);
		else
			fail_reply(up, "data", r);
		return;
	}
	if (!smtp_reply_ok(r) || r->code >= 300) {
		fail_reply(up, await_stage(kind), r);
		return;
	}
	if (kind == AW_RSET)
		up->resuming = false;        /* alive: what follows is a real verdict */
	envelope_continue(up);
}

static void
on_reply(struct upstream *up, enum await_kind kind, const struct smtp_reply *r)
{
	/* The first reply after idling proves the session alive; RSET's own
	 * verdict decides in on_envelope_reply(). */
	if (kind != AW_RSET)
		up->resuming = false;
	switch (kind) {
	case AW_GREETING:
		if (r->code == 220)
			send_hello(up, AW_EHLO);
		else
			fail_reply(up, "greeting", r);
		break;
	case AW_EHLO:
	case AW_HELO:
		on_hello_reply(up, kind, r);
		break;
	case AW_STARTTLS:
		if (r->code == 220)
			start_tls(up);
		else
			fail_reply(up, "tls", r);
		break;
	case AW_AUTH:
		on_auth_reply(up, r);
		break;
	case AW_RSET:
	case AW_MAIL:
	case AW_RCPT:
	case AW_DATA:
		on_envelope_reply(up, kind, r);
		break;
	case AW_DOT:
		if (smtp_reply_ok(r) && r->code < 300)
			finish(up, UPSTREAM_OK, "dot", r->code, r->enhanced, false, "%s", r->text);
		else
			fail_reply(up, "dot", r);
		break;
	}
}

static bool
reads_replies(enum up_state s)
{
	return s == UP_SETUP || s == UP_READY || s == UP_RESUME || s == UP_ENVELOPE ||
	    s == UP_BODY || s == UP_DOT;
}

static void
up_on_read(struct conn *conn, void *arg)
{
	struct upstream *up = arg;
	struct evbuffer *in = conn_input(conn);
	const struct awaited *a;
	struct smtp_reply r;
	enum await_kind kind;
	size_t len;
	long n;

	if (up->state == UP_QUIT) {
		up_free(up);                 /* 221 or anything: we are done */
		return;
	}
	while (up->conn != NULL && reads_replies(up->state) && (len = evbuffer_get_length(in)) > 0) {
		const char *data = (const char *)evbuffer_pullup(in, -1);

		a = await_head(up);
		memset(&r, 0, sizeof(r));
		n = smtp_reply_parse(data, len, a != NULL && a->kind == AW_EHLO, &r);
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
		if (a == NULL || !await_answerable(up, a)) {
			unsolicited(up, &r);
			return;
		}
		kind = a->kind;
		up->aw_head++;
		evbuffer_drain(in, (size_t)n);
		up->in_consumed += (uint64_t)n;
		on_reply(up, kind, &r);
		if (up->state == UP_SETUP || up->state == UP_ENVELOPE)
			arm_for_head(up);
	}
	/* An idle or early session with its input drained: nothing to time. */
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
	if (up->ds->tls == TLS_MODE_IMPLICIT) {
		start_tls(up);
		return;
	}
	up->state = UP_SETUP;
	if (await_push(up, AW_GREETING) == -1) {
		finish(up, UPSTREAM_TEMPFAIL, "greeting", 0, "", false, "out of memory");
		return;
	}
	arm_for_head(up);
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
	if (up->ds->tls == TLS_MODE_IMPLICIT) {
		up->state = UP_SETUP;
		if (await_push(up, AW_GREETING) == -1) {
			finish(up, UPSTREAM_TEMPFAIL, "greeting", 0, "", false, "out of memory");
			return;
		}
		arm_for_head(up);
	} else {
		send_hello(up, AW_EHLO);     /* only post-TLS capabilities count */
	}
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

	(void)conn;
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
		detach_conn(up);
		try_next_address(up);
		return;
	}
	if (up->state == UP_QUIT) {
		up_free(up);
		return;
	}
	if (up->state == UP_READY && up->entry.cached) {
		log_debug("relay=%s[%s]: idle session lost: %s", up->ds->name, up->ds->addr,
		    *detail ? detail : stage_event_text(ev));
		detach_conn(up);
		up_close(up);
		return;
	}
	detach_conn(up);
	if (ev == CONN_TLS_ERROR)
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false, "TLS: %s", detail);
	else if (up->state == UP_BODY)
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "%s during message transfer%s%s", stage_event_text(ev),
		    *detail ? ": " : "", detail);
	else
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "%s while waiting for %s%s%s", stage_event_text(ev),
		    up->state == UP_READY ? "a message" : up->waiting,
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
		attach_conn(up, c);
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

/* A ready session got its message: prove it alive, then the transaction. */
static void
resume(struct upstream *up)
{
	up->resuming = true;
	gettimeofday(&up->t0, NULL);
	start_transaction(up);
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
		return;
	case UP_RESUME:
		resume(up);
		return;
	case UP_QUIT:
		up_free(up);
		return;
	case UP_READY:
		if (up->entry.cached) {          /* idle_timeout */
			log_debug("relay=%s[%s]: idle session closed after %u s", up->ds->name,
			    up->ds->addr, upstream_cache_cfg(up->rt->cache)->idle_timeout);
			up_close(up);
		}
		return;
	case UP_DEAD:
		return;
	default:
		break;
	}
	if (up->timer_is_deadline) {
		up->resuming = false;        /* no time left for a fresh session */
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "relay deadline reached while waiting for %s", up->waiting);
		return;
	}
	switch (up->state) {
	case UP_RESOLVING:
		finish(up, UPSTREAM_TEMPFAIL, "connect", 0, "", false,
		    "resolve %s: timed out", up->ds->host);
		break;
	case UP_CONNECTING:
		snprintf(up->connect_err, sizeof(up->connect_err), "connect to %s: timed out", up->peer);
		detach_conn(up);
		try_next_address(up);
		break;
	default:
		finish(up, UPSTREAM_TEMPFAIL, up->stage, 0, "", false,
		    "timeout waiting for %s", up->waiting);
		break;
	}
}

/* --- public ------------------------------------------------------------------ */

static struct upstream *
up_new(struct runtime *rt, const struct downstream_cfg *ds, enum up_mode mode)
{
	struct upstream *up;

	if ((up = calloc(1, sizeof(*up))) == NULL)
		return NULL;
	up->rt = rt;
	up->ds = ds;
	up->mode = mode;
	up->state = UP_START;
	up->stage = "connect";
	gettimeofday(&up->t0, NULL);
	if ((up->timer = evtimer_new(rt->base, on_timer, up)) == NULL) {
		free(up);
		return NULL;
	}
	/* Start from the loop, so done never runs inside upstream_start(). */
	kick(up);
	return up;
}

/* An idle session of ds's account from the cache, ready for new work. */
static struct upstream *
take_idle(struct runtime *rt, const struct downstream_cfg *ds)
{
	struct upstream *up;

	if (rt->cache == NULL || (up = upstream_cache_take(rt->cache, ds)) == NULL)
		return NULL;
	evtimer_del(up->timer);
	up->ds = ds;                         /* the same account, maybe another user's entry */
	return up;
}

static void
give_message(struct upstream *up, const struct upstream_msg *msg, int64_t deadline_ms,
    upstream_done_fn done, void *arg)
{
	up->mode = MODE_ATTEMPT;
	up->msg = msg;
	up->done = done;
	up->arg = arg;
	up->deadline_ms = deadline_ms;
	gettimeofday(&up->t0, NULL);
}

struct upstream *
upstream_start(struct runtime *rt, const struct downstream_cfg *ds,
    const struct upstream_msg *msg, int64_t deadline_ms, upstream_done_fn done, void *arg)
{
	struct upstream *up;

	if (msg == NULL || msg->data == NULL)
		return NULL;
	if ((up = take_idle(rt, ds)) != NULL) {
		give_message(up, msg, deadline_ms, done, arg);
		up->state = UP_RESUME;
		up->resuming = true;
		kick(up);
		return up;
	}
	if ((up = up_new(rt, ds, MODE_ATTEMPT)) != NULL)
		give_message(up, msg, deadline_ms, done, arg);
	return up;
}

struct upstream *
upstream_prepare(struct runtime *rt, const struct downstream_cfg *ds)
{
	struct upstream *up = take_idle(rt, ds);

	if (up != NULL) {
		up->mode = MODE_PREPARE;
		return up;
	}
	return up_new(rt, ds, MODE_PREPARE);
}

void
upstream_adopt(struct upstream *up, const struct upstream_msg *msg, int64_t deadline_ms,
    upstream_done_fn done, void *arg)
{
	give_message(up, msg, deadline_ms, done, arg);
	switch (up->state) {
	case UP_READY:
		up->state = UP_RESUME;
		up->resuming = true;
		kick(up);
		break;
	case UP_DEAD:
		reset_session(up);
		up->state = UP_START;
		up->stage = "connect";
		kick(up);
		break;
	default:
		/* Still setting up: it carries on with the message. Its current
		 * wait may not outlast the relay's deadline. */
		if (evtimer_pending(up->timer, NULL) && up->timer_due_ms > deadline_ms &&
		    deadline_ms != 0 && up->state != UP_START)
			arm_timer_ms(up, up->timer_due_ms - runtime_now_ms(), up->waiting);
		break;
	}
}

void
upstream_release(struct upstream *up)
{
	if (up == NULL)
		return;
	up->mode = MODE_ATTEMPT;
	switch (up->state) {
	case UP_DEAD:
		up_free(up);
		break;
	case UP_READY:
		if (!park_idle(up))
			up_close(up);
		break;
	default:
		up_close(up);
		break;
	}
}

struct upstream *
upstream_probe(struct runtime *rt, const struct downstream_cfg *ds,
    upstream_done_fn done, void *arg)
{
	struct upstream *up = up_new(rt, ds, MODE_PROBE);

	if (up != NULL) {
		up->done = done;
		up->arg = arg;
	}
	return up;
}

bool
upstream_dot_sent(const struct upstream *up)
{
	return up != NULL && up->state == UP_DOT && up->out_sent >= up->dot_end;
}

void
upstream_cancel(struct upstream *up)
{
	if (up == NULL)
		return;
	up->done = NULL;
	up_free(up);
}

/* No callbacks while the loop is gone. */
static void quiet_read(struct conn *c, void *a) { (void)c; (void)a; }
static void quiet_error(struct conn *c, void *a, enum conn_event e, const char *d)
{ (void)c; (void)a; (void)e; (void)d; }
static const struct conn_cbs quiet_cbs = { .on_read = quiet_read, .on_error = quiet_error };

/* Writes a queued QUIT now: the worker may exit before the loop would. */
static void
flush_quietly(struct upstream *up)
{
	if (up->conn == NULL)
		return;
	conn_set_cbs(up->conn, &quiet_cbs, NULL);
	conn_flush_now(up->conn);
}

void
upstream_close_idle(struct runtime *rt)
{
	struct upstream *up;

	if (rt->cache == NULL)
		return;
	upstream_cache_close(rt->cache);
	while ((up = upstream_cache_pop(rt->cache)) != NULL) {
		up_close(up);
		if (up->conn != NULL)
			conn_flush_now(up->conn);    /* may free up: not touched again */
	}
}

void
upstream_free_lingering(struct runtime *rt)
{
	struct upstream *up;

	if (rt->cache != NULL)
		while ((up = upstream_cache_pop(rt->cache)) != NULL)
			up_close(up);
	while ((up = rt->lingering) != NULL) {
		flush_quietly(up);
		up_free(up);
	}
}

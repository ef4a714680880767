/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "auth.h"
#include "buffer_wipe.h"
#include "log.h"
#include "maildate.h"
#include "msgbody.h"
#include "self_pid.h"
#include "client_table.h"
#include "passwd.h"
#include "sender_match.h"
#include "smtp_data.h"
#include "smtp_limits.h"
#include "smtp_parse.h"
#include "smtp_server.h"

/*
 * The inbound session. One state enum, one input loop (smtp_session_input)
 * that takes complete lines (or DATA octets) from `in` and dispatches them
 * to a handler per verb; every handler appends its reply to `out`.
 *
 * Contract with the owner (worker glue or test): the io callbacks must not
 * free the session synchronously; the owner frees it later, from its own
 * event callbacks. relay_start may call `done` before it returns: that is
 * handled.
 *
 * Nothing is relayed unless the client authenticated, or its address is in
 * a `clients:` network (it then sends as that entry's user); the client
 * hears 250 only once a downstream accepted the message.
 */

enum sess_state {
	SESS_CONNECTED,          /* greeting not sent yet */
	SESS_GREETED,            /* between transactions (HELO/EHLO in s->helo) */
	SESS_AUTH_PLAIN,         /* sent "334 ", waiting for the PLAIN response */
	SESS_AUTH_LOGIN_USER,    /* sent "334 VXNlcm5hbWU6" */
	SESS_AUTH_LOGIN_PASS,    /* sent "334 UGFzc3dvcmQ6" */
	SESS_AUTH_CHECK,         /* a password hash is checked off the loop; input paused */
	SESS_AUTH_WAIT,          /* AUTH failed: 535 after a delay; input paused */
	SESS_MAIL,               /* MAIL accepted, no recipient yet */
	SESS_RCPT,               /* at least one recipient */
	SESS_DATA,               /* reading the message */
	SESS_RELAYING,           /* message handed to the relay; input paused */
	SESS_TLS_WAIT,           /* 220 to STARTTLS sent; the owner handshakes */
	SESS_CLOSING             /* 221 or 421 sent; terminal */
};

enum helo_kind { HELO_NONE, HELO_HELO, HELO_EHLO };

/* What the owner's one-shot timer (io->set_timer) is running for. */
enum sess_timer {
	TIMER_NONE,
	TIMER_LINE,              /* limits.command_deadline for a command line */
	TIMER_DATA,              /* the DATA deadline (limits.min_data_rate) */
	TIMER_AUTH               /* the delay before a 535 */
};

/* Counter slots: one per verb (SMTP_VERB_UNKNOWN, 0, counts bad lines). */
#define N_VERBS (SMTP_VERB_BDAT + 1)


struct txn {
	const struct user_cfg *user;     /* relayed as: authenticated, or by network */
	char *mail_from;
	char **rcpts;
	size_t n_rcpts;
	size_t cap_rcpts;
	enum smtp_body body_type;
	char qid[13];
	struct msgbody *body;
	struct smtp_data_reader reader;
	bool store_failed;
	uint64_t size_hint;              /* MAIL's SIZE=, 0 if none */
	bool saw_8bit;                   /* an octet >= 0x80 in the body */
	struct upstream_msg umsg;        /* must outlive the relay */
	struct delivery *prepared;       /* at the first RCPT (early connect) */
	struct delivery *relay;
	bool in_relay_start;             /* done() may come before relay_start returns */
	bool early_done;
	struct relay_result early;
};

/* A login whose password hash is checked off the loop (SESS_AUTH_CHECK). */
struct auth_pending {
	uint64_t ticket;                 /* io->check_password's; 0: none */
	const struct user_cfg *user;     /* NULL: unknown name, or no password */
	char name[AUTH_FIELD_MAX + 1];   /* as given, for the failure's log line */
	const char *mech;
	bool starting;                   /* inside io->check_password */
	bool early;                      /* the verdict came before it returned */
	uint64_t early_ticket;
	bool early_match;
};

struct smtp_session {
	struct runtime *rt;
	const struct config *cfg;
	const struct listen_cfg *listener;
	struct evbuffer *in, *out;
	struct evbuffer *scratch;        /* unstuffed DATA octets on their way to the body */
	const struct smtp_session_io *io;
	void *ctx;

	char id[13];
	char client[64];
	char tls_desc[96];
	bool tls_active;

	enum sess_state state;
	enum helo_kind helo;
	char helo_name[SMTP_DOMAIN_MAX + 1];
	const struct user_cfg *user;     /* NULL until AUTH succeeds */
	const struct client_cfg *net_client;  /* `clients:` entry of the address, or NULL */
	char login_user[AUTH_FIELD_MAX + 1];
	struct auth_pending check;

	bool started;
	bool discarding;                 /* dropping the rest of an overlong line */
	bool need_flush;
	bool shutdown_pending;
	bool reply_backlog_logged;       /* "does not read its replies", once */
	bool client_gone;                /* hung up while its message was relayed */
	unsigned errors;

	enum sess_timer timer;
	unsigned lines_read;             /* command lines taken so far */
	unsigned timer_lines;            /* lines_read when TIMER_LINE started */
	uint64_t data_deadline_ms;       /* CLOCK_MONOTONIC, TIMER_DATA */

	/* Postfix-style "ehlo=1 auth=0/1" counters. */
	enum smtp_verb pending_verb;     /* whose outcome the next final reply decides */
	bool verb_pending;
	unsigned n_total[N_VERBS];
	unsigned n_ok[N_VERBS];

	struct txn tx;
};

static void smtp_session_process(struct smtp_session *s);

/* ---------------------------------------------------------------- utils */

static const char *
hostname(const struct smtp_session *s)
{
	return s->cfg->hostname != NULL ? s->cfg->hostname : "localhost";
}

/* src into dst, cut to fit (snprintf's "%s" without parsing a format). */
static void
copy_str(char *dst, size_t size, const char *src)
{
	size_t n = strnlen(src, size - 1);

	memcpy(dst, src, n);
	dst[n] = '\0';
}

static const char *
clean(char *dst, size_t dstlen, const char *src)
{
	return log_sanitize(dst, dstlen, src, strlen(src));
}

static void
set_state(struct smtp_session *s, enum sess_state st)
{
	/* CLOSING is terminal: a handler that replied 421 through the error
	 * budget must not be revived by its own later state change. */
	if (s->state != SESS_CLOSING)
		s->state = st;
}

static bool
in_transaction(const struct smtp_session *s)
{
	return s->state == SESS_MAIL || s->state == SESS_RCPT;
}

static bool
require_tls_pending(const struct smtp_session *s)
{
	return s->listener != NULL && s->listener->require_tls && !s->tls_active;
}

static bool
starttls_offered(const struct smtp_session *s)
{
	return s->listener != NULL && s->listener->tls == TLS_MODE_STARTTLS && !s->tls_active;
}

static bool
auth_offered(const struct smtp_session *s)
{
	if (s->tls_active)
		return true;
	return s->cfg->allow_insecure_auth && !require_tls_pending(s);
}

static void
flush(struct smtp_session *s)
{
	s->need_flush = false;
	s->io->flush(s->ctx);
}

static uint64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void
timer_start(struct smtp_session *s, enum sess_timer kind, uint64_t ms)
{
	s->timer = kind;
	/* 0 would cancel: a deadline already passed fires at once. */
	s->io->set_timer(s->ctx, ms == 0 ? 1 : ms > UINT32_MAX ? UINT32_MAX : (unsigned)ms);
}

static void
timer_stop(struct smtp_session *s)
{
	if (s->timer == TIMER_NONE)
		return;
	s->timer = TIMER_NONE;
	s->io->set_timer(s->ctx, 0);
}

/* ---------------------------------------------------------------- replies */

static void
count_outcome(struct smtp_session *s, int code)
{
	/* 334 and 354 are intermediate: the command's fate is decided later. */
	if (!s->verb_pending || code == 334 || code == 354)
		return;
	if (code < 400)
		s->n_ok[s->pending_verb]++;
	s->verb_pending = false;
}

/* The longest enhanced status code ("5.7.11" and the like are far shorter). */
#define REPLY_ENHANCED_MAX 16

/* Appends src, cut to what is left of cap, to line at *len. */
static void
line_put(char *line, size_t *len, size_t cap, const char *src, size_t n)
{
	if (*len >= cap)
		return;
	if (n > cap - *len)
		n = cap - *len;
	memcpy(line + *len, src, n);
	*len += n;
}

/* "CODE " or "CODE ENHANCED " at the start of line; its length. */
static size_t
reply_head(char *line, int code, const char *enhanced)
{
	size_t len;

	if (code >= 100 && code <= 999) {
		line[0] = (char)('0' + code / 100);
		line[1] = (char)('0' + code / 10 % 10);
		line[2] = (char)('0' + code % 10);
		line[3] = ' ';
		len = 4;
	} else
		len = (size_t)snprintf(line, 16, "%d ", code % 100000);
	if (enhanced != NULL) {
		line_put(line, &len, len + REPLY_ENHANCED_MAX,
		    enhanced, strnlen(enhanced, REPLY_ENHANCED_MAX));
		line[len++] = ' ';
	}
	return len;
}

/*
 * One reply line, put together in one buffer and appended at once: most
 * replies are fixed text or one "%s", which need no printf (replies are
 * the bulk of what a session formats).
 */
static void
vreply(struct smtp_session *s, int code, const char *enhanced, const char *fmt, va_list ap)
{
	char line[16 + REPLY_ENHANCED_MAX + SMTP_REPLY_TEXT_MAX + 2];
	size_t len = reply_head(line, code, enhanced);
	const size_t text_cap = len + SMTP_REPLY_TEXT_MAX - 1;

	if (strchr(fmt, '%') == NULL)
		line_put(line, &len, text_cap, fmt, strlen(fmt));
	else if (strcmp(fmt, "%s") == 0) {
		const char *arg = va_arg(ap, const char *);

		line_put(line, &len, text_cap, arg, strlen(arg));
	} else {
		int n = vsnprintf(line + len, SMTP_REPLY_TEXT_MAX, fmt, ap);

		if (n > 0)
			len += (size_t)n < SMTP_REPLY_TEXT_MAX ? (size_t)n : SMTP_REPLY_TEXT_MAX - 1;
	}
	line[len++] = '\r';
	line[len++] = '\n';
	evbuffer_add(s->out, line, len);
	s->need_flush = true;
	count_outcome(s, code);
}

static void reply(struct smtp_session *, int, const char *, const char *, ...)
    __attribute__((format(printf, 4, 5)));
static void reply_error(struct smtp_session *, int, const char *, const char *, ...)
    __attribute__((format(printf, 4, 5)));

static void
reply(struct smtp_session *s, int code, const char *enhanced, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vreply(s, code, enhanced, fmt, ap);
	va_end(ap);
}

/* Sends a final reply and asks the owner to close once it is written;
 * nothing the client sent after it is read. */
static void
reply_and_close(struct smtp_session *s, int code, const char *enhanced, const char *why)
{
	reply(s, code, enhanced, "%s %s", hostname(s), why);
	s->state = SESS_CLOSING;
	flush(s);
	s->io->close(s->ctx);
}

static void
reply_close(struct smtp_session *s, const char *enhanced, const char *why)
{
	reply_and_close(s, 421, enhanced, why);
}

/* An error caused by the client: counts toward limits.max_errors (0: no
 * limit), so a client probing commands or passwords is cut off. */
static void
reply_error(struct smtp_session *s, int code, const char *enhanced, const char *fmt, ...)
{
	unsigned max = s->cfg->limits.max_errors;
	va_list ap;

	va_start(ap, fmt);
	vreply(s, code, enhanced, fmt, ap);
	va_end(ap);
	if (max == 0 || ++s->errors <= max)
		return;
	log_info("%s: too many errors from [%s]", s->id, s->client);
	reply_close(s, "4.7.0", "Too many errors");
}

/* ---------------------------------------------------------------- transaction */

static void
txn_reset(struct smtp_session *s)
{
	struct txn *tx = &s->tx;

	if (tx->prepared != NULL)
		s->io->relay_cancel(s->ctx, tx->prepared);
	free(tx->mail_from);
	for (size_t i = 0; i < tx->n_rcpts; i++)
		free(tx->rcpts[i]);
	free(tx->rcpts);
	msgbody_free(tx->body);
	evbuffer_drain(s->scratch, evbuffer_get_length(s->scratch));
	memset(tx, 0, sizeof(*tx));
	if (in_transaction(s))
		set_state(s, SESS_GREETED);
}

static int
txn_add_rcpt(struct txn *tx, const char *path)
{
	char *copy;

	if (tx->n_rcpts == tx->cap_rcpts) {
		size_t cap = tx->cap_rcpts == 0 ? 4 : tx->cap_rcpts * 2;
		char **grown = realloc(tx->rcpts, cap * sizeof(*grown));

		if (grown == NULL)
			return -1;
		tx->rcpts = grown;
		tx->cap_rcpts = cap;
	}
	copy = strdup(path);
	if (copy == NULL)
		return -1;
	tx->rcpts[tx->n_rcpts++] = copy;
	return 0;
}

static void
set_id(struct runtime *rt, char buf[13])
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	runtime_new_id(rt, buf, (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u,
	    (uint32_t)self_pid());
}

/* ---------------------------------------------------------------- HELO/EHLO */

static void
remember_helo(struct smtp_session *s, const struct smtp_cmd *cmd, enum helo_kind kind)
{
	/* RFC 5321 4.1.4: HELO/EHLO resets a transaction like RSET. */
	txn_reset(s);
	s->helo = kind;
	copy_str(s->helo_name, sizeof(s->helo_name), cmd->domain);
}

static void
cmd_helo(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	remember_helo(s, cmd, HELO_HELO);
	reply(s, 250, NULL, "%s", hostname(s));
}

static void
cmd_ehlo(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	const char *ext[8];
	size_t n = 0;
	char size[32];
	char lines[SMTP_REPLY_TEXT_MAX + 256];
	size_t len = 0;

	remember_helo(s, cmd, HELO_EHLO);
	snprintf(size, sizeof(size), "SIZE %" PRIu64, s->cfg->limits.max_message_size);
	ext[n++] = hostname(s);
	ext[n++] = "PIPELINING";
	ext[n++] = size;
	ext[n++] = "8BITMIME";
	ext[n++] = "ENHANCEDSTATUSCODES";
	if (starttls_offered(s))
		ext[n++] = "STARTTLS";
	if (auth_offered(s))
		ext[n++] = "AUTH PLAIN LOGIN";
	/* RFC 2034: no enhanced codes in the EHLO reply. All lines but the
	 * last in one append; the last is the reply proper. */
	for (size_t i = 0; i + 1 < n; i++) {
		line_put(lines, &len, sizeof(lines) - 2, "250-", 4);
		line_put(lines, &len, sizeof(lines) - 2, ext[i],
		    strnlen(ext[i], SMTP_REPLY_TEXT_MAX - 1));
		lines[len++] = '\r';
		lines[len++] = '\n';
	}
	evbuffer_add(s->out, lines, len);
	reply(s, 250, NULL, "%s", ext[n - 1]);
}

/* ---------------------------------------------------------------- AUTH */

static void
auth_succeeded(struct smtp_session *s, const struct user_cfg *u, const char *mech)
{
	char user[AUTH_FIELD_MAX + 1];

	s->user = u;
	log_info("%s: auth ok user=%s mech=%s client=[%s]", s->id,
	    clean(user, sizeof(user), u->email), mech, s->client);
	reply(s, 235, "2.7.0", "Authentication successful");
}

static void
auth_refuse_locked(struct smtp_session *s)
{
	reply_close(s, "4.7.0", "Too many failed logins from your address, try again later");
}

/*
 * A failed login counts for the client's address across all sessions and
 * workers (auth:). The 535 comes after a delay that grows with each
 * failure, on the owner's timer, so guessing is slow and nobody else
 * waits; the failure that reaches auth.max_failures locks the address out.
 */
static void
auth_failed(struct smtp_session *s, const char *name)
{
	const struct client_auth_policy policy = {
		s->cfg->auth.max_failures, s->cfg->auth.window, s->cfg->auth.lockout,
	};
	enum client_auth_verdict v = CLIENT_AUTH_COUNTED;
	char user[AUTH_FIELD_MAX + 1];
	unsigned failures = 1;
	uint64_t delay;

	log_warn("%s: auth failed user=%s client=[%s]", s->id,
	    clean(user, sizeof(user), name), s->client);
	if (s->rt->clients != NULL)
		v = client_table_auth_failed(s->rt->clients, s->client, &policy,
		    client_table_now(), &failures);
	if (v == CLIENT_AUTH_LOCKED_NOW)
		log_warn("%s: auth lockout client=[%s] failures=%u window=%us lockout=%us", s->id,
		    s->client, failures, policy.window, policy.lockout);
	if (v != CLIENT_AUTH_COUNTED) {
		auth_refuse_locked(s);
		return;
	}
	delay = smtp_auth_delay_ms(failures, s->cfg->auth.failure_delay);
	if (delay == 0) {
		reply_error(s, 535, "5.7.8", "Authentication credentials invalid");
		return;
	}
	if (s->state != SESS_AUTH_CHECK)     /* else paused already */
		s->io->pause(s->ctx, true);
	set_state(s, SESS_AUTH_WAIT);
	timer_start(s, TIMER_AUTH, delay);
}

/* The delay of a failed login is over. */
static void
auth_delay_over(struct smtp_session *s)
{
	set_state(s, SESS_GREETED);
	reply_error(s, 535, "5.7.8", "Authentication credentials invalid");
	if (s->state == SESS_CLOSING)        /* the error budget ran out */
		return;
	s->io->pause(s->ctx, false);
	if (s->shutdown_pending)
		reply_close(s, "4.3.2", "Service shutting down");
}

static bool
auth_locked_out(const struct smtp_session *s)
{
	return s->rt->clients != NULL && s->cfg->auth.max_failures > 0 &&
	    client_table_auth_locked(s->rt->clients, s->client, client_table_now(), NULL);
}

static void
auth_verdict(struct smtp_session *s, const struct user_cfg *u, const char *name,
    const char *mech, bool equal)
{
	if (u != NULL && u->password != NULL && equal)
		auth_succeeded(s, u, mech);
	else
		auth_failed(s, name);
}

/* Forgets a pending check; its verdict, if it still comes, is dropped. */
static void
auth_check_forget(struct smtp_session *s)
{
	if (s->check.ticket != 0 && s->io->check_password_cancel != NULL)
		s->io->check_password_cancel(s->ctx, s->check.ticket);
	auth_wipe(&s->check, sizeof(s->check));
}

/* The verdict of a check made off the loop. */
static void
auth_check_done(struct smtp_session *s, bool match)
{
	const struct user_cfg *u = s->check.user;
	char name[AUTH_FIELD_MAX + 1];
	const char *mech = s->check.mech;

	memcpy(name, s->check.name, sizeof(name));
	s->check.ticket = 0;
	auth_check_forget(s);
	auth_verdict(s, u, name, mech, match);
	auth_wipe(name, sizeof(name));
	if (s->state != SESS_AUTH_CHECK)     /* the 535's delay, or closing */
		return;
	set_state(s, SESS_GREETED);
	s->io->pause(s->ctx, false);
	if (s->shutdown_pending)
		reply_close(s, "4.3.2", "Service shutting down");
}

/*
 * Hands a hash check to the owner (io->check_password) so the event loop
 * goes on serving the worker's other sessions; this one reads nothing
 * until the verdict. A full queue is a temporary failure, not a wait.
 */
static void
auth_check_start(struct smtp_session *s, const struct user_cfg *u, const char *name,
    const char *pass, const char *expected, const char *mech)
{
	uint64_t ticket;

	s->check.user = u != NULL && u->password != NULL ? u : NULL;
	snprintf(s->check.name, sizeof(s->check.name), "%s", name);
	s->check.mech = mech;
	set_state(s, SESS_AUTH_CHECK);
	s->io->pause(s->ctx, true);
	s->check.starting = true;
	ticket = s->io->check_password(s->ctx, pass, expected);
	s->check.starting = false;
	if (ticket == 0) {
		log_warn("%s: auth deferred: too many password checks pending client=[%s]", s->id,
		    s->client);
		auth_check_forget(s);
		set_state(s, SESS_GREETED);
		s->io->pause(s->ctx, false);
		reply(s, 454, "4.7.0", "Temporary authentication failure");
		return;
	}
	s->check.ticket = ticket;
	if (s->check.early && s->check.early_ticket == ticket)
		auth_check_done(s, s->check.early_match);
}

/* Checks a user name and password. An unknown user still costs one
 * password check (a hash when the configuration has hashes), so timing
 * does not reveal which users exist. A hash not in the worker's cache is
 * checked off the loop when the owner offers that. */
static void
auth_check(struct smtp_session *s, const char *name, const char *pass, const char *mech)
{
	const struct user_cfg *u = config_find_user(s->cfg, name);
	const char *unknown = s->cfg->unknown_user_hash != NULL ? s->cfg->unknown_user_hash : "";
	const char *expected = u != NULL && u->password != NULL ? u->password : unknown;
	enum passwd_quick q = passwd_verify_quick(s->rt->pwcache, pass, expected);

	if (q == PASSWD_NEEDS_HASH && s->io->check_password != NULL) {
		auth_check_start(s, u, name, pass, expected, mech);
		return;
	}
	if (q == PASSWD_NEEDS_HASH) {
		q = passwd_hash_matches(pass, expected) ? PASSWD_MATCH : PASSWD_MISMATCH;
		passwd_cache_note(s->rt->pwcache, pass, expected, q == PASSWD_MATCH);
	}
	auth_verdict(s, u, name, mech, q == PASSWD_MATCH);
}

static void
auth_decode_failed(struct smtp_session *s, enum auth_status st)
{
	if (st == AUTH_CANCELLED)
		reply_error(s, 501, "5.7.0", "Authentication cancelled");
	else if (st == AUTH_BAD_BASE64)
		reply_error(s, 501, "5.5.2", "Invalid base64 data");
	else
		reply_error(s, 501, "5.5.2", "Malformed authentication response");
}

static void
auth_plain_response(struct smtp_session *s, const char *b64, size_t len)
{
	struct auth_plain ap;
	enum auth_status st = auth_plain_decode(b64, len, &ap);

	set_state(s, SESS_GREETED);
	if (st != AUTH_OK)
		auth_decode_failed(s, st);
	else if (ap.authzid[0] != '\0' && strcasecmp(ap.authzid, ap.authcid) != 0)
		/* No proxy authorisation: an app may only send as itself. */
		auth_failed(s, ap.authcid);
	else
		auth_check(s, ap.authcid, ap.passwd, "PLAIN");
	auth_wipe(&ap, sizeof(ap));
}

static void
auth_login_user(struct smtp_session *s, const char *b64, size_t len)
{
	enum auth_status st = auth_login_decode(b64, len, s->login_user, sizeof(s->login_user));

	if (st != AUTH_OK) {
		set_state(s, SESS_GREETED);
		auth_decode_failed(s, st);
		return;
	}
	set_state(s, SESS_AUTH_LOGIN_PASS);
	reply(s, 334, NULL, "UGFzc3dvcmQ6");
	flush(s);
}

static void
auth_login_pass(struct smtp_session *s, const char *b64, size_t len)
{
	char pass[AUTH_FIELD_MAX + 1];
	enum auth_status st = auth_login_decode(b64, len, pass, sizeof(pass));

	set_state(s, SESS_GREETED);
	if (st != AUTH_OK)
		auth_decode_failed(s, st);
	else
		auth_check(s, s->login_user, pass, "LOGIN");
	auth_wipe(pass, sizeof(pass));
	auth_wipe(s->login_user, sizeof(s->login_user));
}

/* The sequence rules for AUTH; false when an error reply was sent. */
static bool
auth_permitted(struct smtp_session *s)
{
	if (require_tls_pending(s))
		reply_error(s, 530, "5.7.0", "Must issue a STARTTLS command first");
	else if (s->helo != HELO_EHLO)
		reply_error(s, 503, "5.5.1", "Send EHLO first");
	else if (s->user != NULL)
		reply_error(s, 503, "5.5.1", "Already authenticated");
	else if (in_transaction(s))
		reply_error(s, 503, "5.5.1", "AUTH not permitted during a mail transaction");
	else if (!auth_offered(s))
		reply_error(s, 538, "5.7.11", "Encryption required for requested authentication mechanism");
	else
		return true;
	return false;
}

static void
cmd_auth(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	if (!auth_permitted(s))
		return;
	if (auth_locked_out(s)) {
		auth_refuse_locked(s);
		return;
	}
	if (strcmp(cmd->mech, "PLAIN") == 0) {
		if (cmd->initial != NULL) {
			auth_plain_response(s, cmd->initial, cmd->initial_len);
			return;
		}
		set_state(s, SESS_AUTH_PLAIN);
		reply(s, 334, NULL, "%s", "");
	} else if (strcmp(cmd->mech, "LOGIN") == 0) {
		/* Some clients send the user name as an initial response. */
		if (cmd->initial != NULL) {
			auth_login_user(s, cmd->initial, cmd->initial_len);
			return;
		}
		set_state(s, SESS_AUTH_LOGIN_USER);
		reply(s, 334, NULL, "VXNlcm5hbWU6");
	} else {
		reply_error(s, 504, "5.5.4", "Unrecognized authentication mechanism");
		return;
	}
	flush(s);
}

/* A line while a 334 challenge is outstanding: a SASL response. */
static void
auth_continue(struct smtp_session *s, const char *line, size_t len)
{
	enum sess_state st = s->state;

	if (len == 1 && line[0] == '*') {
		set_state(s, SESS_GREETED);
		auth_wipe(s->login_user, sizeof(s->login_user));
		auth_decode_failed(s, AUTH_CANCELLED);
	} else if (st == SESS_AUTH_PLAIN) {
		auth_plain_response(s, line, len);
	} else if (st == SESS_AUTH_LOGIN_USER) {
		auth_login_user(s, line, len);
	} else {
		auth_login_pass(s, line, len);
	}
}

/* ---------------------------------------------------------------- MAIL/RCPT */

/* The user a transaction is relayed as: the authenticated one, else the
 * one the client's network maps to. */
static const struct user_cfg *
sending_user(const struct smtp_session *s)
{
	if (s->user != NULL)
		return s->user;
	return s->net_client != NULL ? s->net_client->user : NULL;
}

/*
 * Early connect: once the first recipient is accepted the relay may start
 * logging in to the downstream the message will go to first, so that only
 * the transaction is left when the client's final dot comes.
 */
static void
early_connect(struct smtp_session *s)
{
	struct txn *tx = &s->tx;
	struct upstream_msg env = {
		.id = "", .mail_from = tx->mail_from, .rcpts = (const char *const *)tx->rcpts,
		.n_rcpts = tx->n_rcpts, .body = tx->body_type,
	};

	if (s->io->relay_prepare == NULL || s->io->relay_begin == NULL || tx->prepared != NULL)
		return;
	tx->prepared = s->io->relay_prepare(s->ctx, s->rt, tx->user, &env, tx->size_hint, s->client);
}

static void
sender_refused(struct smtp_session *s, const struct user_cfg *u, const char *path)
{
	char user[AUTH_FIELD_MAX + 1], from[SMTP_PATH_MAX + 1];

	log_warn("%s: sender refused user=%s from=<%s> client=[%s]: not in allowed_senders",
	    s->id, clean(user, sizeof(user), u->email), clean(from, sizeof(from), path),
	    s->client);
	reply_error(s, 553, "5.7.1", "Sender address not allowed for this user");
}

static void
cmd_mail(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	uint64_t max = s->cfg->limits.max_message_size;
	const struct user_cfg *u = sending_user(s);

	if (require_tls_pending(s))
		reply_error(s, 530, "5.7.0", "Must issue a STARTTLS command first");
	else if (u == NULL)
		/* Never an open relay: every transaction is authenticated. */
		reply_error(s, 530, "5.7.0", "Authentication required");
	else if (in_transaction(s))
		reply_error(s, 503, "5.5.1", "Nested MAIL command");
	else if (cmd->has_size && (cmd->size_overflow || (max != 0 && cmd->size > max)))
		reply_error(s, 552, "5.3.4", "Message size exceeds fixed maximum message size");
	else if (!sender_allowed(u->allowed_senders, u->n_allowed_senders, cmd->path))
		sender_refused(s, u, cmd->path);
	else if ((s->tx.mail_from = strdup(cmd->path)) == NULL)
		reply(s, 451, "4.3.0", "Out of memory");
	else {
		s->tx.user = u;
		s->tx.body_type = cmd->body;
		s->tx.size_hint = cmd->has_size ? cmd->size : 0;
		set_state(s, SESS_MAIL);
		reply(s, 250, "2.1.0", "Ok");
	}
}

static void
cmd_rcpt(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	unsigned max = s->cfg->limits.max_recipients;

	if (!in_transaction(s))
		reply_error(s, 503, "5.5.1", "Need MAIL command");
	else if (cmd->path[0] == '\0')
		reply_error(s, 501, "5.1.3", "Bad recipient address syntax");
	else if (max != 0 && s->tx.n_rcpts >= max)
		/* Not a client error (RFC 5321 4.5.3.1.10): a pipelining client
		 * sends its extra RCPTs before it sees a 452, and must still be
		 * able to send DATA for the recipients accepted. */
		reply(s, 452, "4.5.3", "Too many recipients");
	else if (txn_add_rcpt(&s->tx, cmd->path) < 0)
		reply(s, 451, "4.3.0", "Out of memory");
	else {
		set_state(s, SESS_RCPT);
		reply(s, 250, "2.1.5", "Ok");
		if (s->tx.n_rcpts == 1)
			early_connect(s);
	}
}

/* ---------------------------------------------------------------- DATA */

static const char *
with_protocol(const struct smtp_session *s)
{
	/* RFC 3848 */
	static const char *const names[2][2] = {
		{ "ESMTP", "ESMTPA" }, { "ESMTPS", "ESMTPSA" }
	};

	if (s->helo == HELO_HELO && s->user == NULL)
		return "SMTP";
	return names[s->tls_active][s->user != NULL];
}

/*
 * RFC 5321 4.4: a relay adds a trace header. It goes first into the body,
 * before the client's octets, as msgbody only appends. "for" is given
 * only for a single recipient, so recipients do not learn of each other.
 */
static int
add_received(struct smtp_session *s)
{
	char date[64], rcpt[SMTP_PATH_MAX + 16] = "", hdr[1024];
	const char *v6 = strchr(s->client, ':') != NULL ? "IPv6:" : "";
	int n;

	maildate_format(time(NULL), date, sizeof(date));
	if (s->tx.n_rcpts == 1)
		snprintf(rcpt, sizeof(rcpt), "\r\n\tfor <%s>", s->tx.rcpts[0]);
	n = snprintf(hdr, sizeof(hdr),
	    "Received: from %s ([%s%s])\r\n\tby %s (smtpmux) with %s id %s%s;\r\n\t%s\r\n",
	    s->helo_name[0] != '\0' ? s->helo_name : "unknown", v6, s->client,
	    hostname(s), with_protocol(s), s->tx.qid, rcpt, date);
	if (n < 0 || (size_t)n >= sizeof(hdr))
		return -1;
	return msgbody_append(s->tx.body, hdr, (size_t)n);
}

static int
data_begin(struct smtp_session *s)
{
	const struct limits_cfg *lim = &s->cfg->limits;

	set_id(s->rt, s->tx.qid);
	s->tx.body = msgbody_new(lim->memory_threshold, s->cfg->tmp_dir);
	if (s->tx.body == NULL || add_received(s) < 0) {
		log_err("%s: cannot store a message body: %s", s->id, strerror(errno));
		return -1;
	}
	smtp_data_reader_init(&s->tx.reader, lim->max_message_size);
	return 0;
}

/*
 * data_timeout only measures silence, which one octet now and then keeps
 * away. With limits.min_data_rate the message also has a deadline: it
 * starts at data_timeout and each read moves it by what its octets are
 * worth at that rate (smtp_data_deadline_ms).
 */
static void
data_deadline_start(struct smtp_session *s)
{
	uint64_t cap = (uint64_t)s->cfg->limits.data_timeout * 1000;

	if (s->cfg->limits.min_data_rate == 0)
		return;
	s->data_deadline_ms = now_ms() + cap;
	timer_start(s, TIMER_DATA, cap);
}

static void
data_deadline_extend(struct smtp_session *s, size_t octets)
{
	uint64_t now = now_ms(), left;

	if (s->timer != TIMER_DATA || octets == 0)
		return;
	left = s->data_deadline_ms > now ? s->data_deadline_ms - now : 0;
	left = smtp_data_deadline_ms(left, octets, s->cfg->limits.min_data_rate,
	    (uint64_t)s->cfg->limits.data_timeout * 1000);
	s->data_deadline_ms = now + left;
	timer_start(s, TIMER_DATA, left);
}

static void
cmd_data(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	if (s->state == SESS_MAIL) {
		reply_error(s, 503, "5.5.1", "Need RCPT command");
	} else if (s->state != SESS_RCPT) {
		reply_error(s, 503, "5.5.1", "Need MAIL command");
	} else if (data_begin(s) < 0) {
		txn_reset(s);
		reply(s, 451, "4.3.0", "Local error in processing");
	} else {
		set_state(s, SESS_DATA);
		reply(s, 354, NULL, "End data with <CR><LF>.<CR><LF>");
		flush(s);
		s->io->set_timeout(s->ctx, s->cfg->limits.data_timeout);
		data_deadline_start(s);
	}
}

/* RFC 6152: such a body may only go to a downstream that offers 8BITMIME,
 * whatever BODY= the client declared (or forgot to). */
static bool
has_8bit(const void *p, size_t len)
{
	const unsigned char *c = p;

	for (size_t i = 0; i < len; i++)
		if (c[i] & 0x80)
			return true;
	return false;
}

/* Any octet >= 0x80 in buf, read where it lies. */
static bool
buffer_has_8bit(struct evbuffer *buf)
{
	struct evbuffer_ptr p;
	struct evbuffer_iovec v;
	size_t off = 0, len = evbuffer_get_length(buf);

	if (evbuffer_ptr_set(buf, &p, 0, EVBUFFER_PTR_SET) < 0)
		return false;
	while (off < len && evbuffer_peek(buf, -1, &p, &v, 1) > 0) {
		if (has_8bit(v.iov_base, v.iov_len))
			return true;
		off += v.iov_len;
		if (off >= len || evbuffer_ptr_set(buf, &p, v.iov_len, EVBUFFER_PTR_ADD) < 0)
			break;
	}
	return false;
}

/* Moves the unstuffed octets from the scratch buffer into the body: in
 * memory its chains move over, uncopied. */
static void
store_body_chunk(struct smtp_session *s)
{
	if (!s->tx.saw_8bit)
		s->tx.saw_8bit = buffer_has_8bit(s->scratch);
	if (!s->tx.store_failed && msgbody_append_buffer(s->tx.body, s->scratch) < 0) {
		log_err("%s: cannot store the message body: %s", s->id, strerror(errno));
		s->tx.store_failed = true;
	}
	evbuffer_drain(s->scratch, evbuffer_get_length(s->scratch));
}

static void
after_transaction(struct smtp_session *s)
{
	if (s->state == SESS_CLOSING)        /* the error budget ran out */
		return;
	s->io->set_timeout(s->ctx, s->cfg->limits.command_timeout);
	flush(s);
	if (s->shutdown_pending)
		reply_close(s, "4.3.2", "Service shutting down");
}

/* The relay's verdict becomes the client's reply to the final dot. A
 * failure is the downstream's fault, not the client's: it does not count
 * toward the error budget. */
static void
relay_finished(struct smtp_session *s, const struct relay_result *res)
{
	char text[SMTP_REPLY_TEXT_MAX];
	bool valid = res->code >= 400 && res->code < 600 && res->text[0] != '\0';
	int code = res->ok ? 250 : valid ? res->code : 451;

	s->tx.relay = NULL;
	set_state(s, SESS_GREETED);
	if (res->ok && res->queued)
		reply(s, 250, "2.0.0", "%s", clean(text, sizeof(text), res->text));
	else if (res->ok)
		reply(s, 250, "2.0.0", "Ok: queued as %s", s->tx.qid);
	else if (!valid)
		reply(s, 451, "4.3.0", "Delivery failed, try again later");
	else
		reply(s, res->code, res->enhanced[0] != '\0' ? res->enhanced
		    : res->code < 500 ? "4.0.0" : "5.0.0", "%s",
		    clean(text, sizeof(text), res->text));
	if (s->client_gone) {
		/* The reply goes out in case the client only half-closed. */
		log_info("%s: id=%s client=[%s] reply=%d: the client had hung up; message %s",
		    s->id, s->tx.qid, s->client, code, res->ok ? "delivered" : "not delivered");
		txn_reset(s);
		s->state = SESS_CLOSING;
		flush(s);
		s->io->close(s->ctx);
		return;
	}
	/* relay.c's line for the message (session id, client, verdict) said
	 * it all: one line per message. */
	txn_reset(s);
	s->io->pause(s->ctx, false);
	after_transaction(s);
}

static void
relay_done(void *arg, const struct relay_result *res)
{
	struct smtp_session *s = arg;

	if (s->tx.in_relay_start) {
		s->tx.early = *res;
		s->tx.early_done = true;
		return;
	}
	relay_finished(s, res);
	/* Commands pipelined after the message waited in `in` until now. */
	smtp_session_process(s);
}

static void
relay_message(struct smtp_session *s)
{
	struct txn *tx = &s->tx;
	struct delivery *prepared = tx->prepared;
	struct delivery *r;

	tx->umsg = (struct upstream_msg){
		.id = tx->qid, .session = s->id, .mail_from = tx->mail_from,
		.rcpts = (const char *const *)tx->rcpts, .n_rcpts = tx->n_rcpts,
		.body = tx->saw_8bit ? SMTP_BODY_8BITMIME : tx->body_type, .data = tx->body,
	};
	set_state(s, SESS_RELAYING);
	s->io->pause(s->ctx, true);
	/* The client is rightly silent now; the relay has its own deadline. */
	s->io->set_timeout(s->ctx, 0);
	tx->in_relay_start = true;
	tx->prepared = NULL;
	if (prepared != NULL)
		r = s->io->relay_begin(s->ctx, prepared, &tx->umsg, msgbody_size(tx->body),
		    relay_done, s);
	else
		r = s->io->relay_start(s->ctx, s->rt, tx->user, &tx->umsg,
		    msgbody_size(tx->body), s->client, relay_done, s);
	tx->in_relay_start = false;
	if (tx->early_done) {
		relay_finished(s, &tx->early);
	} else if (r == NULL) {
		struct relay_result fail = { .code = 451, .enhanced = "4.3.0" };

		snprintf(fail.text, sizeof(fail.text), "Local error in processing");
		relay_finished(s, &fail);
	} else {
		tx->relay = r;
	}
}

/* The final dot: refuse the message, or hand it to the relay. */
static void
end_of_data(struct smtp_session *s)
{
	const struct smtp_data_reader *r = &s->tx.reader;
	char from[SMTP_PATH_MAX + 1];

	timer_stop(s);
	set_state(s, SESS_GREETED);
	if (r->too_big) {
		reply_error(s, 552, "5.3.4", "Message size exceeds fixed limit");
	} else if (r->bare_lf || r->bare_cr) {
		/* SMTP smuggling: a downstream that accepts a bare LF or CR as a
		 * line end could read a second message in this one. */
		log_warn("%s: rejected message from=<%s> client=[%s]: bare %s in DATA",
		    s->id, clean(from, sizeof(from), s->tx.mail_from), s->client,
		    r->bare_lf ? "LF" : "CR");
		reply_error(s, 550, "5.5.2", "Message contains bare CR or LF");
	} else if (r->too_long) {
		/*
		 * RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with
		 * its CRLF. 500 5.5.6 is a command reply and not among the
		 * end-of-data replies of 4.3.2 (250, 450-452, 550, 552, 554); the
		 * message itself violates the protocol and will fail the same
		 * way on every retry, so a permanent 550 with X.5.2 (protocol
		 * syntax error, RFC 3463) tells the app exactly that. 552 5.3.4
		 * would wrongly suggest the message is merely too big.
		 */
		reply_error(s, 550, "5.5.2", "Message contains a line longer than 1000 octets");
	} else if (s->tx.store_failed) {
		reply(s, 451, "4.3.0", "Local error in processing");
	} else {
		relay_message(s);
		return;
	}
	txn_reset(s);
	after_transaction(s);
}

/* Feeds one contiguous chunk of `in` to the DATA reader; false when no
 * progress is possible without more input. */
static bool
read_data(struct smtp_session *s)
{
	struct evbuffer_iovec v;
	size_t used = 0;
	bool done;

	if (evbuffer_peek(s->in, -1, NULL, &v, 1) < 1 || v.iov_len == 0)
		return false;
	done = smtp_data_read(&s->tx.reader, v.iov_base, v.iov_len, &used, s->scratch);
	evbuffer_drain(s->in, used);
	store_body_chunk(s);
	if (done)
		end_of_data(s);
	else
		data_deadline_extend(s, used);
	return done || used > 0;
}

/* ---------------------------------------------------------------- others */

static void
cmd_rset(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	txn_reset(s);
	reply(s, 250, "2.0.0", "Ok");
}

static void
cmd_noop(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	reply(s, 250, "2.0.0", "Ok");
}

static void
cmd_quit(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	txn_reset(s);
	reply(s, 221, "2.0.0", "Bye");
	s->state = SESS_CLOSING;
	flush(s);
	s->io->close(s->ctx);
}

static void
cmd_help(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	reply(s, 214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT");
}

static void
cmd_vrfy(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	/* RFC 5321 3.5.3: nothing about users is disclosed. */
	reply(s, 252, "2.5.2", "Cannot VRFY user, but will accept message");
}

static void
cmd_not_implemented(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	/* EXPN: no lists. */
	reply_error(s, 502, "5.5.1", "Command not implemented");
}

/*
 * CHUNKING (RFC 3030) is not offered, so a BDAT is followed by a chunk of
 * octets we must not read as commands, and whose announced size we have no
 * reason to trust: hang up, as Postfix does with CHUNKING off. Accepting
 * BDAT would need a second, length-framed body path (and dot-stuffing
 * and line-end checks of its content for downstreams that only take DATA)
 * for clients that all speak DATA anyway.
 */
static void
cmd_bdat(struct smtp_session *s)
{
	log_warn("%s: BDAT without CHUNKING from [%s]: closing", s->id, s->client);
	txn_reset(s);
	reply_and_close(s, 521, "5.5.1", "BDAT not supported: CHUNKING is not offered");
}

static void
cmd_starttls(struct smtp_session *s, const struct smtp_cmd *cmd)
{
	/* "STARTTLS x" never gets here: the parser answers 501 5.5.4. */
	if (s->tls_active)
		reply_error(s, 554, "5.5.1", "TLS already active");
	else if (!starttls_offered(s))
		reply_error(s, 502, "5.5.1", "STARTTLS not available");
	else if (in_transaction(s))
		reply_error(s, 503, "5.5.1", "STARTTLS not permitted during a mail transaction");
	else {
		reply(s, 220, "2.0.0", "Ready to start TLS");
		/* CVE-2011-0411: nothing after this line may be read as a
		 * command; the loop stops here and the owner discards `in`. */
		s->state = SESS_TLS_WAIT;
		flush(s);
		s->io->starttls(s->ctx);
	}
}

typedef void cmd_handler(struct smtp_session *, const struct smtp_cmd *);

static cmd_handler *const handlers[N_VERBS] = {
	[SMTP_VERB_HELO] = cmd_helo,
	[SMTP_VERB_EHLO] = cmd_ehlo,
	[SMTP_VERB_MAIL] = cmd_mail,
	[SMTP_VERB_RCPT] = cmd_rcpt,
	[SMTP_VERB_DATA] = cmd_data,
	[SMTP_VERB_RSET] = cmd_rset,
	[SMTP_VERB_NOOP] = cmd_noop,
	[SMTP_VERB_QUIT] = cmd_quit,
	[SMTP_VERB_HELP] = cmd_help,
	[SMTP_VERB_VRFY] = cmd_vrfy,
	[SMTP_VERB_EXPN] = cmd_not_implemented,
	[SMTP_VERB_AUTH] = cmd_auth,
	[SMTP_VERB_STARTTLS] = cmd_starttls,
};

/* ---------------------------------------------------------------- input */

static void
count_command(struct smtp_session *s, enum smtp_verb verb)
{
	if ((unsigned)verb >= N_VERBS)
		verb = SMTP_VERB_UNKNOWN;
	s->n_total[verb]++;
	s->pending_verb = verb;
	s->verb_pending = true;
}

/* RFC 4954 4 names X.5.6 for an over-long line inside an AUTH exchange;
 * any other over-long line is a syntax error, X.5.2 (RFC 3463). */
static void
line_too_long(struct smtp_session *s, bool in_auth)
{
	count_command(s, SMTP_VERB_UNKNOWN);
	if (in_auth)
		reply_error(s, 500, "5.5.6", "Authentication Exchange line is too long");
	else
		reply_error(s, 500, "5.5.2", "Line too long");
}

/* Lines are read up to SMTP_AUTH_LINE_MAX; the limit of each command
 * (RFC 5321 4.5.3.1.4, RFC 4954) is applied once it is parsed. */
static void
handle_command(struct smtp_session *s, const char *line, size_t len)
{
	struct smtp_cmd cmd;
	struct smtp_error err = { 500, "5.5.2", "Syntax error" };
	bool parsed;

	memset(&cmd, 0, sizeof(cmd));
	parsed = smtp_parse_command(line, len, &cmd, &err) == 0;
	if (len + 2 > smtp_cmd_line_max(parsed ? &cmd : NULL)) {
		line_too_long(s, false);
		return;
	}
	/* The parser keeps the verb of a line with bad arguments. */
	count_command(s, cmd.verb);
	if (cmd.verb == SMTP_VERB_BDAT)
		cmd_bdat(s);            /* whatever its arguments: a chunk may follow */
	else if (!parsed)
		reply_error(s, err.code, err.enhanced, "%s", err.text);
	else if ((unsigned)cmd.verb < N_VERBS && handlers[cmd.verb] != NULL)
		handlers[cmd.verb](s, &cmd);
	else
		reply_error(s, 500, "5.5.2", "Command unrecognized");
}

static bool
in_auth_exchange(const struct smtp_session *s)
{
	return s->state == SESS_AUTH_PLAIN || s->state == SESS_AUTH_LOGIN_USER ||
	    s->state == SESS_AUTH_LOGIN_PASS;
}

/*
 * Copies the next line, up to and with its LF, into line (room for
 * SMTP_AUTH_LINE_MAX + 1); returns its length without the line end
 * (*consumed: with it), -1 when no complete line is there yet, -2 when
 * SMTP_AUTH_LINE_MAX octets came without a line end. `in` is searched
 * where it lies, never linearised: evbuffer_pullup would leave copies of
 * an AUTH line in chains it frees.
 */
static long
copy_line(struct smtp_session *s, char *line, size_t *consumed)
{
	size_t avail = evbuffer_get_length(s->in);
	size_t scan = avail < SMTP_AUTH_LINE_MAX ? avail : SMTP_AUTH_LINE_MAX;
	struct evbuffer_ptr end, lf;

	*consumed = 0;
	if (evbuffer_ptr_set(s->in, &end, scan, EVBUFFER_PTR_SET) < 0)
		return -1;
	lf = evbuffer_search_range(s->in, "\n", 1, NULL, &end);
	if (lf.pos < 0)
		return avail >= SMTP_AUTH_LINE_MAX ? -2 : -1;
	evbuffer_copyout(s->in, line, (size_t)lf.pos + 1);
	return smtp_next_line(line, (size_t)lf.pos + 1, SMTP_AUTH_LINE_MAX, consumed);
}

/* Takes one line off `in`; false when no complete line is there yet. The
 * line is copied out first so callbacks may touch `in` freely. Every
 * command line is wiped from `in` as it is drained: any of them may be an
 * AUTH line or a response carrying a password. The copy lives on the
 * stack for the time of the command only (wiped after an AUTH line): a
 * session waiting for its next command holds no 12 KiB line buffer. */
static bool
read_line(struct smtp_session *s)
{
	char line[SMTP_AUTH_LINE_MAX + 1];
	size_t consumed;
	long len = copy_line(s, line, &consumed);

	if (len == -1)
		return false;
	if (len < 0) {
		bool in_auth = in_auth_exchange(s);

		s->discarding = true;
		if (in_auth) {               /* RFC 4954 4: the exchange is over */
			set_state(s, SESS_GREETED);
			auth_wipe(s->login_user, sizeof(s->login_user));
		}
		line_too_long(s, in_auth);
		return true;
	}
	line[len] = '\0';
	buffer_wipe_drain(s->in, consumed);
	s->lines_read++;
	if (in_auth_exchange(s)) {
		auth_continue(s, line, (size_t)len);
		auth_wipe(line, consumed);
	} else {
		handle_command(s, line, (size_t)len);
		/* An initial response carries the password. */
		if (len > 5 && strncasecmp(line, "AUTH ", 5) == 0)
			auth_wipe(line, consumed);
	}
	return true;
}

/* Drops the rest of an overlong line, up to and including its LF. */
static bool
discard_line(struct smtp_session *s)
{
	struct evbuffer_ptr p = evbuffer_search(s->in, "\n", 1, NULL);

	if (p.pos < 0) {
		buffer_wipe_all(s->in);
	} else {
		buffer_wipe_drain(s->in, (size_t)p.pos + 1);
		s->discarding = false;
		s->lines_read++;
	}
	return true;
}

static bool
accepts_input(const struct smtp_session *s)
{
	switch (s->state) {
	case SESS_CONNECTED:
	case SESS_RELAYING:
	case SESS_TLS_WAIT:
	case SESS_AUTH_CHECK:
	case SESS_AUTH_WAIT:
	case SESS_CLOSING:
		return false;
	default:
		return true;
	}
}

static bool
reading_commands(const struct smtp_session *s)
{
	return accepts_input(s) && s->state != SESS_DATA;
}

/*
 * command_timeout only measures silence, which one octet every few seconds
 * keeps away: a command line also has limits.command_deadline from its
 * first octet to its line end (Postfix's smtpd_per_record_deadline idea).
 * line_pending: a line (or an overlong one being dropped) has begun and
 * not ended. Every line that ends starts the clock again for the next.
 */
static void
line_deadline_update(struct smtp_session *s, bool line_pending)
{
	if (line_pending && reading_commands(s)) {
		if (s->timer == TIMER_LINE && s->timer_lines == s->lines_read)
			return;
		s->timer_lines = s->lines_read;
		timer_start(s, TIMER_LINE, (uint64_t)s->cfg->limits.command_deadline * 1000);
	} else if (s->timer == TIMER_LINE) {
		timer_stop(s);
	}
}

/*
 * Replies the client has not read are piling up (limits.max_output_buffer):
 * no more commands are taken until the owner's connection has written them
 * down (it then calls smtp_session_input() again). So a client that
 * pipelines and never reads costs a bounded amount of memory, however much
 * a command's reply outweighs the command (EHLO, HELP).
 */
static bool
replies_backlogged(struct smtp_session *s)
{
	size_t max = s->cfg->limits.max_output_buffer;

	if (max == 0 || evbuffer_get_length(s->out) < max)
		return false;
	if (!s->reply_backlog_logged) {
		s->reply_backlog_logged = true;
		log_info("%s: client [%s] does not read its replies: commands wait", s->id,
		    s->client);
	}
	return true;
}

/* The input loop without re-entrancy concerns: every reply is queued in
 * order; one flush when no complete command is left. */
static void
smtp_session_process(struct smtp_session *s)
{
	bool line_pending = false;

	while (accepts_input(s) && evbuffer_get_length(s->in) > 0 && !replies_backlogged(s)) {
		bool progress;

		if (s->state == SESS_DATA)
			progress = read_data(s);
		else if (s->discarding)
			progress = discard_line(s);
		else
			progress = read_line(s);
		if (!progress) {
			line_pending = s->state != SESS_DATA;
			break;
		}
		/* A transaction that ended without a message (RSET, EHLO, a
		 * refused DATA) was the one smtp_session_shutdown() waited for. */
		if (s->shutdown_pending && s->state == SESS_GREETED)
			reply_close(s, "4.3.2", "Service shutting down");
	}
	line_deadline_update(s, line_pending || (s->discarding && evbuffer_get_length(s->in) == 0));
	if (s->need_flush && s->state != SESS_CLOSING)
		flush(s);
}

/* ---------------------------------------------------------------- API */

struct smtp_session *
smtp_session_new(const struct smtp_session_params *p, struct evbuffer *in,
    struct evbuffer *out, const struct smtp_session_io *io, void *ctx)
{
	struct smtp_session *s = calloc(1, sizeof(*s));

	if (s == NULL)
		return NULL;
	s->scratch = evbuffer_new();
	if (s->scratch == NULL) {
		free(s);
		return NULL;
	}
	s->rt = p->rt;
	s->cfg = p->rt->cfg;
	s->listener = p->listener;
	s->in = in;
	s->out = out;
	s->io = io;
	s->ctx = ctx;
	s->tls_active = p->tls_active;
	copy_str(s->client, sizeof(s->client), p->client_addr != NULL ? p->client_addr : "");
	copy_str(s->tls_desc, sizeof(s->tls_desc),
	    p->tls_active && p->tls_desc != NULL ? p->tls_desc : "");
	set_id(s->rt, s->id);
	s->net_client = config_find_client(s->cfg, s->client);
	s->state = SESS_CONNECTED;
	return s;
}

void
smtp_session_start(struct smtp_session *s)
{
	if (s->started)
		return;
	s->started = true;
	if (s->net_client != NULL)
		log_info("%s: connect from [%s]%s%s network=%s user=%s", s->id, s->client,
		    s->tls_active ? " tls=" : "", s->tls_desc, s->net_client->network,
		    s->net_client->user->email);
	else
		log_info("%s: connect from [%s]%s%s", s->id, s->client,
		    s->tls_active ? " tls=" : "", s->tls_desc);
	/* RFC 2034: no enhanced code in the greeting. */
	reply(s, 220, NULL, "%s ESMTP smtpmux", hostname(s));
	s->state = SESS_GREETED;
	s->io->set_timeout(s->ctx, s->cfg->limits.command_timeout);
	flush(s);
	smtp_session_process(s);
}

void
smtp_session_input(struct smtp_session *s)
{
	smtp_session_process(s);
}

void
smtp_session_tls_ready(struct smtp_session *s, const char *tls_desc)
{
	if (s->state != SESS_TLS_WAIT)
		return;
	s->tls_active = true;
	copy_str(s->tls_desc, sizeof(s->tls_desc), tls_desc != NULL ? tls_desc : "");
	log_info("%s: starttls client=[%s] %s", s->id, s->client, s->tls_desc);
	/* RFC 3207 4.2: forget everything learnt before TLS. */
	txn_reset(s);
	s->helo = HELO_NONE;
	s->helo_name[0] = '\0';
	s->user = NULL;
	s->state = SESS_GREETED;
	if (s->shutdown_pending) {
		reply_close(s, "4.3.2", "Service shutting down");
		return;
	}
	s->io->set_timeout(s->ctx, s->cfg->limits.command_timeout);
	smtp_session_process(s);
}

void
smtp_session_password_checked(struct smtp_session *s, uint64_t ticket, bool match)
{
	if (s->check.starting) {             /* answered inside io->check_password */
		s->check.early = true;
		s->check.early_ticket = ticket;
		s->check.early_match = match;
		return;
	}
	if (s->state != SESS_AUTH_CHECK || ticket == 0 || ticket != s->check.ticket)
		return;
	auth_check_done(s, match);
	/* Commands pipelined after the AUTH waited in `in` until now. */
	smtp_session_process(s);
}

void
smtp_session_timeout(struct smtp_session *s)
{
	switch (s->state) {
	case SESS_RELAYING:      /* the client waits for our reply: not its fault */
	case SESS_CLOSING:
		return;
	case SESS_TLS_WAIT:      /* no plaintext reply inside a handshake */
	case SESS_CONNECTED:
		s->state = SESS_CLOSING;
		s->io->close(s->ctx);
		return;
	default:
		break;
	}
	log_info("%s: timeout after %s from [%s]", s->id,
	    s->state == SESS_DATA ? "DATA" : "command", s->client);
	auth_check_forget(s);
	txn_reset(s);
	reply_close(s, "4.4.2", "Timeout");
}

void
smtp_session_timer(struct smtp_session *s)
{
	enum sess_timer kind = s->timer;

	s->timer = TIMER_NONE;
	switch (kind) {
	case TIMER_AUTH:
		if (s->state != SESS_AUTH_WAIT)
			break;
		auth_delay_over(s);
		/* Commands pipelined after the AUTH waited in `in` until now. */
		smtp_session_process(s);
		break;
	case TIMER_LINE:
		if (!reading_commands(s))
			break;
		log_info("%s: command deadline (%u s) exceeded from [%s]", s->id,
		    s->cfg->limits.command_deadline, s->client);
		txn_reset(s);
		reply_close(s, "4.4.2", "Timeout");
		break;
	case TIMER_DATA:
		if (s->state != SESS_DATA)
			break;
		log_info("%s: DATA too slow from [%s]: under %u octets/s", s->id, s->client,
		    s->cfg->limits.min_data_rate);
		txn_reset(s);
		reply_close(s, "4.4.2", "Timeout");
		break;
	case TIMER_NONE:
		break;
	}
}

void
smtp_session_shutdown(struct smtp_session *s)
{
	if (s->state == SESS_CLOSING)
		return;
	if (smtp_session_busy(s) || in_transaction(s) || s->state == SESS_TLS_WAIT ||
	    s->state == SESS_AUTH_CHECK || s->state == SESS_AUTH_WAIT) {
		/* Answered after the current transaction, or after the handshake. */
		s->shutdown_pending = true;
		return;
	}
	if (s->state == SESS_CONNECTED) {
		s->state = SESS_CLOSING;
		s->io->close(s->ctx);
		return;
	}
	txn_reset(s);
	reply_close(s, "4.3.2", "Service shutting down");
}

/*
 * The client is gone. A relay in progress is cancelled: the client never
 * heard 250, so it will send the message again (a downstream that already
 * took it may then deliver it twice, the RFC 1047 race that no SMTP hop
 * avoids). A message still being received is simply dropped.
 */
void
smtp_session_abort(struct smtp_session *s)
{
	if (s->tx.relay != NULL) {
		log_info("%s: id=%s relay cancelled: client [%s] disconnected", s->id,
		    s->tx.qid, s->client);
		s->io->relay_cancel(s->ctx, s->tx.relay);
		s->tx.relay = NULL;
	} else if (s->state == SESS_DATA) {
		log_info("%s: lost connection after DATA from [%s]", s->id, s->client);
	}
	auth_check_forget(s);
	txn_reset(s);
	s->state = SESS_CLOSING;
}

/* The final dot has gone to a downstream: the relay must run to its end. */
static bool
relay_past_dot(const struct smtp_session *s)
{
	return s->tx.relay != NULL && s->io->relay_dot_sent != NULL &&
	    s->io->relay_dot_sent(s->ctx, s->tx.relay);
}

void
smtp_session_hangup(struct smtp_session *s)
{
	if (s->state != SESS_RELAYING || s->client_gone)
		return;
	s->client_gone = true;
	if (relay_past_dot(s)) {
		log_info("%s: id=%s client [%s] hung up after the message was sent to the "
		    "downstream; waiting for its verdict", s->id, s->tx.qid, s->client);
		return;
	}
	/* Cancelled: the client will send it again, and it must not then
	 * arrive twice. */
	log_info("%s: id=%s relay cancelled: client [%s] hung up before the message was sent",
	    s->id, s->tx.qid, s->client);
	s->io->relay_cancel(s->ctx, s->tx.relay);
	s->tx.relay = NULL;
	txn_reset(s);
	reply_close(s, "4.4.2", "Connection closed by client, message not sent");
}

bool
smtp_session_deadline(struct smtp_session *s)
{
	if (s->state == SESS_CLOSING)
		return false;
	if (s->state == SESS_RELAYING && relay_past_dot(s)) {
		log_info("%s: id=%s shutdown timeout: the message is with the downstream; "
		    "waiting for its verdict", s->id, s->tx.qid);
		return true;
	}
	if (s->state == SESS_RELAYING && s->tx.relay != NULL && s->io->relay_defer != NULL &&
	    s->io->relay_defer(s->ctx, s->tx.relay)) {
		/* Going to the queue: 250 queued, then 421 as after any transaction
		 * during a shutdown. */
		s->shutdown_pending = true;
		return true;
	}
	if (s->tx.relay != NULL) {
		log_info("%s: id=%s relay cancelled: shutdown timeout before the message was sent",
		    s->id, s->tx.qid);
		s->io->relay_cancel(s->ctx, s->tx.relay);
		s->tx.relay = NULL;
	} else if (s->state == SESS_DATA) {
		log_info("%s: shutdown timeout during DATA from [%s]", s->id, s->client);
	}
	auth_check_forget(s);
	txn_reset(s);
	reply_close(s, "4.3.2", "Service shutting down");
	return false;
}

bool
smtp_session_busy(const struct smtp_session *s)
{
	return s->state == SESS_DATA || s->state == SESS_RELAYING;
}

const char *
smtp_session_id(const struct smtp_session *s)
{
	return s->id;
}

static void
log_disconnect(const struct smtp_session *s)
{
	static const struct { enum smtp_verb verb; const char *name; } order[] = {
		{ SMTP_VERB_HELO, "helo" }, { SMTP_VERB_EHLO, "ehlo" },
		{ SMTP_VERB_STARTTLS, "starttls" }, { SMTP_VERB_AUTH, "auth" },
		{ SMTP_VERB_MAIL, "mail" }, { SMTP_VERB_RCPT, "rcpt" },
		{ SMTP_VERB_DATA, "data" }, { SMTP_VERB_BDAT, "bdat" },
		{ SMTP_VERB_RSET, "rset" }, { SMTP_VERB_NOOP, "noop" },
		{ SMTP_VERB_VRFY, "vrfy" }, { SMTP_VERB_EXPN, "expn" },
		{ SMTP_VERB_HELP, "help" }, { SMTP_VERB_QUIT, "quit" },
		{ SMTP_VERB_UNKNOWN, "unknown" },
	};
	char text[512];
	size_t len = 0;
	unsigned total = 0, ok = 0;

	text[0] = '\0';
	for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
		unsigned t = s->n_total[order[i].verb], k = s->n_ok[order[i].verb];

		total += t;
		ok += k;
		if (t == 0 || len >= sizeof(text))
			continue;
		len += (size_t)(k == t ? snprintf(text + len, sizeof(text) - len, " %s=%u", order[i].name, t)
		    : snprintf(text + len, sizeof(text) - len, " %s=%u/%u", order[i].name, k, t));
	}
	if (ok == total)
		log_info("%s: disconnect from [%s]%s commands=%u", s->id, s->client, text, total);
	else
		log_info("%s: disconnect from [%s]%s commands=%u/%u", s->id, s->client, text, ok, total);
}

void
smtp_session_free(struct smtp_session *s)
{
	if (s == NULL)
		return;
	if (s->tx.relay != NULL)
		s->io->relay_cancel(s->ctx, s->tx.relay);
	s->tx.relay = NULL;
	if (s->started)
		log_disconnect(s);
	txn_reset(s);
	auth_check_forget(s);
	auth_wipe(s->login_user, sizeof(s->login_user));
	evbuffer_free(s->scratch);
	free(s);
}

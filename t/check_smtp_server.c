/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of the inbound SMTP session (smtp_server.c) without sockets:
 * the test owns the `in` and `out` buffers, records every io callback, and
 * plays the relay: relay_start keeps a copy of the message and the test
 * answers through the done callback with the result it wants.
 */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "auth.h"
#include "client_table.h"
#include "config.h"
#include "freed_watch.h"
#include "log.h"
#include "msgbody.h"
#include "passwd.h"
#include "smtp_limits.h"
#include "smtp_parse.h"
#include "smtp_server.h"

#define CLIENT "192.0.2.1"
#define HOST "mx.test"
#define USER "app@example.com"
#define PASS "s3cret-Pa55"
#define GREETING "220 " HOST " ESMTP smtpmux\r\n"

/* What the fake relay was given. */
struct relayed {
	char id[13];
	char *from;
	char **rcpts;
	size_t n_rcpts;
	char *body;
	size_t body_len;
	uint64_t size;
	enum smtp_body body_type;
	const struct user_cfg *user;
	char client[64];
};

struct harness {
	struct config cfg;
	struct user_cfg users[2];
	struct listen_cfg listener;
	struct runtime rt;
	struct smtp_session_params params;
	struct evbuffer *in, *out;
	struct smtp_session *s;
	char log_path[64];
	char text[1 << 16];              /* last h_take() */

	/* io calls, in order: F flush, S starttls, C close, P pause, U unpause */
	char calls[512];
	size_t n_calls;
	unsigned timeout;
	unsigned timer_ms;               /* the one-shot timer; 0: not running */
	unsigned timer_starts;

	/* the fake relay */
	int relay_token;
	unsigned relay_starts, relay_cancels;
	const struct user_cfg *prepared_user;  /* who relay_prepare was asked for */
	struct delivery *cancelled;
	relay_done_fn done;
	void *done_arg;
	struct relayed msg;
	bool answer_at_once;             /* call done inside relay_start */
	bool fail_start;                 /* relay_start returns NULL */
	struct relay_result at_once;

	/* early connect and the final dot */
	bool early_connect;              /* relay_prepare gives a relay */
	int prepared_token;
	unsigned prepares, begins;
	size_t prepared_rcpts;           /* recipients known at relay_prepare */
	bool dot_sent;                   /* what relay_dot_sent says */

	/* the fake off-loop password check (offload_io) */
	bool offload;                    /* h_start() offers io->check_password */
	unsigned checks, check_cancels;
	uint64_t check_ticket;           /* the last one handed out */
	uint64_t cancelled_ticket;
	char check_given[64], check_stored[128];
	bool check_full;                 /* check_password returns 0 */
	bool check_at_once;              /* the verdict inside check_password */
	bool at_once_match;
};

static struct harness H;

/* ---------------------------------------------------------------- fake io */

static void
record(struct harness *h, char c)
{
	if (h->n_calls + 1 < sizeof(h->calls))
		h->calls[h->n_calls++] = c;
}

static void io_flush(void *ctx) { record(ctx, 'F'); }
static void io_starttls(void *ctx) { record(ctx, 'S'); }
static void io_close(void *ctx) { record(ctx, 'C'); }
static void io_pause(void *ctx, bool paused) { record(ctx, paused ? 'P' : 'U'); }

static void
io_set_timeout(void *ctx, unsigned seconds)
{
	((struct harness *)ctx)->timeout = seconds;
}

static void
io_set_timer(void *ctx, unsigned ms)
{
	struct harness *h = ctx;

	h->timer_ms = ms;
	if (ms != 0)
		h->timer_starts++;
}

static char *
read_body(struct msgbody *b, size_t *len)
{
	uint64_t size = msgbody_size(b), off = 0;
	char *buf = malloc(size + 1);
	ssize_t n;

	ck_assert_ptr_nonnull(buf);
	while ((n = msgbody_read(b, off, buf + off, size - off)) > 0)
		off += (uint64_t)n;
	ck_assert_int_ge(n, 0);
	ck_assert_uint_eq(off, size);
	buf[size] = '\0';
	*len = size;
	return buf;
}

static void
relayed_free(struct relayed *m)
{
	free(m->from);
	for (size_t i = 0; i < m->n_rcpts; i++)
		free(m->rcpts[i]);
	free(m->rcpts);
	free(m->body);
	memset(m, 0, sizeof(*m));
}

/* Keeps a copy of what a relay was given. */
static void
record_message(struct harness *h, const struct user_cfg *user, const struct upstream_msg *msg,
    uint64_t size, const char *client_addr)
{
	struct relayed *m = &h->msg;

	relayed_free(m);
	snprintf(m->id, sizeof(m->id), "%s", msg->id);
	m->from = strdup(msg->mail_from);
	m->rcpts = calloc(msg->n_rcpts, sizeof(char *));
	for (size_t i = 0; i < msg->n_rcpts; i++)
		m->rcpts[i] = strdup(msg->rcpts[i]);
	m->n_rcpts = msg->n_rcpts;
	m->body = read_body(msg->data, &m->body_len);
	m->size = size;
	m->body_type = msg->body;
	m->user = user;
	snprintf(m->client, sizeof(m->client), "%s", client_addr);
}

static struct delivery *
io_relay_start(void *ctx, struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *msg, uint64_t size, const char *client_addr,
    relay_done_fn done, void *arg)
{
	struct harness *h = ctx;

	h->relay_starts++;
	record_message(h, user, msg, size, client_addr);
	ck_assert_ptr_eq(rt, &h->rt);
	if (h->fail_start)
		return NULL;
	if (h->answer_at_once) {
		done(arg, &h->at_once);
		return (struct delivery *)&h->relay_token;
	}
	h->done = done;
	h->done_arg = arg;
	return (struct delivery *)&h->relay_token;
}

static void
io_relay_cancel(void *ctx, struct delivery *r)
{
	struct harness *h = ctx;

	h->relay_cancels++;
	h->cancelled = r;
}

static struct delivery *
io_relay_prepare(void *ctx, struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *env, uint64_t size, const char *client_addr)
{
	struct harness *h = ctx;

	ck_assert_ptr_eq(rt, &h->rt);
	h->prepared_user = user;
	h->prepares++;
	h->prepared_rcpts = env->n_rcpts;
	return h->early_connect ? (struct delivery *)&h->prepared_token : NULL;
}

static struct delivery *
io_relay_begin(void *ctx, struct delivery *prepared, const struct upstream_msg *msg,
    uint64_t size, relay_done_fn done, void *arg)
{
	struct harness *h = ctx;

	ck_assert_ptr_eq(prepared, (struct delivery *)&h->prepared_token);
	h->begins++;
	record_message(h, &h->users[0], msg, size, CLIENT);
	h->done = done;
	h->done_arg = arg;
	return prepared;
}

static bool
io_relay_dot_sent(void *ctx, const struct delivery *r)
{
	return ((struct harness *)ctx)->dot_sent;
}

static const struct smtp_session_io test_io = {
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
};

static uint64_t
io_check_password(void *ctx, const char *given, const char *stored)
{
	struct harness *h = ctx;

	h->checks++;
	snprintf(h->check_given, sizeof(h->check_given), "%s", given);
	snprintf(h->check_stored, sizeof(h->check_stored), "%s", stored);
	if (h->check_full)
		return 0;
	h->check_ticket = 1000 + h->checks;
	if (h->check_at_once)
		smtp_session_password_checked(h->s, h->check_ticket, h->at_once_match);
	return h->check_ticket;
}

static void
io_check_password_cancel(void *ctx, uint64_t ticket)
{
	struct harness *h = ctx;

	h->check_cancels++;
	h->cancelled_ticket = ticket;
}

/* ---------------------------------------------------------------- fixture */

static void
setup(void)
{
	struct harness *h = &H;
	int fd;

	memset(h, 0, sizeof(*h));
	h->users[0].email = (char *)USER;
	h->users[0].password = (char *)PASS;
	h->users[1].email = (char *)"other@example.com";
	h->users[1].password = (char *)"other-pass";
	h->cfg.users = h->users;
	h->cfg.n_users = 2;
	h->cfg.hostname = (char *)HOST;
	h->cfg.allow_insecure_auth = true;
	h->cfg.tmp_dir = (char *)"/tmp";
	h->cfg.limits = (struct limits_cfg){
		.max_message_size = 10240, .max_recipients = 5, .max_errors = 10,
		.command_timeout = 300, .data_timeout = 120, .memory_threshold = 1048576,
		.command_deadline = 60,
	};
	h->listener.tls = TLS_MODE_NONE;
	h->rt.cfg = &h->cfg;
	h->params = (struct smtp_session_params){
		.rt = &h->rt, .listener = &h->listener, .client_addr = CLIENT,
	};
	h->in = evbuffer_new();
	h->out = evbuffer_new();
	snprintf(h->log_path, sizeof(h->log_path), "/tmp/check_smtp_server.XXXXXX");
	fd = mkstemp(h->log_path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	ck_assert_int_eq(log_open("check_smtp_server", LOG_TO_FILE, h->log_path), 0);
}

static void
teardown(void)
{
	struct harness *h = &H;

	smtp_session_free(h->s);
	client_table_destroy(h->rt.clients);
	relayed_free(&h->msg);
	evbuffer_free(h->in);
	evbuffer_free(h->out);
	log_close();
	unlink(h->log_path);
}

/* ---------------------------------------------------------------- helpers */

static const char *
take(void)
{
	size_t n = evbuffer_get_length(H.out);

	ck_assert_uint_lt(n, sizeof(H.text));
	evbuffer_remove(H.out, H.text, n);
	H.text[n] = '\0';
	return H.text;
}

static void
feed(const char *data, size_t len)
{
	evbuffer_add(H.in, data, len);
	smtp_session_input(H.s);
}

static void
send_str(const char *text)
{
	feed(text, strlen(text));
}

#define ck_exchange(cmd, expected) do { \
	send_str(cmd); \
	ck_assert_str_eq(take(), (expected)); \
} while (0)

static void
h_start(void)
{
	/* The daemon's io: hashes are checked off the loop; the test answers. */
	static struct smtp_session_io offload_io;

	offload_io = test_io;
	offload_io.check_password = io_check_password;
	offload_io.check_password_cancel = io_check_password_cancel;
	H.s = smtp_session_new(&H.params, H.in, H.out, H.offload ? &offload_io : &test_io, &H);
	ck_assert_ptr_nonnull(H.s);
	smtp_session_start(H.s);
	ck_assert_str_eq(take(), GREETING);
}

static const char *
plain_b64(char *out, size_t outlen, const char *authz, const char *authc, const char *pass)
{
	char raw[768];
	int n = snprintf(raw, sizeof(raw), "%s%c%s%c%s", authz, 0, authc, 0, pass);

	ck_assert_int_eq(auth_b64_encode(raw, (size_t)n, out, outlen), 0);
	return out;
}

static const char *
b64(char *out, size_t outlen, const char *text)
{
	ck_assert_int_eq(auth_b64_encode(text, strlen(text), out, outlen), 0);
	return out;
}

#define EHLO_BASE "250-" HOST "\r\n250-PIPELINING\r\n250-SIZE 10240\r\n" \
	"250-8BITMIME\r\n"
#define EHLO_NO_AUTH EHLO_BASE "250 ENHANCEDSTATUSCODES\r\n"
#define EHLO_AUTH EHLO_BASE "250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n"
#define EHLO_STARTTLS EHLO_BASE "250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
#define AUTH_OK "235 2.7.0 Authentication successful\r\n"
#define AUTH_BAD "535 5.7.8 Authentication credentials invalid\r\n"
#define SEQ_ERR "503 5.5.1 "
#define DATA_GO "354 End data with <CR><LF>.<CR><LF>\r\n"
#define MAIL_OK "250 2.1.0 Ok\r\n"
#define RCPT_OK "250 2.1.5 Ok\r\n"

static void
h_auth(void)
{
	char line[512], enc[400];

	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n",
	    plain_b64(enc, sizeof(enc), "", USER, PASS));
	ck_exchange(line, AUTH_OK);
}

/* Starts, authenticates and opens a transaction with one recipient. */
static void
h_ready_for_data(void)
{
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n",
	    MAIL_OK RCPT_OK DATA_GO);
}

static void
relay_answer(bool ok, int code, const char *enhanced, const char *text)
{
	struct relay_result res;
	relay_done_fn done = H.done;

	memset(&res, 0, sizeof(res));
	res.ok = ok;
	res.code = code;
	snprintf(res.enhanced, sizeof(res.enhanced), "%s", enhanced);
	snprintf(res.text, sizeof(res.text), "%s", text);
	snprintf(res.relay, sizeof(res.relay), "%s", ok ? "provider-a" : "");
	ck_assert_ptr_nonnull(done);
	H.done = NULL;
	done(H.done_arg, &res);
}

static size_t
count_of(const char *hay, const char *needle)
{
	size_t n = 0;

	for (const char *p = strstr(hay, needle); p != NULL; p = strstr(p + 1, needle))
		n++;
	return n;
}

static char *
log_text(void)
{
	FILE *fp = fopen(H.log_path, "r");
	static char buf[1 << 16];
	size_t n;

	ck_assert_ptr_nonnull(fp);
	n = fread(buf, 1, sizeof(buf) - 1, fp);
	buf[n] = '\0';
	fclose(fp);
	return buf;
}

static const char *
calls(void)
{
	H.calls[H.n_calls] = '\0';
	return H.calls;
}

static void
calls_reset(void)
{
	H.n_calls = 0;
}

/* The message body after the Received header the session added. */
static const char *
body_after_received(void)
{
	const char *end;

	ck_assert_ptr_nonnull(H.msg.body);
	ck_assert_msg(strncmp(H.msg.body, "Received: from ", 15) == 0, "no Received: %s", H.msg.body);
	/* The trace header ends at the first line not starting with a tab. */
	end = strstr(H.msg.body, "\r\n");
	while (end != NULL && end[2] == '\t')
		end = strstr(end + 2, "\r\n");
	ck_assert_ptr_nonnull(end);
	return end + 2;
}

/* ---------------------------------------------------------------- greeting, EHLO */

START_TEST(test_greeting)
{
	h_start();
	ck_assert_str_eq(calls(), "F");
	ck_assert_uint_eq(H.timeout, 300);
	ck_assert_ptr_nonnull(strstr(log_text(), "connect from [" CLIENT "]"));
	ck_assert_uint_eq(strlen(smtp_session_id(H.s)), 12);
	ck_assert(!smtp_session_busy(H.s));
}
END_TEST

START_TEST(test_ehlo_no_insecure_auth)
{
	H.cfg.allow_insecure_auth = false;
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_NO_AUTH);
}
END_TEST

START_TEST(test_ehlo_insecure_auth)
{
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
}
END_TEST

START_TEST(test_ehlo_starttls_listener)
{
	H.cfg.allow_insecure_auth = false;
	H.listener.tls = TLS_MODE_STARTTLS;
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_STARTTLS);
	ck_exchange("STARTTLS\r\n", "220 2.0.0 Ready to start TLS\r\n");
	smtp_session_tls_ready(H.s, "TLSv1.3");
	ck_assert_str_eq(take(), "");
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
}
END_TEST

START_TEST(test_ehlo_starttls_and_insecure_auth)
{
	H.listener.tls = TLS_MODE_STARTTLS;
	h_start();
	ck_exchange("EHLO client.example\r\n",
	    EHLO_BASE "250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n");
}
END_TEST

START_TEST(test_require_tls_listener)
{
	char line[512], enc[400];

	H.listener.tls = TLS_MODE_STARTTLS;
	H.listener.require_tls = true;
	h_start();
	/* allow_insecure_auth does not override require_tls */
	ck_exchange("EHLO client.example\r\n", EHLO_STARTTLS);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", USER, PASS));
	ck_exchange(line, "530 5.7.0 Must issue a STARTTLS command first\r\n");
	ck_exchange("MAIL FROM:<a@example.com>\r\n", "530 5.7.0 Must issue a STARTTLS command first\r\n");
	ck_exchange("STARTTLS\r\n", "220 2.0.0 Ready to start TLS\r\n");
	smtp_session_tls_ready(H.s, "TLSv1.3");
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange(line, AUTH_OK);
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
}
END_TEST

START_TEST(test_implicit_tls)
{
	H.cfg.allow_insecure_auth = false;
	H.listener.tls = TLS_MODE_IMPLICIT;
	H.listener.require_tls = true;
	H.params.tls_active = true;
	H.params.tls_desc = "TLSv1.3";
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("STARTTLS\r\n", "554 5.5.1 TLS already active\r\n");
}
END_TEST

START_TEST(test_helo)
{
	char line[512], enc[400];

	h_start();
	ck_exchange("HELO client.example\r\n", "250 " HOST "\r\n");
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", USER, PASS));
	ck_exchange(line, SEQ_ERR "Send EHLO first\r\n");
}
END_TEST

/* ---------------------------------------------------------------- AUTH */

START_TEST(test_mail_before_auth)
{
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("MAIL FROM:<a@example.com>\r\n", "530 5.7.0 Authentication required\r\n");
	ck_exchange("RCPT TO:<b@example.net>\r\n", SEQ_ERR "Need MAIL command\r\n");
}
END_TEST

START_TEST(test_auth_plaintext_refused)
{
	H.cfg.allow_insecure_auth = false;
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_NO_AUTH);
	ck_exchange("AUTH PLAIN\r\n",
	    "538 5.7.11 Encryption required for requested authentication mechanism\r\n");
}
END_TEST

START_TEST(test_auth_plain_initial)
{
	h_start();
	h_auth();
	ck_exchange("AUTH LOGIN\r\n", SEQ_ERR "Already authenticated\r\n");
	ck_assert_ptr_nonnull(strstr(log_text(), "auth ok user=" USER));
	ck_assert_ptr_null(strstr(log_text(), PASS));
}
END_TEST

/* Appends text to `in` as chains of its own, as several reads would. */
static void
feed_in_pieces(const char *text, const size_t *cuts, size_t n_cuts)
{
	size_t from = 0, len = strlen(text);

	for (size_t i = 0; i <= n_cuts; i++) {
		size_t to = i < n_cuts ? cuts[i] : len;
		struct evbuffer *piece = evbuffer_new();

		evbuffer_add(piece, text + from, to - from);
		evbuffer_add_buffer(H.in, piece);
		evbuffer_free(piece);
		from = to;
	}
	smtp_session_input(H.s);
}

/*
 * The memory that held an AUTH line goes back to malloc wiped: the line is
 * not linearised into fresh chains behind our back, and what is drained is
 * overwritten first. The response arrives in three chains, the first of
 * which holds the watched part of the base64 credentials.
 */
START_TEST(test_auth_input_wiped)
{
	static const char *const mechs[] = { "PLAIN", "LOGIN" };

	for (size_t m = 0; m < 2; m++) {
		char enc[400], line[512], watched[9];
		size_t cuts[3];

		h_start();
		ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
		if (m == 0)
			plain_b64(enc, sizeof(enc), "", USER, PASS);
		else
			b64(enc, sizeof(enc), PASS);
		snprintf(watched, sizeof(watched), "%.8s", enc + 4);
		freed_watch_secret(watched);
		snprintf(line, sizeof(line), "AUTH %s %s\r\nNOOP\r\n", mechs[m],
		    m == 0 ? enc : "");
		if (m == 1) {
			char user[64], user_line[80];

			ck_exchange("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n");
			snprintf(user_line, sizeof(user_line), "%s\r\n", b64(user, sizeof(user), USER));
			ck_exchange(user_line, "334 UGFzc3dvcmQ6\r\n");
			snprintf(line, sizeof(line), "%s\r\nNOOP\r\n", enc);
		}
		cuts[0] = strlen(line) - strlen(enc) - 8 + 12;
		cuts[1] = cuts[0] + 1;
		cuts[2] = strlen(line) - 6;
		ck_assert_ptr_nonnull(strstr(line, watched));
		feed_in_pieces(line, cuts, 3);
		ck_assert_str_eq(take(), AUTH_OK "250 2.0.0 Ok\r\n");
		ck_assert_uint_eq(evbuffer_get_length(H.in), 0);
		ck_assert_uint_eq(freed_watch_hits(), 0);
		smtp_session_free(H.s);
		H.s = NULL;
		ck_assert_uint_eq(freed_watch_hits(), 0);
		freed_watch_secret(NULL);
	}
}
END_TEST

START_TEST(test_auth_plain_continuation)
{
	char line[512], enc[400];

	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	calls_reset();
	ck_exchange("AUTH PLAIN\r\n", "334 \r\n");
	ck_assert_str_eq(calls(), "F");
	snprintf(line, sizeof(line), "%s\r\n", plain_b64(enc, sizeof(enc), "", USER, PASS));
	ck_exchange(line, AUTH_OK);
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
}
END_TEST

START_TEST(test_auth_login)
{
	char line[512], enc[400];

	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n");
	snprintf(line, sizeof(line), "%s\r\n", b64(enc, sizeof(enc), USER));
	ck_exchange(line, "334 UGFzc3dvcmQ6\r\n");
	snprintf(line, sizeof(line), "%s\r\n", b64(enc, sizeof(enc), PASS));
	ck_exchange(line, AUTH_OK);
	ck_assert_ptr_nonnull(strstr(log_text(), "auth ok user=" USER));
}
END_TEST

START_TEST(test_auth_login_initial_response)
{
	char line[512], enc[400];

	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	snprintf(line, sizeof(line), "AUTH LOGIN %s\r\n", b64(enc, sizeof(enc), USER));
	ck_exchange(line, "334 UGFzc3dvcmQ6\r\n");
	snprintf(line, sizeof(line), "%s\r\n", b64(enc, sizeof(enc), "wrong"));
	ck_exchange(line, AUTH_BAD);
}
END_TEST

START_TEST(test_auth_cancel)
{
	char line[512], enc[400];

	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("AUTH PLAIN\r\n", "334 \r\n");
	ck_exchange("*\r\n", "501 5.7.0 Authentication cancelled\r\n");
	ck_exchange("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n");
	snprintf(line, sizeof(line), "%s\r\n", b64(enc, sizeof(enc), USER));
	ck_exchange(line, "334 UGFzc3dvcmQ6\r\n");
	ck_exchange("*\r\n", "501 5.7.0 Authentication cancelled\r\n");
	/* back to commands: the session is not authenticated */
	ck_exchange("MAIL FROM:<a@example.com>\r\n", "530 5.7.0 Authentication required\r\n");
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", USER, PASS));
	ck_exchange(line, AUTH_OK);
}
END_TEST

START_TEST(test_auth_bad_base64)
{
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("AUTH PLAIN !!!notbase64\r\n", "501 5.5.2 Invalid base64 data\r\n");
	ck_exchange("AUTH PLAIN\r\n", "334 \r\n");
	ck_exchange("a$b%\r\n", "501 5.5.2 Invalid base64 data\r\n");
	ck_exchange("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n");
	ck_exchange("@@@\r\n", "501 5.5.2 Invalid base64 data\r\n");
	ck_exchange("NOOP\r\n", "250 2.0.0 Ok\r\n");
}
END_TEST

START_TEST(test_auth_authzid)
{
	char line[512], enc[400];

	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n",
	    plain_b64(enc, sizeof(enc), "other@example.com", USER, PASS));
	ck_exchange(line, AUTH_BAD);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n",
	    plain_b64(enc, sizeof(enc), USER, USER, PASS));
	ck_exchange(line, AUTH_OK);
}
END_TEST

START_TEST(test_auth_wrong_credentials)
{
	char line[512], enc[400];
	const char *log;

	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", USER, "Wr0ng-pw"));
	ck_exchange(line, AUTH_BAD);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n",
	    plain_b64(enc, sizeof(enc), "", "nobody@example.com", PASS));
	ck_exchange(line, AUTH_BAD);
	/* another user's password does not open this user */
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", USER, "other-pass"));
	ck_exchange(line, AUTH_BAD);
	log = log_text();
	ck_assert_ptr_nonnull(strstr(log, "auth failed user=" USER " client=[" CLIENT "]"));
	ck_assert_ptr_nonnull(strstr(log, "auth failed user=nobody@example.com client=[" CLIENT "]"));
	ck_assert_ptr_null(strstr(log, "Wr0ng-pw"));
	ck_assert_ptr_null(strstr(log, PASS));
	ck_assert_ptr_null(strstr(log, "other-pass"));
}
END_TEST

START_TEST(test_auth_log_sanitised)
{
	char line[512], enc[400];

	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n",
	    plain_b64(enc, sizeof(enc), "", "evil\nauth ok user=x", "pw"));
	send_str(line);
	ck_assert_str_eq(take(), AUTH_BAD);
	ck_assert_ptr_null(strstr(log_text(), "evil\nauth ok"));
}
END_TEST

START_TEST(test_auth_unknown_mechanism)
{
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("AUTH CRAM-MD5\r\n", "504 5.5.4 Unrecognized authentication mechanism\r\n");
}
END_TEST

START_TEST(test_auth_during_transaction)
{
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
	ck_exchange("AUTH PLAIN\r\n", SEQ_ERR "Already authenticated\r\n");
	ck_exchange("RCPT TO:<b@example.net>\r\n", RCPT_OK);
}
END_TEST

START_TEST(test_auth_long_initial_response)
{
	/* AUTH lines may exceed 512 octets (RFC 4954 4): a long response is
	 * checked (here: refused for its authzid), not refused as too long. */
	char authz[201], pass[256], line[1200], enc[1000];

	memset(authz, 'z', sizeof(authz) - 1);
	authz[sizeof(authz) - 1] = '\0';
	memset(pass, 'p', sizeof(pass) - 1);
	pass[sizeof(pass) - 1] = '\0';
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), authz, USER, pass));
	ck_assert_uint_gt(strlen(line), 512);
	ck_exchange(line, AUTH_BAD);
	ck_exchange("AUTH PLAIN\r\n", "334 \r\n");
	ck_exchange(line + strlen("AUTH PLAIN "), AUTH_BAD);
}
END_TEST

/* ---------------------------------------------------------------- MAIL, RCPT, DATA sequence */

START_TEST(test_sequence_errors)
{
	h_start();
	h_auth();
	ck_exchange("RCPT TO:<b@example.net>\r\n", SEQ_ERR "Need MAIL command\r\n");
	ck_exchange("DATA\r\n", SEQ_ERR "Need MAIL command\r\n");
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
	ck_exchange("MAIL FROM:<a@example.com>\r\n", SEQ_ERR "Nested MAIL command\r\n");
	ck_exchange("DATA\r\n", SEQ_ERR "Need RCPT command\r\n");
	ck_assert_uint_eq(H.relay_starts, 0);
}
END_TEST

START_TEST(test_mail_size)
{
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<a@example.com> SIZE=10241\r\n",
	    "552 5.3.4 Message size exceeds fixed maximum message size\r\n");
	ck_exchange("MAIL FROM:<a@example.com> SIZE=10240 BODY=8BITMIME\r\n", MAIL_OK);
}
END_TEST

START_TEST(test_too_many_recipients)
{
	H.cfg.limits.max_recipients = 2;
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
	ck_exchange("RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nRCPT TO:<d@example.net>\r\n",
	    RCPT_OK RCPT_OK "452 4.5.3 Too many recipients\r\n");
}
END_TEST

/* RFC 5321 4.5.3.1.10: a pipelining client learns of the limit only after
 * sending every RCPT; the 452s must not use up its error budget, and the
 * accepted recipients still get the message. */
START_TEST(test_too_many_recipients_not_errors)
{
	H.cfg.limits.max_recipients = 2;
	H.cfg.limits.max_errors = 3;
	h_start();
	h_auth();
	calls_reset();
	send_str("MAIL FROM:<a@example.com>\r\nRCPT TO:<b1@example.net>\r\n"
	    "RCPT TO:<b2@example.net>\r\nRCPT TO:<b3@example.net>\r\nRCPT TO:<b4@example.net>\r\n"
	    "RCPT TO:<b5@example.net>\r\nRCPT TO:<b6@example.net>\r\nDATA\r\n");
	ck_assert_str_eq(take(), MAIL_OK RCPT_OK RCPT_OK "452 4.5.3 Too many recipients\r\n"
	    "452 4.5.3 Too many recipients\r\n452 4.5.3 Too many recipients\r\n"
	    "452 4.5.3 Too many recipients\r\n" DATA_GO);
	ck_assert_uint_eq(count_of(calls(), "C"), 0);
	send_str("hi\r\n.\r\n");
	ck_assert_uint_eq(H.relay_starts, 1);
	ck_assert_uint_eq(H.msg.n_rcpts, 2);
	relay_answer(true, 250, "2.0.0", "Ok");
	ck_assert_msg(strncmp(take(), "250 2.0.0 Ok: queued as ", 24) == 0, "%s", H.text);
}
END_TEST

/* The queue's verdicts: its own 250 text (the id it was queued under),
 * and 452 for a queue write that failed. */
START_TEST(test_queued_and_no_storage_replies)
{
	struct relay_result res;
	relay_done_fn done;

	h_ready_for_data();
	send_str("hi\r\n.\r\n");
	memset(&res, 0, sizeof(res));
	res.ok = res.queued = true;
	res.code = 250;
	snprintf(res.enhanced, sizeof(res.enhanced), "2.0.0");
	snprintf(res.text, sizeof(res.text), "Ok: queued as 0123456789AB (delivery deferred: later)");
	done = H.done;
	H.done = NULL;
	done(H.done_arg, &res);
	ck_assert_str_eq(take(), "250 2.0.0 Ok: queued as 0123456789AB (delivery deferred: later)\r\n");
	send_str("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n");
	ck_assert_str_eq(take(), MAIL_OK RCPT_OK DATA_GO);
	relay_answer(false, 452, "4.3.1", "Insufficient system storage, try again later");
	ck_assert_str_eq(take(), "452 4.3.1 Insufficient system storage, try again later\r\n");
}
END_TEST

START_TEST(test_rset_keeps_auth)
{
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n", MAIL_OK RCPT_OK);
	ck_exchange("RSET\r\n", "250 2.0.0 Ok\r\n");
	ck_exchange("RCPT TO:<b@example.net>\r\n", SEQ_ERR "Need MAIL command\r\n");
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
}
END_TEST

START_TEST(test_misc_commands)
{
	h_start();
	ck_exchange("NOOP\r\n", "250 2.0.0 Ok\r\n");
	send_str("HELP\r\n");
	ck_assert_msg(strncmp(take(), "214 2.0.0 ", 10) == 0, "HELP: %s", H.text);
	ck_exchange("VRFY postmaster\r\n", "252 2.5.2 Cannot VRFY user, but will accept message\r\n");
	ck_exchange("EXPN staff\r\n", "502 5.5.1 Command not implemented\r\n");
	ck_exchange("STARTTLS\r\n", "502 5.5.1 STARTTLS not available\r\n");
	ck_assert_str_eq(calls(), "FFFFFF");
}
END_TEST

START_TEST(test_parser_errors)
{
	h_start();
	ck_exchange("FOO bar\r\n", "500 5.5.2 Command not recognized\r\n");
	send_str("MAIL FROM:<unterminated\r\n");
	ck_assert_msg(strncmp(take(), "501 5.", 6) == 0, "MAIL: %s", H.text);
	H.listener.tls = TLS_MODE_STARTTLS;
	send_str("STARTTLS x\r\n");
	ck_assert_msg(strncmp(take(), "501 5.5.4 ", 10) == 0, "STARTTLS x: %s", H.text);
	ck_assert_uint_eq(count_of(calls(), "S"), 0);
}
END_TEST

START_TEST(test_quit)
{
	h_start();
	calls_reset();
	ck_exchange("QUIT\r\nNOOP\r\n", "221 2.0.0 Bye\r\n");
	ck_assert_str_eq(calls(), "FC");
	/* nothing after QUIT is read */
	ck_assert_uint_eq(evbuffer_get_length(H.in), 6);
	smtp_session_input(H.s);
	ck_assert_str_eq(take(), "");
}
END_TEST

START_TEST(test_line_too_long)
{
	char line[700];
	char *huge = malloc(20000);

	memset(line, 'x', sizeof(line));
	memcpy(line, "NOOP ", 5);
	memcpy(line + sizeof(line) - 2, "\r\n", 2);
	h_start();
	feed(line, sizeof(line));
	ck_assert_str_eq(take(), "500 5.5.2 Line too long\r\n");
	ck_exchange("NOOP\r\n", "250 2.0.0 Ok\r\n");
	/* no line end at all: one 500, then everything up to the LF is dropped */
	memset(huge, 'y', 20000);
	feed(huge, 20000);
	ck_assert_str_eq(take(), "500 5.5.2 Line too long\r\n");
	feed(huge, 20000);
	ck_assert_str_eq(take(), "");
	ck_exchange("QUIT\r\nNOOP\r\n", "250 2.0.0 Ok\r\n");
	free(huge);
}
END_TEST

/* RFC 4954 4: inside an AUTH exchange an over-long line is X.5.6. */
START_TEST(test_auth_line_too_long)
{
	char *huge = malloc(SMTP_AUTH_LINE_MAX + 100);

	memset(huge, 'Q', SMTP_AUTH_LINE_MAX + 100);
	memcpy(huge + SMTP_AUTH_LINE_MAX + 98, "\r\n", 2);
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("AUTH PLAIN\r\n", "334 \r\n");
	feed(huge, SMTP_AUTH_LINE_MAX + 100);
	ck_assert_str_eq(take(), "500 5.5.6 Authentication Exchange line is too long\r\n");
	ck_exchange("NOOP\r\n", "250 2.0.0 Ok\r\n");
	free(huge);
}
END_TEST

/* RFC 4954 5: MAIL with AUTH= may be 1012 octets; longer is 500 5.5.2. */
START_TEST(test_mail_auth_param_long_line)
{
	char line[1100];
	int pad;

	h_start();
	h_auth();
	pad = 1012 - (int)strlen("MAIL FROM:<a@example.com> AUTH=\r\n");
	snprintf(line, sizeof(line), "MAIL FROM:<a@example.com> AUTH=%0*d\r\n", pad, 7);
	ck_assert_uint_eq(strlen(line), 1012);
	ck_exchange(line, MAIL_OK);
	ck_exchange("RSET\r\n", "250 2.0.0 Ok\r\n");
	snprintf(line, sizeof(line), "MAIL FROM:<a@example.com> AUTH=%0*d\r\n", pad + 1, 7);
	ck_exchange(line, "500 5.5.2 Line too long\r\n");
	/* Without AUTH= the limit stays 512. */
	snprintf(line, sizeof(line), "MAIL FROM:<%0*d@example.com>\r\n", 600, 7);
	ck_exchange(line, "500 5.5.2 Line too long\r\n");
}
END_TEST

/* A SIZE no server can take is too big, not a syntax error. */
START_TEST(test_mail_size_overflow)
{
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<a@example.com> SIZE=18446744073709551616\r\n",
	    "552 5.3.4 Message size exceeds fixed maximum message size\r\n");
	ck_exchange("MAIL FROM:<a@example.com> SIZE=99999999999999999999999999\r\n",
	    "552 5.3.4 Message size exceeds fixed maximum message size\r\n");
	H.cfg.limits.max_message_size = UINT64_MAX;
	ck_exchange("MAIL FROM:<a@example.com> SIZE=18446744073709551616\r\n",
	    "552 5.3.4 Message size exceeds fixed maximum message size\r\n");
}
END_TEST

/* SMTPUTF8 is not offered: a non-ASCII address is refused, never relayed raw. */
START_TEST(test_non_ascii_address)
{
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<jos\xc3\xa9@example.com>\r\n",
	    "553 5.6.7 Non-ASCII address not permitted without SMTPUTF8\r\n");
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
	ck_exchange("RCPT TO:<b@b\xc3\xbc" "cher.example>\r\n",
	    "553 5.6.7 Non-ASCII address not permitted without SMTPUTF8\r\n");
	ck_exchange("DATA\r\n", SEQ_ERR "Need RCPT command\r\n");
	ck_assert_uint_eq(H.relay_starts, 0);
}
END_TEST

/* CHUNKING is not offered: the octets after BDAT are never read as
 * commands, whatever the BDAT line says. */
START_TEST(test_bdat_closes)
{
	static const char *const lines[] = {
		"BDAT 26 LAST\r\n", "BDAT x\r\n", "BDAT\r\n", "bdat 0\r\n",
	};

	for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
		h_start();
		h_auth();
		ck_exchange("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n",
		    MAIL_OK RCPT_OK);
		calls_reset();
		send_str(lines[i]);
		send_str("RSET\r\nNOOP\r\nQUIT\r\n");
		ck_assert_str_eq(take(),
		    "521 5.5.1 " HOST " BDAT not supported: CHUNKING is not offered\r\n");
		ck_assert_str_eq(calls(), "FC");
		smtp_session_input(H.s);
		ck_assert_str_eq(take(), "");
		ck_assert_uint_eq(H.relay_starts, 0);
		smtp_session_free(H.s);
		H.s = NULL;
		evbuffer_drain(H.in, evbuffer_get_length(H.in));
	}
}
END_TEST

/* ---------------------------------------------------------------- STARTTLS */

START_TEST(test_starttls_injection)
{
	char line[512], enc[400];

	H.listener.tls = TLS_MODE_STARTTLS;
	H.cfg.allow_insecure_auth = false;
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_STARTTLS);
	calls_reset();
	/* CVE-2011-0411: a command pipelined after STARTTLS is never run */
	send_str("STARTTLS\r\nRSET\r\n");
	ck_assert_str_eq(take(), "220 2.0.0 Ready to start TLS\r\n");
	ck_assert_str_eq(calls(), "FS");
	ck_assert_uint_eq(evbuffer_get_length(H.in), 6);
	smtp_session_input(H.s);
	ck_assert_str_eq(take(), "");
	ck_assert_uint_eq(evbuffer_get_length(H.in), 6);
	/* the owner discards the plaintext leftovers and shakes hands */
	evbuffer_drain(H.in, evbuffer_get_length(H.in));
	smtp_session_tls_ready(H.s, "TLSv1.3 cipher=AES-256-GCM");
	ck_assert_str_eq(take(), "");
	/* RFC 3207 4.2: the EHLO before TLS is forgotten */
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", USER, PASS));
	ck_exchange(line, SEQ_ERR "Send EHLO first\r\n");
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("STARTTLS\r\n", "554 5.5.1 TLS already active\r\n");
}
END_TEST

START_TEST(test_starttls_forgets_auth)
{
	H.listener.tls = TLS_MODE_STARTTLS;
	h_start();
	ck_exchange("EHLO client.example\r\n",
	    EHLO_BASE "250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n");
	{
		char line[512], enc[400];

		snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n",
		    plain_b64(enc, sizeof(enc), "", USER, PASS));
		ck_exchange(line, AUTH_OK);
	}
	ck_exchange("STARTTLS\r\n", "220 2.0.0 Ready to start TLS\r\n");
	smtp_session_tls_ready(H.s, "TLSv1.3");
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("MAIL FROM:<a@example.com>\r\n", "530 5.7.0 Authentication required\r\n");
}
END_TEST

/* ---------------------------------------------------------------- messages */

START_TEST(test_pipelined_message)
{
	const char *body;

	h_start();
	h_auth();
	calls_reset();
	send_str("MAIL FROM:<sender@example.com> BODY=8BITMIME\r\nRCPT TO:<r1@example.net>\r\n"
	    "RCPT TO:<r2@example.org>\r\nDATA\r\n");
	ck_assert_str_eq(take(), MAIL_OK RCPT_OK RCPT_OK DATA_GO);
	/* one flush for the whole group, at the 354 */
	ck_assert_str_eq(calls(), "F");
	ck_assert_uint_eq(H.timeout, 120);
	ck_assert(smtp_session_busy(H.s));
	calls_reset();
	send_str("Subject: hi\r\n\r\n..dot stuffed\r\n.\r\nMAIL FROM:<x@example.com>\r\nQUIT\r\n");
	/* the message is with the relay: no reply, nothing after it read */
	ck_assert_str_eq(take(), "");
	ck_assert_str_eq(calls(), "P");
	ck_assert_uint_eq(H.relay_starts, 1);
	ck_assert_uint_eq(evbuffer_get_length(H.in), strlen("MAIL FROM:<x@example.com>\r\nQUIT\r\n"));
	ck_assert_str_eq(H.msg.from, "sender@example.com");
	ck_assert_uint_eq(H.msg.n_rcpts, 2);
	ck_assert_str_eq(H.msg.rcpts[0], "r1@example.net");
	ck_assert_str_eq(H.msg.rcpts[1], "r2@example.org");
	ck_assert_int_eq(H.msg.body_type, SMTP_BODY_8BITMIME);
	ck_assert_ptr_eq(H.msg.user, &H.users[0]);
	ck_assert_str_eq(H.msg.client, CLIENT);
	ck_assert_uint_eq(H.msg.size, H.msg.body_len);
	body = body_after_received();
	ck_assert_str_eq(body, "Subject: hi\r\n\r\n.dot stuffed\r\n");
	ck_assert_uint_eq(count_of(H.msg.body, "Received:"), 1);
	/* two recipients: no "for" clause */
	ck_assert_ptr_null(strstr(H.msg.body, "for <"));
	ck_assert_ptr_nonnull(strstr(H.msg.body, "Received: from client.example ([" CLIENT "])\r\n"
	    "\tby " HOST " (smtpmux) with ESMTPA id "));
	calls_reset();
	relay_answer(true, 250, "2.0.0", "Ok");
	{
		char expect[256];

		snprintf(expect, sizeof(expect), "250 2.0.0 Ok: queued as %s\r\n"
		    "250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n", H.msg.id);
		ck_assert_str_eq(take(), expect);
	}
	ck_assert_str_eq(calls(), "UFFC");
	ck_assert_uint_eq(H.timeout, 300);
	ck_assert_uint_eq(H.relay_cancels, 0);
}
END_TEST

START_TEST(test_received_header)
{
	char date_part[8];

	H.params.tls_active = true;
	H.listener.tls = TLS_MODE_IMPLICIT;
	h_ready_for_data();
	send_str("Subject: x\r\n\r\nbody\r\n.\r\n");
	ck_assert_uint_eq(H.relay_starts, 1);
	ck_assert_uint_eq(count_of(H.msg.body, "Received:"), 1);
	ck_assert_ptr_nonnull(strstr(H.msg.body, " with ESMTPSA id "));
	ck_assert_ptr_nonnull(strstr(H.msg.body, H.msg.id));
	ck_assert_ptr_nonnull(strstr(H.msg.body, "\r\n\tfor <rcpt@example.net>;\r\n\t"));
	ck_assert_ptr_nonnull(strstr(H.msg.body, " +0000\r\nSubject: x\r\n"));
	/* "Mon, 02 Jan 2006 ..." */
	memcpy(date_part, strstr(H.msg.body, ";\r\n\t") + 4, 5);
	date_part[5] = '\0';
	ck_assert_msg(date_part[3] == ',' && date_part[4] == ' ', "date: %s", date_part);
	ck_assert_str_eq(body_after_received(), "Subject: x\r\n\r\nbody\r\n");
	relay_answer(true, 250, "2.0.0", "Ok");
}
END_TEST

START_TEST(test_body_byte_identical)
{
	/* Every octet value but CR/LF, long-ish lines, dots everywhere, and a
	 * size that crosses the memory threshold into a temp file. */
	struct evbuffer *wire = evbuffer_new(), *expect = evbuffer_new();
	char line[900];
	size_t len;

	H.cfg.limits.memory_threshold = 256;
	for (int i = 0; i < 40; i++) {
		size_t n = 0;

		if (i % 3 == 0)
			line[n++] = '.';
		for (int k = 0; k < 20 + i * 5; k++) {
			unsigned char c = (unsigned char)((i * 31 + k) & 0xff);

			line[n++] = (char)(c == '\r' || c == '\n' ? 'z' : c);
		}
		evbuffer_add(expect, line, n);
		evbuffer_add(expect, "\r\n", 2);
		if (line[0] == '.')
			evbuffer_add(wire, ".", 1);
		evbuffer_add(wire, line, n);
		evbuffer_add(wire, "\r\n", 2);
	}
	evbuffer_add(wire, ".\r\n", 3);
	h_ready_for_data();
	len = evbuffer_get_length(wire);
	feed((const char *)evbuffer_pullup(wire, -1), len);
	ck_assert_uint_eq(H.relay_starts, 1);
	{
		const char *body = body_after_received();
		size_t n = H.msg.body_len - (size_t)(body - H.msg.body);

		ck_assert_uint_eq(n, evbuffer_get_length(expect));
		ck_assert(memcmp(body, evbuffer_pullup(expect, -1), n) == 0);
	}
	relay_answer(true, 250, "2.0.0", "Ok");
	evbuffer_free(wire);
	evbuffer_free(expect);
}
END_TEST

START_TEST(test_byte_at_a_time)
{
	const char *script = "EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
	    "DATA\r\nline one\r\n..two\r\n.\r\nNOOP\r\n";
	char expect[512];

	h_start();
	for (const char *p = script; *p != '\0'; p++)
		feed(p, 1);
	ck_assert_str_eq(take(), EHLO_AUTH "530 5.7.0 Authentication required\r\n"
	    SEQ_ERR "Need MAIL command\r\n" SEQ_ERR "Need MAIL command\r\n"
	    "500 5.5.2 Command not recognized\r\n500 5.5.2 Command not recognized\r\n"
	    "500 5.5.2 Command not recognized\r\n250 2.0.0 Ok\r\n");
	h_auth();
	script = "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nline one\r\n..two\r\n.\r\nNOOP\r\n";
	for (const char *p = script; *p != '\0'; p++)
		feed(p, 1);
	ck_assert_str_eq(body_after_received(), "line one\r\n.two\r\n");
	relay_answer(true, 250, "2.0.0", "Ok");
	snprintf(expect, sizeof(expect), MAIL_OK RCPT_OK DATA_GO "250 2.0.0 Ok: queued as %s\r\n"
	    "250 2.0.0 Ok\r\n", H.msg.id);
	ck_assert_str_eq(take(), expect);
}
END_TEST

START_TEST(test_relay_tempfail)
{
	h_ready_for_data();
	send_str("hello\r\n.\r\n");
	relay_answer(false, 451, "4.4.1", "All downstreams failed, try again later");
	ck_assert_str_eq(take(), "451 4.4.1 All downstreams failed, try again later\r\n");
	/* the transaction is over, authentication stays */
	ck_exchange("RCPT TO:<b@example.net>\r\n", SEQ_ERR "Need MAIL command\r\n");
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
}
END_TEST

START_TEST(test_relay_permfail)
{
	h_ready_for_data();
	send_str("hello\r\n.\r\n");
	relay_answer(false, 550, "5.7.1", "Message rejected as spam");
	ck_assert_str_eq(take(), "550 5.7.1 Message rejected as spam\r\n");
	ck_assert(!smtp_session_busy(H.s));
	send_str("QUIT\r\n");
	smtp_session_free(H.s);
	H.s = NULL;
	ck_assert_ptr_nonnull(strstr(log_text(), " data=0/1 "));
}
END_TEST

START_TEST(test_relay_answers_at_once)
{
	H.answer_at_once = true;
	H.at_once = (struct relay_result){ .ok = false, .code = 451, .enhanced = "4.3.0",
		.text = "No downstream available" };
	h_ready_for_data();
	calls_reset();
	send_str("hello\r\n.\r\nNOOP\r\n");
	ck_assert_str_eq(take(), "451 4.3.0 No downstream available\r\n250 2.0.0 Ok\r\n");
	ck_assert_uint_eq(H.relay_starts, 1);
	ck_assert_str_eq(calls(), "PUFF");
}
END_TEST

START_TEST(test_relay_start_fails)
{
	H.fail_start = true;
	h_ready_for_data();
	send_str("hello\r\n.\r\n");
	ck_assert_str_eq(take(), "451 4.3.0 Local error in processing\r\n");
	ck_assert(!smtp_session_busy(H.s));
}
END_TEST

START_TEST(test_relay_bad_result_code)
{
	h_ready_for_data();
	send_str("hello\r\n.\r\n");
	relay_answer(false, 0, "", "connect failed");
	ck_assert_str_eq(take(), "451 4.3.0 Delivery failed, try again later\r\n");
}
END_TEST

static void
smuggle(const char *body, const char *bare)
{
	h_ready_for_data();
	send_str(body);
	ck_assert_msg(strcmp(take(), "550 5.5.2 Message contains bare CR or LF\r\n") == 0,
	    "%s: %s", bare, H.text);
	ck_assert_uint_eq(H.relay_starts, 0);
	ck_assert_ptr_nonnull(strstr(log_text(), bare));
	/* the smuggled command was message text, never a command */
	ck_exchange("RCPT TO:<b@example.net>\r\n", SEQ_ERR "Need MAIL command\r\n");
}

START_TEST(test_smuggling_lf_dot_lf)
{
	smuggle("a\n.\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\nx\r\n.\r\n",
	    "bare LF");
}
END_TEST

START_TEST(test_smuggling_cr_dot_cr)
{
	smuggle("a\r.\rMAIL FROM:<evil@example.com>\r\n.\r\n", "bare CR");
}
END_TEST

START_TEST(test_smuggling_lf_dot_crlf)
{
	smuggle("a\n.\r\nMAIL FROM:<evil@example.com>\r\n.\r\n", "bare LF");
}
END_TEST

START_TEST(test_smuggling_crlf_dot_lf)
{
	smuggle("a\r\n.\nMAIL FROM:<evil@example.com>\r\n.\r\n", "bare LF");
}
END_TEST

START_TEST(test_message_too_big)
{
	char *big = malloc(12000);

	memset(big, 'a', 12000);
	for (int i = 80; i < 12000; i += 80) {
		big[i - 2] = '\r';
		big[i - 1] = '\n';
	}
	h_ready_for_data();
	feed(big, 12000);
	ck_assert_str_eq(take(), "");
	send_str("\r\n.\r\n");
	ck_assert_str_eq(take(), "552 5.3.4 Message size exceeds fixed limit\r\n");
	ck_assert_uint_eq(H.relay_starts, 0);
	free(big);
}
END_TEST

START_TEST(test_message_line_too_long)
{
	char line[1100];

	memset(line, 'b', sizeof(line));
	memcpy(line + sizeof(line) - 2, "\r\n", 2);
	h_ready_for_data();
	feed(line, sizeof(line));
	send_str(".\r\n");
	ck_assert_str_eq(take(), "550 5.5.2 Message contains a line longer than 1000 octets\r\n");
	ck_assert_uint_eq(H.relay_starts, 0);
}
END_TEST

/* RFC 5321 4.5.3.1.6: a 998-octet line starting with "." is valid; its
 * transparency dot makes it 999 octets on the wire. */
START_TEST(test_message_dot_line_998)
{
	char line[2 + 997 + 2 + 1];

	memset(line, 'd', sizeof(line));
	memcpy(line, "..", 2);
	memcpy(line + sizeof(line) - 3, "\r\n", 3);
	h_ready_for_data();
	feed(line, sizeof(line) - 1);
	send_str(".\r\n");
	ck_assert_str_eq(take(), "");
	ck_assert_uint_eq(H.relay_starts, 1);
	ck_assert_uint_eq(strlen(body_after_received()), 998 + 2);
	ck_assert_int_eq(body_after_received()[0], '.');
	ck_assert_int_eq(body_after_received()[1], 'd');
	relay_answer(true, 250, "2.0.0", "Ok");
	ck_assert_msg(strncmp(take(), "250 2.0.0 Ok: queued as ", 24) == 0, "%s", H.text);
}
END_TEST

/* ---------------------------------------------------------------- back-pressure */

/*
 * A client that pipelines and does not read: commands wait in `in` once
 * max_output_buffer octets of replies are queued (EHLO and HELP answer a
 * few octets with many), and are taken again after the owner has written
 * the replies out.
 */
START_TEST(test_reply_backlog)
{
	static const char *const cmds[] = { "NOOP\r\n", "EHLO c.example\r\n", "HELP\r\n" };
	size_t total = 0, answered = 0;

	H.cfg.limits.max_output_buffer = 4096;
	h_start();
	for (int i = 0; i < 3000; i++) {
		evbuffer_add(H.in, cmds[i % 3], strlen(cmds[i % 3]));
		total++;
	}
	smtp_session_input(H.s);
	while (answered < total) {
		size_t queued = evbuffer_get_length(H.out);
		const char *text;

		/* at most the limit plus one reply (an EHLO's, the longest) */
		ck_assert_uint_gt(queued, 0);
		ck_assert_uint_lt(queued, 4096 + strlen(EHLO_AUTH));
		text = take();
		answered += count_of(text, "250 ") + count_of(text, "214 ");
		ck_assert_uint_eq(evbuffer_get_length(H.in) == 0, answered == total);
		smtp_session_input(H.s);
	}
	ck_assert_uint_eq(answered, total);
	ck_assert_uint_eq(count_of(log_text(), "does not read its replies"), 1);
	ck_exchange("NOOP\r\n", "250 2.0.0 Ok\r\n");
}
END_TEST

/* ---------------------------------------------------------------- slow clients */

/* A command line has limits.command_deadline from its first octet to its
 * end; octets do not restart it, a finished line does. */
START_TEST(test_command_deadline)
{
	char *huge = malloc(20000);
	unsigned starts;

	h_start();
	send_str("NOO");
	ck_assert_str_eq(take(), "");
	ck_assert_uint_eq(H.timer_ms, 60000);
	ck_exchange("P\r\n", "250 2.0.0 Ok\r\n");
	ck_assert_uint_eq(H.timer_ms, 0);
	starts = H.timer_starts;
	ck_exchange("NOOP\r\nNO", "250 2.0.0 Ok\r\n");
	ck_assert_uint_eq(H.timer_starts, starts + 1);
	send_str("O");
	send_str("P");
	ck_assert_uint_eq(H.timer_starts, starts + 1);       /* not restarted by octets */
	ck_exchange("\r\nNOOP\r\n", "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n");
	ck_assert_uint_eq(H.timer_ms, 0);

	/* An endless line being dropped is still one line. */
	memset(huge, 'y', 20000);
	feed(huge, 20000);
	ck_assert_str_eq(take(), "500 5.5.2 Line too long\r\n");
	starts = H.timer_starts;
	ck_assert_uint_eq(H.timer_ms, 60000);
	feed(huge, 20000);
	ck_assert_uint_eq(H.timer_starts, starts);
	calls_reset();
	smtp_session_timer(H.s);
	ck_assert_str_eq(take(), "421 4.4.2 " HOST " Timeout\r\n");
	ck_assert_str_eq(calls(), "FC");
	ck_assert_ptr_nonnull(strstr(log_text(), "command deadline (60 s) exceeded from [" CLIENT "]"));
	free(huge);
}
END_TEST

/* Nothing runs the deadline while the session waits for us (a relay). */
START_TEST(test_command_deadline_only_for_commands)
{
	h_ready_for_data();
	ck_assert_uint_eq(H.timer_ms, 0);               /* min_data_rate 0: no DATA deadline */
	send_str("m\r\n.\r\nNOO");
	ck_assert_str_eq(take(), "");
	ck_assert_uint_eq(H.relay_starts, 1);
	ck_assert_uint_eq(H.timer_ms, 0);
	smtp_session_timer(H.s);                        /* a stale expiry does nothing */
	ck_assert_str_eq(take(), "");
	relay_answer(true, 250, "2.0.0", "Ok");
	ck_assert_msg(strncmp(take(), "250 2.0.0 Ok: queued as ", 24) == 0, "%s", H.text);
	ck_assert_uint_eq(H.timer_ms, 60000);           /* "NOO" is a line begun */
}
END_TEST

START_TEST(test_data_deadline_arithmetic)
{
	ck_assert_uint_eq(smtp_data_deadline_ms(1000, 100, 100, 300000), 2000);
	ck_assert_uint_eq(smtp_data_deadline_ms(1000, 0, 100, 300000), 1000);
	ck_assert_uint_eq(smtp_data_deadline_ms(0, 50, 100, 300000), 500);
	ck_assert_uint_eq(smtp_data_deadline_ms(299000, 5000, 100, 300000), 300000);
	ck_assert_uint_eq(smtp_data_deadline_ms(400000, 1, 100, 300000), 300000);
	ck_assert_uint_eq(smtp_data_deadline_ms(10, UINT64_MAX, 100, 300000), 300000);
	ck_assert_uint_eq(smtp_data_deadline_ms(10, 1, 0, 300000), 300000);
	/* one octet every 4 s at 500 octets/s: the deadline only shrinks */
	{
		uint64_t left = 20000;
		int reads = 0;

		while (left > 4000) {
			left = smtp_data_deadline_ms(left - 4000, 1, 500, 20000);
			reads++;
		}
		ck_assert_int_lt(reads, 6);
	}
}
END_TEST

/* limits.min_data_rate: a message trickled in too slowly is cut off. */
START_TEST(test_data_rate)
{
	H.cfg.limits.min_data_rate = 100;
	h_ready_for_data();
	ck_assert_uint_eq(H.timer_ms, 120000);
	send_str("Subject: slow\r\n");
	ck_assert_uint_gt(H.timer_ms, 0);
	ck_assert_uint_le(H.timer_ms, 120000);
	calls_reset();
	smtp_session_timer(H.s);
	ck_assert_str_eq(take(), "421 4.4.2 " HOST " Timeout\r\n");
	ck_assert_str_eq(calls(), "FC");
	ck_assert_uint_eq(H.relay_starts, 0);
	ck_assert_ptr_nonnull(strstr(log_text(), "DATA too slow from [" CLIENT "]: under 100 octets/s"));
}
END_TEST

/* The deadline ends with the message. */
START_TEST(test_data_rate_ends_with_message)
{
	H.cfg.limits.min_data_rate = 100;
	h_ready_for_data();
	send_str("m\r\n.\r\n");
	ck_assert_uint_eq(H.timer_ms, 0);
	relay_answer(true, 250, "2.0.0", "Ok");
	take();
	smtp_session_timer(H.s);
	ck_assert_str_eq(take(), "");
	ck_exchange("NOOP\r\n", "250 2.0.0 Ok\r\n");
}
END_TEST

/* ---------------------------------------------------------------- password guessing */

static void
h_auth_limits(void)
{
	H.cfg.auth = (struct auth_cfg){ .max_failures = 3, .window = 600, .lockout = 600,
	    .failure_delay = 1 };
	H.rt.clients = client_table_create(64, 4);
	ck_assert_ptr_nonnull(H.rt.clients);
}

static void
h_auth_as(const char *pass)
{
	char line[512], enc[400];

	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", USER, pass));
	send_str(line);
}

START_TEST(test_auth_delay_arithmetic)
{
	ck_assert_uint_eq(smtp_auth_delay_ms(1, 1), 1000);
	ck_assert_uint_eq(smtp_auth_delay_ms(2, 1), 2000);
	ck_assert_uint_eq(smtp_auth_delay_ms(3, 2), 8000);
	ck_assert_uint_eq(smtp_auth_delay_ms(6, 1), 32000);
	ck_assert_uint_eq(smtp_auth_delay_ms(100, 1), 32000);
	ck_assert_uint_eq(smtp_auth_delay_ms(4, 0), 0);
}
END_TEST

/*
 * A failed login is answered after a delay that grows with each failure of
 * the client's address, without holding anything else up (the owner's
 * timer); the failure that reaches max_failures locks the address out.
 */
START_TEST(test_auth_failure_delay_and_lockout)
{
	h_auth_limits();
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	calls_reset();
	h_auth_as("wrong-1");
	send_str("NOOP\r\n");
	ck_assert_str_eq(take(), "");                   /* no 535 yet, NOOP waits */
	ck_assert_str_eq(calls(), "P");
	ck_assert_uint_eq(H.timer_ms, 1000);
	smtp_session_timer(H.s);
	ck_assert_str_eq(take(), AUTH_BAD "250 2.0.0 Ok\r\n");
	ck_assert_str_eq(calls(), "PUF");

	h_auth_as("wrong-2");
	ck_assert_str_eq(take(), "");
	ck_assert_uint_eq(H.timer_ms, 2000);
	smtp_session_timer(H.s);
	ck_assert_str_eq(take(), AUTH_BAD);

	calls_reset();
	h_auth_as("wrong-3");
	ck_assert_str_eq(take(), "421 4.7.0 " HOST " Too many failed logins from your address, "
	    "try again later\r\n");
	ck_assert_str_eq(calls(), "FC");
	ck_assert_uint_eq(count_of(log_text(), "auth lockout client=[" CLIENT "] failures=3"), 1);

	/* A new session from the address: even the right password is refused. */
	smtp_session_free(H.s);
	H.s = NULL;
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	h_auth_as(PASS);
	ck_assert_str_eq(take(), "421 4.7.0 " HOST " Too many failed logins from your address, "
	    "try again later\r\n");
	ck_assert_uint_eq(count_of(log_text(), "auth lockout"), 1);

	/* Another address is not locked out. */
	smtp_session_free(H.s);
	H.s = NULL;
	H.params.client_addr = "192.0.2.99";
	h_start();
	h_auth();
}
END_TEST

/* A stop during the delay: the 535 first, then 421 4.3.2. */
START_TEST(test_auth_delay_then_shutdown)
{
	h_auth_limits();
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	h_auth_as("wrong");
	smtp_session_shutdown(H.s);
	ck_assert_str_eq(take(), "");
	smtp_session_timer(H.s);
	ck_assert_str_eq(take(), AUTH_BAD "421 4.3.2 " HOST " Service shutting down\r\n");
}
END_TEST

/* ---------------------------------------------------------------- limits, timeouts, shutdown */

START_TEST(test_error_budget)
{
	H.cfg.limits.max_errors = 3;
	h_start();
	calls_reset();
	send_str("FOO\r\nFOO\r\nFOO\r\nFOO\r\nNOOP\r\n");
	ck_assert_str_eq(take(), "500 5.5.2 Command not recognized\r\n"
	    "500 5.5.2 Command not recognized\r\n500 5.5.2 Command not recognized\r\n"
	    "500 5.5.2 Command not recognized\r\n421 4.7.0 " HOST " Too many errors\r\n");
	ck_assert_str_eq(calls(), "FC");
	ck_assert_uint_eq(evbuffer_get_length(H.in), 6);
}
END_TEST

START_TEST(test_error_budget_auth)
{
	char line[512], enc[400];

	H.cfg.limits.max_errors = 2;
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", USER, "guess"));
	ck_exchange(line, AUTH_BAD);
	ck_exchange(line, AUTH_BAD);
	ck_exchange(line, AUTH_BAD "421 4.7.0 " HOST " Too many errors\r\n");
	ck_assert_uint_eq(count_of(calls(), "C"), 1);
}
END_TEST

START_TEST(test_timeout)
{
	h_start();
	calls_reset();
	smtp_session_timeout(H.s);
	ck_assert_str_eq(take(), "421 4.4.2 " HOST " Timeout\r\n");
	ck_assert_str_eq(calls(), "FC");
	send_str("NOOP\r\n");
	ck_assert_str_eq(take(), "");
}
END_TEST

START_TEST(test_timeout_in_data)
{
	h_ready_for_data();
	send_str("partial message\r\n");
	smtp_session_timeout(H.s);
	ck_assert_str_eq(take(), "421 4.4.2 " HOST " Timeout\r\n");
	ck_assert_uint_eq(H.relay_starts, 0);
	ck_assert(!smtp_session_busy(H.s));
}
END_TEST

START_TEST(test_timeout_while_relaying_ignored)
{
	h_ready_for_data();
	send_str("m\r\n.\r\n");
	ck_assert_uint_eq(H.timeout, 0);
	smtp_session_timeout(H.s);
	ck_assert_str_eq(take(), "");
	relay_answer(true, 250, "2.0.0", "Ok");
	ck_assert_msg(strncmp(take(), "250 2.0.0 Ok: queued as ", 24) == 0, "%s", H.text);
}
END_TEST

START_TEST(test_shutdown_idle)
{
	h_start();
	calls_reset();
	smtp_session_shutdown(H.s);
	ck_assert_str_eq(take(), "421 4.3.2 " HOST " Service shutting down\r\n");
	ck_assert_str_eq(calls(), "FC");
}
END_TEST

START_TEST(test_shutdown_busy)
{
	char expect[256];

	h_ready_for_data();
	smtp_session_shutdown(H.s);
	ck_assert_str_eq(take(), "");
	send_str("m\r\n.\r\nNOOP\r\n");
	smtp_session_shutdown(H.s);
	ck_assert_str_eq(take(), "");
	calls_reset();
	relay_answer(true, 250, "2.0.0", "Ok");
	snprintf(expect, sizeof(expect), "250 2.0.0 Ok: queued as %s\r\n"
	    "421 4.3.2 " HOST " Service shutting down\r\n", H.msg.id);
	ck_assert_str_eq(take(), expect);
	ck_assert_str_eq(calls(), "UFFC");
}
END_TEST

/* MAIL opened a transaction: the shutdown waits for its end (here a
 * relayed message), as for a message being received. */
START_TEST(test_shutdown_in_transaction)
{
	char expect[256];

	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
	calls_reset();
	smtp_session_shutdown(H.s);
	ck_assert_str_eq(take(), "");
	ck_assert_str_eq(calls(), "");
	ck_exchange("RCPT TO:<b@example.net>\r\nDATA\r\n", RCPT_OK DATA_GO);
	send_str("m\r\n.\r\n");
	ck_assert_uint_eq(H.relay_starts, 1);
	relay_answer(true, 250, "2.0.0", "Ok");
	snprintf(expect, sizeof(expect), "250 2.0.0 Ok: queued as %s\r\n"
	    "421 4.3.2 " HOST " Service shutting down\r\n", H.msg.id);
	ck_assert_str_eq(take(), expect);
	ck_assert_uint_eq(count_of(calls(), "C"), 1);
}
END_TEST

/* A transaction given up without a message ends there too; nothing
 * pipelined after it starts another one. */
START_TEST(test_shutdown_in_transaction_rset)
{
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n", MAIL_OK RCPT_OK);
	smtp_session_shutdown(H.s);
	ck_assert_str_eq(take(), "");
	calls_reset();
	ck_exchange("RSET\r\nMAIL FROM:<a@example.com>\r\n",
	    "250 2.0.0 Ok\r\n421 4.3.2 " HOST " Service shutting down\r\n");
	ck_assert_str_eq(calls(), "FC");
	ck_assert_uint_eq(evbuffer_get_length(H.in), strlen("MAIL FROM:<a@example.com>\r\n"));
	ck_assert_uint_eq(H.relay_starts, 0);
}
END_TEST

START_TEST(test_abort_during_relay)
{
	h_ready_for_data();
	send_str("m\r\n.\r\n");
	ck_assert_uint_eq(H.relay_starts, 1);
	smtp_session_abort(H.s);
	ck_assert_uint_eq(H.relay_cancels, 1);
	ck_assert_ptr_eq(H.cancelled, (struct delivery *)&H.relay_token);
	ck_assert(!smtp_session_busy(H.s));
	smtp_session_free(H.s);
	H.s = NULL;
	ck_assert_uint_eq(H.relay_cancels, 1);
}
END_TEST

START_TEST(test_abort_during_data)
{
	h_ready_for_data();
	send_str("half a mess");
	smtp_session_abort(H.s);
	ck_assert_uint_eq(H.relay_starts, 0);
	ck_assert_uint_eq(H.relay_cancels, 0);
	send_str("age\r\n.\r\n");
	ck_assert_uint_eq(H.relay_starts, 0);
	ck_assert_str_eq(take(), "");
}
END_TEST

START_TEST(test_free_during_relay_cancels)
{
	h_ready_for_data();
	send_str("m\r\n.\r\n");
	smtp_session_free(H.s);
	H.s = NULL;
	ck_assert_uint_eq(H.relay_cancels, 1);
}
END_TEST

START_TEST(test_disconnect_log)
{
	h_ready_for_data();
	send_str("m\r\n.\r\n");
	relay_answer(true, 250, "2.0.0", "Ok");
	send_str("FOO\r\nQUIT\r\n");
	smtp_session_free(H.s);
	H.s = NULL;
	ck_assert_ptr_nonnull(strstr(log_text(), "disconnect from [" CLIENT "] ehlo=1 auth=1 mail=1 "
	    "rcpt=1 data=1 quit=1 unknown=0/1 commands=6/7"));
}
END_TEST


/* ---------------------------------------------------------------- early connect, hang-up, deadline */

/* The relay is prepared once, at the first accepted RCPT, and used at the dot. */
START_TEST(test_early_connect_prepared_at_first_rcpt)
{
	char expect[128];

	H.early_connect = true;
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<sender@example.com>\r\n", MAIL_OK);
	ck_assert_uint_eq(H.prepares, 0);
	ck_exchange("RCPT TO:<r1@example.net>\r\nRCPT TO:<r2@example.net>\r\nDATA\r\n",
	    RCPT_OK RCPT_OK DATA_GO);
	ck_assert_uint_eq(H.prepares, 1);
	ck_assert_ptr_eq(H.prepared_user, &H.users[0]);
	ck_assert_uint_eq(H.prepared_rcpts, 1);
	send_str("hi\r\n.\r\n");
	ck_assert_uint_eq(H.begins, 1);
	ck_assert_uint_eq(H.relay_starts, 0);
	ck_assert_uint_eq(H.msg.n_rcpts, 2);
	relay_answer(true, 250, "2.0.0", "Ok");
	snprintf(expect, sizeof(expect), "250 2.0.0 Ok: queued as %s\r\n", H.msg.id);
	ck_assert_str_eq(take(), expect);
	ck_assert_uint_eq(H.relay_cancels, 0);
}
END_TEST

/* A transaction given up (RSET, a refused message, the client gone)
 * gives its prepared relay back. */
START_TEST(test_early_connect_given_up)
{
	H.early_connect = true;
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<sender@example.com>\r\nRCPT TO:<r1@example.net>\r\nRSET\r\n",
	    MAIL_OK RCPT_OK "250 2.0.0 Ok\r\n");
	ck_assert_uint_eq(H.relay_cancels, 1);
	ck_assert_ptr_eq(H.cancelled, (struct delivery *)&H.prepared_token);
	ck_exchange("MAIL FROM:<sender@example.com>\r\nRCPT TO:<r1@example.net>\r\n",
	    MAIL_OK RCPT_OK);
	ck_assert_uint_eq(H.prepares, 2);
	smtp_session_abort(H.s);
	ck_assert_uint_eq(H.relay_cancels, 2);
	ck_assert_uint_eq(H.begins, 0);
}
END_TEST

/* Without early connect (relay_prepare gives nothing) the relay starts at
 * the dot, as before. */
START_TEST(test_early_connect_off)
{
	h_ready_for_data();
	ck_assert_uint_eq(H.prepares, 1);
	send_str("hi\r\n.\r\n");
	ck_assert_uint_eq(H.relay_starts, 1);
	ck_assert_uint_eq(H.begins, 0);
	relay_answer(true, 250, "2.0.0", "Ok");
}
END_TEST

/* The client hangs up before the dot went out: the relay is taken back,
 * and a client that only half-closed hears why. */
START_TEST(test_hangup_before_the_dot)
{
	h_ready_for_data();
	send_str("m\r\n.\r\n");
	ck_assert(smtp_session_busy(H.s));
	calls_reset();
	smtp_session_hangup(H.s);
	ck_assert_uint_eq(H.relay_cancels, 1);
	ck_assert_str_eq(take(), "421 4.4.2 " HOST " Connection closed by client, message not sent\r\n");
	ck_assert_str_eq(calls(), "FC");
	ck_assert_ptr_nonnull(strstr(log_text(), "relay cancelled: client [" CLIENT "] hung up "
	    "before the message was sent"));
	smtp_session_hangup(H.s);            /* once */
	ck_assert_uint_eq(H.relay_cancels, 1);
}
END_TEST

/* After the dot the relay runs to its verdict, which the log tells as it is. */
START_TEST(test_hangup_after_the_dot)
{
	char expect[128];

	h_ready_for_data();
	send_str("m\r\n.\r\n");
	H.dot_sent = true;
	calls_reset();
	smtp_session_hangup(H.s);
	ck_assert_uint_eq(H.relay_cancels, 0);
	ck_assert_str_eq(take(), "");
	relay_answer(true, 250, "2.0.0", "Ok");
	snprintf(expect, sizeof(expect), "250 2.0.0 Ok: queued as %s\r\n", H.msg.id);
	ck_assert_str_eq(take(), expect);
	ck_assert_str_eq(calls(), "FC");
	snprintf(expect, sizeof(expect), "id=%s client=[" CLIENT "] reply=250: the client had "
	    "hung up; message delivered", H.msg.id);
	ck_assert_ptr_nonnull(strstr(log_text(), expect));
	ck_assert_ptr_null(strstr(log_text(), "reply=250\n"));
}
END_TEST

/* Outside a relay a hang-up is seen when reading: nothing to do here. */
START_TEST(test_hangup_outside_relay)
{
	h_start();
	h_auth();
	calls_reset();
	smtp_session_hangup(H.s);
	ck_assert_str_eq(take(), "");
	ck_assert_str_eq(calls(), "");
	ck_exchange("NOOP\r\n", "250 2.0.0 Ok\r\n");
}
END_TEST

/* Shutdown grace over, the dot sent: the client gets the real verdict. */
START_TEST(test_deadline_after_the_dot)
{
	char expect[256];

	h_ready_for_data();
	send_str("m\r\n.\r\n");
	smtp_session_shutdown(H.s);
	H.dot_sent = true;
	ck_assert(smtp_session_deadline(H.s));
	ck_assert_str_eq(take(), "");
	ck_assert_uint_eq(H.relay_cancels, 0);
	relay_answer(true, 250, "2.0.0", "Ok");
	snprintf(expect, sizeof(expect), "250 2.0.0 Ok: queued as %s\r\n"
	    "421 4.3.2 " HOST " Service shutting down\r\n", H.msg.id);
	ck_assert_str_eq(take(), expect);
	ck_assert_ptr_null(strstr(log_text(), "disconnected"));
}
END_TEST

START_TEST(test_deadline_before_the_dot)
{
	h_ready_for_data();
	send_str("m\r\n.\r\n");
	smtp_session_shutdown(H.s);
	calls_reset();
	ck_assert(!smtp_session_deadline(H.s));
	ck_assert_uint_eq(H.relay_cancels, 1);
	ck_assert_str_eq(take(), "421 4.3.2 " HOST " Service shutting down\r\n");
	ck_assert_str_eq(calls(), "FC");
	ck_assert_ptr_nonnull(strstr(log_text(), "relay cancelled: shutdown timeout before the "
	    "message was sent"));
	ck_assert_ptr_null(strstr(log_text(), "disconnected"));
}
END_TEST

/* RFC 6152: a body with 8-bit octets goes as 8BITMIME, declared or not. */
START_TEST(test_8bit_body_detected)
{
	h_ready_for_data();
	send_str("Subject: caf\xc3\xa9\r\n\r\nx\r\n.\r\n");
	ck_assert_int_eq(H.msg.body_type, SMTP_BODY_8BITMIME);
	relay_answer(true, 250, "2.0.0", "Ok");
	take();
	ck_exchange("MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n",
	    MAIL_OK RCPT_OK DATA_GO);
	send_str("Subject: plain\r\n\r\nx\r\n.\r\n");
	ck_assert_int_ne(H.msg.body_type, SMTP_BODY_8BITMIME);
	relay_answer(true, 250, "2.0.0", "Ok");
}
END_TEST

/* ---------------------------------------------------------------- policy */

/* `clients:` with one network, sending as users[1]. */
static struct client_cfg net_client;
static struct netmask net_mask;

static void
h_clients(const char *network)
{
	char why[160];

	ck_assert_int_eq(netmask_parse(network, &net_mask, why, sizeof(why)), 0);
	net_client.network = (char *)network;
	net_client.user = &H.users[1];
	H.cfg.clients = &net_client;
	H.cfg.client_nets = &net_mask;
	H.cfg.n_clients = 1;
}

static void
h_message(void)
{
	ck_exchange("RCPT TO:<rcpt@example.net>\r\nDATA\r\n", RCPT_OK DATA_GO);
	send_str("Subject: x\r\n\r\nbody\r\n.\r\n");
	ck_assert_uint_eq(H.relay_starts, 1);
	relay_answer(true, 250, "2.0.0", "Ok");
	ck_assert(strncmp(take(), "250 2.0.0 Ok: queued as ", 24) == 0);
}

START_TEST(test_network_client_without_auth)
{
	h_clients("192.0.2.0/24");
	h_start();
	ck_exchange("EHLO printer.example\r\n", EHLO_AUTH);
	ck_exchange("MAIL FROM:<scan@printer.example>\r\n", MAIL_OK);
	h_message();
	ck_assert_ptr_eq(H.msg.user, &H.users[1]);
	ck_assert_ptr_eq(H.prepared_user, &H.users[1]);   /* early connect too */
	/* Not authenticated: the trace says ESMTP, not ESMTPA. */
	ck_assert_ptr_nonnull(strstr(H.msg.body, " with ESMTP id "));
	ck_assert_ptr_nonnull(strstr(log_text(), "connect from [" CLIENT "] network=192.0.2.0/24 "
	    "user=other@example.com"));
}
END_TEST

START_TEST(test_network_client_elsewhere_needs_auth)
{
	h_clients("198.51.100.0/24");
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	ck_exchange("MAIL FROM:<a@example.com>\r\n", "530 5.7.0 Authentication required\r\n");
	ck_assert_uint_eq(H.relay_starts, 0);
}
END_TEST

/* A client of the network that logs in sends as whom it logged in as. */
START_TEST(test_network_client_auth_wins)
{
	h_clients("192.0.2.1");
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<a@example.com>\r\n", MAIL_OK);
	h_message();
	ck_assert_ptr_eq(H.msg.user, &H.users[0]);
	ck_assert_ptr_nonnull(strstr(H.msg.body, " with ESMTPA id "));
}
END_TEST

START_TEST(test_allowed_senders)
{
	char *list[] = { (char *)"*@example.com", (char *)"alerts@example.org" };

	H.users[0].allowed_senders = list;
	H.users[0].n_allowed_senders = 2;
	h_start();
	h_auth();
	ck_exchange("MAIL FROM:<ceo@example.org>\r\n",
	    "553 5.7.1 Sender address not allowed for this user\r\n");
	ck_exchange("MAIL FROM:<>\r\n", "553 5.7.1 Sender address not allowed for this user\r\n");
	ck_exchange("MAIL FROM:<x@sub.example.com>\r\n",
	    "553 5.7.1 Sender address not allowed for this user\r\n");
	ck_exchange("MAIL FROM:<Alerts@Example.org>\r\n", MAIL_OK);
	h_message();
	ck_assert_str_eq(H.msg.from, "Alerts@Example.org");
	ck_assert_ptr_nonnull(strstr(log_text(), "sender refused user=" USER " from=<ceo@example.org> "
	    "client=[" CLIENT "]: not in allowed_senders"));
	ck_assert_ptr_nonnull(strstr(log_text(), "sender refused user=" USER " from=<> "));
}
END_TEST

/* A network client is held to its user's list as well. */
START_TEST(test_allowed_senders_network_client)
{
	char *list[] = { (char *)"*@printer.example" };

	H.users[1].allowed_senders = list;
	H.users[1].n_allowed_senders = 1;
	h_clients("192.0.2.0/24");
	h_start();
	ck_exchange("EHLO printer.example\r\n", EHLO_AUTH);
	ck_exchange("MAIL FROM:<ceo@example.com>\r\n",
	    "553 5.7.1 Sender address not allowed for this user\r\n");
	ck_exchange("MAIL FROM:<scan@printer.example>\r\n", MAIL_OK);
}
END_TEST

static void
h_login_as(const char *user, const char *pass, const char *reply)
{
	char line[512], enc[400];

	smtp_session_free(H.s);
	H.s = NULL;
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	snprintf(line, sizeof(line), "AUTH PLAIN %s\r\n", plain_b64(enc, sizeof(enc), "", user, pass));
	ck_exchange(line, reply);
}

/* A hashed password: verified once per worker, then from the cache. */
START_TEST(test_auth_hashed_password)
{
	char hash[256];
	unsigned long hits, computed;

	ck_assert_int_eq(passwd_hash_new(PASS, hash, sizeof(hash)), 0);
	H.users[0].password = hash;
	H.cfg.unknown_user_hash = hash;
	H.rt.pwcache = passwd_cache_new();
	h_login_as(USER, PASS, AUTH_OK);
	h_login_as(USER, PASS, AUTH_OK);
	h_login_as(USER, "wrong", AUTH_BAD);
	/* The hash itself is not a password. */
	h_login_as(USER, hash, AUTH_BAD);
	passwd_cache_stats(H.rt.pwcache, &hits, &computed);
	ck_assert_uint_eq(hits, 1);
	ck_assert_uint_eq(computed, 3);
	/* An unknown name costs a hash too, so timing does not tell it apart;
	 * even the right password of another user does not let it in. */
	h_login_as("nobody@example.com", PASS, AUTH_BAD);
	passwd_cache_stats(H.rt.pwcache, &hits, &computed);
	ck_assert_uint_eq(hits + computed, 5);
	/* Plaintext users beside hashed ones still work. */
	h_login_as("other@example.com", "other-pass", AUTH_OK);
	passwd_cache_free(H.rt.pwcache);
	H.rt.pwcache = NULL;
}
END_TEST

/* ---------------------------------------------------------------- hashes off the loop */

/* Only the prefix matters to the session: the fake io gives the verdict. */
#define FAKE_HASH "$y$j9T$fakesalt$fakehash"

static void
h_offload(void)
{
	H.offload = true;
	H.users[0].password = (char *)FAKE_HASH;
	H.cfg.unknown_user_hash = FAKE_HASH;
	h_start();
	ck_exchange("EHLO client.example\r\n", EHLO_AUTH);
	calls_reset();
}

/*
 * A hash is checked through io->check_password: the session reads
 * nothing meanwhile (pipelined commands wait in `in`) and answers when the
 * verdict comes, then takes the waiting commands.
 */
START_TEST(test_auth_check_pending_then_ok)
{
	h_offload();
	h_auth_as(PASS);
	send_str("MAIL FROM:<sender@example.com>\r\n");
	ck_assert_str_eq(take(), "");
	ck_assert_str_eq(calls(), "P");
	ck_assert_uint_eq(H.checks, 1);
	ck_assert_str_eq(H.check_given, PASS);
	ck_assert_str_eq(H.check_stored, FAKE_HASH);
	/* a stale ticket is not this check's verdict */
	smtp_session_password_checked(H.s, H.check_ticket + 1, false);
	ck_assert_str_eq(take(), "");
	smtp_session_password_checked(H.s, H.check_ticket, true);
	ck_assert_str_eq(take(), AUTH_OK MAIL_OK);
	ck_assert_str_eq(calls(), "PUF");
	ck_assert_uint_eq(H.check_cancels, 0);
	ck_assert_ptr_nonnull(strstr(log_text(), "auth ok user=" USER " mech=PLAIN"));
	/* a second verdict for the same ticket changes nothing */
	smtp_session_password_checked(H.s, H.check_ticket, false);
	ck_assert_str_eq(take(), "");
}
END_TEST

/* A wrong password takes the usual failure path once its verdict is in:
 * the failure is counted and the 535 comes after its delay. The names of
 * unknown users are checked against a hash too, off the loop. */
START_TEST(test_auth_check_wrong_then_delay)
{
	char line[512], enc[400];

	h_auth_limits();
	h_offload();
	h_auth_as("wrong-1");
	ck_assert_str_eq(take(), "");
	ck_assert_uint_eq(H.timer_starts, 0);
	smtp_session_password_checked(H.s, H.check_ticket, false);
	ck_assert_str_eq(take(), "");                   /* the delay runs now */
	ck_assert_uint_eq(H.timer_ms, 1000);
	ck_assert_ptr_nonnull(strstr(log_text(), "auth failed user=" USER));
	smtp_session_timer(H.s);
	ck_assert_str_eq(take(), AUTH_BAD);
	ck_assert_str_eq(calls(), "PUF");

	snprintf(line, sizeof(line), "AUTH LOGIN %s\r\n", b64(enc, sizeof(enc), "nobody@example.com"));
	ck_exchange(line, "334 UGFzc3dvcmQ6\r\n");
	snprintf(line, sizeof(line), "%s\r\n", b64(enc, sizeof(enc), PASS));
	send_str(line);
	ck_assert_uint_eq(H.checks, 2);
	ck_assert_str_eq(H.check_stored, FAKE_HASH);
	/* even a "match" does not let an unknown name in */
	smtp_session_password_checked(H.s, H.check_ticket, true);
	smtp_session_timer(H.s);
	ck_assert_str_eq(take(), AUTH_BAD);
	ck_assert_ptr_nonnull(strstr(log_text(), "auth failed user=nobody@example.com"));
}
END_TEST

/* The owner may give the verdict before check_password returns. */
START_TEST(test_auth_check_answered_at_once)
{
	H.check_at_once = true;
	H.at_once_match = true;
	h_offload();
	h_auth_as(PASS);
	ck_assert_str_eq(take(), AUTH_OK);
	ck_assert_str_eq(calls(), "PUF");
	send_str("MAIL FROM:<sender@example.com>\r\n");
	ck_assert_str_eq(take(), MAIL_OK);
}
END_TEST

/* Too many checks pending in the worker: 454, and the session goes on. */
START_TEST(test_auth_check_queue_full)
{
	H.check_full = true;
	h_offload();
	h_auth_as(PASS);
	ck_assert_str_eq(take(), "454 4.7.0 Temporary authentication failure\r\n");
	ck_assert_str_eq(calls(), "PUF");
	ck_assert_ptr_nonnull(strstr(log_text(), "auth deferred: too many password checks pending"));
	H.check_full = false;
	h_auth_as(PASS);
	smtp_session_password_checked(H.s, H.check_ticket, true);
	ck_assert_str_eq(take(), AUTH_OK);
}
END_TEST

/* The client goes away while its check is pending: the ticket is
 * cancelled, and a verdict that comes anyway is dropped. */
START_TEST(test_auth_check_then_session_closed)
{
	h_offload();
	h_auth_as(PASS);
	smtp_session_abort(H.s);
	ck_assert_uint_eq(H.check_cancels, 1);
	ck_assert_uint_eq(H.cancelled_ticket, H.check_ticket);
	smtp_session_password_checked(H.s, H.check_ticket, true);
	ck_assert_str_eq(take(), "");
	ck_assert_ptr_null(strstr(log_text(), "auth ok"));
	smtp_session_free(H.s);                          /* no second cancel */
	H.s = NULL;
	ck_assert_uint_eq(H.check_cancels, 1);

	/* Freed with the check pending (the connection failed). */
	h_offload();
	h_auth_as(PASS);
	smtp_session_free(H.s);
	H.s = NULL;
	ck_assert_uint_eq(H.check_cancels, 2);
	ck_assert_uint_eq(H.cancelled_ticket, H.check_ticket);
}
END_TEST

/* A timeout cancels the check; a stop waits for its verdict, then 421;
 * the shutdown deadline does not wait. */
START_TEST(test_auth_check_timeout_and_shutdown)
{
	h_offload();
	h_auth_as(PASS);
	smtp_session_timeout(H.s);
	ck_assert_str_eq(take(), "421 4.4.2 " HOST " Timeout\r\n");
	ck_assert_uint_eq(H.check_cancels, 1);
	smtp_session_password_checked(H.s, H.check_ticket, true);
	ck_assert_str_eq(take(), "");

	smtp_session_free(H.s);
	H.s = NULL;
	h_offload();
	h_auth_as(PASS);
	smtp_session_shutdown(H.s);
	ck_assert_str_eq(take(), "");
	smtp_session_password_checked(H.s, H.check_ticket, true);
	ck_assert_str_eq(take(), AUTH_OK "421 4.3.2 " HOST " Service shutting down\r\n");

	smtp_session_free(H.s);
	H.s = NULL;
	h_offload();
	h_auth_as(PASS);
	smtp_session_shutdown(H.s);
	ck_assert(!smtp_session_deadline(H.s));
	ck_assert_str_eq(take(), "421 4.3.2 " HOST " Service shutting down\r\n");
	ck_assert_uint_eq(H.check_cancels, 2);
}
END_TEST

static Suite *
server_suite(void)
{
	Suite *s = suite_create("smtp_server");
	TCase *tc;

	tc = tcase_create("greeting");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_greeting);
	tcase_add_test(tc, test_queued_and_no_storage_replies);
	tcase_add_test(tc, test_ehlo_no_insecure_auth);
	tcase_add_test(tc, test_ehlo_insecure_auth);
	tcase_add_test(tc, test_ehlo_starttls_listener);
	tcase_add_test(tc, test_ehlo_starttls_and_insecure_auth);
	tcase_add_test(tc, test_require_tls_listener);
	tcase_add_test(tc, test_implicit_tls);
	tcase_add_test(tc, test_helo);
	suite_add_tcase(s, tc);

	tc = tcase_create("auth");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_mail_before_auth);
	tcase_add_test(tc, test_auth_plaintext_refused);
	tcase_add_test(tc, test_auth_plain_initial);
	tcase_add_test(tc, test_auth_plain_continuation);
	tcase_add_test(tc, test_auth_input_wiped);
	tcase_add_test(tc, test_auth_login);
	tcase_add_test(tc, test_auth_login_initial_response);
	tcase_add_test(tc, test_auth_cancel);
	tcase_add_test(tc, test_auth_bad_base64);
	tcase_add_test(tc, test_auth_authzid);
	tcase_add_test(tc, test_auth_wrong_credentials);
	tcase_add_test(tc, test_auth_log_sanitised);
	tcase_add_test(tc, test_auth_unknown_mechanism);
	tcase_add_test(tc, test_auth_during_transaction);
	tcase_add_test(tc, test_auth_long_initial_response);
	suite_add_tcase(s, tc);

	tc = tcase_create("commands");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_sequence_errors);
	tcase_add_test(tc, test_mail_size);
	tcase_add_test(tc, test_too_many_recipients);
	tcase_add_test(tc, test_too_many_recipients_not_errors);
	tcase_add_test(tc, test_rset_keeps_auth);
	tcase_add_test(tc, test_misc_commands);
	tcase_add_test(tc, test_parser_errors);
	tcase_add_test(tc, test_quit);
	tcase_add_test(tc, test_line_too_long);
	tcase_add_test(tc, test_auth_line_too_long);
	tcase_add_test(tc, test_mail_auth_param_long_line);
	tcase_add_test(tc, test_mail_size_overflow);
	tcase_add_test(tc, test_non_ascii_address);
	tcase_add_test(tc, test_bdat_closes);
	tcase_add_test(tc, test_starttls_injection);
	tcase_add_test(tc, test_starttls_forgets_auth);
	suite_add_tcase(s, tc);

	tc = tcase_create("messages");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_pipelined_message);
	tcase_add_test(tc, test_received_header);
	tcase_add_test(tc, test_body_byte_identical);
	tcase_add_test(tc, test_byte_at_a_time);
	tcase_add_test(tc, test_relay_tempfail);
	tcase_add_test(tc, test_relay_permfail);
	tcase_add_test(tc, test_relay_answers_at_once);
	tcase_add_test(tc, test_relay_start_fails);
	tcase_add_test(tc, test_relay_bad_result_code);
	tcase_add_test(tc, test_smuggling_lf_dot_lf);
	tcase_add_test(tc, test_smuggling_cr_dot_cr);
	tcase_add_test(tc, test_smuggling_lf_dot_crlf);
	tcase_add_test(tc, test_smuggling_crlf_dot_lf);
	tcase_add_test(tc, test_message_too_big);
	tcase_add_test(tc, test_message_line_too_long);
	tcase_add_test(tc, test_message_dot_line_998);
	suite_add_tcase(s, tc);

	tc = tcase_create("back-pressure");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_reply_backlog);
	suite_add_tcase(s, tc);

	tc = tcase_create("slow clients");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_command_deadline);
	tcase_add_test(tc, test_command_deadline_only_for_commands);
	tcase_add_test(tc, test_data_deadline_arithmetic);
	tcase_add_test(tc, test_data_rate);
	tcase_add_test(tc, test_data_rate_ends_with_message);
	suite_add_tcase(s, tc);

	tc = tcase_create("password guessing");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_auth_delay_arithmetic);
	tcase_add_test(tc, test_auth_failure_delay_and_lockout);
	tcase_add_test(tc, test_auth_delay_then_shutdown);
	suite_add_tcase(s, tc);

	tc = tcase_create("lifecycle");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_error_budget);
	tcase_add_test(tc, test_error_budget_auth);
	tcase_add_test(tc, test_timeout);
	tcase_add_test(tc, test_timeout_in_data);
	tcase_add_test(tc, test_timeout_while_relaying_ignored);
	tcase_add_test(tc, test_shutdown_idle);
	tcase_add_test(tc, test_shutdown_busy);
	tcase_add_test(tc, test_shutdown_in_transaction);
	tcase_add_test(tc, test_shutdown_in_transaction_rset);
	tcase_add_test(tc, test_abort_during_relay);
	tcase_add_test(tc, test_abort_during_data);
	tcase_add_test(tc, test_free_during_relay_cancels);
	tcase_add_test(tc, test_early_connect_prepared_at_first_rcpt);
	tcase_add_test(tc, test_early_connect_given_up);
	tcase_add_test(tc, test_early_connect_off);
	tcase_add_test(tc, test_hangup_before_the_dot);
	tcase_add_test(tc, test_hangup_after_the_dot);
	tcase_add_test(tc, test_hangup_outside_relay);
	tcase_add_test(tc, test_deadline_after_the_dot);
	tcase_add_test(tc, test_deadline_before_the_dot);
	tcase_add_test(tc, test_8bit_body_detected);
	tcase_add_test(tc, test_disconnect_log);
	suite_add_tcase(s, tc);

	tc = tcase_create("policy");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_network_client_without_auth);
	tcase_add_test(tc, test_network_client_elsewhere_needs_auth);
	tcase_add_test(tc, test_network_client_auth_wins);
	tcase_add_test(tc, test_allowed_senders);
	tcase_add_test(tc, test_allowed_senders_network_client);
	tcase_add_test(tc, test_auth_hashed_password);
	tcase_add_test(tc, test_auth_check_pending_then_ok);
	tcase_add_test(tc, test_auth_check_wrong_then_delay);
	tcase_add_test(tc, test_auth_check_answered_at_once);
	tcase_add_test(tc, test_auth_check_queue_full);
	tcase_add_test(tc, test_auth_check_then_session_closed);
	tcase_add_test(tc, test_auth_check_timeout_and_shutdown);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr;
	int failed;

	freed_watch_install();          /* before libevent allocates anything */
	sr = srunner_create(server_suite());

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

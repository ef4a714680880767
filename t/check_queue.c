/* SPDX-License-Identifier: MIT */
/*
 * The queue's parts: the spool formats (parser and formatter), the
 * schedule (backoff, jitter, quota wake-up, lifetime), the notifications,
 * the spool folder (commit, recovery after a crash, state, holds, tool
 * requests, the runner's lock), the writer thread's group commit and its
 * failures, the queue figures, and the runner's index.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "dsn.h"
#include "msgbody.h"
#include "queue_sched.h"
#include "queue_stats.h"
#include "fd_write.h"
#include "spool.h"
#include "spool_format.h"
#include "spool_writer.h"
#include "../smtpmuxd/runner_index.h"

static char dir[64];

static int
rm_entry(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(p);
}

static void
setup(void)
{
	char err[256];

	snprintf(dir, sizeof(dir), "/tmp/check_queue.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	ck_assert_msg(spool_prepare(dir, false, 0, 0, err, sizeof(err)) == 0, "%s", err);
}

static void
teardown(void)
{
	nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static char *
slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long n;

	ck_assert_ptr_nonnull(f);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = malloc((size_t)n + 1);
	ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
	buf[n] = '\0';
	fclose(f);
	*len = (size_t)n;
	return buf;
}

static void
spit(const char *path, const char *text, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, text, len), (ssize_t)len);
	close(fd);
}

static int
count_in(const char *sub)
{
	char path[256];
	int n = -2;                      /* "." and ".." */
	struct dirent *de;
	DIR *d;

	snprintf(path, sizeof(path), "%s/%s", dir, sub);
	ck_assert_ptr_nonnull(d = opendir(path));
	while ((de = readdir(d)) != NULL)
		n++;
	closedir(d);
	return n;
}

/* A full envelope, every field set. */
static void
env_sample(struct spool_env *env)
{
	memset(env, 0, sizeof(*env));
	snprintf(env->user, sizeof(env->user), "app@example.com");
	snprintf(env->client, sizeof(env->client), "192.0.2.7");
	env->arrived = 1700000000;
	snprintf(env->from, sizeof(env->from), "sender@example.com");
	env->body = SMTP_BODY_8BITMIME;
	ck_assert_int_eq(spool_env_add_rcpt(env, "a@example.org"), 0);
	ck_assert_int_eq(spool_env_add_rcpt(env, "\"odd name\"@example.org"), 0);
	ck_assert_int_eq(spool_env_add_rcpt(env, "postmaster"), 0);
	env->size = 5;
	env->attempts = 2;
	env->next = 1700000120;
	env->warned = true;
	spool_env_note_error(env, "ses eu", "451 4.7.0 Rate limit");
	spool_env_note_error(env, "gmail%1", "421 4.3.2 busy");
}

/* --- formats */

START_TEST(test_format_roundtrip)
{
	struct spool_env env, back;
	char *text, err[160];
	size_t len, hlen;

	env_sample(&env);
	ck_assert_int_eq(spool_format_message(&env, &text, &len), 0);
	memset(&back, 0, sizeof(back));
	ck_assert_msg(spool_parse_message(text, len, &back, &hlen, err, sizeof(err)) == 0, "%s", err);
	ck_assert_uint_eq(hlen, len);
	ck_assert_str_eq(back.user, env.user);
	ck_assert_str_eq(back.client, env.client);
	ck_assert_int_eq(back.arrived, env.arrived);
	ck_assert_str_eq(back.from, env.from);
	ck_assert_int_eq(back.body, SMTP_BODY_8BITMIME);
	ck_assert_uint_eq(back.n_rcpts, 3);
	ck_assert_str_eq(back.rcpts[1], "\"odd name\"@example.org");
	ck_assert_str_eq(back.rcpts[2], "postmaster");
	ck_assert_uint_eq(back.size, 5);
	ck_assert_uint_eq(back.attempts, 2);
	ck_assert_int_eq(back.next, 1700000120);
	ck_assert(back.warned);
	ck_assert_uint_eq(back.n_errors, 2);
	ck_assert_str_eq(back.errors[0].relay, "ses eu");
	ck_assert_str_eq(spool_env_last_error(&back)->relay, "gmail%1");
	ck_assert_str_eq(spool_env_last_error(&back)->text, "421 4.3.2 busy");
	/* The names with a space and a % are escaped on disk. */
	ck_assert_ptr_nonnull(strstr(text, "error ses%20eu 451"));
	ck_assert_ptr_nonnull(strstr(text, "error gmail%251 421"));
	free(text);

	/* The state file carries the delivery state alone. */
	back.attempts = 7;
	back.next = 0;
	back.warned = false;
	spool_env_note_error(&back, "ses eu", "timeout");
	ck_assert_int_eq(spool_format_state(&back, &text, &len), 0);
	ck_assert_ptr_null(strstr(text, "user"));
	ck_assert_int_eq(spool_parse_state(text, len, &env, err, sizeof(err)), 0);
	ck_assert_uint_eq(env.attempts, 7);
	ck_assert_int_eq(env.next, 0);
	ck_assert(!env.warned);
	ck_assert_str_eq(spool_env_last_error(&env)->text, "timeout");
	ck_assert_str_eq(env.user, "app@example.com");      /* untouched */
	free(text);
	spool_env_clear(&env);
	spool_env_clear(&back);
}
END_TEST

START_TEST(test_format_null_sender_and_body_offset)
{
	static const char file[] = "SMTPMUX-SPOOL 1\nuser u\narrived 1\nfrom <>\n"
	    "rcpt <r@x.org>\nsize 4\n\nbody";
	struct spool_env env;
	char err[160];
	size_t hlen;

	memset(&env, 0, sizeof(env));
	ck_assert_msg(spool_parse_message(file, sizeof(file) - 1, &env, &hlen, err, sizeof(err)) == 0,
	    "%s", err);
	ck_assert_str_eq(env.from, "");
	ck_assert_uint_eq(hlen, sizeof(file) - 1 - 4);
	ck_assert_int_eq(env.body, SMTP_BODY_UNSET);
	ck_assert_uint_eq(env.attempts, 0);
	spool_env_clear(&env);
}
END_TEST

static const struct {
	const char *text;
	const char *why;
} bad_headers[] = {
	{ "SMTPMUX-SPOOL 2\nuser u\n\n", "line 1: not a version 1" },
	{ "SMTPMUX-SPOOL 1\nuser u\narrived 1\nfrom <>\nrcpt <r@x.org>\nsize 4\n", "cut short" },
	{ "SMTPMUX-SPOOL 1\nuser u\narrived 1\nfrom <>\nrcpt <r@x.org>\n\n", "required key missing: size" },
	{ "SMTPMUX-SPOOL 1\nuser u\nuser v\n\n", "line 3: user given twice" },
	{ "SMTPMUX-SPOOL 1\ncolour blue\n\n", "unknown key \"colour\"" },
	{ "SMTPMUX-SPOOL 1\nuser\n\n", "expected \"key value\"" },
	{ "SMTPMUX-SPOOL 1\nuser u\x01v\n\n", "user: control character" },
	{ "SMTPMUX-SPOOL 1\nfrom a@b\n\n", "from: expected <address>" },
	{ "SMTPMUX-SPOOL 1\nfrom <a b@c>\n\n", "from: invalid address" },
	{ "SMTPMUX-SPOOL 1\nfrom <@relay:a@b>\n\n", "from: invalid address" },
	{ "SMTPMUX-SPOOL 1\nrcpt <>\n\n", "rcpt: invalid address" },
	{ "SMTPMUX-SPOOL 1\narrived -5\n\n", "arrived: not a number" },
	{ "SMTPMUX-SPOOL 1\nsize 99999999999999999999\n\n", "size: too large" },
	{ "SMTPMUX-SPOOL 1\nattempts 2000000\n\n", "attempts: too large" },
	{ "SMTPMUX-SPOOL 1\nbody 9bit\n\n", "body: expected 7bit or 8bitmime" },
	{ "SMTPMUX-SPOOL 1\nwarned yes\n\n", "warned: expected 0 or 1" },
	{ "SMTPMUX-SPOOL 1\nerror a%zz x\n\n", "bad escape" },
	{ "SMTPMUX-SPOOL 1\nerror a%00 x\n\n", "bad escape" },
	{ "SMTPMUX-SPOOL 1\nerror nameonly\n\n", "a downstream name and a text" },
	{ "SMTPMUX-SPOOL 1\nerror a x\nerror a y\n\n", "downstream a listed twice" },
	{ "SMTPMUX-STATE 1\nattempts 1\n\n", "not a version 1 smtpmux spool file" },
};

START_TEST(test_format_refuses)
{
	struct spool_env env;
	char err[160] = "";
	size_t hlen = 99;
	const char *text = bad_headers[_i].text;

	memset(&env, 0, sizeof(env));
	ck_assert_int_eq(spool_parse_message(text, strlen(text), &env, &hlen, err, sizeof(err)), -1);
	ck_assert_msg(strstr(err, bad_headers[_i].why) != NULL, "%s: got \"%s\"", text, err);
	ck_assert_uint_eq(env.n_rcpts, 0);
	ck_assert_ptr_null(env.rcpts);
}
END_TEST

START_TEST(test_state_refused_leaves_env)
{
	static const char cut[] = "SMTPMUX-STATE 1\nattempts 9\nnext 5";
	static const char wrong[] = "SMTPMUX-STATE 1\nuser u\n\n";
	struct spool_env env;
	char err[160];

	memset(&env, 0, sizeof(env));
	env.attempts = 3;
	ck_assert_int_eq(spool_parse_state(cut, sizeof(cut) - 1, &env, err, sizeof(err)), -1);
	ck_assert_int_eq(spool_parse_state(wrong, sizeof(wrong) - 1, &env, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "unknown key \"user\""));
	ck_assert_uint_eq(env.attempts, 3);
}
END_TEST

START_TEST(test_formatter_refuses_what_would_not_read_back)
{
	struct spool_env env;
	char *text = NULL;
	size_t len;

	env_sample(&env);
	snprintf(env.user, sizeof(env.user), "line\nbreak");
	ck_assert_int_eq(spool_format_message(&env, &text, &len), -1);
	ck_assert_ptr_null(text);
	spool_env_clear(&env);
	env_sample(&env);
	snprintf(env.from, sizeof(env.from), "not an address");
	ck_assert_int_eq(spool_format_message(&env, &text, &len), -1);
	spool_env_clear(&env);
}
END_TEST

START_TEST(test_note_error)
{
	struct spool_env env;
	char name[16];

	memset(&env, 0, sizeof(env));
	spool_env_note_error(&env, "a", "one");
	spool_env_note_error(&env, "b", "two\r\nthree");
	spool_env_note_error(&env, "a", "again");
	ck_assert_uint_eq(env.n_errors, 2);
	ck_assert_str_eq(env.errors[0].relay, "b");
	ck_assert_str_eq(env.errors[0].text, "two??three");
	ck_assert_str_eq(spool_env_last_error(&env)->text, "again");
	for (int i = 0; i < SPOOL_ERRORS_MAX + 3; i++) {
		snprintf(name, sizeof(name), "ds%d", i);
		spool_env_note_error(&env, name, "x");
	}
	ck_assert_uint_eq(env.n_errors, SPOOL_ERRORS_MAX);
	snprintf(name, sizeof(name), "ds%d", SPOOL_ERRORS_MAX + 2);
	ck_assert_str_eq(spool_env_last_error(&env)->relay, name);
	ck_assert_str_eq(env.errors[0].relay, "ds3");      /* the oldest went first */
}
END_TEST

START_TEST(test_id_valid)
{
	ck_assert(spool_id_valid("0123456789AB", 12));
	ck_assert(!spool_id_valid("0123456789ab", 12));
	ck_assert(!spool_id_valid("0123456789A", 11));
	ck_assert(!spool_id_valid("0123456789ABC", 13));
	ck_assert(!spool_id_valid("../../etc/pa", 12));
}
END_TEST

/* --- schedule */

static const struct queue_cfg qcfg = { .enabled = true, .min_backoff = 60,
	.max_backoff = 3600, .max_lifetime = 432000, .max_concurrency = 10, .bounce = true };

START_TEST(test_backoff)
{
	/* rnd 0.5: no jitter. */
	ck_assert_uint_eq(queue_backoff(&qcfg, 1, 0.5), 60);
	ck_assert_uint_eq(queue_backoff(&qcfg, 2, 0.5), 120);
	ck_assert_uint_eq(queue_backoff(&qcfg, 6, 0.5), 1920);
	ck_assert_uint_eq(queue_backoff(&qcfg, 7, 0.5), 3600);
	ck_assert_uint_eq(queue_backoff(&qcfg, 500, 0.5), 3600);
	/* Jitter: +-25 %, never outside [min, max]. */
	ck_assert_uint_eq(queue_backoff(&qcfg, 1, 0.0), 60);
	ck_assert_uint_eq(queue_backoff(&qcfg, 1, 0.999), 75);
	ck_assert_uint_eq(queue_backoff(&qcfg, 3, 0.0), 180);
	ck_assert_uint_eq(queue_backoff(&qcfg, 3, 0.999), 300);
	ck_assert_uint_eq(queue_backoff(&qcfg, 9, 0.0), 2700);
	ck_assert_uint_eq(queue_backoff(&qcfg, 9, 0.999), 3600);
	/* A 1-second backoff (tests) stays 1 second. */
	{
		struct queue_cfg fast = qcfg;

		fast.min_backoff = fast.max_backoff = 1;
		for (double r = 0; r < 1; r += 0.125)
			ck_assert_uint_eq(queue_backoff(&fast, 4, r), 1);
	}
}
END_TEST

START_TEST(test_jitter_spreads)
{
	uint64_t state = 42;
	unsigned lo = UINT32_MAX, hi = 0;

	for (int i = 0; i < 1000; i++) {
		double r = queue_random(&state);
		unsigned d = queue_backoff(&qcfg, 4, r);

		ck_assert(r >= 0 && r < 1);
		lo = d < lo ? d : lo;
		hi = d > hi ? d : hi;
	}
	ck_assert_uint_lt(lo, 400);              /* 480 without jitter */
	ck_assert_uint_gt(hi, 560);
}
END_TEST

START_TEST(test_next_attempt)
{
	int64_t arrived = 1700000000, now = arrived + 100;

	/* Backoff after the third failure. */
	ck_assert_int_eq(queue_next_attempt(&qcfg, arrived, 3, now, 0, 0.5), now + 240);
	/* Quota: exactly when the window reopens, whatever the backoff. */
	ck_assert_int_eq(queue_next_attempt(&qcfg, arrived, 3, now, now + 17, 0.5), now + 17);
	ck_assert_int_eq(queue_next_attempt(&qcfg, arrived, 9, now, now + 1, 0.9), now + 1);
	/* A window that has reopened already: the next second, never now. */
	ck_assert_int_eq(queue_next_attempt(&qcfg, arrived, 1, now, now, 0.5), now + 1);
	/* Never past the end of the lifetime: one last attempt then. */
	ck_assert_int_eq(queue_next_attempt(&qcfg, arrived, 20, arrived + 431990, 0, 0.5),
	    arrived + 432000);
	ck_assert_int_eq(queue_next_attempt(&qcfg, arrived, 1, arrived + 431000,
	    arrived + 500000, 0.5), arrived + 432000);
}
END_TEST

START_TEST(test_expiry_and_delay_warning)
{
	struct queue_cfg q = qcfg;
	int64_t arrived = 1700000000;

	ck_assert(!queue_expired(&q, arrived, arrived + 431999));
	ck_assert(queue_expired(&q, arrived, arrived + 432000));
	ck_assert(!queue_delay_warning_due(&q, arrived, arrived + 999999, false));   /* off */
	q.delay_warning = 3600;
	ck_assert(!queue_delay_warning_due(&q, arrived, arrived + 3599, false));
	ck_assert(queue_delay_warning_due(&q, arrived, arrived + 3600, false));
	ck_assert(!queue_delay_warning_due(&q, arrived, arrived + 3600, true));     /* once */
}
END_TEST

/* --- notifications */

static const char orig_headers[] = "Received: from x\r\n\tby y\r\nFrom: <app@example.com>\r\n"
    "Subject: Reset your password\r\n\r\n";
static const char *const dsn_rcpts[] = { "a@example.org", "b@example.org" };

static void
dsn_report_sample(struct dsn_report *r, enum dsn_action action)
{
	memset(r, 0, sizeof(*r));
	r->action = action;
	r->hostname = "relay.example.net";
	r->queue_id = "0123456789AB";
	r->sender = "app@example.com";
	r->rcpts = dsn_rcpts;
	r->n_rcpts = 2;
	r->arrived = 1700000000;
	r->last_attempt = 1700000500;
	r->retry_until = 1700432000;
	r->now = 1700000501;
	r->status = "5.7.1";
	r->diagnostic = "550 5.7.1 Relaying denied\r\nInjected: header";
	r->reason = "refused by every downstream";
	r->headers = orig_headers;
	r->headers_len = sizeof(orig_headers) - 1;
}

static char *
dsn_text(const struct dsn_report *r, bool *eightbit)
{
	struct evbuffer *out = evbuffer_new();
	size_t len;
	char *text;

	ck_assert_int_eq(dsn_build(r, out, eightbit), 0);
	len = evbuffer_get_length(out);
	text = malloc(len + 1);
	evbuffer_remove(out, text, len);
	text[len] = '\0';
	evbuffer_free(out);
	/* CRLF only, no line over 998 octets. */
	for (char *p = text, *nl; *p != '\0'; p = nl + 1) {
		nl = strchr(p, '\n');
		ck_assert_ptr_nonnull(nl);
		ck_assert_msg(nl > p && nl[-1] == '\r', "bare LF in the notification");
		ck_assert_uint_le((size_t)(nl - p), 999);
		ck_assert_ptr_null(memchr(p, '\r', (size_t)(nl - p - 1)));
	}
	return text;
}

START_TEST(test_dsn_failed)
{
	struct dsn_report r;
	bool eightbit = true;
	char *text, *report;

	dsn_report_sample(&r, DSN_FAILED);
	text = dsn_text(&r, &eightbit);
	ck_assert(!eightbit);
	ck_assert_ptr_nonnull(strstr(text, "From: Mail Delivery System <MAILER-DAEMON@relay.example.net>\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "To: <app@example.com>\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "Subject: Undelivered Mail Returned to Sender\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "Auto-Submitted: auto-replied\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "Content-Type: multipart/report; "
	    "report-type=delivery-status;\r\n\tboundary=\"=_smtpmux_0123456789AB_1700000501_0\"\r\n"));
	ck_assert_ptr_nonnull(report = strstr(text, "Content-Type: message/delivery-status\r\n\r\n"
	    "Reporting-MTA: dns; relay.example.net\r\n"));
	ck_assert_ptr_nonnull(strstr(report, "Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
	ck_assert_ptr_nonnull(strstr(report, "\r\nFinal-Recipient: rfc822; a@example.org\r\n"
	    "Action: failed\r\nStatus: 5.7.1\r\n"
	    "Diagnostic-Code: smtp; 550 5.7.1 Relaying denied??Injected: header\r\n"
	    "Last-Attempt-Date: Tue, 14 Nov 2023 22:21:40 +0000\r\n"));
	ck_assert_ptr_nonnull(strstr(report, "Final-Recipient: rfc822; b@example.org\r\n"));
	ck_assert_ptr_null(strstr(report, "Will-Retry-Until"));
	ck_assert_ptr_nonnull(strstr(text, "Content-Type: text/rfc822-headers\r\n\r\n"
	    "Received: from x\r\n\tby y\r\nFrom: <app@example.com>\r\n"
	    "Subject: Reset your password\r\n\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "\r\n--=_smtpmux_0123456789AB_1700000501_0--\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "<a@example.org>: refused by every downstream\r\n"));
	free(text);
}
END_TEST

START_TEST(test_dsn_delayed_and_defaults)
{
	struct dsn_report r;
	bool eightbit;
	char *text;

	dsn_report_sample(&r, DSN_DELAYED);
	r.status = "5.7.1";                      /* a delay is never 5.x.x */
	r.diagnostic = "connect to mx: Connection refused";
	r.headers = "Subject: caf\xc3\xa9\r\n";
	r.headers_len = strlen(r.headers);
	text = dsn_text(&r, &eightbit);
	ck_assert(eightbit);
	ck_assert_ptr_nonnull(strstr(text, "Subject: Delayed Mail (still being retried)\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "Action: delayed\r\nStatus: 4.0.0\r\n"
	    "Diagnostic-Code: X-Smtpmux; connect to mx: Connection refused\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "Will-Retry-Until: Sun, 19 Nov 2023 22:13:20 +0000\r\n"));
	ck_assert_ptr_nonnull(strstr(text, "Content-Transfer-Encoding: 8bit\r\n"));
	free(text);

	dsn_report_sample(&r, DSN_FAILED);
	r.status = "5.7";
	r.diagnostic = NULL;
	r.headers = NULL;
	r.headers_len = 0;
	text = dsn_text(&r, &eightbit);
	ck_assert_ptr_nonnull(strstr(text, "Status: 5.0.0\r\n"));
	ck_assert_ptr_null(strstr(text, "Diagnostic-Code"));
	free(text);
	r.status = "4.4.7";                      /* expired: kept as it is */
	text = dsn_text(&r, &eightbit);
	ck_assert_ptr_nonnull(strstr(text, "Action: failed\r\nStatus: 4.4.7\r\n"));
	free(text);
}
END_TEST

START_TEST(test_dsn_boundary_not_in_headers)
{
	static const char hostile[] = "X-Trap: =_smtpmux_0123456789AB_1700000501_0\r\n\r\n";
	struct dsn_report r;
	bool eightbit;
	char *text;

	dsn_report_sample(&r, DSN_FAILED);
	r.headers = hostile;
	r.headers_len = sizeof(hostile) - 1;
	text = dsn_text(&r, &eightbit);
	ck_assert_ptr_nonnull(strstr(text, "boundary=\"=_smtpmux_0123456789AB_1700000501_1\""));
	free(text);
}
END_TEST

START_TEST(test_header_block)
{
	static const char msg[] = "A: 1\r\nB: 2\r\n\r\nbody\r\n";

	ck_assert_uint_eq(dsn_header_block(msg, sizeof(msg) - 1, 1000), 14);
	ck_assert_uint_eq(dsn_header_block(msg, sizeof(msg) - 1, 10), 6);    /* whole lines */
	ck_assert_uint_eq(dsn_header_block("A: 1\r\nB", 7, 1000), 6);        /* no body */
	ck_assert_uint_eq(dsn_header_block("\r\nbody", 6, 1000), 2);
	ck_assert_uint_eq(dsn_header_block("", 0, 1000), 0);
}
END_TEST

/* --- the writer thread */

struct wait {
	struct event_base *base;
	unsigned done, want;
	struct spool_result res[64];
};

static void
on_spooled(void *arg, const struct spool_result *res)
{
	struct wait *w = arg;

	ck_assert_uint_lt(w->done, 64);
	w->res[w->done++] = *res;
	if (w->done == w->want)
		event_base_loopbreak(w->base);
}

static void
run_until(struct wait *w)
{
	struct timeval guard = { 20, 0 };

	event_base_loopexit(w->base, &guard);
	event_base_dispatch(w->base);
	ck_assert_uint_eq(w->done, w->want);
}

static struct msgbody *
body_of(const char *text, uint64_t threshold)
{
	struct msgbody *b = msgbody_new(threshold, dir);

	ck_assert_ptr_nonnull(b);
	ck_assert_int_eq(msgbody_append(b, text, strlen(text)), 0);
	return b;
}

/* Reads msg/<id> back through spool_read(): header and body. */
static void
assert_committed(const char *id, const char *body)
{
	char err[160], *buf, path[256];
	struct spool_env env;
	struct spool *sp;
	bool state_err;
	size_t hlen, len;
	int fd;

	sp = spool_open(dir, err, sizeof(err));
	ck_assert_ptr_nonnull(sp);
	memset(&env, 0, sizeof(env));
	fd = spool_read(sp, id, &env, &hlen, &state_err, err, sizeof(err));
	ck_assert_msg(fd >= 0, "%s: %s", id, err);
	close(fd);
	ck_assert_uint_eq(env.size, strlen(body));
	snprintf(path, sizeof(path), "%s/msg/%s", dir, id);
	buf = slurp(path, &len);
	ck_assert_str_eq(buf + hlen, body);
	free(buf);
	spool_env_clear(&env);
	spool_close(sp);
}

START_TEST(test_writer_group_commit)
{
	struct event_base *base = event_base_new();
	struct wait w = { base, 0, 21, { { 0 } } };
	struct spool_env env;
	struct spool_writer *wr;
	struct msgbody *big, *b;
	char err[256], id[13], text[64], *huge;
	unsigned max_batch = 0;

	env_sample(&env);
	wr = spool_writer_new(base, dir, NULL, 0, err, sizeof(err));
	ck_assert_msg(wr != NULL, "%s", err);
	/* A first, big message keeps the thread busy while 20 more arrive. */
	huge = malloc(32u << 20);
	memset(huge, 'x', 32u << 20);
	huge[(32u << 20) - 1] = '\0';
	big = body_of(huge, 0);
	ck_assert_ptr_nonnull(spool_writer_submit(wr, "000000000000", &env, big, on_spooled, &w));
	msgbody_free(big);
	for (int i = 1; i <= 20; i++) {
		snprintf(id, sizeof(id), "%012X", i);
		snprintf(text, sizeof(text), "message %d\r\n", i);
		b = body_of(text, i % 2 ? 1 << 20 : 0);     /* in memory, or in a file */
		ck_assert_ptr_nonnull(spool_writer_submit(wr, id, &env, b, on_spooled, &w));
		msgbody_free(b);                 /* copied: the caller may free it at once */
	}
	run_until(&w);
	for (unsigned i = 0; i < w.done; i++) {
		ck_assert_int_eq(w.res[i].err, 0);
		if (w.res[i].batch > max_batch)
			max_batch = w.res[i].batch;
	}
	/* However the thread was scheduled, messages that waited together were
	 * committed together: one fsync of msg/ for several. */
	ck_assert_uint_gt(max_batch, 1);
	for (int i = 1; i <= 20; i++) {
		snprintf(id, sizeof(id), "%012X", i);
		snprintf(text, sizeof(text), "message %d\r\n", i);
		assert_committed(id, text);
	}
	ck_assert_int_eq(count_in("msg"), 21);
	ck_assert_int_eq(count_in("tmp"), 0);
	free(huge);
	spool_writer_free(wr);
	spool_env_clear(&env);
	event_base_free(base);
}
END_TEST

START_TEST(test_writer_max_size_and_collision)
{
	struct event_base *base = event_base_new();
	struct wait w = { base, 0, 1, { { 0 } } };
	char path[256], err[256];
	struct queue_stats *qs;
	struct spool_writer *wr;
	struct spool_env env;
	struct msgbody *b;

	ck_assert_ptr_nonnull(qs = queue_stats_create());
	queue_stats_added(qs, 100);
	env_sample(&env);
	/* An id already taken: committed under another one, the first kept. */
	snprintf(path, sizeof(path), "%s/msg/00000000000A", dir);
	spit(path, "first", 5);
	wr = spool_writer_new(base, dir, qs, 700, err, sizeof(err));
	ck_assert_msg(wr != NULL, "%s", err);
	b = body_of("short\r\n", 1024);
	ck_assert_ptr_nonnull(spool_writer_submit(wr, "00000000000A", &env, b, on_spooled, &w));
	msgbody_free(b);
	run_until(&w);
	ck_assert_int_eq(w.res[0].err, 0);
	ck_assert_str_ne(w.res[0].id, "00000000000A");
	ck_assert(spool_id_valid(w.res[0].id, strlen(w.res[0].id)));
	assert_committed(w.res[0].id, "short\r\n");
	ck_assert_uint_gt(queue_stats_bytes(qs), 100 + 7);
	/* queue.max_size: refused, nothing left behind. */
	b = body_of("a body that no longer fits under the limit ...........................\r\n"
	    "......................................................................\r\n"
	    "......................................................................\r\n", 1024);
	w.want = 2;
	ck_assert_ptr_nonnull(spool_writer_submit(wr, "00000000000B", &env, b, on_spooled, &w));
	msgbody_free(b);
	run_until(&w);
	ck_assert_int_eq(w.res[1].err, EDQUOT);
	ck_assert_str_eq(w.res[1].step, "max_size");
	ck_assert_int_eq(count_in("msg"), 2);
	ck_assert_int_eq(count_in("tmp"), 0);
	spool_writer_free(wr);
	queue_stats_destroy(qs);
	spool_env_clear(&env);
	event_base_free(base);
}
END_TEST

START_TEST(test_writer_reports_failures)
{
	struct event_base *base = event_base_new();
	struct wait w = { base, 0, 1, { { 0 } } };
	struct spool_writer *wr;
	struct spool_env env;
	struct msgbody *b;
	char err[256] = "", path[256];

	ck_assert_ptr_null(spool_writer_new(base, "/nonexistent/spool", NULL, 0, err, sizeof(err)));
	ck_assert_ptr_nonnull(strstr(err, "/nonexistent/spool"));
	wr = spool_writer_new(base, dir, NULL, 0, err, sizeof(err));
	ck_assert_ptr_nonnull(wr);
	/* tmp/ replaced by a file: the create fails, and is reported. */
	snprintf(path, sizeof(path), "%s/tmp", dir);
	ck_assert_int_eq(rmdir(path), 0);
	spit(path, "x", 1);
	env_sample(&env);
	b = body_of("x\r\n", 1024);
	ck_assert_ptr_nonnull(spool_writer_submit(wr, "00000000000C", &env, b, on_spooled, &w));
	run_until(&w);
	ck_assert_int_ne(w.res[0].err, 0);
	ck_assert_str_eq(w.res[0].step, "create");
	/* A bad id is refused at once. */
	ck_assert_ptr_null(spool_writer_submit(wr, "bad", &env, b, on_spooled, &w));
	msgbody_free(b);
	spool_writer_free(wr);
	spool_env_clear(&env);
	event_base_free(base);
}
END_TEST

START_TEST(test_writer_forgotten_job_is_committed)
{
	struct event_base *base = event_base_new();
	struct wait w = { base, 0, 1, { { 0 } } };
	struct spool_writer *wr;
	struct spool_env env;
	struct spool_job *j;
	struct msgbody *b;
	char err[256];

	env_sample(&env);
	wr = spool_writer_new(base, dir, NULL, 0, err, sizeof(err));
	b = body_of("kept\r\n", 1024);
	j = spool_writer_submit(wr, "00000000000D", &env, b, on_spooled, &w);
	spool_job_forget(j);
	msgbody_free(b);
	/* Freeing the writer finishes what was submitted; no callback runs. */
	spool_writer_free(wr);
	ck_assert_uint_eq(w.done, 0);
	assert_committed("00000000000D", "kept\r\n");
	spool_env_clear(&env);
	event_base_free(base);
}
END_TEST

/* --- the spool folder */

START_TEST(test_prepare)
{
	char path[256], err[256];
	struct stat st;

	snprintf(path, sizeof(path), "%s/deep/er/spool", dir);
	ck_assert_int_eq(spool_prepare(path, true, 65534, 65534, err, sizeof(err)), 0);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_uint_eq(st.st_mode & 07777, 0750);
	if (geteuid() == 0)
		ck_assert_uint_eq(st.st_uid, 65534);
	snprintf(path, sizeof(path), "%s/deep/er/spool/corrupt", dir);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_uint_eq(st.st_mode & 07777, 0750);
	/* Already the workers' user's: the master leaves its inside to them. */
	if (geteuid() == 0) {
		snprintf(path, sizeof(path), "%s/given", dir);
		ck_assert_int_eq(mkdir(path, 0750), 0);
		ck_assert_int_eq(chown(path, 65534, 65534), 0);
		ck_assert_int_eq(spool_prepare(path, true, 65534, 65534, err, sizeof(err)), 0);
		snprintf(path, sizeof(path), "%s/given/msg", dir);
		ck_assert_int_eq(stat(path, &st), -1);
		snprintf(path, sizeof(path), "%s/given", dir);
		ck_assert_int_eq(spool_prepare(path, false, 0, 0, err, sizeof(err)), 0);
		snprintf(path, sizeof(path), "%s/given/msg", dir);
		ck_assert_int_eq(stat(path, &st), 0);
	}
	/* A symlink is refused. */
	snprintf(path, sizeof(path), "%s/link", dir);
	ck_assert_int_eq(symlink("/etc", path), 0);
	ck_assert_int_eq(spool_prepare(path, false, 0, 0, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "symlink"));
	ck_assert_int_eq(spool_prepare("relative/spool", false, 0, 0, err, sizeof(err)), -1);
}
END_TEST

static void
write_message(const char *id, const char *body, size_t cut)
{
	struct spool_env env;
	char path[256], *head, *all;
	size_t hlen;

	env_sample(&env);
	env.size = strlen(body);
	ck_assert_int_eq(spool_format_message(&env, &head, &hlen), 0);
	all = malloc(hlen + env.size + 1);
	memcpy(all, head, hlen);
	memcpy(all + hlen, body, env.size);
	snprintf(path, sizeof(path), "%s/msg/%s", dir, id);
	spit(path, all, hlen + env.size - cut);
	free(all);
	free(head);
	spool_env_clear(&env);
}

START_TEST(test_recovery)
{
	char path[256], err[160];
	struct spool_env env;
	struct spool *sp;
	time_t old = time(NULL) - 3600;
	struct timeval tv[2] = { { old, 0 }, { old, 0 } };
	bool state_err;
	size_t hlen;
	int locked;

	ck_assert_ptr_nonnull(sp = spool_open(dir, err, sizeof(err)));
	/* tmp/: a writer killed before its rename (old, unlocked) goes; a
	 * writer at work (locked) and a fresh file stay. */
	snprintf(path, sizeof(path), "%s/tmp/dead", dir);
	spit(path, "half", 4);
	utimes(path, tv);
	snprintf(path, sizeof(path), "%s/tmp/busy", dir);
	spit(path, "half", 4);
	utimes(path, tv);
	locked = open(path, O_RDONLY);
	ck_assert_int_eq(flock(locked, LOCK_EX), 0);
	snprintf(path, sizeof(path), "%s/tmp/young", dir);
	spit(path, "half", 4);
	ck_assert_uint_eq(spool_clean_tmp(sp, time(NULL), 60), 1);
	ck_assert_int_eq(count_in("tmp"), 2);
	close(locked);
	ck_assert_uint_eq(spool_clean_tmp(sp, time(NULL), 60), 1);
	ck_assert_int_eq(count_in("tmp"), 1);

	/* msg/: a complete message reads; one cut short is malformed; a state
	 * file whose message is gone is removed. */
	write_message("0000000000A1", "complete\r\n", 0);
	write_message("0000000000A2", "cut short\r\n", 3);
	snprintf(path, sizeof(path), "%s/msg/0000000000A3.state", dir);
	spit(path, "SMTPMUX-STATE 1\nattempts 1\n\n", 28);
	memset(&env, 0, sizeof(env));
	ck_assert_int_ge(spool_read(sp, "0000000000A1", &env, &hlen, &state_err, err, sizeof(err)), 3);
	ck_assert_int_eq(spool_read(sp, "0000000000A2", &env, &hlen, &state_err, err, sizeof(err)), -1);
	ck_assert_int_eq(errno, EINVAL);
	ck_assert_ptr_nonnull(strstr(err, "the header says 11"));
	ck_assert_int_eq(spool_read(sp, "0000000000A4", &env, &hlen, &state_err, err, sizeof(err)), -1);
	ck_assert_int_eq(errno, ENOENT);
	ck_assert_uint_eq(spool_clean_states(sp), 1);
	ck_assert_int_eq(spool_move_aside(sp, "0000000000A2"), 0);
	ck_assert_int_eq(count_in("corrupt"), 1);
	ck_assert_int_eq(count_in("msg"), 1);
	spool_env_clear(&env);
	spool_close(sp);
}
END_TEST

static ino_t
inode_of(const char *sub, const char *name)
{
	char path[256];
	struct stat st;

	snprintf(path, sizeof(path), "%s/%s/%s", dir, sub, name);
	ck_assert_int_eq(stat(path, &st), 0);
	return st.st_ino;
}

START_TEST(test_reuse)
{
	char err[160], path[256], id[SPOOL_ID_LEN + 1] = "0000000000D9";
	uint64_t rng = 1;
	struct spool *runner, *writer;
	struct stat st;
	ino_t ino;
	int fd, locked;

	ck_assert_ptr_nonnull(runner = spool_open(dir, err, sizeof(err)));
	ck_assert_ptr_nonnull(writer = spool_open(dir, err, sizeof(err)));
	/* Delivered: the file goes to free/, emptied, with its state and mark. */
	write_message("0000000000D1", "delivered\r\n", 0);
	snprintf(path, sizeof(path), "%s/msg/0000000000D1.state", dir);
	spit(path, "SMTPMUX-STATE 1\nattempts 1\n\n", 28);
	ck_assert_int_eq(spool_set_held(runner, "0000000000D1", true), 0);
	ino = inode_of("msg", "0000000000D1");
	ck_assert_int_eq(spool_recycle(runner, "0000000000D1"), 0);
	ck_assert_int_eq(count_in("msg"), 0);
	ck_assert_int_eq(count_in("hold"), 0);
	ck_assert_int_eq(inode_of("free", "0000000000D1"), ino);
	snprintf(path, sizeof(path), "%s/free/0000000000D1", dir);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_int_eq(st.st_size, 0);
	ck_assert_int_eq(spool_recycle(runner, "0000000000D1"), -1);     /* gone */
	ck_assert_int_eq(errno, ENOENT);

	/* The next write takes that very file, locked, and publishes it. */
	ck_assert_int_ge(fd = spool_tmp_create(writer, "w1-0"), 0);
	ck_assert_int_eq(count_in("free"), 0);
	ck_assert_int_eq(inode_of("tmp", "w1-0"), ino);
	snprintf(path, sizeof(path), "%s/tmp/w1-0", dir);
	ck_assert_int_ge(locked = open(path, O_RDONLY), 0);
	ck_assert_int_eq(flock(locked, LOCK_EX | LOCK_NB), -1);           /* the writer's */
	close(locked);
	ck_assert_int_eq(fd_write_all(fd, "new", 3), 0);
	ck_assert_int_eq(spool_publish(writer, "w1-0", id, &rng), 0);
	close(fd);
	ck_assert_int_eq(inode_of("msg", id), ino);

	/* A file of free/ that another holds locked is left to it. */
	snprintf(path, sizeof(path), "%s/free/0000000000D2", dir);
	spit(path, "", 0);
	ck_assert_int_ge(locked = open(path, O_RDONLY), 0);
	ck_assert_int_eq(flock(locked, LOCK_EX), 0);
	ck_assert_int_ge(fd = spool_tmp_create(writer, "w1-1"), 0);
	close(fd);
	ck_assert_int_eq(count_in("free"), 1);
	ck_assert_int_ne(inode_of("tmp", "w1-1"), inode_of("free", "0000000000D2"));
	ino = inode_of("free", "0000000000D2");
	close(locked);
	ck_assert_int_ge(fd = spool_tmp_create(writer, "w1-2"), 0);
	close(fd);
	ck_assert_int_eq(inode_of("tmp", "w1-2"), ino);

	/* At the runner's start: what a crash left unemptied goes; so do
	 * names that are no ids. */
	snprintf(path, sizeof(path), "%s/free/0000000000D3", dir);
	spit(path, "old message", 11);
	snprintf(path, sizeof(path), "%s/free/0000000000D4", dir);
	spit(path, "", 0);
	snprintf(path, sizeof(path), "%s/free/junk", dir);
	spit(path, "", 0);
	ck_assert_uint_eq(spool_clean_free(runner), 1);
	ck_assert_int_eq(count_in("free"), 1);
	ck_assert_int_ge(inode_of("free", "0000000000D4"), 1);
	spool_close(writer);
	spool_close(runner);
}
END_TEST

START_TEST(test_reuse_is_bounded)
{
	char err[160], path[256];
	struct spool *sp;

	ck_assert_ptr_nonnull(sp = spool_open(dir, err, sizeof(err)));
	for (unsigned i = 0; i < SPOOL_FREE_MAX; i++) {
		snprintf(path, sizeof(path), "%s/free/%012X", dir, i + 1);
		spit(path, "", 0);
	}
	ck_assert_uint_eq(spool_clean_free(sp), SPOOL_FREE_MAX);
	/* free/ is full: a delivered message's file is removed. */
	write_message("0000000000E1", "delivered\r\n", 0);
	ck_assert_int_eq(spool_recycle(sp, "0000000000E1"), 0);
	ck_assert_int_eq(count_in("msg"), 0);
	ck_assert_int_eq(count_in("free"), SPOOL_FREE_MAX);
	spool_close(sp);
}
END_TEST

START_TEST(test_state_overrides_message)
{
	char err[160];
	struct spool_env env;
	struct spool *sp;
	bool state_err;
	size_t hlen;
	int fd;

	ck_assert_ptr_nonnull(sp = spool_open(dir, err, sizeof(err)));
	write_message("0000000000B1", "body\r\n", 0);
	memset(&env, 0, sizeof(env));
	fd = spool_read(sp, "0000000000B1", &env, &hlen, &state_err, err, sizeof(err));
	close(fd);
	ck_assert(!state_err);
	ck_assert_uint_eq(env.attempts, 2);
	env.attempts = 5;
	env.next = 1800000000;
	spool_env_note_error(&env, "A", "451 later");
	ck_assert_int_eq(spool_write_state(sp, "0000000000B1", &env), 0);
	ck_assert_int_eq(count_in("tmp"), 0);
	spool_env_clear(&env);
	fd = spool_read(sp, "0000000000B1", &env, &hlen, &state_err, err, sizeof(err));
	close(fd);
	ck_assert_uint_eq(env.attempts, 5);
	ck_assert_int_eq(env.next, 1800000000);
	ck_assert_str_eq(spool_env_last_error(&env)->text, "451 later");
	spool_env_clear(&env);
	/* A state file cut short by a crash: the message's own state holds. */
	{
		char path[256];

		snprintf(path, sizeof(path), "%s/msg/0000000000B1.state", dir);
		spit(path, "SMTPMUX-STATE 1\natt", 19);
	}
	fd = spool_read(sp, "0000000000B1", &env, &hlen, &state_err, err, sizeof(err));
	close(fd);
	ck_assert(state_err);
	ck_assert_uint_eq(env.attempts, 2);
	ck_assert_int_eq(spool_remove(sp, "0000000000B1"), 0);
	ck_assert_int_eq(count_in("msg"), 0);
	spool_env_clear(&env);
	spool_close(sp);
}
END_TEST

struct taken {
	char seen[8][32];
	int n;
};

static void
on_request(const char *verb, const char *target, void *arg)
{
	struct taken *t = arg;

	snprintf(t->seen[t->n++], sizeof(t->seen[0]), "%s %s", verb, target);
}

START_TEST(test_holds_requests_and_lock)
{
	struct taken t = { .n = 0 };
	char err[160], path[256];
	struct spool *sp;
	int lock;

	ck_assert_ptr_nonnull(sp = spool_open(dir, err, sizeof(err)));
	ck_assert(!spool_is_held(sp, "0000000000C1"));
	ck_assert_int_eq(spool_set_held(sp, "0000000000C1", true), 0);
	ck_assert(spool_is_held(sp, "0000000000C1"));
	ck_assert_int_eq(spool_set_held(sp, "0000000000C1", false), 0);
	ck_assert_int_eq(spool_set_held(sp, "0000000000C1", false), 0);
	ck_assert(!spool_is_held(sp, "0000000000C1"));

	ck_assert_int_eq(spool_request(sp, "flush", "all"), 0);
	ck_assert_int_eq(spool_request(sp, "delete", "0000000000C1"), 0);
	ck_assert_int_eq(spool_request(sp, "delete", "../x"), -1);
	ck_assert_int_eq(spool_request(sp, "format", "all"), -1);
	ck_assert(spool_request_pending(sp, "flush", "all"));
	snprintf(path, sizeof(path), "%s/ctl/garbage", dir);
	spit(path, "", 0);
	spool_take_requests(sp, on_request, &t);
	ck_assert_int_eq(t.n, 2);
	ck_assert(!spool_request_pending(sp, "flush", "all"));
	ck_assert_int_eq(count_in("ctl"), 0);

	ck_assert(!spool_runner_active(sp));
	ck_assert_int_ge(lock = spool_lock_runner(sp), 0);
	ck_assert(spool_runner_active(sp));
	ck_assert_int_eq(spool_lock_runner(sp), -1);
	ck_assert_int_eq(errno, EWOULDBLOCK);
	close(lock);
	ck_assert(!spool_runner_active(sp));
	spool_close(sp);
}
END_TEST

/* --- queue figures */

START_TEST(test_stats)
{
	struct queue_stats_view v;
	struct queue_stats *qs, *ro;
	char junk[] = "/tmp/check_queue.junk.XXXXXX";
	int fd;

	ck_assert_ptr_nonnull(qs = queue_stats_create());
	queue_stats_added(qs, 1000);
	queue_stats_added(qs, 500);
	queue_stats_count(qs, QUEUE_DELIVERED);
	queue_stats_removed(qs, 1000);
	queue_stats_removed(qs, 9999);           /* drift: floored, not wrapped */
	queue_stats_removed(qs, 1);
	queue_stats_set_oldest(qs, 1700000000);
	/* what a status reader is handed: read-only, sealed */
	ck_assert_int_ge(fd = dup(queue_stats_fd(qs)), 0);
	ck_assert_int_eq(fcntl(fd, F_GETFL) & O_ACCMODE, O_RDONLY);
	ck_assert_ptr_nonnull(ro = queue_stats_attach(fd));
	queue_stats_read(ro, &v);
	ck_assert_uint_eq(v.messages, 0);
	ck_assert_uint_eq(v.bytes, 0);
	ck_assert_int_eq(v.oldest, 1700000000);
	ck_assert_uint_eq(v.counter[QUEUE_QUEUED], 2);
	ck_assert_uint_eq(v.counter[QUEUE_DELIVERED], 1);
	/* the runner's scan resets the gauges, never the counters */
	queue_stats_reset(qs, 3, 300, 1);
	queue_stats_read(ro, &v);
	ck_assert_uint_eq(v.counter[QUEUE_QUEUED], 2);
	ck_assert_uint_eq(v.messages, 3);
	ck_assert_str_eq(queue_counter_name(QUEUE_DSN), "dsn");
	/* a child keeps its mapping, not the descriptor */
	queue_stats_after_fork(qs);
	ck_assert_int_eq(queue_stats_fd(qs), -1);
	queue_stats_added(qs, 1);
	queue_stats_read(ro, &v);
	ck_assert_uint_eq(v.messages, 4);
	queue_stats_destroy(qs);
	queue_stats_destroy(ro);
	/* anything else handed over is refused: a file that could shrink */
	ck_assert_int_ge(fd = mkstemp(junk), 0);
	unlink(junk);
	ck_assert_int_eq(ftruncate(fd, 4096), 0);
	ck_assert_ptr_null(queue_stats_attach(fd));
	ck_assert_int_eq(errno, EPROTO);
}
END_TEST

/* --- the runner's index */

START_TEST(test_index_order)
{
	struct qindex qi;
	struct qentry *e[600], *first;
	char id[13];

	qindex_init(&qi);
	for (int i = 0; i < 600; i++) {
		snprintf(id, sizeof(id), "%012X", i);
		e[i] = qindex_add(&qi, id, 1000 + (i % 7), 10);
		ck_assert_ptr_nonnull(e[i]);
		ck_assert_int_eq(qindex_schedule(&qi, e[i], 5000 + (i % 13)), 0);
	}
	ck_assert_ptr_null(qindex_add(&qi, "000000000000", 1, 1));   /* already there */
	ck_assert_uint_eq(qi.count, 600);
	ck_assert_uint_eq(qi.bytes, 6000);
	ck_assert_ptr_eq(qindex_find(&qi, "0000000000FF"), e[255]);
	ck_assert_ptr_null(qindex_find(&qi, "FFFFFFFFFFFF"));
	/* Due time first, then arrival (oldest first), then the order added. */
	for (int n = 0, last_next = 0, last_arr = 0; n < 600; n++) {
		first = qindex_first(&qi);
		ck_assert(first->next > last_next || (first->next == last_next &&
		    first->arrived >= last_arr));
		last_next = (int)first->next;
		last_arr = (int)first->arrived;
		qindex_unschedule(&qi, first);
	}
	ck_assert_ptr_null(qindex_first(&qi));
	/* Rescheduling moves an entry both ways; removing one in the middle. */
	qindex_schedule(&qi, e[1], 10);
	qindex_schedule(&qi, e[2], 20);
	qindex_schedule(&qi, e[3], 30);
	qindex_schedule(&qi, e[3], 5);
	ck_assert_ptr_eq(qindex_first(&qi), e[3]);
	qindex_schedule(&qi, e[3], 50);
	ck_assert_ptr_eq(qindex_first(&qi), e[1]);
	qindex_remove(&qi, e[1]);
	ck_assert_ptr_eq(qindex_first(&qi), e[2]);
	ck_assert_uint_eq(qi.count, 599);
	ck_assert_int_eq(qindex_oldest(&qi), 1000);
	qindex_free(&qi);
}
END_TEST

static Suite *
queue_suite(void)
{
	Suite *s = suite_create("queue");
	TCase *fmt = tcase_create("format"), *sched = tcase_create("schedule"),
	    *dsn = tcase_create("dsn"), *writer = tcase_create("writer"),
	    *spool = tcase_create("spool"), *index = tcase_create("index");
	TCase *all[] = { fmt, sched, dsn, writer, spool, index };

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
		tcase_add_checked_fixture(all[i], setup, teardown);
		suite_add_tcase(s, all[i]);
	}
	tcase_set_timeout(writer, 60);
	tcase_add_test(fmt, test_format_roundtrip);
	tcase_add_test(fmt, test_format_null_sender_and_body_offset);
	tcase_add_loop_test(fmt, test_format_refuses, 0, sizeof(bad_headers) / sizeof(bad_headers[0]));
	tcase_add_test(fmt, test_state_refused_leaves_env);
	tcase_add_test(fmt, test_formatter_refuses_what_would_not_read_back);
	tcase_add_test(fmt, test_note_error);
	tcase_add_test(fmt, test_id_valid);
	tcase_add_test(sched, test_backoff);
	tcase_add_test(sched, test_jitter_spreads);
	tcase_add_test(sched, test_next_attempt);
	tcase_add_test(sched, test_expiry_and_delay_warning);
	tcase_add_test(dsn, test_dsn_failed);
	tcase_add_test(dsn, test_dsn_delayed_and_defaults);
	tcase_add_test(dsn, test_dsn_boundary_not_in_headers);
	tcase_add_test(dsn, test_header_block);
	tcase_add_test(writer, test_writer_group_commit);
	tcase_add_test(writer, test_writer_max_size_and_collision);
	tcase_add_test(writer, test_writer_reports_failures);
	tcase_add_test(writer, test_writer_forgotten_job_is_committed);
	tcase_add_test(spool, test_prepare);
	tcase_add_test(spool, test_recovery);
	tcase_add_test(spool, test_reuse);
	tcase_add_test(spool, test_reuse_is_bounded);
	tcase_add_test(spool, test_state_overrides_message);
	tcase_add_test(spool, test_holds_requests_and_lock);
	tcase_add_test(spool, test_stats);
	tcase_add_test(index, test_index_order);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(queue_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

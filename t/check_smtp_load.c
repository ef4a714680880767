/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of smtp-load's socket-free parts (contrib/bench/load): the
 * SMTP client state machine driven with reply strings, the latency
 * histogram, the output queue, the generated message and commands, the
 * options and the JSON report.
 */
#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "hist.h"
#include "opts.h"
#include "outq.h"
#include "report.h"
#include "script.h"
#include "stats.h"

/* --- the client, driven by strings ------------------------------------------ */

struct harness {
	struct load_opts opts;
	struct load_script script;
	struct client_cfg cfg;
	struct client cl;
	struct outq out;
	unsigned claims_left;           /* what the fake run still has to give */
	unsigned ok, failed;
	uint64_t last_latency;
	char errors[512];               /* "stage code;" per negative reply */
	char faults[256];
	char sent[8192];                /* what the last h_sent() took */
};

static bool
h_claim(void *arg)
{
	struct harness *h = arg;

	if (h->claims_left == 0)
		return false;
	h->claims_left--;
	return true;
}

static void
h_message(void *arg, bool ok, uint64_t latency)
{
	struct harness *h = arg;

	if (ok) {
		h->ok++;
		h->last_latency = latency;
	} else {
		h->failed++;
	}
}

static void
h_reply_error(void *arg, int code, const char *stage, const char *text)
{
	struct harness *h = arg;
	size_t n = strlen(h->errors);

	snprintf(h->errors + n, sizeof(h->errors) - n, "%s %d;", stage, code);
}

static void
h_fault(void *arg, enum load_fault f, const char *detail)
{
	struct harness *h = arg;
	size_t n = strlen(h->faults);

	snprintf(h->faults + n, sizeof(h->faults) - n, "%s;", stats_fault_name(f));
}

static const struct client_hooks hooks = {
	.claim = h_claim, .message = h_message, .reply_error = h_reply_error, .fault = h_fault,
};

/* Options as on a command line, after the program name and before the server. */
static struct harness *
h_new(const char *const *args, unsigned claims)
{
	struct harness *h = calloc(1, sizeof(*h));
	char *argv[32], err[256];
	int argc = 0;

	ck_assert_ptr_nonnull(h);
	argv[argc++] = (char *)"smtp-load";
	for (; args != NULL && *args != NULL; args++)
		argv[argc++] = (char *)*args;
	argv[argc++] = (char *)"127.0.0.1:2525";
	argv[argc] = NULL;
	ck_assert_msg(opts_parse(argc, argv, &h->opts, err, sizeof(err)) == 0, "%s", err);
	ck_assert_msg(script_build(&h->script, &h->opts, err, sizeof(err)) == 0, "%s", err);
	h->cfg.script = &h->script;
	h->cfg.per_session = h->opts.per_session;
	h->cfg.pipelining = h->opts.pipelining;
	h->cfg.starttls = h->opts.tls == OPTS_TLS_STARTTLS;
	h->claims_left = claims;
	client_start(&h->cl, &h->cfg, &hooks, h, &h->out);
	return h;
}

static void
h_free(struct harness *h)
{
	script_free(&h->script);
	free(h);
}

/* Feeds replies at time now; all of them must be consumed. */
static enum client_step
h_feed(struct harness *h, const char *replies, uint64_t now)
{
	size_t used = 0;
	enum client_step step = client_input(&h->cl, replies, strlen(replies), now, &used);

	ck_assert_uint_eq(used, strlen(replies));
	return step;
}

/* Everything queued to send, as one string; empties the queue. */
static const char *
h_sent(struct harness *h)
{
	size_t n = 0;
	int cnt;
	struct iovec *iov = outq_iov(&h->out, &cnt);

	for (int i = 0; i < cnt; i++) {
		ck_assert_uint_lt(n + iov[i].iov_len, sizeof(h->sent));
		memcpy(h->sent + n, iov[i].iov_base, iov[i].iov_len);
		n += iov[i].iov_len;
	}
	h->sent[n] = '\0';
	outq_consume(&h->out, n);
	return h->sent;
}

/* The sent text with the message (headers and body) replaced by "<msg>". */
static const char *
h_sent_short(struct harness *h)
{
	const char *s = h_sent(h);
	const char *msg = strstr(s, "From: <");
	static char out[8192];

	if (msg == NULL)
		return s;
	snprintf(out, sizeof(out), "%.*s<msg>%s", (int)(msg - s), s,
	    msg + h->script.message.len - 3);
	return out;
}

#define EHLO_PLAIN "250-mx.test\r\n250 8BITMIME\r\n"
#define EHLO_PIPE "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
#define EHLO_TLS "250-mx.test\r\n250-STARTTLS\r\n250 PIPELINING\r\n"

static void
h_greet(struct harness *h, const char *ehlo)
{
	ck_assert_int_eq(h_feed(h, "220 mx.test ESMTP\r\n", 1), CLIENT_WAIT);
	ck_assert_str_eq(h_sent(h), "EHLO smtp-load.test\r\n");
	ck_assert_int_eq(h_feed(h, ehlo, 2), CLIENT_WAIT);
}

START_TEST(test_lockstep_one_message_per_session)
{
	struct harness *h = h_new(NULL, 5);

	h_greet(h, EHLO_PIPE);
	/* no --pipelining: one command at a time even when offered */
	ck_assert_str_eq(h_sent(h), "MAIL FROM:<load@example.com>\r\n");
	ck_assert_int_eq(h_feed(h, "250 2.1.0 Ok\r\n", 10), CLIENT_WAIT);
	ck_assert_str_eq(h_sent(h), "RCPT TO:<sink@example.org>\r\n");
	ck_assert_int_eq(h_feed(h, "250 2.1.5 Ok\r\n", 11), CLIENT_WAIT);
	ck_assert_str_eq(h_sent(h), "DATA\r\n");
	ck_assert_int_eq(h_feed(h, "354 go ahead\r\n", 12), CLIENT_WAIT);
	ck_assert_str_eq(h_sent_short(h), "<msg>.\r\n");
	ck_assert_int_eq(h_feed(h, "250 2.0.0 queued\r\n", 25), CLIENT_WAIT);
	/* -m 1: the session ends after its message, without claiming another */
	ck_assert_str_eq(h_sent(h), "QUIT\r\n");
	ck_assert_uint_eq(h->claims_left, 5);
	ck_assert_uint_eq(h->ok, 1);
	ck_assert_uint_eq(h->last_latency, 25 - 2);     /* from MAIL (sent at 2) to the dot's reply */
	ck_assert_int_eq(h_feed(h, "221 bye\r\n", 26), CLIENT_CLOSE);
	ck_assert(client_end(&h->cl));
	ck_assert_uint_eq(h->failed, 0);
	ck_assert_str_eq(h->errors, "");
	h_free(h);
}
END_TEST

START_TEST(test_lockstep_several_messages_until_claims_run_out)
{
	const char *args[] = { "-m", "0", NULL };
	struct harness *h = h_new(args, 1);

	h_greet(h, EHLO_PLAIN);
	for (int i = 0; i < 2; i++) {
		ck_assert_str_eq(h_sent(h), "MAIL FROM:<load@example.com>\r\n");
		h_feed(h, "250 ok\r\n", 3);
		h_feed(h, "250 ok\r\n", 4);
		h_feed(h, "354 go\r\n", 5);
		h_sent(h);
		h_feed(h, "250 ok\r\n", 6);
	}
	ck_assert_str_eq(h_sent(h), "QUIT\r\n");
	ck_assert_uint_eq(h->ok, 2);
	h_free(h);
}
END_TEST

START_TEST(test_pipelining_batches_and_sends_the_dot_with_the_next_message)
{
	const char *args[] = { "-P", "-m", "2", "-r", "2", NULL };
	struct harness *h = h_new(args, 5);

	h_greet(h, EHLO_PIPE);
	ck_assert_str_eq(h_sent(h), "MAIL FROM:<load@example.com>\r\nRCPT TO:<1sink@example.org>\r\n"
	    "RCPT TO:<2sink@example.org>\r\nDATA\r\n");
	/* the replies may come in one read */
	ck_assert_int_eq(h_feed(h, "250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", 5), CLIENT_WAIT);
	ck_assert_str_eq(h_sent_short(h), "<msg>.\r\nMAIL FROM:<load@example.com>\r\n"
	    "RCPT TO:<1sink@example.org>\r\nRCPT TO:<2sink@example.org>\r\nDATA\r\n");
	ck_assert_int_eq(h_feed(h, "250 queued\r\n250 ok\r\n250 ok\r\n250 ok\r\n", 9), CLIENT_WAIT);
	ck_assert_uint_eq(h->ok, 1);
	ck_assert_uint_eq(h->last_latency, 9 - 2);
	ck_assert_int_eq(h_feed(h, "354 go\r\n", 10), CLIENT_WAIT);
	/* -m 2: the second message goes with QUIT */
	ck_assert_str_eq(h_sent_short(h), "<msg>.\r\nQUIT\r\n");
	ck_assert_int_eq(h_feed(h, "250 queued\r\n221 bye\r\n", 12), CLIENT_CLOSE);
	ck_assert_uint_eq(h->ok, 2);
	ck_assert_uint_eq(h->last_latency, 12 - 5);
	ck_assert(client_end(&h->cl));
	ck_assert(h->cl.pipelined);
	h_free(h);
}
END_TEST

START_TEST(test_pipelining_only_when_offered)
{
	const char *args[] = { "-P", NULL };
	struct harness *h = h_new(args, 0);

	h_greet(h, EHLO_PLAIN);
	ck_assert_str_eq(h_sent(h), "MAIL FROM:<load@example.com>\r\n");
	ck_assert(!h->cl.pipelined);
	h_free(h);
}
END_TEST

START_TEST(test_replies_split_across_reads)
{
	struct harness *h = h_new(NULL, 0);
	size_t used = 99;

	ck_assert_int_eq(client_input(&h->cl, "220-mx", 6, 1, &used), CLIENT_WAIT);
	ck_assert_uint_eq(used, 0);
	ck_assert_str_eq(h_sent(h), "");
	h_feed(h, "220-mx.test\r\n220 ready\r\n", 2);
	ck_assert_str_eq(h_sent(h), "EHLO smtp-load.test\r\n");
	h_free(h);
}
END_TEST

START_TEST(test_lockstep_refused_recipient_rsets_and_goes_on)
{
	const char *args[] = { "-m", "0", "-r", "2", NULL };
	struct harness *h = h_new(args, 1);

	h_greet(h, EHLO_PLAIN);
	h_sent(h);
	h_feed(h, "250 ok\r\n", 3);
	ck_assert_str_eq(h_sent(h), "RCPT TO:<1sink@example.org>\r\n");
	h_feed(h, "550 5.1.1 no such user\r\n", 4);
	ck_assert_str_eq(h_sent(h), "RCPT TO:<2sink@example.org>\r\n");
	h_feed(h, "450 4.2.0 greylisted\r\n", 5);
	/* no recipient left: the message fails, RSET, then the next message */
	ck_assert_str_eq(h_sent(h), "RSET\r\n");
	ck_assert_uint_eq(h->failed, 1);
	h_feed(h, "250 ok\r\n", 6);
	ck_assert_str_eq(h_sent(h), "MAIL FROM:<load@example.com>\r\n");
	h_feed(h, "550 5.7.1 sender refused\r\n", 7);
	ck_assert_str_eq(h_sent(h), "QUIT\r\n");
	ck_assert_uint_eq(h->failed, 2);
	ck_assert_str_eq(h->errors, "rcpt 550;rcpt 450;mail 550;");
	ck_assert_int_eq(h_feed(h, "221 bye\r\n", 8), CLIENT_CLOSE);
	/* failed messages do not fail the session */
	ck_assert(client_end(&h->cl));
	ck_assert_uint_eq(h->ok, 0);
	h_free(h);
}
END_TEST

START_TEST(test_lockstep_partial_recipients_deliver)
{
	const char *args[] = { "-r", "2", NULL };
	struct harness *h = h_new(args, 0);

	h_greet(h, EHLO_PLAIN);
	h_sent(h);
	h_feed(h, "250 ok\r\n", 3);
	h_feed(h, "550 no\r\n", 4);
	h_feed(h, "250 ok\r\n", 5);
	ck_assert_str_eq(h_sent(h), "RCPT TO:<1sink@example.org>\r\nRCPT TO:<2sink@example.org>\r\nDATA\r\n");
	h_feed(h, "354 go\r\n", 6);
	h_feed(h, "250 ok\r\n", 7);
	ck_assert_uint_eq(h->ok, 1);
	ck_assert_str_eq(h->errors, "rcpt 550;");
	h_free(h);
}
END_TEST

START_TEST(test_pipelined_refusals)
{
	const char *args[] = { "-P", "-m", "0", NULL };
	struct harness *h = h_new(args, 2);

	h_greet(h, EHLO_PIPE);
	h_sent(h);
	/* the recipient refused, DATA refused: RSET with the next batch */
	h_feed(h, "250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n", 3);
	ck_assert_uint_eq(h->failed, 1);
	ck_assert_str_eq(h_sent(h), "RSET\r\nMAIL FROM:<load@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n");
	/* a server that says 354 with no recipient gets an empty message */
	h_feed(h, "250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n", 4);
	ck_assert_str_eq(h_sent(h), ".\r\nMAIL FROM:<load@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n");
	h_feed(h, "250 ok\r\n", 5);
	ck_assert_uint_eq(h->failed, 2);
	ck_assert_uint_eq(h->ok, 0);
	ck_assert_str_eq(h->errors, "rcpt 550;data 554;rcpt 550;");
	h_free(h);
}
END_TEST

START_TEST(test_auth_plain)
{
	const char *args[] = { "-u", "user", "-p", "pass", NULL };
	struct harness *h = h_new(args, 0);

	h_greet(h, EHLO_PLAIN);
	ck_assert_str_eq(h_sent(h), "AUTH PLAIN AHVzZXIAcGFzcw==\r\n");
	h_feed(h, "235 2.7.0 ok\r\n", 3);
	ck_assert_str_eq(h_sent(h), "MAIL FROM:<load@example.com>\r\n");
	h_free(h);
}
END_TEST

START_TEST(test_auth_login)
{
	const char *args[] = { "-u", "user", "-p", "pass", "-a", "login", NULL };
	struct harness *h = h_new(args, 0);

	h_greet(h, EHLO_PLAIN);
	ck_assert_str_eq(h_sent(h), "AUTH LOGIN\r\n");
	h_feed(h, "334 VXNlcm5hbWU6\r\n", 3);
	ck_assert_str_eq(h_sent(h), "dXNlcg==\r\n");
	h_feed(h, "334 UGFzc3dvcmQ6\r\n", 4);
	ck_assert_str_eq(h_sent(h), "cGFzcw==\r\n");
	h_feed(h, "235 2.7.0 ok\r\n", 5);
	ck_assert_str_eq(h_sent(h), "MAIL FROM:<load@example.com>\r\n");
	h_free(h);
}
END_TEST

START_TEST(test_auth_refused_fails_the_session_and_its_message)
{
	const char *args[] = { "-u", "user", "-p", "wrong", NULL };
	struct harness *h = h_new(args, 3);

	h_greet(h, EHLO_PLAIN);
	h_sent(h);
	h_feed(h, "535 5.7.8 bad credentials\r\n", 3);
	ck_assert_str_eq(h_sent(h), "QUIT\r\n");
	ck_assert_int_eq(h_feed(h, "221 bye\r\n", 4), CLIENT_CLOSE);
	ck_assert(!client_end(&h->cl));
	ck_assert_uint_eq(h->failed, 1);
	ck_assert_uint_eq(h->claims_left, 3);
	ck_assert_str_eq(h->errors, "auth 535;");
	h_free(h);
}
END_TEST

START_TEST(test_starttls)
{
	const char *args[] = { "--starttls", "-P", NULL };
	struct harness *h = h_new(args, 0);

	h_greet(h, EHLO_TLS);
	ck_assert_str_eq(h_sent(h), "STARTTLS\r\n");
	ck_assert_int_eq(h_feed(h, "220 go ahead\r\n", 3), CLIENT_START_TLS);
	ck_assert_str_eq(h_sent(h), "");
	client_tls_ready(&h->cl);
	ck_assert_str_eq(h_sent(h), "EHLO smtp-load.test\r\n");
	/* only what is offered over TLS counts */
	h_feed(h, EHLO_PIPE, 4);
	ck_assert(h->cl.pipelined);
	ck_assert_str_eq(h_sent(h), "MAIL FROM:<load@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n");
	h_free(h);
}
END_TEST

START_TEST(test_starttls_not_offered)
{
	const char *args[] = { "--starttls", NULL };
	struct harness *h = h_new(args, 0);

	h_greet(h, EHLO_PLAIN);
	ck_assert_str_eq(h_sent(h), "QUIT\r\n");
	ck_assert_str_eq(h->faults, "no-starttls;");
	h_feed(h, "221 bye\r\n", 3);
	ck_assert(!client_end(&h->cl));
	ck_assert_uint_eq(h->failed, 1);
	h_free(h);
}
END_TEST

START_TEST(test_421_closes)
{
	const char *args[] = { "-P", NULL };
	struct harness *h = h_new(args, 0);

	h_greet(h, EHLO_PIPE);
	h_sent(h);
	ck_assert_int_eq(h_feed(h, "421 4.3.2 shutting down\r\n", 3), CLIENT_CLOSE);
	ck_assert(!client_end(&h->cl));
	ck_assert_uint_eq(h->failed, 1);
	ck_assert_str_eq(h->errors, "mail 421;");
	h_free(h);
}
END_TEST

START_TEST(test_refused_greeting)
{
	struct harness *h = h_new(NULL, 0);

	h_feed(h, "554 5.7.1 go away\r\n", 1);
	ck_assert_str_eq(h_sent(h), "QUIT\r\n");
	ck_assert_str_eq(h->errors, "greeting 554;");
	h_free(h);
}
END_TEST

START_TEST(test_garbage_is_a_protocol_fault)
{
	struct harness *h = h_new(NULL, 0);
	size_t used;

	ck_assert_int_eq(client_input(&h->cl, "HTTP/1.1 400\r\n", 14, 1, &used), CLIENT_CLOSE);
	ck_assert_str_eq(h->faults, "protocol;");
	ck_assert(!client_end(&h->cl));
	ck_assert_uint_eq(h->failed, 1);
	h_free(h);
}
END_TEST

START_TEST(test_input_after_starttls_220_is_left_unread)
{
	const char *args[] = { "--starttls", NULL };
	const char *in = "220 go ahead\r\n250 injected in clear\r\n";
	struct harness *h = h_new(args, 0);
	size_t used;

	h_greet(h, EHLO_TLS);
	h_sent(h);
	/* the caller discards the rest: it was sent before the handshake */
	ck_assert_int_eq(client_input(&h->cl, in, strlen(in), 3, &used), CLIENT_START_TLS);
	ck_assert_uint_eq(used, strlen("220 go ahead\r\n"));
	h_free(h);
}
END_TEST

/* --- the message and the commands ------------------------------------------------ */

static void
check_message(uint64_t size)
{
	char sz[32], err[256];
	const char *args[] = { "-s", sz, NULL };
	struct harness *h;
	const char *p, *end;

	snprintf(sz, sizeof(sz), "%llu", (unsigned long long)size);
	h = h_new(args, 0);
	ck_assert_uint_eq(h->script.message_size, size);
	ck_assert_uint_eq(h->script.message.len, size + 3);
	p = h->script.message.p;
	end = p + h->script.message.len;
	ck_assert(memcmp(end - 5, "\r\n.\r\n", 5) == 0);
	/* every line ends in CRLF, none starts with a dot but the last */
	for (const char *line = p; line < end - 3;) {
		const char *lf = memchr(line, '\n', (size_t)(end - line));

		ck_assert_ptr_nonnull(lf);
		ck_assert(lf > line && lf[-1] == '\r');
		ck_assert(*line != '.');
		ck_assert_int_lt(lf - line, 1000);
		line = lf + 1;
	}
	(void)err;
	h_free(h);
}

START_TEST(test_message_has_the_exact_size)
{
	struct load_opts o;
	char *argv[] = { (char *)"smtp-load", (char *)"h", NULL }, err[256];
	size_t hlen;

	ck_assert_int_eq(opts_parse(2, argv, &o, err, sizeof(err)), 0);
	hlen = script_header_len(&o);
	for (uint64_t extra = 0; extra < 200; extra++)
		check_message(hlen + extra);
	check_message(1024);
	check_message(1024 * 1024 + 7);
}
END_TEST

START_TEST(test_message_smaller_than_its_header_is_refused)
{
	struct load_opts o;
	struct load_script s;
	char *argv[] = { (char *)"smtp-load", (char *)"-s", (char *)"10", (char *)"h", NULL }, err[256];

	ck_assert_int_eq(opts_parse(4, argv, &o, err, sizeof(err)), 0);
	ck_assert_int_eq(script_build(&s, &o, err, sizeof(err)), -1);
	ck_assert_msg(strstr(err, "--size: at least") != NULL, "%s", err);
}
END_TEST

/* --- options ------------------------------------------------------------------- */

static int
parse(struct load_opts *o, char *err, size_t errlen, ...)
{
	char *argv[32];
	int argc = 0;
	va_list ap;
	char *a;

	argv[argc++] = (char *)"smtp-load";
	va_start(ap, errlen);
	while ((a = va_arg(ap, char *)) != NULL)
		argv[argc++] = a;
	va_end(ap);
	argv[argc] = NULL;
	err[0] = '\0';
	return opts_parse(argc, argv, o, err, errlen);
}

START_TEST(test_opts_defaults_and_servers)
{
	struct load_opts o;
	char err[256];

	ck_assert_int_eq(parse(&o, err, sizeof(err), "mx.test", NULL), 0);
	ck_assert_str_eq(o.host, "mx.test");
	ck_assert_str_eq(o.port, "25");
	ck_assert_uint_eq(o.concurrency, 1);
	ck_assert_uint_eq(o.messages, 1000);
	ck_assert_uint_eq(o.size, 1024);
	ck_assert_uint_eq(o.per_session, 1);
	ck_assert_int_eq(o.auth, OPTS_AUTH_NONE);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "127.0.0.1:2525", NULL), 0);
	ck_assert_str_eq(o.host, "127.0.0.1");
	ck_assert_str_eq(o.port, "2525");
	ck_assert_int_eq(parse(&o, err, sizeof(err), "[::1]:587", NULL), 0);
	ck_assert_str_eq(o.host, "::1");
	ck_assert_str_eq(o.port, "587");
	ck_assert_int_eq(parse(&o, err, sizeof(err), "::1", NULL), 0);
	ck_assert_str_eq(o.host, "::1");
	ck_assert_str_eq(o.port, "25");
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-d", "2.5", "-s", "25M", "-u", "u", "-p", "p", "h", NULL), 0);
	ck_assert_uint_eq(o.messages, 0);
	ck_assert(o.duration == 2.5);
	ck_assert_uint_eq(o.size, 25 * 1024 * 1024);
	ck_assert_int_eq(o.auth, OPTS_AUTH_PLAIN);
}
END_TEST

START_TEST(test_opts_errors_name_the_option)
{
	struct load_opts o;
	char err[256];

	ck_assert_int_eq(parse(&o, err, sizeof(err), "-c", "0", "h", NULL), -1);
	ck_assert_str_eq(err, "--concurrency: not a number from 1 to 1000000: '0'");
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-n", "-5", "h", NULL), -1);
	ck_assert_msg(strncmp(err, "--messages:", 11) == 0, "%s", err);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-s", "3G", "h", NULL), -1);
	ck_assert_msg(strncmp(err, "--size:", 7) == 0, "%s", err);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-r", "101", "h", NULL), -1);
	ck_assert_msg(strncmp(err, "--rcpts:", 8) == 0, "%s", err);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-d", "soon", "h", NULL), -1);
	ck_assert_msg(strncmp(err, "--duration:", 11) == 0, "%s", err);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-f", "a b@c", "h", NULL), -1);
	ck_assert_msg(strncmp(err, "--from:", 7) == 0, "%s", err);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-a", "cram-md5", "-u", "u", "-p", "p", "h", NULL), -1);
	ck_assert_msg(strncmp(err, "--auth:", 7) == 0, "%s", err);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-a", "login", "h", NULL), -1);
	ck_assert_str_eq(err, "--auth: needs --user");
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-T", "4", "-c", "2", "h", NULL), -1);
	ck_assert_msg(strncmp(err, "--threads:", 10) == 0, "%s", err);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "--cafile", "ca.pem", "h", NULL), -1);
	ck_assert_msg(strstr(err, "need --starttls or --smtps") != NULL, "%s", err);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "--starttls", "--smtps", "h", NULL), -1);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "--bogus", "h", NULL), -1);
	ck_assert_str_eq(err, "--bogus: unknown option");
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-c", NULL), -1);
	ck_assert_str_eq(err, "-c: needs a value");
	ck_assert_int_eq(parse(&o, err, sizeof(err), NULL), -1);
	ck_assert_str_eq(err, "no server given (HOST[:PORT])");
	ck_assert_int_eq(parse(&o, err, sizeof(err), "h:", NULL), -1);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "[::1", NULL), -1);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-h", NULL), 1);
}
END_TEST

START_TEST(test_opts_password_from_environment)
{
	struct load_opts o;
	char err[256];

	unsetenv("SMTP_LOAD_PASSWORD");
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-u", "u", "h", NULL), -1);
	ck_assert_msg(strstr(err, "no password") != NULL, "%s", err);
	setenv("SMTP_LOAD_PASSWORD", "from-env", 1);
	ck_assert_int_eq(parse(&o, err, sizeof(err), "-u", "u", "h", NULL), 0);
	ck_assert_str_eq(o.password, "from-env");
	unsetenv("SMTP_LOAD_PASSWORD");
}
END_TEST

/* --- the histogram and the output queue ------------------------------------------- */

START_TEST(test_hist_percentiles_within_one_percent)
{
	struct hist *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b));

	hist_init(a);
	hist_init(b);
	ck_assert_uint_eq(hist_quantile(a, 0.5), 0);
	/* 1..100000 us in ns, split over two histograms as over two threads */
	for (uint64_t v = 1; v <= 100000; v++)
		hist_add(v % 2 ? a : b, v * 1000);
	hist_merge(a, b);
	ck_assert_uint_eq(a->count, 100000);
	ck_assert_uint_eq(a->max, 100000000);
	ck_assert_uint_eq(a->min, 1000);
	ck_assert_uint_eq(hist_mean(a), 50000500);
	for (int i = 0; i < 3; i++) {
		double q = (double[]){ 0.5, 0.9, 0.99 }[i];
		double want = q * 100000000.0, got = (double)hist_quantile(a, q);

		ck_assert_msg(got > want * 0.99 && got < want * 1.01, "q=%g: %g vs %g", q, got, want);
	}
	ck_assert_uint_eq(hist_quantile(a, 1.0), 100000000);
	/* small values are exact; one sample is its own percentiles */
	hist_init(b);
	hist_add(b, 200);
	ck_assert_uint_eq(hist_quantile(b, 0.5), 200);
	ck_assert_uint_eq(hist_quantile(b, 0.99), 200);
	hist_add(b, UINT64_MAX / 2);     /* beyond the last bucket: kept, max exact */
	ck_assert_uint_eq(hist_quantile(b, 1.0), UINT64_MAX / 2);
	free(a);
	free(b);
}
END_TEST

START_TEST(test_outq)
{
	struct outq q;
	struct iovec *iov;
	int n;

	outq_reset(&q);
	ck_assert(outq_empty(&q));
	for (int i = 0; i < OUTQ_SEGS; i++)
		ck_assert(outq_add(&q, "abcd", 4));
	ck_assert(!outq_add(&q, "x", 1));
	ck_assert_uint_eq(outq_pending(&q), 4 * OUTQ_SEGS);
	outq_consume(&q, 6);            /* one and a half segments */
	iov = outq_iov(&q, &n);
	ck_assert_int_eq(n, OUTQ_SEGS - 1);
	ck_assert_uint_eq(iov[0].iov_len, 2);
	ck_assert(memcmp(iov[0].iov_base, "cd", 2) == 0);
	ck_assert(outq_add(&q, "efgh", 4));    /* room again, at the end */
	ck_assert_uint_eq(outq_pending(&q), 4 * OUTQ_SEGS - 2);
	outq_consume(&q, outq_pending(&q));
	ck_assert(outq_empty(&q));
	ck_assert(outq_add(&q, "", 0));
	ck_assert(outq_empty(&q));
}
END_TEST

/* --- the report ------------------------------------------------------------------ */

START_TEST(test_json_report)
{
	struct load_opts o;
	struct load_stats *s = malloc(sizeof(*s));
	struct load_run run = { 2.0, 0.5 };
	char err[256], *buf = NULL;
	size_t len = 0;
	FILE *f;

	ck_assert_int_eq(parse(&o, err, sizeof(err), "-c", "3", "[::1]:2525", NULL), 0);
	stats_init(s);
	s->msgs_ok = 10;
	s->msgs_failed = 2;
	s->sessions_ok = 4;
	hist_add(&s->msg_latency, 1500000);
	stats_reply_error(s, 550, "rcpt", "5.1.1 \"unknown\"");
	stats_reply_error(s, 550, "rcpt", "second text is not kept");
	stats_fault(s, FAULT_TIMEOUT, "no reply within 30000 ms");
	f = open_memstream(&buf, &len);
	report_json(f, &o, s, &run);
	fclose(f);
	ck_assert_msg(strstr(buf, "{\"server\":\"[::1]:2525\",\"concurrency\":3,") == buf, "%s", buf);
	ck_assert_msg(strstr(buf, "\"messages\":10,\"failed\":2,\"sessions\":4,") != NULL, "%s", buf);
	ck_assert_msg(strstr(buf, "\"msgs_per_s\":5.0,") != NULL, "%s", buf);
	ck_assert_msg(strstr(buf, "\"message\":{\"count\":1,\"p50\":1.500,") != NULL, "%s", buf);
	ck_assert_msg(strstr(buf, "\"errors\":{\"550\":2,\"timeout\":1}") != NULL, "%s", buf);
	ck_assert_msg(strstr(buf, "\"550\":\"rcpt: 550 5.1.1 \\\"unknown\\\"\"") != NULL, "%s", buf);
	ck_assert_msg(strcmp(buf + strlen(buf) - 3, "}}\n") == 0, "%s", buf);
	free(buf);
	free(s);
}
END_TEST

static Suite *
load_suite(void)
{
	Suite *s = suite_create("smtp_load");
	TCase *tc = tcase_create("client");

	tcase_add_test(tc, test_lockstep_one_message_per_session);
	tcase_add_test(tc, test_lockstep_several_messages_until_claims_run_out);
	tcase_add_test(tc, test_pipelining_batches_and_sends_the_dot_with_the_next_message);
	tcase_add_test(tc, test_pipelining_only_when_offered);
	tcase_add_test(tc, test_replies_split_across_reads);
	tcase_add_test(tc, test_lockstep_refused_recipient_rsets_and_goes_on);
	tcase_add_test(tc, test_lockstep_partial_recipients_deliver);
	tcase_add_test(tc, test_pipelined_refusals);
	tcase_add_test(tc, test_auth_plain);
	tcase_add_test(tc, test_auth_login);
	tcase_add_test(tc, test_auth_refused_fails_the_session_and_its_message);
	tcase_add_test(tc, test_starttls);
	tcase_add_test(tc, test_starttls_not_offered);
	tcase_add_test(tc, test_421_closes);
	tcase_add_test(tc, test_refused_greeting);
	tcase_add_test(tc, test_garbage_is_a_protocol_fault);
	tcase_add_test(tc, test_input_after_starttls_220_is_left_unread);
	suite_add_tcase(s, tc);
	tc = tcase_create("parts");
	tcase_add_test(tc, test_message_has_the_exact_size);
	tcase_add_test(tc, test_message_smaller_than_its_header_is_refused);
	tcase_add_test(tc, test_opts_defaults_and_servers);
	tcase_add_test(tc, test_opts_errors_name_the_option);
	tcase_add_test(tc, test_opts_password_from_environment);
	tcase_add_test(tc, test_hist_percentiles_within_one_percent);
	tcase_add_test(tc, test_outq);
	tcase_add_test(tc, test_json_report);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(load_suite());
	int failed;

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

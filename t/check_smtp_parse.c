/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of the I/O-free protocol parsers: SMTP commands and lines
 * (smtp_parse), the DATA stream in both directions (smtp_data) and
 * downstream replies (smtp_reply).
 */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "smtp_data.h"
#include "smtp_parse.h"
#include "smtp_reply.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* A small deterministic PRNG (xorshift64), so failures are reproducible. */
static uint64_t
rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* ---------------------------------------------------------------- commands */

static int
parse_n(const char *line, size_t len, struct smtp_cmd *cmd, struct smtp_error *err)
{
	memset(err, 0, sizeof(*err));
	return smtp_parse_command(line, len, cmd, err);
}

static int
parse(const char *line, struct smtp_cmd *cmd, struct smtp_error *err)
{
	return parse_n(line, strlen(line), cmd, err);
}

#define ck_parse_ok(line, cmd) do { \
	struct smtp_error e_; \
	int rc_ = parse((line), (cmd), &e_); \
	ck_assert_msg(rc_ == 0, "\"%s\" refused: %d %s %s", (line), \
	    e_.code, e_.enhanced, e_.text); \
} while (0)

struct bad_command {
	const char *line;
	size_t len;                      /* 0: strlen(line) */
	int code;
	const char *enhanced;
};

static const struct bad_command bad_commands[] = {
	/* verbs */
	{ "", 0, 500, "5.5.2" },
	{ "FOO bar", 0, 500, "5.5.2" },
	{ "MAILFROM:<a@b.example>", 0, 500, "5.5.2" },
	{ "HELOexample.com", 0, 500, "5.5.2" },
	{ "NOOP\tx", 0, 500, "5.5.2" },
	/* CR, LF or NUL anywhere: the whole line is refused */
	{ "MAIL FROM:<a@b.example>\rRCPT TO:<x@y.example>", 0, 500, "5.5.2" },
	{ "RCPT TO:<a\nb@c.example>", 0, 500, "5.5.2" },
	{ "RCPT TO:<a\0b@c.example>", 23, 500, "5.5.2" },
	{ "EHLO a\0.example", 16, 500, "5.5.2" },
	{ "AUTH PLAIN AGEAYg==\r", 0, 500, "5.5.2" },
	{ "NOOP \r", 0, 500, "5.5.2" },
	{ "\0", 1, 500, "5.5.2" },
	/* HELO / EHLO */
	{ "HELO", 0, 501, "5.5.4" },
	{ "EHLO   ", 0, 501, "5.5.4" },
	{ "EHLO a..example", 0, 501, "5.5.4" },
	{ "EHLO .example", 0, 501, "5.5.4" },
	{ "EHLO example.", 0, 501, "5.5.4" },
	{ "EHLO two words", 0, 501, "5.5.4" },
	{ "EHLO exa\x01mple", 0, 501, "5.5.4" },
	{ "EHLO exa(mple", 0, 501, "5.5.4" },
	{ "EHLO [300.1.1.1]", 0, 501, "5.5.4" },
	{ "EHLO [1.2.3]", 0, 501, "5.5.4" },
	{ "EHLO [IPv6:zz::1]", 0, 501, "5.5.4" },
	{ "EHLO [IPv6:]", 0, 501, "5.5.4" },
	{ "EHLO [127.0.0.1", 0, 501, "5.5.4" },
	{ "EHLO []", 0, 501, "5.5.4" },
	/* MAIL syntax */
	{ "MAIL", 0, 501, "5.5.4" },
	{ "MAIL FROM:", 0, 501, "5.5.4" },
	{ "MAIL FROM:a@b.example", 0, 501, "5.5.4" },
	{ "MAIL TO:<a@b.example>", 0, 501, "5.5.4" },
	{ "MAIL FROM:  <a@b.example>", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example>x", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example>\tSIZE=1", 0, 501, "5.5.4" },
	/* MAIL parameters */
	{ "MAIL FROM:<a@b.example> SIZE", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> SIZE=", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> SIZE=12k", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> SIZE=-1", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> SIZE=1 SIZE=2", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> BODY", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> BODY=", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> BODY=BINARYMIME", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> BODY=8BIT", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> BODY=7BIT BODY=7BIT", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> AUTH", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> AUTH=", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> AUTH=a+4", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> AUTH=a+zz", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> AUTH=a=b", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> AUTH=\x7f", 0, 501, "5.5.4" },
	{ "MAIL FROM:<a@b.example> RET=FULL", 0, 555, "5.5.4" },
	{ "MAIL FROM:<a@b.example> SMTPUTF8", 0, 555, "5.5.4" },
	{ "MAIL FROM:<a@b.example> SIZE=10 ENVID=x", 0, 555, "5.5.4" },
	/* non-ASCII addresses need SMTPUTF8, which is not offered (RFC 6531 3.5) */
	{ "MAIL FROM:<jos\xc3\xa9@example.com>", 0, 553, "5.6.7" },
	{ "MAIL FROM:<a@ex\xc3\xa4mple.com>", 0, 553, "5.6.7" },
	{ "MAIL FROM:<\"\xc3\xa9\"@example.com>", 0, 553, "5.6.7" },
	{ "RCPT TO:<jos\xc3\xa9@example.com>", 0, 553, "5.6.7" },
	{ "RCPT TO:<a@b\xff.example>", 0, 553, "5.6.7" },
	{ "RCPT TO:<@r.example:\x80@b.example>", 0, 553, "5.6.7" },
	/* bad sender addresses */
	{ "MAIL FROM:<a b@c.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a@b..example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a@.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a@example.>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<@b.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a@>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<postmaster>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a@b@c.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a,b@c.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a<b@c.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a@b\x01.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a\x7f@b.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a\t@b.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<\"a\tb\"@c.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<\"unterminated@c.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<\"a\"b@c.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a@[1.2.3]>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<a@b_c!.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<@a.example,b.example:c@d.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<@a..example:c@d.example>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<@a.example:>", 0, 501, "5.1.7" },
	{ "MAIL FROM:<@a.example>", 0, 501, "5.1.7" },
	/* RCPT */
	{ "RCPT", 0, 501, "5.5.4" },
	{ "RCPT TO:b@c.example", 0, 501, "5.5.4" },
	{ "RCPT FROM:<b@c.example>", 0, 501, "5.5.4" },
	{ "RCPT TO:<b@c.example>x", 0, 501, "5.5.4" },
	{ "RCPT TO:<>", 0, 501, "5.1.3" },
	{ "RCPT TO:<b c@d.example>", 0, 501, "5.1.3" },
	{ "RCPT TO:<b@>", 0, 501, "5.1.3" },
	{ "RCPT TO:<postmaster@>", 0, 501, "5.1.3" },
	{ "RCPT TO:<b@c\x1b.example>", 0, 501, "5.1.3" },
	{ "RCPT TO:<b@c.example> NOTIFY=NEVER", 0, 555, "5.5.4" },
	{ "RCPT TO:<b@c.example> SIZE=1", 0, 555, "5.5.4" },
	/* argument-less verbs */
	{ "DATA x", 0, 501, "5.5.4" },
	{ "RSET x", 0, 501, "5.5.4" },
	{ "QUIT now", 0, 501, "5.5.4" },
	{ "STARTTLS x", 0, 501, "5.5.4" },
	/* verbs that need an argument */
	{ "VRFY", 0, 501, "5.5.4" },
	{ "VRFY   ", 0, 501, "5.5.4" },
	{ "EXPN", 0, 501, "5.5.4" },
	{ "VRFY a\x01", 0, 501, "5.5.4" },
	{ "NOOP \x7f", 0, 501, "5.5.4" },
	/* AUTH */
	{ "AUTH", 0, 501, "5.5.4" },
	{ "AUTH ", 0, 501, "5.5.4" },
	{ "AUTH PL@IN", 0, 501, "5.5.4" },
	{ "AUTH ABCDEFGHIJKLMNOPQRSTU", 0, 501, "5.5.4" },
	{ "AUTH PLAIN AGEAYg== extra", 0, 501, "5.5.4" },
	{ "AUTH PLAIN AGEA\x01Yg==", 0, 501, "5.5.4" },
};

START_TEST(command_errors)
{
	const struct bad_command *b = &bad_commands[_i];
	size_t len = b->len ? b->len : strlen(b->line);
	struct smtp_cmd cmd;
	struct smtp_error err;

	ck_assert_msg(parse_n(b->line, len, &cmd, &err) == -1,
	    "\"%s\" accepted", b->line);
	ck_assert_msg(err.code == b->code && strcmp(err.enhanced, b->enhanced) == 0,
	    "\"%s\": got %d %s, want %d %s", b->line, err.code, err.enhanced,
	    b->code, b->enhanced);
	ck_assert_ptr_nonnull(err.text);
	ck_assert_uint_gt(strlen(err.text), 0);
	/* Nothing half-parsed is left behind for a careless caller. */
	ck_assert_str_eq(cmd.path, "");
	ck_assert_str_eq(cmd.domain, "");
	ck_assert_ptr_null(cmd.arg);
	ck_assert_ptr_null(cmd.initial);
}
END_TEST

START_TEST(verbs_case_insensitive)
{
	static const struct {
		const char *line;
		enum smtp_verb verb;
	} cases[] = {
		{ "DATA", SMTP_VERB_DATA }, { "data", SMTP_VERB_DATA },
		{ "DaTa  ", SMTP_VERB_DATA }, { "RSET", SMTP_VERB_RSET },
		{ "noop", SMTP_VERB_NOOP }, { "QUIT", SMTP_VERB_QUIT },
		{ "help", SMTP_VERB_HELP }, { "StartTLS", SMTP_VERB_STARTTLS },
		{ "helo x.example", SMTP_VERB_HELO }, { "EhLo x.example", SMTP_VERB_EHLO },
		{ "mail from:<>", SMTP_VERB_MAIL }, { "rcpt to:<a@b.example>", SMTP_VERB_RCPT },
		{ "vrfy a", SMTP_VERB_VRFY }, { "expn a", SMTP_VERB_EXPN },
		{ "auth login", SMTP_VERB_AUTH }, { "bdat 10 LAST", SMTP_VERB_BDAT },
	};
	struct smtp_cmd cmd;

	for (size_t i = 0; i < N_ELEMS(cases); i++) {
		ck_parse_ok(cases[i].line, &cmd);
		ck_assert_int_eq(cmd.verb, cases[i].verb);
	}
}
END_TEST

START_TEST(helo_ehlo)
{
	static const struct {
		const char *line, *domain;
	} cases[] = {
		{ "HELO example.com", "example.com" },
		{ "EHLO localhost", "localhost" },
		{ "EHLO my_host-1.lan  ", "my_host-1.lan" },
		{ "EHLO [127.0.0.1]", "[127.0.0.1]" },
		{ "EHLO [IPv6:2001:db8::1]", "[IPv6:2001:db8::1]" },
		{ "EHLO [ipv6:::1]", "[ipv6:::1]" },
		{ "EHLO [x-tag:some-content]", "[x-tag:some-content]" },
		{ "EHLO b\xc3\xbc" "cher.example", "b\xc3\xbc" "cher.example" },
	};
	struct smtp_cmd cmd;

	for (size_t i = 0; i < N_ELEMS(cases); i++) {
		ck_parse_ok(cases[i].line, &cmd);
		ck_assert_str_eq(cmd.domain, cases[i].domain);
	}
}
END_TEST

START_TEST(mail_from)
{
	static const struct {
		const char *line, *path;
	} cases[] = {
		{ "MAIL FROM:<a@b.example>", "a@b.example" },
		{ "mail from:<A.B+tag@Sub.B.Example>", "A.B+tag@Sub.B.Example" },
		{ "MAIL FROM: <a@b.example>", "a@b.example" },
		{ "MAIL FROM:<>", "" },
		{ "MAIL FROM: <>", "" },
		{ "MAIL FROM:<\"john doe\"@example.com>", "\"john doe\"@example.com" },
		{ "MAIL FROM:<\"a>b\\\"c\"@example.com>", "\"a>b\\\"c\"@example.com" },
		{ "MAIL FROM:<@r1.example,@r2.example:user@d.example>", "user@d.example" },
		{ "MAIL FROM:<@r1.example:user@d.example>", "user@d.example" },
		{ "MAIL FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]" },
		{ "MAIL FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]" },
		{ "MAIL FROM:<first..last.@b.example>", "first..last.@b.example" },
		{ "MAIL FROM:<!#$%&'*+-/=?^_`{|}~@b.example>", "!#$%&'*+-/=?^_`{|}~@b.example" },
	};
	struct smtp_cmd cmd;

	for (size_t i = 0; i < N_ELEMS(cases); i++) {
		ck_parse_ok(cases[i].line, &cmd);
		ck_assert_int_eq(cmd.verb, SMTP_VERB_MAIL);
		ck_assert_str_eq(cmd.path, cases[i].path);
		ck_assert(!cmd.has_size && !cmd.has_auth);
		ck_assert_int_eq(cmd.body, SMTP_BODY_UNSET);
	}
}
END_TEST

/* 256 octets between the brackets is the limit (RFC 5321 4.5.3.1.3). */
START_TEST(mail_path_length_limit)
{
	char local[300], line[400];
	struct smtp_cmd cmd;
	struct smtp_error err;

	memset(local, 'a', sizeof(local));
	snprintf(line, sizeof(line), "MAIL FROM:<%.*s@example.com>", 256 - 12, local);
	ck_parse_ok(line, &cmd);
	ck_assert_uint_eq(strlen(cmd.path), SMTP_PATH_MAX);
	snprintf(line, sizeof(line), "RCPT TO:<@r.example:%.*s@example.com>",
	    256 - 12 - 11, local);
	ck_parse_ok(line, &cmd);

	snprintf(line, sizeof(line), "MAIL FROM:<%.*s@example.com>", 257 - 12, local);
	ck_assert_int_eq(parse(line, &cmd, &err), -1);
	ck_assert_int_eq(err.code, 501);
	ck_assert_str_eq(err.enhanced, "5.1.7");
	snprintf(line, sizeof(line), "RCPT TO:<@r.example:%.*s@example.com>",
	    257 - 12 - 11, local);
	ck_assert_int_eq(parse(line, &cmd, &err), -1);
	ck_assert_int_eq(err.code, 501);
	ck_assert_str_eq(err.enhanced, "5.1.3");
}
END_TEST

START_TEST(command_line_max)
{
	struct smtp_cmd cmd;

	ck_assert_uint_eq(smtp_cmd_line_max(NULL), 512);
	ck_parse_ok("NOOP", &cmd);
	ck_assert_uint_eq(smtp_cmd_line_max(&cmd), 512);
	ck_parse_ok("MAIL FROM:<a@b.example>", &cmd);
	ck_assert_uint_eq(smtp_cmd_line_max(&cmd), 512);
	/* RFC 4954 5: AUTH= makes MAIL 500 octets longer. */
	ck_parse_ok("MAIL FROM:<a@b.example> AUTH=<>", &cmd);
	ck_assert_uint_eq(smtp_cmd_line_max(&cmd), 1012);
	ck_parse_ok("AUTH PLAIN", &cmd);
	ck_assert_uint_eq(smtp_cmd_line_max(&cmd), SMTP_AUTH_LINE_MAX);
}
END_TEST

START_TEST(mail_params)
{
	struct smtp_cmd cmd;

	ck_parse_ok("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME AUTH=<>", &cmd);
	ck_assert_str_eq(cmd.path, "a@b.example");
	ck_assert(cmd.has_size);
	ck_assert_uint_eq(cmd.size, 1000);
	ck_assert_int_eq(cmd.body, SMTP_BODY_8BITMIME);
	ck_assert(cmd.has_auth);

	ck_parse_ok("mail from:<> size=0  body=7bit   auth=user+2Bx+3Dy@b.example ", &cmd);
	ck_assert(cmd.has_size);
	ck_assert_uint_eq(cmd.size, 0);
	ck_assert_int_eq(cmd.body, SMTP_BODY_7BIT);
	ck_assert(cmd.has_auth);

	ck_parse_ok("MAIL FROM:<a@b.example> SIZE=18446744073709551615", &cmd);
	ck_assert_uint_eq(cmd.size, UINT64_MAX);
	ck_assert(!cmd.size_overflow);

	/* Beyond 2^64-1 is "too big" (552), not a syntax error. */
	ck_parse_ok("MAIL FROM:<a@b.example> SIZE=18446744073709551616", &cmd);
	ck_assert(cmd.has_size && cmd.size_overflow);
	ck_assert_uint_eq(cmd.size, UINT64_MAX);
	ck_parse_ok("MAIL FROM:<a@b.example> SIZE=000000000000000000000000000042", &cmd);
	ck_assert(cmd.has_size && !cmd.size_overflow);
	ck_assert_uint_eq(cmd.size, 42);
	ck_parse_ok("MAIL FROM:<a@b.example> SIZE=999999999999999999999999999999", &cmd);
	ck_assert(cmd.size_overflow);

	ck_parse_ok("MAIL FROM:<a@b.example> BODY=8bitmime", &cmd);
	ck_assert_int_eq(cmd.body, SMTP_BODY_8BITMIME);
	ck_assert(!cmd.has_size);
}
END_TEST

START_TEST(rcpt_to)
{
	static const struct {
		const char *line, *path;
	} cases[] = {
		{ "RCPT TO:<b@c.example>", "b@c.example" },
		{ "rcpt to: <b@c.example>", "b@c.example" },
		{ "RCPT TO:<postmaster>", "postmaster" },
		{ "RCPT TO:<PostMaster>", "PostMaster" },
		{ "RCPT TO:<postmaster@c.example>", "postmaster@c.example" },
		{ "RCPT TO:<@r.example:b@c.example>", "b@c.example" },
		{ "RCPT TO:<\"x y\"@c.example>  ", "\"x y\"@c.example" },
	};
	struct smtp_cmd cmd;

	for (size_t i = 0; i < N_ELEMS(cases); i++) {
		ck_parse_ok(cases[i].line, &cmd);
		ck_assert_int_eq(cmd.verb, SMTP_VERB_RCPT);
		ck_assert_str_eq(cmd.path, cases[i].path);
	}
}
END_TEST

START_TEST(auth_command)
{
	struct smtp_cmd cmd;

	ck_parse_ok("AUTH PLAIN", &cmd);
	ck_assert_str_eq(cmd.mech, "PLAIN");
	ck_assert_ptr_null(cmd.initial);

	ck_parse_ok("auth plain AGFsaWNlAHNlY3JldA==", &cmd);
	ck_assert_str_eq(cmd.mech, "PLAIN");
	ck_assert_ptr_nonnull(cmd.initial);
	ck_assert_uint_eq(cmd.initial_len, 20);
	ck_assert(memcmp(cmd.initial, "AGFsaWNlAHNlY3JldA==", 20) == 0);

	/* RFC 4954 4: "=" is an empty initial response, not a missing one. */
	ck_parse_ok("AUTH LOGIN =", &cmd);
	ck_assert_str_eq(cmd.mech, "LOGIN");
	ck_assert_ptr_nonnull(cmd.initial);
	ck_assert_uint_eq(cmd.initial_len, 0);

	ck_parse_ok("AUTH x-oauth_2", &cmd);
	ck_assert_str_eq(cmd.mech, "X-OAUTH_2");

	ck_parse_ok("AUTH ABCDEFGHIJKLMNOPQRST", &cmd);     /* 20: the limit */
	ck_assert_str_eq(cmd.mech, "ABCDEFGHIJKLMNOPQRST");
}
END_TEST

START_TEST(raw_arguments)
{
	struct smtp_cmd cmd;

	ck_parse_ok("NOOP", &cmd);
	ck_assert_ptr_null(cmd.arg);
	ck_parse_ok("NOOP hello there", &cmd);
	ck_assert_uint_eq(cmd.arg_len, 11);
	ck_assert(memcmp(cmd.arg, "hello there", 11) == 0);
	ck_parse_ok("HELP   MAIL  ", &cmd);
	ck_assert_uint_eq(cmd.arg_len, 4);
	ck_assert(memcmp(cmd.arg, "MAIL", 4) == 0);
	ck_parse_ok("VRFY <a@b.example>", &cmd);
	ck_assert_uint_eq(cmd.arg_len, 13);
	ck_parse_ok("DATA", &cmd);
	ck_assert_ptr_null(cmd.arg);
}
END_TEST

static bool
field_clean(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x20 || c == 0x7f)
			return false;
	}
	return true;
}

/*
 * Property: whatever the line, no parsed field ever holds a control
 * character (the fields are re-serialised into commands downstream).
 */
START_TEST(no_control_char_survives)
{
	static const char *const stems[] = {
		"MAIL FROM:<", "RCPT TO:<", "EHLO ", "AUTH ", "AUTH PLAIN ",
		"NOOP ", "VRFY ", "MAIL FROM:<a@b.example> AUTH=",
	};
	static const char alphabet[] = "ab.@<>\"\\:,[] =+\r\n\t\x01\x7f\x80\xff";
	uint64_t seed = 0x9e3779b97f4a7c15ULL;
	struct smtp_cmd cmd;
	struct smtp_error err;
	char line[64];
	int accepted = 0;

	for (int iter = 0; iter < 200000; iter++) {
		const char *stem = stems[rnd(&seed) % N_ELEMS(stems)];
		size_t n = strlen(stem), extra = rnd(&seed) % 20;

		memcpy(line, stem, n);
		for (size_t k = 0; k < extra; k++) {
			uint64_t x = rnd(&seed) % (sizeof(alphabet) + 1);
			line[n++] = x == sizeof(alphabet) - 1 ? '\0' :
			    x == sizeof(alphabet) ? 'z' : alphabet[x];
		}
		if (parse_n(line, n, &cmd, &err) != 0) {
			ck_assert(err.code >= 500 && err.code <= 555);
			continue;
		}
		accepted++;
		ck_assert(field_clean(cmd.path, strlen(cmd.path)));
		ck_assert(field_clean(cmd.domain, strlen(cmd.domain)));
		ck_assert(field_clean(cmd.mech, strlen(cmd.mech)));
		ck_assert_uint_le(strlen(cmd.path), SMTP_PATH_MAX);
		if (cmd.arg != NULL)
			ck_assert(field_clean(cmd.arg, cmd.arg_len));
		if (cmd.initial != NULL)
			ck_assert(field_clean(cmd.initial, cmd.initial_len));
		/* CR, LF and NUL are refused anywhere in the line. */
		ck_assert_ptr_null(memchr(line, '\r', n));
		ck_assert_ptr_null(memchr(line, '\n', n));
		ck_assert_ptr_null(memchr(line, '\0', n));
	}
	ck_assert_int_gt(accepted, 1000);       /* the property was exercised */
}
END_TEST

/* ------------------------------------------------------------------- lines */

START_TEST(next_line)
{
	size_t consumed = 99;
	char big[600];

	ck_assert_int_eq(smtp_next_line("EHLO x\r\nMAIL", 12, 512, &consumed), 6);
	ck_assert_uint_eq(consumed, 8);
	ck_assert_int_eq(smtp_next_line("EHLO x\nMAIL", 11, 512, &consumed), 6);
	ck_assert_uint_eq(consumed, 7);
	ck_assert_int_eq(smtp_next_line("\r\n", 2, 512, &consumed), 0);
	ck_assert_uint_eq(consumed, 2);
	ck_assert_int_eq(smtp_next_line("\n", 1, 512, &consumed), 0);
	ck_assert_uint_eq(consumed, 1);
	/* A CR elsewhere stays in the line: smtp_parse_command refuses it. */
	ck_assert_int_eq(smtp_next_line("a\rb\r\n", 5, 512, &consumed), 3);
	ck_assert_uint_eq(consumed, 5);
	ck_assert_int_eq(smtp_next_line("EHLO x\r", 7, 512, &consumed), -1);
	ck_assert_uint_eq(consumed, 0);
	ck_assert_int_eq(smtp_next_line("", 0, 512, &consumed), -1);

	/* max counts the line end: 510 octets + CRLF fit in 512, 511 do not. */
	memset(big, 'x', sizeof(big));
	memcpy(big + 510, "\r\n", 2);
	ck_assert_int_eq(smtp_next_line(big, 512, 512, &consumed), 510);
	ck_assert_uint_eq(consumed, 512);
	memset(big, 'x', sizeof(big));
	memcpy(big + 511, "\r\n", 2);
	ck_assert_int_eq(smtp_next_line(big, 513, 512, &consumed), -2);
	memset(big, 'x', sizeof(big));
	ck_assert_int_eq(smtp_next_line(big, 511, 512, &consumed), -1);
	ck_assert_int_eq(smtp_next_line(big, 512, 512, &consumed), -2);
	ck_assert_int_eq(smtp_next_line(big, sizeof(big), 512, &consumed), -2);
	ck_assert_uint_eq(consumed, 0);
}
END_TEST

/* -------------------------------------------------------------------- DATA */

struct data_result {
	bool done;
	size_t used;
	char *out;
	size_t out_len;
	bool bare_lf, bare_cr, too_long, too_big;
	uint64_t size;
};

static void
result_free(struct data_result *res)
{
	free(res->out);
}

/*
 * Feeds in[0..len) to a reader in chunks: chunk 0 = all at once, SIZE_MAX =
 * random sizes from seed, else that size. Stops at the end of data, as the
 * session does, and records where.
 */
static void
read_chunked(const char *in, size_t len, size_t chunk, uint64_t seed,
    uint64_t max_size, struct data_result *res)
{
	struct smtp_data_reader r;
	struct evbuffer *out = evbuffer_new();
	size_t pos = 0;

	ck_assert_ptr_nonnull(out);
	memset(res, 0, sizeof(*res));
	smtp_data_reader_init(&r, max_size);
	while (pos < len && !res->done) {
		size_t n = chunk == 0 ? len - pos :
		    chunk == SIZE_MAX ? 1 + rnd(&seed) % 17 : chunk;
		size_t used = 0;

		if (n > len - pos)
			n = len - pos;
		res->done = smtp_data_read(&r, in + pos, n, &used, out);
		ck_assert_uint_le(used, n);
		/* Short of the end, every byte offered is consumed. */
		if (!res->done)
			ck_assert_uint_eq(used, n);
		pos += used;
	}
	res->used = pos;
	res->out_len = evbuffer_get_length(out);
	res->out = malloc(res->out_len + 1);
	ck_assert_ptr_nonnull(res->out);
	evbuffer_remove(out, res->out, res->out_len);
	res->out[res->out_len] = '\0';
	res->bare_lf = r.bare_lf;
	res->bare_cr = r.bare_cr;
	res->too_long = r.too_long;
	res->too_big = r.too_big;
	res->size = r.size;
	evbuffer_free(out);
}

static void
ck_same_result(const struct data_result *a, const struct data_result *b)
{
	ck_assert_int_eq(a->done, b->done);
	ck_assert_uint_eq(a->used, b->used);
	ck_assert_uint_eq(a->out_len, b->out_len);
	ck_assert(memcmp(a->out, b->out, a->out_len) == 0);
	ck_assert_int_eq(a->bare_lf, b->bare_lf);
	ck_assert_int_eq(a->bare_cr, b->bare_cr);
	ck_assert_int_eq(a->too_long, b->too_long);
	ck_assert_int_eq(a->too_big, b->too_big);
	ck_assert_uint_eq(a->size, b->size);
}

/* Reads one-shot, byte by byte and in random chunks; all must agree. */
static void
read_every_way(const char *in, size_t len, uint64_t max_size,
    struct data_result *res)
{
	struct data_result other;

	read_chunked(in, len, 0, 0, max_size, res);
	read_chunked(in, len, 1, 0, max_size, &other);
	ck_same_result(res, &other);
	result_free(&other);
	for (uint64_t seed = 1; seed <= 20; seed++) {
		read_chunked(in, len, SIZE_MAX, seed * 0x2545f4914f6cdd1dULL,
		    max_size, &other);
		ck_same_result(res, &other);
		result_free(&other);
	}
}

#define S(lit) (lit), (sizeof(lit) - 1)

START_TEST(data_simple)
{
	struct data_result res;

	read_every_way(S("Subject: x\r\n\r\nbody\r\n.\r\n"), 0, &res);
	ck_assert(res.done);
	ck_assert_uint_eq(res.used, 23);
	ck_assert_str_eq(res.out, "Subject: x\r\n\r\nbody\r\n");
	ck_assert_uint_eq(res.size, 20);
	ck_assert(!res.bare_lf && !res.bare_cr && !res.too_long && !res.too_big);
	result_free(&res);
}
END_TEST

START_TEST(data_pipelined_tail_left_alone)
{
	struct data_result res;

	read_every_way(S("a\r\n.\r\nQUIT\r\n"), 0, &res);
	ck_assert(res.done);
	ck_assert_uint_eq(res.used, 6);
	ck_assert_str_eq(res.out, "a\r\n");
	result_free(&res);
}
END_TEST

START_TEST(data_empty_message)
{
	struct data_result res;

	/* The CRLF of "DATA" precedes the stream, so ".\r\n" ends it at once. */
	read_every_way(S(".\r\nRSET\r\n"), 0, &res);
	ck_assert(res.done);
	ck_assert_uint_eq(res.used, 3);
	ck_assert_uint_eq(res.out_len, 0);
	ck_assert_uint_eq(res.size, 0);
	result_free(&res);
}
END_TEST

START_TEST(data_incomplete)
{
	struct data_result res;

	read_every_way(S("a\r\n.\r"), 0, &res);
	ck_assert(!res.done);
	ck_assert_uint_eq(res.used, 5);
	ck_assert_str_eq(res.out, "a\r\n");     /* ".\r" is held back */
	result_free(&res);
}
END_TEST

START_TEST(data_dot_unstuffing)
{
	struct data_result res;

	read_every_way(S("..a\r\n..\r\nb.c\r\n...\r\n.x\r\n.\r\n"), 0, &res);
	ck_assert(res.done);
	ck_assert_str_eq(res.out, ".a\r\n.\r\nb.c\r\n..\r\nx\r\n");
	ck_assert(!res.bare_lf && !res.bare_cr);
	result_free(&res);
}
END_TEST

/*
 * SMTP smuggling: none of these sequences may end the message; only the
 * real CRLF.CRLF at the end does, and the message is flagged.
 */
static const struct {
	const char *in;
	bool bare_lf, bare_cr;
} smuggling[] = {
	{ "a\n.\nMAIL FROM:<x@y.example>\r\n.\r\n", true, false },
	{ "a\r.\rMAIL FROM:<x@y.example>\r\n.\r\n", false, true },
	{ "a\n.\r\nMAIL FROM:<x@y.example>\r\n.\r\n", true, false },
	{ "a\r\n.\nMAIL FROM:<x@y.example>\r\n.\r\n", true, false },
	{ "a\r\n.\rMAIL FROM:<x@y.example>\r\n.\r\n", false, true },
	{ "a\r\n.\r\r\nMAIL FROM:<x@y.example>\r\n.\r\n", false, true },
	{ "a\r.\r\nMAIL FROM:<x@y.example>\r\n.\r\n", false, true },
	{ "\n.\nMAIL FROM:<x@y.example>\r\n.\r\n", true, false },
	{ "\n.\r\nMAIL FROM:<x@y.example>\r\n.\r\n", true, false },
	{ ".\n.\r\r\n.\r\n", true, true },
	{ "a\r\r\n.\r\n", false, true },
	{ "a\n\r\n.\r\n", true, false },
};

START_TEST(data_smuggling)
{
	const char *in = smuggling[_i].in;
	size_t len = strlen(in);
	struct data_result res;

	read_every_way(in, len, 0, &res);
	ck_assert_msg(res.done, "case %d: no end of data", _i);
	ck_assert_msg(res.used == len, "case %d: ended at %zu of %zu", _i,
	    res.used, len);
	ck_assert_int_eq(res.bare_lf, smuggling[_i].bare_lf);
	ck_assert_int_eq(res.bare_cr, smuggling[_i].bare_cr);
	result_free(&res);
}
END_TEST

/* A reader fed piece by piece at hand-picked boundaries. */
static bool
feed_pieces(struct smtp_data_reader *r, const char *const *pieces, size_t n,
    struct evbuffer *out, size_t *last_used)
{
	bool done = false;

	for (size_t i = 0; i < n; i++) {
		done = smtp_data_read(r, pieces[i], strlen(pieces[i]), last_used, out);
		if (done)
			ck_assert_uint_eq(i, n - 1);
	}
	return done;
}

static void
ck_buffer_eq(struct evbuffer *buf, const char *want)
{
	size_t n = evbuffer_get_length(buf);

	ck_assert_uint_eq(n, strlen(want));
	ck_assert(n == 0 || memcmp(evbuffer_pullup(buf, -1), want, n) == 0);
	evbuffer_drain(buf, n);
}

START_TEST(data_buffer_boundaries)
{
	static const char *const dot_alone[] = { "a\r\n", ".", "\r", "\n" };
	static const char *const dot_split[] = { "a\r\n.", "\r\n" };
	static const char *const stuffed_split[] = { "a\r\n.", ".b\r\n.\r\n" };
	static const char *const crlf_split[] = { "a\r", "\n.\r\n" };
	static const char *const cr_then_text[] = { "a\r", "b\r\n.\r\n" };
	static const char *const cr_then_dot[] = { "a\r\n.\r", ".\r\n.\r\n" };
	static const char *const start_dot[] = { ".", "\r\n" };
	struct evbuffer *out = evbuffer_new();
	struct smtp_data_reader r;
	size_t used;

	smtp_data_reader_init(&r, 0);
	ck_assert(feed_pieces(&r, dot_alone, N_ELEMS(dot_alone), out, &used));
	ck_assert_uint_eq(used, 1);
	ck_buffer_eq(out, "a\r\n");

	smtp_data_reader_init(&r, 0);
	ck_assert(feed_pieces(&r, dot_split, N_ELEMS(dot_split), out, &used));
	ck_assert_uint_eq(used, 2);
	ck_buffer_eq(out, "a\r\n");

	smtp_data_reader_init(&r, 0);
	ck_assert(feed_pieces(&r, stuffed_split, N_ELEMS(stuffed_split), out, &used));
	ck_buffer_eq(out, "a\r\n.b\r\n");

	smtp_data_reader_init(&r, 0);
	ck_assert(feed_pieces(&r, crlf_split, N_ELEMS(crlf_split), out, &used));
	ck_assert(!r.bare_cr);
	ck_buffer_eq(out, "a\r\n");

	smtp_data_reader_init(&r, 0);
	ck_assert(feed_pieces(&r, cr_then_text, N_ELEMS(cr_then_text), out, &used));
	ck_assert(r.bare_cr);
	ck_buffer_eq(out, "a\rb\r\n");

	smtp_data_reader_init(&r, 0);
	ck_assert(feed_pieces(&r, cr_then_dot, N_ELEMS(cr_then_dot), out, &used));
	ck_assert(r.bare_cr);
	ck_buffer_eq(out, "a\r\n\r\r\n");

	smtp_data_reader_init(&r, 0);
	ck_assert(feed_pieces(&r, start_dot, N_ELEMS(start_dot), out, &used));
	ck_buffer_eq(out, "");

	/* Once done, the reader consumes nothing more. */
	ck_assert(smtp_data_read(&r, "x\r\n", 3, &used, out));
	ck_assert_uint_eq(used, 0);
	ck_buffer_eq(out, "");
	evbuffer_free(out);
}
END_TEST

static char *
line_of(size_t n, const char *prefix, const char *suffix)
{
	size_t p = strlen(prefix), s = strlen(suffix);
	char *buf = malloc(p + n + s + 1);

	ck_assert_ptr_nonnull(buf);
	memcpy(buf, prefix, p);
	memset(buf + p, 'x', n);
	memcpy(buf + p + n, suffix, s + 1);
	return buf;
}

START_TEST(data_line_length)
{
	struct data_result res;
	char *msg;

	msg = line_of(998, "", "\r\n.\r\n");
	read_every_way(msg, strlen(msg), 0, &res);
	ck_assert(res.done && !res.too_long);
	ck_assert_uint_eq(res.out_len, 1000);
	result_free(&res);
	free(msg);

	msg = line_of(999, "", "\r\n.\r\n");
	read_every_way(msg, strlen(msg), 0, &res);
	ck_assert(res.done && res.too_long);
	ck_assert_uint_eq(res.out_len, 1001);   /* kept: the session decides */
	result_free(&res);
	free(msg);

	/* RFC 5321 4.5.3.1.6: the dot doubled for transparency does not
	 * count, so a 998-octet line starting with "." is 999 on the wire. */
	msg = line_of(997, "ok\r\n..", "\r\n.\r\n");
	read_every_way(msg, strlen(msg), 0, &res);
	ck_assert(res.done && !res.too_long);
	ck_assert_uint_eq(res.out_len, 4 + 998 + 2);
	result_free(&res);
	free(msg);
	msg = line_of(998, "ok\r\n..", "\r\n.\r\n");
	read_every_way(msg, strlen(msg), 0, &res);
	ck_assert(res.done && res.too_long);
	result_free(&res);
	free(msg);
	/* The same after a bare line end (such a message is refused anyway). */
	msg = line_of(997, "ok\n..", "\r\n.\r\n");
	read_every_way(msg, strlen(msg), 0, &res);
	ck_assert(res.done && !res.too_long && res.bare_lf);
	result_free(&res);
	free(msg);

	/* Many short lines are fine however long the message. */
	msg = malloc(18 * 1000 + 3);
	ck_assert_ptr_nonnull(msg);
	for (int i = 0; i < 1000; i++)
		memcpy(msg + 18 * i, "0123456789abcdef\r\n", 18);
	memcpy(msg + 18 * 1000, ".\r\n", 3);
	read_every_way(msg, 18 * 1000 + 3, 0, &res);
	ck_assert(res.done && !res.too_long);
	ck_assert_uint_eq(res.out_len, 18 * 1000);
	result_free(&res);
	free(msg);
}
END_TEST

START_TEST(data_size_limit)
{
	struct data_result res;

	read_every_way(S("12345678\r\n.\r\n"), 10, &res);
	ck_assert(res.done && !res.too_big);
	ck_assert_str_eq(res.out, "12345678\r\n");
	result_free(&res);

	read_every_way(S("123456789\r\nmore text\r\n.\r\n"), 10, &res);
	ck_assert(res.done && res.too_big);
	ck_assert_uint_eq(res.out_len, 10);     /* storing stopped */
	ck_assert(memcmp(res.out, "123456789\r", 10) == 0);
	ck_assert_uint_eq(res.size, 22);        /* counting did not */
	ck_assert_uint_eq(res.used, 25);        /* and the end was still found */
	result_free(&res);
}
END_TEST

/* Random messages from a nasty alphabet: any chunking gives one result. */
START_TEST(data_chunking_equivalence)
{
	static const char alphabet[] = "..\r\r\n\nab";
	uint64_t seed = 0xdeadbeefcafef00dULL;
	char msg[128];
	int ended = 0;

	for (int iter = 0; iter < 3000; iter++) {
		size_t len = rnd(&seed) % (sizeof(msg) - 5);
		struct data_result res;

		for (size_t k = 0; k < len; k++)
			msg[k] = alphabet[rnd(&seed) % (sizeof(alphabet) - 1)];
		if (iter % 2 == 0) {
			memcpy(msg + len, "\r\n.\r\n", 5);
			len += 5;
		}
		read_every_way(msg, len, iter % 3 == 0 ? 40 : 0, &res);
		if (res.done) {
			ended++;
			/* It ended exactly after the first CRLF.CRLF (or a leading ".\r\n"). */
			ck_assert_uint_ge(res.used, 3);
			ck_assert(memcmp(msg + res.used - 3, ".\r\n", 3) == 0);
			ck_assert(res.used == 3 ||
			    memcmp(msg + res.used - 5, "\r\n", 2) == 0);
		}
		result_free(&res);
	}
	ck_assert_int_gt(ended, 1500);
}
END_TEST

static char *
write_chunked(const char *in, size_t len, uint64_t seed, size_t *out_len)
{
	struct smtp_data_writer w;
	struct evbuffer *out = evbuffer_new();
	size_t pos = 0;
	char *s;

	ck_assert_ptr_nonnull(out);
	smtp_data_writer_init(&w);
	while (pos < len) {
		size_t n = seed == 0 ? len - pos : 1 + rnd(&seed) % 9;

		if (n > len - pos)
			n = len - pos;
		smtp_data_write(&w, in + pos, n, out);
		pos += n;
	}
	smtp_data_writer_finish(&w, out);
	*out_len = evbuffer_get_length(out);
	s = malloc(*out_len + 1);
	ck_assert_ptr_nonnull(s);
	evbuffer_remove(out, s, *out_len);
	s[*out_len] = '\0';
	evbuffer_free(out);
	return s;
}

START_TEST(data_writer)
{
	static const struct {
		const char *in, *want;
	} cases[] = {
		{ "", ".\r\n" },
		{ "a\r\n", "a\r\n.\r\n" },
		{ "abc", "abc\r\n.\r\n" },
		{ "a\r", "a\r\r\n.\r\n" },
		{ ".\r\n", "..\r\n.\r\n" },
		{ "a\r\n.b\r\n..\r\n", "a\r\n..b\r\n...\r\n.\r\n" },
		{ "a\r\n.", "a\r\n..\r\n.\r\n" },
		{ "b.c\r\n", "b.c\r\n.\r\n" },
		/* bare line ends get a stuffed dot too: no "\n.\n" downstream */
		{ "a\n.\nb", "a\n..\nb\r\n.\r\n" },
		{ "a\r.\rb\r\n", "a\r..\rb\r\n.\r\n" },
	};

	for (size_t i = 0; i < N_ELEMS(cases); i++) {
		for (uint64_t seed = 0; seed < 5; seed++) {
			size_t n;
			char *got = write_chunked(cases[i].in, strlen(cases[i].in),
			    seed * 0x9e3779b97f4a7c15ULL, &n);

			ck_assert_str_eq(got, cases[i].want);
			free(got);
		}
	}
}
END_TEST

/* writer -> reader gives the original bytes back (plus CRLF if missing). */
START_TEST(data_round_trip)
{
	static const char alphabet[] = "...\r\r\n\n\n\nab \x80\xff";
	uint64_t seed = 0x0123456789abcdefULL;
	char body[200], want[204];

	for (int iter = 0; iter < 5000; iter++) {
		size_t len = rnd(&seed) % sizeof(body), want_len = len, wire_len;
		bool has_bare = false;
		struct data_result res;
		char *wire;

		for (size_t k = 0; k < len; k++)
			body[k] = alphabet[rnd(&seed) % (sizeof(alphabet) - 1)];
		if (iter % 4 == 0 && len >= 2)          /* often end properly */
			memcpy(body + len - 2, "\r\n", 2);
		memcpy(want, body, len);
		if (len > 0 && (len < 2 || memcmp(body + len - 2, "\r\n", 2) != 0)) {
			memcpy(want + len, "\r\n", 2);
			want_len += 2;
		}
		for (size_t k = 0; k < len; k++) {
			if (body[k] == '\r' && (k + 1 >= len || body[k + 1] != '\n'))
				has_bare = true;
			if (body[k] == '\n' && (k == 0 || body[k - 1] != '\r'))
				has_bare = true;
		}
		wire = write_chunked(body, len, iter % 2 ? seed | 1 : 0, &wire_len);
		read_chunked(wire, wire_len, SIZE_MAX, seed | 1, 0, &res);
		ck_assert(res.done);
		ck_assert_uint_eq(res.used, wire_len);
		ck_assert_uint_eq(res.out_len, want_len);
		ck_assert(memcmp(res.out, want, want_len) == 0);
		ck_assert_int_eq(res.bare_cr || res.bare_lf, has_bare);
		result_free(&res);
		free(wire);
	}
}
END_TEST

/* ----------------------------------------------------------------- replies */

static long
reply(const char *s, bool ehlo, struct smtp_reply *r)
{
	return smtp_reply_parse(s, strlen(s), ehlo, r);
}

START_TEST(reply_single_line)
{
	struct smtp_reply r;

	ck_assert_int_eq(reply("220 mx.example.com ESMTP ready\r\n", false, &r), 32);
	ck_assert_int_eq(r.code, 220);
	ck_assert_str_eq(r.enhanced, "");
	ck_assert_str_eq(r.text, "mx.example.com ESMTP ready");
	ck_assert(smtp_reply_ok(&r) && !smtp_reply_temp(&r));

	ck_assert_int_eq(reply("250 2.0.0 Ok: queued as 4F3A\r\n", false, &r), 30);
	ck_assert_int_eq(r.code, 250);
	ck_assert_str_eq(r.enhanced, "2.0.0");
	ck_assert_str_eq(r.text, "Ok: queued as 4F3A");

	ck_assert_int_eq(reply("451 4.7.650 The mail server is throttled\r\n", false, &r), 42);
	ck_assert_str_eq(r.enhanced, "4.7.650");
	ck_assert(smtp_reply_temp(&r) && !smtp_reply_ok(&r));

	/* A bare LF ends a line too; a code alone is a whole reply. */
	ck_assert_int_eq(reply("354 go ahead\n", false, &r), 13);
	ck_assert_int_eq(r.code, 354);
	ck_assert_int_eq(reply("250\r\n", false, &r), 5);
	ck_assert_int_eq(r.code, 250);
	ck_assert_str_eq(r.text, "");
	ck_assert_int_eq(reply("550 5.7.1\r\n", false, &r), 11);
	ck_assert_str_eq(r.enhanced, "5.7.1");
	ck_assert_str_eq(r.text, "");

	/* Only the first reply of a pipelined batch. */
	ck_assert_int_eq(reply("250 a\r\n354 b\r\n", false, &r), 7);
	ck_assert_int_eq(r.code, 250);
}
END_TEST

START_TEST(reply_enhanced_code_format)
{
	struct smtp_reply r;

	ck_assert_int_gt(reply("550 2.1.0 class must match the code\r\n", false, &r), 0);
	ck_assert_str_eq(r.enhanced, "");
	ck_assert_str_eq(r.text, "2.1.0 class must match the code");
	ck_assert_int_gt(reply("451 4.7.1234 too many digits\r\n", false, &r), 0);
	ck_assert_str_eq(r.enhanced, "");
	ck_assert_int_gt(reply("451 4.7.1x\r\n", false, &r), 0);
	ck_assert_str_eq(r.enhanced, "");
	ck_assert_int_gt(reply("451 4..1 x\r\n", false, &r), 0);
	ck_assert_str_eq(r.enhanced, "");
	ck_assert_int_gt(reply("354 3.0.0 no class 3\r\n", false, &r), 0);
	ck_assert_str_eq(r.enhanced, "");
	ck_assert_int_gt(reply("421 4.4.2 Timeout\r\n", false, &r), 0);
	ck_assert_str_eq(r.enhanced, "4.4.2");
	ck_assert_str_eq(r.text, "Timeout");
	/* from the first line only */
	ck_assert_int_gt(reply("550-no code here\r\n550 5.7.1 but here\r\n", false, &r), 0);
	ck_assert_str_eq(r.enhanced, "");
}
END_TEST

START_TEST(reply_multi_line)
{
	static const char gmail[] =
	    "550-5.4.5 Daily user sending limit exceeded. For more information\r\n"
	    "550-5.4.5 on Gmail sending limits go to\r\n"
	    "550 5.4.5  https://support.google.com/a/answer/166852 - gsmtp\r\n";
	struct smtp_reply r;

	ck_assert_int_eq(reply(gmail, false, &r), (long)strlen(gmail));
	ck_assert_int_eq(r.code, 550);
	ck_assert_str_eq(r.enhanced, "5.4.5");
	ck_assert_str_eq(r.text, "Daily user sending limit exceeded. For more "
	    "information on Gmail sending limits go to "
	    " https://support.google.com/a/answer/166852 - gsmtp");
}
END_TEST

START_TEST(reply_ehlo_capabilities)
{
	static const char postfix[] =
	    "250-mx.example.com\r\n"
	    "250-PIPELINING\r\n"
	    "250-SIZE 10240000\r\n"
	    "250-VRFY\r\n"
	    "250-ETRN\r\n"
	    "250-STARTTLS\r\n"
	    "250-AUTH PLAIN LOGIN\r\n"
	    "250-ENHANCEDSTATUSCODES\r\n"
	    "250-8BITMIME\r\n"
	    "250-DSN\r\n"
	    "250 CHUNKING\r\n";
	struct smtp_reply r;

	ck_assert_int_eq(reply(postfix, true, &r), (long)strlen(postfix));
	ck_assert_int_eq(r.code, 250);
	ck_assert(r.cap_pipelining && r.cap_size && r.cap_starttls &&
	    r.cap_auth_plain && r.cap_auth_login && r.cap_enhancedstatuscodes &&
	    r.cap_8bitmime);
	ck_assert_uint_eq(r.size_limit, 10240000);

	/* Parsed as a plain reply, no capability is claimed. */
	ck_assert_int_gt(reply(postfix, false, &r), 0);
	ck_assert(!r.cap_pipelining && !r.cap_size && !r.cap_starttls &&
	    !r.cap_auth_plain && !r.cap_auth_login && !r.cap_8bitmime &&
	    !r.cap_enhancedstatuscodes);

	/* Case-insensitive, legacy AUTH=, the greeting line is no capability. */
	ck_assert_int_gt(reply("250-STARTTLS hello\r\n250-auth=login\r\n"
	    "250-size\r\n250 starttls\r\n", true, &r), 0);
	ck_assert(r.cap_auth_login && !r.cap_auth_plain && r.cap_starttls);
	ck_assert(r.cap_size);
	ck_assert_uint_eq(r.size_limit, 0);

	ck_assert_int_gt(reply("250-x\r\n250-AUTH CRAM-MD5 XOAUTH2\r\n"
	    "250 SIZE 99999999999999999999999\r\n", true, &r), 0);
	ck_assert(!r.cap_auth_login && !r.cap_auth_plain);
	ck_assert(r.cap_size);
	ck_assert_uint_eq(r.size_limit, 0);

	ck_assert_int_gt(reply("250-x\r\n250 AUTH LOGIN Plain\r\n", true, &r), 0);
	ck_assert(r.cap_auth_login && r.cap_auth_plain);

	/* A single-line EHLO reply advertises nothing; an error neither. */
	ck_assert_int_gt(reply("250 STARTTLS\r\n", true, &r), 0);
	ck_assert(!r.cap_starttls);
	ck_assert_int_gt(reply("550-x\r\n550 STARTTLS\r\n", true, &r), 0);
	ck_assert(!r.cap_starttls);
}
END_TEST

START_TEST(reply_partial)
{
	static const char full[] = "250-a\r\n250-SIZE 100\r\n250 PIPELINING\r\n";
	struct smtp_reply r;

	/* Every strict prefix is "not yet", never an error. */
	for (size_t n = 0; n < sizeof(full) - 1; n++)
		ck_assert_msg(smtp_reply_parse(full, n, true, &r) == 0,
		    "prefix %zu", n);
	ck_assert_int_eq(smtp_reply_parse(full, sizeof(full) - 1, true, &r),
	    (long)sizeof(full) - 1);
	ck_assert(r.cap_pipelining && r.cap_size);
}
END_TEST

START_TEST(reply_garbage)
{
	static const char *const garbage[] = {
		"HTTP/1.1 400 Bad Request\r\n",
		"H",                             /* refused at the first octet */
		"2x",
		"25x",
		"250x",
		"250_ok\r\n",
		"600 out of range\r\n",
		"199 out of range\r\n",
		"260 second digit\r\n",
		"25\r\n",
		"250\rx\r\n",
		"250-a\r\n251 b\r\n",           /* mixed codes */
		"250-a\r\n350 b\r\n",
		"250-a\r\n24",                   /* refused before its line ends */
	};
	struct smtp_reply r;

	for (size_t i = 0; i < N_ELEMS(garbage); i++)
		ck_assert_msg(reply(garbage[i], false, &r) == -1, "\"%s\"", garbage[i]);
	/* ... whereas what may still become "250 ..." is just incomplete */
	ck_assert_int_eq(reply("250-a\r\n25", false, &r), 0);
	ck_assert_int_eq(reply("250-a\r\n250", false, &r), 0);
}
END_TEST

START_TEST(reply_limits)
{
	struct smtp_reply r;
	size_t n = 70000;
	char *buf = malloc(n + 8);
	size_t pos = 0;

	ck_assert_ptr_nonnull(buf);
	/* One line without LF past 2048 octets. */
	memcpy(buf, "250 ", 4);
	memset(buf + 4, 'x', 3000);
	ck_assert_int_eq(smtp_reply_parse(buf, 3004, false, &r), -1);
	ck_assert_int_eq(smtp_reply_parse(buf, 2000, false, &r), 0);
	/* A 2048-octet line is fine, 2049 is not. */
	memcpy(buf + 2048, "\r\n", 2);
	ck_assert_int_eq(smtp_reply_parse(buf, 2050, false, &r), 2050);
	ck_assert_uint_eq(strlen(r.text), SMTP_REPLY_TEXT_MAX - 1);
	buf[2048] = 'x';
	memcpy(buf + 2049, "\r\n", 2);
	ck_assert_int_eq(smtp_reply_parse(buf, 2051, false, &r), -1);
	/* Endless continuation lines. */
	while (pos + 8 < n) {
		memcpy(buf + pos, "250-xx\r\n", 8);
		pos += 8;
	}
	ck_assert_int_eq(smtp_reply_parse(buf, pos, false, &r), -1);
	free(buf);
}
END_TEST

START_TEST(reply_text_sanitised)
{
	struct smtp_reply r;

	ck_assert_int_gt(reply("550 a\x01" "b\x7f" "c\xc3\xa9" "d\te\rf\r\n", false, &r), 0);
	ck_assert_str_eq(r.text, "a?b?c??d?e?f");
}
END_TEST

static const struct {
	const char *reply;
	bool throttle;
} throttle_cases[] = {
	/* x.4.5: congestion / quota, any code */
	{ "550 5.4.5 Daily user sending quota exceeded.\r\n", true },
	{ "550-5.4.5 Daily user sending limit exceeded.\r\n550 5.4.5 https://x\r\n", true },
	{ "452 4.4.5 Insufficient system storage\r\n", true },
	/* 4.7.x on 421/450/451/452 */
	{ "421 4.7.0 Try again later, closing connection.\r\n", true },
	{ "450 4.7.1 Client host rejected: try again later\r\n", true },
	{ "451 4.7.500 Server busy. Please try again later\r\n", true },
	{ "452 4.7.28 x\r\n", true },
	{ "454 4.7.0 Temporary authentication failure\r\n", true },
	/* text */
	{ "554 5.7.1 Message rejected: rate limit exceeded\r\n", true },
	{ "550 5.7.0 Too Many Messages sent today\r\n", true },
	{ "421 Ratelimit reached, slow down\r\n", true },
	{ "451 Rate-limit hit\r\n", true },
	{ "550 Sending limit reached for this account\r\n", true },
	{ "452 4.3.1 Account QUOTA exhausted\r\n", true },
	{ "550-5.7.1 Your account has been\r\n550 5.7.1 over its quota\r\n", true },
	/* not throttles */
	{ "250 2.0.0 Ok, quota fine\r\n", false },
	{ "354 sending limit? what limit\r\n", false },
	{ "550 5.1.1 User unknown\r\n", false },
	{ "550 5.7.1 Relaying denied\r\n", false },
	{ "454 4.7.1 x\r\n", false },
	{ "421 4.3.2 Service shutting down\r\n", false },
	{ "451 4.4.50 x\r\n", false },
	{ "452 4.2.2 Mailbox over quota\r\n", false },
	{ "552 5.2.2 Mailbox full, quota exceeded\r\n", false },
	{ "554 5.7.1 Spam rate too high\r\n", false },
};

START_TEST(reply_throttle)
{
	struct smtp_reply r;

	ck_assert_int_gt(reply(throttle_cases[_i].reply, false, &r), 0);
	ck_assert_msg(smtp_reply_is_throttle(&r) == throttle_cases[_i].throttle,
	    "\"%s\" should%s be a throttle", throttle_cases[_i].reply,
	    throttle_cases[_i].throttle ? "" : " not");
}
END_TEST

static Suite *
parse_suite(void)
{
	Suite *s = suite_create("smtp_parse");
	TCase *tc;

	tc = tcase_create("commands");
	tcase_add_loop_test(tc, command_errors, 0, (int)N_ELEMS(bad_commands));
	tcase_add_test(tc, verbs_case_insensitive);
	tcase_add_test(tc, helo_ehlo);
	tcase_add_test(tc, mail_from);
	tcase_add_test(tc, mail_path_length_limit);
	tcase_add_test(tc, mail_params);
	tcase_add_test(tc, command_line_max);
	tcase_add_test(tc, rcpt_to);
	tcase_add_test(tc, auth_command);
	tcase_add_test(tc, raw_arguments);
	tcase_add_test(tc, no_control_char_survives);
	tcase_add_test(tc, next_line);
	tcase_set_timeout(tc, 60);
	suite_add_tcase(s, tc);

	tc = tcase_create("data");
	tcase_add_test(tc, data_simple);
	tcase_add_test(tc, data_pipelined_tail_left_alone);
	tcase_add_test(tc, data_empty_message);
	tcase_add_test(tc, data_incomplete);
	tcase_add_test(tc, data_dot_unstuffing);
	tcase_add_loop_test(tc, data_smuggling, 0, (int)N_ELEMS(smuggling));
	tcase_add_test(tc, data_buffer_boundaries);
	tcase_add_test(tc, data_line_length);
	tcase_add_test(tc, data_size_limit);
	tcase_add_test(tc, data_chunking_equivalence);
	tcase_add_test(tc, data_writer);
	tcase_add_test(tc, data_round_trip);
	tcase_set_timeout(tc, 120);
	suite_add_tcase(s, tc);

	tc = tcase_create("replies");
	tcase_add_test(tc, reply_single_line);
	tcase_add_test(tc, reply_enhanced_code_format);
	tcase_add_test(tc, reply_multi_line);
	tcase_add_test(tc, reply_ehlo_capabilities);
	tcase_add_test(tc, reply_partial);
	tcase_add_test(tc, reply_garbage);
	tcase_add_test(tc, reply_limits);
	tcase_add_test(tc, reply_text_sanitised);
	tcase_add_loop_test(tc, reply_throttle, 0, (int)N_ELEMS(throttle_cases));
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(parse_suite());
	int failed;

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? 0 : 1;
}

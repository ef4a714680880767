/* SPDX-License-Identifier: MIT */
/*
 * The From rewriter (from_rewrite.c): header From only, folding and display
 * names kept, Reply-To added, body untouched, and the same output however
 * the message is cut into chunks.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "from_rewrite.h"

#define NEW "me@provider.example"

struct sink {
	char *data;
	size_t len, cap;
	unsigned calls;
};

static void
collect(void *arg, const char *data, size_t len)
{
	struct sink *s = arg;

	ck_assert_uint_gt(len, 0);
	s->calls++;
	if (s->len + len + 1 > s->cap) {
		s->cap = (s->len + len + 1) * 2;
		s->data = realloc(s->data, s->cap);
		ck_assert_ptr_nonnull(s->data);
	}
	memcpy(s->data + s->len, data, len);
	s->len += len;
	s->data[s->len] = '\0';
}

/* The whole message through a new rewriter, chunk octets at a time
 * (0: all at once). The caller frees the result. */
static unsigned last_calls;

static char *
rewrite_len(const char *msg, size_t len, size_t chunk, size_t *outlen)
{
	struct sink s = { NULL, 0, 0, 0 };
	struct from_rewrite *fr = from_rewrite_new(NEW, collect, &s);

	ck_assert_ptr_nonnull(fr);
	for (size_t off = 0; off < len;) {
		size_t n = chunk == 0 || chunk > len - off ? len - off : chunk;

		from_rewrite_feed(fr, msg + off, n);
		off += n;
	}
	from_rewrite_finish(fr);
	from_rewrite_free(fr);
	if (s.data == NULL) {
		s.data = calloc(1, 1);
		ck_assert_ptr_nonnull(s.data);
	}
	if (outlen != NULL)
		*outlen = s.len;
	last_calls = s.calls;
	return s.data;
}

/* Every chunking gives the same output, which must be want. */
static void
expect_rewrite(const char *msg, const char *want)
{
	static const size_t chunks[] = { 0, 1, 2, 3, 5, 7, 64 };
	size_t len = strlen(msg);

	for (size_t i = 0; i < sizeof(chunks) / sizeof(chunks[0]); i++) {
		size_t outlen;
		char *out = rewrite_len(msg, len, chunks[i], &outlen);

		ck_assert_msg(outlen == strlen(want) && memcmp(out, want, outlen) == 0,
		    "chunk %zu:\ngot:  [%s]\nwant: [%s]", chunks[i], out, want);
		free(out);
	}
}

START_TEST(test_display_name_kept)
{
	expect_rewrite(
	    "Received: from x\r\n\tby y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
	    "From: \"Alice Example\" <alice@corp.example>\r\n"
	    "To: bob@example.org\r\n"
	    "Subject: hi\r\n"
	    "\r\n"
	    "Hello.\r\n",
	    "Received: from x\r\n\tby y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
	    "From: \"Alice Example\" <" NEW ">\r\n"
	    "To: bob@example.org\r\n"
	    "Subject: hi\r\n"
	    "Reply-To: \"Alice Example\" <alice@corp.example>\r\n"
	    "\r\n"
	    "Hello.\r\n");
}
END_TEST

START_TEST(test_bare_address_and_comment)
{
	expect_rewrite("From: alice@corp.example\r\n\r\nx\r\n",
	    "From: " NEW "\r\nReply-To: alice@corp.example\r\n\r\nx\r\n");
	expect_rewrite("from:alice@corp.example (Alice (the boss))\r\n\r\n",
	    "from:" NEW " (Alice (the boss))\r\nReply-To:alice@corp.example (Alice (the boss))\r\n"
	    "\r\n");
	/* Obsolete syntax: white space before the colon. */
	expect_rewrite("FROM :  <alice@corp.example>\r\n\r\n",
	    "FROM :  <" NEW ">\r\nReply-To:  <alice@corp.example>\r\n\r\n");
}
END_TEST

/* Folding is kept exactly; only the address changes. */
START_TEST(test_folded_from)
{
	expect_rewrite(
	    "Subject: x\r\n"
	    "From: \"A very long display name that had to be folded\"\r\n"
	    "\t<alice@corp.example>\r\n"
	    "To: b@example.org\r\n"
	    "\r\n"
	    "body\r\n",
	    "Subject: x\r\n"
	    "From: \"A very long display name that had to be folded\"\r\n"
	    "\t<" NEW ">\r\n"
	    "To: b@example.org\r\n"
	    "Reply-To: \"A very long display name that had to be folded\"\r\n"
	    "\t<alice@corp.example>\r\n"
	    "\r\n"
	    "body\r\n");
	expect_rewrite("From:\r\n alice@corp.example\r\n (Alice)\r\n\r\n",
	    "From:\r\n " NEW "\r\n (Alice)\r\n"
	    "Reply-To:\r\n alice@corp.example\r\n (Alice)\r\n\r\n");
}
END_TEST

/* RFC 2047 encoded words stay as they are, even when they look odd. */
START_TEST(test_encoded_display_name)
{
	expect_rewrite(
	    "From: =?UTF-8?B?Sm9zw6kgR2FyY8OtYQ==?=\r\n =?UTF-8?Q?_=3Cnot=3E?= <jose@corp.example>\r\n"
	    "\r\n",
	    "From: =?UTF-8?B?Sm9zw6kgR2FyY8OtYQ==?=\r\n =?UTF-8?Q?_=3Cnot=3E?= <" NEW ">\r\n"
	    "Reply-To: =?UTF-8?B?Sm9zw6kgR2FyY8OtYQ==?=\r\n =?UTF-8?Q?_=3Cnot=3E?= "
	    "<jose@corp.example>\r\n"
	    "\r\n");
	/* Quoted display names may hold <, >, commas, quotes and comments. */
	expect_rewrite("From: \"Doe, J. <\\\"jd\\\"> (x)\" <jd@corp.example>\r\n\r\n",
	    "From: \"Doe, J. <\\\"jd\\\"> (x)\" <" NEW ">\r\n"
	    "Reply-To: \"Doe, J. <\\\"jd\\\"> (x)\" <jd@corp.example>\r\n\r\n");
}
END_TEST

START_TEST(test_reply_to_kept)
{
	/* Before or after From: the app's own Reply-To wins, nothing added. */
	expect_rewrite("Reply-To: help@corp.example\r\nFrom: a@corp.example\r\n\r\nx\r\n",
	    "Reply-To: help@corp.example\r\nFrom: " NEW "\r\n\r\nx\r\n");
	expect_rewrite("From: a@corp.example\r\nreply-to : help@corp.example\r\n\r\nx\r\n",
	    "From: " NEW "\r\nreply-to : help@corp.example\r\n\r\nx\r\n");
	/* Reply-To in the body is not a header. */
	expect_rewrite("From: a@corp.example\r\n\r\nReply-To: x@y.example\r\n",
	    "From: " NEW "\r\nReply-To: a@corp.example\r\n\r\nReply-To: x@y.example\r\n");
}
END_TEST

/* The body is never touched, however much it looks like a header. */
START_TEST(test_body_unchanged)
{
	const char *body =
	    "From: someone@else.example\r\n"
	    "From someone Mon Jan  1 00:00:00 2024\r\n"
	    "\r\n"
	    "--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: inner@corp.example\r\n\r\n.\r\n";
	char msg[1024], want[1024];

	snprintf(msg, sizeof(msg), "From: <a@corp.example>\r\nSubject: s\r\n\r\n%s", body);
	snprintf(want, sizeof(want), "From: <" NEW ">\r\nSubject: s\r\n"
	    "Reply-To: <a@corp.example>\r\n\r\n%s", body);
	expect_rewrite(msg, want);
}
END_TEST

/* Nothing to change: byte for byte the same, and no Reply-To. */
START_TEST(test_no_from)
{
	const char *same[] = {
		"Subject: no from\r\nTo: x@y.example\r\n\r\nFrom: body@x.example\r\n",
		"From: <" NEW ">\r\n\r\nalready right\r\n",
		"Resent-From: a@corp.example\r\nX-From: a@corp.example\r\n\r\n",
		"",
		"\r\n",
		"no header at all\r\nFrom: a@corp.example\r\n",
		"Subject: unterminated",
	};

	for (size_t i = 0; i < sizeof(same) / sizeof(same[0]); i++)
		expect_rewrite(same[i], same[i]);
}
END_TEST

START_TEST(test_odd_from_fields)
{
	/* Several authors: the first one's display name, the new address. */
	expect_rewrite("From: Alice <a@corp.example>,\r\n Bob <b@corp.example>\r\n\r\n",
	    "From: Alice <" NEW ">\r\n"
	    "Reply-To: Alice <a@corp.example>,\r\n Bob <b@corp.example>\r\n\r\n");
	expect_rewrite("From: a@corp.example, b@corp.example\r\n\r\n",
	    "From: " NEW "\r\nReply-To: a@corp.example, b@corp.example\r\n\r\n");
	/* Groups, no address, broken quoting: the address alone. */
	expect_rewrite("From: Team: a@corp.example, b@corp.example;\r\n\r\n",
	    "From: " NEW "\r\nReply-To: Team: a@corp.example, b@corp.example;\r\n\r\n");
	expect_rewrite("From:\r\n\r\n", "From: " NEW "\r\nReply-To:\r\n\r\n");
	expect_rewrite("From: \"unterminated <a@corp.example>\r\n\r\n",
	    "From: " NEW "\r\nReply-To: \"unterminated <a@corp.example>\r\n\r\n");
	/* Two From fields (invalid, but seen): both rewritten, the first kept. */
	expect_rewrite("From: a@corp.example\r\nFrom: b@corp.example\r\n\r\n",
	    "From: " NEW "\r\nFrom: " NEW "\r\nReply-To: a@corp.example\r\n\r\n");
}
END_TEST

/* A header without an empty line after it, and a last line without CRLF. */
START_TEST(test_header_only_messages)
{
	expect_rewrite("From: a@corp.example\r\n",
	    "From: " NEW "\r\nReply-To: a@corp.example\r\n");
	expect_rewrite("Subject: s\r\nFrom: a@corp.example",
	    "Subject: s\r\nFrom: " NEW "\r\nReply-To: a@corp.example\r\n");
	expect_rewrite("From: a@corp.example\r\nSubject: s",
	    "From: " NEW "\r\nSubject: s\r\nReply-To: a@corp.example\r\n");
	/* The header ends at the first line that is not a field. */
	expect_rewrite("From: a@corp.example\r\nnot a field\r\nTo: x@y.example\r\n",
	    "From: " NEW "\r\nReply-To: a@corp.example\r\nnot a field\r\nTo: x@y.example\r\n");
}
END_TEST

/* A From too long to hold is replaced whole; the rest passes. */
START_TEST(test_overlong_from)
{
	size_t n = FROM_REWRITE_FIELD_MAX + 100, len;
	char *msg = malloc(n * 2), *out, *want = malloc(n * 2);
	size_t used = 0;

	ck_assert_ptr_nonnull(msg);
	ck_assert_ptr_nonnull(want);
	used += (size_t)sprintf(msg, "From: \"x\"");
	while (used < n)
		used += (size_t)sprintf(msg + used, "\r\n \"%s\"", "folded display name part");
	used += (size_t)sprintf(msg + used, " <a@corp.example>\r\nSubject: s\r\n\r\nbody\r\n");
	sprintf(want, "From: " NEW "\r\nSubject: s\r\n\r\nbody\r\n");
	for (size_t chunk = 0; chunk < 3000; chunk += 1000) {
		out = rewrite_len(msg, used, chunk, &len);
		ck_assert_str_eq(out, want);
		free(out);
	}
	free(msg);
	free(want);
}
END_TEST

/* A long body goes through in big pieces, not octet by octet. */
START_TEST(test_body_passes_whole)
{
	char msg[70000];
	size_t outlen;
	char *out;

	memset(msg, 'x', sizeof(msg));
	memcpy(msg, "From: a@corp.example\r\n\r\n", 24);
	for (size_t i = 100; i < sizeof(msg); i += 100)
		memcpy(msg + i - 2, "\r\n", 2);
	out = rewrite_len(msg, sizeof(msg), 0, &outlen);
	ck_assert_uint_eq(outlen, sizeof(msg) - strlen("a@corp.example") + strlen(NEW) +
	    strlen("Reply-To: a@corp.example\r\n"));
	ck_assert(memcmp(out + outlen - (sizeof(msg) - 24), msg + 24, sizeof(msg) - 24) == 0);
	/* name, From, Reply-To (three pieces), the empty line, the rest at once */
	ck_assert_uint_le(last_calls, 8);
	free(out);
}
END_TEST

START_TEST(test_field_body)
{
	char out[256];
	size_t n;

	n = from_rewrite_field_body(" <a@b.example> (c)\r\n", 20, NEW, out, sizeof(out));
	ck_assert_uint_eq(n, strlen(" <" NEW "> (c)\r\n"));
	ck_assert(memcmp(out, " <" NEW "> (c)\r\n", n) == 0);
	/* Too small an output buffer: nothing. */
	ck_assert_uint_eq(from_rewrite_field_body(" a@b\r\n", 6, NEW, out, 10), 0);
	ck_assert_ptr_null(from_rewrite_new("", collect, NULL));
}
END_TEST

static Suite *
from_rewrite_suite(void)
{
	Suite *s = suite_create("from_rewrite");
	TCase *tc = tcase_create("rewrite");

	tcase_add_test(tc, test_display_name_kept);
	tcase_add_test(tc, test_bare_address_and_comment);
	tcase_add_test(tc, test_folded_from);
	tcase_add_test(tc, test_encoded_display_name);
	tcase_add_test(tc, test_reply_to_kept);
	tcase_add_test(tc, test_body_unchanged);
	tcase_add_test(tc, test_no_from);
	tcase_add_test(tc, test_odd_from_fields);
	tcase_add_test(tc, test_header_only_messages);
	tcase_add_test(tc, test_overlong_from);
	tcase_add_test(tc, test_body_passes_whole);
	tcase_add_test(tc, test_field_body);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(from_rewrite_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

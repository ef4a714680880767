/* SPDX-License-Identifier: MIT */
/*
 * Tests of the message body store: what goes in comes out, in memory and
 * past the threshold in a file, whether appended by copy or by moving a
 * buffer's chains, and read by copy or lent where it lies.
 */
#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "msgbody.h"

#define BIG (300 * 1024)

static char *
pattern(size_t len)
{
	char *p = malloc(len);

	ck_assert_ptr_nonnull(p);
	for (size_t i = 0; i < len; i++)
		p[i] = (char)('a' + (i * 7 + i / 4096) % 26);
	return p;
}

/* Appends data in pieces of `piece` octets through an evbuffer. */
static void
append_by_buffer(struct msgbody *b, const char *data, size_t len, size_t piece)
{
	struct evbuffer *src = evbuffer_new();

	for (size_t off = 0; off < len; off += piece) {
		size_t n = len - off < piece ? len - off : piece;

		ck_assert_int_eq(evbuffer_add(src, data + off, n), 0);
		ck_assert_int_eq(msgbody_append_buffer(b, src), 0);
		ck_assert_uint_eq(evbuffer_get_length(src), 0);
	}
	evbuffer_free(src);
}

/* Everything, read back one way or the other, equals data. */
static void
assert_content(struct msgbody *b, const char *data, size_t len, bool lent)
{
	char *got = malloc(len + 1);
	uint64_t off = 0;
	ssize_t n;

	ck_assert_uint_eq(msgbody_size(b), len);
	while (off < len) {
		const void *run;

		if (lent) {
			n = msgbody_peek(b, off, &run);
			ck_assert_int_gt(n, 0);
			memcpy(got + off, run, (size_t)n);
		} else {
			n = msgbody_read(b, off, got + off, 7777);
			ck_assert_int_gt(n, 0);
		}
		off += (uint64_t)n;
	}
	ck_assert_uint_eq(off, len);
	ck_assert_int_eq(memcmp(got, data, len), 0);
	if (lent)
		ck_assert_int_eq(msgbody_peek(b, len, &(const void *){ NULL }), 0);
	free(got);
}

START_TEST(memory_body_lent_in_place)
{
	char *data = pattern(BIG);
	struct msgbody *b = msgbody_new(1024 * 1024, NULL);

	ck_assert_int_eq(msgbody_append(b, "Received: x\r\n", 13), 0);
	append_by_buffer(b, data + 13, BIG - 13, 1000);
	memcpy(data, "Received: x\r\n", 13);
	ck_assert(msgbody_in_memory(b));
	assert_content(b, data, BIG, true);
	assert_content(b, data, BIG, false);
	assert_content(b, data, BIG, true);          /* from the start again */
	msgbody_free(b);
	free(data);
}
END_TEST

/* A peek at any offset, not only where the last one ended. */
START_TEST(peek_anywhere)
{
	char *data = pattern(BIG);
	struct msgbody *b = msgbody_new(1024 * 1024, NULL);
	const void *run;
	ssize_t n;

	append_by_buffer(b, data, BIG, 4096);
	for (uint64_t off = BIG - 1; off > 0; off /= 3) {
		n = msgbody_peek(b, off, &run);
		ck_assert_int_gt(n, 0);
		ck_assert_int_eq(memcmp(run, data + off, (size_t)n), 0);
	}
	msgbody_free(b);
	free(data);
}
END_TEST

/* Past the threshold the body is in a file: read only, never lent. */
START_TEST(file_body_by_buffer)
{
	char *data = pattern(BIG);
	struct msgbody *b = msgbody_new(64 * 1024, NULL);
	const void *run;

	append_by_buffer(b, data, BIG, 10000);
	ck_assert(!msgbody_in_memory(b));
	assert_content(b, data, BIG, false);
	ck_assert_int_eq(msgbody_peek(b, 0, &run), -1);
	ck_assert_int_eq(errno, EINVAL);
	msgbody_free(b);
	free(data);
}
END_TEST

static Suite *
msgbody_suite(void)
{
	Suite *s = suite_create("msgbody");
	TCase *tc = tcase_create("store");

	tcase_add_test(tc, memory_body_lent_in_place);
	tcase_add_test(tc, peek_anywhere);
	tcase_add_test(tc, file_body_by_buffer);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(msgbody_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

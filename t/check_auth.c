/* SPDX-License-Identifier: MIT */
/* Unit tests of SASL PLAIN/LOGIN decoding and encoding and password checks. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "auth.h"

/* Encodes raw octets (which may hold NULs) with the module's own encoder. */
static char *
b64(const void *raw, size_t len)
{
	static char buf[2048];

	ck_assert_int_eq(auth_b64_encode(raw, len, buf, sizeof(buf)), 0);
	return buf;
}

#define B64(lit) b64((lit), sizeof(lit) - 1)

static enum auth_status
plain(const char *b, struct auth_plain *p)
{
	return auth_plain_decode(b, strlen(b), p);
}

/* A PLAIN message with fields of the given lengths, filled with letters. */
static char *
plain_of_lengths(size_t zlen, size_t clen, size_t plen)
{
	char raw[1024];
	size_t n = 0;

	memset(raw + n, 'z', zlen);
	n += zlen;
	raw[n++] = '\0';
	memset(raw + n, 'c', clen);
	n += clen;
	raw[n++] = '\0';
	memset(raw + n, 'p', plen);
	n += plen;
	return b64(raw, n);
}

static bool
all_zero(const void *p, size_t len)
{
	const unsigned char *c = p;

	for (size_t i = 0; i < len; i++)
		if (c[i] != 0)
			return false;
	return true;
}

START_TEST(plain_good)
{
	struct auth_plain p;

	ck_assert_int_eq(plain(B64("\0alice@example.com\0s3cret"), &p), AUTH_OK);
	ck_assert_str_eq(p.authzid, "");
	ck_assert_str_eq(p.authcid, "alice@example.com");
	ck_assert_str_eq(p.passwd, "s3cret");

	ck_assert_int_eq(plain(B64("admin\0alice\0pass word"), &p), AUTH_OK);
	ck_assert_str_eq(p.authzid, "admin");
	ck_assert_str_eq(p.authcid, "alice");
	ck_assert_str_eq(p.passwd, "pass word");

	/* UTF-8 and any other non-NUL octet are the password's business. */
	ck_assert_int_eq(plain(B64("\0b\xc3\xb6rje\0p\xc3\xa4ss\x01\xff"), &p), AUTH_OK);
	ck_assert_str_eq(p.authcid, "b\xc3\xb6rje");
	ck_assert_str_eq(p.passwd, "p\xc3\xa4ss\x01\xff");

	/* RFC 4616's own example */
	ck_assert_int_eq(plain("dGltAHRpbQB0YW5zdGFhZnRhbnN0YWFm", &p), AUTH_OK);
	ck_assert_str_eq(p.authcid, "tim");
	ck_assert_str_eq(p.passwd, "tanstaaftanstaaf");
}
END_TEST

START_TEST(plain_field_lengths)
{
	struct auth_plain p;

	ck_assert_int_eq(plain(plain_of_lengths(255, 255, 255), &p), AUTH_OK);
	ck_assert_uint_eq(strlen(p.authzid), 255);
	ck_assert_uint_eq(strlen(p.authcid), 255);
	ck_assert_uint_eq(strlen(p.passwd), 255);
	ck_assert_int_eq(plain(plain_of_lengths(256, 1, 1), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(plain_of_lengths(0, 256, 1), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(plain_of_lengths(0, 1, 256), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(plain_of_lengths(0, 0, 1), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(plain_of_lengths(0, 1, 0), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(plain_of_lengths(0, 1, 1), &p), AUTH_OK);
}
END_TEST

START_TEST(plain_bad_format)
{
	struct auth_plain p;

	ck_assert_int_eq(plain(B64("alice\0secret"), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(B64("alicesecret"), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(B64("\0alice\0sec\0ret"), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(B64("\0alice\0secret\0"), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(B64("\0\0\0"), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(B64("\0\0"), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(B64("\0"), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(B64("\0\0secret"), &p), AUTH_BAD_FORMAT);
	ck_assert_int_eq(plain(B64("\0alice\0"), &p), AUTH_BAD_FORMAT);
	/* an empty response (AUTH PLAIN =) carries no credentials */
	ck_assert_int_eq(auth_plain_decode("", 0, &p), AUTH_BAD_FORMAT);
}
END_TEST

START_TEST(plain_cancel_and_bad_base64)
{
	struct auth_plain p;

	ck_assert_int_eq(plain("*", &p), AUTH_CANCELLED);
	ck_assert_int_eq(plain("**", &p), AUTH_BAD_BASE64);
	ck_assert_int_eq(plain("!!!!", &p), AUTH_BAD_BASE64);
	ck_assert_int_eq(plain("=", &p), AUTH_BAD_BASE64);
	ck_assert_int_eq(plain("AGFsaWNlAHNlY3JldA", &p), AUTH_BAD_BASE64);   /* no padding */
	ck_assert_int_eq(plain("AGFsaWNlAHNlY3JldA=", &p), AUTH_BAD_BASE64);
	ck_assert_int_eq(plain("AGFsaWNl AHNlY3JldA==", &p), AUTH_BAD_BASE64); /* white space */
	ck_assert_int_eq(plain("AGFsaWNl\tAHNlY3JldA==", &p), AUTH_BAD_BASE64);
	ck_assert_int_eq(plain("AGFsaWNlAHNlY3JldA==AGFs", &p), AUTH_BAD_BASE64);
	ck_assert_int_eq(plain("AGFsa-NlAHNlY3JldA==", &p), AUTH_BAD_BASE64);
	ck_assert_int_eq(auth_plain_decode("AGFsaWNlAHNlY3JldA==", 21, &p), AUTH_BAD_BASE64);
	/* the length given is what counts, not a NUL */
	ck_assert_int_eq(auth_plain_decode("AGFsaWNlAHNlY3JldA==trailing", 20, &p), AUTH_OK);
	ck_assert_str_eq(p.passwd, "secret");
}
END_TEST

START_TEST(plain_failure_leaves_no_secret)
{
	struct auth_plain p;

	memset(&p, 'x', sizeof(p));
	ck_assert_int_eq(plain(B64("\0alice\0sec\0ret"), &p), AUTH_BAD_FORMAT);
	ck_assert(all_zero(&p, sizeof(p)));
	memset(&p, 'x', sizeof(p));
	ck_assert_int_eq(plain("!", &p), AUTH_BAD_BASE64);
	ck_assert(all_zero(&p, sizeof(p)));
}
END_TEST

START_TEST(login_steps)
{
	char out[AUTH_FIELD_MAX + 1];
	char small[5];

	ck_assert_int_eq(auth_login_decode("YWxpY2U=", 8, out, sizeof(out)), AUTH_OK);
	ck_assert_str_eq(out, "alice");
	ck_assert_int_eq(auth_login_decode("cDRzcyB3MHJk", 12, out, sizeof(out)), AUTH_OK);
	ck_assert_str_eq(out, "p4ss w0rd");
	ck_assert_int_eq(auth_login_decode("*", 1, out, sizeof(out)), AUTH_CANCELLED);
	ck_assert_int_eq(auth_login_decode("YWxpY2U", 7, out, sizeof(out)), AUTH_BAD_BASE64);
	ck_assert_int_eq(auth_login_decode("YWxp Y2U=", 9, out, sizeof(out)), AUTH_BAD_BASE64);
	ck_assert_int_eq(auth_login_decode("@@@@", 4, out, sizeof(out)), AUTH_BAD_BASE64);
	ck_assert_int_eq(auth_login_decode("", 0, out, sizeof(out)), AUTH_BAD_FORMAT);
	/* "a\0b": a NUL inside a user name or password */
	ck_assert_int_eq(auth_login_decode(B64("a\0b"), 4, out, sizeof(out)), AUTH_BAD_FORMAT);
	ck_assert(all_zero(out, sizeof(out)));

	/* too long for the caller's buffer, or for the protocol */
	ck_assert_int_eq(auth_login_decode("YWxpY2U=", 8, small, sizeof(small)), AUTH_BAD_FORMAT);
	ck_assert_int_eq(auth_login_decode("YWxp", 4, small, sizeof(small)), AUTH_OK);
	ck_assert_str_eq(small, "ali");
	ck_assert_int_eq(auth_login_decode("YWxpYw==", 8, small, sizeof(small)), AUTH_OK);
	ck_assert_str_eq(small, "alic");
	{
		char raw[300], big[400];
		const char *enc;

		memset(raw, 'u', sizeof(raw));
		enc = b64(raw, 255);
		ck_assert_int_eq(auth_login_decode(enc, strlen(enc), big, sizeof(big)), AUTH_OK);
		ck_assert_uint_eq(strlen(big), 255);
		enc = b64(raw, 256);
		ck_assert_int_eq(auth_login_decode(enc, strlen(enc), big, sizeof(big)),
		    AUTH_BAD_FORMAT);
	}
}
END_TEST

START_TEST(b64_encode)
{
	char out[16];

	ck_assert_int_eq(auth_b64_encode("user", 4, out, sizeof(out)), 0);
	ck_assert_str_eq(out, "dXNlcg==");
	ck_assert_int_eq(auth_b64_encode("Username:", 9, out, sizeof(out)), 0);
	ck_assert_str_eq(out, "VXNlcm5hbWU6");
	ck_assert_int_eq(auth_b64_encode("", 0, out, sizeof(out)), 0);
	ck_assert_str_eq(out, "");
	/* 8 characters need 9 octets with the NUL */
	ck_assert_int_eq(auth_b64_encode("user", 4, out, 9), 0);
	ck_assert_int_eq(auth_b64_encode("user", 4, out, 8), -1);
	ck_assert_int_eq(auth_b64_encode("user", 4, out, 0), -1);
}
END_TEST

static char *
drain(struct evbuffer *buf)
{
	size_t n = evbuffer_get_length(buf);
	char *s = malloc(n + 1);

	ck_assert_ptr_nonnull(s);
	evbuffer_remove(buf, s, n);
	s[n] = '\0';
	return s;
}

START_TEST(plain_encode)
{
	struct evbuffer *buf = evbuffer_new();
	struct auth_plain p;
	char *line, big[300];

	ck_assert_int_eq(auth_plain_encode("user", "pass", buf), 0);
	line = drain(buf);
	ck_assert_str_eq(line, "AUTH PLAIN AHVzZXIAcGFzcw==\r\n");
	free(line);

	/* what we send, we can read back */
	ck_assert_int_eq(auth_plain_encode("alice@example.com", "p\xc3\xa4ss:word", buf), 0);
	line = drain(buf);
	ck_assert(strncmp(line, "AUTH PLAIN ", 11) == 0);
	ck_assert_int_eq(auth_plain_decode(line + 11, strlen(line) - 13, &p), AUTH_OK);
	ck_assert_str_eq(p.authcid, "alice@example.com");
	ck_assert_str_eq(p.passwd, "p\xc3\xa4ss:word");
	free(line);

	memset(big, 'x', 255);
	big[255] = '\0';
	ck_assert_int_eq(auth_plain_encode(big, big, buf), 0);
	line = drain(buf);
	ck_assert_uint_eq(strlen(line), 11 + 684 + 2);        /* 4 * ceil(512 / 3) */
	free(line);

	big[255] = 'x';
	big[256] = '\0';
	ck_assert_int_eq(auth_plain_encode(big, "pass", buf), -1);
	ck_assert_int_eq(auth_plain_encode("user", big, buf), -1);
	ck_assert_int_eq(auth_plain_encode("", "pass", buf), -1);
	ck_assert_int_eq(auth_plain_encode("user", "", buf), -1);
	ck_assert_uint_eq(evbuffer_get_length(buf), 0);
	evbuffer_free(buf);
}
END_TEST

START_TEST(password_equal)
{
	char a[1001], b[1001];

	ck_assert(auth_password_equal("s3cret", "s3cret"));
	ck_assert(!auth_password_equal("s3cret", "s3creT"));
	ck_assert(!auth_password_equal("S3cret", "s3cret"));
	ck_assert(!auth_password_equal("s3cret", "s3cret1"));
	ck_assert(!auth_password_equal("s3cret1", "s3cret"));
	ck_assert(!auth_password_equal("", "s3cret"));
	ck_assert(!auth_password_equal("s3cret", ""));
	ck_assert(auth_password_equal("", ""));
	ck_assert(!auth_password_equal(NULL, "s3cret"));
	ck_assert(!auth_password_equal("s3cret", NULL));
	ck_assert(!auth_password_equal(NULL, NULL));

	memset(a, 'q', 1000);
	a[1000] = '\0';
	memcpy(b, a, sizeof(a));
	ck_assert(auth_password_equal(a, b));
	b[999] = 'r';
	ck_assert(!auth_password_equal(a, b));
	b[999] = 'q';
	b[0] = 'r';
	ck_assert(!auth_password_equal(a, b));
}
END_TEST

START_TEST(wipe)
{
	char secret[32] = "hunter2 hunter2 hunter2";

	auth_wipe(secret, sizeof(secret));
	ck_assert(all_zero(secret, sizeof(secret)));
	auth_wipe(NULL, 10);            /* harmless */
	auth_wipe(secret, 0);
}
END_TEST

static Suite *
auth_suite(void)
{
	Suite *s = suite_create("auth");
	TCase *tc = tcase_create("sasl");

	tcase_add_test(tc, plain_good);
	tcase_add_test(tc, plain_field_lengths);
	tcase_add_test(tc, plain_bad_format);
	tcase_add_test(tc, plain_cancel_and_bad_base64);
	tcase_add_test(tc, plain_failure_leaves_no_secret);
	tcase_add_test(tc, login_steps);
	tcase_add_test(tc, b64_encode);
	tcase_add_test(tc, plain_encode);
	suite_add_tcase(s, tc);

	tc = tcase_create("passwords");
	tcase_add_test(tc, password_equal);
	tcase_add_test(tc, wipe);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(auth_suite());
	int failed;

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? 0 : 1;
}

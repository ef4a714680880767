/* SPDX-License-Identifier: MIT */
/*
 * Password hashes and their per-worker cache (passwd.c), and secrets read
 * from files (secret_file.c).
 */
#include <check.h>
#include <crypt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "passwd.h"
#include "passwd_offload.h"
#include "secret_file.h"
#include "tls.h"

/* Made with libxcrypt for "correct horse", each method once. */
static char yescrypt[CRYPT_OUTPUT_SIZE], bcrypt[CRYPT_OUTPUT_SIZE], sha512[CRYPT_OUTPUT_SIZE];

static void
make(const char *prefix, unsigned long cost, char *out)
{
	char *setting = crypt_gensalt_ra(prefix, cost, NULL, 0);
	struct crypt_data *cd = calloc(1, sizeof(*cd));
	char *h;

	ck_assert_ptr_nonnull(setting);
	ck_assert_ptr_nonnull(cd);
	h = crypt_rn("correct horse", setting, cd, (int)sizeof(*cd));
	ck_assert_ptr_nonnull(h);
	snprintf(out, CRYPT_OUTPUT_SIZE, "%s", h);
	free(cd);
	free(setting);
}

static void
hashes_setup(void)
{
	ck_assert_int_eq(passwd_hash_new("correct horse", yescrypt, sizeof(yescrypt)), 0);
	make("$2b$", 4, bcrypt);
	make("$6$", 1000, sha512);
}

START_TEST(test_is_hash)
{
	ck_assert(passwd_is_hash(yescrypt));
	ck_assert(passwd_is_hash(bcrypt));
	ck_assert(passwd_is_hash(sha512));
	ck_assert(passwd_is_hash("$gy$whatever"));
	/* Plaintext passwords, even ones with dollars. */
	ck_assert(!passwd_is_hash("correct horse"));
	ck_assert(!passwd_is_hash("$ecret$"));
	ck_assert(!passwd_is_hash("$1$abc$def"));
	ck_assert(!passwd_is_hash("$5$abc$def"));
	ck_assert(!passwd_is_hash(""));
	ck_assert(!passwd_is_hash(NULL));
}
END_TEST

START_TEST(test_hash_check)
{
	char why[200], bad[CRYPT_OUTPUT_SIZE + 1];     /* room for one character too many */

	ck_assert_str_eq(yescrypt, strstr(yescrypt, "$y$"));
	ck_assert_int_eq(passwd_hash_check(yescrypt, why, sizeof(why)), 0);
	ck_assert_int_eq(passwd_hash_check(bcrypt, why, sizeof(why)), 0);
	ck_assert_int_eq(passwd_hash_check(sha512, why, sizeof(why)), 0);

	/* Cut short, one character too many, a character outside the alphabet. */
	snprintf(bad, sizeof(bad), "%.*s", (int)strlen(yescrypt) - 1, yescrypt);
	ck_assert_int_eq(passwd_hash_check(bad, why, sizeof(why)), -1);
	ck_assert_str_eq(why, "malformed $y$ password hash (make one with smtpmuxd -H)");
	snprintf(bad, sizeof(bad), "%sA", bcrypt);
	ck_assert_int_eq(passwd_hash_check(bad, why, sizeof(why)), -1);
	ck_assert_str_eq(why, "malformed $2b$ password hash (make one with smtpmuxd -H)");
	snprintf(bad, sizeof(bad), "%s", sha512);
	bad[strlen(bad) - 1] = '!';
	ck_assert_int_eq(passwd_hash_check(bad, why, sizeof(why)), -1);
	ck_assert_int_eq(passwd_hash_check("$6$$", why, sizeof(why)), -1);
	/* The right shape, parameters libxcrypt refuses. */
	snprintf(bad, sizeof(bad), "$y$zzzzzz$%s", strchr(yescrypt + 7, '$') + 1);
	ck_assert_int_eq(passwd_hash_check(bad, why, sizeof(why)), -1);
	ck_assert_msg(strstr(why, "parameters libxcrypt rejects") != NULL ||
	    strstr(why, "malformed") != NULL, "%s", why);
	ck_assert_int_eq(passwd_hash_check("$1$abc$def", why, sizeof(why)), -1);
	ck_assert(strncmp(why, "not a supported password hash", 29) == 0);
}
END_TEST

START_TEST(test_verify)
{
	const char *hashes[] = { yescrypt, bcrypt, sha512 };

	for (size_t i = 0; i < 3; i++) {
		ck_assert(passwd_verify(NULL, "correct horse", hashes[i]));
		ck_assert(!passwd_verify(NULL, "correct horse ", hashes[i]));
		ck_assert(!passwd_verify(NULL, "", hashes[i]));
	}
	/* Plaintext: constant-time comparison, nothing more. */
	ck_assert(passwd_verify(NULL, "pw", "pw"));
	ck_assert(!passwd_verify(NULL, "pw", "pW"));
	ck_assert(!passwd_verify(NULL, "pw", "pw2"));
	ck_assert(!passwd_verify(NULL, "", "pw"));
	ck_assert(!passwd_verify(NULL, NULL, "pw"));
	ck_assert(!passwd_verify(NULL, "pw", NULL));
	/* A hash is never compared as plaintext. */
	ck_assert(!passwd_verify(NULL, yescrypt, yescrypt));
}
END_TEST

/* The cache saves the hash for a password verified before; it never
 * accepts another password, nor the same one for another hash. */
START_TEST(test_cache)
{
	struct passwd_cache *c = passwd_cache_new();
	char other[CRYPT_OUTPUT_SIZE];
	unsigned long hits, computed;

	ck_assert_ptr_nonnull(c);
	ck_assert(passwd_verify(c, "correct horse", yescrypt));
	passwd_cache_stats(c, &hits, &computed);
	ck_assert_uint_eq(hits, 0);
	ck_assert_uint_eq(computed, 1);
	for (int i = 0; i < 5; i++)
		ck_assert(passwd_verify(c, "correct horse", yescrypt));
	passwd_cache_stats(c, &hits, &computed);
	ck_assert_uint_eq(hits, 5);
	ck_assert_uint_eq(computed, 1);

	/* A wrong password pays the full price, every time. */
	ck_assert(!passwd_verify(c, "correct horsE", yescrypt));
	ck_assert(!passwd_verify(c, "correct horsE", yescrypt));
	passwd_cache_stats(c, &hits, &computed);
	ck_assert_uint_eq(hits, 5);
	ck_assert_uint_eq(computed, 3);
	/* ...and does not evict the right one. */
	ck_assert(passwd_verify(c, "correct horse", yescrypt));
	passwd_cache_stats(c, &hits, &computed);
	ck_assert_uint_eq(hits, 6);

	/* A new hash (the password changed, the config was reloaded) is not
	 * satisfied by what the old one accepted. */
	ck_assert_int_eq(passwd_hash_new("battery staple", other, sizeof(other)), 0);
	ck_assert(!passwd_verify(c, "correct horse", other));
	ck_assert(passwd_verify(c, "battery staple", other));
	ck_assert(passwd_verify(c, "battery staple", other));
	passwd_cache_stats(c, &hits, &computed);
	ck_assert_uint_eq(hits, 7);
	ck_assert_uint_eq(computed, 5);

	/* Plaintext passwords never touch the cache. */
	ck_assert(passwd_verify(c, "pw", "pw"));
	passwd_cache_stats(c, &hits, &computed);
	ck_assert_uint_eq(hits + computed, 12);
	passwd_cache_free(c);
	passwd_cache_stats(NULL, &hits, &computed);
	ck_assert_uint_eq(hits + computed, 0);
}
END_TEST

/* The cache never holds the password, nor a plain digest of it. */
START_TEST(test_cache_holds_no_password)
{
	struct passwd_cache *a = passwd_cache_new(), *b = passwd_cache_new();

	ck_assert(passwd_verify(a, "correct horse", yescrypt));
	ck_assert(passwd_verify(b, "correct horse", yescrypt));
	ck_assert_ptr_null(memmem(a, 4096, "correct horse", 13));
	/* Two workers, two keys: their entries differ. */
	ck_assert(memcmp(a, b, 4096) != 0);
	passwd_cache_free(a);
	passwd_cache_free(b);
}
END_TEST

/* ---- secret files ---- */

static char dir[] = "/tmp/check_passwd.XXXXXX";

static void
put(const char *name, const char *data, size_t len)
{
	char path[256];
	FILE *fp;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fp = fopen(path, "w");
	ck_assert_ptr_nonnull(fp);
	ck_assert_uint_eq(fwrite(data, 1, len, fp), len);
	ck_assert_int_eq(fclose(fp), 0);
}

static char *
read_secret(const char *name, char *why, size_t whylen)
{
	return secret_file_read(name, dir, why, whylen);
}

START_TEST(test_secret_file)
{
	char why[512], long_secret[300], *s;

	ck_assert_ptr_nonnull(mkdtemp(dir));
	unsetenv("CREDENTIALS_DIRECTORY");
	put("lf", "secret\n", 7);
	put("crlf", "secret\r\n", 8);
	put("none", "secret", 6);
	put("two", "secret\n\n", 8);
	put("empty", "", 0);
	put("newline", "\n", 1);
	put("nul", "sec\0ret\n", 8);
	put("lines", "a\nb\n", 4);
	put("cr", "a\rb", 3);
	memset(long_secret, 'x', sizeof(long_secret));
	put("long", long_secret, 256);
	put("max", long_secret, 255);

	for (const char *const *n = (const char *const[]){ "lf", "crlf", "none", NULL }; *n; n++) {
		s = read_secret(*n, why, sizeof(why));
		ck_assert_msg(s != NULL, "%s: %s", *n, why);
		ck_assert_str_eq(s, "secret");
		free(s);
	}
	s = read_secret("max", why, sizeof(why));
	ck_assert_ptr_nonnull(s);
	ck_assert_uint_eq(strlen(s), 255);
	free(s);

	/* Only one newline is dropped. */
	ck_assert_ptr_null(read_secret("two", why, sizeof(why)));
	ck_assert_msg(strstr(why, "/two holds more than one line") != NULL, "%s", why);
	ck_assert_ptr_null(read_secret("empty", why, sizeof(why)));
	ck_assert_msg(strstr(why, "/empty is empty") != NULL, "%s", why);
	ck_assert_ptr_null(read_secret("newline", why, sizeof(why)));
	ck_assert_msg(strstr(why, "/newline is empty") != NULL, "%s", why);
	ck_assert_ptr_null(read_secret("nul", why, sizeof(why)));
	ck_assert_msg(strstr(why, "/nul holds a NUL octet") != NULL, "%s", why);
	ck_assert_ptr_null(read_secret("lines", why, sizeof(why)));
	ck_assert_ptr_null(read_secret("cr", why, sizeof(why)));
	ck_assert_ptr_null(read_secret("long", why, sizeof(why)));
	ck_assert_msg(strstr(why, "/long: the secret is longer than 255 octets") != NULL, "%s", why);
	ck_assert_ptr_null(read_secret("missing", why, sizeof(why)));
	ck_assert_msg(strstr(why, "cannot open ") != NULL &&
	    strstr(why, "/missing: No such file or directory") != NULL, "%s", why);
	ck_assert_ptr_null(read_secret(".", why, sizeof(why)));
	ck_assert_msg(strstr(why, "cannot read ") != NULL, "%s", why);

	/* Absolute names ignore both folders; relative ones prefer systemd's. */
	{
		char abs[300];

		snprintf(abs, sizeof(abs), "%s/lf", dir);
		setenv("CREDENTIALS_DIRECTORY", "/nonexistent", 1);
		s = secret_file_read(abs, "/elsewhere", why, sizeof(why));
		ck_assert_ptr_nonnull(s);
		free(s);
		ck_assert_ptr_null(read_secret("lf", why, sizeof(why)));
		ck_assert_msg(strstr(why, "/nonexistent/lf") != NULL, "%s", why);
		setenv("CREDENTIALS_DIRECTORY", dir, 1);
		s = secret_file_read("lf", "/elsewhere", why, sizeof(why));
		ck_assert_ptr_nonnull(s);
		free(s);
		unsetenv("CREDENTIALS_DIRECTORY");
	}
	{
		char cmd[300];

		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
		ck_assert_int_eq(system(cmd), 0);
	}
}
END_TEST

/* ---- checks off the event loop (passwd_offload) ---- */

struct verdicts {
	struct event_base *base;
	unsigned n;
	uint64_t ticket[4];
	bool match[4];
	unsigned wanted;                 /* the loop stops at this many */
};

static void
on_verdict(void *arg, uint64_t ticket, bool match)
{
	struct verdicts *v = arg;

	ck_assert_uint_lt(v->n, 4);
	v->ticket[v->n] = ticket;
	v->match[v->n++] = match;
	if (v->n == v->wanted)
		event_base_loopbreak(v->base);
}

/* Verdicts come back on the loop, by ticket; a match is remembered by the
 * cache, so the next check of it never leaves the loop. */
START_TEST(test_offload_verdicts)
{
	struct verdicts v = { .wanted = 2 };
	struct passwd_cache *c = passwd_cache_new();
	struct passwd_offload *o;
	unsigned long hits, computed;
	uint64_t good, bad;

	v.base = event_base_new();
	ck_assert_ptr_nonnull(v.base);
	o = passwd_offload_new(v.base, c);
	ck_assert_ptr_nonnull(o);
	ck_assert_int_eq(passwd_verify_quick(c, "correct horse", yescrypt), PASSWD_NEEDS_HASH);
	good = passwd_offload_submit(o, "correct horse", yescrypt, on_verdict, &v);
	bad = passwd_offload_submit(o, "wrong horse", sha512, on_verdict, &v);
	ck_assert_uint_ne(good, 0);
	ck_assert_uint_ne(bad, 0);
	ck_assert_uint_ne(good, bad);
	ck_assert_uint_eq(passwd_offload_pending(o), 2);
	ck_assert_uint_eq(v.n, 0);                       /* never from submit itself */
	ck_assert_int_eq(event_base_dispatch(v.base), 0);
	ck_assert_uint_eq(v.n, 2);
	for (unsigned i = 0; i < 2; i++)
		ck_assert(v.match[i] == (v.ticket[i] == good));
	ck_assert_uint_eq(passwd_offload_pending(o), 0);
	passwd_cache_stats(c, &hits, &computed);
	ck_assert_uint_eq(computed, 2);
	ck_assert_int_eq(passwd_verify_quick(c, "correct horse", yescrypt), PASSWD_MATCH);
	ck_assert_int_eq(passwd_verify_quick(c, "wrong horse", sha512), PASSWD_NEEDS_HASH);
	passwd_offload_free(o);
	passwd_cache_free(c);
	event_base_free(v.base);
}
END_TEST

/* A cancelled ticket gets no verdict however far its job got, and
 * freeing with checks still pending joins the threads and frees the jobs
 * (ASan and valgrind see the rest). */
START_TEST(test_offload_cancel_and_free)
{
	struct verdicts v = { .wanted = 1 };
	struct passwd_offload *o;
	uint64_t gone, kept;

	v.base = event_base_new();
	o = passwd_offload_new(v.base, NULL);
	ck_assert_ptr_nonnull(o);
	gone = passwd_offload_submit(o, "correct horse", yescrypt, on_verdict, &v);
	kept = passwd_offload_submit(o, "correct horse", bcrypt, on_verdict, &v);
	passwd_offload_cancel(o, gone);
	passwd_offload_cancel(o, gone);                  /* twice: ignored */
	passwd_offload_cancel(o, 12345);                 /* unknown: ignored */
	ck_assert_uint_eq(passwd_offload_pending(o), 1);
	ck_assert_int_eq(event_base_dispatch(v.base), 0);
	ck_assert_uint_eq(v.n, 1);
	ck_assert_uint_eq(v.ticket[0], kept);
	ck_assert(v.match[0]);
	/* Pending at the end: no verdict, nothing leaks. */
	ck_assert_uint_ne(passwd_offload_submit(o, "x", yescrypt, on_verdict, &v), 0);
	ck_assert_uint_ne(passwd_offload_submit(o, "y", sha512, on_verdict, &v), 0);
	ck_assert_uint_ne(passwd_offload_submit(o, "z", bcrypt, on_verdict, &v), 0);
	passwd_offload_free(o);
	ck_assert_uint_eq(v.n, 1);
	event_base_free(v.base);
}
END_TEST

/* The pending checks are bounded: one more is refused, not queued. */
START_TEST(test_offload_bounded)
{
	struct event_base *base = event_base_new();
	struct passwd_offload *o = passwd_offload_new(base, NULL);
	struct verdicts v = { .base = base };

	ck_assert_ptr_nonnull(o);
	for (unsigned i = 0; i < PASSWD_OFFLOAD_MAX_PENDING; i++)
		ck_assert_uint_ne(passwd_offload_submit(o, "p", sha512, on_verdict, &v), 0);
	ck_assert_uint_eq(passwd_offload_submit(o, "p", sha512, on_verdict, &v), 0);
	ck_assert_uint_eq(passwd_offload_pending(o), PASSWD_OFFLOAD_MAX_PENDING);
	passwd_offload_free(o);
	ck_assert_uint_eq(v.n, 0);
	event_base_free(base);
}
END_TEST

static Suite *
passwd_suite(void)
{
	Suite *s = suite_create("passwd");
	TCase *tc = tcase_create("hashes");
	TCase *files = tcase_create("files");

	tcase_add_unchecked_fixture(tc, hashes_setup, NULL);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_is_hash);
	tcase_add_test(tc, test_hash_check);
	tcase_add_test(tc, test_verify);
	tcase_add_test(tc, test_cache);
	tcase_add_test(tc, test_cache_holds_no_password);
	tcase_add_test(tc, test_offload_verdicts);
	tcase_add_test(tc, test_offload_cancel_and_free);
	tcase_add_test(tc, test_offload_bounded);
	suite_add_tcase(s, tc);
	tcase_add_test(files, test_secret_file);
	suite_add_tcase(s, files);
	return s;
}

int
main(void)
{
	SRunner *sr;
	int failed;

	if (tls_global_init() != 0)
		return 99;
	sr = srunner_create(passwd_suite());
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	tls_global_deinit();
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

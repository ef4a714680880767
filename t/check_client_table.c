/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of the shared per-client-address table (client_table.c):
 * session counts per worker slot, AUTH failure windows and lockouts,
 * expiry, a full table, and several processes using it at once.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "client_table.h"

#define SLOTS 127
static const struct client_auth_policy policy = { 3, 600, 900 };

START_TEST(sessions_across_slots)
{
	struct client_table *t = client_table_create(64, SLOTS);
	struct client_entry *a, *b, *c, *other;
	unsigned n;

	ck_assert_ptr_nonnull(t);
	a = client_table_open(t, "192.0.2.1", 0, 100, &n);
	ck_assert_ptr_nonnull(a);
	ck_assert_uint_eq(n, 1);
	b = client_table_open(t, "192.0.2.1", 5, 100, &n);
	ck_assert_ptr_eq(a, b);
	ck_assert_uint_eq(n, 2);
	other = client_table_open(t, "2001:db8::1", 5, 100, &n);
	ck_assert_ptr_nonnull(other);
	ck_assert_ptr_ne(other, a);
	ck_assert_uint_eq(n, 1);
	c = client_table_open(t, "192.0.2.1", 126, 100, &n);
	ck_assert_uint_eq(n, 3);
	client_table_close(t, b, 5, 101);
	client_table_open(t, "192.0.2.1", 0, 101, &n);
	ck_assert_uint_eq(n, 3);
	/* a dead worker's sessions are dropped; closing them later is harmless */
	client_table_worker_gone(t, 0);
	client_table_open(t, "192.0.2.1", 1, 102, &n);
	ck_assert_uint_eq(n, 2);                /* slot 126 and slot 1 */
	client_table_close(t, a, 0, 102);
	client_table_close(t, a, 0, 102);
	client_table_open(t, "192.0.2.1", 2, 102, &n);
	ck_assert_uint_eq(n, 3);
	ck_assert_ptr_eq(c, a);
	/* a slot beyond the table is not counted */
	ck_assert_ptr_null(client_table_open(t, "192.0.2.1", SLOTS, 102, &n));
	ck_assert_uint_eq(n, 1);
	client_table_destroy(t);
}
END_TEST

/* Every entry taken by a live session: a new address is not tracked, and
 * not refused either (fail open). */
START_TEST(full_table_fails_open)
{
	struct client_table *t = client_table_create(4, SLOTS);
	char addr[32];
	unsigned n;

	for (int i = 0; i < 4; i++) {
		snprintf(addr, sizeof(addr), "198.51.100.%d", i);
		ck_assert_ptr_nonnull(client_table_open(t, addr, 0, 100, &n));
	}
	ck_assert_ptr_null(client_table_open(t, "203.0.113.9", 0, 100, &n));
	ck_assert_uint_eq(n, 1);
	ck_assert_int_eq(client_table_auth_failed(t, "203.0.113.9", &policy, 100, &n),
	    CLIENT_AUTH_COUNTED);
	ck_assert(!client_table_auth_locked(t, "203.0.113.9", 100, NULL));
	client_table_destroy(t);
}
END_TEST

/* An address with no session, no failure window and no lockout expires,
 * and its entry serves another address. */
START_TEST(entries_expire)
{
	struct client_table *t = client_table_create(1, SLOTS);
	struct client_entry *a, *b;
	unsigned n;

	a = client_table_open(t, "192.0.2.1", 0, 100, &n);
	ck_assert_ptr_nonnull(a);
	ck_assert_ptr_null(client_table_open(t, "192.0.2.2", 0, 100, &n));
	client_table_close(t, a, 0, 100);
	ck_assert_ptr_null(client_table_open(t, "192.0.2.2", 0, 101, &n));   /* grace */
	b = client_table_open(t, "192.0.2.2", 0, 200, &n);
	ck_assert_ptr_eq(b, a);
	ck_assert_uint_eq(n, 1);
	client_table_close(t, b, 0, 200);

	/* A failure keeps the entry for its window, a lockout for its length. */
	ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.2", &policy, 300, &n),
	    CLIENT_AUTH_COUNTED);
	ck_assert_ptr_null(client_table_open(t, "192.0.2.3", 0, 899, &n));
	ck_assert_ptr_nonnull(client_table_open(t, "192.0.2.3", 0, 900, &n));
	ck_assert(!client_table_auth_locked(t, "192.0.2.2", 900, NULL));
	client_table_destroy(t);
}
END_TEST

START_TEST(auth_lockout)
{
	struct client_table *t = client_table_create(64, SLOTS);
	int64_t until;
	unsigned n;

	ck_assert(!client_table_auth_locked(t, "192.0.2.7", 1000, &until));
	ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.7", &policy, 1000, &n),
	    CLIENT_AUTH_COUNTED);
	ck_assert_uint_eq(n, 1);
	ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.7", &policy, 1001, &n),
	    CLIENT_AUTH_COUNTED);
	ck_assert_uint_eq(n, 2);
	/* another address is not affected */
	ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.8", &policy, 1001, &n),
	    CLIENT_AUTH_COUNTED);
	ck_assert_uint_eq(n, 1);
	ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.7", &policy, 1002, &n),
	    CLIENT_AUTH_LOCKED_NOW);
	ck_assert(client_table_auth_locked(t, "192.0.2.7", 1002, &until));
	ck_assert_int_eq(until, 1002 + 900);
	ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.7", &policy, 1003, &n),
	    CLIENT_AUTH_LOCKED);
	ck_assert(client_table_auth_locked(t, "192.0.2.7", 1901, NULL));
	ck_assert(!client_table_auth_locked(t, "192.0.2.7", 1902, NULL));
	/* after the lockout, counting starts over */
	ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.7", &policy, 1902, &n),
	    CLIENT_AUTH_COUNTED);
	ck_assert_uint_eq(n, 1);
	ck_assert(!client_table_auth_locked(t, "192.0.2.8", 1002, NULL));
	client_table_destroy(t);
}
END_TEST

/* Failures older than the window do not count. */
START_TEST(auth_window)
{
	struct client_table *t = client_table_create(64, SLOTS);
	unsigned n;

	client_table_auth_failed(t, "192.0.2.9", &policy, 1000, &n);
	client_table_auth_failed(t, "192.0.2.9", &policy, 1599, &n);
	ck_assert_uint_eq(n, 2);
	ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.9", &policy, 1600, &n),
	    CLIENT_AUTH_COUNTED);
	ck_assert_uint_eq(n, 1);
	/* max_failures 0: no lockout at all */
	{
		const struct client_auth_policy off = { 0, 600, 900 };

		for (int i = 0; i < 10; i++)
			ck_assert_int_eq(client_table_auth_failed(t, "192.0.2.10", &off, 1000, &n),
			    CLIENT_AUTH_COUNTED);
		ck_assert(!client_table_auth_locked(t, "192.0.2.10", 1000, NULL));
	}
	client_table_destroy(t);
}
END_TEST

/*
 * Eight processes at once on one address: sessions opened and closed in
 * their own slots never leave a count behind, and of all their failures
 * exactly one starts the lockout.
 */
START_TEST(processes_share_the_table)
{
	struct client_table *t = client_table_create(256, SLOTS);
	const struct client_auth_policy many = { 50, 600, 900 };
	int locked_now = 0;
	unsigned n;

	for (int p = 0; p < 8; p++) {
		pid_t pid = fork();

		ck_assert_int_ge(pid, 0);
		if (pid == 0) {
			int mine = 0;

			for (int i = 0; i < 2000; i++) {
				struct client_entry *e = client_table_open(t, "192.0.2.50", (unsigned)p,
				    100, &n);

				if (e == NULL || n < 1 || n > 8)
					_exit(100);
				client_table_close(t, e, (unsigned)p, 100);
			}
			for (int i = 0; i < 20; i++)
				mine += client_table_auth_failed(t, "192.0.2.50", &many, 100, &n) ==
				    CLIENT_AUTH_LOCKED_NOW;
			_exit(mine);
		}
	}
	for (int p = 0; p < 8; p++) {
		int status;

		ck_assert_int_gt(wait(&status), 0);
		ck_assert(WIFEXITED(status));
		ck_assert_int_lt(WEXITSTATUS(status), 100);
		locked_now += WEXITSTATUS(status);
	}
	ck_assert_int_eq(locked_now, 1);
	ck_assert(client_table_auth_locked(t, "192.0.2.50", 100, NULL));
	client_table_open(t, "192.0.2.50", 0, 100, &n);
	ck_assert_uint_eq(n, 1);
	client_table_destroy(t);
}
END_TEST

static Suite *
client_table_suite(void)
{
	Suite *s = suite_create("client_table");
	TCase *tc = tcase_create("table");

	tcase_add_test(tc, sessions_across_slots);
	tcase_add_test(tc, full_table_fails_open);
	tcase_add_test(tc, entries_expire);
	tcase_add_test(tc, auth_lockout);
	tcase_add_test(tc, auth_window);
	tcase_add_test(tc, processes_share_the_table);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(client_table_suite());
	int failed;

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

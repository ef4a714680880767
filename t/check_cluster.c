/* SPDX-License-Identifier: MIT */
/*
 * The cluster's Lua scripts (libsmtpmux/cluster_scripts.c) and its link
 * (cluster_link.c) against a real redis-server, started on a Unix socket
 * in a temporary folder and stopped at the end. Needs redis-server (the
 * Debian package), so it is not one of the UNIT_TESTS the package build
 * runs. The scripts take the time as an argument, so every window and
 * lease is exercised without waiting for it.
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "cluster_link.h"
#include "cluster_scripts.h"
#include "config.h"

static char dir[] = "/tmp/smtpmux-check-cluster.XXXXXX";
static char sock[256];
static pid_t redis_pid;
static redisContext *rc;
static long long T;                  /* "now" for the scripts: the server's, plus a margin */

static void
redis_start(void)
{
	char conf[300];

	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(sock, sizeof(sock), "%s/redis.sock", dir);
	snprintf(conf, sizeof(conf), "%s/redis.log", dir);
	redis_pid = fork();
	ck_assert_int_ge(redis_pid, 0);
	if (redis_pid == 0) {
		execl("/usr/bin/redis-server", "redis-server", "--port", "0", "--unixsocket", sock,
		    "--save", "", "--appendonly", "no", "--dir", dir, "--logfile", conf, (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 2000; i++) {
		rc = redisConnectUnix(sock);
		if (rc != NULL && rc->err == 0)
			break;
		if (rc != NULL)
			redisFree(rc);
		rc = NULL;
		usleep(5000);
	}
	ck_assert_msg(rc != NULL, "redis-server did not start");
}

static void
setup(void)
{
	redisReply *r;

	redis_start();
	r = redisCommand(rc, "TIME");
	ck_assert_ptr_nonnull(r);
	T = atoll(r->element[0]->str) * 1000 + 10000;
	freeReplyObject(r);
}

static void
teardown(void)
{
	char cmd[300];

	if (rc != NULL)
		redisFree(rc);
	kill(redis_pid, SIGCONT);
	kill(redis_pid, SIGKILL);
	waitpid(redis_pid, NULL, 0);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	(void)!system(cmd);
	strcpy(dir, "/tmp/smtpmux-check-cluster.XXXXXX");
}

/* EVAL of a script with the four keys of downstream "ds"; the reply. */
static redisReply *
run(enum cluster_script s, int nargs, const char **args)
{
	const char *argv[40] = { "EVAL", cluster_script_source(s), "4", "h", "m", "hr", "d" };
	int argc = 7;
	redisReply *r;

	for (int i = 0; i < nargs; i++)
		argv[argc++] = args[i];
	r = redisCommandArgv(rc, argc, argv, NULL);
	ck_assert_ptr_nonnull(r);
	ck_assert_msg(r->type != REDIS_REPLY_ERROR, "%s: %s", cluster_script_name(s), r->str);
	return r;
}

static long long
field(const redisReply *r, size_t i)
{
	ck_assert_uint_gt(r->elements, i);
	return r->element[i]->integer;
}

static const char *
ms(long long t, char buf[32])
{
	snprintf(buf, 32, "%lld", t);
	return buf;
}

/* BEGIN at t (lease 300 s, no day limit); the reply (free it). */
static redisReply *
begin_reply(long long t, bool gated, const char *member, const char *minute, const char *hour)
{
	char now[32];
	const char *args[] = { ms(t, now), gated ? "1" : "0", member, "300000", minute, hour, "0" };

	return run(CLUSTER_BEGIN, 7, args);
}

/* BEGIN at t; returns the verdict, *trial the trial flag. */
static long long
begin(long long t, bool gated, const char *member, const char *minute, const char *hour,
    int *trial)
{
	redisReply *r = begin_reply(t, gated, member, minute, hour);
	long long v = field(r, CLUSTER_R_VERDICT);

	if (trial != NULL)
		*trial = (int)field(r, CLUSTER_R_TRIAL);
	freeReplyObject(r);
	return v;
}

/* END at t of member; the reply (free it). */
static redisReply *
end(long long t, const char *member, const char *outcome, const char *mode,
    const char *minute, const char *hour, bool calendar)
{
	char now[32];
	const char *args[] = { ms(t, now), member, outcome, "0", mode, minute, hour, "0",
		calendar ? "1" : "0", "2", "30", "120", "60", "300000" };

	return run(CLUSTER_END, 14, args);
}

static void
end_free(long long t, const char *member, const char *outcome, const char *minute,
    const char *hour)
{
	freeReplyObject(end(t, member, outcome, "full", minute, hour, false));
}

static long long
zcount(const char *key, long long t)
{
	redisReply *r = redisCommand(rc, "ZCOUNT %s (%lld +inf", key, t);
	long long n = r->integer;

	freeReplyObject(r);
	return n;
}

START_TEST(test_quota_exact_and_atomic)
{
	char m[16];

	/* minute 5, hour 3: the hour fills first, and a refusal adds nothing anywhere */
	for (int i = 0; i < 3; i++) {
		snprintf(m, sizeof(m), "a%d", i);
		ck_assert_int_eq(begin(T, true, m, "5", "3", NULL), CLUSTER_ADMITTED);
	}
	ck_assert_int_eq(begin(T, true, "a3", "5", "3", NULL), CLUSTER_OVER_QUOTA);
	ck_assert_int_eq(zcount("m", T), 3);
	ck_assert_int_eq(zcount("hr", T), 3);
	/* a failed attempt gives its place back in every window */
	end_free(T + 1000, "a1", "fail", "5", "3");
	ck_assert_int_eq(zcount("hr", T), 2);
	ck_assert_int_eq(begin(T + 2000, true, "a4", "5", "3", NULL), CLUSTER_ADMITTED);
	ck_assert_int_eq(begin(T + 2000, true, "a5", "5", "3", NULL), CLUSTER_OVER_QUOTA);
}
END_TEST

START_TEST(test_rolling_window)
{
	/* delivered at T+1000: counts until T+61000 in the minute window */
	ck_assert_int_eq(begin(T, true, "r0", "1", "0", NULL), CLUSTER_ADMITTED);
	end_free(T + 1000, "r0", "ok", "1", "0");
	ck_assert_int_eq(begin(T + 60999, true, "r1", "1", "0", NULL), CLUSTER_OVER_QUOTA);
	ck_assert_int_eq(begin(T + 61000, true, "r1", "1", "0", NULL), CLUSTER_ADMITTED);
}
END_TEST

START_TEST(test_calendar_window)
{
	long long minute_end = (T / 60000 + 1) * 60000;
	redisReply *r;

	ck_assert_int_eq(begin(T, true, "c0", "1", "0", NULL), CLUSTER_ADMITTED);
	r = end(T, "c0", "ok", "full", "1", "0", true);
	freeReplyObject(r);
	ck_assert_int_eq(begin(minute_end - 1, true, "c1", "1", "0", NULL), CLUSTER_OVER_QUOTA);
	ck_assert_int_eq(begin(minute_end, true, "c1", "1", "0", NULL), CLUSTER_ADMITTED);
}
END_TEST

/* BEGIN at t over quota: when its full windows have room again. */
static long long
reopens(long long t, const char *member, const char *minute, const char *hour)
{
	redisReply *r = begin_reply(t, true, member, minute, hour);
	long long at;

	ck_assert_int_eq(field(r, CLUSTER_R_VERDICT), CLUSTER_OVER_QUOTA);
	ck_assert_uint_eq(r->elements, CLUSTER_R_FIELDS);
	at = field(r, CLUSTER_R_REOPENS);
	freeReplyObject(r);
	return at;
}

/* A refusal for full windows says when the queue may try again: the
 * latest moment over the full windows that one of their entries stops
 * counting (the oldest, or the one past the limit after a smaller limit). */
START_TEST(test_over_quota_reopens)
{
	redisReply *r;

	ck_assert_int_eq(begin(T, true, "q0", "2", "5", NULL), CLUSTER_ADMITTED);
	end_free(T + 1000, "q0", "ok", "2", "5");        /* minute: until T+61000 */
	ck_assert_int_eq(begin(T + 2000, true, "q1", "2", "5", NULL), CLUSTER_ADMITTED);
	end_free(T + 3000, "q1", "ok", "2", "5");        /* minute: until T+63000 */
	ck_assert_int_eq(reopens(T + 4000, "q2", "2", "5"), T + 61000);
	/* a limit lowered below the count: the entry that brings it under */
	ck_assert_int_eq(reopens(T + 4000, "q2", "1", "5"), T + 63000);
	/* the hour full too: its entry ends last */
	ck_assert_int_eq(reopens(T + 4000, "q2", "2", "2"), T + 1000 + 3600000);
	/* the minute empty again, the hour still full */
	ck_assert_int_eq(reopens(T + 63000, "q2", "2", "2"), T + 1000 + 3600000);
	/* admitted, END and MERGE say 0 */
	r = begin_reply(T + 63000, true, "q3", "2", "3");
	ck_assert_int_eq(field(r, CLUSTER_R_VERDICT), CLUSTER_ADMITTED);
	ck_assert_int_eq(field(r, CLUSTER_R_REOPENS), 0);
	freeReplyObject(r);
	r = end(T + 63000, "q3", "cancelled", "full", "2", "3", false);
	ck_assert_uint_eq(r->elements, CLUSTER_R_FIELDS);
	ck_assert_int_eq(field(r, CLUSTER_R_REOPENS), 0);
	freeReplyObject(r);
}
END_TEST

/* A window full of an attempt under way: when it ends is not known. */
START_TEST(test_over_quota_under_way)
{
	ck_assert_int_eq(begin(T, true, "u0", "1", "0", NULL), CLUSTER_ADMITTED);
	ck_assert_int_eq(reopens(T + 1000, "u1", "1", "0"), 0);
}
END_TEST

/* An attempt under way holds its place whatever its age, until its lease
 * (a worker that died without ending it). */
START_TEST(test_pending_lease)
{
	ck_assert_int_eq(begin(T, true, "p0", "1", "0", NULL), CLUSTER_ADMITTED);
	ck_assert_int_eq(begin(T + 299999, true, "p1", "1", "0", NULL), CLUSTER_OVER_QUOTA);
	ck_assert_int_eq(begin(T + 300000, true, "p1", "1", "0", NULL), CLUSTER_ADMITTED);
}
END_TEST

START_TEST(test_circuit_and_one_trial)
{
	int trial;
	redisReply *r;

	/* fail_threshold 2, cooldown 30 s, max_cooldown 120 s */
	ck_assert_int_eq(begin(T, true, "f0", "0", "0", NULL), CLUSTER_ADMITTED);
	end_free(T, "f0", "fail", "0", "0");
	ck_assert_int_eq(begin(T, true, "f1", "0", "0", NULL), CLUSTER_ADMITTED);
	end_free(T, "f1", "fail", "0", "0");
	ck_assert_int_eq(begin(T + 1, true, "x", "0", "0", NULL), CLUSTER_DOWN);
	ck_assert_int_eq(begin(T + 1, false, "last", "0", "0", &trial), CLUSTER_ADMITTED);
	ck_assert_int_eq(trial, 0);
	/* half-open: exactly one trial, whoever asks */
	ck_assert_int_eq(begin(T + 30000, true, "t0", "0", "0", &trial), CLUSTER_ADMITTED);
	ck_assert_int_eq(trial, 1);
	ck_assert_int_eq(begin(T + 30001, true, "t1", "0", "0", NULL), CLUSTER_TRIAL_TAKEN);
	/* the trial fails: open again for twice as long */
	r = end(T + 31000, "t0", "fail", "full", "0", "0", false);
	ck_assert_int_eq(field(r, CLUSTER_R_STATE + CLUSTER_S_COOLDOWN), 60);
	ck_assert_int_eq(field(r, CLUSTER_R_STATE + CLUSTER_S_OPEN_UNTIL), T + 31000 + 60000);
	freeReplyObject(r);
	ck_assert_int_eq(begin(T + 91000, true, "t2", "0", "0", &trial), CLUSTER_ADMITTED);
	ck_assert_int_eq(trial, 1);
	/* a cancelled trial is free again at once */
	freeReplyObject(end(T + 91001, "t2", "cancelled", "full", "0", "0", false));
	ck_assert_int_eq(begin(T + 91002, true, "t3", "0", "0", &trial), CLUSTER_ADMITTED);
	ck_assert_int_eq(trial, 1);
	/* and a good one closes the circuit for everyone */
	r = end(T + 92000, "t3", "ok", "full", "0", "0", false);
	ck_assert_int_eq(field(r, CLUSTER_R_STATE + CLUSTER_S_OPEN_UNTIL), 0);
	ck_assert_int_eq(field(r, CLUSTER_R_STATE + CLUSTER_S_FAILS), 0);
	freeReplyObject(r);
	ck_assert_int_eq(begin(T + 92001, true, "y", "0", "0", NULL), CLUSTER_ADMITTED);
}
END_TEST

START_TEST(test_throttle)
{
	ck_assert_int_eq(begin(T, true, "q0", "0", "0", NULL), CLUSTER_ADMITTED);
	end_free(T, "q0", "throttled", "0", "0");
	ck_assert_int_eq(begin(T + 59999, true, "q1", "0", "0", NULL), CLUSTER_THROTTLED);
	ck_assert_int_eq(begin(T + 59999, false, "q1", "0", "0", NULL), CLUSTER_ADMITTED);
	ck_assert_int_eq(begin(T + 60000, true, "q2", "0", "0", NULL), CLUSTER_ADMITTED);
}
END_TEST

/* Reconciliation: a delivery decided while the link was down counts once,
 * however often its END is replayed; a failed one gives back a place Redis
 * may have kept. */
START_TEST(test_replay)
{
	char now[32];
	const char *args[] = { ms(T, now), "lost", "ok", "5000", "replay", "10", "0", "0", "0",
		"2", "30", "120", "60", "300000" };

	freeReplyObject(run(CLUSTER_END, 14, args));
	freeReplyObject(run(CLUSTER_END, 14, args));
	ck_assert_int_eq(zcount("m", T), 1);
	/* counted from when it ended (5 s before T) */
	ck_assert_int_eq(zcount("m", T + 55000 - 1), 1);
	ck_assert_int_eq(zcount("m", T + 55000), 0);
	ck_assert_int_eq(begin(T, true, "u0", "10", "0", NULL), CLUSTER_ADMITTED);
	args[1] = "u0";
	args[2] = "cancelled";
	freeReplyObject(run(CLUSTER_END, 14, args));
	ck_assert_int_eq(zcount("m", T), 1);
}
END_TEST

START_TEST(test_merge_and_republish)
{
	char now[32];
	const char *argv[] = { "EVAL", cluster_script_source(CLUSTER_MERGE), "1", "h",
		ms(T, now), "20000", "30", "0" };
	const char *rep[] = { "EVAL", cluster_script_source(CLUSTER_REPUBLISH), "1", "m", now,
		"60000", "300000", "i:cell:0", "1000", "i:cell:1", "2000" };
	redisReply *r;

	r = redisCommandArgv(rc, 8, argv, NULL);
	ck_assert_int_eq(r->type, REDIS_REPLY_ARRAY);
	freeReplyObject(r);
	ck_assert_int_eq(begin(T + 1, true, "z", "0", "0", NULL), CLUSTER_DOWN);
	ck_assert_int_eq(begin(T + 4999, true, "z", "0", "0", NULL), CLUSTER_DOWN);
	/* an earlier end never shortens what the cluster knows */
	argv[5] = "1000";
	freeReplyObject(redisCommandArgv(rc, 8, argv, NULL));
	ck_assert_int_eq(begin(T + 19999, true, "z", "0", "0", NULL), CLUSTER_DOWN);
	ck_assert_int_eq(begin(T + 20000, true, "z", "0", "0", NULL), CLUSTER_ADMITTED);
	/* a throttle seen by this instance joins too */
	argv[5] = "0";
	argv[7] = "5000";
	freeReplyObject(redisCommandArgv(rc, 8, argv, NULL));
	ck_assert_int_eq(begin(T + 4999, true, "z", "0", "0", NULL), CLUSTER_THROTTLED);
	/* republishing is idempotent: members are named after their cells */
	freeReplyObject(redisCommandArgv(rc, 11, rep, NULL));
	freeReplyObject(redisCommandArgv(rc, 11, rep, NULL));
	ck_assert_int_eq(zcount("m", T), 2);
	ck_assert_int_eq(zcount("m", T + 1000), 1);
}
END_TEST

/* ---- the link: bounded calls, down and back ---- */

struct link_test {
	struct event_base *base;
	int ups, downs;
	int replies, nulls;
	bool done;
};

static void
lt_up(void *arg, bool epoch_changed)
{
	struct link_test *lt = arg;

	(void)epoch_changed;
	lt->ups++;
	event_base_loopbreak(lt->base);
}

static void
lt_down(void *arg)
{
	((struct link_test *)arg)->downs++;
}

static void
lt_reply(void *arg, struct redisReply *r)
{
	struct link_test *lt = arg;

	if (r == NULL)
		lt->nulls++;
	else
		lt->replies++;
	event_base_loopbreak(lt->base);
}

static const struct link_hooks lt_hooks = { lt_up, lt_down };

static void
run_loop(struct event_base *base, int seconds)
{
	struct timeval tv = { seconds, 0 };

	event_base_loopexit(base, &tv);
	event_base_dispatch(base);
}

START_TEST(test_link_timeout_and_back)
{
	struct cluster_cfg cfg = { .enabled = true, .key_prefix = "t:", .timeout_ms = 200,
		.connect_timeout_ms = 1000, .retry_interval = 1 };
	struct link_test lt = { .base = event_base_new() };
	struct cluster_link *l;
	const char *ping[] = { "PING" };
	struct timespec t0, t1;
	long elapsed;

	cfg.url.socket = sock;
	cfg.url.display = "unix:test";
	l = link_new(lt.base, NULL, &cfg, "/tmp", &lt_hooks, &lt, true);
	ck_assert_ptr_nonnull(l);
	ck_assert_int_eq(link_call(l, 1, ping, NULL, lt_reply, &lt), -1);  /* not up yet */
	run_loop(lt.base, 10);
	ck_assert_int_eq(lt.ups, 1);
	ck_assert(link_is_up(l));
	ck_assert_msg(strncmp(link_server(l), "Redis ", 6) == 0 || strncmp(link_server(l), "Valkey ", 7) == 0, "%s", link_server(l));
	ck_assert_int_eq(link_call(l, 1, ping, NULL, lt_reply, &lt), 0);
	run_loop(lt.base, 10);
	ck_assert_int_eq(lt.replies, 1);
	/* a stuck Redis: the call is answered NULL after timeout_ms, not later */
	kill(redis_pid, SIGSTOP);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ck_assert_int_eq(link_call(l, 1, ping, NULL, lt_reply, &lt), 0);
	run_loop(lt.base, 10);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	elapsed = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
	ck_assert_int_eq(lt.nulls, 1);
	ck_assert_int_eq(lt.downs, 1);
	ck_assert_msg(elapsed >= 190, "answered after %ld ms", elapsed);
	ck_assert(!link_is_up(l));
	ck_assert_int_eq(link_call(l, 1, ping, NULL, lt_reply, &lt), -1);
	/* it comes back by itself */
	kill(redis_pid, SIGCONT);
	run_loop(lt.base, 10);
	ck_assert_int_eq(lt.ups, 2);
	ck_assert(link_is_up(l));
	link_free(l);
	event_base_free(lt.base);
}
END_TEST

static Suite *
cluster_suite(void)
{
	Suite *s = suite_create("cluster");
	TCase *tc = tcase_create("scripts");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_quota_exact_and_atomic);
	tcase_add_test(tc, test_rolling_window);
	tcase_add_test(tc, test_calendar_window);
	tcase_add_test(tc, test_pending_lease);
	tcase_add_test(tc, test_over_quota_reopens);
	tcase_add_test(tc, test_over_quota_under_way);
	tcase_add_test(tc, test_circuit_and_one_trial);
	tcase_add_test(tc, test_throttle);
	tcase_add_test(tc, test_replay);
	tcase_add_test(tc, test_merge_and_republish);
	tcase_add_test(tc, test_link_timeout_and_back);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(cluster_suite());
	int failed;

	if (access("/usr/bin/redis-server", X_OK) != 0) {
		fprintf(stderr, "check_cluster: redis-server is not installed (Debian: redis-server)\n");
		return 77;                   /* automake: skipped */
	}
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? 0 : 1;
}

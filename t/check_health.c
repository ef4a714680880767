/* SPDX-License-Identifier: MIT */
/*
 * The shared health segment: quotas exact under concurrent processes, the
 * circuit breaker, throttling, rebinding by key, dead workers, read-only
 * readers, and the status table and Prometheus endpoint built on it.
 * Time is injected; concurrency uses real forked processes.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>

#include "health.h"
#include "../smtpmuxd/status.h"

/* 10:00:00 UTC: a day, an hour and a minute start here */
#define T0 ((time_t)1700006400 + 10 * 3600)

static char dir[64];
static char path[128];

static void
setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/check_health.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/state", dir);
}

static void
teardown(void)
{
	unlink(path);
	rmdir(dir);
}

/* --- a configuration built by hand */

#define TUSERS 3
#define TDS 3

struct tcfg {
	struct config cfg;
	struct user_cfg users[TUSERS];
	struct downstream_cfg ds[TUSERS][TDS];
};

static const struct health_cfg hcfg = { .fail_threshold = 3, .cooldown = 30,
	.max_cooldown = 100, .throttle_backoff = 60 };

static struct downstream_cfg *
tds(struct tcfg *t, size_t u, const char *name, const char *addr, const char *user)
{
	struct user_cfg *uc = &t->users[u];
	struct downstream_cfg *d = &t->ds[u][uc->n_downstreams++];

	uc->downstreams = t->ds[u];
	d->name = (char *)name;
	d->addr = (char *)addr;
	d->user = (char *)user;
	d->weight = 1;
	return d;
}

static void
tuser(struct tcfg *t, size_t u, const char *email)
{
	memset(t, 0, u == 0 ? sizeof(*t) : 0);
	t->users[u].email = (char *)email;
	t->cfg.users = t->users;
	t->cfg.n_users = u + 1;
	t->cfg.health = hcfg;
	t->cfg.state_file = path;
}

static struct health *
create_bound(struct tcfg *t)
{
	char err[256] = "";
	struct health *h = health_create(path);

	ck_assert_ptr_nonnull(h);
	ck_assert_msg(health_bind(h, &t->cfg, err, sizeof(err)) == 0, "bind: %s", err);
	return h;
}

/* One downstream "a" for one user, with the given per-minute/hour/day limits. */
static struct downstream_cfg *
one_downstream(struct tcfg *t, unsigned m, unsigned hr, unsigned d)
{
	struct downstream_cfg *ds;

	tuser(t, 0, "app@example.org");
	ds = tds(t, 0, "a", "smtp.a.test:587", "acct");
	ds->max_per_minute = m;
	ds->max_per_hour = hr;
	ds->max_per_day = d;
	return ds;
}

static struct smtpmux_downstream_view
view_at(const struct downstream_cfg *ds, time_t now)
{
	struct smtpmux_downstream_view v;

	health_view(ds->health, ds, &hcfg, now, &v);
	return v;
}

static unsigned
begin_n(struct downstream_cfg *ds, unsigned tries, unsigned slot, time_t now)
{
	unsigned granted = 0;

	for (unsigned i = 0; i < tries; i++)
		granted += health_begin(ds->health, ds, slot, now);
	return granted;
}

/* --- forked children released together */

struct shared {
	_Atomic int granted;
	_Atomic int won[16];
};

static struct shared *
shared_new(void)
{
	void *p = mmap(NULL, sizeof(struct shared), PROT_READ | PROT_WRITE,
	    MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	ck_assert_ptr_ne(p, MAP_FAILED);
	memset(p, 0, sizeof(struct shared));
	return p;
}

typedef void (*child_fn)(unsigned i, void *arg);

/* Forks n children that wait at a gate, opens it, and reaps them all. */
static void
run_children(unsigned n, child_fn fn, void *arg, int expect_status)
{
	pid_t pid[16];
	int gate[2];
	char c;

	ck_assert_uint_le(n, 16);
	ck_assert_int_eq(pipe(gate), 0);
	for (unsigned i = 0; i < n; i++) {
		pid[i] = fork();
		ck_assert_int_ge(pid[i], 0);
		if (pid[i] == 0) {
			close(gate[1]);
			while (read(gate[0], &c, 1) < 0 && errno == EINTR)
				;
			fn(i, arg);
			_exit(0);
		}
	}
	close(gate[0]);
	close(gate[1]);                  /* EOF releases every child at once */
	for (unsigned i = 0; i < n; i++) {
		int status;
		ck_assert_int_eq(waitpid(pid[i], &status, 0), pid[i]);
		ck_assert(WIFEXITED(status));
		ck_assert_int_eq(WEXITSTATUS(status), expect_status);
	}
}

struct race {
	struct downstream_cfg *ds;
	struct shared *sh;
	time_t now;
	unsigned tries;
};

static void
child_begin(unsigned i, void *arg)
{
	struct race *r = arg;

	for (unsigned k = 0; k < r->tries; k++)
		if (health_begin(r->ds->health, r->ds, i, r->now)) {
			atomic_fetch_add(&r->sh->granted, 1);
			atomic_fetch_add(&r->sh->won[i], 1);
		}
}

/* --- the segment file */

START_TEST(test_create_reuse_reinit)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 0, 0, 0);
	struct health *h = create_bound(&t);
	struct health_snapshot s;

	ck_assert(health_begin(ds->health, ds, 0, T0));
	health_end(ds->health, ds, &hcfg, 0, T0, HEALTH_OK, 40, NULL);
	ck_assert(health_begin(ds->health, ds, 0, T0));   /* in flight when "killed" */
	ck_assert_uint_eq(health_user_next(t.users[0].health), 0);
	ck_assert_uint_eq(health_user_next(t.users[0].health), 1);
	health_destroy(h);

	/* a restart keeps counters, quotas and sequences, forgets in-flight */
	h = create_bound(&t);
	ck_assert_uint_eq(view_at(ds, T0).attempts, 1);
	ck_assert_uint_eq(view_at(ds, T0).successes, 1);
	ck_assert_uint_eq(view_at(ds, T0).in_flight, 0);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 2);
	ck_assert_uint_eq(health_user_next(t.users[0].health), 2);
	health_destroy(h);

	/* another layout version: start afresh */
	int fd = open(path, O_WRONLY);
	uint32_t bogus = HEALTH_LAYOUT_VERSION + 1;
	ck_assert_int_eq(pwrite(fd, &bogus, sizeof(bogus), 8), sizeof(bogus));
	ck_assert_ptr_null(health_open_readonly(path));
	ck_assert_int_eq(errno, EPROTO);
	close(fd);
	h = create_bound(&t);
	ck_assert_uint_eq(view_at(ds, T0).attempts, 0);
	ck_assert_uint_eq(health_user_next(t.users[0].health), 0);
	health_destroy(h);

	/* another size: start afresh too */
	ck_assert_int_eq(truncate(path, 4096), 0);
	ck_assert_ptr_null(health_open_readonly(path));
	h = create_bound(&t);
	ck_assert_uint_eq(health_count(h), 1);
	health_destroy(h);
}
END_TEST

START_TEST(test_create_errors)
{
	char bad[160];

	snprintf(bad, sizeof(bad), "%s/missing/state", dir);
	ck_assert_ptr_null(health_create(bad));
	ck_assert_int_eq(errno, ENOENT);
	ck_assert_ptr_null(health_open_readonly(path));
	ck_assert_int_eq(errno, ENOENT);
}
END_TEST

/* A second daemon on the same state file must not reset the first one's
 * counts; the lock lasts as long as the mapping. */
START_TEST(test_create_is_exclusive)
{
	struct health *h = health_create(path), *h2;

	ck_assert_ptr_nonnull(h);
	ck_assert_ptr_null(health_create(path));
	ck_assert_int_eq(errno, EBUSY);
	health_destroy(h);
	h2 = health_create(path);
	ck_assert_msg(h2 != NULL, "after unmapping: %s", strerror(errno));
	health_destroy(h2);
}
END_TEST

/* --- quotas */

START_TEST(test_quota_exact_under_concurrency)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 10, 0, 0);
	struct health *h = create_bound(&t);
	struct race r = { ds, shared_new(), T0 + 5, 50 };

	run_children(8, child_begin, &r, 0);
	ck_assert_int_eq(atomic_load(&r.sh->granted), 10);
	ck_assert_int_eq(view_at(ds, T0 + 5).quota_left, 0);
	ck_assert_uint_eq(view_at(ds, T0 + 5).quota_limit, 10);
	ck_assert_uint_eq(view_at(ds, T0 + 5).available, 0);
	ck_assert_uint_eq(view_at(ds, T0 + 5).in_flight, 10);

	/* three deliveries fail: their reservations come back, no more */
	for (unsigned i = 0, gave = 0; i < 8 && gave < 3; i++)
		while (atomic_load(&r.sh->won[i]) > 0 && gave < 3) {
			atomic_fetch_sub(&r.sh->won[i], 1);
			health_end(ds->health, ds, &hcfg, i, T0 + 6, HEALTH_FAIL, 0, "451 try later");
			gave++;
		}
	/* a success keeps its reservation */
	for (unsigned i = 0; i < 8; i++)
		if (atomic_load(&r.sh->won[i]) > 0) {
			health_end(ds->health, ds, &hcfg, i, T0 + 6, HEALTH_OK, 10, NULL);
			break;
		}
	ck_assert_int_eq(view_at(ds, T0 + 6).quota_left, 3);
	ck_assert_uint_eq(view_at(ds, T0 + 6).in_flight, 6);

	atomic_store(&r.sh->granted, 0);
	r.now = T0 + 7;
	run_children(8, child_begin, &r, 0);
	ck_assert_int_eq(atomic_load(&r.sh->granted), 3);
	ck_assert_int_eq(view_at(ds, T0 + 7).quota_left, 0);
	munmap(r.sh, sizeof(*r.sh));
	health_destroy(h);
}
END_TEST

START_TEST(test_quota_windows_roll_and_roll_back)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 10, 15, 100);
	struct health *h = create_bound(&t);
	struct health_snapshot s;

	ck_assert_uint_eq(begin_n(ds, 20, 0, T0), 10);          /* minute full */
	ck_assert_int_eq(view_at(ds, T0 + 59).quota_left, 0);
	ck_assert_int_eq(view_at(ds, T0 + 60).quota_left, 5);   /* hour is tighter now */
	ck_assert_uint_eq(view_at(ds, T0 + 60).quota_limit, 15);

	/* the hour refuses the 6th: its minute reservation is rolled back */
	ck_assert_uint_eq(begin_n(ds, 20, 0, T0 + 60), 5);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0 + 60, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 5);
	ck_assert_uint_eq(s.sent_hour, 15);
	ck_assert_uint_eq(s.sent_day, 15);
	ck_assert_uint_eq(s.limit_minute, 10);
	ck_assert_uint_eq(s.limit_hour, 15);
	ck_assert_uint_eq(s.limit_day, 100);

	/* next hour: the day keeps counting */
	ck_assert_uint_eq(begin_n(ds, 1, 0, T0 + 3600), 1);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0 + 3600, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 1);
	ck_assert_uint_eq(s.sent_hour, 1);
	ck_assert_uint_eq(s.sent_day, 16);
	/* next day: all fresh */
	ck_assert_int_eq(view_at(ds, T0 + 86400).quota_left, 10);
	health_destroy(h);
}
END_TEST

START_TEST(test_quota_release_only_to_its_window)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 10, 0, 0);
	struct health *h = create_bound(&t);

	ck_assert_uint_eq(begin_n(ds, 10, 0, T0 + 59), 10);
	ck_assert_uint_eq(begin_n(ds, 10, 0, T0 + 60), 10);     /* a new minute */
	/* begun in the old minute, failed in the new one: nothing to give back */
	health_end_since(ds->health, ds, &hcfg, 0, T0 + 59, T0 + 61, HEALTH_FAIL, 0, "timeout");
	ck_assert_int_eq(view_at(ds, T0 + 61).quota_left, 0);
	health_end_since(ds->health, ds, &hcfg, 0, T0 + 60, T0 + 61, HEALTH_FAIL, 0, "timeout");
	ck_assert_int_eq(view_at(ds, T0 + 61).quota_left, 1);

	/* a process whose clock lags a second never resets a newer window */
	ck_assert_uint_eq(begin_n(ds, 1, 1, T0 + 62), 1);
	ck_assert_uint_eq(begin_n(ds, 5, 1, T0 + 59), 0);
	ck_assert_int_eq(view_at(ds, T0 + 62).quota_left, 0);
	health_destroy(h);
}
END_TEST

START_TEST(test_no_quota_still_counts)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 0, 0, 0);
	struct health *h = create_bound(&t);
	struct health_snapshot s;

	ck_assert_uint_eq(begin_n(ds, 1000, 0, T0), 1000);
	ck_assert_int_eq(view_at(ds, T0).quota_left, -1);
	ck_assert_uint_eq(view_at(ds, T0).quota_limit, 0);
	ck_assert_uint_eq(view_at(ds, T0).available, 1);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 1000);
	ck_assert_uint_eq(s.limit_minute, 0);
	health_destroy(h);
}
END_TEST

/* --- the circuit breaker */

static void
fail_n(struct downstream_cfg *ds, unsigned n, unsigned slot, time_t now)
{
	for (unsigned i = 0; i < n; i++) {
		ck_assert(health_begin(ds->health, ds, slot, now));
		health_end(ds->health, ds, &hcfg, slot, now, HEALTH_FAIL, 0, "421 go away");
	}
}

/* The circuit opened at `at` for `cooldown` seconds. */
static void
assert_open_for(struct downstream_cfg *ds, time_t at, unsigned cooldown)
{
	ck_assert_uint_eq(view_at(ds, at + cooldown - 1).state, SMTPMUX_DS_DOWN);
	ck_assert_uint_eq(view_at(ds, at + cooldown - 1).available, 0);
	ck_assert(!health_begin(ds->health, ds, 0, at + cooldown - 1));
	ck_assert_uint_eq(view_at(ds, at + cooldown).state, SMTPMUX_DS_HALF_OPEN);
	ck_assert_uint_eq(view_at(ds, at + cooldown).available, 1);
}

START_TEST(test_circuit_breaker)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 0, 0, 0);
	struct health *h = create_bound(&t);
	struct race r = { ds, shared_new(), T0 + 30, 1 };
	unsigned winner = 99;

	fail_n(ds, 2, 0, T0);
	ck_assert_uint_eq(view_at(ds, T0).state, SMTPMUX_DS_UP);
	ck_assert_uint_eq(view_at(ds, T0).consecutive_failures, 2);
	fail_n(ds, 1, 0, T0);
	ck_assert_uint_eq(view_at(ds, T0).consecutive_failures, 3);
	assert_open_for(ds, T0, 30);

	/* half-open: of two concurrent attempts exactly one is the trial */
	run_children(2, child_begin, &r, 0);
	ck_assert_int_eq(atomic_load(&r.sh->granted), 1);
	for (unsigned i = 0; i < 2; i++)
		if (atomic_load(&r.sh->won[i]))
			winner = i;
	ck_assert_uint_eq(view_at(ds, T0 + 30).state, SMTPMUX_DS_HALF_OPEN);
	ck_assert_uint_eq(view_at(ds, T0 + 30).available, 0);
	ck_assert(!health_begin(ds->health, ds, 7, T0 + 31));

	/* the trial fails: open again for twice as long */
	health_end(ds->health, ds, &hcfg, winner, T0 + 40, HEALTH_FAIL, 0, "timeout");
	assert_open_for(ds, T0 + 40, 60);
	/* and again: doubling stops at max_cooldown */
	fail_n(ds, 1, 3, T0 + 100);
	assert_open_for(ds, T0 + 100, 100);
	fail_n(ds, 1, 3, T0 + 200);
	assert_open_for(ds, T0 + 200, 100);

	/* a failure from an attempt begun before the circuit opened changes nothing */
	health_end(ds->health, ds, &hcfg, 9, T0 + 250, HEALTH_FAIL, 0, "late");
	assert_open_for(ds, T0 + 200, 100);

	/* the trial succeeds: closed, failures forgotten, cooldown reset */
	ck_assert(health_begin(ds->health, ds, 3, T0 + 300));
	health_end(ds->health, ds, &hcfg, 3, T0 + 301, HEALTH_OK, 120, NULL);
	ck_assert_uint_eq(view_at(ds, T0 + 301).state, SMTPMUX_DS_UP);
	ck_assert_uint_eq(view_at(ds, T0 + 301).consecutive_failures, 0);
	ck_assert_uint_eq(view_at(ds, T0 + 301).latency_ms, 120);
	fail_n(ds, 3, 0, T0 + 400);
	assert_open_for(ds, T0 + 400, 30);
	munmap(r.sh, sizeof(*r.sh));
	health_destroy(h);
}
END_TEST

START_TEST(test_half_open_full_quota_keeps_trial)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 2, 0, 0);
	struct health *h = create_bound(&t);

	/* two deliveries under way fill the minute, then three failures open */
	ck_assert_uint_eq(begin_n(ds, 2, 1, T0), 2);
	ds->max_per_minute = 0;
	fail_n(ds, 3, 0, T0);
	ds->max_per_minute = 2;
	ck_assert_uint_eq(view_at(ds, T0 + 30).state, SMTPMUX_DS_HALF_OPEN);
	ck_assert_int_eq(view_at(ds, T0 + 30).quota_left, 0);
	ck_assert_uint_eq(view_at(ds, T0 + 30).available, 0);
	/* refused for quota: the trial stays claimable */
	ck_assert(!health_begin(ds->health, ds, 0, T0 + 30));
	ck_assert_uint_eq(view_at(ds, T0 + 60).available, 1);
	ck_assert(health_begin(ds->health, ds, 0, T0 + 60));
	ck_assert_uint_eq(view_at(ds, T0 + 60).available, 0);
	ck_assert(!health_begin(ds->health, ds, 0, T0 + 60));
	health_destroy(h);
}
END_TEST

START_TEST(test_throttled)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 10, 0, 0);
	struct health *h = create_bound(&t);

	ck_assert(health_begin(ds->health, ds, 0, T0));
	health_end(ds->health, ds, &hcfg, 0, T0 + 1, HEALTH_THROTTLED, 0, "421 4.7.0 rate limited");
	ck_assert_uint_eq(view_at(ds, T0 + 1).state, SMTPMUX_DS_THROTTLED);
	ck_assert_uint_eq(view_at(ds, T0 + 1).available, 0);
	ck_assert_uint_eq(view_at(ds, T0 + 1).consecutive_failures, 0);
	ck_assert_int_eq(view_at(ds, T0 + 1).quota_left, 10);   /* given back */
	ck_assert_uint_eq(view_at(ds, T0 + 1).failures, 1);
	ck_assert(!health_begin(ds->health, ds, 0, T0 + 60));
	ck_assert_uint_eq(view_at(ds, T0 + 61).state, SMTPMUX_DS_UP);
	ck_assert(health_begin(ds->health, ds, 0, T0 + 61));

	/* a half-open trial that is throttled proves the server alive */
	health_end(ds->health, ds, &hcfg, 0, T0 + 61, HEALTH_OK, 1, NULL);
	fail_n(ds, 3, 0, T0 + 100);
	ck_assert(health_begin(ds->health, ds, 2, T0 + 130));
	health_end(ds->health, ds, &hcfg, 2, T0 + 131, HEALTH_THROTTLED, 0, "452 too many");
	ck_assert_uint_eq(view_at(ds, T0 + 131).state, SMTPMUX_DS_THROTTLED);
	ck_assert_uint_eq(view_at(ds, T0 + 191).state, SMTPMUX_DS_UP);
	health_destroy(h);
}
END_TEST

START_TEST(test_cancelled)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 2, 0, 0);
	struct health *h = create_bound(&t);

	ck_assert_uint_eq(begin_n(ds, 2, 0, T0), 2);
	health_end(ds->health, ds, &hcfg, 0, T0 + 1, HEALTH_CANCELLED, 0, NULL);
	ck_assert_int_eq(view_at(ds, T0 + 1).quota_left, 1);
	ck_assert_uint_eq(view_at(ds, T0 + 1).in_flight, 1);
	ck_assert_uint_eq(view_at(ds, T0 + 1).attempts, 0);
	ck_assert_uint_eq(view_at(ds, T0 + 1).consecutive_failures, 0);

	/* a cancelled trial leaves the circuit half-open for the next one */
	ds->max_per_minute = 0;
	fail_n(ds, 3, 0, T0 + 100);
	ck_assert(health_begin(ds->health, ds, 1, T0 + 130));
	ck_assert_uint_eq(view_at(ds, T0 + 130).available, 0);
	health_end(ds->health, ds, &hcfg, 1, T0 + 131, HEALTH_CANCELLED, 0, NULL);
	ck_assert_uint_eq(view_at(ds, T0 + 131).state, SMTPMUX_DS_HALF_OPEN);
	ck_assert_uint_eq(view_at(ds, T0 + 131).available, 1);
	ck_assert_uint_eq(view_at(ds, T0 + 131).consecutive_failures, 3);
	ck_assert(health_begin(ds->health, ds, 2, T0 + 131));
	health_destroy(h);
}
END_TEST

/* Every other path failed: circuit and throttle give way, the quota never. */
START_TEST(test_last_resort)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 2, 0, 0);
	struct health *h = create_bound(&t);

	ds->max_per_minute = 0;
	fail_n(ds, 3, 0, T0);
	ds->max_per_minute = 2;
	ck_assert(!health_begin(ds->health, ds, 0, T0 + 1));
	ck_assert(health_begin_last_resort(ds->health, ds, 0, T0 + 1));
	ck_assert_uint_eq(view_at(ds, T0 + 1).in_flight, 1);
	ck_assert_int_eq(view_at(ds, T0 + 1).quota_left, 1);
	/* its failure neither extends nor re-opens the circuit */
	health_end(ds->health, ds, &hcfg, 0, T0 + 2, HEALTH_FAIL, 0, "421 still down");
	ck_assert_int_eq(view_at(ds, T0 + 2).quota_left, 2);
	assert_open_for(ds, T0, 30);

	/* throttled: refused, except as a last resort, whose success leaves the
	 * provider's backoff in place */
	ck_assert(health_begin(ds->health, ds, 0, T0 + 30));   /* the trial */
	health_end(ds->health, ds, &hcfg, 0, T0 + 31, HEALTH_THROTTLED, 0, "451 4.7.0 slow");
	ck_assert_uint_eq(view_at(ds, T0 + 31).state, SMTPMUX_DS_THROTTLED);
	ck_assert(!health_begin(ds->health, ds, 0, T0 + 32));
	ck_assert(health_begin_last_resort(ds->health, ds, 0, T0 + 32));
	ck_assert(health_begin_last_resort(ds->health, ds, 1, T0 + 32));
	/* the minute is full: not even a last resort gets through */
	ck_assert(!health_begin_last_resort(ds->health, ds, 2, T0 + 32));
	ck_assert_uint_eq(view_at(ds, T0 + 32).in_flight, 2);
	health_end(ds->health, ds, &hcfg, 0, T0 + 33, HEALTH_OK, 5, NULL);
	health_end(ds->health, ds, &hcfg, 1, T0 + 33, HEALTH_OK, 5, NULL);
	ck_assert_uint_eq(view_at(ds, T0 + 33).in_flight, 0);
	ck_assert_uint_eq(view_at(ds, T0 + 33).state, SMTPMUX_DS_THROTTLED);
	health_destroy(h);
}
END_TEST

START_TEST(test_probe_result)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 5, 0, 0);
	struct health *h = create_bound(&t);
	struct health_snapshot s;

	for (int i = 0; i < 3; i++)
		health_probe_result(ds->health, ds, &hcfg, T0, false, 0, "probe connect: refused");
	ck_assert_uint_eq(view_at(ds, T0).state, SMTPMUX_DS_DOWN);
	/* half-open and the probe fails: it was the trial */
	health_probe_result(ds->health, ds, &hcfg, T0 + 30, false, 0, "probe ehlo: 554");
	ck_assert_uint_eq(view_at(ds, T0 + 89).state, SMTPMUX_DS_DOWN);
	/* an answering server is up at once */
	health_probe_result(ds->health, ds, &hcfg, T0 + 40, true, 80, NULL);
	ck_assert_uint_eq(view_at(ds, T0 + 40).state, SMTPMUX_DS_UP);
	ck_assert_uint_eq(view_at(ds, T0 + 40).latency_ms, 80);
	/* probes never touch quotas or delivery counters */
	ck_assert_uint_eq(view_at(ds, T0 + 40).attempts, 0);
	ck_assert_int_eq(view_at(ds, T0 + 40).quota_left, 5);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0 + 40, &s), 0);
	ck_assert_str_eq(s.last_error, "probe ehlo: 554");
	ck_assert_int_eq(s.last_error_time, T0 + 30);
	health_destroy(h);
}
END_TEST

/* --- configuration reloads */

START_TEST(test_rebind_by_key_and_sharing)
{
	struct tcfg t1, t2, t3;
	struct downstream_cfg *a1, *a2, *shared, *b2;
	struct health *h;
	struct health_snapshot s;
	char err[256];

	tuser(&t1, 0, "app@example.org");
	a1 = tds(&t1, 0, "a", "smtp.a.test:587", "acct");
	tds(&t1, 0, "noauth", "mx.b.test:25", NULL);
	h = create_bound(&t1);
	ck_assert_uint_eq(health_count(h), 2);
	ck_assert(health_begin(a1->health, a1, 0, T0));
	health_end(a1->health, a1, &hcfg, 0, T0, HEALTH_OK, 10, NULL);
	ck_assert_uint_eq(health_user_next(t1.users[0].health), 0);

	/* reload: same key kept, a second user sharing the account shares it */
	tuser(&t2, 0, "App@Example.org");
	a2 = tds(&t2, 0, "renamed", "smtp.a.test:587", "acct");
	b2 = tds(&t2, 0, "other-account", "smtp.a.test:587", "acct2");
	tuser(&t2, 1, "second@example.org");
	shared = tds(&t2, 1, "a-for-second", "smtp.a.test:587", "acct");
	ck_assert_int_eq(health_bind(h, &t2.cfg, err, sizeof(err)), 0);
	ck_assert_ptr_eq(a2->health, a1->health);
	ck_assert_ptr_eq(shared->health, a1->health);
	ck_assert_ptr_ne(b2->health, a1->health);
	ck_assert_ptr_eq(t2.users[0].health, t1.users[0].health);
	ck_assert_ptr_ne(t2.users[1].health, t1.users[0].health);
	ck_assert_uint_eq(health_user_next(t2.users[0].health), 1);
	ck_assert_uint_eq(view_at(a2, T0).successes, 1);
	ck_assert(health_begin(shared->health, shared, 1, T0));
	ck_assert_uint_eq(view_at(a2, T0).in_flight, 1);
	ck_assert_uint_eq(health_count(h), 3);

	/* keys the running configuration no longer has are kept, not shown */
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0, &s), 0);
	ck_assert_str_eq(s.key, "smtp.a.test:587 acct");
	ck_assert_str_eq(s.addr, "smtp.a.test:587");
	ck_assert_str_eq(s.view.addr, "smtp.a.test:587");
	ck_assert_int_eq(health_snapshot(h, 1, &hcfg, T0, &s), 1);
	ck_assert_str_eq(s.key, "mx.b.test:25");
	ck_assert_int_eq(health_snapshot(h, 2, &hcfg, T0, &s), 0);
	ck_assert_int_eq(health_snapshot(h, 3, &hcfg, T0, &s), -1);

	tuser(&t3, 0, "app@example.org");
	tds(&t3, 0, "noauth", "mx.b.test:25", "");
	ck_assert_int_eq(health_bind(h, &t3.cfg, err, sizeof(err)), 0);
	ck_assert_int_eq(health_snapshot(h, 1, &hcfg, T0, &s), 0);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0, &s), 1);
	ck_assert_uint_eq(health_count(h), 3);
	health_destroy(h);
}
END_TEST

START_TEST(test_bind_errors)
{
	struct tcfg t;
	struct health *h = health_create(path);
	char err[256], longuser[200];
	struct downstream_cfg *many;

	memset(longuser, 'u', sizeof(longuser) - 1);
	longuser[sizeof(longuser) - 1] = '\0';
	tuser(&t, 0, "app@example.org");
	tds(&t, 0, "long", "smtp.a.test:587", longuser);
	ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "users[0].downstreams[0]"));

	/* more distinct keys than the segment holds */
	many = calloc(HEALTH_MAX_DOWNSTREAMS + 1, sizeof(*many));
	char (*addr)[32] = calloc(HEALTH_MAX_DOWNSTREAMS + 1, sizeof(*addr));
	for (size_t i = 0; i <= HEALTH_MAX_DOWNSTREAMS; i++) {
		snprintf(addr[i], sizeof(addr[i]), "mx%zu.test:25", i);
		many[i].addr = addr[i];
	}
	t.users[0].downstreams = many;
	t.users[0].n_downstreams = HEALTH_MAX_DOWNSTREAMS + 1;
	ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "users[0].downstreams[1024]"));
	ck_assert_uint_eq(health_count(h), HEALTH_MAX_DOWNSTREAMS);
	free(many);
	free(addr);
	health_destroy(h);
}
END_TEST

/* --- processes that die */

static void
child_begin_and_die(unsigned i, void *arg)
{
	struct race *r = arg;

	if (health_begin(r->ds->health, r->ds, 5 + i, r->now))
		_exit(9);                /* killed mid-delivery: no health_end */
	_exit(1);
}

START_TEST(test_worker_gone)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 0, 0, 0);
	struct health *h = create_bound(&t);
	struct race r = { ds, NULL, T0, 1 };

	ck_assert(health_begin(ds->health, ds, 4, T0));
	run_children(1, child_begin_and_die, &r, 9);
	ck_assert_uint_eq(view_at(ds, T0).in_flight, 2);
	health_worker_gone(h, 5);
	ck_assert_uint_eq(view_at(ds, T0).in_flight, 1);
	health_end(ds->health, ds, &hcfg, 4, T0, HEALTH_OK, 1, NULL);
	ck_assert_uint_eq(view_at(ds, T0).in_flight, 0);

	/* a worker that dies holding the half-open trial gives it back */
	fail_n(ds, 3, 0, T0);
	r.now = T0 + 30;
	run_children(1, child_begin_and_die, &r, 9);
	ck_assert_uint_eq(view_at(ds, T0 + 30).available, 0);
	health_worker_gone(h, 5);
	ck_assert_uint_eq(view_at(ds, T0 + 30).available, 1);
	ck_assert_uint_eq(view_at(ds, T0 + 30).state, SMTPMUX_DS_HALF_OPEN);

	/* one that dies unnoticed loses it when its lease runs out */
	run_children(1, child_begin_and_die, &r, 9);
	ck_assert(!health_begin(ds->health, ds, 0, T0 + 31));
	ck_assert(health_begin(ds->health, ds, 0, T0 + 30 + 900));
	health_destroy(h);
}
END_TEST

/* --- readers in other processes */

START_TEST(test_readonly_reader)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 10, 0, 200);
	struct health *h = create_bound(&t), *ro;
	struct health_snapshot s;
	char longerr[400];

	memset(longerr, 'e', sizeof(longerr) - 1);
	longerr[sizeof(longerr) - 1] = '\0';
	longerr[3] = '\n';               /* a hostile reply cannot forge lines */
	ck_assert_uint_eq(begin_n(ds, 4, 0, T0), 4);
	health_end(ds->health, ds, &hcfg, 0, T0 + 2, HEALTH_FAIL, 0, longerr);

	ro = health_open_readonly(path);
	ck_assert_ptr_nonnull(ro);
	ck_assert_uint_eq(health_count(ro), 1);
	ck_assert_int_eq(health_snapshot(ro, 0, &hcfg, T0 + 3, &s), 0);
	ck_assert_str_eq(s.key, "smtp.a.test:587 acct");
	ck_assert_str_eq(s.name, "a");
	ck_assert_str_eq(s.view.name, "a");
	ck_assert_uint_eq(s.view.in_flight, 3);
	ck_assert_uint_eq(s.view.failures, 1);
	ck_assert_uint_eq(s.view.consecutive_failures, 1);
	ck_assert_uint_eq(s.sent_minute, 3);
	ck_assert_uint_eq(s.sent_day, 3);
	ck_assert_uint_eq(s.limit_day, 200);
	ck_assert_int_eq(s.view.quota_left, 7);
	ck_assert_int_eq(s.last_error_time, T0 + 2);
	ck_assert_uint_eq(strlen(s.last_error), sizeof(s.last_error) - 1);
	ck_assert_ptr_null(strchr(s.last_error, '\n'));
	ck_assert_int_eq(strncmp(s.last_error, "eee?eee", 7), 0);

	/* it keeps seeing the writer */
	health_end(ds->health, ds, &hcfg, 0, T0 + 4, HEALTH_FAIL, 0, "530 auth");
	ck_assert_int_eq(health_snapshot(ro, 0, &hcfg, T0 + 4, &s), 0);
	ck_assert_str_eq(s.last_error, "530 auth");
	health_destroy(ro);
	health_destroy(h);
}
END_TEST

static void
child_sequence(unsigned i, void *arg)
{
	struct health_user *u = arg;

	(void)i;
	for (int k = 0; k < 1000; k++)
		health_user_next(u);
}

START_TEST(test_user_sequence_shared)
{
	struct tcfg t;
	struct health *h;

	one_downstream(&t, 0, 0, 0);
	h = create_bound(&t);
	run_children(4, child_sequence, t.users[0].health, 0);
	ck_assert_uint_eq(health_user_next(t.users[0].health), 4000);
	health_destroy(h);
}
END_TEST

/* --- status output */

static struct health *
two_downstreams(struct tcfg *t, time_t now)
{
	struct downstream_cfg *a, *b;
	struct health *h;

	tuser(t, 0, "app@example.org");
	a = tds(t, 0, "primary \"eu\"", "smtp.a.test:587", "acct");
	a->max_per_minute = 10;
	a->max_per_day = 500;
	b = tds(t, 0, "backup", "mx.b.test:25", NULL);
	h = create_bound(t);
	ck_assert_uint_eq(begin_n(a, 3, 0, now), 3);
	health_end(a->health, a, &hcfg, 0, now, HEALTH_OK, 250, NULL);
	fail_n(b, 3, 0, now);
	return h;
}

START_TEST(test_status_print)
{
	struct tcfg t;
	struct health *h = two_downstreams(&t, T0), *ro;
	char *text = NULL;
	size_t len = 0;
	FILE *out = open_memstream(&text, &len);

	ro = health_open_readonly(path);
	ck_assert_ptr_nonnull(ro);
	status_print(out, ro, &hcfg, T0 + 1);
	fclose(out);
	ck_assert_ptr_nonnull(strstr(text, "NAME"));
	ck_assert_ptr_nonnull(strstr(text, "LAST ERROR"));
	ck_assert_ptr_nonnull(strstr(text, "primary \"eu\""));
	ck_assert_ptr_nonnull(strstr(text, "smtp.a.test:587 acct"));
	ck_assert_ptr_nonnull(strstr(text, "3/10"));
	ck_assert_ptr_nonnull(strstr(text, "3/-"));
	ck_assert_ptr_nonnull(strstr(text, "3/500"));
	ck_assert_ptr_nonnull(strstr(text, "backup"));
	ck_assert_ptr_nonnull(strstr(text, "mx.b.test:25"));
	ck_assert_ptr_nonnull(strstr(text, "down"));
	ck_assert_ptr_nonnull(strstr(text, "2023-11-15T10:00:00Z 421 go away"));
	ck_assert_ptr_nonnull(strstr(text, " 250 "));   /* latency */
	free(text);
	health_destroy(ro);
	health_destroy(h);
}
END_TEST

struct fetch {
	struct event_base *base;
	int code;
	char body[32768];
};

static void
fetch_done(struct evhttp_request *req, void *arg)
{
	struct fetch *f = arg;

	f->code = req ? evhttp_request_get_response_code(req) : -1;
	if (req != NULL) {
		struct evbuffer *in = evhttp_request_get_input_buffer(req);
		size_t n = evbuffer_get_length(in);
		if (n >= sizeof(f->body))
			n = sizeof(f->body) - 1;
		evbuffer_remove(in, f->body, n);
		f->body[n] = '\0';
	}
	event_base_loopexit(f->base, NULL);
}

static void
fetch(struct fetch *f, unsigned port, const char *uri)
{
	struct evhttp_connection *conn;
	struct evhttp_request *req;

	f->code = 0;
	f->body[0] = '\0';
	conn = evhttp_connection_base_new(f->base, NULL, "127.0.0.1", (unsigned short)port);
	ck_assert_ptr_nonnull(conn);
	evhttp_connection_set_timeout(conn, 5);
	req = evhttp_request_new(fetch_done, f);
	evhttp_add_header(evhttp_request_get_output_headers(req), "Host", "127.0.0.1");
	ck_assert_int_eq(evhttp_make_request(conn, req, EVHTTP_REQ_GET, uri), 0);
	event_base_dispatch(f->base);
	evhttp_connection_free(conn);
}

/* A port nobody listens on now: the kernel's pick for a socket we close. */
static unsigned
free_port(void)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t len = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
	close(fd);
	return ntohs(sin.sin_port);
}

START_TEST(test_metrics_http)
{
	struct tcfg t;
	time_t minute = time(NULL) / 60;
	struct health *h = two_downstreams(&t, time(NULL));
	struct fetch *f = calloc(1, sizeof(*f));
	struct status_http *sh;
	char err[256], addr[32];

	t.cfg.health = hcfg;
	f->base = event_base_new();
	ck_assert_ptr_null(status_http_start(f->base, "localhost:x", &t.cfg, h, err, sizeof(err)));
	ck_assert_ptr_nonnull(strstr(err, "localhost:x"));
	ck_assert_ptr_null(status_http_start(f->base, "localhost:9100", &t.cfg, h, err, sizeof(err)));
	ck_assert_ptr_nonnull(strstr(err, "numeric"));
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", free_port());
	sh = status_http_start(f->base, addr, &t.cfg, h, err, sizeof(err));
	ck_assert_msg(sh != NULL, "%s", err);
	ck_assert_str_eq(strchr(addr, ':') + 1, (snprintf(err, sizeof(err), "%u", status_http_port(sh)), err));

	fetch(f, status_http_port(sh), "/metrics");
	ck_assert_int_eq(f->code, 200);
	ck_assert_ptr_nonnull(strstr(f->body, "# HELP smtpmux_downstream_up "));
	ck_assert_ptr_nonnull(strstr(f->body, "# TYPE smtpmux_downstream_up gauge\n"));
	ck_assert_ptr_nonnull(strstr(f->body, "# TYPE smtpmux_downstream_attempts_total counter\n"));
	ck_assert_ptr_nonnull(strstr(f->body,
	    "smtpmux_downstream_up{downstream=\"primary \\\"eu\\\"\",addr=\"smtp.a.test:587\","
	    "user=\"acct\"} 1\n"));
	ck_assert_ptr_nonnull(strstr(f->body,
	    "smtpmux_downstream_up{downstream=\"backup\",addr=\"mx.b.test:25\",user=\"\"} 0\n"));
	ck_assert_ptr_nonnull(strstr(f->body,
	    "smtpmux_downstream_state{downstream=\"backup\",addr=\"mx.b.test:25\",user=\"\"} 1\n"));
	ck_assert_ptr_nonnull(strstr(f->body,
	    "smtpmux_downstream_in_flight{downstream=\"primary \\\"eu\\\"\",addr=\"smtp.a.test:587\","
	    "user=\"acct\"} 2\n"));
	ck_assert_ptr_nonnull(strstr(f->body, "smtpmux_downstream_latency_ms{"));
	ck_assert_ptr_nonnull(strstr(f->body,
	    "smtpmux_downstream_failures_total{downstream=\"backup\",addr=\"mx.b.test:25\",user=\"\"} 3\n"));
	ck_assert_ptr_nonnull(strstr(f->body, "smtpmux_downstream_successes_total{"));
	if (time(NULL) / 60 == minute)   /* the window did not roll meanwhile */
		ck_assert_ptr_nonnull(strstr(f->body, "user=\"acct\",window=\"minute\"} 3\n"));
	ck_assert_ptr_nonnull(strstr(f->body,
	    "smtpmux_downstream_quota_limit{downstream=\"primary \\\"eu\\\"\",addr=\"smtp.a.test:587\","
	    "user=\"acct\",window=\"day\"} 500\n"));
	/* unlimited windows have no limit sample */
	ck_assert_ptr_null(strstr(f->body,
	    "smtpmux_downstream_quota_limit{downstream=\"primary \\\"eu\\\"\",addr=\"smtp.a.test:587\","
	    "user=\"acct\",window=\"hour\"}"));
	ck_assert_ptr_nonnull(strstr(f->body, "user=\"acct\",window=\"minute\"} 10\n"));

	/* The status page (t/check_status_page.c tests what it shows). */
	fetch(f, status_http_port(sh), "/");
	ck_assert_int_eq(f->code, 200);
	ck_assert_ptr_nonnull(strstr(f->body, "<h2>app@example.org</h2>"));
	ck_assert_ptr_nonnull(strstr(f->body, "<span class=\"name\">primary &quot;eu&quot;</span>"));
	ck_assert_ptr_nonnull(strstr(f->body, "data-state=\"down\""));
	fetch(f, status_http_port(sh), "/x");
	ck_assert_int_eq(f->code, 404);
	fetch(f, status_http_port(sh), "/metrics/x");
	ck_assert_int_eq(f->code, 404);

	status_http_free(sh);
	event_base_free(f->base);
	free(f);
	health_destroy(h);
}
END_TEST

static Suite *
health_suite(void)
{
	Suite *s = suite_create("health");
	TCase *seg = tcase_create("segment"), *quota = tcase_create("quota"),
	    *circuit = tcase_create("circuit"), *bind = tcase_create("bind"),
	    *procs = tcase_create("processes"), *status = tcase_create("status");
	TCase *all[] = { seg, quota, circuit, bind, procs, status };

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
		tcase_add_checked_fixture(all[i], setup, teardown);
		suite_add_tcase(s, all[i]);
	}
	tcase_add_test(seg, test_create_reuse_reinit);
	tcase_add_test(seg, test_create_errors);
	tcase_add_test(seg, test_create_is_exclusive);
	tcase_add_test(quota, test_quota_exact_under_concurrency);
	tcase_add_test(quota, test_quota_windows_roll_and_roll_back);
	tcase_add_test(quota, test_quota_release_only_to_its_window);
	tcase_add_test(quota, test_no_quota_still_counts);
	tcase_add_test(circuit, test_circuit_breaker);
	tcase_add_test(circuit, test_half_open_full_quota_keeps_trial);
	tcase_add_test(circuit, test_throttled);
	tcase_add_test(circuit, test_cancelled);
	tcase_add_test(circuit, test_probe_result);
	tcase_add_test(circuit, test_last_resort);
	tcase_add_test(bind, test_rebind_by_key_and_sharing);
	tcase_add_test(bind, test_bind_errors);
	tcase_add_test(procs, test_worker_gone);
	tcase_add_test(procs, test_readonly_reader);
	tcase_add_test(procs, test_user_sequence_shared);
	tcase_add_test(status, test_status_print);
	tcase_add_test(status, test_metrics_http);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(health_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

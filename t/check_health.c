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
#include <sys/stat.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/wait.h>
#include <sched.h>
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
	ck_assert_int_eq(rmdir(dir), 0);        /* no temporary file left behind */
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

/* What a restart finds: the segments as saved, then a fresh daemon's. */
static struct health *
restart(struct health *h, struct tcfg *t)
{
	ck_assert_int_eq(health_save(h, path, NULL), 0);
	health_destroy(h);
	return create_bound(t);
}

/* A status reader's view, as `smtpmuxd -s status` gets it. */
static struct health *
reader_of(const struct health *h)
{
	int ctl, live;
	struct health *ro;

	health_export(h, &ctl, &live);
	ck_assert_int_ge(ctl, 0);
	ro = health_attach(dup(ctl), dup(live));
	ck_assert_ptr_nonnull(ro);
	return ro;
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

/* Ends n attempts of slot begun at `begun` as delivered at now. */
static void
deliver_n(struct downstream_cfg *ds, unsigned n, unsigned slot, time_t begun, time_t now)
{
	for (unsigned i = 0; i < n; i++)
		health_end_since(ds->health, ds, &hcfg, slot, begun, now, HEALTH_OK, 1, NULL);
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
	struct downstream_cfg *ds = one_downstream(&t, 10, 0, 0);
	struct health *h = create_bound(&t);
	struct health_snapshot s;

	ck_assert(health_begin(ds->health, ds, 0, T0));
	health_end(ds->health, ds, &hcfg, 0, T0, HEALTH_OK, 40, NULL);
	ck_assert(health_begin(ds->health, ds, 0, T0));   /* in flight when "killed" */
	ck_assert_uint_eq(health_user_next(t.users[0].health), 0);
	ck_assert_uint_eq(health_user_next(t.users[0].health), 1);

	/* a restart keeps counters, quotas and sequences, forgets in-flight;
	 * the reservation of an attempt nobody can end any more stays counted */
	h = restart(h, &t);
	ck_assert_uint_eq(view_at(ds, T0).attempts, 1);
	ck_assert_uint_eq(view_at(ds, T0).successes, 1);
	ck_assert_uint_eq(view_at(ds, T0).in_flight, 0);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 2);
	ck_assert_uint_eq(health_user_next(t.users[0].health), 2);
	ck_assert_int_eq(health_save(h, path, NULL), 0);
	health_destroy(h);

	/* another layout version: start afresh */
	int fd = open(path, O_WRONLY);
	uint32_t bogus = HEALTH_LAYOUT_VERSION + 1;
	ck_assert_int_eq(pwrite(fd, &bogus, sizeof(bogus), 8), sizeof(bogus));
	close(fd);
	h = create_bound(&t);
	ck_assert_uint_eq(view_at(ds, T0).attempts, 0);
	ck_assert_int_eq(view_at(ds, T0).quota_left, 10);
	ck_assert_uint_eq(health_user_next(t.users[0].health), 0);
	ck_assert_int_eq(health_save(h, path, NULL), 0);
	health_destroy(h);

	/* another size: start afresh too */
	ck_assert_int_eq(truncate(path, 4096), 0);
	h = create_bound(&t);
	ck_assert_uint_eq(health_count(h), 1);
	ck_assert_uint_eq(health_user_next(t.users[0].health), 0);
	health_destroy(h);
}
END_TEST

START_TEST(test_create_errors)
{
	char bad[160];
	struct health *h;

	snprintf(bad, sizeof(bad), "%s/missing/state", dir);
	h = health_create(bad);                  /* nothing to load is no error */
	ck_assert_ptr_nonnull(h);
	ck_assert_int_eq(health_save(h, bad, NULL), -1);
	ck_assert_int_eq(errno, ENOENT);
	health_destroy(h);
}
END_TEST

/* The state file is a copy: whatever happens to it, the next save writes
 * it again and says what it found. */
START_TEST(test_save_notices_a_disturbed_file)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 10, 0, 0);
	struct health *h = create_bound(&t);
	const char *what = "x";
	struct stat st, st2;
	char other[160];

	ck_assert_int_eq(health_save(h, path, &what), 0);
	ck_assert_ptr_null(what);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_uint_eq(st.st_mode & 0777, 0600);
	ck_assert_int_eq(health_save(h, path, &what), 0);          /* nothing changed */
	ck_assert_int_eq(stat(path, &st2), 0);
	ck_assert_uint_eq(st2.st_ino, st.st_ino);
	ck_assert_uint_eq(begin_n(ds, 1, 0, T0), 1);
	ck_assert_int_eq(health_save(h, path, &what), 0);          /* changed: written */
	ck_assert_int_eq(stat(path, &st2), 0);
	ck_assert_uint_ne(st2.st_ino, st.st_ino);

	ck_assert_int_eq(truncate(path, 0), 0);
	ck_assert_int_eq(health_save(h, path, &what), 0);
	ck_assert_str_eq(what, "truncated");
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_int_eq(st.st_size, st2.st_size);
	ck_assert_int_eq(unlink(path), 0);
	ck_assert_int_eq(health_save(h, path, &what), 0);
	ck_assert_str_eq(what, "removed");
	snprintf(other, sizeof(other), "%s/other", dir);
	ck_assert_int_eq(close(open(other, O_WRONLY | O_CREAT, 0600)), 0);
	ck_assert_int_eq(rename(other, path), 0);
	ck_assert_int_eq(health_save(h, path, &what), 0);
	ck_assert_str_eq(what, "replaced");
	ck_assert_int_eq(health_save(h, path, &what), 0);
	ck_assert_ptr_null(what);

	/* and what it wrote is what a restart finds */
	h = restart(h, &t);
	ck_assert_int_eq(view_at(ds, T0).quota_left, 9);
	health_destroy(h);
}
END_TEST

static void
write_file(const char *p, const void *data, size_t len, mode_t mode)
{
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, mode);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, data, len), (ssize_t)len);
	ck_assert_int_eq(fchmod(fd, mode), 0);
	close(fd);
}

static void *
read_whole(const char *p, size_t *len)
{
	struct stat st;
	void *buf;
	int fd = open(p, O_RDONLY);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(fstat(fd, &st), 0);
	buf = malloc((size_t)st.st_size);
	ck_assert_int_eq(read(fd, buf, (size_t)st.st_size), st.st_size);
	close(fd);
	*len = (size_t)st.st_size;
	return buf;
}

/* Whether a restart from what is at path took the counts saved in good. */
static bool
adopts(struct tcfg *t, struct downstream_cfg *ds)
{
	struct health *h = create_bound(t);
	bool took = view_at(ds, T0).quota_left == 7;

	health_destroy(h);
	return took;
}

/*
 * The state file is read by root from a folder others may write: only a
 * regular file of our own that nobody else can write is believed, and
 * nothing in it is used unchecked.
 */
START_TEST(test_load_believes_only_a_safe_file)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 10, 0, 0);
	struct health *h = create_bound(&t);
	char target[160];
	unsigned char *good, *bad;
	size_t len, blen;
	struct stat st;
	uint32_t v;

	ck_assert_uint_eq(begin_n(ds, 3, 0, T0), 3);
	ck_assert_int_eq(health_save(h, path, NULL), 0);
	health_destroy(h);
	good = read_whole(path, &len);
	ck_assert(adopts(&t, ds));

	/* a symlink is not followed, and saving replaces the link only */
	snprintf(target, sizeof(target), "%s/target", dir);
	write_file(target, good, len, 0600);
	ck_assert_int_eq(unlink(path), 0);
	ck_assert_int_eq(symlink(target, path), 0);
	ck_assert(!adopts(&t, ds));
	h = create_bound(&t);
	ck_assert_int_eq(health_save(h, path, NULL), 0);
	health_destroy(h);
	ck_assert_int_eq(lstat(path, &st), 0);
	ck_assert(S_ISREG(st.st_mode));
	bad = read_whole(target, &blen);
	ck_assert(blen == len && memcmp(bad, good, len) == 0);
	free(bad);
	unlink(target);

	/* writable by others, or someone else's */
	write_file(path, good, len, 0620);
	ck_assert(!adopts(&t, ds));
	write_file(path, good, len, 0600);
	ck_assert(adopts(&t, ds));
	if (geteuid() == 0) {
		ck_assert_int_eq(chown(path, 65534, 65534), 0);
		ck_assert(!adopts(&t, ds));
	}
	ck_assert_int_eq(unlink(path), 0);

	/* counts and offsets out of range */
	bad = malloc(len);
	memcpy(bad, good, len);
	v = 5000;
	memcpy(bad + 48, &v, sizeof(v));                 /* header: n_recs */
	write_file(path, bad, len, 0600);
	ck_assert(!adopts(&t, ds));
	memcpy(bad, good, len);
	v = 0xfffffff0;
	memcpy(bad + 64 + 232 + 4, &v, sizeof(v));       /* meta[0].quota[minute]: offset */
	write_file(path, bad, len, 0600);
	h = create_bound(&t);                            /* that window starts afresh */
	ck_assert_int_eq(view_at(ds, T0).quota_left, 10);
	health_destroy(h);
	write_file(path, bad, len - 1, 0600);
	ck_assert(!adopts(&t, ds));
	free(bad);
	free(good);
}
END_TEST

/* --- quotas */

/* One downstream "a" whose windows are UTC minutes, hours and days. */
static struct downstream_cfg *
one_calendar_downstream(struct tcfg *t, unsigned m, unsigned hr, unsigned d)
{
	struct downstream_cfg *ds = one_downstream(t, m, hr, d);

	ds->quota_window = QUOTA_CALENDAR;
	return ds;
}

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
	struct downstream_cfg *ds = one_calendar_downstream(&t, 10, 15, 100);
	struct health *h = create_bound(&t);
	struct health_snapshot s;

	ck_assert_uint_eq(begin_n(ds, 20, 0, T0), 10);          /* minute full */
	deliver_n(ds, 10, 0, T0, T0);
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
	deliver_n(ds, 5, 0, T0 + 60, T0 + 60);

	/* next hour: the day keeps counting */
	ck_assert_uint_eq(begin_n(ds, 1, 0, T0 + 3600), 1);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0 + 3600, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 1);
	ck_assert_uint_eq(s.sent_hour, 1);
	ck_assert_uint_eq(s.sent_day, 16);
	deliver_n(ds, 1, 0, T0 + 3600, T0 + 3600);
	/* next day: all fresh */
	ck_assert_int_eq(view_at(ds, T0 + 86400).quota_left, 10);
	health_destroy(h);
}
END_TEST

/*
 * When a full downstream takes messages again, for the queue runner to
 * sleep until then: for each full window, when its oldest counted message
 * stops counting; the latest of those.
 */
START_TEST(test_quota_reopens)
{
	for (int calendar = 0; calendar < 2; calendar++) {
		struct tcfg t;
		struct downstream_cfg *ds = calendar ? one_calendar_downstream(&t, 2, 3, 0) :
		    one_downstream(&t, 2, 3, 0);
		struct health *h = create_bound(&t);

		ck_assert_int_eq(health_quota_reopens(ds->health, ds, T0), 0);      /* room */
		ck_assert_uint_eq(begin_n(ds, 2, 0, T0 + 10), 2);
		/* full of attempts under way: their outcome decides */
		ck_assert_int_eq(health_quota_reopens(ds->health, ds, T0 + 10), 0);
		deliver_n(ds, 1, 0, T0 + 10, T0 + 12);
		deliver_n(ds, 1, 0, T0 + 10, T0 + 15);
		ck_assert_int_eq(health_quota_reopens(ds->health, ds, T0 + 20),
		    calendar ? T0 + 60 : T0 + 72);
		ck_assert_int_eq(health_quota_reopens(ds->health, ds, T0 + 75), 0);
		ck_assert_uint_eq(begin_n(ds, 1, 0, T0 + 80), 1);
		deliver_n(ds, 1, 0, T0 + 80, T0 + 85);
		/* the minute has room, the hour is full */
		ck_assert_int_eq(health_quota_reopens(ds->health, ds, T0 + 90),
		    calendar ? T0 + 3600 : T0 + 3612);
		ck_assert_uint_eq(begin_n(ds, 1, 0, T0 + 90), 0);
		health_destroy(h);
	}
}
END_TEST

/*
 * A message under way may be accepted in the next window, or the one
 * after: its reservation counts until its attempt ends, and a delivery
 * counts in the window where it ended (never earlier than the provider
 * counted it).
 */
START_TEST(test_in_flight_counts_until_it_ends)
{
	for (int calendar = 0; calendar < 2; calendar++) {
		struct tcfg t;
		struct downstream_cfg *ds = calendar ? one_calendar_downstream(&t, 10, 0, 0) :
		    one_downstream(&t, 10, 0, 0);
		struct health *h = create_bound(&t);

		ck_assert_uint_eq(begin_n(ds, 10, 0, T0 + 59), 10);
		ck_assert_uint_eq(begin_n(ds, 10, 1, T0 + 200), 0);    /* still under way */
		deliver_n(ds, 3, 0, T0 + 59, T0 + 181);
		for (int i = 0; i < 4; i++)
			health_end_since(ds->health, ds, &hcfg, 0, T0 + 59, T0 + 181,
			    HEALTH_CANCELLED, 0, NULL);
		/* 3 delivered at T0+181 and 3 under way: 4 left, in either kind */
		ck_assert_int_eq(view_at(ds, T0 + 181).quota_left, 4);
		ck_assert_uint_eq(begin_n(ds, 10, 1, T0 + 181), 4);
		/* deliveries count from when they ended: free again 60 s later
		 * (rolling) or when their minute is over (calendar) */
		ck_assert_int_eq(view_at(ds, T0 + 240).quota_left, calendar ? 3 : 0);
		ck_assert_int_eq(view_at(ds, T0 + 241).quota_left, 3);
		health_destroy(h);
	}
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
	/* for status: deliveries per UTC window */
	deliver_n(ds, 999, 0, T0, T0 + 59);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0 + 59, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 999);
	deliver_n(ds, 1, 0, T0, T0 + 60);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0 + 60, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 1);
	ck_assert_uint_eq(s.sent_hour, 1000);
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

/* Failed probes count toward the circuit and leave quotas alone. */
static void
probe_fail_n(struct downstream_cfg *ds, unsigned n, time_t now)
{
	for (unsigned i = 0; i < n; i++)
		health_probe_result(ds->health, ds, &hcfg, now, false, 0, "421 go away");
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

	/* two deliveries fill the minute, then three failed probes open */
	ck_assert_uint_eq(begin_n(ds, 2, 1, T0), 2);
	health_end(ds->health, ds, &hcfg, 1, T0, HEALTH_OK, 1, NULL);
	health_end(ds->health, ds, &hcfg, 1, T0, HEALTH_OK, 1, NULL);
	probe_fail_n(ds, 3, T0);
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

	probe_fail_n(ds, 3, T0);
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

/* A worker that dies mid-delivery gives back what it reserved; what it
 * delivered before it died stays counted. */
static void
child_deliver_one_and_die(unsigned i, void *arg)
{
	struct race *r = arg;

	if (!health_begin(r->ds->health, r->ds, 5 + i, r->now) ||
	    !health_begin(r->ds->health, r->ds, 5 + i, r->now))
		_exit(1);
	health_end_since(r->ds->health, r->ds, &hcfg, 5 + i, r->now, r->now, HEALTH_OK, 1, NULL);
	_exit(9);                        /* killed with one attempt under way */
}

START_TEST(test_dead_worker_gives_quota_back)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 5, 0, 100);
	struct health *h = create_bound(&t);
	struct race r = { ds, NULL, T0, 1 };
	struct health_snapshot s;

	ck_assert(health_begin(ds->health, ds, 4, T0));        /* a live worker's */
	run_children(2, child_deliver_one_and_die, &r, 9);
	ck_assert_int_eq(view_at(ds, T0).quota_left, 0);
	health_worker_gone(h, 5);
	ck_assert_int_eq(view_at(ds, T0).quota_left, 1);
	health_worker_gone(h, 6);
	ck_assert_int_eq(view_at(ds, T0).quota_left, 2);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0, &s), 0);
	ck_assert_uint_eq(s.sent_minute, 3);     /* 2 delivered, 1 under way */
	ck_assert_uint_eq(s.sent_day, 3);
	/* the live worker's attempt is still its own to end */
	health_end(ds->health, ds, &hcfg, 4, T0, HEALTH_FAIL, 0, "421 later");
	ck_assert_int_eq(view_at(ds, T0).quota_left, 3);
	health_worker_gone(h, HEALTH_MAX_WORKER_SLOTS);          /* no such slot: ignored */
	health_destroy(h);
}
END_TEST

/* Message times, and the most that any `span` seconds hold. */
static unsigned
most_in_any_window(const time_t *at, size_t n, time_t span)
{
	unsigned most = 0;

	for (size_t i = 0; i < n; i++) {
		unsigned in = 0;

		for (size_t j = 0; j < n; j++)
			in += at[j] <= at[i] && at[j] > at[i] - span;
		if (in > most)
			most = in;
	}
	return most;
}

struct attempt {
	time_t begun, ends;
	enum health_outcome outcome;
};

static uint32_t
lcg(uint32_t *x)
{
	*x = *x * 1103515245u + 12345u;
	return *x >> 8;
}

/*
 * Three days of traffic against `max_per_day: 20`: attempts overlap, last
 * up to 30 s, some fail or are cancelled, and 40 of them come as a burst
 * around midnight UTC. Returns the number delivered; at[] gets when.
 */
static size_t
simulate_days(struct downstream_cfg *ds, time_t *at, size_t max)
{
	const time_t midnight = T0 + 14 * 3600;
	struct attempt pending[64];
	size_t n_pending = 0, n_at = 0;
	uint32_t seed = 42;
	time_t now = T0;

	while (now < T0 + 3 * 86400) {
		bool burst = now >= midnight - 120 && now < midnight + 120;

		now += burst ? 5 : 60 + lcg(&seed) % 1800;
		for (size_t k = 0; k < n_pending; )
			if (pending[k].ends <= now) {
				health_end_since(ds->health, ds, &hcfg, 0, pending[k].begun,
				    pending[k].ends, pending[k].outcome, 1, "451 later");
				if (pending[k].outcome == HEALTH_OK && n_at < max)
					at[n_at++] = pending[k].ends;
				pending[k] = pending[--n_pending];
			} else
				k++;
		if (n_pending < 64 && health_begin(ds->health, ds, 0, now)) {
			uint32_t roll = lcg(&seed) % 10;

			pending[n_pending++] = (struct attempt){ now, now + lcg(&seed) % 31,
				roll < 8 ? HEALTH_OK : roll < 9 ? HEALTH_FAIL : HEALTH_CANCELLED };
		}
	}
	return n_at;
}

/* The README's promise: a provider's "20 a day" is never exceeded. */
START_TEST(test_rolling_day_is_never_exceeded)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 0, 0, 20);
	struct health *h = create_bound(&t);
	time_t at[512];
	size_t n = simulate_days(ds, at, 512);

	ck_assert_uint_ge(n, 50);                       /* the quota was used */
	ck_assert_uint_le(most_in_any_window(at, n, 86400), 20);
	health_destroy(h);
}
END_TEST

/* Calendar windows allow a burst across midnight: only UTC days count. */
START_TEST(test_calendar_day_resets_at_midnight)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_calendar_downstream(&t, 0, 0, 20);
	struct health *h = create_bound(&t);
	time_t at[512];
	size_t n = simulate_days(ds, at, 512);

	ck_assert_uint_gt(most_in_any_window(at, n, 86400), 20);
	for (size_t i = 0; i < n; i++) {
		unsigned same_day = 0;

		for (size_t j = 0; j < n; j++)
			same_day += at[j] / 86400 == at[i] / 86400;
		ck_assert_uint_le(same_day, 20);
	}
	health_destroy(h);
}
END_TEST

/*
 * What a compromised worker can do to shared memory: write whatever it has
 * mapped writable, try to make the rest writable (mprotect, /proc/self/mem)
 * and to reopen what it can find. Exits 0 when nothing but the live
 * segment gave way.
 */
static void
child_scribble(unsigned i, void *arg)
{
	struct health *h = arg;
	unsigned long lo, hi;
	char line[512], perms[8];
	FILE *maps;
	int mem = open("/proc/self/mem", O_RDWR);

	(void)i;
	health_after_fork(h);            /* what every child of the master does first */
	if ((maps = fopen("/proc/self/maps", "r")) == NULL)
		_exit(2);
	while (fgets(line, sizeof(line), maps) != NULL) {
		if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3 || perms[3] != 's' ||
		    (strstr(line, "smtpmux") == NULL && strstr(line, dir) == NULL))
			continue;
		if (perms[1] == 'w') {
			if (strstr(line, "smtpmux-live") == NULL)
				_exit(3);        /* anything else writable is the master's */
			memset((void *)lo, 0xff, hi - lo);
			continue;
		}
		if (mprotect((void *)lo, hi - lo, PROT_READ | PROT_WRITE) == 0)
			_exit(4);
		if (mem >= 0 && pwrite(mem, "\xff", 1, (off_t)lo) == 1)
			_exit(5);
	}
	fclose(maps);
	for (int fd = 3; fd < 64; fd++) {
		char link[64], target[256];
		ssize_t n;

		snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
		if ((n = readlink(link, target, sizeof(target) - 1)) > 0 &&
		    (target[n] = '\0', strstr(target, "smtpmux") != NULL))
			_exit(6);                /* no way back to the segments */
	}
	_exit(0);
}

START_TEST(test_worker_cannot_touch_the_masters_part)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 10, 0, 0);
	struct health *h = create_bound(&t), *ro;
	struct health_snapshot s;
	char err[256];
	char *text = NULL;
	size_t len = 0;
	FILE *out;

	ck_assert_uint_eq(begin_n(ds, 2, 0, T0), 2);
	run_children(1, child_scribble, h, 0);
	/* the master's part is intact... */
	ck_assert_uint_eq(health_count(h), 1);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0, &s), 0);
	ck_assert_str_eq(s.key, "smtp.a.test:587 acct");
	ck_assert_str_eq(s.name, "a");
	ck_assert_uint_eq(s.limit_minute, 10);
	/* ...and what it does with the scribbled rest stays within bounds */
	for (unsigned slot = 0; slot < HEALTH_MAX_WORKER_SLOTS; slot++)
		health_worker_gone(h, slot);
	ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), 0);
	ck_assert_uint_eq(health_count(h), 1);
	ro = reader_of(h);
	out = open_memstream(&text, &len);
	status_print(out, ro, &hcfg, T0);
	fclose(out);
	ck_assert_ptr_nonnull(strstr(text, "smtp.a.test:587 acct"));
	free(text);
	ck_assert_int_eq(health_save(h, path, NULL), 0);
	health_destroy(ro);
	health_destroy(h);
}
END_TEST

/* A reload that changes a limit moves the window to new cells and keeps
 * what it counts; attempts under way end there. */
START_TEST(test_resize_keeps_counts)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 5, 0, 0);
	struct health *h = create_bound(&t);
	char err[256];

	ck_assert_uint_eq(begin_n(ds, 4, 0, T0), 4);
	deliver_n(ds, 2, 0, T0, T0 + 1);
	/* shrunk below what it holds: the attempts under way and the newest
	 * delivery are kept, the window is full */
	ds->max_per_minute = 3;
	ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), 0);
	ck_assert_int_eq(view_at(ds, T0 + 2).quota_left, 0);
	ck_assert_uint_eq(view_at(ds, T0 + 2).quota_limit, 3);
	deliver_n(ds, 1, 0, T0, T0 + 2);
	health_end_since(ds->health, ds, &hcfg, 0, T0, T0 + 2, HEALTH_FAIL, 0, "451");
	ck_assert_int_eq(view_at(ds, T0 + 2).quota_left, 1);
	/* grown, and made calendar: the same messages count */
	ds->max_per_minute = 10;
	ds->quota_window = QUOTA_CALENDAR;
	ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), 0);
	ck_assert_int_eq(view_at(ds, T0 + 2).quota_left, 8);
	ck_assert_int_eq(view_at(ds, T0 + 60).quota_left, 10);
	/* unlimited: nothing to count any more */
	ds->max_per_minute = 0;
	ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), 0);
	ck_assert_int_eq(view_at(ds, T0 + 2).quota_left, -1);
	health_destroy(h);
}
END_TEST

/* Downstreams of two users on one account share its windows, at the lower
 * limit; a limit larger than the cells there are is refused. */
START_TEST(test_shared_account_takes_the_lower_limit)
{
	struct tcfg t;
	struct downstream_cfg *a, *b;
	struct health *h;
	char err[512];

	tuser(&t, 0, "one@example.org");
	a = tds(&t, 0, "a", "smtp.a.test:587", "acct");
	a->max_per_day = 500;
	tuser(&t, 1, "two@example.org");
	b = tds(&t, 1, "a too", "smtp.a.test:587", "acct");
	b->max_per_day = 300;
	b->quota_window = QUOTA_CALENDAR;
	h = create_bound(&t);
	ck_assert_ptr_eq(a->health, b->health);
	ck_assert_uint_eq(view_at(a, T0).quota_limit, 300);
	/* one of them rolling: rolling (the stricter) */
	ck_assert_uint_eq(begin_n(b, 1, 0, T0), 1);
	deliver_n(b, 1, 0, T0, T0);
	ck_assert_int_eq(view_at(a, T0 + 14 * 3600).quota_left, 299);
	b->max_per_day = 0x7ffffff0;
	ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), 0);   /* a's 500 */
	a->max_per_day = 0x7ffffff0;
	ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "smtp.a.test:587 acct"));
	health_destroy(h);
}
END_TEST

/* Workers keep reserving and delivering while the master resizes: every
 * delivery stays counted, and none beyond the limit is granted. */
START_TEST(test_resize_under_concurrency)
{
	struct tcfg t;
	struct downstream_cfg *ds = one_downstream(&t, 4, 0, 0);
	struct health *h = create_bound(&t);
	struct shared *sh = shared_new();
	struct health_snapshot s;
	pid_t pid[4];
	char err[256];

	for (unsigned i = 0; i < 4; i++) {
		if ((pid[i] = fork()) == 0) {
			health_after_fork(h);
			for (;;) {
				bool done = atomic_load(&sh->won[15]);

				if (health_begin(ds->health, ds, i, T0)) {
					health_end(ds->health, ds, &hcfg, i, T0, HEALTH_OK, 1, NULL);
					atomic_fetch_add(&sh->granted, 1);
				} else if (done)
					break;       /* full at the last limit */
			}
			_exit(0);
		}
		ck_assert_int_gt(pid[i], 0);
	}
	while (atomic_load(&sh->granted) < 4)       /* the workers are at it */
		sched_yield();
	for (unsigned limit = 5; limit <= 400; limit++) {
		ds->max_per_minute = limit;
		ck_assert_int_eq(health_bind(h, &t.cfg, err, sizeof(err)), 0);
	}
	atomic_store(&sh->won[15], 1);              /* stop once the window is full */
	for (unsigned i = 0; i < 4; i++) {
		int status;

		ck_assert_int_eq(waitpid(pid[i], &status, 0), pid[i]);
		ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	}
	ck_assert_int_eq(atomic_load(&sh->granted), 400);
	/* no delivery was left looking like an attempt under way */
	for (unsigned i = 0; i < 4; i++)
		health_worker_gone(h, i);
	ck_assert_int_eq(health_snapshot(h, 0, &hcfg, T0, &s), 0);
	ck_assert_uint_eq(s.sent_minute, (uint32_t)atomic_load(&sh->granted));
	munmap(sh, sizeof(*sh));
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

	ro = reader_of(h);
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

	ro = reader_of(h);
	ck_assert_ptr_nonnull(ro);
	status_print(out, ro, &hcfg, T0 + 1);
	fclose(out);
	ck_assert_ptr_nonnull(strstr(text, "NAME"));
	ck_assert_ptr_nonnull(strstr(text, "LAST ERROR"));
	ck_assert_ptr_nonnull(strstr(text, "primary \"eu\""));
	ck_assert_ptr_nonnull(strstr(text, "smtp.a.test:587 acct"));
	ck_assert_ptr_nonnull(strstr(text, "3/10"));
	ck_assert_ptr_nonnull(strstr(text, "1/-"));      /* delivered this hour */
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
	/* Stamped a day ahead: a rolling window counts them for as long as
	 * this test may possibly run, across any minute boundary. */
	struct health *h = two_downstreams(&t, time(NULL) + 86400);
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
	tcase_add_test(seg, test_save_notices_a_disturbed_file);
	tcase_add_test(seg, test_load_believes_only_a_safe_file);
	tcase_add_test(quota, test_quota_exact_under_concurrency);
	tcase_add_test(quota, test_quota_windows_roll_and_roll_back);
	tcase_add_test(quota, test_in_flight_counts_until_it_ends);
	tcase_add_test(quota, test_quota_reopens);
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
	tcase_add_test(procs, test_dead_worker_gives_quota_back);
	tcase_add_test(procs, test_worker_cannot_touch_the_masters_part);
	tcase_add_test(procs, test_resize_under_concurrency);
	tcase_add_test(bind, test_resize_keeps_counts);
	tcase_add_test(bind, test_shared_account_takes_the_lower_limit);
	tcase_add_test(quota, test_rolling_day_is_never_exceeded);
	tcase_add_test(quota, test_calendar_day_resets_at_midnight);
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

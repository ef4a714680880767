/* SPDX-License-Identifier: MIT */
/*
 * One daemon per state file, whatever happens to the file, and the live
 * state handed to status readers read-only, to those allowed only.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "health.h"
#include "queue_stats.h"
#include "token_table.h"
#include "../smtpmuxd/instance.h"

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

static char dir[64];
static char path[128];

static void
setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/check_instance.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/state", dir);
}

static void
teardown(void)
{
	char link[160];

	snprintf(link, sizeof(link), "%s/link", dir);
	unlink(link);
	unlink(path);
	rmdir(dir);
}

static bool
claimed_elsewhere(const char *p, char *err, size_t errlen)
{
	struct instance *in = instance_claim(p, err, errlen);

	if (in == NULL)
		return true;
	instance_close(in);
	return false;
}

START_TEST(test_one_daemon_per_state_file)
{
	struct instance *in;
	char err[512], other[160], expect[256];

	ck_assert_int_eq(close(open(path, O_WRONLY | O_CREAT, 0600)), 0);
	in = instance_claim(path, err, sizeof(err));
	ck_assert_msg(in != NULL, "%s", err);
	ck_assert(claimed_elsewhere(path, err, sizeof(err)));
	snprintf(expect, sizeof(expect), "state file %s is in use by another smtpmuxd "
	    "(pid %ld, uid %u)", path, (long)getpid(), (unsigned)geteuid());
	ck_assert_msg(strstr(err, expect) != NULL, "%s", err);

	/* the lock does not depend on the file: deleting it changes nothing */
	ck_assert_int_eq(unlink(path), 0);
	ck_assert(claimed_elsewhere(path, err, sizeof(err)));
	/* nor on how the path is spelt */
	snprintf(other, sizeof(other), "%s/./state", dir);
	ck_assert(claimed_elsewhere(other, err, sizeof(err)));
	snprintf(other, sizeof(other), "%s/link", dir);
	ck_assert_int_eq(symlink(dir, other), 0);
	snprintf(other, sizeof(other), "%s/link/state", dir);
	ck_assert(claimed_elsewhere(other, err, sizeof(err)));
	/* another state file is another daemon */
	snprintf(other, sizeof(other), "%s/state2", dir);
	ck_assert(!claimed_elsewhere(other, err, sizeof(err)));
	instance_close(in);
	ck_assert(!claimed_elsewhere(path, err, sizeof(err)));
}
END_TEST

/* Workers still finishing after their master was killed keep the lock. */
START_TEST(test_children_keep_the_lock)
{
	char err[512];
	struct instance *in = instance_claim(path, err, sizeof(err));
	int gate[2];
	pid_t pid;
	char c;

	ck_assert_ptr_nonnull(in);
	ck_assert_int_eq(pipe(gate), 0);
	if ((pid = fork()) == 0) {
		close(gate[1]);
		(void)!read(gate[0], &c, 1);
		_exit(0);
	}
	ck_assert_int_gt(pid, 0);
	close(gate[0]);
	instance_close(in);                      /* the master is gone */
	ck_assert(claimed_elsewhere(path, err, sizeof(err)));
	close(gate[1]);                          /* and now its last worker */
	ck_assert_int_eq(waitpid(pid, NULL, 0), pid);
	ck_assert(!claimed_elsewhere(path, err, sizeof(err)));
}
END_TEST

START_TEST(test_long_paths_are_hashed)
{
	char a[300], b[300], na[108], nb[108];
	size_t la, lb;

	snprintf(a, sizeof(a), "/%0250d/a", 0);
	snprintf(b, sizeof(b), "/%0250d/b", 0);
	la = instance_name(a, na, sizeof(na));
	lb = instance_name(b, nb, sizeof(nb));
	ck_assert_uint_le(la, sizeof(na));
	ck_assert_int_eq(na[0], '\0');
	ck_assert_int_eq(strncmp(na + 1, "smtpmuxd#", 9), 0);
	ck_assert(la != lb || memcmp(na, nb, la) != 0);
	la = instance_name("/run/smtpmux/smtpmuxd.state", na, sizeof(na));
	ck_assert_uint_eq(la, 1 + strlen("smtpmuxd:/run/smtpmux/smtpmuxd.state"));
	ck_assert_int_eq(memcmp(na + 1, "smtpmuxd:/run/smtpmux/smtpmuxd.state", la - 1), 0);
}
END_TEST

/* --- status readers */

enum reader_result {
	READER_OK = 0,                   /* got read-only segments it cannot write */
	READER_REFUSED = 10,
	READER_NO_DAEMON = 11,
	READER_WRITABLE = 12,            /* a way to write them was found */
	READER_OTHER = 13
};

/* Could this process write the segment behind fd in any way? */
static bool
writable(int fd, size_t size)
{
	char p[64];
	void *m;
	int rw;

	if ((fcntl(fd, F_GETFL) & O_ACCMODE) != O_RDONLY || write(fd, "", 1) >= 0)
		return true;
	m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m != MAP_FAILED)
		return true;
	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	if ((rw = open(p, O_RDWR)) >= 0) {
		m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, rw, 0);
		close(rw);
		if (m != MAP_FAILED)
			return true;
	}
	return ftruncate(fd, 0) == 0;
}

/* An optional segment: a reader must get it when the daemon has one,
 * read-only, and be able to map it. */
static int
optional_segment(int fd, bool expected, bool (*attaches)(int fd))
{
	struct stat st;

	if ((fd >= 0) != expected)
		return READER_OTHER;
	if (fd < 0)
		return READER_OK;
	if (fstat(fd, &st) < 0 || (geteuid() != 0 && writable(fd, (size_t)st.st_size)))
		return READER_WRITABLE;
	return attaches(fd) ? READER_OK : READER_OTHER;
}

static bool
queue_attaches(int fd)
{
	struct queue_stats *qs = queue_stats_attach(fd);

	queue_stats_destroy(qs);
	return qs != NULL;
}

/* The token status is sealed like the control segment: not even root maps
 * it writable. */
static bool
tokens_attach(int fd)
{
	struct stat st;
	struct token_table *tt;

	if (fstat(fd, &st) < 0 || writable(fd, (size_t)st.st_size) ||
	    !(fcntl(fd, F_GET_SEALS) & F_SEAL_FUTURE_WRITE))
		return false;
	tt = token_table_attach(fd);
	token_table_destroy(tt);
	return tt != NULL;
}

/* A reader of uid as, group gid, and supplementary group supp unless -1,
 * that expects the queue figures and the token status or not. */
static int
reader(uid_t as, gid_t gid, gid_t supp, bool queue, bool tokens)
{
	char err[512];
	struct instance_extras x;
	int ctl, live, rc;
	struct health *h;
	struct stat st;

	if (as != (uid_t)-1 && (setgroups(supp != (gid_t)-1, &supp) < 0 || setgid(gid) < 0 ||
	    setuid(as) < 0))
		return READER_OTHER;
	if (instance_fetch(path, (uid_t)-1, &ctl, &live, &x, err, sizeof(err)) < 0)
		return errno == EACCES ? READER_REFUSED :
		    errno == ECONNREFUSED ? READER_NO_DAEMON : READER_OTHER;
	if ((rc = optional_segment(x.queue_fd, queue, queue_attaches)) != READER_OK ||
	    (rc = optional_segment(x.token_fd, tokens, tokens_attach)) != READER_OK)
		return rc;
	/* The control segment is sealed: not even root maps it writable. The
	 * live one, which workers write anyway, only root could reopen. */
	if (fstat(ctl, &st) < 0 || writable(ctl, (size_t)st.st_size) ||
	    !(fcntl(ctl, F_GET_SEALS) & F_SEAL_FUTURE_WRITE) ||
	    fstat(live, &st) < 0 || (geteuid() != 0 && writable(live, (size_t)st.st_size)))
		return READER_WRITABLE;
	if ((h = health_attach(ctl, live)) == NULL)
		return READER_OTHER;
	health_destroy(h);
	return READER_OK;
}

/* Runs a reader in a child while this process answers as the master. */
static int
read_from(struct instance *in, const struct health *h, const struct instance_extras *x,
    const struct instance_access *access, uid_t as, gid_t gid, gid_t supp)
{
	pid_t pid = fork();
	int status;

	ck_assert_int_ge(pid, 0);
	if (pid == 0)
		_exit(reader(as, gid, supp, x->queue_fd >= 0, x->token_fd >= 0));
	for (;;) {
		struct pollfd p = { in ? instance_fd(in) : -1, POLLIN, 0 };

		if (waitpid(pid, &status, WNOHANG) == pid)
			break;
		if (poll(&p, 1, 50) > 0)
			instance_serve(in, h, x, access);
	}
	ck_assert(WIFEXITED(status));
	return WEXITSTATUS(status);
}

/* A token table with one OAuth account, as the master makes it. */
static struct token_table *
token_table_one(void)
{
	struct token_source_cfg src = { .kind = TOKEN_SOURCE_REFRESH_TOKEN, .id = 1 };
	struct downstream_cfg ds = { .name = "o", .addr = "smtp.example.com:587",
		.user = "a@example.com", .token = &src, .token_slot = -1 };
	struct user_cfg user = { .downstreams = &ds, .n_downstreams = 1 };
	struct config cfg = { .users = &user, .n_users = 1 };
	struct token_table *tt = NULL;
	char err[256];

	ck_assert_msg(token_table_bind(&tt, &cfg, err, sizeof(err)) == 0, "%s", err);
	return tt;
}

START_TEST(test_status_readers)
{
	char err[512];
	struct health *h = health_create(NULL);
	struct queue_stats *qs = queue_stats_create();
	struct token_table *tt = token_table_one();
	struct instance *in;
	struct instance_access access = { 4242, 4243, 4244 };
	const struct instance_extras none = { -1, -1 };
	const struct instance_extras queue = { queue_stats_fd(qs), -1 };
	const struct instance_extras tokens = { -1, token_table_fd(tt) };
	const struct instance_extras both = { queue_stats_fd(qs), token_table_fd(tt) };

	ck_assert_ptr_nonnull(h);
	ck_assert_ptr_nonnull(qs);
	ck_assert_int_ge(token_table_fd(tt), 0);
	ck_assert_int_eq(read_from(NULL, h, &none, &access, (uid_t)-1, 0, 0), READER_NO_DAEMON);
	in = instance_claim(path, err, sizeof(err));
	ck_assert_ptr_nonnull(in);
	ck_assert_int_eq(read_from(in, h, &none, &access, (uid_t)-1, 0, 0), READER_OK);
	ck_assert_int_eq(read_from(in, h, &queue, &access, (uid_t)-1, 0, 0), READER_OK);
	ck_assert_int_eq(read_from(in, h, &tokens, &access, (uid_t)-1, 0, 0), READER_OK);
	ck_assert_int_eq(read_from(in, h, &both, &access, (uid_t)-1, 0, 0), READER_OK);
	if (geteuid() == 0) {
		/* the workers' user, members of their group, and anyone else */
		ck_assert_int_eq(read_from(in, h, &both, &access, 4243, 5000, -1), READER_OK);
		ck_assert_int_eq(read_from(in, h, &tokens, &access, 5000, 4244, -1), READER_OK);
		ck_assert_int_eq(read_from(in, h, &both, &access, 5000, 5000, 4244), READER_OK);
		ck_assert_int_eq(read_from(in, h, &both, &access, 5000, 5000, 5001),
		    READER_REFUSED);
	}
	instance_close(in);
	token_table_destroy(tt);
	queue_stats_destroy(qs);
	health_destroy(h);
}
END_TEST

static Suite *
instance_suite(void)
{
	Suite *s = suite_create("instance");
	TCase *tc = tcase_create("instance");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_one_daemon_per_state_file);
	tcase_add_test(tc, test_children_keep_the_lock);
	tcase_add_test(tc, test_long_paths_are_hashed);
	tcase_add_test(tc, test_status_readers);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(instance_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

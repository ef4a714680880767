/* SPDX-License-Identifier: MIT */
/*
 * Tests of the log and of the pid cache it uses: every line names the
 * process that wrote it, also after a fork (the daemon forks its workers,
 * and caches its pid rather than asking the kernel on every line).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"
#include "self_pid.h"

static char log_path[64];

static void
setup(void)
{
	int fd;

	snprintf(log_path, sizeof(log_path), "/tmp/check_log.XXXXXX");
	fd = mkstemp(log_path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	ck_assert_int_eq(log_open("smtpmuxd", LOG_TO_FILE, log_path), 0);
}

static void
teardown(void)
{
	log_close();
	unlink(log_path);
}

/* The whole log file, NUL-terminated (static: one at a time). */
static const char *
log_text(void)
{
	static char buf[8192];
	FILE *f = fopen(log_path, "r");
	size_t n;

	ck_assert_ptr_nonnull(f);
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

/* Runs fn in a forked child and returns the child's pid once it exited 0. */
static pid_t
in_child(void (*fn)(void))
{
	int status;
	pid_t pid = fork();

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		fn();
		_exit(0);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	return pid;
}

START_TEST(self_pid_is_getpid)
{
	ck_assert_int_eq(self_pid(), getpid());
	ck_assert_int_eq(self_pid(), getpid());
}
END_TEST

static void
child_checks_its_pid(void)
{
	/* A child that knew its parent's pid would say the parent's. */
	if (self_pid() != getpid())
		_exit(1);
}

START_TEST(self_pid_after_fork)
{
	ck_assert_int_eq(self_pid(), getpid());         /* cached in the parent first */
	in_child(child_checks_its_pid);
	ck_assert_int_eq(self_pid(), getpid());         /* the parent's is unchanged */
}
END_TEST

static void
child_logs(void)
{
	log_set_role("worker[7]");
	log_info("from the child");
	log_close();
}

START_TEST(lines_name_their_process_across_fork)
{
	char mine[64], childs[64];
	pid_t child;
	const char *text;

	log_info("before the fork");
	child = in_child(child_logs);
	log_info("after the fork");
	text = log_text();
	snprintf(mine, sizeof(mine), "smtpmuxd[%ld]: before the fork\n", (long)getpid());
	ck_assert_msg(strstr(text, mine) != NULL, "no \"%s\" in:\n%s", mine, text);
	snprintf(mine, sizeof(mine), "smtpmuxd[%ld]: after the fork\n", (long)getpid());
	ck_assert_msg(strstr(text, mine) != NULL, "no \"%s\" in:\n%s", mine, text);
	snprintf(childs, sizeof(childs), "smtpmuxd[%ld]: worker[7]: from the child\n", (long)child);
	ck_assert_msg(strstr(text, childs) != NULL, "no \"%s\" in:\n%s", childs, text);
}
END_TEST

START_TEST(levels_and_tags)
{
	const char *text;

	log_set_level(LOG_LEVEL_INFO);
	log_debug("not shown");
	log_warn("shown as a warning");
	text = log_text();
	ck_assert_ptr_null(strstr(text, "not shown"));
	ck_assert_ptr_nonnull(strstr(text, "]: warning: shown as a warning\n"));
}
END_TEST

static Suite *
log_suite(void)
{
	Suite *s = suite_create("log");
	TCase *tc = tcase_create("pid");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, self_pid_is_getpid);
	tcase_add_test(tc, self_pid_after_fork);
	tcase_add_test(tc, lines_name_their_process_across_fork);
	tcase_add_test(tc, levels_and_tags);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(log_suite());
	int failed;

	/* Our own forks are the subject: no forking runner around them. */
	srunner_set_fork_status(sr, CK_NOFORK);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include "harden.h"

#define SD_LISTEN_FDS_START 3

/* The descriptors systemd passed this process: [3, 3 + n). */
static unsigned
systemd_fds(void)
{
	const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
	char *end;
	long n;

	if (pid == NULL || fds == NULL || strtol(pid, &end, 10) != (long)getpid() || *end != '\0')
		return 0;
	n = strtol(fds, &end, 10);
	return *end == '\0' && n > 0 && n < INT_MAX - SD_LISTEN_FDS_START ? (unsigned)n : 0;
}

static void
close_from(unsigned first)
{
	long max;

	if (close_range(first, ~0U, 0) == 0)
		return;
	/* A kernel before 5.9: one by one. */
	max = sysconf(_SC_OPEN_MAX);
	for (long fd = first; fd < (max > 0 ? max : 65536); fd++)
		close((int)fd);
}

void
harden_close_inherited(void)
{
	close_from(SD_LISTEN_FDS_START + systemd_fds());
}

int
harden_master(bool allow_core)
{
	struct rlimit none = { 0, 0 };

	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		return -1;
	if (!allow_core && setrlimit(RLIMIT_CORE, &none) < 0)
		return -1;
	return 0;
}

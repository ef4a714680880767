/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pidfile.h"

/* 0 when the file holds no readable pid. */
static pid_t
pidfile_read(const char *path)
{
	FILE *fp = fopen(path, "re");
	long pid = 0;

	if (fp == NULL)
		return 0;
	if (fscanf(fp, "%ld", &pid) != 1 || pid <= 0)
		pid = 0;
	fclose(fp);
	return (pid_t)pid;
}

/* After a reboot the pid may belong to another program: where /proc
 * tells the command name, only an smtpmuxd counts. */
static int
pid_is_smtpmuxd(pid_t pid)
{
	char path[64], comm[64] = "";
	FILE *fp;

	if (kill(pid, 0) < 0 && errno != EPERM)
		return 0;
	snprintf(path, sizeof(path), "/proc/%ld/comm", (long)pid);
	fp = fopen(path, "re");
	if (fp == NULL)
		return 1;
	if (fgets(comm, sizeof(comm), fp) == NULL)
		comm[0] = '\0';
	fclose(fp);
	return comm[0] == '\0' || strstr(comm, "smtpmux") != NULL ||
	    strstr(comm, "memcheck") != NULL;
}

int
pidfile_check(const char *path, char *err, size_t errlen)
{
	pid_t pid = pidfile_read(path);

	if (pid > 0 && pid != getpid() && pid_is_smtpmuxd(pid)) {
		snprintf(err, errlen, "pidfile %s: smtpmuxd is already running as pid %ld",
		    path, (long)pid);
		return -1;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		snprintf(err, errlen, "cannot remove stale pidfile %s: %s", path, strerror(errno));
		return -1;
	}
	return 0;
}

int
pidfile_write(const char *path, char *err, size_t errlen)
{
	char tmp[4096], line[32];
	int fd, len, ok;

	snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", path, (long)getpid());
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
	if (fd < 0) {
		snprintf(err, errlen, "cannot create pidfile %s: %s", tmp, strerror(errno));
		return -1;
	}
	len = snprintf(line, sizeof(line), "%ld\n", (long)getpid());
	ok = write(fd, line, (size_t)len) == len;
	if (close(fd) < 0)
		ok = 0;
	if (!ok || rename(tmp, path) < 0) {
		snprintf(err, errlen, "cannot write pidfile %s: %s", path, strerror(errno));
		unlink(tmp);
		return -1;
	}
	return 0;
}

void
pidfile_remove(const char *path)
{
	if (path != NULL && pidfile_read(path) == getpid())
		unlink(path);
}

/* SPDX-License-Identifier: MIT */
#include <pthread.h>
#include <stdbool.h>
#include <unistd.h>

#include "self_pid.h"

/* Process-wide by nature: what it caches is the process's own identity. */
static struct {
	pid_t pid;                       /* 0: not asked yet, or a fork made it stale */
	bool watching_forks;
} self;

/* pthread_atfork child handler: only a store, as a forked child may do. */
static void
self_pid_forked(void)
{
	self.pid = 0;
}

pid_t
self_pid(void)
{
	if (self.pid != 0)
		return self.pid;
	if (!self.watching_forks && pthread_atfork(NULL, NULL, self_pid_forked) == 0)
		self.watching_forks = true;
	/* Without the fork handler a cached pid could outlive a fork: ask
	 * every time then. */
	if (!self.watching_forks)
		return getpid();
	self.pid = getpid();
	return self.pid;
}

/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SELF_PID_H
#define SMTPMUX_SELF_PID_H

#include <sys/types.h>

/*
 * This process's pid, asked of the kernel once per process rather than on
 * every log line and message id: glibc no longer caches getpid(), and each
 * call is a system call. A fork (pthread_atfork) makes the child ask again.
 */
pid_t self_pid(void);

#endif

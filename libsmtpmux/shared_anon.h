/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SHARED_ANON_H
#define SMTPMUX_SHARED_ANON_H

#include <stddef.h>

/*
 * Zero-filled memory that the calling process shares with every process
 * it forks afterwards (MAP_SHARED | MAP_ANONYMOUS): state the workers keep
 * together while the daemon runs, with nothing on disk. NULL with errno
 * on failure (EINVAL for size 0).
 */
void *shared_anon_map(size_t size);
void shared_anon_unmap(void *p, size_t size);

#endif

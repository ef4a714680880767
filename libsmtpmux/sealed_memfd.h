/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SEALED_MEMFD_H
#define SMTPMUX_SEALED_MEMFD_H

#include <stddef.h>

/*
 * Shared memory the master makes before it forks: a memfd has no path, so
 * nobody can delete or replace it, and sealed against shrinking nobody -
 * not even root - can truncate it under a process that maps it (which
 * would kill that process with SIGBUS). What is handed to status readers
 * is a read-only descriptor, and the memfd's mode is 0400: a reader that is
 * not its owner cannot reopen it for writing either.
 */

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010   /* Linux 5.1 */
#endif

#define SEALS_FIXED_SIZE (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

/*
 * A memfd of size bytes sealed with seals, mapped writable at *rw and
 * read-only (from the read-only descriptor) at *ro. Returns that read-only
 * descriptor; the writable one is closed. -1 with errno.
 */
int sealed_memfd_make(const char *name, size_t size, unsigned seals, void **rw, void **ro);

/*
 * Maps read-only a descriptor someone handed over: it must be a regular
 * file of exactly size bytes that can never shrink (or reading it could
 * end in SIGBUS). NULL with errno (EPROTO: not such a file). fd stays open.
 */
void *sealed_memfd_map_foreign(int fd, size_t size);

/* close() and munmap() (of NULL or MAP_FAILED: nothing) that leave errno
 * as it was, for error paths. */
void close_keep_errno(int fd);
void unmap_keep_errno(void *p, size_t size);

#endif

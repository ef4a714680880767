/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_PIDFILE_H
#define SMTPMUXD_PIDFILE_H

#include <stddef.h>

/*
 * Returns -1 with one line in err when path names a running smtpmuxd;
 * removes a stale file (dead process, or a recycled pid that is not
 * smtpmuxd) and returns 0.
 */
int pidfile_check(const char *path, char *err, size_t errlen);

/* Writes the caller's pid atomically (temporary file + rename). */
int pidfile_write(const char *path, char *err, size_t errlen);

/* Removes path if it still holds the caller's pid. */
void pidfile_remove(const char *path);

#endif

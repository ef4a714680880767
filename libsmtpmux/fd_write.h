/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_FD_WRITE_H
#define SMTPMUX_FD_WRITE_H

#include <stddef.h>

/* Writes all of data to a blocking descriptor (a file: the spool, a
 * message body spilled to disk, the state file, a secret written back),
 * going on after a signal or a short write. 0, or -1 with errno. */
int fd_write_all(int fd, const void *data, size_t len);

#endif

/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_MSGBODY_H
#define SMTPMUX_MSGBODY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/*
 * A message body: kept in memory up to a threshold, then moved to an
 * unlinked temporary file, so big messages cost no memory and leave no
 * file behind whatever happens to the process.
 */

struct msgbody;

struct msgbody *msgbody_new(uint64_t memory_threshold, const char *tmp_dir);
void msgbody_free(struct msgbody *);

/* Appends data; -1 (errno set, logged by the caller) on a write error. */
int msgbody_append(struct msgbody *, const void *data, size_t len);

uint64_t msgbody_size(const struct msgbody *);

/* Copies up to len bytes from offset off; returns bytes copied (0 at end) or -1. */
ssize_t msgbody_read(struct msgbody *, uint64_t off, void *buf, size_t len);

#endif

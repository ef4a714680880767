/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_MSGBODY_H
#define SMTPMUX_MSGBODY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct evbuffer;

/*
 * A message body: kept in memory up to a threshold, then moved to an
 * unlinked temporary file, so big messages cost no memory and leave no
 * file behind whatever happens to the process.
 */

struct msgbody;

struct msgbody *msgbody_new(uint64_t memory_threshold, const char *tmp_dir);
void msgbody_free(struct msgbody *);

/*
 * A read-only body that is the octets [off, off + size) of an open file
 * (a queued message after its spool header); takes fd, closed by
 * msgbody_free(). NULL when out of memory (fd is then left open).
 */
struct msgbody *msgbody_from_file(int fd, uint64_t off, uint64_t size);

/* The file holding the body and its offset there, or -1 while the body is
 * in memory. For readers in another thread: pread() shares no offset. */
int msgbody_file(const struct msgbody *, uint64_t *off);

/* Appends data; -1 (errno set, logged by the caller) on a write error. */
int msgbody_append(struct msgbody *, const void *data, size_t len);

/* Appends and drains everything in src; while the body stays in memory
 * src's chains move over without a copy. -1 as for msgbody_append(). */
int msgbody_append_buffer(struct msgbody *, struct evbuffer *src);

uint64_t msgbody_size(const struct msgbody *);

/* Copies up to len bytes from offset off; returns bytes copied (0 at end) or -1. */
ssize_t msgbody_read(struct msgbody *, uint64_t off, void *buf, size_t len);

/* True while the body is in memory (below the threshold). */
bool msgbody_in_memory(const struct msgbody *);

/*
 * A body in memory lends its octets instead of copying them: *data points
 * at the contiguous run that starts at off, valid until the body changes
 * or is freed; returns its length (0 at the end), -1 (errno) for a body in
 * a file. Reading on from where the last run ended costs no walk.
 */
ssize_t msgbody_peek(struct msgbody *, uint64_t off, const void **data);

#endif

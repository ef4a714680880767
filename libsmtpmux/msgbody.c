/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "msgbody.h"
#include "fd_write.h"

/*
 * A body lives in an evbuffer until it would pass the threshold; then the
 * whole of it moves to a temporary file that is unlinked as soon as it is
 * created, so nothing is left on disk after a crash and the file's space
 * is returned when the descriptor closes. The move happens once: a body
 * never goes back to memory.
 */

struct msgbody {
	uint64_t threshold;
	char *tmp_dir;
	struct evbuffer *mem;            /* NULL once the body is in the file */
	int fd;                          /* -1 while in memory */
	uint64_t off;                    /* where the body starts in the file */
	uint64_t size;
	struct evbuffer_ptr peek_pos;    /* in mem, where the last peek ended */
	uint64_t peek_off;               /* its offset; UINT64_MAX: none */
	bool read_only;                  /* msgbody_from_file(): appending is refused */
};

struct msgbody *
msgbody_new(uint64_t memory_threshold, const char *tmp_dir)
{
	struct msgbody *b;

	if ((b = calloc(1, sizeof(*b))) == NULL)
		return NULL;
	b->threshold = memory_threshold;
	b->fd = -1;
	b->peek_off = UINT64_MAX;
	if (tmp_dir == NULL || *tmp_dir == '\0')
		tmp_dir = getenv("TMPDIR");
	if (tmp_dir == NULL || *tmp_dir == '\0')
		tmp_dir = "/tmp";
	if ((b->tmp_dir = strdup(tmp_dir)) == NULL ||
	    (b->mem = evbuffer_new()) == NULL) {
		free(b->tmp_dir);
		free(b);
		return NULL;
	}
	return b;
}

struct msgbody *
msgbody_from_file(int fd, uint64_t off, uint64_t size)
{
	struct msgbody *b = calloc(1, sizeof(*b));

	if (b == NULL)
		return NULL;
	b->fd = fd;
	b->off = off;
	b->size = size;
	b->read_only = true;
	b->peek_off = UINT64_MAX;
	return b;
}

int
msgbody_file(const struct msgbody *b, uint64_t *off)
{
	*off = b->off;
	return b->mem != NULL ? -1 : b->fd;
}

void
msgbody_free(struct msgbody *b)
{
	if (b == NULL)
		return;
	if (b->mem != NULL)
		evbuffer_free(b->mem);
	if (b->fd != -1)
		close(b->fd);
	free(b->tmp_dir);
	free(b);
}

static int
open_unlinked_tmp(const char *dir)
{
	char path[PATH_MAX];
	int fd, saved;

	if ((size_t)snprintf(path, sizeof(path), "%s/smtpmux.XXXXXX", dir) >= sizeof(path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	if ((fd = mkostemp(path, O_CLOEXEC)) == -1)
		return -1;
	if (unlink(path) == -1) {
		saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

/* Moves the in-memory part into a fresh temporary file. */
static int
spill_to_file(struct msgbody *b)
{
	struct evbuffer_iovec vec[16];
	int fd, i, n, saved;

	if ((fd = open_unlinked_tmp(b->tmp_dir)) == -1)
		return -1;
	while (evbuffer_get_length(b->mem) > 0) {
		n = evbuffer_peek(b->mem, -1, NULL, vec, 16);
		if (n > 16)
			n = 16;
		for (i = 0; i < n; i++) {
			if (fd_write_all(fd, vec[i].iov_base, vec[i].iov_len) == -1)
				goto fail;
			evbuffer_drain(b->mem, vec[i].iov_len);
		}
	}
	evbuffer_free(b->mem);
	b->mem = NULL;
	b->fd = fd;
	return 0;
fail:
	saved = errno;
	close(fd);
	errno = saved;
	return -1;
}

int
msgbody_append(struct msgbody *b, const void *data, size_t len)
{
	if (len == 0)
		return 0;
	if (b->read_only) {
		errno = EBADF;
		return -1;
	}
	b->peek_off = UINT64_MAX;
	if (b->mem != NULL && b->size + len > b->threshold &&
	    spill_to_file(b) == -1)
		return -1;
	if (b->mem != NULL) {
		if (evbuffer_add(b->mem, data, len) == -1) {
			errno = ENOMEM;
			return -1;
		}
	} else if (fd_write_all(b->fd, data, len) == -1)
		return -1;
	b->size += len;
	return 0;
}

int
msgbody_append_buffer(struct msgbody *b, struct evbuffer *src)
{
	struct evbuffer_iovec v;
	size_t len = evbuffer_get_length(src);

	if (len == 0)
		return 0;
	b->peek_off = UINT64_MAX;
	if (b->mem != NULL && b->size + len <= b->threshold) {
		if (evbuffer_add_buffer(b->mem, src) == -1) {
			errno = ENOMEM;
			return -1;
		}
		b->size += len;
		return 0;
	}
	while (evbuffer_peek(src, -1, NULL, &v, 1) > 0) {
		if (msgbody_append(b, v.iov_base, v.iov_len) == -1)
			return -1;
		evbuffer_drain(src, v.iov_len);
	}
	return 0;
}

uint64_t
msgbody_size(const struct msgbody *b)
{
	return b->size;
}

ssize_t
msgbody_read(struct msgbody *b, uint64_t off, void *buf, size_t len)
{
	struct evbuffer_ptr pos;
	ssize_t n;

	if (off >= b->size || len == 0)
		return 0;
	if (len > b->size - off)
		len = (size_t)(b->size - off);
	if (len > SSIZE_MAX)
		len = SSIZE_MAX;
	if (b->mem != NULL) {
		if (evbuffer_ptr_set(b->mem, &pos, (size_t)off, EVBUFFER_PTR_SET) == -1) {
			errno = EINVAL;
			return -1;
		}
		return evbuffer_copyout_from(b->mem, &pos, buf, len);
	}
	do
		n = pread(b->fd, buf, len, (off_t)(b->off + off));
	while (n == -1 && errno == EINTR);
	return n;
}

bool
msgbody_in_memory(const struct msgbody *b)
{
	return b->mem != NULL;
}

ssize_t
msgbody_peek(struct msgbody *b, uint64_t off, const void **data)
{
	struct evbuffer_ptr pos;
	struct evbuffer_iovec v;
	size_t len;

	if (b->mem == NULL) {
		errno = EINVAL;
		return -1;
	}
	if (off >= b->size)
		return 0;
	if (off == b->peek_off)
		pos = b->peek_pos;           /* streaming on: no walk from the start */
	else if (evbuffer_ptr_set(b->mem, &pos, (size_t)off, EVBUFFER_PTR_SET) == -1) {
		errno = EINVAL;
		return -1;
	}
	if (evbuffer_peek(b->mem, -1, &pos, &v, 1) < 1) {
		errno = EINVAL;
		return -1;
	}
	len = v.iov_len > SSIZE_MAX ? SSIZE_MAX : v.iov_len;
	*data = v.iov_base;
	b->peek_pos = pos;
	b->peek_off = UINT64_MAX;
	if (off + len < b->size &&
	    evbuffer_ptr_set(b->mem, &b->peek_pos, len, EVBUFFER_PTR_ADD) == 0)
		b->peek_off = off + len;
	return (ssize_t)len;
}

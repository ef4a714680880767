/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "queue_stats.h"

#define QSTATS_MAGIC 0x51584d55504d5453ULL   /* "SMTPMUXQ" little-endian */
#define QSTATS_VERSION 1

struct queue_stats {
	alignas(64) uint64_t magic;
	uint32_t version;
	uint32_t size;
	alignas(64) _Atomic uint64_t messages;
	_Atomic uint64_t bytes;
	_Atomic int64_t oldest;
	_Atomic uint64_t counter[QUEUE_NCOUNTERS];
};

_Static_assert(sizeof(struct queue_stats) <= 4096, "one page");

static const char *const counter_names[QUEUE_NCOUNTERS] = {
	"queued", "delivered", "deferred", "bounced", "expired", "deleted", "dsn"
};

const char *
queue_counter_name(enum queue_counter c)
{
	return (unsigned)c < QUEUE_NCOUNTERS ? counter_names[c] : "?";
}

void
queue_stats_path(const char *state_file, char *buf, size_t len)
{
	snprintf(buf, len, "%s.queue", state_file);
}

static bool
valid(const struct queue_stats *qs)
{
	return qs->magic == QSTATS_MAGIC && qs->version == QSTATS_VERSION &&
	    qs->size == sizeof(*qs);
}

static struct queue_stats *
map(int fd, int prot)
{
	void *p = mmap(NULL, sizeof(struct queue_stats), prot, MAP_SHARED, fd, 0);

	return p == MAP_FAILED ? NULL : p;
}

struct queue_stats *
queue_stats_create(const char *path)
{
	struct queue_stats *qs;
	struct stat st;
	bool reuse;
	int fd, saved;

	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) < 0) {
		saved = errno;
		goto fail;
	}
	if (!S_ISREG(st.st_mode)) {
		saved = EINVAL;
		goto fail;
	}
	reuse = st.st_size == (off_t)sizeof(*qs);
	if (!reuse && (ftruncate(fd, 0) < 0 || ftruncate(fd, sizeof(*qs)) < 0)) {
		saved = errno;
		goto fail;
	}
	if ((qs = map(fd, PROT_READ | PROT_WRITE)) == NULL) {
		saved = errno;
		goto fail;
	}
	close(fd);
	if (!reuse || !valid(qs)) {
		memset(qs, 0, sizeof(*qs));
		qs->version = QSTATS_VERSION;
		qs->size = sizeof(*qs);
		atomic_thread_fence(memory_order_seq_cst);
		qs->magic = QSTATS_MAGIC;
	}
	return qs;
fail:
	close(fd);
	errno = saved;
	return NULL;
}

struct queue_stats *
queue_stats_open_readonly(const char *path)
{
	struct queue_stats *qs;
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) < 0 || st.st_size != (off_t)sizeof(*qs)) {
		close(fd);
		errno = EPROTO;
		return NULL;
	}
	qs = map(fd, PROT_READ);
	close(fd);
	if (qs != NULL && !valid(qs)) {
		munmap(qs, sizeof(*qs));
		errno = EPROTO;
		return NULL;
	}
	return qs;
}

void
queue_stats_destroy(struct queue_stats *qs)
{
	if (qs != NULL)
		munmap(qs, sizeof(*qs));
}

/* Never below zero: drift is corrected by the next reset, not wrapped. */
static void
sub_floor(_Atomic uint64_t *v, uint64_t d)
{
	uint64_t cur = atomic_load(v);

	while (!atomic_compare_exchange_weak(v, &cur, cur > d ? cur - d : 0))
		;
}

void
queue_stats_added(struct queue_stats *qs, uint64_t bytes)
{
	if (qs == NULL)
		return;
	atomic_fetch_add(&qs->messages, 1);
	atomic_fetch_add(&qs->bytes, bytes);
	atomic_fetch_add(&qs->counter[QUEUE_QUEUED], 1);
}

void
queue_stats_removed(struct queue_stats *qs, uint64_t bytes)
{
	if (qs == NULL)
		return;
	sub_floor(&qs->messages, 1);
	sub_floor(&qs->bytes, bytes);
}

void
queue_stats_count(struct queue_stats *qs, enum queue_counter c)
{
	if (qs != NULL && (unsigned)c < QUEUE_NCOUNTERS)
		atomic_fetch_add(&qs->counter[c], 1);
}

void
queue_stats_reset(struct queue_stats *qs, uint64_t messages, uint64_t bytes, int64_t oldest)
{
	if (qs == NULL)
		return;
	atomic_store(&qs->messages, messages);
	atomic_store(&qs->bytes, bytes);
	atomic_store(&qs->oldest, oldest);
}

void
queue_stats_set_oldest(struct queue_stats *qs, int64_t oldest)
{
	if (qs != NULL)
		atomic_store(&qs->oldest, oldest);
}

uint64_t
queue_stats_bytes(const struct queue_stats *qs)
{
	return qs != NULL ? atomic_load(&qs->bytes) : 0;
}

void
queue_stats_read(const struct queue_stats *qs, struct queue_stats_view *out)
{
	memset(out, 0, sizeof(*out));
	out->messages = atomic_load(&qs->messages);
	out->bytes = atomic_load(&qs->bytes);
	out->oldest = atomic_load(&qs->oldest);
	for (int i = 0; i < QUEUE_NCOUNTERS; i++)
		out->counter[i] = atomic_load(&qs->counter[i]);
}

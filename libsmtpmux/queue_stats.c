/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "queue_stats.h"
#include "sealed_memfd.h"

#define QSTATS_MAGIC 0x51584d55504d5453ULL   /* "SMTPMUXQ" little-endian */
#define QSTATS_VERSION 2

/* The shared part: one page of a sealed memfd. */
struct qshared {
	alignas(64) uint64_t magic;
	uint32_t version;
	uint32_t size;
	alignas(64) _Atomic uint64_t messages;
	_Atomic uint64_t bytes;
	_Atomic int64_t oldest;
	_Atomic uint64_t counter[QUEUE_NCOUNTERS];
};

_Static_assert(sizeof(struct qshared) <= 4096, "one page");

/* This process's handle. */
struct queue_stats {
	struct qshared *s;
	int fd;                          /* read-only, for status readers (master); -1 */
};

static const char *const counter_names[QUEUE_NCOUNTERS] = {
	"queued", "delivered", "deferred", "bounced", "expired", "deleted", "dsn"
};

const char *
queue_counter_name(enum queue_counter c)
{
	return (unsigned)c < QUEUE_NCOUNTERS ? counter_names[c] : "?";
}

struct queue_stats *
queue_stats_create(void)
{
	struct queue_stats *qs = calloc(1, sizeof(*qs));
	void *ro = NULL;

	if (qs == NULL)
		return NULL;
	qs->fd = sealed_memfd_make("smtpmux-queue", sizeof(struct qshared), SEALS_FIXED_SIZE,
	    (void **)&qs->s, &ro);
	if (qs->fd < 0) {
		free(qs);
		return NULL;
	}
	munmap(ro, sizeof(struct qshared));  /* the descriptor is what readers get */
	qs->s->version = QSTATS_VERSION;
	qs->s->size = sizeof(struct qshared);
	atomic_thread_fence(memory_order_seq_cst);
	qs->s->magic = QSTATS_MAGIC;
	return qs;
}

int
queue_stats_fd(const struct queue_stats *qs)
{
	return qs != NULL ? qs->fd : -1;
}

void
queue_stats_after_fork(struct queue_stats *qs)
{
	if (qs != NULL && qs->fd >= 0) {
		close(qs->fd);
		qs->fd = -1;
	}
}

struct queue_stats *
queue_stats_attach(int fd)
{
	struct queue_stats *qs = calloc(1, sizeof(*qs));
	int saved;

	if (qs == NULL || (qs->s = sealed_memfd_map_foreign(fd, sizeof(struct qshared))) == NULL)
		goto fail;
	if (qs->s->magic != QSTATS_MAGIC || qs->s->version != QSTATS_VERSION ||
	    qs->s->size != sizeof(struct qshared)) {
		munmap(qs->s, sizeof(struct qshared));
		errno = EPROTO;
		goto fail;
	}
	qs->fd = -1;
	close(fd);
	return qs;
fail:
	saved = errno;
	free(qs);
	close(fd);
	errno = saved;
	return NULL;
}

void
queue_stats_destroy(struct queue_stats *qs)
{
	if (qs == NULL)
		return;
	queue_stats_after_fork(qs);
	munmap(qs->s, sizeof(struct qshared));
	free(qs);
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
	atomic_fetch_add(&qs->s->messages, 1);
	atomic_fetch_add(&qs->s->bytes, bytes);
	atomic_fetch_add(&qs->s->counter[QUEUE_QUEUED], 1);
}

void
queue_stats_removed(struct queue_stats *qs, uint64_t bytes)
{
	if (qs == NULL)
		return;
	sub_floor(&qs->s->messages, 1);
	sub_floor(&qs->s->bytes, bytes);
}

void
queue_stats_count(struct queue_stats *qs, enum queue_counter c)
{
	if (qs != NULL && (unsigned)c < QUEUE_NCOUNTERS)
		atomic_fetch_add(&qs->s->counter[c], 1);
}

void
queue_stats_reset(struct queue_stats *qs, uint64_t messages, uint64_t bytes, int64_t oldest)
{
	if (qs == NULL)
		return;
	atomic_store(&qs->s->messages, messages);
	atomic_store(&qs->s->bytes, bytes);
	atomic_store(&qs->s->oldest, oldest);
}

void
queue_stats_set_oldest(struct queue_stats *qs, int64_t oldest)
{
	if (qs != NULL)
		atomic_store(&qs->s->oldest, oldest);
}

uint64_t
queue_stats_bytes(const struct queue_stats *qs)
{
	return qs != NULL ? atomic_load(&qs->s->bytes) : 0;
}

void
queue_stats_read(const struct queue_stats *qs, struct queue_stats_view *out)
{
	memset(out, 0, sizeof(*out));
	out->messages = atomic_load(&qs->s->messages);
	out->bytes = atomic_load(&qs->s->bytes);
	out->oldest = atomic_load(&qs->s->oldest);
	for (int i = 0; i < QUEUE_NCOUNTERS; i++)
		out->counter[i] = atomic_load(&qs->s->counter[i]);
}

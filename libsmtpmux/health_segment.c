/* SPDX-License-Identifier: MIT */
/*
 * Creating, sharing and mapping the two health segments (layout in
 * health_layout.h).
 *
 * Each segment is a memfd: it has no path, so nobody can delete or replace
 * it, and it is sealed against shrinking, so nobody - not even root - can
 * truncate it under a process that maps it (which would kill that process
 * with SIGBUS). The control segment is also sealed against any new writable
 * mapping or write(): the master keeps the one writable mapping it made
 * first, and unmaps it in every child (health_after_fork), whose read-only
 * mapping was made from a descriptor opened O_RDONLY and so cannot be
 * mprotect()ed writable. The descriptors kept for status readers are
 * read-only too, and the segments' mode is 0400: a status reader that is
 * not their owner cannot reopen them for writing either.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "health_layout.h"
#include "sealed_memfd.h"

#define SEALS_CONTROL (SEALS_FIXED_SIZE | F_SEAL_FUTURE_WRITE)

static struct health *
health_alloc(void)
{
	struct health *h = calloc(1, sizeof(*h));

	if (h == NULL)
		return NULL;
	h->ctl_fd = h->live_fd = -1;
	h->ctl_size = sizeof(struct health_ctl);
	h->live_size = sizeof(struct health_live);
	for (uint32_t i = 0; i < HEALTH_MAX_DOWNSTREAMS; i++)
		h->recs[i] = (struct health_rec){ h, i };
	for (uint32_t i = 0; i < HEALTH_MAX_USERS; i++)
		h->users[i] = (struct health_user){ h, i };
	return h;
}

struct health *
health_segment_new(void)
{
	struct health *h = health_alloc();
	void *ro = NULL, *live_ro = NULL;

	if (h == NULL)
		return NULL;
	h->ctl_fd = sealed_memfd_make("smtpmux-control", h->ctl_size, SEALS_CONTROL,
	    (void **)&h->ctl, &ro);
	if (h->ctl_fd < 0) {
		free(h);
		return NULL;
	}
	h->ro = ro;
	h->live_fd = sealed_memfd_make("smtpmux-live", h->live_size, SEALS_FIXED_SIZE,
	    (void **)&h->live, &live_ro);
	if (h->live_fd < 0) {
		health_destroy(h);
		return NULL;
	}
	/* Only the master's writable view of the live segment is used: the
	 * read-only one exists for the descriptor it was made from. */
	munmap(live_ro, h->live_size);
	health_cluster_init(h);
	return h;
}

bool
health_hdr_matches(const struct health_hdr *hdr)
{
	return hdr->magic == HEALTH_MAGIC &&
	    hdr->layout_version == HEALTH_LAYOUT_VERSION &&
	    hdr->header_size == sizeof(struct health_hdr) &&
	    hdr->meta_size == sizeof(struct rec_meta) &&
	    hdr->user_meta_size == sizeof(struct user_meta) &&
	    hdr->rec_size == sizeof(struct live_rec) &&
	    hdr->user_size == sizeof(struct live_user) &&
	    hdr->max_recs == HEALTH_MAX_DOWNSTREAMS &&
	    hdr->max_users == HEALTH_MAX_USERS &&
	    hdr->worker_slots == HEALTH_MAX_WORKER_SLOTS &&
	    hdr->pool_cells == HEALTH_POOL_CELLS;
}

void
health_segment_format(struct health *h)
{
	struct health_hdr *hdr = &h->ctl->hdr;

	hdr->layout_version = HEALTH_LAYOUT_VERSION;
	hdr->header_size = sizeof(struct health_hdr);
	hdr->meta_size = sizeof(struct rec_meta);
	hdr->user_meta_size = sizeof(struct user_meta);
	hdr->rec_size = sizeof(struct live_rec);
	hdr->user_size = sizeof(struct live_user);
	hdr->max_recs = HEALTH_MAX_DOWNSTREAMS;
	hdr->max_users = HEALTH_MAX_USERS;
	hdr->worker_slots = HEALTH_MAX_WORKER_SLOTS;
	hdr->pool_cells = HEALTH_POOL_CELLS;
	atomic_thread_fence(memory_order_seq_cst);
	hdr->magic = HEALTH_MAGIC;
}

void
health_after_fork(struct health *h)
{
	if (h == NULL)
		return;
	if (h->ctl != NULL)
		munmap(h->ctl, h->ctl_size);
	h->ctl = NULL;
	if (h->ctl_fd >= 0)
		close(h->ctl_fd);
	if (h->live_fd >= 0)
		close(h->live_fd);
	h->ctl_fd = h->live_fd = -1;
}

void
health_export(const struct health *h, int *ctl_fd, int *live_fd)
{
	*ctl_fd = h->ctl_fd;
	*live_fd = h->live_fd;
}

struct health *
health_attach(int ctl_fd, int live_fd)
{
	struct health *h = health_alloc();
	const struct health_ctl *ctl = NULL;

	if (h == NULL || (ctl = sealed_memfd_map_foreign(ctl_fd, h->ctl_size)) == NULL ||
	    (h->live = sealed_memfd_map_foreign(live_fd, h->live_size)) == NULL)
		goto fail;
	if (!health_hdr_matches(&ctl->hdr)) {
		errno = EPROTO;
		goto fail;
	}
	h->ro = ctl;
	close(ctl_fd);
	close(live_fd);
	return h;
fail:
	if (ctl != NULL)
		unmap_keep_errno((void *)ctl, h->ctl_size);
	if (h != NULL && h->live != NULL)
		unmap_keep_errno(h->live, h->live_size);
	free(h);
	close_keep_errno(ctl_fd);
	close_keep_errno(live_fd);
	return NULL;
}

void
health_destroy(struct health *h)
{
	if (h == NULL)
		return;
	health_after_fork(h);            /* the master's view and descriptors */
	if (h->ro != NULL)
		munmap((void *)h->ro, h->ctl_size);
	if (h->live != NULL)
		munmap(h->live, h->live_size);
	free(h->saved.image);
	free(h);
}

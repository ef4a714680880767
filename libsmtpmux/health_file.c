/* SPDX-License-Identifier: MIT */
/*
 * The state file: a copy of the segments, so that counters, quotas and
 * sequences survive a restart. The master writes it (health_save, every
 * second when something changed) and reads it at start (health_create).
 * Nothing maps it, so a file truncated, replaced or removed under a
 * running daemon only makes the next save write it again.
 *
 *   offset                      size
 *   0                           64              the control header, with n_recs
 *                                               = N, n_users = U, cells_used = C
 *   64                          N x 256         rec_meta, quota offsets into
 *                                               the cells below
 *   64 + N*256                  U x 256         user_meta
 *   64 + (N+U)*256              N x 576         live_rec
 *   64 + (N+U)*256 + N*576      U x 64          live_user
 *   ... + U*64                  C x 8           the cells of every window in use
 *
 * Only the windows in use are written (cells left behind by a resize are
 * not), so the file is as small as the configuration allows.
 *
 * The file may have been written by anyone who can write its folder: it is
 * read only if it is a regular file of this user that nobody else may
 * write, and every count and offset in it is checked before use.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "health_layout.h"
#include "fd_write.h"
#include "log.h"

struct image_layout {
	uint32_t n_recs, n_users, n_cells, generation;
	size_t meta, user_meta, recs, users, cells, len;   /* offsets and total */
};

/* The records in an image sit at multiples of 64 from its start (their
 * sizes are): one that starts at such an address may be used in place. */
#define IMAGE_ALIGN 64

static unsigned char *
image_alloc(size_t len)
{
	return aligned_alloc(IMAGE_ALIGN, (len + IMAGE_ALIGN - 1) / IMAGE_ALIGN * IMAGE_ALIGN);
}

static void
image_layout(struct image_layout *l, uint32_t n_recs, uint32_t n_users, uint32_t n_cells)
{
	l->n_recs = n_recs;
	l->n_users = n_users;
	l->n_cells = n_cells;
	l->meta = sizeof(struct health_hdr);
	l->user_meta = l->meta + (size_t)n_recs * sizeof(struct rec_meta);
	l->recs = l->user_meta + (size_t)n_users * sizeof(struct user_meta);
	l->users = l->recs + (size_t)n_recs * sizeof(struct live_rec);
	l->cells = l->users + (size_t)n_users * sizeof(struct live_user);
	l->len = l->cells + (size_t)n_cells * sizeof(uint64_t);
}

/* --- writing */

static uint32_t
cells_in_use(const struct health *h, uint32_t n_recs)
{
	uint32_t n = 0;

	for (uint32_t i = 0; i < n_recs; i++)
		for (int w = 0; w < WIN_COUNT; w++)
			n += quota_unpack(atomic_load(&h->ro->meta[i].quota[w]), NULL).capacity;
	return n;
}

/* Copies a record's meta with its windows moved to `*next` in the file. */
static void
image_meta(const struct health *h, uint32_t i, unsigned char *img,
    const struct image_layout *l, uint32_t *next)
{
	struct rec_meta *m = (struct rec_meta *)(img + l->meta) + i;

	memcpy(m, &h->ro->meta[i], sizeof(*m));
	for (int w = 0; w < WIN_COUNT; w++) {
		struct window_desc q = quota_unpack(atomic_load(&h->ro->meta[i].quota[w]), NULL);
		struct window_desc moved = q;

		if (q.capacity == 0 || (uint64_t)*next + q.capacity > l->n_cells) {
			atomic_store(&m->quota[w], 0);
			continue;
		}
		moved.offset = *next;
		memcpy(img + l->cells + (size_t)moved.offset * sizeof(uint64_t),
		    (const void *)&h->live->cells[q.offset], (size_t)q.capacity * sizeof(uint64_t));
		atomic_store(&m->quota[w], quota_pack(moved));
		*next += q.capacity;
	}
}

unsigned char *
health_image(const struct health *h, size_t *len)
{
	uint32_t n = health_n_recs(h), nu = health_n_users(h), next = 0;
	struct image_layout l;
	struct health_hdr *hdr;
	unsigned char *img;

	image_layout(&l, n, nu, cells_in_use(h, n));
	if ((img = image_alloc(l.len)) == NULL)
		return NULL;
	hdr = (struct health_hdr *)img;
	memcpy(hdr, &h->ro->hdr, sizeof(*hdr));
	atomic_store(&hdr->n_recs, n);
	atomic_store(&hdr->n_users, nu);
	atomic_store(&hdr->cells_used, l.n_cells);
	for (uint32_t i = 0; i < n; i++)
		image_meta(h, i, img, &l, &next);
	memcpy(img + l.user_meta, h->ro->user, (size_t)nu * sizeof(struct user_meta));
	memcpy(img + l.recs, (const void *)h->live->rec, (size_t)n * sizeof(struct live_rec));
	memcpy(img + l.users, (const void *)h->live->user, (size_t)nu * sizeof(struct live_user));
	*len = l.len;
	return img;
}

/*
 * A new file next to path, renamed over it: never a half-written state
 * file, and never a write through a symlink or into a file someone else
 * prepared (mkostemp: O_EXCL, mode 0600, a name nobody can guess; rename
 * replaces a symlink, not its target).
 */
static int
file_replace(const char *path, const unsigned char *img, size_t len, struct stat *st)
{
	char tmp[4096];
	int fd, saved;

	if (snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= (int)sizeof(tmp)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	if ((fd = mkostemp(tmp, O_CLOEXEC)) < 0)
		return -1;
	if (fd_write_all(fd, img, len) < 0 || fstat(fd, st) < 0 || close(fd) < 0) {
		saved = errno;
		close(fd);
		unlink(tmp);
		errno = saved;
		return -1;
	}
	if (rename(tmp, path) < 0) {
		saved = errno;
		unlink(tmp);
		errno = saved;
		return -1;
	}
	return 0;
}

/* What happened to the file since the last save, or NULL. */
static const char *
file_disturbed(const struct health_saved *sv, const char *path)
{
	struct stat st;

	if (!sv->written)
		return NULL;
	if (lstat(path, &st) < 0)
		return errno == ENOENT ? "removed" : NULL;
	if (st.st_dev != sv->dev || st.st_ino != sv->ino)
		return "replaced";
	if (st.st_size != (off_t)sv->len)
		return st.st_size < (off_t)sv->len ? "truncated" : "changed";
	return NULL;
}

int
health_save(struct health *h, const char *path, const char **disturbed)
{
	struct health_saved *sv = &h->saved;
	const char *what = file_disturbed(sv, path);
	unsigned char *img;
	struct stat st;
	size_t len;

	if (disturbed != NULL)
		*disturbed = what;
	if ((img = health_image(h, &len)) == NULL)
		return -1;
	if (what == NULL && sv->written && len == sv->len && memcmp(img, sv->image, len) == 0) {
		free(img);
		return 0;
	}
	if (file_replace(path, img, len, &st) < 0) {
		int saved = errno;

		free(img);
		errno = saved;
		return -1;
	}
	free(sv->image);
	sv->image = img;
	sv->len = len;
	sv->dev = st.st_dev;
	sv->ino = st.st_ino;
	sv->written = true;
	return 0;
}

/* --- reading */

/*
 * Checks an image against this build and itself; fills l. Pure: what
 * health_create() and the tests feed it may be anything.
 */
static int
image_check(const unsigned char *img, size_t len, struct image_layout *l,
    const char **why)
{
	struct health_hdr hdr;
	uint32_t n, nu, nc;

	if (len < sizeof(hdr)) {
		*why = "too short";
		return -1;
	}
	memcpy(&hdr, img, sizeof(hdr));
	if (!health_hdr_matches(&hdr)) {
		*why = "written by another version";
		return -1;
	}
	n = atomic_load(&hdr.n_recs);
	nu = atomic_load(&hdr.n_users);
	nc = atomic_load(&hdr.cells_used);
	if (n > HEALTH_MAX_DOWNSTREAMS || nu > HEALTH_MAX_USERS || nc > HEALTH_POOL_CELLS) {
		*why = "counts out of range";
		return -1;
	}
	image_layout(l, n, nu, nc);
	l->generation = atomic_load(&hdr.generation);
	if (len != l->len) {
		*why = "truncated or padded";
		return -1;
	}
	return 0;
}

/* Copies a checked image into fresh segments; windows pointing outside its
 * cells are dropped, texts are terminated. */
static void
image_adopt(struct health *h, const unsigned char *img, const struct image_layout *l)
{
	struct health_ctl *c = h->ctl;

	memcpy(c->meta, img + l->meta, (size_t)l->n_recs * sizeof(struct rec_meta));
	memcpy(c->user, img + l->user_meta, (size_t)l->n_users * sizeof(struct user_meta));
	memcpy((void *)h->live->rec, img + l->recs, (size_t)l->n_recs * sizeof(struct live_rec));
	memcpy((void *)h->live->user, img + l->users, (size_t)l->n_users * sizeof(struct live_user));
	memcpy((void *)h->live->cells, img + l->cells, (size_t)l->n_cells * sizeof(uint64_t));
	for (uint32_t i = 0; i < l->n_recs; i++) {
		struct rec_meta *m = &c->meta[i];

		m->key[sizeof(m->key) - 1] = '\0';
		for (int w = 0; w < WIN_COUNT; w++) {
			struct window_desc q = quota_unpack(atomic_load(&m->quota[w]), NULL);

			if ((uint64_t)q.offset + q.capacity > l->n_cells)
				atomic_store(&m->quota[w], 0);
		}
	}
	for (uint32_t i = 0; i < l->n_users; i++)
		c->user[i].email[sizeof(c->user[i].email) - 1] = '\0';
	atomic_store(&c->hdr.cells_used, l->n_cells);
	atomic_store(&c->hdr.generation, l->generation);
	atomic_store(&c->hdr.n_users, l->n_users);
	atomic_store_explicit(&c->hdr.n_recs, l->n_recs, memory_order_release);
}

static unsigned char *
read_file(int fd, size_t len)
{
	unsigned char *buf = image_alloc(len ? len : 1);
	size_t got = 0;

	while (buf != NULL && got < len) {
		ssize_t n = read(fd, buf + got, len - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			free(buf);
			return NULL;
		}
		got += (size_t)n;
	}
	return buf;
}

/* The largest file this build writes. */
#define IMAGE_MAX (sizeof(struct health_hdr) + HEALTH_MAX_DOWNSTREAMS * \
    (sizeof(struct rec_meta) + sizeof(struct live_rec)) + HEALTH_MAX_USERS * \
    (sizeof(struct user_meta) + sizeof(struct live_user)) + \
    (size_t)HEALTH_POOL_CELLS * sizeof(uint64_t))

/* Whether the file at fd may be believed; why not in *why. */
static bool
file_trusted(int fd, struct stat *st, char *why, size_t whylen)
{
	if (fstat(fd, st) < 0)
		snprintf(why, whylen, "%s", strerror(errno));
	else if (!S_ISREG(st->st_mode))
		snprintf(why, whylen, "not a regular file");
	else if (st->st_uid != geteuid())
		snprintf(why, whylen, "owned by uid %u, not by this process's",
		    (unsigned)st->st_uid);
	else if (st->st_mode & (S_IWGRP | S_IWOTH))
		snprintf(why, whylen, "writable by other users");
	else if (st->st_size < 0 || (size_t)st->st_size > IMAGE_MAX)
		snprintf(why, whylen, "too large");
	else
		return true;
	return false;
}

int
health_load_image(struct health *h, const unsigned char *img, size_t len, const char **why)
{
	struct image_layout l;

	if (image_check(img, len, &l, why) < 0)
		return -1;
	image_adopt(h, img, &l);
	return 0;
}

/* 0: loaded or nothing to load; -1: ignored, *why says why. */
static int
file_load(struct health *h, const char *path, char *why, size_t whylen)
{
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	const char *bad = "short read";
	unsigned char *img;
	struct stat st;
	int rc = -1;

	if (fd < 0) {
		snprintf(why, whylen, "%s", strerror(errno));
		return errno == ENOENT ? 0 : -1;
	}
	if (file_trusted(fd, &st, why, whylen)) {
		img = read_file(fd, (size_t)st.st_size);
		if (img != NULL && health_load_image(h, img, (size_t)st.st_size, &bad) == 0)
			rc = 0;
		else
			snprintf(why, whylen, "%s", bad);
		free(img);
	}
	close(fd);
	return rc;
}

struct health *
health_create(const char *path)
{
	struct health *h = health_segment_new();
	char why[128];

	if (h == NULL)
		return NULL;
	if (path != NULL && file_load(h, path, why, sizeof(why)) < 0)
		log_warn("state file %s ignored (%s): counters and quotas start afresh",
		    path, why);
	health_settle(h);
	health_segment_format(h);
	return h;
}

/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "spool_int.h"

/*
 * Reuse of message files. A message that leaves the queue after its
 * delivery keeps its file: emptied, it waits in free/ until a writer
 * takes it for the next message. Creating and removing a file per message
 * costs an inode allocation and release each time, and on ext4 without a
 * journal every allocation skips the inodes released in the last minutes
 * one by one: under a steady flow of messages that scan grows with the
 * rate and took a third of the CPU time of the queue's accept path.
 *
 * Who may touch a file of free/ is decided by flock(), as in tmp/: the
 * runner holds the lock from before the file enters free/ until it is
 * empty, and a writer takes the lock before it moves the file out. Names
 * in free/ are queue ids, which are never used twice, so a name a writer
 * read once is never another file later.
 */

#define RECOUNT_EVERY 256                /* removals between two counts of a full free/ */

/* Opens dir/name for writing and locks it; the regular file it must be,
 * or -1. */
static int
open_locked_file(int dir, const char *name)
{
	int fd = openat(dir, name, O_WRONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	struct stat st;

	if (fd < 0)
		return -1;
	if (flock(fd, LOCK_EX | LOCK_NB) < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
	    st.st_nlink != 1) {
		close(fd);
		return -1;
	}
	return fd;
}

static void
note_name(const char *name, void *arg)
{
	struct spool *sp = arg;

	if (sp->n_reuse_names < SPOOL_REUSE_BATCH && spool_id_valid(name, strlen(name)))
		memcpy(sp->reuse_names[sp->n_reuse_names++], name, SPOOL_ID_LEN + 1);
}

/* Reads names from free/, at most once a second while it stays empty. */
static void
read_names(struct spool *sp)
{
	time_t now = time(NULL);

	if (sp->reuse_none_at == now)
		return;
	spool_each_entry(sp, SPOOL_FREE, note_name, sp);
	if (sp->n_reuse_names == 0)
		sp->reuse_none_at = now;
}

int
spool_reuse_take(struct spool *sp, const char *name)
{
	if (sp->n_reuse_names == 0)
		read_names(sp);
	while (sp->n_reuse_names > 0) {
		const char *cand = sp->reuse_names[--sp->n_reuse_names];
		int fd = open_locked_file(sp->fd[SPOOL_FREE], cand);

		if (fd < 0)
			continue;                    /* another writer has it, or had it */
		/* Moved before it is emptied: a writer that locked it once it was
		 * taken finds the name gone. Emptied again: a crash may have come
		 * between the runner's move and its truncation. */
		if (spool_rename_noreplace(sp->fd[SPOOL_FREE], cand, sp->fd[SPOOL_TMP], name) < 0) {
			close(fd);
			continue;
		}
		if (ftruncate(fd, 0) < 0) {
			unlinkat(sp->fd[SPOOL_TMP], name, 0);
			close(fd);
			continue;
		}
		return fd;
	}
	return -1;
}

static void
count_one(const char *name, void *arg)
{
	(void)name;
	++*(unsigned *)arg;
}

/* Whether free/ may take one more file: counted again once in a while
 * when it seems full, as writers take files without telling. */
static bool
free_has_room(struct spool *sp)
{
	unsigned n = 0;

	if (sp->free_estimate < SPOOL_FREE_MAX)
		return true;
	if (++sp->since_count < RECOUNT_EVERY)
		return false;
	sp->since_count = 0;
	if (spool_each_entry(sp, SPOOL_FREE, count_one, &n) < 0)
		return false;
	sp->free_estimate = n;
	return n < SPOOL_FREE_MAX;
}

int
spool_recycle(struct spool *sp, const char *id)
{
	int fd;

	if (!free_has_room(sp) || (fd = open_locked_file(sp->fd[SPOOL_MSG], id)) < 0)
		return spool_remove(sp, id);
	if (spool_rename_noreplace(sp->fd[SPOOL_MSG], id, sp->fd[SPOOL_FREE], id) < 0) {
		close(fd);
		return spool_remove(sp, id);
	}
	spool_remove_marks(sp, id);
	if (ftruncate(fd, 0) < 0)
		unlinkat(sp->fd[SPOOL_FREE], id, 0);
	else
		sp->free_estimate++;
	close(fd);                       /* writers may take it from now on */
	return 0;
}

struct clean_free {
	struct spool *sp;
	unsigned kept;
};

static void
clean_free_one(const char *name, void *arg)
{
	struct clean_free *cf = arg;
	int dir = cf->sp->fd[SPOOL_FREE];
	struct stat st;

	if (fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) &&
	    st.st_size == 0 && spool_id_valid(name, strlen(name)) && cf->kept < SPOOL_FREE_MAX) {
		cf->kept++;
		return;
	}
	unlinkat(dir, name, 0);
}

unsigned
spool_clean_free(struct spool *sp)
{
	struct clean_free cf = { sp, 0 };

	spool_each_entry(sp, SPOOL_FREE, clean_free_one, &cf);
	sp->free_estimate = cf.kept;
	return cf.kept;
}

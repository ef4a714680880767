/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SPOOL_INT_H
#define SMTPMUX_SPOOL_INT_H

/* What spool.c shares with spool_reuse.c; not for other callers. */

#include <time.h>

#include "spool.h"

#define SPOOL_REUSE_BATCH 64             /* names read from free/ at once */

struct spool {
	char *path;
	int dirfd;
	int fd[SPOOL_NSUB];
	/* Reuse (spool_reuse.c); each spool object is its owner's alone: a
	 * writer thread's, the runner's. */
	char reuse_names[SPOOL_REUSE_BATCH][SPOOL_ID_LEN + 1];
	size_t n_reuse_names;            /* names of free/ not tried yet */
	time_t reuse_none_at;            /* free/ was found empty then */
	unsigned free_estimate;          /* files in free/, as last counted plus added */
	unsigned since_count;            /* removals since free/ was last counted full */
};

/* rename() that never replaces. 0 or -1 (errno). */
int spool_rename_noreplace(int from_dir, const char *from, int to_dir, const char *to);
/* Calls fn(name) for every entry of folder sub but "." and "..". */
int spool_each_entry(struct spool *, enum spool_sub sub,
    void (*fn)(const char *name, void *arg), void *arg);
/* Removes msg/<id>.state and hold/<id>. */
void spool_remove_marks(struct spool *, const char *id);
/* A file of free/ as tmp/<name>, locked and empty, or -1 when there is
 * none to take (spool_tmp_create() then creates one). */
int spool_reuse_take(struct spool *, const char *name);

#endif

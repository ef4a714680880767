/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SPOOL_H
#define SMTPMUX_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "spool_format.h"

/*
 * The spool directory (queue.dir) and every file operation on it.
 *
 *   tmp/        files being written: "w<pid>-<n>" by a spool writer (locked
 *               with flock while it writes), "<ID>.state.tmp" by the runner
 *   msg/<ID>    committed messages (spool_format.h), never changed
 *   msg/<ID>.state   the runner's delivery state for <ID>
 *   hold/<ID>   present while <ID> is on hold (smtpmuxd -s hold)
 *   ctl/        requests from the tools: "flush.<ID>", "flush.all",
 *               "delete.<ID>", "delete.all"; the runner removes each once
 *               done
 *   corrupt/    files the runner could not read, moved aside
 *   free/<ID>   emptied files of messages that left the queue, for writers
 *               to reuse (spool_reuse.c)
 *   runner.lock flock()ed by the one queue runner that owns the spool
 *
 * A message is committed by writing it under tmp/, fsync()ing it,
 * renaming it into msg/ (never over an existing name) and fsync()ing msg/:
 * a crash at any instant leaves either a complete message in msg/ or
 * garbage in tmp/, which spool_clean_tmp() removes once its writer is gone.
 */

struct spool;

/* Files kept in free/ at most: a burst of this many messages reuses
 * files instead of creating them. */
#define SPOOL_FREE_MAX 4096

/* Opens the folder and its subfolders (which must exist). NULL with a
 * message in err. */
struct spool *spool_open(const char *dir, char *err, size_t errlen);
void spool_close(struct spool *);
const char *spool_path(const struct spool *);

/*
 * Creates dir (and missing parents, 0755) and the subfolders, mode 0750;
 * with set_owner (the master, as root), gives them to uid:gid (the
 * workers' user) - unless that user owns dir already, 0750: then the
 * subfolders are left to the children, which call this again without
 * set_owner. Refuses a symlink. 0, or -1 with a message in err.
 */
int spool_prepare(const char *dir, bool set_owner, uid_t uid, gid_t gid,
    char *err, size_t errlen);

/* --- committing (spool_writer.c's thread) --- */

/* Creates tmp/<name>, mode 0600, locked, empty - or takes a file from
 * free/ for it; returns the fd or -1 (errno). */
int spool_tmp_create(struct spool *, const char *name);
/* Renames tmp/<name> to msg/<id>; when <id> is taken, draws another id
 * (rng) and writes it back into id. 0 or -1 (errno). */
int spool_publish(struct spool *, const char *tmpname, char id[SPOOL_ID_LEN + 1],
    uint64_t *rng);
/* Undoes spool_publish() for a message whose commit failed afterwards. */
void spool_unpublish(struct spool *, const char *id);
void spool_tmp_remove(struct spool *, const char *name);
/* fsync() of msg/: makes the renames durable. */
int spool_sync(struct spool *);

/* A fresh random queue id. */
void spool_new_id(char id[SPOOL_ID_LEN + 1], uint64_t *rng);

/* --- reading --- */

/*
 * Opens msg/<id> and parses its header, then its state file if any (a
 * state file that does not parse is ignored, with *state_err set). On
 * success returns the open fd (the body is [*header_len, +env->size)),
 * else -1 with a reason in err; errno ENOENT when the message is gone,
 * EINVAL when it is malformed (to move aside).
 */
int spool_read(struct spool *, const char *id, struct spool_env *env,
    size_t *header_len, bool *state_err, char *err, size_t errlen);

/*
 * Calls fn for every committed message id in msg/ (in no order), and for
 * names that are neither an id nor an id's state file with bad = true.
 * 0 or -1 (errno).
 */
int spool_scan(struct spool *, void (*fn)(const char *name, bool bad, void *arg), void *arg);

/* --- the runner's updates --- */

/* Writes msg/<id>.state (via tmp/, renamed over the old one). 0 or -1. */
int spool_write_state(struct spool *, const char *id, const struct spool_env *env);
/* Removes the message, its state and its hold mark. 0, or -1 (errno;
 * ENOENT when it was already gone). */
int spool_remove(struct spool *, const char *id);
/* The same for a message that was delivered or given up, keeping its file
 * (emptied) in free/ for a writer to reuse, up to SPOOL_FREE_MAX files. */
int spool_recycle(struct spool *, const char *id);
/* At the runner's start: removes from free/ what a crash left unemptied and
 * what passes SPOOL_FREE_MAX. Returns how many files it keeps. */
unsigned spool_clean_free(struct spool *);
/* Moves msg/<name> (and its state file) to corrupt/. 0 or -1. */
int spool_move_aside(struct spool *, const char *name);
/* Removes what writers that are gone left in tmp/: unlocked files older
 * than min_age seconds. Returns how many. */
unsigned spool_clean_tmp(struct spool *, time_t now, unsigned min_age);
/* Removes msg/<id>.state files whose message is gone. Returns how many. */
unsigned spool_clean_states(struct spool *);

/* --- hold marks and tool requests --- */

bool spool_is_held(struct spool *, const char *id);
/* Sets or clears the hold mark. 0 or -1 (errno). */
int spool_set_held(struct spool *, const char *id, bool held);
/* A request for the runner: verb "flush" or "delete", target an id or
 * "all". 0 or -1 (errno). */
int spool_request(struct spool *, const char *verb, const char *target);
/* True while the request file still exists (the runner has not taken it). */
bool spool_request_pending(struct spool *, const char *verb, const char *target);
/* Calls fn for every pending request and removes it (the runner). */
void spool_take_requests(struct spool *,
    void (*fn)(const char *verb, const char *target, void *arg), void *arg);

/* The runner's lock: fd held for the runner's life, or -1 (EWOULDBLOCK:
 * another runner has it). */
int spool_lock_runner(struct spool *);
/* For the tools: is a runner serving this spool now? */
bool spool_runner_active(struct spool *);

/* Folder fds for inotify watches and the like. */
enum spool_sub {
	SPOOL_TMP, SPOOL_MSG, SPOOL_HOLD, SPOOL_CTL, SPOOL_CORRUPT, SPOOL_FREE, SPOOL_NSUB
};
/* "tmp", "msg", ... */
const char *spool_sub_name(enum spool_sub);

#endif

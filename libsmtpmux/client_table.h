/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CLIENT_TABLE_H
#define SMTPMUX_CLIENT_TABLE_H

#include <stdbool.h>
#include <stdint.h>

/*
 * What the workers know together about each client address: its sessions
 * (for limits.max_sessions_per_ip) and its recent AUTH failures (for the
 * auth: lockout). A fixed-size open-addressing table in one anonymous
 * MAP_SHARED mapping that the master creates before it forks, so every
 * worker of every generation sees the same table. C11 atomics only: a
 * worker killed at any instruction leaves no lock held.
 *
 * Limits, not bookkeeping: races between workers may let one count be
 * off by one for an instant, never drift. Entries expire: an address
 * with no session, no failure in its window and no lockout is reused for
 * another. When every slot an address could use is taken, it is not
 * tracked at all (NULL below), so a full table never refuses anyone.
 *
 * Times are CLOCK_MONOTONIC seconds, which all processes of a host share.
 */

struct client_table;
struct client_entry;

/* Maps a table of `entries` addresses for `worker_slots` worker slots
 * (the health segment's slot numbers); NULL with errno on failure. */
struct client_table *client_table_create(unsigned entries, unsigned worker_slots);
void client_table_destroy(struct client_table *);

/*
 * A session of addr opens in worker slot `slot`: counted, and *sessions
 * says how many the address has now, in all workers, this one included.
 * Returns the entry to close it with, or NULL when the table has no room
 * for addr (the session is then not counted; *sessions is 1).
 */
struct client_entry *client_table_open(struct client_table *, const char *addr,
    unsigned slot, int64_t now, unsigned *sessions);

/* The session counted by client_table_open() ended. */
void client_table_close(struct client_table *, struct client_entry *, unsigned slot,
    int64_t now);

/* A worker died: the sessions it counted are gone. Master only. */
void client_table_worker_gone(struct client_table *, unsigned slot);

/* auth: section, in seconds; max_failures 0 turns the lockout off (failures
 * are still counted). */
struct client_auth_policy {
	unsigned max_failures;
	unsigned window;
	unsigned lockout;
};

enum client_auth_verdict {
	CLIENT_AUTH_COUNTED,             /* *failures failures in the window so far */
	CLIENT_AUTH_LOCKED_NOW,          /* this failure started a lockout: log it */
	CLIENT_AUTH_LOCKED               /* locked already (by another session) */
};

/* Records a failed AUTH from addr. */
enum client_auth_verdict client_table_auth_failed(struct client_table *, const char *addr,
    const struct client_auth_policy *, int64_t now, unsigned *failures);

/* True while addr is locked out; *until (if not NULL) says until when. */
bool client_table_auth_locked(struct client_table *, const char *addr, int64_t now,
    int64_t *until);

/* CLOCK_MONOTONIC in seconds, the unit of `now` above. */
int64_t client_table_now(void);

#endif

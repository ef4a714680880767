/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_TOKEN_TABLE_H
#define SMTPMUX_TOKEN_TABLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "token_response.h"

/*
 * The OAuth access tokens of the downstreams that log in with one, shared
 * by the token helper (the only writer) and the workers (readers), and
 * what `smtpmuxd -s status` may know about them.
 *
 * Two mappings, both made by the master before it forks:
 *  - the tokens: MAP_SHARED | MAP_ANONYMOUS, so only the daemon's own
 *    processes ever see them (never a file, never the state file);
 *  - their status (valid until, last refresh, last error, never a token):
 *    a sealed memfd (sealed_memfd.h: no path, cannot be truncated), whose
 *    read-only descriptor `smtpmuxd -s status` is handed with the health
 *    segments (smtpmuxd/instance.c). The master writes the slots' keys,
 *    the token helper their status records; every other process has a
 *    read-only view only (token_table_after_fork).
 * Each slot is written under a sequence lock: the writer makes the
 * sequence odd, stores, makes it even; a reader copies and retries when
 * the sequence moved, so a worker never uses a half-written token and
 * never waits. Data words are relaxed C11 atomics. Slots are keyed by the
 * downstream's account ("addr user", as its health record), so a reload
 * finds its tokens again.
 *
 * A worker whose token was refused asks for a refresh by storing that
 * token's generation in the slot and writing one byte to a non-blocking
 * pipe the helper watches: no lock, no waiting, and several workers
 * refused the same token cause one refresh.
 */

#define TOKEN_TABLE_SLOTS 64
#define TOKEN_ERROR_MAX 160

struct token_table;

/* What anyone may know about a slot (the status segment). */
struct token_status {
	int64_t valid_until;             /* expiry of the current token; 0: none */
	int64_t last_refresh;            /* when it was obtained; 0: never */
	int64_t last_error_time;         /* 0: no error yet */
	uint32_t refreshes;              /* tokens obtained by this helper */
	uint32_t failures;               /* requests that failed */
	uint32_t forced;                 /* refreshes asked for by a refusing server */
	uint32_t source;                 /* enum token_source_kind */
	uint32_t failing;                /* 1 while the latest request failed */
	uint32_t spare;
	char name[64];                   /* the downstream's name */
	char last_error[TOKEN_ERROR_MAX];
};

/* The current token of a slot, without the token. */
struct token_meta {
	uint64_t gen;                    /* 1, 2, ... per token put; 0: none yet */
	int64_t use_until_ms;            /* workers stop using it then (before it expires) */
	uint64_t source_id;              /* token_source_cfg.id it came from */
	size_t len;
};

/* The wall clock in milliseconds, as the table's times are kept. */
int64_t token_clock_ms(void);

/* ---- master ---- */

/* True when some downstream of cfg has a token source. */
bool token_table_needed(const struct config *cfg);

/*
 * Binds every downstream with a token source to its slot (ds->token_slot),
 * creating the table (*tt) when a configuration first needs it (before the
 * children that use it are forked). Slots and their tokens are kept across
 * reloads. Returns 0, or -1 with a message in err.
 */
int token_table_bind(struct token_table **tt, struct config *cfg, char *err, size_t errlen);

/* The status segment's read-only descriptor for status readers (the
 * master's; do not close it); -1 when there is none. */
int token_table_fd(const struct token_table *);

/* In every child, first thing: closes that descriptor and drops the
 * master's writable view of the status, all of it but the records in the
 * token helper (status_writer), which writes them. */
void token_table_after_fork(struct token_table *, bool status_writer);

void token_table_destroy(struct token_table *);

/* ---- workers ---- */

/*
 * Whether ds can log in now: true without a token source, or with a token
 * from its current source that is not past its use-until time. Else false with a reason for
 * the log ("no OAuth token: token endpoint: HTTP 400 invalid_grant").
 */
bool token_table_ready(const struct token_table *, const struct downstream_cfg *ds,
    int64_t now_ms, char *why, size_t whylen);

/*
 * Copies ds's current token into buf (NUL-terminated; cap >= TOKEN_MAX + 1)
 * with its generation. Returns 0, or -1 when there is no usable token.
 */
int token_table_get(const struct token_table *, const struct downstream_cfg *ds,
    int64_t now_ms, char *buf, size_t cap, size_t *len, uint64_t *gen);

/* The server refused token generation gen: asks the helper for one refresh. */
void token_table_reject(struct token_table *, const struct downstream_cfg *ds, uint64_t gen);

/* ---- the token helper ---- */

int token_table_meta(const struct token_table *, int slot, struct token_meta *out);
void token_table_put(struct token_table *, int slot, const char *token, size_t len,
    int64_t use_until_ms, uint64_t source_id);
/* Forgets a slot's token (a torn slot left by a killed helper, a changed source). */
void token_table_clear(struct token_table *, int slot);
/* A pending refusal of the current token: its generation (cleared), else 0. */
uint64_t token_table_take_rejection(struct token_table *, int slot);
/* The read end of the wake-up pipe. */
int token_table_wake_fd(const struct token_table *);
/* Empties the wake-up pipe. */
void token_table_wake_drain(const struct token_table *);
void token_table_status_put(struct token_table *, int slot, const struct token_status *);

/* ---- status readers ---- */

int token_table_status_get(const struct token_table *, int slot, struct token_status *out);

/* `smtpmuxd -s status`: maps what token_table_fd() gave, read-only, after
 * checking that it is this build's layout; takes fd. NULL (errno EPROTO:
 * not such a segment). */
struct token_table *token_table_attach(int fd);

/* Slots in use, and each one's key ("addr user"); returns 0 for a slot
 * the running configuration uses, 1 for one only an older one used, -1
 * when index is out of range. */
size_t token_table_count(const struct token_table *);
int token_table_slot_key(const struct token_table *, size_t index, char *key, size_t keylen);

#endif

/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_UPSTREAM_CACHE_H
#define SMTPMUX_UPSTREAM_CACHE_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"

/*
 * The upstream connection cache (one per worker): idle, authenticated
 * sessions to downstreams, so that the next message for the same account
 * skips connect, EHLO, STARTTLS and AUTH. This file is only the container:
 * which sessions are interchangeable (the key), how many are kept, and
 * which one is handed out. upstream.c decides when a session may go in,
 * times idle ones out, and says QUIT to the ones that leave.
 *
 * Sessions live in the cache as entries embedded in their struct upstream,
 * so putting one in never allocates and never fails for lack of memory.
 */

struct upstream;
struct upstream_cache;

struct upstream_cache_entry {
	struct upstream *up;             /* set by the owner before put */
	const struct downstream_cfg *ds; /* the account the session logged in as */
	struct upstream_cache_entry *prev, *next;
	bool cached;
};

/* A cache with cfg's limits (copied); NULL when out of memory. */
struct upstream_cache *upstream_cache_new(const struct cache_cfg *cfg);

/* Frees the container; the owner has taken every session out first. */
void upstream_cache_free(struct upstream_cache *);

const struct cache_cfg *upstream_cache_cfg(const struct upstream_cache *);

/*
 * True when a session logged in for a may carry mail for b: same host and
 * port, same login and password, same TLS settings. Two users of one
 * provider account share sessions. Extend this when a downstream gains a
 * setting that changes what a session is (an auth mechanism, a TLS mode).
 */
bool upstream_cache_same_account(const struct downstream_cfg *a,
    const struct downstream_cfg *b);

/*
 * Keeps e (e->up and e->ds set) as the newest idle session of its account.
 * False, and nothing kept, when the cache is closed or already holds
 * max_idle sessions of that account.
 */
bool upstream_cache_put(struct upstream_cache *, struct upstream_cache_entry *e);

/* The newest idle session for ds's account, taken out; NULL if none. */
struct upstream *upstream_cache_take(struct upstream_cache *, const struct downstream_cfg *ds);

/* Takes e out (it died or timed out); nothing happens if it is not in. */
void upstream_cache_remove(struct upstream_cache *, struct upstream_cache_entry *e);

/* Takes out any one session, for closing them all; NULL when empty. */
struct upstream *upstream_cache_pop(struct upstream_cache *);

/* Refuses every later put: the worker stops or is retired by a reload. */
void upstream_cache_close(struct upstream_cache *);

/* Idle sessions held (all accounts, or the one of ds when ds != NULL). */
size_t upstream_cache_count(const struct upstream_cache *, const struct downstream_cfg *ds);

#endif

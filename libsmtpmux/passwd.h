/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_PASSWD_H
#define SMTPMUX_PASSWD_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Application passwords: plaintext, or a crypt(3) hash made by libxcrypt
 * (yescrypt "$y$" as `smtpmuxd -H` makes them, also "$gy$", "$7$",
 * "$2b$", "$2y$", "$6$"). A configured password that starts with one of
 * these prefixes is a hash.
 *
 * Verifying a yescrypt hash costs about 18 ms of CPU with Debian's
 * default parameters (bcrypt and sha512crypt a few ms): too much to spend
 * in a worker's event loop on every AUTH of a busy application. So a
 * worker remembers each hash it has verified (struct passwd_cache): the
 * next AUTH with the same password costs two SHA-256 computations. Only
 * successes are remembered, so a wrong password always pays the full
 * cost and online guessing gets no faster.
 */

/* True when a configured password is to be read as a hash. */
bool passwd_is_hash(const char *stored);

/* Checks a hash's method and shape (not the password). 0, or -1 and why. */
int passwd_hash_check(const char *stored, char *why, size_t whylen);

/* Makes a yescrypt hash of plain with libxcrypt's default cost (for
 * `smtpmuxd -H`). Returns 0, or -1 with errno set. */
int passwd_hash_new(const char *plain, char *out, size_t outlen);

struct passwd_cache;

/* One per worker (a random key of its own); NULL when out of memory. */
struct passwd_cache *passwd_cache_new(void);
void passwd_cache_free(struct passwd_cache *);

/* Lookups answered from the cache, and hashes computed, for tests and
 * logs. */
void passwd_cache_stats(const struct passwd_cache *, unsigned long *hits,
    unsigned long *computed);

/*
 * True when given is the password that stored describes (plaintext,
 * compared in constant time; or a hash). cache may be NULL. May run a
 * full hash on the calling thread: a worker's event loop uses the three
 * steps below instead (passwd_offload.h).
 */
bool passwd_verify(struct passwd_cache *cache, const char *given, const char *stored);

/*
 * The steps of passwd_verify. The cheap ones, for the event loop:
 * plaintext is compared, a hash the cache knows matches; anything else
 * needs the hash computed.
 */
enum passwd_quick { PASSWD_MISMATCH, PASSWD_MATCH, PASSWD_NEEDS_HASH };
enum passwd_quick passwd_verify_quick(struct passwd_cache *cache, const char *given,
    const char *stored);

/* The costly one: crypt(3) of given with stored's setting, compared in
 * constant time. Touches nothing but its arguments and memory of its own,
 * so any thread may run it. */
bool passwd_hash_matches(const char *given, const char *stored);

/* Counts a computed hash and, when it matched, remembers the pair. On the
 * thread that owns the cache. */
void passwd_cache_note(struct passwd_cache *cache, const char *given, const char *stored,
    bool ok);

#endif

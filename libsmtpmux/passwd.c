/* SPDX-License-Identifier: MIT */
#include <crypt.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "auth.h"
#include "passwd.h"

#define SHA256_LEN 32
#define CACHE_SLOTS 64                   /* a few hundred users still mostly hit */
#define B64_CRYPT "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#define BCRYPT_LEN 60                    /* "$2b$NN$" + 22 salt + 31 hash */

/* The methods Debian's libxcrypt rates as good, and the length of the
 * hash part (after the last '$') each one produces. */
static const struct method {
	const char *prefix;
	size_t hash_len;                 /* 0: bcrypt, checked by its total length */
} methods[] = {
	{ "$y$", 43 }, { "$gy$", 43 }, { "$7$", 43 },
	{ "$2b$", 0 }, { "$2y$", 0 }, { "$6$", 86 },
};

static const struct method *
method_of(const char *stored)
{
	for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
		if (strncmp(stored, methods[i].prefix, strlen(methods[i].prefix)) == 0)
			return &methods[i];
	return NULL;
}

bool
passwd_is_hash(const char *stored)
{
	return stored != NULL && method_of(stored) != NULL;
}

static bool
hash_shape_ok(const struct method *m, const char *stored)
{
	const char *tail = strrchr(stored, '$') + 1;
	size_t len = strlen(tail);

	if (strspn(tail, B64_CRYPT) != len)
		return false;
	if (m->hash_len != 0)
		return len == m->hash_len && tail - stored > (long)strlen(m->prefix) + 1;
	return strlen(stored) == BCRYPT_LEN && tail == stored + 7;
}

/* crypt_rn() wants about 32 KiB of scratch space: not for the stack. */
static char *
crypt_with(const char *phrase, const char *setting, char *out, size_t outlen)
{
	struct crypt_data *cd = calloc(1, sizeof(*cd));
	char *h, *res = NULL;

	if (cd == NULL)
		return NULL;
	h = crypt_rn(phrase, setting, cd, (int)sizeof(*cd));
	if (h != NULL && h[0] != '*' && strlen(h) < outlen) {
		memcpy(out, h, strlen(h) + 1);
		res = out;
	}
	auth_wipe(cd, sizeof(*cd));
	free(cd);
	return res;
}

int
passwd_hash_check(const char *stored, char *why, size_t whylen)
{
	const struct method *m = method_of(stored);
	char trial[CRYPT_OUTPUT_SIZE];

	if (m == NULL) {
		snprintf(why, whylen, "not a supported password hash (yescrypt \"$y$\", "
		    "\"$gy$\", \"$7$\", bcrypt \"$2b$\", \"$2y$\" or sha512crypt \"$6$\")");
		return -1;
	}
	if (crypt_checksalt(stored) != CRYPT_SALT_OK || !hash_shape_ok(m, stored)) {
		snprintf(why, whylen, "malformed %.4s password hash (make one with smtpmuxd -H)",
		    m->prefix);
		return -1;
	}
	/* Parameters libxcrypt cannot use would fail every AUTH: find out now. */
	if (crypt_with("", stored, trial, sizeof(trial)) == NULL ||
	    strlen(trial) != strlen(stored) ||
	    strncmp(trial, stored, (size_t)(strrchr(stored, '$') - stored)) != 0) {
		snprintf(why, whylen, "%.4s password hash with parameters libxcrypt rejects "
		    "(make one with smtpmuxd -H)", m->prefix);
		auth_wipe(trial, sizeof(trial));
		return -1;
	}
	return 0;
}

int
passwd_hash_new(const char *plain, char *out, size_t outlen)
{
	char *setting = crypt_gensalt_ra("$y$", 0, NULL, 0);
	char *h;

	if (setting == NULL)
		return -1;
	h = crypt_with(plain, setting, out, outlen);
	free(setting);
	if (h == NULL) {
		errno = errno != 0 ? errno : EINVAL;
		return -1;
	}
	return 0;
}

/* ---- the per-worker cache of verified hashes ---- */

/*
 * Keyed by the stored hash itself, not by the user name: a reload that
 * changes a user's hash must not let the old password in, and two users
 * are two entries. The entry holds HMAC(worker key, hash id, password),
 * never the password: it can confirm the same password again, and the
 * random key, new in every worker, makes it useless anywhere else.
 */
struct cache_slot {
	bool used;
	unsigned char id[SHA256_LEN];        /* SHA-256 of the stored hash */
	unsigned char verifier[SHA256_LEN];
};

struct passwd_cache {
	unsigned char key[SHA256_LEN];
	struct cache_slot slots[CACHE_SLOTS];
	unsigned long hits, computed;
};

struct passwd_cache *
passwd_cache_new(void)
{
	struct passwd_cache *c = calloc(1, sizeof(*c));

	if (c != NULL && gnutls_rnd(GNUTLS_RND_KEY, c->key, sizeof(c->key)) < 0) {
		free(c);
		return NULL;
	}
	return c;
}

void
passwd_cache_free(struct passwd_cache *c)
{
	if (c == NULL)
		return;
	auth_wipe(c, sizeof(*c));
	free(c);
}

void
passwd_cache_stats(const struct passwd_cache *c, unsigned long *hits, unsigned long *computed)
{
	*hits = c != NULL ? c->hits : 0;
	*computed = c != NULL ? c->computed : 0;
}

static int
cache_verifier(const struct passwd_cache *c, const unsigned char id[SHA256_LEN],
    const char *given, unsigned char out[SHA256_LEN])
{
	gnutls_hmac_hd_t h;

	if (gnutls_hmac_init(&h, GNUTLS_MAC_SHA256, c->key, sizeof(c->key)) < 0)
		return -1;
	if (gnutls_hmac(h, id, SHA256_LEN) < 0 || gnutls_hmac(h, given, strlen(given)) < 0) {
		gnutls_hmac_deinit(h, NULL);
		return -1;
	}
	gnutls_hmac_deinit(h, out);
	return 0;
}

static bool
equal_32(const unsigned char *a, const unsigned char *b)
{
	unsigned char diff = 0;

	for (size_t i = 0; i < SHA256_LEN; i++)
		diff |= (unsigned char)(a[i] ^ b[i]);
	return diff == 0;
}

/* Looks the pair up (hit: true) or, with remember, stores it. */
static bool
cache_use(struct passwd_cache *c, const char *given, const char *stored, bool remember)
{
	unsigned char id[SHA256_LEN], v[SHA256_LEN];
	struct cache_slot *slot;
	bool hit = false;

	if (gnutls_hash_fast(GNUTLS_DIG_SHA256, stored, strlen(stored), id) < 0 ||
	    cache_verifier(c, id, given, v) < 0)
		return false;
	slot = &c->slots[id[0] % CACHE_SLOTS];
	if (remember) {
		slot->used = true;
		memcpy(slot->id, id, sizeof(id));
		memcpy(slot->verifier, v, sizeof(v));
	} else {
		hit = slot->used && memcmp(slot->id, id, sizeof(id)) == 0 &&
		    equal_32(slot->verifier, v);
	}
	auth_wipe(v, sizeof(v));
	return hit;
}

enum passwd_quick
passwd_verify_quick(struct passwd_cache *cache, const char *given, const char *stored)
{
	if (given == NULL || stored == NULL)
		return PASSWD_MISMATCH;
	if (!passwd_is_hash(stored))
		return auth_password_equal(given, stored) ? PASSWD_MATCH : PASSWD_MISMATCH;
	if (cache != NULL && cache_use(cache, given, stored, false)) {
		cache->hits++;
		return PASSWD_MATCH;
	}
	return PASSWD_NEEDS_HASH;
}

bool
passwd_hash_matches(const char *given, const char *stored)
{
	char out[CRYPT_OUTPUT_SIZE];
	bool ok = crypt_with(given, stored, out, sizeof(out)) != NULL &&
	    auth_password_equal(out, stored);

	auth_wipe(out, sizeof(out));
	return ok;
}

void
passwd_cache_note(struct passwd_cache *cache, const char *given, const char *stored, bool ok)
{
	if (cache == NULL)
		return;
	cache->computed++;
	if (ok)
		cache_use(cache, given, stored, true);
}

bool
passwd_verify(struct passwd_cache *cache, const char *given, const char *stored)
{
	enum passwd_quick q = passwd_verify_quick(cache, given, stored);
	bool ok;

	if (q != PASSWD_NEEDS_HASH)
		return q == PASSWD_MATCH;
	ok = passwd_hash_matches(given, stored);
	passwd_cache_note(cache, given, stored, ok);
	return ok;
}

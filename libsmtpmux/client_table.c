/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <netinet/in.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "client_table.h"
#include "shared_anon.h"

/*
 * Layout of the mapping: `entries` entries of `stride` octets (a multiple
 * of a cache line), each a struct client_entry whose per-worker session
 * counts run to its end. The geometry and the hashing seed are not in it
 * but in the handle, which each process has in its own memory (inherited
 * by fork): a worker that writes anything into the mapping cannot change
 * where the master reads and writes (client_table_worker_gone) or what it
 * unmaps, nor aim at a probe sequence.
 *
 * An entry belongs to the address whose key it holds. Keys are set once by
 * compare-and-swap and never go back to 0, so the probe sequence of an
 * address has no holes: the first never-used entry ends it. An entry that
 * has expired is handed to a new address by swapping the key; counts a
 * worker added for the old address in that instant are undone by it
 * (client_table_open checks the key again), and the failure fields are
 * reset by the new owner.
 */

#define CT_LINE 64
#define CT_PROBES 32                 /* entries an address may use */
#define CT_SEED_LEN 32
/* An expired entry is reused only after this long without use, far longer
 * than any worker holds it between finding it and counting in it. */
#define CT_REUSE_GRACE 10

struct client_entry {
	_Atomic uint64_t key;            /* keyed hash of the address; 0: never used */
	_Atomic int64_t last_seen;
	_Atomic int64_t expires;         /* end of the failure window or lockout */
	_Atomic int64_t window_start;    /* first failure of the window; 0: none */
	_Atomic int64_t locked_until;    /* 0: not locked */
	_Atomic uint32_t failures;       /* in the window */
	_Atomic uint32_t sessions[];     /* one count per worker slot */
};

/* A few addresses' keys, remembered per process: an HMAC costs more than
 * the rest of a session's bookkeeping, and the same clients come back
 * session after session. Only a memo: a miss computes the key again. */
#define CT_MEMO 32

struct key_memo {
	uint64_t key;                    /* 0: empty */
	char addr[INET6_ADDRSTRLEN];
};

struct client_table {
	unsigned entries;
	unsigned slots;
	size_t stride;
	size_t size;                     /* of the shared mapping */
	unsigned char seed[CT_SEED_LEN]; /* so that nobody can aim at a probe sequence */
	unsigned char *map;              /* the entries, shared */
	struct key_memo memo[CT_MEMO];   /* this process's own */
};

static size_t
round_line(size_t n)
{
	return (n + CT_LINE - 1) / CT_LINE * CT_LINE;
}

static struct client_entry *
entry_at(const struct client_table *t, size_t i)
{
	return (struct client_entry *)(t->map + i * t->stride);
}

struct client_table *
client_table_create(unsigned entries, unsigned worker_slots)
{
	size_t stride = round_line(offsetof(struct client_entry, sessions) +
	    (size_t)worker_slots * sizeof(_Atomic uint32_t));
	struct client_table *t;

	if (entries == 0 || worker_slots == 0) {
		errno = EINVAL;
		return NULL;
	}
	if ((t = calloc(1, sizeof(*t))) == NULL)
		return NULL;
	t->entries = entries;
	t->slots = worker_slots;
	t->stride = stride;
	t->size = (size_t)entries * stride;
	if (gnutls_rnd(GNUTLS_RND_NONCE, t->seed, sizeof(t->seed)) < 0) {
		free(t);
		errno = EIO;
		return NULL;
	}
	if ((t->map = shared_anon_map(t->size)) == NULL) {
		free(t);
		return NULL;
	}
	return t;
}

void
client_table_destroy(struct client_table *t)
{
	if (t == NULL)
		return;
	shared_anon_unmap(t->map, t->size);
	free(t);
}

int64_t
client_table_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec;
}

/* FNV-1a: picks the memo slot only; the key itself is the keyed hash. */
static unsigned
memo_slot(const char *addr, size_t len)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < len; i++)
		h = (h ^ (unsigned char)addr[i]) * 16777619u;
	return h % CT_MEMO;
}

static uint64_t
key_of(struct client_table *t, const char *addr)
{
	size_t len = strlen(addr);
	struct key_memo *m = &t->memo[memo_slot(addr, len)];
	unsigned char mac[32];
	uint64_t key = 0;

	if (m->key != 0 && strcmp(m->addr, addr) == 0)
		return m->key;
	if (gnutls_hmac_fast(GNUTLS_MAC_SHA256, t->seed, sizeof(t->seed), addr, len, mac) < 0)
		return 0;
	memcpy(&key, mac, sizeof(key));
	key = key != 0 ? key : 1;
	if (len < sizeof(m->addr)) {
		memcpy(m->addr, addr, len + 1);
		m->key = key;
	}
	return key;
}

static unsigned
sessions_sum(const struct client_table *t, struct client_entry *e)
{
	unsigned n = 0;

	for (unsigned i = 0; i < t->slots; i++)
		n += atomic_load(&e->sessions[i]);
	return n;
}

static bool
expired(const struct client_table *t, struct client_entry *e, int64_t now)
{
	return now >= atomic_load(&e->expires) &&
	    now >= atomic_load(&e->last_seen) + CT_REUSE_GRACE &&
	    atomic_load(&e->locked_until) <= now && sessions_sum(t, e) == 0;
}

static void
raise_expiry(struct client_entry *e, int64_t until)
{
	int64_t cur = atomic_load(&e->expires);

	while (cur < until && !atomic_compare_exchange_weak(&e->expires, &cur, until))
		;
}

/* A new owner: nothing of the old address's failures applies to it. */
static void
entry_take(struct client_entry *e, int64_t now)
{
	atomic_store(&e->failures, 0);
	atomic_store(&e->window_start, 0);
	atomic_store(&e->locked_until, 0);
	atomic_store(&e->expires, 0);
	atomic_store(&e->last_seen, now);
}

/*
 * The entry of key, or with claim a new one: the first never-used or
 * expired entry of its probe sequence, taken by compare-and-swap (two
 * workers adding the same address pick the same entry, and one wins).
 */
static struct client_entry *
entry_find(struct client_table *t, uint64_t key, int64_t now, bool claim)
{
	size_t first = key % t->entries;

	if (key == 0)                   /* the key could not be computed */
		return NULL;
	for (int attempt = 0; attempt < 3; attempt++) {
		struct client_entry *cand = NULL;
		uint64_t cand_key = 0;

		for (unsigned i = 0; i < CT_PROBES && i < t->entries; i++) {
			struct client_entry *e = entry_at(t, (first + i) % t->entries);
			uint64_t k = atomic_load(&e->key);

			if (k == key)
				return e;
			if (k == 0) {
				if (cand == NULL) {
					cand = e;
					cand_key = 0;
				}
				break;
			}
			if (claim && cand == NULL && expired(t, e, now)) {
				cand = e;
				cand_key = k;
			}
		}
		if (!claim || cand == NULL)
			return NULL;
		if (atomic_compare_exchange_strong(&cand->key, &cand_key, key)) {
			entry_take(cand, now);
			return cand;
		}
		if (cand_key == key)
			return cand;            /* another worker added this very address */
	}
	return NULL;
}

struct client_entry *
client_table_open(struct client_table *t, const char *addr, unsigned slot, int64_t now,
    unsigned *sessions)
{
	uint64_t key = key_of(t, addr);

	*sessions = 1;
	if (slot >= t->slots)
		return NULL;
	for (int attempt = 0; attempt < 3; attempt++) {
		struct client_entry *e = entry_find(t, key, now, true);

		if (e == NULL)
			return NULL;
		atomic_store(&e->last_seen, now);
		atomic_fetch_add(&e->sessions[slot], 1);
		if (atomic_load(&e->key) != key) {
			/* Handed to another address meanwhile: not ours to count in. */
			atomic_fetch_sub(&e->sessions[slot], 1);
			continue;
		}
		*sessions = sessions_sum(t, e);
		return e;
	}
	return NULL;
}

void
client_table_close(struct client_table *t, struct client_entry *e, unsigned slot, int64_t now)
{
	uint32_t n;

	if (e == NULL || slot >= t->slots)
		return;
	/* Never below 0: the master may have cleared the slot of a dead worker. */
	n = atomic_load(&e->sessions[slot]);
	while (n > 0 && !atomic_compare_exchange_weak(&e->sessions[slot], &n, n - 1))
		;
	atomic_store(&e->last_seen, now);
}

void
client_table_worker_gone(struct client_table *t, unsigned slot)
{
	if (t == NULL || slot >= t->slots)
		return;
	for (size_t i = 0; i < t->entries; i++) {
		struct client_entry *e = entry_at(t, i);

		if (atomic_load(&e->key) != 0)
			atomic_store(&e->sessions[slot], 0);
	}
}

enum client_auth_verdict
client_table_auth_failed(struct client_table *t, const char *addr,
    const struct client_auth_policy *p, int64_t now, unsigned *failures)
{
	struct client_entry *e;
	int64_t start, locked;
	uint32_t n;

	*failures = 1;
	if ((e = entry_find(t, key_of(t, addr), now, true)) == NULL)
		return CLIENT_AUTH_COUNTED;
	atomic_store(&e->last_seen, now);
	locked = atomic_load(&e->locked_until);
	if (locked > now)
		return CLIENT_AUTH_LOCKED;
	/* A new window starts with the first failure after the last one ended. */
	start = atomic_load(&e->window_start);
	if ((start == 0 || now >= start + (int64_t)p->window) &&
	    atomic_compare_exchange_strong(&e->window_start, &start, now))
		atomic_store(&e->failures, 0);
	n = atomic_fetch_add(&e->failures, 1) + 1;
	raise_expiry(e, now + (int64_t)p->window);
	*failures = n;
	if (p->max_failures == 0 || n < p->max_failures)
		return CLIENT_AUTH_COUNTED;
	/* Exactly one failure starts the lockout, whichever worker counts it. */
	if (!atomic_compare_exchange_strong(&e->locked_until, &locked, now + (int64_t)p->lockout))
		return CLIENT_AUTH_LOCKED;
	atomic_store(&e->failures, 0);
	atomic_store(&e->window_start, 0);
	raise_expiry(e, now + (int64_t)p->lockout);
	return CLIENT_AUTH_LOCKED_NOW;
}

bool
client_table_auth_locked(struct client_table *t, const char *addr, int64_t now, int64_t *until)
{
	struct client_entry *e = entry_find(t, key_of(t, addr), now, false);
	int64_t locked = e != NULL ? atomic_load(&e->locked_until) : 0;

	if (until != NULL)
		*until = locked;
	return locked > now;
}

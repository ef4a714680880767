/* SPDX-License-Identifier: MIT */
/*
 * The token table (see token_table.h).
 *
 *   status segment (sealed memfd)            tokens (anonymous, shared)
 *   keys part (master writes):               64 x secret record:
 *     header: magic "SMTPMUXO", layout,        seq, len, use_until_ms, gen,
 *     sizes, slots in use, bind generation     source_id, reject_gen,
 *     64 x key[160] + generation of the        token[TOKEN_MAX] as words
 *     last bind that used it
 *   records part (token helper writes),
 *   from the next page boundary:
 *     64 x seq + struct token_status as words
 *
 * The master maps the whole segment writable once, before sealing it
 * against any new writable mapping; every child unmaps the keys part of
 * that view, and every child but the token helper the records part too
 * (token_table_after_fork), so that a worker, the prober or the queue
 * runner can only read the status, through a mapping made from a read-only
 * descriptor that no mprotect() makes writable.
 *
 * Only the token helper writes a slot's token and status, and the master
 * never runs two helpers at once, so each sequence lock has one writer.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "auth.h"
#include "sealed_memfd.h"
#include "shared_anon.h"
#include "token_table.h"

#define STATUS_MAGIC 0x4f584d55504d5453ULL   /* "SMTPMUXO" little-endian */
#define STATUS_LAYOUT_VERSION 2
#define KEY_MAX 160
#define STATUS_WORDS ((sizeof(struct token_status) + 7) / 8)
#define TOKEN_WORDS (TOKEN_MAX / 8)
#define READ_TRIES 16                        /* then the reader gives up for now */
#define SEALS_STATUS (SEALS_FIXED_SIZE | F_SEAL_FUTURE_WRITE)

_Static_assert(TOKEN_MAX % 8 == 0, "tokens are stored as whole words");

struct status_hdr {
	alignas(64) uint64_t magic;
	uint32_t layout_version;
	uint32_t hdr_size;
	uint32_t key_size;
	uint32_t rec_size;
	uint32_t max_slots;
	uint32_t recs_offset;                /* where the records part starts */
	_Atomic uint32_t n_slots;
	_Atomic uint32_t generation;
};

struct key_rec {
	alignas(64) char key[KEY_MAX];
	_Atomic uint32_t generation;
};

struct status_rec {
	alignas(64) _Atomic uint32_t seq;
	_Atomic uint64_t body[STATUS_WORDS];
};

/* What only the master writes. */
struct status_keys {
	struct status_hdr hdr;
	struct key_rec key[TOKEN_TABLE_SLOTS];
};

/* What only the token helper writes. */
struct status_recs {
	struct status_rec rec[TOKEN_TABLE_SLOTS];
};

struct secret_rec {
	alignas(64) _Atomic uint32_t seq;
	_Atomic uint32_t len;
	_Atomic int64_t use_until_ms;            /* wall clock */
	_Atomic uint64_t gen;
	_Atomic uint64_t source_id;
	_Atomic uint64_t reject_gen;         /* written by workers */
	_Atomic uint64_t words[TOKEN_WORDS];
};

struct secrets {
	struct secret_rec rec[TOKEN_TABLE_SLOTS];
};

_Static_assert(sizeof(struct status_hdr) == 64, "header is one cache line");
_Static_assert(sizeof(struct key_rec) == 192, "key record: 3 cache lines");
_Static_assert(sizeof(struct status_rec) == 320, "status record: 5 cache lines");

struct token_table {
	const struct status_keys *keys;      /* read-only views of the segment */
	const struct status_recs *recs;
	void *ro;                            /* ... as mapped */
	struct status_keys *keys_rw;         /* the master's only */
	struct status_recs *recs_rw;         /* the master's and the token helper's */
	void *rw;                            /* the writable view as mapped */
	int fd;                              /* read-only, for status readers (master); -1 */
	struct secrets *secrets;             /* NULL for a status reader */
	int wake[2];
};

/* --- sequence locks ---------------------------------------------------- */

/* Always a new odd value, even over one a killed writer left odd. */
static uint32_t
seq_write_begin(_Atomic uint32_t *seq)
{
	uint32_t s = atomic_load_explicit(seq, memory_order_relaxed);
	uint32_t w = (s & 1) ? s + 2 : s + 1;

	atomic_store_explicit(seq, w, memory_order_relaxed);
	atomic_thread_fence(memory_order_release);
	return w;
}

static void
seq_write_end(_Atomic uint32_t *seq, uint32_t w)
{
	atomic_store_explicit(seq, w + 1, memory_order_release);
}

static uint32_t
seq_read_begin(const _Atomic uint32_t *seq)
{
	return atomic_load_explicit(seq, memory_order_acquire);
}

static bool
seq_read_ok(const _Atomic uint32_t *seq, uint32_t begun)
{
	atomic_thread_fence(memory_order_acquire);
	return (begun & 1) == 0 && atomic_load_explicit(seq, memory_order_relaxed) == begun;
}

static void
words_store(_Atomic uint64_t *dst, const void *src, size_t len)
{
	const unsigned char *p = src;

	for (size_t i = 0; i * 8 < len; i++) {
		uint64_t w = 0;

		memcpy(&w, p + i * 8, len - i * 8 < 8 ? len - i * 8 : 8);
		atomic_store_explicit(&dst[i], w, memory_order_relaxed);
	}
}

static void
words_load(void *dst, const _Atomic uint64_t *src, size_t len)
{
	unsigned char *p = dst;

	for (size_t i = 0; i * 8 < len; i++) {
		uint64_t w = atomic_load_explicit(&src[i], memory_order_relaxed);

		memcpy(p + i * 8, &w, len - i * 8 < 8 ? len - i * 8 : 8);
	}
}

/* --- creating and binding ---------------------------------------------- */

int64_t
token_clock_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool
token_table_needed(const struct config *cfg)
{
	for (size_t i = 0; i < cfg->n_users; i++)
		for (size_t j = 0; j < cfg->users[i].n_downstreams; j++)
			if (cfg->users[i].downstreams[j].token != NULL)
				return true;
	return false;
}

/* The records part starts on a page of its own, so that the token
 * helper's writable view of it can exclude the keys. */
static size_t
recs_offset(void)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	return (sizeof(struct status_keys) + page - 1) / page * page;
}

static size_t
segment_size(void)
{
	return recs_offset() + sizeof(struct status_recs);
}

static void
status_init(struct status_keys *k)
{
	k->hdr.layout_version = STATUS_LAYOUT_VERSION;
	k->hdr.hdr_size = sizeof(struct status_hdr);
	k->hdr.key_size = sizeof(struct key_rec);
	k->hdr.rec_size = sizeof(struct status_rec);
	k->hdr.max_slots = TOKEN_TABLE_SLOTS;
	k->hdr.recs_offset = (uint32_t)recs_offset();
	atomic_thread_fence(memory_order_seq_cst);
	k->hdr.magic = STATUS_MAGIC;
}

static bool
status_valid(const struct status_keys *k)
{
	return k->hdr.magic == STATUS_MAGIC && k->hdr.layout_version == STATUS_LAYOUT_VERSION &&
	    k->hdr.hdr_size == sizeof(struct status_hdr) &&
	    k->hdr.key_size == sizeof(struct key_rec) &&
	    k->hdr.rec_size == sizeof(struct status_rec) &&
	    k->hdr.max_slots == TOKEN_TABLE_SLOTS &&
	    k->hdr.recs_offset == recs_offset() &&
	    atomic_load(&k->hdr.n_slots) <= TOKEN_TABLE_SLOTS;
}

static struct token_table *
table_alloc(void)
{
	struct token_table *tt = calloc(1, sizeof(*tt));

	if (tt != NULL)
		tt->fd = tt->wake[0] = tt->wake[1] = -1;
	return tt;
}

/* Both views of a segment mapped at base. */
static void
views_set(struct token_table *tt, void *ro, void *rw)
{
	tt->ro = ro;
	tt->keys = ro;
	tt->recs = ro != NULL ? (const void *)((const char *)ro + recs_offset()) : NULL;
	tt->rw = rw;
	tt->keys_rw = rw;
	tt->recs_rw = rw != NULL ? (void *)((char *)rw + recs_offset()) : NULL;
}

/*
 * Tokens do not survive the daemon, so their status starts afresh too, in
 * a sealed memfd: no path that anyone could truncate (killing whoever maps
 * it with SIGBUS), replace or read behind the daemon's back.
 */
static struct token_table *
table_create(char *err, size_t errlen)
{
	struct token_table *tt = table_alloc();
	void *rw = NULL, *ro = NULL;

	if (tt == NULL) {
		snprintf(err, errlen, "token table: out of memory");
		return NULL;
	}
	if ((tt->fd = sealed_memfd_make("smtpmux-oauth", segment_size(), SEALS_STATUS, &rw,
	    &ro)) < 0 || (tt->secrets = shared_anon_map(sizeof(struct secrets))) == NULL ||
	    pipe2(tt->wake, O_NONBLOCK | O_CLOEXEC) < 0) {
		snprintf(err, errlen, "token table: %s", strerror(errno));
		views_set(tt, ro, rw);
		token_table_destroy(tt);
		return NULL;
	}
	views_set(tt, ro, rw);
	status_init(tt->keys_rw);
	return tt;
}

static int
slot_find_or_add(struct status_keys *k, const char *key)
{
	uint32_t n = atomic_load_explicit(&k->hdr.n_slots, memory_order_acquire);

	for (uint32_t i = 0; i < n; i++)
		if (strcmp(k->key[i].key, key) == 0)
			return (int)i;
	if (n == TOKEN_TABLE_SLOTS)
		return -1;
	snprintf(k->key[n].key, sizeof(k->key[n].key), "%s", key);
	atomic_store_explicit(&k->hdr.n_slots, n + 1, memory_order_release);
	return (int)n;
}

static int
bind_downstream(struct token_table *tt, struct downstream_cfg *ds, uint32_t gen,
    char *err, size_t errlen)
{
	char key[KEY_MAX];
	int slot;

	if (snprintf(key, sizeof(key), "%s %s", ds->addr, ds->user) >= (int)sizeof(key)) {
		snprintf(err, errlen, "downstream %s: addr and user longer than %d characters",
		    ds->name, KEY_MAX - 2);
		return -1;
	}
	if ((slot = slot_find_or_add(tt->keys_rw, key)) < 0) {
		snprintf(err, errlen, "more than %d downstream accounts with OAuth tokens",
		    TOKEN_TABLE_SLOTS);
		return -1;
	}
	atomic_store(&tt->keys_rw->key[slot].generation, gen);
	ds->token_slot = slot;
	return 0;
}

int
token_table_bind(struct token_table **ttp, struct config *cfg, char *err, size_t errlen)
{
	uint32_t gen;

	if (*ttp == NULL && !token_table_needed(cfg))
		return 0;
	if (*ttp == NULL && (*ttp = table_create(err, errlen)) == NULL)
		return -1;
	gen = atomic_fetch_add(&(*ttp)->keys_rw->hdr.generation, 1) + 1;
	for (size_t i = 0; i < cfg->n_users; i++) {
		for (size_t j = 0; j < cfg->users[i].n_downstreams; j++) {
			struct downstream_cfg *ds = &cfg->users[i].downstreams[j];

			if (ds->token != NULL && bind_downstream(*ttp, ds, gen, err, errlen) < 0)
				return -1;
		}
	}
	return 0;
}

int
token_table_fd(const struct token_table *tt)
{
	return tt != NULL ? tt->fd : -1;
}

/* The master's writable view of [from, to) of the segment goes away. */
static void
rw_drop(struct token_table *tt, size_t from, size_t to)
{
	if (tt->rw != NULL && to > from)
		munmap((char *)tt->rw + from, to - from);
}

void
token_table_after_fork(struct token_table *tt, bool status_writer)
{
	if (tt == NULL)
		return;
	if (tt->fd >= 0)
		close(tt->fd);
	tt->fd = -1;
	rw_drop(tt, 0, status_writer ? recs_offset() : segment_size());
	tt->keys_rw = NULL;
	if (!status_writer) {
		tt->recs_rw = NULL;
		tt->rw = NULL;
	}
}

static void
views_unmap(struct token_table *tt)
{
	if (tt->keys_rw != NULL)
		rw_drop(tt, 0, segment_size());
	else if (tt->recs_rw != NULL)
		rw_drop(tt, recs_offset(), segment_size());
	if (tt->ro != NULL)
		munmap(tt->ro, segment_size());
}

void
token_table_destroy(struct token_table *tt)
{
	if (tt == NULL)
		return;
	views_unmap(tt);
	if (tt->fd >= 0)
		close(tt->fd);
	shared_anon_unmap(tt->secrets, sizeof(*tt->secrets));
	for (int i = 0; i < 2; i++)
		if (tt->wake[i] >= 0)
			close(tt->wake[i]);
	free(tt);
}

/* --- tokens ------------------------------------------------------------ */

static const struct secret_rec *
secret_at(const struct token_table *tt, int slot)
{
	if (tt == NULL || tt->secrets == NULL || slot < 0 || slot >= TOKEN_TABLE_SLOTS)
		return NULL;
	return &tt->secrets->rec[slot];
}

/* One consistent copy of the slot's metadata and, when buf is given, token. */
static int
secret_read(const struct secret_rec *r, struct token_meta *m, char *buf)
{
	for (int tries = 0; tries < READ_TRIES; tries++) {
		uint32_t s = seq_read_begin(&r->seq);

		m->len = atomic_load_explicit(&r->len, memory_order_relaxed);
		m->use_until_ms = atomic_load_explicit(&r->use_until_ms, memory_order_relaxed);
		m->gen = atomic_load_explicit(&r->gen, memory_order_relaxed);
		m->source_id = atomic_load_explicit(&r->source_id, memory_order_relaxed);
		if (m->len > TOKEN_MAX)
			m->len = 0;
		if (buf != NULL)
			words_load(buf, r->words, m->len);
		if (seq_read_ok(&r->seq, s)) {
			if (buf != NULL)
				buf[m->len] = '\0';
			return 0;
		}
	}
	return -1;
}

int
token_table_meta(const struct token_table *tt, int slot, struct token_meta *out)
{
	const struct secret_rec *r = secret_at(tt, slot);

	memset(out, 0, sizeof(*out));
	return r != NULL ? secret_read(r, out, NULL) : -1;
}

static bool
usable(const struct token_meta *m, const struct downstream_cfg *ds, int64_t now_ms)
{
	return m->len > 0 && m->use_until_ms > now_ms && m->source_id == ds->token->id;
}

bool
token_table_ready(const struct token_table *tt, const struct downstream_cfg *ds,
    int64_t now_ms, char *why, size_t whylen)
{
	struct token_status st;
	struct token_meta m;

	if (ds->token == NULL)
		return true;
	if (token_table_meta(tt, ds->token_slot, &m) == 0 && usable(&m, ds, now_ms))
		return true;
	if (token_table_status_get(tt, ds->token_slot, &st) == 0 && st.failing)
		snprintf(why, whylen, "no OAuth token: %s", st.last_error);
	else if (m.gen != 0 && m.use_until_ms <= now_ms)
		snprintf(why, whylen, "no OAuth token: the last one expired");
	else
		snprintf(why, whylen, "no OAuth token yet");
	return false;
}

int
token_table_get(const struct token_table *tt, const struct downstream_cfg *ds,
    int64_t now_ms, char *buf, size_t cap, size_t *len, uint64_t *gen)
{
	const struct secret_rec *r = ds->token != NULL ? secret_at(tt, ds->token_slot) : NULL;
	struct token_meta m;

	if (r == NULL || cap < TOKEN_MAX + 1 || secret_read(r, &m, buf) < 0 ||
	    !usable(&m, ds, now_ms)) {
		if (cap > 0)
			auth_wipe(buf, cap);
		return -1;
	}
	*len = m.len;
	*gen = m.gen;
	return 0;
}

void
token_table_reject(struct token_table *tt, const struct downstream_cfg *ds, uint64_t gen)
{
	const struct secret_rec *r = ds->token != NULL ? secret_at(tt, ds->token_slot) : NULL;
	ssize_t n;

	if (r == NULL || gen == 0)
		return;
	atomic_store(&tt->secrets->rec[ds->token_slot].reject_gen, gen);
	/* A full pipe already holds a wake-up: nothing is lost. */
	n = write(tt->wake[1], "r", 1);
	(void)n;
}

void
token_table_put(struct token_table *tt, int slot, const char *token, size_t len,
    int64_t use_until_ms, uint64_t source_id)
{
	struct secret_rec *r;
	uint32_t w;

	if (secret_at(tt, slot) == NULL || len > TOKEN_MAX)
		return;
	r = &tt->secrets->rec[slot];
	w = seq_write_begin(&r->seq);
	words_store(r->words, token, len);
	atomic_store_explicit(&r->len, (uint32_t)len, memory_order_relaxed);
	atomic_store_explicit(&r->use_until_ms, use_until_ms, memory_order_relaxed);
	atomic_store_explicit(&r->source_id, source_id, memory_order_relaxed);
	atomic_store_explicit(&r->gen, atomic_load_explicit(&r->gen, memory_order_relaxed) + 1,
	    memory_order_relaxed);
	seq_write_end(&r->seq, w);
}

void
token_table_clear(struct token_table *tt, int slot)
{
	struct secret_rec *r;
	uint32_t w;

	if (secret_at(tt, slot) == NULL)
		return;
	r = &tt->secrets->rec[slot];
	w = seq_write_begin(&r->seq);
	for (size_t i = 0; i < TOKEN_WORDS; i++)
		atomic_store_explicit(&r->words[i], 0, memory_order_relaxed);
	atomic_store_explicit(&r->len, 0, memory_order_relaxed);
	atomic_store_explicit(&r->use_until_ms, 0, memory_order_relaxed);
	seq_write_end(&r->seq, w);
}

uint64_t
token_table_take_rejection(struct token_table *tt, int slot)
{
	struct token_meta m;
	uint64_t rejected;

	if (token_table_meta(tt, slot, &m) < 0)
		return 0;
	rejected = atomic_exchange(&tt->secrets->rec[slot].reject_gen, 0);
	/* A refusal of an older token was answered by the one in place. */
	return rejected != 0 && rejected == m.gen ? rejected : 0;
}

int
token_table_wake_fd(const struct token_table *tt)
{
	return tt->wake[0];
}

void
token_table_wake_drain(const struct token_table *tt)
{
	char buf[256];

	while (read(tt->wake[0], buf, sizeof(buf)) > 0)
		;
}

/* --- status -------------------------------------------------------------- */

void
token_table_status_put(struct token_table *tt, int slot, const struct token_status *st)
{
	struct status_rec *r;
	uint32_t w;

	if (tt == NULL || tt->recs_rw == NULL || slot < 0 || slot >= TOKEN_TABLE_SLOTS)
		return;
	r = &tt->recs_rw->rec[slot];
	w = seq_write_begin(&r->seq);
	words_store(r->body, st, sizeof(*st));
	seq_write_end(&r->seq, w);
}

int
token_table_status_get(const struct token_table *tt, int slot, struct token_status *out)
{
	const struct status_rec *r;

	memset(out, 0, sizeof(*out));
	if (tt == NULL || slot < 0 || (size_t)slot >= token_table_count(tt))
		return -1;
	r = &tt->recs->rec[slot];
	for (int tries = 0; tries < READ_TRIES; tries++) {
		uint32_t s = seq_read_begin(&r->seq);

		words_load(out, r->body, sizeof(*out));
		if (seq_read_ok(&r->seq, s)) {
			out->name[sizeof(out->name) - 1] = '\0';
			out->last_error[sizeof(out->last_error) - 1] = '\0';
			return 0;
		}
	}
	memset(out, 0, sizeof(*out));
	return -1;
}

struct token_table *
token_table_attach(int fd)
{
	struct token_table *tt = table_alloc();
	void *ro = NULL;

	if (tt == NULL || (ro = sealed_memfd_map_foreign(fd, segment_size())) == NULL)
		goto fail;
	views_set(tt, ro, NULL);
	if (!status_valid(tt->keys)) {
		errno = EPROTO;
		goto fail;
	}
	close(fd);
	return tt;
fail:
	unmap_keep_errno(ro, segment_size());
	free(tt);
	close_keep_errno(fd);
	return NULL;
}

size_t
token_table_count(const struct token_table *tt)
{
	return tt != NULL ? atomic_load_explicit(&tt->keys->hdr.n_slots, memory_order_acquire) : 0;
}

int
token_table_slot_key(const struct token_table *tt, size_t index, char *key, size_t keylen)
{
	const struct key_rec *r;

	if (index >= token_table_count(tt))
		return -1;
	r = &tt->keys->key[index];
	snprintf(key, keylen, "%.*s", KEY_MAX - 1, r->key);
	return atomic_load(&r->generation) == atomic_load(&tt->keys->hdr.generation) ? 0 : 1;
}

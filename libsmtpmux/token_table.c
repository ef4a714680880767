/* SPDX-License-Identifier: MIT */
/*
 * The token table (see token_table.h).
 *
 *   status file state_file.oauth (0640)      tokens (anonymous, shared)
 *   offset  size                             64 x secret record:
 *   0       64     header: magic               seq, len, use_until_ms, gen,
 *                  "SMTPMUXO", layout,         source_id, reject_gen,
 *                  sizes, slots in use,        token[TOKEN_MAX] as words
 *                  bind generation
 *   64      64 x 448  status records:
 *                  key[160] (master, before the slot is published),
 *                  generation of the last bind that used it, seq,
 *                  struct token_status as words (the helper)
 *
 * Only the token helper writes a slot's token and status, and the master
 * never runs two helpers at once, so each sequence lock has one writer.
 * The master writes keys and bind generations only.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "auth.h"
#include "shared_anon.h"
#include "token_table.h"

#define STATUS_MAGIC 0x4f584d55504d5453ULL   /* "SMTPMUXO" little-endian */
#define STATUS_LAYOUT_VERSION 1
#define KEY_MAX 160
#define STATUS_WORDS ((sizeof(struct token_status) + 7) / 8)
#define TOKEN_WORDS (TOKEN_MAX / 8)
#define READ_TRIES 16                        /* then the reader gives up for now */

_Static_assert(TOKEN_MAX % 8 == 0, "tokens are stored as whole words");

struct status_hdr {
	alignas(64) uint64_t magic;
	uint32_t layout_version;
	uint32_t hdr_size;
	uint32_t rec_size;
	uint32_t max_slots;
	_Atomic uint32_t n_slots;
	_Atomic uint32_t generation;
};

struct status_rec {
	alignas(64) char key[KEY_MAX];
	_Atomic uint32_t generation;
	_Atomic uint32_t seq;
	_Atomic uint64_t body[STATUS_WORDS];
};

struct status_file {
	struct status_hdr hdr;
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
_Static_assert(sizeof(struct status_rec) == 448, "status record: 7 cache lines");

struct token_table {
	char *status_path;                   /* the daemon's only */
	struct status_file *status;
	struct secrets *secrets;             /* NULL for a status reader */
	bool writable;
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

static void
status_init(struct status_file *f)
{
	memset(f, 0, sizeof(*f));
	f->hdr.layout_version = STATUS_LAYOUT_VERSION;
	f->hdr.hdr_size = sizeof(struct status_hdr);
	f->hdr.rec_size = sizeof(struct status_rec);
	f->hdr.max_slots = TOKEN_TABLE_SLOTS;
	atomic_thread_fence(memory_order_seq_cst);
	f->hdr.magic = STATUS_MAGIC;
}

static bool
status_valid(const struct status_file *f)
{
	return f->hdr.magic == STATUS_MAGIC && f->hdr.layout_version == STATUS_LAYOUT_VERSION &&
	    f->hdr.hdr_size == sizeof(struct status_hdr) &&
	    f->hdr.rec_size == sizeof(struct status_rec) &&
	    f->hdr.max_slots == TOKEN_TABLE_SLOTS &&
	    atomic_load(&f->hdr.n_slots) <= TOKEN_TABLE_SLOTS;
}

static void
status_path(const char *state_file, char *path, size_t len)
{
	snprintf(path, len, "%s.oauth", state_file);
}

/*
 * Tokens do not survive the daemon, so their status starts afresh too: a
 * new file of our own (a name nobody can guess, renamed over the old one),
 * never one that someone else put there.
 */
static struct status_file *
status_create(const char *path)
{
	struct status_file *f = MAP_FAILED;
	char tmp[4096];
	int fd, saved;

	if (snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= (int)sizeof(tmp)) {
		errno = ENAMETOOLONG;
		return NULL;
	}
	if ((fd = mkostemp(tmp, O_CLOEXEC)) < 0)
		return NULL;
	if (fchmod(fd, 0640) == 0 && ftruncate(fd, sizeof(*f)) == 0)
		f = mmap(NULL, sizeof(*f), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	saved = errno;
	close(fd);
	if (f != MAP_FAILED && rename(tmp, path) == 0) {
		status_init(f);
		return f;
	}
	saved = f != MAP_FAILED ? errno : saved;
	if (f != MAP_FAILED)
		munmap(f, sizeof(*f));
	unlink(tmp);
	errno = saved;
	return NULL;
}

static struct token_table *
table_create(const char *state_file, char *err, size_t errlen)
{
	struct token_table *tt = calloc(1, sizeof(*tt));
	char path[4096];

	status_path(state_file, path, sizeof(path));
	if (tt == NULL) {
		snprintf(err, errlen, "token table: out of memory");
		return NULL;
	}
	tt->wake[0] = tt->wake[1] = -1;
	tt->writable = true;
	if ((tt->status_path = strdup(path)) == NULL || (tt->status = status_create(path)) == NULL) {
		snprintf(err, errlen, "cannot create %s: %s", path, strerror(errno));
		token_table_destroy(tt);
		return NULL;
	}
	if ((tt->secrets = shared_anon_map(sizeof(struct secrets))) == NULL ||
	    pipe2(tt->wake, O_NONBLOCK | O_CLOEXEC) < 0) {
		snprintf(err, errlen, "token table: %s", strerror(errno));
		token_table_destroy(tt);
		return NULL;
	}
	return tt;
}

static int
slot_find_or_add(struct status_file *f, const char *key)
{
	uint32_t n = atomic_load_explicit(&f->hdr.n_slots, memory_order_acquire);

	for (uint32_t i = 0; i < n; i++)
		if (strcmp(f->rec[i].key, key) == 0)
			return (int)i;
	if (n == TOKEN_TABLE_SLOTS)
		return -1;
	snprintf(f->rec[n].key, sizeof(f->rec[n].key), "%s", key);
	atomic_store_explicit(&f->hdr.n_slots, n + 1, memory_order_release);
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
	if ((slot = slot_find_or_add(tt->status, key)) < 0) {
		snprintf(err, errlen, "more than %d downstream accounts with OAuth tokens",
		    TOKEN_TABLE_SLOTS);
		return -1;
	}
	atomic_store(&tt->status->rec[slot].generation, gen);
	ds->token_slot = slot;
	return 0;
}

int
token_table_bind(struct token_table **ttp, struct config *cfg, char *err, size_t errlen)
{
	char path[4096];
	uint32_t gen;

	if (*ttp == NULL && !token_table_needed(cfg)) {
		/* One left by an earlier run would show its tokens as current. */
		status_path(cfg->state_file, path, sizeof(path));
		unlink(path);
		return 0;
	}
	if (*ttp == NULL && (*ttp = table_create(cfg->state_file, err, errlen)) == NULL)
		return -1;
	gen = atomic_fetch_add(&(*ttp)->status->hdr.generation, 1) + 1;
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
token_table_share_status(const struct token_table *tt, gid_t group)
{
	if (tt == NULL || tt->status_path == NULL)
		return 0;
	return chown(tt->status_path, (uid_t)-1, group);
}

void
token_table_destroy(struct token_table *tt)
{
	if (tt == NULL)
		return;
	if (tt->status != NULL)
		munmap(tt->status, sizeof(*tt->status));
	shared_anon_unmap(tt->secrets, sizeof(*tt->secrets));
	for (int i = 0; i < 2; i++)
		if (tt->wake[i] >= 0)
			close(tt->wake[i]);
	free(tt->status_path);
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

	if (tt == NULL || !tt->writable || slot < 0 || slot >= TOKEN_TABLE_SLOTS)
		return;
	r = &tt->status->rec[slot];
	w = seq_write_begin(&r->seq);
	words_store(r->body, st, sizeof(*st));
	seq_write_end(&r->seq, w);
}

int
token_table_status_get(const struct token_table *tt, int slot, struct token_status *out)
{
	const struct status_rec *r;

	memset(out, 0, sizeof(*out));
	if (tt == NULL || slot < 0 || (uint32_t)slot >= atomic_load(&tt->status->hdr.n_slots))
		return -1;
	r = &tt->status->rec[slot];
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
token_table_open_status(const char *state_file)
{
	struct token_table *tt;
	char path[4096];
	void *p;
	int fd, saved;

	status_path(state_file, path, sizeof(path));
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return NULL;
	if (lseek(fd, 0, SEEK_END) != (off_t)sizeof(struct status_file)) {
		close(fd);
		errno = EPROTO;
		return NULL;
	}
	p = mmap(NULL, sizeof(struct status_file), PROT_READ, MAP_SHARED, fd, 0);
	saved = errno;
	close(fd);
	if (p == MAP_FAILED || (tt = calloc(1, sizeof(*tt))) == NULL) {
		if (p != MAP_FAILED)
			munmap(p, sizeof(struct status_file));
		errno = p == MAP_FAILED ? saved : ENOMEM;
		return NULL;
	}
	tt->status = p;
	tt->wake[0] = tt->wake[1] = -1;
	if (!status_valid(tt->status)) {
		token_table_destroy(tt);
		errno = EPROTO;
		return NULL;
	}
	return tt;
}

size_t
token_table_count(const struct token_table *tt)
{
	return tt != NULL ? atomic_load_explicit(&tt->status->hdr.n_slots, memory_order_acquire) : 0;
}

int
token_table_slot_key(const struct token_table *tt, size_t index, char *key, size_t keylen)
{
	const struct status_rec *r;

	if (index >= token_table_count(tt))
		return -1;
	r = &tt->status->rec[index];
	snprintf(key, keylen, "%.*s", KEY_MAX - 1, r->key);
	return atomic_load(&r->generation) == atomic_load(&tt->status->hdr.generation) ? 0 : 1;
}

/* SPDX-License-Identifier: MIT */
/*
 * The shared health segment.
 *
 * One file (config `state_file`), created by the master and mapped
 * MAP_SHARED before it forks; workers and the prober inherit the mapping,
 * `smtpmuxd -s status` maps the file read-only. A file whose header does not
 * match this build (magic, HEALTH_LAYOUT_VERSION, sizes) is reinitialised;
 * one that does keeps its counters, so quotas survive a restart too.
 *
 *   offset        size            what
 *   0             64              header: magic "SMTPMUXH", layout version,
 *                                 header/record/user sizes, array lengths,
 *                                 segment size, records and users in use,
 *                                 bind generation
 *   64            1024 x 768      downstream records, keyed "addr user"
 *   786496        1024 x 320      user records, keyed by lower-case email
 *   1114176                       end
 *
 *   downstream record (cache-line aligned, 768 bytes)
 *     key[160]           "addr user" / "addr"; written once, before publish
 *     name[64]           display name            (master, at each bind)
 *     generation         last bind that used it  (master)
 *     weight, limit[3]   minute/hour/day limits for status readers (master)
 *     circuit            u64: mode(8) | cooldown s(24) | until(32), see below
 *     throttled_until    time_t
 *     consecutive_failures, latency_ms (EWMA of successes and probes)
 *     attempts, successes, failures      totals
 *     window[3]          u64 per window: index(32) | count(32)
 *     error_seq, error_time, error[160]  last error, published by seq
 *     in_flight[128]     u16 per worker slot
 *
 *   user record (cache-line aligned, 320 bytes)
 *     email[256], seq    message sequence (fetch_add)
 *
 * Every mutable field is a lock-free C11 atomic (text fields are arrays of
 * atomic bytes) so that a process killed at any instruction leaves nothing
 * locked and nothing that can crash a reader. Keys are written only by the
 * master, before a record is published by the release store of n_recs.
 *
 * The circuit breaker is one word so that every transition is one CAS:
 *   CLOSED                 mode 0; the downstream is UP (or THROTTLED)
 *   OPEN, now <  until     DOWN for cooldown seconds
 *   OPEN, now >= until     HALF_OPEN: the next health_begin may claim the trial
 *   TRIAL(slot), now < until   HALF_OPEN, the trial is under way in slot;
 *                          until is a lease: a trial that never ends (its
 *                          worker died unnoticed) is claimable again after it
 */
#include <errno.h>
#include <fcntl.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "health.h"
#include "log.h"

#define HEALTH_MAGIC 0x48584d55504d5453ULL   /* "SMTPMUXH" little-endian */
#define HEALTH_KEY_MAX 160
#define HEALTH_NAME_MAX 64
#define HEALTH_ERROR_MAX 160
#define HEALTH_EMAIL_MAX 256
/* A trial attempt not ended by then is presumed lost (longer than any
 * delivery the upstream timeouts allow in practice). */
#define HEALTH_TRIAL_LEASE 900

enum { WIN_MINUTE, WIN_HOUR, WIN_DAY, WIN_COUNT };
static const unsigned window_seconds[WIN_COUNT] = { 60, 3600, 86400 };

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2 && ATOMIC_LONG_LOCK_FREE == 2,
    "64-bit atomics must be lock-free to live in shared memory");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2 && ATOMIC_SHORT_LOCK_FREE == 2 &&
    ATOMIC_CHAR_LOCK_FREE == 2, "small atomics must be lock-free");
_Static_assert(HEALTH_MAX_WORKER_SLOTS <= 128, "slot must fit the circuit's mode byte");

struct health_hdr {
	alignas(64) uint64_t magic;
	uint32_t layout_version;
	uint32_t header_size;
	uint32_t rec_size;
	uint32_t user_size;
	uint32_t max_recs;
	uint32_t max_users;
	uint32_t worker_slots;
	uint64_t segment_size;
	_Atomic uint32_t n_recs;
	_Atomic uint32_t n_users;
	_Atomic uint32_t generation;
};

struct health_rec {
	alignas(64) char key[HEALTH_KEY_MAX];
	_Atomic unsigned char name[HEALTH_NAME_MAX];
	_Atomic uint32_t generation;
	_Atomic uint32_t weight;
	_Atomic uint32_t limit[WIN_COUNT];
	_Atomic uint64_t circuit;
	_Atomic int64_t throttled_until;
	_Atomic uint32_t consecutive_failures;
	_Atomic uint32_t latency_ms;
	_Atomic uint64_t attempts;
	_Atomic uint64_t successes;
	_Atomic uint64_t failures;
	_Atomic uint64_t window[WIN_COUNT];
	_Atomic uint64_t error_seq;
	_Atomic int64_t error_time;
	_Atomic unsigned char error[HEALTH_ERROR_MAX];
	_Atomic uint16_t in_flight[HEALTH_MAX_WORKER_SLOTS];
};

struct health_user {
	alignas(64) char email[HEALTH_EMAIL_MAX];
	_Atomic uint64_t seq;
};

struct health {
	struct health_hdr hdr;
	struct health_rec rec[HEALTH_MAX_DOWNSTREAMS];
	struct health_user user[HEALTH_MAX_USERS];
};

_Static_assert(sizeof(struct health_hdr) == 64, "header is one cache line");
_Static_assert(alignof(struct health_rec) == 64 && sizeof(struct health_rec) == 768,
    "downstream record: 12 cache lines");
_Static_assert(alignof(struct health_user) == 64 && sizeof(struct health_user) == 320,
    "user record: 5 cache lines");
_Static_assert(sizeof(struct health) == 64 + HEALTH_MAX_DOWNSTREAMS * 768 +
    HEALTH_MAX_USERS * 320, "segment layout as documented");

/* --- the circuit word */

enum circuit_mode { CIRCUIT_CLOSED = 0, CIRCUIT_OPEN = 1, CIRCUIT_TRIAL = 0x80 };
#define COOLDOWN_MAX 0xffffffu

static uint64_t
circuit_pack(unsigned mode, uint32_t cooldown, uint32_t until)
{
	if (cooldown > COOLDOWN_MAX)
		cooldown = COOLDOWN_MAX;
	return (uint64_t)mode << 56 | (uint64_t)cooldown << 32 | until;
}

static unsigned
circuit_mode(uint64_t c)
{
	unsigned mode = (unsigned)(c >> 56);

	return mode & CIRCUIT_TRIAL ? CIRCUIT_TRIAL : mode;
}

static unsigned
circuit_slot(uint64_t c)
{
	return (unsigned)(c >> 56) & 0x7f;
}

static uint32_t
circuit_cooldown(uint64_t c)
{
	return (uint32_t)(c >> 32) & COOLDOWN_MAX;
}

static uint32_t
circuit_until(uint64_t c)
{
	return (uint32_t)c;
}

/* Seconds since the epoch as the circuit stores them (until 2106). */
static uint32_t
secs32(time_t t)
{
	if (t <= 0)
		return 0;
	if ((uint64_t)t >= UINT32_MAX)
		return UINT32_MAX;
	return (uint32_t)t;
}

static uint32_t
secs32_add(time_t t, uint32_t d)
{
	uint64_t v = (uint64_t)secs32(t) + d;

	return v >= UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

/* A half-open circuit whose trial may be claimed now. */
static bool
circuit_claimable(uint64_t c, time_t now)
{
	unsigned mode = circuit_mode(c);

	return (mode == CIRCUIT_OPEN || mode == CIRCUIT_TRIAL) && secs32(now) >= circuit_until(c);
}

static uint32_t
cooldown_doubled(uint32_t cd, const struct health_cfg *hc)
{
	uint64_t next = cd ? (uint64_t)cd * 2 : 1;
	uint32_t cap = hc->max_cooldown > hc->cooldown ? hc->max_cooldown : hc->cooldown;

	return next > cap ? cap : (uint32_t)next;
}

/* Opens a closed circuit once enough consecutive failures have been seen. */
static void
circuit_trip(struct health_rec *r, const struct health_cfg *hc, uint32_t failures, time_t now)
{
	uint64_t closed = 0;

	if (hc->fail_threshold == 0 || failures < hc->fail_threshold)
		return;
	atomic_compare_exchange_strong(&r->circuit, &closed,
	    circuit_pack(CIRCUIT_OPEN, hc->cooldown, secs32_add(now, hc->cooldown)));
}

/* A half-open circuit's trial failed: open again for twice as long. */
static void
circuit_retrip(struct health_rec *r, const struct health_cfg *hc, uint64_t seen, time_t now)
{
	uint32_t cd = cooldown_doubled(circuit_cooldown(seen), hc);

	atomic_compare_exchange_strong(&r->circuit, &seen,
	    circuit_pack(CIRCUIT_OPEN, cd, secs32_add(now, cd)));
}

/* Loads first: every success passes here, and a store would bounce the
 * cache line between the workers for nothing. */
static void
circuit_close(struct health_rec *r)
{
	if (atomic_load(&r->circuit) != 0)
		atomic_store(&r->circuit, 0);
	if (atomic_load(&r->consecutive_failures) != 0)
		atomic_store(&r->consecutive_failures, 0);
}

/*
 * Claims the right to try the downstream now: always granted when the
 * circuit is closed, granted once (the trial) when it is half-open.
 */
static bool
circuit_enter(struct health_rec *r, unsigned slot, time_t now, bool *trial, uint64_t *claimed)
{
	uint64_t c = atomic_load(&r->circuit);

	*trial = false;
	for (;;) {
		if (circuit_mode(c) == CIRCUIT_CLOSED)
			return true;
		if (!circuit_claimable(c, now))
			return false;
		uint64_t mine = circuit_pack(CIRCUIT_TRIAL | slot, circuit_cooldown(c),
		    secs32_add(now, HEALTH_TRIAL_LEASE));
		if (atomic_compare_exchange_weak(&r->circuit, &c, mine)) {
			*trial = true;
			*claimed = mine;
			return true;
		}
	}
}

/* Gives an unused trial back: the circuit is half-open and claimable again. */
static void
circuit_unclaim(struct health_rec *r, uint64_t claimed)
{
	atomic_compare_exchange_strong(&r->circuit, &claimed,
	    circuit_pack(CIRCUIT_OPEN, circuit_cooldown(claimed), 0));
}

static bool
circuit_is_trial_of(uint64_t c, unsigned slot)
{
	return circuit_mode(c) == CIRCUIT_TRIAL && circuit_slot(c) == slot;
}

/* --- quota windows: index(32) | count(32), one CAS per change */

static uint32_t
window_index(time_t now, int w)
{
	return secs32(now) / window_seconds[w];
}

/* The count of window idx as seen in word v (0 once the window rolled). */
static uint32_t
window_count(uint64_t v, uint32_t idx)
{
	return (uint32_t)(v >> 32) >= idx ? (uint32_t)v : 0;
}

/*
 * Takes one message from the window containing idx and tells which window
 * it charged: a stored window newer than idx (another process's clock is a
 * second ahead) is used as is, since a window that moved backwards would
 * have its count reset twice. False when the window is full.
 */
static bool
window_reserve(_Atomic uint64_t *w, uint32_t idx, uint32_t limit, uint32_t *charged)
{
	uint64_t v = atomic_load(w);

	for (;;) {
		uint32_t at = (uint32_t)(v >> 32), count = (uint32_t)v;

		if (at < idx) {
			at = idx;
			count = 0;
		}
		if (count >= limit)
			return false;
		if (atomic_compare_exchange_weak(w, &v, (uint64_t)at << 32 | (count + 1))) {
			*charged = at;
			return true;
		}
	}
}

/* Gives one message back to window idx, unless that window has passed. */
static void
window_release(_Atomic uint64_t *w, uint32_t idx)
{
	uint64_t v = atomic_load(w);

	while ((uint32_t)(v >> 32) == idx && (uint32_t)v > 0)
		if (atomic_compare_exchange_weak(w, &v, v - 1))
			return;
}

static void
ds_limits(const struct downstream_cfg *ds, uint32_t limit[WIN_COUNT])
{
	limit[WIN_MINUTE] = ds->max_per_minute;
	limit[WIN_HOUR] = ds->max_per_hour;
	limit[WIN_DAY] = ds->max_per_day;
}

/* Unlimited windows are counted too, for the status output. */
static bool
quota_reserve(struct health_rec *r, const struct downstream_cfg *ds, time_t now)
{
	uint32_t limit[WIN_COUNT], got[WIN_COUNT];
	int w;

	ds_limits(ds, limit);
	for (w = 0; w < WIN_COUNT; w++)
		if (!window_reserve(&r->window[w], window_index(now, w),
		    limit[w] ? limit[w] : UINT32_MAX, &got[w]))
			break;
	if (w == WIN_COUNT)
		return true;
	while (w-- > 0)
		window_release(&r->window[w], got[w]);
	return false;
}

static void
quota_release(struct health_rec *r, time_t begun)
{
	for (int w = 0; w < WIN_COUNT; w++)
		window_release(&r->window[w], window_index(begun, w));
}

/* --- small helpers */

static unsigned
slot_clamp(unsigned slot)
{
	return slot < HEALTH_MAX_WORKER_SLOTS ? slot : HEALTH_MAX_WORKER_SLOTS - 1;
}

/* Byte-wise atomic text: a concurrent reader may see a mix of two texts,
 * never an unterminated one. */
static void
atext_store(_Atomic unsigned char *dst, size_t size, const char *src)
{
	size_t i = 0;

	for (; src != NULL && src[i] != '\0' && i + 1 < size; i++)
		atomic_store_explicit(&dst[i], (unsigned char)src[i], memory_order_relaxed);
	atomic_store_explicit(&dst[i], 0, memory_order_relaxed);
}

static void
atext_load(char *dst, size_t dstlen, const _Atomic unsigned char *src, size_t size)
{
	size_t i, n = dstlen < size ? dstlen : size;

	if (n == 0)
		return;
	for (i = 0; i + 1 < n; i++) {
		dst[i] = (char)atomic_load_explicit(&src[i], memory_order_relaxed);
		if (dst[i] == '\0')
			return;
	}
	dst[i] = '\0';
}

static void
error_record(struct health_rec *r, time_t now, const char *error)
{
	char clean[HEALTH_ERROR_MAX];

	log_sanitize(clean, sizeof(clean), error, strlen(error));
	atext_store(r->error, sizeof(r->error), clean);
	atomic_store(&r->error_time, (int64_t)now);
	atomic_fetch_add_explicit(&r->error_seq, 1, memory_order_release);
}

/* Retries a read torn by a concurrent writer a few times, then accepts it. */
static void
error_read(const struct health_rec *r, char *dst, size_t dstlen, time_t *when)
{
	for (int tries = 0; tries < 4; tries++) {
		uint64_t seq = atomic_load_explicit(&r->error_seq, memory_order_acquire);

		atext_load(dst, dstlen, r->error, sizeof(r->error));
		*when = (time_t)atomic_load(&r->error_time);
		atomic_thread_fence(memory_order_acquire);
		if (atomic_load_explicit(&r->error_seq, memory_order_relaxed) == seq)
			return;
	}
}

static void
latency_update(struct health_rec *r, unsigned sample)
{
	uint32_t v = atomic_load(&r->latency_ms), next;

	do {
		next = v == 0 ? sample : (uint32_t)(((uint64_t)v * 7 + sample) / 8);
		if (next == 0)
			next = 1;        /* 0 means "no sample yet" */
	} while (!atomic_compare_exchange_weak(&r->latency_ms, &v, next));
}

static void
throttle_until(struct health_rec *r, time_t until)
{
	int64_t v = atomic_load(&r->throttled_until);

	while (v < (int64_t)until &&
	    !atomic_compare_exchange_weak(&r->throttled_until, &v, (int64_t)until))
		;
}

static void
in_flight_end(struct health_rec *r, unsigned slot)
{
	uint16_t v = atomic_load(&r->in_flight[slot]);

	/* health_worker_gone may have zeroed it: never wrap below zero */
	while (v > 0 && !atomic_compare_exchange_weak(&r->in_flight[slot], &v, v - 1))
		;
}

/* --- the segment file */

static void
segment_init(struct health *h)
{
	memset(h, 0, sizeof(*h));
	h->hdr.layout_version = HEALTH_LAYOUT_VERSION;
	h->hdr.header_size = sizeof(struct health_hdr);
	h->hdr.rec_size = sizeof(struct health_rec);
	h->hdr.user_size = sizeof(struct health_user);
	h->hdr.max_recs = HEALTH_MAX_DOWNSTREAMS;
	h->hdr.max_users = HEALTH_MAX_USERS;
	h->hdr.worker_slots = HEALTH_MAX_WORKER_SLOTS;
	h->hdr.segment_size = sizeof(struct health);
	/* last: a file half-initialised by a crash is rejected next time */
	atomic_thread_fence(memory_order_seq_cst);
	h->hdr.magic = HEALTH_MAGIC;
}

static bool
segment_valid(const struct health *h)
{
	return h->hdr.magic == HEALTH_MAGIC &&
	    h->hdr.layout_version == HEALTH_LAYOUT_VERSION &&
	    h->hdr.header_size == sizeof(struct health_hdr) &&
	    h->hdr.rec_size == sizeof(struct health_rec) &&
	    h->hdr.user_size == sizeof(struct health_user) &&
	    h->hdr.max_recs == HEALTH_MAX_DOWNSTREAMS &&
	    h->hdr.max_users == HEALTH_MAX_USERS &&
	    h->hdr.worker_slots == HEALTH_MAX_WORKER_SLOTS &&
	    h->hdr.segment_size == sizeof(struct health) &&
	    atomic_load(&h->hdr.n_recs) <= HEALTH_MAX_DOWNSTREAMS &&
	    atomic_load(&h->hdr.n_users) <= HEALTH_MAX_USERS;
}

/*
 * A segment left by an earlier run: no process of that run is alive any
 * more, so nothing is in flight and no trial is under way.
 */
static void
segment_adopt(struct health *h)
{
	uint32_t n = atomic_load(&h->hdr.n_recs);

	for (uint32_t i = 0; i < n; i++) {
		struct health_rec *r = &h->rec[i];
		uint64_t c = atomic_load(&r->circuit);

		r->key[sizeof(r->key) - 1] = '\0';
		for (unsigned s = 0; s < HEALTH_MAX_WORKER_SLOTS; s++)
			atomic_store(&r->in_flight[s], 0);
		if (circuit_mode(c) == CIRCUIT_TRIAL)
			atomic_store(&r->circuit, circuit_pack(CIRCUIT_OPEN, circuit_cooldown(c), 0));
	}
	for (uint32_t i = 0; i < atomic_load(&h->hdr.n_users); i++)
		h->user[i].email[sizeof(h->user[i].email) - 1] = '\0';
}

static struct health *
segment_map(int fd, int prot)
{
	void *p = mmap(NULL, sizeof(struct health), prot, MAP_SHARED, fd, 0);

	return p == MAP_FAILED ? NULL : p;
}

struct health *
health_create(const char *path)
{
	struct health *h;
	struct stat st;
	bool reuse;
	int fd, saved;

	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
	if (fd < 0)
		return NULL;
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		if (errno == EWOULDBLOCK)
			errno = EBUSY;
		goto fail;
	}
	if (fstat(fd, &st) < 0)
		goto fail;
	reuse = S_ISREG(st.st_mode) && st.st_size == (off_t)sizeof(struct health);
	if (!reuse && (ftruncate(fd, 0) < 0 || ftruncate(fd, sizeof(struct health)) < 0))
		goto fail;
	if ((h = segment_map(fd, PROT_READ | PROT_WRITE)) == NULL)
		goto fail;
	close(fd);                           /* the mapping keeps the file, and its lock */
	if (reuse && segment_valid(h))
		segment_adopt(h);
	else
		segment_init(h);
	return h;
fail:
	saved = errno;
	close(fd);
	errno = saved;
	return NULL;
}

struct health *
health_open_readonly(const char *path)
{
	struct health *h;
	struct stat st;
	int fd, saved;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) < 0)
		goto fail;
	if (st.st_size != (off_t)sizeof(struct health)) {
		errno = EPROTO;
		goto fail;
	}
	if ((h = segment_map(fd, PROT_READ)) == NULL)
		goto fail;
	close(fd);
	if (!segment_valid(h)) {
		munmap(h, sizeof(*h));
		errno = EPROTO;
		return NULL;
	}
	return h;
fail:
	saved = errno;
	close(fd);
	errno = saved;
	return NULL;
}

void
health_destroy(struct health *h)
{
	if (h != NULL)
		munmap(h, sizeof(*h));
}

/* --- binding a configuration */

static struct health_rec *
rec_find_or_add(struct health *h, const char *key)
{
	uint32_t n = atomic_load_explicit(&h->hdr.n_recs, memory_order_acquire);
	struct health_rec *r;

	for (uint32_t i = 0; i < n; i++)
		if (strcmp(h->rec[i].key, key) == 0)
			return &h->rec[i];
	if (n == HEALTH_MAX_DOWNSTREAMS)
		return NULL;
	r = &h->rec[n];
	memset(r, 0, sizeof(*r));
	snprintf(r->key, sizeof(r->key), "%s", key);
	atomic_store_explicit(&h->hdr.n_recs, n + 1, memory_order_release);
	return r;
}

static struct health_user *
user_find_or_add(struct health *h, const char *email)
{
	uint32_t n = atomic_load_explicit(&h->hdr.n_users, memory_order_acquire);
	struct health_user *u;

	for (uint32_t i = 0; i < n; i++)
		if (strcasecmp(h->user[i].email, email) == 0)
			return &h->user[i];
	if (n == HEALTH_MAX_USERS)
		return NULL;
	u = &h->user[n];
	memset(u, 0, sizeof(*u));
	for (size_t i = 0; email[i] != '\0'; i++)
		u->email[i] = (char)((email[i] >= 'A' && email[i] <= 'Z') ? email[i] + 32 : email[i]);
	atomic_store_explicit(&h->hdr.n_users, n + 1, memory_order_release);
	return u;
}

static void
rec_configure(struct health_rec *r, const struct downstream_cfg *ds, uint32_t gen)
{
	uint32_t limit[WIN_COUNT];

	ds_limits(ds, limit);
	atext_store(r->name, sizeof(r->name), ds->name ? ds->name : ds->addr);
	atomic_store(&r->weight, ds->weight);
	for (int w = 0; w < WIN_COUNT; w++)
		atomic_store(&r->limit[w], limit[w]);
	atomic_store(&r->generation, gen);
}

static int
bind_downstream(struct health *h, struct downstream_cfg *ds, uint32_t gen,
    size_t ui, size_t di, char *err, size_t errlen)
{
	char key[HEALTH_KEY_MAX];
	bool auth = ds->user != NULL && ds->user[0] != '\0';
	int len;

	len = snprintf(key, sizeof(key), "%s%s%s", ds->addr ? ds->addr : "",
	    auth ? " " : "", auth ? ds->user : "");
	if (len < 0 || (size_t)len >= sizeof(key)) {
		snprintf(err, errlen, "users[%zu].downstreams[%zu]: addr and user longer than "
		    "%zu characters", ui, di, sizeof(key) - 2);
		return -1;
	}
	if ((ds->health = rec_find_or_add(h, key)) == NULL) {
		snprintf(err, errlen, "users[%zu].downstreams[%zu]: more than %d distinct "
		    "downstreams in the state file; remove it and restart",
		    ui, di, HEALTH_MAX_DOWNSTREAMS);
		return -1;
	}
	rec_configure(ds->health, ds, gen);
	return 0;
}

int
health_bind(struct health *h, struct config *cfg, char *err, size_t errlen)
{
	uint32_t gen = atomic_fetch_add(&h->hdr.generation, 1) + 1;

	for (size_t i = 0; i < cfg->n_users; i++) {
		struct user_cfg *u = &cfg->users[i];

		if (u->email == NULL || strlen(u->email) >= HEALTH_EMAIL_MAX) {
			snprintf(err, errlen, "users[%zu].email: missing or longer than %d "
			    "characters", i, HEALTH_EMAIL_MAX - 1);
			return -1;
		}
		if ((u->health = user_find_or_add(h, u->email)) == NULL) {
			snprintf(err, errlen, "users[%zu]: more than %d distinct users in the "
			    "state file; remove it and restart", i, HEALTH_MAX_USERS);
			return -1;
		}
		for (size_t j = 0; j < u->n_downstreams; j++)
			if (bind_downstream(h, &u->downstreams[j], gen, i, j, err, errlen) < 0)
				return -1;
	}
	return 0;
}

uint64_t
health_user_next(struct health_user *u)
{
	return atomic_fetch_add(&u->seq, 1);
}

/* --- views */

static uint32_t
state_at(const struct health_rec *r, time_t now, bool *trial_taken)
{
	uint64_t c = atomic_load(&r->circuit);

	*trial_taken = false;
	switch (circuit_mode(c)) {
	case CIRCUIT_OPEN:
		return secs32(now) < circuit_until(c) ? SMTPMUX_DS_DOWN : SMTPMUX_DS_HALF_OPEN;
	case CIRCUIT_TRIAL:
		*trial_taken = secs32(now) < circuit_until(c);
		return SMTPMUX_DS_HALF_OPEN;
	default:
		return atomic_load(&r->throttled_until) > (int64_t)now ?
		    SMTPMUX_DS_THROTTLED : SMTPMUX_DS_UP;
	}
}

static void
quota_view(const struct health_rec *r, const uint32_t limit[WIN_COUNT], time_t now,
    struct smtpmux_downstream_view *out)
{
	out->quota_left = -1;
	out->quota_limit = 0;
	for (int w = 0; w < WIN_COUNT; w++) {
		uint32_t used = window_count(atomic_load(&r->window[w]), window_index(now, w));
		int64_t left;

		if (limit[w] == 0)
			continue;
		left = used >= limit[w] ? 0 : (int64_t)limit[w] - used;
		if (left > INT32_MAX)
			left = INT32_MAX;
		if (out->quota_left < 0 || left < out->quota_left) {
			out->quota_left = (int32_t)left;
			out->quota_limit = limit[w];
		}
	}
}

static uint32_t
in_flight_sum(const struct health_rec *r)
{
	uint32_t sum = 0;

	for (unsigned s = 0; s < HEALTH_MAX_WORKER_SLOTS; s++)
		sum += atomic_load_explicit(&r->in_flight[s], memory_order_relaxed);
	return sum;
}

void
health_view(const struct health_rec *r, const struct downstream_cfg *ds,
    const struct health_cfg *hc, time_t now, struct smtpmux_downstream_view *out)
{
	uint32_t limit[WIN_COUNT];
	bool trial_taken;

	(void)hc;
	memset(out, 0, sizeof(*out));
	ds_limits(ds, limit);
	out->name = ds->name ? ds->name : ds->addr;
	out->addr = ds->addr;
	out->weight = ds->weight;
	out->state = state_at(r, now, &trial_taken);
	out->consecutive_failures = atomic_load(&r->consecutive_failures);
	out->in_flight = in_flight_sum(r);
	out->latency_ms = atomic_load(&r->latency_ms);
	quota_view(r, limit, now, out);
	out->available = out->state != SMTPMUX_DS_DOWN && !trial_taken &&
	    atomic_load(&r->throttled_until) <= (int64_t)now && out->quota_left != 0;
	out->attempts = atomic_load(&r->attempts);
	out->successes = atomic_load(&r->successes);
	out->failures = atomic_load(&r->failures);
}

const char *
health_state_name(uint32_t state)
{
	switch (state) {
	case SMTPMUX_DS_UP: return "up";
	case SMTPMUX_DS_DOWN: return "down";
	case SMTPMUX_DS_HALF_OPEN: return "half-open";
	case SMTPMUX_DS_THROTTLED: return "throttled";
	default: return "unknown";
	}
}

/* --- attempts */

/* gated: the circuit and the throttle may refuse; the quota always may. */
static bool
begin(struct health_rec *r, const struct downstream_cfg *ds, unsigned worker_slot,
    time_t now, bool gated)
{
	unsigned slot = slot_clamp(worker_slot);
	uint64_t claimed = 0;
	bool trial;

	if (gated && atomic_load(&r->throttled_until) > (int64_t)now)
		return false;
	if (!circuit_enter(r, slot, now, &trial, &claimed) && gated)
		return false;
	if (!quota_reserve(r, ds, now)) {
		if (trial)
			circuit_unclaim(r, claimed);
		return false;
	}
	atomic_fetch_add(&r->in_flight[slot], 1);
	return true;
}

bool
health_begin(struct health_rec *r, const struct downstream_cfg *ds,
    unsigned worker_slot, time_t now)
{
	return begin(r, ds, worker_slot, now, true);
}

bool
health_begin_last_resort(struct health_rec *r, const struct downstream_cfg *ds,
    unsigned worker_slot, time_t now)
{
	return begin(r, ds, worker_slot, now, false);
}

static void
end_ok(struct health_rec *r, unsigned latency_ms)
{
	atomic_fetch_add(&r->successes, 1);
	latency_update(r, latency_ms);
	/* any delivery that went through proves the downstream works */
	circuit_close(r);
}

static void
end_fail(struct health_rec *r, const struct health_cfg *hc, unsigned slot, time_t now)
{
	uint32_t failures = atomic_fetch_add(&r->consecutive_failures, 1) + 1;
	uint64_t c = atomic_load(&r->circuit);

	atomic_fetch_add(&r->failures, 1);
	if (circuit_is_trial_of(c, slot))
		circuit_retrip(r, hc, c, now);
	else if (circuit_mode(c) == CIRCUIT_CLOSED)
		circuit_trip(r, hc, failures, now);
	/* an attempt begun before the circuit opened changes nothing more */
}

/* A rate-limit reply is not a failure of the downstream: the circuit
 * ignores it (a trial that gets one shows the server alive). */
static void
end_throttled(struct health_rec *r, const struct health_cfg *hc, unsigned slot, time_t now)
{
	uint64_t c = atomic_load(&r->circuit);

	atomic_fetch_add(&r->failures, 1);
	throttle_until(r, now + (time_t)hc->throttle_backoff);
	if (circuit_is_trial_of(c, slot) && atomic_compare_exchange_strong(&r->circuit, &c, 0))
		atomic_store(&r->consecutive_failures, 0);
}

/* No verdict: a trial that was cancelled leaves the circuit half-open. */
static void
end_cancelled(struct health_rec *r, unsigned slot)
{
	uint64_t c = atomic_load(&r->circuit);

	if (circuit_is_trial_of(c, slot))
		circuit_unclaim(r, c);
}

void
health_end_since(struct health_rec *r, const struct downstream_cfg *ds,
    const struct health_cfg *hc, unsigned worker_slot, time_t begun, time_t now,
    enum health_outcome outcome, unsigned latency_ms, const char *error)
{
	unsigned slot = slot_clamp(worker_slot);

	(void)ds;
	if (outcome != HEALTH_CANCELLED)
		atomic_fetch_add(&r->attempts, 1);
	switch (outcome) {
	case HEALTH_OK:
		end_ok(r, latency_ms);
		break;
	case HEALTH_FAIL:
		quota_release(r, begun);
		error_record(r, now, error ? error : "failed");
		end_fail(r, hc, slot, now);
		break;
	case HEALTH_THROTTLED:
		quota_release(r, begun);
		error_record(r, now, error ? error : "throttled");
		end_throttled(r, hc, slot, now);
		break;
	case HEALTH_CANCELLED:
		quota_release(r, begun);
		end_cancelled(r, slot);
		break;
	}
	in_flight_end(r, slot);
}

void
health_end(struct health_rec *r, const struct downstream_cfg *ds,
    const struct health_cfg *hc, unsigned worker_slot, time_t now,
    enum health_outcome outcome, unsigned latency_ms, const char *error)
{
	health_end_since(r, ds, hc, worker_slot, now, now, outcome, latency_ms, error);
}

void
health_probe_result(struct health_rec *r, const struct downstream_cfg *ds,
    const struct health_cfg *hc, time_t now, bool ok, unsigned latency_ms,
    const char *error)
{
	uint64_t c;
	uint32_t failures;

	(void)ds;
	if (ok) {
		latency_update(r, latency_ms);
		circuit_close(r);
		return;
	}
	error_record(r, now, error ? error : "probe failed");
	failures = atomic_fetch_add(&r->consecutive_failures, 1) + 1;
	c = atomic_load(&r->circuit);
	if (circuit_mode(c) == CIRCUIT_CLOSED)
		circuit_trip(r, hc, failures, now);
	else if (circuit_mode(c) == CIRCUIT_OPEN && circuit_claimable(c, now))
		circuit_retrip(r, hc, c, now);   /* the probe was the half-open trial */
}

void
health_worker_gone(struct health *h, unsigned worker_slot)
{
	unsigned slot = slot_clamp(worker_slot);
	uint32_t n = atomic_load_explicit(&h->hdr.n_recs, memory_order_acquire);

	for (uint32_t i = 0; i < n; i++) {
		struct health_rec *r = &h->rec[i];
		uint64_t c = atomic_load(&r->circuit);

		atomic_store(&r->in_flight[slot], 0);
		if (circuit_is_trial_of(c, slot))
			circuit_unclaim(r, c);
	}
}

/* --- status readers */

size_t
health_count(const struct health *h)
{
	return atomic_load_explicit(&h->hdr.n_recs, memory_order_acquire);
}

int
health_snapshot(const struct health *h, size_t index, const struct health_cfg *hc,
    time_t now, struct health_snapshot *out)
{
	const struct health_rec *r;
	struct downstream_cfg ds;

	if (index >= health_count(h))
		return -1;
	r = &h->rec[index];
	memset(out, 0, sizeof(*out));
	snprintf(out->key, sizeof(out->key), "%.*s", (int)sizeof(r->key) - 1, r->key);
	snprintf(out->addr, sizeof(out->addr), "%.*s", (int)strcspn(out->key, " "), out->key);
	atext_load(out->name, sizeof(out->name), r->name, sizeof(r->name));
	memset(&ds, 0, sizeof(ds));
	ds.name = out->name;
	ds.addr = out->addr;
	ds.weight = atomic_load(&r->weight);
	ds.max_per_minute = out->limit_minute = atomic_load(&r->limit[WIN_MINUTE]);
	ds.max_per_hour = out->limit_hour = atomic_load(&r->limit[WIN_HOUR]);
	ds.max_per_day = out->limit_day = atomic_load(&r->limit[WIN_DAY]);
	health_view(r, &ds, hc, now, &out->view);
	out->sent_minute = window_count(atomic_load(&r->window[WIN_MINUTE]), window_index(now, WIN_MINUTE));
	out->sent_hour = window_count(atomic_load(&r->window[WIN_HOUR]), window_index(now, WIN_HOUR));
	out->sent_day = window_count(atomic_load(&r->window[WIN_DAY]), window_index(now, WIN_DAY));
	error_read(r, out->last_error, sizeof(out->last_error), &out->last_error_time);
	return atomic_load(&r->generation) == atomic_load(&h->hdr.generation) ? 0 : 1;
}

int
health_snapshot_of(const struct health *h, const struct health_rec *rec,
    const struct health_cfg *hc, time_t now, struct health_snapshot *out)
{
	if (rec < h->rec || rec >= h->rec + HEALTH_MAX_DOWNSTREAMS)
		return -1;
	return health_snapshot(h, (size_t)(rec - h->rec), hc, now, out);
}

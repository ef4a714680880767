/* SPDX-License-Identifier: MIT */
/*
 * Quota windows: exact across processes, rolling or calendar.
 *
 * A window with a limit of N messages owns N cells in the live segment's
 * pool (the control segment says where). A cell is one 64-bit word:
 *
 *   time(32) | slot(7) | pending(1) | frozen(1)
 *
 *   0                      free
 *   time, pending, slot    reserved at `time` by an attempt of worker slot
 *                          `slot`, still under way: it counts, whatever its age
 *   time                   a message sent (the attempt ended) at `time`: it
 *                          counts while `time` is within the window
 *   frozen                 left behind by a resize (quota_configure): counts,
 *                          can never be taken again
 *
 * A reservation takes one cell that does not count any more with a single
 * CAS, so N cells can never hold more than N messages of one window: rolling,
 * a cell counts for 60 s / 1 h / 24 h after its time, so no 60 s / 1 h / 24 h
 * period ever sees more than N messages; calendar, it counts until its UTC
 * minute / hour / day is over. Ending an attempt finds its cell again by
 * value (its begin time and slot): a delivery stamps it with the time it
 * ended (which is never before the provider counted it), a failure frees
 * it. The master frees the pending cells of a worker that died
 * (quota_release_slot), so a killed worker leaks nothing.
 *
 * Cost: 8 bytes of shared memory per message a window allows, and a scan of
 * the window's cells that usually stops at the first one tried (the hint)
 * but is O(limit) when the window is full, when a status reader counts it,
 * and for each view a selector gets. Windows without a limit have no cells;
 * their `sent` word only counts deliveries per UTC window, for status.
 */
#include <stdlib.h>
#include <string.h>

#include "health_layout.h"

const uint32_t health_window_seconds[WIN_COUNT] = { 60, 3600, 86400 };

#define CELL_TIME 0xffffffffULL
#define CELL_SLOT_SHIFT 32
#define CELL_SLOT_MASK 0x7fULL
#define CELL_PENDING (1ULL << 39)
#define CELL_FROZEN (1ULL << 40)
#define DESC_CALENDAR (1ULL << 31)
#define DESC_CAPACITY 0x7fffffffULL

_Static_assert(HEALTH_MAX_WORKER_SLOTS <= CELL_SLOT_MASK + 1, "slot must fit a cell");

uint64_t
quota_pack(struct window_desc q)
{
	return (uint64_t)q.offset << 32 | (q.calendar ? DESC_CALENDAR : 0) |
	    (q.capacity & DESC_CAPACITY);
}

struct window_desc
quota_unpack(uint64_t word, bool *bad)
{
	struct window_desc q = {
		.offset = (uint32_t)(word >> 32),
		.capacity = (uint32_t)(word & DESC_CAPACITY),
		.calendar = (word & DESC_CALENDAR) != 0,
	};

	if ((uint64_t)q.offset + q.capacity > HEALTH_POOL_CELLS) {
		q.capacity = 0;
		if (bad != NULL)
			*bad = true;
	}
	return q;
}

static struct window_desc
window_of(const struct health *h, uint32_t i, int w, bool *bad)
{
	return quota_unpack(atomic_load(&h->ro->meta[i].quota[w]), bad);
}

static uint64_t
cell_pending(uint32_t t, unsigned slot)
{
	return t | (uint64_t)(slot & CELL_SLOT_MASK) << CELL_SLOT_SHIFT | CELL_PENDING;
}

static bool
cell_is_pending_of(uint64_t c, unsigned slot)
{
	return (c & (CELL_PENDING | CELL_FROZEN)) == CELL_PENDING &&
	    ((c >> CELL_SLOT_SHIFT) & CELL_SLOT_MASK) == slot;
}

/* The cell no longer counts at now: it may be taken. */
static bool
cell_free(uint64_t c, uint32_t now, uint32_t span, bool calendar)
{
	uint32_t t = (uint32_t)(c & CELL_TIME);

	if (c & (CELL_PENDING | CELL_FROZEN))
		return false;
	if (t == 0)
		return true;
	return calendar ? t / span < now / span : (uint64_t)t + span <= now;
}

static _Atomic uint64_t *
cells_of(const struct health *h, struct window_desc q)
{
	return &h->live->cells[q.offset];
}

/* Index j of q's cells stepped by delta, wrapping. */
static uint32_t
cell_step(uint32_t j, int64_t delta, uint32_t capacity)
{
	int64_t k = ((int64_t)j + delta) % (int64_t)capacity;

	return (uint32_t)(k < 0 ? k + capacity : k);
}

/* Takes a cell of q for `mine`; its index, or -1 when the window is full. */
static int64_t
cell_take(struct health *h, struct live_rec *L, int w, struct window_desc q,
    uint64_t mine, uint32_t now)
{
	_Atomic uint64_t *c = cells_of(h, q);
	uint32_t start = atomic_load_explicit(&L->hint[w], memory_order_relaxed) % q.capacity;

	for (uint32_t k = 0; k < q.capacity; k++) {
		uint32_t j = cell_step(start, k, q.capacity);
		uint64_t v = atomic_load_explicit(&c[j], memory_order_relaxed);

		while (cell_free(v, now, health_window_seconds[w], q.calendar))
			if (atomic_compare_exchange_weak(&c[j], &v, mine)) {
				atomic_store_explicit(&L->hint[w], cell_step(j, 1, q.capacity),
				    memory_order_relaxed);
				return j;
			}
	}
	return -1;
}

bool
quota_reserve(struct health *h, const struct health_rec *r, unsigned slot, time_t now)
{
	uint64_t mine = cell_pending(secs32(now), slot);
	struct window_desc q[WIN_COUNT];
	int64_t got[WIN_COUNT];
	bool bad = false;
	int w;

	for (w = 0; w < WIN_COUNT; w++)
		q[w] = window_of(h, r->i, w, &bad);
	if (bad)
		return false;            /* never "unlimited" by mistake */
	for (w = 0; w < WIN_COUNT; w++) {
		got[w] = q[w].capacity ? cell_take(h, rec_live(r), w, q[w], mine, secs32(now)) : -1;
		if (q[w].capacity && got[w] < 0)
			break;
	}
	if (w == WIN_COUNT)
		return true;
	while (w-- > 0)
		if (got[w] >= 0) {
			uint64_t v = mine;

			atomic_compare_exchange_strong(&cells_of(h, q[w])[got[w]], &v, 0);
		}
	return false;
}

/*
 * The cell an attempt of slot begun at `begun` holds: the one with exactly
 * its value, searched backwards from the hint (recent reservations are just
 * before it); else (a caller that passes another time) this slot's pending
 * cell closest in time, which is as good: the count is the same.
 */
static int64_t
cell_find(const struct health *h, struct live_rec *L, int w, struct window_desc q,
    unsigned slot, uint32_t begun)
{
	_Atomic uint64_t *c = cells_of(h, q);
	uint32_t start = atomic_load_explicit(&L->hint[w], memory_order_relaxed) % q.capacity;
	uint64_t mine = cell_pending(begun, slot), best_dist = UINT64_MAX;
	int64_t best = -1;

	for (uint32_t k = 1; k <= q.capacity; k++) {
		uint32_t j = cell_step(start, -(int64_t)k, q.capacity);
		uint64_t v = atomic_load_explicit(&c[j], memory_order_relaxed);

		if (v == mine)
			return j;
		if (cell_is_pending_of(v, slot)) {
			uint32_t t = (uint32_t)(v & CELL_TIME);
			uint64_t dist = t > begun ? t - begun : begun - t;

			if (dist < best_dist) {
				best_dist = dist;
				best = j;
			}
		}
	}
	return best;
}

/*
 * Ends one window's reservation. A resize (quota_configure) may publish
 * new cells while this runs: it copies pending cells as they are and then
 * replays what happened to them in the old cells until it has published,
 * so doing the same again in the newer cells, whenever the window moved
 * meanwhile, leaves exactly one account of this attempt.
 */
static void
window_end(struct health *h, const struct health_rec *r, int w, unsigned slot,
    uint32_t begun, uint32_t now, bool delivered)
{
	uint64_t word = atomic_load(&h->ro->meta[r->i].quota[w]);

	for (int rounds = 0; rounds < 4; rounds++) {
		struct window_desc q = quota_unpack(word, NULL);
		uint64_t next;

		if (q.capacity > 0) {
			int64_t j = cell_find(h, rec_live(r), w, q, slot, begun);

			if (j >= 0) {
				_Atomic uint64_t *cell = &cells_of(h, q)[j];
				uint64_t v = atomic_load(cell);

				if (cell_is_pending_of(v, slot))
					atomic_compare_exchange_strong(cell, &v, delivered ? now : 0);
			}
		}
		next = atomic_load(&h->ro->meta[r->i].quota[w]);
		if (next == word)
			return;
		word = next;
	}
}

/* Deliveries per UTC window, kept for windows without a limit. */
static void
sent_count(_Atomic uint64_t *s, uint32_t idx)
{
	uint64_t v = atomic_load(s);

	for (;;) {
		uint64_t next = (uint32_t)(v >> 32) >= idx ? v + 1 : (uint64_t)idx << 32 | 1;

		if ((uint32_t)(v >> 32) > idx || atomic_compare_exchange_weak(s, &v, next))
			return;
	}
}

void
quota_end(struct health *h, const struct health_rec *r, unsigned slot, time_t begun,
    time_t now, bool delivered)
{
	struct live_rec *L = rec_live(r);
	uint32_t t = secs32(now);

	/* A clock that went back must not date the delivery before its
	 * reservation. */
	if (t < secs32(begun))
		t = secs32(begun);
	for (int w = 0; w < WIN_COUNT; w++) {
		window_end(h, r, w, slot, secs32(begun), t, delivered);
		if (delivered)
			sent_count(&L->sent[w], t / health_window_seconds[w]);
	}
}

uint32_t
quota_used(const struct health *h, uint32_t i, int w, time_t now, uint32_t *limit)
{
	struct window_desc q = window_of(h, i, w, NULL);
	uint32_t used = 0, t = secs32(now), span = health_window_seconds[w];

	*limit = q.capacity;
	if (q.capacity == 0) {
		uint64_t s = atomic_load(&h->live->rec[i].sent[w]);

		return (uint32_t)(s >> 32) == t / span ? (uint32_t)s : 0;
	}
	for (uint32_t j = 0; j < q.capacity; j++)
		used += !cell_free(atomic_load_explicit(&cells_of(h, q)[j], memory_order_relaxed),
		    t, span, q.calendar);
	return used;
}

/* When a cell that counts at now stops counting; 0 for one that counts
 * until something else happens to it (under way, frozen). */
static uint64_t
cell_expires(uint64_t c, uint32_t span, bool calendar)
{
	uint64_t t = c & CELL_TIME;

	if (c & (CELL_PENDING | CELL_FROZEN))
		return 0;
	return calendar ? (t / span + 1) * span : t + span;
}

time_t
quota_reopens(const struct health *h, uint32_t i, time_t now)
{
	uint32_t t = secs32(now);
	uint64_t reopens = 0;

	for (int w = 0; w < WIN_COUNT; w++) {
		struct window_desc q = window_of(h, i, w, NULL);
		uint32_t span = health_window_seconds[w];
		uint64_t first = UINT64_MAX;

		for (uint32_t j = 0; j < q.capacity; j++) {
			uint64_t v = atomic_load_explicit(&cells_of(h, q)[j], memory_order_relaxed);
			uint64_t end = cell_expires(v, span, q.calendar);

			if (cell_free(v, t, span, q.calendar)) {
				first = 0;           /* not full */
				break;
			}
			if (end != 0 && end < first)
				first = end;
		}
		if (q.capacity == 0 || first == 0)
			continue;
		if (first == UINT64_MAX)
			return 0;                /* full of attempts under way */
		if (first > reopens)
			reopens = first;
	}
	return (time_t)reopens;
}

void
quota_release_slot(struct health *h, uint32_t i, unsigned slot)
{
	for (int w = 0; w < WIN_COUNT; w++) {
		struct window_desc q = window_of(h, i, w, NULL);
		_Atomic uint64_t *c = cells_of(h, q);

		for (uint32_t j = 0; j < q.capacity; j++) {
			uint64_t v = atomic_load(&c[j]);

			while (cell_is_pending_of(v, slot) &&
			    !atomic_compare_exchange_weak(&c[j], &v, 0))
				;
		}
	}
}

/* --- resizing (master) */

struct moving {
	uint64_t value;                  /* as copied */
	uint32_t from;                   /* old index, for pending cells */
	uint32_t to;                     /* new index */
};

static int
newest_first(const void *a, const void *b)
{
	uint32_t x = (uint32_t)(((const struct moving *)a)->value & CELL_TIME);
	uint32_t y = (uint32_t)(((const struct moving *)b)->value & CELL_TIME);
	bool px = ((const struct moving *)a)->value & CELL_PENDING;
	bool py = ((const struct moving *)b)->value & CELL_PENDING;

	/* pending cells first (they belong to attempts that will end them),
	 * then the most recent messages: what is dropped expires first */
	if (px != py)
		return px ? -1 : 1;
	return x < y ? 1 : x > y ? -1 : 0;
}

/*
 * Collects the old cells in use: pending cells as they are (their attempts
 * will end them), the others frozen first, so that no process can take them
 * any more. Whether a message still counts is for the new rule to say when
 * its cell is next looked at.
 */
static size_t
cells_collect(struct health *h, struct window_desc old, struct moving *m)
{
	_Atomic uint64_t *c = cells_of(h, old);
	size_t n = 0;

	for (uint32_t j = 0; j < old.capacity; j++) {
		uint64_t v = atomic_load(&c[j]);

		while (!(v & (CELL_PENDING | CELL_FROZEN)) &&
		    !atomic_compare_exchange_weak(&c[j], &v, v | CELL_FROZEN))
			;
		v &= ~CELL_FROZEN;
		if (v != 0)
			m[n++] = (struct moving){ .value = v, .from = j };
	}
	return n;
}

/* What happened to a pending cell in the old place happens to its copy. */
static void
cells_replay(struct health *h, struct window_desc old, struct window_desc q,
    const struct moving *m, size_t n)
{
	for (size_t k = 0; k < n; k++) {
		uint64_t now_old, expect = m[k].value;

		if (!(m[k].value & CELL_PENDING))
			continue;
		now_old = atomic_load(&cells_of(h, old)[m[k].from]) & ~CELL_FROZEN;
		if (now_old != m[k].value)
			atomic_compare_exchange_strong(&cells_of(h, q)[m[k].to], &expect, now_old);
	}
}

static int
window_resize(struct health *h, uint32_t i, int w, struct window_desc q)
{
	struct health_hdr *hdr = &h->ctl->hdr;
	struct window_desc old = window_of(h, i, w, NULL);
	struct moving *m = NULL;
	size_t n = 0;

	if (q.capacity > 0) {
		uint32_t used = atomic_load(&hdr->cells_used);

		if (used > HEALTH_POOL_CELLS || HEALTH_POOL_CELLS - used < q.capacity)
			return -1;
		q.offset = used;
		atomic_store(&hdr->cells_used, used + q.capacity);
		if (old.capacity > 0 && (m = calloc(old.capacity, sizeof(*m))) == NULL)
			return -1;
		if (m != NULL)
			n = cells_collect(h, old, m);
		if (n > q.capacity) {
			qsort(m, n, sizeof(*m), newest_first);
			n = q.capacity;
		}
		/* Unused cells are worker-writable: whatever is there goes. */
		for (uint32_t k = 0; k < q.capacity; k++)
			atomic_store(&cells_of(h, q)[k], k < n ? m[k].value : 0);
		for (size_t k = 0; k < n; k++)
			m[k].to = (uint32_t)k;
	}
	atomic_store(&h->ctl->meta[i].quota[w], quota_pack(q));
	if (m != NULL)
		cells_replay(h, old, q, m, n);
	free(m);
	return 0;
}

int
quota_configure(struct health *h, uint32_t i, const uint32_t limit[WIN_COUNT], bool calendar)
{
	for (int w = 0; w < WIN_COUNT; w++) {
		struct window_desc cur = window_of(h, i, w, NULL);
		struct window_desc want = { 0, limit[w] > DESC_CAPACITY ? 0 : limit[w],
			limit[w] != 0 && calendar };

		if (limit[w] > DESC_CAPACITY)
			return -1;
		if (cur.capacity == want.capacity && cur.calendar == want.calendar)
			continue;
		if (window_resize(h, i, w, want) < 0)
			return -1;
	}
	return 0;
}

void
quota_adopt(struct health *h, uint32_t i)
{
	uint32_t now = secs32(time(NULL));

	for (int w = 0; w < WIN_COUNT; w++) {
		struct window_desc q = window_of(h, i, w, NULL);
		_Atomic uint64_t *c = cells_of(h, q);

		for (uint32_t j = 0; j < q.capacity; j++) {
			uint64_t v = atomic_load(&c[j]);

			/* Nobody of the last run is left to end these: as if sent now. */
			if (v & (CELL_PENDING | CELL_FROZEN))
				atomic_store(&c[j], (v & CELL_PENDING) ? now : v & CELL_TIME);
		}
	}
}

/* --- for the cluster (cluster.c) */

void
health_rec_windows(const struct health_rec *r, uint32_t limit[WIN_COUNT], bool *calendar)
{
	*calendar = false;
	for (int w = 0; w < WIN_COUNT; w++) {
		struct window_desc q = window_of(r->h, r->i, w, NULL);

		limit[w] = q.capacity;
		if (q.capacity > 0 && q.calendar)
			*calendar = true;
	}
}

void
health_rec_counted(const struct health_rec *r, time_t now, health_cell_fn fn, void *arg)
{
	uint32_t t = secs32(now);

	for (int w = 0; w < WIN_COUNT; w++) {
		struct window_desc q = window_of(r->h, r->i, w, NULL);
		uint32_t span = health_window_seconds[w];

		for (uint32_t j = 0; j < q.capacity; j++) {
			uint64_t v = atomic_load_explicit(&cells_of(r->h, q)[j], memory_order_relaxed);
			uint32_t at = (uint32_t)(v & CELL_TIME);
			time_t until;

			if ((v & CELL_PENDING) || at == 0 || cell_free(v & ~CELL_FROZEN, t, span,
			    q.calendar))
				continue;
			until = q.calendar ? (time_t)(at / span + 1) * span : (time_t)at + span;
			fn(arg, (unsigned)w, j, until);
		}
	}
}

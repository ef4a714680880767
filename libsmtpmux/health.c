/* SPDX-License-Identifier: MIT */
/*
 * The health records: circuit breaker, throttling, counters, last error,
 * in-flight counts, and the views and snapshots built from them. The
 * segments they live in are described in health_layout.h (and
 * doc/design.md); quota windows are health_quota.c, binding a
 * configuration health_bind.c, the state file health_file.c.
 *
 * Every mutable field is a lock-free C11 atomic (text fields are arrays of
 * atomic bytes) so that a process killed at any instruction leaves nothing
 * locked and nothing that can crash a reader.
 *
 * The circuit breaker is one word so that every transition is one CAS:
 *   CLOSED                 mode 0; the downstream is UP (or THROTTLED)
 *   OPEN, now <  until     DOWN for cooldown seconds
 *   OPEN, now >= until     HALF_OPEN: the next health_begin may claim the trial
 *   TRIAL(slot), now < until   HALF_OPEN, the trial is under way in slot;
 *                          until is a lease: a trial that never ends (its
 *                          worker died unnoticed) is claimable again after it
 */
#include <stdio.h>
#include <string.h>

#include "health_layout.h"
#include "log.h"

/* A trial attempt not ended by then is presumed lost (longer than any
 * delivery the upstream timeouts allow in practice). */
#define HEALTH_TRIAL_LEASE 900

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2 && ATOMIC_LONG_LOCK_FREE == 2,
    "64-bit atomics must be lock-free to live in shared memory");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2 && ATOMIC_SHORT_LOCK_FREE == 2 &&
    ATOMIC_CHAR_LOCK_FREE == 2, "small atomics must be lock-free");
_Static_assert(HEALTH_MAX_WORKER_SLOTS <= 128, "slot must fit the circuit's mode byte");

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
circuit_trip(struct live_rec *r, const struct health_cfg *hc, uint32_t failures, time_t now)
{
	uint64_t closed = 0;

	if (hc->fail_threshold == 0 || failures < hc->fail_threshold)
		return;
	atomic_compare_exchange_strong(&r->circuit, &closed,
	    circuit_pack(CIRCUIT_OPEN, hc->cooldown, secs32_add(now, hc->cooldown)));
}

/* A half-open circuit's trial failed: open again for twice as long. */
static void
circuit_retrip(struct live_rec *r, const struct health_cfg *hc, uint64_t seen, time_t now)
{
	uint32_t cd = cooldown_doubled(circuit_cooldown(seen), hc);

	atomic_compare_exchange_strong(&r->circuit, &seen,
	    circuit_pack(CIRCUIT_OPEN, cd, secs32_add(now, cd)));
}

/* Loads first: every success passes here, and a store would bounce the
 * cache line between the workers for nothing. */
static void
circuit_close(struct live_rec *r)
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
circuit_enter(struct live_rec *r, unsigned slot, time_t now, bool *trial, uint64_t *claimed)
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
circuit_unclaim(struct live_rec *r, uint64_t claimed)
{
	atomic_compare_exchange_strong(&r->circuit, &claimed,
	    circuit_pack(CIRCUIT_OPEN, circuit_cooldown(claimed), 0));
}

static bool
circuit_is_trial_of(uint64_t c, unsigned slot)
{
	return circuit_mode(c) == CIRCUIT_TRIAL && circuit_slot(c) == slot;
}

/* --- small helpers */

static unsigned
slot_clamp(unsigned slot)
{
	return slot < HEALTH_MAX_WORKER_SLOTS ? slot : HEALTH_MAX_WORKER_SLOTS - 1;
}

static void
error_record(struct live_rec *r, time_t now, const char *error)
{
	char clean[HEALTH_ERROR_MAX];

	log_sanitize(clean, sizeof(clean), error, strlen(error));
	atext_store(r->error, sizeof(r->error), clean);
	atomic_store(&r->error_time, (int64_t)now);
	atomic_fetch_add_explicit(&r->error_seq, 1, memory_order_release);
}

/* Retries a read torn by a concurrent writer a few times, then accepts it. */
static void
error_read(const struct live_rec *r, char *dst, size_t dstlen, time_t *when)
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
latency_update(struct live_rec *r, unsigned sample)
{
	uint32_t v = atomic_load(&r->latency_ms), next;

	do {
		next = v == 0 ? sample : (uint32_t)(((uint64_t)v * 7 + sample) / 8);
		if (next == 0)
			next = 1;        /* 0 means "no sample yet" */
	} while (!atomic_compare_exchange_weak(&r->latency_ms, &v, next));
}

static void
throttle_until(struct live_rec *r, time_t until)
{
	int64_t v = atomic_load(&r->throttled_until);

	while (v < (int64_t)until &&
	    !atomic_compare_exchange_weak(&r->throttled_until, &v, (int64_t)until))
		;
}

static void
in_flight_end(struct live_rec *r, unsigned slot)
{
	uint16_t v = atomic_load(&r->in_flight[slot]);

	/* health_worker_gone may have zeroed it: never wrap below zero */
	while (v > 0 && !atomic_compare_exchange_weak(&r->in_flight[slot], &v, v - 1))
		;
}

uint64_t
health_user_next(struct health_user *u)
{
	return atomic_fetch_add(&u->h->live->user[u->i].seq, 1);
}

/* --- views */

static uint32_t
state_at(const struct live_rec *r, time_t now, bool *trial_taken)
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

/* The tightest limited window decides what is left. */
static void
quota_view(const struct health *h, uint32_t i, time_t now, struct smtpmux_downstream_view *out)
{
	out->quota_left = -1;
	out->quota_limit = 0;
	for (int w = 0; w < WIN_COUNT; w++) {
		uint32_t limit, used = quota_used(h, i, w, now, &limit);
		int64_t left;

		if (limit == 0)
			continue;
		left = used >= limit ? 0 : (int64_t)limit - used;
		if (left > INT32_MAX)
			left = INT32_MAX;
		if (out->quota_left < 0 || left < out->quota_left) {
			out->quota_left = (int32_t)left;
			out->quota_limit = limit;
		}
	}
}

static uint32_t
in_flight_sum(const struct live_rec *r)
{
	uint32_t sum = 0;

	for (unsigned s = 0; s < HEALTH_MAX_WORKER_SLOTS; s++)
		sum += atomic_load_explicit(&r->in_flight[s], memory_order_relaxed);
	return sum;
}

/* The view of record i as anyone sees it; the configuration only names it. */
static void
view_fill(const struct health *h, uint32_t i, time_t now, struct smtpmux_downstream_view *out)
{
	const struct live_rec *r = &h->live->rec[i];
	bool trial_taken;

	out->state = state_at(r, now, &trial_taken);
	out->consecutive_failures = atomic_load(&r->consecutive_failures);
	out->in_flight = in_flight_sum(r);
	out->latency_ms = atomic_load(&r->latency_ms);
	quota_view(h, i, now, out);
	out->available = out->state != SMTPMUX_DS_DOWN && !trial_taken &&
	    atomic_load(&r->throttled_until) <= (int64_t)now && out->quota_left != 0;
	out->attempts = atomic_load(&r->attempts);
	out->successes = atomic_load(&r->successes);
	out->failures = atomic_load(&r->failures);
}

void
health_view(const struct health_rec *r, const struct downstream_cfg *ds,
    const struct health_cfg *hc, time_t now, struct smtpmux_downstream_view *out)
{
	(void)hc;
	memset(out, 0, sizeof(*out));
	out->name = ds->name ? ds->name : ds->addr;
	out->addr = ds->addr;
	out->weight = ds->weight;
	view_fill(r->h, r->i, now, out);
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
begin(struct health_rec *hr, unsigned worker_slot, time_t now, bool gated)
{
	struct live_rec *r = rec_live(hr);
	unsigned slot = slot_clamp(worker_slot);
	uint64_t claimed = 0;
	bool trial;

	if (gated && atomic_load(&r->throttled_until) > (int64_t)now)
		return false;
	if (!circuit_enter(r, slot, now, &trial, &claimed) && gated)
		return false;
	if (!quota_reserve(hr->h, hr, slot, now)) {
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
	(void)ds;
	return begin(r, worker_slot, now, true);
}

bool
health_begin_last_resort(struct health_rec *r, const struct downstream_cfg *ds,
    unsigned worker_slot, time_t now)
{
	(void)ds;
	return begin(r, worker_slot, now, false);
}

time_t
health_quota_reopens(const struct health_rec *r, const struct downstream_cfg *ds, time_t now)
{
	(void)ds;
	return quota_reopens(r->h, r->i, now);
}

bool
health_begin_shared(struct health_rec *hr, unsigned worker_slot, time_t now)
{
	unsigned slot = slot_clamp(worker_slot);

	if (!quota_reserve(hr->h, hr, slot, now))
		return false;
	atomic_fetch_add(&rec_live(hr)->in_flight[slot], 1);
	return true;
}

static void
end_fail(struct live_rec *r, const struct health_cfg *hc, unsigned slot, time_t now)
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
end_throttled(struct live_rec *r, const struct health_cfg *hc, unsigned slot, time_t now)
{
	uint64_t c = atomic_load(&r->circuit);

	atomic_fetch_add(&r->failures, 1);
	throttle_until(r, now + (time_t)hc->throttle_backoff);
	if (circuit_is_trial_of(c, slot) && atomic_compare_exchange_strong(&r->circuit, &c, 0))
		atomic_store(&r->consecutive_failures, 0);
}

/* No verdict: a trial that was cancelled leaves the circuit half-open. */
static void
end_cancelled(struct live_rec *r, unsigned slot)
{
	uint64_t c = atomic_load(&r->circuit);

	if (circuit_is_trial_of(c, slot))
		circuit_unclaim(r, c);
}

/* circuit: false when the cluster decides the circuit and the throttle. */
static void
end_attempt(struct health_rec *hr, const struct health_cfg *hc, unsigned worker_slot,
    time_t begun, time_t now, enum health_outcome outcome, unsigned latency_ms,
    const char *error, bool circuit)
{
	struct live_rec *r = rec_live(hr);
	unsigned slot = slot_clamp(worker_slot);

	if (outcome != HEALTH_CANCELLED)
		atomic_fetch_add(&r->attempts, 1);
	quota_end(hr->h, hr, slot, begun, now, outcome == HEALTH_OK);
	switch (outcome) {
	case HEALTH_OK:
		atomic_fetch_add(&r->successes, 1);
		latency_update(r, latency_ms);
		if (circuit)
			circuit_close(r);
		break;
	case HEALTH_FAIL:
		error_record(r, now, error ? error : "failed");
		if (circuit)
			end_fail(r, hc, slot, now);
		else
			atomic_fetch_add(&r->failures, 1);
		break;
	case HEALTH_THROTTLED:
		error_record(r, now, error ? error : "throttled");
		if (circuit)
			end_throttled(r, hc, slot, now);
		else
			atomic_fetch_add(&r->failures, 1);
		break;
	case HEALTH_CANCELLED:
		end_cancelled(r, slot);
		break;
	}
	in_flight_end(r, slot);
}

void
health_end_since(struct health_rec *hr, const struct downstream_cfg *ds,
    const struct health_cfg *hc, unsigned worker_slot, time_t begun, time_t now,
    enum health_outcome outcome, unsigned latency_ms, const char *error)
{
	(void)ds;
	end_attempt(hr, hc, worker_slot, begun, now, outcome, latency_ms, error, true);
}

void
health_end_shared(struct health_rec *hr, const struct health_cfg *hc, unsigned worker_slot,
    time_t begun, time_t now, enum health_outcome outcome, unsigned latency_ms,
    const char *error)
{
	end_attempt(hr, hc, worker_slot, begun, now, outcome, latency_ms, error, false);
}

void
health_end(struct health_rec *r, const struct downstream_cfg *ds,
    const struct health_cfg *hc, unsigned worker_slot, time_t now,
    enum health_outcome outcome, unsigned latency_ms, const char *error)
{
	health_end_since(r, ds, hc, worker_slot, now, now, outcome, latency_ms, error);
}

void
health_probe_result(struct health_rec *hr, const struct downstream_cfg *ds,
    const struct health_cfg *hc, time_t now, bool ok, unsigned latency_ms,
    const char *error)
{
	struct live_rec *r = rec_live(hr);
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

/*
 * The master's side of a worker's death. It walks records by its own count
 * and each record's cells by the control segment: nothing the dead worker
 * could have written decides where it reads or writes.
 */
void
health_worker_gone(struct health *h, unsigned worker_slot)
{
	uint32_t n = health_n_recs(h);

	if (worker_slot >= HEALTH_MAX_WORKER_SLOTS)
		return;
	for (uint32_t i = 0; i < n; i++) {
		struct live_rec *r = &h->live->rec[i];
		uint64_t c = atomic_load(&r->circuit);

		atomic_store(&r->in_flight[worker_slot], 0);
		if (circuit_is_trial_of(c, worker_slot))
			circuit_unclaim(r, c);
		quota_release_slot(h, i, worker_slot);
	}
	health_cluster_gone(h, worker_slot);
}

void
health_settle(struct health *h)
{
	uint32_t n = health_n_recs(h);

	for (uint32_t i = 0; i < n; i++) {
		struct live_rec *r = &h->live->rec[i];
		uint64_t c = atomic_load(&r->circuit);

		for (unsigned s = 0; s < HEALTH_MAX_WORKER_SLOTS; s++)
			atomic_store(&r->in_flight[s], 0);
		if (circuit_mode(c) == CIRCUIT_TRIAL)
			atomic_store(&r->circuit, circuit_pack(CIRCUIT_OPEN, circuit_cooldown(c), 0));
		quota_adopt(h, i);
	}
}

/* --- the cluster's mirror */

void
health_mirror(struct health_rec *hr, const struct health_shared *sh, time_t now)
{
	struct live_rec *r = rec_live(hr);
	uint64_t c = atomic_load(&r->circuit), want;

	want = sh->open ? circuit_pack(CIRCUIT_OPEN, sh->cooldown, secs32(sh->open_until)) : 0;
	/* A trial of our own, claimed while deciding locally, ends on its own. */
	while (c != want && !(circuit_mode(c) == CIRCUIT_TRIAL && secs32(now) < circuit_until(c) &&
	    sh->open) && !atomic_compare_exchange_weak(&r->circuit, &c, want))
		;
	atomic_store(&r->throttled_until, sh->throttled_until > now ? (int64_t)sh->throttled_until : 0);
	if (atomic_load(&r->consecutive_failures) != sh->fails)
		atomic_store(&r->consecutive_failures, sh->fails);
}

void
health_shared_of(const struct health_rec *hr, time_t now, struct health_shared *out)
{
	const struct live_rec *r = rec_live(hr);
	uint64_t c = atomic_load(&r->circuit);
	int64_t thr = atomic_load(&r->throttled_until);

	*out = (struct health_shared){ 0 };
	out->open = circuit_mode(c) != CIRCUIT_CLOSED;
	out->open_until = out->open ? (time_t)circuit_until(c) : 0;
	out->cooldown = circuit_cooldown(c);
	out->trial_taken = circuit_mode(c) == CIRCUIT_TRIAL && secs32(now) < circuit_until(c);
	out->throttled_until = thr > (int64_t)now ? (time_t)thr : 0;
	out->fails = atomic_load(&r->consecutive_failures);
}

const char *
health_rec_key(const struct health_rec *hr, char *buf, size_t len)
{
	const struct rec_meta *m = rec_meta(hr);

	snprintf(buf, len, "%.*s", (int)strnlen(m->key, sizeof(m->key)), m->key);
	return buf;
}

/* --- status readers */

size_t
health_count(const struct health *h)
{
	return health_n_recs(h);
}

/* The segment is read as untrusted here: a status reader may have been
 * handed anything by whoever answered on the state socket. */
int
health_snapshot(const struct health *h, size_t index, const struct health_cfg *hc,
    time_t now, struct health_snapshot *out)
{
	const struct rec_meta *m;
	uint32_t *limit[WIN_COUNT], *sent[WIN_COUNT];

	(void)hc;
	if (index >= health_count(h))
		return -1;
	m = &h->ro->meta[index];
	memset(out, 0, sizeof(*out));
	snprintf(out->key, sizeof(out->key), "%.*s", (int)strnlen(m->key, sizeof(m->key)), m->key);
	snprintf(out->addr, sizeof(out->addr), "%.*s", (int)strcspn(out->key, " "), out->key);
	atext_load(out->name, sizeof(out->name), m->name, sizeof(m->name));
	out->view.name = out->name;
	out->view.addr = out->addr;
	out->view.weight = atomic_load(&m->weight);
	view_fill(h, (uint32_t)index, now, &out->view);
	limit[WIN_MINUTE] = &out->limit_minute;
	limit[WIN_HOUR] = &out->limit_hour;
	limit[WIN_DAY] = &out->limit_day;
	sent[WIN_MINUTE] = &out->sent_minute;
	sent[WIN_HOUR] = &out->sent_hour;
	sent[WIN_DAY] = &out->sent_day;
	for (int w = 0; w < WIN_COUNT; w++)
		*sent[w] = quota_used(h, (uint32_t)index, w, now, limit[w]);
	error_read(&h->live->rec[index], out->last_error, sizeof(out->last_error),
	    &out->last_error_time);
	return atomic_load(&m->generation) == atomic_load(&h->ro->hdr.generation) ? 0 : 1;
}

int
health_snapshot_of(const struct health *h, const struct health_rec *rec,
    const struct health_cfg *hc, time_t now, struct health_snapshot *out)
{
	if (rec == NULL || rec->h != h)
		return -1;
	return health_snapshot(h, rec->i, hc, now, out);
}

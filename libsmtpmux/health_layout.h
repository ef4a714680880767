/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_HEALTH_LAYOUT_H
#define SMTPMUX_HEALTH_LAYOUT_H

/*
 * The shared health segments, as the health_*.c files see them; nothing
 * outside libsmtpmux/health*.c includes this. doc/design.md has the same
 * tables; HEALTH_LAYOUT_VERSION changes whenever they do.
 *
 * Two memfds, so that what the root master relies on is out of the
 * workers' reach:
 *
 *   control (struct health_ctl): written by the master only. Header,
 *     record keys, names, weights, each record's quota cell arrays, user
 *     emails. Children get it mapped from a read-only file descriptor and
 *     sealed against new writable mappings (F_SEAL_FUTURE_WRITE): a
 *     worker cannot mprotect() it writable, reopen it, or write() it.
 *
 *   live (struct health_live): written by every process. Circuit, counters,
 *     last error, in-flight counts per worker slot, per-user sequences, and
 *     the pool of quota cells. Sealed against shrinking, so truncating it
 *     is impossible (no SIGBUS), and it has no path to delete.
 *
 * The master reads the live segment only as values (counts, timestamps,
 * circuit words): never as an index, a size or a count of anything. Every
 * index it uses comes from the control segment or its own memory, and is
 * checked against the array it indexes all the same.
 *
 *   control                    offset     size
 *     header                   0          64
 *     rec_meta[1024]           64         1024 x 256
 *     user_meta[1024]          262208     1024 x 256
 *     end                      524352
 *
 *   live                       offset     size
 *     live_rec[1024]           0          1024 x 576
 *     live_user[1024]          589824     1024 x 64
 *     cells[4194304]           655360     4194304 x 8
 *     cluster                  34209792   1600
 *     end                      34211392
 */

#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "health.h"

#define HEALTH_MAGIC 0x48584d55504d5453ULL   /* "SMTPMUXH" little-endian */
#define HEALTH_KEY_MAX 160
#define HEALTH_NAME_MAX 64
#define HEALTH_ERROR_MAX 160
#define HEALTH_EMAIL_MAX 256
#define HEALTH_POOL_CELLS (1u << 22)         /* quota cells: 8 bytes per message a window allows */

enum { WIN_MINUTE, WIN_HOUR, WIN_DAY, WIN_COUNT };

struct health_hdr {
	alignas(64) uint64_t magic;
	uint32_t layout_version;
	uint32_t header_size;
	uint32_t meta_size;              /* sizeof(struct rec_meta) */
	uint32_t user_meta_size;
	uint32_t rec_size;               /* sizeof(struct live_rec) */
	uint32_t user_size;              /* sizeof(struct live_user) */
	uint32_t max_recs;
	uint32_t max_users;
	uint32_t worker_slots;
	uint32_t pool_cells;
	_Atomic uint32_t n_recs;         /* records in use, published with release */
	_Atomic uint32_t n_users;
	_Atomic uint32_t generation;     /* of the last health_bind() */
	_Atomic uint32_t cells_used;     /* the pool is handed out from the start */
};

/*
 * A record's quota window: offset(32) | calendar(1) | capacity(31). Its
 * capacity cells live at cells[offset ..]: the window allows exactly
 * capacity messages. 0: no limit. One word, so that a reload that resizes
 * a window switches every process to the new cells at once.
 */
struct rec_meta {
	alignas(64) char key[HEALTH_KEY_MAX];        /* "addr user"; written before publish */
	_Atomic unsigned char name[HEALTH_NAME_MAX];
	_Atomic uint32_t generation;                 /* last bind that used it */
	_Atomic uint32_t weight;
	_Atomic uint64_t quota[WIN_COUNT];
};

struct user_meta {
	alignas(64) char email[HEALTH_EMAIL_MAX];    /* lower case */
};

struct health_ctl {
	struct health_hdr hdr;
	struct rec_meta meta[HEALTH_MAX_DOWNSTREAMS];
	struct user_meta user[HEALTH_MAX_USERS];
};

struct live_rec {
	alignas(64) _Atomic uint64_t circuit;        /* mode(8) | cooldown(24) | until(32) */
	_Atomic int64_t throttled_until;
	_Atomic uint32_t consecutive_failures;
	_Atomic uint32_t latency_ms;                 /* EWMA; 0: no sample */
	_Atomic uint64_t attempts;
	_Atomic uint64_t successes;
	_Atomic uint64_t failures;
	_Atomic uint64_t sent[WIN_COUNT];            /* calendar index(32) | count(32), for status */
	_Atomic uint32_t hint[WIN_COUNT];            /* where a free quota cell may be */
	uint32_t spare0;
	_Atomic uint64_t error_seq;
	_Atomic int64_t error_time;
	_Atomic unsigned char error[HEALTH_ERROR_MAX];
	_Atomic uint16_t in_flight[HEALTH_MAX_WORKER_SLOTS];
};

struct live_user {
	alignas(64) _Atomic uint64_t seq;
};

/*
 * The instance's share of a cluster (`cluster:`, health_cluster.c): which
 * processes have their link to Redis up, for -s status and /metrics. The
 * master only clears a dead worker's link word (as values, like the rest).
 */
struct live_cluster {
	alignas(64) _Atomic uint64_t instance;       /* random, per start: names this
	                                                instance's entries in Redis */
	_Atomic uint64_t local_decisions;            /* attempts decided locally for want
	                                                of a link */
	_Atomic uint64_t spare[6];
	_Atomic uint32_t link[HEALTH_MAX_WORKER_SLOTS];      /* enum health_link */
	_Atomic int64_t link_since[HEALTH_MAX_WORKER_SLOTS]; /* when it last changed */
};

struct health_live {
	struct live_rec rec[HEALTH_MAX_DOWNSTREAMS];
	struct live_user user[HEALTH_MAX_USERS];
	_Atomic uint64_t cells[HEALTH_POOL_CELLS];
	struct live_cluster cluster;
};

/* doc/design.md gives these offsets: keep them true. */
_Static_assert(offsetof(struct health_hdr, n_recs) == 48 &&
    offsetof(struct health_hdr, cells_used) == 60, "header fields as documented");
_Static_assert(offsetof(struct rec_meta, name) == 160 && offsetof(struct rec_meta, weight) == 228 &&
    offsetof(struct rec_meta, quota) == 232, "record meta fields as documented");
_Static_assert(offsetof(struct live_rec, sent) == 48 && offsetof(struct live_rec, hint) == 72 &&
    offsetof(struct live_rec, error_seq) == 88 && offsetof(struct live_rec, error) == 104 &&
    offsetof(struct live_rec, in_flight) == 264, "live record fields as documented");
_Static_assert(offsetof(struct health_ctl, meta) == 64 && offsetof(struct health_ctl, user) == 262208,
    "control segment as documented");
_Static_assert(offsetof(struct health_live, user) == 589824 &&
    offsetof(struct health_live, cells) == 655360 &&
    offsetof(struct health_live, cluster) == 34209792 && sizeof(struct health_live) == 34211392,
    "live segment as documented");
_Static_assert(offsetof(struct live_cluster, link) == 64 &&
    offsetof(struct live_cluster, link_since) == 576 && sizeof(struct live_cluster) == 1600,
    "cluster block as documented");
_Static_assert(sizeof(struct health_hdr) == 64, "header is one cache line");
_Static_assert(sizeof(struct rec_meta) == 256, "record meta: 4 cache lines");
_Static_assert(sizeof(struct user_meta) == 256, "user meta: 4 cache lines");
_Static_assert(sizeof(struct health_ctl) == 64 + HEALTH_MAX_DOWNSTREAMS * 256 +
    HEALTH_MAX_USERS * 256, "control layout as documented");
_Static_assert(sizeof(struct live_rec) == 576, "live record: 9 cache lines");
_Static_assert(sizeof(struct live_user) == 64, "live user: 1 cache line");
_Static_assert(sizeof(struct health_live) == HEALTH_MAX_DOWNSTREAMS * 576 +
    HEALTH_MAX_USERS * 64 + (size_t)HEALTH_POOL_CELLS * 8 + 1600, "live layout as documented");

/* What downstream_cfg->health and user_cfg->health point to: a handle in
 * the process's own memory, so that no pointer is ever read from shared
 * memory. */
struct health_rec {
	struct health *h;
	uint32_t i;
};

struct health_user {
	struct health *h;
	uint32_t i;
};

/* The master's record of the state file it last wrote (health_file.c). */
struct health_saved {
	unsigned char *image;            /* its content */
	size_t len;
	dev_t dev;                       /* and identity, to notice removal or truncation */
	ino_t ino;
	bool written;
};

struct health {
	struct health_ctl *ctl;          /* writable: the master only; NULL elsewhere */
	const struct health_ctl *ro;     /* read-only view: every process */
	struct health_live *live;        /* writable, except for status readers */
	size_t ctl_size, live_size;      /* as mapped */
	int ctl_fd, live_fd;             /* read-only, for status readers; -1 in children */
	struct health_rec recs[HEALTH_MAX_DOWNSTREAMS];
	struct health_user users[HEALTH_MAX_USERS];
	struct health_saved saved;
};

static inline struct live_rec *
rec_live(const struct health_rec *r)
{
	return &r->h->live->rec[r->i];
}

static inline const struct rec_meta *
rec_meta(const struct health_rec *r)
{
	return &r->h->ro->meta[r->i];
}

/* Counts read from the control segment are checked all the same: a status
 * reader may be handed anything. */
static inline uint32_t
health_n_recs(const struct health *h)
{
	uint32_t n = atomic_load_explicit(&h->ro->hdr.n_recs, memory_order_acquire);

	return n <= HEALTH_MAX_DOWNSTREAMS ? n : HEALTH_MAX_DOWNSTREAMS;
}

static inline uint32_t
health_n_users(const struct health *h)
{
	uint32_t n = atomic_load_explicit(&h->ro->hdr.n_users, memory_order_acquire);

	return n <= HEALTH_MAX_USERS ? n : HEALTH_MAX_USERS;
}

/* Seconds since the epoch as the segments store them (until 2106). */
static inline uint32_t
secs32(time_t t)
{
	if (t <= 0)
		return 0;
	if ((uint64_t)t >= UINT32_MAX)
		return UINT32_MAX;
	return (uint32_t)t;
}

/* Byte-wise atomic text: a concurrent reader may see a mix of two texts,
 * never an unterminated one. */
static inline void
atext_store(_Atomic unsigned char *dst, size_t size, const char *src)
{
	size_t i = 0;

	for (; src != NULL && src[i] != '\0' && i + 1 < size; i++)
		atomic_store_explicit(&dst[i], (unsigned char)src[i], memory_order_relaxed);
	atomic_store_explicit(&dst[i], 0, memory_order_relaxed);
}

static inline void
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

/* --- health.c */

/* After loading a state file: a run that is over has nothing in flight, no
 * trial under way, and its unfinished reservations count as sent. */
void health_settle(struct health *h);

/* --- health_cluster.c */

/* A fresh segment: this start's instance id. */
void health_cluster_init(struct health *h);
/* The master: a dead process's link is no longer anyone's. */
void health_cluster_gone(struct health *h, unsigned slot);

/* --- health_segment.c */

/* Two fresh, zeroed, sealed segments mapped for the master. NULL, errno. */
struct health *health_segment_new(void);
/* Makes the master's segment valid for this build (header, counts 0). */
void health_segment_format(struct health *h);
/* The header describes this build's layout (sizes, versions). */
bool health_hdr_matches(const struct health_hdr *hdr);

/* --- health_file.c */

/* What the state file holds for h now (malloc'ed); NULL when out of memory. */
unsigned char *health_image(const struct health *h, size_t *len);
/*
 * Takes a state file's content into the master's fresh segments, after
 * checking it against this build and itself (windows outside its cells are
 * dropped, texts terminated). -1 with *why when it does not fit. Anything
 * may be fed to it (t/fuzz/fuzz_state.c).
 */
int health_load_image(struct health *h, const unsigned char *img, size_t len,
    const char **why);

/* --- health_quota.c: quota windows (cells) */

struct window_desc {
	uint32_t offset;                 /* into live->cells */
	uint32_t capacity;               /* 0: no limit */
	bool calendar;                   /* else rolling */
};

extern const uint32_t health_window_seconds[WIN_COUNT];

uint64_t quota_pack(struct window_desc q);
/* Unpacks a record's window; one whose cells lie outside the pool (a
 * hostile segment) comes back with capacity 0 and *bad set. */
struct window_desc quota_unpack(uint64_t word, bool *bad);
bool quota_reserve(struct health *h, const struct health_rec *r, unsigned slot, time_t now);
void quota_end(struct health *h, const struct health_rec *r, unsigned slot, time_t begun,
    time_t now, bool delivered);
/* Messages counted in window w at now; *limit gets its capacity (0: none). */
uint32_t quota_used(const struct health *h, uint32_t i, int w, time_t now, uint32_t *limit);
/* health_quota_reopens() of record i. */
time_t quota_reopens(const struct health *h, uint32_t i, time_t now);
/* Master: frees the cells that a dead worker's attempts held. */
void quota_release_slot(struct health *h, uint32_t i, unsigned slot);
/* Master, at bind: gives record i windows of capacity limit[w]. -1 when the
 * pool is used up. */
int quota_configure(struct health *h, uint32_t i, const uint32_t limit[WIN_COUNT],
    bool calendar);
/* After loading a state file: in-flight reservations of a run that is over
 * count as sent (their outcome is unknown). */
void quota_adopt(struct health *h, uint32_t i);

#endif

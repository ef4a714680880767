/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SELECTOR_H
#define SMTPMUX_SELECTOR_H

/*
 * The smtpmux selector ABI.
 *
 * A selector is a shared object that orders a user's downstreams for one
 * message. It exports one symbol, SMTPMUX_SELECTOR_SYMBOL, a const struct
 * smtpmux_selector. smtpmuxd refuses to load a selector whose abi_version
 * differs from the one it was built with, or whose struct_size is smaller
 * than the fields that version defines.
 *
 * Rules for selector authors:
 *  - select() runs inside a worker's event loop: never block, never sleep,
 *    never do I/O. It must be fast (it runs for every message).
 *  - Everything select() sees is a snapshot owned by smtpmuxd, valid only
 *    during the call. Never keep pointers to it.
 *  - State that must be shared between workers does not belong in the
 *    selector: smtpmuxd passes a per-user message sequence number that is
 *    shared by all workers (envelope->sequence), which is enough for
 *    rotations and weighted schedules.
 *  - smtpmuxd demotes downstreams that are down, throttled or over quota
 *    after select() returns (see smtpmux_order_available); a selector need
 *    not do it itself, but may use the health fields to decide.
 *
 * Build out of tree with:
 *   cc -shared -fPIC $(pkg-config --cflags smtpmux) my.c -o my.so
 * and see smtpmux-selector(3).
 */

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SMTPMUX_SELECTOR_ABI_VERSION 1
#define SMTPMUX_SELECTOR_SYMBOL "smtpmux_selector"

/* Key/value parameters from the user's `selector: {params: {...}}`. */
struct smtpmux_selector_param {
	const char *key;
	const char *value;
};

/* The message being routed. */
struct smtpmux_envelope {
	const char *user;            /* authenticated user (config `email`) */
	const char *mail_from;       /* reverse-path without <>, "" for null sender */
	const char *const *rcpts;    /* forward-paths without <> */
	size_t n_rcpts;
	uint64_t size;               /* message size in octets */
	const char *client_addr;     /* client IP address as text */
	uint64_t sequence;           /* per-user message counter, shared by all workers */
};

enum smtpmux_downstream_state {
	SMTPMUX_DS_UP = 0,
	SMTPMUX_DS_DOWN = 1,         /* circuit open: recent consecutive failures */
	SMTPMUX_DS_HALF_OPEN = 2,    /* cooldown over: one trial message allowed */
	SMTPMUX_DS_THROTTLED = 3     /* provider signalled a rate limit or quota */
};

/* A snapshot of one downstream: configuration and shared health. */
struct smtpmux_downstream_view {
	const char *name;            /* `name:` or the address */
	const char *addr;            /* "host:port" */
	uint32_t weight;             /* `weight:`, default 1 */
	uint32_t state;              /* enum smtpmux_downstream_state */
	uint32_t consecutive_failures;
	uint32_t in_flight;          /* deliveries under way, all workers */
	uint32_t latency_ms;         /* moving average of successful deliveries */
	int32_t quota_left;          /* messages left in the tightest window; -1: no quota */
	uint32_t quota_limit;        /* that window's limit; 0: no quota */
	uint32_t available;          /* 1 when neither down, throttled nor over quota */
	uint64_t attempts;
	uint64_t successes;
	uint64_t failures;
};

struct smtpmux_selector {
	uint32_t abi_version;        /* SMTPMUX_SELECTOR_ABI_VERSION */
	uint32_t struct_size;        /* sizeof(struct smtpmux_selector) */
	const char *name;

	/*
	 * Called once per user when the configuration is loaded (in the master,
	 * before the workers fork: each worker then has its own copy of the
	 * state, so treat it as read-only). Stores private state in *state.
	 * Returns 0, or -1 with a one-line message in err (e.g. "unknown
	 * parameter 'x'"), which refuses the configuration; fini() is not
	 * called then, so free what was allocated. Optional: a selector
	 * without init() takes no parameters.
	 */
	int (*init)(void **state, const struct smtpmux_selector_param *params,
	    size_t n_params, char *err, size_t errlen);

	/*
	 * Writes into order[] the indices (0..n-1) of the downstreams to try, in
	 * order, and returns how many it wrote (at most n; each index at most
	 * once: smtpmuxd drops out-of-range and repeated ones). Downstreams it
	 * leaves out are not tried for this message. ds[] is in configuration
	 * order and n >= 1. Required.
	 */
	size_t (*select)(void *state, const struct smtpmux_envelope *env,
	    const struct smtpmux_downstream_view *ds, size_t n, size_t *order);

	/*
	 * Frees the state from init(); called when a configuration is dropped.
	 * Optional.
	 */
	void (*fini)(void *state);

	void *reserved[4];           /* zero; room for later ABI versions */
};

/* What a selector defines, as a const object: its only exported symbol. */
extern const struct smtpmux_selector smtpmux_selector;

/*
 * Stable partition: moves available downstreams (in their given order)
 * ahead of unavailable ones. smtpmuxd applies it to every selector's
 * result, so a down provider is tried only when no healthy one is left.
 */
static inline void
smtpmux_order_available(const struct smtpmux_downstream_view *ds,
    size_t *order, size_t n)
{
	size_t i, j, k = 0, keep;

	for (i = 0; i < n; i++) {
		if (!ds[order[i]].available)
			continue;
		keep = order[i];
		for (j = i; j > k; j--)
			order[j] = order[j - 1];
		order[k++] = keep;
	}
}

#ifdef __cplusplus
}
#endif
#endif

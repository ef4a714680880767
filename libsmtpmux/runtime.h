/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_RUNTIME_H
#define SMTPMUX_RUNTIME_H

#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include <event2/dns.h>
#include <event2/event.h>

struct client_table;
struct cluster;
struct config;
struct health;
struct passwd_cache;
struct passwd_offload;
struct token_table;
struct spool_writer;
struct upstream;
struct upstream_cache;

/*
 * What a worker's sessions and deliveries share: its event loop, its DNS
 * resolver, the configuration it serves, the shared health segment and
 * the shared table of client addresses.
 * Owned by the worker context (smtpmuxd/worker.c); the tests build their
 * own.
 */
struct runtime {
	struct event_base *base;
	struct evdns_base *dns;
	const struct config *cfg;
	struct health *health;           /* may be NULL in unit tests */
	struct client_table *clients;    /* per client address, shared; may be NULL */
	struct token_table *tokens;      /* OAuth tokens; NULL when none is configured */
	unsigned worker_slot;            /* this worker's in-flight slot */
	uint32_t id_seq;                 /* for runtime_new_id() */
	struct upstream *lingering;      /* finished attempts saying QUIT (upstream.c) */
	struct upstream_cache *cache;    /* idle downstream sessions; NULL: no reuse */
	struct passwd_cache *pwcache;    /* verified password hashes; may be NULL */
	struct passwd_offload *pwcheck;  /* hashes checked off the loop; may be NULL */
	struct cluster *cluster;         /* `cluster:` (cluster.h); NULL without one */
	struct spool_writer *spool;      /* commits to the queue; NULL without one */
};

/* Milliseconds on the monotonic clock: deadlines that a changed wall
 * clock cannot move. */
static inline int64_t
runtime_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Writes a new queue id (12 upper-case hex digits, unique across the
 * workers of a host: time, pid and a counter) into buf[13].
 */
static inline const char *
runtime_new_id(struct runtime *rt, char buf[13], uint64_t usec_now, uint32_t pid)
{
	uint64_t v = ((usec_now / 1000) << 20) ^ ((uint64_t)pid << 12) ^ (rt->id_seq++ & 0xfff);

	snprintf(buf, 13, "%012llX", (unsigned long long)(v & 0xffffffffffffULL));
	return buf;
}

#endif

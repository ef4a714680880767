/* SPDX-License-Identifier: MIT */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "upstream_cache.h"

/*
 * One list, newest first: a worker holds at most max_idle sessions per
 * downstream account, a handful in all, so a walk is cheaper than any
 * index. Handing out the newest keeps the warm sessions busy and lets the
 * others reach idle_timeout and close.
 */
struct upstream_cache {
	struct cache_cfg cfg;
	struct upstream_cache_entry *head;
	size_t n;
	bool closed;
};

struct upstream_cache *
upstream_cache_new(const struct cache_cfg *cfg)
{
	struct upstream_cache *c = calloc(1, sizeof(*c));

	if (c != NULL)
		c->cfg = *cfg;
	return c;
}

void
upstream_cache_free(struct upstream_cache *c)
{
	free(c);
}

const struct cache_cfg *
upstream_cache_cfg(const struct upstream_cache *c)
{
	return &c->cfg;
}

static bool
same_str(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		return (a == NULL || *a == '\0') && (b == NULL || *b == '\0');
	return strcmp(a, b) == 0;
}

bool
upstream_cache_same_account(const struct downstream_cfg *a, const struct downstream_cfg *b)
{
	if (a == b)
		return true;
	/* Host names are case-insensitive; everything else is taken as written. */
	return strcasecmp(a->host, b->host) == 0 && strcmp(a->port, b->port) == 0 &&
	    same_str(a->user, b->user) && same_str(a->pass, b->pass) &&
	    a->tls == b->tls && a->tls_explicit == b->tls_explicit &&
	    a->tls_verify == b->tls_verify && same_str(a->tls_ca, b->tls_ca);
}

size_t
upstream_cache_count(const struct upstream_cache *c, const struct downstream_cfg *ds)
{
	const struct upstream_cache_entry *e;
	size_t n = 0;

	if (ds == NULL)
		return c->n;
	for (e = c->head; e != NULL; e = e->next)
		n += upstream_cache_same_account(e->ds, ds);
	return n;
}

bool
upstream_cache_put(struct upstream_cache *c, struct upstream_cache_entry *e)
{
	if (c->closed || e->cached || upstream_cache_count(c, e->ds) >= c->cfg.max_idle)
		return false;
	e->prev = NULL;
	e->next = c->head;
	if (c->head != NULL)
		c->head->prev = e;
	c->head = e;
	e->cached = true;
	c->n++;
	return true;
}

void
upstream_cache_remove(struct upstream_cache *c, struct upstream_cache_entry *e)
{
	if (!e->cached)
		return;
	if (e->prev != NULL)
		e->prev->next = e->next;
	else
		c->head = e->next;
	if (e->next != NULL)
		e->next->prev = e->prev;
	e->prev = e->next = NULL;
	e->cached = false;
	c->n--;
}

struct upstream *
upstream_cache_take(struct upstream_cache *c, const struct downstream_cfg *ds)
{
	struct upstream_cache_entry *e;

	for (e = c->head; e != NULL; e = e->next) {
		if (upstream_cache_same_account(e->ds, ds)) {
			upstream_cache_remove(c, e);
			return e->up;
		}
	}
	return NULL;
}

struct upstream *
upstream_cache_pop(struct upstream_cache *c)
{
	struct upstream_cache_entry *e = c->head;

	if (e == NULL)
		return NULL;
	upstream_cache_remove(c, e);
	return e->up;
}

void
upstream_cache_close(struct upstream_cache *c)
{
	c->closed = true;
}

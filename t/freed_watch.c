/* SPDX-License-Identifier: MIT */
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "freed_watch.h"

/* Test-only process state: libevent's hooks take no context argument. */
static char watched[256];
static size_t watched_len;
static unsigned hits;

static void
look(void *p)
{
	if (p != NULL && watched_len > 0 &&
	    memmem(p, malloc_usable_size(p), watched, watched_len) != NULL)
		hits++;
}

static void *
watch_malloc(size_t n)
{
	return malloc(n);
}

/* A block that moves is freed with its old contents. */
static void *
watch_realloc(void *p, size_t n)
{
	look(p);
	return realloc(p, n);
}

static void
watch_free(void *p)
{
	look(p);
	free(p);
}

void
freed_watch_install(void)
{
	event_set_mem_functions(watch_malloc, watch_realloc, watch_free);
}

void
freed_watch_secret(const char *secret)
{
	watched_len = secret != NULL ? strlen(secret) : 0;
	if (watched_len >= sizeof(watched))
		watched_len = sizeof(watched) - 1;
	memcpy(watched, secret != NULL ? secret : "", watched_len);
	hits = 0;
}

unsigned
freed_watch_hits(void)
{
	return hits;
}

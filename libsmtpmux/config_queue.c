/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_queue.h"

#define DEFAULT_MAX_SIZE (1024ull * 1024 * 1024)
#define DEFAULT_MIN_BACKOFF 60
#define DEFAULT_MAX_BACKOFF 3600
#define DEFAULT_MAX_LIFETIME (5u * 86400)   /* as Postfix's maximal_queue_lifetime */
#define DEFAULT_MAX_CONCURRENCY 10
#define MAX_CONCURRENCY_LIMIT 10000

static const cyaml_strval_t queue_mode_names[] = {
	{ "fallback", QUEUE_MODE_FALLBACK },
	{ "always", QUEUE_MODE_ALWAYS },
};

#define OPT CYAML_FLAG_OPTIONAL

const cyaml_schema_field_t config_queue_fields[] = {
	CYAML_FIELD_BOOL_PTR("enabled", OPT, struct raw_queue, enabled),
	CYAML_FIELD_ENUM_PTR("mode", OPT | CYAML_FLAG_STRICT, struct raw_queue, mode,
	    queue_mode_names, CYAML_ARRAY_LEN(queue_mode_names)),
	CYAML_FIELD_STRING_PTR("dir", OPT, struct raw_queue, dir, 1, CYAML_UNLIMITED),
	CYAML_FIELD_UINT_PTR("max_size", OPT, struct raw_queue, max_size),
	CYAML_FIELD_UINT_PTR("min_backoff", OPT, struct raw_queue, min_backoff),
	CYAML_FIELD_UINT_PTR("max_backoff", OPT, struct raw_queue, max_backoff),
	CYAML_FIELD_UINT_PTR("max_lifetime", OPT, struct raw_queue, max_lifetime),
	CYAML_FIELD_UINT_PTR("max_concurrency", OPT, struct raw_queue, max_concurrency),
	CYAML_FIELD_BOOL_PTR("bounce", OPT, struct raw_queue, bounce),
	CYAML_FIELD_UINT_PTR("delay_warning", OPT, struct raw_queue, delay_warning),
	CYAML_FIELD_END
};

const char *
config_queue_default_dir(void)
{
	return LOCALSTATEDIR "/spool/smtpmux";
}

static unsigned
uint_or(const unsigned *v, unsigned dflt)
{
	return v != NULL ? *v : dflt;
}

static int
bad(const char **key, const char *which, char *why, size_t whylen, const char *what)
{
	*key = which;
	snprintf(why, whylen, "%s", what);
	return -1;
}

static int
set_dir(struct queue_cfg *q, const char *raw, const char *base_dir)
{
	size_t len;

	if (raw == NULL)
		raw = config_queue_default_dir();
	if (raw[0] == '/' || base_dir == NULL) {
		q->dir = strdup(raw);
		return q->dir != NULL ? 0 : -1;
	}
	len = strlen(base_dir) + strlen(raw) + 2;
	if ((q->dir = malloc(len)) == NULL)
		return -1;
	snprintf(q->dir, len, "%s/%s", base_dir, raw);
	return 0;
}

int
config_queue_check(const struct raw_queue *raw, const char *base_dir,
    struct queue_cfg *q, const char **key, char *why, size_t whylen)
{
	static const struct raw_queue none;

	if (raw == NULL)
		raw = &none;
	memset(q, 0, sizeof(*q));
	q->enabled = raw->enabled == NULL || *raw->enabled;
	q->mode = raw->mode != NULL ? *raw->mode : QUEUE_MODE_FALLBACK;
	q->max_size = raw->max_size != NULL ? *raw->max_size : DEFAULT_MAX_SIZE;
	q->min_backoff = uint_or(raw->min_backoff, DEFAULT_MIN_BACKOFF);
	q->max_backoff = uint_or(raw->max_backoff, DEFAULT_MAX_BACKOFF);
	q->max_lifetime = uint_or(raw->max_lifetime, DEFAULT_MAX_LIFETIME);
	q->max_concurrency = uint_or(raw->max_concurrency, DEFAULT_MAX_CONCURRENCY);
	q->bounce = raw->bounce == NULL || *raw->bounce;
	q->delay_warning = uint_or(raw->delay_warning, 0);
	if (q->min_backoff < 1)
		return bad(key, "min_backoff", why, whylen, "must be at least 1");
	if (q->max_backoff < q->min_backoff)
		return bad(key, "max_backoff", why, whylen, "must be at least min_backoff");
	if (q->max_lifetime < 1)
		return bad(key, "max_lifetime", why, whylen, "must be at least 1");
	if (q->max_concurrency < 1 || q->max_concurrency > MAX_CONCURRENCY_LIMIT) {
		snprintf(why, whylen, "must be from 1 to %d", MAX_CONCURRENCY_LIMIT);
		*key = "max_concurrency";
		return -1;
	}
	if (set_dir(q, raw->dir, base_dir) < 0)
		return bad(key, "dir", why, whylen, "out of memory");
	return 0;
}

void
config_queue_free(struct queue_cfg *q)
{
	free(q->dir);
	q->dir = NULL;
}

/* SPDX-License-Identifier: MIT */
/*
 * Binding a configuration to the shared segments (the master only, since
 * only it can write the control segment): every downstream and user finds
 * its record by key, or gets a new one, and records get the names, weights
 * and quota windows of the configuration.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "health_layout.h"

/* What the downstreams that share one record ask of its quota windows. */
struct rec_want {
	bool seen;
	bool calendar;                   /* every one of them said calendar */
	uint32_t limit[WIN_COUNT];       /* the lowest limit of each window; 0: none */
};

static void
want_merge(struct rec_want *want, const struct downstream_cfg *ds)
{
	const uint32_t limit[WIN_COUNT] = { ds->max_per_minute, ds->max_per_hour, ds->max_per_day };
	bool calendar = ds->quota_window == QUOTA_CALENDAR;

	want->calendar = want->seen ? want->calendar && calendar : calendar;
	for (int w = 0; w < WIN_COUNT; w++)
		if (limit[w] != 0 && (want->limit[w] == 0 || limit[w] < want->limit[w]))
			want->limit[w] = limit[w];
	want->seen = true;
}

/* Record index for key, a new one if needed; -1 when the segment is full. */
static int
rec_find_or_add(struct health *h, const char *key)
{
	struct health_ctl *c = h->ctl;
	uint32_t n = health_n_recs(h);

	for (uint32_t i = 0; i < n; i++)
		if (strncmp(c->meta[i].key, key, sizeof(c->meta[i].key)) == 0)
			return (int)i;
	if (n == HEALTH_MAX_DOWNSTREAMS)
		return -1;
	memset(&c->meta[n], 0, sizeof(c->meta[n]));
	snprintf(c->meta[n].key, sizeof(c->meta[n].key), "%s", key);
	/* A worker may have scribbled on the unused record: start clean. */
	memset(&h->live->rec[n], 0, sizeof(h->live->rec[n]));
	atomic_store_explicit(&c->hdr.n_recs, n + 1, memory_order_release);
	return (int)n;
}

static int
user_find_or_add(struct health *h, const char *email)
{
	struct health_ctl *c = h->ctl;
	uint32_t n = health_n_users(h);

	for (uint32_t i = 0; i < n; i++)
		if (strncasecmp(c->user[i].email, email, sizeof(c->user[i].email)) == 0)
			return (int)i;
	if (n == HEALTH_MAX_USERS)
		return -1;
	memset(&c->user[n], 0, sizeof(c->user[n]));
	for (size_t i = 0; email[i] != '\0' && i + 1 < sizeof(c->user[n].email); i++)
		c->user[n].email[i] = (char)((email[i] >= 'A' && email[i] <= 'Z') ?
		    email[i] + 32 : email[i]);
	atomic_store(&h->live->user[n].seq, 0);
	atomic_store_explicit(&c->hdr.n_users, n + 1, memory_order_release);
	return (int)n;
}

static void
rec_label(struct health *h, uint32_t i, const struct downstream_cfg *ds, uint32_t gen)
{
	struct rec_meta *m = &h->ctl->meta[i];

	atext_store(m->name, sizeof(m->name), ds->name ? ds->name : ds->addr);
	atomic_store(&m->weight, ds->weight);
	atomic_store(&m->generation, gen);
}

static int
bind_downstream(struct health *h, struct downstream_cfg *ds, struct rec_want *want,
    uint32_t gen, size_t ui, size_t di, char *err, size_t errlen)
{
	char key[HEALTH_KEY_MAX];
	bool auth = ds->user != NULL && ds->user[0] != '\0';
	int len, i;

	len = snprintf(key, sizeof(key), "%s%s%s", ds->addr ? ds->addr : "",
	    auth ? " " : "", auth ? ds->user : "");
	if (len < 0 || (size_t)len >= sizeof(key)) {
		snprintf(err, errlen, "users[%zu].downstreams[%zu]: addr and user longer than "
		    "%zu characters", ui, di, sizeof(key) - 2);
		return -1;
	}
	if ((i = rec_find_or_add(h, key)) < 0) {
		snprintf(err, errlen, "users[%zu].downstreams[%zu]: more than %d distinct "
		    "downstreams in the state file; remove it and restart",
		    ui, di, HEALTH_MAX_DOWNSTREAMS);
		return -1;
	}
	ds->health = &h->recs[i];
	rec_label(h, (uint32_t)i, ds, gen);
	want_merge(&want[i], ds);
	return 0;
}

static int
bind_user(struct health *h, struct user_cfg *u, struct rec_want *want, uint32_t gen,
    size_t ui, char *err, size_t errlen)
{
	int i;

	if (u->email == NULL || strlen(u->email) >= HEALTH_EMAIL_MAX) {
		snprintf(err, errlen, "users[%zu].email: missing or longer than %d "
		    "characters", ui, HEALTH_EMAIL_MAX - 1);
		return -1;
	}
	if ((i = user_find_or_add(h, u->email)) < 0) {
		snprintf(err, errlen, "users[%zu]: more than %d distinct users in the "
		    "state file; remove it and restart", ui, HEALTH_MAX_USERS);
		return -1;
	}
	u->health = &h->users[i];
	for (size_t j = 0; j < u->n_downstreams; j++)
		if (bind_downstream(h, &u->downstreams[j], want, gen, ui, j, err, errlen) < 0)
			return -1;
	return 0;
}

/* Windows last: each record's limits are known only once every downstream
 * that shares it has been seen. */
static int
bind_quotas(struct health *h, const struct rec_want *want, char *err, size_t errlen)
{
	for (uint32_t i = 0; i < HEALTH_MAX_DOWNSTREAMS; i++)
		if (want[i].seen && quota_configure(h, i, want[i].limit, want[i].calendar) < 0) {
			snprintf(err, errlen, "downstream %.*s: no room left for its quota windows "
			    "(the max_per_minute, max_per_hour and max_per_day of all downstreams, "
			    "and the limits changed by reloads since the start, must add up to at "
			    "most %u)", (int)sizeof(h->ro->meta[i].key), h->ro->meta[i].key,
			    HEALTH_POOL_CELLS);
			return -1;
		}
	return 0;
}

int
health_bind(struct health *h, struct config *cfg, char *err, size_t errlen)
{
	struct rec_want *want;
	uint32_t gen;
	int rc = 0;

	if (h->ctl == NULL) {
		snprintf(err, errlen, "the state segments are read-only in this process");
		return -1;
	}
	if ((want = calloc(HEALTH_MAX_DOWNSTREAMS, sizeof(*want))) == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	gen = atomic_fetch_add(&h->ctl->hdr.generation, 1) + 1;
	for (size_t i = 0; i < cfg->n_users && rc == 0; i++)
		rc = bind_user(h, &cfg->users[i], want, gen, i, err, errlen);
	if (rc == 0)
		rc = bind_quotas(h, want, err, errlen);
	free(want);
	return rc;
}

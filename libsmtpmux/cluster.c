/* SPDX-License-Identifier: MIT */
/*
 * A worker's share of the cluster (cluster.h): the calls the relay makes,
 * mirroring what Redis says into the health segment, and the outbox of
 * ENDs that wait for the link to come back.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include "cluster.h"
#include "cluster_link.h"
#include "log.h"
#include "self_pid.h"

#define OUTBOX_MAX 100000            /* ENDs kept per worker while the link is down */
#define LEASE_MARGIN_S 60            /* beyond relay_deadline: a reservation's lease */
#define REPUBLISH_BATCH 200          /* messages per REPUBLISH call */

/* An END that waits for the link. */
struct outbox_entry {
	const struct downstream_cfg *ds;
	char member[48];
	bool delivered;
	int64_t ended_ms;                /* monotonic */
};

struct cluster {
	struct runtime *rt;
	const struct cluster_cfg *cfg;
	struct cluster_link *link;
	uint64_t instance;
	uint64_t counter;                /* members: instance:pid:counter */
	struct outbox_entry *outbox;
	size_t n_outbox, cap_outbox;
	bool outbox_overflow;            /* logged once per outage */
};

enum call_kind { CALL_SEQ, CALL_BEGIN, CALL_OTHER };

struct cluster_call {
	struct cluster *cl;
	enum call_kind kind;
	const struct downstream_cfg *ds;
	struct cluster_attempt *att;     /* BEGIN: the caller's, NULL once cancelled */
	char member[48];
	cluster_admit_fn admit;
	cluster_seq_fn seq;
	void *arg;
	bool cancelled;
};

static int64_t
mono_ms(void)
{
	return runtime_now_ms();
}

/* --- keys and arguments */

void
cluster_ds_keys(const struct cluster_cfg *cfg, const struct health_rec *rec,
    char keys[4][CLUSTER_KEY_MAX])
{
	static const char *const suffix[4] = { "health", "minute", "hour", "day" };
	char id[192];

	health_rec_key(rec, id, sizeof(id));
	for (int i = 0; i < 4; i++)
		snprintf(keys[i], CLUSTER_KEY_MAX, "%sds:{%s}:%s", cfg->key_prefix, id, suffix[i]);
}

struct args {
	const char *v[24];
	char buf[24][24];
	int n;
};

static void
arg_str(struct args *a, const char *s)
{
	a->v[a->n++] = s;
}

static void
arg_num(struct args *a, int64_t x)
{
	snprintf(a->buf[a->n], sizeof(a->buf[a->n]), "%" PRId64, x);
	a->v[a->n] = a->buf[a->n];
	a->n++;
}

static void
arg_keys(struct args *a, char keys[4][CLUSTER_KEY_MAX])
{
	for (int i = 0; i < 4; i++)
		arg_str(a, keys[i]);
}

static void
arg_limits(struct args *a, const struct health_rec *rec, bool *calendar)
{
	uint32_t limit[3];

	health_rec_windows(rec, limit, calendar);
	for (int w = 0; w < 3; w++)
		arg_num(a, limit[w]);
}

static int64_t
lease_ms(const struct cluster *cl)
{
	unsigned deadline = cl->rt->cfg->limits.relay_deadline ? cl->rt->cfg->limits.relay_deadline : 240;

	return ((int64_t)deadline + LEASE_MARGIN_S) * 1000;
}

/* --- what Redis says, mirrored */

static int64_t
state_int(const redisReply *r, size_t i)
{
	return i < r->elements && r->element[i]->type == REDIS_REPLY_INTEGER ?
	    r->element[i]->integer : 0;
}

/* A reply of BEGIN, END or MERGE: verdict, trial, window, STATE, reopens. */
static bool
reply_shape(const redisReply *r)
{
	return r != NULL && r->type == REDIS_REPLY_ARRAY &&
	    r->elements == CLUSTER_R_FIELDS;
}

/* A time of the server's clock on ours (seconds, rounded up). */
static time_t
local_time(int64_t srv, int64_t srv_now, time_t now)
{
	int64_t d = srv - srv_now;

	return now + (time_t)(d > 0 ? (d + 999) / 1000 : -((-d) / 1000));
}

/* Field i of a reply, a time of the server's clock, on ours (0 stays 0). */
static time_t
server_time(const redisReply *r, size_t i)
{
	int64_t t = state_int(r, i);

	return t > 0 ? local_time(t, state_int(r, CLUSTER_R_STATE + CLUSTER_S_NOW), time(NULL)) : 0;
}

static void
mirror(struct cluster *cl, const struct downstream_cfg *ds, const redisReply *r)
{
	size_t s = CLUSTER_R_STATE;
	int64_t srv_now = state_int(r, s + CLUSTER_S_NOW);
	int64_t open_until = state_int(r, s + CLUSTER_S_OPEN_UNTIL);
	int64_t thr = state_int(r, s + CLUSTER_S_THROTTLED_UNTIL);
	time_t now = time(NULL);
	struct health_shared sh = {
		.open = open_until > 0,
		.open_until = open_until > 0 ? local_time(open_until, srv_now, now) : 0,
		.cooldown = (uint32_t)state_int(r, s + CLUSTER_S_COOLDOWN),
		.trial_taken = state_int(r, s + CLUSTER_S_TRIAL_UNTIL) > 0,
		.throttled_until = thr > srv_now ? local_time(thr, srv_now, now) : 0,
		.fails = (uint32_t)state_int(r, s + CLUSTER_S_FAILS),
	};

	if (ds->health != NULL && cl->rt->health != NULL)
		health_mirror(ds->health, &sh, now);
}

/* --- calls */

static struct cluster_call *
call_new(struct cluster *cl, enum call_kind kind, const struct downstream_cfg *ds)
{
	struct cluster_call *c = calloc(1, sizeof(*c));

	if (c != NULL) {
		c->cl = cl;
		c->kind = kind;
		c->ds = ds;
	}
	return c;
}

static void
member_new(struct cluster *cl, char out[48])
{
	snprintf(out, 48, "%016" PRIx64 ":%ld:%" PRIu64, cl->instance, (long)self_pid(),
	    ++cl->counter);
}

static const char *
outcome_word(enum health_outcome o)
{
	switch (o) {
	case HEALTH_OK: return "ok";
	case HEALTH_FAIL: return "fail";
	case HEALTH_THROTTLED: return "throttled";
	default: return "cancelled";
	}
}

static void
on_mirror_reply(void *arg, redisReply *r)
{
	struct cluster_call *c = arg;

	if (reply_shape(r) && c->ds != NULL)
		mirror(c->cl, c->ds, r);
	free(c);
}

/* END of member: mode "full" (health counted), "replay" (quota and its own
 * trial only). ago_ms: how long ago the attempt ended. */
static int
send_end(struct cluster *cl, const struct downstream_cfg *ds, const char *member,
    enum health_outcome outcome, int64_t ago_ms, const char *mode)
{
	const struct health_cfg *hc = &cl->rt->cfg->health;
	char keys[4][CLUSTER_KEY_MAX];
	struct args a = { .n = 0 };
	struct cluster_call *c;
	bool calendar;

	if ((c = call_new(cl, CALL_OTHER, ds)) == NULL)
		return -1;
	cluster_ds_keys(cl->cfg, ds->health, keys);
	arg_keys(&a, keys);
	arg_num(&a, 0);
	arg_str(&a, member);
	arg_str(&a, outcome_word(outcome));
	arg_num(&a, ago_ms > 0 ? ago_ms : 0);
	arg_str(&a, mode);
	arg_limits(&a, ds->health, &calendar);
	arg_str(&a, calendar ? "1" : "0");
	arg_num(&a, hc->fail_threshold);
	arg_num(&a, hc->cooldown);
	arg_num(&a, hc->max_cooldown);
	arg_num(&a, hc->throttle_backoff);
	arg_num(&a, lease_ms(cl));
	if (link_script(cl->link, CLUSTER_END, 4, a.n, a.v, NULL, on_mirror_reply, c) < 0) {
		free(c);
		return -1;
	}
	return 0;
}

static void
on_seq(void *arg, redisReply *r)
{
	struct cluster_call *c = arg;

	if (!c->cancelled) {
		if (r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer > 0)
			c->seq(c->arg, true, (uint64_t)r->integer - 1);
		else
			c->seq(c->arg, false, 0);
	}
	free(c);
}

struct cluster_call *
cluster_sequence(struct cluster *cl, const struct user_cfg *u, cluster_seq_fn fn, void *arg)
{
	char key[CLUSTER_KEY_MAX], email[256];
	const char *argv[2];
	struct cluster_call *c;
	size_t i;

	if (!cluster_active(cl) || (c = call_new(cl, CALL_SEQ, NULL)) == NULL)
		return NULL;
	for (i = 0; u->email[i] != '\0' && i + 1 < sizeof(email); i++)
		email[i] = (char)((u->email[i] >= 'A' && u->email[i] <= 'Z') ?
		    u->email[i] + 32 : u->email[i]);
	email[i] = '\0';
	snprintf(key, sizeof(key), "%suser:{%s}:seq", cl->cfg->key_prefix, email);
	argv[0] = "INCR";
	argv[1] = key;
	c->seq = fn;
	c->arg = arg;
	if (link_call(cl->link, 2, argv, NULL, on_seq, c) < 0) {
		free(c);
		return NULL;
	}
	return c;
}

static const char *
refusal(enum cluster_verdict v)
{
	switch (v) {
	case CLUSTER_DOWN: return "circuit open (cluster)";
	case CLUSTER_THROTTLED: return "throttled (cluster)";
	case CLUSTER_TRIAL_TAKEN: return "half-open, trial in progress (cluster)";
	default: return "over quota (cluster)";
	}
}

static void
on_begin(void *arg, redisReply *r)
{
	struct cluster_call *c = arg;
	struct cluster *cl = c->cl;
	enum cluster_verdict v;

	if (!reply_shape(r)) {
		if (!c->cancelled) {
			health_count_local_decision(cl->rt->health);
			c->admit(c->arg, CLUSTER_ADMIT_LOCAL, "no answer from the cluster");
		}
		free(c);
		return;
	}
	mirror(cl, c->ds, r);
	v = (enum cluster_verdict)state_int(r, CLUSTER_R_VERDICT);
	if (c->cancelled) {
		/* The relay is gone: an admission it will never use goes back. */
		if (v == CLUSTER_ADMITTED)
			(void)send_end(cl, c->ds, c->member, HEALTH_CANCELLED, 0, "full");
	} else {
		c->att->uncertain = false;
		if (v == CLUSTER_ADMITTED) {
			c->att->shared = true;
			c->att->trial = state_int(r, CLUSTER_R_TRIAL) == 1;
			c->admit(c->arg, CLUSTER_ADMIT_OK, NULL);
		} else {
			if (v == CLUSTER_OVER_QUOTA)
				c->att->reopens = server_time(r, CLUSTER_R_REOPENS);
			c->admit(c->arg, v == CLUSTER_OVER_QUOTA ? CLUSTER_ADMIT_OVER_QUOTA :
			    CLUSTER_ADMIT_LATER, refusal(v));
		}
	}
	free(c);
}

struct cluster_call *
cluster_admit(struct cluster *cl, const struct downstream_cfg *ds, bool gated,
    struct cluster_attempt *att, cluster_admit_fn fn, void *arg)
{
	char keys[4][CLUSTER_KEY_MAX];
	struct args a = { .n = 0 };
	struct cluster_call *c;
	bool calendar;

	memset(att, 0, sizeof(*att));
	if (cl == NULL)
		return NULL;
	member_new(cl, att->member);
	if (!cluster_active(cl) || ds->health == NULL ||
	    (c = call_new(cl, CALL_BEGIN, ds)) == NULL) {
		health_count_local_decision(cl->rt->health);
		return NULL;
	}
	memcpy(c->member, att->member, sizeof(c->member));
	c->att = att;
	c->admit = fn;
	c->arg = arg;
	cluster_ds_keys(cl->cfg, ds->health, keys);
	arg_keys(&a, keys);
	arg_num(&a, 0);
	arg_str(&a, gated ? "1" : "0");
	arg_str(&a, att->member);
	arg_num(&a, lease_ms(cl));
	arg_limits(&a, ds->health, &calendar);
	if (link_script(cl->link, CLUSTER_BEGIN, 4, a.n, a.v, NULL, on_begin, c) < 0) {
		free(c);
		health_count_local_decision(cl->rt->health);
		return NULL;
	}
	att->uncertain = true;
	return c;
}

void
cluster_call_cancel(struct cluster_call *c)
{
	if (c == NULL)
		return;
	c->cancelled = true;
	c->att = NULL;
}

/* --- the outbox */

static void
outbox_add(struct cluster *cl, const struct downstream_cfg *ds, const char *member,
    bool delivered)
{
	if (cl->n_outbox == cl->cap_outbox) {
		size_t cap = cl->cap_outbox ? cl->cap_outbox * 2 : 64;
		struct outbox_entry *o;

		if (cap > OUTBOX_MAX || (o = realloc(cl->outbox, cap * sizeof(*o))) == NULL) {
			if (!cl->outbox_overflow)
				log_warn("cluster: %zu attempts wait for the link already; later ones "
				    "will not count in the cluster's quotas", cl->n_outbox);
			cl->outbox_overflow = true;
			return;
		}
		cl->outbox = o;
		cl->cap_outbox = cap;
	}
	cl->outbox[cl->n_outbox] = (struct outbox_entry){ .ds = ds, .delivered = delivered,
		.ended_ms = mono_ms() };
	snprintf(cl->outbox[cl->n_outbox].member, sizeof(cl->outbox[0].member), "%s", member);
	cl->n_outbox++;
}

bool
cluster_end(struct cluster *cl, const struct downstream_cfg *ds, struct cluster_attempt *att,
    enum health_outcome outcome)
{
	bool delivered = outcome == HEALTH_OK;

	if (cl == NULL || ds->health == NULL || att->member[0] == '\0')
		return false;
	/* Decided locally, nothing sent, nothing delivered: nothing to tell. */
	if (!att->shared && !att->uncertain && !delivered)
		return false;
	if (cluster_active(cl) && send_end(cl, ds, att->member, outcome, 0,
	    att->shared ? "full" : "replay") == 0)
		return att->shared;
	outbox_add(cl, ds, att->member, delivered);
	return false;
}

static void
outbox_replay(struct cluster *cl)
{
	int64_t now = mono_ms();
	size_t sent = 0, delivered = 0;

	for (size_t i = 0; i < cl->n_outbox; i++) {
		struct outbox_entry *e = &cl->outbox[i];

		if (send_end(cl, e->ds, e->member, e->delivered ? HEALTH_OK : HEALTH_CANCELLED,
		    now - e->ended_ms, "replay") == 0) {
			sent++;
			delivered += e->delivered;
		}
	}
	if (cl->n_outbox > 0)
		log_info("cluster: reconciled: %zu attempt(s) of the outage replayed, %zu of them "
		    "delivered messages", sent, delivered);
	cl->n_outbox = 0;
	cl->outbox_overflow = false;
}

/* --- reconciling after Redis lost its data */

struct republish {
	struct cluster *cl;
	const struct downstream_cfg *ds;
	char keys[4][CLUSTER_KEY_MAX];
	char *member[3];                 /* REPUBLISH_BATCH names and expiries per window */
	char *expiry[3];
	unsigned n[3];
	size_t total;
	time_t now;
};

static void
on_republished(void *arg, redisReply *r)
{
	(void)r;
	free(arg);
}

static void
republish_flush(struct republish *rp, unsigned w)
{
	static const int64_t span[3] = { 60000, 3600000, 86400000 };
	const char *argv[4 + 2 * REPUBLISH_BATCH];
	struct cluster_call *c;
	char now0[2] = "0", sp[24], lease[24];
	int n = 0;

	if (rp->n[w] == 0)
		return;
	snprintf(sp, sizeof(sp), "%" PRId64, span[w]);
	snprintf(lease, sizeof(lease), "%" PRId64, lease_ms(rp->cl));
	argv[n++] = rp->keys[w + 1];
	argv[n++] = now0;
	argv[n++] = sp;
	argv[n++] = lease;
	for (unsigned i = 0; i < rp->n[w]; i++) {
		argv[n++] = rp->member[w] + (size_t)i * 48;
		argv[n++] = rp->expiry[w] + (size_t)i * 24;
	}
	if ((c = call_new(rp->cl, CALL_OTHER, NULL)) != NULL &&
	    link_script(rp->cl->link, CLUSTER_REPUBLISH, 1, n, argv, NULL, on_republished, c) < 0)
		free(c);
	rp->total += rp->n[w];
	rp->n[w] = 0;
}

static void
republish_cell(void *arg, unsigned w, uint32_t index, time_t until)
{
	struct republish *rp = arg;
	unsigned i = rp->n[w];

	if (until <= rp->now || w > 2)
		return;
	snprintf(rp->member[w] + (size_t)i * 48, 48, "%016" PRIx64 ":cell:%" PRIu32,
	    rp->cl->instance, index);
	snprintf(rp->expiry[w] + (size_t)i * 24, 24, "%" PRId64, (int64_t)(until - rp->now) * 1000);
	if (++rp->n[w] == REPUBLISH_BATCH)
		republish_flush(rp, w);
}

/* The records of this worker's configuration, each once. */
typedef void (*rec_fn)(struct cluster *, const struct downstream_cfg *);

static void
each_record(struct cluster *cl, rec_fn fn)
{
	const struct config *cfg = cl->rt->cfg;

	for (size_t u = 0; u < cfg->n_users; u++)
		for (size_t d = 0; d < cfg->users[u].n_downstreams; d++) {
			const struct downstream_cfg *ds = &cfg->users[u].downstreams[d];
			bool seen = false;

			for (size_t pu = 0; pu <= u && !seen; pu++)
				for (size_t pd = 0; pd < cfg->users[pu].n_downstreams && !seen; pd++) {
					if (pu == u && pd == d)
						break;
					seen = cfg->users[pu].downstreams[pd].health == ds->health;
				}
			if (!seen && ds->health != NULL)
				fn(cl, ds);
		}
}

static void
republish_record(struct cluster *cl, const struct downstream_cfg *ds)
{
	struct republish *rp = calloc(1, sizeof(*rp));
	bool ok = rp != NULL;

	for (int w = 0; ok && w < 3; w++) {
		rp->member[w] = malloc((size_t)REPUBLISH_BATCH * 48);
		rp->expiry[w] = malloc((size_t)REPUBLISH_BATCH * 24);
		ok = rp->member[w] != NULL && rp->expiry[w] != NULL;
	}
	if (ok) {
		rp->cl = cl;
		rp->ds = ds;
		rp->now = time(NULL);
		cluster_ds_keys(cl->cfg, ds->health, rp->keys);
		health_rec_counted(ds->health, rp->now, republish_cell, rp);
		for (unsigned w = 0; w < 3; w++)
			republish_flush(rp, w);
		if (rp->total > 0)
			log_info("cluster: Redis lost its data: %zu message(s) of relay=%s counted again",
			    rp->total, ds->name);
	}
	for (int w = 0; rp != NULL && w < 3; w++) {
		free(rp->member[w]);
		free(rp->expiry[w]);
	}
	free(rp);
}

/* This instance's circuits and throttles join the cluster's. */
static void
merge_record(struct cluster *cl, const struct downstream_cfg *ds)
{
	char keys[4][CLUSTER_KEY_MAX];
	struct health_shared sh;
	struct args a = { .n = 0 };
	struct cluster_call *c;
	time_t now = time(NULL);

	if ((c = call_new(cl, CALL_OTHER, ds)) == NULL)
		return;
	health_shared_of(ds->health, now, &sh);
	cluster_ds_keys(cl->cfg, ds->health, keys);
	arg_str(&a, keys[0]);
	arg_num(&a, 0);
	arg_num(&a, sh.open && sh.open_until > now ? (int64_t)(sh.open_until - now) * 1000 : 0);
	arg_num(&a, sh.cooldown);
	arg_num(&a, sh.throttled_until > now ? (int64_t)(sh.throttled_until - now) * 1000 : 0);
	if (link_script(cl->link, CLUSTER_MERGE, 1, a.n, a.v, NULL, on_mirror_reply, c) < 0)
		free(c);
}

/* --- the link's hooks */

static void
on_link_up(void *arg, bool epoch_changed)
{
	struct cluster *cl = arg;

	health_link_set(cl->rt->health, cl->rt->worker_slot, HEALTH_LINK_UP, time(NULL));
	if (epoch_changed) {
		/* Everything the outbox holds is in our own windows too. */
		cl->n_outbox = 0;
		cl->outbox_overflow = false;
		each_record(cl, republish_record);
	} else {
		outbox_replay(cl);
	}
	each_record(cl, merge_record);
}

static void
on_link_down(void *arg)
{
	struct cluster *cl = arg;

	health_link_set(cl->rt->health, cl->rt->worker_slot, HEALTH_LINK_DOWN, time(NULL));
}

static const struct link_hooks hooks = { on_link_up, on_link_down };

/* --- life cycle */

struct cluster *
cluster_new(struct runtime *rt)
{
	struct cluster *cl;

	if (rt->cfg == NULL || !rt->cfg->cluster.enabled)
		return NULL;
	if ((cl = calloc(1, sizeof(*cl))) == NULL)
		return NULL;
	cl->rt = rt;
	cl->cfg = &rt->cfg->cluster;
	cl->instance = rt->health != NULL ? health_instance(rt->health) : (uint64_t)self_pid();
	health_link_set(rt->health, rt->worker_slot, HEALTH_LINK_DOWN, time(NULL));
	if ((cl->link = link_new(rt->base, rt->dns, cl->cfg, rt->cfg->tmp_dir, &hooks, cl,
	    false)) == NULL) {
		free(cl);
		return NULL;
	}
	return cl;
}

static void
flush_timeout(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	*(bool *)arg = true;
}

void
cluster_flush(struct cluster *cl)
{
	struct timeval tv;
	struct event *ev;
	bool over = false;

	if (cl == NULL || link_pending(cl->link) == 0)
		return;
	tv.tv_sec = cl->cfg->timeout_ms / 1000;
	tv.tv_usec = (suseconds_t)(cl->cfg->timeout_ms % 1000) * 1000;
	if ((ev = evtimer_new(cl->rt->base, flush_timeout, &over)) == NULL)
		return;
	evtimer_add(ev, &tv);
	while (!over && link_pending(cl->link) > 0)
		event_base_loop(cl->rt->base, EVLOOP_ONCE);
	event_free(ev);
}

void
cluster_free(struct cluster *cl)
{
	if (cl == NULL)
		return;
	link_free(cl->link);
	health_link_set(cl->rt->health, cl->rt->worker_slot, HEALTH_LINK_NONE, time(NULL));
	free(cl->outbox);
	free(cl);
}

bool
cluster_active(const struct cluster *cl)
{
	return cl != NULL && link_is_up(cl->link);
}

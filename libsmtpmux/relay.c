/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

#include <event2/event.h>

#include "cluster.h"
#include "health.h"
#include "log.h"
#include "relay.h"
#include "selector_host.h"
#include "token_table.h"

/*
 * A relay walks the order the selector chose and makes one attempt at a
 * time, all within one deadline (limits.relay_deadline) counted from the
 * final dot. The verdict the client hears:
 *   - 250 as soon as one downstream answered the final dot with 2xx;
 *   - 451 4.4.1 when any attempt failed temporarily, was throttled (quota
 *     replies are often 5xx and must fail over, not bounce), failed before
 *     the transaction (connect, TLS, greeting, EHLO, AUTH: a problem of the
 *     downstream, not of the message), or when a downstream was skipped for
 *     its quota or for want of time, or no downstream was tried at all;
 *   - otherwise, if some downstream refused the message itself (5xx to
 *     MAIL, RCPT, DATA or the dot): the last such code, with generic text;
 *   - otherwise no downstream could take the message (no 8BITMIME for an
 *     8-bit body: 554 5.6.3; a SIZE limit below it: 552 5.3.4), which no
 *     retry changes.
 *
 * With early connect, a relay is prepared at the first RCPT: the order is
 * chosen then, and a session to its first downstream logs in while the
 * client sends the message. Health is only touched per attempt, at the dot.
 *
 * With a cluster (cluster.h) two steps wait for Redis, each bounded by
 * cluster.timeout_ms and decided locally when no answer comes: the user's
 * message number before the selector runs, and each attempt's admission
 * (circuit, throttle, trial and quotas of all instances) before it starts.
 */

struct relay {
	struct runtime *rt;
	const struct user_cfg *user;
	const struct upstream_msg *msg;
	const char *client;                  /* the client's address, for logs; may be NULL */
	uint64_t size;
	relay_done_fn done;
	void *arg;

	size_t *order;
	size_t n_order, next;
	size_t *later;                       /* refused by their health: last resorts */
	size_t n_later, next_later;
	struct event *kick;                  /* next step runs from the loop */

	struct upstream *up;                 /* attempt in progress */
	const struct downstream_cfg *cur;
	time_t cur_started;
	int64_t deadline_ms;                 /* runtime_now_ms() scale */

	struct upstream *early;              /* early session to order[early_idx] */
	size_t early_idx;

	/* With a cluster: the call the relay waits for, and what waits on it. */
	struct cluster_call *pending;
	bool ordered;                        /* the selector has run */
	bool begun;                          /* relay_begin() was called */
	bool prepared;                       /* relay_prepare(): connect early once ordered */
	struct envelope_copy {               /* prepare's envelope, for a late selector */
		char *mail_from;
		char **rcpts;
		size_t n_rcpts;
		enum smtp_body body;
	} env;
	size_t cand;                         /* the downstream being admitted */
	bool cand_last_resort;
	time_t cand_now;
	struct cluster_attempt att;          /* the attempt under way, as the cluster knows it */

	unsigned attempts;
	bool dot_sent;                       /* an attempt that failed had sent its dot */
	bool retry_later;                    /* some failure was not the message's fault */
	time_t quota_reopens;                /* earliest reopening of the quotas that skipped */
	const char *failed_relay;            /* the last failed attempt, for the queue */
	char failed_text[SMTP_REPLY_TEXT_MAX];
	bool have_perm;
	struct upstream_result perm;         /* last message-level refusal */
	const struct downstream_cfg *perm_ds;
	bool have_skip;
	struct upstream_result skip;         /* last downstream that could not take it */
	struct timeval t0;
};

static void relay_step(evutil_socket_t, short, void *);
static void attempt_done(void *arg, const struct upstream_result *res);

/* --- health ------------------------------------------------------------------ */

static const struct health_cfg *
health_cfg_of(const struct relay *r)
{
	static const struct health_cfg dflt = { 3, 30, 600, 60 };

	return r->rt->cfg != NULL ? &r->rt->cfg->health : &dflt;
}

static bool
has_health(const struct relay *r, const struct downstream_cfg *ds)
{
	return r->rt->health != NULL && ds->health != NULL;
}

static void
fill_view(const struct relay *r, const struct downstream_cfg *ds, time_t now,
    struct smtpmux_downstream_view *v)
{
	if (has_health(r, ds)) {
		health_view(ds->health, ds, health_cfg_of(r), now, v);
		return;
	}
	/* No shared segment (unit tests): everything is up and unlimited. */
	memset(v, 0, sizeof(*v));
	v->name = ds->name;
	v->addr = ds->addr;
	v->weight = ds->weight ? ds->weight : 1;
	v->state = SMTPMUX_DS_UP;
	v->quota_left = -1;
	v->available = 1;
}

/* --- logging ------------------------------------------------------------------- */

static unsigned
ms_since(const struct timeval *t0)
{
	struct timeval now, d;

	gettimeofday(&now, NULL);
	timersub(&now, t0, &d);
	return d.tv_sec < 0 ? 0 : (unsigned)d.tv_sec * 1000 + (unsigned)(d.tv_usec / 1000);
}

static const char *
status_word(const struct upstream_result *res)
{
	if (res->skipped)
		return "skipped";
	return res->status == UPSTREAM_OK ? "sent" :
	    res->status == UPSTREAM_TEMPFAIL ? "deferred" : "bounced";
}

static const char *
clean(char *dst, size_t len, const char *src)
{
	return log_sanitize(dst, len, src != NULL ? src : "", src != NULL ? strlen(src) : 0);
}

static void
log_attempt(const struct relay *r, const struct downstream_cfg *ds,
    const struct upstream_result *res)
{
	char text[SMTP_REPLY_TEXT_MAX], tls[sizeof(res->tls_desc)], use[32] = "";

	/* Postfix's conn_use: the session's n-th message, for reused ones. */
	if (res->conn_use > 1)
		snprintf(use, sizeof(use), " conn_use=%u", res->conn_use);
	log_info("id=%s relay=%s[%s] attempt=%u stage=%s status=%s%s delay=%u.%03u "
	    "tls=%s (%d%s%s %s)", r->msg->id, ds->name, ds->addr, r->attempts,
	    res->stage, status_word(res), use, res->latency_ms / 1000,
	    res->latency_ms % 1000,
	    res->tls_desc[0] ? clean(tls, sizeof(tls), res->tls_desc) : "none",
	    res->code, res->enhanced[0] ? " " : "", res->enhanced,
	    clean(text, sizeof(text), res->text));
}

/* health_begin() said no; the view says why, for the log. */
static const char *
refusal_reason(const struct relay *r, const struct downstream_cfg *ds, time_t now)
{
	struct smtpmux_downstream_view v;

	fill_view(r, ds, now, &v);
	return v.state == SMTPMUX_DS_DOWN ? "circuit open" :
	    v.state == SMTPMUX_DS_THROTTLED ? "throttled" :
	    v.quota_left == 0 ? "over quota" :
	    v.state == SMTPMUX_DS_HALF_OPEN ? "half-open, trial in progress" : "unavailable";
}

static void
log_skipped(const struct relay *r, const struct downstream_cfg *ds, const char *stage,
    const char *why)
{
	log_info("id=%s relay=%s[%s] attempt=%u stage=%s status=skipped delay=0.000 "
	    "tls=none (0 %s)", r->msg->id, ds->name, ds->addr, r->attempts + 1, stage, why);
}

/* "<a>,<b>,..." truncated with ",..." so that one line stays readable. */
static void
format_rcpts(const struct upstream_msg *msg, char *out, size_t outlen)
{
	char one[SMTP_PATH_MAX + 1];
	size_t used = 0, i;
	int n;

	out[0] = '\0';
	for (i = 0; i < msg->n_rcpts; i++) {
		clean(one, sizeof(one), msg->rcpts[i]);
		if (used + strlen(one) + 8 >= outlen) {
			snprintf(out + used, outlen - used, "%s...", i > 0 ? "," : "");
			return;
		}
		n = snprintf(out + used, outlen - used, "%s<%s>", i > 0 ? "," : "", one);
		used += (size_t)n;
	}
}

/*
 * The one line per message. For a client's message it is also the
 * session's: its id first, the client's address, and in parentheses the
 * reply the client is given (smtp_server.c answers with exactly this).
 */
static void
log_final(const struct relay *r, const struct relay_result *res, const char *status)
{
	char from[SMTP_PATH_MAX + 1], to[512], text[SMTP_REPLY_TEXT_MAX], user[128];
	char session[32] = "", client[80] = "";
	unsigned ms = ms_since(&r->t0);

	if (r->msg->session != NULL && r->msg->session[0] != '\0') {
		snprintf(session, sizeof(session), "%s: ", r->msg->session);
		if (r->client != NULL && r->client[0] != '\0')
			snprintf(client, sizeof(client), " client=[%s]", r->client);
	}
	format_rcpts(r->msg, to, sizeof(to));
	log_info("%sid=%s%s user=%s from=<%s> to=%s nrcpt=%zu size=%llu relay=%s attempts=%u "
	    "status=%s%s delay=%u.%03u (%d %s %s)", session, r->msg->id, client,
	    clean(user, sizeof(user), r->user->email), clean(from, sizeof(from), r->msg->mail_from),
	    to, r->msg->n_rcpts, (unsigned long long)r->size,
	    res->relay[0] ? res->relay : "none", r->attempts, status,
	    r->msg->from_queue ? " queued=yes" : "", ms / 1000, ms % 1000,
	    res->code, res->enhanced, clean(text, sizeof(text), res->text));
}

/* --- verdict ---------------------------------------------------------------------- */

/* Failures at these stages are about the message, not about the downstream. */
static bool
message_stage(const char *stage)
{
	return stage != NULL && (strcmp(stage, "mail") == 0 || strcmp(stage, "rcpt") == 0 ||
	    strcmp(stage, "data") == 0 || strcmp(stage, "dot") == 0);
}

/*
 * Replaces every occurrence of secret in s with "***", case-insensitively:
 * a downstream may echo the account name in its reply text.
 */
static void
mask(char *s, size_t size, const char *secret)
{
	size_t n, rest;
	char *p;

	if (secret == NULL || (n = strlen(secret)) < 3)
		return;
	for (p = s; (p = strcasestr(p, secret)) != NULL; p += 3) {
		rest = strlen(p + n) + 1;
		if ((size_t)(p - s) + 3 + rest > size)
			break;
		memmove(p + 3, p + n, rest);
		memcpy(p, "***", 3);
	}
}

/* Masked before it is cut short: a secret cut in two would not match. */
static void
perm_text(const struct relay *r, char *out, size_t len)
{
	char full[sizeof(r->perm.text)], text[200];

	snprintf(full, sizeof(full), "%s", r->perm.text);
	mask(full, sizeof(full), r->perm_ds->pass);
	mask(full, sizeof(full), r->perm_ds->user);
	clean(text, sizeof(text), full);
	snprintf(out, len, "Message rejected by downstream: %s", text);
}

static void
envelope_free(struct envelope_copy *e)
{
	for (size_t i = 0; i < e->n_rcpts; i++)
		free(e->rcpts[i]);
	free(e->rcpts);
	free(e->mail_from);
	memset(e, 0, sizeof(*e));
}

/* relay_prepare()'s envelope is the caller's for that call only: the
 * selector may run later, when the cluster's sequence number comes. */
static int
envelope_keep(struct envelope_copy *e, const struct upstream_msg *env)
{
	e->body = env->body;
	if ((e->mail_from = strdup(env->mail_from != NULL ? env->mail_from : "")) == NULL ||
	    (e->rcpts = calloc(env->n_rcpts + 1, sizeof(*e->rcpts))) == NULL)
		return -1;
	for (; e->n_rcpts < env->n_rcpts; e->n_rcpts++)
		if ((e->rcpts[e->n_rcpts] = strdup(env->rcpts[e->n_rcpts])) == NULL)
			return -1;
	return 0;
}

static void end_health(struct relay *r, const struct downstream_cfg *ds, time_t begun,
    enum health_outcome outcome, unsigned latency_ms, const char *error);

static void
relay_free(struct relay *r)
{
	if (r->pending != NULL) {
		cluster_call_cancel(r->pending);
		/* An admission under way holds this instance's quota cells (the
		 * cluster gives back its own if it admits the attempt now). */
		if (r->ordered && has_health(r, &r->user->downstreams[r->cand]))
			health_end_shared(r->user->downstreams[r->cand].health, health_cfg_of(r),
			    r->rt->worker_slot, r->cand_now, r->cand_now, HEALTH_CANCELLED, 0, NULL);
	}
	upstream_release(r->early);
	envelope_free(&r->env);
	free(r->order);
	free(r->later);
	event_free(r->kick);
	free(r);
}

static void
finish(struct relay *r, bool ok)
{
	struct relay_result res;
	relay_done_fn done = r->done;
	void *arg = r->arg;
	const char *status;
	char text[200];

	memset(&res, 0, sizeof(res));
	if (ok) {
		res.ok = true;
		res.code = 250;
		snprintf(res.enhanced, sizeof(res.enhanced), "2.0.0");
		snprintf(res.text, sizeof(res.text), "Ok: queued as %s", r->msg->id);
		snprintf(res.relay, sizeof(res.relay), "%s", r->cur->name);
		status = "sent";
	} else if (r->retry_later || (!r->have_perm && !r->have_skip)) {
		res.temporary = true;
		res.quota_reopens = r->attempts == 0 ? r->quota_reopens : 0;
		res.code = 451;
		snprintf(res.enhanced, sizeof(res.enhanced), "4.4.1");
		snprintf(res.text, sizeof(res.text), "Requested action aborted: "
		    "no downstream accepted the message, try again later");
		status = "deferred";
	} else if (r->have_perm) {
		res.code = r->perm.code >= 500 && r->perm.code < 600 ? r->perm.code : 554;
		snprintf(res.enhanced, sizeof(res.enhanced), "%s",
		    r->perm.enhanced[0] == '5' ? r->perm.enhanced : "5.0.0");
		perm_text(r, res.text, sizeof(res.text));
		status = "bounced";
	} else {
		res.code = r->skip.code;
		snprintf(res.enhanced, sizeof(res.enhanced), "%s", r->skip.enhanced);
		snprintf(res.text, sizeof(res.text), "No downstream can take this message: %s",
		    clean(text, sizeof(text), r->skip.text));
		status = "bounced";
	}
	if (!ok && r->failed_relay != NULL) {
		snprintf(res.failed_relay, sizeof(res.failed_relay), "%s", r->failed_relay);
		snprintf(res.failed_text, sizeof(res.failed_text), "%s", r->failed_text);
	}
	log_final(r, &res, status);
	relay_free(r);
	done(arg, &res);
}

/* The last failure, as the queue keeps it: "451 4.7.0 text" or the reason. */
static void
note_failure(struct relay *r, const struct downstream_cfg *ds, int code, const char *enhanced,
    const char *text)
{
	char clean_text[SMTP_REPLY_TEXT_MAX - 32];   /* room for "451 4.7.0 " */

	clean(clean_text, sizeof(clean_text), text);
	r->failed_relay = ds->name;
	if (code > 0)
		snprintf(r->failed_text, sizeof(r->failed_text), "%d%s%s %s", code,
		    enhanced != NULL && enhanced[0] ? " " : "", enhanced != NULL ? enhanced : "",
		    clean_text);
	else
		snprintf(r->failed_text, sizeof(r->failed_text), "%s", clean_text);
}

/*
 * Ends an attempt begun at `begun` in the health segment and, with a
 * cluster, in Redis: when the cluster took its END, its circuit and
 * throttle effects are the cluster's (mirrored back with the reply).
 */
static void
end_health(struct relay *r, const struct downstream_cfg *ds, time_t begun,
    enum health_outcome outcome, unsigned latency_ms, const char *error)
{
	time_t now = time(NULL);

	if (!has_health(r, ds))
		return;
	if (cluster_end(r->rt->cluster, ds, &r->att, outcome))
		health_end_shared(ds->health, health_cfg_of(r), r->rt->worker_slot, begun, now,
		    outcome, latency_ms, error);
	else
		health_end_since(ds->health, ds, health_cfg_of(r), r->rt->worker_slot, begun, now,
		    outcome, latency_ms, error);
	memset(&r->att, 0, sizeof(r->att));
}

/*
 * Ends the health bookkeeping of an attempt that produced no verdict
 * (cancelled because the client left or the worker stops, or never
 * started): the in-flight count, quota reservation and half-open trial are
 * given back, and neither a success nor a failure is counted, so a client
 * that leaves early can neither poison nor whitewash a downstream.
 */
static void
release_attempt(struct relay *r, const struct downstream_cfg *ds, const char *why)
{
	end_health(r, ds, r->cur_started, HEALTH_CANCELLED, 0, why);
}

/* --- attempts ---------------------------------------------------------------------- */

static void
attempt_done(void *arg, const struct upstream_result *res)
{
	struct relay *r = arg;
	const struct downstream_cfg *ds = r->cur;
	enum health_outcome outcome;
	struct timeval now = { 0, 0 };
	struct upstream_result masked = *res;

	r->up = NULL;
	/* The log and the state file's last error are no place for an echo
	 * of the credentials either. */
	mask(masked.text, sizeof(masked.text), ds->pass);
	mask(masked.text, sizeof(masked.text), ds->user);
	if (res->skipped) {
		/* Nothing was sent, and the downstream did nothing wrong. */
		release_attempt(r, ds, "cannot take this message");
		log_attempt(r, ds, &masked);
		r->have_skip = true;
		r->skip = masked;
		evtimer_add(r->kick, &now);
		return;
	}
	outcome = res->status == UPSTREAM_OK ? HEALTH_OK :
	    res->throttle ? HEALTH_THROTTLED : HEALTH_FAIL;
	end_health(r, ds, r->cur_started, outcome, res->latency_ms,
	    res->status == UPSTREAM_OK ? NULL : masked.text);
	log_attempt(r, ds, &masked);
	if (res->status == UPSTREAM_OK) {
		finish(r, true);
		return;
	}
	note_failure(r, ds, masked.code, masked.enhanced, masked.text);
	if (res->stage != NULL && strcmp(res->stage, "dot") == 0)
		r->dot_sent = true;
	if (res->status == UPSTREAM_TEMPFAIL || res->throttle || !message_stage(res->stage))
		r->retry_later = true;
	else {
		r->have_perm = true;
		r->perm = *res;
		r->perm_ds = ds;
	}
	/* From the loop: we are inside the attempt's callback. */
	evtimer_add(r->kick, &now);
}

/*
 * A downstream skipped for its quota: when may it take a message again?
 * When this instance's windows and the cluster's (cluster_reopens, 0 when
 * it did not refuse) both have room: the later of the two.
 */
static void
note_quota(struct relay *r, const struct downstream_cfg *ds, time_t now, time_t cluster_reopens)
{
	time_t reopens = health_quota_reopens(ds->health, ds, now);

	if (cluster_reopens > reopens)
		reopens = cluster_reopens;

	if (reopens > 0 && (r->quota_reopens == 0 || reopens < r->quota_reopens))
		r->quota_reopens = reopens;
	note_failure(r, ds, 0, NULL, "over quota");
}

/*
 * A further attempt is begun only while the time left covers it: twice the
 * downstream's average delivery time, and at least a second. One cut short
 * after its final dot could deliver a message the client is told failed.
 * The first attempt has the whole deadline, whatever it is.
 */
static bool
deadline_covers(const struct relay *r, const struct downstream_cfg *ds, time_t now,
    int64_t *left)
{
	struct smtpmux_downstream_view v;
	int64_t need;

	*left = r->deadline_ms - runtime_now_ms();
	if (r->attempts == 0)
		return true;
	fill_view(r, ds, now, &v);
	need = 2 * (int64_t)v.latency_ms;
	if (need < 1000)
		need = 1000;
	return *left >= need;
}

/*
 * A downstream that logs in with an OAuth token it has not got (yet, or
 * any more) could only fail: it is skipped like a down one, even as a last
 * resort, and the client is told to try again later.
 */
static bool
token_ready(struct relay *r, const struct downstream_cfg *ds)
{
	char why[TOKEN_ERROR_MAX + 32];

	if (token_table_ready(r->rt->tokens, ds, token_clock_ms(), why, sizeof(why)))
		return true;
	log_skipped(r, ds, "auth", why);
	r->retry_later = true;
	return false;
}

static struct upstream *
attempt_start(struct relay *r, const struct downstream_cfg *ds, size_t idx)
{
	struct upstream *up;

	if (r->early != NULL && r->early_idx == idx) {
		up = r->early;
		r->early = NULL;
		upstream_adopt(up, r->msg, r->deadline_ms, attempt_done, r);
		return up;
	}
	return upstream_start(r->rt, ds, r->msg, r->deadline_ms, attempt_done, r);
}

/* What becomes of the downstream a relay turns to next. */
enum admit {
	ADMIT_GO,                            /* try it now */
	ADMIT_LATER,                         /* down, throttled or trial taken: last resort */
	ADMIT_SKIP,                          /* not for this message (quota, even as last resort) */
	ADMIT_WAIT                           /* the cluster is asked; admitted() goes on */
};

/* The decision a single instance makes, from the health segment alone. */
static enum admit
admit_local(struct relay *r, const struct downstream_cfg *ds, bool last_resort, time_t now)
{
	bool begun = last_resort ?
	    health_begin_last_resort(ds->health, ds, r->rt->worker_slot, now) :
	    health_begin(ds->health, ds, r->rt->worker_slot, now);

	if (begun)
		return ADMIT_GO;
	return last_resort ? ADMIT_SKIP : ADMIT_LATER;
}

static void admitted(void *arg, enum cluster_admit verdict, const char *why);

/*
 * With a link to the cluster, this instance's own quota cells first (a
 * window it filled alone is full for all), then the cluster's BEGIN. The
 * link down, the decision is local, and the attempt keeps a name under
 * which a delivery is counted in the cluster once the link is back.
 */
static enum admit
admit(struct relay *r, const struct downstream_cfg *ds, size_t idx, bool last_resort, time_t now)
{
	struct cluster *cl = r->rt->cluster;

	if (!has_health(r, ds))
		return ADMIT_GO;
	if (cluster_active(cl)) {
		if (!health_begin_shared(ds->health, r->rt->worker_slot, now))
			return last_resort ? ADMIT_SKIP : ADMIT_LATER;
		r->cand = idx;
		r->cand_last_resort = last_resort;
		r->cand_now = now;
		r->pending = cluster_admit(cl, ds, !last_resort, &r->att, admitted, r);
		if (r->pending != NULL)
			return ADMIT_WAIT;
		health_end_shared(ds->health, health_cfg_of(r), r->rt->worker_slot, now, now,
		    HEALTH_CANCELLED, 0, NULL);
	} else if (cl != NULL) {
		(void)cluster_admit(cl, ds, !last_resort, &r->att, NULL, NULL);
	}
	return admit_local(r, ds, last_resort, now);
}

static bool
attempt_go(struct relay *r, const struct downstream_cfg *ds, size_t idx, time_t now)
{
	r->attempts++;
	r->cur = ds;
	r->cur_started = now;
	r->up = attempt_start(r, ds, idx);
	if (r->up != NULL)
		return true;
	log_warn("id=%s relay=%s[%s]: cannot start a delivery attempt",
	    r->msg->id, ds->name, ds->addr);
	release_attempt(r, ds, "cannot start a delivery attempt");
	note_failure(r, ds, 0, NULL, "cannot start a delivery attempt");
	r->retry_later = true;
	return false;
}

/* Acts on an admission; true when an attempt is under way. cluster_reopens:
 * the cluster refused it over quota, its windows have room then. */
static bool
admit_apply(struct relay *r, const struct downstream_cfg *ds, size_t idx, enum admit a,
    const char *why, time_t cluster_reopens, time_t now)
{
	switch (a) {
	case ADMIT_GO:
		return attempt_go(r, ds, idx, now);
	case ADMIT_LATER:
		r->later[r->n_later++] = idx;
		return false;
	case ADMIT_SKIP:
		log_skipped(r, ds, "connect", why != NULL ? why : refusal_reason(r, ds, now));
		r->retry_later = true;   /* the quota comes back; so may the message */
		note_quota(r, ds, now, cluster_reopens);
		return false;
	default:
		return true;
	}
}

/* The cluster's verdict on r->cand. */
static void
admitted(void *arg, enum cluster_admit verdict, const char *why)
{
	struct relay *r = arg;
	const struct downstream_cfg *ds = &r->user->downstreams[r->cand];
	struct timeval zero = { 0, 0 };
	enum admit a = ADMIT_GO;
	time_t reopens = 0;

	r->pending = NULL;
	if (verdict != CLUSTER_ADMIT_OK)
		health_end_shared(ds->health, health_cfg_of(r), r->rt->worker_slot, r->cand_now,
		    r->cand_now, HEALTH_CANCELLED, 0, NULL);
	switch (verdict) {
	case CLUSTER_ADMIT_OK:
		break;
	case CLUSTER_ADMIT_LATER:
		a = r->cand_last_resort ? ADMIT_SKIP : ADMIT_LATER;
		break;
	case CLUSTER_ADMIT_OVER_QUOTA:
		a = ADMIT_SKIP;
		reopens = r->att.reopens;
		break;
	case CLUSTER_ADMIT_LOCAL:
		a = admit_local(r, ds, r->cand_last_resort, r->cand_now);
		why = NULL;
		break;
	}
	if (!admit_apply(r, ds, r->cand, a, why, reopens, r->cand_now))
		evtimer_add(r->kick, &zero);
}

/*
 * Starts the next attempt the quotas allow, or ends the relay. A
 * downstream whose circuit is open or that is throttled waits until every
 * other one has failed, and is then tried anyway: no message fails while
 * any path could work. Only a full quota window skips one for good.
 */
static void
relay_step(evutil_socket_t fd, short what, void *arg)
{
	struct relay *r = arg;
	const struct downstream_cfg *ds;
	size_t idx;
	bool last_resort;
	time_t now;
	int64_t left;
	char why[64];

	(void)fd;
	(void)what;
	for (;;) {
		if (r->next < r->n_order) {
			idx = r->order[r->next++];
			last_resort = false;
		} else if (r->next_later < r->n_later) {
			idx = r->later[r->next_later++];
			last_resort = true;
		} else
			break;
		ds = &r->user->downstreams[idx];
		/* One clock reading: a failure gives the quota back to the window
		 * it was taken from, which `begun` must therefore name. */
		now = time(NULL);
		if (!deadline_covers(r, ds, now, &left)) {
			snprintf(why, sizeof(why), "relay deadline: %lld ms left",
			    (long long)(left > 0 ? left : 0));
			log_skipped(r, ds, "connect", why);
			r->retry_later = true;
			continue;
		}
		if (!last_resort && !token_ready(r, ds))
			continue;
		if (admit_apply(r, ds, idx, admit(r, ds, idx, last_resort, now), NULL, 0, now))
			return;
	}
	finish(r, false);
}

/* seq: the cluster's message number when shared, else the local one. */
static size_t
order_downstreams(struct relay *r, const struct upstream_msg *msg, bool shared, uint64_t seq)
{
	const struct user_cfg *u = r->user;
	struct smtpmux_downstream_view *views;
	struct smtpmux_envelope env;
	time_t now = time(NULL);
	size_t i, n;

	if ((views = calloc(u->n_downstreams, sizeof(*views))) == NULL)
		return 0;
	for (i = 0; i < u->n_downstreams; i++)
		fill_view(r, &u->downstreams[i], now, &views[i]);
	memset(&env, 0, sizeof(env));
	env.user = u->email;
	env.mail_from = msg->mail_from;
	env.rcpts = msg->rcpts;
	env.n_rcpts = msg->n_rcpts;
	env.size = r->size;
	env.client_addr = r->client != NULL ? r->client : "";
	env.sequence = shared ? seq : r->rt->health != NULL && u->health != NULL ?
	    health_user_next(u->health) : 0;
	if (u->selector != NULL)
		n = selector_order(u->selector, &env, views, u->n_downstreams, r->order);
	else {
		/* No selector loaded (unit tests): configuration order. */
		for (i = 0; i < u->n_downstreams; i++)
			r->order[i] = i;
		n = u->n_downstreams;
		smtpmux_order_available(views, r->order, n);
	}
	free(views);
	return n;
}

static void early_start(struct relay *r);

/* The envelope the selector sees: the message once it is there. */
static void
order_now(struct relay *r, bool shared, uint64_t seq)
{
	struct upstream_msg kept = {
		.mail_from = r->env.mail_from, .rcpts = (const char *const *)r->env.rcpts,
		.n_rcpts = r->env.n_rcpts, .body = r->env.body,
	};

	r->n_order = order_downstreams(r, r->msg != NULL ? r->msg : &kept, shared, seq);
	r->ordered = true;
}

/* The cluster's message number came (or none will: shared is false). */
static void
sequenced(void *arg, bool shared, uint64_t seq)
{
	struct relay *r = arg;
	struct timeval zero = { 0, 0 };

	r->pending = NULL;
	order_now(r, shared, seq);
	envelope_free(&r->env);
	if (r->begun)
		evtimer_add(r->kick, &zero);
	else if (r->prepared)
		early_start(r);
}

/* A relay with its order chosen (the selector runs here, once), or being
 * chosen when the cluster's sequence number comes. */
static struct relay *
relay_new(struct runtime *rt, const struct user_cfg *user, const struct upstream_msg *env,
    uint64_t size, const char *client_addr, bool prepared)
{
	struct relay *r;

	if ((r = calloc(1, sizeof(*r))) == NULL)
		return NULL;
	r->rt = rt;
	r->user = user;
	r->msg = env;
	r->client = client_addr;
	r->size = size;
	r->prepared = prepared;
	if ((r->order = calloc(user->n_downstreams + 1, sizeof(*r->order))) == NULL ||
	    (r->later = calloc(user->n_downstreams + 1, sizeof(*r->later))) == NULL ||
	    (r->kick = evtimer_new(rt->base, relay_step, r)) == NULL ||
	    (prepared && cluster_active(rt->cluster) && envelope_keep(&r->env, env) < 0)) {
		envelope_free(&r->env);
		free(r->order);
		free(r->later);
		if (r->kick != NULL)
			event_free(r->kick);
		free(r);
		return NULL;
	}
	if ((r->pending = cluster_sequence(rt->cluster, user, sequenced, r)) == NULL) {
		envelope_free(&r->env);
		order_now(r, false, 0);
	}
	return r;
}

static unsigned
relay_deadline_s(const struct relay *r)
{
	unsigned s = r->rt->cfg != NULL ? r->rt->cfg->limits.relay_deadline : 0;

	return s != 0 ? s : 240;
}

struct relay *
relay_begin(struct relay *r, const struct upstream_msg *msg, uint64_t size,
    relay_done_fn done, void *arg)
{
	struct timeval now = { 0, 0 };

	r->msg = msg;
	r->size = size;
	r->done = done;
	r->arg = arg;
	r->begun = true;
	gettimeofday(&r->t0, NULL);
	r->deadline_ms = runtime_now_ms() + (int64_t)relay_deadline_s(r) * 1000;
	/* Even "nothing to try" is answered from the loop, never inside
	 * relay_start(); an order still being chosen kicks it when it is. */
	if (r->ordered)
		evtimer_add(r->kick, &now);
	return r;
}

struct relay *
relay_start(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *msg, uint64_t size, const char *client_addr,
    relay_done_fn done, void *arg)
{
	struct relay *r = relay_new(rt, user, msg, size, client_addr, false);

	return r != NULL ? relay_begin(r, msg, size, done, arg) : NULL;
}

static bool
early_connect_on(const struct runtime *rt)
{
	return rt->cache != NULL && rt->cfg != NULL && rt->cfg->connection_cache.early_connect;
}

/* Only where the message will go first: a downstream that is down or over
 * quota gets no session it would not use. */
static void
early_start(struct relay *r)
{
	const struct downstream_cfg *first;
	struct smtpmux_downstream_view v;
	char why[TOKEN_ERROR_MAX + 32];

	if (r->n_order == 0)
		return;
	first = &r->user->downstreams[r->order[0]];
	fill_view(r, first, time(NULL), &v);
	/* A downstream without its OAuth token gets no session either. */
	if (v.available && token_table_ready(r->rt->tokens, first, token_clock_ms(), why,
	    sizeof(why))) {
		r->early_idx = r->order[0];
		r->early = upstream_prepare(r->rt, &r->user->downstreams[r->early_idx]);
	}
}

struct relay *
relay_prepare(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *env, uint64_t size, const char *client_addr)
{
	struct relay *r;

	if (!early_connect_on(rt) || (r = relay_new(rt, user, env, size, client_addr, true)) == NULL)
		return NULL;
	r->msg = NULL;                       /* env is the caller's, for the selector only */
	if (r->ordered)
		early_start(r);
	return r;
}

bool
relay_dot_sent(const struct relay *r)
{
	return r != NULL && (r->dot_sent || upstream_dot_sent(r->up));
}

void
relay_cancel(struct relay *r)
{
	const struct downstream_cfg *ds;

	if (r == NULL)
		return;
	ds = r->cur;
	if (r->up != NULL) {
		upstream_cancel(r->up);
		release_attempt(r, ds, "attempt cancelled");
		log_info("id=%s relay=%s[%s] attempt=%u status=cancelled", r->msg->id,
		    ds->name, ds->addr, r->attempts);
	}
	relay_free(r);
}

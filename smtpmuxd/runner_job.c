/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "dsn.h"
#include "log.h"
#include "msgbody.h"
#include "queue_sched.h"
#include "queue_stats.h"
#include "relay.h"
#include "runner_int.h"
#include "spool_writer.h"

/*
 * One delivery by the runner: read the message back, validate it as the
 * inbound session would have, hand it to relay_start() exactly as a worker
 * does, and act on the verdict:
 *
 *   sent                      removed
 *   refused permanently       "bounced": a failure DSN to the sender, removed
 *   failed temporarily        attempts + 1 (not for a pure quota wait),
 *                             next attempt by backoff or quota reopening;
 *                             "expired" instead after max_lifetime; the
 *                             optional delay notice once
 *
 * A notification is itself a queued message (sender <>, same user), so it
 * is retried like any other; the original is removed only once the
 * notification is committed.
 */

#define DSN_HEADERS_MAX (64 * 1024)

enum after_dsn { AFTER_DSN_REMOVE, AFTER_DSN_DEFER };

struct rjob {
	struct runner *rn;
	struct qentry *e;
	struct rjob *prev, *next;
	struct spool_env env;
	size_t header_len;
	const struct user_cfg *user;
	struct msgbody *body;            /* owns the message file's fd */
	const char **rcpts;
	struct upstream_msg msg;
	struct relay *relay;
	struct spool_job *dsn;           /* a notification being committed */
	enum after_dsn after_dsn;
	int64_t next_attempt;            /* for AFTER_DSN_DEFER */
	const char *why;                 /* ... and the reason, for the log */
};

/* --- life cycle */

static void
job_end(struct rjob *j)
{
	struct runner *rn = j->rn;

	if (j->prev != NULL)
		j->prev->next = j->next;
	else
		rn->jobs = j->next;
	if (j->next != NULL)
		j->next->prev = j->prev;
	if (j->e != NULL) {
		j->e->busy = false;
		j->e->job = NULL;
	}
	msgbody_free(j->body);
	spool_env_clear(&j->env);
	free(j->rcpts);
	free(j);
	rn->busy--;
	runner_job_ended(rn);
}

/* The message leaves the queue: delivered or given up (its file is kept
 * for reuse), or deleted (it is removed). */
static void
job_remove(struct rjob *j, bool deleted)
{
	struct spool *sp = j->rn->spool;

	if ((deleted ? spool_remove(sp, j->e->id) : spool_recycle(sp, j->e->id)) < 0 &&
	    errno != ENOENT)
		log_err("id=%s cannot remove the queue file: %s", j->e->id, strerror(errno));
	runner_forget(j->rn, j->e);
	j->e = NULL;
	job_end(j);
}

static void
job_deleted(struct rjob *j)
{
	log_info("id=%s status=deleted (smtpmuxd -s delete)", j->e->id);
	queue_stats_count(j->rn->stats, QUEUE_DELETED);
	job_remove(j, true);
}

/* Back in the queue until next; why goes to the log once the state is
 * saved (the queue listing then shows what the line says). */
static void
job_defer(struct rjob *j, int64_t next, const char *why)
{
	struct qentry *e = j->e;
	int64_t now = (int64_t)time(NULL);

	j->env.next = next;
	e->next = next;
	if (spool_write_state(j->rn->spool, e->id, &j->env) < 0)
		log_warn("id=%s cannot save the delivery state: %s", e->id, strerror(errno));
	log_info("id=%s deferred: next attempt in %" PRId64 " s (%s), attempts=%u", e->id,
	    next > now ? next - now : 0, why, j->env.attempts);
	j->e = NULL;
	e->busy = false;
	e->job = NULL;
	if (!e->held && !e->parked)
		runner_schedule(j->rn, e, next);
	job_end(j);
}

/* --- notifications */

/* "550 5.7.1 text" -> its enhanced code, when there is one. */
static const char *
enhanced_of(const char *reply, char *buf, size_t len)
{
	size_t n;

	if (strlen(reply) < 6 || reply[3] != ' ' || reply[1] == '\0')
		return NULL;
	n = strcspn(reply + 4, " ");
	if (n < 5 || n >= len)
		return NULL;
	snprintf(buf, len, "%.*s", (int)n, reply + 4);
	return buf;
}

static void
new_id(struct runner *rn, char id[SPOOL_ID_LEN + 1])
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	runtime_new_id(&rn->rt, id, (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u,
	    (uint32_t)getpid());
}

/* The original's header block, for the text/rfc822-headers part. */
static char *
original_headers(struct rjob *j, size_t *len)
{
	size_t want = j->env.size < DSN_HEADERS_MAX ? (size_t)j->env.size : DSN_HEADERS_MAX;
	char *buf = malloc(want + 1);
	ssize_t n;

	*len = 0;
	if (buf == NULL)
		return NULL;
	n = msgbody_read(j->body, 0, buf, want);
	*len = n > 0 ? dsn_header_block(buf, (size_t)n, DSN_HEADERS_MAX) : 0;
	return buf;
}

static void dsn_committed(void *arg, const struct spool_result *sr);

/* Builds the notification and queues it; false when it could not be. */
static bool
dsn_submit(struct rjob *j, struct dsn_report *rep)
{
	struct runner *rn = j->rn;
	struct evbuffer *text = evbuffer_new();
	struct spool_env denv;
	struct msgbody *body = NULL;
	char id[SPOOL_ID_LEN + 1], *hdrs;
	size_t hlen;
	bool eightbit = false, ok = false;

	hdrs = original_headers(j, &hlen);
	rep->headers = hdrs;
	rep->headers_len = hlen;
	memset(&denv, 0, sizeof(denv));
	snprintf(denv.user, sizeof(denv.user), "%s", j->env.user);
	denv.arrived = (int64_t)rep->now;
	if (text != NULL && dsn_build(rep, text, &eightbit) == 0 &&
	    (body = msgbody_new(UINT64_MAX, NULL)) != NULL &&
	    msgbody_append(body, evbuffer_pullup(text, -1), evbuffer_get_length(text)) == 0 &&
	    spool_env_add_rcpt(&denv, j->env.from) == 0) {
		denv.body = eightbit ? SMTP_BODY_8BITMIME : SMTP_BODY_7BIT;
		new_id(rn, id);
		j->dsn = spool_writer_submit(rn->rt.spool, id, &denv, body, dsn_committed, j);
		ok = j->dsn != NULL;
	}
	if (!ok)
		log_err("id=%s cannot build the delivery status notification: out of memory",
		    j->e->id);
	msgbody_free(body);
	spool_env_clear(&denv);
	if (text != NULL)
		evbuffer_free(text);
	free(hdrs);
	return ok;
}

static void
dsn_committed(void *arg, const struct spool_result *sr)
{
	struct rjob *j = arg;
	struct runner *rn = j->rn;
	int64_t now = (int64_t)time(NULL);

	j->dsn = NULL;
	if (sr->err != 0) {
		log_err("id=%s cannot queue the delivery status notification: %s: %s; "
		    "the message stays queued", j->e->id, sr->step, strerror(sr->err));
		job_defer(j, now + rn->cfg->queue.min_backoff, "the notification could not be queued");
		return;
	}
	log_info("id=%s sender %s notification: %s", j->e->id,
	    j->after_dsn == AFTER_DSN_REMOVE ? "non-delivery" : "delay", sr->id);
	queue_stats_count(rn->stats, QUEUE_DSN);
	runner_load(rn, sr->id);
	if (j->e->delete_pending)
		job_deleted(j);
	else if (j->after_dsn == AFTER_DSN_REMOVE)
		job_remove(j, false);
	else {
		j->env.warned = true;
		job_defer(j, j->next_attempt, j->why);
	}
}

static void
report_init(struct dsn_report *rep, const struct rjob *j, enum dsn_action action,
    int64_t now)
{
	memset(rep, 0, sizeof(*rep));
	rep->action = action;
	rep->hostname = j->rn->cfg->hostname;
	rep->queue_id = j->e->id;
	rep->sender = j->env.from;
	rep->rcpts = j->rcpts;
	rep->n_rcpts = j->env.n_rcpts;
	rep->arrived = (time_t)j->env.arrived;
	rep->last_attempt = (time_t)now;
	rep->now = (time_t)now;
	rep->retry_until = (time_t)(j->env.arrived + (int64_t)j->rn->cfg->queue.max_lifetime);
}

static bool
wants_dsn(const struct rjob *j)
{
	return j->env.from[0] != '\0' && j->rn->cfg->queue.bounce;
}

static void
log_expired(const struct rjob *j, int64_t now, const char *diag)
{
	char user[SPOOL_USER_MAX + 1], from[SMTP_PATH_MAX + 1];

	log_info("id=%s user=%s from=<%s> nrcpt=%zu size=%" PRIu64 " status=expired "
	    "queued=yes attempts=%u (queued for %" PRId64 " s, queue.max_lifetime %u s: %s)",
	    j->e->id, log_sanitize(user, sizeof(user), j->env.user, strlen(j->env.user)),
	    log_sanitize(from, sizeof(from), j->env.from, strlen(j->env.from)),
	    j->env.n_rcpts, j->env.size, j->env.attempts, now - j->env.arrived,
	    j->rn->cfg->queue.max_lifetime, diag[0] ? diag : "no downstream took it");
}

/*
 * Given up: removed, after a failure notice to the sender unless the
 * sender is <> (never notify about a notification) or bounce is off.
 */
static void
job_give_up(struct rjob *j, const struct relay_result *res, bool expired, int64_t now)
{
	char status[16], diag[SMTP_REPLY_TEXT_MAX];
	struct dsn_report rep;

	queue_stats_count(j->rn->stats, expired ? QUEUE_EXPIRED : QUEUE_BOUNCED);
	snprintf(diag, sizeof(diag), "%s", res->failed_text);
	if (expired)
		log_expired(j, now, diag);
	if (!wants_dsn(j)) {
		log_info("id=%s no notification: %s", j->e->id,
		    j->env.from[0] == '\0' ? "the sender is <>" : "queue.bounce is off");
		job_remove(j, false);
		return;
	}
	report_init(&rep, j, DSN_FAILED, now);
	rep.status = expired ? "4.4.7" : enhanced_of(diag, status, sizeof(status));
	rep.diagnostic = diag;
	rep.reason = expired ? "delivery time expired: no downstream took the message" :
	    "refused by every downstream";
	j->after_dsn = AFTER_DSN_REMOVE;
	if (!dsn_submit(j, &rep))
		job_defer(j, now + j->rn->cfg->queue.min_backoff, "the notification could not be built");
}

static void
job_deferred(struct rjob *j, const struct relay_result *res, int64_t now)
{
	const struct queue_cfg *q = &j->rn->cfg->queue;
	struct dsn_report rep;
	int64_t next;

	if (res->quota_reopens == 0)
		j->env.attempts++;                /* waiting for a quota is not a failure */
	if (res->failed_relay[0] != '\0')
		spool_env_note_error(&j->env, res->failed_relay, res->failed_text);
	if (queue_expired(q, j->env.arrived, now)) {
		job_give_up(j, res, true, now);
		return;
	}
	queue_stats_count(j->rn->stats, QUEUE_DEFERRED);
	next = queue_next_attempt(q, j->env.arrived, j->env.attempts, now, res->quota_reopens,
	    queue_random(&j->rn->rng));
	j->why = res->quota_reopens > 0 ? "when a quota window reopens" : "backoff";
	if (queue_delay_warning_due(q, j->env.arrived, now, j->env.warned) && wants_dsn(j)) {
		report_init(&rep, j, DSN_DELAYED, now);
		rep.status = "4.4.1";
		rep.diagnostic = res->failed_text;
		rep.reason = "not delivered yet: no downstream took the message";
		j->after_dsn = AFTER_DSN_DEFER;
		j->next_attempt = next;
		if (dsn_submit(j, &rep))
			return;
	}
	job_defer(j, next, j->why);
}

static void
relayed(void *arg, const struct relay_result *res)
{
	struct rjob *j = arg;
	int64_t now = (int64_t)time(NULL);

	j->relay = NULL;
	if (res->ok) {
		queue_stats_count(j->rn->stats, QUEUE_DELIVERED);
		job_remove(j, false);
	} else if (j->e->delete_pending)
		job_deleted(j);
	else if (!res->temporary)
		job_give_up(j, res, false, now);
	else
		job_deferred(j, res, now);
}

/* --- starting */

/* Why a message cannot be read: gone, malformed (moved aside) or not now. */
static void
read_failed(struct runner *rn, struct qentry *e, const char *why, int err)
{
	if (err == ENOENT) {
		log_info("id=%s left the queue (removed by someone else)", e->id);
		runner_forget(rn, e);
	} else if (err == EINVAL) {
		log_err("id=%s malformed queue file (%s): moved to %s/corrupt", e->id, why,
		    spool_path(rn->spool));
		if (spool_move_aside(rn->spool, e->id) < 0)
			log_err("id=%s cannot move it aside: %s", e->id, strerror(errno));
		runner_forget(rn, e);
	} else {
		log_err("id=%s cannot read the queue file: %s; trying again later", e->id, why);
		runner_schedule(rn, e, (int64_t)time(NULL) + rn->cfg->queue.min_backoff);
	}
}

static struct rjob *
job_new(struct runner *rn, struct qentry *e)
{
	struct rjob *j = calloc(1, sizeof(*j));

	if (j == NULL)
		return NULL;
	j->rn = rn;
	j->e = e;
	return j;
}

static bool
job_open(struct rjob *j)
{
	struct runner *rn = j->rn;
	char err[256];
	bool state_err;
	int fd, saved;

	fd = spool_read(rn->spool, j->e->id, &j->env, &j->header_len, &state_err, err,
	    sizeof(err));
	if (fd < 0) {
		saved = errno;
		read_failed(rn, j->e, err, saved);
		return false;
	}
	if (state_err)
		log_warn("id=%s its state file is unreadable: using the message's own", j->e->id);
	if ((j->body = msgbody_from_file(fd, j->header_len, j->env.size)) == NULL ||
	    (j->rcpts = calloc(j->env.n_rcpts, sizeof(*j->rcpts))) == NULL) {
		if (j->body == NULL)
			close(fd);
		log_err("id=%s out of memory", j->e->id);
		runner_schedule(rn, j->e, (int64_t)time(NULL) + rn->cfg->queue.min_backoff);
		return false;
	}
	for (size_t i = 0; i < j->env.n_rcpts; i++)
		j->rcpts[i] = j->env.rcpts[i];
	return true;
}

static void
job_discard(struct rjob *j)
{
	msgbody_free(j->body);
	spool_env_clear(&j->env);
	free(j->rcpts);
	free(j);
}

bool
runner_job_start(struct runner *rn, struct qentry *e)
{
	struct rjob *j = job_new(rn, e);

	if (j == NULL) {
		runner_schedule(rn, e, (int64_t)time(NULL) + rn->cfg->queue.min_backoff);
		return false;
	}
	if (!job_open(j)) {
		job_discard(j);
		return false;
	}
	if ((j->user = runner_owner(rn, e->id, &j->env)) == NULL) {
		e->parked = true;
		job_discard(j);
		return false;
	}
	j->msg = (struct upstream_msg){
		.id = e->id, .mail_from = j->env.from, .rcpts = j->rcpts,
		.n_rcpts = j->env.n_rcpts, .body = j->env.body, .data = j->body,
		.from_queue = true,
	};
	e->busy = true;
	e->job = j;
	j->next = rn->jobs;
	if (rn->jobs != NULL)
		rn->jobs->prev = j;
	rn->jobs = j;
	rn->busy++;
	j->relay = relay_start(&rn->rt, j->user, &j->msg, j->env.size, j->env.client, relayed, j);
	if (j->relay == NULL) {
		log_err("id=%s cannot start a delivery: out of memory", e->id);
		job_defer(j, (int64_t)time(NULL) + rn->cfg->queue.min_backoff, "out of memory");
		return false;
	}
	return true;
}

/* --- stopping one or all */

static void
job_cancel(struct rjob *j)
{
	if (j->relay != NULL) {
		relay_cancel(j->relay);
		j->relay = NULL;
	}
	if (j->dsn != NULL) {
		/* The notification may still be committed: the message stays, so
		 * the worst case is a second notification, never none. */
		spool_job_forget(j->dsn);
		j->dsn = NULL;
	}
}

void
runner_job_cancel(struct qentry *e)
{
	struct rjob *j = e->job;

	if (j == NULL || j->relay == NULL)
		return;                  /* a notification being committed finishes first */
	job_cancel(j);
	if (e->delete_pending)
		job_deleted(j);
	else
		job_end(j);
}

void
runner_jobs_cancel_all(struct runner *rn)
{
	while (rn->jobs != NULL) {
		struct rjob *j = rn->jobs;

		log_info("id=%s delivery cancelled: the queue runner is stopping", j->e->id);
		job_cancel(j);
		job_end(j);
	}
}

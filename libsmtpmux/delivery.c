/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <event2/event_struct.h>

#include "delivery.h"
#include "log.h"
#include "queue_sched.h"
#include "spool_format.h"
#include "spool_writer.h"

struct delivery {
	struct runtime *rt;
	const struct user_cfg *user;
	const struct upstream_msg *msg;
	uint64_t size;
	char client[SPOOL_CLIENT_MAX + 1];
	relay_done_fn done;
	void *arg;

	struct relay *relay;             /* the synchronous attempt, while it runs */
	struct spool_job *job;           /* the queue write, while it runs */
	const char *mode;                /* "fallback", "always" or "shutdown", for the log */
	struct relay_result result;      /* reported from the loop by ev_report */
	struct event ev_report;          /* inside: no allocation of its own per message */
};

static bool
queue_enabled(const struct runtime *rt)
{
	return rt->cfg != NULL && rt->cfg->queue.enabled;
}

static void
report_cb(evutil_socket_t fd, short what, void *arg)
{
	struct delivery *d = arg;
	relay_done_fn done = d->done;
	void *done_arg = d->arg;
	struct relay_result res = d->result;

	free(d);                         /* ev_report is not pending: it just ran */
	done(done_arg, &res);
}

/* Every verdict reaches the client from the loop, never from inside
 * delivery_start() or a callback of the relay. */
static void
report(struct delivery *d, const struct relay_result *res)
{
	d->result = *res;
	event_active(&d->ev_report, EV_TIMEOUT, 0);
}

static void
report_no_storage(struct delivery *d)
{
	struct relay_result res;

	memset(&res, 0, sizeof(res));
	res.code = 452;
	snprintf(res.enhanced, sizeof(res.enhanced), "4.3.1");
	snprintf(res.text, sizeof(res.text), "Insufficient system storage, try again later");
	report(d, &res);
}

static void
log_queued(const struct delivery *d, const struct spool_result *sr)
{
	char user[SPOOL_USER_MAX + 1], from[SMTP_PATH_MAX + 1], renamed[32] = "";
	char session[32] = "";

	/* Like the relay's line for the message: the session and the client. */
	if (d->msg->session != NULL && d->msg->session[0] != '\0')
		snprintf(session, sizeof(session), "%s: ", d->msg->session);
	if (strcmp(sr->id, d->msg->id) != 0)
		snprintf(renamed, sizeof(renamed), " queue_id=%s", sr->id);
	log_info("%sid=%s client=[%s] user=%s from=<%s> nrcpt=%zu size=%llu status=queued "
	    "mode=%s%s batch=%u", session, d->msg->id, d->client,
	    log_sanitize(user, sizeof(user), d->user->email, strlen(d->user->email)),
	    log_sanitize(from, sizeof(from), d->msg->mail_from, strlen(d->msg->mail_from)),
	    d->msg->n_rcpts, (unsigned long long)d->size, d->mode, renamed, sr->batch);
}

static void
spooled(void *arg, const struct spool_result *sr)
{
	struct delivery *d = arg;
	struct relay_result res;

	d->job = NULL;
	if (sr->err != 0) {
		log_err("id=%s cannot queue the message: %s: %s", d->msg->id,
		    sr->err == EDQUOT ? "queue.max_size reached" : sr->step, strerror(sr->err));
		report_no_storage(d);
		return;
	}
	log_queued(d, sr);
	memset(&res, 0, sizeof(res));
	res.ok = true;
	res.queued = true;
	res.code = 250;
	snprintf(res.enhanced, sizeof(res.enhanced), "2.0.0");
	if (strcmp(d->mode, "always") == 0)
		snprintf(res.text, sizeof(res.text), "Ok: queued as %s", sr->id);
	else if (strcmp(d->mode, "shutdown") == 0)
		snprintf(res.text, sizeof(res.text), "Ok: queued as %s (delivery deferred: "
		    "the server is restarting)", sr->id);
	else
		snprintf(res.text, sizeof(res.text), "Ok: queued as %s (delivery deferred: "
		    "no downstream took it now; it will be retried)", sr->id);
	report(d, &res);
}

static void
env_fill(struct spool_env *env, const struct delivery *d, const struct relay_result *failed)
{
	uint64_t seed;

	memset(env, 0, sizeof(*env));
	snprintf(env->user, sizeof(env->user), "%s", d->user->email);
	snprintf(env->client, sizeof(env->client), "%s", d->client);
	env->arrived = (int64_t)time(NULL);
	snprintf(env->from, sizeof(env->from), "%s", d->msg->mail_from);
	env->body = d->msg->body;
	if (failed == NULL)
		return;
	/* The synchronous relay was the first attempt: the next one is due as
	 * the runner would have scheduled it, so that the queue shows it. */
	seed = queue_random_seed();
	env->attempts = 1;
	env->next = queue_next_attempt(&d->rt->cfg->queue, env->arrived, 1, env->arrived,
	    (int64_t)failed->quota_reopens, queue_random(&seed));
	if (failed->failed_relay[0] != '\0')
		spool_env_note_error(env, failed->failed_relay, failed->failed_text);
}

static void
spool(struct delivery *d, const struct relay_result *failed)
{
	struct spool_env env;

	env_fill(&env, d, failed);
	for (size_t i = 0; i < d->msg->n_rcpts; i++)
		if (spool_env_add_rcpt(&env, d->msg->rcpts[i]) < 0)
			goto fail;
	if (d->rt->spool == NULL)
		goto fail;
	d->job = spool_writer_submit(d->rt->spool, d->msg->id, &env, d->msg->data, spooled, d);
	if (d->job == NULL)
		goto fail;
	spool_env_clear(&env);
	return;
fail:
	log_err("id=%s cannot queue the message: %s", d->msg->id,
	    d->rt->spool == NULL ? "the queue is not available" : "out of memory");
	spool_env_clear(&env);
	report_no_storage(d);
}

static void
relayed(void *arg, const struct relay_result *res)
{
	struct delivery *d = arg;

	d->relay = NULL;
	if (res->ok || !res->temporary || !queue_enabled(d->rt)) {
		report(d, res);
		return;
	}
	spool(d, res);
}

static struct delivery *
delivery_new(struct runtime *rt, const struct user_cfg *user, const char *client_addr)
{
	struct delivery *d = calloc(1, sizeof(*d));

	if (d == NULL)
		return NULL;
	d->rt = rt;
	d->user = user;
	snprintf(d->client, sizeof(d->client), "%s", client_addr != NULL ? client_addr : "");
	if (event_assign(&d->ev_report, rt->base, -1, 0, report_cb, d) != 0) {
		free(d);
		return NULL;
	}
	return d;
}

static void
delivery_set_msg(struct delivery *d, const struct upstream_msg *msg, uint64_t size,
    relay_done_fn done, void *arg)
{
	d->msg = msg;
	d->size = size;
	d->done = done;
	d->arg = arg;
}

static bool
queue_always(const struct runtime *rt)
{
	return queue_enabled(rt) && rt->cfg->queue.mode == QUEUE_MODE_ALWAYS;
}

struct delivery *
delivery_start(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *msg, uint64_t size, const char *client_addr,
    relay_done_fn done, void *arg)
{
	struct delivery *d = delivery_new(rt, user, client_addr);

	if (d == NULL)
		return NULL;
	delivery_set_msg(d, msg, size, done, arg);
	if (queue_always(rt)) {
		d->mode = "always";
		spool(d, NULL);
		return d;
	}
	d->mode = "fallback";
	d->relay = relay_start(rt, user, msg, size, client_addr, relayed, d);
	if (d->relay == NULL) {
		free(d);
		return NULL;
	}
	return d;
}

struct delivery *
delivery_prepare(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *env, uint64_t size, const char *client_addr)
{
	struct delivery *d;
	struct relay *r;

	if (queue_always(rt) || (r = relay_prepare(rt, user, env, size, client_addr)) == NULL)
		return NULL;
	if ((d = delivery_new(rt, user, client_addr)) == NULL) {
		relay_cancel(r);
		return NULL;
	}
	d->mode = "fallback";
	d->relay = r;
	return d;
}

struct delivery *
delivery_begin(struct delivery *d, const struct upstream_msg *msg, uint64_t size,
    relay_done_fn done, void *arg)
{
	delivery_set_msg(d, msg, size, done, arg);
	d->relay = relay_begin(d->relay, msg, size, relayed, d);
	return d;
}

bool
delivery_dot_sent(const struct delivery *d)
{
	return d->job != NULL || (d->relay != NULL && relay_dot_sent(d->relay));
}

bool
delivery_defer_now(struct delivery *d)
{
	if (d->job != NULL)
		return true;
	if (d->relay == NULL || !queue_enabled(d->rt) || d->rt->spool == NULL ||
	    relay_dot_sent(d->relay))
		return false;
	relay_cancel(d->relay);
	d->relay = NULL;
	log_info("id=%s shutting down before the final dot reached a downstream: queued "
	    "instead", d->msg->id);
	/* Nothing was tried to the end: the runner tries it as soon as it can. */
	d->mode = "shutdown";
	spool(d, NULL);
	return true;
}

void
delivery_cancel(struct delivery *d)
{
	if (d == NULL)
		return;
	if (d->relay != NULL)
		relay_cancel(d->relay);
	if (d->job != NULL) {
		spool_job_forget(d->job);
		log_info("id=%s client gone while the message was being queued: "
		    "it stays queued if the write completes", d->msg->id);
	}
	event_del(&d->ev_report);        /* a report made active, not yet run */
	free(d);
}

/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <event2/dns.h>
#include <event2/event.h>

#include "cluster.h"
#include "helper_dns.h"
#include "log.h"
#include "queue_sched.h"
#include "runner_int.h"
#include "sender_match.h"
#include "spool_writer.h"
#include "upstream.h"
#include "upstream_cache.h"

/*
 * The runner's loop: it learns of messages by scanning the spool (at
 * start, after an inotify overflow, and every RESCAN_SECONDS as a safety
 * net) and through inotify (new messages, hold marks, tool requests), keeps
 * them in its index, and starts the due ones, oldest first, while fewer
 * than queue.max_concurrency deliveries run. One timer wakes it for the
 * next due message; a message waiting for a quota window is due at the
 * very second the window reopens.
 *
 * Reading a header or writing a state file happens in the loop: those are
 * small page-cache operations without fsync. The one write that must be
 * durable, a notification, goes through the spool writer's thread.
 */

#define RESCAN_SECONDS 300
#define TMP_MIN_AGE 60                   /* a writer's file older than this, unlocked: garbage */
#define LOCK_RETRY_SECONDS 1
#define DUE_SLACK_USEC 10000             /* wake just after the second turns */
#define OLDEST_DELAY_SECONDS 1

/* --- the index and its schedule */

static void
due_kick(struct runner *rn)
{
	event_active(rn->ev_due, EV_TIMEOUT, 0);
}

/* Arms the timer for the first scheduled message (when a slot is free). */
static void
arm_due(struct runner *rn)
{
	struct qentry *first = qindex_first(&rn->index);
	struct timeval now, tv;
	int64_t usec;

	evtimer_del(rn->ev_due);
	if (first == NULL || rn->stopping || rn->busy >= rn->cfg->queue.max_concurrency)
		return;
	gettimeofday(&now, NULL);
	usec = (first->next - (int64_t)now.tv_sec) * 1000000 - now.tv_usec + DUE_SLACK_USEC;
	if (usec < 0)
		usec = 0;
	tv.tv_sec = (time_t)(usec / 1000000);
	tv.tv_usec = (suseconds_t)(usec % 1000000);
	evtimer_add(rn->ev_due, &tv);
}

static void
dispatch(evutil_socket_t fd, short what, void *arg)
{
	struct runner *rn = arg;
	int64_t now = (int64_t)time(NULL);
	struct qentry *e;

	while (!rn->stopping && rn->busy < rn->cfg->queue.max_concurrency &&
	    (e = qindex_first(&rn->index)) != NULL && e->next <= now) {
		qindex_unschedule(&rn->index, e);
		runner_job_start(rn, e);
	}
	arm_due(rn);
}

void
runner_schedule(struct runner *rn, struct qentry *e, int64_t next)
{
	e->next = next;
	if (e->held || e->parked || e->busy)
		return;
	if (qindex_schedule(&rn->index, e, next) < 0) {
		log_err("id=%s cannot schedule it: out of memory (the next scan will)", e->id);
		return;
	}
	if (qindex_first(&rn->index) == e)
		due_kick(rn);
}

void
runner_job_ended(struct runner *rn)
{
	if (rn->stopping && rn->busy == 0)
		event_base_loopexit(rn->rt.base, NULL);
	else
		due_kick(rn);             /* from the loop: never inside a job's callback */
}

static void
oldest_cb(evutil_socket_t fd, short what, void *arg)
{
	struct runner *rn = arg;

	queue_stats_set_oldest(rn->stats, qindex_oldest(&rn->index));
}

void
runner_forget(struct runner *rn, struct qentry *e)
{
	struct timeval tv = { OLDEST_DELAY_SECONDS, 0 };

	queue_stats_removed(rn->stats, e->bytes);
	qindex_remove(&rn->index, e);
	/* The oldest may have gone: recomputed once, after a burst of removals. */
	if (!evtimer_pending(rn->ev_oldest, NULL))
		evtimer_add(rn->ev_oldest, &tv);
}

/* --- loading messages */

/* When a message read from the spool is next due. */
static int64_t
first_due(struct runner *rn, const struct spool_env *env)
{
	if (env->next > 0)
		return env->next;
	if (env->attempts == 0)
		return env->arrived;             /* mode always, or a notification: now */
	return env->arrived + (int64_t)queue_backoff(&rn->cfg->queue, env->attempts,
	    queue_random(&rn->rng));
}

static void
load_failed(struct runner *rn, const char *name, const char *why, int err)
{
	if (err == ENOENT)
		return;                          /* gone meanwhile */
	if (err != EINVAL) {
		log_err("id=%s cannot read the queue file: %s; the next scan tries again", name,
		    why);
		return;
	}
	log_err("id=%s malformed queue file (%s): moved to %s/corrupt", name, why,
	    spool_path(rn->spool));
	if (spool_move_aside(rn->spool, name) < 0)
		log_err("id=%s cannot move it aside: %s", name, strerror(errno));
}

const struct user_cfg *
runner_owner(struct runner *rn, const char *id, const struct spool_env *env)
{
	const struct user_cfg *u = config_find_user(rn->cfg, env->user);
	char user[SPOOL_USER_MAX + 1], from[SMTP_PATH_MAX + 1];

	log_sanitize(user, sizeof(user), env->user, strlen(env->user));
	if (u == NULL) {
		log_warn("id=%s user=%s is not in the configuration: kept in the queue until it is",
		    id, user);
		return NULL;
	}
	/* What the session checked at MAIL FROM, checked again: the
	 * configuration may have changed, and the file came from a worker. */
	if (!sender_allowed(u->allowed_senders, u->n_allowed_senders, env->from)) {
		log_warn("id=%s user=%s from=<%s> is not in the user's allowed_senders: kept in the "
		    "queue until it is", id, user,
		    log_sanitize(from, sizeof(from), env->from, strlen(env->from)));
		return NULL;
	}
	return u;
}

void
runner_load(struct runner *rn, const char *id)
{
	struct spool_env env;
	struct qentry *e;
	char err[256];
	size_t hlen;
	bool state_err;
	int fd;

	if (qindex_find(&rn->index, id) != NULL)
		return;
	memset(&env, 0, sizeof(env));
	if ((fd = spool_read(rn->spool, id, &env, &hlen, &state_err, err, sizeof(err))) < 0) {
		load_failed(rn, id, err, errno);
		return;
	}
	close(fd);
	if ((e = qindex_add(&rn->index, id, env.arrived, hlen + env.size)) == NULL) {
		log_err("id=%s cannot index it: out of memory (the next scan tries again)", id);
		spool_env_clear(&env);
		return;
	}
	e->held = spool_is_held(rn->spool, id);
	if (runner_owner(rn, id, &env) == NULL)
		e->parked = true;
	runner_schedule(rn, e, first_due(rn, &env));
	spool_env_clear(&env);
}

static void
scan_one(const char *name, bool bad, void *arg)
{
	struct runner *rn = arg;

	if (!bad) {
		runner_load(rn, name);
		return;
	}
	log_err("%s/msg/%s is not a queue file: moved to %s/corrupt", spool_path(rn->spool),
	    name, spool_path(rn->spool));
	if (spool_move_aside(rn->spool, name) < 0)
		log_err("cannot move %s aside: %s", name, strerror(errno));
}

/* Loads what is not indexed yet; the figures start from what is there. */
static void
scan(struct runner *rn)
{
	unsigned tmp = spool_clean_tmp(rn->spool, time(NULL), TMP_MIN_AGE);
	unsigned states = spool_clean_states(rn->spool);

	if (tmp > 0 || states > 0)
		log_info("removed %u unfinished write(s) and %u stale state file(s)",
		    tmp, states);
	if (spool_scan(rn->spool, scan_one, rn) < 0)
		log_err("cannot read %s/msg: %s", spool_path(rn->spool), strerror(errno));
	queue_stats_reset(rn->stats, rn->index.count, rn->index.bytes,
	    qindex_oldest(&rn->index));
}

static void
rescan_cb(evutil_socket_t fd, short what, void *arg)
{
	struct runner *rn = arg;
	struct timeval tv = { RESCAN_SECONDS, 0 };

	scan(rn);
	evtimer_add(rn->ev_rescan, &tv);
}

/* --- holds and tool requests */

static void
set_held(struct runner *rn, const char *id, bool held)
{
	struct qentry *e = qindex_find(&rn->index, id);

	if (e == NULL || e->held == held)
		return;
	e->held = held;
	log_info("id=%s %s", id, held ? "held (smtpmuxd -s hold)" : "released");
	if (held)
		qindex_unschedule(&rn->index, e);
	else
		runner_schedule(rn, e, e->next);
}

static void
flush_one(struct qentry *e, void *arg)
{
	struct runner *rn = arg;

	if (!e->held && !e->parked && !e->busy)
		runner_schedule(rn, e, (int64_t)time(NULL));
}

static void
delete_one(struct qentry *e, void *arg)
{
	struct runner *rn = arg;

	if (e->busy) {
		e->delete_pending = true;
		runner_job_cancel(e);
		return;
	}
	if (spool_remove(rn->spool, e->id) < 0 && errno != ENOENT)
		log_err("id=%s cannot remove the queue file: %s", e->id, strerror(errno));
	log_info("id=%s status=deleted (smtpmuxd -s delete)", e->id);
	queue_stats_count(rn->stats, QUEUE_DELETED);
	runner_forget(rn, e);
}

static void
request(const char *verb, const char *target, void *arg)
{
	struct runner *rn = arg;
	void (*fn)(struct qentry *, void *) = strcmp(verb, "flush") == 0 ? flush_one : delete_one;
	struct qentry *e;

	log_info("%s %s requested", verb, target);
	if (strcmp(target, "all") == 0) {
		qindex_each(&rn->index, fn, rn);
		return;
	}
	if ((e = qindex_find(&rn->index, target)) != NULL)
		fn(e, rn);
	else if (fn == delete_one && spool_remove(rn->spool, target) == 0)
		log_info("id=%s status=deleted (smtpmuxd -s delete)", target);
}

/* --- inotify */

static void
on_watch_event(struct runner *rn, const struct inotify_event *ev)
{
	const char *name = ev->len > 0 ? ev->name : "";
	bool id = spool_id_valid(name, strlen(name));

	if (ev->mask & IN_Q_OVERFLOW)
		scan(rn);
	else if (ev->wd == rn->wd_msg && id)
		runner_load(rn, name);
	else if (ev->wd == rn->wd_hold && id)
		set_held(rn, name, (ev->mask & (IN_CREATE | IN_MOVED_TO)) != 0);
	else if (ev->wd == rn->wd_ctl)
		spool_take_requests(rn->spool, request, rn);
}

static void
on_inotify(evutil_socket_t fd, short what, void *arg)
{
	struct runner *rn = arg;
	char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		for (char *p = buf; p < buf + n; ) {
			const struct inotify_event *ev = (const struct inotify_event *)p;

			on_watch_event(rn, ev);
			p += sizeof(*ev) + ev->len;
		}
	}
}

static int
watch(struct runner *rn, enum spool_sub sub, uint32_t mask)
{
	char path[4200];

	snprintf(path, sizeof(path), "%s/%s", spool_path(rn->spool), spool_sub_name(sub));
	return inotify_add_watch(rn->inotify_fd, path, mask | IN_ONLYDIR);
}

static int
watches_start(struct runner *rn)
{
	rn->inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (rn->inotify_fd < 0 ||
	    (rn->wd_msg = watch(rn, SPOOL_MSG, IN_MOVED_TO | IN_CREATE)) < 0 ||
	    (rn->wd_hold = watch(rn, SPOOL_HOLD, IN_CREATE | IN_MOVED_TO | IN_DELETE |
	        IN_MOVED_FROM)) < 0 ||
	    (rn->wd_ctl = watch(rn, SPOOL_CTL, IN_CREATE | IN_MOVED_TO)) < 0)
		return -1;
	rn->ev_inotify = event_new(rn->rt.base, rn->inotify_fd, EV_READ | EV_PERSIST, on_inotify, rn);
	return rn->ev_inotify != NULL && event_add(rn->ev_inotify, NULL) == 0 ? 0 : -1;
}

/* --- taking the spool */

/* Watches first, then the scan: nothing committed in between is missed. */
static void
take_spool(struct runner *rn)
{
	struct timeval tv = { RESCAN_SECONDS, 0 };

	if (watches_start(rn) < 0)
		log_err("cannot watch %s (%s): new messages are found by the scan every "
		    "%d s", spool_path(rn->spool), strerror(errno), RESCAN_SECONDS);
	scan(rn);
	spool_clean_free(rn->spool);
	spool_take_requests(rn->spool, request, rn);
	evtimer_add(rn->ev_rescan, &tv);
	rn->started = true;
	log_info("%zu message(s), %" PRIu64 " octets in %s", rn->index.count,
	    rn->index.bytes, spool_path(rn->spool));
}

static void
lock_cb(evutil_socket_t fd, short what, void *arg)
{
	struct runner *rn = arg;
	struct timeval tv = { LOCK_RETRY_SECONDS, 0 };
	static const char waiting[] = "waiting for the previous queue runner to finish";

	if ((rn->lock_fd = spool_lock_runner(rn->spool)) >= 0) {
		take_spool(rn);
		return;
	}
	if (errno != EWOULDBLOCK) {
		log_err("cannot lock %s: %s", spool_path(rn->spool), strerror(errno));
	} else if (what == 0) {
		log_info("%s", waiting);
	}
	evtimer_add(rn->ev_lock, &tv);
}

/* --- signals and life cycle */

static void
deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct runner *rn = arg;

	log_warn("shutdown timeout: cancelling %u delivery(ies)", rn->busy);
	runner_jobs_cancel_all(rn);
	event_base_loopexit(rn->rt.base, NULL);
}

static void
on_term(evutil_socket_t sig, short what, void *arg)
{
	struct runner *rn = arg;
	struct timeval tv = { (time_t)rn->cfg->limits.shutdown_timeout, 0 };

	if (rn->stopping)
		return;
	rn->stopping = true;
	evtimer_del(rn->ev_due);
	upstream_close_idle(&rn->rt);    /* QUIT to idle downstream sessions */
	log_info("signal %d: stopping after %u delivery(ies) under way", (int)sig, rn->busy);
	if (rn->busy == 0)
		event_base_loopexit(rn->rt.base, NULL);
	else
		evtimer_add(rn->ev_deadline, &tv);
}

/* A runner whose master was killed stops too, as the workers do. */
static void
follow_master(pid_t master_pid)
{
#ifdef PR_SET_PDEATHSIG
	(void)prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
	if (getppid() != master_pid)
		raise(SIGTERM);
#else
	(void)master_pid;
#endif
}

static int
runner_setup(struct runner *rn, const struct runner_params *p)
{
	char err[512];

	rn->cfg = p->cfg;
	rn->stats = p->stats;
	rn->rng = queue_random_seed();
	rn->lock_fd = rn->inotify_fd = -1;
	qindex_init(&rn->index);
	rn->rt.cfg = p->cfg;
	rn->rt.health = p->health;
	rn->rt.worker_slot = p->slot;
	rn->rt.tokens = p->tokens;       /* an OAuth downstream logs in as for a worker */
	if ((rn->rt.base = event_base_new()) == NULL ||
	    (rn->rt.dns = helper_dns_create(rn->rt.base)) == NULL ||
	    (rn->ev_due = evtimer_new(rn->rt.base, dispatch, rn)) == NULL ||
	    (rn->ev_rescan = evtimer_new(rn->rt.base, rescan_cb, rn)) == NULL ||
	    (rn->ev_lock = evtimer_new(rn->rt.base, lock_cb, rn)) == NULL ||
	    (rn->ev_deadline = evtimer_new(rn->rt.base, deadline_cb, rn)) == NULL ||
	    (rn->ev_oldest = evtimer_new(rn->rt.base, oldest_cb, rn)) == NULL ||
	    helper_signals_start_with(&rn->sigs, rn->rt.base, on_term, rn) < 0) {
		log_err("cannot set up the event loop");
		return -1;
	}
	/* As a worker's: draining a backlog to one provider is one session
	 * that carries message after message, not a login per message. */
	if (p->cfg->connection_cache.enabled &&
	    (rn->rt.cache = upstream_cache_new(&p->cfg->connection_cache)) == NULL) {
		log_err("cannot set up the connection cache: out of memory");
		return -1;
	}
	/* A retry counts in the cluster's quotas, circuits and rotation as a
	 * worker's delivery does: the same link, on this loop. */
	if (p->cfg->cluster.enabled && (rn->rt.cluster = cluster_new(&rn->rt)) == NULL) {
		log_err("cannot set up the link to the cluster: out of memory");
		return -1;
	}
	if (spool_prepare(p->cfg->queue.dir, false, 0, 0, err, sizeof(err)) < 0 ||
	    (rn->spool = spool_open(p->cfg->queue.dir, err, sizeof(err))) == NULL ||
	    (rn->rt.spool = spool_writer_new(rn->rt.base, p->cfg->queue.dir, p->stats, 0, err,
	        sizeof(err))) == NULL) {
		log_err("%s", err);
		return -1;
	}
	return 0;
}

static void
event_free_if(struct event *ev)
{
	if (ev != NULL)
		event_free(ev);
}

static void
runner_cleanup(struct runner *rn)
{
	runner_jobs_cancel_all(rn);
	spool_writer_free(rn->rt.spool);
	qindex_free(&rn->index);
	event_free_if(rn->ev_inotify);
	event_free_if(rn->ev_due);
	event_free_if(rn->ev_rescan);
	event_free_if(rn->ev_lock);
	event_free_if(rn->ev_deadline);
	event_free_if(rn->ev_oldest);
	helper_signals_stop(&rn->sigs);
	if (rn->inotify_fd >= 0)
		close(rn->inotify_fd);
	if (rn->lock_fd >= 0)
		close(rn->lock_fd);
	spool_close(rn->spool);
	upstream_free_lingering(&rn->rt);
	upstream_cache_free(rn->rt.cache);
	/* The last ENDs go out before the link does. */
	cluster_flush(rn->rt.cluster);
	cluster_free(rn->rt.cluster);
	if (rn->rt.dns != NULL)
		evdns_base_free(rn->rt.dns, 0);
	if (rn->rt.base != NULL)
		event_base_free(rn->rt.base);
}

int
runner_main(const struct runner_params *p)
{
	struct runner rn;
	int rc = 1;

	memset(&rn, 0, sizeof(rn));
	log_set_role("queue");
#ifdef PR_SET_NAME
	/* What ps and top show: the runner apart from the workers. */
	(void)prctl(PR_SET_NAME, RUNNER_PROCESS_NAME, 0, 0, 0);
#endif
	follow_master(p->master_pid);
	if (runner_setup(&rn, p) == 0) {
		lock_cb(-1, 0, &rn);
		rc = event_base_dispatch(rn.rt.base) < 0 ? 1 : 0;
	}
	runner_cleanup(&rn);
	return rc;
}

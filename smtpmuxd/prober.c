/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/dns.h>
#include <event2/event.h>

#include "helper_dns.h"
#include "helper_signals.h"
#include "log.h"
#include "prober.h"
#include "runtime.h"
#include "status.h"
#include "upstream.h"

/* One probed account: downstreams of several users that share a health
 * record (same addr and user) are probed once, at the shortest interval. */
struct probe {
	struct prober *pr;
	const struct downstream_cfg *ds;
	unsigned interval;
	struct event *timer;
	struct upstream *up;             /* the probe under way */
	bool running;
	int last_ok;                     /* -1 unknown, 0 failing, 1 answering */
};

struct prober {
	struct runtime rt;
	struct probe *probes;
	size_t n_probes;
	struct status_http *http;
	struct helper_signals signals;
};

bool
prober_needed(const struct config *cfg)
{
	if (cfg->status_listen != NULL && cfg->status_listen[0] != '\0')
		return true;
	for (size_t i = 0; i < cfg->n_users; i++)
		for (size_t j = 0; j < cfg->users[i].n_downstreams; j++)
			if (cfg->users[i].downstreams[j].probe_interval > 0)
				return true;
	return false;
}

static void probe_schedule(struct probe *p, unsigned delay);

static void
probe_verdict(struct probe *p, bool ok, unsigned latency_ms, const char *error)
{
	const struct downstream_cfg *ds = p->ds;

	health_probe_result(ds->health, ds, &p->pr->rt.cfg->health, time(NULL), ok,
	    latency_ms, error);
	if (p->last_ok != (int)ok) {
		if (ok)
			log_info("probe downstream=%s addr=%s: answering", ds->name, ds->addr);
		else
			log_warn("probe downstream=%s addr=%s: %s", ds->name, ds->addr, error);
	}
	p->last_ok = ok;
}

static void
probe_done(void *arg, const struct upstream_result *res)
{
	struct probe *p = arg;
	char error[SMTP_REPLY_TEXT_MAX + 64];
	bool ok = res->status == UPSTREAM_OK;

	p->running = false;
	p->up = NULL;
	if (ok)
		error[0] = '\0';
	else if (res->code)
		snprintf(error, sizeof(error), "probe %s: %d %s", res->stage ? res->stage : "?",
		    res->code, res->text);
	else
		snprintf(error, sizeof(error), "probe %s: %s", res->stage ? res->stage : "?",
		    res->text);
	probe_verdict(p, ok, res->latency_ms, error);
	probe_schedule(p, p->interval);
}

static void
probe_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct probe *p = arg;
	struct upstream *up;

	(void)fd;
	(void)what;
	p->running = true;
	up = upstream_probe(&p->pr->rt, p->ds, probe_done, p);
	if (!p->running)
		return;                  /* done was called already */
	if (up == NULL) {
		p->running = false;
		probe_verdict(p, false, 0, "probe: cannot start");
		probe_schedule(p, p->interval);
		return;
	}
	p->up = up;
}

static void
probe_schedule(struct probe *p, unsigned delay)
{
	struct timeval tv = { (time_t)delay, 0 };

	evtimer_add(p->timer, &tv);
}

static struct probe *
probe_find(struct prober *pr, const struct health_rec *rec)
{
	for (size_t i = 0; i < pr->n_probes; i++)
		if (pr->probes[i].ds->health == rec)
			return &pr->probes[i];
	return NULL;
}

static size_t
probe_candidates(const struct config *cfg)
{
	size_t n = 0;

	for (size_t i = 0; i < cfg->n_users; i++)
		n += cfg->users[i].n_downstreams;
	return n;
}

static int
probes_create(struct prober *pr, const struct config *cfg)
{
	pr->probes = calloc(probe_candidates(cfg) + 1, sizeof(*pr->probes));
	if (pr->probes == NULL)
		return -1;
	for (size_t i = 0; i < cfg->n_users; i++) {
		for (size_t j = 0; j < cfg->users[i].n_downstreams; j++) {
			const struct downstream_cfg *ds = &cfg->users[i].downstreams[j];
			struct probe *p;

			if (ds->probe_interval == 0 || ds->health == NULL)
				continue;
			if ((p = probe_find(pr, ds->health)) != NULL) {
				if (ds->probe_interval < p->interval)
					p->interval = ds->probe_interval;
				continue;
			}
			p = &pr->probes[pr->n_probes];
			*p = (struct probe){ .pr = pr, .ds = ds, .interval = ds->probe_interval,
			    .last_ok = -1 };
			if ((p->timer = evtimer_new(pr->rt.base, probe_timer_cb, p)) == NULL)
				return -1;
			pr->n_probes++;
		}
	}
	return 0;
}

static void
probes_free(struct prober *pr)
{
	for (size_t i = 0; i < pr->n_probes; i++) {
		if (pr->probes[i].up != NULL)
			upstream_cancel(pr->probes[i].up);
		event_free(pr->probes[i].timer);
	}
	free(pr->probes);
}

static int
prober_start(struct prober *pr, const struct config *cfg, struct health *h,
    const struct token_table *tokens, const struct queue_stats *qs)
{
	char err[256];

	pr->rt.cfg = cfg;
	pr->rt.health = h;
	pr->rt.worker_slot = health_helper_slot(HEALTH_HELPER_PROBER);
	if ((pr->rt.base = event_base_new()) == NULL || (pr->rt.dns = helper_dns_create(pr->rt.base)) == NULL) {
		log_err("cannot create the event loop");
		return -1;
	}
	if (helper_signals_start(&pr->signals, pr->rt.base) < 0 || probes_create(pr, cfg) < 0) {
		log_err("out of memory");
		return -1;
	}
	if (cfg->status_listen != NULL && cfg->status_listen[0] != '\0') {
		pr->http = status_http_start(pr->rt.base, cfg->status_listen, cfg, h,
		    err, sizeof(err));
		if (pr->http == NULL) {
			log_err("%s", err);
			return -1;
		}
		status_http_set_tokens(pr->http, tokens);
		if (qs != NULL)
			status_http_set_queue(pr->http, qs);
		log_info("serving the status page on http://%s/ and metrics on /metrics",
		    cfg->status_listen);
	}
	for (size_t i = 0; i < pr->n_probes; i++)
		probe_schedule(&pr->probes[i], 0);
	return 0;
}

static void
prober_stop(struct prober *pr)
{
	status_http_free(pr->http);
	probes_free(pr);
	helper_signals_stop(&pr->signals);
	upstream_free_lingering(&pr->rt);
	if (pr->rt.dns != NULL)
		evdns_base_free(pr->rt.dns, 0);
	if (pr->rt.base != NULL)
		event_base_free(pr->rt.base);
}

int
prober_main(const struct config *cfg, struct health *h, const struct token_table *tokens,
    const struct queue_stats *qs)
{
	struct prober pr;
	int rc = 1;

	memset(&pr, 0, sizeof(pr));
	log_set_role("prober");
	if (prober_start(&pr, cfg, h, tokens, qs) == 0) {
		log_info("probing %zu downstream(s)", pr.n_probes);
		rc = event_base_dispatch(pr.rt.base) < 0 ? 1 : 0;
	}
	prober_stop(&pr);
	return rc;
}

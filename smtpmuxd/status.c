/* SPDX-License-Identifier: MIT */
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/listener.h>
#include <event2/util.h>

#include "log.h"
#include "netaddr.h"
#include "status.h"
#include "status_page.h"
#include "status_snapshot.h"
#include "status_oauth.h"
#include "status_queue.h"

/* --- reading the segment */

struct snapshots {
	struct health_snapshot *s;
	size_t n;
};

/*
 * Snapshots of the records the running configuration uses; records kept
 * only for keys that may come back are not shown.
 */
static int
snapshots_take(struct snapshots *out, const struct health *h,
    const struct health_cfg *hc, time_t now)
{
	size_t count = health_count(h);

	out->n = 0;
	out->s = calloc(count ? count : 1, sizeof(*out->s));
	if (out->s == NULL)
		return -1;
	for (size_t i = 0; i < count; i++)
		if (health_snapshot(h, i, hc, now, &out->s[out->n]) == 0)
			out->n++;
	/* view.name/addr point into each snapshot, which never moves */
	return 0;
}

static const char *
snapshot_user(const struct health_snapshot *s)
{
	const char *sp = strchr(s->key, ' ');

	return sp ? sp + 1 : "";
}

/* --- the status table */

static const char *
window_cell(char *buf, size_t len, uint32_t sent, uint32_t limit)
{
	if (limit)
		snprintf(buf, len, "%" PRIu32 "/%" PRIu32, sent, limit);
	else
		snprintf(buf, len, "%" PRIu32 "/-", sent);
	return buf;
}

static const char *
error_cell(char *buf, size_t len, const struct health_snapshot *s)
{
	struct tm tm;
	char when[32];

	if (s->last_error_time <= 0 || gmtime_r(&s->last_error_time, &tm) == NULL)
		return "-";
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
	snprintf(buf, len, "%s %s", when, s->last_error);
	return buf;
}

static int
column_width(const struct snapshots *ss, const char *title, bool key)
{
	size_t w = strlen(title);

	for (size_t i = 0; i < ss->n; i++) {
		size_t l = strlen(key ? ss->s[i].key : ss->s[i].name);
		if (l > w)
			w = l;
	}
	return (int)w;
}

static void
status_row(FILE *out, const struct health_snapshot *s, int wname, int wkey)
{
	char m[24], hr[24], d[24], err[224];
	const struct smtpmux_downstream_view *v = &s->view;

	fprintf(out, "%-*s  %-*s  %-9s  %5" PRIu32 "  %6" PRIu32 "  %7" PRIu32
	    "  %-11s  %-11s  %-11s  %8" PRIu64 "  %8" PRIu64 "  %8" PRIu64 "  %s\n",
	    wname, s->name, wkey, s->key, health_state_name(v->state),
	    v->consecutive_failures, v->in_flight, v->latency_ms,
	    window_cell(m, sizeof(m), s->sent_minute, s->limit_minute),
	    window_cell(hr, sizeof(hr), s->sent_hour, s->limit_hour),
	    window_cell(d, sizeof(d), s->sent_day, s->limit_day),
	    v->attempts, v->successes, v->failures, error_cell(err, sizeof(err), s));
}

void
status_print(FILE *out, const struct health *h, const struct health_cfg *hc, time_t now)
{
	struct snapshots ss;
	int wname, wkey;

	if (snapshots_take(&ss, h, hc, now) < 0) {
		fprintf(out, "smtpmuxd: out of memory\n");
		return;
	}
	wname = column_width(&ss, "NAME", false);
	wkey = column_width(&ss, "DOWNSTREAM", true);
	fprintf(out, "%-*s  %-*s  %-9s  %5s  %6s  %7s  %-11s  %-11s  %-11s  %8s  %8s  %8s  %s\n",
	    wname, "NAME", wkey, "DOWNSTREAM", "STATE", "FAILS", "FLIGHT", "LAT(ms)",
	    "MINUTE", "HOUR", "DAY", "ATTEMPTS", "SENT", "FAILED", "LAST ERROR");
	for (size_t i = 0; i < ss.n; i++)
		status_row(out, &ss.s[i], wname, wkey);
	if (ss.n == 0)
		fprintf(out, "(no downstreams)\n");
	free(ss.s);
}

void
status_print_cluster(FILE *out, const struct config *cfg, const struct health *h)
{
	struct status_cluster_summary c;

	status_cluster_take(&c, cfg, h);
	if (!c.present)
		return;
	fprintf(out, "cluster: %s: link %s in %u of %u workers; STATE and FAILS are the "
	    "cluster's, the other columns this instance's; %" PRIu64 " attempts decided "
	    "locally for want of a link\n", c.address,
	    c.workers > 0 && c.linked == c.workers ? "up" : "down", c.linked, c.workers,
	    c.local_decisions);
}

/* --- Prometheus text exposition */

struct metric {
	const char *name;
	const char *type;
	const char *help;
	uint64_t (*value)(const struct health_snapshot *);
};

static uint64_t m_up(const struct health_snapshot *s)
{
	return s->view.state == SMTPMUX_DS_UP || s->view.state == SMTPMUX_DS_THROTTLED;
}
static uint64_t m_available(const struct health_snapshot *s) { return s->view.available; }
static uint64_t m_state(const struct health_snapshot *s) { return s->view.state; }
static uint64_t m_fails(const struct health_snapshot *s) { return s->view.consecutive_failures; }
static uint64_t m_in_flight(const struct health_snapshot *s) { return s->view.in_flight; }
static uint64_t m_latency(const struct health_snapshot *s) { return s->view.latency_ms; }
static uint64_t m_attempts(const struct health_snapshot *s) { return s->view.attempts; }
static uint64_t m_successes(const struct health_snapshot *s) { return s->view.successes; }
static uint64_t m_failures(const struct health_snapshot *s) { return s->view.failures; }
static uint64_t m_error_time(const struct health_snapshot *s)
{
	return s->last_error_time > 0 ? (uint64_t)s->last_error_time : 0;
}

static const struct metric metrics[] = {
	{ "smtpmux_downstream_up", "gauge",
	  "1 while the downstream's circuit breaker is closed (it is not failing).", m_up },
	{ "smtpmux_downstream_available", "gauge",
	  "1 when the downstream can take a message now (not down, throttled or over quota).",
	  m_available },
	{ "smtpmux_downstream_state", "gauge",
	  "0 up, 1 down (circuit open), 2 half-open, 3 throttled.", m_state },
	{ "smtpmux_downstream_consecutive_failures", "gauge",
	  "Failed attempts since the last success.", m_fails },
	{ "smtpmux_downstream_in_flight", "gauge",
	  "Deliveries under way, all workers.", m_in_flight },
	{ "smtpmux_downstream_latency_ms", "gauge",
	  "Moving average of successful deliveries and probes, milliseconds.", m_latency },
	{ "smtpmux_downstream_attempts_total", "counter",
	  "Delivery attempts ended.", m_attempts },
	{ "smtpmux_downstream_successes_total", "counter",
	  "Messages the downstream accepted.", m_successes },
	{ "smtpmux_downstream_failures_total", "counter",
	  "Attempts that failed or were throttled.", m_failures },
	{ "smtpmux_downstream_last_error_timestamp_seconds", "gauge",
	  "When the last error happened, seconds since the epoch; 0: never.", m_error_time },
};

int
status_label_value(struct evbuffer *out, const char *v)
{
	for (; *v != '\0'; v++) {
		const char *esc = *v == '\\' ? "\\\\" : *v == '"' ? "\\\"" : *v == '\n' ? "\\n" : NULL;
		if ((esc ? evbuffer_add(out, esc, 2) : evbuffer_add(out, v, 1)) < 0)
			return -1;
	}
	return 0;
}

static int
add_labels(struct evbuffer *out, const struct health_snapshot *s, const char *window)
{
	int rc = 0;

	rc |= evbuffer_add_printf(out, "{downstream=\"") < 0;
	rc |= status_label_value(out, s->name);
	rc |= evbuffer_add_printf(out, "\",addr=\"") < 0;
	rc |= status_label_value(out, s->addr);
	rc |= evbuffer_add_printf(out, "\",user=\"") < 0;
	rc |= status_label_value(out, snapshot_user(s));
	if (window != NULL)
		rc |= evbuffer_add_printf(out, "\",window=\"%s", window) < 0;
	rc |= evbuffer_add_printf(out, "\"}") < 0;
	return rc ? -1 : 0;
}

int
status_metric_family(struct evbuffer *out, const char *name, const char *type,
    const char *help)
{
	return evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type) < 0 ? -1 : 0;
}

static int
add_sample(struct evbuffer *out, const char *name, const struct health_snapshot *s,
    const char *window, uint64_t value)
{
	if (evbuffer_add_printf(out, "%s", name) < 0 || add_labels(out, s, window) < 0)
		return -1;
	return evbuffer_add_printf(out, " %" PRIu64 "\n", value) < 0 ? -1 : 0;
}

static int
add_windows(struct evbuffer *out, const struct snapshots *ss)
{
	static const char *const window[] = { "minute", "hour", "day" };
	int rc = 0;

	rc |= status_metric_family(out, "smtpmux_downstream_sent", "gauge",
	    "Messages reserved or sent in the current quota window.");
	for (size_t i = 0; i < ss->n; i++) {
		const struct health_snapshot *s = &ss->s[i];
		rc |= add_sample(out, "smtpmux_downstream_sent", s, window[0], s->sent_minute);
		rc |= add_sample(out, "smtpmux_downstream_sent", s, window[1], s->sent_hour);
		rc |= add_sample(out, "smtpmux_downstream_sent", s, window[2], s->sent_day);
	}
	rc |= status_metric_family(out, "smtpmux_downstream_quota_limit", "gauge",
	    "Configured messages per window (windows without a limit are absent).");
	for (size_t i = 0; i < ss->n; i++) {
		const struct health_snapshot *s = &ss->s[i];
		const uint32_t limit[] = { s->limit_minute, s->limit_hour, s->limit_day };
		for (size_t w = 0; w < 3; w++)
			if (limit[w])
				rc |= add_sample(out, "smtpmux_downstream_quota_limit", s, window[w], limit[w]);
	}
	return rc ? -1 : 0;
}

int
status_metrics_cluster(struct evbuffer *out, const struct config *cfg, const struct health *h)
{
	struct status_cluster_summary c;
	int rc = 0;

	status_cluster_take(&c, cfg, h);
	if (!c.present)
		return 0;
	rc |= status_metric_family(out, "smtpmux_cluster_workers_linked", "gauge",
	    "Workers whose link to the cluster's Redis is up (the downstreams' state is then "
	    "the cluster's).");
	rc |= evbuffer_add_printf(out, "smtpmux_cluster_workers_linked %u\n", c.linked) < 0;
	rc |= status_metric_family(out, "smtpmux_cluster_workers", "gauge",
	    "Workers that keep a link to the cluster's Redis.");
	rc |= evbuffer_add_printf(out, "smtpmux_cluster_workers %u\n", c.workers) < 0;
	rc |= status_metric_family(out, "smtpmux_cluster_link_up", "gauge",
	    "1 while every worker's link to the cluster is up.");
	rc |= evbuffer_add_printf(out, "smtpmux_cluster_link_up %d\n",
	    c.workers > 0 && c.linked == c.workers) < 0;
	rc |= status_metric_family(out, "smtpmux_cluster_local_decisions_total", "counter",
	    "Delivery attempts decided by this instance alone for want of a link (quotas "
	    "per instance then).");
	rc |= evbuffer_add_printf(out, "smtpmux_cluster_local_decisions_total %" PRIu64 "\n",
	    c.local_decisions) < 0;
	return rc ? -1 : 0;
}

int
status_metrics(struct evbuffer *out, const struct health *h,
    const struct health_cfg *hc, time_t now)
{
	struct snapshots ss;
	int rc = 0;

	if (snapshots_take(&ss, h, hc, now) < 0)
		return -1;
	for (size_t m = 0; m < sizeof(metrics) / sizeof(metrics[0]); m++) {
		rc |= status_metric_family(out, metrics[m].name, metrics[m].type, metrics[m].help);
		for (size_t i = 0; i < ss.n; i++)
			rc |= add_sample(out, metrics[m].name, &ss.s[i], NULL, metrics[m].value(&ss.s[i]));
	}
	rc |= add_windows(out, &ss);
	free(ss.s);
	return rc ? -1 : 0;
}

/* --- the HTTP endpoint */

struct status_http {
	struct evhttp *http;
	struct evhttp_bound_socket *bound;
	const struct config *cfg;
	struct health *health;
	const struct health_cfg *hc;
	const struct token_table *tokens;    /* NULL: no OAuth downstreams */
	const struct queue_stats *qs;    /* NULL: no queue figures */
};

static void
reply_text(struct evhttp_request *req, int code, const char *reason, const char *body)
{
	struct evbuffer *buf = evbuffer_new();

	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
	    "text/plain; charset=utf-8");
	if (buf != NULL)
		evbuffer_add_printf(buf, "%s\n", body);
	evhttp_send_reply(req, code, reason, buf);
	if (buf != NULL)
		evbuffer_free(buf);
}

static void
metrics_cb(struct evhttp_request *req, void *arg)
{
	struct status_http *sh = arg;
	struct evbuffer *buf;

	if ((buf = evbuffer_new()) == NULL || status_metrics(buf, sh->health, sh->hc, time(NULL)) < 0 ||
	    status_metrics_cluster(buf, sh->cfg, sh->health) < 0 ||
	    status_oauth_metrics(buf, sh->tokens, time(NULL)) < 0 ||
	    (sh->qs != NULL && status_queue_metrics(buf, sh->qs, time(NULL)) < 0)) {
		log_warn("status: out of memory building /metrics");
		if (buf != NULL)
			evbuffer_free(buf);
		reply_text(req, 500, "Internal Server Error", "out of memory");
		return;
	}
	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
	    "text/plain; version=0.0.4; charset=utf-8");
	evhttp_send_reply(req, HTTP_OK, "OK", buf);
	evbuffer_free(buf);
}

/* The page loads nothing from anywhere, and no other site may frame it. */
static const char page_csp[] =
    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'";

static void
page_cb(struct evhttp_request *req, void *arg)
{
	struct status_http *sh = arg;
	struct evkeyvalq *headers = evhttp_request_get_output_headers(req);
	struct status_snapshot snap;
	struct evbuffer *buf = evbuffer_new();
	int rc = -1;

	if (buf != NULL && status_snapshot_take(&snap, sh->cfg, sh->health, time(NULL)) == 0) {
		if (sh->qs != NULL)
			status_queue_summary(sh->qs, snap.now, &snap.queue);
		rc = status_page_render(buf, &snap);
		status_snapshot_free(&snap);
	}
	if (rc < 0) {
		log_warn("status: out of memory building the status page");
		if (buf != NULL)
			evbuffer_free(buf);
		reply_text(req, 500, "Internal Server Error", "out of memory");
		return;
	}
	evhttp_add_header(headers, "Content-Type", "text/html; charset=utf-8");
	evhttp_add_header(headers, "Content-Security-Policy", page_csp);
	evhttp_add_header(headers, "X-Content-Type-Options", "nosniff");
	evhttp_add_header(headers, "Referrer-Policy", "no-referrer");
	evhttp_add_header(headers, "Cache-Control", "no-store");
	evhttp_send_reply(req, HTTP_OK, "OK", buf);
	evbuffer_free(buf);
}

static void
not_found_cb(struct evhttp_request *req, void *arg)
{
	(void)arg;
	reply_text(req, HTTP_NOTFOUND, "Not Found", "not found; try / or /metrics");
}

/* The address is read as the configuration reads it: numeric, "[v6]:port". */
static struct evconnlistener *
listen_numeric(struct event_base *base, const char *addr, char *err, size_t errlen)
{
	struct sockaddr_storage ss;
	struct evconnlistener *l;
	socklen_t sslen = sizeof(ss);
	char *host, *port, why[128];
	int rc;

	if (netaddr_split(addr, &host, &port, why, sizeof(why)) < 0) {
		snprintf(err, errlen, "status_listen %s: %s", addr, why);
		return NULL;
	}
	rc = netaddr_numeric(host, port, &ss, &sslen);
	free(host);
	free(port);
	if (rc < 0) {
		snprintf(err, errlen, "status_listen %s: not a numeric address", addr);
		return NULL;
	}
	l = evconnlistener_new_bind(base, NULL, NULL,
	    LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 16,
	    (struct sockaddr *)&ss, (int)sslen);
	if (l == NULL)
		snprintf(err, errlen, "status_listen %s: %s", addr,
		    evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
	return l;
}

struct status_http *
status_http_start(struct event_base *base, const char *listen_addr,
    const struct config *cfg, struct health *h, char *err, size_t errlen)
{
	struct status_http *sh = calloc(1, sizeof(*sh));
	struct evconnlistener *l;

	if (sh == NULL || (sh->http = evhttp_new(base)) == NULL) {
		snprintf(err, errlen, "status_listen: out of memory");
		free(sh);
		return NULL;
	}
	sh->cfg = cfg;
	sh->health = h;
	sh->hc = &cfg->health;
	evhttp_set_timeout(sh->http, 10);
	evhttp_set_max_headers_size(sh->http, 8192);
	evhttp_set_max_body_size(sh->http, 0);
	evhttp_set_allowed_methods(sh->http, EVHTTP_REQ_GET);
	evhttp_set_cb(sh->http, "/", page_cb, sh);
	evhttp_set_cb(sh->http, "/metrics", metrics_cb, sh);
	evhttp_set_gencb(sh->http, not_found_cb, sh);
	if ((l = listen_numeric(base, listen_addr, err, errlen)) == NULL)
		goto fail;
	if ((sh->bound = evhttp_bind_listener(sh->http, l)) == NULL) {
		evconnlistener_free(l);
		snprintf(err, errlen, "status_listen %s: cannot serve HTTP", listen_addr);
		goto fail;
	}
	return sh;
fail:
	evhttp_free(sh->http);
	free(sh);
	return NULL;
}

void
status_http_set_tokens(struct status_http *sh, const struct token_table *tokens)
{
	sh->tokens = tokens;
}

void
status_http_set_queue(struct status_http *sh, const struct queue_stats *qs)
{
	sh->qs = qs;
}

unsigned
status_http_port(const struct status_http *sh)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	evutil_socket_t fd = evhttp_bound_socket_get_fd(sh->bound);

	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
		return 0;
	if (ss.ss_family == AF_INET)
		return ntohs(((struct sockaddr_in *)&ss)->sin_port);
	if (ss.ss_family == AF_INET6)
		return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
	return 0;
}

void
status_http_free(struct status_http *sh)
{
	if (sh == NULL)
		return;
	evhttp_free(sh->http);
	free(sh);
}

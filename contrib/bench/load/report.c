/* SPDX-License-Identifier: MIT */
#include <inttypes.h>
#include <string.h>

#include "report.h"

static double
per_second(uint64_t n, double seconds)
{
	return seconds > 0 ? (double)n / seconds : 0;
}

static double
ms(uint64_t ns)
{
	return (double)ns / 1e6;
}

static void
human_latency(FILE *f, const char *what, const struct hist *h)
{
	if (h->count == 0) {
		fprintf(f, "%s: none\n", what);
		return;
	}
	fprintf(f, "%s: p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms\n", what,
	    ms(hist_quantile(h, 0.50)), ms(hist_quantile(h, 0.90)), ms(hist_quantile(h, 0.99)),
	    ms(h->max));
}

static void
human_errors(FILE *f, const struct load_stats *s)
{
	const char *lead = "errors     ", *sample;
	char key[16];
	uint64_t n;

	if (stats_error_total(s) == 0) {
		fprintf(f, "errors     none\n");
		return;
	}
	for (unsigned i = 0; stats_error_key(s, i, key, &n); i++) {
		if (n == 0)
			continue;
		sample = stats_sample(s, key);
		fprintf(f, "%s%s: %" PRIu64 " (%s)\n", lead, key, n, sample != NULL ? sample : "");
		lead = "           ";
	}
}

void
report_human(FILE *f, const struct load_opts *o, const struct load_stats *s, const struct load_run *run)
{
	uint64_t sessions = s->sessions_ok + s->sessions_failed;
	char per[32];

	if (o->per_session == 0)
		snprintf(per, sizeof(per), "all");
	else
		snprintf(per, sizeof(per), "%u", o->per_session);
	fprintf(f, "smtp-load: %s:%s, %u connection%s in %u thread%s, %" PRIu64 "-octet messages, "
	    "%s per session, %u rcpt, tls %s, auth %s, pipelining %s\n",
	    o->host, o->port, o->concurrency, o->concurrency == 1 ? "" : "s", o->threads,
	    o->threads == 1 ? "" : "s", o->size, per, o->rcpts, opts_tls_name(o->tls),
	    opts_auth_name(o->auth), o->pipelining ? "when offered" : "off");
	fprintf(f, "messages   %" PRIu64 " accepted, %" PRIu64 " failed, in %.3f s: %.1f/s\n",
	    s->msgs_ok, s->msgs_failed, run->seconds, per_second(s->msgs_ok, run->seconds));
	fprintf(f, "sessions   %" PRIu64 " completed, %" PRIu64 " failed: %.1f/s, %" PRIu64
	    " pipelined\n", s->sessions_ok, s->sessions_failed, per_second(sessions, run->seconds),
	    s->sessions_pipelined);
	human_latency(f, "latency    per message (MAIL to the reply to the dot)", &s->msg_latency);
	human_latency(f, "           per session (connect to the reply to QUIT)", &s->session_latency);
	fprintf(f, "cpu        %.3f s (smtp-load, user + system): %.1f us per message\n",
	    run->cpu_seconds, s->msgs_ok > 0 ? run->cpu_seconds * 1e6 / (double)s->msgs_ok : 0);
	human_errors(f, s);
}

/* A JSON string: quotes, backslashes and control characters escaped. */
static void
json_string(FILE *f, const char *str)
{
	fputc('"', f);
	for (const unsigned char *p = (const unsigned char *)str; *p != '\0'; p++) {
		if (*p == '"' || *p == '\\')
			fprintf(f, "\\%c", *p);
		else if (*p < 0x20 || *p == 0x7f)
			fprintf(f, "\\u%04x", *p);
		else
			fputc(*p, f);
	}
	fputc('"', f);
}

static void
json_latency(FILE *f, const char *name, const struct hist *h)
{
	fprintf(f, "\"%s\":{\"count\":%" PRIu64 ",\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,"
	    "\"max\":%.3f,\"mean\":%.3f}", name, h->count, ms(hist_quantile(h, 0.50)),
	    ms(hist_quantile(h, 0.90)), ms(hist_quantile(h, 0.99)), ms(h->max), ms(hist_mean(h)));
}

/* The error keys seen, each with its count, or with its sample text. */
static void
json_errors(FILE *f, const struct load_stats *s, bool samples)
{
	const char *sep = "", *sample;
	char key[16];
	uint64_t n;

	for (unsigned i = 0; stats_error_key(s, i, key, &n); i++) {
		sample = stats_sample(s, key);
		if (n == 0 || (samples && sample == NULL))
			continue;
		fprintf(f, "%s\"%s\":", sep, key);
		if (samples)
			json_string(f, sample);
		else
			fprintf(f, "%" PRIu64, n);
		sep = ",";
	}
}

void
report_json(FILE *f, const struct load_opts *o, const struct load_stats *s, const struct load_run *run)
{
	char server[sizeof(o->host) + sizeof(o->port) + 4];

	snprintf(server, sizeof(server), strchr(o->host, ':') != NULL ? "[%s]:%s" : "%s:%s",
	    o->host, o->port);
	fputs("{\"server\":", f);
	json_string(f, server);
	fprintf(f, ",\"concurrency\":%u,\"threads\":%u,\"size\":%" PRIu64 ",\"per_session\":%u,"
	    "\"rcpts\":%u,\"tls\":\"%s\",\"auth\":\"%s\",\"pipelining\":%s,",
	    o->concurrency, o->threads, o->size, o->per_session, o->rcpts, opts_tls_name(o->tls),
	    opts_auth_name(o->auth), o->pipelining ? "true" : "false");
	fprintf(f, "\"messages\":%" PRIu64 ",\"failed\":%" PRIu64 ",\"sessions\":%" PRIu64
	    ",\"sessions_failed\":%" PRIu64 ",\"sessions_pipelined\":%" PRIu64 ",",
	    s->msgs_ok, s->msgs_failed, s->sessions_ok, s->sessions_failed, s->sessions_pipelined);
	fprintf(f, "\"seconds\":%.6f,\"msgs_per_s\":%.1f,\"sessions_per_s\":%.1f,"
	    "\"cpu_seconds\":%.3f,\"cpu_us_per_msg\":%.2f,",
	    run->seconds, per_second(s->msgs_ok, run->seconds),
	    per_second(s->sessions_ok + s->sessions_failed, run->seconds), run->cpu_seconds,
	    s->msgs_ok > 0 ? run->cpu_seconds * 1e6 / (double)s->msgs_ok : 0);
	fputs("\"latency_ms\":{", f);
	json_latency(f, "message", &s->msg_latency);
	fputc(',', f);
	json_latency(f, "session", &s->session_latency);
	fputs("},\"errors\":{", f);
	json_errors(f, s, false);
	fputs("},\"error_samples\":{", f);
	json_errors(f, s, true);
	fputs("}}\n", f);
}

/* SPDX-License-Identifier: MIT */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <event2/buffer.h>

#include "status_page.h"

/* The page under construction; the first failed append sticks in err. */
struct page {
	struct evbuffer *out;
	int err;
};

static void
put(struct page *p, const char *s)
{
	if (evbuffer_add(p->out, s, strlen(s)) < 0)
		p->err = -1;
}

static void __attribute__((format(printf, 2, 3)))
putf(struct page *p, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	if (evbuffer_add_vprintf(p->out, fmt, ap) < 0)
		p->err = -1;
	va_end(ap);
}

/* Length of the valid UTF-8 sequence at s, or 0 when it is not one. */
static size_t
utf8_len(const unsigned char *s)
{
	size_t n = s[0] > 0xf4 ? 0 : s[0] >= 0xf0 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 ? 2 : 0;

	/* No overlong forms, UTF-16 surrogates or code points past U+10FFFF. */
	if ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] > 0x9f) ||
	    (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] > 0x8f))
		return 0;
	for (size_t i = 1; i < n; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

/*
 * Text from the configuration or a provider's reply: markup characters
 * escaped, control characters (which XML forbids) as spaces, and bytes
 * that are not UTF-8 as U+FFFD, so the page stays well-formed whatever
 * a provider said.
 */
static void
put_text(struct page *p, const char *text)
{
	const unsigned char *s = (const unsigned char *)text;

	while (*s != '\0') {
		size_t n;

		switch (*s) {
		case '&': put(p, "&amp;"); s++; continue;
		case '<': put(p, "&lt;"); s++; continue;
		case '>': put(p, "&gt;"); s++; continue;
		case '"': put(p, "&quot;"); s++; continue;
		case '\'': put(p, "&#39;"); s++; continue;
		}
		if (*s < 0x20 || *s == 0x7f) {
			put(p, " ");
			s++;
		} else if (*s < 0x80) {
			if (evbuffer_add(p->out, s++, 1) < 0)
				p->err = -1;
		} else if ((n = utf8_len(s)) > 0) {
			if (evbuffer_add(p->out, s, n) < 0)
				p->err = -1;
			s += n;
		} else {
			put(p, "\xef\xbf\xbd");
			s++;
		}
	}
}

static void
put_time(struct page *p, time_t t)
{
	struct tm tm;
	char buf[32];

	if (gmtime_r(&t, &tm) == NULL || strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
		snprintf(buf, sizeof(buf), "%lld", (long long)t);
	put(p, buf);
}

static void
put_age(struct page *p, uint64_t s)
{
	if (s < 120)
		putf(p, "%" PRIu64 " s", s);
	else if (s < 7200)
		putf(p, "%" PRIu64 " min", s / 60);
	else if (s < 172800)
		putf(p, "%" PRIu64 " h", s / 3600);
	else
		putf(p, "%" PRIu64 " days", s / 86400);
}

/* No script, no outside resource: the page is readable as it arrives. */
static const char page_style[] =
    "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#f6f6f6}"
    "h1{font-size:1.4em;margin:0}"
    "header p{color:#666;margin:.2em 0 1em}"
    "section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;"
    "margin:0 0 1em;overflow-x:auto}"
    "h2{font-size:1.1em;margin:.2em 0 .5em}"
    "table{border-collapse:collapse;width:100%}"
    "th,td{text-align:left;padding:.35em .6em;border-top:1px solid #eee;vertical-align:top}"
    "th{font-weight:600;color:#555;border-top:0}"
    ".addr{color:#777;font-size:.9em}"
    ".state{display:inline-block;padding:.1em .6em;border-radius:1em;color:#fff;font-weight:600}"
    ".st-up{background:#2e7d32}.st-down{background:#c62828}"
    ".st-half-open{background:#e68a00}.st-throttled{background:#6a1b9a}"
    ".quota{min-width:12em}"
    ".bar{height:.6em;background:#e0e0e0;border-radius:.3em;overflow:hidden;margin:.15em 0 .1em}"
    ".bar span{display:block;height:100%}"
    ".q-ok .bar span{background:#43a047}.q-high .bar span{background:#fb8c00}"
    ".q-full .bar span{background:#e53935}"
    ".num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    ".err{color:#b71c1c;max-width:32em;overflow-wrap:anywhere}"
    ".none{color:#999}"
    "dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;margin:0}"
    "dt{color:#555}dd{margin:0}";

static void
put_head(struct page *p, const struct status_snapshot *s)
{
	putf(p, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
	    "<meta http-equiv=\"refresh\" content=\"%d\"/>\n"
	    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n"
	    "<title>smtpmux status: ", STATUS_PAGE_REFRESH);
	put_text(p, s->hostname);
	putf(p, "</title>\n<style>%s</style>\n</head>\n<body>\n<header>\n<h1>smtpmux on ",
	    page_style);
	put_text(p, s->hostname);
	put(p, "</h1>\n<p>As of <time>");
	put_time(p, s->now);
	putf(p, "</time>; this page refreshes itself every %d s.</p>\n</header>\n",
	    STATUS_PAGE_REFRESH);
}

/* Shown only once the queue reports figures (struct status_queue_summary). */
static void
put_queue(struct page *p, const struct status_queue_summary *q)
{
	if (!q->present)
		return;
	putf(p, "<section id=\"queue\">\n<h2>Queue</h2>\n<dl>\n"
	    "<dt>Messages waiting</dt><dd class=\"num\" data-field=\"messages\">%" PRIu64 "</dd>\n"
	    "<dt>Their size</dt><dd class=\"num\" data-field=\"bytes\">%" PRIu64 " octets</dd>\n"
	    "<dt>Oldest</dt><dd data-field=\"oldest\">", q->messages, q->bytes);
	if (q->messages > 0)
		put_age(p, q->oldest_age);
	else
		put(p, "<span class=\"none\">none</span>");
	putf(p, "</dd>\n</dl>\n<p>Since the start:</p>\n<dl>\n"
	    "<dt>Delivered from the queue</dt><dd class=\"num\" data-field=\"delivered\">%" PRIu64
	    "</dd>\n<dt>Bounced (refused by every downstream)</dt>"
	    "<dd class=\"num\" data-field=\"bounced\">%" PRIu64 "</dd>\n"
	    "<dt>Expired</dt><dd class=\"num\" data-field=\"expired\">%" PRIu64 "</dd>\n"
	    "</dl>\n</section>\n", q->delivered, q->bounced, q->expired);
}

/* Shown only with a `cluster:` section (struct status_cluster_summary). */
static void
put_cluster(struct page *p, const struct status_cluster_summary *c)
{
	bool up;

	if (!c->present)
		return;
	put(p, "<section id=\"cluster\">\n<h2>Cluster</h2>\n<dl>\n<dt>Redis</dt><dd>");
	put_text(p, c->address);
	up = c->workers > 0 && c->linked == c->workers;
	putf(p, "</dd>\n<dt>Link</dt><dd data-field=\"link\"><span class=\"state st-%s\">%s"
	    "</span> in %u of %u workers</dd>\n", up ? "up" : "down", up ? "up" : "down",
	    c->linked, c->workers);
	putf(p, "<dt>Decided locally</dt><dd class=\"num\" data-field=\"local\">%" PRIu64
	    " attempts</dd>\n</dl>\n<p>State and failures are the cluster's; quota use, "
	    "messages in flight, latency and totals are this instance's.</p>\n</section>\n",
	    c->local_decisions);
}

static void
put_window(struct page *p, const char *window, uint32_t sent, uint32_t limit)
{
	unsigned pct = sent >= limit ? 100 : (unsigned)((uint64_t)sent * 100 / limit);
	const char *level = pct >= 100 ? "q-full" : pct >= 80 ? "q-high" : "q-ok";

	putf(p, "<div class=\"window %s\" data-window=\"%s\" data-sent=\"%" PRIu32 "\" "
	    "data-limit=\"%" PRIu32 "\"><div class=\"bar\"><span style=\"width:%u%%\"></span>"
	    "</div>%s: %" PRIu32 " of %" PRIu32 "</div>", level, window, sent, limit, pct,
	    window, sent, limit);
}

static void
put_quota(struct page *p, const struct health_snapshot *hs)
{
	put(p, "<td class=\"quota\">");
	if (hs->limit_minute)
		put_window(p, "minute", hs->sent_minute, hs->limit_minute);
	if (hs->limit_hour)
		put_window(p, "hour", hs->sent_hour, hs->limit_hour);
	if (hs->limit_day)
		put_window(p, "day", hs->sent_day, hs->limit_day);
	if (!hs->limit_minute && !hs->limit_hour && !hs->limit_day)
		putf(p, "<span class=\"none\">no limit</span> (%" PRIu32 " today)", hs->sent_day);
	put(p, "</td>");
}

static void
put_error(struct page *p, const struct health_snapshot *hs)
{
	put(p, "<td class=\"err\">");
	if (hs->last_error_time <= 0) {
		put(p, "<span class=\"none\">none</span></td>");
		return;
	}
	put(p, "<time>");
	put_time(p, hs->last_error_time);
	put(p, "</time><br/>");
	put_text(p, hs->last_error);
	put(p, "</td>");
}

static void
put_downstream(struct page *p, const struct status_downstream *d)
{
	const struct smtpmux_downstream_view *v = &d->hs.view;
	const char *state = health_state_name(v->state);

	putf(p, "<tr class=\"downstream\" data-state=\"%s\">\n<td><span class=\"name\">", state);
	put_text(p, d->name);
	put(p, "</span><br/><span class=\"addr\">");
	put_text(p, d->hs.addr);
	putf(p, "</span></td>\n<td><span class=\"state st-%s\">%s</span></td>\n", state, state);
	put_quota(p, &d->hs);
	putf(p, "\n<td class=\"num\" data-field=\"in-flight\">%" PRIu32 "</td>\n"
	    "<td class=\"num\" data-field=\"failures\">%" PRIu32 " in a row, %" PRIu64 " in all</td>\n"
	    "<td class=\"num\" data-field=\"latency\">%" PRIu32 " ms</td>\n"
	    "<td class=\"num\" data-field=\"sent\">%" PRIu64 "</td>\n",
	    v->in_flight, v->consecutive_failures, v->failures, v->latency_ms, v->successes);
	put_error(p, &d->hs);
	put(p, "\n</tr>\n");
}

static void
put_user(struct page *p, const struct status_user *u, size_t index)
{
	putf(p, "<section class=\"user\" id=\"user-%zu\">\n<h2>", index + 1);
	put_text(p, u->email);
	put(p, "</h2>\n<table>\n<thead><tr><th>Downstream</th><th>State</th><th>Quota used</th>"
	    "<th class=\"num\">In flight</th><th class=\"num\">Failures</th>"
	    "<th class=\"num\">Latency</th><th class=\"num\">Accepted</th><th>Last error</th>"
	    "</tr></thead>\n<tbody>\n");
	for (size_t i = 0; i < u->n_ds; i++)
		put_downstream(p, &u->ds[i]);
	put(p, "</tbody>\n</table>\n</section>\n");
}

int
status_page_render(struct evbuffer *out, const struct status_snapshot *s)
{
	struct page p = { out, 0 };

	put_head(&p, s);
	put_queue(&p, &s->queue);
	put_cluster(&p, &s->cluster);
	put(&p, "<main>\n");
	for (size_t i = 0; i < s->n_users; i++)
		put_user(&p, &s->users[i], i);
	if (s->n_users == 0)
		put(&p, "<p class=\"none\">No users are configured.</p>\n");
	put(&p, "</main>\n</body>\n</html>\n");
	return p.err;
}

/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "auth.h"
#include "helper_signals.h"
#include "http_client.h"
#include "log.h"
#include "secret_file.h"
#include "token_command.h"
#include "token_helper.h"
#include "token_response.h"

#define RETRY_MAX_S 60                   /* pause between failed requests, at most */
#define FORCED_GAP_S 10                  /* refreshes a refusing server may force */
#define MARGIN_MAX_MS 5000               /* a token is used until this before expiry */
#define WHY_MAX 256

struct token_helper;

/* One account's token: the first downstream bound to the slot names it. */
struct source {
	struct token_helper *th;
	const struct downstream_cfg *ds;
	struct event *timer;
	struct http_request *http;           /* the request under way, or */
	struct command_run *cmd;             /* the command under way */
	char *form;                          /* the POST body: holds secrets */
	size_t form_len;
	char *sent_refresh;                  /* the refresh token in that request */
	char *rotated;                       /* a new one its file could not keep */
	unsigned failures;                   /* in a row */
	int64_t last_forced_ms;
	int64_t started_ms;                  /* of the request under way */
	bool forced;                         /* the request under way was asked for */
	struct token_status st;
};

struct token_helper {
	struct event_base *base;
	struct token_table *tt;
	struct http_client *http;
	struct source *sources;
	size_t n_sources;
	struct helper_signals signals;
	struct event *ev_wake, *ev_child;
};

static void fetch(struct source *s);

/* --- small helpers ------------------------------------------------------ */

static char *
wiped_free(char *p)
{
	if (p != NULL) {
		auth_wipe(p, strlen(p));
		free(p);
	}
	return NULL;
}

static bool
busy(const struct source *s)
{
	return s->http != NULL || s->cmd != NULL;
}

static void
publish(struct source *s)
{
	token_table_status_put(s->th->tt, s->ds->token_slot, &s->st);
}

static void
schedule(struct source *s, int64_t delay_ms)
{
	struct timeval tv;

	if (delay_ms < 0)
		delay_ms = 0;
	tv.tv_sec = (time_t)(delay_ms / 1000);
	tv.tv_usec = (suseconds_t)(delay_ms % 1000) * 1000;
	evtimer_add(s->timer, &tv);
}

/* Never later than a timer already set for sooner. */
static void
schedule_sooner(struct source *s, int64_t delay_ms)
{
	struct timeval at, now;
	int64_t left;

	if (evtimer_pending(s->timer, &at)) {
		event_base_gettimeofday_cached(s->th->base, &now);
		left = ((int64_t)at.tv_sec - now.tv_sec) * 1000 + (at.tv_usec - now.tv_usec) / 1000;
		if (left <= delay_ms)
			return;
	}
	schedule(s, delay_ms);
}

/* Workers stop using a token a little before it expires (a tenth of its
 * life, at most 5 s), so that none reaches a server already expired. */
static int64_t
usable_for_ms(int64_t life_ms)
{
	return life_ms - (life_ms / 10 < MARGIN_MAX_MS ? life_ms / 10 : MARGIN_MAX_MS);
}

/*
 * Refreshes at 80% of a token's life, or sooner when the token is short-
 * lived or the last request took long (a slow endpoint or command): early
 * enough that a request three times as slow, and a second more, still ends
 * before workers stop using the token; never before half its life, nor
 * sooner than a second after the last one.
 */
static int64_t
refresh_delay_ms(int64_t life_ms, int64_t took_ms)
{
	int64_t at = life_ms * 4 / 5, latest = usable_for_ms(life_ms) - 3 * took_ms - 1000;

	if (latest < at)
		at = latest;
	if (at < life_ms / 2)
		at = life_ms / 2;
	return at < 1000 ? 1000 : at;
}

/* --- results ------------------------------------------------------------- */

static void
token_failed(struct source *s, const char *why)
{
	unsigned shift = s->failures < 6 ? s->failures : 6;
	int64_t pause_s = (int64_t)2 << shift;

	s->failures++;
	s->st.failures++;
	s->st.failing = 1;
	s->st.last_error_time = (int64_t)time(NULL);
	log_sanitize(s->st.last_error, sizeof(s->st.last_error), why, strlen(why));
	publish(s);
	log_warn("oauth downstream=%s: %s", s->ds->name, s->st.last_error);
	schedule(s, (pause_s < RETRY_MAX_S ? pause_s : RETRY_MAX_S) * 1000);
}

/*
 * A provider that rotates the refresh token invalidates the old one: the
 * new one replaces it in its file, or stays in memory (with a warning,
 * since a restart would then start from a dead token).
 */
static void
keep_refresh_token(struct source *s, const char *fresh)
{
	const struct token_source_cfg *t = s->ds->token;
	char why[WHY_MAX];

	if (fresh[0] == '\0' || s->sent_refresh == NULL || strcmp(fresh, s->sent_refresh) == 0)
		return;
	s->rotated = wiped_free(s->rotated);
	if (t->refresh_token_file != NULL) {
		if (secret_file_replace(t->refresh_token_file, fresh, why, sizeof(why)) == 0) {
			log_info("oauth downstream=%s: new refresh token saved to %s", s->ds->name,
			    t->refresh_token_file);
			return;
		}
		log_err("oauth downstream=%s: %s; the new refresh token is kept in memory "
		    "only", s->ds->name, why);
	} else
		log_warn("oauth downstream=%s: the provider sent a new refresh token, kept in "
		    "memory only: with refresh_token_file a restart keeps it", s->ds->name);
	s->rotated = strdup(fresh);
}

static void
token_obtained(struct source *s, const struct token_response *r)
{
	int64_t now = token_clock_ms();
	int64_t life_ms = (r->expires_in >= 0 ? r->expires_in : (long long)s->ds->token->lifetime) *
	    1000;

	token_table_put(s->th->tt, s->ds->token_slot, r->access_token, strlen(r->access_token),
	    now + usable_for_ms(life_ms), s->ds->token->id);
	keep_refresh_token(s, r->refresh_token);
	s->failures = 0;
	s->st.failing = 0;
	s->st.refreshes++;
	s->st.forced += s->forced;
	s->st.last_refresh = now / 1000;
	s->st.valid_until = (now + life_ms) / 1000;
	publish(s);
	log_info("oauth downstream=%s: new token, valid for %lld s%s", s->ds->name,
	    (long long)(life_ms / 1000), s->forced ? " (the last one was refused)" : "");
	schedule(s, refresh_delay_ms(life_ms, now - s->started_ms));
}

static void
request_over(struct source *s)
{
	s->form = wiped_free(s->form);
	s->form_len = 0;
	s->sent_refresh = wiped_free(s->sent_refresh);
}

static void
on_http_done(void *arg, const struct http_response *res)
{
	struct source *s = arg;
	struct token_response *tr = malloc(sizeof(*tr));
	char why[WHY_MAX], msg[WHY_MAX + 32];

	s->http = NULL;
	if (res->error != NULL)
		snprintf(msg, sizeof(msg), "token endpoint: %s", res->error);
	else if (tr == NULL)
		snprintf(msg, sizeof(msg), "token endpoint: out of memory");
	else if (token_response_parse(res->status, res->body, res->body_len, tr, why,
	    sizeof(why)) < 0)
		snprintf(msg, sizeof(msg), "token endpoint: %s", why);
	else {
		token_obtained(s, tr);
		msg[0] = '\0';
	}
	if (msg[0] != '\0')
		token_failed(s, msg);
	request_over(s);
	if (tr != NULL) {
		token_response_wipe(tr);
		free(tr);
	}
}

static void
on_command_done(void *arg, const char *out, size_t len, const char *failed)
{
	struct source *s = arg;
	struct token_response *tr = malloc(sizeof(*tr));
	char why[WHY_MAX], msg[WHY_MAX + 32];

	s->cmd = NULL;
	if (failed != NULL)
		snprintf(msg, sizeof(msg), "token_command: %s", failed);
	else if (tr == NULL)
		snprintf(msg, sizeof(msg), "token_command: out of memory");
	else if (token_output_parse(out, len, tr, why, sizeof(why)) < 0)
		snprintf(msg, sizeof(msg), "token_command: %s", why);
	else {
		token_obtained(s, tr);
		msg[0] = '\0';
	}
	if (msg[0] != '\0')
		token_failed(s, msg);
	if (tr != NULL) {
		token_response_wipe(tr);
		free(tr);
	}
}

/* --- requests ---------------------------------------------------------------- */

/* An inline value, else its file's, read now. */
static char *
secret_value(const char *inline_value, const char *file, char *why, size_t whylen)
{
	if (inline_value != NULL)
		return strdup(inline_value);
	return file != NULL ? secret_file_read_path(file, TOKEN_MAX, why, whylen) : NULL;
}

/* "key=value", URL-encoded by curl; the copy curl made is wiped. */
static int
form_put(char *out, const char *key, const char *value)
{
	char *esc = curl_easy_escape(NULL, value, 0);
	int n;

	if (esc == NULL)
		return -1;
	n = sprintf(out, "%s=%s", key, esc);
	auth_wipe(esc, strlen(esc));
	curl_free(esc);
	return n;
}

static int
form_build(struct source *s, const char *secret, const char *refresh)
{
	const struct token_source_cfg *t = s->ds->token;
	const char *const keys[] = { "grant_type", "refresh_token", "client_id", "client_secret",
	    "scope" };
	const char *const values[] = { t->kind == TOKEN_SOURCE_CLIENT_CREDENTIALS ?
	    "client_credentials" : "refresh_token", refresh, t->client_id, secret, t->scope };
	size_t cap = 64, n = 0;
	int put;

	/* URL encoding at most triples each value */
	for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++)
		cap += strlen(keys[i]) + 2 + (values[i] != NULL ? 3 * strlen(values[i]) : 0);
	if ((s->form = calloc(1, cap)) == NULL)
		return -1;
	for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
		if (values[i] == NULL)
			continue;
		if (n > 0)
			s->form[n++] = '&';
		if ((put = form_put(s->form + n, keys[i], values[i])) < 0)
			return -1;
		n += (size_t)put;
	}
	s->form_len = n;
	return 0;
}

/* The client secret and the refresh token are read at each request, so
 * that a file replaced by the administrator is used without a reload. */
static int
start_http(struct source *s, char *why, size_t whylen)
{
	const struct token_source_cfg *t = s->ds->token;
	char *secret = NULL;
	int rc = -1;

	why[0] = '\0';
	if ((t->client_secret != NULL || t->client_secret_file != NULL) &&
	    (secret = secret_value(t->client_secret, t->client_secret_file, why, whylen)) == NULL)
		goto out;
	if (t->kind == TOKEN_SOURCE_REFRESH_TOKEN && (s->sent_refresh = s->rotated != NULL ?
	    strdup(s->rotated) : secret_value(t->refresh_token, t->refresh_token_file, why,
	    whylen)) == NULL)
		goto out;
	if (form_build(s, secret, s->sent_refresh) < 0)
		goto out;
	s->http = http_post_form(s->th->http, t->token_url, t->ca, t->timeout, s->form,
	    s->form_len, on_http_done, s);
	rc = s->http != NULL ? 0 : -1;
out:
	wiped_free(secret);
	if (rc < 0 && why[0] == '\0')
		snprintf(why, whylen, "cannot start a request to the token endpoint");
	return rc;
}

static void
fetch(struct source *s)
{
	const struct token_source_cfg *t = s->ds->token;
	char why[WHY_MAX], msg[WHY_MAX + 32];

	if (busy(s))
		return;
	evtimer_del(s->timer);
	s->started_ms = token_clock_ms();
	if (t->kind == TOKEN_SOURCE_COMMAND) {
		s->cmd = command_start(s->th->base, t->argv, t->timeout, on_command_done, s);
		if (s->cmd != NULL)
			return;
		snprintf(msg, sizeof(msg), "token_command: cannot start: %s", strerror(errno));
	} else {
		if (start_http(s, why, sizeof(why)) == 0)
			return;
		snprintf(msg, sizeof(msg), "token endpoint: %s", why);
		request_over(s);
	}
	token_failed(s, msg);
}

static void
on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct source *s = arg;

	(void)fd;
	(void)what;
	s->forced = false;
	fetch(s);
}

/* --- forced refreshes ------------------------------------------------------ */

/* A worker had the current token refused: one refresh, now, unless one is
 * under way or a refusal forced one a moment ago (then it comes then). */
static void
refusal(struct source *s)
{
	int64_t now = token_clock_ms(), next = s->last_forced_ms + FORCED_GAP_S * 1000;

	if (busy(s))
		return;
	if (s->last_forced_ms != 0 && now < next) {
		schedule_sooner(s, next - now);
		return;
	}
	log_info("oauth downstream=%s: the server refused the token; getting a new one",
	    s->ds->name);
	s->last_forced_ms = now;
	s->forced = true;
	fetch(s);
}

static void
on_wake(evutil_socket_t fd, short what, void *arg)
{
	struct token_helper *th = arg;

	(void)fd;
	(void)what;
	token_table_wake_drain(th->tt);
	for (size_t i = 0; i < th->n_sources; i++)
		if (token_table_take_rejection(th->tt, th->sources[i].ds->token_slot) != 0)
			refusal(&th->sources[i]);
}

/* --- start and stop ----------------------------------------------------------- */

/*
 * A predecessor (before a crash or a reload) may have left a good token:
 * it is kept and refreshed on its schedule. A torn slot (a helper killed
 * mid-write) or a token from another source is dropped.
 */
static void
source_start(struct source *s)
{
	struct token_meta m;
	int64_t now = token_clock_ms(), life_ms;

	token_table_status_get(s->th->tt, s->ds->token_slot, &s->st);
	s->st.source = s->ds->token->kind;
	snprintf(s->st.name, sizeof(s->st.name), "%s", s->ds->name);
	publish(s);
	if (token_table_meta(s->th->tt, s->ds->token_slot, &m) < 0 ||
	    (m.len > 0 && m.source_id != s->ds->token->id)) {
		token_table_clear(s->th->tt, s->ds->token_slot);
		m.len = 0;
	}
	if (m.len > 0 && m.use_until_ms > now && s->st.last_refresh > 0) {
		life_ms = (s->st.valid_until - s->st.last_refresh) * 1000;
		schedule(s, s->st.last_refresh * 1000 + refresh_delay_ms(life_ms, 0) - now);
		return;
	}
	fetch(s);
}

static struct source *
source_of_slot(struct token_helper *th, int slot)
{
	for (size_t i = 0; i < th->n_sources; i++)
		if (th->sources[i].ds->token_slot == slot)
			return &th->sources[i];
	return NULL;
}

static int
sources_create(struct token_helper *th, const struct config *cfg)
{
	th->sources = calloc(TOKEN_TABLE_SLOTS, sizeof(*th->sources));
	if (th->sources == NULL)
		return -1;
	for (size_t i = 0; i < cfg->n_users; i++) {
		for (size_t j = 0; j < cfg->users[i].n_downstreams; j++) {
			const struct downstream_cfg *ds = &cfg->users[i].downstreams[j];
			struct source *s;

			if (ds->token == NULL || ds->token_slot < 0 ||
			    source_of_slot(th, ds->token_slot) != NULL)
				continue;
			s = &th->sources[th->n_sources];
			s->th = th;
			s->ds = ds;
			if ((s->timer = evtimer_new(th->base, on_timer, s)) == NULL)
				return -1;
			th->n_sources++;
		}
	}
	return 0;
}

static void
sources_free(struct token_helper *th)
{
	for (size_t i = 0; i < th->n_sources; i++) {
		struct source *s = &th->sources[i];

		if (s->cmd != NULL)
			command_cancel(s->cmd);
		request_over(s);
		s->rotated = wiped_free(s->rotated);
		event_free(s->timer);
	}
	free(th->sources);
}

static void
on_child_signal(evutil_socket_t sig, short what, void *arg)
{
	struct token_helper *th = arg;

	(void)sig;
	(void)what;
	for (size_t i = 0; i < th->n_sources; i++)
		if (th->sources[i].cmd != NULL)
			command_reap(th->sources[i].cmd);
}

/* Besides a helper's signals: SIGCHLD reports the token commands, and the
 * token table's pipe the refusals. */
static int
events_setup(struct token_helper *th)
{
	sigset_t set;

	th->ev_child = evsignal_new(th->base, SIGCHLD, on_child_signal, th);
	th->ev_wake = event_new(th->base, token_table_wake_fd(th->tt), EV_READ | EV_PERSIST,
	    on_wake, th);
	if (helper_signals_start(&th->signals, th->base) < 0 || th->ev_child == NULL ||
	    th->ev_wake == NULL || evsignal_add(th->ev_child, NULL) < 0 ||
	    event_add(th->ev_wake, NULL) < 0)
		return -1;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	return 0;
}

static void
helper_free(struct token_helper *th)
{
	http_client_free(th->http);
	if (th->sources != NULL)
		sources_free(th);
	helper_signals_stop(&th->signals);
	if (th->ev_child != NULL)
		event_free(th->ev_child);
	if (th->ev_wake != NULL)
		event_free(th->ev_wake);
	if (th->base != NULL)
		event_base_free(th->base);
}

int
token_helper_main(const struct config *cfg, struct token_table *tt)
{
	struct token_helper th;
	int rc = 1;

	memset(&th, 0, sizeof(th));
	th.tt = tt;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
		log_err("cannot initialise libcurl");
		return 1;
	}
	if ((th.base = event_base_new()) == NULL || events_setup(&th) < 0 ||
	    (th.http = http_client_new(th.base)) == NULL || sources_create(&th, cfg) < 0) {
		log_err("cannot start: out of memory");
	} else {
		log_info("keeping OAuth tokens for %zu downstream account(s)", th.n_sources);
		for (size_t i = 0; i < th.n_sources; i++)
			source_start(&th.sources[i]);
		rc = event_base_dispatch(th.base) < 0 ? 1 : 0;
	}
	helper_free(&th);
	curl_global_cleanup();
	return rc;
}

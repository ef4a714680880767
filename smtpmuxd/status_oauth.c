/* SPDX-License-Identifier: MIT */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "status.h"
#include "status_oauth.h"

struct row {
	char key[160];                   /* "addr user" */
	char addr[160];
	const char *user;                /* in key */
	struct token_status st;
};

/* The slots the running configuration uses; NULL when out of memory. */
static struct row *
rows_take(const struct token_table *tt, size_t *n)
{
	struct row *rows = calloc(TOKEN_TABLE_SLOTS, sizeof(*rows));
	size_t count = token_table_count(tt);

	*n = 0;
	for (size_t i = 0; rows != NULL && i < count; i++) {
		struct row *r = &rows[*n];
		char *sp;

		if (token_table_slot_key(tt, i, r->key, sizeof(r->key)) != 0)
			continue;
		token_table_status_get(tt, (int)i, &r->st);
		snprintf(r->addr, sizeof(r->addr), "%s", r->key);
		sp = strchr(r->addr, ' ');
		if (sp != NULL)
			*sp = '\0';
		r->user = strchr(r->key, ' ') != NULL ? strchr(r->key, ' ') + 1 : "";
		(*n)++;
	}
	return rows;
}

static const char *
source_name(uint32_t source)
{
	switch (source) {
	case TOKEN_SOURCE_REFRESH_TOKEN: return "refresh_token";
	case TOKEN_SOURCE_CLIENT_CREDENTIALS: return "client_credentials";
	case TOKEN_SOURCE_COMMAND: return "token_command";
	default: return "-";
	}
}

static const char *
token_state(const struct token_status *st, time_t now)
{
	if (st->valid_until == 0)
		return "none";
	return st->valid_until > (int64_t)now ? "valid" : "expired";
}

static const char *
when(char *buf, size_t len, int64_t t)
{
	time_t tt = (time_t)t;
	struct tm tm;

	if (t <= 0 || gmtime_r(&tt, &tm) == NULL)
		return "-";
	strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
	return buf;
}

static int
width(const struct row *rows, size_t n, const char *title, bool key)
{
	size_t w = strlen(title);

	for (size_t i = 0; i < n; i++) {
		size_t l = strlen(key ? rows[i].key : rows[i].st.name);

		w = l > w ? l : w;
	}
	return (int)w;
}

void
status_oauth_print(FILE *out, const struct token_table *tt, time_t now)
{
	char until[32], refresh[32], failed[32];
	struct row *rows;
	size_t n;
	int wn, wk;

	if (tt == NULL || (rows = rows_take(tt, &n)) == NULL)
		return;
	if (n > 0) {
		wn = width(rows, n, "NAME", false);
		wk = width(rows, n, "ACCOUNT", true);
		fprintf(out, "\nOAUTH TOKENS\n%-*s  %-*s  %-18s  %-7s  %-20s  %-20s  %9s  %8s  %s\n",
		    wn, "NAME", wk, "ACCOUNT", "SOURCE", "TOKEN", "VALID UNTIL", "LAST REFRESH",
		    "REFRESHES", "FAILURES", "LAST ERROR");
	}
	for (size_t i = 0; i < n; i++) {
		const struct token_status *st = &rows[i].st;

		fprintf(out, "%-*s  %-*s  %-18s  %-7s  %-20s  %-20s  %9" PRIu32 "  %8" PRIu32 "  %s%s%s\n",
		    wn, st->name[0] ? st->name : "-", wk, rows[i].key, source_name(st->source),
		    token_state(st, now), when(until, sizeof(until), st->valid_until),
		    when(refresh, sizeof(refresh), st->last_refresh), st->refreshes, st->failures,
		    st->last_error[0] ? when(failed, sizeof(failed), st->last_error_time) : "-",
		    st->last_error[0] ? " " : "", st->last_error);
	}
	free(rows);
}

/* --- Prometheus ---------------------------------------------------------- */

enum value {
	V_VALID, V_UNTIL, V_REFRESH, V_REFRESHES, V_FORCED, V_FAILURES, V_FAILING, V_ERROR_TIME
};

struct family {
	const char *name;
	const char *type;
	const char *help;
	enum value value;
};

static const struct family families[] = {
	{ "smtpmux_oauth_token_valid", "gauge",
	  "1 while the downstream account has an unexpired access token.", V_VALID },
	{ "smtpmux_oauth_token_valid_until_timestamp_seconds", "gauge",
	  "When the current access token expires, seconds since the epoch; 0: none.", V_UNTIL },
	{ "smtpmux_oauth_token_last_refresh_timestamp_seconds", "gauge",
	  "When the current access token was obtained; 0: never.", V_REFRESH },
	{ "smtpmux_oauth_token_refreshes_total", "counter",
	  "Access tokens obtained since the daemon started.", V_REFRESHES },
	{ "smtpmux_oauth_token_forced_refreshes_total", "counter",
	  "Refreshes asked for because a server refused the token.", V_FORCED },
	{ "smtpmux_oauth_token_failures_total", "counter",
	  "Token requests that failed.", V_FAILURES },
	{ "smtpmux_oauth_token_failing", "gauge",
	  "1 while the latest token request failed.", V_FAILING },
	{ "smtpmux_oauth_token_last_error_timestamp_seconds", "gauge",
	  "When the last token request failed; 0: never.", V_ERROR_TIME },
};

static int64_t
value_of(const struct token_status *st, enum value v, time_t now)
{
	switch (v) {
	case V_VALID: return st->valid_until > (int64_t)now;
	case V_UNTIL: return st->valid_until;
	case V_REFRESH: return st->last_refresh;
	case V_REFRESHES: return st->refreshes;
	case V_FORCED: return st->forced;
	case V_FAILURES: return st->failures;
	case V_FAILING: return st->failing;
	default: return st->last_error_time;
	}
}

static int
add_labels(struct evbuffer *out, const struct row *r, bool with_error)
{
	int rc = 0;

	rc |= evbuffer_add_printf(out, "{downstream=\"") < 0;
	rc |= status_label_value(out, r->st.name);
	rc |= evbuffer_add_printf(out, "\",addr=\"") < 0;
	rc |= status_label_value(out, r->addr);
	rc |= evbuffer_add_printf(out, "\",user=\"") < 0;
	rc |= status_label_value(out, r->user);
	if (with_error) {
		rc |= evbuffer_add_printf(out, "\",error=\"") < 0;
		rc |= status_label_value(out, r->st.last_error);
	}
	rc |= evbuffer_add_printf(out, "\"}") < 0;
	return rc ? -1 : 0;
}

/* The last error's text, as an info-style metric while it is current. */
static int
add_error_info(struct evbuffer *out, const struct row *rows, size_t n)
{
	int rc = status_metric_family(out, "smtpmux_oauth_token_error_info", "gauge",
	    "1, labelled with the error of the latest token request, while it is failing.");

	for (size_t i = 0; i < n; i++) {
		if (!rows[i].st.failing)
			continue;
		rc |= evbuffer_add_printf(out, "smtpmux_oauth_token_error_info") < 0;
		rc |= add_labels(out, &rows[i], true);
		rc |= evbuffer_add_printf(out, " 1\n") < 0;
	}
	return rc ? -1 : 0;
}

int
status_oauth_metrics(struct evbuffer *out, const struct token_table *tt, time_t now)
{
	struct row *rows;
	size_t n;
	int rc = 0;

	if (tt == NULL)
		return 0;
	if ((rows = rows_take(tt, &n)) == NULL)
		return -1;
	for (size_t f = 0; n > 0 && f < sizeof(families) / sizeof(families[0]); f++) {
		rc |= status_metric_family(out, families[f].name, families[f].type,
		    families[f].help);
		for (size_t i = 0; i < n; i++) {
			rc |= evbuffer_add_printf(out, "%s", families[f].name) < 0;
			rc |= add_labels(out, &rows[i], false);
			rc |= evbuffer_add_printf(out, " %" PRId64 "\n",
			    value_of(&rows[i].st, families[f].value, now)) < 0;
		}
	}
	if (n > 0)
		rc |= add_error_info(out, rows, n);
	free(rows);
	return rc ? -1 : 0;
}

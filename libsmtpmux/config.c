/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <cyaml/cyaml.h>

#include "auth.h"
#include "config.h"
#include "config_cluster.h"
#include "config_lines.h"
#include "config_oauth.h"
#include "health.h"
#include "config_queue.h"
#include "log.h"
#include "netaddr.h"
#include "passwd.h"
#include "secret_file.h"
#include "selector_host.h"
#include "sender_match.h"
#include "smtp_parse.h"
#include "tls.h"

/*
 * Loading happens in three steps: config_lines.c scans the file with
 * libyaml (syntax errors, line numbers, selector params), libcyaml loads it
 * into the raw_* structs below against the schema (unknown keys, types,
 * required keys), and config_check() turns the raw tree into a struct
 * config with defaults and cross-field rules, before config_build() loads
 * what the configuration names (certificates, selectors, secret files) and
 * checks password hashes. Only the last step touches other files, so a
 * typo is reported before anything else.
 */

#define CONFIG_MAX_SIZE (4u * 1024 * 1024)
#define DEFAULT_LISTEN "127.0.0.1:1020"
#define DEFAULT_SELECTOR "round_robin"
#define DEFAULT_RUN_USER "smtpmux"
#define MAX_WORKERS 62               /* two generations share the health worker slots */
_Static_assert(2 * MAX_WORKERS <= HEALTH_WORKER_SLOTS,
    "two generations of workers must fit the health segment's worker slots");
#define IMPLICIT_TLS_PORT "465"

/* ---- the YAML layout: private, libcyaml fills it ---- */

/* Optional scalars are pointers, so that "absent" and "0" differ. */
struct raw_limits {
	uint64_t *max_message_size;
	unsigned *max_recipients;
	unsigned *max_errors;
	unsigned *max_sessions;
	unsigned *command_timeout;
	unsigned *data_timeout;
	uint64_t *memory_threshold;
	unsigned *upstream_connect_timeout;
	unsigned *upstream_timeout;
	unsigned *upstream_data_timeout;
	unsigned *shutdown_timeout;
	unsigned *max_input_buffer;
	unsigned *max_output_buffer;
	unsigned *command_deadline;
	unsigned *min_data_rate;
	unsigned *max_sessions_per_ip;
	unsigned *relay_deadline;
};

struct raw_auth {
	unsigned *max_failures;
	unsigned *window;
	unsigned *lockout;
	unsigned *failure_delay;
};

struct raw_cache {
	bool *enabled;
	unsigned *max_idle;
	unsigned *idle_timeout;
	unsigned *max_messages;
	bool *early_connect;
};

struct raw_tls {
	char *cert;
	char *key;
	char *priority;
};

struct raw_health {
	unsigned *fail_threshold;
	unsigned *cooldown;
	unsigned *max_cooldown;
	unsigned *throttle_backoff;
};

/* `params` is a free-form map: read from config_lines, not libcyaml. */
struct raw_selector {
	char *path;
};

struct raw_downstream {
	char *addr;
	char *user;
	char *pass;
	char *pass_file;
	char *rewrite_from;
	char *name;
	enum tls_mode *tls;
	char *tls_ca;
	bool *tls_verify;
	unsigned *weight;
	unsigned *max_per_minute;
	unsigned *max_per_hour;
	unsigned *max_per_day;
	enum quota_window *quota_window;
	unsigned *probe_interval;
	enum downstream_auth *auth;
	struct raw_oauth2 *oauth2;
	char *token_command;
	unsigned *token_timeout;
	unsigned *token_lifetime;
};

struct raw_user {
	char *email;
	char *password;
	char *password_file;
	char **allowed_senders;
	unsigned n_allowed_senders;
	char *selector_algo_path;
	struct raw_selector *selector;
	struct raw_downstream *downstreams;
	unsigned n_downstreams;
};

struct raw_client {
	char *network;
	char *user;
};

struct raw_config {
	char **listen;
	unsigned n_listen;
	unsigned *workers;
	char *hostname;
	bool *allow_insecure_auth;
	char *user;
	char *group;
	bool *run_as_root;
	char *tmp_dir;
	char *log_file;
	char *status_listen;
	char *state_file;
	struct raw_limits *limits;
	struct raw_tls *tls;
	struct raw_health *health;
	struct raw_auth *auth;
	struct raw_cache *connection_cache;
	struct raw_cluster *cluster;
	struct raw_queue *queue;
	struct raw_user *users;
	unsigned n_users;
	struct raw_client *clients;
	unsigned n_clients;
};

#define OPT CYAML_FLAG_OPTIONAL
#define STR_OPT(key, type, member) \
	CYAML_FIELD_STRING_PTR(key, OPT, type, member, 0, CYAML_UNLIMITED)
#define STR_REQ(key, type, member) \
	CYAML_FIELD_STRING_PTR(key, CYAML_FLAG_DEFAULT, type, member, 1, CYAML_UNLIMITED)

static const cyaml_strval_t quota_window_names[] = {
	{ "rolling", QUOTA_ROLLING },
	{ "calendar", QUOTA_CALENDAR },
};

static const cyaml_strval_t tls_mode_names[] = {
	{ "none", TLS_MODE_NONE },
	{ "starttls", TLS_MODE_STARTTLS },
	{ "implicit", TLS_MODE_IMPLICIT },
	{ "may", TLS_MODE_MAY },
};

static const cyaml_schema_field_t limits_fields[] = {
	CYAML_FIELD_UINT_PTR("max_message_size", OPT, struct raw_limits, max_message_size),
	CYAML_FIELD_UINT_PTR("max_recipients", OPT, struct raw_limits, max_recipients),
	CYAML_FIELD_UINT_PTR("max_errors", OPT, struct raw_limits, max_errors),
	CYAML_FIELD_UINT_PTR("max_sessions", OPT, struct raw_limits, max_sessions),
	CYAML_FIELD_UINT_PTR("command_timeout", OPT, struct raw_limits, command_timeout),
	CYAML_FIELD_UINT_PTR("data_timeout", OPT, struct raw_limits, data_timeout),
	CYAML_FIELD_UINT_PTR("memory_threshold", OPT, struct raw_limits, memory_threshold),
	CYAML_FIELD_UINT_PTR("upstream_connect_timeout", OPT, struct raw_limits,
	    upstream_connect_timeout),
	CYAML_FIELD_UINT_PTR("upstream_timeout", OPT, struct raw_limits, upstream_timeout),
	CYAML_FIELD_UINT_PTR("upstream_data_timeout", OPT, struct raw_limits,
	    upstream_data_timeout),
	CYAML_FIELD_UINT_PTR("shutdown_timeout", OPT, struct raw_limits, shutdown_timeout),
	CYAML_FIELD_UINT_PTR("max_input_buffer", OPT, struct raw_limits, max_input_buffer),
	CYAML_FIELD_UINT_PTR("max_output_buffer", OPT, struct raw_limits, max_output_buffer),
	CYAML_FIELD_UINT_PTR("command_deadline", OPT, struct raw_limits, command_deadline),
	CYAML_FIELD_UINT_PTR("min_data_rate", OPT, struct raw_limits, min_data_rate),
	CYAML_FIELD_UINT_PTR("max_sessions_per_ip", OPT, struct raw_limits, max_sessions_per_ip),
	CYAML_FIELD_UINT_PTR("relay_deadline", OPT, struct raw_limits, relay_deadline),
	CYAML_FIELD_END
};

static const cyaml_schema_field_t auth_fields[] = {
	CYAML_FIELD_UINT_PTR("max_failures", OPT, struct raw_auth, max_failures),
	CYAML_FIELD_UINT_PTR("window", OPT, struct raw_auth, window),
	CYAML_FIELD_UINT_PTR("lockout", OPT, struct raw_auth, lockout),
	CYAML_FIELD_UINT_PTR("failure_delay", OPT, struct raw_auth, failure_delay),
	CYAML_FIELD_END
};

static const cyaml_schema_field_t cache_fields[] = {
	CYAML_FIELD_BOOL_PTR("enabled", OPT, struct raw_cache, enabled),
	CYAML_FIELD_UINT_PTR("max_idle", OPT, struct raw_cache, max_idle),
	CYAML_FIELD_UINT_PTR("idle_timeout", OPT, struct raw_cache, idle_timeout),
	CYAML_FIELD_UINT_PTR("max_messages", OPT, struct raw_cache, max_messages),
	CYAML_FIELD_BOOL_PTR("early_connect", OPT, struct raw_cache, early_connect),
	CYAML_FIELD_END
};

static const cyaml_schema_field_t tls_fields[] = {
	STR_OPT("cert", struct raw_tls, cert),
	STR_OPT("key", struct raw_tls, key),
	STR_OPT("priority", struct raw_tls, priority),
	CYAML_FIELD_END
};

static const cyaml_schema_field_t health_fields[] = {
	CYAML_FIELD_UINT_PTR("fail_threshold", OPT, struct raw_health, fail_threshold),
	CYAML_FIELD_UINT_PTR("cooldown", OPT, struct raw_health, cooldown),
	CYAML_FIELD_UINT_PTR("max_cooldown", OPT, struct raw_health, max_cooldown),
	CYAML_FIELD_UINT_PTR("throttle_backoff", OPT, struct raw_health, throttle_backoff),
	CYAML_FIELD_END
};

static const cyaml_schema_field_t selector_fields[] = {
	STR_REQ("path", struct raw_selector, path),
	CYAML_FIELD_IGNORE("params", OPT),
	CYAML_FIELD_END
};

static const cyaml_schema_field_t downstream_fields[] = {
	STR_REQ("addr", struct raw_downstream, addr),
	STR_OPT("user", struct raw_downstream, user),
	STR_OPT("pass", struct raw_downstream, pass),
	CYAML_FIELD_STRING_PTR("pass_file", OPT, struct raw_downstream, pass_file,
	    1, CYAML_UNLIMITED),
	CYAML_FIELD_STRING_PTR("rewrite_from", OPT, struct raw_downstream, rewrite_from,
	    1, CYAML_UNLIMITED),
	CYAML_FIELD_STRING_PTR("name", OPT, struct raw_downstream, name, 1, CYAML_UNLIMITED),
	CYAML_FIELD_ENUM_PTR("tls", OPT | CYAML_FLAG_STRICT, struct raw_downstream, tls,
	    tls_mode_names, CYAML_ARRAY_LEN(tls_mode_names)),
	STR_OPT("tls_ca", struct raw_downstream, tls_ca),
	CYAML_FIELD_BOOL_PTR("tls_verify", OPT, struct raw_downstream, tls_verify),
	CYAML_FIELD_UINT_PTR("weight", OPT, struct raw_downstream, weight),
	CYAML_FIELD_UINT_PTR("max_per_minute", OPT, struct raw_downstream, max_per_minute),
	CYAML_FIELD_UINT_PTR("max_per_hour", OPT, struct raw_downstream, max_per_hour),
	CYAML_FIELD_UINT_PTR("max_per_day", OPT, struct raw_downstream, max_per_day),
	CYAML_FIELD_ENUM_PTR("quota_window", OPT | CYAML_FLAG_STRICT, struct raw_downstream,
	    quota_window, quota_window_names, CYAML_ARRAY_LEN(quota_window_names)),
	CYAML_FIELD_UINT_PTR("probe_interval", OPT, struct raw_downstream, probe_interval),
	CYAML_FIELD_ENUM_PTR("auth", OPT | CYAML_FLAG_STRICT, struct raw_downstream, auth,
	    config_auth_names, CONFIG_AUTH_NAMES),
	CYAML_FIELD_MAPPING_PTR("oauth2", OPT, struct raw_downstream, oauth2,
	    config_oauth2_fields),
	CYAML_FIELD_STRING_PTR("token_command", OPT, struct raw_downstream, token_command,
	    1, CYAML_UNLIMITED),
	CYAML_FIELD_UINT_PTR("token_timeout", OPT, struct raw_downstream, token_timeout),
	CYAML_FIELD_UINT_PTR("token_lifetime", OPT, struct raw_downstream, token_lifetime),
	CYAML_FIELD_END
};

static const cyaml_schema_value_t downstream_schema = {
	CYAML_VALUE_MAPPING(CYAML_FLAG_DEFAULT, struct raw_downstream, downstream_fields),
};

static const cyaml_schema_value_t string_entry_schema = {
	CYAML_VALUE_STRING(CYAML_FLAG_POINTER, char, 1, CYAML_UNLIMITED),
};

static const cyaml_schema_field_t user_fields[] = {
	STR_REQ("email", struct raw_user, email),
	CYAML_FIELD_STRING_PTR("password", OPT, struct raw_user, password, 1, CYAML_UNLIMITED),
	CYAML_FIELD_STRING_PTR("password_file", OPT, struct raw_user, password_file,
	    1, CYAML_UNLIMITED),
	CYAML_FIELD_SEQUENCE_COUNT("allowed_senders", CYAML_FLAG_POINTER | OPT, struct raw_user,
	    allowed_senders, n_allowed_senders, &string_entry_schema, 1, CYAML_UNLIMITED),
	CYAML_FIELD_STRING_PTR("selector_algo_path", OPT, struct raw_user, selector_algo_path,
	    1, CYAML_UNLIMITED),
	CYAML_FIELD_MAPPING_PTR("selector", OPT, struct raw_user, selector, selector_fields),
	CYAML_FIELD_SEQUENCE_COUNT("downstreams", CYAML_FLAG_POINTER, struct raw_user,
	    downstreams, n_downstreams, &downstream_schema, 1, CYAML_UNLIMITED),
	CYAML_FIELD_END
};

static const cyaml_schema_value_t user_schema = {
	CYAML_VALUE_MAPPING(CYAML_FLAG_DEFAULT, struct raw_user, user_fields),
};

static const cyaml_schema_field_t client_fields[] = {
	STR_REQ("network", struct raw_client, network),
	STR_REQ("user", struct raw_client, user),
	CYAML_FIELD_END
};

static const cyaml_schema_value_t client_schema = {
	CYAML_VALUE_MAPPING(CYAML_FLAG_DEFAULT, struct raw_client, client_fields),
};

static const cyaml_schema_field_t top_fields[] = {
	CYAML_FIELD_SEQUENCE_COUNT("listen", CYAML_FLAG_POINTER | OPT, struct raw_config,
	    listen, n_listen, &string_entry_schema, 1, CYAML_UNLIMITED),
	CYAML_FIELD_UINT_PTR("workers", OPT, struct raw_config, workers),
	CYAML_FIELD_STRING_PTR("hostname", OPT, struct raw_config, hostname, 1, CYAML_UNLIMITED),
	CYAML_FIELD_BOOL_PTR("allow_insecure_auth", OPT, struct raw_config, allow_insecure_auth),
	CYAML_FIELD_STRING_PTR("user", OPT, struct raw_config, user, 1, CYAML_UNLIMITED),
	CYAML_FIELD_STRING_PTR("group", OPT, struct raw_config, group, 1, CYAML_UNLIMITED),
	CYAML_FIELD_BOOL_PTR("run_as_root", OPT, struct raw_config, run_as_root),
	CYAML_FIELD_STRING_PTR("tmp_dir", OPT, struct raw_config, tmp_dir, 1, CYAML_UNLIMITED),
	CYAML_FIELD_STRING_PTR("log_file", OPT, struct raw_config, log_file, 1, CYAML_UNLIMITED),
	CYAML_FIELD_STRING_PTR("status_listen", OPT, struct raw_config, status_listen,
	    1, CYAML_UNLIMITED),
	CYAML_FIELD_STRING_PTR("state_file", OPT, struct raw_config, state_file,
	    1, CYAML_UNLIMITED),
	CYAML_FIELD_MAPPING_PTR("limits", OPT, struct raw_config, limits, limits_fields),
	CYAML_FIELD_MAPPING_PTR("tls", OPT, struct raw_config, tls, tls_fields),
	CYAML_FIELD_MAPPING_PTR("health", OPT, struct raw_config, health, health_fields),
	CYAML_FIELD_MAPPING_PTR("auth", OPT, struct raw_config, auth, auth_fields),
	CYAML_FIELD_MAPPING_PTR("connection_cache", OPT, struct raw_config, connection_cache,
	    cache_fields),
	CYAML_FIELD_MAPPING_PTR("cluster", OPT, struct raw_config, cluster, config_cluster_fields),
	CYAML_FIELD_MAPPING_PTR("queue", OPT, struct raw_config, queue, config_queue_fields),
	/* May be empty or absent: the file as installed defines no users, and
	 * the daemon refuses to run it (config_has_users) rather than call it
	 * broken. */
	CYAML_FIELD_SEQUENCE_COUNT("users", CYAML_FLAG_POINTER | OPT, struct raw_config,
	    users, n_users, &user_schema, 0, CYAML_UNLIMITED),
	CYAML_FIELD_SEQUENCE_COUNT("clients", CYAML_FLAG_POINTER | OPT, struct raw_config,
	    clients, n_clients, &client_schema, 1, CYAML_UNLIMITED),
	CYAML_FIELD_END
};

static const cyaml_schema_value_t top_schema = {
	CYAML_VALUE_MAPPING(CYAML_FLAG_POINTER, struct raw_config, top_fields),
};

/* ---- error reporting ---- */

struct loader {
	const char *file;                /* as the caller named it */
	bool env_insecure_auth;          /* USE_INSECURE_AUTH=true: the prototype's meaning */
	bool inline_secrets;             /* a password or pass was written in the file */
	struct config_lines *lines;
	char *err;
	size_t errlen;
	char cylog[4096];                /* libcyaml's error and backtrace */
	size_t cylog_len;
};

/* "base.key", or either one alone. */
static const char *
path_join(char *buf, size_t len, const char *base, const char *key)
{
	snprintf(buf, len, "%s%s%s", base ? base : "", base && *base && key ? "." : "",
	    key ? key : "");
	return buf;
}

/* Values from the file (a user, a host) may hold a newline: an error stays
 * one line, for the log and for systemctl status. */
static void
one_line(char *s)
{
	for (; *s != '\0'; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			*s = '?';
}

/* Writes "FILE:LINE: KEY: what" for the key base.key; returns -1. */
static int __attribute__((format(printf, 4, 5)))
fail(struct loader *ld, const char *base, const char *key, const char *fmt, ...)
{
	char path[256], what[512];
	unsigned line;
	va_list ap;

	path_join(path, sizeof(path), base, key);
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	one_line(path);
	one_line(what);
	line = ld->lines ? config_lines_line(ld->lines, path) : 1;
	if (*path != '\0')
		snprintf(ld->err, ld->errlen, "%s:%u: %s: %s", ld->file, line, path, what);
	else
		snprintf(ld->err, ld->errlen, "%s:%u: %s", ld->file, line, what);
	return -1;
}

static int
fail_oom(struct loader *ld)
{
	snprintf(ld->err, ld->errlen, "%s: out of memory", ld->file);
	return -1;
}

static void __attribute__((format(printf, 3, 0)))
cylog_capture(cyaml_log_t level, void *ctx, const char *fmt, va_list args)
{
	struct loader *ld = ctx;
	size_t room = sizeof(ld->cylog) - ld->cylog_len;
	int n;

	(void)level;
	if (room <= 1)
		return;
	n = vsnprintf(ld->cylog + ld->cylog_len, room, fmt, args);
	if (n > 0)
		ld->cylog_len += (size_t)n < room ? (size_t)n : room - 1;
}

/*
 * One line of libcyaml's backtrace, innermost first:
 *   "  in mapping field 'addr' (line: 4, column: 15)"
 *   "  in sequence entry '2' (line: 6, column: 9)"   (1-based count)
 *   "  in mapping (line: 6, column: 15)"             (between keys)
 */
enum cy_frame_kind { CY_FIELD, CY_ENTRY, CY_MAPPING };

struct cy_frame {
	enum cy_frame_kind kind;
	char name[64];
	unsigned long count;
};

#define CY_MAX_FRAMES 16

struct cy_report {
	char msg[256];
	struct cy_frame frames[CY_MAX_FRAMES];
	size_t n_frames;
};

static void
cy_frame_parse(struct cy_report *r, const char *line)
{
	static const char field[] = "in mapping field '", entry[] = "in sequence entry '";
	struct cy_frame *f;

	if (r->n_frames == CY_MAX_FRAMES)
		return;
	f = &r->frames[r->n_frames];
	if (strncmp(line, field, sizeof(field) - 1) == 0) {
		const char *name = line + sizeof(field) - 1;

		f->kind = CY_FIELD;
		snprintf(f->name, sizeof(f->name), "%.*s", (int)strcspn(name, "'"), name);
	} else if (strncmp(line, entry, sizeof(entry) - 1) == 0) {
		f->kind = CY_ENTRY;
		f->count = strtoul(line + sizeof(entry) - 1, NULL, 10);
	} else if (strncmp(line, "in mapping", 10) == 0) {
		f->kind = CY_MAPPING;
	} else {
		return;
	}
	r->n_frames++;
}

static void
cy_report_parse(struct cy_report *r, char *log)
{
	char *save = NULL;

	memset(r, 0, sizeof(*r));
	for (char *line = strtok_r(log, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		if (strncmp(line, "Load: ", 6) == 0)
			line += 6;
		line += strspn(line, " ");
		if (strncmp(line, "in ", 3) == 0)
			cy_frame_parse(r, line);
		else if (r->msg[0] == '\0' && strncmp(line, "Backtrace", 9) != 0)
			snprintf(r->msg, sizeof(r->msg), "%s", line);
	}
}

/* The key path of a report, e.g. "users[0].downstreams[1].addr". */
static void
cy_report_path(const struct cy_report *r, size_t skip_inner, char *buf, size_t len)
{
	size_t used = 0;

	buf[0] = '\0';
	for (size_t i = r->n_frames; i > skip_inner && used < len; i--) {
		const struct cy_frame *f = &r->frames[i - 1];
		int n = 0;

		if (f->kind == CY_FIELD)
			n = snprintf(buf + used, len - used, "%s%s", used ? "." : "", f->name);
		else if (f->kind == CY_ENTRY && f->count > 0)
			n = snprintf(buf + used, len - used, "[%lu]", f->count - 1);
		if (n > 0)
			used += (size_t)n;
	}
}

static const cyaml_schema_value_t *
schema_at(const char *path)
{
	const cyaml_schema_value_t *sv = &top_schema;

	while (*path != '\0' && sv != NULL) {
		if (*path == '[') {
			if (sv->type != CYAML_SEQUENCE)
				return NULL;
			sv = sv->sequence.entry;
			path += strcspn(path, "]");
			path += *path == ']';
		} else {
			size_t len = strcspn(path, ".[");
			const cyaml_schema_field_t *f;

			if (sv->type != CYAML_MAPPING)
				return NULL;
			for (f = sv->mapping.fields; f->key; f++)
				if (strlen(f->key) == len && strncmp(f->key, path, len) == 0)
					break;
			sv = f->key ? &f->value : NULL;
			path += len;
		}
		path += *path == '.';
	}
	return sv;
}

static void
schema_type_name(const cyaml_schema_value_t *sv, char *buf, size_t len)
{
	size_t used;

	switch (sv ? sv->type : CYAML_IGNORE) {
	case CYAML_UINT:
		snprintf(buf, len, sv->data_size == 4 ? "a whole number from 0 to 4294967295" :
		    "a whole number");
		return;
	case CYAML_BOOL:
		snprintf(buf, len, "true or false");
		return;
	case CYAML_STRING:
		snprintf(buf, len, "a string");
		return;
	case CYAML_MAPPING:
		snprintf(buf, len, "a mapping of keys");
		return;
	case CYAML_SEQUENCE:
		snprintf(buf, len, "a list");
		return;
	case CYAML_ENUM:
		used = (size_t)snprintf(buf, len, "one of");
		for (uint32_t i = 0; i < sv->enumeration.count && used < len; i++)
			used += (size_t)snprintf(buf + used, len - used, "%s %s",
			    i ? "," : "", sv->enumeration.strings[i].str);
		return;
	default:
		snprintf(buf, len, "another kind of value");
		return;
	}
}

static void
node_describe(const struct config_node *n, char *buf, size_t len)
{
	char clean[48];

	if (n == NULL)
		snprintf(buf, len, "something else");
	else if (n->kind == CONFIG_NODE_MAPPING)
		snprintf(buf, len, "a mapping");
	else if (n->kind == CONFIG_NODE_SEQUENCE)
		snprintf(buf, len, "a list");
	else
		snprintf(buf, len, "\"%s\"", log_sanitize(clean, sizeof(clean), n->value,
		    strlen(n->value)));
}

static int
fail_wrong_type(struct loader *ld, const char *path)
{
	char want[128], got[64];

	schema_type_name(schema_at(path), want, sizeof(want));
	node_describe(config_lines_get(ld->lines, path), got, sizeof(got));
	return fail(ld, path, NULL, "expected %s, got %s", want, got);
}

/*
 * libcyaml takes any word but a few as true, so "allow_insecure_auth:
 * nope" would enable it; booleans must be one of these words.
 */
static bool
bool_word(const char *v)
{
	static const char *const words[] = { "true", "false", "yes", "no", "on", "off" };

	for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
		if (strcasecmp(v, words[i]) == 0)
			return true;
	return false;
}

static int
check_bools(struct loader *ld, const struct config_node *n)
{
	const cyaml_schema_value_t *sv;

	if (n == NULL)                   /* an empty document */
		return 0;
	if (n->kind == CONFIG_NODE_SCALAR) {
		sv = schema_at(n->path);
		if (sv != NULL && sv->type == CYAML_BOOL && !bool_word(n->value))
			return fail_wrong_type(ld, n->path);
		return 0;
	}
	for (const struct config_node *c = config_lines_child(ld->lines, n, NULL); c;
	    c = config_lines_child(ld->lines, n, c))
		if (check_bools(ld, c) == -1)
			return -1;
	return 0;
}

/* Turns libcyaml's error and backtrace into "FILE:LINE: KEY: ...". */
static int
fail_cyaml(struct loader *ld, cyaml_err_t rc)
{
	static const char unknown[] = "Unexpected key: ", missing[] =
	    "Missing required mapping field: ", twice[] = "Mapping field already seen: ";
	struct cy_report r;
	char path[256], full[320];
	bool inner_field, inner_entry;

	cy_report_parse(&r, ld->cylog);
	inner_field = r.n_frames > 0 && r.frames[0].kind == CY_FIELD;
	inner_entry = r.n_frames > 0 && r.frames[0].kind == CY_ENTRY;

	switch (rc) {
	case CYAML_ERR_INVALID_KEY:
		/* The innermost frame is the mapping that has no such key. */
		cy_report_path(&r, inner_field, path, sizeof(path));
		if (strncmp(r.msg, unknown, sizeof(unknown) - 1) != 0)
			break;
		return fail(ld, path, r.msg + sizeof(unknown) - 1, "unknown key");
	case CYAML_ERR_MAPPING_FIELD_MISSING:
		/* The innermost field is the last key seen, not the missing one. */
		cy_report_path(&r, inner_field, path, sizeof(path));
		if (strncmp(r.msg, missing, sizeof(missing) - 1) != 0)
			break;
		return fail(ld, path, r.msg + sizeof(missing) - 1, "required key missing");
	case CYAML_ERR_SEQUENCE_ENTRIES_MIN:
		cy_report_path(&r, inner_entry, path, sizeof(path));
		return fail(ld, path, NULL, "must not be empty");
	case CYAML_ERR_STRING_LENGTH_MIN:
		cy_report_path(&r, 0, path, sizeof(path));
		return fail(ld, path, NULL, "must not be empty");
	case CYAML_ERR_INVALID_VALUE:
		cy_report_path(&r, 0, path, sizeof(path));
		return fail_wrong_type(ld, path);
	case CYAML_ERR_UNEXPECTED_EVENT:
		cy_report_path(&r, 0, path, sizeof(path));
		if (strncmp(r.msg, twice, sizeof(twice) - 1) == 0)
			return fail(ld, path, NULL, "duplicate key");
		if (strncmp(r.msg, "Expecting", 9) == 0)
			return fail_wrong_type(ld, path);
		break;
	case CYAML_ERR_OOM:
		return fail_oom(ld);
	default:
		cy_report_path(&r, 0, path, sizeof(path));
		break;
	}
	snprintf(full, sizeof(full), "%s", r.msg[0] ? r.msg : cyaml_strerror(rc));
	return fail(ld, path, NULL, "%s", full);
}

/* ---- raw tree to struct config ---- */

static int
copy_str(struct loader *ld, char **dst, const char *src)
{
	*dst = NULL;
	if (src != NULL && (*dst = strdup(src)) == NULL)
		return fail_oom(ld);
	return 0;
}

char *
config_resolve(const char *dir, const char *name)
{
	size_t len;
	char *path;

	if (name[0] == '/')
		return strdup(name);
	len = strlen(dir) + strlen(name) + 2;
	if ((path = malloc(len)) != NULL)
		snprintf(path, len, "%s/%s", dir, name);
	return path;
}

static int
copy_path(struct loader *ld, const struct config *cfg, char **dst, const char *src)
{
	*dst = NULL;
	if (src != NULL && (*dst = config_resolve(cfg->dir, src)) == NULL)
		return fail_oom(ld);
	return 0;
}

static int
uint_opt(struct loader *ld, const char *base, const char *key, const unsigned *raw,
    unsigned def, unsigned min, unsigned *out)
{
	*out = raw ? *raw : def;
	if (*out < min)
		return fail(ld, base, key, "must be at least %u", min);
	return 0;
}

static int
u64_opt(struct loader *ld, const char *base, const char *key, const uint64_t *raw,
    uint64_t def, uint64_t min, uint64_t *out)
{
	*out = raw ? *raw : def;
	if (*out < min)
		return fail(ld, base, key, "must be at least %llu", (unsigned long long)min);
	return 0;
}

static int
check_limits(struct loader *ld, const struct raw_limits *raw, struct limits_cfg *l)
{
	static const struct raw_limits none;
	const char *b = "limits";

	if (raw == NULL)
		raw = &none;
	if (u64_opt(ld, b, "max_message_size", raw->max_message_size, 26214400, 1,
	        &l->max_message_size) == -1 ||
	    uint_opt(ld, b, "max_recipients", raw->max_recipients, 100, 1, &l->max_recipients) == -1 ||
	    uint_opt(ld, b, "max_errors", raw->max_errors, 10, 1, &l->max_errors) == -1 ||
	    uint_opt(ld, b, "max_sessions", raw->max_sessions, 1000, 1, &l->max_sessions) == -1 ||
	    uint_opt(ld, b, "command_timeout", raw->command_timeout, 300, 1,
	        &l->command_timeout) == -1 ||
	    uint_opt(ld, b, "data_timeout", raw->data_timeout, 300, 1, &l->data_timeout) == -1 ||
	    u64_opt(ld, b, "memory_threshold", raw->memory_threshold, 1048576, 0,
	        &l->memory_threshold) == -1 ||
	    uint_opt(ld, b, "upstream_connect_timeout", raw->upstream_connect_timeout, 30, 1,
	        &l->upstream_connect_timeout) == -1 ||
	    uint_opt(ld, b, "upstream_timeout", raw->upstream_timeout, 300, 1,
	        &l->upstream_timeout) == -1 ||
	    uint_opt(ld, b, "upstream_data_timeout", raw->upstream_data_timeout, 600, 1,
	        &l->upstream_data_timeout) == -1 ||
	    uint_opt(ld, b, "shutdown_timeout", raw->shutdown_timeout, 60, 1,
	        &l->shutdown_timeout) == -1 ||
	    /* An AUTH line (12288 octets, RFC 4954) must fit in the input. */
	    uint_opt(ld, b, "max_input_buffer", raw->max_input_buffer, 65536, 16384,
	        &l->max_input_buffer) == -1 ||
	    uint_opt(ld, b, "max_output_buffer", raw->max_output_buffer, 65536, 4096,
	        &l->max_output_buffer) == -1 ||
	    uint_opt(ld, b, "command_deadline", raw->command_deadline, 60, 1,
	        &l->command_deadline) == -1 ||
	    uint_opt(ld, b, "min_data_rate", raw->min_data_rate, 500, 0, &l->min_data_rate) == -1 ||
	    uint_opt(ld, b, "max_sessions_per_ip", raw->max_sessions_per_ip, 100, 0,
	        &l->max_sessions_per_ip) == -1 ||
	    uint_opt(ld, b, "relay_deadline", raw->relay_deadline, 240, 1,
	        &l->relay_deadline) == -1)
		return -1;
	return 0;
}

static int
check_auth(struct loader *ld, const struct raw_auth *raw, struct auth_cfg *a)
{
	static const struct raw_auth none;
	const char *b = "auth";

	if (raw == NULL)
		raw = &none;
	if (uint_opt(ld, b, "max_failures", raw->max_failures, 5, 0, &a->max_failures) == -1 ||
	    uint_opt(ld, b, "window", raw->window, 600, 1, &a->window) == -1 ||
	    uint_opt(ld, b, "lockout", raw->lockout, 600, 1, &a->lockout) == -1 ||
	    uint_opt(ld, b, "failure_delay", raw->failure_delay, 1, 0, &a->failure_delay) == -1)
		return -1;
	return 0;
}

static int
check_cache(struct loader *ld, const struct raw_cache *raw, struct cache_cfg *c)
{
	static const struct raw_cache none;
	const char *b = "connection_cache";

	if (raw == NULL)
		raw = &none;
	c->enabled = raw->enabled == NULL || *raw->enabled;
	c->early_connect = raw->early_connect == NULL || *raw->early_connect;
	if (uint_opt(ld, b, "max_idle", raw->max_idle, 100, 1, &c->max_idle) == -1 ||
	    uint_opt(ld, b, "idle_timeout", raw->idle_timeout, 5, 1, &c->idle_timeout) == -1 ||
	    uint_opt(ld, b, "max_messages", raw->max_messages, 100, 1, &c->max_messages) == -1)
		return -1;
	return 0;
}

static int
check_health(struct loader *ld, const struct raw_health *raw, struct health_cfg *h)
{
	static const struct raw_health none;
	const char *b = "health";

	if (raw == NULL)
		raw = &none;
	if (uint_opt(ld, b, "fail_threshold", raw->fail_threshold, 3, 1, &h->fail_threshold) == -1 ||
	    uint_opt(ld, b, "cooldown", raw->cooldown, 30, 1, &h->cooldown) == -1 ||
	    uint_opt(ld, b, "max_cooldown", raw->max_cooldown, 600, h->cooldown,
	        &h->max_cooldown) == -1 ||
	    uint_opt(ld, b, "throttle_backoff", raw->throttle_backoff, 60, 1,
	        &h->throttle_backoff) == -1)
		return -1;
	return 0;
}

static int
check_cluster(struct loader *ld, const struct raw_cluster *raw, struct config *cfg)
{
	const char *key = "";
	char why[512];
	bool inline_secret = false;
	int rc = config_cluster_check(raw, &cfg->cluster, &key, why, sizeof(why), &inline_secret);

	if (inline_secret)
		ld->inline_secrets = true;
	return rc == 0 ? 0 : fail(ld, "cluster", *key ? key : NULL, "%s", why);
}

static int
check_queue(struct loader *ld, const struct raw_queue *raw, struct config *cfg)
{
	const char *key = "";
	char why[128];

	if (config_queue_check(raw, cfg->dir, &cfg->queue, &key, why, sizeof(why)) == 0)
		return 0;
	return fail(ld, "queue", key, "%s", why);
}

static int
check_tls(struct loader *ld, const struct raw_tls *raw, struct config *cfg)
{
	struct tls_cfg *t = &cfg->tls;

	if (raw != NULL && raw->cert != NULL && raw->key == NULL)
		return fail(ld, "tls", "key", "required with tls.cert");
	if (raw != NULL && raw->key != NULL && raw->cert == NULL)
		return fail(ld, "tls", "cert", "required with tls.key");
	if (copy_path(ld, cfg, &t->cert, raw ? raw->cert : NULL) == -1 ||
	    copy_path(ld, cfg, &t->key, raw ? raw->key : NULL) == -1 ||
	    copy_str(ld, &t->priority, raw && raw->priority ? raw->priority :
	        TLS_DEFAULT_PRIORITY) == -1)
		return -1;
	return 0;
}

static int
tls_mode_parse(const char *s, enum tls_mode *mode)
{
	for (size_t i = 0; i < CYAML_ARRAY_LEN(tls_mode_names); i++) {
		if (strcmp(s, tls_mode_names[i].str) == 0) {
			*mode = (enum tls_mode)tls_mode_names[i].val;
			return 0;
		}
	}
	return -1;
}

/* The address part of a listener: numeric, so binding needs no DNS. */
static int
listen_addr(struct loader *ld, const char *base, const char *text, struct listen_cfg *l)
{
	char why[128];

	if (netaddr_split(text, &l->host, &l->port, why, sizeof(why)) == -1)
		return fail(ld, base, NULL, "%s", why);
	if (netaddr_numeric(strcmp(l->host, "localhost") == 0 ? "127.0.0.1" : l->host,
	    l->port, &l->ss, &l->sslen) == -1)
		return fail(ld, base, NULL, "\"%s\" is not a numeric IP address", l->host);
	return 0;
}

/* "HOST:PORT [tls=none|starttls|implicit] [require_tls]" */
static int
check_listen_one(struct loader *ld, const struct config *cfg, size_t i, struct listen_cfg *l)
{
	char base[32], *copy, *word, *save = NULL;
	bool tls_set = false;
	int rc = 0;

	snprintf(base, sizeof(base), "listen[%zu]", i);
	if ((copy = strdup(l->text)) == NULL)
		return fail_oom(ld);
	word = strtok_r(copy, " \t", &save);
	if (word == NULL) {
		free(copy);
		return fail(ld, base, NULL, "empty address");
	}
	rc = listen_addr(ld, base, word, l);
	while (rc == 0 && (word = strtok_r(NULL, " \t", &save)) != NULL) {
		if (strncmp(word, "tls=", 4) == 0 && tls_mode_parse(word + 4, &l->tls) == 0 &&
		    l->tls != TLS_MODE_MAY)
			tls_set = true;
		else if (strcmp(word, "require_tls") == 0)
			l->require_tls = true;
		else
			rc = fail(ld, base, NULL, "unknown option \"%s\" (expected "
			    "tls=none|starttls|implicit or require_tls)", word);
	}
	free(copy);
	if (rc == -1)
		return -1;
	if (!tls_set && cfg->tls.cert != NULL)
		l->tls = strcmp(l->port, IMPLICIT_TLS_PORT) == 0 ? TLS_MODE_IMPLICIT :
		    TLS_MODE_STARTTLS;
	if (l->tls != TLS_MODE_NONE && cfg->tls.cert == NULL)
		return fail(ld, base, NULL, "tls=%s needs tls.cert and tls.key",
		    tls_mode_names[l->tls].str);
	if (l->require_tls && l->tls == TLS_MODE_NONE)
		return fail(ld, base, NULL, "require_tls on a listener without TLS");
	return 0;
}

static int
check_listen(struct loader *ld, const struct raw_config *raw, struct config *cfg)
{
	static const char *const fallback[] = { DEFAULT_LISTEN };
	const char *const *texts = raw->listen ? (const char *const *)raw->listen : fallback;
	size_t n = raw->listen ? raw->n_listen : 1;

	if ((cfg->listen = calloc(n, sizeof(*cfg->listen))) == NULL)
		return fail_oom(ld);
	cfg->n_listen = n;
	for (size_t i = 0; i < n; i++) {
		struct listen_cfg *l = &cfg->listen[i];

		if (copy_str(ld, &l->text, texts[i]) == -1 || check_listen_one(ld, cfg, i, l) == -1)
			return -1;
		for (size_t j = 0; j < i; j++) {
			if (cfg->listen[j].sslen == l->sslen &&
			    memcmp(&cfg->listen[j].ss, &l->ss, l->sslen) == 0) {
				char base[32];

				snprintf(base, sizeof(base), "listen[%zu]", i);
				return fail(ld, base, NULL, "same address as listen[%zu]", j);
			}
		}
	}
	return 0;
}

static int
check_status_listen(struct loader *ld, const char *text)
{
	struct sockaddr_storage ss;
	socklen_t sslen;
	char *host, *port, why[128];
	int rc = 0;

	if (text == NULL)
		return 0;
	if (netaddr_split(text, &host, &port, why, sizeof(why)) == -1)
		return fail(ld, "status_listen", NULL, "%s", why);
	if (netaddr_numeric(strcmp(host, "localhost") == 0 ? "127.0.0.1" : host, port,
	    &ss, &sslen) == -1)
		rc = fail(ld, "status_listen", NULL, "\"%s\" is not a numeric IP address", host);
	free(host);
	free(port);
	return rc;
}

/*
 * The status page names users and providers: a bare port ("9125") means
 * the loopback address, so that it is only reachable from this host
 * unless an address is written.
 */
static int
build_status_listen(struct loader *ld, const char *text, char **dst)
{
	char loopback[32];

	*dst = NULL;
	if (text != NULL && text[0] != '\0' && strspn(text, "0123456789") == strlen(text) &&
	    strlen(text) <= 5) {
		snprintf(loopback, sizeof(loopback), "127.0.0.1:%s", text);
		text = loopback;
	}
	if (check_status_listen(ld, text) == -1)
		return -1;
	return copy_str(ld, dst, text);
}

static int
default_hostname(struct loader *ld, char **dst)
{
	char name[HOST_NAME_MAX + 1];

	if (gethostname(name, sizeof(name)) == -1 || name[0] == '\0')
		snprintf(name, sizeof(name), "localhost");
	name[sizeof(name) - 1] = '\0';
	return copy_str(ld, dst, name);
}

/* Non-root runs keep the segment where they can write it. */
static int
default_state_file(struct loader *ld, char **dst)
{
	char path[64];

	if (geteuid() == 0)
		return copy_str(ld, dst, RUNSTATEDIR "/smtpmux/smtpmuxd.state");
	snprintf(path, sizeof(path), "/tmp/smtpmuxd-%u.state", (unsigned)geteuid());
	return copy_str(ld, dst, path);
}

static unsigned
default_workers(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n < 1 ? 1 : n > MAX_WORKERS ? MAX_WORKERS : (unsigned)n;
}

/*
 * The Go prototype took USE_INSECURE_AUTH=true from the environment: it
 * allows AUTH without TLS inbound, and makes downstreams without a `tls:`
 * key behave as `tls: may` (the prototype sent credentials in clear when a
 * server offered no STARTTLS).
 */
static bool
env_insecure_auth(void)
{
	const char *v = getenv("USE_INSECURE_AUTH");

	return v != NULL && (strcasecmp(v, "true") == 0 || strcmp(v, "1") == 0 ||
	    strcasecmp(v, "yes") == 0);
}

static int
check_top(struct loader *ld, const struct raw_config *raw, struct config *cfg)
{
	const char *tmp = getenv("TMPDIR");

	if (raw->workers != NULL && (*raw->workers < 1 || *raw->workers > MAX_WORKERS))
		return fail(ld, "workers", NULL, "must be from 1 to %d", MAX_WORKERS);
	cfg->workers = raw->workers ? *raw->workers : default_workers();
	ld->env_insecure_auth = env_insecure_auth();
	cfg->allow_insecure_auth = (raw->allow_insecure_auth && *raw->allow_insecure_auth) ||
	    ld->env_insecure_auth;
	cfg->run_as_root = raw->run_as_root && *raw->run_as_root;
	if (raw->hostname ? copy_str(ld, &cfg->hostname, raw->hostname) :
	    default_hostname(ld, &cfg->hostname))
		return -1;
	if (raw->state_file ? copy_path(ld, cfg, &cfg->state_file, raw->state_file) :
	    default_state_file(ld, &cfg->state_file))
		return -1;
	if (copy_str(ld, &cfg->run_user, raw->user ? raw->user : DEFAULT_RUN_USER) == -1 ||
	    copy_str(ld, &cfg->run_group, raw->group) == -1 ||
	    copy_path(ld, cfg, &cfg->tmp_dir, raw->tmp_dir ? raw->tmp_dir :
	        tmp && *tmp ? tmp : "/tmp") == -1 ||
	    copy_path(ld, cfg, &cfg->log_file, raw->log_file) == -1 ||
	    build_status_listen(ld, raw->status_listen, &cfg->status_listen) == -1)
		return -1;
	return 0;
}

/* A secret written in the file: no longer than SASL can carry. */
static int
copy_secret(struct loader *ld, const char *base, const char *key, const char *src, char **dst)
{
	*dst = NULL;
	if (src == NULL)
		return 0;
	ld->inline_secrets = true;
	if (strlen(src) > SECRET_MAX)
		return fail(ld, base, key, "longer than %d octets (the most AUTH can carry)",
		    SECRET_MAX);
	return copy_str(ld, dst, src);
}

static int
read_secret(struct loader *ld, const struct config *cfg, const char *base, const char *key,
    const char *name, char **dst)
{
	char why[PATH_MAX + 96];

	if ((*dst = secret_file_read(name, cfg->dir, why, sizeof(why))) == NULL)
		return fail(ld, base, key, "%s", why);
	return 0;
}

/* user, pass or pass_file, auth and the token source: the rules are config_oauth.c's. */
static int
check_downstream_auth(struct loader *ld, const struct config *cfg, const char *base,
    const struct raw_downstream *raw, struct downstream_cfg *ds)
{
	const struct raw_downstream_auth a = {
		.user = raw->user, .pass = raw->pass, .pass_file = raw->pass_file,
		.auth = raw->auth, .oauth2 = raw->oauth2, .token_command = raw->token_command,
		.token_timeout = raw->token_timeout, .token_lifetime = raw->token_lifetime,
	};
	const char *key = NULL;
	char why[512];

	ds->token_slot = -1;
	if (config_oauth_check(&a, cfg->dir, ds, &key, why, sizeof(why)) == -1)
		return key != NULL ? fail(ld, base, key, "%s", why) : fail_oom(ld);
	if (copy_str(ld, &ds->user, raw->user) == -1)
		return -1;
	return copy_secret(ld, base, "pass", raw->pass, &ds->pass);    /* pass_file: when built */
}

/* Without `tls:`: implicit on port 465; else STARTTLS, required unless
 * USE_INSECURE_AUTH=true asks for the prototype's behaviour (may). */
static int
check_downstream_tls(struct loader *ld, const struct config *cfg,
    const struct raw_downstream *raw, struct downstream_cfg *ds)
{
	ds->tls_explicit = raw->tls != NULL;
	if (raw->tls != NULL)
		ds->tls = *raw->tls;
	else if (strcmp(ds->port, IMPLICIT_TLS_PORT) == 0)
		ds->tls = TLS_MODE_IMPLICIT;
	else
		ds->tls = ld->env_insecure_auth ? TLS_MODE_MAY : TLS_MODE_STARTTLS;
	ds->tls_verify = raw->tls_verify == NULL || *raw->tls_verify;
	return copy_path(ld, cfg, &ds->tls_ca, raw->tls_ca);
}

/* `rewrite_from:` an address, or "user": the downstream's login. */
static int
check_rewrite_from(struct loader *ld, const char *base, const struct raw_downstream *raw,
    struct downstream_cfg *ds)
{
	const char *addr = raw->rewrite_from;

	if (addr == NULL)
		return 0;
	if (strcmp(addr, "user") == 0) {
		if (ds->user == NULL || ds->user[0] == '\0')
			return fail(ld, base, "rewrite_from", "\"user\" needs the downstream's user");
		if (!smtp_mailbox_valid(ds->user, strlen(ds->user)))
			return fail(ld, base, "rewrite_from", "\"user\": the downstream's user is "
			    "not an e-mail address; write the address to send as");
		addr = ds->user;
	} else if (!smtp_mailbox_valid(addr, strlen(addr))) {
		return fail(ld, base, "rewrite_from", "\"%s\" is not an e-mail address "
		    "(or \"user\")", addr);
	}
	return copy_str(ld, &ds->rewrite_from, addr);
}

static int
check_downstream(struct loader *ld, const struct config *cfg, const char *base,
    const struct raw_downstream *raw, struct downstream_cfg *ds)
{
	char why[128];

	if (copy_str(ld, &ds->addr, raw->addr) == -1)
		return -1;
	if (netaddr_split(raw->addr, &ds->host, &ds->port, why, sizeof(why)) == -1)
		return fail(ld, base, "addr", "%s", why);
	ds->quota_window = raw->quota_window ? *raw->quota_window : QUOTA_ROLLING;
	if (copy_str(ld, &ds->name, raw->name ? raw->name : raw->addr) == -1 ||
	    check_downstream_auth(ld, cfg, base, raw, ds) == -1 ||
	    check_downstream_tls(ld, cfg, raw, ds) == -1 ||
	    check_rewrite_from(ld, base, raw, ds) == -1 ||
	    uint_opt(ld, base, "weight", raw->weight, 1, 1, &ds->weight) == -1 ||
	    uint_opt(ld, base, "max_per_minute", raw->max_per_minute, 0, 0,
	        &ds->max_per_minute) == -1 ||
	    uint_opt(ld, base, "max_per_hour", raw->max_per_hour, 0, 0, &ds->max_per_hour) == -1 ||
	    uint_opt(ld, base, "max_per_day", raw->max_per_day, 0, 0, &ds->max_per_day) == -1 ||
	    uint_opt(ld, base, "probe_interval", raw->probe_interval, 0, 0,
	        &ds->probe_interval) == -1)
		return -1;
	return 0;
}

/* `selector.params`: a mapping of scalars, which libcyaml cannot describe. */
static int
check_params(struct loader *ld, const char *base, struct user_cfg *u)
{
	char path[256];
	const struct config_node *map, *c;
	size_t n = 0;

	path_join(path, sizeof(path), base, "selector.params");
	map = config_lines_get(ld->lines, path);
	if (map == NULL || (map->kind == CONFIG_NODE_SCALAR && map->value[0] == '\0'))
		return 0;
	if (map->kind != CONFIG_NODE_MAPPING)
		return fail(ld, path, NULL, "expected a mapping of names to strings");
	for (c = config_lines_child(ld->lines, map, NULL); c; c = config_lines_child(ld->lines, map, c))
		n++;
	if (n == 0)
		return 0;
	if ((u->params = calloc(n, sizeof(*u->params))) == NULL)
		return fail_oom(ld);
	for (c = config_lines_child(ld->lines, map, NULL); c; c = config_lines_child(ld->lines, map, c)) {
		struct selector_param_cfg *p = &u->params[u->n_params];

		if (c->kind != CONFIG_NODE_SCALAR)
			return fail(ld, c->path, NULL, "expected a string");
		for (size_t i = 0; i < u->n_params; i++)
			if (strcmp(u->params[i].key, c->key) == 0)
				return fail(ld, c->path, NULL, "duplicate key");
		if (copy_str(ld, &p->key, c->key) == -1 || copy_str(ld, &p->value, c->value) == -1)
			return -1;
		u->n_params++;
	}
	return 0;
}

static int
check_selector(struct loader *ld, const char *base, const struct raw_user *raw,
    struct user_cfg *u)
{
	const char *path = DEFAULT_SELECTOR;

	if (raw->selector != NULL && raw->selector_algo_path != NULL)
		return fail(ld, base, "selector_algo_path",
		    "use either selector or selector_algo_path, not both");
	if (raw->selector != NULL)
		path = raw->selector->path;
	else if (raw->selector_algo_path != NULL)
		path = raw->selector_algo_path;
	if (copy_str(ld, &u->selector_path, path) == -1)
		return -1;
	return raw->selector ? check_params(ld, base, u) : 0;
}

static int
check_downstream_names(struct loader *ld, const char *base, const struct raw_user *raw,
    const struct user_cfg *u)
{
	for (size_t j = 0; j < u->n_downstreams; j++) {
		for (size_t k = 0; k < j; k++) {
			char ds_base[160];

			if (strcmp(u->downstreams[j].name, u->downstreams[k].name) != 0)
				continue;
			snprintf(ds_base, sizeof(ds_base), "%s.downstreams[%zu]", base, j);
			return fail(ld, ds_base, raw->downstreams[j].name ? "name" : "addr",
			    "duplicate downstream name \"%s\" (also downstreams[%zu])",
			    u->downstreams[j].name, k);
		}
	}
	return 0;
}

/* `password:` or `password_file:` (read, and hashes checked, when built). */
static int
check_password(struct loader *ld, const char *base, const struct raw_user *raw,
    struct user_cfg *u)
{
	if (raw->password != NULL && raw->password_file != NULL)
		return fail(ld, base, "password_file", "use either password or password_file, not both");
	if (raw->password == NULL && raw->password_file == NULL)
		return fail(ld, base, "password", "required key missing (or password_file)");
	return copy_secret(ld, base, "password", raw->password, &u->password);
}

static int
check_allowed_senders(struct loader *ld, const char *base, const struct raw_user *raw,
    struct user_cfg *u)
{
	char path[96], why[256];

	if (raw->n_allowed_senders == 0)
		return 0;
	if ((u->allowed_senders = calloc(raw->n_allowed_senders, sizeof(char *))) == NULL)
		return fail_oom(ld);
	for (size_t i = 0; i < raw->n_allowed_senders; i++) {
		snprintf(path, sizeof(path), "%s.allowed_senders[%zu]", base, i);
		if (sender_pattern_check(raw->allowed_senders[i], why, sizeof(why)) == -1)
			return fail(ld, path, NULL, "%s", why);
		if (copy_str(ld, &u->allowed_senders[i], raw->allowed_senders[i]) == -1)
			return -1;
		u->n_allowed_senders++;
	}
	return 0;
}

static int
check_user(struct loader *ld, const struct config *cfg, size_t i, const struct raw_user *raw,
    struct user_cfg *u)
{
	char base[32];

	snprintf(base, sizeof(base), "users[%zu]", i);
	for (size_t k = 0; k < i; k++)
		if (strcasecmp(cfg->users[k].email, raw->email) == 0)
			return fail(ld, base, "email", "duplicate user \"%s\" (also users[%zu])",
			    raw->email, k);
	if (copy_str(ld, &u->email, raw->email) == -1 ||
	    check_password(ld, base, raw, u) == -1 ||
	    check_allowed_senders(ld, base, raw, u) == -1 ||
	    check_selector(ld, base, raw, u) == -1)
		return -1;
	if ((u->downstreams = calloc(raw->n_downstreams, sizeof(*u->downstreams))) == NULL)
		return fail_oom(ld);
	for (size_t j = 0; j < raw->n_downstreams; j++) {
		char ds_base[96];

		snprintf(ds_base, sizeof(ds_base), "%s.downstreams[%zu]", base, j);
		u->n_downstreams++;
		if (check_downstream(ld, cfg, ds_base, &raw->downstreams[j], &u->downstreams[j]) == -1)
			return -1;
	}
	return check_downstream_names(ld, base, raw, u);
}

static int
check_users(struct loader *ld, const struct raw_config *raw, struct config *cfg)
{
	if ((cfg->users = calloc(raw->n_users ? raw->n_users : 1, sizeof(*cfg->users))) == NULL)
		return fail_oom(ld);
	for (size_t i = 0; i < raw->n_users; i++) {
		cfg->n_users++;
		if (check_user(ld, cfg, i, &raw->users[i], &cfg->users[i]) == -1)
			return -1;
	}
	return 0;
}

static const struct downstream_cfg *
token_account_twin(const struct config *cfg, size_t ui, size_t di, size_t *tu, size_t *td)
{
	const struct downstream_cfg *ds = &cfg->users[ui].downstreams[di];

	for (size_t i = 0; i <= ui; i++) {
		for (size_t j = 0; j < cfg->users[i].n_downstreams && (i < ui || j < di); j++) {
			const struct downstream_cfg *o = &cfg->users[i].downstreams[j];

			if (o->token != NULL && strcmp(o->addr, ds->addr) == 0 &&
			    strcmp(o->user, ds->user) == 0) {
				*tu = i;
				*td = j;
				return o;
			}
		}
	}
	return NULL;
}

/* The token table has one token per account (addr and user): two
 * downstreams naming the same account must get it the same way. */
static int
check_token_sources(struct loader *ld, const struct config *cfg)
{
	for (size_t i = 0; i < cfg->n_users; i++) {
		for (size_t j = 0; j < cfg->users[i].n_downstreams; j++) {
			const struct downstream_cfg *ds = &cfg->users[i].downstreams[j], *twin;
			char base[96];
			size_t tu, td;

			if (ds->token == NULL ||
			    (twin = token_account_twin(cfg, i, j, &tu, &td)) == NULL ||
			    twin->token->id == ds->token->id)
				continue;
			snprintf(base, sizeof(base), "users[%zu].downstreams[%zu]", i, j);
			return fail(ld, base, ds->token->kind == TOKEN_SOURCE_COMMAND ?
			    "token_command" : "oauth2", "same addr and user as "
			    "users[%zu].downstreams[%zu], but another token source", tu, td);
		}
	}
	return 0;
}

static int
check_client(struct loader *ld, const struct config *cfg, size_t i, const struct raw_client *raw,
    struct netmask *net, struct client_cfg *c)
{
	char base[32], why[160];

	snprintf(base, sizeof(base), "clients[%zu]", i);
	if (copy_str(ld, &c->network, raw->network) == -1)
		return -1;
	if (netmask_parse(raw->network, net, why, sizeof(why)) == -1)
		return fail(ld, base, "network", "%s", why);
	if (netmask_is_everything(net))
		return fail(ld, base, "network", "\"%s\" covers every address: sending without "
		    "AUTH is for the hosts of a local network", raw->network);
	for (size_t j = 0; j < i; j++)
		if (netmask_equal(&cfg->client_nets[j], net))
			return fail(ld, base, "network", "same network as clients[%zu]", j);
	if ((c->user = config_find_user(cfg, raw->user)) == NULL)
		return fail(ld, base, "user", "no user \"%s\" in users", raw->user);
	return 0;
}

static int
check_clients(struct loader *ld, const struct raw_config *raw, struct config *cfg)
{
	if (raw->n_clients == 0)
		return 0;
	if ((cfg->clients = calloc(raw->n_clients, sizeof(*cfg->clients))) == NULL ||
	    (cfg->client_nets = calloc(raw->n_clients, sizeof(*cfg->client_nets))) == NULL)
		return fail_oom(ld);
	for (size_t i = 0; i < raw->n_clients; i++) {
		cfg->n_clients++;
		if (check_client(ld, cfg, i, &raw->clients[i], &cfg->client_nets[i],
		    &cfg->clients[i]) == -1)
			return -1;
	}
	return 0;
}

static int
config_check(struct loader *ld, const struct raw_config *raw, struct config *cfg)
{
	if (check_top(ld, raw, cfg) == -1 ||
	    check_tls(ld, raw->tls, cfg) == -1 ||
	    check_listen(ld, raw, cfg) == -1 ||
	    check_limits(ld, raw->limits, &cfg->limits) == -1 ||
	    check_health(ld, raw->health, &cfg->health) == -1 ||
	    check_auth(ld, raw->auth, &cfg->auth) == -1 ||
	    check_cache(ld, raw->connection_cache, &cfg->connection_cache) == -1 ||
	    check_cluster(ld, raw->cluster, cfg) == -1 ||
	    check_queue(ld, raw->queue, cfg) == -1 ||
	    check_users(ld, raw, cfg) == -1 ||
	    check_clients(ld, raw, cfg) == -1 ||
	    check_token_sources(ld, cfg) == -1)
		return -1;
	cfg->inline_secrets = ld->inline_secrets;
	return 0;
}

/* ---- loading what the configuration names ---- */

static int
build_selector(struct loader *ld, const struct config *cfg, const char *base,
    const struct raw_user *raw, struct user_cfg *u)
{
	struct smtpmux_selector_param *params = NULL;
	char why[256];
	const char *key = raw->selector ? "selector.path" :
	    raw->selector_algo_path ? "selector_algo_path" : NULL;

	if (u->n_params > 0 && (params = calloc(u->n_params, sizeof(*params))) == NULL)
		return fail_oom(ld);
	for (size_t i = 0; i < u->n_params; i++) {
		params[i].key = u->params[i].key;
		params[i].value = u->params[i].value;
	}
	why[0] = '\0';
	u->selector = selector_load(u->selector_path, cfg->dir, params, u->n_params,
	    &u->selector_resolved, why, sizeof(why));
	free(params);
	if (u->selector == NULL)
		return fail(ld, base, key, "%s", why[0] ? why : "cannot load the selector");
	return 0;
}

/* Each downstream keeps its own client credentials (and resumption data). */
static int
build_downstream_tls(struct loader *ld, const char *base, struct downstream_cfg *ds)
{
	char why[256];

	if (ds->tls == TLS_MODE_NONE)
		return 0;
	why[0] = '\0';
	ds->tls_client = tls_client_new(ds->tls_ca, ds->tls_verify, TLS_DEFAULT_PRIORITY,
	    why, sizeof(why));
	if (ds->tls_client == NULL)
		return fail(ld, base, ds->tls_ca ? "tls_ca" : "tls", "%s",
		    why[0] ? why : "cannot set up TLS");
	return 0;
}

/* The files and the program a token source names: config_oauth.c */
static int
build_downstream_token(struct loader *ld, const char *base, const struct downstream_cfg *ds)
{
	const char *key = NULL;
	char why[512];

	if (config_oauth_build(ds, &key, why, sizeof(why)) == -1)
		return key != NULL ? fail(ld, base, key, "%s", why) : fail_oom(ld);
	return 0;
}

static int
build_server_tls(struct loader *ld, struct config *cfg)
{
	char why[256];

	if (cfg->tls.cert == NULL)
		return 0;
	why[0] = '\0';
	cfg->tls.server = tls_server_new(cfg->tls.cert, cfg->tls.key, cfg->tls.priority,
	    why, sizeof(why));
	if (cfg->tls.server == NULL)
		return fail(ld, "tls", "cert", "%s", why[0] ? why : "cannot load the certificate");
	return 0;
}

/* `password_file:` is read; a hash, from the file or not, must be usable. */
static int
build_password(struct loader *ld, const struct config *cfg, const char *base,
    const struct raw_user *raw, struct user_cfg *u)
{
	const char *key = raw->password_file != NULL ? "password_file" : "password";
	char why[256];

	if (raw->password_file != NULL &&
	    read_secret(ld, cfg, base, key, raw->password_file, &u->password) == -1)
		return -1;
	if (passwd_is_hash(u->password) && passwd_hash_check(u->password, why, sizeof(why)) == -1)
		return fail(ld, base, key, "%s", why);
	return 0;
}

static int
build_downstream(struct loader *ld, const struct config *cfg, const char *base,
    const struct raw_downstream *raw, struct downstream_cfg *ds)
{
	if (raw->pass_file != NULL &&
	    read_secret(ld, cfg, base, "pass_file", raw->pass_file, &ds->pass) == -1)
		return -1;
	if (build_downstream_token(ld, base, ds) == -1)
		return -1;
	return build_downstream_tls(ld, base, ds);
}

static int
build_user(struct loader *ld, struct config *cfg, const char *base, const struct raw_user *raw,
    struct user_cfg *u)
{
	if (build_selector(ld, cfg, base, raw, u) == -1 ||
	    build_password(ld, cfg, base, raw, u) == -1)
		return -1;
	/* An unknown name is checked against a real hash, so that its AUTH
	 * costs what a known user's costs. */
	if (cfg->unknown_user_hash == NULL && passwd_is_hash(u->password))
		cfg->unknown_user_hash = u->password;
	for (size_t j = 0; j < u->n_downstreams; j++) {
		char ds_base[96];

		snprintf(ds_base, sizeof(ds_base), "%s.downstreams[%zu]", base, j);
		if (build_downstream(ld, cfg, ds_base, &raw->downstreams[j], &u->downstreams[j]) == -1)
			return -1;
	}
	return 0;
}

static int
build_cluster(struct loader *ld, const struct raw_config *raw, struct config *cfg)
{
	const char *key = "";
	char why[PATH_MAX + 96];

	if (config_cluster_build(raw->cluster, cfg->dir, &cfg->cluster, &key, why, sizeof(why)) == 0)
		return 0;
	return fail(ld, "cluster", *key ? key : NULL, "%s", why);
}

static int
config_build(struct loader *ld, const struct raw_config *raw, struct config *cfg)
{
	if (build_server_tls(ld, cfg) == -1 || build_cluster(ld, raw, cfg) == -1)
		return -1;
	for (size_t i = 0; i < cfg->n_users; i++) {
		char base[32];

		snprintf(base, sizeof(base), "users[%zu]", i);
		if (build_user(ld, cfg, base, &raw->users[i], &cfg->users[i]) == -1)
			return -1;
	}
	return 0;
}

/* Whether this downstream's login and password may cross the network in clear. */
static bool
credentials_may_go_plain(const struct downstream_cfg *ds)
{
	return ds->user != NULL && ds->user[0] != '\0' &&
	    (ds->tls == TLS_MODE_NONE || ds->tls == TLS_MODE_MAY);
}

/*
 * One line, at start and at every reload, that names each downstream that
 * may be sent credentials without TLS (`tls: none`, `tls: may`, or no
 * `tls:` with USE_INSECURE_AUTH=true).
 */
static void
warn_plaintext_credentials(const struct config *cfg)
{
	char list[1536], tail[32] = "";
	size_t used = 0, more = 0;

	list[0] = '\0';
	for (size_t i = 0; i < cfg->n_users; i++) {
		const struct user_cfg *u = &cfg->users[i];

		for (size_t j = 0; j < u->n_downstreams; j++) {
			const struct downstream_cfg *ds = &u->downstreams[j];
			bool named = strcmp(ds->name, ds->addr) != 0;
			int n;

			if (!credentials_may_go_plain(ds))
				continue;
			if (more > 0) {
				more++;
				continue;
			}
			n = snprintf(list + used, sizeof(list) - used, "%suser=%s downstream=%s%s%s%s "
			    "tls=%s", used ? ", " : "", u->email, ds->name, named ? "[" : "",
			    named ? ds->addr : "", named ? "]" : "",
			    ds->tls == TLS_MODE_MAY ? "may" : "none");
			if (n < 0 || (size_t)n >= sizeof(list) - used) {
				list[used] = '\0';
				more++;
			} else
				used += (size_t)n;
		}
	}
	if (more > 0)
		snprintf(tail, sizeof(tail), " and %zu more", more);
	if (used > 0 || more > 0)
		log_warn("config: credentials may be sent without TLS to: %s%s", list, tail);
}

/* Logged once the configuration is accepted, for the administrator to see. */
static void
config_warn(const struct config *cfg)
{
	warn_plaintext_credentials(cfg);
	for (size_t i = 0; i < cfg->n_users; i++) {
		const struct user_cfg *u = &cfg->users[i];

		for (size_t j = 0; j < u->n_downstreams; j++) {
			const struct downstream_cfg *ds = &u->downstreams[j];

			if (ds->tls != TLS_MODE_NONE && !ds->tls_verify)
				log_warn("config: user=%s downstream=%s: tls_verify is false, "
				    "the certificate of %s is not checked", u->email, ds->name,
				    ds->addr);
		}
	}
}

/* ---- the file ---- */

static char *
file_read(struct loader *ld, size_t *lenp)
{
	FILE *fp = fopen(ld->file, "r");
	char *data;
	size_t len;

	if (fp == NULL) {
		snprintf(ld->err, ld->errlen, "%s: cannot open: %s", ld->file, strerror(errno));
		return NULL;
	}
	if ((data = malloc(CONFIG_MAX_SIZE + 1)) == NULL) {
		fclose(fp);
		fail_oom(ld);
		return NULL;
	}
	len = fread(data, 1, CONFIG_MAX_SIZE + 1, fp);
	if (ferror(fp) || len > CONFIG_MAX_SIZE) {
		snprintf(ld->err, ld->errlen, "%s: cannot read: %s", ld->file,
		    ferror(fp) ? strerror(errno) : "file too large");
		fclose(fp);
		free(data);
		return NULL;
	}
	fclose(fp);
	data[len] = '\0';
	*lenp = len;
	return data;
}

/* Absolute, so that a reload after chdir("/") finds the same file. */
static int
config_set_path(struct loader *ld, struct config *cfg, const char *path)
{
	char cwd[PATH_MAX], *slash;
	size_t len;

	if (path[0] == '/') {
		cwd[0] = '\0';
	} else if (getcwd(cwd, sizeof(cwd)) == NULL) {
		snprintf(ld->err, ld->errlen, "%s: cannot resolve: %s", path, strerror(errno));
		return -1;
	}
	len = strlen(cwd) + strlen(path) + 2;
	if ((cfg->path = malloc(len)) == NULL || (cfg->dir = malloc(len)) == NULL)
		return fail_oom(ld);
	snprintf(cfg->path, len, "%s%s%s", cwd, cwd[0] ? "/" : "", path);
	snprintf(cfg->dir, len, "%s", cfg->path);
	slash = strrchr(cfg->dir, '/');
	slash[slash == cfg->dir] = '\0';
	return 0;
}

static struct raw_config *
raw_load(struct loader *ld, const char *data, size_t len, const cyaml_config_t *cy)
{
	struct raw_config *raw = NULL;
	cyaml_err_t rc;

	rc = cyaml_load_data((const uint8_t *)data, len, cy, &top_schema,
	    (cyaml_data_t **)&raw, NULL);
	if (rc != CYAML_OK) {
		fail_cyaml(ld, rc);
		return NULL;
	}
	/* An empty document (only comments, say) loads as nothing at all:
	 * it is a file with every default and no users. */
	if (raw == NULL && (raw = calloc(1, sizeof(*raw))) == NULL)
		fail_oom(ld);
	return raw;
}

/*
 * The steps of config_load() on text in memory; with build, the last one
 * (certificates, selectors) too. path names the file in messages and is
 * the base of relative file names.
 */
static struct config *
config_from_text(const char *path, const char *data, size_t len, bool build, char *err,
    size_t errlen)
{
	struct loader ld = { .file = path, .err = err, .errlen = errlen };
	const cyaml_config_t cy = {
		.log_fn = cylog_capture,
		.log_ctx = &ld,
		.mem_fn = cyaml_mem,
		.log_level = CYAML_LOG_ERROR,
		.flags = CYAML_CFG_DEFAULT,
	};
	struct raw_config *raw = NULL;
	struct config *cfg;
	unsigned errline;
	int rc = -1;

	if ((cfg = calloc(1, sizeof(*cfg))) == NULL) {
		snprintf(err, errlen, "%s: out of memory", path);
		return NULL;
	}
	if (config_set_path(&ld, cfg, path) == -1)
		goto out;
	if ((ld.lines = config_lines_scan(data, len, &errline, err, errlen)) == NULL) {
		char why[512];

		snprintf(why, sizeof(why), "%s", err);
		one_line(why);
		snprintf(err, errlen, "%s:%u: %s", path, errline, why);
		goto out;
	}
	if ((raw = raw_load(&ld, data, len, &cy)) == NULL ||
	    check_bools(&ld, config_lines_get(ld.lines, "")) == -1)
		goto out;
	rc = config_check(&ld, raw, cfg) == 0 && (!build || config_build(&ld, raw, cfg) == 0) ?
	    0 : -1;
out:
	if (raw != NULL)
		cyaml_free(&cy, &top_schema, raw, 0);
	config_lines_free(ld.lines);
	if (rc == -1) {
		config_free(cfg);
		return NULL;
	}
	if (build)
		config_warn(cfg);
	return cfg;
}

struct config *
config_load(const char *path, char *err, size_t errlen)
{
	struct loader ld = { .file = path, .err = err, .errlen = errlen };
	struct config *cfg;
	size_t len = 0;
	char *data;

	if ((data = file_read(&ld, &len)) == NULL)
		return NULL;
	cfg = config_from_text(path, data, len, true, err, errlen);
	free(data);
	return cfg;
}

struct config *
config_check_text(const char *path, const char *data, size_t len, char *err, size_t errlen)
{
	return config_from_text(path, data, len, false, err, errlen);
}

/* Secrets are wiped before their memory goes back to the allocator. */
static void
secret_free(char *s)
{
	if (s != NULL)
		auth_wipe(s, strlen(s));
	free(s);
}

static void
downstream_free(struct downstream_cfg *ds)
{
	if (ds->tls_client != NULL)
		tls_client_free(ds->tls_client);
	free(ds->name);
	free(ds->addr);
	free(ds->host);
	free(ds->port);
	free(ds->user);
	secret_free(ds->pass);
	free(ds->tls_ca);
	free(ds->rewrite_from);
	config_oauth_free(ds->token);
}

static void
user_free(struct user_cfg *u)
{
	if (u->selector != NULL)
		selector_free(u->selector);
	for (size_t j = 0; j < u->n_downstreams; j++)
		downstream_free(&u->downstreams[j]);
	for (size_t i = 0; i < u->n_params; i++) {
		free(u->params[i].key);
		free(u->params[i].value);
	}
	free(u->params);
	free(u->downstreams);
	for (size_t i = 0; i < u->n_allowed_senders; i++)
		free(u->allowed_senders[i]);
	free(u->allowed_senders);
	free(u->email);
	secret_free(u->password);
	free(u->selector_path);
	free(u->selector_resolved);
}

void
config_free(struct config *cfg)
{
	if (cfg == NULL)
		return;
	for (size_t i = 0; i < cfg->n_users; i++)
		user_free(&cfg->users[i]);
	free(cfg->users);
	for (size_t i = 0; i < cfg->n_clients; i++)
		free(cfg->clients[i].network);
	free(cfg->clients);
	free(cfg->client_nets);
	for (size_t i = 0; i < cfg->n_listen; i++) {
		free(cfg->listen[i].text);
		free(cfg->listen[i].host);
		free(cfg->listen[i].port);
	}
	free(cfg->listen);
	if (cfg->tls.server != NULL)
		tls_server_free(cfg->tls.server);
	free(cfg->tls.cert);
	free(cfg->tls.key);
	free(cfg->tls.priority);
	free(cfg->path);
	free(cfg->dir);
	free(cfg->hostname);
	free(cfg->run_user);
	free(cfg->run_group);
	free(cfg->tmp_dir);
	free(cfg->log_file);
	free(cfg->status_listen);
	free(cfg->state_file);
	config_cluster_free(&cfg->cluster);
	config_queue_free(&cfg->queue);
	free(cfg);
}

const struct user_cfg *
config_find_user(const struct config *cfg, const char *email)
{
	for (size_t i = 0; i < cfg->n_users; i++)
		if (strcasecmp(cfg->users[i].email, email) == 0)
			return &cfg->users[i];
	return NULL;
}

int
config_has_users(const struct config *cfg, char *err, size_t errlen)
{
	if (cfg->n_users > 0)
		return 0;
	snprintf(err, errlen, "%s: no users defined, so there is nothing to relay: add the "
	    "applications and their providers under \"users:\" (see smtpmux.yaml(5))", cfg->path);
	return -1;
}

const struct client_cfg *
config_find_client(const struct config *cfg, const char *addr)
{
	struct netmask host;
	long i;

	if (cfg->n_clients == 0 || addr == NULL || netmask_parse_addr(addr, &host) == -1)
		return NULL;
	i = netmask_best(cfg->client_nets, cfg->n_clients, &host);
	return i < 0 ? NULL : &cfg->clients[i];
}

const char *
config_default_path(void)
{
	return SYSCONFDIR "/smtpmux/smtpmux.yaml";
}

/* ---- for tests ---- */

static void
schema_walk(const cyaml_schema_value_t *sv, const char *prefix,
    void (*fn)(const char *key, void *arg), void *arg)
{
	char path[256];

	if (sv->type == CYAML_SEQUENCE) {
		snprintf(path, sizeof(path), "%s[]", prefix);
		schema_walk(sv->sequence.entry, path, fn, arg);
		return;
	}
	if (sv->type != CYAML_MAPPING)
		return;
	for (const cyaml_schema_field_t *f = sv->mapping.fields; f->key != NULL; f++) {
		path_join(path, sizeof(path), prefix, f->key);
		fn(path, arg);
		schema_walk(&f->value, path, fn, arg);
	}
}

void
config_schema_keys(void (*fn)(const char *key, void *arg), void *arg)
{
	schema_walk(&top_schema, "", fn, arg);
}

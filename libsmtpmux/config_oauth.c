/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "argv_split.h"
#include "auth.h"
#include "config_oauth.h"
#include "secret_file.h"
#include "tls.h"
#include "token_response.h"

#define DEFAULT_TOKEN_TIMEOUT 30
#define DEFAULT_TOKEN_LIFETIME 300
#define OPT CYAML_FLAG_OPTIONAL

const cyaml_strval_t config_auth_names[CONFIG_AUTH_NAMES] = {
	{ "auto", DS_AUTH_AUTO },
	{ "plain", DS_AUTH_PLAIN },
	{ "login", DS_AUTH_LOGIN },
	{ "xoauth2", DS_AUTH_XOAUTH2 },
	{ "oauthbearer", DS_AUTH_OAUTHBEARER },
	{ "none", DS_AUTH_NONE },
};

static const cyaml_strval_t grant_names[] = {
	{ "refresh_token", TOKEN_SOURCE_REFRESH_TOKEN },
	{ "client_credentials", TOKEN_SOURCE_CLIENT_CREDENTIALS },
};

#define OAUTH2_STR(key, flags, member) \
	CYAML_FIELD_STRING_PTR(key, flags, struct raw_oauth2, member, 1, CYAML_UNLIMITED)

const cyaml_schema_field_t config_oauth2_fields[] = {
	CYAML_FIELD_ENUM_PTR("grant", OPT | CYAML_FLAG_STRICT, struct raw_oauth2, grant,
	    grant_names, CYAML_ARRAY_LEN(grant_names)),
	OAUTH2_STR("token_url", CYAML_FLAG_DEFAULT, token_url),
	OAUTH2_STR("client_id", CYAML_FLAG_DEFAULT, client_id),
	OAUTH2_STR("client_secret", OPT, client_secret),
	OAUTH2_STR("client_secret_file", OPT, client_secret_file),
	OAUTH2_STR("refresh_token", OPT, refresh_token),
	OAUTH2_STR("refresh_token_file", OPT, refresh_token_file),
	OAUTH2_STR("scope", OPT, scope),
	OAUTH2_STR("ca", OPT, ca),
	CYAML_FIELD_END
};

/* Where an error goes: the key at fault and why. */
struct check {
	const char *dir;
	const char **key;
	char *why;
	size_t whylen;
};

static int __attribute__((format(printf, 3, 4)))
bad(struct check *c, const char *key, const char *fmt, ...)
{
	va_list ap;

	*c->key = key;
	va_start(ap, fmt);
	vsnprintf(c->why, c->whylen, fmt, ap);
	va_end(ap);
	return -1;
}

static int
oom(struct check *c)
{
	*c->key = NULL;
	return -1;
}

static int
copy(struct check *c, char **dst, const char *src)
{
	*dst = NULL;
	if (src != NULL && (*dst = strdup(src)) == NULL)
		return oom(c);
	return 0;
}

static int
copy_file_name(struct check *c, char **dst, const char *src)
{
	*dst = NULL;
	if (src != NULL && (*dst = config_resolve(c->dir, src)) == NULL)
		return oom(c);
	return 0;
}

static bool
has_source(const struct raw_downstream_auth *raw)
{
	return raw->oauth2 != NULL || raw->token_command != NULL;
}

static const char *
source_key(const struct raw_downstream_auth *raw)
{
	return raw->oauth2 != NULL ? "oauth2" : "token_command";
}

/* user and the password (pass or pass_file), against the mechanism and
 * the token source. */
static int
check_credentials(struct check *c, const struct raw_downstream_auth *raw,
    enum downstream_auth auth)
{
	bool user = raw->user != NULL && raw->user[0] != '\0';
	bool pass = raw->pass != NULL || raw->pass_file != NULL;
	const char *pass_key = raw->pass_file != NULL ? "pass_file" : "pass";

	if (raw->pass != NULL && raw->pass_file != NULL)
		return bad(c, "pass_file", "use either pass or pass_file, not both");
	if (auth == DS_AUTH_NONE && pass)
		return bad(c, pass_key, "not used with auth: none");
	if (has_source(raw) && !user)
		return bad(c, "user", "required with %s: the account the token logs in as",
		    source_key(raw));
	if (has_source(raw) && pass)
		return bad(c, pass_key, "not used with %s: the token is the credential",
		    source_key(raw));
	if (!has_source(raw) && user && !pass && auth != DS_AUTH_NONE)
		return bad(c, "pass", "required with user");
	if (!user && pass)
		return bad(c, "user", "required with %s", pass_key);
	if ((auth == DS_AUTH_PLAIN || auth == DS_AUTH_LOGIN) && !user)
		return bad(c, "user", "required with auth: %s", config_auth_names[auth].str);
	return 0;
}

static int
check_mechanism(struct check *c, const struct raw_downstream_auth *raw,
    enum downstream_auth auth)
{
	const char *name = config_auth_names[auth].str;

	if (raw->oauth2 != NULL && raw->token_command != NULL)
		return bad(c, "token_command", "use either oauth2 or token_command, not both");
	if (auth == DS_AUTH_NONE && has_source(raw))
		return bad(c, source_key(raw), "not used with auth: none");
	if ((auth == DS_AUTH_PLAIN || auth == DS_AUTH_LOGIN) && has_source(raw))
		return bad(c, "auth", "%s sends a password; a token goes with xoauth2 or "
		    "oauthbearer", name);
	if ((auth == DS_AUTH_XOAUTH2 || auth == DS_AUTH_OAUTHBEARER) && !has_source(raw))
		return bad(c, "auth", "%s needs oauth2 or token_command", name);
	if (!has_source(raw) && (raw->token_timeout != NULL || raw->token_lifetime != NULL))
		return bad(c, raw->token_timeout ? "token_timeout" : "token_lifetime",
		    "only with oauth2 or token_command");
	return 0;
}

/* A secret file must be readable now; its content is not kept here. */
static int
check_secret_file(struct check *c, const char *key, const char *path)
{
	char *secret = secret_file_read_path(path, TOKEN_MAX, c->why, c->whylen);

	if (secret == NULL) {
		*c->key = key;
		return -1;
	}
	auth_wipe(secret, strlen(secret));
	free(secret);
	return 0;
}

/* Loaded as GnuTLS will load it, so a bad bundle is refused now. */
static int
check_ca(struct check *c, const char *path)
{
	struct tls_client_ctx *t = tls_client_new(path, true, TLS_DEFAULT_PRIORITY,
	    c->why, c->whylen);

	if (t == NULL) {
		*c->key = "oauth2.ca";
		return -1;
	}
	tls_client_free(t);
	return 0;
}

static int
check_grant_secrets(struct check *c, const struct raw_oauth2 *o, enum token_source_kind kind)
{
	if (o->client_secret != NULL && o->client_secret_file != NULL)
		return bad(c, "oauth2.client_secret_file",
		    "use either client_secret or client_secret_file, not both");
	if (o->refresh_token != NULL && o->refresh_token_file != NULL)
		return bad(c, "oauth2.refresh_token_file",
		    "use either refresh_token or refresh_token_file, not both");
	if (kind == TOKEN_SOURCE_CLIENT_CREDENTIALS) {
		if (o->client_secret == NULL && o->client_secret_file == NULL)
			return bad(c, "oauth2.client_secret",
			    "required (or client_secret_file) with grant: client_credentials");
		if (o->refresh_token != NULL || o->refresh_token_file != NULL)
			return bad(c, o->refresh_token ? "oauth2.refresh_token" :
			    "oauth2.refresh_token_file", "not used with grant: client_credentials");
	} else if (o->refresh_token == NULL && o->refresh_token_file == NULL)
		return bad(c, "oauth2.refresh_token",
		    "required (or refresh_token_file) with grant: refresh_token");
	return 0;
}

/* "https://" and a host: the endpoint's certificate is always checked. */
static bool
https_url(const char *url)
{
	return strncasecmp(url, "https://", 8) == 0 && url[8] != '\0' && url[8] != '/' &&
	    strpbrk(url, " \t\r\n") == NULL;
}

static int
check_oauth2(struct check *c, const struct raw_oauth2 *o, struct token_source_cfg *t)
{
	t->kind = o->grant != NULL ? *o->grant : TOKEN_SOURCE_REFRESH_TOKEN;
	if (!https_url(o->token_url))
		return bad(c, "oauth2.token_url", "must be an https:// URL (the token "
		    "endpoint's certificate is always checked)");
	if (check_grant_secrets(c, o, t->kind) < 0)
		return -1;
	if (copy(c, &t->token_url, o->token_url) < 0 ||
	    copy(c, &t->client_id, o->client_id) < 0 ||
	    copy(c, &t->client_secret, o->client_secret) < 0 ||
	    copy_file_name(c, &t->client_secret_file, o->client_secret_file) < 0 ||
	    copy(c, &t->refresh_token, o->refresh_token) < 0 ||
	    copy_file_name(c, &t->refresh_token_file, o->refresh_token_file) < 0 ||
	    copy(c, &t->scope, o->scope) < 0 ||
	    copy_file_name(c, &t->ca, o->ca) < 0)
		return -1;
	return 0;
}

/* As execvp() will look for it. */
static bool
in_search_path(const char *prog)
{
	const char *path = getenv("PATH");
	char file[4096];
	struct stat st;

	if (path == NULL || path[0] == '\0')
		path = "/bin:/usr/bin";
	while (*path != '\0') {
		size_t n = strcspn(path, ":");

		snprintf(file, sizeof(file), "%.*s%s%s", (int)n, n ? path : ".", "/", prog);
		if (stat(file, &st) == 0 && S_ISREG(st.st_mode) && access(file, X_OK) == 0)
			return true;
		path += n + (path[n] == ':');
	}
	return false;
}

static int
check_program(struct check *c, const struct token_source_cfg *t)
{
	if (strchr(t->argv[0], '/') == NULL) {
		if (!in_search_path(t->argv[0]))
			return bad(c, "token_command", "\"%s\" is not a program in PATH",
			    t->argv[0]);
		return 0;
	}
	if (access(t->argv[0], X_OK) < 0)
		return bad(c, "token_command", "cannot run %s: %s", t->argv[0], strerror(errno));
	return 0;
}

/* A program named with a slash is taken from the configuration's folder. */
static int
check_command(struct check *c, const char *command, struct token_source_cfg *t)
{
	char why[96], *prog;

	t->kind = TOKEN_SOURCE_COMMAND;
	if (copy(c, &t->command, command) < 0)
		return -1;
	if ((t->argv = argv_split(command, why, sizeof(why))) == NULL)
		return bad(c, "token_command", "%s", why);
	if (strchr(t->argv[0], '/') == NULL)
		return 0;
	if (copy_file_name(c, &prog, t->argv[0]) < 0)
		return -1;
	free(t->argv[0]);
	t->argv[0] = prog;
	return 0;
}

static int
check_timing(struct check *c, const struct raw_downstream_auth *raw,
    struct token_source_cfg *t)
{
	t->timeout = raw->token_timeout ? *raw->token_timeout : DEFAULT_TOKEN_TIMEOUT;
	t->lifetime = raw->token_lifetime ? *raw->token_lifetime : DEFAULT_TOKEN_LIFETIME;
	if (t->timeout < 1)
		return bad(c, "token_timeout", "must be at least 1");
	if (t->lifetime < 1)
		return bad(c, "token_lifetime", "must be at least 1");
	return 0;
}

/* FNV-1a over everything that decides which token the source yields. */
static uint64_t
source_id(const struct token_source_cfg *t)
{
	const char *const parts[] = { t->token_url, t->client_id, t->client_secret,
	    t->client_secret_file, t->refresh_token, t->refresh_token_file, t->scope,
	    t->ca, t->command };
	uint64_t h = 0xcbf29ce484222325ULL ^ (uint64_t)t->kind;

	for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
		for (const char *p = parts[i] ? parts[i] : ""; *p != '\0'; p++)
			h = (h ^ (unsigned char)*p) * 0x100000001b3ULL;
		h = (h ^ 0x1f) * 0x100000001b3ULL;
	}
	return h != 0 ? h : 1;
}

static int
check_source(struct check *c, const struct raw_downstream_auth *raw, struct downstream_cfg *ds)
{
	struct token_source_cfg *t;
	int rc;

	if (!has_source(raw))
		return 0;
	if ((t = calloc(1, sizeof(*t))) == NULL)
		return oom(c);
	ds->token = t;
	rc = raw->oauth2 != NULL ? check_oauth2(c, raw->oauth2, t) :
	    check_command(c, raw->token_command, t);
	if (rc == 0 && (rc = check_timing(c, raw, t)) == 0)
		t->id = source_id(t);
	return rc;
}

int
config_oauth_check(const struct raw_downstream_auth *raw, const char *dir,
    struct downstream_cfg *ds, const char **key, char *why, size_t whylen)
{
	struct check c = { .dir = dir, .key = key, .why = why, .whylen = whylen };

	ds->auth = raw->auth != NULL ? *raw->auth : DS_AUTH_AUTO;
	if (check_mechanism(&c, raw, ds->auth) < 0 ||
	    check_credentials(&c, raw, ds->auth) < 0)
		return -1;
	return check_source(&c, raw, ds);
}

int
config_oauth_build(const struct downstream_cfg *ds, const char **key, char *why,
    size_t whylen)
{
	struct check c = { .key = key, .why = why, .whylen = whylen };
	const struct token_source_cfg *t = ds->token;

	if (t == NULL)
		return 0;
	if (t->kind == TOKEN_SOURCE_COMMAND)
		return check_program(&c, t);
	if (t->client_secret_file != NULL &&
	    check_secret_file(&c, "oauth2.client_secret_file", t->client_secret_file) < 0)
		return -1;
	if (t->refresh_token_file != NULL &&
	    check_secret_file(&c, "oauth2.refresh_token_file", t->refresh_token_file) < 0)
		return -1;
	return t->ca != NULL ? check_ca(&c, t->ca) : 0;
}

void
config_oauth_free(struct token_source_cfg *t)
{
	if (t == NULL)
		return;
	if (t->client_secret != NULL)
		auth_wipe(t->client_secret, strlen(t->client_secret));
	if (t->refresh_token != NULL)
		auth_wipe(t->refresh_token, strlen(t->refresh_token));
	free(t->token_url);
	free(t->client_id);
	free(t->client_secret);
	free(t->client_secret_file);
	free(t->refresh_token);
	free(t->refresh_token_file);
	free(t->scope);
	free(t->ca);
	free(t->command);
	argv_free(t->argv);
	free(t);
}

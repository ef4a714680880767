/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spool_format.h"

/*
 * One grammar for both files: a magic line, then "key value" lines up to
 * an empty line. The parser walks lines with explicit lengths (buf is not
 * NUL-terminated), checks each key at most once (rcpt and error repeat),
 * and fills a scratch copy that is handed over only when everything is
 * valid. The formatters check their own output with the parser, so a
 * value that would not read back is never written.
 */

#define MESSAGE_MAGIC "SMTPMUX-SPOOL 1"
#define STATE_MAGIC "SMTPMUX-STATE 1"
#define LINE_MAX_LEN 1024                   /* an escaped name and an error text fit */

enum file_kind { KIND_MESSAGE, KIND_STATE };

enum key_bit {
	K_USER = 1 << 0, K_CLIENT = 1 << 1, K_ARRIVED = 1 << 2, K_FROM = 1 << 3,
	K_BODY = 1 << 4, K_SIZE = 1 << 5, K_ATTEMPTS = 1 << 6, K_NEXT = 1 << 7,
	K_WARNED = 1 << 8, K_RCPT = 1 << 9, K_ERROR = 1 << 10
};

#define MESSAGE_KEYS (K_USER | K_CLIENT | K_ARRIVED | K_FROM | K_BODY | K_SIZE | \
	K_ATTEMPTS | K_NEXT | K_WARNED | K_RCPT | K_ERROR)
#define MESSAGE_REQUIRED (K_USER | K_ARRIVED | K_FROM | K_RCPT | K_SIZE)
#define STATE_KEYS (K_ATTEMPTS | K_NEXT | K_WARNED | K_ERROR)

struct parse {
	const char *p, *end;
	unsigned lineno;
	unsigned seen;
	struct spool_env *env;               /* the scratch copy being filled */
	char *err;
	size_t errlen;
};

static int __attribute__((format(printf, 2, 3)))
perr(struct parse *ps, const char *fmt, ...)
{
	char what[160];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	snprintf(ps->err, ps->errlen, "line %u: %s", ps->lineno, what);
	return -1;
}

/* The next line without its LF; -1 when none ends before the buffer does. */
static int
next_line(struct parse *ps, const char **line, size_t *len)
{
	const char *nl = memchr(ps->p, '\n', (size_t)(ps->end - ps->p));

	ps->lineno++;
	if (nl == NULL)
		return perr(ps, "cut short (no line end)");
	*line = ps->p;
	*len = (size_t)(nl - ps->p);
	ps->p = nl + 1;
	return 0;
}

static bool
is_text(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] == 0x7f)
			return false;
	return true;
}

static int
copy_text(struct parse *ps, const char *key, char *dst, size_t dstsize,
    const char *v, size_t n, bool empty_ok)
{
	if ((n == 0 && !empty_ok) || n >= dstsize)
		return perr(ps, "%s: empty or longer than %zu octets", key, dstsize - 1);
	if (!is_text(v, n))
		return perr(ps, "%s: control character", key);
	memcpy(dst, v, n);
	dst[n] = '\0';
	return 0;
}

static int
parse_u64(struct parse *ps, const char *key, const char *v, size_t n, uint64_t max,
    uint64_t *out)
{
	uint64_t x = 0;

	if (n == 0 || n > 20)
		return perr(ps, "%s: not a number", key);
	for (size_t i = 0; i < n; i++) {
		unsigned d = (unsigned char)v[i] - '0';

		if (d > 9)
			return perr(ps, "%s: not a number", key);
		if (x > (max - d) / 10)
			return perr(ps, "%s: too large", key);
		x = x * 10 + d;
	}
	*out = x;
	return 0;
}

static int
parse_time(struct parse *ps, const char *key, const char *v, size_t n, int64_t *out)
{
	uint64_t x;

	if (parse_u64(ps, key, v, n, INT64_MAX, &x) < 0)
		return -1;
	*out = (int64_t)x;
	return 0;
}

/*
 * "<path>" re-validated as the inbound session would: the stored path must
 * be exactly what smtp_parse_command() extracts from "MAIL FROM:<path>" or
 * "RCPT TO:<path>" (no source route to strip, no parameter).
 */
static int
parse_path(struct parse *ps, const char *key, const char *v, size_t n, bool sender,
    char *out)
{
	char line[SMTP_PATH_MAX + 16];
	struct smtp_cmd cmd;
	struct smtp_error e;
	const char *verb = sender ? "MAIL FROM:" : "RCPT TO:";
	size_t inner;

	if (n < 2 || v[0] != '<' || v[n - 1] != '>' || n - 2 > SMTP_PATH_MAX)
		return perr(ps, "%s: expected <address>", key);
	inner = n - 2;
	snprintf(line, sizeof(line), "%s%.*s", verb, (int)n, v);
	if (smtp_parse_command(line, strlen(line), &cmd, &e) != 0 ||
	    cmd.verb != (sender ? SMTP_VERB_MAIL : SMTP_VERB_RCPT) ||
	    strlen(cmd.path) != inner || memcmp(cmd.path, v + 1, inner) != 0)
		return perr(ps, "%s: invalid address", key);
	memcpy(out, cmd.path, inner + 1);
	return 0;
}

static int
hexval(char c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Downstream names may hold anything printable; space, % and controls are %XX. */
static bool
name_needs_escape(unsigned char c)
{
	return c <= 0x20 || c == 0x7f || c == '%';
}

static int
parse_name(struct parse *ps, const char *v, size_t n, char *out)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)v[i];

		if (c == '%') {
			int hi = i + 2 < n ? hexval(v[i + 1]) : -1, lo = hi >= 0 ? hexval(v[i + 2]) : -1;

			if (lo < 0 || (hi == 0 && lo == 0))
				return perr(ps, "error: bad escape in the downstream name");
			c = (unsigned char)(hi << 4 | lo);
			i += 2;
		} else if (name_needs_escape(c)) {
			return perr(ps, "error: unescaped character in the downstream name");
		}
		if (o >= SPOOL_RELAY_MAX)
			return perr(ps, "error: downstream name too long");
		out[o++] = (char)c;
	}
	if (o == 0)
		return perr(ps, "error: empty downstream name");
	out[o] = '\0';
	return 0;
}

static int
parse_error_line(struct parse *ps, const char *v, size_t n)
{
	struct spool_env *env = ps->env;
	const char *sp = memchr(v, ' ', n);
	struct spool_error *e;

	if (sp == NULL)
		return perr(ps, "error: expected a downstream name and a text");
	if (env->n_errors == SPOOL_ERRORS_MAX)
		return perr(ps, "error: more than %d lines", SPOOL_ERRORS_MAX);
	e = &env->errors[env->n_errors];
	if (parse_name(ps, v, (size_t)(sp - v), e->relay) < 0 ||
	    copy_text(ps, "error", e->text, sizeof(e->text), sp + 1,
	        n - (size_t)(sp - v) - 1, true) < 0)
		return -1;
	for (size_t i = 0; i < env->n_errors; i++)
		if (strcmp(env->errors[i].relay, e->relay) == 0)
			return perr(ps, "error: downstream %s listed twice", e->relay);
	env->n_errors++;
	return 0;
}

static int
parse_rcpt(struct parse *ps, const char *v, size_t n)
{
	struct spool_env *env = ps->env;
	char path[SMTP_PATH_MAX + 1];

	if (parse_path(ps, "rcpt", v, n, false, path) < 0)
		return -1;
	if (spool_env_add_rcpt(env, path) < 0)
		return perr(ps, "rcpt: %s", env->n_rcpts >= SPOOL_RCPTS_MAX ?
		    "too many recipients" : "out of memory");
	return 0;
}

static int
parse_body(struct parse *ps, const char *v, size_t n)
{
	if (n == 4 && memcmp(v, "7bit", 4) == 0)
		ps->env->body = SMTP_BODY_7BIT;
	else if (n == 8 && memcmp(v, "8bitmime", 8) == 0)
		ps->env->body = SMTP_BODY_8BITMIME;
	else
		return perr(ps, "body: expected 7bit or 8bitmime");
	return 0;
}

static int
parse_warned(struct parse *ps, const char *v, size_t n)
{
	if (n != 1 || (v[0] != '0' && v[0] != '1'))
		return perr(ps, "warned: expected 0 or 1");
	ps->env->warned = v[0] == '1';
	return 0;
}

struct key_def {
	const char *name;
	enum key_bit bit;
};

static const struct key_def keys[] = {
	{ "user", K_USER }, { "client", K_CLIENT }, { "arrived", K_ARRIVED },
	{ "from", K_FROM }, { "body", K_BODY }, { "size", K_SIZE },
	{ "attempts", K_ATTEMPTS }, { "next", K_NEXT }, { "warned", K_WARNED },
	{ "rcpt", K_RCPT }, { "error", K_ERROR },
};

static int
parse_value(struct parse *ps, enum key_bit bit, const char *v, size_t n)
{
	struct spool_env *env = ps->env;
	uint64_t x;

	switch (bit) {
	case K_USER:
		return copy_text(ps, "user", env->user, sizeof(env->user), v, n, false);
	case K_CLIENT:
		return copy_text(ps, "client", env->client, sizeof(env->client), v, n, true);
	case K_ARRIVED:
		return parse_time(ps, "arrived", v, n, &env->arrived);
	case K_FROM:
		return parse_path(ps, "from", v, n, true, env->from);
	case K_BODY:
		return parse_body(ps, v, n);
	case K_SIZE:
		return parse_u64(ps, "size", v, n, INT64_MAX, &env->size);
	case K_ATTEMPTS:
		if (parse_u64(ps, "attempts", v, n, 1000000, &x) < 0)
			return -1;
		env->attempts = (unsigned)x;
		return 0;
	case K_NEXT:
		return parse_time(ps, "next", v, n, &env->next);
	case K_WARNED:
		return parse_warned(ps, v, n);
	case K_RCPT:
		return parse_rcpt(ps, v, n);
	case K_ERROR:
		return parse_error_line(ps, v, n);
	}
	return perr(ps, "unknown key");
}

static int
parse_line(struct parse *ps, const char *line, size_t len, unsigned allowed)
{
	const char *sp = memchr(line, ' ', len);
	size_t klen = sp != NULL ? (size_t)(sp - line) : len;
	const struct key_def *k = NULL;

	if (sp == NULL)
		return perr(ps, "expected \"key value\"");
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		if (strlen(keys[i].name) == klen && memcmp(keys[i].name, line, klen) == 0)
			k = &keys[i];
	if (k == NULL || !(allowed & k->bit)) {
		/* The key is quoted in logs and on terminals: printable only. */
		char shown[33];
		size_t n = klen < 32 ? klen : 32;

		for (size_t i = 0; i < n; i++)
			shown[i] = line[i] >= 0x20 && line[i] < 0x7f ? line[i] : '?';
		shown[n] = '\0';
		return perr(ps, "unknown key \"%s\"", shown);
	}
	if ((ps->seen & k->bit) && k->bit != K_RCPT && k->bit != K_ERROR)
		return perr(ps, "%s given twice", k->name);
	ps->seen |= k->bit;
	return parse_value(ps, k->bit, sp + 1, len - klen - 1);
}

static int
parse_lines(struct parse *ps, const char *magic, unsigned allowed)
{
	const char *line = NULL;
	size_t len = 0;

	if (next_line(ps, &line, &len) < 0)
		return -1;
	if (len != strlen(magic) || memcmp(line, magic, len) != 0)
		return perr(ps, "not a version %d smtpmux %s file", SPOOL_VERSION,
		    allowed == STATE_KEYS ? "state" : "spool");
	for (;;) {
		if (next_line(ps, &line, &len) < 0)
			return -1;
		if (len == 0)
			return 0;
		if (len > LINE_MAX_LEN)
			return perr(ps, "line too long");
		if (parse_line(ps, line, len, allowed) < 0)
			return -1;
	}
}

static void
parse_init(struct parse *ps, const char *buf, size_t len, struct spool_env *scratch,
    char *err, size_t errlen)
{
	memset(ps, 0, sizeof(*ps));
	ps->p = buf;
	ps->end = buf + (len > SPOOL_HEADER_MAX ? SPOOL_HEADER_MAX : len);
	ps->env = scratch;
	ps->err = err;
	ps->errlen = errlen;
	memset(scratch, 0, sizeof(*scratch));
}

static const char *
missing_key(unsigned seen)
{
	return !(seen & K_USER) ? "user" : !(seen & K_ARRIVED) ? "arrived" :
	    !(seen & K_FROM) ? "from" : !(seen & K_RCPT) ? "rcpt" : "size";
}

int
spool_parse_message(const char *buf, size_t len, struct spool_env *env,
    size_t *header_len, char *err, size_t errlen)
{
	struct spool_env scratch;
	struct parse ps;

	parse_init(&ps, buf, len, &scratch, err, errlen);
	spool_env_clear(env);
	if (parse_lines(&ps, MESSAGE_MAGIC, MESSAGE_KEYS) < 0) {
		spool_env_clear(&scratch);
		return -1;
	}
	if ((ps.seen & MESSAGE_REQUIRED) != MESSAGE_REQUIRED) {
		perr(&ps, "required key missing: %s", missing_key(ps.seen));
		spool_env_clear(&scratch);
		return -1;
	}
	*env = scratch;
	*header_len = (size_t)(ps.p - buf);
	return 0;
}

int
spool_parse_state(const char *buf, size_t len, struct spool_env *env,
    char *err, size_t errlen)
{
	struct spool_env scratch;
	struct parse ps;

	parse_init(&ps, buf, len, &scratch, err, errlen);
	if (parse_lines(&ps, STATE_MAGIC, STATE_KEYS) < 0) {
		spool_env_clear(&scratch);
		return -1;
	}
	env->attempts = scratch.attempts;
	env->next = scratch.next;
	env->warned = scratch.warned;
	memcpy(env->errors, scratch.errors, sizeof(env->errors));
	env->n_errors = scratch.n_errors;
	return 0;
}

/* --- writing */

struct out {
	char *buf;
	size_t len, cap;
	bool failed;
};

static void __attribute__((format(printf, 2, 3)))
out_printf(struct out *o, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (o->failed)
		return;
	for (;;) {
		size_t room = o->cap - o->len;

		va_start(ap, fmt);
		n = vsnprintf(o->buf ? o->buf + o->len : NULL, room, fmt, ap);
		va_end(ap);
		if (n < 0) {
			o->failed = true;
			return;
		}
		if ((size_t)n < room) {
			o->len += (size_t)n;
			return;
		}
		size_t cap = (o->cap ? o->cap * 2 : 1024) + (size_t)n;
		char *grown = realloc(o->buf, cap);

		if (grown == NULL) {
			o->failed = true;
			return;
		}
		o->buf = grown;
		o->cap = cap;
	}
}

static void
out_name(struct out *o, const char *name)
{
	for (const unsigned char *c = (const unsigned char *)name; *c != '\0'; c++) {
		if (name_needs_escape(*c))
			out_printf(o, "%%%02X", *c);
		else
			out_printf(o, "%c", *c);
	}
}

static void
out_state(struct out *o, const struct spool_env *env)
{
	out_printf(o, "attempts %u\n", env->attempts);
	if (env->next > 0)
		out_printf(o, "next %" PRId64 "\n", env->next);
	out_printf(o, "warned %d\n", env->warned ? 1 : 0);
	for (size_t i = 0; i < env->n_errors; i++) {
		out_printf(o, "error ");
		out_name(o, env->errors[i].relay);
		out_printf(o, " %s\n", env->errors[i].text);
	}
}

/* Hands the text over only if it reads back: the formats cannot be broken
 * by a value (a newline in a name, a bad address) written by mistake. */
static int
out_finish(struct out *o, enum file_kind kind, char **out, size_t *outlen)
{
	struct spool_env check;
	char err[160];
	size_t hlen;
	int rc;

	out_printf(o, "\n");
	if (o->failed) {
		free(o->buf);
		return -1;
	}
	memset(&check, 0, sizeof(check));
	rc = kind == KIND_MESSAGE ? spool_parse_message(o->buf, o->len, &check, &hlen, err,
	    sizeof(err)) : spool_parse_state(o->buf, o->len, &check, err, sizeof(err));
	spool_env_clear(&check);
	if (rc < 0) {
		free(o->buf);
		errno = EINVAL;
		return -1;
	}
	*out = o->buf;
	*outlen = o->len;
	return 0;
}

int
spool_format_message(const struct spool_env *env, char **out, size_t *outlen)
{
	struct out o = { NULL, 0, 0, false };

	out_printf(&o, MESSAGE_MAGIC "\nuser %s\n", env->user);
	if (env->client[0] != '\0')
		out_printf(&o, "client %s\n", env->client);
	out_printf(&o, "arrived %" PRId64 "\nfrom <%s>\n", env->arrived, env->from);
	if (env->body != SMTP_BODY_UNSET)
		out_printf(&o, "body %s\n", env->body == SMTP_BODY_8BITMIME ? "8bitmime" : "7bit");
	for (size_t i = 0; i < env->n_rcpts; i++)
		out_printf(&o, "rcpt <%s>\n", env->rcpts[i]);
	out_printf(&o, "size %" PRIu64 "\n", env->size);
	out_state(&o, env);
	return out_finish(&o, KIND_MESSAGE, out, outlen);
}

int
spool_format_state(const struct spool_env *env, char **out, size_t *outlen)
{
	struct out o = { NULL, 0, 0, false };

	out_printf(&o, STATE_MAGIC "\n");
	out_state(&o, env);
	return out_finish(&o, KIND_STATE, out, outlen);
}

/* --- env helpers */

int
spool_env_add_rcpt(struct spool_env *env, const char *path)
{
	char (*grown)[SMTP_PATH_MAX + 1];
	size_t n = env->n_rcpts;

	if (n >= SPOOL_RCPTS_MAX || strlen(path) > SMTP_PATH_MAX)
		return -1;
	/* Doubling: a thousand recipients cost ten reallocations. */
	if ((n & (n - 1)) == 0) {
		grown = realloc(env->rcpts, (n ? n * 2 : 1) * sizeof(*grown));
		if (grown == NULL)
			return -1;
		env->rcpts = grown;
	}
	snprintf(env->rcpts[n], sizeof(env->rcpts[n]), "%s", path);
	env->n_rcpts++;
	return 0;
}

void
spool_env_note_error(struct spool_env *env, const char *relay, const char *text)
{
	struct spool_error e;
	size_t i, n;

	memset(&e, 0, sizeof(e));
	snprintf(e.relay, sizeof(e.relay), "%s", relay != NULL && *relay ? relay : "-");
	snprintf(e.text, sizeof(e.text), "%s", text != NULL ? text : "");
	for (n = 0; e.text[n] != '\0'; n++)
		if ((unsigned char)e.text[n] < 0x20 || (unsigned char)e.text[n] == 0x7f)
			e.text[n] = '?';
	for (i = 0; i < env->n_errors; i++)
		if (strcmp(env->errors[i].relay, e.relay) == 0)
			break;
	if (i == env->n_errors && env->n_errors == SPOOL_ERRORS_MAX)
		i = 0;                           /* the oldest goes */
	if (i < env->n_errors) {
		memmove(&env->errors[i], &env->errors[i + 1],
		    (env->n_errors - i - 1) * sizeof(env->errors[0]));
		env->n_errors--;
	}
	env->errors[env->n_errors++] = e;
}

const struct spool_error *
spool_env_last_error(const struct spool_env *env)
{
	return env->n_errors > 0 ? &env->errors[env->n_errors - 1] : NULL;
}

void
spool_env_clear(struct spool_env *env)
{
	free(env->rcpts);
	memset(env, 0, sizeof(*env));
}

bool
spool_id_valid(const char *s, size_t len)
{
	if (len != SPOOL_ID_LEN)
		return false;
	for (size_t i = 0; i < len; i++)
		if (hexval(s[i]) < 0)
			return false;
	return true;
}

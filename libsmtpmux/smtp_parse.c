/* SPDX-License-Identifier: MIT */
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

#include "smtp_parse.h"

/*
 * Everything a client sends here may end up re-serialised into a command
 * for a downstream server, so the rule is: validate every field against its
 * grammar and never let CR, LF, NUL or another control character through.
 */

/* A cursor over the argument text of one command line. */
struct cursor {
	const char *p;
	const char *end;
};

static const struct {
	const char *name;
	enum smtp_verb verb;
} verbs[] = {
	{ "HELO", SMTP_VERB_HELO }, { "EHLO", SMTP_VERB_EHLO },
	{ "MAIL", SMTP_VERB_MAIL }, { "RCPT", SMTP_VERB_RCPT },
	{ "DATA", SMTP_VERB_DATA }, { "RSET", SMTP_VERB_RSET },
	{ "NOOP", SMTP_VERB_NOOP }, { "QUIT", SMTP_VERB_QUIT },
	{ "HELP", SMTP_VERB_HELP }, { "VRFY", SMTP_VERB_VRFY },
	{ "EXPN", SMTP_VERB_EXPN }, { "AUTH", SMTP_VERB_AUTH },
	{ "STARTTLS", SMTP_VERB_STARTTLS }, { "BDAT", SMTP_VERB_BDAT },
};

static int
fail(struct smtp_error *err, int code, const char *enhanced, const char *text)
{
	err->code = code;
	err->enhanced = enhanced;
	err->text = text;
	return -1;
}

static int
syntax_error(struct smtp_error *err, const char *text)
{
	return fail(err, 501, "5.5.4", text);
}

static bool
is_ctl(unsigned char c)
{
	return c < 0x20 || c == 0x7f;
}

static bool
is_alnum(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	    (c >= '0' && c <= '9');
}

static bool
is_digit(unsigned char c)
{
	return c >= '0' && c <= '9';
}

/* RFC 5322 atext, plus UTF-8 octets (RFC 6531). */
static bool
is_atext(unsigned char c)
{
	return is_alnum(c) || c >= 0x80 || strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

static bool
is_ascii(const char *s)
{
	for (; *s != '\0'; s++)
		if ((unsigned char)*s >= 0x80)
			return false;
	return true;
}

static bool
has_ctl(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (is_ctl((unsigned char)s[i]))
			return true;
	return false;
}

static bool
at_end(const struct cursor *c)
{
	return c->p >= c->end;
}

static void
skip_spaces(struct cursor *c)
{
	while (!at_end(c) && *c->p == ' ')
		c->p++;
}

static bool
skip_prefix(struct cursor *c, const char *prefix)
{
	size_t n = strlen(prefix);

	if ((size_t)(c->end - c->p) < n || strncasecmp(c->p, prefix, n) != 0)
		return false;
	c->p += n;
	return true;
}

/*
 * Domain names: dot-separated labels of letters, digits, '-' and '_' (the
 * latter is common in Windows host names given to EHLO), UTF-8 allowed
 * (RFC 6531 U-labels). No empty labels, so no leading/trailing dot.
 */
static bool
valid_domain_name(const char *s, size_t len)
{
	size_t label = 0;

	if (len == 0 || len > SMTP_DOMAIN_MAX)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '.') {
			if (label == 0)
				return false;
			label = 0;
		} else if (is_alnum(c) || c == '-' || c == '_' || c >= 0x80) {
			if (++label > 63)
				return false;
		} else
			return false;
	}
	return label > 0;
}

/* RFC 5321 4.1.3: [1.2.3.4], [IPv6:...] or [tag:general-content]. */
static bool
valid_address_literal(const char *s, size_t len)
{
	char buf[SMTP_DOMAIN_MAX + 1];
	unsigned char addr[16];
	const char *colon;
	size_t n;

	if (len < 3 || len > SMTP_DOMAIN_MAX || s[0] != '[' || s[len - 1] != ']')
		return false;
	n = len - 2;
	memcpy(buf, s + 1, n);
	buf[n] = '\0';
	if (strlen(buf) != n)
		return false;
	if (n > 5 && strncasecmp(buf, "IPv6:", 5) == 0)
		return inet_pton(AF_INET6, buf + 5, addr) == 1;
	colon = memchr(buf, ':', n);
	if (colon == NULL)
		return inet_pton(AF_INET, buf, addr) == 1;
	/* General-address-literal: Standardized-tag ":" 1*dcontent */
	if (colon == buf || colon == buf + n - 1)
		return false;
	for (const char *t = buf; t < colon; t++)
		if (!is_alnum((unsigned char)*t) && *t != '-')
			return false;
	for (const char *t = colon + 1; *t != '\0'; t++) {
		unsigned char c = (unsigned char)*t;
		if (c < 33 || c > 126 || c == '[' || c == '\\' || c == ']')
			return false;
	}
	return true;
}

static bool
valid_domain(const char *s, size_t len)
{
	if (len > 0 && s[0] == '[')
		return valid_address_literal(s, len);
	return valid_domain_name(s, len);
}

/*
 * Length of a quoted local part starting at s[0] == '"', including both
 * quotes, or 0 when it is malformed (RFC 5321 qtextSMTP / quoted-pairSMTP,
 * plus UTF-8).
 */
static size_t
quoted_len(const char *s, size_t len)
{
	for (size_t i = 1; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '"')
			return i + 1;
		if (is_ctl(c))
			return 0;
		if (c == '\\') {
			if (++i >= len)
				return 0;
			c = (unsigned char)s[i];
			if (is_ctl(c) || c >= 0x80)
				return 0;
		}
	}
	return 0;
}

/*
 * Local part: a quoted string or a run of atext and dots. Consecutive or
 * trailing dots are tolerated (as Postfix does, some providers hand out
 * such addresses); they are harmless for re-serialisation.
 */
static size_t
local_part_len(const char *s, size_t len)
{
	size_t i = 0;

	if (len > 0 && s[0] == '"')
		return quoted_len(s, len);
	while (i < len && (is_atext((unsigned char)s[i]) || s[i] == '.'))
		i++;
	return i;
}

/* local@domain, or "postmaster" alone when allowed (RCPT, RFC 5321 4.5.1). */
static bool
valid_mailbox(const char *s, size_t len, bool allow_postmaster)
{
	size_t local;

	if (allow_postmaster && len == 10 && strncasecmp(s, "postmaster", 10) == 0)
		return true;
	local = local_part_len(s, len);
	if (local == 0 || local >= len || s[local] != '@')
		return false;
	return valid_domain(s + local + 1, len - local - 1);
}

/*
 * Strips an obsolete source route "@a,@b:" (RFC 5321 4.1.2, C.), checking
 * its domains. Returns the offset of the mailbox, or -1.
 */
static long
skip_source_route(const char *s, size_t len)
{
	size_t i = 0;

	if (len == 0 || s[0] != '@')
		return 0;
	for (;;) {
		size_t start = ++i;     /* past the '@' */

		while (i < len && s[i] != ',' && s[i] != ':')
			i++;
		if (i >= len || !valid_domain(s + start, i - start))
			return -1;
		if (s[i] == ':')
			return (long)(i + 1);
		if (++i >= len || s[i] != '@')      /* past the ',' */
			return -1;
	}
}

/*
 * Reads "<path>" at the cursor into out. Returns 0, or -1 for a missing
 * bracket (*bad_addr false) or an invalid address (*bad_addr true).
 */
static int
parse_path(struct cursor *c, char *out, bool allow_postmaster, bool *bad_addr)
{
	const char *start, *q;
	long route;
	size_t len;

	*bad_addr = false;
	if (at_end(c) || *c->p != '<')
		return -1;
	start = q = c->p + 1;
	/* Find the closing '>', which may not be inside a quoted local part. */
	while (q < c->end && *q != '>') {
		if (*q == '"') {
			size_t n = quoted_len(q, (size_t)(c->end - q));
			if (n == 0)
				break;
			q += n;
		} else
			q++;
	}
	if (q >= c->end)
		return -1;              /* no closing bracket: a syntax error */
	if (*q != '>') {
		*bad_addr = true;       /* an unterminated quoted local part */
		return -1;
	}
	len = (size_t)(q - start);
	c->p = q + 1;
	*bad_addr = true;
	if (len > SMTP_PATH_MAX)
		return -1;
	route = skip_source_route(start, len);
	if (route < 0)
		return -1;
	start += route;
	len -= (size_t)route;
	if (len > 0 && !valid_mailbox(start, len, allow_postmaster))
		return -1;
	if (route > 0 && len == 0)
		return -1;
	memcpy(out, start, len);
	out[len] = '\0';
	*bad_addr = false;
	return 0;
}

/*
 * SIZE=digits (RFC 1870 size-value). A number beyond 2^64-1 is valid syntax
 * for a message no server can take: it saturates and is flagged, so the
 * client hears 552 (too big) rather than 501.
 */
static bool
parse_size(const char *v, size_t len, uint64_t *size, bool *overflow)
{
	uint64_t n = 0;

	*overflow = false;
	if (len == 0)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned d;

		if (!is_digit((unsigned char)v[i]))
			return false;
		d = (unsigned)(v[i] - '0');
		if (*overflow || n > (UINT64_MAX - d) / 10) {
			*overflow = true;
			n = UINT64_MAX;
		} else {
			n = n * 10 + d;
		}
	}
	*size = n;
	return true;
}

static bool
is_hex_upper(unsigned char c)
{
	return is_digit(c) || (c >= 'A' && c <= 'F');
}

/* RFC 3461 4: xtext = *( xchar / "+" 2HEXCHAR ); "<>" is also accepted (RFC 4954 5). */
static bool
valid_xtext(const char *v, size_t len)
{
	if (len == 2 && v[0] == '<' && v[1] == '>')
		return true;
	if (len == 0)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)v[i];

		if (c == '+') {
			if (i + 2 >= len ||
			    !is_hex_upper((unsigned char)v[i + 1]) ||
			    !is_hex_upper((unsigned char)v[i + 2]))
				return false;
			i += 2;
		} else if (c < '!' || c > '~' || c == '=')
			return false;
	}
	return true;
}

/* One MAIL FROM parameter "KEYWORD[=value]" (RFC 1870, 6152, 4954). */
static int
parse_mail_param(const char *s, size_t len, struct smtp_cmd *cmd,
    struct smtp_error *err)
{
	const char *eq = memchr(s, '=', len);
	size_t klen = eq ? (size_t)(eq - s) : len;
	const char *v = eq ? eq + 1 : NULL;
	size_t vlen = eq ? len - klen - 1 : 0;

	if (klen == 4 && strncasecmp(s, "SIZE", 4) == 0) {
		if (cmd->has_size || v == NULL ||
		    !parse_size(v, vlen, &cmd->size, &cmd->size_overflow))
			return syntax_error(err, "Bad SIZE parameter");
		cmd->has_size = true;
		return 0;
	}
	if (klen == 4 && strncasecmp(s, "BODY", 4) == 0) {
		if (cmd->body != SMTP_BODY_UNSET || v == NULL)
			return syntax_error(err, "Bad BODY parameter");
		if (vlen == 4 && strncasecmp(v, "7BIT", 4) == 0)
			cmd->body = SMTP_BODY_7BIT;
		else if (vlen == 8 && strncasecmp(v, "8BITMIME", 8) == 0)
			cmd->body = SMTP_BODY_8BITMIME;
		else
			return syntax_error(err, "Bad BODY parameter");
		return 0;
	}
	if (klen == 4 && strncasecmp(s, "AUTH", 4) == 0) {
		if (cmd->has_auth || v == NULL || !valid_xtext(v, vlen))
			return syntax_error(err, "Bad AUTH parameter");
		cmd->has_auth = true;
		return 0;
	}
	return fail(err, 555, "5.5.4", "Unsupported parameter");
}

/* Space-separated parameters after the path; the line has no trailing spaces. */
static int
parse_mail_params(struct cursor *c, struct smtp_cmd *cmd, struct smtp_error *err)
{
	while (!at_end(c)) {
		const char *start;

		if (*c->p != ' ')
			return syntax_error(err, "Syntax: MAIL FROM:<address> [parameters]");
		skip_spaces(c);
		start = c->p;
		while (!at_end(c) && *c->p != ' ')
			c->p++;
		if (has_ctl(start, (size_t)(c->p - start)))
			return syntax_error(err, "Invalid character in parameter");
		if (parse_mail_param(start, (size_t)(c->p - start), cmd, err) < 0)
			return -1;
	}
	return 0;
}

/*
 * "FROM:" or "TO:" then the path. One space after the colon is tolerated,
 * as Postfix does, because some clients send it.
 */
static int
parse_path_arg(struct cursor *c, const char *prefix, struct smtp_cmd *cmd,
    bool is_rcpt, struct smtp_error *err)
{
	const char *usage = is_rcpt ? "Syntax: RCPT TO:<address>" :
	    "Syntax: MAIL FROM:<address>";
	bool bad_addr;

	if (!skip_prefix(c, prefix))
		return syntax_error(err, usage);
	if (!at_end(c) && *c->p == ' ')
		c->p++;
	if (parse_path(c, cmd->path, is_rcpt, &bad_addr) < 0) {
		if (!bad_addr)
			return syntax_error(err, usage);
		return is_rcpt ?
		    fail(err, 501, "5.1.3", "Bad recipient address syntax") :
		    fail(err, 501, "5.1.7", "Bad sender address syntax");
	}
	/* The grammar allows UTF-8 (RFC 6531), but only with SMTPUTF8, which
	 * is not offered: relaying such an address raw would break every
	 * downstream that expects ASCII (RFC 6531 3.5). */
	if (!is_ascii(cmd->path))
		return fail(err, 553, "5.6.7", "Non-ASCII address not permitted without SMTPUTF8");
	return 0;
}

static int
parse_mail(struct cursor *c, struct smtp_cmd *cmd, struct smtp_error *err)
{
	if (parse_path_arg(c, "FROM:", cmd, false, err) < 0)
		return -1;
	return parse_mail_params(c, cmd, err);
}

static int
parse_rcpt(struct cursor *c, struct smtp_cmd *cmd, struct smtp_error *err)
{
	if (parse_path_arg(c, "TO:", cmd, true, err) < 0)
		return -1;
	if (cmd->path[0] == '\0')
		return fail(err, 501, "5.1.3", "Bad recipient address syntax");
	if (at_end(c))
		return 0;
	if (*c->p != ' ')
		return syntax_error(err, "Syntax: RCPT TO:<address>");
	/* No RCPT parameter (NOTIFY, ORCPT ...) is advertised. */
	return fail(err, 555, "5.5.4", "Unsupported parameter");
}

static int
parse_helo(struct cursor *c, struct smtp_cmd *cmd, struct smtp_error *err)
{
	size_t len = (size_t)(c->end - c->p);

	if (len == 0 || !valid_domain(c->p, len))
		return syntax_error(err, "Syntax: EHLO domain-or-address-literal");
	memcpy(cmd->domain, c->p, len);
	cmd->domain[len] = '\0';
	return 0;
}

/* SASL mechanism names: 1-20 of A-Z 0-9 - _ (RFC 4422 3.1). */
static int
parse_auth(struct cursor *c, struct smtp_cmd *cmd, struct smtp_error *err)
{
	size_t n = 0;

	while (!at_end(c) && *c->p != ' ') {
		unsigned char ch = (unsigned char)*c->p++;

		if (!is_alnum(ch) && ch != '-' && ch != '_')
			return syntax_error(err, "Syntax: AUTH mechanism [initial-response]");
		if (n >= sizeof(cmd->mech) - 1)
			return syntax_error(err, "Mechanism name too long");
		cmd->mech[n++] = (char)(ch >= 'a' && ch <= 'z' ? ch - 'a' + 'A' : ch);
	}
	cmd->mech[n] = '\0';
	if (n == 0)
		return syntax_error(err, "Syntax: AUTH mechanism [initial-response]");
	if (at_end(c))
		return 0;
	skip_spaces(c);
	cmd->initial = c->p;
	cmd->initial_len = (size_t)(c->end - c->p);
	for (const char *t = c->p; t < c->end; t++)
		if (*t == ' ' || is_ctl((unsigned char)*t))
			return syntax_error(err, "Syntax: AUTH mechanism [initial-response]");
	/* RFC 4954 4: "=" is an empty initial response. */
	if (cmd->initial_len == 1 && cmd->initial[0] == '=')
		cmd->initial_len = 0;
	return 0;
}

static enum smtp_verb
lookup_verb(const char *s, size_t len)
{
	for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
		if (strlen(verbs[i].name) == len &&
		    strncasecmp(s, verbs[i].name, len) == 0)
			return verbs[i].verb;
	return SMTP_VERB_UNKNOWN;
}

static int
parse_args(struct cursor *c, struct smtp_cmd *cmd, struct smtp_error *err)
{
	bool has_arg = !at_end(c);

	switch (cmd->verb) {
	case SMTP_VERB_HELO:
	case SMTP_VERB_EHLO:
		return parse_helo(c, cmd, err);
	case SMTP_VERB_MAIL:
		return parse_mail(c, cmd, err);
	case SMTP_VERB_RCPT:
		return parse_rcpt(c, cmd, err);
	case SMTP_VERB_AUTH:
		return parse_auth(c, cmd, err);
	case SMTP_VERB_DATA:
	case SMTP_VERB_RSET:
	case SMTP_VERB_QUIT:
	case SMTP_VERB_STARTTLS:
		if (has_arg)
			return syntax_error(err, "Syntax: no arguments allowed");
		return 0;
	case SMTP_VERB_VRFY:
	case SMTP_VERB_EXPN:
	case SMTP_VERB_BDAT:
		if (!has_arg)
			return syntax_error(err, "Syntax: argument required");
		break;
	default:
		break;
	}
	if (has_ctl(c->p, (size_t)(c->end - c->p)))
		return syntax_error(err, "Invalid character in argument");
	if (has_arg) {
		cmd->arg = c->p;
		cmd->arg_len = (size_t)(c->end - c->p);
	}
	return 0;
}

int
smtp_parse_command(const char *line, size_t len, struct smtp_cmd *cmd,
    struct smtp_error *err)
{
	struct cursor c = { line, line + len };
	const char *verb;

	memset(cmd, 0, sizeof(*cmd));
	/* Nothing after a CR, LF or NUL could be trusted: refuse the line. */
	for (size_t i = 0; i < len; i++)
		if (line[i] == '\r' || line[i] == '\n' || line[i] == '\0')
			return fail(err, 500, "5.5.2", "Invalid character in command");
	/* Trailing white space is tolerated (RFC 5321 4.1.1 "be liberal"). */
	while (c.end > c.p && (c.end[-1] == ' ' || c.end[-1] == '\t'))
		c.end--;
	verb = c.p;
	while (!at_end(&c) && *c.p != ' ')
		c.p++;
	cmd->verb = lookup_verb(verb, (size_t)(c.p - verb));
	if (cmd->verb == SMTP_VERB_UNKNOWN)
		return fail(err, 500, "5.5.2", "Command not recognized");
	skip_spaces(&c);
	if (parse_args(&c, cmd, err) < 0) {
		enum smtp_verb v = cmd->verb;

		memset(cmd, 0, sizeof(*cmd));
		cmd->verb = v;
		return -1;
	}
	return 0;
}

size_t
smtp_cmd_line_max(const struct smtp_cmd *cmd)
{
	if (cmd == NULL)
		return SMTP_CMD_LINE_MAX;
	if (cmd->verb == SMTP_VERB_AUTH)
		return SMTP_AUTH_LINE_MAX;
	if (cmd->verb == SMTP_VERB_MAIL && cmd->has_auth)
		return SMTP_MAIL_AUTH_LINE_MAX;
	return SMTP_CMD_LINE_MAX;
}

long
smtp_next_line(const char *buf, size_t len, size_t max, size_t *consumed)
{
	size_t scan = len < max ? len : max;
	const char *lf = memchr(buf, '\n', scan);
	size_t n;

	*consumed = 0;
	if (lf == NULL)
		return len >= max ? -2 : -1;
	n = (size_t)(lf - buf);
	*consumed = n + 1;
	if (n > 0 && buf[n - 1] == '\r')
		n--;
	return (long)n;
}

bool
smtp_mailbox_valid(const char *s, size_t len)
{
	return len <= SMTP_PATH_MAX && valid_mailbox(s, len, false);
}

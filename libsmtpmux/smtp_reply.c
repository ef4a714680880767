/* SPDX-License-Identifier: MIT */
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "smtp_reply.h"

#define REPLY_LINE_MAX 2048              /* without CRLF */
/* A server streaming continuation lines forever is not an SMTP server. */
#define REPLY_TOTAL_MAX 65536

static bool
is_digit(char c)
{
	return c >= '0' && c <= '9';
}

/*
 * Checks the octets of a line's "xyz" / "xyz-" / "xyz " prefix that have
 * arrived, so garbage is refused before a whole line is buffered.
 * first_line points at the first line, whose code all lines must repeat.
 */
static bool
prefix_ok(const char *line, size_t avail, const char *first_line)
{
	static const char lo[] = "200", hi[] = "559";

	for (size_t k = 0; k < avail && k < 4; k++) {
		char c = line[k];

		if (k == 3)
			return c == ' ' || c == '-' || c == '\r' || c == '\n';
		if (c < lo[k] || c > hi[k])
			return false;
		if (first_line != NULL && c != first_line[k])
			return false;
	}
	return true;
}

/*
 * RFC 3463: class "." subject "." detail, class matching the reply code's
 * first digit, followed by a space or the end of the line. Returns the
 * length of the code (without the space), 0 if there is none.
 */
static size_t
enhanced_len(const char *t, size_t len, int code)
{
	size_t i = 0;

	if (len < 5 || t[0] != (char)('0' + code / 100) ||
	    (t[0] != '2' && t[0] != '4' && t[0] != '5') || t[1] != '.')
		return 0;
	i = 2;
	for (int part = 0; part < 2; part++) {
		size_t start = i;

		while (i < len && is_digit(t[i]) && i - start < 3)
			i++;
		if (i == start)
			return 0;
		if (part == 0) {
			if (i >= len || t[i] != '.')
				return 0;
			i++;
		}
	}
	if (i < len && t[i] != ' ')
		return 0;
	return i;
}

/* Appends text to r->text, one space between lines, control and 8-bit octets as '?'. */
static void
append_text(struct smtp_reply *r, const char *t, size_t len)
{
	size_t n = strlen(r->text);

	if (len == 0)
		return;
	if (n > 0 && n < sizeof(r->text) - 1)
		r->text[n++] = ' ';
	for (size_t i = 0; i < len && n < sizeof(r->text) - 1; i++) {
		unsigned char c = (unsigned char)t[i];

		r->text[n++] = c < 0x20 || c >= 0x7f ? '?' : (char)c;
	}
	r->text[n] = '\0';
}

static bool
word_is(const char *w, size_t wlen, const char *name)
{
	return wlen == strlen(name) && strncasecmp(w, name, wlen) == 0;
}

/* SIZE's argument; 0 (no known limit) when absent, garbage or too large. */
static unsigned long
parse_size_limit(const char *s, size_t len)
{
	unsigned long n = 0;

	if (len == 0)
		return 0;
	for (size_t i = 0; i < len; i++) {
		unsigned long d = (unsigned long)(s[i] - '0');

		if (!is_digit(s[i]) || n > (ULONG_MAX - d) / 10)
			return 0;
		n = n * 10 + d;
	}
	return n;
}

/* The mechanism list of "AUTH PLAIN LOGIN XOAUTH2" or the legacy "AUTH=LOGIN". */
static void
parse_auth_mechs(struct smtp_reply *r, const char *s, size_t len)
{
	size_t i = 0;

	while (i < len) {
		size_t start;

		while (i < len && s[i] == ' ')
			i++;
		start = i;
		while (i < len && s[i] != ' ')
			i++;
		if (word_is(s + start, i - start, "PLAIN"))
			r->cap_auth_plain = true;
		else if (word_is(s + start, i - start, "LOGIN"))
			r->cap_auth_login = true;
		else if (word_is(s + start, i - start, "XOAUTH2"))
			r->cap_auth_xoauth2 = true;
		else if (word_is(s + start, i - start, "OAUTHBEARER"))
			r->cap_auth_oauthbearer = true;
	}
}

/* One EHLO keyword line (RFC 5321 4.1.1.1), case-insensitively. */
static void
parse_capability(struct smtp_reply *r, const char *t, size_t len)
{
	size_t k = 0;
	const char *arg;
	size_t arglen;

	while (k < len && t[k] != ' ' && t[k] != '=')
		k++;
	arg = k < len ? t + k + 1 : t + len;
	arglen = k < len ? len - k - 1 : 0;
	if (word_is(t, k, "STARTTLS"))
		r->cap_starttls = true;
	else if (word_is(t, k, "PIPELINING"))
		r->cap_pipelining = true;
	else if (word_is(t, k, "8BITMIME"))
		r->cap_8bitmime = true;
	else if (word_is(t, k, "ENHANCEDSTATUSCODES"))
		r->cap_enhancedstatuscodes = true;
	else if (word_is(t, k, "AUTH"))
		parse_auth_mechs(r, arg, arglen);
	else if (word_is(t, k, "SIZE")) {
		r->cap_size = true;
		r->size_limit = parse_size_limit(arg, arglen);
	}
}

long
smtp_reply_parse(const char *buf, size_t len, bool ehlo, struct smtp_reply *r)
{
	size_t pos = 0;

	memset(r, 0, sizeof(*r));
	for (;;) {
		const char *line = buf + pos, *text, *lf;
		size_t avail = len - pos, scan, n, tlen, skip;
		bool first = pos == 0, last;

		if (!prefix_ok(line, avail, first ? NULL : buf))
			return -1;
		scan = avail < REPLY_LINE_MAX + 2 ? avail : REPLY_LINE_MAX + 2;
		lf = memchr(line, '\n', scan);
		if (lf == NULL)
			return avail >= REPLY_LINE_MAX + 2 ? -1 : 0;
		n = (size_t)(lf - line);
		if (n > 0 && line[n - 1] == '\r')
			n--;
		if (n < 3 || n > REPLY_LINE_MAX ||
		    (n > 3 && line[3] != ' ' && line[3] != '-'))
			return -1;
		if (first)
			r->code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
		last = n == 3 || line[3] == ' ';
		text = line + (n > 3 ? 4 : 3);
		tlen = n > 3 ? n - 4 : 0;
		/* The enhanced code repeats on every line: keep it once. */
		skip = enhanced_len(text, tlen, r->code);
		if (first && skip > 0) {
			size_t k = skip < sizeof(r->enhanced) ? skip : sizeof(r->enhanced) - 1;

			memcpy(r->enhanced, text, k);
			r->enhanced[k] = '\0';
		}
		if (skip > 0) {
			if (skip < tlen)
				skip++;         /* and the space after it */
			text += skip;
			tlen -= skip;
		}
		append_text(r, text, tlen);
		if (ehlo && !first && r->code == 250)
			parse_capability(r, text, tlen);
		pos += (size_t)(lf - line) + 1;
		if (last)
			return (long)pos;
		if (pos > REPLY_TOTAL_MAX)
			return -1;
	}
}

/* Case-insensitive substring search, for short fixed phrases. */
static bool
mentions(const char *text, const char *phrase)
{
	size_t n = strlen(phrase);

	for (const char *p = text; *p != '\0'; p++)
		if (strncasecmp(p, phrase, n) == 0)
			return true;
	return false;
}

/*
 * The rule, in order:
 *  - x.4.5 (RFC 3463 "mail system congestion", used by Gmail for quotas:
 *    550 5.4.5 "Daily user sending limit exceeded"): throttle;
 *  - 421/450/451/452 with 4.7.x (RFC 3463 security/policy: providers'
 *    temporary rate limits) and 454 4.7.0: throttle;
 *  - x.2.2 (the recipient's mailbox is full, "over quota"): the message's
 *    problem, not the provider's: not a throttle;
 *  - any other 4xx/5xx whose text mentions a quota, a rate limit, too many
 *    messages or a sending limit: throttle.
 * Only the text of 4xx/5xx replies is looked at, never a 2xx/3xx.
 */
bool
smtp_reply_is_throttle(const struct smtp_reply *r)
{
	static const char *const phrases[] = {
		"quota", "rate limit", "rate-limit", "ratelimit",
		"too many messages", "sending limit",
	};
	const char *e = r->enhanced;
	bool has_enhanced = e[0] != '\0';

	if (r->code < 400 || r->code > 599)
		return false;
	if (has_enhanced && strncmp(e + 1, ".4.5", 5) == 0)
		return true;
	if (has_enhanced && strncmp(e, "4.7.", 4) == 0 &&
	    (r->code == 421 || r->code == 450 || r->code == 451 || r->code == 452))
		return true;
	if (r->code == 454 && strcmp(e, "4.7.0") == 0)
		return true;
	if (has_enhanced && strncmp(e + 1, ".2.2", 5) == 0)
		return false;
	for (size_t i = 0; i < sizeof(phrases) / sizeof(phrases[0]); i++)
		if (mentions(r->text, phrases[i]))
			return true;
	return false;
}

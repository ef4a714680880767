/* SPDX-License-Identifier: MIT */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "json_object.h"

/*
 * A recursive-descent reader over the bytes, one cursor and no
 * allocation but the scratch for decoded strings. Strict where lenient
 * readers guess: a token response that is not valid JSON is an error
 * worth reporting, not something to half-understand.
 */

struct reader {
	const unsigned char *start, *p, *end;
	char *err;
	size_t errlen;
	bool failed;
};

static int
fail(struct reader *r, const char *what)
{
	if (!r->failed && r->errlen > 0)
		snprintf(r->err, r->errlen, "%s at offset %zu", what, (size_t)(r->p - r->start));
	r->failed = true;
	return -1;
}

static bool
at(const struct reader *r, char c)
{
	return r->p < r->end && *r->p == (unsigned char)c;
}

static void
skip_ws(struct reader *r)
{
	while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
		r->p++;
}

static int
expect(struct reader *r, char c, const char *what)
{
	skip_ws(r);
	if (!at(r, c))
		return fail(r, what);
	r->p++;
	return 0;
}

static bool
is_digit(unsigned char c)
{
	return c >= '0' && c <= '9';
}

/* Length of the well-formed UTF-8 sequence at p (RFC 3629: no overlong
 * forms, no surrogates, nothing above U+10FFFF), or 0. */
static size_t
utf8_len(const unsigned char *p, size_t avail)
{
	unsigned char c = p[0], lo = 0x80, hi = 0xbf;
	size_t n;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		n = 2;
	else if (c >= 0xe0 && c <= 0xef) {
		n = 3;
		lo = c == 0xe0 ? 0xa0 : lo;
		hi = c == 0xed ? 0x9f : hi;
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4;
		lo = c == 0xf0 ? 0x90 : lo;
		hi = c == 0xf4 ? 0x8f : hi;
	} else
		return 0;
	if (avail < n || p[1] < lo || p[1] > hi)
		return 0;
	for (size_t i = 2; i < n; i++)
		if ((p[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

static long
hex4(struct reader *r)
{
	long v = 0;

	if (r->end - r->p < 4)
		return -1;
	for (int i = 0; i < 4; i++) {
		unsigned char c = *r->p++;

		v <<= 4;
		if (is_digit(c))
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			return -1;
	}
	return v;
}

static size_t
put_utf8(char *out, unsigned long cp)
{
	unsigned char b[4];
	size_t n;

	if (cp < 0x80) {
		b[0] = (unsigned char)cp;
		n = 1;
	} else if (cp < 0x800) {
		b[0] = (unsigned char)(0xc0 | cp >> 6);
		b[1] = (unsigned char)(0x80 | (cp & 0x3f));
		n = 2;
	} else if (cp < 0x10000) {
		b[0] = (unsigned char)(0xe0 | cp >> 12);
		b[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3f));
		b[2] = (unsigned char)(0x80 | (cp & 0x3f));
		n = 3;
	} else {
		b[0] = (unsigned char)(0xf0 | cp >> 18);
		b[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3f));
		b[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3f));
		b[3] = (unsigned char)(0x80 | (cp & 0x3f));
		n = 4;
	}
	if (out != NULL)
		memcpy(out, b, n);
	return n;
}

/* After "\u": one code point, a surrogate pair taken together. */
static long
unicode_escape(struct reader *r)
{
	long cp = hex4(r), low;

	if (cp < 0)
		return fail(r, "bad \\u escape");
	if (cp >= 0xdc00 && cp <= 0xdfff)
		return fail(r, "unpaired surrogate");
	if (cp >= 0xd800 && cp <= 0xdbff) {
		if (r->end - r->p < 2 || r->p[0] != '\\' || r->p[1] != 'u')
			return fail(r, "unpaired surrogate");
		r->p += 2;
		low = hex4(r);
		if (low < 0xdc00 || low > 0xdfff)
			return fail(r, "unpaired surrogate");
		cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
	}
	if (cp == 0)
		return fail(r, "NUL in string");
	return cp;
}

static int
simple_escape(unsigned char c)
{
	switch (c) {
	case '"': return '"';
	case '\\': return '\\';
	case '/': return '/';
	case 'b': return '\b';
	case 'f': return '\f';
	case 'n': return '\n';
	case 'r': return '\r';
	case 't': return '\t';
	default: return -1;
	}
}

/*
 * A string at the cursor, decoded into out (NULL: only checked). The
 * decoded form is never longer than the quoted one, so out needs no more
 * than the input's length plus one.
 */
static int
parse_string(struct reader *r, char *out, size_t *outlen)
{
	size_t n = 0, l;
	long cp;
	int c;

	if (!at(r, '"'))
		return fail(r, "expected a string");
	r->p++;
	for (;;) {
		if (r->p == r->end)
			return fail(r, "unterminated string");
		if (*r->p == '"')
			break;
		if (*r->p < 0x20)
			return fail(r, "control character in string");
		if (*r->p == '\\') {
			if (++r->p == r->end)
				return fail(r, "unterminated string");
			if (*r->p == 'u') {
				r->p++;
				if ((cp = unicode_escape(r)) < 0)
					return -1;
				n += put_utf8(out != NULL ? out + n : NULL, (unsigned long)cp);
				continue;
			}
			if ((c = simple_escape(*r->p)) < 0)
				return fail(r, "bad escape");
			if (out != NULL)
				out[n] = (char)c;
			n++;
			r->p++;
			continue;
		}
		if ((l = utf8_len(r->p, (size_t)(r->end - r->p))) == 0)
			return fail(r, "invalid UTF-8");
		if (out != NULL)
			memcpy(out + n, r->p, l);
		n += l;
		r->p += l;
	}
	r->p++;
	if (out != NULL)
		out[n] = '\0';
	if (outlen != NULL)
		*outlen = n;
	return 0;
}

static void
skip_digits(struct reader *r)
{
	while (r->p < r->end && is_digit(*r->p))
		r->p++;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static int
parse_number(struct reader *r)
{
	if (at(r, '-'))
		r->p++;
	if (at(r, '0'))
		r->p++;
	else if (r->p < r->end && is_digit(*r->p))
		skip_digits(r);
	else
		return fail(r, "bad number");
	if (at(r, '.')) {
		r->p++;
		if (r->p == r->end || !is_digit(*r->p))
			return fail(r, "bad number");
		skip_digits(r);
	}
	if (at(r, 'e') || at(r, 'E')) {
		r->p++;
		if (at(r, '+') || at(r, '-'))
			r->p++;
		if (r->p == r->end || !is_digit(*r->p))
			return fail(r, "bad number");
		skip_digits(r);
	}
	return 0;
}

static int
parse_literal(struct reader *r, const char *word)
{
	size_t n = strlen(word);

	if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0)
		return fail(r, "unexpected character");
	r->p += n;
	return 0;
}

static int skip_value(struct reader *r, int depth);

/* The rest of an array or object after its opening bracket. */
static int
skip_container(struct reader *r, int depth, char close)
{
	if (depth >= JSON_MAX_DEPTH)
		return fail(r, "nested too deeply");
	skip_ws(r);
	if (at(r, close)) {
		r->p++;
		return 0;
	}
	for (;;) {
		if (close == '}') {
			skip_ws(r);
			if (parse_string(r, NULL, NULL) < 0 || expect(r, ':', "expected ':'") < 0)
				return -1;
		}
		if (skip_value(r, depth + 1) < 0)
			return -1;
		skip_ws(r);
		if (at(r, ',')) {
			r->p++;
			continue;
		}
		if (at(r, close)) {
			r->p++;
			return 0;
		}
		return fail(r, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
	}
}

static int
skip_value(struct reader *r, int depth)
{
	skip_ws(r);
	if (r->p == r->end)
		return fail(r, "expected a value");
	switch (*r->p) {
	case '"': return parse_string(r, NULL, NULL);
	case '{': r->p++; return skip_container(r, depth, '}');
	case '[': r->p++; return skip_container(r, depth, ']');
	case 't': return parse_literal(r, "true");
	case 'f': return parse_literal(r, "false");
	case 'n': return parse_literal(r, "null");
	default: return parse_number(r);
	}
}

/* One "key": value of the top-level object; strings and numbers go to fn. */
static int
parse_member(struct reader *r, char *key, char *value, json_member_fn fn, void *arg)
{
	struct json_member m = { .key = key, .value = value };
	const unsigned char *num;

	skip_ws(r);
	if (parse_string(r, key, NULL) < 0 || expect(r, ':', "expected ':'") < 0)
		return -1;
	skip_ws(r);
	if (at(r, '"')) {
		m.type = JSON_STRING;
		if (parse_string(r, value, &m.len) < 0)
			return -1;
	} else if (at(r, '-') || (r->p < r->end && is_digit(*r->p))) {
		num = r->p;
		if (parse_number(r) < 0)
			return -1;
		m.type = JSON_NUMBER;
		m.len = (size_t)(r->p - num);
		memcpy(value, num, m.len);
		value[m.len] = '\0';
	} else
		return skip_value(r, 1);
	if (fn(&m, arg) < 0)
		return fail(r, "refused member");
	return 0;
}

static int
parse_object(struct reader *r, char *key, char *value, json_member_fn fn, void *arg)
{
	if (expect(r, '{', "expected an object") < 0)
		return -1;
	skip_ws(r);
	if (at(r, '}'))
		r->p++;
	else {
		for (;;) {
			if (parse_member(r, key, value, fn, arg) < 0)
				return -1;
			skip_ws(r);
			if (at(r, ',')) {
				r->p++;
				continue;
			}
			if (expect(r, '}', "expected ',' or '}'") < 0)
				return -1;
			break;
		}
	}
	skip_ws(r);
	if (r->p != r->end)
		return fail(r, "data after the object");
	return 0;
}

int
json_object_parse(const char *in, size_t len, json_member_fn fn, void *arg,
    char *err, size_t errlen)
{
	struct reader r = {
		.start = (const unsigned char *)in, .p = (const unsigned char *)in,
		.end = (const unsigned char *)in + len, .err = err, .errlen = errlen,
	};
	size_t half = len + 1;
	char *scratch;
	int rc;

	if (errlen > 0)
		err[0] = '\0';
	/* Key and value side by side; tokens pass through here, hence the wipe. */
	if (len > ((size_t)-1) / 2 - 1 || (scratch = malloc(2 * half)) == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	rc = parse_object(&r, scratch, scratch + half, fn, arg);
	auth_wipe(scratch, 2 * half);
	free(scratch);
	return rc;
}

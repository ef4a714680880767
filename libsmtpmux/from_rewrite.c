/* SPDX-License-Identifier: MIT */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "from_rewrite.h"
#include "smtp_parse.h"

/*
 * The header section is read one line at a time by a small state machine
 * that only ever holds back the start of a line (until its field name is
 * known) and a From field (until the next line shows whether it is
 * folded). Everything else is passed on at once; once the header section
 * is over, every chunk is passed on whole.
 */

#define NAME_MAX_LEN 32                  /* longer names are neither From nor Reply-To */
#define REPLY_TO "Reply-To:"

enum fr_state {
	FR_LINE_START,       /* at the start of a header line */
	FR_NAME,             /* reading a field name, held back in name[] */
	FR_PASS,             /* inside a field that passes through */
	FR_FROM,             /* inside a From field, held back in field[] */
	FR_BODY              /* past the header section: everything passes */
};

struct from_rewrite {
	from_rewrite_emit_fn *emit;
	void *arg;
	char addr[SMTP_PATH_MAX + 1];
	enum fr_state state;
	char last;                       /* the last octet emitted */

	char name[NAME_MAX_LEN];
	size_t name_len;
	bool name_wsp;                   /* white space after the name (obsolete syntax) */

	bool from_pending;               /* field[] holds a complete or growing From */
	bool from_overflow;
	char field[FROM_REWRITE_FIELD_MAX];
	size_t field_len, body_off;      /* body_off: just after the colon */

	bool seen_reply_to;
	bool have_original;              /* original[] is the first rewritten From body */
	char original[FROM_REWRITE_FIELD_MAX];
	size_t original_len;

	char out[FROM_REWRITE_FIELD_MAX + SMTP_PATH_MAX + 8];
};

static void
emit(struct from_rewrite *fr, const char *data, size_t len)
{
	if (len == 0)
		return;
	fr->emit(fr->arg, data, len);
	fr->last = data[len - 1];
}

static bool
is_wsp(char c)
{
	return c == ' ' || c == '\t';
}

/* ---- one field body ---- */

struct body_scan {
	long lt, gt;                     /* the first top-level <...> */
	size_t cut;                      /* end of the first mailbox */
	long first, last;                /* outermost non-CFWS octets, for addr-spec */
	bool at, group, broken;
};

/* Comments and quoted strings are skipped with their escapes; what is left
 * at the top level decides where the address is. */
static void
scan_body(const char *b, size_t end, struct body_scan *s)
{
	unsigned depth = 0;
	bool quoted = false, escaped = false, angle = false;

	memset(s, 0, sizeof(*s));
	s->lt = s->gt = s->first = s->last = -1;
	s->cut = end;
	for (size_t i = 0; i < end; i++) {
		char c = b[i];

		if (escaped || quoted) {
			if (escaped)
				escaped = false;
			else if (c == '\\')
				escaped = true;
			else if (c == '"')
				quoted = false;
			if (!angle)
				s->last = (long)i;
			continue;
		}
		if (depth > 0) {
			if (c == '\\')
				escaped = true;
			else if (c == '(')
				depth++;
			else if (c == ')')
				depth--;
			continue;
		}
		if (c == '(') {
			depth = 1;
			continue;
		}
		if (is_wsp(c) || c == '\r' || c == '\n')
			continue;
		if (angle) {
			if (c == '"')
				quoted = true;
			else if (c == '>') {
				s->gt = (long)i;
				angle = false;
			}
			continue;
		}
		if (c == ',') {
			s->cut = i;
			break;
		}
		if (c == '<' && s->lt < 0 && s->gt < 0) {
			s->lt = (long)i;
			angle = true;
			continue;
		}
		if (c == ':' || c == ';')
			s->group = true;
		if (c == '"')
			quoted = true;
		if (c == '@')
			s->at = true;
		if (s->first < 0)
			s->first = (long)i;
		s->last = (long)i;
	}
	s->broken = quoted || escaped || angle || depth > 0;
}

/* Without the white space and line ends before a cut mailbox list. */
static size_t
trim_end(const char *b, size_t from, size_t to)
{
	while (to > from && (is_wsp(b[to - 1]) || b[to - 1] == '\r' || b[to - 1] == '\n'))
		to--;
	return to;
}

static size_t
put(char *out, size_t used, const char *data, size_t len)
{
	memcpy(out + used, data, len);
	return used + len;
}

size_t
from_rewrite_field_body(const char *body, size_t len, const char *addr, char *out,
    size_t outlen)
{
	struct body_scan s;
	size_t end = len, alen = strlen(addr), n = 0, keep_from, keep_to;

	if (outlen < len + alen + 3)
		return 0;
	/* The field's own line end stays where it is. */
	if (end > 0 && body[end - 1] == '\n')
		end--;
	if (end > 0 && body[end - 1] == '\r')
		end--;
	scan_body(body, end, &s);
	if (!s.broken && !s.group && s.lt >= 0 && s.gt > s.lt) {
		/* [display name] <addr> [comment]: only what is inside <> changes */
		n = put(out, n, body, (size_t)s.lt + 1);
		n = put(out, n, addr, alen);
		keep_from = (size_t)s.gt;
	} else if (!s.broken && !s.group && s.lt < 0 && s.first >= 0 && s.at) {
		/* addr-spec [comment] */
		n = put(out, n, body, (size_t)s.first);
		n = put(out, n, addr, alen);
		keep_from = (size_t)s.last + 1;
	} else {
		/* a group, no address at all, or unbalanced: start afresh */
		n = put(out, n, " ", 1);
		n = put(out, n, addr, alen);
		keep_from = s.cut;
	}
	keep_to = s.cut < end ? trim_end(body, keep_from, s.cut) : end;
	if (keep_to > keep_from)
		n = put(out, n, body + keep_from, keep_to - keep_from);
	return put(out, n, body + end, len - end);
}

/* ---- the header section ---- */

static void
remember_original(struct from_rewrite *fr, const char *body, size_t len)
{
	if (fr->have_original)
		return;
	memcpy(fr->original, body, len);
	fr->original_len = len;
	fr->have_original = true;
}

/* Emits the held-back From field, rewritten. */
static void
flush_from(struct from_rewrite *fr)
{
	const char *body = fr->field + fr->body_off;
	size_t blen = fr->field_len - fr->body_off, n;

	if (!fr->from_pending)
		return;
	fr->from_pending = false;
	if (fr->from_overflow) {
		/* Too long to keep: the address alone, and no Reply-To from it. */
		emit(fr, "From: ", 6);
		emit(fr, fr->addr, strlen(fr->addr));
		emit(fr, "\r\n", 2);
		return;
	}
	n = from_rewrite_field_body(body, blen, fr->addr, fr->out, sizeof(fr->out));
	emit(fr, fr->field, fr->body_off);
	emit(fr, fr->out, n);
	if (n != blen || memcmp(fr->out, body, n) != 0)
		remember_original(fr, body, blen);
}

/* The header section is over: the last From, then Reply-To if needed. */
static void
end_of_header(struct from_rewrite *fr)
{
	flush_from(fr);
	if (fr->have_original && !fr->seen_reply_to) {
		if (fr->last != '\n' && fr->last != '\0')
			emit(fr, "\r\n", 2);
		emit(fr, REPLY_TO, sizeof(REPLY_TO) - 1);
		emit(fr, fr->original, fr->original_len);
		if (fr->original_len == 0 || fr->original[fr->original_len - 1] != '\n')
			emit(fr, "\r\n", 2);
	}
	fr->have_original = false;
	fr->state = FR_BODY;
}

static bool
name_is(const struct from_rewrite *fr, const char *want)
{
	size_t len = fr->name_len;

	while (len > 0 && is_wsp(fr->name[len - 1]))
		len--;
	return len == strlen(want) && strncasecmp(fr->name, want, len) == 0;
}

/* The colon: the field is a From (held back) or anything else (passed). */
static void
name_done(struct from_rewrite *fr)
{
	if (name_is(fr, "from")) {
		memcpy(fr->field, fr->name, fr->name_len);
		fr->field[fr->name_len] = ':';
		fr->field_len = fr->body_off = fr->name_len + 1;
		fr->from_pending = true;
		fr->from_overflow = false;
		fr->state = FR_FROM;
		return;
	}
	if (name_is(fr, "reply-to"))
		fr->seen_reply_to = true;
	emit(fr, fr->name, fr->name_len);
	emit(fr, ":", 1);
	fr->state = FR_PASS;
}

static bool
is_ftext(char c)
{
	return (unsigned char)c >= 33 && (unsigned char)c <= 126 && c != ':';
}

/* Returns the octets consumed (0 when only the state changed). */
static size_t
step_line_start(struct from_rewrite *fr, char c)
{
	if (is_wsp(c)) {
		/* A folded line continues the field before it. */
		fr->state = fr->from_pending ? FR_FROM : FR_PASS;
	} else if (c == '\r' || c == '\n') {
		end_of_header(fr);           /* the empty line is the body's first octets */
	} else {
		flush_from(fr);
		fr->name_len = 0;
		fr->name_wsp = false;
		fr->state = FR_NAME;
	}
	return 0;
}

static size_t
step_name(struct from_rewrite *fr, char c)
{
	if (c == ':' && fr->name_len > 0) {
		name_done(fr);
		return 1;
	}
	if ((is_ftext(c) && !fr->name_wsp) || (is_wsp(c) && fr->name_len > 0)) {
		if (fr->name_len == sizeof(fr->name)) {
			/* Neither From nor Reply-To: pass the line on. */
			emit(fr, fr->name, fr->name_len);
			fr->state = FR_PASS;
			return 0;
		}
		fr->name_wsp |= is_wsp(c);
		fr->name[fr->name_len++] = c;
		return 1;
	}
	/* Not a header field: the body starts with this line. */
	end_of_header(fr);
	emit(fr, fr->name, fr->name_len);
	return 0;
}

static void
field_append(struct from_rewrite *fr, const char *in, size_t len)
{
	if (fr->from_overflow)
		return;
	if (len > sizeof(fr->field) - fr->field_len) {
		fr->from_overflow = true;
		return;
	}
	memcpy(fr->field + fr->field_len, in, len);
	fr->field_len += len;
}

/* Up to and including the line end: passed on, or held in field[]. */
static size_t
step_rest_of_line(struct from_rewrite *fr, const char *in, size_t len)
{
	const char *lf = memchr(in, '\n', len);
	size_t n = lf != NULL ? (size_t)(lf - in) + 1 : len;

	if (fr->state == FR_FROM)
		field_append(fr, in, n);
	else
		emit(fr, in, n);
	if (lf != NULL)
		fr->state = FR_LINE_START;
	return n;
}

void
from_rewrite_feed(struct from_rewrite *fr, const char *in, size_t len)
{
	size_t i = 0;

	while (i < len) {
		switch (fr->state) {
		case FR_BODY:
			emit(fr, in + i, len - i);
			return;
		case FR_LINE_START:
			i += step_line_start(fr, in[i]);
			break;
		case FR_NAME:
			i += step_name(fr, in[i]);
			break;
		case FR_PASS:
		case FR_FROM:
			i += step_rest_of_line(fr, in + i, len - i);
			break;
		}
	}
}

void
from_rewrite_finish(struct from_rewrite *fr)
{
	if (fr->state == FR_BODY)
		return;
	if (fr->state == FR_NAME) {
		/* A last line without a colon (or a line end): not a field. */
		end_of_header(fr);
		emit(fr, fr->name, fr->name_len);
		return;
	}
	end_of_header(fr);
}

struct from_rewrite *
from_rewrite_new(const char *addr, from_rewrite_emit_fn *emit_fn, void *arg)
{
	struct from_rewrite *fr;
	size_t alen = strlen(addr);

	if (alen == 0 || alen > SMTP_PATH_MAX || (fr = calloc(1, sizeof(*fr))) == NULL)
		return NULL;
	memcpy(fr->addr, addr, alen + 1);
	fr->emit = emit_fn;
	fr->arg = arg;
	fr->state = FR_LINE_START;
	return fr;
}

void
from_rewrite_free(struct from_rewrite *fr)
{
	free(fr);
}

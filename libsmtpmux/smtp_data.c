/* SPDX-License-Identifier: MIT */
#include <string.h>

#include "smtp_data.h"

/* RFC 5321 4.5.3.1.6: 1000 octets per text line, CRLF included, not
 * counting the leading dot doubled for transparency (4.5.2). */
#define DATA_LINE_MAX 998

/*
 * Reader states. Every state but TEXT holds back at most the octets whose
 * meaning depends on what follows (a leading dot, a CR), which is what
 * makes the reader indifferent to how the input is chunked.
 */
enum {
	RD_LINE_START = 0,               /* after CRLF: "." may end the data */
	RD_SOFT_START,                   /* after a bare CR or LF: "." is stuffing only */
	RD_DOT,                          /* "." at RD_LINE_START, held back */
	RD_DOT_CR,                       /* ".\r" at RD_LINE_START, held back */
	RD_TEXT,                         /* inside a line */
	RD_CR,                           /* a CR inside a line, held back */
	RD_DONE                          /* CRLF "." CRLF consumed */
};

void
smtp_data_reader_init(struct smtp_data_reader *r, uint64_t max_size)
{
	memset(r, 0, sizeof(*r));
	r->state = RD_LINE_START;
	r->max_size = max_size;
}

/* Counts octets of the current line as they are on the wire. */
static void
count_line(struct smtp_data_reader *r, size_t n)
{
	r->line_len += n;
	if (r->line_len > DATA_LINE_MAX)
		r->too_long = true;
}

/*
 * Appends message octets; only the first max_size are stored, whatever the
 * chunking, so the output stays a function of the input alone.
 */
static void
emit(struct smtp_data_reader *r, const char *p, size_t n, struct evbuffer *out)
{
	if (r->max_size == 0 || r->size + n <= r->max_size)
		evbuffer_add(out, p, n);
	else {
		if (r->size < r->max_size)
			evbuffer_add(out, p, (size_t)(r->max_size - r->size));
		r->too_big = true;
	}
	r->size += n;
}

static void
text_byte(struct smtp_data_reader *r, char c, struct evbuffer *out)
{
	if (c == '\r') {
		r->state = RD_CR;
		return;
	}
	if (c == '\n') {
		r->bare_lf = true;
		emit(r, "\n", 1, out);
		r->line_len = 0;
		r->state = RD_SOFT_START;
		return;
	}
	count_line(r, 1);
	emit(r, &c, 1, out);
	r->state = RD_TEXT;
}

static void
soft_start_byte(struct smtp_data_reader *r, char c, struct evbuffer *out)
{
	if (c == '.') {
		r->state = RD_TEXT;     /* the stuffed dot is dropped, and not counted */
		return;
	}
	text_byte(r, c, out);
}

/* A held-back CR turned out not to be followed by LF. */
static void
bare_cr(struct smtp_data_reader *r, char next, struct evbuffer *out)
{
	r->bare_cr = true;
	count_line(r, 1);
	emit(r, "\r", 1, out);
	r->state = RD_SOFT_START;
	soft_start_byte(r, next, out);
}

static void
feed_byte(struct smtp_data_reader *r, char c, struct evbuffer *out)
{
	switch (r->state) {
	case RD_LINE_START:
		/* Stuffing or the terminator: neither counts toward the line. */
		if (c == '.')
			r->state = RD_DOT;
		else
			text_byte(r, c, out);
		break;
	case RD_SOFT_START:
		soft_start_byte(r, c, out);
		break;
	case RD_DOT:
		if (c == '\r')
			r->state = RD_DOT_CR;
		else
			text_byte(r, c, out);   /* the dot was stuffing */
		break;
	case RD_DOT_CR:
		if (c == '\n')
			r->state = RD_DONE;
		else
			bare_cr(r, c, out);
		break;
	case RD_CR:
		if (c == '\n') {
			emit(r, "\r\n", 2, out);
			r->line_len = 0;
			r->state = RD_LINE_START;
		} else
			bare_cr(r, c, out);
		break;
	case RD_TEXT:
	default:
		text_byte(r, c, out);
		break;
	}
}

/* Octets text_run() looks at per memchr() pass: bounded, so that input with
 * one kind of line end but not the other costs linear time, not a scan to
 * the end of the buffer per line. */
#define TEXT_WINDOW 256

/* Length of the run of ordinary octets at the start of p. */
static size_t
text_run(const char *p, size_t len)
{
	size_t n = 0;

	while (n < len) {
		size_t w = len - n < TEXT_WINDOW ? len - n : TEXT_WINDOW;
		const char *cr = memchr(p + n, '\r', w);
		const char *lf = memchr(p + n, '\n', cr != NULL ? (size_t)(cr - (p + n)) : w);

		if (lf != NULL)
			return (size_t)(lf - p);
		if (cr != NULL)
			return (size_t)(cr - p);
		n += w;
	}
	return n;
}

bool
smtp_data_read(struct smtp_data_reader *r, const char *in, size_t len,
    size_t *used, struct evbuffer *out)
{
	size_t i = 0;

	while (i < len && r->state != RD_DONE) {
		/* At a line start anything but a dot is what it is inside a
		 * line (text_byte()): the run below takes it. */
		if ((r->state == RD_LINE_START || r->state == RD_SOFT_START) && in[i] != '.')
			r->state = RD_TEXT;
		if (r->state == RD_TEXT) {
			size_t n = text_run(in + i, len - i);

			if (n > 0) {
				count_line(r, n);
				/* A line's CRLF goes out with its text: one append
				 * per line rather than two (emit() stores the same
				 * octets either way). */
				if (i + n + 1 < len && in[i + n] == '\r' && in[i + n + 1] == '\n') {
					emit(r, in + i, n + 2, out);
					r->line_len = 0;
					r->state = RD_LINE_START;
					i += n + 2;
				} else {
					emit(r, in + i, n, out);
					i += n;
				}
				continue;
			}
		}
		feed_byte(r, in[i++], out);
	}
	*used = i;
	return r->state == RD_DONE;
}

void
smtp_data_writer_init(struct smtp_data_writer *w)
{
	w->at_line_start = true;
	w->last_cr = false;
	w->empty = true;
	w->ends_crlf = false;
}

/* True when the dot at p (inside in[0..]) begins a line. */
static bool
dot_at_line_start(const struct smtp_data_writer *w, const char *in, const char *p)
{
	return p == in ? w->at_line_start : p[-1] == '\r' || p[-1] == '\n';
}

void
smtp_data_write(struct smtp_data_writer *w, const char *in, size_t len,
    struct evbuffer *out)
{
	const char *end = in + len, *start = in, *p = in;
	char last;

	if (len == 0)
		return;
	/* Only dots need looking at: memchr() skips the rest of the chunk. */
	while ((p = memchr(p, '.', (size_t)(end - p))) != NULL) {
		if (dot_at_line_start(w, in, p)) {
			evbuffer_add(out, start, (size_t)(p - start));
			evbuffer_add(out, ".", 1);
			start = p;
		}
		p++;
	}
	evbuffer_add(out, start, (size_t)(end - start));
	last = end[-1];
	w->ends_crlf = last == '\n' && (len >= 2 ? end[-2] == '\r' : w->last_cr);
	w->last_cr = last == '\r';
	w->at_line_start = last == '\r' || last == '\n';
	w->empty = false;
}

void
smtp_data_writer_finish(struct smtp_data_writer *w, struct evbuffer *out)
{
	/* An empty message needs no CRLF: the one ending "DATA" serves. */
	if (!w->empty && !w->ends_crlf)
		evbuffer_add(out, "\r\n", 2);
	evbuffer_add(out, ".\r\n", 3);
}

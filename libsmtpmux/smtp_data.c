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

/* Length of the run of ordinary octets at the start of p. */
static size_t
text_run(const char *p, size_t len)
{
	size_t n = 0;

	while (n < len && p[n] != '\r' && p[n] != '\n')
		n++;
	return n;
}

bool
smtp_data_read(struct smtp_data_reader *r, const char *in, size_t len,
    size_t *used, struct evbuffer *out)
{
	size_t i = 0;

	while (i < len && r->state != RD_DONE) {
		if (r->state == RD_TEXT) {
			size_t n = text_run(in + i, len - i);

			if (n > 0) {
				count_line(r, n);
				emit(r, in + i, n, out);
				i += n;
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

void
smtp_data_write(struct smtp_data_writer *w, const char *in, size_t len,
    struct evbuffer *out)
{
	size_t start = 0;

	for (size_t i = 0; i < len; i++) {
		char c = in[i];

		if (c == '.' && w->at_line_start) {
			evbuffer_add(out, in + start, i - start);
			evbuffer_add(out, ".", 1);
			start = i;
		}
		w->ends_crlf = c == '\n' && w->last_cr;
		w->last_cr = c == '\r';
		w->at_line_start = c == '\r' || c == '\n';
	}
	evbuffer_add(out, in + start, len - start);
	if (len > 0)
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

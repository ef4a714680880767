/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SMTP_DATA_H
#define SMTPMUX_SMTP_DATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/buffer.h>

/*
 * DATA stream handling, both directions, as resumable state machines over
 * buffers (any chunking of the input gives the same result).
 *
 * Reading (inbound): only CR LF "." CR LF ends the message. A bare LF or a
 * bare CR anywhere in the message is recorded (bare_lf / bare_cr) and the
 * session rejects such a message with 550 5.5.2 after the real end of data,
 * so "\n.\n", "\r.\r", "\n.\r\n" and "\r\n.\n" can never split one message
 * into two transactions downstream (SMTP smuggling). Dot-unstuffing removes
 * the leading dot of lines that start with one. Lines longer than 998
 * octets plus CRLF, not counting that leading dot, set too_long (550 5.5.2 / RFC 5321 4.5.3.1.6); octets
 * beyond max_size set too_big (552 5.3.4), and stop being stored.
 */

/*
 * Zero-initialised or smtp_data_reader_init()ed; state is private.
 * Dot-unstuffing applies after CRLF and, to mirror the writer, after a bare
 * CR or LF too (such messages are rejected anyway).
 */
struct smtp_data_reader {
	int state;
	size_t line_len;
	uint64_t size;                   /* unstuffed octets seen so far */
	uint64_t max_size;               /* 0: unlimited */
	bool bare_lf, bare_cr, too_long, too_big;
};

void smtp_data_reader_init(struct smtp_data_reader *r, uint64_t max_size);

/*
 * Consumes bytes of the DATA stream from in[0..len). Appends unstuffed
 * message octets (CRLF line ends kept) to out, unless too_big. Returns true
 * when the terminating CRLF.CRLF has been consumed; *used says how many
 * input bytes were consumed (bytes after the terminator are the next
 * pipelined command and are left alone).
 */
bool smtp_data_read(struct smtp_data_reader *r, const char *in, size_t len,
    size_t *used, struct evbuffer *out);

/*
 * Writing (outbound): dot-stuffs a message for the DATA phase. Call with
 * successive chunks; then smtp_data_writer_finish() appends the end (a
 * CRLF first if the message does not end with one, then ".\r\n").
 * A dot is stuffed after any CR or LF, not only after CRLF, so that even a
 * body with bare line ends cannot form "\n.\n" for a lenient downstream;
 * the reader above removes exactly those dots again, so writer then reader
 * gives back the original bytes (plus CRLF if the body did not end so).
 */
struct smtp_data_writer {
	bool at_line_start;              /* start, or the last octet was CR or LF */
	bool last_cr;                    /* the last octet was CR */
	bool empty;                      /* nothing written yet */
	bool ends_crlf;                  /* the last two octets were CR LF */
};

void smtp_data_writer_init(struct smtp_data_writer *w);
void smtp_data_write(struct smtp_data_writer *w, const char *in, size_t len,
    struct evbuffer *out);
void smtp_data_writer_finish(struct smtp_data_writer *w, struct evbuffer *out);

#endif

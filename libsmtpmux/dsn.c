/* SPDX-License-Identifier: MIT */
#include <ctype.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "dsn.h"
#include "maildate.h"

/*
 * Everything that comes from outside (the downstream's reply, the
 * addresses) is written through one_line(): printable ASCII only and
 * bounded, so the report's structure cannot be broken by a value. The
 * original headers are copied as they are (they were accepted by the DATA
 * reader: CRLF lines of at most 1000 octets) inside their own MIME part,
 * whose boundary is checked not to occur in them.
 */

#define FIELD_MAX 900                    /* well within the 998-octet line limit */

struct sink {
	struct evbuffer *out;
	int failed;
};

static void __attribute__((format(printf, 2, 3)))
put(struct sink *s, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	if (evbuffer_add_vprintf(s->out, fmt, ap) < 0)
		s->failed = 1;
	va_end(ap);
}

/* A copy of src fit for one header or report line. */
static const char *
one_line(char *dst, size_t size, const char *src)
{
	size_t i = 0;

	for (; src != NULL && src[i] != '\0' && i + 1 < size; i++) {
		unsigned char c = (unsigned char)src[i];

		dst[i] = c < 0x20 || c >= 0x7f ? '?' : (char)c;
	}
	dst[i] = '\0';
	return dst;
}

static bool
status_valid(const char *s, char cls)
{
	int n = 0, dots = 0;

	if (s == NULL || s[0] != cls || s[1] != '.')
		return false;
	for (s += 2; *s != '\0'; s++) {
		if (*s == '.') {
			if (n == 0 || ++dots > 1)
				return false;
			n = 0;
		} else if (isdigit((unsigned char)*s) && n < 3) {
			n++;
		} else {
			return false;
		}
	}
	return dots == 1 && n > 0;
}

static const char *
status_of(const struct dsn_report *r)
{
	if (r->action == DSN_DELAYED)
		return status_valid(r->status, '4') ? r->status : "4.0.0";
	return status_valid(r->status, '5') || status_valid(r->status, '4') ? r->status : "5.0.0";
}

static bool
has_smtp_code(const char *d)
{
	return d != NULL && d[0] >= '2' && d[0] <= '5' && isdigit((unsigned char)d[1]) &&
	    isdigit((unsigned char)d[2]) && (d[3] == ' ' || d[3] == '\0');
}

static void
boundary_pick(const struct dsn_report *r, char *b, size_t len)
{
	char id[32];

	one_line(id, sizeof(id), r->queue_id);
	for (unsigned n = 0; ; n++) {
		snprintf(b, len, "=_smtpmux_%s_%lld_%u", id, (long long)r->now, n);
		if (r->headers == NULL || r->headers_len == 0 ||
		    memmem(r->headers, r->headers_len, b, strlen(b)) == NULL)
			return;
	}
}

static void
put_top(struct sink *s, const struct dsn_report *r, const char *boundary)
{
	char host[256], to[320], date[64];

	one_line(host, sizeof(host), r->hostname);
	put(s, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n", host);
	put(s, "To: <%s>\r\n", one_line(to, sizeof(to), r->sender));
	put(s, "Subject: %s\r\n", r->action == DSN_FAILED ?
	    "Undelivered Mail Returned to Sender" : "Delayed Mail (still being retried)");
	put(s, "Date: %s\r\n", maildate_format(r->now, date, sizeof(date)));
	put(s, "Message-ID: <%s.%lld.dsn@%s>\r\n", boundary + 10, (long long)r->now, host);
	put(s, "Auto-Submitted: auto-replied\r\n");
	put(s, "MIME-Version: 1.0\r\n");
	put(s, "Content-Type: multipart/report; report-type=delivery-status;\r\n"
	    "\tboundary=\"%s\"\r\n\r\n", boundary);
	put(s, "This is a MIME-encapsulated message.\r\n\r\n");
}

static void
put_notice(struct sink *s, const struct dsn_report *r, const char *boundary)
{
	char host[256], reason[FIELD_MAX], rcpt[320], date[64];

	put(s, "--%s\r\nContent-Description: Notification\r\n"
	    "Content-Type: text/plain; charset=us-ascii\r\n\r\n", boundary);
	put(s, "This is the mail system at host %s (smtpmux).\r\n\r\n",
	    one_line(host, sizeof(host), r->hostname));
	if (r->action == DSN_FAILED)
		put(s, "Your message could not be delivered to the recipients below and\r\n"
		    "has been given up. It was received on %s.\r\n\r\n",
		    maildate_format(r->arrived, date, sizeof(date)));
	else
		put(s, "Your message has not been delivered to the recipients below yet.\r\n"
		    "It will be tried again until %s;\r\nyou need not send it again.\r\n\r\n",
		    maildate_format(r->retry_until, date, sizeof(date)));
	one_line(reason, sizeof(reason), r->reason != NULL ? r->reason : "");
	for (size_t i = 0; i < r->n_rcpts; i++)
		put(s, "<%s>: %s\r\n", one_line(rcpt, sizeof(rcpt), r->rcpts[i]), reason);
	put(s, "\r\n");
}

static void
put_report(struct sink *s, const struct dsn_report *r, const char *boundary)
{
	char host[256], id[64], rcpt[320], diag[FIELD_MAX], date[64];
	const char *status = status_of(r);

	put(s, "--%s\r\nContent-Description: Delivery report\r\n"
	    "Content-Type: message/delivery-status\r\n\r\n", boundary);
	put(s, "Reporting-MTA: dns; %s\r\n", one_line(host, sizeof(host), r->hostname));
	put(s, "X-Smtpmux-Queue-ID: %s\r\n", one_line(id, sizeof(id), r->queue_id));
	put(s, "Arrival-Date: %s\r\n", maildate_format(r->arrived, date, sizeof(date)));
	one_line(diag, sizeof(diag), r->diagnostic);
	for (size_t i = 0; i < r->n_rcpts; i++) {
		put(s, "\r\nFinal-Recipient: rfc822; %s\r\n",
		    one_line(rcpt, sizeof(rcpt), r->rcpts[i]));
		put(s, "Action: %s\r\nStatus: %s\r\n",
		    r->action == DSN_FAILED ? "failed" : "delayed", status);
		if (diag[0] != '\0')
			put(s, "Diagnostic-Code: %s; %s\r\n",
			    has_smtp_code(diag) ? "smtp" : "X-Smtpmux", diag);
		put(s, "Last-Attempt-Date: %s\r\n",
		    maildate_format(r->last_attempt, date, sizeof(date)));
		if (r->action == DSN_DELAYED)
			put(s, "Will-Retry-Until: %s\r\n",
			    maildate_format(r->retry_until, date, sizeof(date)));
	}
	put(s, "\r\n");
}

static bool
any_eightbit(const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)p[i] >= 0x80)
			return true;
	return false;
}

static void
put_headers(struct sink *s, const struct dsn_report *r, const char *boundary, bool eightbit)
{
	put(s, "--%s\r\nContent-Description: Undelivered Message Headers\r\n"
	    "Content-Type: text/rfc822-headers\r\n%s\r\n", boundary,
	    eightbit ? "Content-Transfer-Encoding: 8bit\r\n" : "");
	if (r->headers != NULL && r->headers_len > 0 &&
	    evbuffer_add(s->out, r->headers, r->headers_len) < 0)
		s->failed = 1;
	if (r->headers_len < 2 || memcmp(r->headers + r->headers_len - 2, "\r\n", 2) != 0)
		put(s, "\r\n");
	put(s, "\r\n--%s--\r\n", boundary);
}

int
dsn_build(const struct dsn_report *r, struct evbuffer *out, bool *eightbit)
{
	struct sink s = { out, 0 };
	char boundary[96];

	*eightbit = r->headers != NULL && any_eightbit(r->headers, r->headers_len);
	boundary_pick(r, boundary, sizeof(boundary));
	put_top(&s, r, boundary);
	put_notice(&s, r, boundary);
	put_report(&s, r, boundary);
	put_headers(&s, r, boundary, *eightbit);
	return s.failed ? -1 : 0;
}

size_t
dsn_header_block(const char *body, size_t len, size_t max)
{
	size_t limit = len < max ? len : max, last = 0;

	for (size_t i = 0; i + 1 < limit; i++) {
		if (body[i] != '\r' || body[i + 1] != '\n')
			continue;
		if (i == last)                   /* an empty line: the end of the headers */
			return i + 2;
		last = i + 2;
	}
	return last;
}

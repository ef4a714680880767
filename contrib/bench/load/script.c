/* SPDX-License-Identifier: MIT */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "auth.h"
#include "script.h"

/* Body lines: 76 octets and CRLF, as mail clients wrap them. */
#define SCRIPT_LINE 78

static int script_printf(struct script_text *, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int
script_printf(struct script_text *t, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vasprintf(&t->p, fmt, ap);
	va_end(ap);
	if (n < 0) {
		t->p = NULL;
		return -1;
	}
	t->len = (size_t)n;
	return 0;
}

static int
script_header(char *buf, size_t buflen, const struct load_opts *o, size_t pad)
{
	return snprintf(buf, buflen, "From: <%s>\r\nTo: <%s>\r\nSubject: smtp-load%s%.*s\r\n\r\n",
	    o->from, o->to, pad > 0 ? " " : "", (int)(pad > 0 ? pad - 1 : 0),
	    "................................................................................");
}

size_t
script_header_len(const struct load_opts *o)
{
	return (size_t)script_header(NULL, 0, o, 0);
}

/*
 * Exactly o->size octets: the header, whose Subject is padded so that the
 * rest is a whole number of 78-octet lines of 'x' (no line starts with a
 * dot, so nothing needs stuffing), then the final dot.
 */
static int
script_message(struct script_text *m, const struct load_opts *o, char *err, size_t errlen)
{
	size_t hlen = script_header_len(o), rest, pad, lines;
	char *p;

	if (o->size < hlen) {
		snprintf(err, errlen, "--size: at least %zu octets (the generated header)", hlen);
		return -1;
	}
	rest = (size_t)o->size - hlen;
	pad = rest % SCRIPT_LINE;
	lines = rest / SCRIPT_LINE;
	m->len = (size_t)o->size + 3;
	m->p = malloc(m->len + 1);
	if (m->p == NULL) {
		snprintf(err, errlen, "--size: cannot allocate %zu octets", m->len);
		return -1;
	}
	p = m->p + script_header(m->p, m->len + 1, o, pad);
	for (size_t i = 0; i < lines; i++, p += SCRIPT_LINE) {
		memset(p, 'x', SCRIPT_LINE - 2);
		memcpy(p + SCRIPT_LINE - 2, "\r\n", 2);
	}
	memcpy(p, ".\r\n", 3);
	return 0;
}

static int
script_auth(struct load_script *s, const struct load_opts *o)
{
	char b64[1024];
	struct evbuffer *buf;
	int rc = -1;

	if (o->auth == OPTS_AUTH_LOGIN) {
		if (auth_b64_encode(o->user, strlen(o->user), b64, sizeof(b64)) < 0 ||
		    script_printf(&s->login_user, "%s\r\n", b64) < 0 ||
		    auth_b64_encode(o->password, strlen(o->password), b64, sizeof(b64)) < 0 ||
		    script_printf(&s->login_pass, "%s\r\n", b64) < 0)
			return -1;
		return script_printf(&s->auth, "AUTH LOGIN\r\n");
	}
	if (o->auth != OPTS_AUTH_PLAIN)
		return 0;
	buf = evbuffer_new();
	if (buf == NULL)
		return -1;
	if (auth_plain_encode(o->user, o->password, buf) == 0) {
		s->auth.len = evbuffer_get_length(buf);
		s->auth.p = malloc(s->auth.len);
		if (s->auth.p != NULL && evbuffer_remove(buf, s->auth.p, s->auth.len) == (int)s->auth.len)
			rc = 0;
	}
	evbuffer_free(buf);
	return rc;
}

static int
script_rcpts(struct load_script *s, const struct load_opts *o)
{
	struct evbuffer *buf = evbuffer_new();
	int rc = -1;

	s->n_rcpts = o->rcpts;
	s->rcpt_end = calloc(o->rcpts, sizeof(*s->rcpt_end));
	if (buf == NULL || s->rcpt_end == NULL)
		goto out;
	for (unsigned i = 0; i < o->rcpts; i++) {
		/* As smtp-source does: 1ADDR, 2ADDR... when there are several. */
		if ((o->rcpts == 1 ? evbuffer_add_printf(buf, "RCPT TO:<%s>\r\n", o->to) :
		    evbuffer_add_printf(buf, "RCPT TO:<%u%s>\r\n", i + 1, o->to)) < 0)
			goto out;
		s->rcpt_end[i] = evbuffer_get_length(buf);
	}
	s->rcpts.len = evbuffer_get_length(buf);
	s->rcpts.p = malloc(s->rcpts.len);
	if (s->rcpts.p != NULL && evbuffer_remove(buf, s->rcpts.p, s->rcpts.len) == (int)s->rcpts.len)
		rc = 0;
out:
	if (buf != NULL)
		evbuffer_free(buf);
	return rc;
}

int
script_build(struct load_script *s, const struct load_opts *o, char *err, size_t errlen)
{
	memset(s, 0, sizeof(*s));
	if (script_message(&s->message, o, err, errlen) < 0)
		return -1;
	s->message_size = (size_t)o->size;
	if (script_printf(&s->ehlo, "EHLO %s\r\n", o->helo) < 0 ||
	    script_printf(&s->mail, "MAIL FROM:<%s>\r\n", o->from) < 0 ||
	    script_rcpts(s, o) < 0) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	if (script_auth(s, o) < 0) {
		snprintf(err, errlen, "--user/--password: each at most %d octets, neither empty",
		    AUTH_FIELD_MAX);
		goto fail;
	}
	return 0;
fail:
	script_free(s);
	return -1;
}

static void
script_text_free(struct script_text *t, bool secret)
{
	if (t->p != NULL && secret)
		auth_wipe(t->p, t->len);
	free(t->p);
	t->p = NULL;
	t->len = 0;
}

void
script_free(struct load_script *s)
{
	script_text_free(&s->ehlo, false);
	script_text_free(&s->auth, true);
	script_text_free(&s->login_user, true);
	script_text_free(&s->login_pass, true);
	script_text_free(&s->mail, false);
	script_text_free(&s->rcpts, false);
	script_text_free(&s->message, false);
	free(s->rcpt_end);
	s->rcpt_end = NULL;
}

/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <string.h>

#include "client.h"
#include "smtp_reply.h"

enum expect {
	EXP_GREETING, EXP_EHLO, EXP_STARTTLS, EXP_AUTH, EXP_AUTH_USER, EXP_AUTH_PASS,
	EXP_MAIL, EXP_RCPT, EXP_DATA, EXP_DOT, EXP_RSET, EXP_QUIT
};

static const char *const stage_names[] = {
	[EXP_GREETING] = "greeting", [EXP_EHLO] = "ehlo", [EXP_STARTTLS] = "starttls",
	[EXP_AUTH] = "auth", [EXP_AUTH_USER] = "auth", [EXP_AUTH_PASS] = "auth",
	[EXP_MAIL] = "mail", [EXP_RCPT] = "rcpt", [EXP_DATA] = "data", [EXP_DOT] = "dot",
	[EXP_RSET] = "rset", [EXP_QUIT] = "quit",
};

static const char CMD_STARTTLS[] = "STARTTLS\r\n";
static const char CMD_DATA[] = "DATA\r\n";
static const char CMD_DOT[] = ".\r\n";
static const char CMD_RSET[] = "RSET\r\n";
static const char CMD_QUIT[] = "QUIT\r\n";

/* Notes a reply to wait for, in order (expect[] is sized for the worst case). */
static void
client_await(struct client *cl, enum expect kind)
{
	unsigned slot = (cl->exp_head + cl->exp_n) % CLIENT_EXPECT_MAX;

	cl->expect[slot].kind = (uint8_t)kind;
	cl->expect[slot].msg = (uint8_t)cl->cur;
	cl->exp_n++;
}

/* Queues a command and its reply (outq is sized for the most queued at once). */
static void
client_send(struct client *cl, const void *p, size_t len, enum expect kind)
{
	(void)outq_add(cl->out, p, len);
	client_await(cl, kind);
}

#define SEND_CONST(cl, cmd, kind) client_send((cl), (cmd), sizeof(cmd) - 1, (kind))

static void
client_send_rcpt(struct client *cl, unsigned i)
{
	const struct load_script *s = cl->cfg->script;
	size_t start = i == 0 ? 0 : s->rcpt_end[i - 1];

	client_send(cl, s->rcpts.p + start, s->rcpt_end[i] - start, EXP_RCPT);
}

void
client_start(struct client *cl, const struct client_cfg *cfg, const struct client_hooks *hooks,
    void *arg, struct outq *out)
{
	memset(cl, 0, sizeof(*cl));
	cl->cfg = cfg;
	cl->hooks = hooks;
	cl->arg = arg;
	cl->out = out;
	cl->claimed = 1;
	cl->expect[0].kind = EXP_GREETING;
	cl->exp_n = 1;
}

static void
client_message_done(struct client *cl, struct client_msg *m, bool ok, uint64_t now)
{
	cl->claimed--;
	cl->hooks->message(cl->arg, ok && !m->failed, now - m->mail_ns);
}

/* MAIL (and with pipelining the RCPTs and DATA) of a claimed message. */
static void
client_begin_message(struct client *cl, uint64_t now)
{
	const struct load_script *s = cl->cfg->script;
	struct client_msg *m;

	cl->cur ^= 1;
	m = &cl->msgs[cl->cur];
	memset(m, 0, sizeof(*m));
	m->mail_ns = now;
	cl->started++;
	client_send(cl, s->mail.p, s->mail.len, EXP_MAIL);
	if (!cl->pipelined)
		return;
	(void)outq_add(cl->out, s->rcpts.p, s->rcpts.len);
	for (unsigned i = 0; i < s->n_rcpts; i++)
		client_await(cl, EXP_RCPT);
	SEND_CONST(cl, CMD_DATA, EXP_DATA);
}

/*
 * After a message: the next one (after RSET when its transaction may
 * still be open) or QUIT. Without pipelining the next MAIL waits for the
 * reply to RSET.
 */
static void
client_next(struct client *cl, bool rset, uint64_t now)
{
	unsigned limit = cl->cfg->per_session;

	if ((limit != 0 && cl->started >= limit) || !cl->hooks->claim(cl->arg)) {
		SEND_CONST(cl, CMD_QUIT, EXP_QUIT);
		return;
	}
	cl->claimed++;
	if (rset)
		SEND_CONST(cl, CMD_RSET, EXP_RSET);
	if (!rset || cl->pipelined)
		client_begin_message(cl, now);
}

/* Counts a negative reply; the sample text keeps its enhanced code. */
static void
client_reply_error(struct client *cl, const struct smtp_reply *r, enum expect stage)
{
	char text[SMTP_REPLY_TEXT_MAX + 20];

	snprintf(text, sizeof(text), "%s%s%s", r->enhanced, r->enhanced[0] != '\0' ? " " : "", r->text);
	cl->hooks->reply_error(cl->arg, r->code, stage_names[stage], text);
}

/* A session-level refusal: count it, then QUIT (421: the server is closing). */
static enum client_step
client_session_refused(struct client *cl, const struct smtp_reply *r, enum expect stage)
{
	cl->failed = true;
	client_reply_error(cl, r, stage);
	if (r->code == 421)
		return CLIENT_CLOSE;
	SEND_CONST(cl, CMD_QUIT, EXP_QUIT);
	return CLIENT_WAIT;
}

static enum client_step
client_after_ehlo(struct client *cl, const struct smtp_reply *r, uint64_t now)
{
	const struct load_script *s = cl->cfg->script;

	if (cl->cfg->starttls && !cl->tls_done) {
		if (!r->cap_starttls) {
			cl->failed = true;
			cl->hooks->fault(cl->arg, FAULT_NO_STARTTLS, "the server does not offer STARTTLS");
			SEND_CONST(cl, CMD_QUIT, EXP_QUIT);
			return CLIENT_WAIT;
		}
		SEND_CONST(cl, CMD_STARTTLS, EXP_STARTTLS);
		return CLIENT_WAIT;
	}
	cl->pipelined = cl->cfg->pipelining && r->cap_pipelining;
	if (s->auth.len > 0)
		client_send(cl, s->auth.p, s->auth.len, EXP_AUTH);
	else
		client_begin_message(cl, now);
	return CLIENT_WAIT;
}

/*
 * Replies to the session's set-up: greeting, EHLO, STARTTLS, AUTH. Any
 * 2xx will do where 220, 250 or 235 is the rule: smtp-sink, the usual
 * baseline, answers AUTH with 250.
 */
static enum client_step
client_setup_reply(struct client *cl, enum expect kind, const struct smtp_reply *r, uint64_t now)
{
	const struct load_script *s = cl->cfg->script;
	bool ok = r->code / 100 == 2;

	if (r->code == 334 && (kind == EXP_AUTH || kind == EXP_AUTH_USER) && s->login_user.len > 0) {
		if (kind == EXP_AUTH)
			client_send(cl, s->login_user.p, s->login_user.len, EXP_AUTH_USER);
		else
			client_send(cl, s->login_pass.p, s->login_pass.len, EXP_AUTH_PASS);
		return CLIENT_WAIT;
	}
	if (!ok || kind == EXP_AUTH_USER)
		return client_session_refused(cl, r, kind);
	switch (kind) {
	case EXP_GREETING:
		client_send(cl, s->ehlo.p, s->ehlo.len, EXP_EHLO);
		return CLIENT_WAIT;
	case EXP_EHLO:
		return client_after_ehlo(cl, r, now);
	case EXP_STARTTLS:
		return CLIENT_START_TLS;
	default:                        /* AUTH accepted */
		client_begin_message(cl, now);
		return CLIENT_WAIT;
	}
}

/* 354: the message (or, with no recipient left, an empty one) and its dot. */
static void
client_send_message(struct client *cl, struct client_msg *m, uint64_t now)
{
	const struct load_script *s = cl->cfg->script;

	if (m->failed || m->rcpt_ok == 0) {
		m->failed = true;
		SEND_CONST(cl, CMD_DOT, EXP_DOT);
	} else {
		client_send(cl, s->message.p, s->message.len, EXP_DOT);
	}
	/* The dot ends the transaction whatever its reply: no RSET needed. */
	if (cl->pipelined)
		client_next(cl, false, now);
}

/* Without pipelining: the next RCPT, DATA, or give up on the message. */
static void
client_after_rcpt(struct client *cl, struct client_msg *m, uint64_t now)
{
	if (++m->next_rcpt < cl->cfg->script->n_rcpts) {
		client_send_rcpt(cl, m->next_rcpt);
	} else if (m->rcpt_ok > 0) {
		SEND_CONST(cl, CMD_DATA, EXP_DATA);
	} else {
		client_message_done(cl, m, false, now);
		client_next(cl, true, now);
	}
}

/* Replies inside a mail transaction, and to RSET and QUIT. */
static enum client_step
client_mail_reply(struct client *cl, enum expect kind, unsigned idx, const struct smtp_reply *r,
    uint64_t now)
{
	struct client_msg *m = &cl->msgs[idx];
	bool ok = kind == EXP_DATA ? r->code == 354 : r->code / 100 == 2;

	if (!ok && kind != EXP_QUIT)
		client_reply_error(cl, r, kind);
	if (r->code == 421)
		return CLIENT_CLOSE;
	switch (kind) {
	case EXP_MAIL:
		if (!ok)
			m->failed = true;
		if (cl->pipelined)
			break;
		if (ok) {
			client_send_rcpt(cl, 0);
		} else {
			client_message_done(cl, m, false, now);
			client_next(cl, true, now);
		}
		break;
	case EXP_RCPT:
		if (ok)
			m->rcpt_ok++;
		if (!cl->pipelined)
			client_after_rcpt(cl, m, now);
		break;
	case EXP_DATA:
		if (ok) {
			client_send_message(cl, m, now);
		} else {
			client_message_done(cl, m, false, now);
			client_next(cl, true, now);
		}
		break;
	case EXP_DOT:
		client_message_done(cl, m, ok, now);
		if (!cl->pipelined)
			client_next(cl, false, now);
		break;
	case EXP_RSET:
		if (!cl->pipelined)
			client_begin_message(cl, now);
		break;
	case EXP_QUIT:
		cl->quit_answered = true;
		return CLIENT_CLOSE;
	default:
		break;
	}
	return CLIENT_WAIT;
}

static enum client_step
client_reply(struct client *cl, const struct smtp_reply *r, uint64_t now)
{
	enum expect kind = (enum expect)cl->expect[cl->exp_head].kind;
	unsigned idx = cl->expect[cl->exp_head].msg;

	cl->exp_head = (cl->exp_head + 1) % CLIENT_EXPECT_MAX;
	cl->exp_n--;
	if (kind <= EXP_AUTH_PASS)
		return client_setup_reply(cl, kind, r, now);
	return client_mail_reply(cl, kind, idx, r, now);
}

static enum client_step
client_protocol_error(struct client *cl, const char *buf, size_t len, const char *why)
{
	char detail[128];
	size_t n = len < 40 ? len : 40;

	snprintf(detail, sizeof(detail), "%s: \"", why);
	for (size_t i = 0, o = strlen(detail); i < n && o < sizeof(detail) - 2; i++, o++) {
		unsigned char c = (unsigned char)buf[i];

		detail[o] = c < 0x20 || c >= 0x7f ? '?' : (char)c;
		detail[o + 1] = '\0';
	}
	strncat(detail, "\"", sizeof(detail) - strlen(detail) - 1);
	cl->failed = true;
	cl->hooks->fault(cl->arg, FAULT_PROTOCOL, detail);
	return CLIENT_CLOSE;
}

enum client_step
client_input(struct client *cl, const char *buf, size_t len, uint64_t now, size_t *used)
{
	struct smtp_reply r;
	size_t pos = 0;

	while (pos < len) {
		enum client_step step;
		bool ehlo = cl->exp_n > 0 && cl->expect[cl->exp_head].kind == EXP_EHLO;
		long n = smtp_reply_parse(buf + pos, len - pos, ehlo, &r);

		if (n == 0)
			break;
		*used = len;
		if (n < 0)
			return client_protocol_error(cl, buf + pos, len - pos, "not an SMTP reply");
		if (cl->exp_n == 0)
			return client_protocol_error(cl, buf + pos, len - pos, "a reply to nothing");
		pos += (size_t)n;
		step = client_reply(cl, &r, now);
		if (step != CLIENT_WAIT) {
			*used = pos;
			return step;
		}
	}
	*used = pos;
	return CLIENT_WAIT;
}

void
client_tls_ready(struct client *cl)
{
	const struct load_script *s = cl->cfg->script;

	cl->tls_done = true;
	client_send(cl, s->ehlo.p, s->ehlo.len, EXP_EHLO);
}

bool
client_end(struct client *cl)
{
	while (cl->claimed > 0) {
		cl->claimed--;
		cl->hooks->message(cl->arg, false, 0);
	}
	return cl->quit_answered && !cl->failed;
}

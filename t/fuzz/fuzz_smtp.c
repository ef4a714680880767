/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target for the I/O-free parsers. Every input goes through all
 * of them; besides crashes and sanitizer reports, it aborts when one of the
 * parsers' promises is broken:
 *  - no parsed command field holds a control character;
 *  - the DATA reader gives the same result however the input is chunked;
 *  - DATA writer then reader gives the body back;
 *  - a reply's length is within the input and its text is printable;
 *  - a DATA deadline never passes its cap nor shrinks, an AUTH delay
 *    never passes 32 times its base;
 *  - the From rewriter gives the same output however the message is
 *    chunked, never changes what follows the first empty line, and passes
 *    a message without "From" through unchanged;
 *  - a parsed network contains its own address; sender patterns that pass
 *    the check can be matched;
 *  - a token response yields a bearer token or a printable reason, never
 *    both, and the JSON reader hands out NUL-free strings and valid numbers.
 *  - a spool header or state file that parses is written back by the
 *    formatter as one that parses to the same fields.
 * See README in this folder.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include <event2/buffer.h>

#include "auth.h"
#include "from_rewrite.h"
#include "netmask.h"
#include "sender_match.h"
#include "json_object.h"
#include "sasl_oauth.h"
#include "smtp_data.h"
#include "smtp_limits.h"
#include "smtp_parse.h"
#include "smtp_reply.h"
#include "token_response.h"
#include "spool_format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define require(cond) do { if (!(cond)) abort(); } while (0)

static void
require_clean(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		require((unsigned char)s[i] >= 0x20 && (unsigned char)s[i] != 0x7f);
}

static void
check_command(const char *line, size_t len)
{
	struct smtp_cmd cmd;
	struct smtp_error err;

	if (smtp_parse_command(line, len, &cmd, &err) != 0) {
		require(err.code >= 500 && err.code <= 555 && err.enhanced && err.text);
		return;
	}
	require(strlen(cmd.path) <= SMTP_PATH_MAX);
	require(smtp_cmd_line_max(&cmd) >= SMTP_CMD_LINE_MAX);
	require_clean(cmd.path, strlen(cmd.path));
	require_clean(cmd.domain, strlen(cmd.domain));
	require_clean(cmd.mech, strlen(cmd.mech));
	if (cmd.arg != NULL)
		require_clean(cmd.arg, cmd.arg_len);
	if (cmd.initial != NULL)
		require_clean(cmd.initial, cmd.initial_len);
}

static void
fuzz_commands(const char *in, size_t len)
{
	size_t consumed;
	long n;

	check_command(in, len);
	while ((n = smtp_next_line(in, len, SMTP_AUTH_LINE_MAX, &consumed)) >= 0) {
		require(consumed > (size_t)n && consumed <= len);
		check_command(in, (size_t)n);
		in += consumed;
		len -= consumed;
	}
}

struct data_run {
	bool done;
	size_t used;
	struct evbuffer *out;
	struct smtp_data_reader r;
};

/* chunk 0: all at once; otherwise sizes taken from the input itself. */
static void
read_data(const char *in, size_t len, size_t chunk, uint64_t max, struct data_run *run)
{
	size_t pos = 0, k = 0;

	run->out = evbuffer_new();
	require(run->out != NULL);
	run->done = false;
	smtp_data_reader_init(&run->r, max);
	while (pos < len && !run->done) {
		size_t n = chunk == 0 ? len - pos : 1 + (unsigned char)in[k++ % len] % chunk;
		size_t used;

		if (n > len - pos)
			n = len - pos;
		run->done = smtp_data_read(&run->r, in + pos, n, &used, run->out);
		require(used <= n && (run->done || used == n));
		pos += used;
	}
	run->used = pos;
}

static void
require_same(struct data_run *a, struct data_run *b)
{
	size_t n = evbuffer_get_length(a->out);

	require(a->done == b->done && a->used == b->used);
	require(a->r.bare_lf == b->r.bare_lf && a->r.bare_cr == b->r.bare_cr);
	require(a->r.too_long == b->r.too_long && a->r.too_big == b->r.too_big);
	require(a->r.size == b->r.size);
	require(n == evbuffer_get_length(b->out));
	require(n == 0 || memcmp(evbuffer_pullup(a->out, -1),
	    evbuffer_pullup(b->out, -1), n) == 0);
}

static void
fuzz_data(const char *in, size_t len)
{
	struct data_run one, other;
	uint64_t max = len > 0 ? (unsigned char)in[0] : 0;

	read_data(in, len, 0, max, &one);
	for (size_t chunk = 1; chunk <= 7; chunk += 3) {
		read_data(in, len, chunk, max, &other);
		require_same(&one, &other);
		evbuffer_free(other.out);
	}
	evbuffer_free(one.out);
}

static void
fuzz_round_trip(const char *in, size_t len)
{
	struct smtp_data_writer w;
	struct evbuffer *wire = evbuffer_new();
	struct data_run back;
	size_t wire_len, want = len;

	require(wire != NULL);
	smtp_data_writer_init(&w);
	smtp_data_write(&w, in, len / 2, wire);
	smtp_data_write(&w, in + len / 2, len - len / 2, wire);
	smtp_data_writer_finish(&w, wire);
	wire_len = evbuffer_get_length(wire);
	read_data((const char *)evbuffer_pullup(wire, -1), wire_len, 0, 0, &back);
	require(back.done && back.used == wire_len);
	if (len > 0 && (len < 2 || memcmp(in + len - 2, "\r\n", 2) != 0))
		want += 2;
	require(evbuffer_get_length(back.out) == want);
	require(len == 0 || memcmp(evbuffer_pullup(back.out, -1), in, len) == 0);
	evbuffer_free(back.out);
	evbuffer_free(wire);
}

static void
fuzz_reply(const char *in, size_t len, bool ehlo)
{
	struct smtp_reply r;
	long n = smtp_reply_parse(in, len, ehlo, &r);

	require(n >= -1 && n <= (long)len);
	if (n <= 0)
		return;
	require(r.code >= 200 && r.code <= 559);
	require(strlen(r.text) < sizeof(r.text));
	for (const char *t = r.text; *t != '\0'; t++)
		require((unsigned char)*t >= 0x20 && (unsigned char)*t < 0x7f);
	(void)smtp_reply_is_throttle(&r);
}

static void
fuzz_auth(const char *in, size_t len)
{
	struct auth_plain p;
	char login[AUTH_FIELD_MAX + 1];

	if (auth_plain_decode(in, len, &p) == AUTH_OK) {
		require(p.authcid[0] != '\0' && p.passwd[0] != '\0');
		require(auth_password_equal(p.passwd, p.passwd));
	}
	if (auth_login_decode(in, len, login, sizeof(login)) == AUTH_OK)
		require(login[0] != '\0' && strlen(login) <= AUTH_FIELD_MAX);
}

static uint64_t
take_u64(const uint8_t **p, size_t *left)
{
	uint64_t v = 0;

	for (int i = 0; i < 8 && *left > 0; i++, (*p)++, (*left)--)
		v = v << 8 | **p;
	return v;
}

static void
fuzz_limits(const uint8_t *p, size_t left)
{
	uint64_t remaining = take_u64(&p, &left), octets = take_u64(&p, &left);
	uint64_t cap = take_u64(&p, &left) >> 1;
	unsigned rate = (unsigned)take_u64(&p, &left), base = (unsigned)take_u64(&p, &left);
	unsigned failures = (unsigned)take_u64(&p, &left);
	uint64_t deadline = smtp_data_deadline_ms(remaining, octets, rate, cap);

	require(deadline <= cap);
	require(deadline >= (remaining < cap ? remaining : cap));
	require(smtp_auth_delay_ms(failures, base) <= (uint64_t)base * 1000 * 32);
}

static void
collect(void *arg, const char *data, size_t len)
{
	require(len > 0);
	require(evbuffer_add(arg, data, len) == 0);
}

/* chunk 0: all at once; otherwise sizes taken from the input itself. */
static struct evbuffer *
rewrite(const char *in, size_t len, size_t chunk)
{
	struct evbuffer *out = evbuffer_new();
	struct from_rewrite *fr;
	size_t pos = 0, k = 0;

	require(out != NULL);
	fr = from_rewrite_new("new@fuzz.example", collect, out);
	require(fr != NULL);
	while (pos < len) {
		size_t n = chunk == 0 ? len - pos : 1 + (unsigned char)in[k++ % len] % chunk;

		if (n > len - pos)
			n = len - pos;
		from_rewrite_feed(fr, in + pos, n);
		pos += n;
	}
	from_rewrite_finish(fr);
	from_rewrite_free(fr);
	return out;
}

static bool
has_from(const char *in, size_t len)
{
	for (size_t i = 0; i + 4 <= len; i++)
		if (strncasecmp(in + i, "from", 4) == 0)
			return true;
	return false;
}

static void
fuzz_from_rewrite(const char *in, size_t len)
{
	struct evbuffer *one = rewrite(in, len, 0);
	size_t n = evbuffer_get_length(one);
	const char *out = (const char *)evbuffer_pullup(one, -1);
	const char *blank = len >= 4 ? memmem(in, len, "\r\n\r\n", 4) : NULL;

	for (size_t chunk = 1; chunk <= 13; chunk += 6) {
		struct evbuffer *other = rewrite(in, len, chunk);

		require(evbuffer_get_length(other) == n);
		require(n == 0 || memcmp(evbuffer_pullup(other, -1), out, n) == 0);
		evbuffer_free(other);
	}
	if (!has_from(in, len))
		require(n == len && (n == 0 || memcmp(out, in, n) == 0));
	if (blank != NULL) {
		size_t tail = len - (size_t)(blank + 4 - in);

		require(n >= tail && memcmp(out + n - tail, blank + 4, tail) == 0);
	}
	evbuffer_free(one);
}

static void
fuzz_policy(const char *in, size_t len)
{
	char text[300], why[200];
	struct netmask net, host;

	if (len >= sizeof(text) || memchr(in, '\0', len) != NULL)
		return;
	memcpy(text, in, len);
	text[len] = '\0';
	if (netmask_parse(text, &net, why, sizeof(why)) == 0) {
		require(net.prefix <= (net.family == AF_INET ? 32u : 128u));
		host = net;
		host.prefix = net.family == AF_INET ? 32 : 128;
		require(netmask_contains(&net, &host));
		require(netmask_best(&net, 1, &host) == 0);
	}
	if (netmask_parse_addr(text, &host) == 0)
		require(host.prefix == 32 || host.prefix == 128);
	if (sender_pattern_check(text, why, sizeof(why)) == 0)
		(void)sender_pattern_match(text, "a@example.org");
	(void)sender_pattern_match("*@*.example.org", text);
}

static int
check_member(const struct json_member *m, void *arg)
{
	(void)arg;
	require(strlen(m->key) <= 4096 && strlen(m->value) == m->len);
	if (m->type == JSON_NUMBER)
		require(m->len > 0 && strspn(m->value, "0123456789+-.eE") == m->len);
	return 0;
}

static void
require_token_result(int rc, const struct token_response *tr, const char *why)
{
	if (rc == 0) {
		require(token_is_b64token(tr->access_token, strlen(tr->access_token)));
		require(strlen(tr->access_token) <= TOKEN_MAX);
		require_clean(tr->refresh_token, strlen(tr->refresh_token));
		return;
	}
	require(tr->access_token[0] == '\0' && tr->refresh_token[0] == '\0');
	require(why[0] != '\0');
	require_clean(why, strlen(why));
}

static void
fuzz_oauth(const char *in, size_t len)
{
	static struct token_response tr;
	char why[256], err[96], summary[160];

	(void)json_object_parse(in, len, check_member, NULL, err, sizeof(err));
	require_token_result(token_response_parse(200, in, len, &tr, why, sizeof(why)), &tr, why);
	require(token_response_parse(400, in, len, &tr, why, sizeof(why)) == -1);
	require_token_result(-1, &tr, why);
	require_token_result(token_output_parse(in, len, &tr, why, sizeof(why)), &tr, why);
	if (sasl_oauth_error_decode(in, len, summary, sizeof(summary)) == 0)
		require_clean(summary, strlen(summary));
}

static void
require_same_env(const struct spool_env *a, const struct spool_env *b)
{
	require(strcmp(a->user, b->user) == 0 && strcmp(a->client, b->client) == 0);
	require(a->arrived == b->arrived && strcmp(a->from, b->from) == 0);
	require(a->body == b->body && a->size == b->size && a->n_rcpts == b->n_rcpts);
	for (size_t i = 0; i < a->n_rcpts; i++)
		require(strcmp(a->rcpts[i], b->rcpts[i]) == 0);
	require(a->attempts == b->attempts && a->next == b->next && a->warned == b->warned);
	require(a->n_errors == b->n_errors);
	for (size_t i = 0; i < a->n_errors; i++)
		require(strcmp(a->errors[i].relay, b->errors[i].relay) == 0 &&
		    strcmp(a->errors[i].text, b->errors[i].text) == 0);
}

static void
fuzz_spool(const char *in, size_t len)
{
	struct spool_env env, back;
	char err[160], *text;
	size_t hlen, tlen;

	memset(&env, 0, sizeof(env));
	memset(&back, 0, sizeof(back));
	if (spool_parse_message(in, len, &env, &hlen, err, sizeof(err)) == 0) {
		require(hlen <= len && hlen >= 2 && in[hlen - 1] == '\n' && env.n_rcpts > 0);
		require(spool_format_message(&env, &text, &tlen) == 0);
		require(spool_parse_message(text, tlen, &back, &hlen, err, sizeof(err)) == 0);
		require(hlen == tlen);
		require_same_env(&env, &back);
		free(text);
		spool_env_clear(&back);
	}
	if (spool_parse_state(in, len, &env, err, sizeof(err)) == 0) {
		require(spool_format_state(&env, &text, &tlen) == 0);
		back = env;
		back.rcpts = NULL;
		back.n_rcpts = 0;
		require(spool_parse_state(text, tlen, &back, err, sizeof(err)) == 0);
		back.rcpts = env.rcpts;
		back.n_rcpts = env.n_rcpts;
		require_same_env(&env, &back);
		free(text);
	}
	spool_env_clear(&env);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *in = (const char *)data;

	fuzz_commands(in, size);
	fuzz_data(in, size);
	fuzz_round_trip(in, size);
	fuzz_reply(in, size, false);
	fuzz_reply(in, size, true);
	fuzz_auth(in, size);
	fuzz_limits(data, size);
	fuzz_from_rewrite(in, size);
	fuzz_policy(in, size);
	fuzz_oauth(in, size);
	fuzz_spool(in, size);
	return 0;
}

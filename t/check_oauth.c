/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of the OAuth pieces that need no network: the XOAUTH2 and
 * OAUTHBEARER encodings (against the published examples), the JSON reader
 * and the token-response parser, token_command splitting, secret files,
 * and the shared token table (sequence lock, refusals, status segment).
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "argv_split.h"
#include "auth.h"
#include "config.h"
#include "json_object.h"
#include "sasl_oauth.h"
#include "secret_file.h"
#include "token_response.h"
#include "token_table.h"

static char *
drain(struct evbuffer *b)
{
	static char text[16384];
	size_t n = evbuffer_get_length(b);

	ck_assert_uint_lt(n, sizeof(text));
	evbuffer_remove(b, text, n);
	text[n] = '\0';
	return text;
}

/* ---- SASL ---- */

START_TEST(xoauth2_google_example)
{
	/* developers.google.com/gmail/imap/xoauth2-protocol */
	static const char token[] = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg";
	struct evbuffer *b = evbuffer_new();

	ck_assert_int_eq(sasl_oauth_encode(SASL_XOAUTH2, "someuser@example.com", NULL, NULL,
	    token, strlen(token), b), 0);
	ck_assert_str_eq(drain(b), "AUTH XOAUTH2 dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJl"
	    "YXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==\r\n");
	evbuffer_free(b);
}
END_TEST

START_TEST(oauthbearer_rfc7628_example)
{
	/* RFC 7628 4.1 */
	static const char token[] = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==";
	struct evbuffer *b = evbuffer_new();

	ck_assert_int_eq(sasl_oauth_encode(SASL_OAUTHBEARER, "user@example.com",
	    "server.example.com", "143", token, strlen(token), b), 0);
	ck_assert_str_eq(drain(b), "AUTH OAUTHBEARER bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2Vy"
	    "dmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhi"
	    "SFJoZG1semRHRXVZMjl0Q2c9PQEB\r\n");
	evbuffer_free(b);
}
END_TEST

/* What the server decodes, to check the escaping of the gs2 header. */
static char *
decoded_initial_response(const char *line)
{
	static char raw[16384];
	const char *b64 = strrchr(line, ' ') + 1;

	ck_assert_int_eq(auth_b64_decode_text(b64, strcspn(b64, "\r"), raw, sizeof(raw)), 0);
	return raw;
}

START_TEST(oauthbearer_escapes_saslname)
{
	struct evbuffer *b = evbuffer_new();

	ck_assert_int_eq(sasl_oauth_encode(SASL_OAUTHBEARER, "a=b,c@example.com",
	    "smtp.example.com", "587", "tok", 3, b), 0);
	ck_assert_str_eq(decoded_initial_response(drain(b)), "n,a=a=3Db=2Cc@example.com,"
	    "\001host=smtp.example.com\001port=587\001auth=Bearer tok\001\001");
	evbuffer_free(b);
}
END_TEST

START_TEST(sasl_refuses_what_it_cannot_carry)
{
	struct evbuffer *b = evbuffer_new();
	static char big[TOKEN_MAX + 2];

	ck_assert_int_eq(sasl_oauth_encode(SASL_XOAUTH2, "me\001auth=Bearer x", NULL, NULL,
	    "tok", 3, b), -1);
	ck_assert_int_eq(sasl_oauth_encode(SASL_XOAUTH2, "me", NULL, NULL, "to k", 4, b), -1);
	ck_assert_int_eq(sasl_oauth_encode(SASL_XOAUTH2, "me", NULL, NULL, "tok\001", 4, b), -1);
	ck_assert_int_eq(sasl_oauth_encode(SASL_XOAUTH2, "", NULL, NULL, "tok", 3, b), -1);
	ck_assert_int_eq(sasl_oauth_encode(SASL_OAUTHBEARER, "me", "host\r\n", "25", "t", 1, b), -1);
	ck_assert_int_eq(sasl_oauth_encode(SASL_OAUTHBEARER, "me", NULL, "25", "t", 1, b), -1);
	memset(big, 'a', sizeof(big) - 1);
	ck_assert_int_eq(sasl_oauth_encode(SASL_XOAUTH2, "me", NULL, NULL, big, TOKEN_MAX + 1,
	    b), -1);
	ck_assert_uint_eq(evbuffer_get_length(b), 0);
	/* The largest token still fits RFC 4954's 12288-octet AUTH line. */
	ck_assert_int_eq(sasl_oauth_encode(SASL_OAUTHBEARER, "me@example.com",
	    "smtp.example.com", "587", big, TOKEN_MAX, b), 0);
	ck_assert_uint_le(evbuffer_get_length(b), 12288);
	evbuffer_free(b);
}
END_TEST

START_TEST(sasl_abort_lines)
{
	ck_assert_str_eq(sasl_oauth_abort_line(SASL_XOAUTH2), "");
	ck_assert_str_eq(sasl_oauth_abort_line(SASL_OAUTHBEARER), "AQ==");
	ck_assert_str_eq(sasl_oauth_name(SASL_XOAUTH2), "XOAUTH2");
	ck_assert_str_eq(sasl_oauth_name(SASL_OAUTHBEARER), "OAUTHBEARER");
}
END_TEST

static int
error_decode(const char *b64, char *out, size_t outlen)
{
	return sasl_oauth_error_decode(b64, strlen(b64), out, outlen);
}

START_TEST(sasl_error_continuation)
{
	char out[128];

	/* RFC 7628 4.3 */
	ck_assert_int_eq(error_decode("eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGF"
	    "tcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZpZ3VyYXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxs"
	    "LWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0=", out, sizeof(out)), 0);
	ck_assert_str_eq(out, "status=invalid_token scope=example_scope");
	/* Gmail's XOAUTH2 refusal */
	ck_assert_int_eq(error_decode("eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2N"
	    "vcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==", out, sizeof(out)), 0);
	ck_assert_str_eq(out, "status=401 schemes=Bearer scope=https://mail.google.com/");
	ck_assert_int_eq(error_decode("e30=", out, sizeof(out)), 0);   /* {} */
	ck_assert_str_eq(out, "(no status)");
	ck_assert_int_eq(error_decode("not base64!", out, sizeof(out)), -1);
	ck_assert_int_eq(error_decode("bm90IGpzb24=", out, sizeof(out)), -1);
	ck_assert_int_eq(error_decode("", out, sizeof(out)), -1);
}
END_TEST

/* ---- JSON ---- */

struct seen {
	char text[1024];
};

static int
record(const struct json_member *m, void *arg)
{
	struct seen *s = arg;
	size_t used = strlen(s->text);

	snprintf(s->text + used, sizeof(s->text) - used, "%s%s=%s%s", used ? "|" : "", m->key,
	    m->type == JSON_NUMBER ? "#" : "", m->value);
	ck_assert_uint_eq(strlen(m->value), m->len);
	return 0;
}

static const char *
parse_ok(const char *json)
{
	static struct seen s;
	char err[96];

	memset(&s, 0, sizeof(s));
	ck_assert_msg(json_object_parse(json, strlen(json), record, &s, err, sizeof(err)) == 0,
	    "%s: %s", json, err);
	return s.text;
}

START_TEST(json_accepts)
{
	ck_assert_str_eq(parse_ok("{}"), "");
	ck_assert_str_eq(parse_ok(" \t\r\n{ } \n"), "");
	ck_assert_str_eq(parse_ok("{\"a\":\"b\",\"n\":-1.5e+3,\"z\":0}"), "a=b|n=#-1.5e+3|z=#0");
	ck_assert_str_eq(parse_ok("{\"e\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"}"), "e=\"\\/\b\f\n\r\t");
	ck_assert_str_eq(parse_ok("{\"u\":\"\\u00e9\\u20AC\\ud83d\\ude00\"}"),
	    "u=\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
	ck_assert_str_eq(parse_ok("{\"raw\":\"\xc3\xa9\xf0\x9f\x98\x80\"}"),
	    "raw=\xc3\xa9\xf0\x9f\x98\x80");
	/* Microsoft's errors: arrays and other values are checked and skipped. */
	ck_assert_str_eq(parse_ok("{\"error\":\"invalid_grant\",\"error_codes\":[70000,{\"x\":"
	    "[true,false,null]}],\"ok\":true,\"n\":null,\"o\":{},\"last\":\"x\"}"),
	    "error=invalid_grant|last=x");
	ck_assert_str_eq(parse_ok("{\"\\u006b\":\"v\"}"), "k=v");
}
END_TEST

static int
stop_at_second(const struct json_member *m, void *arg)
{
	int *n = arg;

	(void)m;
	return ++*n == 2 ? -1 : 0;
}

START_TEST(json_refuses)
{
	static const char *const bad[] = {
		"", "[]", "\"s\"", "{", "{\"a\"}", "{\"a\":}", "{\"a\":1,}", "{,}", "{\"a\":1}x",
		"{\"a\":1}{}", "{a:1}", "{'a':1}", "{\"a\":01}", "{\"a\":1.}", "{\"a\":.5}",
		"{\"a\":1e}", "{\"a\":+1}", "{\"a\":-}", "{\"a\":NaN}", "{\"a\":tru}",
		"{\"a\":\"\\x\"}", "{\"a\":\"\\u12\"}", "{\"a\":\"\\ud800\"}", "{\"a\":\"\\udc00\"}",
		"{\"a\":\"\\ud800\\u0041\"}", "{\"a\":\"\\u0000\"}", "{\"a\":\"tab\there\"}",
		"{\"a\":\"\xc3\"}", "{\"a\":\"\xc0\xaf\"}", "{\"a\":\"\xed\xa0\x80\"}",
		"{\"a\":\"\xf4\x90\x80\x80\"}", "{\"a\":\"\xff\"}", "{\"a\":\"open}",
		"{\"a\":[1,]}", "{\"a\":[1 2]}", "{\"a\":{\"b\"}}", "{\"a\":1 \"b\":2}",
	};
	char err[96], deep[128];
	int n = 0;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct seen s = { "" };

		ck_assert_msg(json_object_parse(bad[i], strlen(bad[i]), record, &s, err,
		    sizeof(err)) == -1, "accepted %s", bad[i]);
		ck_assert_msg(strstr(err, " at offset ") != NULL, "%s: %s", bad[i], err);
	}
	/* NUL inside the text is not JSON either */
	ck_assert_int_eq(json_object_parse("{\"a\":\"b\0\"}", 10, record, &(struct seen){ "" },
	    err, sizeof(err)), -1);
	/* depth */
	snprintf(deep, sizeof(deep), "{\"a\":%.*s%.*s}", JSON_MAX_DEPTH,
	    "[[[[[[[[[[[[[[[[[[[[[[[[", JSON_MAX_DEPTH, "]]]]]]]]]]]]]]]]]]]]]]]]");
	ck_assert_int_eq(json_object_parse(deep, strlen(deep), record, &(struct seen){ "" },
	    err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "nested too deeply"));
	snprintf(deep, sizeof(deep), "{\"a\":%.*s%.*s}", JSON_MAX_DEPTH - 1,
	    "[[[[[[[[[[[[[[[[[[[[[[[[", JSON_MAX_DEPTH - 1, "]]]]]]]]]]]]]]]]]]]]]]]]");
	ck_assert_int_eq(json_object_parse(deep, strlen(deep), record, &(struct seen){ "" },
	    err, sizeof(err)), 0);
	/* the callback can stop the parse */
	ck_assert_int_eq(json_object_parse("{\"a\":1,\"b\":2,\"c\":3}", 19, stop_at_second, &n,
	    err, sizeof(err)), -1);
	ck_assert_int_eq(n, 2);
}
END_TEST

/* ---- token responses ---- */

static struct token_response tr;

static int
response(long status, const char *body, char *why, size_t whylen)
{
	return token_response_parse(status, body, strlen(body), &tr, why, whylen);
}

START_TEST(token_response_google)
{
	char why[256] = "";

	ck_assert_int_eq(response(200, "{\n  \"access_token\": \"ya29.a0AfB_byC-x~y+z/0=\",\n"
	    "  \"expires_in\": 3599,\n  \"scope\": \"https://mail.google.com/\",\n"
	    "  \"token_type\": \"Bearer\"\n}", why, sizeof(why)), 0);
	ck_assert_str_eq(tr.access_token, "ya29.a0AfB_byC-x~y+z/0=");
	ck_assert_int_eq(tr.expires_in, 3599);
	ck_assert_str_eq(tr.refresh_token, "");
	ck_assert_str_eq(tr.error, "");
}
END_TEST

START_TEST(token_response_microsoft)
{
	char why[256] = "";

	/* v2.0 endpoint: a new refresh token, token_type in lower case */
	ck_assert_int_eq(response(200, "{\"token_type\":\"bearer\",\"scope\":\"https://outlook.office."
	    "com/SMTP.Send\",\"expires_in\":4379,\"ext_expires_in\":4379,\"access_token\":\"eyJ0e"
	    "XAi.eyJhdWQi.c2lnbg\",\"refresh_token\":\"0.AX0A-rotated\"}", why, sizeof(why)), 0);
	ck_assert_str_eq(tr.access_token, "eyJ0eXAi.eyJhdWQi.c2lnbg");
	ck_assert_str_eq(tr.refresh_token, "0.AX0A-rotated");
	ck_assert_int_eq(tr.expires_in, 4379);
	/* v1.0 endpoint: numbers as strings */
	ck_assert_int_eq(response(200, "{\"token_type\":\"Bearer\",\"expires_in\":\"3599\","
	    "\"access_token\":\"abc\"}", why, sizeof(why)), 0);
	ck_assert_int_eq(tr.expires_in, 3599);
	/* no expires_in: the configured lifetime applies */
	ck_assert_int_eq(response(200, "{\"token_type\":\"Bearer\",\"access_token\":\"abc\"}",
	    why, sizeof(why)), 0);
	ck_assert_int_eq(tr.expires_in, -1);
}
END_TEST

START_TEST(token_response_errors)
{
	char why[256];

	ck_assert_int_eq(response(400, "{\"error\":\"invalid_grant\",\"error_description\":"
	    "\"Token has been expired or revoked.\"}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 400 invalid_grant (Token has been expired or revoked.)");
	ck_assert_str_eq(tr.error, "invalid_grant");
	ck_assert_int_eq(response(400, "{\"error\":\"invalid_grant\"}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 400 invalid_grant");
	/* Azure AD: arrays in the error, a description with a line end */
	ck_assert_int_eq(response(401, "{\"error\":\"invalid_client\",\"error_description\":"
	    "\"AADSTS7000215: Invalid client secret.\\r\\nTrace ID: 1\",\"error_codes\":[7000215],"
	    "\"timestamp\":\"2026-01-01 00:00:00Z\"}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 401 invalid_client (AADSTS7000215: Invalid client secret.??"
	    "Trace ID: 1)");
	ck_assert_int_eq(response(503, "<html>Service Unavailable</html>", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 503");
	ck_assert_int_eq(response(200, "{\"error\":\"slow_down\"}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200 slow_down");
	ck_assert_int_eq(response(200, "<html>", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: malformed token response (expected an object at offset 0)");
	ck_assert_int_eq(response(200, "{\"token_type\":\"Bearer\"}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: no access_token in the response");
	ck_assert_int_eq(response(200, "{\"access_token\":\"abc\"}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: no token_type in the response");
	ck_assert_int_eq(response(200, "{\"access_token\":\"abc\",\"token_type\":\"mac\"}", why,
	    sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: token_type \"mac\" is not Bearer");
	ck_assert_int_eq(response(200, "{\"access_token\":\"a b\",\"token_type\":\"Bearer\"}", why,
	    sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: access_token is not a bearer token");
	ck_assert_str_eq(tr.access_token, "");          /* wiped */
	ck_assert_int_eq(response(200, "{\"access_token\":\"a\",\"access_token\":\"b\","
	    "\"token_type\":\"Bearer\"}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: malformed token response (duplicate access_token)");
	ck_assert_int_eq(response(200, "{\"access_token\":7,\"token_type\":\"Bearer\"}", why,
	    sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: malformed token response (access_token is not a string)");
	ck_assert_int_eq(response(200, "{\"access_token\":\"a\",\"token_type\":\"Bearer\","
	    "\"expires_in\":-5}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: malformed token response (expires_in is not a whole "
	    "number of seconds)");
	ck_assert_int_eq(response(200, "{\"access_token\":\"a\",\"token_type\":\"Bearer\","
	    "\"expires_in\":99999999999}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: malformed token response (expires_in is out of range)");
	ck_assert_int_eq(response(200, "{\"access_token\":\"a\",\"token_type\":\"Bearer\","
	    "\"refresh_token\":\"x\\ny\"}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: malformed token response (refresh_token holds characters "
	    "a refresh token may not)");
}
END_TEST

START_TEST(token_response_limits)
{
	static char body[3 * TOKEN_MAX];
	char why[256];

	snprintf(body, sizeof(body), "{\"token_type\":\"Bearer\",\"access_token\":\"%0*d\"}",
	    TOKEN_MAX, 0);
	ck_assert_int_eq(response(200, body, why, sizeof(why)), 0);
	ck_assert_uint_eq(strlen(tr.access_token), TOKEN_MAX);
	snprintf(body, sizeof(body), "{\"token_type\":\"Bearer\",\"access_token\":\"%0*d\"}",
	    TOKEN_MAX + 1, 0);
	ck_assert_int_eq(response(200, body, why, sizeof(why)), -1);
	ck_assert_str_eq(why, "HTTP 200: malformed token response (access_token is too long)");
}
END_TEST

static int
output(const char *text, char *why, size_t whylen)
{
	return token_output_parse(text, strlen(text), &tr, why, whylen);
}

START_TEST(token_output)
{
	char why[128];

	ck_assert_int_eq(output("abc.def-_~+/==\n", why, sizeof(why)), 0);
	ck_assert_str_eq(tr.access_token, "abc.def-_~+/==");
	ck_assert_int_eq(tr.expires_in, -1);
	ck_assert_int_eq(output("  tok\r\nsecond line\n", why, sizeof(why)), 0);
	ck_assert_str_eq(tr.access_token, "tok");
	ck_assert_int_eq(output("\n{\"access_token\":\"j\",\"expires_in\":60}\n", why, sizeof(why)), 0);
	ck_assert_str_eq(tr.access_token, "j");
	ck_assert_int_eq(tr.expires_in, 60);
	ck_assert_int_eq(output("", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "output: no token");
	ck_assert_int_eq(output(" \n", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "output: no token");
	ck_assert_int_eq(output("Error: not logged in\n", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "output: not a bearer token");
	ck_assert_int_eq(output("{\"expires_in\":1}", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "output: no access_token in the response");
	ck_assert_int_eq(output("{oops", why, sizeof(why)), -1);
	ck_assert_str_eq(why, "output: malformed token response (expected a string at offset 1)");
}
END_TEST

START_TEST(b64token)
{
	ck_assert(token_is_b64token("aZ09-._~+/", 10));
	ck_assert(token_is_b64token("abc==", 5));
	ck_assert(!token_is_b64token("", 0));
	ck_assert(!token_is_b64token("==", 2));
	ck_assert(!token_is_b64token("a=b", 3));
	ck_assert(!token_is_b64token("a b", 3));
	ck_assert(!token_is_b64token("a\0b", 3));
	ck_assert(!token_is_b64token("a\"", 2));
}
END_TEST

/* ---- token_command words ---- */

static char *
joined(const char *line)
{
	static char out[512];
	char why[96];
	char **argv = argv_split(line, why, sizeof(why));

	ck_assert_msg(argv != NULL, "%s: %s", line, why);
	out[0] = '\0';
	for (char **a = argv; *a != NULL; a++)
		snprintf(out + strlen(out), sizeof(out) - strlen(out), "%s<%s>",
		    a == argv ? "" : " ", *a);
	argv_free(argv);
	return out;
}

START_TEST(argv_words)
{
	ck_assert_str_eq(joined("oama access me@gmail.com"), "<oama> <access> <me@gmail.com>");
	ck_assert_str_eq(joined("  a \t b  "), "<a> <b>");
	ck_assert_str_eq(joined("sh -c 'pass show mail | head -1'"),
	    "<sh> <-c> <pass show mail | head -1>");
	ck_assert_str_eq(joined("echo \"a \\\"b\\\" \\\\ \\n $HOME\""), "<echo> <a \"b\" \\ \\n $HOME>");
	ck_assert_str_eq(joined("a\\ b c\\'d"), "<a b> <c'd>");
	ck_assert_str_eq(joined("x'y z'\"w\" '' \"\""), "<xy zw> <> <>");
	ck_assert_str_eq(joined("'it''s'"), "<its>");
	ck_assert_str_eq(joined("~/bin/t *.json >out"), "<~/bin/t> <*.json> <>out>");
}
END_TEST

START_TEST(argv_refused)
{
	static const struct { const char *line, *why; } cases[] = {
		{ "", "empty command" },
		{ "   ", "empty command" },
		{ "a 'b", "unterminated ' quote" },
		{ "a \"b", "unterminated \" quote" },
		{ "a \"b\\\"", "unterminated \" quote" },
		{ "a b\\", "backslash at the end of the command" },
		{ "a\nb", "control character in the command" },
	};
	char why[96];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		ck_assert_ptr_null(argv_split(cases[i].line, why, sizeof(why)));
		ck_assert_str_eq(why, cases[i].why);
	}
}
END_TEST

/* ---- secret files ---- */

static char dir[] = "/tmp/check_oauth.XXXXXX";

static void
dir_setup(void)
{
	ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void
dir_teardown(void)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	ck_assert_int_eq(system(cmd), 0);
	strcpy(dir, "/tmp/check_oauth.XXXXXX");
}

static const char *
in_dir(const char *name)
{
	static char path[256];

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	return path;
}

static void
put_file(const char *name, const char *text)
{
	FILE *f = fopen(in_dir(name), "w");

	ck_assert_ptr_nonnull(f);
	fputs(text, f);
	fclose(f);
}

/* A refresh token is longer than a password: the reader takes a limit. */
START_TEST(secret_files)
{
	static char big[TOKEN_MAX + 2];
	char why[256], want[300], *got;
	struct stat st;

	memset(big, 'r', TOKEN_MAX);
	put_file("big", big);
	got = secret_file_read_path(in_dir("big"), TOKEN_MAX, why, sizeof(why));
	ck_assert_ptr_nonnull(got);
	ck_assert_uint_eq(strlen(got), TOKEN_MAX);
	free(got);
	ck_assert_ptr_null(secret_file_read_path(in_dir("big"), TOKEN_MAX - 1, why, sizeof(why)));
	ck_assert_ptr_nonnull(strstr(why, "longer than 8191 octets"));
	put_file("s", "sec ret\r\n");
	ck_assert_str_eq(got = secret_file_read_path(in_dir("s"), 16, why, sizeof(why)), "sec ret");
	free(got);

	/* replaced atomically: 0600 whatever the old mode, no stray files */
	chmod(in_dir("s"), 0644);
	ck_assert_int_eq(secret_file_replace(in_dir("s"), "rotated", why, sizeof(why)), 0);
	ck_assert_str_eq(got = secret_file_read_path(in_dir("s"), 16, why, sizeof(why)), "rotated");
	free(got);
	ck_assert_int_eq(stat(in_dir("s"), &st), 0);
	ck_assert_int_eq(st.st_mode & 07777, 0600);
	snprintf(want, sizeof(want), "test $(ls '%s' | grep -c '^s\\.') -eq 0", dir);
	ck_assert_int_eq(system(want), 0);
	ck_assert_int_eq(secret_file_replace("/nonexistent/dir/f", "x", why, sizeof(why)), -1);
	ck_assert_ptr_nonnull(strstr(why, "cannot write /nonexistent/dir/f."));
}
END_TEST

/* ---- the token table ---- */

struct fixture {
	struct config cfg;
	struct user_cfg user;
	struct downstream_cfg ds[3];
	struct token_source_cfg src[3];
	struct token_table *tt;
};

static void
fixture_init(struct fixture *f)
{
	static char *names[] = { "a", "b", "c" };
	char err[256];

	memset(f, 0, sizeof(*f));
	f->cfg.state_file = strdup(in_dir("state"));
	f->cfg.users = &f->user;
	f->cfg.n_users = 1;
	f->user.downstreams = f->ds;
	f->user.n_downstreams = 3;
	for (int i = 0; i < 3; i++) {
		f->ds[i].name = names[i];
		f->ds[i].addr = i < 2 ? "smtp.example.com:587" : "smtp.example.net:587";
		f->ds[i].user = i == 0 ? "a@example.com" : "b@example.com";
		f->ds[i].token_slot = -1;
		f->src[i].kind = TOKEN_SOURCE_REFRESH_TOKEN;
		f->src[i].id = 100 + (uint64_t)i;
		f->ds[i].token = i == 2 ? NULL : &f->src[i];     /* the last one: a password */
	}
	ck_assert_msg(token_table_bind(&f->tt, &f->cfg, err, sizeof(err)) == 0, "%s", err);
	ck_assert_ptr_nonnull(f->tt);
}

static void
fixture_free(struct fixture *f)
{
	token_table_destroy(f->tt);
	free(f->cfg.state_file);
}

START_TEST(table_not_needed)
{
	struct fixture f;
	struct token_table *tt = NULL;
	char err[128];

	fixture_init(&f);
	token_table_destroy(f.tt);                      /* a run that has ended */
	f.ds[0].token = f.ds[1].token = NULL;
	ck_assert(!token_table_needed(&f.cfg));
	ck_assert_int_eq(token_table_bind(&tt, &f.cfg, err, sizeof(err)), 0);
	ck_assert_ptr_null(tt);                         /* nothing made without OAuth */
	ck_assert_int_eq(token_table_fd(tt), -1);       /* and nothing for -s status */
	f.tt = NULL;
	fixture_free(&f);
}
END_TEST

START_TEST(table_put_get)
{
	struct fixture f;
	char buf[TOKEN_MAX + 1], why[256];
	int64_t now = token_clock_ms();
	uint64_t gen;
	size_t len;

	fixture_init(&f);
	ck_assert_int_eq(f.ds[0].token_slot, 0);
	ck_assert_int_eq(f.ds[1].token_slot, 1);
	ck_assert_int_eq(f.ds[2].token_slot, -1);
	ck_assert(token_table_ready(f.tt, &f.ds[2], now, why, sizeof(why)));  /* no token needed */
	ck_assert(!token_table_ready(f.tt, &f.ds[0], now, why, sizeof(why)));
	ck_assert_str_eq(why, "no OAuth token yet");
	ck_assert_int_eq(token_table_get(f.tt, &f.ds[0], now, buf, sizeof(buf), &len, &gen), -1);

	token_table_put(f.tt, 0, "tok-1", 5, now + 1000, 100);
	ck_assert(token_table_ready(f.tt, &f.ds[0], now, why, sizeof(why)));
	ck_assert_int_eq(token_table_get(f.tt, &f.ds[0], now, buf, sizeof(buf), &len, &gen), 0);
	ck_assert_str_eq(buf, "tok-1");
	ck_assert_uint_eq(len, 5);
	ck_assert_uint_eq(gen, 1);
	/* past its use-until time */
	ck_assert(!token_table_ready(f.tt, &f.ds[0], now + 1000, why, sizeof(why)));
	ck_assert_str_eq(why, "no OAuth token: the last one expired");
	ck_assert_int_eq(token_table_get(f.tt, &f.ds[0], now + 1000, buf, sizeof(buf), &len,
	    &gen), -1);
	/* a token from another source (the configuration changed) is not used */
	f.src[0].id = 999;
	ck_assert(!token_table_ready(f.tt, &f.ds[0], now, why, sizeof(why)));
	f.src[0].id = 100;
	/* a failing source says why */
	token_table_status_put(f.tt, 1, &(struct token_status){ .failing = 1,
	    .last_error = "token endpoint: HTTP 400 invalid_grant" });
	ck_assert(!token_table_ready(f.tt, &f.ds[1], now, why, sizeof(why)));
	ck_assert_str_eq(why, "no OAuth token: token endpoint: HTTP 400 invalid_grant");
	/* the slot is cleared */
	token_table_clear(f.tt, 0);
	ck_assert(!token_table_ready(f.tt, &f.ds[0], now, why, sizeof(why)));
	fixture_free(&f);
}
END_TEST

START_TEST(table_refusal_wakes_helper)
{
	struct fixture f;
	char byte;

	fixture_init(&f);
	token_table_put(f.tt, 0, "tok-1", 5, token_clock_ms() + 60000, 100);
	ck_assert_uint_eq(token_table_take_rejection(f.tt, 0), 0);
	ck_assert_int_eq(read(token_table_wake_fd(f.tt), &byte, 1), -1);   /* nothing yet */
	ck_assert_int_eq(errno, EAGAIN);
	/* two workers refused the same token: one wake-up suffices, one refresh */
	token_table_reject(f.tt, &f.ds[0], 1);
	token_table_reject(f.tt, &f.ds[0], 1);
	ck_assert_int_eq(read(token_table_wake_fd(f.tt), &byte, 1), 1);
	token_table_wake_drain(f.tt);
	ck_assert_uint_eq(token_table_take_rejection(f.tt, 0), 1);
	ck_assert_uint_eq(token_table_take_rejection(f.tt, 0), 0);
	/* a refusal of a token already replaced asks for nothing */
	token_table_reject(f.tt, &f.ds[0], 1);
	token_table_put(f.tt, 0, "tok-2", 5, token_clock_ms() + 60000, 100);
	ck_assert_uint_eq(token_table_take_rejection(f.tt, 0), 0);
	/* nor does one without a token */
	token_table_reject(f.tt, &f.ds[0], 0);
	ck_assert_uint_eq(token_table_take_rejection(f.tt, 0), 0);
	fixture_free(&f);
}
END_TEST

START_TEST(table_rebind_keeps_slots)
{
	struct fixture f;
	char err[128], key[200];

	fixture_init(&f);
	token_table_put(f.tt, 1, "kept", 4, token_clock_ms() + 60000, 101);
	/* a reload that drops a and adds c under a new account */
	f.ds[0].token = NULL;
	f.ds[2].token = &f.src[2];
	f.ds[1].token_slot = f.ds[2].token_slot = -1;
	ck_assert_int_eq(token_table_bind(&f.tt, &f.cfg, err, sizeof(err)), 0);
	ck_assert_int_eq(f.ds[1].token_slot, 1);
	ck_assert_int_eq(f.ds[2].token_slot, 2);
	ck_assert_uint_eq(token_table_count(f.tt), 3);
	ck_assert_int_eq(token_table_slot_key(f.tt, 0, key, sizeof(key)), 1);   /* not in use */
	ck_assert_str_eq(key, "smtp.example.com:587 a@example.com");
	ck_assert_int_eq(token_table_slot_key(f.tt, 1, key, sizeof(key)), 0);
	ck_assert_str_eq(key, "smtp.example.com:587 b@example.com");
	ck_assert_int_eq(token_table_slot_key(f.tt, 3, key, sizeof(key)), -1);
	ck_assert(token_table_ready(f.tt, &f.ds[1], token_clock_ms(), err, sizeof(err)));
	fixture_free(&f);
}
END_TEST

/* The whole segment behind fd, as a string search can scan it. */
static bool
segment_holds(int fd, const char *what)
{
	struct stat sb;
	char *p;
	bool found;

	ck_assert_int_eq(fstat(fd, &sb), 0);
	ck_assert_ptr_nonnull(p = malloc((size_t)sb.st_size));
	ck_assert_int_eq(pread(fd, p, (size_t)sb.st_size, 0), sb.st_size);
	found = memmem(p, (size_t)sb.st_size, what, strlen(what)) != NULL;
	free(p);
	return found;
}

START_TEST(table_status_segment)
{
	struct fixture f;
	struct token_table *ro;
	struct token_status st = { .valid_until = 1700000000, .last_refresh = 1699996400,
	    .refreshes = 3, .source = TOKEN_SOURCE_COMMAND, .name = "a" }, got;
	char key[200], proc[64];
	int fd, rw;

	fixture_init(&f);
	token_table_put(f.tt, 0, "secret-token", 12, token_clock_ms() + 60000, 100);
	token_table_status_put(f.tt, 0, &st);
	/* nothing next to the state file: the status is a memfd */
	ck_assert_int_eq(access(in_dir("state.oauth"), F_OK), -1);
	ck_assert_int_ge(fd = dup(token_table_fd(f.tt)), 0);
	ck_assert_int_eq(fcntl(fd, F_GETFL) & O_ACCMODE, O_RDONLY);
	/* sealed: whoever can reopen it writable still cannot truncate it */
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
	if ((rw = open(proc, O_RDWR)) >= 0) {
		ck_assert_int_eq(ftruncate(rw, 0), -1);
		ck_assert_int_eq(errno, EPERM);
		close(rw);
	}
	ck_assert(!segment_holds(fd, "secret-token"));  /* never a token */
	ck_assert_ptr_nonnull(ro = token_table_attach(fd));
	ck_assert_uint_eq(token_table_count(ro), 2);
	ck_assert_int_eq(token_table_slot_key(ro, 0, key, sizeof(key)), 0);
	ck_assert_str_eq(key, "smtp.example.com:587 a@example.com");
	ck_assert_int_eq(token_table_status_get(ro, 0, &got), 0);
	ck_assert_int_eq(memcmp(&got, &st, sizeof(st)), 0);
	/* a status reader has no tokens, and cannot write the status */
	ck_assert(!token_table_ready(ro, &f.ds[0], token_clock_ms(), key, sizeof(key)));
	token_table_status_put(ro, 0, &(struct token_status){ .refreshes = 99 });
	ck_assert_int_eq(token_table_status_get(f.tt, 0, &got), 0);
	ck_assert_uint_eq(got.refreshes, 3);
	token_table_destroy(ro);
	/* something else than this segment is refused */
	ck_assert_int_ge(fd = open(in_dir("state"), O_RDWR | O_CREAT | O_CLOEXEC, 0600), 0);
	ck_assert_ptr_null(token_table_attach(fd));
	ck_assert_int_eq(errno, EPROTO);
	fixture_free(&f);
}
END_TEST

/* The writable mappings of the status segment this process has, and the
 * bytes they span. */
static int
writable_status_views(size_t *bytes)
{
	FILE *maps = fopen("/proc/self/maps", "r");
	char line[512], perms[8];
	unsigned long from, to;
	int n = 0;

	*bytes = 0;
	if (maps == NULL)
		return -1;
	while (fgets(line, sizeof(line), maps) != NULL)
		if (strstr(line, "memfd:smtpmux-oauth") != NULL &&
		    sscanf(line, "%lx-%lx %7s", &from, &to, perms) == 3 && perms[1] == 'w') {
			n++;
			*bytes += to - from;
		}
	fclose(maps);
	return n;
}

/* In a child after token_table_after_fork(): 0 when its views are as they
 * must be (the token helper: only the status records writable; any other
 * child: nothing writable) and its status writes land only when allowed. */
static int
child_views(struct token_table *tt, bool status_writer, size_t segment)
{
	size_t bytes;
	int n;

	token_table_after_fork(tt, status_writer);
	if (token_table_fd(tt) != -1)
		return 1;
	n = writable_status_views(&bytes);
	if (status_writer ? n != 1 || bytes == 0 || bytes >= segment : n != 0)
		return 2;
	token_table_status_put(tt, 1, &(struct token_status){ .refreshes = 7 });
	return 0;
}

START_TEST(table_status_views_after_fork)
{
	struct fixture f;
	struct token_status got;
	struct stat sb;
	size_t bytes;
	int status;
	pid_t pid;

	fixture_init(&f);
	ck_assert_int_eq(fstat(token_table_fd(f.tt), &sb), 0);
	ck_assert_int_eq(writable_status_views(&bytes), 1);     /* the master's: all of it */
	ck_assert_uint_eq(bytes, (size_t)sb.st_size);
	for (int writer = 0; writer < 2; writer++) {
		ck_assert_int_ge(pid = fork(), 0);
		if (pid == 0)
			_exit(child_views(f.tt, writer, (size_t)sb.st_size));
		ck_assert_int_eq(waitpid(pid, &status, 0), pid);
		ck_assert(WIFEXITED(status));
		ck_assert_int_eq(WEXITSTATUS(status), 0);
		ck_assert_int_eq(token_table_status_get(f.tt, 1, &got), 0);
		ck_assert_uint_eq(got.refreshes, writer ? 7 : 0);
	}
	fixture_free(&f);
}
END_TEST

/* The sequence lock: a reader racing the writer sees whole tokens only. */
struct race {
	struct fixture *f;
	atomic_int stop;
	atomic_uint torn, seen;
};

static void *
race_reader(void *arg)
{
	struct race *r = arg;
	static char buf[TOKEN_MAX + 1];
	uint64_t gen;
	size_t len;

	while (!r->stop) {
		if (token_table_get(r->f->tt, &r->f->ds[0], token_clock_ms(), buf, sizeof(buf),
		    &len, &gen) < 0)
			continue;
		r->seen++;
		/* token n is TOKEN_MAX - n % 100 copies of one letter */
		if (len != strlen(buf) || buf[0] != (char)('a' + gen % 26) ||
		    strspn(buf, (char[]){ buf[0], 0 }) != len ||
		    len != (size_t)(TOKEN_MAX - gen % 100))
			r->torn++;
	}
	return NULL;
}

START_TEST(table_seqlock_race)
{
	static char tok[TOKEN_MAX];
	struct fixture f;
	struct race r = { .f = &f };
	pthread_t t;

	fixture_init(&f);
	ck_assert_int_eq(pthread_create(&t, NULL, race_reader, &r), 0);
	/*
	 * At least 20000 tokens, and until the reader has read many of them.
	 * A reader that races a writer writing without pause gives up after
	 * a few tries (that is the design), and on a loaded machine it can
	 * lose nearly every race: every 1000 tokens the writer waits until
	 * the reader has read one more, so the reads add up whatever the load.
	 */
	unsigned seen_before = 0;
	for (uint64_t n = 1; n <= 20000 || atomic_load(&r.seen) < 2000; n++) {
		memset(tok, 'a' + (int)(n % 26), sizeof(tok));
		token_table_put(f.tt, 0, tok, TOKEN_MAX - n % 100, token_clock_ms() + 60000, 100);
		if (n % 1000 == 0) {
			while (atomic_load(&r.seen) == seen_before)
				sched_yield();
			seen_before = atomic_load(&r.seen);
		}
	}
	r.stop = 1;
	pthread_join(t, NULL);
	ck_assert_uint_eq(atomic_load(&r.torn), 0);
	ck_assert_uint_ge(atomic_load(&r.seen), 2000);
	fixture_free(&f);
}
END_TEST

static Suite *
oauth_suite(void)
{
	Suite *s = suite_create("oauth");
	TCase *tc = tcase_create("sasl");

	tcase_add_test(tc, xoauth2_google_example);
	tcase_add_test(tc, oauthbearer_rfc7628_example);
	tcase_add_test(tc, oauthbearer_escapes_saslname);
	tcase_add_test(tc, sasl_refuses_what_it_cannot_carry);
	tcase_add_test(tc, sasl_abort_lines);
	tcase_add_test(tc, sasl_error_continuation);
	suite_add_tcase(s, tc);

	tc = tcase_create("json");
	tcase_add_test(tc, json_accepts);
	tcase_add_test(tc, json_refuses);
	tcase_add_test(tc, token_response_google);
	tcase_add_test(tc, token_response_microsoft);
	tcase_add_test(tc, token_response_errors);
	tcase_add_test(tc, token_response_limits);
	tcase_add_test(tc, token_output);
	tcase_add_test(tc, b64token);
	suite_add_tcase(s, tc);

	tc = tcase_create("command");
	tcase_add_test(tc, argv_words);
	tcase_add_test(tc, argv_refused);
	suite_add_tcase(s, tc);

	tc = tcase_create("files");
	tcase_add_checked_fixture(tc, dir_setup, dir_teardown);
	tcase_add_test(tc, secret_files);
	tcase_add_test(tc, table_not_needed);
	tcase_add_test(tc, table_put_get);
	tcase_add_test(tc, table_refusal_wakes_helper);
	tcase_add_test(tc, table_rebind_keeps_slots);
	tcase_add_test(tc, table_status_segment);
	tcase_add_test(tc, table_status_views_after_fork);
	tcase_add_test(tc, table_seqlock_race);
	tcase_set_timeout(tc, 60);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(oauth_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? 0 : 1;
}

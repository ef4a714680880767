/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "opts.h"

enum {
	OPT_HELO = 256, OPT_STARTTLS, OPT_SMTPS, OPT_CAFILE, OPT_TLS_NAME,
	OPT_TLS_PRIORITY, OPT_TIMEOUT
};

static const struct option long_opts[] = {
	{ "concurrency", required_argument, NULL, 'c' },
	{ "messages", required_argument, NULL, 'n' },
	{ "duration", required_argument, NULL, 'd' },
	{ "size", required_argument, NULL, 's' },
	{ "per-session", required_argument, NULL, 'm' },
	{ "rcpts", required_argument, NULL, 'r' },
	{ "from", required_argument, NULL, 'f' },
	{ "to", required_argument, NULL, 't' },
	{ "helo", required_argument, NULL, OPT_HELO },
	{ "user", required_argument, NULL, 'u' },
	{ "password", required_argument, NULL, 'p' },
	{ "auth", required_argument, NULL, 'a' },
	{ "starttls", no_argument, NULL, OPT_STARTTLS },
	{ "smtps", no_argument, NULL, OPT_SMTPS },
	{ "cafile", required_argument, NULL, OPT_CAFILE },
	{ "tls-name", required_argument, NULL, OPT_TLS_NAME },
	{ "tls-priority", required_argument, NULL, OPT_TLS_PRIORITY },
	{ "pipelining", no_argument, NULL, 'P' },
	{ "threads", required_argument, NULL, 'T' },
	{ "timeout", required_argument, NULL, OPT_TIMEOUT },
	{ "json", no_argument, NULL, 'j' },
	{ "help", no_argument, NULL, 'h' },
	{ NULL, 0, NULL, 0 }
};

const char *
opts_usage(void)
{
	return
	    "usage: smtp-load [options] HOST[:PORT]\n"
	    "Sends mail to an SMTP server as fast as it takes it; reports throughput,\n"
	    "latency percentiles and errors by reply code.\n"
	    "  -c, --concurrency N   connections at once (1)\n"
	    "  -n, --messages N      messages in all (1000, or unlimited with --duration)\n"
	    "  -d, --duration SECS   stop starting messages after SECS seconds\n"
	    "  -s, --size BYTES      message size, header and body (1024; k and M suffixes)\n"
	    "  -m, --per-session N   messages per connection (1: a session per message;\n"
	    "                        0: as many as the run has)\n"
	    "  -r, --rcpts N         recipients per message (1, at most 100)\n"
	    "  -f, --from ADDR       envelope sender (load@example.com)\n"
	    "  -t, --to ADDR         recipient (sink@example.org; with -r N: 1ADDR, 2ADDR...)\n"
	    "      --helo NAME       EHLO name (smtp-load.test)\n"
	    "  -u, --user USER       authenticate as USER\n"
	    "  -p, --password PASS   (or $SMTP_LOAD_PASSWORD)\n"
	    "  -a, --auth MECH       plain or login (plain)\n"
	    "      --starttls        STARTTLS after EHLO (required from the server)\n"
	    "      --smtps           TLS from the start (port 465)\n"
	    "      --cafile FILE     verify the server's certificate against FILE\n"
	    "                        (default: no verification, for benchmarking)\n"
	    "      --tls-name NAME   SNI and the name verified (default: HOST)\n"
	    "      --tls-priority S  GnuTLS priority string\n"
	    "  -P, --pipelining      pipeline commands when the server offers PIPELINING\n"
	    "  -T, --threads N       event loops, one thread each (1)\n"
	    "      --timeout SECS    longest wait for a reply (30)\n"
	    "  -j, --json            print one JSON object instead of the summary\n";
}

const char *
opts_auth_name(enum opts_auth a)
{
	return a == OPTS_AUTH_PLAIN ? "plain" : a == OPTS_AUTH_LOGIN ? "login" : "none";
}

const char *
opts_tls_name(enum opts_tls t)
{
	return t == OPTS_TLS_STARTTLS ? "starttls" : t == OPTS_TLS_IMPLICIT ? "smtps" : "none";
}

/* A whole number in [min, max], with an optional k (1024) or M suffix when scaled. */
static int
parse_count(const char *arg, uint64_t min, uint64_t max, bool scaled, uint64_t *out)
{
	unsigned long long v;
	char *end;

	errno = 0;
	if (*arg == '-' || *arg == '\0')
		return -1;
	v = strtoull(arg, &end, 10);
	if (errno != 0 || end == arg)
		return -1;
	if (scaled && (*end == 'k' || *end == 'K')) {
		if (v > max / 1024)
			return -1;
		v *= 1024;
		end++;
	} else if (scaled && (*end == 'm' || *end == 'M')) {
		if (v > max / (1024 * 1024))
			return -1;
		v *= 1024 * 1024;
		end++;
	}
	if (*end != '\0' || v < min || v > max)
		return -1;
	*out = v;
	return 0;
}

static int
parse_seconds(const char *arg, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(arg, &end);
	if (errno != 0 || end == arg || *end != '\0' || !isfinite(v) || v <= 0 || v > 86400 * 365)
		return -1;
	*out = v;
	return 0;
}

/* "host", "host:port", "[v6]", "[v6]:port"; a bare IPv6 literal has no port. */
static int
parse_server(const char *arg, struct load_opts *o)
{
	const char *host = arg, *port = "25", *colon;
	size_t hlen;

	if (*arg == '[') {
		const char *close = strchr(arg, ']');

		if (close == NULL || (close[1] != '\0' && close[1] != ':'))
			return -1;
		host = arg + 1;
		hlen = (size_t)(close - host);
		if (close[1] == ':')
			port = close + 2;
	} else if ((colon = strrchr(arg, ':')) != NULL && strchr(arg, ':') == colon) {
		hlen = (size_t)(colon - arg);
		port = colon + 1;
	} else {
		hlen = strlen(arg);
	}
	if (hlen == 0 || hlen >= sizeof(o->host) || *port == '\0' || strlen(port) >= sizeof(o->port))
		return -1;
	memcpy(o->host, host, hlen);
	o->host[hlen] = '\0';
	snprintf(o->port, sizeof(o->port), "%s", port);
	return 0;
}

static void
opts_defaults(struct load_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->concurrency = 1;
	o->size = 1024;
	o->per_session = 1;
	o->rcpts = 1;
	o->from = "load@example.com";
	o->to = "sink@example.org";
	o->helo = "smtp-load.test";
	o->threads = 1;
	o->timeout_ms = 30000;
}

/* An address goes inside <...> on one command line: no brackets, blanks or controls. */
static bool
plain_token(const char *s)
{
	if (*s == '\0' || strlen(s) > 255)
		return false;
	for (; *s != '\0'; s++)
		if ((unsigned char)*s <= ' ' || *s == '<' || *s == '>' || *s == 0x7f)
			return false;
	return true;
}

/* Cross-option rules, once everything is read. */
static int
opts_check(struct load_opts *o, bool auth_given, char *err, size_t errlen)
{
	if (o->messages == 0 && o->duration == 0)
		o->messages = 1000;
	if (o->threads > o->concurrency) {
		snprintf(err, errlen, "--threads: %u threads for %u connections; at most one thread per connection",
		    o->threads, o->concurrency);
		return -1;
	}
	if (o->password == NULL)
		o->password = getenv("SMTP_LOAD_PASSWORD");
	if (o->user != NULL && o->password == NULL) {
		snprintf(err, errlen, "--user: no password (--password or $SMTP_LOAD_PASSWORD)");
		return -1;
	}
	if (o->user == NULL && auth_given) {
		snprintf(err, errlen, "--auth: needs --user");
		return -1;
	}
	if (o->user != NULL && o->auth == OPTS_AUTH_NONE)
		o->auth = OPTS_AUTH_PLAIN;
	if (o->tls == OPTS_TLS_NONE && (o->cafile != NULL || o->tls_name != NULL || o->tls_priority != NULL)) {
		snprintf(err, errlen, "--cafile, --tls-name and --tls-priority need --starttls or --smtps");
		return -1;
	}
	return 0;
}

static int
opts_fail(char *err, size_t errlen, const char *opt, const char *why, const char *arg)
{
	snprintf(err, errlen, "%s: %s: '%s'", opt, why, arg);
	return -1;
}

int
opts_parse(int argc, char **argv, struct load_opts *o, char *err, size_t errlen)
{
	bool auth_given = false;
	uint64_t v;
	int c;

	opts_defaults(o);
	optind = 0;                     /* glibc: start afresh (the unit tests parse many times) */
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":c:n:d:s:m:r:f:t:u:p:a:PT:jh", long_opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			if (parse_count(optarg, 1, 1000000, false, &v) < 0)
				return opts_fail(err, errlen, "--concurrency", "not a number from 1 to 1000000", optarg);
			o->concurrency = (unsigned)v;
			break;
		case 'n':
			if (parse_count(optarg, 1, UINT64_MAX / 2, false, &v) < 0)
				return opts_fail(err, errlen, "--messages", "not a positive number", optarg);
			o->messages = v;
			break;
		case 'd':
			if (parse_seconds(optarg, &o->duration) < 0)
				return opts_fail(err, errlen, "--duration", "not a positive number of seconds", optarg);
			break;
		case 's':
			if (parse_count(optarg, 0, OPTS_MAX_SIZE, true, &o->size) < 0)
				return opts_fail(err, errlen, "--size", "not a size up to 2048M", optarg);
			break;
		case 'm':
			if (parse_count(optarg, 0, 1000000000, false, &v) < 0)
				return opts_fail(err, errlen, "--per-session", "not a number (0: unlimited)", optarg);
			o->per_session = (unsigned)v;
			break;
		case 'r':
			if (parse_count(optarg, 1, OPTS_MAX_RCPTS, false, &v) < 0)
				return opts_fail(err, errlen, "--rcpts", "not a number from 1 to 100", optarg);
			o->rcpts = (unsigned)v;
			break;
		case 'f':
		case 't':
			if (!plain_token(optarg))
				return opts_fail(err, errlen, c == 'f' ? "--from" : "--to",
				    "not an address (no blanks, no <>)", optarg);
			*(c == 'f' ? &o->from : &o->to) = optarg;
			break;
		case OPT_HELO:
			if (!plain_token(optarg))
				return opts_fail(err, errlen, "--helo", "not a host name", optarg);
			o->helo = optarg;
			break;
		case 'u':
			o->user = optarg;
			break;
		case 'p':
			o->password = optarg;
			break;
		case 'a':
			auth_given = true;
			if (strcasecmp(optarg, "plain") == 0)
				o->auth = OPTS_AUTH_PLAIN;
			else if (strcasecmp(optarg, "login") == 0)
				o->auth = OPTS_AUTH_LOGIN;
			else
				return opts_fail(err, errlen, "--auth", "not plain or login", optarg);
			break;
		case OPT_STARTTLS:
		case OPT_SMTPS:
			if (o->tls != OPTS_TLS_NONE) {
				snprintf(err, errlen, "--starttls and --smtps: choose one");
				return -1;
			}
			o->tls = c == OPT_STARTTLS ? OPTS_TLS_STARTTLS : OPTS_TLS_IMPLICIT;
			break;
		case OPT_CAFILE:
			o->cafile = optarg;
			break;
		case OPT_TLS_NAME:
			o->tls_name = optarg;
			break;
		case OPT_TLS_PRIORITY:
			o->tls_priority = optarg;
			break;
		case 'P':
			o->pipelining = true;
			break;
		case 'T':
			if (parse_count(optarg, 1, 1024, false, &v) < 0)
				return opts_fail(err, errlen, "--threads", "not a number from 1 to 1024", optarg);
			o->threads = (unsigned)v;
			break;
		case OPT_TIMEOUT: {
			double secs;

			if (parse_seconds(optarg, &secs) < 0 || secs > 3600)
				return opts_fail(err, errlen, "--timeout", "not a number of seconds up to 3600", optarg);
			o->timeout_ms = (unsigned)ceil(secs * 1000);
			break;
		}
		case 'j':
			o->json = true;
			break;
		case 'h':
			return 1;
		case ':':
			snprintf(err, errlen, "%s: needs a value", argv[optind - 1]);
			return -1;
		default:
			snprintf(err, errlen, "%s: unknown option", argv[optind - 1]);
			return -1;
		}
	}
	if (optind != argc - 1) {
		snprintf(err, errlen, optind == argc ? "no server given (HOST[:PORT])" :
		    "one server only, after the options");
		return -1;
	}
	if (parse_server(argv[optind], o) < 0)
		return opts_fail(err, errlen, "server", "not HOST[:PORT] or [IPv6]:PORT", argv[optind]);
	return opts_check(o, auth_given, err, errlen);
}

/* SPDX-License-Identifier: MIT */
/*
 * smtp-load: an SMTP load generator for benchmarking smtpmuxd and its
 * baselines (contrib/bench/README documents its options and output).
 */
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <gnutls/gnutls.h>

#include "loop.h"
#include "opts.h"
#include "report.h"
#include "script.h"
#include "tls_client.h"

#define EXIT_FAILED 1                   /* some message or session failed */
#define EXIT_USAGE 2                    /* bad options, or the run could not start */

static int
resolve(struct load_shared *sh, const struct load_opts *o, char *err, size_t errlen)
{
	struct addrinfo hints, *res;
	int r;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	r = getaddrinfo(o->host, o->port, &hints, &res);
	if (r != 0) {
		snprintf(err, errlen, "%s:%s: %s", o->host, o->port, gai_strerror(r));
		return -1;
	}
	memcpy(&sh->addr, res->ai_addr, res->ai_addrlen);
	sh->addrlen = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

/* Every connection needs a descriptor: use the hard limit if the soft one is short. */
static void
raise_fd_limit(unsigned conns)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)conns + 64) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static double
cpu_seconds(void)
{
	struct rusage ru;

	if (getrusage(RUSAGE_SELF, &ru) != 0)
		return 0;
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
	    (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* Runs the loops, one thread each, and merges what they counted into total. */
static int
run(struct load_shared *sh, const struct load_opts *o, struct load_stats *total,
    struct load_run *res, char *err, size_t errlen)
{
	struct load_loop *loops = calloc(o->threads, sizeof(*loops));
	unsigned started = 0;
	uint64_t t0, end = 0;
	double cpu0;
	int rc = -1;

	if (loops == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	for (unsigned i = 0; i < o->threads; i++) {
		unsigned share = o->concurrency / o->threads + (i < o->concurrency % o->threads);

		if (loop_init(&loops[i], sh, share, err, errlen) < 0)
			goto out;
	}
	cpu0 = cpu_seconds();
	t0 = load_now_ns();
	if (o->duration > 0)
		sh->deadline_ns = t0 + (uint64_t)(o->duration * 1e9);
	for (; started < o->threads; started++) {
		if (pthread_create(&loops[started].thread, NULL, loop_run, &loops[started]) != 0) {
			snprintf(err, errlen, "cannot start thread %u", started + 1);
			break;
		}
	}
	for (unsigned i = 0; i < started; i++) {
		pthread_join(loops[i].thread, NULL);
		stats_merge(total, &loops[i].stats);
		if (loops[i].end_ns > end)
			end = loops[i].end_ns;
	}
	res->seconds = (double)(end - t0) / 1e9;
	res->cpu_seconds = cpu_seconds() - cpu0;
	if (started == o->threads)
		rc = 0;
out:
	for (unsigned i = 0; i < o->threads; i++)
		loop_free(&loops[i]);
	free(loops);
	return rc;
}

int
main(int argc, char **argv)
{
	struct load_stats *total = malloc(sizeof(*total));     /* large: the histograms */
	struct load_opts o;
	struct load_shared sh;
	struct load_script script;
	struct load_tls *tls = NULL;
	struct load_run res = { 0, 0 };
	char err[512];
	int r;

	if (total == NULL) {
		fprintf(stderr, "smtp-load: out of memory\n");
		return EXIT_USAGE;
	}
	r = opts_parse(argc, argv, &o, err, sizeof(err));
	if (r != 0) {
		if (r == 1)
			fputs(opts_usage(), stdout);
		else
			fprintf(stderr, "smtp-load: %s\n%s", err, opts_usage());
		free(total);
		return r == 1 ? 0 : EXIT_USAGE;
	}
	memset(&sh, 0, sizeof(sh));
	sh.opts = &o;
	atomic_init(&sh.remaining, (long long)o.messages);
	if (resolve(&sh, &o, err, sizeof(err)) < 0 || script_build(&script, &o, err, sizeof(err)) < 0) {
		fprintf(stderr, "smtp-load: %s\n", err);
		free(total);
		return EXIT_USAGE;
	}
	sh.client_cfg.script = &script;
	sh.client_cfg.per_session = o.per_session;
	sh.client_cfg.pipelining = o.pipelining;
	sh.client_cfg.starttls = o.tls == OPTS_TLS_STARTTLS;
	r = EXIT_USAGE;
	if (o.tls != OPTS_TLS_NONE) {
		if (gnutls_global_init() < 0) {
			fprintf(stderr, "smtp-load: cannot initialise GnuTLS\n");
			goto out;
		}
		if ((tls = load_tls_new(&o, err, sizeof(err))) == NULL) {
			fprintf(stderr, "smtp-load: %s\n", err);
			goto out;
		}
		sh.tls = tls;
	}
	/* Writes to a closed socket fail with EPIPE instead of killing us. */
	signal(SIGPIPE, SIG_IGN);
	raise_fd_limit(o.concurrency);
	stats_init(total);
	if (run(&sh, &o, total, &res, err, sizeof(err)) < 0) {
		fprintf(stderr, "smtp-load: %s\n", err);
		goto out;
	}
	if (o.json)
		report_json(stdout, &o, total, &res);
	else
		report_human(stdout, &o, total, &res);
	r = total->msgs_failed == 0 && total->sessions_failed == 0 ? 0 : EXIT_FAILED;
out:
	load_tls_free(tls);
	if (o.tls != OPTS_TLS_NONE)
		gnutls_global_deinit();
	script_free(&script);
	free(total);
	return r;
}

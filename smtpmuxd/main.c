/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <limits.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "harden.h"
#include "hashpw.h"
#include "health.h"
#include "instance.h"
#include "log.h"
#include "master.h"
#include "privdrop.h"
#include "queue_stats.h"
#include "queue_tool.h"
#include "status.h"
#include "status_oauth.h"
#include "status_queue.h"
#include "tls.h"
#include "token_table.h"

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

struct cmdline {
	struct master_options master;
	bool check_only;                 /* -t */
	bool hash_password;              /* -H */
	bool status;                     /* -s status */
	const char *queue_cmd;           /* -s queue|flush|delete|hold|release */
	const char *queue_arg;           /* its id, "all", or NULL */
	bool debug;                      /* -d */
	char config_abs[PATH_MAX];
	char pidfile_abs[PATH_MAX];
};

static void
usage(FILE *out)
{
	fprintf(out,
	    "usage: smtpmuxd [-DdfhtV] [-c file] [-p pidfile] [-u user] [-s command [id]]\n"
	    "       smtpmuxd -H\n"
	    "  -c file     configuration file (default %s)\n"
	    "  -D          let the workers dump core (the cores hold passwords)\n"
	    "  -f          stay in the foreground and log to stderr\n"
	    "  -t          check the configuration and exit\n"
	    "  -H          read a password and print its hash for `password:`\n"
	    "  -p pidfile  write the master's pid to pidfile\n"
	    "  -u user     run the workers as user (overrides `user:`)\n"
	    "  -s status   print the downstream and queue status of the running daemon\n"
	    "  -s queue    list the queued messages\n"
	    "  -s flush [id]      retry every queued message (or one) now\n"
	    "  -s delete id|all   remove messages from the queue\n"
	    "  -s hold id, -s release id   stop and resume retrying a message\n"
	    "  -d          log debug messages\n"
	    "  -V          print the version and exit\n"
	    "  -h          print this help and exit\n",
	    config_default_path());
}

/* The master chdirs to / when it detaches, and reloads from this path. */
static int
absolute_path(const char *path, char *out, size_t outlen)
{
	char cwd[PATH_MAX];
	int n;

	if (path[0] == '/')
		n = snprintf(out, outlen, "%s", path);
	else if (getcwd(cwd, sizeof(cwd)) == NULL)
		return -1;
	else
		n = snprintf(out, outlen, "%s/%s", cwd, path);
	return n < 0 || (size_t)n >= outlen ? -1 : 0;
}

/* Returns -1 to continue, or an exit status. */
static int
parse_args(struct cmdline *cl, int argc, char **argv)
{
	const char *config = config_default_path();
	int ch, needs_arg = -1;

	while ((ch = getopt(argc, argv, "c:DdfHhp:s:tu:V")) != -1) {
		switch (ch) {
		case 'c': config = optarg; break;
		case 'D': cl->master.allow_core = true; break;
		case 'd': cl->debug = true; break;
		case 'f': cl->master.foreground = true; break;
		case 'p': cl->master.pidfile = optarg; break;
		case 't': cl->check_only = true; break;
		case 'H': cl->hash_password = true; break;
		case 'u': cl->master.user = optarg; break;
		case 'h':
			usage(stdout);
			return SMTPMUXD_EXIT_OK;
		case 'V':
			printf("smtpmuxd %s\n", PACKAGE_VERSION);
			return SMTPMUXD_EXIT_OK;
		case 's':
			if (strcmp(optarg, "status") == 0) {
				cl->status = true;
				break;
			}
			if (queue_tool_known(optarg, &needs_arg)) {
				cl->queue_cmd = optarg;
				break;
			}
			fprintf(stderr, "smtpmuxd: -s %s: unknown command (known: status, queue, "
			    "flush, delete, hold, release)\n", optarg);
			return SMTPMUXD_EXIT_USAGE;
		default:
			usage(stderr);
			return SMTPMUXD_EXIT_USAGE;
		}
	}
	if (cl->queue_cmd != NULL && needs_arg >= 0 && optind < argc)
		cl->queue_arg = argv[optind++];
	if (cl->queue_cmd != NULL && needs_arg == 1 && cl->queue_arg == NULL) {
		fprintf(stderr, "smtpmuxd: -s %s needs a queue id%s\n", cl->queue_cmd,
		    strcmp(cl->queue_cmd, "delete") == 0 ? " or \"all\"" : "");
		return SMTPMUXD_EXIT_USAGE;
	}
	if (optind < argc) {
		fprintf(stderr, "smtpmuxd: unexpected argument: %s\n", argv[optind]);
		usage(stderr);
		return SMTPMUXD_EXIT_USAGE;
	}
	if (absolute_path(config, cl->config_abs, sizeof(cl->config_abs)) < 0) {
		fprintf(stderr, "smtpmuxd: %s: %s\n", config, strerror(errno ? errno : ENAMETOOLONG));
		return SMTPMUXD_EXIT_USAGE;
	}
	cl->master.config_path = cl->config_abs;
	return -1;
}

/* -t: the same checks as start-up and reload, short of binding. */
static int
check_config(const char *path, const char *user)
{
	char err[1024];
	struct config *cfg = config_load(path, err, sizeof(err));
	struct privdrop priv;

	if (cfg == NULL) {
		fprintf(stderr, "%s\n", err);
		return SMTPMUXD_EXIT_CONFIG;
	}
	if (config_has_users(cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s\n", err);
		config_free(cfg);
		return SMTPMUXD_EXIT_NOTCONFIGURED;
	}
	if (privdrop_prepare(&priv, cfg, user, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s\n", err);
		config_free(cfg);
		return SMTPMUXD_EXIT_CONFIG;
	}
	privdrop_check_config_mode(cfg);
	config_free(cfg);
	printf("smtpmuxd: configuration %s is ok\n", path);
	return SMTPMUXD_EXIT_OK;
}

/* The uid the daemon's socket may belong to besides root and ours. */
static uid_t
service_uid(const struct config *cfg)
{
	struct passwd *pw = cfg->run_user ? getpwnam(cfg->run_user) : NULL;

	return pw != NULL ? pw->pw_uid : (uid_t)-1;
}

/* Only when the daemon handed them over; takes fd. */
static void
show_queue_figures(int fd)
{
	struct queue_stats *qs;

	if (fd < 0)
		return;
	if ((qs = queue_stats_attach(fd)) == NULL) {
		fprintf(stderr, "smtpmuxd: the queue figures: %s\n", strerror(errno));
		return;
	}
	status_queue_print(stdout, qs, time(NULL));
	queue_stats_destroy(qs);
}

/* Only when the daemon handed it over (it has OAuth downstreams); takes fd. */
static void
show_token_status(int fd)
{
	struct token_table *tokens;

	if (fd < 0)
		return;
	if ((tokens = token_table_attach(fd)) == NULL) {
		fprintf(stderr, "smtpmuxd: the OAuth token status: %s\n", strerror(errno));
		return;
	}
	status_oauth_print(stdout, tokens, time(NULL));
	token_table_destroy(tokens);
}

/* -s status: the running daemon hands over its shared state, read-only. */
static int
show_status(const char *path)
{
	char err[1024];
	struct config *cfg = config_load(path, err, sizeof(err));
	struct instance_extras x = { -1, -1 };
	struct health *h = NULL;
	int ctl_fd, live_fd;

	if (cfg == NULL) {
		fprintf(stderr, "%s\n", err);
		return SMTPMUXD_EXIT_CONFIG;
	}
	if (instance_fetch(cfg->state_file, service_uid(cfg), &ctl_fd, &live_fd, &x, err,
	    sizeof(err)) == 0 && (h = health_attach(ctl_fd, live_fd)) == NULL)
		snprintf(err, sizeof(err), "the shared state of state file %s: %s",
		    cfg->state_file, strerror(errno));
	if (h == NULL) {
		if (x.queue_fd >= 0)
			close(x.queue_fd);
		if (x.token_fd >= 0)
			close(x.token_fd);
		fprintf(stderr, "smtpmuxd: %s\n", err);
		config_free(cfg);
		return SMTPMUXD_EXIT_RUNTIME;
	}
	status_print(stdout, h, &cfg->health, time(NULL));
	status_print_cluster(stdout, cfg, h);
	show_token_status(x.token_fd);
	health_destroy(h);
	show_queue_figures(x.queue_fd);
	config_free(cfg);
	return SMTPMUXD_EXIT_OK;
}

static int
set_pidfile(struct cmdline *cl)
{
	/* Detached root daemons get one by default, as init scripts expect. */
	if (cl->master.pidfile == NULL && !cl->master.foreground && geteuid() == 0)
		cl->master.pidfile = RUNSTATEDIR "/smtpmuxd.pid";
	if (cl->master.pidfile == NULL)
		return 0;
	if (absolute_path(cl->master.pidfile, cl->pidfile_abs, sizeof(cl->pidfile_abs)) < 0) {
		fprintf(stderr, "smtpmuxd: %s: %s\n", cl->master.pidfile, strerror(errno));
		return -1;
	}
	cl->master.pidfile = cl->pidfile_abs;
	return 0;
}

static int
run(struct cmdline *cl)
{
	if (cl->hash_password)
		return hashpw_run();
	if (cl->check_only)
		return check_config(cl->master.config_path, cl->master.user);
	if (cl->status)
		return show_status(cl->master.config_path);
	if (cl->queue_cmd != NULL)
		return queue_tool_run(cl->master.config_path, cl->queue_cmd, cl->queue_arg);
	if (set_pidfile(cl) < 0)
		return SMTPMUXD_EXIT_USAGE;
	return master_run(&cl->master);
}

int
main(int argc, char **argv)
{
	struct cmdline cl;
	int status;

	memset(&cl, 0, sizeof(cl));
	status = parse_args(&cl, argc, argv);
	if (status >= 0)
		return status;
	if (!cl.check_only && !cl.status)
		harden_close_inherited();
	log_open("smtpmuxd", LOG_TO_STDERR, NULL);
	log_set_level(cl.debug ? LOG_LEVEL_DEBUG : LOG_LEVEL_INFO);
	log_hook_libevent();
	if (tls_global_init() < 0) {
		fprintf(stderr, "smtpmuxd: cannot initialise GnuTLS\n");
		return SMTPMUXD_EXIT_RUNTIME;
	}
	status = run(&cl);
	tls_global_deinit();
	log_close();
	return status;
}

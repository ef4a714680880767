/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "log.h"
#include "privdrop.h"

#define PRIVDROP_DEFAULT_USER "smtpmux"   /* as config.c defaults `user:` */
#define PRIVDROP_FALLBACK_USER "nobody"

static int
resolve_user(struct privdrop *pd, const char *user, char *err, size_t errlen)
{
	struct passwd *pw;

	errno = 0;
	pw = getpwnam(user);
	if (pw == NULL) {
		snprintf(err, errlen, "user %s: %s (create the account or set `user:` in the "
		    "configuration)", user, errno ? strerror(errno) : "no such user");
		return -1;
	}
	pd->uid = pw->pw_uid;
	pd->gid = pw->pw_gid;
	snprintf(pd->user, sizeof(pd->user), "%s", user);
	snprintf(pd->group, sizeof(pd->group), "%lu", (unsigned long)pw->pw_gid);
	return 0;
}

static int
resolve_group(struct privdrop *pd, const char *group, char *err, size_t errlen)
{
	struct group *gr;

	errno = 0;
	gr = getgrnam(group);
	if (gr == NULL) {
		snprintf(err, errlen, "group %s: %s", group,
		    errno ? strerror(errno) : "no such group");
		return -1;
	}
	pd->gid = gr->gr_gid;
	snprintf(pd->group, sizeof(pd->group), "%s", group);
	return 0;
}

int
privdrop_prepare(struct privdrop *pd, const struct config *cfg,
    const char *user_override, char *err, size_t errlen)
{
	const char *user = user_override ? user_override : cfg->run_user;

	memset(pd, 0, sizeof(*pd));
	if (geteuid() != 0) {
		if (user_override != NULL)
			log_warn("not started as root: -u %s ignored", user_override);
		return 0;
	}
	if (cfg->run_as_root && user_override == NULL) {
		log_warn("run_as_root: workers keep root privileges");
		return 0;
	}
	if (user == NULL || *user == '\0')
		user = PRIVDROP_DEFAULT_USER;
	if (resolve_user(pd, user, err, errlen) < 0) {
		/* Packages create the default account; a plain `make install` (or
		 * the prototype's config, which has no `user:`) still runs, as an
		 * account that owns nothing. An explicit choice is never replaced. */
		if (user_override != NULL || strcmp(user, PRIVDROP_DEFAULT_USER) != 0 ||
		    resolve_user(pd, PRIVDROP_FALLBACK_USER, err, errlen) < 0)
			return -1;
		log_warn("user %s does not exist: workers run as %s (create the account "
		    "or set `user:` in the configuration)", user, PRIVDROP_FALLBACK_USER);
	}
	if (cfg->run_group != NULL && *cfg->run_group != '\0' &&
	    resolve_group(pd, cfg->run_group, err, errlen) < 0)
		return -1;
	if (pd->uid == 0 && !cfg->run_as_root) {
		snprintf(err, errlen, "user %s: refusing to run workers with root privileges "
		    "(set run_as_root: true to allow it)", pd->user);
		return -1;
	}
	pd->enabled = pd->uid != 0;
	return 0;
}

static int
cannot_regain_root(const struct privdrop *pd)
{
	if (getuid() != pd->uid || geteuid() != pd->uid ||
	    getgid() != pd->gid || getegid() != pd->gid)
		return 0;
	if (setuid(0) == 0 || seteuid(0) == 0)
		return 0;
	return 1;
}

static int
switch_user(const struct privdrop *pd)
{
	/* Supplementary groups are root's until replaced: keep only ours. */
	if (setgroups(1, &pd->gid) < 0 || setgid(pd->gid) < 0 || setuid(pd->uid) < 0) {
		log_err("cannot drop privileges to user %s: %s", pd->user, strerror(errno));
		return -1;
	}
	if (!cannot_regain_root(pd)) {
		log_err("privilege drop to user %s did not stick", pd->user);
		return -1;
	}
#ifdef PR_SET_NO_NEW_PRIVS
	/* Workers never exec; make sure nothing they might run gains privileges. */
	(void)prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
#endif
	return 0;
}

int
privdrop_apply(const struct privdrop *pd)
{
	if (pd->enabled && switch_user(pd) < 0)
		return -1;
#ifdef PR_SET_DUMPABLE
	/* After setuid() the kernel makes the process undumpable anyway. */
	if (pd->core_dumps)
		(void)prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
#endif
	return 0;
}

void
privdrop_check_config_mode(const struct config *cfg)
{
	struct stat st;

	if (!cfg->inline_secrets || cfg->path == NULL || stat(cfg->path, &st) < 0)
		return;
	if (st.st_mode & S_IROTH)
		log_warn("%s is readable by other users but holds passwords: "
		    "chmod o-r %s (or move them to password_file / pass_file)", cfg->path, cfg->path);
}

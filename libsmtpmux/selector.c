/* SPDX-License-Identifier: MIT */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "selector_host.h"

#ifndef PKGLIBDIR
#define PKGLIBDIR "/usr/local/lib/smtpmux"
#endif

/* The smallest struct_size that holds every field ABI version 1 defines. */
#define SELECTOR_V1_SIZE \
	(offsetof(struct smtpmux_selector, fini) + sizeof(void (*)(void *)))

struct selector_inst {
	void *handle;                        /* from dlopen */
	const struct smtpmux_selector *desc; /* the plug-in's exported struct */
	void *state;                         /* from its init() */
	char *file;                          /* the file loaded */
};

/*
 * Path resolution: one search, remembered so that a failed search can say
 * where it looked.
 */
struct search {
	const char *path;                    /* as configured */
	char found[PATH_MAX];
	char tried[512];                     /* directories, for the error */
};

static const char *
base_name(const char *path)
{
	const char *slash = strrchr(path, '/');

	return slash != NULL ? slash + 1 : path;
}

static bool
has_so_suffix(const char *name)
{
	size_t len = strlen(name);

	return len >= 3 && strcmp(name + len - 3, ".so") == 0;
}

static bool
is_regular_file(const char *file)
{
	struct stat st;

	return stat(file, &st) == 0 && S_ISREG(st.st_mode);
}

/*
 * Tries dir/name, then dir/name.so when name lacks the suffix, so that
 * `selector: {path: weighted}` finds weighted.so. dir NULL: name as is.
 */
static bool
search_try(struct search *s, const char *dir, const char *name)
{
	const char *sep = dir != NULL ? "/" : "";
	size_t i, tries = has_so_suffix(name) ? 1 : 2;
	int len;

	for (i = 0; i < tries; i++) {
		len = snprintf(s->found, sizeof(s->found), "%s%s%s%s",
		    dir != NULL ? dir : "", sep, name, i == 1 ? ".so" : "");
		if (len < 0 || (size_t)len >= sizeof(s->found))
			continue;
		if (is_regular_file(s->found))
			return true;
	}
	return false;
}

/* A long list is cut short: it only serves the error message. */
static void
search_note(struct search *s, const char *dir)
{
	size_t used = strlen(s->tried), room = sizeof(s->tried) - used;
	int len;

	len = snprintf(s->tried + used, room, "%s%s", used > 0 ? ", " : "", dir);
	if (len < 0)
		s->tried[used] = '\0';
}

/* Each directory of SMTPMUX_SELECTOR_PATH, with path and with its base name. */
static bool
search_env(struct search *s)
{
	const char *env = getenv("SMTPMUX_SELECTOR_PATH");
	const char *dir, *end;
	char buf[PATH_MAX];
	size_t len;

	for (dir = env; dir != NULL && *dir != '\0'; dir = *end ? end + 1 : end) {
		end = strchr(dir, ':');
		if (end == NULL)
			end = dir + strlen(dir);
		len = (size_t)(end - dir);
		if (len == 0 || len >= sizeof(buf))
			continue;
		memcpy(buf, dir, len);
		buf[len] = '\0';
		search_note(s, buf);
		if (search_try(s, buf, s->path) ||
		    (base_name(s->path) != s->path &&
		    search_try(s, buf, base_name(s->path))))
			return true;
	}
	return false;
}

/*
 * Absolute paths are used as they are. A relative one is looked up against
 * the config file's folder (where an administrator keeps their own
 * selectors), then SMTPMUX_SELECTOR_PATH (tests, development trees), then
 * the installed selectors; the prototype's "selectors/round_robin.so" thus
 * finds PKGLIBDIR/round_robin.so.
 */
static int
selector_resolve(struct search *s, const char *config_dir, char *err,
    size_t errlen)
{
	if (s->path[0] == '/') {
		/* Not there: dlopen() will say why, naming the file. */
		if (!search_try(s, NULL, s->path))
			snprintf(s->found, sizeof(s->found), "%s", s->path);
		return 0;
	}
	if (config_dir != NULL && *config_dir != '\0') {
		search_note(s, config_dir);
		if (search_try(s, config_dir, s->path))
			return 0;
	}
	if (search_env(s))
		return 0;
	search_note(s, PKGLIBDIR);
	if (search_try(s, PKGLIBDIR, base_name(s->path)))
		return 0;
	snprintf(err, errlen, "cannot load selector '%s': not found in %s",
	    s->path, s->tried);
	return -1;
}

static int
selector_check(const struct smtpmux_selector *desc, const char *file,
    char *err, size_t errlen)
{
	if (desc->abi_version != SMTPMUX_SELECTOR_ABI_VERSION) {
		snprintf(err, errlen, "selector %s: ABI version %u, this smtpmuxd "
		    "supports %d", file, (unsigned)desc->abi_version,
		    SMTPMUX_SELECTOR_ABI_VERSION);
		return -1;
	}
	if (desc->struct_size < SELECTOR_V1_SIZE) {
		snprintf(err, errlen, "selector %s: struct_size %u, ABI version %d "
		    "needs at least %zu", file, (unsigned)desc->struct_size,
		    SMTPMUX_SELECTOR_ABI_VERSION, (size_t)SELECTOR_V1_SIZE);
		return -1;
	}
	if (desc->name == NULL || desc->select == NULL) {
		snprintf(err, errlen, "selector %s: no %s", file,
		    desc->name == NULL ? "name" : "select function");
		return -1;
	}
	return 0;
}

/* A selector without init() takes no parameters: refuse any, like init would. */
static int
selector_init(struct selector_inst *sel,
    const struct smtpmux_selector_param *params, size_t n_params,
    char *err, size_t errlen)
{
	char why[256] = "";

	if (sel->desc->init == NULL) {
		if (n_params == 0)
			return 0;
		snprintf(err, errlen, "selector %s: init failed: unknown "
		    "parameter '%s'", sel->file, params[0].key);
		return -1;
	}
	if (sel->desc->init(&sel->state, params, n_params, why, sizeof(why)) == 0)
		return 0;
	why[sizeof(why) - 1] = '\0';
	snprintf(err, errlen, "selector %s: init failed: %s", sel->file,
	    why[0] != '\0' ? why : "no reason given");
	return -1;
}

static struct selector_inst *
selector_open(const char *path, const char *file, char *err, size_t errlen)
{
	struct selector_inst *sel;

	if ((sel = calloc(1, sizeof(*sel))) == NULL ||
	    (sel->file = strdup(file)) == NULL) {
		snprintf(err, errlen, "cannot load selector '%s': %s", path,
		    strerror(errno));
		free(sel);
		return NULL;
	}
	if ((sel->handle = dlopen(file, RTLD_NOW | RTLD_LOCAL)) == NULL) {
		snprintf(err, errlen, "cannot load selector '%s': %s", path,
		    dlerror());
		goto fail;
	}
	sel->desc = dlsym(sel->handle, SMTPMUX_SELECTOR_SYMBOL);
	if (sel->desc == NULL) {
		snprintf(err, errlen, "selector %s: no symbol '%s' (not an "
		    "smtpmux selector?)", file, SMTPMUX_SELECTOR_SYMBOL);
		goto fail;
	}
	if (selector_check(sel->desc, file, err, errlen) == -1)
		goto fail;
	return sel;
fail:
	if (sel->handle != NULL)
		dlclose(sel->handle);
	free(sel->file);
	free(sel);
	return NULL;
}

struct selector_inst *
selector_load(const char *path, const char *config_dir,
    const struct smtpmux_selector_param *params, size_t n_params,
    char **resolved, char *err, size_t errlen)
{
	struct search s = { .path = path };
	struct selector_inst *sel;

	if (resolved != NULL)
		*resolved = NULL;
	if (path == NULL || *path == '\0') {
		snprintf(err, errlen, "selector path is empty");
		return NULL;
	}
	if (selector_resolve(&s, config_dir, err, errlen) == -1)
		return NULL;
	if ((sel = selector_open(path, s.found, err, errlen)) == NULL)
		return NULL;
	if (selector_init(sel, params, n_params, err, errlen) == -1) {
		/* init() failed: it kept nothing, so there is nothing to fini(). */
		sel->desc = NULL;
		selector_free(sel);
		return NULL;
	}
	if (resolved != NULL && (*resolved = strdup(sel->file)) == NULL) {
		snprintf(err, errlen, "selector %s: %s", sel->file,
		    strerror(errno));
		selector_free(sel);
		return NULL;
	}
	return sel;
}

void
selector_free(struct selector_inst *sel)
{
	if (sel == NULL)
		return;
	if (sel->desc != NULL && sel->desc->fini != NULL)
		sel->desc->fini(sel->state);
	dlclose(sel->handle);
	free(sel->file);
	free(sel);
}

const char *
selector_name(const struct selector_inst *sel)
{
	return sel->desc->name;
}

/*
 * Keeps the first occurrence of each index below n, in order. Quadratic,
 * but a user has a handful of downstreams and this needs no allocation.
 */
static size_t
order_keep_valid(size_t *order, size_t k, size_t n)
{
	size_t i, j, kept = 0;

	for (i = 0; i < k; i++) {
		if (order[i] >= n)
			continue;
		for (j = 0; j < kept && order[j] != order[i]; j++)
			;
		if (j == kept)
			order[kept++] = order[i];
	}
	return kept;
}

size_t
selector_order(struct selector_inst *sel, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	size_t k;

	if (n == 0)
		return 0;
	k = sel->desc->select(sel->state, env, ds, n, order);
	if (k > n)
		k = n;
	k = order_keep_valid(order, k, n);
	smtpmux_order_available(ds, order, k);
	return k;
}

/* SPDX-License-Identifier: MIT */
/*
 * A selector that does what its parameters say, to test the host:
 *   order: "2,7,2,0"   select() returns these indices as they are (even
 *                      out of range or repeated), at most n of them
 *   fail: "message"    init() fails with this message
 *   abort_rcpt: "addr" select() calls abort() when the first recipient is
 *                      addr: a selector that crashes its worker
 * Any other parameter: init() fails with "unknown parameter 'key'".
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <smtpmux/selector.h>

#define SCRIPT_MAX 16

struct script {
	size_t order[SCRIPT_MAX];
	size_t len;
	char abort_rcpt[256];
};

static int
script_parse(struct script *sc, const char *list, char *err, size_t errlen)
{
	const char *p = list;
	char *end;

	for (sc->len = 0; *p != '\0' && sc->len < SCRIPT_MAX; p = end + (*end == ',')) {
		sc->order[sc->len++] = strtoul(p, &end, 10);
		if (end == p || (*end != ',' && *end != '\0')) {
			snprintf(err, errlen, "bad order '%s'", list);
			return -1;
		}
	}
	return 0;
}

static int
scripted_init(void **state, const struct smtpmux_selector_param *params,
    size_t n_params, char *err, size_t errlen)
{
	struct script *sc;
	size_t i;

	if ((sc = calloc(1, sizeof(*sc))) == NULL) {
		snprintf(err, errlen, "%s", strerror(errno));
		return -1;
	}
	for (i = 0; i < n_params; i++) {
		if (strcmp(params[i].key, "fail") == 0)
			snprintf(err, errlen, "%s", params[i].value);
		else if (strcmp(params[i].key, "abort_rcpt") == 0) {
			snprintf(sc->abort_rcpt, sizeof(sc->abort_rcpt), "%s", params[i].value);
			continue;
		}
		else if (strcmp(params[i].key, "order") != 0)
			snprintf(err, errlen, "unknown parameter '%s'", params[i].key);
		else if (script_parse(sc, params[i].value, err, errlen) == 0)
			continue;
		free(sc);
		return -1;
	}
	*state = sc;
	return 0;
}

static size_t
scripted_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	const struct script *sc = state;
	size_t k = sc->len < n ? sc->len : n;

	if (sc->abort_rcpt[0] != '\0' && env->n_rcpts > 0 &&
	    strcmp(env->rcpts[0], sc->abort_rcpt) == 0)
		abort();
	memcpy(order, sc->order, k * sizeof(*order));
	return k;
}

static void
scripted_fini(void *state)
{
	free(state);
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "scripted",
	.init = scripted_init,
	.select = scripted_select,
	.fini = scripted_fini,
};

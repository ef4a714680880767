/* SPDX-License-Identifier: MIT */
/*
 * by_domain: an example smtpmux selector.
 *
 * Prefers the downstream named after the first recipient's domain (give
 * downstreams `name: example.org`), then the others in configuration order.
 * Build it out of tree with
 *   cc -shared -fPIC $(pkg-config --cflags smtpmux) by_domain.c -o by_domain.so
 * and set `selector: {path: /path/to/by_domain.so}` for a user.
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include <smtpmux/selector.h>

static int
by_domain_init(void **state, const struct smtpmux_selector_param *params,
    size_t n_params, char *err, size_t errlen)
{
	*state = NULL;
	if (n_params > 0) {
		snprintf(err, errlen, "unknown parameter '%s'", params[0].key);
		return -1;
	}
	return 0;
}

static int
same_name(const char *a, const char *b)
{
	while (*a != 0 && tolower((unsigned char)*a) == tolower((unsigned char)*b)) {
		a++;
		b++;
	}
	return *a == 0 && *b == 0;
}

static size_t
by_domain_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	const char *at = NULL;
	size_t i, k = 0;

	if (env->n_rcpts > 0)
		at = strrchr(env->rcpts[0], '@');
	for (i = 0; i < n; i++)
		if (at != NULL && same_name(ds[i].name, at + 1))
			order[k++] = i;
	for (i = 0; i < n; i++)
		if (at == NULL || !same_name(ds[i].name, at + 1))
			order[k++] = i;
	return k;
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "by_domain",
	.init = by_domain_init,
	.select = by_domain_select,
};

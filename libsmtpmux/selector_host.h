/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SELECTOR_HOST_H
#define SMTPMUX_SELECTOR_HOST_H

#include <stddef.h>

#include <smtpmux/selector.h>

/*
 * Loading selectors with dlopen and checking their ABI. One selector_inst
 * per user: the shared object's descriptor plus the state its init() made
 * from that user's params.
 */

struct selector_inst;

/*
 * Resolves path (absolute: as is; relative: against config_dir, then each
 * directory of SMTPMUX_SELECTOR_PATH, then PKGLIBDIR by base name; a bare
 * name like "round_robin" also finds "round_robin.so"), loads it, checks
 * abi_version/struct_size/required functions, and calls init(params).
 * Returns NULL with one line in err on any failure ("cannot load selector
 * 'X': not found in A, B", "selector X: ABI version 2, this smtpmuxd ...",
 * "selector X: init failed: unknown param foo").
 * *resolved (if not NULL) receives a malloc'd copy of the file loaded.
 */
struct selector_inst *selector_load(const char *path, const char *config_dir,
    const struct smtpmux_selector_param *params, size_t n_params,
    char **resolved, char *err, size_t errlen);

void selector_free(struct selector_inst *);

const char *selector_name(const struct selector_inst *);

/*
 * Runs select() and applies the host policy: drops out-of-range and
 * repeated indices, then moves unavailable downstreams after available ones
 * (smtpmux_order_available). Returns the number of indices in order[].
 */
size_t selector_order(struct selector_inst *, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order);

#endif

/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CONFIG_QUEUE_H
#define SMTPMUX_CONFIG_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cyaml/cyaml.h>

#include "config.h"

/*
 * The `queue:` section: its YAML layout (for config.c's schema) and the
 * checks that turn it into a struct queue_cfg. Private to the
 * configuration loader; everyone else reads struct queue_cfg.
 */

/* Optional scalars are pointers, so that "absent" and "0" differ. */
struct raw_queue {
	bool *enabled;
	enum queue_mode *mode;
	char *dir;
	uint64_t *max_size;
	unsigned *min_backoff;
	unsigned *max_backoff;
	unsigned *max_lifetime;
	unsigned *max_concurrency;
	bool *bounce;
	unsigned *delay_warning;
};

extern const cyaml_schema_field_t config_queue_fields[];

/*
 * Fills q from raw (NULL: the section is absent) with the defaults; a
 * relative dir is taken relative to base_dir. Returns 0, or -1 with the
 * offending key of the section in *key ("" for the section itself) and the
 * reason in why; ENOMEM shows as "out of memory".
 */
int config_queue_check(const struct raw_queue *raw, const char *base_dir,
    struct queue_cfg *q, const char **key, char *why, size_t whylen);

void config_queue_free(struct queue_cfg *q);

/* The default spool folder: LOCALSTATEDIR "/spool/smtpmux". */
const char *config_queue_default_dir(void);

#endif

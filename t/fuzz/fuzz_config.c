/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target for the configuration loader: every input is checked as
 * a configuration file (config_check_text: the YAML scan with line numbers,
 * libcyaml's schema, every rule), without loading what it names, so no
 * selector is ever dlopen()ed. Besides crashes, sanitizer reports and
 * libFuzzer's memory limit (a file that expands beyond it is a bug: see
 * MAX_NODES in config_lines.c), it aborts when the loader breaks a promise:
 *  - a refused file gets one line that starts with "FILE:";
 *  - in a file that loads, every user has a downstream (a file may have
 *    no users: it loads, and the daemon refuses to run it).
 * See README in this folder.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define require(cond) do { if (!(cond)) abort(); } while (0)
#define NAME "/fuzz/smtpmux.yaml"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[1024] = "";
	struct config *cfg;

	cfg = config_check_text(NAME, (const char *)data, size, err, sizeof(err));
	if (cfg == NULL) {
		require(strncmp(err, NAME ":", strlen(NAME) + 1) == 0);
		require(strchr(err, '\n') == NULL && strchr(err, '\r') == NULL);
		return 0;
	}
	for (size_t i = 0; i < cfg->n_users; i++)
		require(cfg->users[i].n_downstreams > 0);
	config_free(cfg);
	return 0;
}

/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_REPORT_H
#define SMTP_LOAD_REPORT_H

#include <stdio.h>

#include "opts.h"
#include "stats.h"

/* What a run measured, besides the counters. */
struct load_run {
	double seconds;                 /* from the first connect to the end of the last session */
	double cpu_seconds;             /* smtp-load's own user + system time */
};

/* The summary for people, several lines. */
void report_human(FILE *, const struct load_opts *, const struct load_stats *, const struct load_run *);
/* One JSON object on one line; the fields are listed in contrib/bench/README. */
void report_json(FILE *, const struct load_opts *, const struct load_stats *, const struct load_run *);

#endif

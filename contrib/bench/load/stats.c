/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <string.h>

#include "stats.h"

static const char *const fault_names[FAULT_KINDS] = {
	[FAULT_CONNECT] = "connect",
	[FAULT_RESET] = "reset",
	[FAULT_CLOSED] = "closed",
	[FAULT_TIMEOUT] = "timeout",
	[FAULT_TLS] = "tls",
	[FAULT_PROTOCOL] = "protocol",
	[FAULT_NO_STARTTLS] = "no-starttls",
};

void
stats_init(struct load_stats *s)
{
	memset(s, 0, sizeof(*s));
	hist_init(&s->msg_latency);
	hist_init(&s->session_latency);
}

/* Keeps the first text seen for each key, up to STATS_SAMPLES keys. */
static void
stats_keep_sample(struct load_stats *s, const char *key, const char *text)
{
	if (stats_sample(s, key) != NULL || s->n_samples == STATS_SAMPLES)
		return;
	snprintf(s->samples[s->n_samples].key, sizeof(s->samples[0].key), "%s", key);
	snprintf(s->samples[s->n_samples].text, sizeof(s->samples[0].text), "%s", text);
	s->n_samples++;
}

void
stats_merge(struct load_stats *into, const struct load_stats *from)
{
	into->msgs_ok += from->msgs_ok;
	into->msgs_failed += from->msgs_failed;
	into->sessions_ok += from->sessions_ok;
	into->sessions_failed += from->sessions_failed;
	into->sessions_pipelined += from->sessions_pipelined;
	for (int i = 0; i < STATS_CODES; i++)
		into->code_errors[i] += from->code_errors[i];
	for (int i = 0; i < FAULT_KINDS; i++)
		into->fault_errors[i] += from->fault_errors[i];
	for (unsigned i = 0; i < from->n_samples; i++)
		stats_keep_sample(into, from->samples[i].key, from->samples[i].text);
	hist_merge(&into->msg_latency, &from->msg_latency);
	hist_merge(&into->session_latency, &from->session_latency);
}

void
stats_reply_error(struct load_stats *s, int code, const char *stage, const char *text)
{
	char key[16], sample[STATS_SAMPLE_LEN];

	if (code < 0 || code >= STATS_CODES)
		code = 0;
	s->code_errors[code]++;
	snprintf(key, sizeof(key), "%03d", code);
	snprintf(sample, sizeof(sample), "%s: %03d %s", stage, code, text);
	stats_keep_sample(s, key, sample);
}

void
stats_fault(struct load_stats *s, enum load_fault f, const char *detail)
{
	s->fault_errors[f]++;
	stats_keep_sample(s, fault_names[f], detail);
}

const char *
stats_fault_name(enum load_fault f)
{
	return fault_names[f];
}

uint64_t
stats_error_total(const struct load_stats *s)
{
	uint64_t total = 0, n;
	char key[16];

	for (unsigned i = 0; stats_error_key(s, i, key, &n); i++)
		total += n;
	return total;
}

bool
stats_error_key(const struct load_stats *s, unsigned i, char key[16], uint64_t *count)
{
	if (i < STATS_CODES) {
		snprintf(key, 16, "%03u", i);
		*count = s->code_errors[i];
		return true;
	}
	if (i >= STATS_KEYS)
		return false;
	snprintf(key, 16, "%s", fault_names[i - STATS_CODES]);
	*count = s->fault_errors[i - STATS_CODES];
	return true;
}

const char *
stats_sample(const struct load_stats *s, const char *key)
{
	for (unsigned i = 0; i < s->n_samples; i++)
		if (strcmp(s->samples[i].key, key) == 0)
			return s->samples[i].text;
	return NULL;
}

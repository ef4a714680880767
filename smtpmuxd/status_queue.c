/* SPDX-License-Identifier: MIT */
#include <inttypes.h>

#include "status_queue.h"
#include "status_snapshot.h"

static int64_t
oldest_age(const struct queue_stats_view *v, time_t now)
{
	return v->messages > 0 && v->oldest > 0 && (int64_t)now > v->oldest ?
	    (int64_t)now - v->oldest : 0;
}

void
status_queue_print(FILE *out, const struct queue_stats *qs, time_t now)
{
	struct queue_stats_view v;

	queue_stats_read(qs, &v);
	fprintf(out, "\nQUEUE  %" PRIu64 " message(s), %" PRIu64 " octets, oldest %" PRId64
	    " s; since start: queued %" PRIu64 ", delivered %" PRIu64 ", deferred %" PRIu64
	    ", bounced %" PRIu64 ", expired %" PRIu64 ", deleted %" PRIu64
	    ", notifications %" PRIu64 "\n", v.messages, v.bytes, oldest_age(&v, now),
	    v.counter[QUEUE_QUEUED], v.counter[QUEUE_DELIVERED], v.counter[QUEUE_DEFERRED],
	    v.counter[QUEUE_BOUNCED], v.counter[QUEUE_EXPIRED], v.counter[QUEUE_DELETED],
	    v.counter[QUEUE_DSN]);
}

void
status_queue_summary(const struct queue_stats *qs, time_t now, struct status_queue_summary *out)
{
	struct queue_stats_view v;

	queue_stats_read(qs, &v);
	out->present = true;
	out->messages = v.messages;
	out->bytes = v.bytes;
	out->oldest_age = (uint64_t)oldest_age(&v, now);
	out->delivered = v.counter[QUEUE_DELIVERED];
	out->bounced = v.counter[QUEUE_BOUNCED];
	out->expired = v.counter[QUEUE_EXPIRED];
}

static const char *const counter_help[QUEUE_NCOUNTERS] = {
	"Messages written to the queue.",
	"Queued messages delivered by the queue runner.",
	"Queue runner attempts that failed temporarily.",
	"Queued messages refused permanently by every downstream.",
	"Queued messages given up after queue.max_lifetime.",
	"Queued messages removed with smtpmuxd -s delete.",
	"Delivery status notifications queued for senders.",
};

int
status_queue_metrics(struct evbuffer *out, const struct queue_stats *qs, time_t now)
{
	struct queue_stats_view v;
	int rc = 0;

	queue_stats_read(qs, &v);
	rc |= evbuffer_add_printf(out, "# HELP smtpmux_queue_messages Messages in the queue.\n"
	    "# TYPE smtpmux_queue_messages gauge\nsmtpmux_queue_messages %" PRIu64 "\n",
	    v.messages) < 0;
	rc |= evbuffer_add_printf(out, "# HELP smtpmux_queue_bytes Octets in the queue.\n"
	    "# TYPE smtpmux_queue_bytes gauge\nsmtpmux_queue_bytes %" PRIu64 "\n", v.bytes) < 0;
	rc |= evbuffer_add_printf(out, "# HELP smtpmux_queue_oldest_age_seconds Age of the "
	    "oldest queued message; 0 when the queue is empty.\n"
	    "# TYPE smtpmux_queue_oldest_age_seconds gauge\n"
	    "smtpmux_queue_oldest_age_seconds %" PRId64 "\n", oldest_age(&v, now)) < 0;
	for (int c = 0; c < QUEUE_NCOUNTERS; c++)
		rc |= evbuffer_add_printf(out, "# HELP smtpmux_queue_%s_total %s\n"
		    "# TYPE smtpmux_queue_%s_total counter\nsmtpmux_queue_%s_total %" PRIu64 "\n",
		    queue_counter_name(c), counter_help[c], queue_counter_name(c),
		    queue_counter_name(c), v.counter[c]) < 0;
	return rc ? -1 : 0;
}

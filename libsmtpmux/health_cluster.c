/* SPDX-License-Identifier: MIT */
/*
 * The instance's share of a cluster in the live segment (struct
 * live_cluster): its id, and which processes have their link to Redis up.
 * Workers write their own slot; the master clears a dead one's; status
 * readers count them.
 */
#include <sys/random.h>
#include <unistd.h>

#include "health_layout.h"

void
health_cluster_init(struct health *h)
{
	uint64_t id = 0;

	/* Not a secret: it only has to differ between instances. */
	if (getrandom(&id, sizeof(id), 0) != (ssize_t)sizeof(id))
		id = (uint64_t)time(NULL) << 20 ^ (uint64_t)getpid();
	atomic_store(&h->live->cluster.instance, id ? id : 1);
}

void
health_cluster_gone(struct health *h, unsigned slot)
{
	if (slot >= HEALTH_MAX_WORKER_SLOTS)
		return;
	atomic_store(&h->live->cluster.link[slot], HEALTH_LINK_NONE);
}

void
health_link_set(struct health *h, unsigned slot, enum health_link state, time_t now)
{
	struct live_cluster *c;

	if (h == NULL || h->live == NULL || slot >= HEALTH_MAX_WORKER_SLOTS)
		return;
	c = &h->live->cluster;
	atomic_store(&c->link_since[slot], (int64_t)now);
	atomic_store(&c->link[slot], (uint32_t)state);
}

void
health_link_summary(const struct health *h, struct health_link_summary *out)
{
	const struct live_cluster *c = &h->live->cluster;

	*out = (struct health_link_summary){ 0 };
	for (unsigned s = 0; s < HEALTH_WORKER_SLOTS; s++) {
		uint32_t state = atomic_load(&c->link[s]);
		time_t since = (time_t)atomic_load(&c->link_since[s]);

		if (state == HEALTH_LINK_NONE)
			continue;
		if (state == HEALTH_LINK_UP)
			out->up++;
		else
			out->down++;
		if (since > out->since)
			out->since = since;
	}
	out->local_decisions = atomic_load(&c->local_decisions);
}

void
health_count_local_decision(struct health *h)
{
	if (h != NULL)
		atomic_fetch_add_explicit(&h->live->cluster.local_decisions, 1, memory_order_relaxed);
}

uint64_t
health_instance(const struct health *h)
{
	return atomic_load(&h->live->cluster.instance);
}

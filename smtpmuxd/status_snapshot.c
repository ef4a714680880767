/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status_snapshot.h"

static int
user_take(struct status_user *u, const struct user_cfg *uc, const struct health *h,
    const struct health_cfg *hc, time_t now)
{
	snprintf(u->email, sizeof(u->email), "%s", uc->email);
	u->ds = calloc(uc->n_downstreams ? uc->n_downstreams : 1, sizeof(*u->ds));
	if (u->ds == NULL)
		return -1;
	for (size_t i = 0; i < uc->n_downstreams; i++) {
		const struct downstream_cfg *dc = &uc->downstreams[i];
		struct status_downstream *d = &u->ds[u->n_ds];

		/* A downstream not bound to a record (none yet) has nothing to show. */
		if (dc->health == NULL || health_snapshot_of(h, dc->health, hc, now, &d->hs) < 0)
			continue;
		snprintf(d->name, sizeof(d->name), "%s", dc->name);
		u->n_ds++;
	}
	return 0;
}

int
status_snapshot_take(struct status_snapshot *out, const struct config *cfg,
    const struct health *h, time_t now)
{
	memset(out, 0, sizeof(*out));
	out->now = now;
	snprintf(out->hostname, sizeof(out->hostname), "%s", cfg->hostname ? cfg->hostname : "");
	out->users = calloc(cfg->n_users ? cfg->n_users : 1, sizeof(*out->users));
	if (out->users == NULL)
		return -1;
	for (size_t i = 0; i < cfg->n_users; i++) {
		out->n_users++;
		if (user_take(&out->users[i], &cfg->users[i], h, &cfg->health, now) < 0) {
			status_snapshot_free(out);
			return -1;
		}
	}
	status_cluster_take(&out->cluster, cfg, h);
	/* The queue's figures come from elsewhere (status_queue_summary()). */
	return 0;
}

void
status_cluster_take(struct status_cluster_summary *out, const struct config *cfg,
    const struct health *h)
{
	struct health_link_summary ls;

	memset(out, 0, sizeof(*out));
	if (!cfg->cluster.enabled)
		return;
	health_link_summary(h, &ls);
	out->present = true;
	snprintf(out->address, sizeof(out->address), "%s", cfg->cluster.url.display);
	out->linked = ls.up;
	out->workers = ls.up + ls.down;
	out->since = ls.since;
	out->local_decisions = ls.local_decisions;
}

void
status_snapshot_free(struct status_snapshot *s)
{
	for (size_t i = 0; i < s->n_users; i++)
		free(s->users[i].ds);
	free(s->users);
	s->users = NULL;
	s->n_users = 0;
}

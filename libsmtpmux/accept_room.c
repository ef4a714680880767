/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>

#include "accept_room.h"
#include "shared_anon.h"

/* The handle is each process's own (inherited by fork); only the flags are
 * shared, so a worker that writes anything there cannot change the size
 * the master unmaps or the slots it walks. */
struct accept_room {
	unsigned slots;
	atomic_bool *has_room;           /* shared: one flag per worker slot */
};

struct accept_room *
accept_room_create(unsigned worker_slots)
{
	struct accept_room *r;

	if (worker_slots == 0) {
		errno = EINVAL;
		return NULL;
	}
	if ((r = calloc(1, sizeof(*r))) == NULL)
		return NULL;
	r->slots = worker_slots;
	if ((r->has_room = shared_anon_map(worker_slots * sizeof(atomic_bool))) == NULL) {
		free(r);
		return NULL;
	}
	return r;
}

void
accept_room_destroy(struct accept_room *r)
{
	if (r == NULL)
		return;
	shared_anon_unmap(r->has_room, r->slots * sizeof(atomic_bool));
	free(r);
}

void
accept_room_set(struct accept_room *r, unsigned slot, bool has_room)
{
	if (r != NULL && slot < r->slots)
		atomic_store(&r->has_room[slot], has_room);
}

bool
accept_room_elsewhere(const struct accept_room *r, unsigned slot)
{
	if (r == NULL)
		return false;
	for (unsigned i = 0; i < r->slots; i++)
		if (i != slot && atomic_load(&r->has_room[i]))
			return true;
	return false;
}

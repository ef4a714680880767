/* SPDX-License-Identifier: MIT */
#include <stdatomic.h>
#include <stddef.h>

#include "accept_room.h"
#include "shared_anon.h"

struct accept_room {
	unsigned slots;
	size_t size;
	atomic_bool has_room[];
};

struct accept_room *
accept_room_create(unsigned worker_slots)
{
	size_t size = sizeof(struct accept_room) + worker_slots * sizeof(atomic_bool);
	struct accept_room *r = worker_slots > 0 ? shared_anon_map(size) : NULL;

	if (r == NULL)
		return NULL;
	r->slots = worker_slots;
	r->size = size;
	return r;
}

void
accept_room_destroy(struct accept_room *r)
{
	if (r != NULL)
		shared_anon_unmap(r, r->size);
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

/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_ACCEPT_ROOM_H
#define SMTPMUX_ACCEPT_ROOM_H

#include <stdbool.h>

/*
 * Which workers have room for another session, shared by all of them (an
 * anonymous MAP_SHARED mapping the master creates before it forks). The
 * listening sockets are shared: a worker at limits.max_sessions stops
 * listening while another one has room, so the kernel hands the
 * connections to that one; the last worker to fill up keeps listening and
 * refuses with 421, so a client is never left waiting when all are full.
 *
 * Each worker publishes its own flag before it reads the others' (both
 * sequentially consistent): of two workers filling up at the same
 * moment, at least one sees the other full and keeps listening.
 */

struct accept_room;

struct accept_room *accept_room_create(unsigned worker_slots);
void accept_room_destroy(struct accept_room *);

/* Worker `slot` has room and accepts (true), or not. A dead worker's slot
 * is set to false by the master. */
void accept_room_set(struct accept_room *, unsigned slot, bool has_room);

/* Whether any worker but `slot` has room. */
bool accept_room_elsewhere(const struct accept_room *, unsigned slot);

#endif

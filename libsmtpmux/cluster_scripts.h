/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CLUSTER_SCRIPTS_H
#define SMTPMUX_CLUSTER_SCRIPTS_H

/*
 * The Lua scripts that keep the shared state in Redis, each one atomic on
 * the server. A downstream account (the health record's key, "addr user")
 * has four keys, all with the same hash tag so that Redis Cluster keeps
 * them on one node:
 *
 *   PREFIX ds:{KEY}:health     hash: fails, open_until, cooldown, trial,
 *                              trial_until, throttled_until (times in ms of
 *                              the Redis server's clock)
 *   PREFIX ds:{KEY}:minute     sorted sets, one per quota window: a member
 *   PREFIX ds:{KEY}:hour       per message, its score the moment it stops
 *   PREFIX ds:{KEY}:day        counting (an attempt under way: its lease)
 *
 * and a user's message sequence is PREFIX user:{EMAIL}:seq (INCR).
 *
 * Every script takes the time as its first argument: 0 means the Redis
 * server's clock (TIME), which is what smtpmuxd passes, so that all
 * instances count on one clock; the tests pass their own.
 *
 * BEGIN (KEYS health minute hour day; ARGV now gated member lease_ms
 *   limit_minute limit_hour limit_day): admits an attempt. Gated, a
 *   throttle, an open circuit or a half-open trial held by someone else
 *   refuses it; otherwise a half-open circuit's trial is claimed for
 *   member. Then one entry is added to every limited window, or to none
 *   when any of them is full.
 *   Reply: verdict (0 admitted, 1 circuit open, 2 throttled, 3 trial taken,
 *   4 over quota), trial (1: member holds the half-open trial), full window
 *   (1..3 or 0), then the STATE below, then REOPENS: over quota, when every
 *   full window has room again (the latest moment an entry that frees it
 *   stops counting; 0 when one of them is an attempt still under way).
 *
 * END (same KEYS; ARGV now member outcome ago_ms mode limit_minute
 *   limit_hour limit_day calendar fail_threshold cooldown max_cooldown
 *   throttle_backoff lease_ms): an attempt ended ago_ms ago with outcome
 *   ok, fail, throttled or cancelled. Its window entries are stamped with
 *   the moment they stop counting (delivered) or removed. mode full also
 *   counts consecutive failures and moves the circuit as health.c does;
 *   replay (an attempt decided while the link was down) only resolves the
 *   half-open trial member may hold; probe is a prober's verdict (no
 *   member, no quota). Reply: 0, trial, 0, STATE, 0.
 *
 * MERGE (KEYS health; ARGV now open_in_ms cooldown throttled_in_ms):
 *   this instance's open circuit (open_in_ms > 0) and throttle, found
 *   while the link was down, join the shared ones: the later end wins.
 *   Reply: 0, 0, 0, STATE, 0.
 *
 * REPUBLISH (KEYS one window; ARGV now span_ms lease_ms, then member and
 *   expiry_in_ms pairs): Redis lost its data (its epoch key changed): the
 *   messages this instance's own window holds are counted again.
 *
 * STATE: now, open_until (0: closed), cooldown (s), trial_until (0: no
 *   trial under way), throttled_until, fails, then the messages each window
 *   holds (-1: no limit, not counted).
 */

enum cluster_script {
	CLUSTER_BEGIN,
	CLUSTER_END,
	CLUSTER_MERGE,
	CLUSTER_REPUBLISH,
	CLUSTER_SCRIPTS
};

/* Fields of the reply of BEGIN, END and MERGE. */
enum cluster_reply_field {
	CLUSTER_R_VERDICT, CLUSTER_R_TRIAL, CLUSTER_R_WINDOW, CLUSTER_R_STATE
};
/* Fields of a STATE. */
enum cluster_state_field {
	CLUSTER_S_NOW, CLUSTER_S_OPEN_UNTIL, CLUSTER_S_COOLDOWN, CLUSTER_S_TRIAL_UNTIL,
	CLUSTER_S_THROTTLED_UNTIL, CLUSTER_S_FAILS, CLUSTER_S_COUNT, CLUSTER_S_FIELDS =
	    CLUSTER_S_COUNT + 3
};
/* After the STATE: when BEGIN refused for full windows, the moment they
 * all have room again (0: unknown, or not refused for a quota). */
enum { CLUSTER_R_REOPENS = CLUSTER_R_STATE + CLUSTER_S_FIELDS, CLUSTER_R_FIELDS };

enum cluster_verdict {
	CLUSTER_ADMITTED, CLUSTER_DOWN, CLUSTER_THROTTLED, CLUSTER_TRIAL_TAKEN,
	CLUSTER_OVER_QUOTA
};

/* The script's source, for SCRIPT LOAD. */
const char *cluster_script_source(enum cluster_script);
const char *cluster_script_name(enum cluster_script);

#endif

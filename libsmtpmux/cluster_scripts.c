/* SPDX-License-Identifier: MIT */
/*
 * The scripts themselves (cluster_scripts.h says what each one does).
 * Each is PROLOGUE followed by its body: Redis runs every script on its
 * own, so the helpers are part of each. Lua in Redis has doubles only:
 * times in milliseconds (13 digits) stay exact.
 */
#include <stddef.h>

#include "cluster_scripts.h"

#define PROLOGUE \
"local SPAN = {60000, 3600000, 86400000}\n" \
"local function clock(arg)\n" \
"  local n = tonumber(arg)\n" \
"  if n and n > 0 then return n end\n" \
"  local t = redis.call('TIME')\n" \
"  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n" \
"end\n" \
"local function hload(k)\n" \
"  local v = redis.call('HMGET', k, 'open_until', 'cooldown', 'trial', 'trial_until',\n" \
"    'throttled_until', 'fails')\n" \
"  return {open_until = tonumber(v[1]) or 0, cooldown = tonumber(v[2]) or 0,\n" \
"    trial = v[3] or '', trial_until = tonumber(v[4]) or 0,\n" \
"    throttled_until = tonumber(v[5]) or 0, fails = tonumber(v[6]) or 0}\n" \
"end\n" \
"local function hsave(k, h)\n" \
"  redis.call('HSET', k, 'open_until', h.open_until, 'cooldown', h.cooldown,\n" \
"    'trial', h.trial, 'trial_until', h.trial_until,\n" \
"    'throttled_until', h.throttled_until, 'fails', h.fails)\n" \
"  redis.call('PEXPIRE', k, 604800000)\n" \
"end\n" \
"local function held(h, now) return h.trial ~= '' and h.trial_until > now end\n" \
"local function counted(k, limit, now)\n" \
"  if limit <= 0 then return -1 end\n" \
"  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)\n" \
"  return redis.call('ZCARD', k)\n" \
"end\n" \
"local function reply(verdict, trial, win, h, now, c, reopens)\n" \
"  local tu = 0\n" \
"  if held(h, now) then tu = h.trial_until end\n" \
"  return {verdict, trial, win, now, h.open_until, h.cooldown, tu, h.throttled_until,\n" \
"    h.fails, c[1], c[2], c[3], reopens or 0}\n" \
"end\n"

/*
 * When every full window has room again: in each, the entry whose end
 * leaves count - limit + 1 fewer stops counting (its score), the latest
 * over the windows. An entry still under way (a lease longer than the
 * window) has no known end: 0, as health_quota_reopens() says then.
 */
static const char begin_lua[] = PROLOGUE
"local function reopening(c, limit, now)\n"
"  local at = 0\n"
"  for w = 1, 3 do\n"
"    if c[w] >= 0 and c[w] >= limit[w] then\n"
"      local i = c[w] - limit[w]\n"
"      local e = redis.call('ZRANGE', KEYS[w + 1], i, i, 'WITHSCORES')\n"
"      local s = tonumber(e[2])\n"
"      if not s or s > now + SPAN[w] then return 0 end\n"
"      if s > at then at = s end\n"
"    end\n"
"  end\n"
"  return at\n"
"end\n"
"local now = clock(ARGV[1])\n"
"local gated, member, lease = ARGV[2] == '1', ARGV[3], tonumber(ARGV[4])\n"
"local limit = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])}\n"
"local h = hload(KEYS[1])\n"
"local c, verdict, trial, win, at = {-1, -1, -1}, 0, 0, 0, 0\n"
"if gated and h.throttled_until > now then verdict = 2\n"
"elseif h.open_until > 0 and now < h.open_until then\n"
"  if gated then verdict = 1 end\n"
"elseif h.open_until > 0 then\n"
"  if held(h, now) then\n"
"    if gated then verdict = 3 end\n"
"  else trial = 1 end\n"
"end\n"
"if verdict == 0 then\n"
"  for w = 1, 3 do\n"
"    c[w] = counted(KEYS[w + 1], limit[w], now)\n"
"    if c[w] >= 0 and c[w] >= limit[w] and win == 0 then win = w end\n"
"  end\n"
"  if win > 0 then verdict, trial, at = 4, 0, reopening(c, limit, now) else\n"
"    for w = 1, 3 do\n"
"      if limit[w] > 0 then\n"
"        redis.call('ZADD', KEYS[w + 1], now + lease, member)\n"
"        redis.call('PEXPIRE', KEYS[w + 1], SPAN[w] + lease)\n"
"        c[w] = c[w] + 1\n"
"      end\n"
"    end\n"
"    if trial == 1 then\n"
"      h.trial, h.trial_until = member, now + lease\n"
"      hsave(KEYS[1], h)\n"
"    end\n"
"  end\n"
"end\n"
"return reply(verdict, trial, win, h, now, c, at)\n";

static const char end_lua[] = PROLOGUE
"local now = clock(ARGV[1])\n"
"local member, outcome, mode = ARGV[2], ARGV[3], ARGV[5]\n"
"local ended = now - tonumber(ARGV[4])\n"
"local limit = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}\n"
"local calendar = ARGV[9] == '1'\n"
"local threshold, cd0 = tonumber(ARGV[10]), tonumber(ARGV[11])\n"
"local cdmax, backoff, lease = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])\n"
"local delivered, c = outcome == 'ok', {-1, -1, -1}\n"
"if member ~= '' then\n"
"  for w = 1, 3 do\n"
"    if limit[w] > 0 then\n"
"      local expiry = ended + SPAN[w]\n"
"      if calendar then expiry = (math.floor(ended / SPAN[w]) + 1) * SPAN[w] end\n"
"      if delivered and expiry > now then\n"
"        redis.call('ZADD', KEYS[w + 1], expiry, member)\n"
"        redis.call('PEXPIRE', KEYS[w + 1], SPAN[w] + lease)\n"
"      else\n"
"        redis.call('ZREM', KEYS[w + 1], member)\n"
"      end\n"
"      c[w] = counted(KEYS[w + 1], limit[w], now)\n"
"    end\n"
"  end\n"
"end\n"
"local h = hload(KEYS[1])\n"
"local mine, dirty = member ~= '' and h.trial == member, false\n"
"local function close()\n"
"  h.open_until, h.cooldown, h.fails, h.trial, h.trial_until = 0, 0, 0, '', 0\n"
"end\n"
"local function doubled(cd)\n"
"  local n, cap = 1, math.max(cdmax, cd0)\n"
"  if cd > 0 then n = cd * 2 end\n"
"  if n > cap then n = cap end\n"
"  return n\n"
"end\n"
"if mode == 'replay' then\n"
"  if mine then\n"
"    if delivered then close() else h.trial, h.trial_until = '', 0 end\n"
"    dirty = true\n"
"  end\n"
"elseif outcome == 'ok' then\n"
"  if h.open_until ~= 0 or h.fails ~= 0 or h.trial ~= '' then close(); dirty = true end\n"
"elseif outcome == 'fail' then\n"
"  h.fails, dirty = h.fails + 1, true\n"
"  local halfopen = h.open_until > 0 and now >= h.open_until and not held(h, now)\n"
"  if mine or (mode == 'probe' and halfopen) then\n"
"    local cd = doubled(h.cooldown)\n"
"    h.cooldown, h.open_until, h.trial, h.trial_until = cd, now + cd * 1000, '', 0\n"
"  elseif h.open_until == 0 and threshold > 0 and h.fails >= threshold then\n"
"    h.cooldown, h.open_until = cd0, now + cd0 * 1000\n"
"  end\n"
"elseif outcome == 'throttled' then\n"
"  if now + backoff * 1000 > h.throttled_until then h.throttled_until = now + backoff * 1000 end\n"
"  if mine then close() end\n"
"  dirty = true\n"
"elseif mine then\n"
"  h.trial, h.trial_until, dirty = '', 0, true\n"
"end\n"
"if dirty then hsave(KEYS[1], h) end\n"
"local t = 0\n"
"if mine then t = 1 end\n"
"return reply(0, t, 0, h, now, c)\n";

static const char merge_lua[] = PROLOGUE
"local now = clock(ARGV[1])\n"
"local open_in, cd, thr_in = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])\n"
"local h, dirty = hload(KEYS[1]), false\n"
"if open_in > 0 and now + open_in > h.open_until then\n"
"  h.open_until, h.cooldown, dirty = now + open_in, cd, true\n"
"end\n"
"if thr_in > 0 and now + thr_in > h.throttled_until then\n"
"  h.throttled_until, dirty = now + thr_in, true\n"
"end\n"
"if dirty then hsave(KEYS[1], h) end\n"
"return reply(0, 0, 0, h, now, {-1, -1, -1})\n";

static const char republish_lua[] =
"local n = tonumber(ARGV[1])\n"
"if not n or n <= 0 then\n"
"  local t = redis.call('TIME')\n"
"  n = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
"end\n"
"local span, lease = tonumber(ARGV[2]), tonumber(ARGV[3])\n"
"for i = 4, #ARGV - 1, 2 do\n"
"  redis.call('ZADD', KEYS[1], n + tonumber(ARGV[i + 1]), ARGV[i])\n"
"end\n"
"redis.call('PEXPIRE', KEYS[1], span + lease)\n"
"return (#ARGV - 3) / 2\n";

static const char *const sources[CLUSTER_SCRIPTS] = {
	[CLUSTER_BEGIN] = begin_lua,
	[CLUSTER_END] = end_lua,
	[CLUSTER_MERGE] = merge_lua,
	[CLUSTER_REPUBLISH] = republish_lua,
};

static const char *const names[CLUSTER_SCRIPTS] = {
	[CLUSTER_BEGIN] = "begin", [CLUSTER_END] = "end", [CLUSTER_MERGE] = "merge",
	[CLUSTER_REPUBLISH] = "republish",
};

const char *
cluster_script_source(enum cluster_script s)
{
	return s < CLUSTER_SCRIPTS ? sources[s] : NULL;
}

const char *
cluster_script_name(enum cluster_script s)
{
	return s < CLUSTER_SCRIPTS ? names[s] : "?";
}

//! The stream's Lua scripts for the consumers' housekeeping (trimming, idle
//! consumers); each runs atomically in Redis. The dead letter's and the retry
//! schedule's are beside them, in `dead_letter` and `retry`.

use std::sync::LazyLock;

/// Trims the stream (KEYS[1]) up to what every consumer group acknowledged: the
/// oldest of each group's first pending entry, or its last delivered entry when
/// nothing is pending. Stream ids compare as `ms-seq` number pairs.
const TRIM: &str = r"
local function less(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local id = f['last-delivered-id']
  local summary = redis.call('XPENDING', KEYS[1], f['name'])
  if summary[1] > 0 then id = summary[2] end
  if floor == nil or less(id, floor) then floor = id end
end
if floor == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
";

pub(super) static TRIM_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TRIM));

/// Marks the caller (ARGV[3]) alive in the hash KEYS[2] (consumer name → Redis
/// time in ms), then removes from the group (ARGV[1]) of the stream (KEYS[1])
/// every other consumer with nothing pending, idle longer than the lease (ARGV[2]
/// ms) and not marked alive within two leases. Returns how many. Redis before 7.2
/// counts a consumer idle from its last delivery, not its last read, so idleness
/// alone would remove live workers with nothing to do. Atomic: no consumer can be
/// given an entry between the look and the removal.
const FORGET: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], now)
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  local seen = tonumber(redis.call('HGET', KEYS[2], f['name']) or 0)
  if f['name'] ~= ARGV[3] and f['pending'] == 0 and f['idle'] > lease
      and now - seen > 2 * lease then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    redis.call('HDEL', KEYS[2], f['name'])
    removed = removed + 1
  end
end
return removed
";

pub(super) static FORGET_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(FORGET));

//! The stream's dead letter: the `…:dead` stream, kept in one script with the
//! entry's acknowledgement, and bringing its events back.

use std::sync::LazyLock;

use super::consumer::{StreamConsumer, StreamDelivery};
use super::{RECORD_FIELD, RedisStream, unavailable};
use crate::Error;

/// Keeps an entry in the dead-letter stream (KEYS[2]) and acknowledges it in the
/// stream (KEYS[1]) in one atomic step, so that no crash or take-over between the
/// two can dead-letter it twice. ARGV: the group, the entry id, then the dead
/// entry's fields and values.
const DEAD: &str = r"
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(fields))
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
";

static DEAD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(DEAD));

/// Keeps a retry taken from the schedule (ARGV[1], its member) in the dead-letter
/// stream (KEYS[1]) and removes it from the schedule's sorted set (KEYS[2]) and
/// records (KEYS[3]) in one atomic step, so that no crash in between brings it
/// back for another attempt. ARGV from 2: the dead entry's fields and values.
const DEAD_RETRY: &str = r"
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
";

static DEAD_RETRY_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(DEAD_RETRY));

/// Moves up to ARGV[1] entries from the dead stream (KEYS[2]) back to the stream
/// (KEYS[1]), as new entries, atomically, none later than the entry ARGV[2]; an
/// entry without a `record` field (not one this crate wrote) is set aside, every
/// field kept, in KEYS[3]. Replies how many entries it took from the dead stream,
/// and how many of them were requeued.
const REQUEUE: &str = r"
local entries = redis.call('XRANGE', KEYS[2], '-', ARGV[2], 'COUNT', ARGV[1])
local requeued = 0
for _, entry in ipairs(entries) do
  local fields = entry[2]
  local record = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'record' then record = fields[i + 1] end
  end
  if record then
    redis.call('XADD', KEYS[1], '*', 'record', record)
    requeued = requeued + 1
  else
    redis.call('XADD', KEYS[3], '*', unpack(fields))
  end
  redis.call('XDEL', KEYS[2], entry[1])
end
return {#entries, requeued}
";

static REQUEUE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REQUEUE));

impl RedisStream {
    /// Moves every event in the dead-letter stream back to the stream, as new
    /// entries, for the workers to process again; run it once the cause of the
    /// failures is fixed. It moves at most what the dead letter held when it
    /// started: what a running worker dead-letters meanwhile stays. Each step of up to 100 events is atomic in Redis. An
    /// entry with no `record` (not one this crate wrote) is never dropped: it is
    /// set aside in `<prefix>events:dead:unreadable`, as it was. Returns how many
    /// came back.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Redis cannot answer; what moved before stays moved.
    pub async fn requeue_dead_letters(&self) -> Result<u64, Error> {
        // What is in the dead letter now, and nothing added later: with a worker
        // whose handler still fails, the same events would otherwise go round.
        let last: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&*self.dead_key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| unavailable("cannot read the dead letter", e))?;
        let Some(last) = last.ids.into_iter().next().map(|entry| entry.id) else {
            return Ok(0);
        };
        let mut moved = 0;
        loop {
            let (taken, requeued): (u64, u64) = REQUEUE_SCRIPT
                .key(&*self.key)
                .key(&*self.dead_key)
                .key(format!("{}:unreadable", self.dead_key))
                .arg(100)
                .arg(&last)
                .invoke_async(&mut self.connection.clone())
                .await
                .map_err(|e| unavailable("cannot requeue the dead letter", e))?;
            if taken == 0 {
                return Ok(moved);
            }
            moved += requeued;
        }
    }
}

impl StreamConsumer {
    /// Keeps `delivery` in the dead-letter stream with `error` and `attempts`, and
    /// acknowledges its entry, in one script.
    pub(super) async fn add_dead(
        &mut self,
        delivery: &StreamDelivery,
        error: &str,
        attempts: u32,
    ) -> Result<(), Error> {
        let dead_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut script = if delivery.retry.is_some() {
            let mut script = DEAD_RETRY_SCRIPT.key(&self.dead_key);
            script.key(&self.retry_key).key(&self.records_key);
            script
        } else {
            let mut script = DEAD_SCRIPT.key(&self.key);
            script.key(&self.dead_key).arg(&self.group);
            script
        };
        let _: i64 = script
            .arg(&delivery.id)
            .arg(RECORD_FIELD)
            .arg(&delivery.record)
            .arg("error")
            .arg(error)
            .arg("attempts")
            .arg(attempts)
            .arg("delivery")
            .arg(&delivery.id)
            .arg("deadAt")
            .arg(dead_at)
            .arg("history")
            .arg(crate::store::history::with_attempt(
                &delivery.history,
                std::time::SystemTime::now(),
                error,
            ))
            .invoke_async(&mut self.connection)
            .await
            .map_err(|e| unavailable("cannot write the dead-letter stream", e))?;
        Ok(())
    }
}

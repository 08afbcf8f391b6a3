//! The stream's retry schedule: events that failed an attempt wait off the stream,
//! in a sorted set by due time (`<prefix>events:retry`) beside a hash of their
//! records (`<prefix>events:retry:records`), each under its stream entry's id.
//!
//! # Design
//!
//! - **The move is atomic**: one script stores the record, puts it in the sorted
//!   set at its due time and acknowledges the stream entry (`XACK`). No crash can
//!   leave it in neither; a move repeated after a crash only rewrites the same
//!   member. The moves a worker makes are sent together, in one script, before its
//!   next acknowledgement: one round trip (and one fsync) for many.
//! - **Taking due retries is a lease**: the script that hands them out moves each
//!   one's score to the end of a lease, so no other worker takes it meanwhile; the
//!   worker's keep-alive renews it while it is in hand. A worker that crashes lets
//!   its lease pass, and the retry is due again for whichever worker asks first;
//!   the gate's claim keeps two copies from running at once.
//! - The hash value is `{"attempts":…,"error":…,"dueAt":…,"record":…}`: the record
//!   exactly as stored, so a retry parses like the entry it came from.

use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;

use redis::aio::ConnectionManager;

use super::consumer::{Held, StreamConsumer, StreamDelivery};
use super::unavailable;
use crate::Error;
use crate::store::{RetryDue, json_string};

/// Moves events into the schedule: for each four ARGV after the group (ARGV[1]):
/// the member, the stream entry (empty for a retry moved again), the due time (ms)
/// and the hash value. Stores the value (KEYS[2]), schedules the member (KEYS[1])
/// and acknowledges the entry of the stream KEYS[3] for the group, all at once.
const MOVE: &str = r"
for i = 2, #ARGV, 4 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 3])
  redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
  if ARGV[i + 1] ~= '' then redis.call('XACK', KEYS[3], ARGV[1], ARGV[i + 1]) end
end
return 1
";

/// Hands out up to ARGV[2] members of KEYS[1] due at ARGV[1] (ms), each leased
/// until ARGV[1] + ARGV[3]; replies the first due time left (ms, or -1 for none)
/// and the list member, value, member, value… A member whose record is gone is
/// dropped from the set.
const TAKE: &str = r"
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local value = redis.call('HGET', KEYS[2], id)
  if value then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
    out[#out + 1] = id
    out[#out + 1] = value
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
local next_due = -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then next_due = tonumber(first[2]) end
return {next_due, out}
";

pub(super) static MOVE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(MOVE));
pub(super) static TAKE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TAKE));

/// The sorted set of a stream's retries.
pub(super) fn schedule_key(stream: &str) -> String {
    format!("{stream}:retry")
}

/// The hash of a stream's retry records.
pub(super) fn records_key(stream: &str) -> String {
    format!("{stream}:retry:records")
}

/// Milliseconds since the Unix epoch.
pub(super) fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The hash value for `record` moved in with `retry`.
pub(super) fn value(record: &[u8], retry: &RetryDue<'_>, history: &str) -> Vec<u8> {
    let record = serde_json::from_slice::<&RawValue>(record)
        .map(|raw| raw.get().to_owned())
        .unwrap_or_else(|_| json_string(&String::from_utf8_lossy(record)));
    format!(
        "{{\"attempts\":{},\"error\":{},\"dueAt\":\"{}\",\"history\":{},\"record\":{record}}}",
        retry.attempts,
        json_string(retry.error),
        humantime::format_rfc3339_millis(retry.due),
        if history.is_empty() { "[]" } else { history },
    )
    .into_bytes()
}

/// What a hash value holds: the attempts made, the record and the history.
pub(super) fn parse(value: &[u8]) -> Option<(u32, Vec<u8>, String)> {
    #[derive(Deserialize)]
    struct Value<'a> {
        attempts: u32,
        #[serde(borrow)]
        record: &'a RawValue,
        #[serde(borrow)]
        history: Option<&'a RawValue>,
    }
    let parsed: Value<'_> = serde_json::from_slice(value).ok()?;
    Some((
        parsed.attempts,
        parsed.record.get().as_bytes().to_vec(),
        parsed
            .history
            .map_or_else(String::new, |h| h.get().to_owned()),
    ))
}

/// A duration in ms.
fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A lease's end, from now, in ms.
pub(super) fn lease_end(lease: Duration) -> u64 {
    millis(SystemTime::now() + lease)
}

/// How often the retry schedule is asked for due retries, at most.
const RETRIES_EVERY: Duration = Duration::from_millis(200);

/// The consumer's side of the schedule.
impl StreamConsumer {
    /// Sends the moves into the schedule made since the last acknowledgement, in
    /// one script.
    pub(super) async fn send_moves(&mut self) -> Result<(), Error> {
        if !self.moving.is_empty() {
            let mut invocation = MOVE_SCRIPT.key(&self.retry_key);
            invocation
                .key(&self.records_key)
                .key(&self.key)
                .arg(&self.group);
            for (member, entry, due, value) in &self.moving {
                invocation.arg(member).arg(entry).arg(*due).arg(value);
            }
            let _: i64 = invocation
                .invoke_async(&mut self.connection)
                .await
                .map_err(|e| unavailable("cannot move events into the retry schedule", e))?;
            self.moving.clear();
        }
        Ok(())
    }

    /// Removes the finished retries from the schedule.
    pub(super) async fn remove_done_retries(&mut self) -> Result<(), Error> {
        let done = self.held.lock().await.retries_done.clone();
        if !done.is_empty() {
            let _: () = redis::pipe()
                .cmd("ZREM")
                .arg(&self.retry_key)
                .arg(&done)
                .ignore()
                .cmd("HDEL")
                .arg(&self.records_key)
                .arg(&done)
                .ignore()
                .query_async(&mut self.connection)
                .await
                .map_err(|e| unavailable("cannot remove finished retries", e))?;
            let mut held = self.held.lock().await;
            held.retries_done.retain(|id| !done.contains(id));
        }
        Ok(())
    }

    /// Retries due now, leased to this consumer; asked at most every
    /// [`RETRIES_EVERY`].
    pub(super) async fn take_due_retries(&mut self) -> Result<Vec<StreamDelivery>, Error> {
        let now = millis(std::time::SystemTime::now());
        let known_due = self.next_retry_ms.is_some_and(|due| due <= now);
        if !known_due
            && self
                .last_retries
                .is_some_and(|at| at.elapsed() < RETRIES_EVERY)
        {
            return Ok(Vec::new());
        }
        self.last_retries = Some(Instant::now());
        let (next_due, reply): (i64, Vec<Vec<u8>>) = TAKE_SCRIPT
            .key(&self.retry_key)
            .key(&self.records_key)
            .arg(millis(std::time::SystemTime::now()))
            .arg(self.batch)
            .arg(duration_ms(self.lease))
            .invoke_async(&mut self.connection)
            .await
            .map_err(|e| unavailable("cannot read the retry schedule", e))?;
        self.next_retry_ms = u64::try_from(next_due).ok();
        let mut due = Vec::new();
        for pair in reply.chunks_exact(2) {
            let id = String::from_utf8_lossy(&pair[0]).into_owned();
            // A value this crate did not write still comes out, to be set aside.
            let (attempts, record, history) =
                parse(&pair[1]).unwrap_or((0, pair[1].clone(), String::new()));
            due.push(StreamDelivery {
                id,
                record,
                times_delivered: 1,
                retry: Some(attempts),
                history,
            });
        }
        Ok(due)
    }

    /// Moves `delivery` into the schedule with the next acknowledgement.
    pub(super) async fn move_out(&mut self, delivery: &StreamDelivery, retry: &RetryDue<'_>) {
        {
            // Out of hand first, so that no keep-alive renews the lease over the
            // due time the move sets.
            let mut held = self.held.lock().await;
            if delivery.retry.is_some() {
                held.retries.retain(|id| *id != delivery.id);
                held.rescheduled.push(delivery.id.clone());
            }
        }
        let entry = if delivery.retry.is_some() {
            String::new()
        } else {
            delivery.id.clone()
        };
        // Sent with the others before the next acknowledgement; until then the
        // entry (or the retry's lease) keeps it from other workers.
        let due = millis(retry.due);
        let history =
            crate::store::history::with_attempt(&delivery.history, SystemTime::now(), retry.error);
        let value = value(&delivery.record, retry, &history);
        self.moving.push((delivery.id.clone(), entry, due, value));
        self.next_retry_ms = Some(self.next_retry_ms.map_or(due, |next| next.min(due)));
    }

    /// How long a read may block (ms): [`READ_BLOCK`](super::consumer::READ_BLOCK)
    /// at most, and no longer than until the first retry this consumer knows of.
    pub(super) fn read_block(&self, most: Duration) -> u64 {
        let now = millis(SystemTime::now());
        let most = duration_ms(most);
        self.next_retry_ms
            .map_or(most, |due| due.saturating_sub(now).clamp(1, most))
    }
}

/// Hands the retries in hand back to the schedule, due at once, for the next
/// worker that asks (this one stops).
pub(super) async fn hand_back(
    connection: &mut ConnectionManager,
    retry_key: &str,
    held: &mut Held,
) -> Result<(), Error> {
    let retries = std::mem::take(&mut held.retries);
    if !retries.is_empty() {
        // Due again at once, for the next worker that asks.
        let mut command = redis::cmd("ZADD");
        command.arg(retry_key).arg("XX");
        let now = millis(std::time::SystemTime::now());
        for id in &retries {
            command.arg(now).arg(id);
        }
        let _: i64 = command
            .query_async(connection)
            .await
            .map_err(|e| unavailable("cannot hand back retries", e))?;
    }
    Ok(())
}

/// The command that renews the leases of the retries `ids` in hand.
pub(super) fn renewal(retry_key: &str, ids: &[String], lease: Duration) -> redis::Cmd {
    let mut command = redis::cmd("ZADD");
    command.arg(retry_key).arg("XX");
    let until = lease_end(lease);
    for id in ids {
        command.arg(until).arg(id);
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_keeps_the_record_and_the_attempts() {
        let record = br#"{"receivedAt":"2026-01-01T00:00:00.000Z","secretIndex":0,"event":{"eventId":"e","name":"x"}}"#;
        let retry = RetryDue::new(3, "down \"hard\"", UNIX_EPOCH);
        let history = r#"[{"at":"2026-01-01T00:00:01.000Z","error":"down"}]"#;
        let value = value(record, &retry, history);
        assert_eq!(
            parse(&value),
            Some((3, record.to_vec(), history.to_owned()))
        );
        assert_eq!(parse(b"not json"), None);
    }
}

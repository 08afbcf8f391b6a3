//! What the console reads and changes in Redis: the dead stream's summaries and
//! entries, the pause mark (`<stream>:paused`), the retry schedule, and the audit
//! log (the stream `<stream>:audit`).

use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::streams::{StreamId, StreamRangeReply};

use super::consumer::StreamConsumer;
use super::retry::{records_key, schedule_key};
use super::{RECORD_FIELD, RedisStream, unavailable};
use crate::Error;
use crate::console::{AuditEntry, Summary};

/// How long a consumer keeps what it read of the pause mark.
const PAUSE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The most audit entries the audit stream keeps (about: trimmed with `~`).
const AUDIT_KEEP: u64 = 10_000;

/// Takes each dead entry named in ARGV (from 2) out of the dead stream (KEYS[2]);
/// with ARGV[1] = `requeue`, first adds its record to the stream (KEYS[1]) as a new
/// entry. An entry without a record is left where it is. Replies how many it took.
const TAKE: &str = r"
local taken = 0
for i = 2, #ARGV do
  local entries = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  local entry = entries[1]
  if entry then
    local fields = entry[2]
    local record = nil
    for j = 1, #fields, 2 do
      if fields[j] == 'record' then record = fields[j + 1] end
    end
    if record then
      if ARGV[1] == 'requeue' then redis.call('XADD', KEYS[1], '*', 'record', record) end
      redis.call('XDEL', KEYS[2], ARGV[i])
      taken = taken + 1
    end
  end
end
return taken
";

static TAKE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TAKE));

/// Makes the retry ARGV[1] due at ARGV[2] (ms) if it is in the schedule (KEYS[1])
/// with its record (KEYS[2]). Replies 1 if it did.
const DUE_NOW: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
return 1
";

static DUE_NOW_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(DUE_NOW));

/// A stream entry id's place in the stream's order.
fn order_of(id: &str) -> u128 {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (u128::from(ms.parse::<u64>().unwrap_or(0)) << 64) | u128::from(seq.parse::<u64>().unwrap_or(0))
}

fn field(entry: &StreamId, name: &str) -> Vec<u8> {
    match entry.map.get(name) {
        Some(redis::Value::BulkString(bytes)) => bytes.clone(),
        Some(redis::Value::SimpleString(text)) => text.clone().into_bytes(),
        _ => Vec::new(),
    }
}

fn text(entry: &StreamId, name: &str) -> String {
    String::from_utf8_lossy(&field(entry, name)).into_owned()
}

/// A dead entry as the console lists it.
fn summarize(entry: &StreamId) -> Summary {
    Summary::of_record(
        entry.id.clone(),
        order_of(&entry.id),
        &field(entry, RECORD_FIELD),
        &text(entry, "error"),
        text(entry, "attempts").parse().unwrap_or(0),
        text(entry, "deadAt"),
    )
}

use crate::console::{Entry, Failure};
use crate::store::history;

fn retry_entry(member: String, order: u128, due_ms: u64, value: &[u8]) -> Entry {
    let due = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(due_ms));
    let failure = serde_json::from_slice::<Failure<'_>>(value).unwrap_or_default();
    let summary = Summary::of_record(
        member,
        order,
        failure.record(),
        &failure.error,
        failure.attempts,
        due.to_string(),
    );
    failure.entry(summary)
}

impl RedisStream {
    fn pause_key(&self) -> String {
        format!("{}:paused", self.key)
    }

    fn audit_key(&self) -> String {
        format!("{}:audit", self.key)
    }

    /// Whether processing is paused: every worker on this stream takes no new
    /// event while it is (each looks about once a second).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Redis cannot answer.
    pub async fn paused(&self) -> Result<bool, Error> {
        redis::cmd("EXISTS")
            .arg(self.pause_key())
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| unavailable("cannot read the pause mark", e))
    }

    /// Pauses or resumes every worker on this stream; kept in Redis (the key
    /// `<stream>:paused`), so it outlives restarts.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Redis cannot answer.
    pub async fn set_paused(&self, paused: bool) -> Result<(), Error> {
        let command = if paused {
            let mut set = redis::cmd("SET");
            set.arg(self.pause_key()).arg("paused by the console");
            set
        } else {
            let mut del = redis::cmd("DEL");
            del.arg(self.pause_key());
            del
        };
        command
            .query_async::<()>(&mut self.connection.clone())
            .await
            .map_err(|e| unavailable("cannot write the pause mark", e))
    }

    pub(crate) async fn append_audit(&self, entry: &AuditEntry) -> Result<(), Error> {
        let json = serde_json::to_string(entry).unwrap_or_default();
        redis::cmd("XADD")
            .arg(self.audit_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(AUDIT_KEEP)
            .arg("*")
            .arg("entry")
            .arg(json)
            .query_async::<()>(&mut self.connection.clone())
            .await
            .map_err(|e| unavailable("cannot write the audit log", e))
    }

    pub(crate) async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(self.audit_key())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| unavailable("cannot read the audit log", e))?;
        Ok(reply
            .ids
            .iter()
            .filter_map(|entry| serde_json::from_slice(&field(entry, "entry")).ok())
            .collect())
    }

    /// The dead stream's entries after `after` (from the start for `None`) as
    /// summaries, the last id read, and the stream's length now.
    pub(crate) async fn read_dead_letters(
        &self,
        after: Option<String>,
    ) -> Result<(Vec<Summary>, Option<String>, u64), Error> {
        let mut connection = self.connection.clone();
        let mut summaries = Vec::new();
        let mut last = after;
        loop {
            let start = last
                .as_ref()
                .map_or_else(|| "-".to_owned(), |id| format!("({id}"));
            let reply: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&*self.dead_key)
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .map_err(|e| unavailable("cannot read the dead letter", e))?;
            let got = reply.ids.len();
            summaries.extend(reply.ids.iter().map(summarize));
            if let Some(entry) = reply.ids.last() {
                last = Some(entry.id.clone());
            }
            if got < 1000 {
                break;
            }
        }
        let length: u64 = redis::cmd("XLEN")
            .arg(&*self.dead_key)
            .query_async(&mut connection)
            .await
            .map_err(|e| unavailable("cannot read the dead letter", e))?;
        Ok((summaries, last, length))
    }

    /// The dead entry `id`.
    pub(crate) async fn dead_letter(&self, id: &str) -> Result<Option<Entry>, Error> {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&*self.dead_key)
            .arg(id)
            .arg(id)
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| unavailable("cannot read the dead letter", e))?;
        Ok(reply.ids.first().map(|entry| Entry {
            summary: summarize(entry),
            record: field(entry, RECORD_FIELD),
            error: text(entry, "error"),
            history: history::parse(&text(entry, "history")),
        }))
    }

    /// Takes the dead entries `ids` out of the dead stream, requeuing their
    /// records first with `requeue`, 100 to a script. Returns how many it took.
    pub(crate) async fn take_dead_letters(
        &self,
        ids: &[String],
        requeue: bool,
    ) -> Result<u64, Error> {
        let mut taken = 0;
        for chunk in ids.chunks(100) {
            let mut script = TAKE_SCRIPT.key(&*self.key);
            script
                .key(&*self.dead_key)
                .arg(if requeue { "requeue" } else { "discard" });
            for id in chunk {
                script.arg(id);
            }
            let n: u64 = script
                .invoke_async(&mut self.connection.clone())
                .await
                .map_err(|e| unavailable("cannot change the dead letter", e))?;
            taken += n;
        }
        Ok(taken)
    }

    /// The retry schedule, the first `limit` by due time.
    pub(crate) async fn retries(&self, limit: usize) -> Result<Vec<Entry>, Error> {
        let mut connection = self.connection.clone();
        let due: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(schedule_key(&self.key))
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("WITHSCORES")
            .query_async(&mut connection)
            .await
            .map_err(|e| unavailable("cannot read the retry schedule", e))?;
        let mut entries = Vec::with_capacity(due.len());
        for (chunk_start, chunk) in due.chunks(500).enumerate().map(|(i, c)| (i * 500, c)) {
            let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(records_key(&self.key))
                .arg(chunk.iter().map(|(m, _)| m).collect::<Vec<_>>())
                .query_async(&mut connection)
                .await
                .map_err(|e| unavailable("cannot read the retry schedule", e))?;
            for (i, ((member, score), value)) in chunk.iter().zip(values).enumerate() {
                if let Some(value) = value {
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let due_ms = *score as u64;
                    entries.push(retry_entry(
                        member.clone(),
                        (chunk_start + i) as u128,
                        due_ms,
                        &value,
                    ));
                }
            }
        }
        Ok(entries)
    }

    /// Makes the retry `member` due now; whether it was in the schedule.
    pub(crate) async fn retry_now(&self, member: &str) -> Result<bool, Error> {
        let now = crate::console::millis(SystemTime::now());
        let done: i64 = DUE_NOW_SCRIPT
            .key(schedule_key(&self.key))
            .key(records_key(&self.key))
            .arg(member)
            .arg(now)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|e| unavailable("cannot change the retry schedule", e))?;
        Ok(done != 0)
    }
}

impl StreamConsumer {
    /// The pause mark, read at most once a second.
    pub(super) async fn paused_now(&mut self) -> bool {
        if self
            .pause_read
            .is_some_and(|at| at.elapsed() < PAUSE_CHECK_EVERY)
        {
            return self.paused;
        }
        let read: Result<bool, _> = redis::cmd("EXISTS")
            .arg(format!("{}:paused", self.key))
            .query_async(&mut self.connection)
            .await;
        // Unreadable: as it was; the next read tells the store's trouble.
        if let Ok(paused) = read {
            self.paused = paused;
        }
        self.pause_read = Some(Instant::now());
        self.paused
    }
}

//! What the console reads and changes on RabbitMQ, never taking a delivery nor
//! raising a delivery count:
//!
//! - the dead letter is the stream `<queue>.dead`, read by offset (see `stream`);
//!   a dead letter's id is its offset;
//! - the console's log is the stream `<queue>.console`: the audit entries, and
//!   the offsets of the dead letters taken out (requeued or discarded), which
//!   every reader of the dead letter leaves out from then on;
//! - the pause is the exchange `<queue>.paused`: while it exists, every worker on
//!   the queue takes no new event (each looks once a second).

use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde::{Deserialize, Serialize};

use super::consumer::{RabbitConsumer, publish_confirmed};
use super::stream::{self, StreamMessage};
use super::{DELIVERY_HEADER, RabbitConfig, RabbitStore, delivery_id, text, within};
use crate::Error;
use crate::console::{AuditEntry, Entry, Summary};

/// How often a worker looks whether the pause exchange exists.
const PAUSE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How many dead letters one requeue reads and moves before it writes their
/// offsets to the log.
const TAKEN_PER_ENTRY: usize = 1000;

/// The most audit entries a store keeps in memory (the log keeps them all).
const AUDIT_KEPT: usize = 1000;

impl RabbitConfig {
    /// The console's log, a stream: `<queue>.console`.
    #[must_use]
    pub fn console_stream(&self) -> String {
        format!("{}.console", self.queue)
    }

    /// The exchange whose existence pauses the queue's workers: `<queue>.paused`.
    #[must_use]
    pub fn pause_exchange(&self) -> String {
        format!("{}.paused", self.queue)
    }
}

/// `error`, or, when the broker refused the dead letter's stream because an
/// earlier version made a quorum queue of that name, what to do about it.
pub(super) fn old_dead_letter(error: Error, config: &RabbitConfig) -> Error {
    let dead = config.dead_queue();
    let report = error.report().to_string();
    if !report.contains("inequivalent arg 'x-queue-type'") || !report.contains(&dead) {
        return error;
    }
    Error::store_unavailable(
        "cannot declare the dead letter's stream",
        format!(
            "{dead} is a quorum queue, made by an earlier version: this one keeps dead letters \
             in a stream. Move them back with the earlier version's requeue, delete the queue \
             (rabbitmqctl delete_queue {dead}), then start again"
        ),
    )
}

/// One message of the console's log: an audit entry, or dead letters taken out.
#[derive(Serialize, Deserialize)]
struct LogEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit: Option<AuditEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    taken: Vec<u64>,
}

/// Where a reader of the dead letter and the log stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeadCursor {
    dead: u64,
    log: u64,
}

/// What was added to the dead letter and the log since a cursor.
#[derive(Debug, Default)]
pub(crate) struct DeadDelta {
    /// New dead letters, in offset order.
    pub(crate) added: Vec<Summary>,
    /// Dead letters taken out.
    pub(crate) taken: Vec<u64>,
    /// New audit entries, oldest first.
    pub(crate) audit: Vec<AuditEntry>,
}

/// The store's own reading of the dead letter: how many there are, and the audit.
#[derive(Debug, Default)]
pub(super) struct DeadView {
    cursor: DeadCursor,
    read: u64,
    taken: HashSet<u64>,
    audit: std::collections::VecDeque<AuditEntry>,
}

/// A dead letter's summary: its id is its offset.
fn summarize(message: &StreamMessage) -> Summary {
    Summary::of_record(
        message.offset.to_string(),
        u128::from(message.offset),
        &message.data,
        &failure(message),
        message
            .number(super::retry::ATTEMPTS_HEADER)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        message.header("x-comapi-dead-at").unwrap_or_default(),
    )
}

/// A dead letter's error: the worker's, or why the broker dead-lettered it.
fn failure(message: &StreamMessage) -> String {
    message.header("x-comapi-error").unwrap_or_else(|| {
        let reason = message
            .header("x-first-death-reason")
            .unwrap_or_else(|| "unknown".to_owned());
        format!("dead-lettered by the broker ({reason}): handed out more often than the queue's delivery limit")
    })
}

/// Whether `error` is the broker's 404.
fn not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Whether the exchange `name` exists: a passive declare on `channel`, a channel
/// of its own, which the broker closes when it does not.
async fn exchange_exists(
    channel: Channel,
    config: &RabbitConfig,
    name: &str,
) -> Result<bool, Error> {
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let asked = channel.exchange_declare(
        name.into(),
        ExchangeKind::Fanout,
        passive,
        FieldTable::default(),
    );
    let exists = match tokio::time::timeout(config.deadline, asked).await {
        Ok(Ok(())) => Ok(true),
        // The broker closed the channel.
        Ok(Err(error)) if not_found(&error) => return Ok(false),
        Ok(Err(error)) => Err(super::unavailable("cannot read the pause", error)),
        Err(_) => Err(Error::store_unavailable(
            "cannot read the pause",
            format!("no answer within {:?}", config.deadline),
        )),
    };
    // Closed in the background: a broker that answers slowly holds no caller, and a
    // channel whose answer never came is not left open on the connection.
    let deadline = config.deadline;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(deadline, channel.close(200, "looked".into())).await;
    });
    exists
}

impl RabbitStore {
    /// A new channel on the store's connection (the publishing channel is shared).
    async fn side_channel(&self) -> Result<Channel, Error> {
        self.channel().await?;
        let link = self.link.lock().await;
        let Some(link) = link.as_ref() else {
            return Err(Error::store_unavailable(
                "cannot open a RabbitMQ channel",
                "the connection broke",
            ));
        };
        within(
            self.config.deadline,
            "cannot open a RabbitMQ channel",
            link.connection.create_channel(),
        )
        .await
    }

    /// Reads the dead letter's stream from `from` (see [`stream::read`]).
    async fn read_dead(
        &self,
        from: u64,
        until: Option<&str>,
        each: impl FnMut(StreamMessage) -> bool,
    ) -> Result<u64, Error> {
        let channel = self.reading_channel().await?;
        stream::read(
            channel,
            &self.config,
            &self.config.dead_queue(),
            from,
            until,
            each,
        )
        .await
    }

    /// A channel of its own for a stream's read.
    async fn reading_channel(&self) -> Result<Channel, Error> {
        stream::read_ahead(self.side_channel().await?, &self.config).await
    }

    /// Whether processing is paused: every worker on this queue takes no new event.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when the broker cannot answer.
    pub async fn paused(&self) -> Result<bool, Error> {
        let channel = self.side_channel().await?;
        exchange_exists(channel, &self.config, &self.config.pause_exchange()).await
    }

    /// Pauses or resumes every worker on this queue: declares or deletes the
    /// durable exchange [`RabbitConfig::pause_exchange`], so it outlives restarts.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when the broker cannot answer.
    pub async fn set_paused(&self, paused: bool) -> Result<(), Error> {
        let channel = self.channel().await?;
        let name = self.config.pause_exchange();
        within(self.config.deadline, "cannot change the pause", async {
            if paused {
                let durable = ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                channel
                    .exchange_declare(
                        name.as_str().into(),
                        ExchangeKind::Fanout,
                        durable,
                        FieldTable::default(),
                    )
                    .await
            } else {
                channel
                    .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                    .await
            }
        })
        .await
    }

    /// Appends `entry` to the console's log.
    pub(crate) async fn append_audit(&self, entry: &AuditEntry) -> Result<(), Error> {
        self.log(&LogEntry {
            audit: Some(entry.clone()),
            taken: Vec::new(),
        })
        .await
    }

    async fn log(&self, entry: &LogEntry) -> Result<(), Error> {
        let body = serde_json::to_vec(entry).map_err(|e| {
            Error::storage("cannot encode the console's log", std::io::Error::other(e))
        })?;
        let channel = self.channel().await?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        publish_confirmed(
            &channel,
            &self.config,
            &self.config.console_stream(),
            &body,
            properties,
        )
        .await
    }

    /// What the dead letter and the log gained since `cursor`, read to their ends
    /// (a fence each), and the new cursor.
    pub(crate) async fn dead_delta(
        &self,
        cursor: DeadCursor,
    ) -> Result<(DeadDelta, DeadCursor), Error> {
        let channel = self.channel().await?;
        let dead = self.config.dead_queue();
        let log = self.config.console_stream();
        let dead_fence = stream::fence(&channel, &self.config, &dead).await?;
        let log_fence = stream::fence(&channel, &self.config, &log).await?;
        let mut delta = DeadDelta::default();
        let next_dead = self
            .read_dead(cursor.dead, Some(&dead_fence), |message| {
                delta.added.push(summarize(&message));
                true
            })
            .await?;
        let next_log = stream::read(
            self.reading_channel().await?,
            &self.config,
            &log,
            cursor.log,
            Some(&log_fence),
            |message| {
                if let Ok(entry) = serde_json::from_slice::<LogEntry>(&message.data) {
                    delta.taken.extend(entry.taken);
                    delta.audit.extend(entry.audit);
                }
                true
            },
        )
        .await?;
        let cursor = DeadCursor {
            dead: next_dead,
            log: next_log,
        };
        Ok((delta, cursor))
    }

    /// The dead letters in the store now, and the last `limit` audit entries,
    /// newest first (the store's own reading, brought up to date).
    pub(crate) async fn dead_count_and_audit(
        &self,
        limit: usize,
    ) -> Result<(u64, Vec<AuditEntry>), Error> {
        let mut view = self.view.lock().await;
        let (delta, cursor) = self.dead_delta(view.cursor).await?;
        view.cursor = cursor;
        view.read += delta.added.len() as u64;
        view.taken.extend(delta.taken);
        for entry in delta.audit {
            if view.audit.len() == AUDIT_KEPT {
                view.audit.pop_front();
            }
            view.audit.push_back(entry);
        }
        let live = view.read.saturating_sub(view.taken.len() as u64);
        Ok((live, view.audit.iter().rev().take(limit).cloned().collect()))
    }

    /// The dead letter at `offset`, with its record, error and attempts.
    pub(crate) async fn dead_letter(&self, summary: Summary) -> Result<Option<Entry>, Error> {
        let Ok(offset) = summary.id.parse::<u64>() else {
            return Ok(None);
        };
        let mut found = None;
        self.read_dead(offset, None, |message| {
            if message.offset == offset {
                found = Some(message);
            }
            false
        })
        .await?;
        Ok(found.map(|message| Entry {
            error: failure(&message),
            history: message
                .header(super::retry::HISTORY_HEADER)
                .map_or_else(Vec::new, |h| crate::store::history::parse(&h)),
            record: message.data,
            summary,
        }))
    }

    /// Takes the dead letters at `offsets` out, requeuing them first with
    /// `requeue`: each is published to the queue (confirmed) before its offset is
    /// written to the log, so a crash in between duplicates it at most (the gate
    /// tells the copies apart). Returns how many were taken.
    pub(crate) async fn take_dead_letters(
        &self,
        offsets: BTreeSet<u64>,
        requeue: bool,
    ) -> Result<u64, Error> {
        let mut taken = 0;
        let offsets: Vec<u64> = offsets.into_iter().collect();
        for chunk in offsets.chunks(TAKEN_PER_ENTRY) {
            if requeue {
                self.requeue_chunk(chunk).await?;
            }
            self.log(&LogEntry {
                audit: None,
                taken: chunk.to_vec(),
            })
            .await?;
            taken += chunk.len() as u64;
        }
        Ok(taken)
    }

    /// Publishes the dead letters at `chunk` (in order) to the queue, confirmed.
    async fn requeue_chunk(&self, chunk: &[u64]) -> Result<(), Error> {
        let (Some(&first), Some(&last)) = (chunk.first(), chunk.last()) else {
            return Ok(());
        };
        let wanted: HashSet<u64> = chunk.iter().copied().collect();
        let mut found = Vec::with_capacity(chunk.len());
        self.read_dead(first, None, |message| {
            let offset = message.offset;
            if wanted.contains(&offset) {
                found.push(message);
            }
            offset < last
        })
        .await?;
        let channel = self.channel().await?;
        for message in found {
            // A new stored copy, as a spool's or a stream's requeue makes: a delivery
            // id of its own; the worker's notes and the broker's `x-death` go.
            let mut headers = FieldTable::default();
            headers.insert(DELIVERY_HEADER.into(), text(&delivery_id()));
            let properties = message.properties.clone().with_headers(headers);
            publish_confirmed(
                &channel,
                &self.config,
                &self.config.queue,
                &message.data,
                properties,
            )
            .await?;
        }
        Ok(())
    }

    /// Moves every dead letter back to the queue: each is published (confirmed)
    /// before its offset goes into the console's log as taken, so a crash in
    /// between duplicates it at most (the gate tells the copies apart) and never
    /// loses it. Returns how many were moved; the audit log says so.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when the broker fails; what was moved stays moved.
    pub async fn requeue_dead_letters(&self) -> Result<u64, Error> {
        let (delta, _) = self.dead_delta(DeadCursor::default()).await?;
        let taken: HashSet<u64> = delta.taken.into_iter().collect();
        let live: BTreeSet<u64> = delta
            .added
            .iter()
            .filter_map(|s| s.id.parse().ok())
            .filter(|offset| !taken.contains(offset))
            .collect();
        let moved = self.take_dead_letters(live, true).await?;
        if moved > 0 {
            let entry =
                AuditEntry::now("requeue", "requeue", moved, "every dead letter".to_owned());
            self.append_audit(&entry).await?;
        }
        Ok(moved)
    }
}

impl RabbitConsumer {
    /// The pause, read at most once a second.
    pub(super) async fn paused_now(&mut self) -> bool {
        if self
            .pause_read
            .is_some_and(|at| at.elapsed() < PAUSE_CHECK_EVERY)
        {
            return self.paused;
        }
        let name = self.config.pause_exchange();
        let read = async {
            let channel = within(
                self.config.deadline,
                "cannot read the pause",
                self.connection.create_channel(),
            )
            .await?;
            exchange_exists(channel, &self.config, &name).await
        };
        // Unreadable: as it was; the next read tells the broker's trouble.
        if let Ok(paused) = read.await {
            self.paused = paused;
        }
        self.pause_read = Some(Instant::now());
        self.paused
    }
}

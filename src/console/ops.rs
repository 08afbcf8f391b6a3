//! The console's work on each store: its lists (kept as an [`Index`] between
//! pages and read anew only where the store changed), one entry, the actions,
//! the pause and the audit log.

use std::time::SystemTime;

use tokio::sync::{Mutex, MutexGuard};

use super::model::{AuditEntry, Index, Summary};
use crate::Error;
use crate::store::Store;

/// The most retries a list shows (the first by due time).
pub const RETRIES_LISTED: usize = 10_000;

/// One dead letter or retry as its page shows it: the summary, the record as
/// stored, and the full error.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) summary: Summary,
    pub(crate) record: Vec<u8>,
    pub(crate) error: String,
    /// Its failed attempts, oldest first, as far as they were kept.
    pub(crate) history: Vec<crate::store::history::Attempt>,
}

/// What the stores keep with a failed event and a page shows: a spool dead
/// letter's line, a Redis retry's value (a Redis dead entry's fields hold the same).
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Failure<'a> {
    #[serde(default)]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // read for Redis's retries
    pub(crate) attempts: u32,
    #[serde(default, borrow)]
    pub(crate) error: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    record: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    history: Option<&'a serde_json::value::RawValue>,
}

impl Failure<'_> {
    /// The record as stored (empty when there is none).
    pub(crate) fn record(&self) -> &[u8] {
        self.record.map_or(&b""[..], |r| r.get().as_bytes())
    }

    /// Its page's entry, under `summary`.
    pub(crate) fn entry(&self, summary: Summary) -> Entry {
        Entry {
            summary,
            record: self.record().to_vec(),
            error: self.error.to_string(),
            history: self
                .history
                .map_or_else(Vec::new, |h| crate::store::history::parse(h.get())),
        }
    }
}

/// Where the console's copy of the dead letter stands.
#[derive(Debug, Default)]
pub(crate) struct DeadCache {
    pub(crate) index: Index,
    spool: crate::store::spool::DeadCursor,
    #[cfg(feature = "redis")]
    redis_last: Option<String>,
    #[cfg(feature = "rabbitmq")]
    rabbit: crate::store::rabbitmq::DeadCursor,
    /// On RabbitMQ, the dead letters taken out (they stay in the stream).
    #[cfg(feature = "rabbitmq")]
    rabbit_taken: std::collections::HashSet<String>,
}

/// A store the console works on, with its copy of the dead letter.
#[derive(Debug)]
pub(crate) struct Ops {
    pub(crate) store: Store,
    dead: Mutex<DeadCache>,
}

#[cfg(feature = "rabbitmq")]
fn not_on_rabbitmq() -> Error {
    Error::store_unavailable(
        "the console cannot list RabbitMQ's retry schedule",
        "its delay queues cannot be read without taking their messages and raising their \
         delivery count; the overview counts them",
    )
}

impl Ops {
    pub(crate) fn new(store: Store) -> Self {
        Ops {
            store,
            dead: Mutex::default(),
        }
    }

    /// Whether this store lists its retry schedule (the spool and Redis: not
    /// RabbitMQ's delay queues, which cannot be read without taking from them).
    pub(crate) fn lists_retries(&self) -> bool {
        match &self.store {
            Store::Spool(_) => true,
            #[cfg(feature = "redis")]
            Store::Redis(_) => true,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(_) => false,
        }
    }

    /// The dead letter as it is now.
    pub(crate) async fn dead_letters(&self) -> Result<MutexGuard<'_, DeadCache>, Error> {
        let mut cache = self.dead.lock().await;
        match &self.store {
            Store::Spool(spool) => {
                let (summaries, cursor, anew) = spool.read_dead_letters(cache.spool).await?;
                if anew {
                    cache.index.entries.clear();
                }
                cache.index.entries.extend(summaries);
                cache.spool = cursor;
            }
            #[cfg(feature = "redis")]
            Store::Redis(stream) => {
                let (summaries, last, length) =
                    stream.read_dead_letters(cache.redis_last.clone()).await?;
                cache.index.entries.extend(summaries);
                cache.redis_last = last;
                if cache.index.entries.len() as u64 != length {
                    // Taken out by someone else (a requeue, another console): anew.
                    let (summaries, last, _) = stream.read_dead_letters(None).await?;
                    cache.index.entries = summaries;
                    cache.redis_last = last;
                }
            }
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(store) => {
                let (delta, cursor) = store.dead_delta(cache.rabbit).await?;
                cache.rabbit = cursor;
                let DeadCache {
                    index,
                    rabbit_taken,
                    ..
                } = &mut *cache;
                rabbit_taken.extend(delta.taken.iter().map(u64::to_string));
                if !delta.taken.is_empty() {
                    index.entries.retain(|s| !rabbit_taken.contains(&s.id));
                }
                // Taken out by another reader before this one read it.
                let added = delta.added.into_iter();
                index
                    .entries
                    .extend(added.filter(|s| !rabbit_taken.contains(&s.id)));
            }
        }
        Ok(cache)
    }

    /// The dead letter `id`.
    pub(crate) async fn dead_letter(&self, id: &str) -> Result<Option<Entry>, Error> {
        match &self.store {
            Store::Spool(spool) => {
                let cache = self.dead_letters().await?;
                let Some(summary) = cache.index.find(id).cloned() else {
                    return Ok(None);
                };
                drop(cache);
                let offset = u64::try_from(summary.order).unwrap_or(u64::MAX);
                let Some(line) = spool.dead_letter_line(offset, id.to_owned()).await? else {
                    return Ok(None);
                };
                Ok(Some(match serde_json::from_slice::<Failure<'_>>(&line) {
                    Ok(failure) => failure.entry(summary),
                    // Not a line this crate wrote: shown as it is.
                    Err(_) => Entry {
                        summary,
                        record: line,
                        error: String::new(),
                        history: Vec::new(),
                    },
                }))
            }
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.dead_letter(id).await,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(store) => {
                let cache = self.dead_letters().await?;
                let Some(summary) = cache.index.find(id).cloned() else {
                    return Ok(None);
                };
                drop(cache);
                store.dead_letter(summary).await
            }
        }
    }

    /// Takes `ids` out of the dead letter, requeuing them first with `requeue`.
    pub(crate) async fn take_dead(&self, ids: Vec<String>, requeue: bool) -> Result<u64, Error> {
        let mut cache = self.dead.lock().await;
        let taken = match &self.store {
            Store::Spool(spool) => {
                crate::store::spool::take_dead_letters(
                    spool,
                    Some(ids.iter().cloned().collect()),
                    requeue,
                )
                .await?
            }
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.take_dead_letters(&ids, requeue).await?,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(store) => {
                // Only what is still there: the stream keeps what was taken.
                let offsets = ids
                    .iter()
                    .filter(|id| cache.index.find(id).is_some())
                    .filter_map(|id| id.parse().ok())
                    .collect();
                let taken = store.take_dead_letters(offsets, requeue).await?;
                cache.rabbit_taken.extend(ids.iter().cloned());
                taken
            }
        };
        let gone: std::collections::HashSet<&String> = ids.iter().collect();
        cache.index.entries.retain(|s| !gone.contains(&s.id));
        Ok(taken)
    }

    /// The retry schedule, first due first, as an index.
    pub(crate) async fn retries(&self) -> Result<(Index, Vec<Entry>), Error> {
        let entries: Vec<Entry> = match &self.store {
            Store::Spool(spool) => {
                let mut entries = spool.retry_summaries();
                entries.truncate(RETRIES_LISTED);
                entries
            }
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.retries(RETRIES_LISTED).await?,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(_) => return Err(not_on_rabbitmq()),
        };
        // Lists go newest first: the order counts down from the first due.
        let count = entries.len() as u128;
        let index = Index {
            entries: entries
                .iter()
                .enumerate()
                .rev()
                .map(|(i, e)| {
                    let mut summary = e.summary.clone();
                    summary.order = count - i as u128;
                    summary
                })
                .collect(),
        };
        Ok((index, entries))
    }

    /// Makes the retry `id` due now; whether it waited.
    pub(crate) async fn retry_now(&self, id: &str) -> Result<bool, Error> {
        match &self.store {
            Store::Spool(spool) => Ok(id
                .parse()
                .is_ok_and(|n| spool.retry_now(n, SystemTime::now()))),
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.retry_now(id).await,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(_) => Err(not_on_rabbitmq()),
        }
    }

    /// Whether processing is paused.
    pub(crate) async fn paused(&self) -> Result<bool, Error> {
        match &self.store {
            Store::Spool(spool) => Ok(spool.paused()),
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.paused().await,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(store) => store.paused().await,
        }
    }

    pub(crate) async fn set_paused(&self, paused: bool) -> Result<(), Error> {
        match &self.store {
            Store::Spool(spool) => spool.set_paused(paused).await,
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.set_paused(paused).await,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(store) => store.set_paused(paused).await,
        }
    }

    pub(crate) async fn audit(&self, entry: &AuditEntry) -> Result<(), Error> {
        match &self.store {
            Store::Spool(spool) => spool.append_audit(entry).await,
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.append_audit(entry).await,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(store) => store.append_audit(entry).await,
        }
    }

    pub(crate) async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        match &self.store {
            Store::Spool(spool) => spool.audit_log(limit).await,
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.audit_log(limit).await,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(store) => Ok(store.dead_count_and_audit(limit).await?.1),
        }
    }
}

//! The durable spool: append-only JSON Lines segments with group commit, crash
//! recovery, and a reader that resumes from a persisted offset.
//!
//! `Spool` and its settings are here; the writer thread in `writer`, what a crash
//! leaves to repair in `recovery`, the stored line's layout in `record`, the
//! reader's cursor in `reader` and the worker's source in `source`, the dead letter
//! in `dead_letter`, and the folder's files (segments, lock) in `files`.
//!
//! # Design
//!
//! - **Group commit.** One writer thread takes every append waiting, writes them
//!   all, syncs once and answers them all: the sync, a fixed cost, is paid per
//!   group. While a group is smaller than the previous one the writer holds it up to
//!   the group linger for more to join, sleeping meanwhile so the CPU goes to the
//!   requests it waits for; under load groups grow and syncs get fewer, and a spool
//!   that gets one append at a time never waits, its previous group being no larger.
//! - **Preallocation.** The segment being written is filled with zero bytes ahead
//!   of its data, so appends land inside the file instead of growing it and each
//!   sync flushes data only, skipping the file system's journal (on ext4 that
//!   halves the cost of a sync). Each step is one longer sync, so larger steps raise
//!   tail latency. The zero tail is cut when the segment rolls over and when the
//!   spool closes; after a crash, [`Spool::open`] cuts it. Readers never read past
//!   committed data.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::Error;
use crate::store::{EventStore, Records, StoreStatus};

mod console;
mod dead_letter;
mod files;
mod reader;
mod record;
mod recovery;
mod retry;
mod source;
mod writer;

pub(crate) use console::DeadCursor;
pub use console::{AUDIT_FILE, PAUSE_FILE};
pub(crate) use dead_letter::take_dead_letters;
pub use dead_letter::{DEAD_LETTER_FILE, requeue_dead_letters};
use files::{ReadingFlag, create_folder, lock_folder};
use reader::Cursor;
pub use record::SpooledEvent;
use record::check_records;
pub(crate) use record::encode_lines;
#[cfg(any(feature = "redis", feature = "rabbitmq"))]
pub(crate) use record::record_event;
pub(crate) use record::record_received_at;
pub use retry::RETRY_FILE;
use retry::RetryLog;
pub use source::SpoolReader;
use writer::Writer;

/// A segment rolls over at this size, by default: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The zero-filled step ahead of the data, by default: 1 MiB.
pub const DEFAULT_PREALLOCATE_BYTES: u64 = 1024 * 1024;
/// How long the writer may hold a group for more, by default: 100 µs.
pub const DEFAULT_GROUP_LINGER: Duration = Duration::from_micros(100);

/// Where and how a [`Spool`] stores events.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpoolConfig {
    /// The folder holding the segments (`segment-0000000001.jsonl`, …), the
    /// reader's `offset` file, the dead letter ([`DEAD_LETTER_FILE`]) and, if
    /// [`run_worker`](crate::worker::run_worker) ever had to set a line aside, `rejected.jsonl`. Created if missing.
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it reaches this size.
    /// Default [`DEFAULT_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// How far ahead of its data the segment being written is filled with zero
    /// bytes; 0 turns this off. Default [`DEFAULT_PREALLOCATE_BYTES`]. See
    /// *Design* in the [module docs](self).
    pub preallocate_bytes: u64,
    /// Whether [`SpoolReader::acknowledge`] deletes the segments wholly before the
    /// acknowledged position (off by default: the spool then keeps every event, as
    /// a log would). Turn it on when the spool is only a queue, or it grows forever.
    pub remove_processed: bool,
    /// How long the writer may hold a group before syncing it, waiting for more
    /// appends to join, while the group is smaller than the previous one; zero
    /// turns this off. Default [`DEFAULT_GROUP_LINGER`]. See *Design* in the
    /// [module docs](self).
    pub group_linger: Duration,
}

impl SpoolConfig {
    /// Segments in `dir`, with the defaults: [`DEFAULT_SEGMENT_BYTES`],
    /// [`DEFAULT_PREALLOCATE_BYTES`], [`DEFAULT_GROUP_LINGER`], processed segments kept.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            preallocate_bytes: DEFAULT_PREALLOCATE_BYTES,
            remove_processed: false,
            group_linger: DEFAULT_GROUP_LINGER,
        }
    }

    /// `comapi-webhook-spool` in the OS temp folder, as Comapi's tutorial does. Fine
    /// for trying things out; in production pick a folder that survives reboots.
    #[must_use]
    pub fn in_temp_dir() -> Self {
        Self::new(std::env::temp_dir().join("comapi-webhook-spool"))
    }

    /// The same folder with another roll-over size (at least 1 byte).
    #[must_use]
    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes.max(1);
        self
    }

    /// The same folder with another preallocation step (0 turns it off, so the
    /// segment being written never has a zero tail, e.g. for `tail -f`).
    #[must_use]
    pub fn with_preallocate_bytes(mut self, bytes: u64) -> Self {
        self.preallocate_bytes = bytes;
        self
    }

    /// The same folder, deleting processed segments or not (see
    /// [`SpoolConfig::remove_processed`]).
    #[must_use]
    pub fn with_remove_processed(mut self, remove: bool) -> Self {
        self.remove_processed = remove;
        self
    }

    /// The same folder with another group linger (see
    /// [`SpoolConfig::group_linger`]; zero syncs each group as soon as it is taken).
    #[must_use]
    pub fn with_group_linger(mut self, linger: Duration) -> Self {
        self.group_linger = linger;
        self
    }
}

/// A place in the spool: a segment number and a byte offset in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The segment number (the `N` in `segment-N.jsonl`).
    pub segment: u64,
    /// The byte offset in that segment.
    pub offset: u64,
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Events already in the spool: its lines, counting any damaged one that the
    /// worker will set aside.
    pub events: u64,
    /// Segments found.
    pub segments: u64,
    /// Bytes cut from the end of the last segment: a line torn by a crash (never
    /// acknowledged, so Comapi retries it) is removed, never served as an event. The
    /// preallocated zero tail is cut as well, but not counted here.
    pub torn_bytes: u64,
}

/// The durable, append-only event spool (JSON Lines segments in a folder).
///
/// [`Spool::append`] resolves only after the lines are written and `fdatasync`ed.
/// Concurrent appends share one sync (group commit): a dedicated writer thread takes
/// every append waiting, writes them all, syncs once and answers them all, so the
/// sync cost is paid per group, not per request. Under load it holds a group a
/// little while for more ([`SpoolConfig::group_linger`]).
///
/// Each line is one event: `{"receivedAt":"…","secretIndex":0,"event":{…}}`, where
/// `event` is the envelope as received (line breaks between JSON tokens, which can
/// only be insignificant whitespace, become spaces) and `secretIndex` says which of
/// the verifier's secrets matched (never the secret).
///
/// Cloning is cheap; clones share the writer.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    remove_processed: bool,
    requests: mpsc::Sender<Request>,
    committed: watch::Receiver<Position>,
    stored: Arc<AtomicU64>,
    /// Events the reader acknowledged (those before the offset at open included).
    acknowledged: Arc<AtomicU64>,
    /// Events in the dead letter.
    dead_letters: Arc<AtomicU64>,
    /// Whether a [`SpoolReader`] is alive: the offset file belongs to one reader.
    reading: Arc<AtomicBool>,
    /// The retry schedule ([`RETRY_FILE`]), kept by the reader.
    retries: Arc<std::sync::Mutex<RetryLog>>,
    /// Set when a supervised worker stops: once the spool is closed and read to its
    /// end, the reader finishes without waiting for the retries, which stay in the
    /// schedule for the next start.
    leave_retries: Arc<AtomicBool>,
    /// Whether processing is paused (the [`PAUSE_FILE`] mark).
    paused: Arc<AtomicBool>,
}

enum Request {
    Append {
        lines: Vec<u8>,
        events: u64,
        /// Answered with the lines' buffer once they are durable, so that it is freed
        /// on the thread that allocated it, not on the writer's.
        done: oneshot::Sender<Result<Vec<u8>, Arc<io::Error>>>,
    },
    Close(oneshot::Sender<()>),
}

impl Spool {
    /// Opens (or creates) the spool in `config.dir`, repairs a torn last line, and
    /// starts the writer thread.
    ///
    /// A spool has one writer: the folder is locked (`spool.lock`, an advisory
    /// lock) until the spool is closed or every handle on it is dropped, and a
    /// second open, from this process or another, fails at once.
    ///
    /// # Errors
    /// [`Error::Storage`] when the folder or a segment cannot be created or read,
    /// and, with [`io::ErrorKind::ResourceBusy`] as its source, when another spool
    /// has the folder open.
    pub fn open(config: &SpoolConfig) -> Result<(Spool, Recovery), Error> {
        create_folder(&config.dir).map_err(|e| storage("create the spool folder", e))?;
        let lock = lock_folder(&config.dir)?;
        let (mut writer, recovery) =
            Writer::recover(config).map_err(|e| storage("open the spool", e))?;
        writer.lock = Some(lock);
        let stored = Arc::new(AtomicU64::new(recovery.events));
        let (acknowledged, dead_letters) = reader::counts_at_open(&config.dir)
            .map_err(|e| storage("count the processed events", e))?;
        let retries = Arc::new(std::sync::Mutex::new(RetryLog::open(&config.dir)?));
        let (committed_tx, committed) = watch::channel(writer.position());
        let (requests, rx) = mpsc::channel(4096);
        let counter = Arc::clone(&stored);
        // Detached: it stops when asked to close, or when every `Spool` is dropped.
        std::thread::Builder::new()
            .name("comapi-spool-writer".to_owned())
            .spawn(move || writer.run(rx, &committed_tx, &counter))
            .map_err(|e| storage("start the spool writer", e))?;
        let shared = Shared {
            dir: config.dir.clone(),
            remove_processed: config.remove_processed,
            requests,
            committed,
            stored,
            reading: Arc::new(AtomicBool::new(false)),
            acknowledged: Arc::new(AtomicU64::new(acknowledged)),
            dead_letters: Arc::new(AtomicU64::new(dead_letters)),
            retries,
            leave_retries: Arc::new(AtomicBool::new(false)),
            paused: Arc::new(AtomicBool::new(config.dir.join(PAUSE_FILE).exists())),
        };
        Ok((
            Spool {
                shared: Arc::new(shared),
            },
            recovery,
        ))
    }

    /// Appends spool records, one JSON line each (ending in `\n`), holding `events`
    /// events, and resolves once they are on disk. Each line must be a record as the
    /// receive step writes it (`{"receivedAt":…,"secretIndex":…,"event":{…}}`, the
    /// event an envelope with a string `eventId` and `name`), so that the worker can
    /// read everything stored.
    ///
    /// # Errors
    /// [`Error::Storage`] when writing or syncing failed (the partial write is cut
    /// off again) or the spool is closed. Nothing was acknowledged then. Also, with
    /// nothing stored and [`io::ErrorKind::InvalidInput`] as its source, when
    /// `lines` does not end in a line feed, holds a zero byte (the spool takes zero
    /// bytes for the marks of a crash), has a line that is not a spool record, or
    /// holds a number of lines other than `events`.
    pub async fn append(&self, lines: Vec<u8>, events: u64) -> Result<(), Error> {
        check_records(&lines, events)?;
        self.append_unchecked(lines, events).await
    }

    /// [`Spool::append`] without the check: for lines this crate encoded itself.
    pub(crate) async fn append_unchecked(&self, lines: Vec<u8>, events: u64) -> Result<(), Error> {
        if lines.is_empty() {
            return Ok(());
        }
        let (done, answer) = oneshot::channel();
        let request = Request::Append {
            lines,
            events,
            done,
        };
        if self.shared.requests.send(request).await.is_err() {
            return Err(closed());
        }
        match answer.await {
            Ok(Ok(_lines)) => Ok(()),
            // Every append of the group shares the one failure: each gets its kind
            // (a full disk, a permission error) and its text.
            Ok(Err(error)) => Err(Error::storage(
                "cannot write the spool",
                io::Error::new(error.kind(), error),
            )),
            Err(_) => Err(closed()),
        }
    }

    /// The spool folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Whether the spool is closed ([`Spool::close`], or its writer stopped): appends
    /// fail, and readers finish at the end of what was stored.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.shared.requests.is_closed()
    }

    /// How many events the spool holds (found at open plus appended since).
    #[must_use]
    pub fn stored(&self) -> u64 {
        self.shared.stored.load(Ordering::Acquire)
    }

    /// Events stored but not yet processed: not yet acknowledged by the reader. The
    /// worker persists its offset about once a second, so this trails processing
    /// by a second or two: it counts what a restart would process again.
    #[must_use]
    pub fn backlog(&self) -> u64 {
        self.stored()
            .saturating_sub(self.shared.acknowledged.load(Ordering::Acquire))
    }

    /// Events in the dead letter (`dead-letter.jsonl` in the spool folder).
    #[must_use]
    pub fn dead_letters(&self) -> u64 {
        self.shared.dead_letters.load(Ordering::Acquire)
    }

    /// Events in the retry schedule ([`RETRY_FILE`]): they failed an attempt and
    /// wait for the next, off the line.
    #[must_use]
    pub fn retries(&self) -> u64 {
        retry::lock(&self.shared.retries).len()
    }

    /// When the first event in the retry schedule is due.
    #[must_use]
    pub fn next_retry_at(&self) -> Option<std::time::SystemTime> {
        retry::lock(&self.shared.retries).next_due()
    }

    /// Closes the spool for a supervised worker's stop: its reader finishes at the
    /// end of what was stored, and the retries waiting stay in the schedule.
    pub(crate) async fn close_leaving_retries(&self) {
        self.shared.leave_retries.store(true, Ordering::Release);
        self.close().await;
    }

    /// `count` dead letters were requeued.
    pub(crate) fn dead_letters_requeued(&self, count: u64) {
        let _ = self
            .shared
            .dead_letters
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(count))
            });
    }

    /// The end of the data that is durably written (for tests).
    #[doc(hidden)]
    #[must_use]
    pub fn committed(&self) -> Position {
        *self.shared.committed.borrow()
    }

    /// A reader that starts where the last reader acknowledged (the `offset` file),
    /// or at the beginning. The offset belongs to one reader: there is one at a
    /// time, and the next can be had once it is dropped.
    ///
    /// # Errors
    /// [`Error::Storage`] when the offset file exists but cannot be read, and, with
    /// [`io::ErrorKind::ResourceBusy`] as its source, while another reader of this
    /// spool is alive.
    pub fn reader(&self) -> Result<SpoolReader, Error> {
        if self.shared.reading.swap(true, Ordering::AcqRel) {
            return Err(Error::storage(
                format!("cannot read the spool in {}", self.shared.dir.display()),
                io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "it already has a reader; its offset belongs to one reader at a time",
                ),
            ));
        }
        let reading = ReadingFlag(Arc::clone(&self.shared.reading));
        Cursor::open(
            &self.shared.dir,
            self.shared.remove_processed,
            self.shared.committed.clone(),
            reader::Counters {
                _reading: reading,
                acknowledged: Arc::clone(&self.shared.acknowledged),
                dead_letters: Arc::clone(&self.shared.dead_letters),
            },
        )
        .map(|cursor| {
            // What an earlier reader had in hand and did not finish is due again.
            retry::lock(&self.shared.retries).hand_back();
            let leave = Arc::clone(&self.shared.leave_retries);
            let paused = Arc::clone(&self.shared.paused);
            SpoolReader::new(cursor, Arc::clone(&self.shared.retries), leave, paused)
        })
    }

    /// Stops the writer after the appends already queued, and waits for it. Later
    /// appends fail. Everything acknowledged was already synced; readers see the
    /// end of the spool and finish.
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self
            .shared
            .requests
            .send(Request::Close(done))
            .await
            .is_ok()
        {
            let _ = finished.await;
        }
    }
}

impl EventStore for Spool {
    async fn store(&self, records: Records) -> Result<(), Error> {
        let events = records.len();
        self.append_unchecked(records.into_lines(), events).await
    }

    async fn status(&self) -> StoreStatus {
        StoreStatus {
            store: format!("the local spool in {}", self.dir().display()),
            stored: Some(self.stored()),
            backlog: Some(self.backlog()),
            pending: None,
            dead_letters: Some(self.dead_letters()),
            retries: Some(self.retries()),
            next_retry_at: self.next_retry_at(),
            error: None,
            consumers: None,
        }
    }
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.dir)
            .field("stored", &self.stored())
            .field("committed", &self.committed())
            .finish()
    }
}

fn storage(what: &str, error: io::Error) -> Error {
    Error::storage(format!("cannot {what}"), error)
}

fn closed() -> Error {
    Error::storage(
        "cannot append",
        io::Error::new(io::ErrorKind::BrokenPipe, "the spool is closed"),
    )
}

/// Data read back from the spool that is not what the spool writes.
fn corrupt(what: String, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::storage(what, io::Error::new(io::ErrorKind::InvalidData, error))
}

//! The durable spool: append-only JSON Lines segments with group commit, crash
//! recovery, and a reader that resumes from a persisted offset.

use std::borrow::Cow;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Error, Event};

/// Where and how a [`Spool`] stores events.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpoolConfig {
    /// The folder holding the segments (`segment-0000000001.jsonl`, …), the
    /// reader's `offset` file and, if [`run_worker`](crate::run_worker) ever had to set a line aside,
    /// `rejected.jsonl`. Created if missing.
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// How far ahead of its data the segment being written is filled with zero
    /// bytes (0 turns this off). Appends then land inside the file instead of
    /// growing it, so each sync only flushes data and skips the file system's
    /// journal: on ext4 that halves the cost of a sync. The zero tail is cut off
    /// when the segment rolls over and when the spool closes; after a crash,
    /// [`Spool::open`] cuts it. Readers never read past committed data. Each step
    /// is one longer sync (about 1 ms per MiB here), so larger steps raise tail latency.
    pub preallocate_bytes: u64,
    /// Whether [`SpoolReader::acknowledge`] deletes the segments wholly before the
    /// acknowledged position (off by default: the spool then keeps every event, as
    /// a log would). Turn it on when the spool is only a queue, or it grows forever.
    pub remove_processed: bool,
    /// How long the writer may hold a group before syncing it, waiting for more
    /// appends to join, while the group is smaller than the previous one (zero turns
    /// this off). Under load, groups grow and syncs, each a fixed cost, get fewer; a
    /// spool that gets one append at a time never waits, since its previous group
    /// was no larger. The writer sleeps while it waits, leaving the CPU to the
    /// requests it waits for.
    pub group_linger: Duration,
}

impl SpoolConfig {
    /// Segments in `dir`, rolling over at 64 MiB, preallocated 1 MiB at a time,
    /// groups held up to 100 µs.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            segment_bytes: 64 * 1024 * 1024,
            preallocate_bytes: 1024 * 1024,
            remove_processed: false,
            group_linger: Duration::from_micros(100),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    /// Whether a [`SpoolReader`] is alive: the offset file belongs to one reader.
    reading: Arc<AtomicBool>,
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

    /// The end of the data that is durably written.
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
        SpoolReader::open(
            &self.shared.dir,
            self.shared.remove_processed,
            self.shared.committed.clone(),
            reading,
        )
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

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("segment-{segment:010}.jsonl"))
}

fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let name = name.to_str()?;
            name.strip_prefix("segment-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Makes a directory entry (a new segment, a renamed offset file) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates the spool folder if it is missing, and makes its entry durable in its
/// parent (and each new parent's in its own).
fn create_folder(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_folder(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

/// The file whose advisory lock marks a spool folder as open.
const LOCK_FILE: &str = "spool.lock";

/// Takes the folder's lock, or says who has it.
fn lock_folder(dir: &Path) -> Result<File, Error> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| storage("create spool.lock", e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(Error::storage(
            format!("cannot open the spool in {}", dir.display()),
            io::Error::new(
                io::ErrorKind::ResourceBusy,
                "another spool (in this process or another) has it open; a spool has one writer",
            ),
        )),
        Err(fs::TryLockError::Error(e)) => Err(storage("lock spool.lock", e)),
    }
}

/// Lowers a spool's "has a reader" flag when its reader is dropped.
#[derive(Debug)]
struct ReadingFlag(Arc<AtomicBool>);

impl Drop for ReadingFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What [`Spool::append`] takes: whole spool records holding `events` events.
fn check_records(lines: &[u8], events: u64) -> Result<(), Error> {
    let refuse = |what: String| {
        Err(Error::storage(
            "cannot append",
            io::Error::new(io::ErrorKind::InvalidInput, what),
        ))
    };
    if lines.is_empty() {
        return if events == 0 {
            Ok(())
        } else {
            refuse(format!("no lines, but {events} events"))
        };
    }
    if lines.last() != Some(&b'\n') || memchr::memchr(0, lines).is_some() {
        return refuse("lines must end in a line feed and hold no zero byte".to_owned());
    }
    let mut count = 0u64;
    for (number, line) in lines[..lines.len() - 1].split(|&b| b == b'\n').enumerate() {
        let record = serde_json::from_slice::<Line<'_>>(line)
            .map_err(|e| e.to_string())
            .and_then(|record| {
                serde_json::from_str::<Event<'_>>(record.event.get()).map_err(|e| e.to_string())
            });
        if let Err(error) = record {
            return refuse(format!(
                "line {} is not a spool record: {error}",
                number + 1
            ));
        }
        count += 1;
    }
    if count != events {
        return refuse(format!("{count} lines, but {events} events"));
    }
    Ok(())
}

/// One spool line as stored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    #[serde(borrow)]
    received_at: Cow<'a, str>,
    secret_index: usize,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// The length of the longest prefix of `data` that a crash cannot have torn, and how
/// many lines that is: every whole line, ending in its line feed, before the zero
/// bytes at the end.
///
/// A crash tears only what was never synced, so never acknowledged: zero bytes at
/// the end, where pages of the preallocated tail (or of a file's new end) never
/// reached the disk, and a last line without its line end. Only those are cut. A
/// whole line that is not a valid spool line is kept, a zero byte in it included,
/// with every line after it: the worker sets it aside instead of it taking later
/// lines, perhaps long acknowledged, with it.
fn valid_prefix(data: &[u8]) -> (usize, u64) {
    let data = &data[..data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)];
    let end = memchr::memrchr(b'\n', data).map_or(0, |i| i + 1);
    let lines = memchr::memchr_iter(b'\n', &data[..end]).count();
    (end, lines as u64)
}

/// The writer thread's state: the open last segment and its committed length.
struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    preallocate_bytes: u64,
    segment: u64,
    file: File,
    /// The committed data: everything before it is whole, synced lines.
    len: u64,
    /// The file's size: `len` plus a zero-filled tail, when preallocating.
    allocated: u64,
    group_linger: Duration,
    /// The folder's lock, held while the writer runs.
    lock: Option<File>,
}

/// Writes every buffer, in order, in as few `writev` calls as the OS allows.
fn write_all_vectored(file: &mut File, buffers: &[Vec<u8>]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = buffers.iter().map(|b| io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long the writer sleeps between looks at the queue while it lingers.
const LINGER_STEP: Duration = Duration::from_micros(20);

/// The source of the zero bytes a segment is preallocated with.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl Writer {
    fn recover(config: &SpoolConfig) -> io::Result<(Writer, Recovery)> {
        let dir = &config.dir;
        let numbers = segment_numbers(dir)?;
        let mut events = 0;
        for &n in numbers.iter().rev().skip(1) {
            let data = fs::read(segment_path(dir, n))?;
            events += data.iter().filter(|&&b| b == b'\n').count() as u64;
        }
        let segment = numbers.last().copied().unwrap_or(1);
        let path = segment_path(dir, segment);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (valid, lines) = valid_prefix(&data);
        let tail = data.get(valid..).unwrap_or_default();
        // A preallocated zero tail is not data; what comes before it is a torn line.
        let torn_bytes = tail.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1) as u64;
        if !tail.is_empty() {
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(valid as u64))?;
        if numbers.is_empty() {
            sync_dir(dir)?;
        }
        let recovery = Recovery {
            events: events + lines,
            segments: numbers.len().max(1) as u64,
            torn_bytes,
        };
        let writer = Writer {
            dir: dir.clone(),
            segment_bytes: config.segment_bytes,
            preallocate_bytes: config.preallocate_bytes,
            segment,
            file,
            len: valid as u64,
            allocated: valid as u64,
            group_linger: config.group_linger,
            lock: None,
        };
        Ok((writer, recovery))
    }

    fn position(&self) -> Position {
        Position {
            segment: self.segment,
            offset: self.len,
        }
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        committed: &watch::Sender<Position>,
        stored: &AtomicU64,
    ) {
        let mut group = Vec::new();
        let mut previous = 0;
        let mut closing = None;
        while closing.is_none() {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            group.push(first);
            while let Ok(next) = rx.try_recv() {
                group.push(next);
            }
            // Under load: let the requests still being parsed join this sync.
            let start = Instant::now();
            while group.len() < previous && start.elapsed() < self.group_linger {
                std::thread::sleep(LINGER_STEP);
                while let Ok(next) = rx.try_recv() {
                    group.push(next);
                }
            }
            previous = group.len();
            let mut answers = Vec::with_capacity(group.len());
            let mut buffers = Vec::with_capacity(group.len());
            let mut events = 0;
            for request in group.drain(..) {
                match request {
                    Request::Append {
                        lines,
                        events: n,
                        done,
                    } => {
                        events += n;
                        buffers.push(lines);
                        answers.push(done);
                    }
                    Request::Close(done) => closing = Some(done),
                }
            }
            let result = if buffers.is_empty() {
                Ok(())
            } else {
                self.write_group(&buffers).map_err(Arc::new)
            };
            if result.is_ok() {
                stored.fetch_add(events, Ordering::AcqRel);
                committed.send_replace(self.position());
                if self.len >= self.segment_bytes {
                    if let Err(error) = self.roll_over() {
                        // The next append retries on the same segment.
                        let _ = error;
                    } else {
                        committed.send_replace(self.position());
                    }
                }
            }
            for (done, lines) in answers.into_iter().zip(buffers) {
                let _ = done.send(result.clone().map(|()| lines));
            }
        }
        // Appends still queued behind the close are refused: dropping the receiver
        // drops their answer channels.
        drop(rx);
        // A clean segment for other readers; after a crash `recover` does this.
        let _ = self.cut_zero_tail();
        // Unlocked before the close is answered, so the folder can be opened again
        // as soon as it is.
        self.lock = None;
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// Writes every buffer and syncs once. On failure the segment is cut back to
    /// its committed length, so no partial line is ever left behind.
    fn write_group(&mut self, buffers: &[Vec<u8>]) -> io::Result<()> {
        let end = self.len + buffers.iter().map(|b| b.len() as u64).sum::<u64>();
        let written = self
            .preallocate(end)
            // One write for the whole group: the syscall count stays flat as load grows.
            .and_then(|()| write_all_vectored(&mut self.file, buffers))
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len = end;
                self.allocated = self.allocated.max(end);
                Ok(())
            }
            Err(error) => {
                let _ = self.file.set_len(self.len);
                let _ = self.file.seek(SeekFrom::Start(self.len));
                self.allocated = self.len;
                Err(error)
            }
        }
    }

    /// Makes sure the file reaches `end`, filling it with zeros a step ahead, and
    /// leaves the cursor at the committed length. The sync that follows makes the
    /// new size durable; the syncs after it, within the zeros, are data-only.
    fn preallocate(&mut self, end: u64) -> io::Result<()> {
        if self.preallocate_bytes == 0 || end <= self.allocated {
            return Ok(());
        }
        let target = end.max(
            end.saturating_add(self.preallocate_bytes)
                .min(self.segment_bytes),
        );
        self.file.seek(SeekFrom::Start(self.allocated))?;
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64);
            self.file
                .write_all(ZEROS.get(..n as usize).unwrap_or_default())?;
            at += n;
        }
        self.allocated = target;
        self.file.seek(SeekFrom::Start(self.len))?;
        Ok(())
    }

    /// Cuts the preallocated zeros off the end of the segment, durably.
    fn cut_zero_tail(&mut self) -> io::Result<()> {
        if self.allocated > self.len {
            self.file.set_len(self.len)?;
            self.file.sync_data()?;
            self.allocated = self.len;
        }
        Ok(())
    }

    fn roll_over(&mut self) -> io::Result<()> {
        // Before the next segment exists: readers take a segment with a successor
        // to be complete up to its size.
        self.cut_zero_tail()?;
        let next = self.segment + 1;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(segment_path(&self.dir, next))?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.segment = next;
        self.len = 0;
        self.allocated = 0;
        Ok(())
    }
}

/// One event read back from the spool.
#[derive(Debug, Clone)]
pub struct SpooledEvent {
    /// The batch this line was read in, shared by its events: one read, no copies.
    chunk: Arc<Vec<u8>>,
    line: std::ops::Range<usize>,
    end: Position,
}

/// A spool line's parts: `receivedAt`, `secretIndex` and the raw event.
struct Parts<'a> {
    received_at: Cow<'a, str>,
    secret_index: usize,
    event: &'a str,
}

impl SpooledEvent {
    pub(crate) fn bytes(&self) -> &[u8] {
        self.chunk.get(self.line.clone()).unwrap_or_default()
    }

    fn parts(&self) -> Result<Parts<'_>, Error> {
        let line = self.bytes();
        // The layout this crate writes, taken apart without a second JSON scan; any
        // other valid line goes through serde.
        if let Some(parts) = split_line(line) {
            return Ok(parts);
        }
        let parsed: Line<'_> = serde_json::from_slice(line)
            .map_err(|e| corrupt(format!("corrupt spool line before {:?}", self.end), e))?;
        Ok(Parts {
            received_at: parsed.received_at,
            secret_index: parsed.secret_index,
            event: parsed.event.get(),
        })
    }

    /// The event, parsed from the envelope as it was received (it was verified
    /// before it was stored).
    ///
    /// # Errors
    /// [`Error::Storage`] if the line is corrupt.
    pub fn event(&self) -> Result<Event<'_>, Error> {
        let raw = self.parts()?.event;
        // One envelope, already valid UTF-8: parsed straight, without the batch check.
        serde_json::from_str(raw).map_err(|e| {
            corrupt(
                format!("corrupt event in the spool before {:?}", self.end),
                e,
            )
        })
    }

    /// When the receiver stored it (RFC 3339, UTC).
    ///
    /// # Errors
    /// [`Error::Storage`] if the line is corrupt.
    pub fn received_at(&self) -> Result<String, Error> {
        Ok(self.parts()?.received_at.into_owned())
    }

    /// Which of the verifier's secrets matched when it arrived (0 is the primary).
    ///
    /// # Errors
    /// [`Error::Storage`] if the line is corrupt.
    pub fn secret_index(&self) -> Result<usize, Error> {
        Ok(self.parts()?.secret_index)
    }

    /// The spool position just after this event; acknowledge it once processed.
    #[must_use]
    pub fn end(&self) -> Position {
        self.end
    }
}

/// One spool line per event, in the layout [`split_line`] reads back: the envelope's raw bytes with line breaks (which in
/// valid JSON can only be insignificant whitespace) turned into spaces.
pub(crate) fn encode_lines(events: &[&str], secret_index: usize) -> Vec<u8> {
    // `{"receivedAt":"<24 bytes>","secretIndex":<up to 20 digits>,"event":` and `}\n`.
    const FRAME: usize = 84 + 2;
    let received_at = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    let mut lines = Vec::with_capacity(events.iter().map(|e| FRAME + e.len()).sum());
    let mut prefix = 0..0;
    for (i, event) in events.iter().enumerate() {
        if i == 0 {
            // Writing to a Vec cannot fail.
            let _ = write!(
                lines,
                "{{\"receivedAt\":\"{received_at}\",\"secretIndex\":{secret_index},\"event\":"
            );
            prefix = 0..lines.len();
        } else {
            lines.extend_from_within(prefix.clone());
        }
        let start = lines.len();
        lines.extend_from_slice(event.as_bytes());
        if let Some(raw) = lines.get_mut(start..) {
            raw.iter_mut()
                .filter(|b| matches!(**b, b'\n' | b'\r'))
                .for_each(|b| *b = b' ');
        }
        lines.extend_from_slice(b"}\n");
    }
    lines
}

/// `{"receivedAt":"…","secretIndex":N,"event":…}\n`, exactly as [`encode_lines`] writes it.
fn split_line(line: &[u8]) -> Option<Parts<'_>> {
    let rest = line.strip_prefix(b"{\"receivedAt\":\"")?;
    let quote = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    let (received_at, rest) = rest.split_at(quote);
    let rest = rest.strip_prefix(b"\",\"secretIndex\":")?;
    let comma = rest.iter().position(|&b| b == b',')?;
    let (index, rest) = rest.split_at(comma);
    let event = rest.strip_prefix(b",\"event\":")?.strip_suffix(b"}\n")?;
    Some(Parts {
        received_at: Cow::Borrowed(std::str::from_utf8(received_at).ok()?),
        secret_index: std::str::from_utf8(index).ok()?.parse().ok()?,
        event: std::str::from_utf8(event).ok()?,
    })
}

/// Reads committed events from a [`Spool`], in order, and remembers how far it got
/// in the spool's `offset` file. Delivery to the reader is at least once: after a
/// crash it resumes from the last acknowledged position.
#[derive(Debug)]
pub struct SpoolReader {
    dir: PathBuf,
    remove_processed: bool,
    position: Position,
    committed: watch::Receiver<Position>,
    /// What was committed when the last batch was read: the end it read towards.
    read_towards: Position,
    file: Option<(u64, File)>,
    /// The last chunk read, reused once every event handed out from it is dropped.
    chunk: Arc<Vec<u8>>,
    /// Lowered when this reader is dropped, so the spool can hand out another.
    _reading: ReadingFlag,
}

const OFFSET_FILE: &str = "offset";
/// Where [`run_worker`](crate::run_worker) sets aside stored lines that cannot be read as events.
const REJECTED_FILE: &str = "rejected.jsonl";

impl SpoolReader {
    fn open(
        dir: &Path,
        remove_processed: bool,
        committed: watch::Receiver<Position>,
        reading: ReadingFlag,
    ) -> Result<Self, Error> {
        let position = match fs::read_to_string(dir.join(OFFSET_FILE)) {
            Ok(text) => parse_offset(&text).ok_or_else(|| {
                corrupt(
                    "corrupt offset file".to_owned(),
                    format!("not a spool position: {text:?}"),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Position {
                segment: segment_numbers(dir)
                    .ok()
                    .and_then(|n| n.first().copied())
                    .unwrap_or(1),
                offset: 0,
            },
            Err(e) => return Err(storage("read the offset file", e)),
        };
        // Never past the data: had damage cut acknowledged lines off the end, new
        // events would land behind the reader, unseen.
        let position = position.min(*committed.borrow());
        Ok(SpoolReader {
            dir: dir.to_owned(),
            remove_processed,
            position,
            committed,
            read_towards: position,
            file: None,
            chunk: Arc::default(),
            _reading: reading,
        })
    }

    /// Where the reader is: everything before it was handed out.
    #[must_use]
    pub fn position(&self) -> Position {
        self.position
    }

    /// Whether the last batch reached what was committed when it was read (a batch
    /// cut short by its size limit or a segment's end did not). What was committed
    /// since is the next batch's business.
    pub(crate) fn caught_up(&self) -> bool {
        self.position >= self.read_towards
    }

    /// Waits for committed events past the reader's position and returns up to
    /// about `max_bytes` of them (at least one). `None` once the spool is closed
    /// and everything was read.
    ///
    /// # Errors
    /// [`Error::Storage`] when a segment cannot be read.
    pub async fn next_batch(
        &mut self,
        max_bytes: usize,
    ) -> Result<Option<Vec<SpooledEvent>>, Error> {
        while let Some(committed) = self.wait_for_data().await {
            let batch = self.read_now(committed, max_bytes)?;
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
        }
        Ok(None)
    }

    /// Waits, without any I/O, until something is committed past the reader's
    /// position, and returns the committed end; `None` once the spool is closed and
    /// everything was read.
    pub(crate) async fn wait_for_data(&mut self) -> Option<Position> {
        loop {
            let committed = *self.committed.borrow_and_update();
            if self.position < committed {
                return Some(committed);
            }
            if self.committed.changed().await.is_err() {
                // The writer is gone; read what it committed last, then stop.
                let committed = *self.committed.borrow();
                return (self.position < committed).then_some(committed);
            }
        }
    }

    /// Reads up to about `max_bytes` of the events before `committed` (blocking
    /// file I/O).
    pub(crate) fn read_now(
        &mut self,
        committed: Position,
        max_bytes: usize,
    ) -> Result<Vec<SpooledEvent>, Error> {
        self.read_towards = committed;
        self.read(committed, max_bytes.max(1))
    }

    /// The spool folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn read(&mut self, committed: Position, max_bytes: usize) -> Result<Vec<SpooledEvent>, Error> {
        let segment = self.position.segment;
        if self.file.as_ref().is_none_or(|(n, _)| *n != segment) {
            let file = File::open(segment_path(&self.dir, segment))
                .map_err(|e| storage("open a segment", e))?;
            self.file = Some((segment, file));
        }
        let Some((_, file)) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        // A later segment exists: this one is complete, read it to its end.
        let limit = if committed.segment > segment {
            file.metadata()
                .map_err(|e| storage("read a segment", e))?
                .len()
        } else {
            committed.offset
        };
        let remaining = limit.saturating_sub(self.position.offset);
        if remaining == 0 {
            if committed.segment > segment {
                self.position = Position {
                    segment: segment + 1,
                    offset: 0,
                };
            }
            return Ok(Vec::new());
        }
        // The events of the last batch are usually gone by now: reuse their buffer.
        let mut data = match Arc::get_mut(&mut self.chunk) {
            Some(data) => std::mem::take(data),
            None => Vec::new(),
        };
        let mut budget = remaining.min(max_bytes as u64);
        read_at(file, self.position.offset, budget, &mut data)?;
        let mut whole = memchr::memrchr(b'\n', &data).map_or(0, |last| last + 1);
        while whole == 0 && budget < remaining {
            // The next line is longer than the budget: read it whole, and only it.
            budget = budget.saturating_mul(2).min(remaining);
            read_at(file, self.position.offset, budget, &mut data)?;
            whole = memchr::memchr(b'\n', &data).map_or(0, |first| first + 1);
        }
        if whole == 0 {
            if committed.segment == segment {
                return Err(corrupt(
                    format!("corrupt spool after {:?}", self.position),
                    "no line end",
                ));
            }
            // A finished segment whose end lost its line end (damage): hand the rest
            // out as one line, which the worker sets aside, rather than stop here.
            whole = data.len();
        }
        data.truncate(whole);
        self.chunk = Arc::new(data);
        let mut events = Vec::new();
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\n', &self.chunk).map(|newline| newline + 1);
        for end in ends.chain((!self.chunk.ends_with(b"\n")).then_some(whole)) {
            events.push(SpooledEvent {
                chunk: Arc::clone(&self.chunk),
                line: start..end,
                end: Position {
                    segment,
                    offset: self.position.offset + end as u64,
                },
            });
            start = end;
        }
        self.position.offset += whole as u64;
        Ok(events)
    }

    /// Appends `line` (without its line end) to `rejected.jsonl` in the spool folder
    /// and syncs it, so that it outlives its segment.
    pub(crate) fn set_aside(&self, line: &[u8]) -> Result<(), Error> {
        crate::worker::append_synced(&self.dir, REJECTED_FILE, &[line, b"\n"].concat())
    }

    /// Persists `upto` as the point to resume from (written to a temporary file,
    /// synced and renamed into place, so a crash leaves the old or the new offset).
    /// With [`SpoolConfig::remove_processed`], then deletes the segments before
    /// `upto`'s; one that cannot be deleted now is tried again at the next call.
    ///
    /// # Errors
    /// [`Error::Storage`] when the offset cannot be written.
    pub fn acknowledge(&mut self, upto: Position) -> Result<(), Error> {
        let tmp = self.dir.join(format!("{OFFSET_FILE}.tmp"));
        let write = || -> io::Result<()> {
            let mut file = File::create(&tmp)?;
            writeln!(file, "{} {}", upto.segment, upto.offset)?;
            file.sync_all()?;
            fs::rename(&tmp, self.dir.join(OFFSET_FILE))?;
            sync_dir(&self.dir)
        };
        write().map_err(|e| storage("write the offset file", e))?;
        if self.remove_processed {
            // Only after the offset is durable: a restart never looks for them.
            for n in segment_numbers(&self.dir).unwrap_or_default() {
                if n < upto.segment {
                    let _ = fs::remove_file(segment_path(&self.dir, n));
                }
            }
        }
        Ok(())
    }
}

/// Reads `len` bytes at `offset` into `data`, replacing what it held.
fn read_at(file: &mut File, offset: u64, len: u64, data: &mut Vec<u8>) -> Result<(), Error> {
    data.clear();
    data.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(data))
        .map_err(|e| storage("read a segment", e))
}

fn parse_offset(text: &str) -> Option<Position> {
    let (segment, offset) = text.trim().split_once(' ')?;
    Some(Position {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

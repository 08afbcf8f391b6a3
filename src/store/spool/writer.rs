//! The writer thread: appends groups of lines, syncs each group once, preallocates
//! ahead of the data, and rolls segments over.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::files::{segment_path, sync_dir};
use super::{Position, Request};

/// The writer thread's state: the open last segment and its committed length.
pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) segment_bytes: u64,
    pub(super) preallocate_bytes: u64,
    pub(super) segment: u64,
    pub(super) file: File,
    /// The committed data: everything before it is whole, synced lines.
    pub(super) len: u64,
    /// The file's size: `len` plus a zero-filled tail, when preallocating.
    pub(super) allocated: u64,
    pub(super) group_linger: Duration,
    /// The folder's lock, held while the writer runs.
    pub(super) lock: Option<File>,
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
    pub(super) fn position(&self) -> Position {
        Position {
            segment: self.segment,
            offset: self.len,
        }
    }

    pub(super) fn run(
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

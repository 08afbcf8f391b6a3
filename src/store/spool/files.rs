//! The spool folder's files: segments, the lock, and making entries durable.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::storage;
use crate::Error;

/// Makes a directory entry (a new segment, a renamed offset file) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates the spool folder if it is missing, and makes its entry durable in its
/// parent (and each new parent's in its own).
pub(super) fn create_folder(dir: &Path) -> io::Result<()> {
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
pub(super) fn lock_folder(dir: &Path) -> Result<File, Error> {
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

/// The file whose lock guards the dead letter: held while a dead letter is
/// appended and while the dead letter is requeued, so that no line written during a
/// requeue is removed with the lines requeued.
const DEAD_LETTER_LOCK: &str = "dead-letter.lock";

/// Waits for the dead letter's lock and holds it until the file is dropped.
pub(super) fn lock_dead_letter(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(DEAD_LETTER_LOCK))?;
    file.lock()?;
    Ok(file)
}

/// Lowers a spool's "has a reader" flag when its reader is dropped.
#[derive(Debug)]
pub(super) struct ReadingFlag(pub(super) Arc<AtomicBool>);

impl Drop for ReadingFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub(super) fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("segment-{segment:010}.jsonl"))
}

pub(super) fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
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

/// Appends `line` to `name` in `dir` and syncs it (and the folder, when the file is
/// new), so that it outlives the spool's segments.
pub(super) fn append_synced(dir: &Path, name: &str, line: &[u8]) -> Result<(), Error> {
    let path = dir.join(name);
    let write = || -> io::Result<()> {
        let created = !path.exists();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)?;
        std::io::Write::write_all(&mut file, line)?;
        file.sync_data()?;
        if created {
            sync_dir(dir)?;
        }
        Ok(())
    };
    write().map_err(|e| Error::storage(format!("cannot append to {name}"), e))
}

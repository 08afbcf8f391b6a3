//! What a crash can leave in the last segment, and its repair when the spool opens.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};

use super::files::{segment_numbers, segment_path, sync_dir};
use super::writer::Writer;
use super::{Recovery, SpoolConfig};

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

impl Writer {
    pub(super) fn recover(config: &SpoolConfig) -> io::Result<(Writer, Recovery)> {
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::valid_prefix;

    #[test]
    fn only_a_torn_last_line_and_the_zero_tail_are_cut() {
        assert_eq!(valid_prefix(b""), (0, 0));
        assert_eq!(valid_prefix(b"a\nb\n"), (4, 2));
        assert_eq!(
            valid_prefix(b"a\nb\n\0\0\0"),
            (4, 2),
            "the preallocated tail"
        );
        assert_eq!(valid_prefix(b"a\nbro"), (2, 1), "a torn last line");
        assert_eq!(valid_prefix(b"a\nbro\0\0"), (2, 1), "torn, then zeros");
        // A zero byte inside a whole line is damage, not a crash: kept, with what follows.
        assert_eq!(valid_prefix(b"a\nb\0c\nd\n\0"), (8, 3));
        assert_eq!(valid_prefix(b"\0\0\0"), (0, 0));
    }
}

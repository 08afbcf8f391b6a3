//! The worker's outcomes per minute over the last hour, for the console's chart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Minutes kept: the last hour.
pub const MINUTES: usize = 60;

/// What the chart shows of one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Minute {
    /// The minute, in minutes since the Unix epoch.
    pub minute: u64,
    /// Handler calls that succeeded.
    pub processed: u64,
    /// Handler calls that failed (an error or a panic).
    pub failed: u64,
    /// Events given up after their last attempt.
    pub dead_lettered: u64,
}

/// A ring of [`MINUTES`] slots, each tagged with its minute; a slot of an older
/// minute is reset when its minute comes round again. Lock-free: a count that
/// races a reset may land in the new minute or be lost, never in a wrong one
/// for long.
#[derive(Debug)]
pub(crate) struct Minutes {
    slots: [[AtomicU64; 4]; MINUTES],
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Tally {
    Processed = 1,
    Failed = 2,
    DeadLettered = 3,
}

impl Default for Minutes {
    fn default() -> Self {
        Minutes {
            slots: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

fn minute_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

impl Minutes {
    pub(crate) fn count(&self, tally: Tally) {
        self.count_at(tally, SystemTime::now());
    }

    fn count_at(&self, tally: Tally, now: SystemTime) {
        let minute = minute_of(now);
        let slot = &self.slots[usize::try_from(minute % MINUTES as u64).unwrap_or(0)];
        let tagged = slot[0].load(Ordering::Acquire);
        if tagged != minute
            && slot[0]
                .compare_exchange(tagged, minute, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for counter in &slot[1..] {
                counter.store(0, Ordering::Release);
            }
        }
        slot[tally as usize].fetch_add(1, Ordering::AcqRel);
    }

    /// The last hour up to `now`, oldest first: [`MINUTES`] entries, zero for a
    /// minute with nothing counted.
    pub(crate) fn last_hour(&self, now: SystemTime) -> Vec<Minute> {
        let current = minute_of(now);
        (0..MINUTES as u64)
            .rev()
            .map(|back| {
                let minute = current.saturating_sub(back);
                let slot = &self.slots[usize::try_from(minute % MINUTES as u64).unwrap_or(0)];
                if slot[0].load(Ordering::Acquire) != minute {
                    return Minute {
                        minute,
                        ..Minute::default()
                    };
                }
                let read = |tally: Tally| slot[tally as usize].load(Ordering::Acquire);
                Minute {
                    minute,
                    processed: read(Tally::Processed),
                    failed: read(Tally::Failed),
                    dead_lettered: read(Tally::DeadLettered),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_land_in_their_minute_and_an_hour_later_start_again() {
        let minutes = Minutes::default();
        let start = UNIX_EPOCH + Duration::from_secs(60 * 1_000_000);
        minutes.count_at(Tally::Processed, start);
        minutes.count_at(Tally::Processed, start + Duration::from_secs(59));
        minutes.count_at(Tally::Failed, start + Duration::from_secs(60));
        let hour = minutes.last_hour(start + Duration::from_secs(60));
        assert_eq!(hour.len(), MINUTES);
        assert_eq!(hour[MINUTES - 2].processed, 2);
        assert_eq!(hour[MINUTES - 1].failed, 1);
        assert_eq!(hour[MINUTES - 1].minute, 1_000_001);
        // The same slot an hour later: the old counts are gone.
        let later = start + Duration::from_secs(3600);
        minutes.count_at(Tally::DeadLettered, later);
        let hour = minutes.last_hour(later);
        assert_eq!(hour[MINUTES - 1].processed, 0);
        assert_eq!(hour[MINUTES - 1].dead_lettered, 1);
        assert!(hour[..MINUTES - 1].iter().all(|m| m.processed == 0));
    }
}

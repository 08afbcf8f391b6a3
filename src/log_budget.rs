//! A budget of log lines a second, so a flood of refusals or skipped events
//! cannot fill a disk: the lines over it are counted, and the next line logged
//! says how many were left out.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most `per_second` lines a second; see [`LogBudget::admit`].
#[derive(Debug)]
pub(crate) struct LogBudget {
    per_second: u32,
    window: Mutex<Option<Window>>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    pub(crate) const fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            window: Mutex::new(None),
        }
    }

    /// `Some(lines left out since the last one logged)` when this line may be
    /// logged, `None` (and it is counted) when the second's budget is spent.
    pub(crate) fn admit(&self) -> Option<u64> {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let current = window.get_or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(current.start) >= Duration::from_secs(1) {
            current.start = now;
            current.logged = 0;
        }
        if current.logged >= self.per_second {
            current.suppressed += 1;
            return None;
        }
        current.logged += 1;
        Some(std::mem::take(&mut current.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::LogBudget;

    #[test]
    fn lines_over_the_budget_are_counted_and_reported_by_the_next() {
        let budget = LogBudget::new(2);
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), None);
        assert_eq!(budget.admit(), None);
        std::thread::sleep(std::time::Duration::from_millis(1010));
        assert_eq!(budget.admit(), Some(2));
    }
}

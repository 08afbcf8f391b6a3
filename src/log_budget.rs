//! A budget of log lines a second, so a flood of refusals or skipped events
//! cannot fill a disk: the lines over it are counted, and a line at the end of
//! the second (or the next line logged, whichever comes first) says how many were
//! left out.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most `per_second` lines a second; see [`LogBudget::admit`].
#[derive(Debug)]
pub(crate) struct LogBudget {
    per_second: u32,
    /// What the lines say, for the line that counts those left out.
    what: &'static str,
    window: Mutex<Option<Window>>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
    /// A line counting those left out is due at the end of this second.
    count_due: bool,
}

impl LogBudget {
    pub(crate) const fn new(per_second: u32, what: &'static str) -> Self {
        LogBudget {
            per_second,
            what,
            window: Mutex::new(None),
        }
    }

    /// `Some(lines left out since the last one logged)` when this line may be
    /// logged, `None` (and it is counted) when the second's budget is spent.
    ///
    /// The first line left out in a second also sets a timer, when there is a tokio
    /// runtime: at the end of that second, one line says how many were left out
    /// unless a line logged since said it already.
    pub(crate) fn admit(&'static self) -> Option<u64> {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let current = window.get_or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
            count_due: false,
        });
        if now.duration_since(current.start) >= Duration::from_secs(1) {
            current.start = now;
            current.logged = 0;
        }
        if current.logged >= self.per_second {
            current.suppressed += 1;
            if !current.count_due
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                current.count_due = true;
                let end = current.start + Duration::from_secs(1);
                runtime.spawn(async move {
                    tokio::time::sleep_until(end.into()).await;
                    self.count_left_out();
                });
            }
            return None;
        }
        current.logged += 1;
        Some(std::mem::take(&mut current.suppressed))
    }

    /// Logs how many lines were left out since the last one logged, if any.
    fn count_left_out(&self) {
        let left_out = {
            let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(current) = window.as_mut() else {
                return;
            };
            current.count_due = false;
            std::mem::take(&mut current.suppressed)
        };
        if left_out > 0 {
            tracing::info!(
                left_out,
                "{}: {left_out} more in the last second, not logged one by one",
                self.what
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogBudget;

    #[test]
    fn lines_over_the_budget_are_counted_and_reported_by_the_next() {
        static BUDGET: LogBudget = LogBudget::new(2, "test line");
        let budget = &BUDGET;
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), None);
        assert_eq!(budget.admit(), None);
        std::thread::sleep(std::time::Duration::from_millis(1010));
        assert_eq!(budget.admit(), Some(2));
    }

    #[tokio::test]
    async fn the_lines_left_out_are_counted_at_the_end_of_the_second() {
        static BUDGET: LogBudget = LogBudget::new(1, "test line");
        assert_eq!(BUDGET.admit(), Some(0));
        assert_eq!(BUDGET.admit(), None);
        assert_eq!(BUDGET.admit(), None);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        // The timer's line took the count: the next line has none left to report.
        assert_eq!(BUDGET.admit(), Some(0));
    }
}

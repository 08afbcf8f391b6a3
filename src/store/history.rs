//! The attempts kept with an event in the retry schedule and the dead letter: a
//! JSON array of `{"at":…,"error":…}`, oldest first, the last [`KEPT`] of them.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// How many attempts are kept (the count of attempts is kept whole).
pub const KEPT: usize = 20;

/// The longest error an attempt keeps.
const ERROR_CHARS: usize = 1000;

/// One failed handler call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Attempt {
    /// When it failed (RFC 3339, milliseconds).
    pub at: String,
    /// Its error, cut to a thousand characters.
    pub error: String,
}

/// The attempts in `history` (none when it is empty or not one this crate wrote).
#[must_use]
pub fn parse(history: &str) -> Vec<Attempt> {
    serde_json::from_str(history).unwrap_or_default()
}

/// `history` with a failure at `at` with `error` added, as JSON.
pub(crate) fn with_attempt(history: &str, at: SystemTime, error: &str) -> String {
    let mut attempts = parse(history);
    attempts.push(Attempt {
        at: humantime::format_rfc3339_millis(at).to_string(),
        error: crate::console::cut(error, ERROR_CHARS),
    });
    let skip = attempts.len().saturating_sub(KEPT);
    serde_json::to_string(&attempts[skip..]).unwrap_or_else(|_| "[]".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_keeps_its_last_attempts_in_order() {
        let mut history = String::new();
        for n in 0..25 {
            history = with_attempt(&history, SystemTime::UNIX_EPOCH, &format!("failure {n}"));
        }
        let attempts = parse(&history);
        assert_eq!(attempts.len(), KEPT);
        assert_eq!(attempts[0].error, "failure 5");
        assert_eq!(attempts[KEPT - 1].error, "failure 24");
        assert_eq!(attempts[0].at, "1970-01-01T00:00:00.000Z");
        assert!(parse("not json").is_empty());
        let long = with_attempt("", SystemTime::UNIX_EPOCH, &"x".repeat(5000));
        assert_eq!(parse(&long)[0].error.chars().count(), ERROR_CHARS + 1);
    }
}

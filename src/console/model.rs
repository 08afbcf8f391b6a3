//! What the console shows of a store: dead letters and retries as summaries, the
//! filter an operator sets, a page of them, and the audit log's entries.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// How many events a page lists.
pub const PAGE_SIZE: usize = 50;

/// The longest error text a summary keeps (the event's page shows it whole).
const SUMMARY_ERROR_CHARS: usize = 300;

/// One dead letter or retry as a list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// The store's name for this entry: a spool dead letter's line hash, a stream
    /// entry id, a retry's number or member.
    pub id: String,
    /// Where it sits in the store's order (later is larger): pages go by it.
    pub order: u128,
    /// The event's `name`.
    pub name: String,
    /// The event's `eventId`.
    pub event_id: String,
    /// The last attempt's error, cut to a few hundred characters.
    pub error: String,
    /// Handler calls made.
    pub attempts: u32,
    /// When it was dead-lettered, or when its next attempt is due (RFC 3339).
    pub at: String,
    /// When the receive step stored it (ms since the Unix epoch; 0 when unknown).
    pub received_ms: u64,
}

/// The stored parts of a record a summary needs.
#[derive(Deserialize)]
pub(crate) struct RecordHead<'a> {
    #[serde(rename = "receivedAt", borrow)]
    received_at: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    event: Option<EventHead<'a>>,
}

#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(rename = "eventId", borrow)]
    event_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
}

impl Summary {
    /// A summary of `record` (a stored line) kept under `id` at `order`.
    pub(crate) fn of_record(
        id: String,
        order: u128,
        record: &[u8],
        error: &str,
        attempts: u32,
        at: String,
    ) -> Self {
        let head = serde_json::from_slice::<RecordHead<'_>>(record).ok();
        Self::of_head(id, order, head.as_ref(), error, attempts, at)
    }

    /// A summary of a record read as far as `head`.
    pub(crate) fn of_head(
        id: String,
        order: u128,
        head: Option<&RecordHead<'_>>,
        error: &str,
        attempts: u32,
        at: String,
    ) -> Self {
        let event = head.and_then(|h| h.event.as_ref());
        let text =
            |s: Option<&std::borrow::Cow<'_, str>>| s.map(|s| s.to_string()).unwrap_or_default();
        Summary {
            id,
            order,
            name: text(event.and_then(|e| e.name.as_ref())),
            event_id: text(event.and_then(|e| e.event_id.as_ref())),
            error: cut(error, SUMMARY_ERROR_CHARS),
            attempts,
            at,
            received_ms: head
                .and_then(|h| h.received_at.as_deref())
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .map_or(0, millis),
        }
    }

    /// When it was received, as RFC 3339 (seconds), or "unknown".
    #[must_use]
    pub fn received(&self) -> String {
        if self.received_ms == 0 {
            return "unknown".to_owned();
        }
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(self.received_ms))
            .to_string()
    }
}

/// `text` cut to at most `chars` characters, with an ellipsis when cut.
pub(crate) fn cut(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

pub(crate) fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What an operator narrows a list to: every part optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Filter {
    /// The event name, exactly (`message.sent`).
    pub name: Option<String>,
    /// Text the error contains (case-insensitive).
    pub error: Option<String>,
    /// Received at or after (ms since the Unix epoch).
    pub from_ms: Option<u64>,
    /// Received before (ms since the Unix epoch).
    pub to_ms: Option<u64>,
}

impl Filter {
    /// Whether nothing narrows the list.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Whether `summary` passes.
    #[must_use]
    pub fn matches(&self, summary: &Summary) -> bool {
        self.name.as_ref().is_none_or(|n| summary.name == *n)
            && self
                .error
                .as_ref()
                .is_none_or(|e| contains_ignoring_case(&summary.error, e))
            && self.from_ms.is_none_or(|f| summary.received_ms >= f)
            && self.to_ms.is_none_or(|t| summary.received_ms < t)
    }
}

fn contains_ignoring_case(haystack: &str, needle: &str) -> bool {
    if needle.is_ascii() && haystack.is_ascii() {
        let needle = needle.as_bytes();
        return needle.is_empty()
            || haystack
                .as_bytes()
                .windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle));
    }
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// One page of a list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page {
    /// The entries on this page.
    pub items: Vec<Summary>,
    /// The cursor of the next (older) page, when there is one.
    pub next: Option<u128>,
    /// How many entries match the filter in all.
    pub matching: u64,
}

/// Every summary of a list, oldest first, kept by the console between pages and
/// read anew from the store only where it changed.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub(crate) entries: Vec<Summary>,
}

impl Index {
    /// The page of entries older than `before` (all, when `None`) that match.
    pub(crate) fn page(&self, filter: &Filter, before: Option<u128>) -> Page {
        let end = before.map_or(self.entries.len(), |b| {
            self.entries.partition_point(|s| s.order < b)
        });
        let mut items = Vec::new();
        let mut next = None;
        for summary in self.entries[..end].iter().rev() {
            if !filter.matches(summary) {
                continue;
            }
            if items.len() == PAGE_SIZE {
                next = items.last().map(|s: &Summary| s.order);
                break;
            }
            items.push(summary.clone());
        }
        let matching = if filter.is_empty() {
            self.entries.len() as u64
        } else {
            self.entries.iter().filter(|s| filter.matches(s)).count() as u64
        };
        Page {
            items,
            next,
            matching,
        }
    }

    /// The ids of every entry that matches.
    pub(crate) fn matching_ids(&self, filter: &Filter) -> Vec<String> {
        self.entries
            .iter()
            .filter(|s| filter.matches(s))
            .map(|s| s.id.clone())
            .collect()
    }

    /// How many entries there are of each event name.
    pub(crate) fn by_name(&self) -> BTreeMap<String, u64> {
        let mut names = BTreeMap::new();
        for summary in &self.entries {
            *names.entry(summary.name.clone()).or_default() += 1;
        }
        names
    }

    pub(crate) fn find(&self, id: &str) -> Option<&Summary> {
        self.entries.iter().find(|s| s.id == id)
    }
}

/// One action in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditEntry {
    /// When (RFC 3339, milliseconds).
    pub at: String,
    /// The label of the token that signed in.
    pub who: String,
    /// What was done: `requeue`, `discard`, `retry now`, `pause`, `resume`.
    pub what: String,
    /// How many events it touched.
    pub count: u64,
    /// What it was asked for: ids, or the filter.
    pub detail: String,
}

impl AuditEntry {
    pub(crate) fn now(who: &str, what: &str, count: u64, detail: String) -> Self {
        AuditEntry {
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            who: who.to_owned(),
            what: what.to_owned(),
            count,
            detail: cut(&detail, 500),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(order: u128, name: &str, error: &str) -> Summary {
        Summary {
            id: order.to_string(),
            order,
            name: name.to_owned(),
            event_id: format!("e-{order}"),
            error: error.to_owned(),
            attempts: 3,
            at: String::new(),
            received_ms: u64::try_from(order).unwrap_or(0) * 1000,
        }
    }

    #[test]
    fn pages_go_newest_first_and_follow_the_filter() {
        let index = Index {
            entries: (1..=120)
                .map(|i| {
                    summary(
                        i,
                        if i % 2 == 0 {
                            "message.sent"
                        } else {
                            "message.read"
                        },
                        if i % 3 == 0 {
                            "Database DOWN"
                        } else {
                            "timeout"
                        },
                    )
                })
                .collect(),
        };
        let first = index.page(&Filter::default(), None);
        assert_eq!(first.items.len(), PAGE_SIZE);
        assert_eq!(first.items[0].order, 120);
        assert_eq!(first.matching, 120);
        let second = index.page(&Filter::default(), first.next);
        assert_eq!(second.items[0].order, 70);
        let third = index.page(&Filter::default(), second.next);
        assert_eq!(third.items.len(), 20);
        assert_eq!(third.next, None);

        let filter = Filter {
            name: Some("message.sent".into()),
            error: Some("database down".into()),
            from_ms: Some(10_000),
            to_ms: Some(100_000),
        };
        let page = index.page(&filter, None);
        // Multiples of 6 from 12 to 96.
        assert_eq!(page.matching, 15);
        assert_eq!(page.items.first().map(|s| s.order), Some(96));
        assert_eq!(index.matching_ids(&filter).len(), 15);
        assert_eq!(index.by_name().get("message.read"), Some(&60));
    }

    #[test]
    fn a_summary_reads_what_it_can_of_a_record() {
        let record = br#"{"receivedAt":"2026-01-02T03:04:05.678Z","secretIndex":0,"event":{"eventId":"e-1","name":"message.sent","payload":{"a":[1,2]}}}"#;
        let s = Summary::of_record("x".into(), 1, record, &"é".repeat(400), 2, "t".into());
        assert_eq!(
            (s.name.as_str(), s.event_id.as_str()),
            ("message.sent", "e-1")
        );
        assert_eq!(s.received(), "2026-01-02T03:04:05Z");
        assert_eq!(s.error.chars().count(), SUMMARY_ERROR_CHARS + 1);
        let s = Summary::of_record("x".into(), 1, b"not json", "", 0, String::new());
        assert_eq!((s.name.as_str(), s.received_ms), ("", 0));
        assert_eq!(s.received(), "unknown");
    }
}

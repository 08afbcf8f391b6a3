//! The store's gauges, written on each scrape from the last [`StoreStatus`]: a
//! figure the store cannot tell is left out, as the status page says "unknown",
//! rather than shown as 0.

use std::sync::{Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use crate::store::StoreStatus;

/// Each gauge's name (under the registry's prefix) and help.
const GAUGES: [(&str, &str); 7] = [
    ("stored_events", "Events in the store"),
    ("backlog_events", "Events stored, not yet processed"),
    (
        "pending_events",
        "Events handed to a worker, not acknowledged",
    ),
    ("dead_letter_events", "Events in the dead letter"),
    ("consumers", "Workers consuming from the store (RabbitMQ)"),
    (
        "retry_events",
        "Events waiting in the retry schedule for their next attempt",
    ),
    (
        "next_retry_due_seconds",
        "When the first event in the retry schedule is due, in Unix time (0: none waits)",
    ),
];

/// The last figures of a store, each `None` until the store tells it.
#[derive(Debug, Default)]
pub(super) struct StoreGauges {
    figures: Mutex<[Option<i64>; 7]>,
}

impl StoreGauges {
    pub(super) fn set(&self, status: &StoreStatus) {
        let number = |n: Option<u64>| n.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let due = status.retries.map(|_| {
            status.next_retry_at.map_or(0, |at| {
                at.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            })
        });
        *self.figures.lock().unwrap_or_else(PoisonError::into_inner) = [
            number(status.stored),
            number(status.backlog),
            number(status.pending),
            number(status.dead_letters),
            number(status.consumers),
            number(status.retries),
            due,
        ];
    }
}

impl Collector for StoreGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures = *self.figures.lock().unwrap_or_else(PoisonError::into_inner);
        for ((name, help), figure) in GAUGES.into_iter().zip(figures) {
            if let Some(value) = figure {
                let gauge = ConstGauge::new(value);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        Ok(())
    }
}

#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod event;
#[cfg(any(feature = "actix", feature = "axum"))]
mod extract;
mod gate;
#[cfg(feature = "receiver")]
mod inbox;
#[cfg(feature = "receiver")]
mod metrics;
mod signature;
#[cfg(feature = "receiver")]
pub mod store;
mod timestamp;
#[cfg(feature = "receiver")]
mod worker;

pub use error::Error;
#[cfg(any(feature = "actix", feature = "axum"))]
pub use extract::{Rejection, VerifiedEvents, WebhookConfig};

/// The default body limit of the receive step and the extractors: 4 MiB, far above
/// a full batch of 500 Comapi events.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
pub use event::{
    ChannelStatus, ChatAction, ConversationAction, ConversationMessageStatus, Event, EventKind,
    Family, MessageDetails, MessagePayload, MessageStatus, ProfileAction, parse_already_verified,
};
pub use gate::{Decision, DecisionStore, Gate, GateConfig, ReplayWindow};
#[cfg(feature = "redis")]
pub use gate::{RedisGate, RedisGateConfig};
#[cfg(feature = "receiver")]
pub use inbox::{Inbox, Reply};
#[cfg(feature = "receiver")]
pub use metrics::{METRICS_CONTENT_TYPE, Metered, Metrics};
pub use signature::{MIN_SECRET_LEN, SIGNATURE_HEADER, Signature, Verified, Verifier};
#[cfg(feature = "receiver")]
pub use store::spool::{
    DEAD_LETTER_FILE, Position, Recovery, Spool, SpoolConfig, SpoolReader, SpooledEvent,
    requeue_dead_letters,
};
#[cfg(feature = "receiver")]
pub use worker::{EventHandler, HandlerError, RetryPolicy, run_worker};

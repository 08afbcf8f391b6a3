#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod event;
mod gate;
#[cfg(feature = "spool")]
mod inbox;
mod signature;
#[cfg(feature = "spool")]
mod spool;

pub use error::Error;
pub use event::{
    ChannelStatus, ChatAction, ConversationAction, ConversationMessageStatus, Event, EventKind,
    Family, MessageDetails, MessagePayload, MessageStatus, ProfileAction, parse_already_verified,
};
pub use gate::{Decision, DecisionStore, Gate, GateConfig};
#[cfg(feature = "redis")]
pub use gate::{RedisGate, RedisGateConfig};
#[cfg(feature = "spool")]
pub use inbox::{DEFAULT_MAX_BODY_BYTES, Inbox, Reply};
pub use signature::{MIN_SECRET_LEN, SIGNATURE_HEADER, Signature, Verified, Verifier};
#[cfg(feature = "spool")]
pub use spool::{Position, Recovery, Spool, SpoolConfig, SpoolReader, SpooledEvent, run_worker};

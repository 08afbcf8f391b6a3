#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod event;
mod gate;
mod signature;

pub use error::Error;
pub use event::{
    ChannelStatus, ChatAction, ConversationAction, ConversationMessageStatus, Event, EventKind,
    Family, MessageDetails, MessagePayload, MessageStatus, ProfileAction, parse_already_verified,
};
pub use gate::{Decision, DecisionStore, Gate, GateConfig};
#[cfg(feature = "redis")]
pub use gate::{RedisGate, RedisGateConfig};
pub use signature::{MIN_SECRET_LEN, SIGNATURE_HEADER, Signature, Verified, Verifier};

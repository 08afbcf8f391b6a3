#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod signature;

pub use error::Error;
pub use signature::{MIN_SECRET_LEN, SIGNATURE_HEADER, Signature, Verified, Verifier};

// On docs.rs the README's links to files of the repository go to the package's
// source there: a link's first definition wins, and these come before the README's.
#![doc = "[examples]: https://docs.rs/crate/comapi-webhook/latest/source/examples/README.md"]
#![doc = "[axum-example]: https://docs.rs/crate/comapi-webhook/latest/source/examples/axum_receiver.rs"]
// The README's snippets are whole programs that use the features `receiver`, `redis`,
// `axum` and `actix`: it is the crate's page when they are all on (as on docs.rs, and
// in the suite's `--all-features` doctests), and a pointer to it otherwise.
#![cfg_attr(
    all(feature = "receiver", feature = "redis", feature = "axum", feature = "actix"),
    doc = include_str!("../README.md")
)]
#![cfg_attr(
    not(all(
        feature = "receiver",
        feature = "redis",
        feature = "axum",
        feature = "actix"
    )),
    doc = "Receive webhooks from Comapi safely and fast. The guide is the README (this \
           page, when built with every feature as on docs.rs)."
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "receiver")]
mod body_budget;
#[cfg(feature = "receiver")]
pub mod console;
pub mod dangerous;
mod error;
pub mod event;
#[cfg(any(feature = "actix", feature = "axum"))]
pub mod extract;
pub mod gate;
#[cfg(feature = "receiver")]
pub mod inbox;
#[cfg(feature = "receiver")]
mod log_budget;
#[cfg(feature = "receiver")]
pub mod metrics;
#[cfg(feature = "receiver")]
pub mod receiver;
mod reply;
pub mod signature;
#[cfg(feature = "receiver")]
pub mod store;
mod timestamp;
#[cfg(feature = "receiver")]
pub mod worker;

/// The `http` crate (1.x) whose types this crate's API takes and gives
/// (`HeaderMap`, `StatusCode`, `Response`): use it as `comapi_webhook::http` rather
/// than adding `http = "1"` yourself.
pub use http;

#[cfg(feature = "receiver")]
pub use body_budget::{BodyBudget, DEFAULT_BODY_BUDGET_BYTES};
pub use error::Error;
pub use event::{Event, EventKind};
pub use gate::{Decision, Gate};
#[cfg(feature = "receiver")]
pub use inbox::Inbox;
pub use reply::Reply;
pub use signature::{SIGNATURE_HEADER, Verified, Verifier};
#[cfg(feature = "receiver")]
pub use worker::Worker;

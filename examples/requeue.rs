//! Brings the events in a spool's dead letter back into the spool, once the cause of
//! their failures is fixed: the worker then processes them again.
//!
//! ```sh
//! COMAPI_SPOOL_DIR=/var/lib/comapi-spool cargo run --release --features receiver --example requeue
//! ```
//!
//! Stop the receiver first: the spool has one writer at a time. Its next start
//! processes the requeued events.

use std::process::ExitCode;

use comapi_webhook::{Spool, SpoolConfig, requeue_dead_letters};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("usage: COMAPI_SPOOL_DIR=<spool folder> requeue");
        return ExitCode::SUCCESS;
    }
    let Some(dir) = std::env::var_os("COMAPI_SPOOL_DIR").filter(|d| !d.is_empty()) else {
        eprintln!("error: COMAPI_SPOOL_DIR is required: the spool folder of the receiver");
        return ExitCode::from(2);
    };
    let config = SpoolConfig::new(dir);
    let spool = match Spool::open(&config) {
        Ok((spool, _)) => spool,
        Err(error) => {
            eprintln!("error: spool {}: {}", config.dir.display(), error.report());
            return ExitCode::FAILURE;
        }
    };
    let requeued = requeue_dead_letters(&spool).await;
    spool.close().await;
    match requeued {
        Ok(count) => {
            println!("requeued {count} event(s) from {}", config.dir.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", error.report());
            ExitCode::FAILURE
        }
    }
}

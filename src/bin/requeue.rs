//! Brings the events in the dead letter back, once the cause of their failures is
//! fixed: the workers then process them again. On a spool (stop the receiver
//! first: a spool has one writer at a time; its next start processes them):
//!
//! ```sh
//! COMAPI_SPOOL_DIR=/var/lib/comapi-spool cargo run --release --features binaries --bin requeue
//! ```
//!
//! On RabbitMQ, `COMAPI_AMQP_URL=amqp://… cargo run --release --features binaries,rabbitmq --bin requeue`
//! (a confirmed publish back to the queue, then the acknowledgement).
//!
//! On Redis (the running workers pick them up):
//! `COMAPI_REDIS_URL=redis://… cargo run --release --features binaries,redis --bin requeue`.

use std::path::Path;
use std::process::ExitCode;

use comapi_webhook::store::spool::{Spool, SpoolConfig, requeue_dead_letters};

const HELP: &str = "requeue: brings the events in the dead letter back to be processed again,
once the cause of their failures is fixed. It works on the store the receiver
and workers use, named by the same variables:

  COMAPI_SPOOL_DIR=<folder> requeue
      a spool: the receiver's COMAPI_SPOOL_DIR (without it the receiver uses
      comapi-webhook-spool in the temp folder: COMAPI_SPOOL_DIR=$TMPDIR/comapi-webhook-spool).
      Stop the receiver first: a spool has one writer at a time. Its next
      start processes the requeued events.
  COMAPI_REDIS_URL=redis://host:6379 [COMAPI_REDIS_STREAM=<key>] requeue
      a Redis stream (needs --features redis); running workers pick them up.
  COMAPI_AMQP_URL=amqp://user:pass@host:5672/%2f [COMAPI_AMQP_QUEUE=<queue>] requeue
      a RabbitMQ queue (needs --features rabbitmq); running workers pick them up.

It prints how many events it requeued. Exit status: 0 done, 1 the store failed,
2 a setting is missing or wrong.";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if let Some(arg) = std::env::args().nth(1) {
        return fail(
            &format!(
                "unknown argument {arg:?}: requeue takes its settings from the environment; see requeue --help"
            ),
            2,
        );
    }
    #[cfg(feature = "rabbitmq")]
    match comapi_webhook::receiver::AmqpSettings::from_env() {
        Ok(Some(amqp)) => return requeue_rabbit(&amqp).await,
        Ok(None) => {}
        Err(error) => return fail(&error.to_string(), 2),
    }
    #[cfg(feature = "redis")]
    match comapi_webhook::receiver::RedisSettings::from_env() {
        Ok(Some(redis)) => return requeue_redis(&redis).await,
        Ok(None) => {}
        Err(error) => return fail(&error.to_string(), 2),
    }
    let Some(dir) = std::env::var_os("COMAPI_SPOOL_DIR").filter(|d| !d.is_empty()) else {
        let default = SpoolConfig::in_temp_dir().dir;
        return fail(
            &format!(
                "no store named: set the receiver's own store setting, COMAPI_SPOOL_DIR \
                 (a receiver without it spools to {}), COMAPI_REDIS_URL or COMAPI_AMQP_URL; \
                 see requeue --help",
                default.display()
            ),
            2,
        );
    };
    let config = SpoolConfig::new(dir);
    if let Err(message) = holds_a_spool(&config.dir) {
        return fail(&message, 2);
    }
    let spool = match Spool::open(&config) {
        Ok((spool, _)) => spool,
        Err(error) if busy(&error) => {
            return fail(
                &format!(
                    "the spool in {} is open in another process, most likely the receiver: \
                     stop it (its shutdown keeps every stored event), run requeue, then start \
                     it again",
                    config.dir.display()
                ),
                1,
            );
        }
        Err(error) => {
            return fail(
                &format!("spool {}: {}", config.dir.display(), error.report()),
                1,
            );
        }
    };
    let requeued = requeue_dead_letters(&spool).await;
    spool.close().await;
    match requeued {
        Ok(count) => {
            println!("requeued {count} event(s) from {}", config.dir.display());
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error.report().to_string(), 1),
    }
}

/// Refuses a folder that no spool was ever opened in (a mistyped path), rather
/// than creating it and reporting nothing to requeue.
fn holds_a_spool(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!(
            "COMAPI_SPOOL_DIR={}: no such folder; give the receiver's spool folder",
            dir.display()
        ));
    }
    if !dir.join("spool.lock").is_file() {
        return Err(format!(
            "COMAPI_SPOOL_DIR={}: this folder holds no spool (no spool.lock); give the \
             receiver's spool folder",
            dir.display()
        ));
    }
    Ok(())
}

/// Whether opening failed because another spool holds the folder.
fn busy(error: &comapi_webhook::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        if inner
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ResourceBusy)
        {
            return true;
        }
        source = inner.source();
    }
    false
}

#[cfg(feature = "redis")]
async fn requeue_redis(redis: &comapi_webhook::receiver::RedisSettings) -> ExitCode {
    use comapi_webhook::store::redis_stream::RedisStream;
    let requeued = match RedisStream::connect(&redis.url, redis.stream_config()).await {
        Ok(stream) => stream.requeue_dead_letters().await.map(|n| (n, stream)),
        Err(error) => Err(error),
    };
    match requeued {
        Ok((count, stream)) => {
            println!("requeued {count} event(s) into {}", stream.key());
            ExitCode::SUCCESS
        }
        Err(error) => fail(&format!("COMAPI_REDIS_URL: {}", error.report()), 1),
    }
}

#[cfg(feature = "rabbitmq")]
async fn requeue_rabbit(amqp: &comapi_webhook::receiver::AmqpSettings) -> ExitCode {
    let queue = match amqp.connect().await {
        Ok(queue) => queue,
        Err(error) => return fail(&error.to_string(), error.exit_code()),
    };
    match queue.requeue_dead_letters().await {
        Ok(count) => {
            println!("requeued {count} event(s) into {}", amqp.queue);
            ExitCode::SUCCESS
        }
        Err(error) => fail(&format!("COMAPI_AMQP_URL: {}", error.report()), 1),
    }
}

fn fail(message: &str, code: u8) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

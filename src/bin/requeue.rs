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

use std::process::ExitCode;

use comapi_webhook::store::spool::{Spool, SpoolConfig, requeue_dead_letters};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: COMAPI_SPOOL_DIR=<spool folder> requeue\n       COMAPI_REDIS_URL=<redis url> requeue\n       COMAPI_AMQP_URL=<amqp url> [COMAPI_AMQP_QUEUE=<queue>] requeue"
        );
        return ExitCode::SUCCESS;
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
        return fail(
            "COMAPI_SPOOL_DIR is required: the spool folder of the receiver",
            2,
        );
    };
    let config = SpoolConfig::new(dir);
    let spool = match Spool::open(&config) {
        Ok((spool, _)) => spool,
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
    use comapi_webhook::store::rabbitmq::RabbitStore;
    let requeued = match RabbitStore::connect(&amqp.url, amqp.rabbit_config()).await {
        Ok(queue) => queue.requeue_dead_letters().await,
        Err(error) => Err(error),
    };
    match requeued {
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

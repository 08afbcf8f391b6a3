//! What both reference receivers share: configuration from the environment,
//! logging, and the worker, which is **the place to plug in your own processing**
//! (see [`process`]).

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use comapi_webhook::store::{EventStore, Store};
use comapi_webhook::{
    Decision, Error, Event, EventHandler, Gate, HandlerError, Inbox, Metrics, Reply, RetryPolicy,
    Spool, SpoolConfig, Verifier, run_worker,
};

/// Your processing: called for each stored event the gate calls fresh, in order.
/// Return an error (or panic) and the worker retries the event with backoff, then
/// sets it aside in `dead-letter.jsonl` in the spool folder. Delivery here is at
/// least once: after a crash, events since the last acknowledged position come
/// again. It runs on the worker thread at idle CPU priority (see
/// [`yield_to_requests`]).
///
/// ====================  PLUG IN YOUR OWN PROCESSING HERE  ====================
async fn process(event: &Event<'_>) -> Result<(), HandlerError> {
    // e.g. update the message's state in your database, notify a user, …
    tracing::info!(
        event_id = %event.event_id(),
        name = %event.name(),
        revision = ?event.revision(),
        decision = "fresh",
        "event processed"
    );
    Ok(())
}

/// What the worker calls: [`process`] for each fresh event, and logs for the rest.
struct Processing;

impl EventHandler for Processing {
    async fn handle(&mut self, event: Event<'static>) -> Result<(), HandlerError> {
        process(&event).await
    }

    fn skipped(&mut self, event: &Event<'_>, decision: Decision) {
        if let Decision::Expired { age_secs } = decision {
            // A replay, or this machine's clock is off: live events dated hours away
            // from it would all be skipped, so say it loudly.
            tracing::warn!(
                event_id = %event.event_id(),
                name = %event.name(),
                age_secs,
                decision = %decision.as_str(),
                "event skipped: dated outside the replay window (a replay, or check this machine's clock)"
            );
            return;
        }
        tracing::info!(
            event_id = %event.event_id(),
            name = %event.name(),
            revision = ?event.revision(),
            decision = %decision.as_str(),
            "event skipped"
        );
    }

    fn attempt_failed(&mut self, event: &Event<'_>, error: &str, attempt: u32, retry_in: Duration) {
        tracing::warn!(event_id = %event.event_id(), %error, attempt, ?retry_in, "processing failed; retrying");
    }

    fn dead_lettered(&mut self, event: &Event<'_>, error: &str, attempts: u32) {
        tracing::error!(
            event_id = %event.event_id(),
            %error,
            attempts,
            "processing failed for good: kept in the dead letter (requeue it once fixed)"
        );
    }

    fn set_aside(&mut self, line: &[u8], error: &Error) {
        tracing::error!(
            error = %error.report(),
            bytes = line.len(),
            "a stored record is not an event: kept in rejected.jsonl in the spool folder (on Redis, in the dead-letter stream), skipped"
        );
    }
}

/// At most this many refused requests are logged a second; the rest are counted.
const REFUSALS_LOGGED_PER_SECOND: u32 = 10;

/// Logs an answer other than 200 at `warn`: its status and reason (a wrong secret
/// shows as `signature mismatch`), never the signature or the body. At most
/// [`REFUSALS_LOGGED_PER_SECOND`] lines a second, so a flood cannot fill a disk; the
/// next line says how many were left out.
pub(crate) fn log_refusal(reply: &Reply) {
    struct Window {
        start: std::time::Instant,
        logged: u32,
        suppressed: u64,
    }
    static WINDOW: std::sync::Mutex<Option<Window>> = std::sync::Mutex::new(None);
    if reply.status().is_success() {
        return;
    }
    let mut window = WINDOW
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = std::time::Instant::now();
    let current = window.get_or_insert(Window {
        start: now,
        logged: 0,
        suppressed: 0,
    });
    if now.duration_since(current.start) >= Duration::from_secs(1) {
        current.start = now;
        current.logged = 0;
    }
    if current.logged >= REFUSALS_LOGGED_PER_SECOND {
        current.suppressed += 1;
        return;
    }
    current.logged += 1;
    let suppressed = std::mem::take(&mut current.suppressed);
    drop(window);
    tracing::warn!(
        status = reply.status().as_u16(),
        reason = %reply.reason(),
        suppressed_before = suppressed,
        "request refused"
    );
}

/// The receiver's settings, from the environment.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) verifier: Verifier,
    pub(crate) addr: SocketAddr,
    pub(crate) spool: SpoolConfig,
    pub(crate) max_body_bytes: usize,
    /// `COMAPI_REDIS_URL`, `COMAPI_REDIS_PREFIX`, `COMAPI_LEASE`.
    pub(crate) redis: RedisEnv,
    /// `COMAPI_WORKER`: run a worker in this process (default: without Redis only).
    pub(crate) worker: bool,
}

/// Reads `COMAPI_WEBHOOK_SECRET` (required; comma-separated for rotation, primary
/// first), `PORT` (default 8080, 0 for any free port), `BIND` (default 127.0.0.1),
/// `COMAPI_SPOOL_DIR`, `COMAPI_SPOOL_KEEP`, `COMAPI_MAX_BODY_BYTES`,
/// `COMAPI_REDIS_URL`, `COMAPI_REDIS_PREFIX`, `COMAPI_LEASE` and `COMAPI_WORKER`. On
/// a bad value it prints one line and exits with status 2.
pub(crate) fn config_from_env() -> Config {
    match try_config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    }
}

fn try_config() -> Result<Config, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    // Wiped when dropped; the process environment keeps its own copy.
    let secrets = zeroize::Zeroizing::new(var("COMAPI_WEBHOOK_SECRET").ok_or(
        "COMAPI_WEBHOOK_SECRET is required: the secret entered for this webhook in the Comapi portal \
         (comma-separated for rotation, primary first)",
    )?);
    let entries: Vec<&str> = secrets.split(',').map(str::trim).collect();
    for (i, entry) in entries.iter().enumerate() {
        let which = format!(
            "COMAPI_WEBHOOK_SECRET: entry {} of {}",
            i + 1,
            entries.len()
        );
        if entry.is_empty() {
            return Err(format!("{which} is empty"));
        }
        if entry.len() < comapi_webhook::MIN_SECRET_LEN {
            return Err(format!(
                "{which} is {} bytes; Comapi requires at least {} (36 or more recommended)",
                entry.len(),
                comapi_webhook::MIN_SECRET_LEN
            ));
        }
    }
    let verifier =
        Verifier::with_secrets(entries).map_err(|e| format!("COMAPI_WEBHOOK_SECRET: {e}"))?;
    let port: u16 = match var("PORT") {
        Some(port) => port
            .trim()
            .parse()
            .map_err(|_| format!("PORT must be a port number, not {port:?}"))?,
        None => 8080,
    };
    let ip: IpAddr = match var("BIND") {
        Some(bind) => bind
            .trim()
            .parse()
            .map_err(|_| format!("BIND must be an IP address, not {bind:?}"))?,
        None => IpAddr::from([127, 0, 0, 1]),
    };
    let spool = match var("COMAPI_SPOOL_DIR") {
        Some(dir) => SpoolConfig::new(PathBuf::from(dir)),
        None => SpoolConfig::in_temp_dir(),
    };
    // The spool is the worker's queue: processed segments go, unless asked to keep them.
    let keep = match var("COMAPI_SPOOL_KEEP").as_deref().map(str::trim) {
        None | Some("0" | "false" | "no") => false,
        Some("1" | "true" | "yes") => true,
        Some(other) => {
            return Err(format!(
                "COMAPI_SPOOL_KEEP must be true or false, not {other:?}"
            ));
        }
    };
    let spool = spool.with_remove_processed(!keep);
    let max_body_bytes = match var("COMAPI_MAX_BODY_BYTES") {
        Some(max) => max
            .trim()
            .parse()
            .ok()
            .filter(|&n: &usize| n > 0)
            .ok_or_else(|| {
                format!("COMAPI_MAX_BODY_BYTES must be a positive number of bytes, not {max:?}")
            })?,
        None => comapi_webhook::DEFAULT_MAX_BODY_BYTES,
    };
    let redis = redis_from_env()?;
    let worker = match var("COMAPI_WORKER").as_deref().map(str::trim) {
        None => redis.url.is_none(),
        Some("1" | "true" | "yes" | "on") => true,
        Some("0" | "false" | "no" | "off") => false,
        Some(other) => {
            return Err(format!(
                "COMAPI_WORKER must be true or false, not {other:?}"
            ));
        }
    };
    Ok(Config {
        verifier,
        addr: SocketAddr::new(ip, port),
        spool,
        max_body_bytes,
        redis,
        worker,
    })
}

/// The Redis settings from the environment: `COMAPI_REDIS_URL`,
/// `COMAPI_REDIS_PREFIX` (default `comapi-webhook:`) and `COMAPI_LEASE` (default
/// 60s: how long a worker may hold an event before another takes it over).
#[derive(Clone)]
pub(crate) struct RedisEnv {
    pub(crate) url: Option<String>,
    pub(crate) key_prefix: String,
    pub(crate) lease: Duration,
}

pub(crate) fn redis_from_env() -> Result<RedisEnv, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let url = var("COMAPI_REDIS_URL").map(|url| url.trim().to_owned());
    if url.is_some() && !cfg!(feature = "redis") {
        return Err(
            "COMAPI_REDIS_URL is set, but this binary was built without Redis: build it with \
             --features receiver,redis"
                .to_owned(),
        );
    }
    let lease = match var("COMAPI_LEASE") {
        Some(lease) => humantime::parse_duration(lease.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("COMAPI_LEASE must be a duration such as 60s, not {lease:?}"))?,
        None => Duration::from_secs(60),
    };
    Ok(RedisEnv {
        url,
        key_prefix: var("COMAPI_REDIS_PREFIX").unwrap_or_else(|| "comapi-webhook:".to_owned()),
        lease,
    })
}

/// Logs through `tracing` to standard error, filtered by `RUST_LOG` (default
/// `info`). Secrets and signatures are never logged.
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// What a receiver runs: its inbox and, if it has one, its worker.
pub(crate) struct Running {
    pub(crate) inbox: Inbox<Store>,
    worker: Option<(JoinHandle<()>, Stop)>,
}

/// How a worker is told to stop: a spool is closed (the worker drains it first), a
/// stream consumer is asked to stop.
#[derive(Clone)]
pub(crate) enum Stop {
    Spool(Spool),
    #[cfg(feature = "redis")]
    Redis(comapi_webhook::store::redis_stream::StopHandle),
}

impl Stop {
    fn is_stopped(&self) -> bool {
        match self {
            Stop::Spool(spool) => spool.is_closed(),
            #[cfg(feature = "redis")]
            Stop::Redis(handle) => handle.is_stopped(),
        }
    }
}

/// Opens the store (the spool, repairing a torn last line, or the Redis stream)
/// and starts the worker on a thread of its own if asked to. Exits with status 1
/// if the store cannot be opened.
pub(crate) async fn start(config: &Config) -> Running {
    let metrics = Arc::new(Metrics::new());
    let (store, stop): (Store, Stop) = match &config.redis.url {
        None => {
            let spool = open_spool(&config.spool);
            (Store::Spool(spool.clone()), Stop::Spool(spool))
        }
        #[cfg(feature = "redis")]
        Some(url) => {
            let stream = connect_stream(url, &config.redis).await;
            let stop = comapi_webhook::store::redis_stream::StopHandle::default();
            (Store::Redis(stream), Stop::Redis(stop))
        }
        #[cfg(not(feature = "redis"))]
        Some(_) => unreachable!("refused by config_from_env"),
    };
    let worker = config.worker.then(|| {
        let thread = spawn_worker_thread(&config.redis, stop.clone(), Arc::clone(&metrics));
        (thread, stop)
    });
    let inbox = Inbox::new(config.verifier.clone(), store)
        .with_max_body_bytes(config.max_body_bytes)
        .with_metrics(metrics);
    Running { inbox, worker }
}

fn open_spool(config: &SpoolConfig) -> Spool {
    let (spool, recovery) = match Spool::open(config) {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!(
                "error: COMAPI_SPOOL_DIR={}: {}",
                config.dir.display(),
                error.report()
            );
            std::process::exit(1);
        }
    };
    tracing::info!(
        dir = %config.dir.display(),
        events = recovery.events,
        segments = recovery.segments,
        torn_bytes = recovery.torn_bytes,
        "spool opened"
    );
    spool
}

/// The stream's settings from the environment.
#[cfg(feature = "redis")]
pub(crate) fn stream_config(
    redis: &RedisEnv,
) -> comapi_webhook::store::redis_stream::RedisStreamConfig {
    comapi_webhook::store::redis_stream::RedisStreamConfig::default()
        .with_key_prefix(redis.key_prefix.clone())
        .with_lease(redis.lease)
}

/// Connects the receive step's store to Redis, warning once if Redis's persistence
/// is weaker than fsync-before-reply. Exits with status 1 if Redis cannot be reached.
#[cfg(feature = "redis")]
pub(crate) async fn connect_stream(
    url: &str,
    redis: &RedisEnv,
) -> comapi_webhook::store::redis_stream::RedisStream {
    use comapi_webhook::store::redis_stream::RedisStream;
    match RedisStream::connect(url, stream_config(redis)).await {
        Ok(stream) => {
            if let Some(warning) = stream.durability().warning() {
                tracing::warn!("{warning}");
            }
            tracing::info!(stream = %stream.key(), "storing into Redis");
            stream
        }
        Err(error) => {
            eprintln!("error: COMAPI_REDIS_URL: {}", error.report());
            std::process::exit(1);
        }
    }
}

/// Runs the worker until `stop` says so. When it fails (the disk is full, Redis
/// is down), it starts again a second later from what was last acknowledged:
/// events processed since then come again, and the gate calls them duplicates.
pub(crate) async fn supervise(redis: &RedisEnv, stop: &Stop, metrics: &Arc<Metrics>) {
    #[cfg(not(feature = "redis"))]
    let _ = redis;
    let gate = Gate::in_memory();
    loop {
        let handler = metrics.meter(Processing);
        let run = match stop {
            Stop::Spool(spool) => match spool.reader() {
                Ok(reader) => run_worker(reader, &gate, handler, RetryPolicy::default()).await,
                Err(error) => Err(error),
            },
            #[cfg(feature = "redis")]
            Stop::Redis(handle) => run_stream_worker(redis, handle, handler).await,
        };
        let error = match run {
            Ok(()) => return,
            Err(error) => error,
        };
        if stop.is_stopped() {
            tracing::error!(error = %error.report(), "worker stopped");
            return;
        }
        tracing::error!(error = %error.report(), "worker failed; resuming in 1 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One run of a worker on the Redis stream, deciding through the Redis gate.
#[cfg(feature = "redis")]
async fn run_stream_worker(
    redis: &RedisEnv,
    stop: &comapi_webhook::store::redis_stream::StopHandle,
    handler: impl EventHandler,
) -> Result<(), Error> {
    use comapi_webhook::store::redis_stream::StreamConsumer;
    use comapi_webhook::{RedisGate, RedisGateConfig};
    let url = redis.url.as_deref().unwrap_or_default();
    let name = consumer_name();
    let consumer = StreamConsumer::connect(url, stream_config(redis), &name)
        .await?
        .stopped_by(stop);
    let gate_config = RedisGateConfig::default()
        .with_key_prefix(redis.key_prefix.clone())
        .with_lease(redis.lease);
    let gate = RedisGate::connect(url, gate_config).await?;
    tracing::info!(consumer = %name, "worker reading the Redis stream");
    run_worker(consumer, &gate, handler, RetryPolicy::default()).await
}

/// A consumer name unique to this process: host, process id and start time.
#[cfg(feature = "redis")]
fn consumer_name() -> String {
    let host = std::env::var("DYNO")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "worker".to_owned());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{host}-{}-{started}", std::process::id())
}

/// Starts the worker on a thread of its own, at idle CPU priority.
fn spawn_worker_thread(redis: &RedisEnv, stop: Stop, metrics: Arc<Metrics>) -> JoinHandle<()> {
    let redis = redis.clone();
    let worker = std::thread::Builder::new()
        .name("comapi-worker".to_owned())
        .spawn(move || {
            yield_to_requests();
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(supervise(&redis, &stop, &metrics)),
                Err(error) => tracing::error!(%error, "worker could not start"),
            }
        });
    match worker {
        Ok(worker) => worker,
        Err(error) => {
            eprintln!("error: cannot start the worker thread: {error}");
            std::process::exit(1);
        }
    }
}

/// Puts the calling thread (the worker) at idle CPU priority, Linux's `SCHED_IDLE`:
/// it runs on the CPU time that requests leave unused, so processing never delays
/// an acknowledgement. Under sustained full load it falls behind, and the spool
/// holds the backlog until the load drops. Remove the call in [`spawn_worker`] if
/// your processing must keep pace at any cost.
fn yield_to_requests() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        if let Err(error) = set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Min,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
        ) {
            tracing::warn!(?error, "the worker keeps its normal CPU priority");
        }
    }
}

/// Stops the worker and waits for it: a spool is closed (everything acknowledged
/// is already synced) and the worker processes what is stored; a stream consumer
/// finishes the event in hand.
pub(crate) async fn finish(running: Running) {
    if let Store::Spool(spool) = running.inbox.store() {
        spool.close().await;
    }
    if let Some((thread, stop)) = running.worker {
        #[cfg(feature = "redis")]
        if let Stop::Redis(handle) = &stop {
            handle.stop();
        }
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        drop(stop);
    }
    let status = running.inbox.store().status().await;
    tracing::info!(stored = ?status.stored, backlog = ?status.backlog, "stopped");
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}

/// Exits with one line naming the variables to change when `addr` cannot be bound.
pub(crate) fn cannot_listen(addr: SocketAddr, error: &std::io::Error) -> ! {
    eprintln!("error: cannot listen on {addr} (PORT, BIND): {error}");
    std::process::exit(1);
}

/// Prints the line that says the receiver is ready.
pub(crate) fn announce(addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on http://{addr}");
    let _ = out.flush();
}

//! What both reference receivers share: configuration from the environment,
//! logging, and the worker, which is **the place to plug in your own processing**
//! (see [`process`]).

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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
            "processing failed for good: kept in dead-letter.jsonl in the spool folder (requeue it once fixed)"
        );
    }

    fn set_aside(&mut self, line: &[u8], error: &Error) {
        tracing::error!(
            error = %error.report(),
            bytes = line.len(),
            "a stored line is not an event: kept in rejected.jsonl in the spool folder, skipped"
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
pub(crate) struct Config {
    pub(crate) verifier: Verifier,
    pub(crate) addr: SocketAddr,
    pub(crate) spool: SpoolConfig,
    pub(crate) max_body_bytes: usize,
}

/// Reads `COMAPI_WEBHOOK_SECRET` (required; comma-separated for rotation, primary
/// first), `PORT` (default 8080, 0 for any free port), `BIND` (default 127.0.0.1),
/// `COMAPI_SPOOL_DIR`, `COMAPI_SPOOL_KEEP` and `COMAPI_MAX_BODY_BYTES`. On a bad value it prints one line
/// and exits with status 2.
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
    Ok(Config {
        verifier,
        addr: SocketAddr::new(ip, port),
        spool,
        max_body_bytes,
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

/// Opens the spool (repairing a torn last line) and starts the worker on a thread
/// of its own. Exits with status 1 if the spool cannot be opened.
pub(crate) fn start(config: &Config) -> (Inbox, JoinHandle<()>) {
    let (spool, recovery) = match Spool::open(&config.spool) {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!(
                "error: COMAPI_SPOOL_DIR={}: {}",
                config.spool.dir.display(),
                error.report()
            );
            std::process::exit(1);
        }
    };
    tracing::info!(
        dir = %config.spool.dir.display(),
        events = recovery.events,
        segments = recovery.segments,
        torn_bytes = recovery.torn_bytes,
        "spool opened"
    );
    let metrics = Arc::new(Metrics::new());
    let worker = spawn_worker(&spool, &metrics);
    let inbox = Inbox::new(config.verifier.clone(), spool)
        .with_max_body_bytes(config.max_body_bytes)
        .with_metrics(metrics);
    (inbox, worker)
}

/// Starts the worker thread. When the worker fails (the disk is full, say), it
/// starts again a second later from the last acknowledged position, until the
/// spool is closed: events already processed since then come again, and the gate,
/// kept across restarts, calls them duplicates.
fn spawn_worker(spool: &Spool, metrics: &Arc<Metrics>) -> JoinHandle<()> {
    let spool = spool.clone();
    let metrics = Arc::clone(metrics);
    let worker = std::thread::Builder::new()
        .name("comapi-worker".to_owned())
        .spawn(move || {
            yield_to_requests();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "worker could not start");
                    return;
                }
            };
            let gate = Gate::in_memory();
            loop {
                let run = spool.reader().map(|reader| {
                    runtime.block_on(run_worker(
                        reader,
                        &gate,
                        metrics.meter(Processing),
                        RetryPolicy::default(),
                    ))
                });
                let error = match run {
                    Ok(Ok(())) => return,
                    Ok(Err(error)) | Err(error) => error,
                };
                if spool.is_closed() {
                    tracing::error!(error = %error.report(), "worker stopped");
                    return;
                }
                tracing::error!(error = %error.report(), "worker failed; resuming in 1 s");
                std::thread::sleep(Duration::from_secs(1));
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

/// Closes the spool (everything acknowledged is already synced) and waits for the
/// worker to process what is stored.
pub(crate) async fn finish(inbox: &Inbox, worker: JoinHandle<()>) {
    inbox.spool().close().await;
    let _ = worker.join();
    tracing::info!(stored = inbox.spool().stored(), "stopped");
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

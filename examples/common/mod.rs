//! What the reference receivers and the worker share: **the place to plug in your
//! own processing** ([`process`]), and logging.

#![allow(dead_code)] // each binary uses its part

use comapi_webhook::Event;
use comapi_webhook::receiver::ReceiverConfig;
use comapi_webhook::worker::HandlerError;

/// Your processing: called for each stored event the gate calls fresh. Return an
/// error (or panic) and the worker retries the event with backoff, then keeps it in
/// the dead letter. Delivery is at least once: make it idempotent.
pub(crate) async fn process(event: Event<'static>) -> Result<(), HandlerError> {
    // ============  PLUG IN YOUR OWN PROCESSING HERE: a database update, …  ============
    if let Ok(Some(slow)) = *DEMO_SLOW {
        tokio::time::sleep(slow).await;
    }
    let failing = DEMO_FAIL.as_deref().unwrap_or("").split(',');
    if failing.map(str::trim).any(|name| name == event.name()) {
        return Err(format!(
            "DEMO_FAIL names {}: this demo fails every such event",
            event.name()
        )
        .into());
    }
    tracing::info!(event_id = %event.event_id(), name = %event.name(), revision = event.revision(), decision = %"fresh", "event processed");
    Ok(())
}

/// `DEMO_FAIL=<event names>` (for example `message.sent`, or
/// `message.sent,message.read`): a demo switch that makes [`process`] fail every
/// event of those names, to watch the retries and the dead
/// letter without editing code. Unset by default.
pub(crate) static DEMO_FAIL: std::sync::LazyLock<Option<String>> =
    std::sync::LazyLock::new(|| std::env::var("DEMO_FAIL").ok().filter(|n| !n.is_empty()));

/// `DEMO_SLOW=<duration>` (for example `30s`): a demo switch that makes [`process`]
/// take that long on every event, to watch a shutdown or a lease without editing
/// code. Unset by default; a value that is not a duration stops the program at its
/// start ([`help_if_asked`]).
pub(crate) static DEMO_SLOW: std::sync::LazyLock<Result<Option<std::time::Duration>, String>> =
    std::sync::LazyLock::new(|| match std::env::var("DEMO_SLOW") {
        Err(_) => Ok(None),
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => humantime::parse_duration(value.trim())
            .map(Some)
            .map_err(|e| format!("DEMO_SLOW must be a duration such as 30s, not {value:?}: {e}")),
    });

/// Logs through `tracing` to standard error, filtered by `RUST_LOG` (default
/// `info,lapin=off`: the AMQP client's own lines repeat, as Debug structs, what this
/// crate says once in words; `RUST_LOG=info,lapin=debug` shows them).
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Logging on, then the settings from the environment; on a bad one, prints one
/// line naming the variable and exits with status 2.
pub(crate) fn config() -> ReceiverConfig {
    init_logging();
    ReceiverConfig::from_env().unwrap_or_else(|error| exit(&error, 2))
}

/// Prints `error: …` and exits with `code`.
pub(crate) fn exit(error: &dyn std::fmt::Display, code: i32) -> ! {
    eprintln!("error: {error}");
    std::process::exit(code)
}

/// The demo switch's line of `--help`.
const DEMO_HELP: &str =
    "  DEMO_FAIL                 fail every event of these names (message.sent, say;
                            comma-separated for more), to
                            watch the retries and the dead letter (default: unset)
  DEMO_SLOW                 take this long on every event (30s, say), to watch a
                            shutdown or a lease (default: unset)";

/// With `--help` (or `-h`): prints `about`, then the settings, and exits 0. Any
/// other argument: says so and exits 2; the settings come from the environment.
/// A demo switch that cannot be read: says so and exits 2.
pub(crate) fn help_if_asked(about: &str, settings: &str) {
    if let Err(error) = &*DEMO_SLOW {
        exit(error, 2);
    }
    let Some(arg) = std::env::args().nth(1) else {
        return;
    };
    let usage = format!("{about}\n\nSettings, from the environment:\n{settings}\n{DEMO_HELP}");
    if arg == "--help" || arg == "-h" {
        println!("{usage}");
        std::process::exit(0);
    }
    eprintln!("error: unknown argument {arg:?}: the settings come from the environment\n\n{usage}");
    std::process::exit(2);
}

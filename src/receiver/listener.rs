//! `Listener`: a TCP listener for a receiver on the open internet, whatever its HTTP
//! library: it backs off when accepting fails (out of file descriptors) instead of
//! spinning, keeps at most a set number of connections, and closes a connection
//! that sends no request within the header deadline. At the limit, a new
//! connection takes the place of the longest-idle one (a slow client that never
//! finished its headers, or an idle keep-alive) once that one has been idle for a
//! second (or half the header deadline, if shorter), so a burst of stalled
//! connections never keeps Comapi out; while every connection is in a request or
//! has just opened, new ones wait in the kernel's queue.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a new connection may take to send its first request's headers, by
/// default: 5 seconds. It is a backstop: at its connection limit the listener
/// closes the longest-idle connection to make room, so clients that trickle their
/// headers cannot crowd out a real request however long this is; and long enough
/// that a burst of new connections the server is still working through (a
/// thousand at once on two busy cores take about a second) is not cut.
pub const DEFAULT_HEADER_DEADLINE: Duration = Duration::from_secs(5);

/// How long a connection may stay idle between requests (keep-alive), by default:
/// 5 seconds, so that a sender reusing its connections seldom finds one closed.
pub const DEFAULT_IDLE_DEADLINE: Duration = Duration::from_secs(5);

/// How many connections a [`Listener`] keeps open at once when the process's
/// open-file limit cannot be read: 512, well under the usual limit of 1,024. See
/// [`default_max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// Open files kept for everything but connections: the store's files and
/// sockets, logs.
const FILES_KEPT: usize = 64;

/// At most this many connections by default, whatever the open-file limit: each
/// idle one costs a few kilobytes of buffers.
const MOST_CONNECTIONS: usize = 4_096;

/// How many connections to keep open at once by default: the process's soft
/// open-file limit (`ulimit -n`, read from `/proc/self/limits`) less 64 kept for
/// the store and logs, at most 4,096; [`DEFAULT_MAX_CONNECTIONS`] where the limit
/// cannot be read. Up to the limit, connections are accepted rather than left in
/// the kernel's queue, where a real request would wait behind stalled ones.
#[must_use]
pub fn default_max_connections() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse::<usize>().ok());
    match soft {
        Some(soft) => soft
            .saturating_sub(FILES_KEPT)
            .clamp(FILES_KEPT, MOST_CONNECTIONS),
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

/// How long to wait for room before looking again, at the limit.
const ROOM_POLL: Duration = Duration::from_millis(10);

/// The first wait after a failed accept; it doubles up to [`MAX_ACCEPT_BACKOFF`].
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A TCP listener that sheds load instead of starving: it backs off when accepting
/// fails (out of file descriptors) instead of spinning, keeps at most a set number
/// of connections, and closes a connection that sends no request headers within
/// the header deadline of opening, or no next request within the idle deadline of
/// its last one. At the limit, the longest-idle connection (a slow client that never
/// finished its headers, or an idle keep-alive) makes room for a new one once it
/// has been idle for a second (or half the header deadline, if shorter); while
/// every connection is in a request or has just opened, new ones wait in the
/// kernel's queue.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use comapi_webhook::receiver::Listener;
/// let listener = Listener::bind("127.0.0.1:8080".parse().unwrap()).await?;
/// loop {
///     let (stream, connection) = listener.accept().await;
///     tokio::spawn(async move {
///         let serve = async { /* serve `stream`; hold `connection.busy()` during each request */ };
///         tokio::select! {
///             () = serve => {}
///             () = connection.closed() => {} // idle past the deadline, or made room
///         }
///     });
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    slots: Arc<Slots>,
    header_deadline: Duration,
    idle_deadline: Duration,
    max_connections: usize,
}

#[derive(Debug, Default)]
struct Slots {
    open: Mutex<VecDeque<Arc<Slot>>>,
}

impl Slots {
    /// The open connections, those that closed forgotten.
    fn open(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Slot>>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|slot| !slot.closing.load(Ordering::Acquire));
        open
    }
}

/// One open connection's state, shared with its [`Connection`].
#[derive(Debug)]
struct Slot {
    /// Requests in progress.
    busy: AtomicU32,
    /// When the last request ended (or the connection opened).
    idle_since: Mutex<Instant>,
    /// Whether a request ended on it: it is idle between requests, not new.
    served: AtomicBool,
    /// Asked to close (to make room), or closed.
    closing: AtomicBool,
    close: Notify,
}

impl Slot {
    fn idle_since(&self) -> Instant {
        *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn ask_to_close(&self) {
        self.closing.store(true, Ordering::Release);
        self.close.notify_one();
    }
}

impl Listener {
    /// Listens on `addr` with [`DEFAULT_HEADER_DEADLINE`] and
    /// [`default_max_connections`].
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self::from_tcp(TcpListener::bind(addr).await?))
    }

    /// Wraps a bound tokio listener, with the default deadline and limit.
    #[must_use]
    pub fn from_tcp(inner: TcpListener) -> Self {
        Listener {
            inner,
            slots: Arc::default(),
            header_deadline: DEFAULT_HEADER_DEADLINE,
            idle_deadline: DEFAULT_IDLE_DEADLINE,
            max_connections: default_max_connections(),
        }
    }

    /// The same listener with another header deadline: how long a new connection
    /// may take to send its first request's headers.
    #[must_use]
    pub fn with_header_deadline(mut self, deadline: Duration) -> Self {
        self.header_deadline = deadline;
        self
    }

    /// The same listener with another idle deadline: how long a connection may
    /// stay idle between requests.
    #[must_use]
    pub fn with_idle_deadline(mut self, deadline: Duration) -> Self {
        self.idle_deadline = deadline;
        self
    }

    /// The same listener with another connection limit (at least 1).
    #[must_use]
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// The address it listens on.
    ///
    /// # Errors
    /// When the socket cannot say.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// How many connections are open now.
    #[must_use]
    pub fn open_connections(&self) -> usize {
        self.slots.open().len()
    }

    /// The next connection. A failed accept (no file descriptor left, say) is
    /// retried after a wait that doubles from 10 ms to 1 s, logged once per
    /// episode. At the connection limit the longest-idle connection is asked to
    /// close first (see [`Listener`]).
    pub async fn accept(&self) -> (TcpStream, Connection) {
        let mut backoff = FIRST_ACCEPT_BACKOFF;
        let mut failing = false;
        loop {
            while !self.make_room() {
                tokio::time::sleep(ROOM_POLL).await;
            }
            match self.inner.accept().await {
                Ok((stream, _)) => {
                    if failing {
                        tracing::info!("accepting connections again");
                    }
                    return (stream, self.admit());
                }
                Err(error) if is_per_connection(&error) => {}
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "cannot accept connections; backing off");
                        failing = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }

    /// Whether there is room for one more connection, asking the longest-idle one
    /// to close if it has idled long enough and there is none.
    fn make_room(&self) -> bool {
        let mut open = self.slots.open();
        if open.len() < self.max_connections {
            return true;
        }
        let long_enough = (self.header_deadline / 2).min(Duration::from_secs(1));
        let idlest = open
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, slot)| slot.idle_since())
            .filter(|(_, slot)| slot.idle_since().elapsed() >= long_enough)
            .map(|(index, _)| index);
        match idlest.and_then(|index| open.remove(index)) {
            Some(slot) => {
                slot.ask_to_close();
                true
            }
            None => false,
        }
    }

    /// A place for a connection just accepted.
    fn admit(&self) -> Connection {
        let slot = Arc::new(Slot {
            busy: AtomicU32::new(0),
            idle_since: Mutex::new(Instant::now()),
            served: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        });
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.push_back(Arc::clone(&slot));
        Connection {
            slot,
            header_deadline: self.header_deadline,
            idle_deadline: self.idle_deadline,
        }
    }
}

/// Errors of one incoming connection (it was reset before it was accepted), not of
/// the listener: accept the next one at once.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// An accepted connection's place in the [`Listener`]: mark each request with
/// [`Connection::busy`], and close the connection once [`Connection::closed`]
/// resolves. Dropping it frees the place.
#[derive(Debug)]
pub struct Connection {
    slot: Arc<Slot>,
    header_deadline: Duration,
    idle_deadline: Duration,
}

impl Connection {
    /// Marks a request in progress until the guard is dropped: a busy connection
    /// is never closed for being idle, nor to make room.
    #[must_use]
    pub fn busy(&self) -> Busy {
        self.requests().busy()
    }

    /// Resolves when the connection should be closed: it sent no complete request
    /// headers within the header deadline since it opened, or no next request
    /// within the idle deadline since its last one ended, or it was asked to make
    /// room.
    pub async fn closed(&self) {
        loop {
            if self.slot.closing.load(Ordering::Acquire) {
                return;
            }
            let wake = if self.slot.busy.load(Ordering::Acquire) == 0 {
                let deadline = if self.slot.served.load(Ordering::Acquire) {
                    self.idle_deadline
                } else {
                    self.header_deadline
                };
                let due = self.slot.idle_since() + deadline;
                if Instant::now() >= due {
                    return;
                }
                due
            } else {
                Instant::now() + self.header_deadline
            };
            tokio::select! {
                () = self.slot.close.notified() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// A handle for the request handler to take [`Connection::busy`] from (the
    /// handler is often a `'static` closure).
    #[must_use]
    pub fn requests(&self) -> Requests {
        Requests {
            slot: Arc::clone(&self.slot),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.slot.closing.store(true, Ordering::Release);
    }
}

/// Takes [`Busy`] guards for a connection's requests; cheap to clone.
#[derive(Debug, Clone)]
pub struct Requests {
    slot: Arc<Slot>,
}

impl Requests {
    /// See [`Connection::busy`].
    #[must_use]
    pub fn busy(&self) -> Busy {
        self.slot.busy.fetch_add(1, Ordering::AcqRel);
        Busy {
            slot: Arc::clone(&self.slot),
        }
    }
}

/// A request in progress on a connection; see [`Connection::busy`].
#[derive(Debug)]
pub struct Busy {
    slot: Arc<Slot>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self
            .slot
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.slot.served.store(true, Ordering::Release);
        self.slot.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

//! `BodyBudget`: the bytes of request bodies a process holds at once, across every
//! connection, so that many stalled or slow bodies cannot buy its memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The default budget of body bytes held at once by one process: 64 MiB, room for
/// more than a hundred full batches of 500 events (about 400 KB each) at once, and
/// well inside a 512 MB host.
pub const DEFAULT_BODY_BUDGET_BYTES: usize = 64 * 1024 * 1024;

/// The bytes of request bodies held at once, shared by every clone of an
/// [`Inbox`](crate::Inbox) (and by inboxes given the same budget).
///
/// A body is read only while the budget has room for it; one that does not fit is
/// answered `503` with `Retry-After` (Comapi retries a 503), and its connection is
/// closed. A body holds its bytes until its answer is decided, so a stalled one
/// holds them at most for the body deadline.
///
/// ```
/// use comapi_webhook::BodyBudget;
/// let budget = BodyBudget::new(1024);
/// assert_eq!(budget.limit(), 1024);
/// assert_eq!(budget.held(), 0);
/// ```
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    held: AtomicUsize,
}

impl BodyBudget {
    /// A budget of `limit` bytes, to share.
    #[must_use]
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(BodyBudget {
            limit,
            held: AtomicUsize::new(0),
        })
    }

    /// The most bytes held at once.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The bytes held now.
    #[must_use]
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes `bytes` more, if the budget has room for them.
    fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Why a body could not be read whole.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Over the body limit.
    TooLarge,
    /// The budget has no room for it now.
    NoRoom,
}

/// A body being read: its bytes, and the room they take in the budget (given back
/// on drop).
#[derive(Debug)]
pub(crate) struct BodyBuffer {
    budget: Arc<BodyBudget>,
    /// The bytes taken from the budget: the buffer's capacity.
    taken: usize,
    max: usize,
    bytes: Vec<u8>,
}

impl BodyBuffer {
    /// An empty buffer for a body of at most `max` bytes; `promised` (its
    /// `Content-Length`) is taken from the budget at once, so that it is read
    /// without growing.
    pub(crate) fn new(
        budget: &Arc<BodyBudget>,
        max: usize,
        promised: Option<u64>,
    ) -> Result<Self, Refused> {
        let mut buffer = BodyBuffer {
            budget: Arc::clone(budget),
            taken: 0,
            max,
            bytes: Vec::new(),
        };
        if let Some(promised) = promised {
            let promised = usize::try_from(promised).map_err(|_| Refused::TooLarge)?;
            if promised > max {
                return Err(Refused::TooLarge);
            }
            buffer.grow_to(promised)?;
        }
        Ok(buffer)
    }

    /// Appends `chunk`, growing within the budget and the limit.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), Refused> {
        let needed = self
            .bytes
            .len()
            .checked_add(chunk.len())
            .filter(|&n| n <= self.max)
            .ok_or(Refused::TooLarge)?;
        if needed > self.taken {
            // Doubling, as a Vec would, but never past the limit.
            let capacity = needed.max(self.taken.saturating_mul(2)).min(self.max);
            self.grow_to(capacity)?;
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }

    fn grow_to(&mut self, capacity: usize) -> Result<(), Refused> {
        let more = capacity.saturating_sub(self.taken);
        if more == 0 {
            return Ok(());
        }
        if !self.budget.take(more) {
            return Err(Refused::NoRoom);
        }
        self.taken = capacity;
        self.bytes.reserve_exact(capacity - self.bytes.len());
        Ok(())
    }

    /// The body read so far.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for BodyBuffer {
    fn drop(&mut self) {
        self.budget.give_back(self.taken);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bodies_take_room_and_give_it_back() {
        let budget = BodyBudget::new(100);
        let mut first = BodyBuffer::new(&budget, 80, Some(60)).unwrap();
        first.push(&[1; 60]).unwrap();
        assert_eq!(budget.held(), 60);
        assert_eq!(
            BodyBuffer::new(&budget, 80, Some(50)).unwrap_err(),
            Refused::NoRoom
        );
        let mut second = BodyBuffer::new(&budget, 80, None).unwrap();
        second.push(&[2; 30]).unwrap();
        assert_eq!(second.push(&[2; 20]), Err(Refused::NoRoom));
        drop(first);
        second.push(&[2; 20]).unwrap();
        assert_eq!(second.bytes().len(), 50);
        assert_eq!(second.push(&[2; 31]), Err(Refused::TooLarge));
        drop(second);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_promise_over_the_limit_takes_nothing() {
        let budget = BodyBudget::new(100);
        assert_eq!(
            BodyBuffer::new(&budget, 10, Some(11)).unwrap_err(),
            Refused::TooLarge
        );
        assert_eq!(
            BodyBuffer::new(&budget, 10, Some(u64::MAX)).unwrap_err(),
            Refused::TooLarge
        );
        assert_eq!(budget.held(), 0);
    }
}

//! Which new connections the service lets into a TLS handshake.
//!
//! A connection that never sends its ClientHello costs the service nothing but a slot, so the
//! slots are what a peer could take from everyone else. [`Handshakes`] hands them out:
//! 1. at most [`Handshakes::per_address`] handshakes in flight from one source address, so one
//!    host (or one misbehaving client) cannot hold more than that, whatever it does;
//! 2. at most [`Handshakes::total`] in flight in all; when they are all taken, the oldest one,
//!    if it has been pending for [`EVICT_AFTER`] (a real handshake takes milliseconds), is cut
//!    short to make room, so stalled handshakes from many addresses cannot lock out a newcomer
//!    for long either;
//! 3. a slot is given back when its [`HandshakeSlot`] is dropped (the handshake finished,
//!    failed, timed out or was cut short).
//!
//! Time is passed in, so the rules are tested without waiting.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How long a handshake must have been pending before a newcomer may cut it short when every
/// slot is taken: far beyond a real one (2-4 ms here, see the README), well below the
/// handshake deadline.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// The handshake slots of one service.
#[derive(Debug, Clone)]
pub struct Handshakes {
    total: usize,
    per_address: usize,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Pending handshakes by admission order (oldest first).
    pending: BTreeMap<u64, Pending>,
    by_address: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Pending {
    address: IpAddr,
    since: Instant,
    cut_short: CancellationToken,
}

/// Why a connection gets no handshake slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address already has [`Handshakes::per_address`] handshakes in flight.
    Address { limit: usize },
    /// All [`Handshakes::total`] slots are taken by handshakes younger than [`EVICT_AFTER`].
    Total { limit: usize },
}

/// One handshake's slot, given back on drop.
#[derive(Debug)]
pub struct HandshakeSlot {
    id: u64,
    /// Cancelled when a newcomer took this slot: the handshake must end at once.
    pub cut_short: CancellationToken,
    state: Arc<Mutex<State>>,
}

impl Handshakes {
    /// Slots for `total` handshakes at once, at most `per_address` from one address (each at
    /// least 1).
    pub fn new(total: usize, per_address: usize) -> Handshakes {
        Handshakes {
            total: total.max(1),
            per_address: per_address.max(1),
            state: Arc::default(),
        }
    }

    /// A slot for a handshake from `address` starting at `now`, or why there is none. When all
    /// are taken, the oldest handshake is cut short if it is at least [`EVICT_AFTER`] old.
    pub fn admit(&self, address: IpAddr, now: Instant) -> Result<HandshakeSlot, Refusal> {
        let mut state = lock(&self.state);
        if state.by_address.get(&address).copied().unwrap_or(0) >= self.per_address {
            return Err(Refusal::Address {
                limit: self.per_address,
            });
        }
        if state.pending.len() >= self.total {
            let oldest = state.pending.iter().next().map(|(id, p)| (*id, p.since));
            match oldest {
                Some((id, since)) if now.saturating_duration_since(since) >= EVICT_AFTER => {
                    if let Some(evicted) = state.remove(id) {
                        tracing::warn!(address = %evicted.address, pending = ?now.saturating_duration_since(since), "every TLS handshake slot taken: cutting the oldest short");
                        evicted.cut_short.cancel();
                    }
                }
                _ => return Err(Refusal::Total { limit: self.total }),
            }
        }
        let id = state.next;
        state.next += 1;
        let cut_short = CancellationToken::new();
        state.pending.insert(
            id,
            Pending {
                address,
                since: now,
                cut_short: cut_short.clone(),
            },
        );
        *state.by_address.entry(address).or_insert(0) += 1;
        Ok(HandshakeSlot {
            id,
            cut_short,
            state: self.state.clone(),
        })
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        lock(&self.state).pending.len()
    }
}

impl State {
    fn remove(&mut self, id: u64) -> Option<Pending> {
        let pending = self.pending.remove(&id)?;
        if let Some(n) = self.by_address.get_mut(&pending.address) {
            *n -= 1;
            if *n == 0 {
                self.by_address.remove(&pending.address);
            }
        }
        Some(pending)
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        // Already gone when a newcomer cut this handshake short.
        lock(&self.state).remove(self.id);
    }
}

/// The state stays consistent across a panic elsewhere (each change is one map operation).
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    #[test]
    fn one_address_gets_no_more_than_its_share_while_another_still_gets_in() {
        let slots = Handshakes::new(8, 2);
        let now = Instant::now();

        let first = slots.admit(ip(1), now).expect("first");
        let second = slots.admit(ip(1), now).expect("second");
        let third = slots.admit(ip(1), now);
        let other = slots.admit(ip(2), now);

        assert_eq!(third.err(), Some(Refusal::Address { limit: 2 }));
        assert!(other.is_ok());
        drop((first, second, other));
    }

    #[test]
    fn a_slot_given_back_lets_the_next_handshake_from_that_address_in() {
        let slots = Handshakes::new(8, 1);
        let now = Instant::now();
        let first = slots.admit(ip(1), now).expect("first");

        drop(first);
        let again = slots.admit(ip(1), now);

        assert!(again.is_ok());
        assert_eq!(slots.in_flight(), 1);
    }

    #[test]
    fn when_every_slot_is_taken_a_young_handshake_is_kept_and_the_newcomer_refused() {
        let slots = Handshakes::new(2, 2);
        let now = Instant::now();
        let held: Vec<_> = [1, 2]
            .map(|n| slots.admit(ip(n), now).expect("slot"))
            .into();

        let newcomer = slots.admit(ip(3), now + EVICT_AFTER / 2);

        assert_eq!(newcomer.err(), Some(Refusal::Total { limit: 2 }));
        assert!(held.iter().all(|s| !s.cut_short.is_cancelled()));
    }

    #[test]
    fn when_every_slot_is_taken_the_oldest_stalled_handshake_is_cut_short_for_a_newcomer() {
        let slots = Handshakes::new(2, 2);
        let start = Instant::now();
        let oldest = slots.admit(ip(1), start).expect("oldest");
        let younger = slots
            .admit(ip(2), start + Duration::from_millis(500))
            .expect("younger");

        let newcomer = slots.admit(ip(3), start + EVICT_AFTER);

        assert!(newcomer.is_ok());
        assert!(oldest.cut_short.is_cancelled());
        assert!(!younger.cut_short.is_cancelled());
        assert_eq!(slots.in_flight(), 2);
        drop(oldest);
        assert_eq!(
            slots.in_flight(),
            2,
            "the cut handshake's slot was already given away"
        );
        let again = slots.admit(ip(1), start + EVICT_AFTER);
        assert_eq!(again.err(), Some(Refusal::Total { limit: 2 }));
    }
}

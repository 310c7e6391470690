//! Upload slots: how many piece responses a server streams at once, in all and to one peer
//! address. The scheduler already spreads load by assigning parents, but a peer holding a valid
//! ticket could still open every slot of a parent itself; the per-peer share keeps the rest free
//! for the peers the scheduler sent (a peer over its share gets 503 and is given another parent).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The share of all slots one peer address may hold: half, at least one.
pub fn per_peer_share(total: usize) -> usize {
    total.div_ceil(2).max(1)
}

/// Why no slot was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// Every slot of the server is taken.
    Server,
    /// This peer address holds its whole share.
    Peer,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// Slot accounting: `total` at once, `per_peer` of them to one address.
pub struct Slots {
    total: usize,
    per_peer: usize,
    counts: Arc<Mutex<Counts>>,
}

/// A slot held until dropped.
pub struct Slot {
    peer: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Slots {
    pub fn new(total: usize, per_peer: usize) -> Self {
        Self {
            total: total.max(1),
            per_peer: per_peer.max(1),
            counts: Arc::default(),
        }
    }

    /// A slot for `peer`, or which limit it hit.
    pub fn acquire(&self, peer: IpAddr) -> Result<Slot, Busy> {
        let mut c = self.counts.lock().map_err(|_| Busy::Server)?;
        if c.total >= self.total {
            return Err(Busy::Server);
        }
        let held = c.by_peer.get(&peer).copied().unwrap_or(0);
        if held >= self.per_peer {
            return Err(Busy::Peer);
        }
        c.total += 1;
        c.by_peer.insert(peer, held + 1);
        Ok(Slot {
            peer,
            counts: self.counts.clone(),
        })
    }

    /// Slots held now (in all, peers holding any).
    pub fn in_use(&self) -> (usize, usize) {
        self.counts
            .lock()
            .map_or((0, 0), |c| (c.total, c.by_peer.len()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.counts.lock() {
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.by_peer.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    c.by_peer.remove(&self.peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_peer_gets_its_share_and_the_rest_stays_for_others() {
        let s = Slots::new(4, per_peer_share(4));
        let a1 = s.acquire(ip(1)).expect("a1");
        let _a2 = s.acquire(ip(1)).expect("a2");
        assert_eq!(s.acquire(ip(1)).err(), Some(Busy::Peer));
        let _b1 = s.acquire(ip(2)).expect("b1");
        let _c1 = s.acquire(ip(3)).expect("c1");
        assert_eq!(s.acquire(ip(4)).err(), Some(Busy::Server));
        drop(a1);
        assert_eq!(s.in_use(), (3, 3));
        let _a3 = s.acquire(ip(1)).expect("a slot freed is a slot again");
    }

    #[test]
    fn dropped_slots_leave_no_entry_behind() {
        let s = Slots::new(64, 32);
        let held: Vec<_> = (0..=255u8).filter_map(|i| s.acquire(ip(i)).ok()).collect();
        assert_eq!(held.len(), 64);
        drop(held);
        assert_eq!(s.in_use(), (0, 0));
    }

    #[test]
    fn shares_are_at_least_one() {
        assert_eq!(per_peer_share(0), 1);
        assert_eq!(per_peer_share(1), 1);
        assert_eq!(per_peer_share(16), 8);
        assert_eq!(per_peer_share(64), 32);
        let s = Slots::new(1, per_peer_share(1));
        let _only = s.acquire(ip(1)).expect("one");
        assert_eq!(s.acquire(ip(2)).err(), Some(Busy::Server));
    }
}

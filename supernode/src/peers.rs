//! How the scheduler names peers and their pieces internally: a [`PeerKey`] per session into a
//! slab of peers ([`Peers`]; peer ids are the network's strings, and hashing and comparing those
//! on every decision cost more than the decisions), the [`Parent`] of an assignment, and a peer's
//! holdings as a bit set ([`Pieces`]): the scheduler asks "does this parent hold piece n" of every
//! candidate it looks at, so a candidate costs one memory access, not a hash lookup. A piece's
//! holders are a bit set too ([`Holders`], by slot): one bit per peer and piece, where a list of
//! keys took some 40 bytes (10,000 peers on a 1,024-piece task: 1.3 MB, not 400).

use std::collections::HashSet;

use indexmap::IndexSet;
use smallvec::SmallVec;

/// A session's key in its version: a slot of [`Peers`] and the slot's generation, so a key held
/// by an assignment never names a later peer in the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    slot: u32,
    generation: u32,
}

impl PeerKey {
    /// A key no peer has.
    pub const NOBODY: PeerKey = PeerKey {
        slot: u32::MAX,
        generation: u32::MAX,
    };
}

/// The peers of a version, by key.
#[derive(Debug)]
pub struct Peers<T> {
    slots: Vec<Slot<T>>,
    /// Slots without a peer.
    vacant: Vec<u32>,
    len: usize,
}

impl<T> Default for Peers<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            vacant: Vec::new(),
            len: 0,
        }
    }
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Peers<T> {
    /// Adds a peer; its key.
    pub fn insert(&mut self, value: T) -> PeerKey {
        self.len += 1;
        if let Some(slot) = self.vacant.pop()
            && let Some(s) = self.slots.get_mut(slot as usize)
        {
            s.generation = s.generation.wrapping_add(1);
            s.value = Some(value);
            return PeerKey {
                slot,
                generation: s.generation,
            };
        }
        let slot = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push(Slot {
            generation: 0,
            value: Some(value),
        });
        PeerKey {
            slot,
            generation: 0,
        }
    }

    pub fn get(&self, key: &PeerKey) -> Option<&T> {
        self.slots
            .get(key.slot as usize)
            .filter(|s| s.generation == key.generation)
            .and_then(|s| s.value.as_ref())
    }

    pub fn get_mut(&mut self, key: &PeerKey) -> Option<&mut T> {
        self.slots
            .get_mut(key.slot as usize)
            .filter(|s| s.generation == key.generation)
            .and_then(|s| s.value.as_mut())
    }

    pub fn contains_key(&self, key: &PeerKey) -> bool {
        self.get(key).is_some()
    }

    /// Takes the peer out; its slot is given to a later peer under another generation.
    pub fn remove(&mut self, key: &PeerKey) -> Option<T> {
        let s = self
            .slots
            .get_mut(key.slot as usize)
            .filter(|s| s.generation == key.generation)?;
        let value = s.value.take()?;
        self.vacant.push(key.slot);
        self.len -= 1;
        Some(value)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every peer with its key.
    pub fn iter(&self) -> impl Iterator<Item = (PeerKey, &T)> {
        self.slots.iter().enumerate().filter_map(|(slot, s)| {
            let key = PeerKey {
                slot: u32::try_from(slot).ok()?,
                generation: s.generation,
            };
            Some((key, s.value.as_ref()?))
        })
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.iter().map(|(_, v)| v)
    }

    /// The key of the peer in `slot`, if there is one.
    fn key_at(&self, slot: u32) -> Option<PeerKey> {
        let s = self.slots.get(slot as usize)?;
        s.value.as_ref()?;
        Some(PeerKey {
            slot,
            generation: s.generation,
        })
    }
}

/// The peers holding one piece, as a bit per slot of [`Peers`]. A peer's bit is cleared when it
/// leaves (`State::remove_peer`), before its slot can be given to another, so a set bit always
/// names the slot's current peer.
#[derive(Clone, Debug, Default)]
pub struct Holders(Pieces);

impl Holders {
    /// Adds `key`; whether it was new.
    pub fn insert(&mut self, key: PeerKey) -> bool {
        self.0.insert(key.slot)
    }

    pub fn remove(&mut self, key: PeerKey) {
        self.0.remove(key.slot);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The holders with their keys, in slot order.
    pub fn iter<'a, T>(&'a self, peers: &'a Peers<T>) -> impl Iterator<Item = (PeerKey, &'a T)> {
        self.0.iter().filter_map(|slot| {
            let key = peers.key_at(slot)?;
            Some((key, peers.get(&key)?))
        })
    }
}

/// Where an assignment's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Parent {
    Supernode,
    Peer(PeerKey),
}

/// Keys are ours (sequential), not the network's: a fast hash is safe for them.
type Fast = foldhash::fast::RandomState;

/// Peer keys, unordered.
pub type PeerKeys = HashSet<PeerKey, Fast>;
/// Peer keys with positions (sampled at random by index).
pub type PeerList = IndexSet<PeerKey, Fast>;

/// A set of piece numbers as bits (kept inline up to 128 pieces). Piece numbers are bounded by
/// the version's piece count (checked where claims enter, `scheduler::session`), so the set is
/// at most one bit per piece.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pieces {
    words: SmallVec<[u64; 2]>,
    len: usize,
}

impl Pieces {
    /// Whether piece `n` is in the set.
    pub fn contains(&self, n: u32) -> bool {
        let (w, b) = Self::at(n);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Adds piece `n`; whether it was new.
    pub fn insert(&mut self, n: u32) -> bool {
        let (w, b) = Self::at(n);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let new = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        self.len += usize::from(new);
        new
    }

    /// Removes piece `n` (if it was there).
    pub fn remove(&mut self, n: u32) {
        let (w, b) = Self::at(n);
        if let Some(x) = self.words.get_mut(w)
            && *x & (1 << b) != 0
        {
            *x &= !(1 << b);
            self.len -= 1;
        }
    }

    /// Number of pieces in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let b = rest.trailing_zeros();
                    rest &= rest - 1;
                    // w < 2^26 (u32 piece numbers / 64): the product fits.
                    u32::try_from(w).unwrap_or(u32::MAX).saturating_mul(64) + b
                })
            })
        })
    }

    fn at(n: u32) -> (usize, u32) {
        ((n / 64) as usize, n % 64)
    }
}

impl FromIterator<u32> for Pieces {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut s = Self::default();
        for n in iter {
            s.insert(n);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_peers_that_left_name_nobody() {
        let mut peers = Peers::default();
        let a = peers.insert("a");
        let b = peers.insert("b");
        assert_eq!(peers.remove(&a), Some("a"));
        assert_eq!(peers.remove(&a), None);
        let c = peers.insert("c");
        assert_ne!(a, c, "the slot is reused under a new generation");
        assert_eq!(peers.get(&a), None);
        assert_eq!((peers.get(&b), peers.get(&c)), (Some(&"b"), Some(&"c")));
        assert_eq!(peers.len(), 2);
        assert_eq!(peers.values().count(), 2);
        assert!(peers.get(&PeerKey::NOBODY).is_none());
    }

    #[test]
    fn holders_name_the_peers_in_their_slots() {
        let mut peers = Peers::default();
        let (a, b) = (peers.insert("a"), peers.insert("b"));
        let mut h = Holders::default();
        assert!(h.insert(a) && h.insert(b) && !h.insert(b));
        assert_eq!(h.iter(&peers).collect::<Vec<_>>(), [(a, &"a"), (b, &"b")]);
        h.remove(a);
        peers.remove(&a);
        let c = peers.insert("c");
        assert_eq!(
            h.iter(&peers).collect::<Vec<_>>(),
            [(b, &"b")],
            "c took a's slot, not its pieces"
        );
        assert!(h.insert(c));
        assert_eq!((h.len(), h.iter(&peers).count()), (2, 2));
    }

    #[test]
    fn pieces_behave_as_a_set() {
        let mut s: Pieces = [3, 64, 3, 200].into_iter().collect();
        assert_eq!(s.len(), 3);
        assert!(s.contains(3) && s.contains(64) && s.contains(200));
        assert!(!s.contains(4) && !s.contains(65) && !s.contains(100_000));
        assert!(!s.insert(64) && s.insert(0));
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 3, 64, 200]);
        assert!(Pieces::default().is_empty());
        s.remove(3);
        s.remove(3);
        s.remove(100_000);
        assert_eq!((s.len(), s.contains(3)), (3, false));
        let top: Pieces = [u32::MAX >> 6].into_iter().collect();
        assert_eq!(top.iter().collect::<Vec<_>>(), [u32::MAX >> 6]);
    }
}

//! How the scheduler names peers and their pieces internally: a [`PeerKey`] per session (peer ids
//! are the network's strings; hashing and comparing those on every decision cost more than the
//! decisions), the [`Parent`] of an assignment, and a peer's holdings as a bit set ([`Pieces`]):
//! the scheduler asks "does this parent hold piece n" for every candidate it looks at.

use std::collections::HashSet;

use indexmap::IndexSet;

/// A session's key in its version, given when it joins and never given again, so a key held
/// by an assignment never names a later peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub u64);

/// Where an assignment's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Parent {
    Supernode,
    Peer(PeerKey),
}

/// Keys are ours (sequential), not the network's: a fast hash is safe for them.
type Fast = foldhash::fast::RandomState;

/// Peer key → something.
pub type PeerMap<V> = std::collections::HashMap<PeerKey, V, Fast>;
/// Peer keys, unordered.
pub type PeerKeys = HashSet<PeerKey, Fast>;
/// Peer keys with positions (sampled at random by index).
pub type PeerList = IndexSet<PeerKey, Fast>;

/// A set of piece numbers as bits. Piece numbers are bounded by the version's piece count
/// (checked where claims enter, `scheduler::session`), so the set is at most one bit per piece.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pieces {
    words: Vec<u64>,
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
    fn pieces_behave_as_a_set() {
        let mut s: Pieces = [3, 64, 3, 200].into_iter().collect();
        assert_eq!(s.len(), 3);
        assert!(s.contains(3) && s.contains(64) && s.contains(200));
        assert!(!s.contains(4) && !s.contains(65) && !s.contains(100_000));
        assert!(!s.insert(64) && s.insert(0));
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 3, 64, 200]);
        assert!(Pieces::default().is_empty());
        let top: Pieces = [u32::MAX >> 6].into_iter().collect();
        assert_eq!(top.iter().collect::<Vec<_>>(), [u32::MAX >> 6]);
    }
}

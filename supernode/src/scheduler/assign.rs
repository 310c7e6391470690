//! Choosing parents: which piece a peer should fetch next, and from whom.
//!
//! Policy: a peer keeps at most `window` assignments outstanding. Pieces other peers hold are taken
//! from the least-loaded such peer (under `peer_cap` concurrent uploads each), rarest piece first;
//! only when no peer can serve does the supernode, under its own cap, serve the rarest piece. That
//! spreads load, keeps the supernode's bytes near one copy per piece, and keeps faulty parents out.

use rand::seq::IndexedRandom;

use crate::task::{PeerState, State, Status};

/// The supernode's parent id.
pub const SUPERNODE_ID: &str = "supernode";

/// Limits the policy works with.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub window: usize,
    pub peer_cap: usize,
    pub supernode_cap: usize,
}

/// Picks the next assignments for `peer_id`, updating loads and outstanding sets.
/// `usable(parent_peer_id, host_id)` says whether a parent is allowed (not isolated host-wide).
pub fn next(
    state: &mut State,
    peer_id: &str,
    limits: Limits,
    usable: &dyn Fn(&str) -> bool,
) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut rng = rand::rng();
    while let Some(me) = state.peers.get(peer_id) {
        if me.outstanding.len() >= limits.window {
            break;
        }
        // Pieces this peer still needs and is not already fetching.
        let needed: Vec<u32> = state
            .pieces
            .iter()
            .map(|p| p.num)
            .filter(|n| !me.have.contains(n) && !me.outstanding.contains_key(n))
            .collect();
        // A lazy reader's wanted pieces go first; in want-only mode nothing else goes.
        let urgent: Vec<u32> = needed
            .iter()
            .copied()
            .filter(|n| me.wanted.contains(n))
            .collect();
        let needed = if !urgent.is_empty() {
            urgent
        } else if me.only_wanted {
            break;
        } else {
            needed
        };
        if needed.is_empty() {
            break;
        }
        // A parent is usable for this peer when it holds the piece, is not isolated (for the task
        // or host-wide), has not failed this peer, and has a free upload slot (`with_slot`).
        let usable_parent = |id: &str, p: &PeerState, n: u32| {
            id != peer_id
                && p.have.contains(&n)
                && !state.bad_parents.contains(id)
                && !me.failed_parents.contains(id)
                && usable(&p.host_id)
        };
        // Supply of a piece: usable holders plus copies already on their way to some peer.
        let supply = |n: u32| {
            let holders = state
                .peers
                .iter()
                .filter(|(id, p)| usable_parent(id, p, n))
                .count();
            holders + state.in_flight.get(&n).copied().unwrap_or(0)
        };
        // Best (piece, peer parent): rarest piece among those a usable peer can serve now.
        let mut best: Option<(usize, u32, Vec<&str>)> = None;
        for &n in &needed {
            let parents: Vec<&str> = state
                .peers
                .iter()
                .filter(|(id, p)| {
                    usable_parent(id, p, n)
                        && state.load.get(id.as_str()).copied().unwrap_or(0) < limits.peer_cap
                })
                .map(|(id, _)| id.as_str())
                .collect();
            if parents.is_empty() {
                continue;
            }
            let r = supply(n);
            if best.as_ref().is_none_or(|(br, _, _)| r < *br) {
                best = Some((r, n, parents));
            }
        }
        let sn_load = state.load.get(SUPERNODE_ID).copied().unwrap_or(0);
        let choice = if let Some((_, n, parents)) = best {
            let min_load = parents
                .iter()
                .map(|p| state.load.get(*p).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            let least: Vec<&str> = parents
                .into_iter()
                .filter(|p| state.load.get(*p).copied().unwrap_or(0) == min_load)
                .collect();
            least.choose(&mut rng).map(|p| (n, (*p).to_owned()))
        } else if sn_load < limits.supernode_cap {
            // The supernode sends pieces no peer has or is getting (each piece leaves it about once);
            // a second copy only when it is otherwise idle after seeding.
            let min_s = needed.iter().map(|n| supply(*n)).min().unwrap_or(0);
            let rarest: Vec<u32> = needed
                .iter()
                .copied()
                .filter(|n| supply(*n) == min_s)
                .collect();
            // While seeding, the supernode's uplink belongs to pieces nobody has yet.
            let seeded = matches!(state.status, Status::Complete { .. });
            if min_s == 0 || (sn_load == 0 && seeded) {
                rarest
                    .choose(&mut rng)
                    .map(|n| (*n, SUPERNODE_ID.to_owned()))
            } else {
                None
            }
        } else {
            None
        };
        let Some((piece, parent)) = choice else { break };
        *state.load.entry(parent.clone()).or_default() += 1;
        *state.in_flight.entry(piece).or_default() += 1;
        if let Some(me) = state.peers.get_mut(peer_id) {
            me.outstanding.insert(piece, parent.clone());
        }
        out.push((piece, parent));
    }
    out
}

/// Releases the bookkeeping of an outstanding assignment (reported, or its peer left).
pub fn release(state: &mut State, piece: u32, parent: &str) {
    if let Some(l) = state.load.get_mut(parent) {
        *l = l.saturating_sub(1);
    }
    if let Some(f) = state.in_flight.get_mut(&piece) {
        *f = f.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Version;
    use fetcher::piece::PieceMeta;

    fn peer(have: &[u32]) -> PeerState {
        PeerState {
            host_id: "h".into(),
            base_url: String::new(),
            have: have.iter().copied().collect(),
            outstanding: Default::default(),
            failed_parents: Default::default(),
            wanted: Default::default(),
            only_wanted: false,
            verified_only: false,
        }
    }

    fn state_with(pieces: u32) -> std::sync::Arc<Version> {
        let v = Version::new("t".repeat(64), "http://o/x".into(), vec![], None);
        v.lock().pieces = (0..pieces)
            .map(|n| PieceMeta {
                num: n,
                offset: u64::from(n) * 4,
                size: 4,
                sha256: String::new(),
            })
            .collect();
        v
    }

    const LIMITS: Limits = Limits {
        window: 4,
        peer_cap: 2,
        supernode_cap: 3,
    };

    #[test]
    fn supernode_serves_distinct_rare_pieces_within_its_cap() {
        let v = state_with(8);
        let mut st = v.lock();
        for p in ["a", "b"] {
            st.peers.insert(p.into(), peer(&[]));
        }
        let a = next(&mut st, "a", LIMITS, &|_| true);
        let b = next(&mut st, "b", LIMITS, &|_| true);
        assert_eq!(
            a.len() + b.len(),
            3,
            "supernode cap bounds concurrent supernode uploads"
        );
        let mut pieces: Vec<u32> = a.iter().chain(&b).map(|(n, _)| *n).collect();
        pieces.sort();
        pieces.dedup();
        assert_eq!(pieces.len(), 3, "rarest-first gives distinct pieces");
    }

    #[test]
    fn prefers_peers_and_skips_bad_or_failed_parents() {
        let v = state_with(4);
        let mut st = v.lock();
        st.peers.insert("seed1".into(), peer(&[0, 1, 2, 3]));
        st.peers.insert("evil".into(), peer(&[0, 1, 2, 3]));
        st.peers.insert("me".into(), peer(&[]));
        st.bad_parents.insert("evil".into());
        let got = next(&mut st, "me", LIMITS, &|_| true);
        assert_eq!(
            got.iter().filter(|(_, p)| p == "seed1").count(),
            2,
            "peer cap 2"
        );
        // Every piece is held by a peer: while seeding, the supernode sends no second copy.
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|(_, p)| p != "evil"));
        // Once seeded, the idle supernode adds one copy, no more.
        st.status = Status::Complete {
            content_length: 16,
            piece_count: 4,
            digest: String::new(),
        };
        let more = next(&mut st, "me", LIMITS, &|_| true);
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].1, SUPERNODE_ID);
        for (n, p) in got.iter().chain(&more) {
            release(&mut st, *n, p);
        }
        assert!(st.load.values().all(|l| *l == 0));
    }

    #[test]
    fn isolated_hosts_are_not_used() {
        let v = state_with(1);
        let mut st = v.lock();
        st.peers.insert("p".into(), peer(&[0]));
        st.peers.insert("me".into(), peer(&[]));
        let got = next(&mut st, "me", LIMITS, &|h| h != "h");
        assert_eq!(got, vec![(0, SUPERNODE_ID.to_owned())]);
    }

    #[test]
    fn wanted_pieces_go_first_and_want_only_peers_get_nothing_else() {
        let v = state_with(8);
        let mut st = v.lock();
        st.peers
            .insert("seed".into(), peer(&[0, 1, 2, 3, 4, 5, 6, 7]));
        let mut me = peer(&[]);
        me.wanted = [6, 7].into_iter().collect();
        me.only_wanted = true;
        st.peers.insert("me".into(), me);
        let got = next(&mut st, "me", LIMITS, &|_| true);
        let mut pieces: Vec<u32> = got.iter().map(|(n, _)| *n).collect();
        pieces.sort();
        assert_eq!(
            pieces,
            vec![6, 7],
            "want-only: the wanted pieces and nothing else"
        );
        // Background mode: wanted first, then the rest within the window.
        for (n, p) in &got {
            release(&mut st, *n, p);
        }
        if let Some(me) = st.peers.get_mut("me") {
            me.outstanding.clear();
            me.wanted = [5].into_iter().collect();
            me.only_wanted = false;
        }
        let got = next(&mut st, "me", LIMITS, &|_| true);
        assert_eq!(got.first().map(|(n, _)| *n), Some(5), "{got:?}");
        assert!(got.len() > 1, "the rest follows in the background: {got:?}");
    }
}

//! Choosing parents: which piece a peer should fetch next, and from whom.
//!
//! Policy: a peer keeps at most `window` assignments outstanding. Pieces other peers hold are taken
//! from a lightly loaded such peer (under `peer_cap` concurrent uploads each), rarest piece first;
//! only when no peer can serve does the supernode, under its own cap, serve the rarest piece. That
//! spreads load, keeps the supernode's bytes near one copy per piece, and keeps faulty parents out.
//!
//! Locations (`--location`, e.g. racks): parents in the peer's own location come first; a piece
//! comes from a peer elsewhere only while the location has no copy of it and none on the way, so
//! about one copy of each piece crosses into a location, and the idle supernode's extra copies go
//! only where they are missing. With one location (or none given) this is the plain policy.
//!
//! Cost: parents are looked for among the peers with a free upload slot (per location,
//! [`crate::task::Site`]), sampling at most [`PROBES`] of them, each offering the rarest piece it
//! holds that the peer needs; rarity comes from per-piece holder sets ([`State::holders`]). One
//! call costs O(pieces · log pieces + PROBES · pieces), whatever the number of peers.

use rand::Rng;
use rand::seq::IndexedRandom;

use fetcher::location::Location;
use indexmap::IndexSet;

use crate::task::{PeerState, State, Status};

/// The supernode's parent id.
pub const SUPERNODE_ID: &str = "supernode";

/// Free peers sampled for a parent (all of them when there are fewer): the best of a few random
/// candidates spreads uploads about as well as the best of all, at a bounded cost.
pub const PROBES: usize = 16;

/// Other locations looked at for a parent outside the peer's own, at most.
pub const SITE_PROBES: usize = 4 * PROBES;

/// Limits the policy works with.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub window: usize,
    pub peer_cap: usize,
    pub supernode_cap: usize,
}

/// A piece `me` still needs and is not fetching, with its supply (holders plus copies on their
/// way).
type Needed = (usize, u32);

/// The pieces `me` still needs and is not fetching, each list rarest first: those a lazy reader
/// waits on, then the rest.
fn needed_by_rarity(state: &State, me: &PeerState) -> (Vec<Needed>, Vec<Needed>) {
    let supply = |n: u32| {
        state.holders.get(&n).map_or(0, |h| h.len()) + state.in_flight.get(&n).copied().unwrap_or(0)
    };
    let mut rng = rand::rng();
    let (mut urgent, mut rest) = (Vec::new(), Vec::new());
    for n in state.pieces.iter().map(|p| p.num) {
        if me.have.contains(&n) || me.outstanding.contains_key(&n) {
            continue;
        }
        // Ties broken at random, so that peers starting together spread over the pieces.
        let entry = (supply(n), rng.random::<u32>(), n);
        if me.wanted.contains(&n) {
            urgent.push(entry);
        } else {
            rest.push(entry);
        }
    }
    let ranked = |mut v: Vec<(usize, u32, u32)>| {
        v.sort_unstable();
        v.into_iter().map(|(s, _, n)| (s, n)).collect()
    };
    (ranked(urgent), ranked(rest))
}

/// Whether `id` may serve `peer_id` at all (its load aside): not `peer_id` itself, not
/// isolated for the task or host-wide, and it has not failed `peer_id` before.
fn may_serve(
    state: &State,
    me: &PeerState,
    peer_id: &str,
    id: &str,
    usable: &dyn Fn(&str) -> bool,
) -> bool {
    id != peer_id
        && !state.bad_parents.contains(id)
        && !me.failed_parents.contains(id)
        && state.peers.get(id).is_some_and(|p| usable(&p.host_id))
}

/// Where parents are looked for: in the peer's own location, or outside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Near {
    Here,
    Elsewhere,
}

/// Up to [`PROBES`] peers with a free upload slot, at random: of location `here`, or of the
/// others (from a random one on, looking at no more than [`SITE_PROBES`] of them, so that peers
/// claiming many locations cannot make each decision longer).
fn sample<'a>(state: &'a State, here: &Location, near: Near) -> Vec<&'a String> {
    let mut rng = rand::rng();
    let first_site = rng.random_range(0..state.sites.len().max(1));
    let mut out = Vec::with_capacity(PROBES);
    let mut take = |free: &'a IndexSet<String>, out: &mut Vec<&'a String>| {
        let (len, want) = (free.len(), PROBES - out.len());
        if len <= want {
            out.extend(free.iter());
            return;
        }
        // A random start and stride: distinct peers while the stride and the set's size are
        // coprime, repeats otherwise (harmless).
        let (start, stride) = (rng.random_range(0..len), rng.random_range(1..len));
        out.extend((0..want).filter_map(|k| free.get_index((start + k * stride) % len)));
    };
    match near {
        Near::Here => {
            if let Some(site) = state.sites.get(here) {
                take(&site.free, &mut out);
            }
        }
        Near::Elsewhere => {
            let (n, first) = (state.sites.len(), first_site);
            for k in 0..n.min(SITE_PROBES) {
                if out.len() >= PROBES {
                    break;
                }
                if let Some((loc, site)) = state.sites.get_index((first + k) % n)
                    && loc != here
                {
                    take(&site.free, &mut out);
                }
            }
        }
    }
    out
}

/// The rarest piece of `needed` not in `skip` that a free, usable peer `near` holds, and the least
/// loaded such peer among up to [`PROBES`] free peers sampled (all of them when there are fewer).
fn free_parent(
    state: &State,
    peer_id: &str,
    needed: &[Needed],
    (skip, near): (&[bool], Near),
    (limits, usable): (Limits, &dyn Fn(&str) -> bool),
) -> Option<(usize, String)> {
    let me = state.peers.get(peer_id)?;
    let load = |id: &str| state.load.get(id).copied().unwrap_or(0);
    let mut best: Option<(usize, usize, &String)> = None;
    for id in sample(state, &me.location, near) {
        if load(id) >= limits.peer_cap || !may_serve(state, me, peer_id, id, usable) {
            continue;
        }
        let Some(parent) = state.peers.get(id) else {
            continue;
        };
        // Only a piece rarer than the best so far can do better.
        let upto = best.map_or(needed.len(), |(i, _, _)| i + 1);
        let offered = (0..upto).find(|i| !skip[*i] && parent.have.contains(&needed[*i].1));
        if let Some(i) = offered {
            let l = load(id);
            if best.is_none_or(|(bi, bl, _)| (i, l) < (bi, bl)) {
                best = Some((i, l, id));
            }
        }
    }
    best.map(|(i, _, id)| (i, id.clone()))
}

/// Which of `needed` `peer_id` may take from outside its location, beside `taken`: those its
/// location has no copy of and none on the way (one copy enters a location, then spreads inside
/// it). No restriction for a peer of unknown location, or one a parent still connected has failed
/// (its location's copies may be of no use to it).
fn outside_skip(state: &State, peer_id: &str, needed: &[Needed], taken: &[bool]) -> Vec<bool> {
    let me = state.peers.get(peer_id);
    let site = me.and_then(|m| state.sites.get(&m.location));
    let failed = |m: &PeerState| m.failed_parents.iter().any(|p| state.peers.contains_key(p));
    let free_to_roam = me.is_none_or(|m| m.location.is_unknown() || failed(m));
    (0..needed.len())
        .map(|i| taken[i] || !(free_to_roam || site.is_none_or(|s| s.lacks(needed[i].1))))
        .collect()
}

/// What [`next`] decided for a peer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Next {
    /// (piece, parent id) to send, the supernode's id for the supernode.
    pub assigned: Vec<(u32, String)>,
    /// The peer still has room in its window and pieces it could take once a parent frees up or
    /// appears (so a change should wake it); a peer with everything, or a lazy reader waiting on
    /// nothing, is not.
    pub starved: bool,
}

/// Picks the next assignments for `peer_id`, updating loads and outstanding sets.
/// `usable(host_id)` says whether a parent's host is allowed (not isolated host-wide).
pub fn next(
    state: &mut State,
    peer_id: &str,
    limits: Limits,
    usable: &dyn Fn(&str) -> bool,
) -> Next {
    let Some(me) = state.peers.get(peer_id) else {
        return Next::default();
    };
    let room = limits.window.saturating_sub(me.outstanding.len());
    if room == 0 {
        return Next::default();
    }
    let only_wanted = me.only_wanted;
    let (urgent, rest) = needed_by_rarity(state, me);
    // A lazy reader's wanted pieces go first; in want-only mode nothing else goes.
    let mut out = Vec::new();
    fill(state, peer_id, &urgent, (limits, usable), room, &mut out);
    let urgent_left = urgent.len() - out.len();
    let mut rest_left = rest.len();
    if !only_wanted {
        let (room, before) = (room - out.len(), out.len());
        fill(state, peer_id, &rest, (limits, usable), room, &mut out);
        rest_left -= out.len() - before;
    }
    let seeding = !matches!(state.status, Status::Complete { .. });
    let starved =
        out.len() < room && (urgent_left > 0 || (!only_wanted && (seeding || rest_left > 0)));
    Next {
        assigned: out,
        starved,
    }
}

/// Assigns up to `room` of `needed` (rarest first) to `peer_id`, into `out`. Rarest first from
/// peers: a piece without a free parent now stays without one in this call (loads only grow), so
/// one pass over the list serves the whole window; then the supernode.
fn fill(
    state: &mut State,
    peer_id: &str,
    needed: &[Needed],
    (limits, usable): (Limits, &dyn Fn(&str) -> bool),
    mut room: usize,
    out: &mut Vec<(u32, String)>,
) {
    let Some(here) = state.peers.get(peer_id).map(|p| p.location.clone()) else {
        return;
    };
    let mut taken = vec![false; needed.len()];
    while room > 0 {
        let policy = (limits, usable);
        let choice = free_parent(state, peer_id, needed, (&taken, Near::Here), policy)
            .or_else(|| {
                // With one location, "here" was everyone.
                (state.sites.len() > 1).then_some(())?;
                let skip = outside_skip(state, peer_id, needed, &taken);
                free_parent(state, peer_id, needed, (&skip, Near::Elsewhere), policy)
            })
            .or_else(|| {
                supernode_piece(state, peer_id, needed, &taken, policy)
                    .map(|i| (i, SUPERNODE_ID.to_owned()))
            });
        let Some((i, parent)) = choice else {
            break;
        };
        taken[i] = true;
        let piece = needed[i].1;
        let load = state.load.entry(parent.clone()).or_default();
        *load += 1;
        if *load >= limits.peer_cap {
            state.set_free(&parent, false);
        }
        state.send(&here, piece);
        if let Some(me) = state.peers.get_mut(peer_id) {
            me.outstanding.insert(piece, parent.clone());
        }
        out.push((piece, parent));
        room -= 1;
    }
}

/// Which of the untaken `needed` the supernode serves `peer_id`, when no peer can: a piece no
/// usable peer has or is getting (each piece leaves the supernode about once), or, when it is
/// otherwise idle after seeding, the rarest for a second copy.
fn supernode_piece(
    state: &State,
    peer_id: &str,
    needed: &[Needed],
    taken: &[bool],
    (limits, usable): (Limits, &dyn Fn(&str) -> bool),
) -> Option<usize> {
    let sn_load = state.load.get(SUPERNODE_ID).copied().unwrap_or(0);
    if sn_load >= limits.supernode_cap {
        return None;
    }
    let me = state.peers.get(peer_id)?;
    // A seed that took a version over does not hold every piece it knows of yet.
    let held = |i: &usize| !state.seed_lacks.contains(&needed[*i].1);
    let open = || (0..needed.len()).filter(|i| !taken[*i]).filter(held);
    // No copy anywhere this peer could take: nobody fetching it, no holder allowed to serve it
    // (the search stops at the first one that is).
    let absent: Vec<usize> = open()
        .filter(|i| {
            let n = needed[*i].1;
            state.in_flight.get(&n).copied().unwrap_or(0) == 0
                && !state
                    .holders
                    .get(&n)
                    .is_some_and(|h| h.iter().any(|id| may_serve(state, me, peer_id, id, usable)))
        })
        .collect();
    let mut rng = rand::rng();
    if let Some(i) = absent.choose(&mut rng) {
        return Some(*i);
    }
    let seeded = matches!(state.status, Status::Complete { .. });
    if sn_load != 0 || !seeded {
        return None;
    }
    // Lists are rarest first: the first open one is a rarest (of those the peer's location lacks,
    // when there are several).
    if state.sites.len() < 2 {
        return open().next();
    }
    let skip = outside_skip(state, peer_id, needed, taken);
    (0..needed.len()).filter(held).find(|i| !skip[*i])
}

/// Releases the bookkeeping of an outstanding assignment (reported, or its peer left).
/// `location` is the downloading peer's.
pub fn release(state: &mut State, location: &Location, piece: u32, parent: &str, limits: Limits) {
    let freed = state.load.get_mut(parent).is_some_and(|l| {
        *l = l.saturating_sub(1);
        *l < limits.peer_cap
    });
    if freed {
        state.set_free(parent, true);
    }
    state.unsend(location, piece);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Version;
    use fetcher::piece::PieceMeta;

    fn peer(have: &[u32]) -> PeerState {
        PeerState::new("h".into(), String::new(), have.iter().copied().collect())
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
            st.add_peer(p.into(), peer(&[]));
        }
        let a = next(&mut st, "a", LIMITS, &|_| true).assigned;
        let b = next(&mut st, "b", LIMITS, &|_| true).assigned;
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
    fn a_seed_that_took_over_serves_only_what_it_holds() {
        let v = state_with(6);
        let mut st = v.lock();
        st.seed_lacks = (0..6).filter(|n| *n != 4).collect();
        st.add_peer("holder".into(), peer(&[0, 1]));
        st.add_peer("me".into(), peer(&[]));
        let got = next(&mut st, "me", LIMITS, &|_| true);
        let from_sn: Vec<u32> = got
            .assigned
            .iter()
            .filter(|(_, p)| p == SUPERNODE_ID)
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(from_sn, vec![4], "the only piece the seed holds");
        assert!(
            got.assigned
                .iter()
                .all(|(n, p)| p == SUPERNODE_ID || (p == "holder" && *n < 2))
        );
        assert!(got.starved, "pieces 2, 3, 5: nobody can serve them yet");
    }

    #[test]
    fn prefers_peers_and_skips_bad_or_failed_parents() {
        let v = state_with(4);
        let mut st = v.lock();
        st.add_peer("seed1".into(), peer(&[0, 1, 2, 3]));
        st.add_peer("evil".into(), peer(&[0, 1, 2, 3]));
        st.add_peer("me".into(), peer(&[]));
        st.bad_parents.insert("evil".into());
        let got = next(&mut st, "me", LIMITS, &|_| true).assigned;
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
        let more = next(&mut st, "me", LIMITS, &|_| true).assigned;
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].1, SUPERNODE_ID);
        for (n, p) in got.iter().chain(&more) {
            release(&mut st, &Location::default(), *n, p, LIMITS);
        }
        assert!(st.load.values().all(|l| *l == 0));
    }

    fn peer_at(location: &str, have: &[u32]) -> PeerState {
        let mut p = peer(have);
        p.location = Location::parse(location).expect("location");
        p
    }

    fn parents(got: &[(u32, String)]) -> Vec<&str> {
        got.iter().map(|(_, p)| p.as_str()).collect()
    }

    #[test]
    fn parents_of_the_same_location_come_first() {
        let v = state_with(1);
        let mut st = v.lock();
        st.add_peer("far".into(), peer_at("rack-b", &[0]));
        st.add_peer("near".into(), peer_at("rack-a", &[0]));
        st.add_peer("me".into(), peer_at("rack-a", &[]));
        for _ in 0..20 {
            let got = next(&mut st, "me", LIMITS, &|_| true).assigned;
            assert_eq!(parents(&got), ["near"]);
            release(
                &mut st,
                &Location::parse("rack-a").expect("loc"),
                0,
                "near",
                LIMITS,
            );
            if let Some(m) = st.peers.get_mut("me") {
                m.outstanding.clear();
            }
        }
    }

    #[test]
    fn a_piece_enters_a_location_once_then_spreads_inside_it() {
        let v = state_with(4);
        let mut st = v.lock();
        st.add_peer("a1".into(), peer_at("rack-a", &[0, 1, 2, 3]));
        st.add_peer("a2".into(), peer_at("rack-a", &[0, 1, 2, 3]));
        st.add_peer("b1".into(), peer_at("rack-b", &[]));
        st.add_peer("b2".into(), peer_at("rack-b", &[]));
        let first = next(&mut st, "b1", LIMITS, &|_| true).assigned;
        assert_eq!(first.len(), 4, "the whole window from rack-a: {first:?}");
        // Every piece is on its way into rack-b: b2 takes none of them across the racks.
        assert_eq!(next(&mut st, "b2", LIMITS, &|_| true).assigned, vec![]);
        let rack_b = Location::parse("rack-b").expect("loc");
        assert!(st.sites[&rack_b].in_flight.values().all(|c| *c == 1));
        // Once b1 holds a piece, b2 gets it from b1.
        let (piece, parent) = first[0].clone();
        if let Some(p) = st.peers.get_mut("b1") {
            p.outstanding.remove(&piece);
        }
        release(&mut st, &rack_b, piece, &parent, LIMITS);
        assert!(st.hold("b1", piece));
        assert_eq!(
            next(&mut st, "b2", LIMITS, &|_| true).assigned,
            vec![(piece, "b1".to_owned())]
        );
        // A peer a parent still connected has failed may look anywhere (one that left does not
        // count).
        if let Some(p) = st.peers.get_mut("b2") {
            p.failed_parents.insert("gone".into());
        }
        assert_eq!(next(&mut st, "b2", LIMITS, &|_| true).assigned, vec![]);
        if let Some(p) = st.peers.get_mut("b2") {
            p.failed_parents.insert("b1".into());
        }
        let got = next(&mut st, "b2", LIMITS, &|_| true).assigned;
        assert!(
            !got.is_empty() && got.iter().all(|(_, p)| p.starts_with('a')),
            "{got:?}"
        );
    }

    #[test]
    fn sites_count_usable_holders_and_copies_on_the_way() {
        let v = state_with(2);
        let mut st = v.lock();
        let rack = Location::parse("r").expect("loc");
        st.add_peer("x".into(), peer_at("r", &[0]));
        st.add_peer("y".into(), peer_at("r", &[]));
        assert!(!st.sites[&rack].lacks(0) && st.sites[&rack].lacks(1));
        st.send(&rack, 1);
        assert!(!st.sites[&rack].lacks(1));
        st.unsend(&rack, 1);
        assert!(st.hold("y", 1) && !st.sites[&rack].lacks(1));
        // An isolated holder's pieces no longer count; leaving does not count them twice.
        assert!(st.isolate("x") && !st.isolate("x"));
        assert!(st.sites[&rack].lacks(0));
        st.remove_peer("x");
        assert!(st.sites[&rack].lacks(0) && !st.sites[&rack].lacks(1));
        st.remove_peer("y");
        assert!(st.sites.is_empty(), "a location without peers is dropped");
    }

    #[test]
    fn a_peer_waits_only_for_what_a_change_could_bring() {
        let v = state_with(2);
        let mut st = v.lock();
        st.add_peer("seed".into(), peer(&[0, 1]));
        st.add_peer("x".into(), peer(&[]));
        st.add_peer("y".into(), peer(&[]));
        // x takes both of seed's slots; y has room and nobody free to serve it: it waits.
        assert_eq!(next(&mut st, "x", LIMITS, &|_| true).assigned.len(), 2);
        let y = next(&mut st, "y", LIMITS, &|_| true);
        assert!(y.assigned.is_empty() && y.starved, "{y:?}");
        // While seeding, more pieces may come; once seeded, with everything coming, nothing is
        // worth waiting for.
        assert!(next(&mut st, "x", LIMITS, &|_| true).starved);
        st.status = Status::Complete {
            content_length: 8,
            piece_count: 2,
            digest: String::new(),
        };
        let x = next(&mut st, "x", LIMITS, &|_| true);
        assert!(x.assigned.is_empty() && !x.starved, "{x:?}");
        // A lazy reader in want-only mode that wants nothing does not wait either.
        if let Some(p) = st.peers.get_mut("y") {
            p.only_wanted = true;
        }
        assert!(!next(&mut st, "y", LIMITS, &|_| true).starved);
    }

    #[test]
    fn isolated_hosts_are_not_used() {
        let v = state_with(1);
        let mut st = v.lock();
        st.add_peer("p".into(), peer(&[0]));
        st.add_peer("me".into(), peer(&[]));
        let got = next(&mut st, "me", LIMITS, &|h| h != "h").assigned;
        assert_eq!(got, vec![(0, SUPERNODE_ID.to_owned())]);
    }

    #[test]
    fn wanted_pieces_go_first_and_want_only_peers_get_nothing_else() {
        let v = state_with(8);
        let mut st = v.lock();
        st.add_peer("seed".into(), peer(&[0, 1, 2, 3, 4, 5, 6, 7]));
        let mut me = peer(&[]);
        me.wanted = [6, 7].into_iter().collect();
        me.only_wanted = true;
        st.add_peer("me".into(), me);
        let got = next(&mut st, "me", LIMITS, &|_| true).assigned;
        let mut pieces: Vec<u32> = got.iter().map(|(n, _)| *n).collect();
        pieces.sort();
        assert_eq!(
            pieces,
            vec![6, 7],
            "want-only: the wanted pieces and nothing else"
        );
        // Background mode: wanted first, then the rest within the window.
        for (n, p) in &got {
            release(&mut st, &Location::default(), *n, p, LIMITS);
        }
        if let Some(me) = st.peers.get_mut("me") {
            me.outstanding.clear();
            me.wanted = [5].into_iter().collect();
            me.only_wanted = false;
        }
        let got = next(&mut st, "me", LIMITS, &|_| true).assigned;
        assert_eq!(got.first().map(|(n, _)| *n), Some(5), "{got:?}");
        assert!(got.len() > 1, "the rest follows in the background: {got:?}");
    }
}

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

use crate::task::{Parent, PeerKey, PeerList, PeerState, State, Status};

/// The supernode's parent id (what peers are told).
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
        if me.have.contains(n) || me.outstanding.contains_key(&n) {
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

/// Whether `parent` may serve `me` at all (its load aside): not `me` itself, not isolated for
/// the task or host-wide, and it has not failed `me` before.
fn may_serve(
    me: (PeerKey, &PeerState),
    (key, parent): (PeerKey, &PeerState),
    usable: &dyn Fn(&str) -> bool,
) -> bool {
    key != me.0
        && !parent.isolated
        && !me.1.failed_parents.contains(&key)
        && usable(&parent.host_id)
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
fn sample(state: &State, here: &Location, near: Near) -> Vec<PeerKey> {
    let mut rng = rand::rng();
    let first_site = rng.random_range(0..state.sites.len().max(1));
    let mut out = Vec::with_capacity(PROBES);
    let mut take = |free: &PeerList, out: &mut Vec<PeerKey>| {
        let (len, want) = (free.len(), PROBES - out.len());
        if len <= want {
            out.extend(free.iter());
            return;
        }
        // A random start and stride: distinct peers while the stride and the set's size are
        // coprime, repeats otherwise (harmless).
        let (start, stride) = (rng.random_range(0..len), rng.random_range(1..len));
        out.extend((0..want).filter_map(|k| free.get_index((start + k * stride) % len).copied()));
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
    mine: PeerKey,
    needed: &[Needed],
    (skip, near): (&[bool], Near),
    (limits, usable): (Limits, &dyn Fn(&str) -> bool),
) -> Option<(usize, PeerKey)> {
    let me = state.peers.get(&mine)?;
    let mut best: Option<(usize, usize, PeerKey)> = None;
    for key in sample(state, &me.location, near) {
        let Some(parent) = state.peers.get(&key) else {
            continue;
        };
        if parent.load >= limits.peer_cap || !may_serve((mine, me), (key, parent), usable) {
            continue;
        }
        // Only a piece rarer than the best so far can do better.
        let upto = best.map_or(needed.len(), |(i, _, _)| i + 1);
        let offered = (0..upto).find(|i| !skip[*i] && parent.have.contains(needed[*i].1));
        if let Some(i) = offered
            && best.is_none_or(|(bi, bl, _)| (i, parent.load) < (bi, bl))
        {
            best = Some((i, parent.load, key));
        }
    }
    best.map(|(i, _, key)| (i, key))
}

/// Which of `needed` `peer_id` may take from outside its location, beside `taken`: those its
/// location has no copy of and none on the way (one copy enters a location, then spreads inside
/// it). No restriction for a peer of unknown location, or one a parent still connected has failed
/// (its location's copies may be of no use to it).
fn outside_skip(state: &State, mine: PeerKey, needed: &[Needed], taken: &[bool]) -> Vec<bool> {
    let me = state.peers.get(&mine);
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
    /// (piece, parent) to send.
    pub assigned: Vec<(u32, Parent)>,
    /// The peer still has room in its window and pieces it could take once a parent frees up or
    /// appears (so a change should wake it); a peer with everything, or a lazy reader waiting on
    /// nothing, is not.
    pub starved: bool,
}

/// Picks the next assignments for peer `mine`, updating loads and outstanding sets.
/// `usable(host_id)` says whether a parent's host is allowed (not isolated host-wide).
pub fn next(
    state: &mut State,
    mine: PeerKey,
    limits: Limits,
    usable: &dyn Fn(&str) -> bool,
) -> Next {
    let Some(me) = state.peers.get(&mine) else {
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
    fill(state, mine, &urgent, (limits, usable), room, &mut out);
    let urgent_left = urgent.len() - out.len();
    let mut rest_left = rest.len();
    if !only_wanted {
        let (room, before) = (room - out.len(), out.len());
        fill(state, mine, &rest, (limits, usable), room, &mut out);
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

/// Assigns up to `room` of `needed` (rarest first) to peer `mine`, into `out`. Rarest first from
/// peers: a piece without a free parent now stays without one in this call (loads only grow), so
/// one pass over the list serves the whole window; then the supernode.
fn fill(
    state: &mut State,
    mine: PeerKey,
    needed: &[Needed],
    (limits, usable): (Limits, &dyn Fn(&str) -> bool),
    mut room: usize,
    out: &mut Vec<(u32, Parent)>,
) {
    let Some(here) = state.peers.get(&mine).map(|p| p.location.clone()) else {
        return;
    };
    let mut taken = vec![false; needed.len()];
    while room > 0 {
        let policy = (limits, usable);
        let choice = free_parent(state, mine, needed, (&taken, Near::Here), policy)
            .or_else(|| {
                // With one location, "here" was everyone.
                (state.sites.len() > 1).then_some(())?;
                let skip = outside_skip(state, mine, needed, &taken);
                free_parent(state, mine, needed, (&skip, Near::Elsewhere), policy)
            })
            .map(|(i, key)| (i, Parent::Peer(key)))
            .or_else(|| {
                supernode_piece(state, mine, needed, &taken, policy).map(|i| (i, Parent::Supernode))
            });
        let Some((i, parent)) = choice else {
            break;
        };
        taken[i] = true;
        let piece = needed[i].1;
        state.start_upload(parent, limits.peer_cap);
        state.send(&here, piece);
        if let Some(me) = state.peers.get_mut(&mine) {
            me.outstanding.insert(piece, parent);
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
    mine: PeerKey,
    needed: &[Needed],
    taken: &[bool],
    (limits, usable): (Limits, &dyn Fn(&str) -> bool),
) -> Option<usize> {
    let sn_load = state.supernode_load;
    if sn_load >= limits.supernode_cap {
        return None;
    }
    let me = state.peers.get(&mine)?;
    // A seed that took a version over does not hold every piece it knows of yet.
    let held = |i: &usize| !state.seed_lacks.contains(&needed[*i].1);
    let open = || (0..needed.len()).filter(|i| !taken[*i]).filter(held);
    // No copy anywhere this peer could take: nobody fetching it, no holder allowed to serve it
    // (the search stops at the first one that is).
    let absent: Vec<usize> = open()
        .filter(|i| {
            let n = needed[*i].1;
            state.in_flight.get(&n).copied().unwrap_or(0) == 0
                && !state.holders.get(&n).is_some_and(|h| {
                    h.iter().any(|k| {
                        state
                            .peers
                            .get(k)
                            .is_some_and(|p| may_serve((mine, me), (*k, p), usable))
                    })
                })
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
    let skip = outside_skip(state, mine, needed, taken);
    (0..needed.len()).filter(held).find(|i| !skip[*i])
}

/// Releases the bookkeeping of an outstanding assignment (reported, or its peer left).
/// `location` is the downloading peer's.
pub fn release(state: &mut State, location: &Location, piece: u32, parent: Parent, limits: Limits) {
    state.end_upload(parent, limits.peer_cap);
    state.unsend(location, piece);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Version;
    use fetcher::piece::PieceMeta;

    fn peer(have: &[u32]) -> PeerState {
        PeerState::new(
            String::new(),
            "h".into(),
            String::new(),
            have.iter().copied().collect(),
        )
    }

    /// Adds a peer called `name`.
    fn add(st: &mut State, name: &str, mut p: PeerState) {
        p.id = name.into();
        st.add_peer(p);
    }

    /// What [`next`] decided, parents by name ("supernode" for the supernode).
    #[derive(Debug)]
    struct Named {
        assigned: Vec<(u32, String)>,
        starved: bool,
    }

    fn name_of(st: &State, parent: Parent) -> String {
        match parent {
            Parent::Supernode => SUPERNODE_ID.into(),
            Parent::Peer(k) => st.peers.get(&k).map(|p| p.id.clone()).unwrap_or_default(),
        }
    }

    fn parent_named(st: &State, name: &str) -> Parent {
        if name == SUPERNODE_ID {
            Parent::Supernode
        } else {
            Parent::Peer(st.key(name))
        }
    }

    /// [`next`] for the peer called `name`.
    fn go(st: &mut State, name: &str, usable: &dyn Fn(&str) -> bool) -> Named {
        let key = st.key(name);
        let n = next(st, key, LIMITS, usable);
        Named {
            assigned: n
                .assigned
                .iter()
                .map(|(p, by)| (*p, name_of(st, *by)))
                .collect(),
            starved: n.starved,
        }
    }

    /// [`release`] of piece `n` from the parent called `parent`.
    fn free(st: &mut State, location: &Location, n: u32, parent: &str) {
        let parent = parent_named(st, parent);
        release(st, location, n, parent, LIMITS);
    }

    fn peer_mut<'a>(st: &'a mut State, name: &str) -> Option<&'a mut PeerState> {
        let key = st.key(name);
        st.peers.get_mut(&key)
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
            add(&mut st, p, peer(&[]));
        }
        let a = go(&mut st, "a", &|_| true).assigned;
        let b = go(&mut st, "b", &|_| true).assigned;
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
        add(&mut st, "holder", peer(&[0, 1]));
        add(&mut st, "me", peer(&[]));
        let got = go(&mut st, "me", &|_| true);
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
        add(&mut st, "seed1", peer(&[0, 1, 2, 3]));
        add(&mut st, "evil", peer(&[0, 1, 2, 3]));
        add(&mut st, "me", peer(&[]));
        let evil = st.key("evil");
        st.isolate(evil);
        let got = go(&mut st, "me", &|_| true).assigned;
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
        let more = go(&mut st, "me", &|_| true).assigned;
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].1, SUPERNODE_ID);
        for (n, p) in got.iter().chain(&more) {
            free(&mut st, &Location::default(), *n, p);
        }
        assert!(st.supernode_load == 0 && st.peers.values().all(|p| p.load == 0));
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
        add(&mut st, "far", peer_at("rack-b", &[0]));
        add(&mut st, "near", peer_at("rack-a", &[0]));
        add(&mut st, "me", peer_at("rack-a", &[]));
        for _ in 0..20 {
            let got = go(&mut st, "me", &|_| true).assigned;
            assert_eq!(parents(&got), ["near"]);
            free(&mut st, &Location::parse("rack-a").expect("loc"), 0, "near");
            if let Some(m) = peer_mut(&mut st, "me") {
                m.outstanding.clear();
            }
        }
    }

    #[test]
    fn a_piece_enters_a_location_once_then_spreads_inside_it() {
        let v = state_with(4);
        let mut st = v.lock();
        add(&mut st, "a1", peer_at("rack-a", &[0, 1, 2, 3]));
        add(&mut st, "a2", peer_at("rack-a", &[0, 1, 2, 3]));
        add(&mut st, "b1", peer_at("rack-b", &[]));
        add(&mut st, "b2", peer_at("rack-b", &[]));
        let first = go(&mut st, "b1", &|_| true).assigned;
        assert_eq!(first.len(), 4, "the whole window from rack-a: {first:?}");
        // Every piece is on its way into rack-b: b2 takes none of them across the racks.
        assert_eq!(go(&mut st, "b2", &|_| true).assigned, vec![]);
        let rack_b = Location::parse("rack-b").expect("loc");
        assert!(st.sites[&rack_b].in_flight.values().all(|c| *c == 1));
        // Once b1 holds a piece, b2 gets it from b1.
        let (piece, parent) = first[0].clone();
        if let Some(p) = peer_mut(&mut st, "b1") {
            p.outstanding.remove(&piece);
        }
        free(&mut st, &rack_b, piece, &parent);
        let b1 = st.key("b1");
        assert!(st.hold(b1, piece));
        assert_eq!(
            go(&mut st, "b2", &|_| true).assigned,
            vec![(piece, "b1".to_owned())]
        );
        // A peer a parent still connected has failed may look anywhere (one that left does not
        // count).
        if let Some(p) = peer_mut(&mut st, "b2") {
            p.failed_parents.insert(crate::task::PeerKey::NOBODY);
        }
        assert_eq!(go(&mut st, "b2", &|_| true).assigned, vec![]);
        if let Some(p) = peer_mut(&mut st, "b2") {
            p.failed_parents.insert(b1);
        }
        let got = go(&mut st, "b2", &|_| true).assigned;
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
        add(&mut st, "x", peer_at("r", &[0]));
        add(&mut st, "y", peer_at("r", &[]));
        assert!(!st.sites[&rack].lacks(0) && st.sites[&rack].lacks(1));
        st.send(&rack, 1);
        assert!(!st.sites[&rack].lacks(1));
        st.unsend(&rack, 1);
        let (x, y) = (st.key("x"), st.key("y"));
        assert!(st.hold(y, 1) && !st.sites[&rack].lacks(1));
        // An isolated holder's pieces no longer count; leaving does not count them twice.
        assert!(st.isolate(x) && !st.isolate(x));
        assert!(st.sites[&rack].lacks(0));
        st.remove_peer(x);
        assert!(st.sites[&rack].lacks(0) && !st.sites[&rack].lacks(1));
        st.remove_peer(y);
        assert!(st.sites.is_empty(), "a location without peers is dropped");
    }

    #[test]
    fn a_peer_waits_only_for_what_a_change_could_bring() {
        let v = state_with(2);
        let mut st = v.lock();
        add(&mut st, "seed", peer(&[0, 1]));
        add(&mut st, "x", peer(&[]));
        add(&mut st, "y", peer(&[]));
        // x takes both of seed's slots; y has room and nobody free to serve it: it waits.
        assert_eq!(go(&mut st, "x", &|_| true).assigned.len(), 2);
        let y = go(&mut st, "y", &|_| true);
        assert!(y.assigned.is_empty() && y.starved, "{y:?}");
        // While seeding, more pieces may come; once seeded, with everything coming, nothing is
        // worth waiting for.
        assert!(go(&mut st, "x", &|_| true).starved);
        st.status = Status::Complete {
            content_length: 8,
            piece_count: 2,
            digest: String::new(),
        };
        let x = go(&mut st, "x", &|_| true);
        assert!(x.assigned.is_empty() && !x.starved, "{x:?}");
        // A lazy reader in want-only mode that wants nothing does not wait either.
        if let Some(p) = peer_mut(&mut st, "y") {
            p.only_wanted = true;
        }
        assert!(!go(&mut st, "y", &|_| true).starved);
    }

    #[test]
    fn isolated_hosts_are_not_used() {
        let v = state_with(1);
        let mut st = v.lock();
        add(&mut st, "p", peer(&[0]));
        add(&mut st, "me", peer(&[]));
        let got = go(&mut st, "me", &|h| h != "h").assigned;
        assert_eq!(got, vec![(0, SUPERNODE_ID.to_owned())]);
    }

    #[test]
    fn wanted_pieces_go_first_and_want_only_peers_get_nothing_else() {
        let v = state_with(8);
        let mut st = v.lock();
        add(&mut st, "seed", peer(&[0, 1, 2, 3, 4, 5, 6, 7]));
        let mut me = peer(&[]);
        me.wanted = [6, 7].into_iter().collect();
        me.only_wanted = true;
        add(&mut st, "me", me);
        let got = go(&mut st, "me", &|_| true).assigned;
        let mut pieces: Vec<u32> = got.iter().map(|(n, _)| *n).collect();
        pieces.sort();
        assert_eq!(
            pieces,
            vec![6, 7],
            "want-only: the wanted pieces and nothing else"
        );
        // Background mode: wanted first, then the rest within the window.
        for (n, p) in &got {
            free(&mut st, &Location::default(), *n, p);
        }
        if let Some(me) = peer_mut(&mut st, "me") {
            me.outstanding.clear();
            me.wanted = [5].into_iter().collect();
            me.only_wanted = false;
        }
        let got = go(&mut st, "me", &|_| true).assigned;
        assert_eq!(got.first().map(|(n, _)| *n), Some(5), "{got:?}");
        assert!(got.len() > 1, "the rest follows in the background: {got:?}");
    }
}

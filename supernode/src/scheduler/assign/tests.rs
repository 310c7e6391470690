//! Unit tests of the assignment policy (`super`): peers by name, parents by name.

use super::*;
use crate::task::Version;

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

const LIMITS: Limits = Limits {
    window: 4,
    peer_cap: 2,
    supernode_cap: 3,
};

#[test]
fn supernode_serves_distinct_rare_pieces_within_its_cap() {
    let v = Version::with_pieces(8);
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
    let v = Version::with_pieces(6);
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
    let v = Version::with_pieces(4);
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
    let v = Version::with_pieces(1);
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
    let v = Version::with_pieces(4);
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
    let v = Version::with_pieces(2);
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
    let v = Version::with_pieces(2);
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
    let v = Version::with_pieces(1);
    let mut st = v.lock();
    add(&mut st, "p", peer(&[0]));
    add(&mut st, "me", peer(&[]));
    let got = go(&mut st, "me", &|h| h != "h").assigned;
    assert_eq!(got, vec![(0, SUPERNODE_ID.to_owned())]);
}

#[test]
fn wanted_pieces_go_first_and_want_only_peers_get_nothing_else() {
    let v = Version::with_pieces(8);
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

#[test]
fn a_large_task_ranks_a_bounded_share_of_its_pieces_from_random_starts() {
    let v = Version::with_pieces(1000);
    let mut st = v.lock();
    let mut me = peer(&[3]);
    me.wanted = [900, 901].into_iter().collect();
    add(&mut st, "me", me);
    let key = st.key("me");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let me = &st.peers.get(&key).expect("me");
        let (urgent, rest) = needed_by_rarity(&st, me);
        let mut wanted: Vec<u32> = urgent.iter().map(|(_, n)| *n).collect();
        wanted.sort();
        assert_eq!(wanted, [900, 901], "every wanted piece, always");
        assert_eq!(rest.len(), CANDIDATES);
        assert!(rest.iter().all(|(_, n)| ![3, 900, 901].contains(n)));
        seen.extend(rest.iter().map(|(_, n)| *n));
    }
    assert_eq!(
        seen.len(),
        997,
        "every lacking piece is someone's candidate"
    );
}

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

/// Pieces of a large task a decision ranks, at most (from a random start): rarest-first is
/// exact for tasks of up to this many pieces a peer lacks, and approximate past that, so that a
/// decision costs the same for a 4 GiB layer as for a small one. Spread over many peers' random
/// starts, every piece is someone's candidate.
pub const CANDIDATES: usize = 128;

/// The pieces `me` still needs and is not fetching, each list rarest first: those a lazy reader
/// waits on (all of them), then up to [`CANDIDATES`] of the rest.
fn needed_by_rarity(state: &State, me: &PeerState) -> (Vec<Needed>, Vec<Needed>) {
    let supply = |n: u32| {
        state.holders.get(&n).map_or(0, |h| h.len()) + state.in_flight.get(&n).copied().unwrap_or(0)
    };
    let mut rng = rand::rng();
    let count = state.pieces.len();
    let lacks = |n: u32| !me.have.contains(n) && !me.outstanding.contains_key(&n);
    // Ties broken at random, so that peers starting together spread over the pieces.
    let mut entry = |n: u32| (supply(n), rng.random::<u32>(), n);
    let urgent: Vec<_> = me
        .wanted
        .iter()
        .copied()
        .filter(|n| (*n as usize) < count && lacks(*n))
        .map(&mut entry)
        .collect();
    let start = if count > CANDIDATES {
        rand::rng().random_range(0..count)
    } else {
        0
    };
    let rest: Vec<_> = (0..count)
        .map(|k| state.pieces[(start + k) % count].num)
        .filter(|n| !me.wanted.contains(n) && lacks(*n))
        .take(CANDIDATES)
        .map(&mut entry)
        .collect();
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
                    h.iter(&state.peers)
                        .any(|(k, p)| may_serve((mine, me), (k, p), usable))
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
mod tests;

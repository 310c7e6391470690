//! One peer's session on one task version: registration, piece metadata and assignments out,
//! results in. The peer is a parent for as long as the stream stays open.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::scheduler::{
    self as pb, ErrorKind, FailureReason, PeerMessage, SchedulerMessage, TaskError, peer_message,
    scheduler_message,
};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use tracing::Instrument;

use fetcher::location::Location;

use super::Scheduling;
use super::assign::{self, SUPERNODE_ID};
use super::identity::Caller;
use super::register;
use crate::task::{PeerState, State, Status as SeedStatus, Version};

type Tx = mpsc::Sender<Result<SchedulerMessage, Status>>;

fn out(m: scheduler_message::Msg) -> Result<SchedulerMessage, Status> {
    Ok(SchedulerMessage { msg: Some(m) })
}

async fn send_error(tx: &Tx, e: TaskError) {
    let _ = tx.send(out(scheduler_message::Msg::Error(e))).await;
}

fn invalid(message: impl Into<String>) -> TaskError {
    TaskError {
        kind: ErrorKind::Invalid as i32,
        http_status: 0,
        message: message.into(),
    }
}

/// Runs a session until the peer leaves, the task fails, or the supernode shuts down.
pub async fn run(s: Arc<Scheduling>, mut inbound: Streaming<PeerMessage>, tx: Tx, caller: Caller) {
    let first = tokio::time::timeout(Duration::from_secs(30), inbound.message()).await;
    let reg = match first {
        Ok(Ok(Some(PeerMessage {
            msg: Some(peer_message::Msg::Register(r)),
        }))) => r,
        _ => return send_error(&tx, invalid("the first message must be Register")).await,
    };
    let span = tracing::info_span!("session", task_id = %reg.task_id.get(..16).unwrap_or(""), peer = %reg.peer_id, remote = ?caller.remote);
    run_registered(s, inbound, tx, caller, reg)
        .instrument(span)
        .await;
}

async fn run_registered(
    s: Arc<Scheduling>,
    mut inbound: Streaming<PeerMessage>,
    tx: Tx,
    caller: Caller,
    reg: pb::Register,
) {
    let (local_ip, remote) = (caller.local_ip, caller.remote);
    let upload: SocketAddr = match reg.upload_addr.parse::<SocketAddr>() {
        // Others reach the peer where it connected from: its claimed IP is not taken on trust.
        Ok(a) => match remote {
            Some(r) if r.ip() != a.ip() => {
                tracing::info!(claimed = %a, seen = %r.ip(), "upload address taken from the connection");
                SocketAddr::new(r.ip(), a.port())
            }
            _ => a,
        },
        Err(_) => {
            return send_error(
                &tx,
                invalid(format!("bad upload_addr {:?}", reg.upload_addr)),
            )
            .await;
        }
    };
    if reg.peer_id.is_empty() || reg.host_id.is_empty() {
        return send_error(&tx, invalid("peer_id and host_id are required")).await;
    }
    let location = match Location::parse(&reg.location) {
        Ok(l) => l,
        Err(e) => return send_error(&tx, invalid(format!("location: {e}"))).await,
    };
    let version = match register::join(&s, &reg).await {
        Ok(v) => v,
        Err(e) => return send_error(&tx, e).await,
    };
    let mut changes = version.subscribe();
    // Wait for the origin's answer (or failure).
    let info = loop {
        let (failed, info) = {
            let st = version.lock();
            let failed = match &st.status {
                SeedStatus::Failed(e) => Some(e.clone()),
                _ => None,
            };
            (failed, st.info.clone())
        };
        if let Some(e) = failed {
            return send_error(&tx, e).await;
        }
        if let Some(i) = info {
            break i;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = s.shutdown.wait() => return,
        }
    };
    let peer_ip = remote.map(|r| r.ip());
    let (ticket, mut ticket_expires) = s.tickets.pieces(&info.version_id, peer_ip);
    let task_info = pb::TaskInfo {
        version_id: info.version_id.clone(),
        content_length: info.content_length,
        piece_size: info.piece_size,
        etag: info.etag.clone(),
        last_modified: info.last_modified.clone(),
        supernode_id: SUPERNODE_ID.into(),
        ticket_key: s.tickets.public().as_bytes().to_vec(),
        ticket,
    };
    if tx
        .send(out(scheduler_message::Msg::TaskInfo(task_info)))
        .await
        .is_err()
    {
        return;
    }
    let have = match tokio::time::timeout(Duration::from_secs(60), inbound.message()).await {
        Ok(Ok(Some(PeerMessage {
            msg: Some(peer_message::Msg::Have(h)),
        }))) => h.pieces,
        _ => return send_error(&tx, invalid("expected Have after TaskInfo")).await,
    };
    let pieces = piece_count(info.content_length, info.piece_size);
    let peer_id = reg.peer_id.clone();
    let mut me = PeerState::new(
        caller.host(&reg.host_id),
        s.cfg.base_url(upload),
        existing(have, pieces).collect(),
    );
    me.only_wanted = reg.only_wanted;
    me.location = location;
    me.verified_only = version.expected_digest.is_some()
        && crate::task::url_key(&reg.url) != crate::task::url_key(&version.url);
    let wake = me.wake.clone();
    {
        let mut st = version.lock();
        let held: Vec<u32> = me.have.iter().copied().collect();
        st.add_peer(peer_id.clone(), me);
        // What it holds can serve peers waiting for a parent.
        st.wake_starved_if(wake_for(held.len(), s.cfg.limits), |_, c| {
            held.iter().any(|n| State::lacks(c, *n))
        });
    }
    s.metrics.peers.inc();
    tracing::info!(version = %&info.version_id[..16], location = %reg.location, "peer joined");

    let sn_ip = s
        .cfg
        .advertise_ip
        .or(local_ip)
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let supernode_base = s.cfg.base_url(SocketAddr::new(sn_ip, s.cfg.http_port));
    let mut sent = 0usize;
    let mut done_sent = false;
    loop {
        let (msgs, end) = step(
            &s,
            &version,
            &peer_id,
            &supernode_base,
            &mut sent,
            &mut done_sent,
        );
        for m in msgs {
            if tx.send(out(m)).await.is_err() {
                return leave(&s, &version, &peer_id);
            }
        }
        if end {
            break;
        }
        // Renew the ticket at half its life.
        if fetcher::ticket::now() + s.tickets.ttl.as_secs() / 2 >= ticket_expires {
            let (ticket, expires) = s.tickets.pieces(&info.version_id, peer_ip);
            ticket_expires = expires;
            let m = scheduler_message::Msg::Ticket(pb::Ticket { ticket });
            if tx.send(out(m)).await.is_err() {
                return leave(&s, &version, &peer_id);
            }
        }
        // Re-evaluate now and then while waiting: isolation cool-downs expire without a wake-up.
        let idle = if version
            .lock()
            .peers
            .get(&peer_id)
            .is_some_and(|p| p.starved)
        {
            Duration::from_secs(1)
        } else {
            // Often enough for the ticket renewal above.
            (s.tickets.ttl / 4).min(Duration::from_secs(15))
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            () = wake.notified() => {}
            m = inbound.message() => match m {
                Ok(Some(PeerMessage { msg: Some(peer_message::Msg::PieceResult(r)) })) => on_result(&s, &version, &peer_id, r),
                Ok(Some(PeerMessage { msg: Some(peer_message::Msg::Have(h)) })) => {
                    let mut st = version.lock();
                    let new: Vec<u32> = existing(h.pieces, pieces).filter(|n| st.hold(&peer_id, *n)).collect();
                    st.wake_starved_if(wake_for(new.len(), s.cfg.limits), |_, c| new.iter().any(|n| State::lacks(c, *n)));
                }
                Ok(Some(PeerMessage { msg: Some(peer_message::Msg::Want(w)) })) => {
                    if let Some(p) = version.lock().peers.get_mut(&peer_id) {
                        p.wanted = existing(w.pieces, pieces).collect();
                        p.only_wanted = w.only;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
            _ = s.shutdown.wait() => break,
            _ = tokio::time::sleep(idle) => {}
        }
    }
    leave(&s, &version, &peer_id);
}

/// Computes what to send now: new piece metadata, completion, failure, new assignments.
fn step(
    s: &Scheduling,
    version: &Version,
    peer_id: &str,
    supernode_base: &str,
    sent: &mut usize,
    done_sent: &mut bool,
) -> (Vec<scheduler_message::Msg>, bool) {
    let mut msgs = Vec::new();
    let mut st = version.lock();
    st.last_access = Instant::now();
    let complete = matches!(st.status, SeedStatus::Complete { .. });
    let failed = matches!(st.status, SeedStatus::Failed(_));
    if !complete && !failed && st.peers.get(peer_id).is_some_and(|p| p.verified_only) {
        return (msgs, false);
    }
    for p in &st.pieces[(*sent).min(st.pieces.len())..] {
        msgs.push(scheduler_message::Msg::PieceInfo(p.to_proto()));
    }
    *sent = st.pieces.len();
    match &st.status {
        SeedStatus::Failed(e) => {
            msgs.push(scheduler_message::Msg::Error(e.clone()));
            return (msgs, true);
        }
        SeedStatus::Complete {
            content_length,
            piece_count,
            digest,
        } if !*done_sent => {
            msgs.push(scheduler_message::Msg::Done(pb::Done {
                content_length: *content_length,
                piece_count: *piece_count,
                digest: digest.clone(),
            }));
            *done_sent = true;
        }
        _ => {}
    }
    let usable = |host: &str| !s.isolation.is_isolated(host);
    let next = assign::next(&mut st, peer_id, s.cfg.limits, &usable);
    if next.starved {
        st.starve(peer_id);
    }
    let here = st
        .peers
        .get(peer_id)
        .map(|p| p.location.clone())
        .unwrap_or_default();
    for (piece, parent) in next.assigned {
        let p = st.peers.get(&parent);
        let (base_url, is_supernode) = match p {
            _ if parent == SUPERNODE_ID => (supernode_base.to_owned(), true),
            p => (p.map(|p| p.base_url.clone()).unwrap_or_default(), false),
        };
        if !here.is_unknown() && p.is_none_or(|p| p.location != here) {
            s.metrics.cross_location.inc();
        }
        s.metrics
            .assignments
            .with_label_values(&[if is_supernode { "supernode" } else { "peer" }])
            .inc();
        msgs.push(scheduler_message::Msg::Assign(pb::Assign {
            piece,
            parent: Some(pb::Parent {
                id: parent,
                base_url,
                is_supernode,
            }),
        }));
    }
    (msgs, false)
}

/// Pieces a version may have: all of them for a known length, else a bound (2^20 pieces) so that
/// a peer's claims cannot grow the supernode's memory without limit.
fn piece_count(content_length: i64, piece_size: u32) -> u32 {
    const UNKNOWN_LENGTH_BOUND: u32 = 1 << 20;
    match u64::try_from(content_length) {
        Ok(len) if piece_size > 0 => {
            u32::try_from(len.div_ceil(u64::from(piece_size))).unwrap_or(u32::MAX)
        }
        _ => UNKNOWN_LENGTH_BOUND,
    }
}

/// The numbers of `claimed` that are pieces of a version of `count` pieces: a peer's `Have` and
/// `Want` are taken only that far.
fn existing(claimed: Vec<u32>, count: u32) -> impl Iterator<Item = u32> {
    claimed.into_iter().filter(move |p| *p < count)
}

/// Books a piece result: holdings on success; on failure, the parent's faults and isolation.
fn on_result(s: &Scheduling, version: &Version, peer_id: &str, r: pb::PieceResult) {
    let mut st = version.lock();
    let Some((parent, location)) = st
        .peers
        .get_mut(peer_id)
        .and_then(|p| Some((p.outstanding.remove(&r.piece)?, p.location.clone())))
    else {
        return;
    };
    assign::release(&mut st, &location, r.piece, &parent, s.cfg.limits);
    // The parent has a free slot again: for one waiting peer that lacks something it holds.
    if parent == SUPERNODE_ID {
        st.wake_starved(1);
    } else {
        st.wake_starved_if(1, |st, c| {
            st.peers
                .get(&parent)
                .is_some_and(|y| y.have.iter().any(|n| State::lacks(c, *n)))
        });
    }
    // On success the reporter holds one more piece: for as many waiting peers as it can serve.
    if r.success && st.hold(peer_id, r.piece) {
        st.wake_starved_if(s.cfg.limits.peer_cap, |_, c| State::lacks(c, r.piece));
    }
    if !r.success {
        let reason = FailureReason::try_from(r.reason).unwrap_or(FailureReason::Unspecified);
        s.metrics
            .piece_failures
            .with_label_values(&[reason.as_str_name()])
            .inc();
        tracing::warn!(piece = r.piece, parent = %parent, ?reason, detail = %r.detail, "peer reported a failed piece");
        let parent_fault = matches!(
            reason,
            FailureReason::DigestMismatch | FailureReason::ParentUnreachable
        );
        if parent != SUPERNODE_ID && reason != FailureReason::Local {
            if let Some(p) = st.peers.get_mut(peer_id) {
                p.failed_parents.insert(parent.clone());
            }
            let reporter = st
                .peers
                .get(peer_id)
                .map(|p| p.host_id.clone())
                .unwrap_or_default();
            // Out of the task for everyone only on the word of more than one host.
            let reporters = st.fault_reporters.entry(parent.clone()).or_default();
            if parent_fault && reporters.len() < 64 {
                reporters.insert(reporter.clone());
            }
            let witnessed = reporters.len() >= crate::isolation::MIN_REPORTERS;
            if parent_fault && witnessed && st.isolate(&parent) {
                s.metrics.isolations.with_label_values(&["task"]).inc();
                tracing::warn!(parent = %parent, "parent isolated for this task");
            }
            if parent_fault
                && let Some(host) = st.peers.get(&parent).map(|p| p.host_id.clone())
                && s.isolation.fault(&host, &reporter)
            {
                s.metrics.isolations.with_label_values(&["host"]).inc();
            }
        }
    }
}

/// Starved sessions to wake when `pieces` new holdings appear (each can serve `peer_cap` peers
/// at once), bounded.
fn wake_for(pieces: usize, limits: assign::Limits) -> usize {
    pieces.saturating_mul(limits.peer_cap).min(64)
}

/// Removes the peer from the version and frees what it had outstanding.
fn leave(s: &Scheduling, version: &Version, peer_id: &str) {
    let mut st = version.lock();
    if let Some(p) = st.remove_peer(peer_id) {
        let freed = p.outstanding.len();
        for (piece, parent) in p.outstanding {
            assign::release(&mut st, &p.location, piece, &parent, s.cfg.limits);
        }
        st.wake_starved(freed);
        s.metrics.peers.dec();
    }
    drop(st);
    tracing::info!("peer left");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_beyond_the_version_are_dropped() {
        assert_eq!(piece_count(10 << 20, 4 << 20), 3);
        assert_eq!(piece_count(0, 4 << 20), 0);
        assert_eq!(piece_count(-1, 4 << 20), 1 << 20);
        let huge: Vec<u32> = (0..5_000_000).collect();
        let kept: std::collections::HashSet<u32> = existing(huge, 3).collect();
        assert_eq!(kept.len(), 3);
        assert!(existing(vec![u32::MAX, 7, 2], 3).eq([2]));
    }
}

//! One peer's session on one task version: registration, piece metadata and assignments out,
//! results in. The peer is a parent for as long as the stream stays open.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
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
use crate::task::{Parent, PeerKey};
use crate::task::{PeerState, State, Status as SeedStatus, Version};

/// A session's outbound messages, boxed: the channel allocates its slots 32 at a time, once per
/// session, and a message is far larger than a pointer.
type Tx = mpsc::Sender<Box<SchedulerMessage>>;

fn out(m: scheduler_message::Msg) -> Box<SchedulerMessage> {
    Box::new(SchedulerMessage { msg: Some(m) })
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

/// Reads the registration and admits the peer; the rest of the session, to run until the peer
/// leaves, the task fails, or the supernode shuts down. `None` when the session ends at once
/// (the peer was told why). The caller runs the rest as a task of its own, so that a session
/// keeps the state of [`serve`] and nothing of its registration (thousands are open at once).
pub async fn start(
    s: Arc<Scheduling>,
    mut inbound: Streaming<PeerMessage>,
    tx: Tx,
    caller: Caller,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let first = tokio::time::timeout(Duration::from_secs(30), inbound.message()).await;
    let reg = match first {
        Ok(Ok(Some(PeerMessage {
            msg: Some(peer_message::Msg::Register(r)),
        }))) => r,
        _ => return refuse(&tx, invalid("the first message must be Register")).await,
    };
    let span = tracing::info_span!("session", task_id = %reg.task_id.get(..16).unwrap_or(""), peer = %reg.peer_id, remote = ?caller.remote);
    let joined = admit(&s, &mut inbound, &tx, caller, reg)
        .instrument(span.clone())
        .await?;
    Some(serve(s, inbound, tx, joined).instrument(span))
}

/// What a session keeps once its peer has joined a version.
struct Joined {
    version: Arc<Version>,
    key: PeerKey,
    changes: tokio::sync::watch::Receiver<u64>,
    wake: Arc<tokio::sync::Notify>,
    version_id: String,
    peer_ip: Option<IpAddr>,
    ticket_expires: u64,
    pieces: u32,
    /// Where the supernode's own piece server is, as this peer reaches it.
    supernode_base: String,
}

/// Checks the registration, waits for the version's origin answer, sends the task's info and
/// adds the peer with what it holds; `None` when the session ends instead (the peer was told
/// why).
async fn admit(
    s: &Arc<Scheduling>,
    inbound: &mut Streaming<PeerMessage>,
    tx: &Tx,
    caller: Caller,
    reg: pb::Register,
) -> Option<Joined> {
    let remote = caller.remote;
    let upload = match upload_addr(&reg.upload_addr, remote) {
        Ok(a) => a,
        Err(e) => return refuse(tx, e).await,
    };
    if reg.peer_id.is_empty() || reg.host_id.is_empty() {
        return refuse(tx, invalid("peer_id and host_id are required")).await;
    }
    let location = match Location::parse(&reg.location) {
        Ok(l) => l,
        Err(e) => return refuse(tx, invalid(format!("location: {e}"))).await,
    };
    let version = match register::join(s, &reg).await {
        Ok(v) => v,
        Err(e) => return refuse(tx, e).await,
    };
    let mut changes = version.subscribe();
    let info = match origin_answer(s, &version, &mut changes).await {
        Ok(i) => i,
        Err(Some(e)) => return refuse(tx, e).await,
        Err(None) => return None,
    };
    let peer_ip = remote.map(|r| r.ip());
    let (ticket, ticket_expires) = s.tickets.pieces(&info.version_id, peer_ip);
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
    tx.send(out(scheduler_message::Msg::TaskInfo(task_info)))
        .await
        .ok()?;
    let have = match tokio::time::timeout(Duration::from_secs(60), inbound.message()).await {
        Ok(Ok(Some(PeerMessage {
            msg: Some(peer_message::Msg::Have(h)),
        }))) => h.pieces,
        _ => return refuse(tx, invalid("expected Have after TaskInfo")).await,
    };
    let pieces = piece_count(info.content_length, info.piece_size);
    let mut me = PeerState::new(
        reg.peer_id.clone(),
        caller.host(&reg.host_id),
        s.cfg.base_url(upload),
        existing(have, pieces).collect(),
    );
    me.only_wanted = reg.only_wanted;
    me.location = location;
    me.verified_only = version.expected_digest.is_some()
        && crate::task::url_key(&reg.url) != crate::task::url_key(&version.url);
    let wake = me.wake.clone();
    let key = {
        let mut st = version.lock();
        let held: Vec<u32> = me.have.iter().collect();
        let key = st.add_peer(me);
        // What it holds can serve peers waiting for a parent.
        st.wake_starved_if(wake_for(held.len(), s.cfg.limits), |_, c| {
            held.iter().any(|n| State::lacks(c, *n))
        });
        key
    };
    s.metrics.peers.inc();
    tracing::info!(version = %&info.version_id[..16], location = %reg.location, "peer joined");
    let sn_ip = s
        .cfg
        .advertise_ip
        .or(caller.local_ip)
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    Some(Joined {
        version,
        key,
        changes,
        wake,
        version_id: info.version_id.clone(),
        peer_ip,
        ticket_expires,
        pieces,
        supernode_base: s.cfg.base_url(SocketAddr::new(sn_ip, s.cfg.http_port)),
    })
}

/// Tells the peer why its session ends.
async fn refuse<T>(tx: &Tx, e: TaskError) -> Option<T> {
    send_error(tx, e).await;
    None
}

/// Where others reach the peer: its claimed port, at the IP it connected from (a claimed IP is
/// not taken on trust).
fn upload_addr(claimed: &str, remote: Option<SocketAddr>) -> Result<SocketAddr, TaskError> {
    let a: SocketAddr = claimed
        .parse()
        .map_err(|_| invalid(format!("bad upload_addr {claimed:?}")))?;
    Ok(match remote {
        Some(r) if r.ip() != a.ip() => {
            tracing::info!(claimed = %a, seen = %r.ip(), "upload address taken from the connection");
            SocketAddr::new(r.ip(), a.port())
        }
        _ => a,
    })
}

/// Waits for the origin's answer about the version: its info, or the failure to tell the peer
/// (`Err(None)`: the supernode is shutting down).
async fn origin_answer(
    s: &Scheduling,
    version: &Version,
    changes: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<crate::task::Info, Option<TaskError>> {
    loop {
        {
            let st = version.lock();
            if let SeedStatus::Failed(e) = &st.status {
                return Err(Some(e.clone()));
            }
            if let Some(i) = &st.info {
                return Ok(i.clone());
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return Err(None) },
            _ = s.shutdown.wait() => return Err(None),
        }
    }
}

/// The joined peer's loop: book what arrives, send what is decided, renew its ticket, until it
/// leaves.
async fn serve(s: Arc<Scheduling>, mut inbound: Streaming<PeerMessage>, tx: Tx, j: Joined) {
    let Joined {
        version,
        key,
        mut changes,
        wake,
        version_id,
        peer_ip,
        mut ticket_expires,
        pieces,
        supernode_base,
    } = j;
    let mut sent = 0usize;
    let mut done_sent = false;
    let mut results = Vec::new();
    loop {
        let started = Instant::now();
        let Step { msgs, end, starved } = step(
            &s,
            &version,
            (key, std::mem::take(&mut results)),
            &supernode_base,
            &mut sent,
            &mut done_sent,
        );
        s.metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        for m in msgs {
            if tx.send(out(m)).await.is_err() {
                return leave(&s, &version, key);
            }
        }
        if end {
            break;
        }
        // Renew the ticket at half its life.
        if fetcher::ticket::now() + s.tickets.ttl.as_secs() / 2 >= ticket_expires {
            let (ticket, expires) = s.tickets.pieces(&version_id, peer_ip);
            ticket_expires = expires;
            let m = scheduler_message::Msg::Ticket(pb::Ticket { ticket });
            if tx.send(out(m)).await.is_err() {
                return leave(&s, &version, key);
            }
        }
        let idle = if starved {
            starved_tick()
        } else {
            // Often enough for the ticket renewal above.
            (s.tickets.ttl / 4).min(Duration::from_secs(15))
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            () = wake.notified() => {}
            m = inbound.message() => {
                if !take(&s, &version, (key, pieces), m, &mut results) {
                    break;
                }
                // What else has arrived is booked in the same step (one lock, one decision).
                while results.len() < BATCH {
                    let Some(m) = inbound.message().now_or_never() else { break };
                    if !take(&s, &version, (key, pieces), m, &mut results) {
                        return leave(&s, &version, key);
                    }
                }
            }
            _ = s.shutdown.wait() => break,
            _ = tokio::time::sleep(idle) => {}
        }
    }
    leave(&s, &version, key);
}

/// How long a waiting session sleeps before it looks again without a wake-up (isolation
/// cool-downs end without one, and `State::wake_starved_if` looks at a bounded part of the
/// line): about a second, spread at random so that thousands of waiting sessions do not look
/// all at once (each look is a full decision). Measured at 10,000 simulated peers: a 5 s look
/// saved little CPU in a slow swarm (6.4k against 6.1k results per CPU second) and left parents
/// idle in a busy one (18.0k against 21.2k results/s).
fn starved_tick() -> Duration {
    use rand::Rng;
    Duration::from_millis(rand::rng().random_range(800..=1_200))
}

/// Piece results booked in one step, at most (more wait for the next).
const BATCH: usize = 64;

/// Takes one message of peer `key` (of a version of `pieces` pieces): a piece result into
/// `results` (booked by the next [`step`]), holdings and wishes at once. Whether the session
/// goes on.
fn take(
    s: &Scheduling,
    version: &Version,
    (key, pieces): (PeerKey, u32),
    m: Result<Option<PeerMessage>, Status>,
    results: &mut Vec<pb::PieceResult>,
) -> bool {
    let msg = match m {
        Ok(Some(PeerMessage { msg: Some(msg) })) => msg,
        Ok(Some(_)) => return true,
        Ok(None) | Err(_) => return false,
    };
    match msg {
        peer_message::Msg::PieceResult(r) => results.push(r),
        peer_message::Msg::Have(h) => {
            let mut st = version.lock();
            let new: Vec<u32> = existing(h.pieces, pieces)
                .filter(|n| st.hold(key, *n))
                .collect();
            st.wake_starved_if(wake_for(new.len(), s.cfg.limits), |_, c| {
                new.iter().any(|n| State::lacks(c, *n))
            });
        }
        peer_message::Msg::Want(w) => {
            if let Some(p) = version.lock().peers.get_mut(&key) {
                p.wanted = existing(w.pieces, pieces).collect();
                p.only_wanted = w.only;
            }
        }
        _ => {}
    }
    true
}

/// What one scheduling step decided.
struct Step {
    /// To send now.
    msgs: Vec<scheduler_message::Msg>,
    /// The session is over (the task failed).
    end: bool,
    /// The peer waits for a change (see `assign::Next::starved`).
    starved: bool,
}

/// Books peer `key`'s piece `results`, then computes what to send now: new piece metadata,
/// completion, failure, new assignments.
fn step(
    s: &Scheduling,
    version: &Version,
    (key, results): (PeerKey, Vec<pb::PieceResult>),
    supernode_base: &str,
    sent: &mut usize,
    done_sent: &mut bool,
) -> Step {
    let mut msgs = Vec::new();
    let mut st = version.lock();
    for r in results {
        on_result(s, &mut st, key, r);
    }
    st.last_access = Instant::now();
    let complete = matches!(st.status, SeedStatus::Complete { .. });
    let failed = matches!(st.status, SeedStatus::Failed(_));
    if !complete && !failed && st.peers.get(&key).is_some_and(|p| p.verified_only) {
        return Step {
            msgs,
            end: false,
            starved: false,
        };
    }
    for p in &st.pieces[(*sent).min(st.pieces.len())..] {
        msgs.push(scheduler_message::Msg::PieceInfo(p.to_proto()));
    }
    *sent = st.pieces.len();
    match &st.status {
        SeedStatus::Failed(e) => {
            msgs.push(scheduler_message::Msg::Error(e.clone()));
            return Step {
                msgs,
                end: true,
                starved: false,
            };
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
    let next = assign::next(&mut st, key, s.cfg.limits, &usable);
    if next.starved {
        st.starve(key);
    }
    let here = st
        .peers
        .get(&key)
        .map(|p| p.location.clone())
        .unwrap_or_default();
    for (piece, parent) in next.assigned {
        let p = match parent {
            Parent::Peer(k) => st.peers.get(&k),
            Parent::Supernode => None,
        };
        let (id, base_url, is_supernode) = match (parent, p) {
            (Parent::Supernode, _) => (SUPERNODE_ID.to_owned(), supernode_base.to_owned(), true),
            (Parent::Peer(_), p) => p
                .map(|p| (p.id.clone(), p.base_url.clone(), false))
                .unwrap_or_default(),
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
                id,
                base_url,
                is_supernode,
            }),
        }));
    }
    Step {
        msgs,
        end: false,
        starved: next.starved,
    }
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
fn on_result(s: &Scheduling, st: &mut State, key: PeerKey, r: pb::PieceResult) {
    let Some((parent, location)) = st
        .peers
        .get_mut(&key)
        .and_then(|p| Some((p.outstanding.remove(&r.piece)?, p.location.clone())))
    else {
        return;
    };
    assign::release(st, &location, r.piece, parent, s.cfg.limits);
    // The parent has a free slot again: for one waiting peer that lacks something it holds.
    match parent {
        Parent::Supernode => st.wake_starved(1),
        Parent::Peer(k) => st.wake_starved_if(1, |st, c| {
            st.peers
                .get(&k)
                .is_some_and(|y| y.have.iter().any(|n| State::lacks(c, n)))
        }),
    }
    // On success the reporter holds one more piece: for as many waiting peers as it can serve.
    if r.success && st.hold(key, r.piece) {
        st.wake_starved_if(s.cfg.limits.peer_cap, |_, c| State::lacks(c, r.piece));
    }
    if r.success {
        return;
    }
    let reason = FailureReason::try_from(r.reason).unwrap_or(FailureReason::Unspecified);
    s.metrics
        .piece_failures
        .with_label_values(&[reason.as_str_name()])
        .inc();
    // The parent as booked, not as the report names it.
    let parent_id = match parent {
        Parent::Supernode => SUPERNODE_ID,
        Parent::Peer(k) => st.peers.get(&k).map_or("(left)", |p| p.id.as_str()),
    };
    tracing::warn!(piece = r.piece, parent = %parent_id, ?reason, detail = %r.detail, "peer reported a failed piece");
    if let Parent::Peer(pk) = parent
        && reason != FailureReason::Local
    {
        let parent_fault = matches!(
            reason,
            FailureReason::DigestMismatch | FailureReason::ParentUnreachable
        );
        blame(s, st, (key, pk), parent_fault);
    }
}

/// Books that parent `pk` failed peer `key`: never again for that peer; and, for a fault of the
/// parent's, out of the task for everyone on the word of more than one host, and towards its
/// host's isolation. A parent that has left is not blamed further.
fn blame(s: &Scheduling, st: &mut State, (key, pk): (PeerKey, PeerKey), parent_fault: bool) {
    let Some(reporter) = st.peers.get_mut(&key).map(|p| {
        p.failed_parents.insert(pk);
        p.host_id.clone()
    }) else {
        return;
    };
    let Some((parent_id, parent_host)) =
        st.peers.get(&pk).map(|p| (p.id.clone(), p.host_id.clone()))
    else {
        return;
    };
    if !parent_fault {
        return;
    }
    let reporters = st.fault_reporters.entry(parent_id.clone()).or_default();
    if reporters.len() < 64 {
        reporters.insert(reporter.clone());
    }
    let witnessed = reporters.len() >= crate::isolation::MIN_REPORTERS;
    if witnessed && st.isolate(pk) {
        s.metrics.isolations.with_label_values(&["task"]).inc();
        tracing::warn!(parent = %parent_id, "parent isolated for this task");
    }
    if s.isolation.fault(&parent_host, &reporter) {
        s.metrics.isolations.with_label_values(&["host"]).inc();
    }
}

/// Starved sessions to wake when `pieces` new holdings appear (each can serve `peer_cap` peers
/// at once), bounded.
fn wake_for(pieces: usize, limits: assign::Limits) -> usize {
    pieces.saturating_mul(limits.peer_cap).min(64)
}

/// Removes the peer from the version and frees what it had outstanding.
fn leave(s: &Scheduling, version: &Version, key: PeerKey) {
    let mut st = version.lock();
    if let Some(p) = st.remove_peer(key) {
        let freed = p.outstanding.len();
        for (piece, parent) in p.outstanding {
            assign::release(&mut st, &p.location, piece, parent, s.cfg.limits);
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

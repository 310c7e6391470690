//! Supernodes that take over each other's tasks. Peers pick a task's supernode by rendezvous
//! hashing over the list they are given and turn to the next one when it fails. So each owner
//! sends what its seed learns of a version (its description, each piece's metadata as it is cut,
//! the whole digest) to the `replicas` supernodes after it in the task's order, batched. The one
//! that takes over rebuilds the version from the pieces its peers hold, each checked against that
//! metadata (`crate::rebuild`), and only what no peer holds comes from the origin again.
//!
//! Trust: metadata decides which bytes peers accept, so it is taken only from a supernode named
//! in `cluster.supernodes`: over cluster TLS the caller's certificate must be valid for one of
//! their hosts (certificates carry hosts' names and IPs, no role); in plaintext its address must
//! be one of theirs.

mod records;
mod service;

pub use records::{Record, Records};
pub use service::ClusterService;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fetcher::tls::ClusterTls;
use proto::scheduler::Replica;
use proto::scheduler::cluster_client::ClusterClient;
use tonic::transport::Channel;

use crate::config::ClusterConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::task::{Status, Version};

/// How often an owner sends what its seeds learned since the last batch.
const BATCH_EVERY: Duration = Duration::from_millis(200);
/// Pieces per message at most (a message stays far below gRPC's 4 MiB limit).
const BATCH_PIECES: usize = 1024;
/// Failed sends to one successor after the version is complete before giving up on it.
const GIVE_UP_AFTER: u32 = 25;

/// This supernode's place in the cluster.
pub struct Cluster {
    me: String,
    members: Vec<String>,
    replicas: usize,
    tls: Option<ClusterTls>,
    /// Connections to the other supernodes, by address.
    clients: Mutex<HashMap<String, Channel>>,
    /// What other supernodes sent.
    pub records: Mutex<Records>,
    /// How long a takeover waits for peers to announce a piece before fetching it from the origin.
    pub rebuild_wait: Duration,
    metrics: Metrics,
}

fn config(detail: impl Into<String>) -> Error {
    Error::Config {
        key: "cluster",
        detail: detail.into(),
    }
}

impl Cluster {
    /// The cluster `cfg` describes, or `None` without one (a lone supernode).
    pub fn new(
        cfg: &ClusterConfig,
        tls: Option<ClusterTls>,
        metrics: Metrics,
    ) -> Result<Option<Arc<Self>>> {
        if cfg.supernodes.is_empty() {
            return Ok(None);
        }
        for m in &cfg.supernodes {
            let port = m.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(_))) || fetcher::tls::host_of(m).is_empty() {
                return Err(config(format!("supernodes: {m:?} is not host:port")));
            }
        }
        let me = cfg
            .address
            .clone()
            .ok_or_else(|| config("address: required with supernodes (this one's entry)"))?;
        if !cfg.supernodes.contains(&me) {
            return Err(config(format!("address {me:?} is not in supernodes")));
        }
        let rebuild_wait = crate::config::parse(
            "cluster.rebuild_wait",
            &cfg.rebuild_wait,
            fetcher::cli::parse_duration,
        )?;
        Ok(Some(Arc::new(Self {
            me,
            replicas: cfg.replicas.min(cfg.supernodes.len() - 1),
            members: cfg.supernodes.clone(),
            tls,
            clients: Mutex::default(),
            records: Mutex::default(),
            rebuild_wait,
            metrics,
        })))
    }

    /// The supernodes that receive `task_id`'s metadata: the ones after this in its order.
    pub fn successors(&self, task_id: &str) -> Vec<String> {
        successors(task_id, &self.members, &self.me, self.replicas)
    }

    /// Whether another supernode replicated `task_id` here.
    pub fn knows(&self, task_id: &str) -> bool {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(task_id)
            .is_some()
    }

    /// The replicated version of `task_id`, taken out (its taker becomes the owner).
    pub fn take(&self, task_id: &str) -> Option<Record> {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let rec = r.get(task_id);
        r.remove(task_id);
        rec
    }

    /// The connection to supernode `addr`, dialled if there is none.
    async fn channel(&self, addr: &str) -> std::result::Result<Channel, String> {
        if let Some(c) = self.lock_clients().get(addr) {
            return Ok(c.clone());
        }
        let c = fetcher::download::supernode_channel(addr, self.tls.as_ref()).await?;
        self.lock_clients().insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    async fn client(&self, addr: &str) -> std::result::Result<ClusterClient<Channel>, String> {
        Ok(ClusterClient::new(self.channel(addr).await?))
    }

    /// The supernode agents turn to first for `task_id` (its rendezvous owner), when that is
    /// another one.
    pub fn owner_elsewhere(&self, task_id: &str) -> Option<String> {
        let order = fetcher::rendezvous::order(task_id, &self.members);
        order
            .first()
            .filter(|o| **o != self.me)
            .map(|o| (*o).to_string())
    }

    /// Has supernode `owner` seed a registry layer and build its index, as an agent's
    /// `Scheduler.LayerIndex` does (the request's credentials proven to the registry there).
    pub async fn seed_layer_at(
        &self,
        owner: &str,
        req: proto::scheduler::LayerIndexRequest,
    ) -> std::result::Result<(), String> {
        let mut c =
            proto::scheduler::scheduler_client::SchedulerClient::new(self.channel(owner).await?);
        c.layer_index(req)
            .await
            .map(|_| ())
            .map_err(|s| format!("{owner}: {}", s.message()))
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `m` to `addr`; the pieces it now holds.
    async fn send(&self, addr: &str, m: Replica) -> std::result::Result<u32, String> {
        let mut c = self.client(addr).await?;
        match c.replicate(m).await {
            Ok(ack) => Ok(ack.into_inner().pieces),
            Err(s) => {
                self.lock_clients().remove(addr);
                Err(s.message().to_owned())
            }
        }
    }
}

/// Pure: the `replicas` members after `me` in `task_id`'s rendezvous order, wrapping around.
pub fn successors(task_id: &str, members: &[String], me: &str, replicas: usize) -> Vec<String> {
    let order = fetcher::rendezvous::order(task_id, members);
    let Some(at) = order.iter().position(|m| *m == me) else {
        return Vec::new();
    };
    (1..order.len())
        .map(|i| order[(at + i) % order.len()].to_owned())
        .take(replicas)
        .collect()
}

/// One successor's progress.
struct Target {
    addr: String,
    /// Pieces it acknowledged.
    acked: u32,
    /// It acknowledged the whole version with its digest.
    complete: bool,
    failures: u32,
}

/// What the owner sends next to a successor holding `acked` pieces, if anything.
fn batch(v: &Version, acked: u32, digest_sent: bool) -> Option<(Replica, bool)> {
    let st = v.lock();
    let info = st.info.as_ref()?;
    if info.content_length < 0 {
        return None;
    }
    let from = (acked as usize).min(st.pieces.len());
    let to = (from + BATCH_PIECES).min(st.pieces.len());
    let digest = match &st.status {
        Status::Complete { digest, .. } if to == st.pieces.len() => digest.clone(),
        _ => String::new(),
    };
    if from == to && (digest.is_empty() || digest_sent) {
        return None;
    }
    let last = !digest.is_empty();
    let m = Replica {
        task_id: v.task_id.clone(),
        version_id: info.version_id.clone(),
        content_length: info.content_length,
        piece_size: info.piece_size,
        etag: info.etag.clone(),
        last_modified: info.last_modified.clone(),
        first_piece: from as u32,
        pieces: st.pieces[from..to].iter().map(|p| p.to_proto()).collect(),
        digest,
    };
    Some((m, last))
}

/// Sends the version's metadata to the task's successors as the seed learns it, until every
/// successor has all of it (or stopped answering), the seed failed, or shutdown.
pub async fn push(cluster: Arc<Cluster>, v: Arc<Version>, shutdown: fetcher::Shutdown) {
    let mut targets: Vec<Target> = cluster
        .successors(&v.task_id)
        .into_iter()
        .map(|addr| Target {
            addr,
            acked: 0,
            complete: false,
            failures: 0,
        })
        .collect();
    let mut tick = tokio::time::interval(BATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !targets.is_empty() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let (failed, complete) = {
            let st = v.lock();
            (
                matches!(st.status, Status::Failed(_)),
                matches!(st.status, Status::Complete { .. }),
            )
        };
        if failed {
            return;
        }
        for t in &mut targets {
            while let Some((m, last)) = batch(&v, t.acked, t.complete) {
                match cluster.send(&t.addr, m).await {
                    Ok(n) => {
                        cluster
                            .metrics
                            .replica_messages
                            .with_label_values(&["sent"])
                            .inc();
                        // An answer of fewer pieces than sent is a successor that restarted: it
                        // gets the rest from there on the next round.
                        let progressed = n > t.acked;
                        t.complete = last && n >= t.acked;
                        t.acked = n;
                        t.failures = 0;
                        if !progressed {
                            break;
                        }
                    }
                    Err(e) => {
                        cluster
                            .metrics
                            .replica_messages
                            .with_label_values(&["failed"])
                            .inc();
                        if t.failures == 0 {
                            tracing::warn!(successor = %t.addr, task_id = %&v.task_id[..16], error = %e, "cannot replicate task metadata");
                        }
                        t.failures += 1;
                        break;
                    }
                }
            }
        }
        let done = |t: &Target| t.complete || (complete && t.failures >= GIVE_UP_AFTER);
        targets.retain(|t| !done(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successors_follow_the_rendezvous_order_and_wrap() {
        let members: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}:8002")).collect();
        for t in 0..50 {
            let task = format!("{t:064x}");
            let order = fetcher::rendezvous::order(&task, &members);
            let s = successors(&task, &members, order[0], 1);
            assert_eq!(s, vec![order[1].to_owned()], "the one peers turn to next");
            let s = successors(&task, &members, order[3], 2);
            assert_eq!(s, vec![order[0].to_owned(), order[1].to_owned()]);
        }
        assert!(successors("t", &members, "10.0.0.9:8002", 1).is_empty());
    }
}

//! A download session with one supernode: register, announce held pieces, fetch each assigned piece
//! from its parent, report every result. After completion the stream can stay open so that the
//! supernode keeps this peer as a parent (seeding).

use std::sync::Arc;
use std::time::Duration;

use proto::scheduler::{
    self as pb, ErrorKind, PeerMessage, SchedulerMessage, peer_message,
    scheduler_client::SchedulerClient, scheduler_message,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::piece_fetch::{self, PieceOutcome};
use super::{Destination, Download, DownloadRequest, SessionError, Wants};
use crate::error::Error;
use crate::peer::Peer;
use crate::piece::PieceMeta;
use crate::piece_store::{TaskMeta, TaskStore};

/// An open scheduler stream after the download completed.
pub(crate) struct Session {
    tx: mpsc::Sender<PeerMessage>,
    inbound: tonic::Streaming<SchedulerMessage>,
}

/// How long to wait for the supernode's first answer (it may be waiting on a slow origin).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(120);

/// Opens a scheduler client to `addr` (`host:port`) on a connection of its own, over cluster
/// TLS when `tls` is given (sessions of a peer share theirs: `channels::Channels`).
pub async fn connect(
    addr: &str,
    tls: Option<&crate::tls::ClusterTls>,
) -> Result<SchedulerClient<tonic::transport::Channel>, String> {
    Ok(SchedulerClient::new(channel(addr, tls).await?))
}

/// Opens a gRPC channel to the supernode at `addr` (`host:port`), over cluster TLS when `tls` is
/// given (its certificate must name `host`), with keepalives: a supernode that vanishes without
/// a reset is noticed within 25 s.
pub async fn channel(
    addr: &str,
    tls: Option<&crate::tls::ClusterTls>,
) -> Result<tonic::transport::Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("bad supernode address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(t) = tls {
        endpoint = endpoint
            .tls_config(t.client(addr))
            .map_err(|e| format!("TLS towards {addr}: {}", crate::source::error_chain(&e)))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| crate::source::error_chain(&e))
}

fn send_err<T>(_: T) -> SessionError {
    SessionError::Retry("scheduler stream closed".into())
}

impl Download<'_> {
    pub(crate) async fn with_supernode(&mut self, addr: &str) -> Result<Session, SessionError> {
        let inner = &self.peer.inner;
        let mut client = inner
            .channels
            .client(addr, inner.cfg.tls.as_ref())
            .await
            .map_err(SessionError::Retry)?;
        let (tx, rx) = mpsc::channel::<PeerMessage>(256);
        // A lazy reader's wishes (which pieces first, and whether anything else).
        let mut wants = match &self.req.output {
            Destination::Store { wants, .. } => Some(wants.clone()),
            _ => None,
        };
        let peer_id = format!(
            "{}-{}-{:08x}",
            self.peer.inner.host_id,
            std::process::id(),
            rand::random::<u32>()
        );
        let register = pb::Register {
            url: self.req.url.clone(),
            task_id: self.task_id.clone(),
            tag: self.req.tag.clone(),
            filter: self.req.filter.clone(),
            headers: self
                .req
                .headers
                .iter()
                .map(|(n, v)| pb::Header {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            digest: self
                .req
                .digest
                .clone()
                .map(|d| format!("sha256:{d}"))
                .unwrap_or_default(),
            peer_id,
            host_id: self.peer.inner.host_id.clone(),
            upload_addr: self.peer.inner.upload_addr.to_string(),
            content_key: self.req.content_key.clone().unwrap_or_default(),
            only_wanted: wants.as_ref().is_some_and(|w| w.borrow().only),
            location: self.peer.inner.cfg.location.to_string(),
            seed_only: self.req.seed_only,
        };
        tx.send(msg(peer_message::Msg::Register(register)))
            .await
            .map_err(send_err)?;
        let mut inbound = client
            .download(ReceiverStream::new(rx))
            .await
            .map_err(|s| SessionError::Retry(format!("register: {}", s.message())))?
            .into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| SessionError::Retry("no answer to registration".into()))?
            .map_err(|s| SessionError::Retry(s.message().to_owned()))?;
        let info = match first.and_then(|m| m.msg) {
            Some(scheduler_message::Msg::TaskInfo(info)) => info,
            Some(scheduler_message::Msg::Error(e)) => return Err(self.task_error(addr, e)),
            other => {
                return Err(SessionError::Retry(format!(
                    "unexpected first message {other:?}"
                )));
            }
        };
        let meta = TaskMeta {
            version_id: info.version_id.clone(),
            task_id: self.task_id.clone(),
            url: self.req.url.clone(),
            content_length: info.content_length,
            piece_size: info.piece_size,
            etag: info.etag.clone(),
            last_modified: info.last_modified.clone(),
            digest: None,
        };
        let Some(key) = crate::ticket::PublicKey::from_bytes(&info.ticket_key) else {
            return Err(SessionError::Retry(format!(
                "supernode {addr} sent no ticket key: it is older than this peer"
            )));
        };
        let store = self.open_version(meta).await.map_err(SessionError::Fatal)?;
        self.peer.inner.open.trust(&info.version_id, key);
        let (ticket_tx, ticket) = watch::channel(info.ticket.clone());
        tracing::info!(supernode = addr, version = %&info.version_id[..16], length = info.content_length, held = store.held().0, "registered");
        tx.send(msg(peer_message::Msg::Have(pb::Have {
            pieces: store.have(),
        })))
        .await
        .map_err(send_err)?;
        if let Some(w) = &mut wants {
            let want = want_msg(&w.borrow_and_update());
            tx.send(want).await.map_err(send_err)?;
        }

        let mut inflight: JoinSet<PieceOutcome> = JoinSet::new();
        loop {
            if self.is_complete() && inflight.is_empty() {
                return Ok(Session { tx, inbound });
            }
            tokio::select! {
                m = inbound.message() => {
                    let m = match m {
                        Ok(Some(m)) => m,
                        Ok(None) => return Err(SessionError::Retry("supernode closed the stream".into())),
                        Err(s) => return Err(SessionError::Retry(format!("stream broke: {}", s.message()))),
                    };
                    match m.msg {
                        Some(scheduler_message::Msg::PieceInfo(p)) => self.learn_piece(&store, &p),
                        Some(scheduler_message::Msg::Assign(a)) => self.start_piece(&store, &info.version_id, &ticket, a, &mut inflight),
                        Some(scheduler_message::Msg::Ticket(t)) => { ticket_tx.send_replace(t.ticket); }
                        Some(scheduler_message::Msg::Done(done)) => {
                            self.piece_count = Some(done.piece_count);
                            if !done.digest.is_empty() {
                                self.whole_digest = Some(done.digest);
                            }
                            if store.meta().content_length < 0 {
                                store.set_complete(done.content_length, self.whole_digest.clone()).map_err(SessionError::Fatal)?;
                            }
                        }
                        Some(scheduler_message::Msg::Error(e)) => return Err(self.task_error(addr, e)),
                        Some(scheduler_message::Msg::TaskInfo(_)) | None => {}
                    }
                }
                changed = wants_changed(&mut wants) => {
                    match changed {
                        Some(w) => if tx.send(want_msg(&w)).await.is_err() {
                            return Err(self.last_word(addr, &mut inbound).await);
                        },
                        None => wants = None,
                    }
                }
                Some(joined) = inflight.join_next() => {
                    let outcome = joined.map_err(|e| SessionError::Retry(format!("piece task failed: {e}")))?;
                    let result = self.record(outcome);
                    if tx.send(msg(peer_message::Msg::PieceResult(result))).await.is_err() {
                        return Err(self.last_word(addr, &mut inbound).await);
                    }
                }
            }
        }
    }

    fn learn_piece(&mut self, store: &TaskStore, p: &pb::PieceInfo) {
        let meta = PieceMeta::from_proto(p);
        if let Some(held) = store.piece(meta.num)
            && held != meta
        {
            tracing::warn!(
                piece = meta.num,
                "held piece disagrees with the supernode; dropping it"
            );
            store.forget(meta.num);
        }
        self.known.insert(meta.num, meta);
    }

    fn start_piece(
        &mut self,
        store: &Arc<TaskStore>,
        version: &str,
        ticket: &watch::Receiver<String>,
        a: pb::Assign,
        inflight: &mut JoinSet<PieceOutcome>,
    ) {
        let (Some(parent), Some(meta)) = (a.parent, self.known.get(&a.piece).cloned()) else {
            tracing::warn!(
                piece = a.piece,
                "assignment without parent or piece metadata; ignoring"
            );
            return;
        };
        let job = piece_fetch::Job {
            version: version.to_owned(),
            ticket: ticket.borrow().clone(),
            meta,
            parent,
            http: self.peer.inner.http.clone(),
            store: store.clone(),
            host_limit: self.peer.inner.download_limit.clone(),
            task_limit: self.task_limit.clone(),
            output: self.output.as_ref().and_then(|o| o.writer()),
        };
        inflight.spawn(piece_fetch::fetch(job));
    }

    /// Updates progress and metrics from a piece outcome; returns the report for the supernode.
    fn record(&mut self, o: PieceOutcome) -> pb::PieceResult {
        let m = &self.peer.inner.metrics;
        match &o.result {
            Ok(bytes) => {
                tracing::debug!(piece = o.piece, parent = %o.parent_id, bytes, cost_ms = o.cost.as_millis() as u64, "piece done");
                let from = if o.from_supernode {
                    "supernode"
                } else {
                    "peer"
                };
                m.download_bytes.with_label_values(&[from]).inc_by(*bytes);
                if o.from_supernode {
                    self.progress.from_supernode += bytes;
                } else {
                    self.progress.from_peers += bytes;
                }
                self.progress.completed += bytes;
                self.progress_tx.send_replace(self.progress.clone());
                self.advance();
            }
            Err((reason, detail)) => {
                if *reason == pb::FailureReason::DigestMismatch {
                    m.verify_failures.inc();
                    self.verify_failures += 1;
                }
                tracing::warn!(piece = o.piece, parent = %o.parent_id, ?reason, %detail, "piece download failed");
            }
        }
        pb::PieceResult {
            piece: o.piece,
            parent_id: o.parent_id,
            success: o.result.is_ok(),
            bytes: *o.result.as_ref().unwrap_or(&0),
            cost_ms: o.cost.as_millis() as u64,
            reason: o.result.as_ref().err().map(|(r, _)| *r as i32).unwrap_or(0),
            detail: o.result.err().map(|(_, d)| d).unwrap_or_default(),
        }
    }

    /// Why the session ended when the supernode stopped taking messages: it closes its side after
    /// its last word (a failed task's error, sent before the close), which may still wait unread.
    async fn last_word(
        &self,
        addr: &str,
        inbound: &mut tonic::Streaming<SchedulerMessage>,
    ) -> SessionError {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(Some(m))) = tokio::time::timeout_at(deadline, inbound.message()).await {
            if let Some(scheduler_message::Msg::Error(e)) = m.msg {
                return self.task_error(addr, e);
            }
        }
        send_err(())
    }

    fn task_error(&self, supernode: &str, e: pb::TaskError) -> SessionError {
        let url = self.req.url.clone();
        let kind = ErrorKind::try_from(e.kind).unwrap_or(ErrorKind::Unspecified);
        match kind {
            ErrorKind::OriginStatus => SessionError::Fatal(Error::OriginStatus {
                url,
                status: e.http_status as u16,
            }),
            ErrorKind::OriginUnreachable => SessionError::Fatal(Error::OriginUnreachable {
                url,
                detail: e.message,
            }),
            ErrorKind::OriginBody => SessionError::Fatal(Error::OriginBody {
                url,
                detail: e.message,
            }),
            ErrorKind::DigestMismatch | ErrorKind::Invalid => {
                SessionError::Fatal(Error::Supernode {
                    supernode: supernode.to_owned(),
                    message: e.message,
                })
            }
            ErrorKind::Internal | ErrorKind::Unspecified => {
                SessionError::Retry(format!("supernode error: {}", e.message))
            }
        }
    }
}

fn msg(m: peer_message::Msg) -> PeerMessage {
    PeerMessage { msg: Some(m) }
}

fn want_msg(w: &Wants) -> PeerMessage {
    msg(peer_message::Msg::Want(pb::Want {
        pieces: w.pieces.iter().copied().collect(),
        only: w.only,
    }))
}

/// The readers' new wishes once they change; `None` when nobody can change them any more.
async fn wants_changed(wants: &mut Option<watch::Receiver<Wants>>) -> Option<Wants> {
    match wants {
        Some(w) => match w.changed().await {
            Ok(()) => Some(w.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Longest a seeding peer waits before registering with the next supernode (spread at random,
/// so that a supernode's peers do not all arrive at its successor in the same instant).
const RESEED_SPREAD_MS: u64 = 1000;

impl Peer {
    /// Keeps the scheduler stream (and the task's pieces) available to other peers until the
    /// peer shuts down. When the supernode goes away the peer registers the task with the next
    /// one (`req` again, into the store it holds): a supernode taking the task over rebuilds it
    /// from what peers like this one hold, and schedules them as parents.
    pub(crate) fn keep_seeding(
        &self,
        session: Session,
        store: Arc<TaskStore>,
        req: DownloadRequest,
    ) {
        let peer = self.clone();
        tokio::spawn(async move {
            let Session { tx, mut inbound } = session;
            let shutdown = peer.inner.shutdown.clone();
            loop {
                tokio::select! {
                    _ = shutdown.wait() => break,
                    m = inbound.message() => if !matches!(m, Ok(Some(_))) { break },
                }
            }
            drop(tx);
            let version = store.meta().version_id;
            // The store's lock goes with it: the re-registration below opens it again.
            drop(store);
            peer.inner.open.remove(&version);
            if shutdown.is_triggered() {
                return tracing::debug!(version = %&version[..16], "stopped seeding");
            }
            let spread = Duration::from_millis(rand::random::<u64>() % RESEED_SPREAD_MS);
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(spread) => {}
            }
            tracing::info!(version = %&version[..16], "the supernode went away: registering with the next one to keep seeding");
            let req = DownloadRequest {
                output: Destination::Store {
                    store: watch::channel(None).0,
                    wants: watch::channel(Wants::default()).1,
                },
                back_source: crate::BackSource::Never,
                timeout: Some(RESEED_TIMEOUT),
                seed_only: true,
                ..req
            };
            let (progress, _) = watch::channel(crate::Progress::default());
            let again = Box::pin(peer.download(&req, &progress)).await;
            if let Err(e) = again {
                tracing::info!(version = %&version[..16], error = %e, "stopped seeding");
            }
        });
    }
}

/// Longest a re-registration to keep seeding may take.
const RESEED_TIMEOUT: Duration = Duration::from_secs(600);

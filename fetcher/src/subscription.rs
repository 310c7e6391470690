//! An agent's standing subscription to each of its supernodes (`Scheduler.Subscribe`): the
//! supernode sends work of its own accord (fetch a registry blob whole into the store, for a
//! preheat of scope `all_peers`) and the agent reports how each went. One stream per supernode on
//! the shared connection ([`crate::download::channels`]), dialled again with backoff when it
//! breaks, until shutdown.

use std::time::Duration;

use proto::scheduler::{HostCommand, HostReport};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::peer::Peer;

/// Commands run at once per supernode (each a whole-blob fetch).
const CONCURRENT: usize = 4;
/// Longest wait before dialling a supernode again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps a subscription to every configured supernode until shutdown.
pub fn start(peer: Peer, shutdown: crate::Shutdown) {
    for addr in peer.supernodes().to_vec() {
        let (peer, shutdown) = (peer.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                tokio::select! {
                    r = subscribe(&peer, &addr) => match r {
                        Ok(()) => backoff = Duration::from_millis(500),
                        Err(e) => tracing::debug!(supernode = %addr, error = %e, "subscription failed"),
                    },
                    _ = shutdown.wait() => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }
}

/// One subscription: says hello, then runs commands until the stream ends.
async fn subscribe(peer: &Peer, addr: &str) -> Result<(), String> {
    let mut client = peer.inner.channels.client(addr, peer.tls()).await?;
    let (reports, rx) = mpsc::channel::<HostReport>(64);
    let hello = HostReport {
        hostname: rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
        ..Default::default()
    };
    reports.send(hello).await.map_err(|e| e.to_string())?;
    let mut commands = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    tracing::info!(supernode = %addr, "subscribed for work");
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT));
    while let Some(c) = commands.next().await {
        let c = c.map_err(|s| s.message().to_owned())?;
        let (peer, reports) = (peer.clone(), reports.clone());
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        tokio::spawn(async move {
            let report = run(&peer, c).await;
            drop(slot);
            let _ = reports.send(report).await;
        });
    }
    Ok(())
}

/// Carries out one command; its report.
async fn run(peer: &Peer, c: HostCommand) -> HostReport {
    let headers: Vec<(String, String)> = c.headers.into_iter().map(|h| (h.name, h.value)).collect();
    let r = peer.fetch_blob(&c.url, &headers, &c.digest).await;
    match &r {
        Ok(()) => tracing::info!(url = %crate::source::redact(&c.url), job = c.job, "preheated"),
        Err(e) => {
            tracing::warn!(url = %crate::source::redact(&c.url), job = c.job, error = %e, "preheat failed")
        }
    }
    HostReport {
        job: c.job,
        hostname: String::new(),
        url: c.url,
        ok: r.is_ok(),
        error: r.err().map(|e| e.to_string()).unwrap_or_default(),
    }
}

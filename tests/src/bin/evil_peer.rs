//! `damselfly-evil-peer`: a misbehaving peer for tests. It downloads a URL honestly (so the
//! supernode knows it holds every piece), then keeps seeding it with one byte of every piece
//! flipped, until killed. Prints `seeding` once it is ready.

use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use fetcher::upload::{PieceBody, PieceSource};
use fetcher::{DownloadRequest, Peer, PeerConfig, Progress, Shutdown};

#[derive(Parser)]
struct Args {
    url: String,
    #[arg(long)]
    supernode: String,
    #[arg(long)]
    data_dir: std::path::PathBuf,
    #[arg(short = 'O')]
    output: std::path::PathBuf,
    #[command(flatten)]
    tls: fetcher::tls::TlsArgs,
}

struct Corrupting(Arc<dyn PieceSource>);

impl PieceSource for Corrupting {
    fn open_piece(&self, version_id: &str, num: u32) -> fetcher::Result<Option<PieceBody>> {
        let Some(body) = self.0.open_piece(version_id, num)? else {
            return Ok(None);
        };
        let mut v = body.into_bytes()?.to_vec();
        let mid = v.len() / 2;
        if let Some(x) = v.get_mut(mid) {
            *x ^= 0xff;
        }
        Ok(Some(PieceBody::from_bytes(Bytes::from(v))))
    }

    fn ticket_keys(&self, version_id: &str) -> Vec<fetcher::ticket::PublicKey> {
        self.0.ticket_keys(version_id)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let t = &a.tls;
    let tls = fetcher::tls::ClusterTls::from_config(
        t.tls_ca.as_deref(),
        t.tls_cert.as_deref(),
        t.tls_key.as_deref(),
    )?;
    let cfg = PeerConfig {
        tls,
        supernodes: vec![a.supernode],
        data_dir: a.data_dir,
        keep_seeding: true,
        ..PeerConfig::default()
    };
    let shutdown = Shutdown::new();
    let peer = Peer::start_with(
        cfg,
        fetcher::metrics::PeerMetrics::new(),
        shutdown.clone(),
        |s| Arc::new(Corrupting(s)),
    )
    .await?;
    let req = DownloadRequest {
        url: a.url,
        output: fetcher::download::Destination::File(a.output),
        headers: vec![],
        digest: None,
        tag: String::new(),
        filter: vec![],
        limit_rate: 0,
        back_source: fetcher::BackSource::Never,
        timeout: None,
        content_key: None,
        seed_only: false,
    };
    let (tx, _rx) = tokio::sync::watch::channel(Progress::default());
    peer.download(&req, &tx).await?;
    println!("seeding");
    shutdown.wait().await;
    Ok(())
}

//! Where a lazy layer's compressed bytes come from: the local agent ([`AgentBlob`], with the
//! image's registry credentials, [`Credentials`]) in production, a local file in tests.

use std::ops::Range;
use std::sync::Arc;

/// Where a layer blob's compressed bytes come from (the local agent's piece store and peers in
/// production; a local file in tests).
pub trait BlobReader: Send + Sync + 'static {
    /// Exactly the bytes `range` of the blob.
    fn read_at(&self, range: Range<u64>) -> std::io::Result<Vec<u8>>;
}

/// A blob in a local file.
pub struct FileBlob(pub std::fs::File);

impl BlobReader for FileBlob {
    fn read_at(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|_| std::io::Error::other("range too large"))?;
        let mut buf = vec![0u8; len];
        self.0.read_exact_at(&mut buf, range.start)?;
        Ok(buf)
    }
}

/// The headers (registry credentials) to ask for a blob with, asked for on each call so that
/// expiring tokens are renewed.
pub trait Credentials: Send + Sync + 'static {
    fn headers(&self) -> Vec<(String, String)>;
    /// The registry refused what [`Credentials::headers`] gave: renew them (a helper asked
    /// again, a new token) before the next call.
    fn refresh(&self) {}
}

fn agent_headers(c: &dyn Credentials) -> Vec<proto::agent::Header> {
    c.headers()
        .into_iter()
        .map(|(name, value)| proto::agent::Header { name, value })
        .collect()
}

/// Whether the agent's refusal is the registry refusing the credentials.
fn refused_credentials(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    ) || ["HTTP 401", "HTTP 403", "401 Unauthorized", "403 Forbidden"]
        .iter()
        .any(|m| s.message().contains(m))
}

/// How long a read waits for an agent that is not there (restarting: a rolled DaemonSet pod, a
/// crash, an upgrade) before it fails with EIO. A dfdaemon whose socket systemd holds needs none
/// of it: calls wait in the socket's backlog.
pub const AGENT_RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether the call failed for want of an agent (nothing listening on its socket, or the
/// connection broke), not by the agent's answer: the status was made by the client's transport,
/// which keeps the transport error as its source.
fn agent_gone(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && std::error::Error::source(s).is_some()
}

/// Fixed headers (none, for public registries).
impl Credentials for Vec<(String, String)> {
    fn headers(&self) -> Vec<(String, String)> {
        self.clone()
    }
}

/// A blob read through the local agent (`Agent.ReadRange`): pieces from peers and supernodes,
/// verified, kept in the agent's store. FUSE handlers run on their own threads, so each read
/// blocks on the runtime `handle`.
pub struct AgentBlob {
    pub handle: tokio::runtime::Handle,
    pub client: proto::agent::agent_client::AgentClient<tonic::transport::Channel>,
    /// Where the registry serves the blob, and the credentials to ask it with.
    pub url: String,
    pub headers: Arc<dyn Credentials>,
    pub digest: String,
    /// Have the agent fetch only what reads ask for (no background fetch of the rest).
    pub only_range: bool,
}

/// Bytes asked of the agent per call (gRPC messages stay small).
pub(crate) const AGENT_READ_MAX: u64 = 2 << 20;

impl BlobReader for AgentBlob {
    fn read_at(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(range.end - range.start).unwrap_or(0));
        let mut at = range.start;
        let mut headers = agent_headers(self.headers.as_ref());
        let mut refreshed = false;
        let mut gone_since: Option<std::time::Instant> = None;
        while at < range.end {
            let length = (range.end - at).min(AGENT_READ_MAX);
            let req = proto::agent::ReadRangeRequest {
                url: self.url.clone(),
                headers: headers.clone(),
                digest: self.digest.clone(),
                offset: at,
                length,
                only_range: self.only_range,
            };
            let mut client = self.client.clone();
            let reply = match self.handle.block_on(client.read_range(req)) {
                Ok(r) => r,
                Err(s) if !refreshed && refused_credentials(&s) => {
                    // Rotated or expired credentials: renew them once, then read again.
                    refreshed = true;
                    self.headers.refresh();
                    headers = agent_headers(self.headers.as_ref());
                    continue;
                }
                Err(s)
                    if agent_gone(&s)
                        && gone_since
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed()
                            < AGENT_RESTART_WAIT =>
                {
                    // The agent restarts: ask again once it is back (the channel redials).
                    tracing::debug!(error = %s.message(), "agent unreachable; waiting for it");
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    continue;
                }
                Err(s) => return Err(std::io::Error::other(format!("agent: {}", s.message()))),
            };
            gone_since = None;
            let data = reply.into_inner().data;
            if data.len() as u64 != length {
                return Err(std::io::Error::other(format!(
                    "agent returned {} bytes for {length}",
                    data.len()
                )));
            }
            out.extend_from_slice(&data);
            at += length;
        }
        Ok(out)
    }
}

/// A blob as a stream, read in agent-sized parts.
pub(super) struct BlobStream<'a> {
    pub blob: &'a dyn BlobReader,
    pub pos: u64,
    pub len: u64,
}

impl std::io::Read for BlobStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64)
            .min(self.len - self.pos)
            .min(AGENT_READ_MAX);
        if n == 0 {
            return Ok(0);
        }
        let data = self.blob.read_at(self.pos..self.pos + n)?;
        let got = data.len().min(buf.len());
        buf[..got].copy_from_slice(&data[..got]);
        self.pos += got as u64;
        Ok(got)
    }
}

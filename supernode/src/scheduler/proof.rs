//! Proof that an origin serves a content-keyed task's bytes. A peer asking for a registry blob by
//! digest names the URL it pulls from; the supernode does not take that URL's word for the length
//! or ETag (any server can echo those): it reads a random range of the blob from the URL with the
//! peer's credentials and compares it with the bytes it already holds for the task.

use std::time::Duration;

use fetcher::source::{HeaderPair, HttpSource};
use futures::StreamExt;
use rand::Rng;

use crate::task::Version;

/// Bytes compared.
const PROOF_LEN: u64 = 64;
/// How far into a body an origin that ignores Range is read before giving up.
const MAX_UNRANGED: u64 = 8 << 20;
/// How long to wait for the seed's first piece to compare against.
const FIRST_PIECE: Duration = Duration::from_secs(60);

/// Why the proof failed.
#[derive(Debug)]
pub enum ProofError {
    /// The origin refused or broke (its error, for the peer).
    Origin(fetcher::Error),
    /// The origin answered with other bytes than the task's.
    Mismatch(String),
    /// Nothing to compare against yet (the seed has no piece), or the supernode is shutting down.
    Unavailable(String),
}

/// The piece `(offset, bytes)` of a random published piece of `v`, waiting for the first one.
async fn sample(v: &Version, shutdown: &fetcher::Shutdown) -> Result<(u64, Vec<u8>), ProofError> {
    let mut changed = v.subscribe();
    let deadline = tokio::time::Instant::now() + FIRST_PIECE;
    loop {
        let pick = {
            let st = v.lock();
            // Only what the seed holds (a version taken over is still getting pieces back).
            let held: Vec<_> = st
                .pieces
                .iter()
                .filter(|p| !st.seed_lacks.contains(&p.num))
                .collect();
            if held.is_empty() {
                None
            } else {
                let mut rng = rand::rng();
                let p = held[rng.random_range(0..held.len())];
                let span = u64::from(p.size).saturating_sub(PROOF_LEN).max(1);
                let at = p.offset + rng.random_range(0..span);
                Some((at, PROOF_LEN.min(p.offset + u64::from(p.size) - at)))
            }
        };
        if let Some((at, len)) = pick {
            let store = v
                .store
                .get()
                .cloned()
                .ok_or_else(|| ProofError::Unavailable("the seed has no store".into()))?;
            let bytes = tokio::task::spawn_blocking(move || store.read_range(at, len))
                .await
                .map_err(|e| ProofError::Unavailable(e.to_string()))?
                .map_err(|e| ProofError::Unavailable(e.to_string()))?;
            return Ok((at, bytes.to_vec()));
        }
        if v.failed() {
            return Err(ProofError::Unavailable("the seed failed".into()));
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() {
                return Err(ProofError::Unavailable("the seed went away".into()));
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ProofError::Unavailable("the seed has no piece yet".into()));
            }
            _ = shutdown.wait() => return Err(ProofError::Unavailable("shutting down".into())),
        }
    }
}

/// Checks that `url` (with `headers`) serves the bytes `v` holds at a random offset.
pub async fn prove(
    source: &HttpSource,
    v: &Version,
    url: &str,
    headers: &[HeaderPair],
    shutdown: &fetcher::Shutdown,
) -> Result<(), ProofError> {
    let (at, want) = sample(v, shutdown).await?;
    let end = at + want.len() as u64 - 1;
    let resp = source
        .get(url, headers, Some((at, end)))
        .await
        .map_err(ProofError::Origin)?;
    // A 206 starts at `at`; a 200 (Range ignored) starts at 0.
    let skip = if resp.partial() { 0 } else { at };
    if skip + want.len() as u64 > MAX_UNRANGED {
        return Err(ProofError::Mismatch(format!(
            "{url} ignores Range requests; cannot compare its bytes"
        )));
    }
    let mut got = Vec::with_capacity(want.len());
    let mut pos = 0u64;
    let mut body = std::pin::pin!(resp.into_stream());
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(ProofError::Origin)?;
        let (c_start, c_end) = (pos, pos + chunk.len() as u64);
        pos = c_end;
        let (from, to) = (skip.max(c_start), (skip + want.len() as u64).min(c_end));
        if from < to {
            got.extend_from_slice(&chunk[(from - c_start) as usize..(to - c_start) as usize]);
        }
        if got.len() == want.len() || pos > MAX_UNRANGED {
            break;
        }
    }
    if got == want {
        Ok(())
    } else {
        Err(ProofError::Mismatch(format!(
            "{url} does not serve this content (bytes at offset {at} differ)"
        )))
    }
}

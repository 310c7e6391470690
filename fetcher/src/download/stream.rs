//! Streaming destination: the content goes to a channel in order while pieces land, read back from
//! the store as its contiguous prefix grows. The final byte is held back until the whole content is
//! verified, so a consumer never receives a complete-looking stream of wrong bytes.

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::piece_store::TaskStore;

/// What the tailer knows: bytes ready in the store, and (once complete) the length and expected digest.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ready {
    pub contiguous: u64,
    pub complete: Option<(u64, Option<String>)>,
}

/// A running tailer.
pub(crate) struct StreamTail {
    pub ready: watch::Sender<Ready>,
    pub task: tokio::task::JoinHandle<Result<String>>,
}

impl StreamTail {
    /// Starts tailing `store` into `tx`.
    pub fn start(store: Arc<TaskStore>, tx: mpsc::Sender<Result<Bytes>>) -> Self {
        let (ready, rx) = watch::channel(Ready::default());
        let task = tokio::spawn(tail(store, rx, tx));
        Self { ready, task }
    }

    /// Tells the tailer how far the store is contiguous.
    pub fn advance(&self, contiguous: u64) {
        self.ready
            .send_modify(|r| r.contiguous = r.contiguous.max(contiguous));
    }

    /// Completes the stream: everything is in the store. Waits until the consumer has it all;
    /// returns the content's `sha256:<hex>`.
    pub async fn finish(self, len: u64, expected_hex: Option<String>) -> Result<String> {
        self.ready.send_modify(|r| {
            r.contiguous = len;
            r.complete = Some((len, expected_hex));
        });
        self.task
            .await
            .map_err(|e| Error::Download(format!("stream task failed: {e}")))?
    }
}

const CHUNK: u64 = 256 << 10;

async fn tail(
    store: Arc<TaskStore>,
    mut rx: watch::Receiver<Ready>,
    tx: mpsc::Sender<Result<Bytes>>,
) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    loop {
        let ready = rx.borrow_and_update().clone();
        // Until complete and verified, the last byte stays back.
        let limit = match &ready.complete {
            Some((len, _)) => *len,
            None => ready.contiguous.saturating_sub(1),
        };
        while sent < limit {
            let n = (limit - sent).min(CHUNK);
            let s = store.clone();
            let offset = sent;
            let chunk = tokio::task::spawn_blocking(move || s.read_range(offset, n))
                .await
                .map_err(|e| Error::Download(format!("read task failed: {e}")))??;
            hasher.update(&chunk);
            if let Some((len, expected)) = &ready.complete
                && sent + n == *len
            {
                let actual = hex::encode(hasher.clone().finalize());
                if let Some(exp) = expected.as_deref().filter(|e| *e != actual) {
                    let err = || Error::DigestMismatch {
                        expected: format!("sha256:{exp}"),
                        actual: format!("sha256:{actual}"),
                    };
                    let _ = tx.send(Err(err())).await;
                    return Err(err());
                }
            }
            tx.send(Ok(chunk))
                .await
                .map_err(|_| Error::Download("the stream's consumer went away".into()))?;
            sent += n;
        }
        if let Some((len, _)) = ready.complete
            && sent >= len
        {
            return Ok(format!("sha256:{}", hex::encode(hasher.finalize())));
        }
        if rx.changed().await.is_err() {
            return Err(Error::Download(
                "download ended before the stream was complete".into(),
            ));
        }
    }
}

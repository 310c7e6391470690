//! Back-to-source: with no supernode reachable, the peer reads the origin itself, cutting the stream
//! into pieces exactly as a supernode would (so the store can seed them later).

use futures::StreamExt;

use bytes::Bytes;

use super::{Destination, Download};
use crate::error::{Error, Result};
use crate::piece::{PieceCutter, PieceMeta};
use crate::piece_store::{TaskMeta, TaskStore};
use crate::rate::acquire_all;
use crate::task_id::{self, DEFAULT_PIECE_SIZE};

impl Download<'_> {
    pub(crate) async fn back_source(&mut self) -> Result<()> {
        let inner = self.peer.inner.clone();
        let resp = inner
            .source
            .get(&self.req.url, &self.req.headers, None)
            .await?;
        let probe = resp.probe.clone();
        let len = probe.content_length.map(|l| l as i64).unwrap_or(-1);
        let piece_size = task_id::piece_size_for(len, DEFAULT_PIECE_SIZE);
        let meta = TaskMeta {
            version_id: task_id::version_id(&self.task_id, len, &probe.etag, &probe.last_modified),
            task_id: self.task_id.clone(),
            url: self.req.url.clone(),
            content_length: len,
            piece_size,
            etag: probe.etag,
            last_modified: probe.last_modified,
            digest: None,
        };
        let store = self.open_version(meta).await?;
        let mut cutter = PieceCutter::new(piece_size);
        let mut body = std::pin::pin!(resp.into_stream());
        let counter = inner.metrics.download_bytes.with_label_values(&["origin"]);
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            acquire_all(&[&inner.download_limit, &self.task_limit], chunk.len()).await;
            counter.inc_by(chunk.len() as u64);
            let done = cutter.push(&chunk);
            self.store_pieces(&store, done)?;
        }
        let (last, total, digest) = cutter.finish();
        self.store_pieces(&store, last.into_iter().collect())?;
        if len >= 0 && total != len as u64 {
            return Err(Error::OriginBody {
                url: self.req.url.clone(),
                detail: format!("got {total} of {len} bytes"),
            });
        }
        store.set_complete(total, Some(digest.clone()))?;
        self.piece_count = Some(total.div_ceil(u64::from(piece_size)) as u32);
        self.whole_digest = Some(digest);
        Ok(())
    }

    /// Stores pieces cut from the origin's stream (unless held) and moves the destination along.
    fn store_pieces(&mut self, store: &TaskStore, pieces: Vec<(PieceMeta, Bytes)>) -> Result<()> {
        for (m, data) in pieces {
            if store.piece(m.num).is_none() {
                let writer = self.output.as_ref().and_then(|o| o.writer());
                if let (Some(w), Destination::File(path)) = (writer, &self.req.output) {
                    w.write_at(m.offset, &data)
                        .map_err(|e| Error::io("cannot write output", path, e))?;
                }
                store.write_piece(&m, &data)?;
                self.progress.completed += u64::from(m.size);
            }
            self.progress.from_origin += u64::from(m.size);
            self.progress_tx.send_replace(self.progress.clone());
        }
        self.advance();
        Ok(())
    }
}

//! The containerd calls a pull makes: every request carries the namespace and the pull's lease,
//! content is written whole by digest (or relabelled when already there), and images are
//! created or pointed at their new target.

use std::collections::HashMap;

use proto::containerd::services::content::v1 as content;
use proto::containerd::services::images::v1 as images;
use proto::containerd::services::leases::v1 as leases;
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// containerd's gRPC clients, each request carrying the namespace (and lease).
pub struct Containerd {
    pub channel: Channel,
    pub namespace: String,
    pub lease: Option<String>,
}

impl Containerd {
    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(l) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            r.metadata_mut().insert("containerd-lease", l);
        }
        r
    }

    pub fn err(what: &str) -> impl Fn(tonic::Status) -> Error + '_ {
        move |s| Error::Containerd(format!("{what}: {}", s.message()))
    }

    /// Creates a lease that expires on its own after an hour (should the pull die) and makes
    /// every later request carry it.
    pub async fn lease(&mut self) -> Result<String> {
        let id = format!(
            "dfsnapshotter-pull-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let mut lc = leases::leases_client::LeasesClient::new(self.channel.clone());
        let expire = time_in(std::time::Duration::from_secs(3600));
        lc.create(self.req(leases::CreateRequest {
            id: id.clone(),
            labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]),
        }))
        .await
        .map_err(Self::err("cannot create a lease"))?;
        self.lease = Some(id.clone());
        Ok(id)
    }

    /// Ends the pull's lease (what the image names stays).
    pub async fn release(&mut self) {
        let Some(id) = self.lease.take() else {
            return;
        };
        let mut lc = leases::leases_client::LeasesClient::new(self.channel.clone());
        let _ = lc
            .delete(self.req(leases::DeleteRequest { id, sync: false }))
            .await;
    }

    /// Stores `bytes` (whose digest is `digest`) with `labels`; existing content gets the labels.
    pub async fn put(
        &self,
        digest: &str,
        bytes: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let mut c = content::content_client::ContentClient::new(self.channel.clone());
        let msg = content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            r#ref: format!("dfsnapshotter-{digest}"),
            total: bytes.len() as i64,
            expected: digest.to_owned(),
            offset: 0,
            data: bytes.to_vec(),
            labels: labels.clone(),
        };
        let written = async {
            let mut stream = c
                .write(self.req(tokio_stream::once(msg)))
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        };
        match written.await {
            Ok(()) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
                c.update(self.req(content::UpdateRequest {
                    info: Some(content::Info {
                        digest: digest.to_owned(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                }))
                .await
                .map_err(Self::err("cannot label content"))?;
                Ok(())
            }
            Err(s) => Err(Self::err("cannot store content")(s)),
        }
    }

    /// Names `img` (creates it, or points an existing image at the new target).
    pub async fn name_image(&self, img: images::Image) -> Result<()> {
        let mut ic = images::images_client::ImagesClient::new(self.channel.clone());
        match ic
            .create(self.req(images::CreateImageRequest {
                image: Some(img.clone()),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                ic.update(self.req(images::UpdateImageRequest {
                    image: Some(img),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                }))
                .await
                .map_err(Self::err("cannot update the image"))?;
                Ok(())
            }
            Err(s) => Err(Self::err("cannot create the image")(s)),
        }
    }
}

/// RFC 3339 (UTC) of now + `d`.
fn time_in(d: std::time::Duration) -> String {
    let t = time::OffsetDateTime::now_utc() + d;
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry_is_rfc3339() {
        let t = time_in(std::time::Duration::from_secs(60));
        assert!(t.len() >= 20 && t.contains('T'), "{t}");
    }
}

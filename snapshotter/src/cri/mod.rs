//! The CRI image-service proxy: kubelet hands pull secrets to the CRI (`PullImageRequest.auth`),
//! never to snapshotters, so dfsnapshotter serves `runtime.v1.ImageService` on a socket of its
//! own (kubelet's `--image-service-endpoint`) and forwards every call to containerd's CRI, byte
//! for byte ([`raw`]). Of a `PullImage` it reads the image and the pull secret first and hands
//! the secret to the FUSE manager for that image's registry and repository, so the lazy layers
//! containerd then prepares read with the pod's credentials; each new pull replaces them, once
//! it has succeeded: a failed pull (a stale secret) gives the previous ones back, and a pull that
//! mounted none of the scope's layers leaves nothing behind. The secret is never logged. A secret the proxy cannot use (token forms) leaves the pull to go on
//! unchanged; its layers then fall back to a normal unpack.

mod raw;
pub mod secret;

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use prost::Message;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::transport::Channel;

use crate::credentials::Scope;
use crate::error::{Error, Result};
use crate::fusemanager::ManagerClient;
use crate::registry::Reference;
use raw::RawCodec;

/// The service kubelet calls.
const SERVICE: &str = "runtime.v1.ImageService";
/// Messages larger than this are refused (image lists of busy hosts stay far below).
const MAX_MESSAGE: usize = 64 << 20;

/// Forwards `runtime.v1.ImageService` to containerd; reads pull secrets on the way.
#[derive(Clone)]
pub struct ImageServiceProxy {
    containerd: Channel,
    manager: Arc<ManagerClient>,
}

impl tonic::server::NamedService for ImageServiceProxy {
    const NAME: &'static str = SERVICE;
}

impl ImageServiceProxy {
    /// A proxy to the CRI of the containerd at `socket` (connected on first use).
    pub fn new(socket: &Path, manager: Arc<ManagerClient>) -> Self {
        Self {
            containerd: fetcher::uds::lazy_channel(socket),
            manager,
        }
    }

    /// Reads a `PullImage` request's image and pull secret, and hands the secret over; the
    /// handover, to settle once the pull has ended.
    async fn capture(&self, request: &Bytes) -> Option<(Scope, u64)> {
        // Undecodable: containerd will refuse it with its own error.
        let pull = proto::cri::PullImageRequest::decode(request.as_ref()).ok()?;
        let image = pull.image.map(|i| i.image).unwrap_or_default();
        let reference = Reference::parse(&image).ok()?;
        let scope = Scope::new(&reference.registry, &reference.repository);
        match secret::secret(pull.auth.as_ref()) {
            Ok(s) => match self.manager.put_credentials(&scope, &s).await {
                Ok(generation) => {
                    tracing::info!(%scope, "pull secret kept for the image's lazy layers");
                    Some((scope, generation))
                }
                Err(e) => {
                    tracing::warn!(%scope, error = %e, "cannot hand the pull secret over: the image's layers will be unpacked normally");
                    None
                }
            },
            Err(secret::Unusable::None) => None,
            Err(why) => {
                tracing::warn!(%scope, ?why, "pull secret unusable for lazy layers: they will be unpacked normally");
                None
            }
        }
    }

    /// The pull of `handover` has ended (`pulled`: it succeeded): a failed pull's secret gives
    /// way to the scope's previous one, one no mounted layer reads with is forgotten.
    async fn settle(&self, (scope, generation): (Scope, u64), pulled: bool) {
        if let Err(e) = self
            .manager
            .settle_credentials(&scope, generation, pulled)
            .await
        {
            tracing::warn!(%scope, error = %e, "cannot settle the pull secret with the fuse manager");
        }
    }

    /// Sends `request` to containerd's CRI at `path`; its answer, or its error as it gave it.
    async fn forward(
        &self,
        request: tonic::Request<Bytes>,
        path: http::uri::PathAndQuery,
    ) -> std::result::Result<tonic::Response<Bytes>, tonic::Status> {
        let (metadata, _, body) = request.into_parts();
        let request = tonic::Request::from_parts(metadata, Default::default(), body);
        let mut grpc = tonic::client::Grpc::new(self.containerd.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("containerd CRI: {e}")))?;
        grpc.unary(request, path, RawCodec).await
    }
}

/// One call, forwarded.
struct Call {
    proxy: ImageServiceProxy,
    path: http::uri::PathAndQuery,
    pull: bool,
}

impl tonic::server::UnaryService<Bytes> for Call {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let (proxy, path, pull) = (self.proxy.clone(), self.path.clone(), self.pull);
        Box::pin(async move {
            let handover = if pull {
                proxy.capture(request.get_ref()).await
            } else {
                None
            };
            let answer = proxy.forward(request, path).await;
            if let Some(h) = handover {
                proxy.settle(h, answer.is_ok()).await;
            }
            answer
        })
    }
}

impl<B> Service<http::Request<B>> for ImageServiceProxy
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let known = method
            .strip_prefix("/")
            .and_then(|m| m.strip_prefix(SERVICE))
            .and_then(|m| m.strip_prefix('/'))
            .is_some_and(|m| !m.is_empty() && !m.contains('/'));
        let proxy = self.clone();
        Box::pin(async move {
            if !known {
                let status = tonic::Status::unimplemented(format!("{method} is not served here"));
                return Ok(status.into_http());
            }
            let path = match http::uri::PathAndQuery::try_from(method.as_str()) {
                Ok(p) => p,
                Err(_) => return Ok(tonic::Status::invalid_argument("bad path").into_http()),
            };
            let call = Call {
                proxy,
                pull: method.ends_with("/PullImage"),
                path,
            };
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(MAX_MESSAGE), Some(MAX_MESSAGE));
            Ok(grpc.unary(call, request).await)
        })
    }
}

/// Serves the proxy on the Unix socket `path` (root-only) until `shutdown`.
pub fn serve(
    path: &Path,
    proxy: ImageServiceProxy,
    shutdown: fetcher::Shutdown,
) -> Result<fetcher::uds::Served> {
    let router = tonic::transport::Server::builder().add_service(proxy);
    fetcher::uds::serve(path, router, shutdown, "CRI image-service proxy")
        .map_err(|(what, e)| Error::io(what, path, e))
}

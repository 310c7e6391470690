//! One gRPC connection per supernode, shared by every session this peer has with it.
//!
//! An agent that pulls an image of ten layers, or keeps seeding a hundred tasks, holds that many
//! scheduler sessions. Each is one HTTP/2 stream; they share the connection (and its TLS state
//! and buffers, which cost far more than a stream) instead of opening one each. A connection that
//! breaks is dialled again by the channel on the next call.

use std::collections::HashMap;
use std::sync::Mutex;

use proto::scheduler::scheduler_client::SchedulerClient;
use tonic::transport::Channel;

use super::scheduled::channel;

/// Channels by supernode address (`host:port`): the configured supernodes, a handful.
#[derive(Default)]
pub(crate) struct Channels {
    open: Mutex<HashMap<String, Channel>>,
    /// Per address, held while dialling it, so sessions that start together share one
    /// connection (and a supernode that does not answer delays no dial of another).
    dialling: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl Channels {
    /// A scheduler client on the shared connection to `addr`, dialled (over cluster TLS when
    /// `tls` is given) if there is none yet.
    pub(crate) async fn client(
        &self,
        addr: &str,
        tls: Option<&crate::tls::ClusterTls>,
    ) -> Result<SchedulerClient<Channel>, String> {
        let open = || self.open.lock().ok().and_then(|m| m.get(addr).cloned());
        if let Some(c) = open() {
            return Ok(SchedulerClient::new(c));
        }
        let gate = match self.dialling.lock() {
            Ok(mut m) => m.entry(addr.to_owned()).or_default().clone(),
            Err(_) => Default::default(),
        };
        let _dialling = gate.lock().await;
        if let Some(c) = open() {
            return Ok(SchedulerClient::new(c));
        }
        let dialled = channel(addr, tls).await?;
        if let Ok(mut m) = self.open.lock() {
            m.insert(addr.to_owned(), dialled.clone());
        }
        Ok(SchedulerClient::new(dialled))
    }
}

//! The supernode's side of tickets (see `fetcher::ticket`): its signing key, how long tickets
//! live, and whether piece tickets are bound to the address the peer connected from.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use fetcher::ticket::{Claims, Issuer, PublicKey, Scope};

/// Issues tickets for the versions this supernode schedules.
#[derive(Debug)]
pub struct Tickets {
    issuer: Issuer,
    /// Lifetime of a ticket; sessions renew theirs at half of it.
    pub ttl: Duration,
    /// Bind piece tickets to the peer's address as this supernode sees it.
    pub bind_ip: bool,
}

impl Tickets {
    pub fn new(issuer: Issuer, ttl: Duration, bind_ip: bool) -> Self {
        Self {
            issuer,
            ttl: ttl.max(Duration::from_secs(10)),
            bind_ip,
        }
    }

    pub fn public(&self) -> PublicKey {
        self.issuer.public()
    }

    /// A piece ticket for `version_id` held by a peer connected from `peer`; with its expiry.
    pub fn pieces(&self, version_id: &str, peer: Option<IpAddr>) -> (String, u64) {
        let holder = match peer {
            Some(ip) if self.bind_ip => ip,
            _ => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        self.issue(Scope::Pieces, version_id, holder)
    }

    /// An index ticket for the content-keyed `version_id` (any holder: the supernode itself
    /// fetches the index task's origin, its own index API, with it).
    pub fn index(&self, version_id: &str) -> String {
        self.issue(Scope::Index, version_id, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
            .0
    }

    fn issue(&self, scope: Scope, version_id: &str, holder: IpAddr) -> (String, u64) {
        let expires = fetcher::ticket::now() + self.ttl.as_secs();
        let claims = Claims {
            scope,
            version_id: version_id.to_owned(),
            holder,
            expires,
        };
        // Version ids are sha256 hex computed here; an unexpected one yields an empty ticket,
        // which every piece server refuses.
        (self.issuer.issue(&claims).unwrap_or_default(), expires)
    }
}

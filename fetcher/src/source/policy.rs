//! The origin policy: which origins a supernode fetches from on a peer's behalf, and which an
//! agent fetches from for the registry clients of its host (the proxy's `?ns=` registries,
//! hijacked hosts, its downloads). Every request (seeds, credential probes and proofs, preheats,
//! index builds, token fetches, registry requests) and every redirect hop is checked, and host
//! names are checked after DNS resolution, so that nobody can point a daemon at its own loopback,
//! a link-local metadata service or another internal address.
//!
//! - `allow`: URL prefixes (`https://harbor.example.com/`, `http://10.0.0.5:5000/v2/`,
//!   `http://127.0.0.1:*/` for any port, `https://*.corp.example:*/` for subdomains). Empty: any
//!   origin on a public address. A URL under an allowed prefix may resolve to any address (the
//!   operator named that host).
//! - `allow_addresses`: address ranges (`10.0.0.0/8`) allowed although not public.
//! - Named origins (an agent's `registry_mirror` and `hijack` hosts): allowed to resolve anywhere
//!   like `allow`, without narrowing what else is allowed.
//!
//! Refused by default: loopback, unspecified, private (RFC 1918, IPv6 ULA), link-local (the
//! 169.254.169.254 metadata service among them), shared (100.64/10), multicast, broadcast,
//! documentation and benchmarking ranges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::error::{Error, Result};

/// `[origin_policy]` of `supernode.toml` and `dfdaemon.toml`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// URL prefixes; empty: any origin on a public address.
    pub allow: Vec<String>,
    /// Non-public address ranges allowed anyway (CIDR or single addresses).
    pub allow_addresses: Vec<String>,
}

impl PolicyConfig {
    /// The policy (each error names the bad value).
    pub fn build(&self) -> Result<OriginPolicy> {
        OriginPolicy::new(&self.allow, &self.allow_addresses)
    }
}

/// `--allow-origin`, `--allow-address`: added to the config file's `[origin_policy]`.
#[derive(Debug, Default, clap::Args)]
pub struct PolicyArgs {
    /// Also allow fetching from this URL prefix (repeatable; `http://10.0.0.5:*/` for any port;
    /// added to `origin_policy.allow`). Without any, every public origin is allowed.
    #[arg(long = "allow-origin", value_name = "PREFIX")]
    pub allow_origin: Vec<String>,
    /// Also allow origins on this non-public address range (repeatable, e.g. 10.0.0.0/8; added to
    /// `origin_policy.allow_addresses`).
    #[arg(long = "allow-address", value_name = "CIDR")]
    pub allow_address: Vec<String>,
}

impl PolicyArgs {
    /// Adds the flags' values to `c`.
    pub fn over(&self, c: &mut PolicyConfig) {
        c.allow.extend(self.allow_origin.iter().cloned());
        c.allow_addresses.extend(self.allow_address.iter().cloned());
    }
}

/// One allowed URL prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix {
    scheme: String,
    host: String,
    /// `None`: any port.
    port: Option<u16>,
    path: String,
}

impl Prefix {
    /// Parses `scheme://host[:port|:*][/path]`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid("origin prefix", format!("{s:?}: {why}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(bad("only http and https"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(bad("no user info"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, "*")) => (h, None),
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                match p.parse::<u16>() {
                    Ok(p) => (h, Some(p)),
                    Err(_) => (authority, default_port(&scheme)),
                }
            }
            _ => (authority, default_port(&scheme)),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            path: path.to_owned(),
        })
    }

    fn matches(&self, u: &url::Url) -> bool {
        u.scheme() == self.scheme
            && u.host_str()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
                .is_some_and(|h| self.names_host(h))
            && self
                .port
                .is_none_or(|p| u.port_or_known_default() == Some(p))
            && u.path().starts_with(&self.path)
    }

    fn names_host(&self, host: &str) -> bool {
        match self.host.strip_prefix('*') {
            // `*.corp.example`: any name under it, not the domain itself.
            Some(suffix) if suffix.starts_with('.') => {
                host.len() > suffix.len() && host.to_ascii_lowercase().ends_with(suffix)
            }
            _ => self.host.eq_ignore_ascii_case(host),
        }
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    Some(if scheme == "https" { 443 } else { 80 })
}

/// The policy (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct OriginPolicy {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    allow: Vec<Prefix>,
    allow_addresses: Vec<IpNet>,
    /// Origins the operator named elsewhere in the config (an agent's mirror and hijacked hosts).
    named: Vec<Prefix>,
    /// Addresses of this supernode's own HTTP server (its index API is the origin of index tasks).
    own: std::sync::RwLock<Vec<SocketAddr>>,
}

impl OriginPolicy {
    /// From config values: URL prefixes and address ranges (each error names the bad value).
    pub fn new(allow: &[String], allow_addresses: &[String]) -> Result<Self> {
        let allow = allow
            .iter()
            .map(|p| Prefix::parse(p))
            .collect::<Result<_>>()?;
        let allow_addresses = allow_addresses
            .iter()
            .map(|a| {
                a.parse::<IpNet>()
                    .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| Error::invalid("allowed address range", format!("{a:?}")))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                allow,
                allow_addresses,
                named: Vec::new(),
                own: Default::default(),
            }),
        })
    }

    /// The same policy with the URL prefixes `named` (origins the operator configured elsewhere,
    /// such as a registry mirror) allowed wherever they resolve.
    pub fn with_named(self, named: &[String]) -> Result<Self> {
        let named = named
            .iter()
            .map(|p| Prefix::parse(p))
            .collect::<Result<Vec<_>>>()?;
        let inner = Inner {
            allow: self.inner.allow.clone(),
            allow_addresses: self.inner.allow_addresses.clone(),
            named,
            own: Default::default(),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Lets index tasks fetch from this supernode's own index API at `addr`.
    pub fn allow_own(&self, addr: SocketAddr) {
        if let Ok(mut own) = self.inner.own.write()
            && !own.contains(&addr)
            && own.len() < 64
        {
            own.push(addr);
        }
    }

    fn is_own_index(&self, u: &url::Url) -> bool {
        let Some(ip) = literal_ip(u) else {
            return false;
        };
        let Some(port) = u.port_or_known_default() else {
            return false;
        };
        matches!(u.scheme(), "http" | "https")
            && u.path().starts_with("/api/v1/index/")
            && self
                .inner
                .own
                .read()
                .is_ok_and(|own| own.contains(&SocketAddr::new(ip, port)))
    }

    /// Checks a URL before it is fetched (and each redirect target): scheme, prefixes, and an IP
    /// literal host's address. Host names are checked again when resolved ([`Self::allows_ip`]).
    pub fn check(&self, u: &url::Url) -> Result<()> {
        let refuse = |why: String| Error::Refused {
            url: crate::source::redact(u.as_str()),
            why,
        };
        if !matches!(u.scheme(), "http" | "https") {
            return Err(refuse("only http and https origins".into()));
        }
        if self.is_own_index(u) {
            return Ok(());
        }
        let prefixed = self.inner.allow.iter().any(|p| p.matches(u))
            || self.inner.named.iter().any(|p| p.matches(u));
        if !self.inner.allow.is_empty() && !prefixed {
            return Err(refuse(
                "not under an allowed origin prefix (origin_policy.allow)".into(),
            ));
        }
        if let Some(ip) = literal_ip(u)
            && !prefixed
            && !self.allows_ip(None, ip)
        {
            return Err(refuse(format!(
                "{ip} is not a public address (origin_policy.allow_addresses)"
            )));
        }
        Ok(())
    }

    /// True when a request to `host` (a name, `None` for an IP literal) may go to `ip`.
    pub fn allows_ip(&self, host: Option<&str>, ip: IpAddr) -> bool {
        let (allow, named) = (&self.inner.allow, &self.inner.named);
        if host.is_some_and(|h| allow.iter().chain(named).any(|p| p.names_host(h))) {
            return true;
        }
        let ip = canonical(ip);
        is_public(ip) || self.inner.allow_addresses.iter().any(|n| n.contains(&ip))
    }
}

fn literal_ip(u: &url::Url) -> Option<IpAddr> {
    match u.host()? {
        url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
        url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
        url::Host::Domain(_) => None,
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_canonical(),
        v4 => v4,
    }
}

/// True for an address on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => is_public_v6(a),
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(a.is_loopback()
        || a.is_unspecified()
        || a.is_private()
        || a.is_link_local()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || o[0] >= 240)
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    // NAT64 (64:ff9b::/96) carries an IPv4 address: judge that one.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return is_public_v4(v4);
    }
    !(a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] == 0x2001 && s[1] == 0x0db8))
}

/// A DNS resolver for reqwest that drops the addresses the policy refuses for the name.
pub(crate) struct PolicyResolver(pub OriginPolicy);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| policy.allows_ip(Some(&host), a.ip()))
                .collect();
            if allowed.is_empty() {
                let seen: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                return Err(format!(
                    "origin policy: {host} resolves only to addresses that are not public ({}); \
                     allow them with origin_policy.allow or allow_addresses",
                    seen.join(", ")
                )
                .into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).expect("url")
    }

    #[test]
    fn default_policy_refuses_internal_addresses() {
        let p = OriginPolicy::default();
        for bad in [
            "http://127.0.0.1/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://172.16.0.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "file:///etc/passwd",
        ] {
            assert!(p.check(&url(bad)).is_err(), "{bad} allowed");
        }
        for good in [
            "https://registry-1.docker.io/v2/",
            "http://8.8.8.8/x",
            "http://[2606:4700::1]/",
        ] {
            assert!(p.check(&url(good)).is_ok(), "{good} refused");
        }
        assert!(!p.allows_ip(Some("evil.example"), "127.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn prefixes_and_ranges() {
        let p = OriginPolicy::new(
            &[
                "https://harbor.corp:8443/v2/".into(),
                "http://127.0.0.1:*/files/".into(),
            ],
            &["10.0.0.0/8".into()],
        )
        .expect("policy");
        assert!(
            p.check(&url("https://harbor.corp:8443/v2/a/blobs/x"))
                .is_ok()
        );
        assert!(
            p.check(&url("https://harbor.corp/v2/a")).is_err(),
            "other port"
        );
        assert!(
            p.check(&url("https://harbor.corp:8443/api/")).is_err(),
            "other path"
        );
        assert!(p.check(&url("https://harbor.corp.evil:8443/v2/")).is_err());
        assert!(p.check(&url("http://127.0.0.1:9999/files/a")).is_ok());
        assert!(p.check(&url("http://127.0.0.1:9999/redirect/a")).is_err());
        assert!(
            p.check(&url("https://elsewhere.example/v2/")).is_err(),
            "not listed"
        );
        // A named host resolves anywhere; others only to public or listed ranges.
        assert!(p.allows_ip(Some("harbor.corp"), "192.168.1.1".parse().expect("ip")));
        assert!(p.allows_ip(Some("x.example"), "10.9.9.9".parse().expect("ip")));
        assert!(!p.allows_ip(Some("x.example"), "192.168.1.1".parse().expect("ip")));
        for bad in ["ftp://h/", "http://", "https://u:p@h/", "h/x"] {
            assert!(Prefix::parse(bad).is_err(), "{bad}");
        }
        assert!(OriginPolicy::new(&[], &["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn named_origins_resolve_anywhere_without_narrowing_the_rest() {
        let p = OriginPolicy::default()
            .with_named(&[
                "http://127.0.0.1:5000/".into(),
                "https://*.corp.example:*/".into(),
            ])
            .expect("named");
        assert!(p.check(&url("http://127.0.0.1:5000/v2/")).is_ok());
        assert!(p.check(&url("http://127.0.0.1:5001/v2/")).is_err());
        assert!(p.check(&url("https://registry-1.docker.io/v2/")).is_ok());
        let lo: IpAddr = "10.1.1.1".parse().expect("ip");
        assert!(p.allows_ip(Some("harbor.corp.example"), lo));
        assert!(p.allows_ip(Some("a.b.CORP.example"), lo));
        assert!(
            !p.allows_ip(Some("corp.example"), lo),
            "the domain itself is not under *."
        );
        assert!(!p.allows_ip(Some("evilcorp.example"), lo));
        assert!(!p.allows_ip(Some("other.example"), lo));
    }

    #[test]
    fn own_index_api_is_allowed() {
        let p = OriginPolicy::default();
        let u = url("http://127.0.0.1:8001/api/v1/index/sha256:ab");
        assert!(p.check(&u).is_err());
        p.allow_own("127.0.0.1:8001".parse().expect("addr"));
        assert!(p.check(&u).is_ok());
        assert!(p.check(&url("http://127.0.0.1:8001/pieces/x/0")).is_err());
    }
}

//! Tickets: the proof a peer shows to get a piece or a layer index. A supernode issues one to a
//! peer for one task version once the origin accepted that peer's credentials, signs it with its
//! Ed25519 key, and hands the public key out with the task (`TaskInfo.ticket_key`); every piece
//! server (the supernode's and each agent's) checks a ticket offline, per request: the signature,
//! the version in the URL, the expiry, the scope, and, for piece tickets, that the request comes
//! from the address the ticket was issued to. Anything else gets 401/403 and no byte.
//!
//! Wire form: base64url (no padding) of `[1][scope][version id: 32][holder IP: 16][expires: u64 BE]
//! [signature: 64]`; the signature covers everything before it.

use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// The header a ticket travels in (`Authorization: Bearer <ticket>`).
pub const HEADER: &str = "authorization";

const FORMAT: u8 = 1;
const SIGNED_LEN: usize = 1 + 1 + 32 + 16 + 8;
const TICKET_LEN: usize = SIGNED_LEN + 64;
/// Clock skew tolerated between the issuing supernode and the checking piece server.
const SKEW: u64 = 60;

/// What a ticket lets its holder read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Pieces of the version, from the address the ticket was issued to.
    Pieces = 1,
    /// The layer index of the (content-keyed) version, from anywhere.
    Index = 2,
}

/// Why a ticket was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("no ticket")]
    Missing,
    #[error("malformed ticket")]
    Malformed,
    #[error("ticket signature does not verify")]
    BadSignature,
    #[error("ticket is for another version")]
    WrongVersion,
    #[error("ticket is for another use")]
    WrongScope,
    #[error("ticket was issued to another address")]
    WrongHolder,
    #[error("ticket expired")]
    Expired,
    #[error("cannot create or load the ticket key at {path}: {detail}")]
    Key { path: String, detail: String },
}

/// A supernode's public ticket key (32 bytes of Ed25519).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PublicKey(Vec<u8>);

impl PublicKey {
    /// From the bytes in `TaskInfo.ticket_key`; `None` unless 32 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == 32).then(|| Self(b.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What a ticket says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub scope: Scope,
    /// Lowercase hex version id (64 digits).
    pub version_id: String,
    /// The address the ticket was issued to; unspecified: any (index tickets, or binding off).
    pub holder: IpAddr,
    /// Unix seconds after which the ticket is refused.
    pub expires: u64,
}

/// The supernode's signing key.
pub struct Issuer {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("public", &hex::encode(self.key.public_key().as_ref()))
            .finish()
    }
}

impl Issuer {
    /// A fresh random key (tests, or a supernode without a data directory).
    pub fn generate() -> Result<Self, TicketError> {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| TicketError::Key {
                path: "(memory)".into(),
                detail: "no randomness".into(),
            })?;
        Self::from_pkcs8(pkcs8.as_ref(), "(memory)")
    }

    /// The key kept at `path` (PKCS#8, mode 0600), created there on first use, so tickets and the
    /// public key agents learned survive a restart.
    pub fn load_or_create(path: &Path) -> Result<Self, TicketError> {
        let err = |detail: String| TicketError::Key {
            path: path.display().to_string(),
            detail,
        };
        match std::fs::read(path) {
            Ok(bytes) => return Self::from_pkcs8(&bytes, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e.to_string())),
        }
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| err("no randomness".into()))?;
        write_private(path, pkcs8.as_ref()).map_err(|e| err(e.to_string()))?;
        Self::from_pkcs8(pkcs8.as_ref(), &path.display().to_string())
    }

    fn from_pkcs8(bytes: &[u8], path: &str) -> Result<Self, TicketError> {
        let key = Ed25519KeyPair::from_pkcs8(bytes).map_err(|e| TicketError::Key {
            path: path.to_owned(),
            detail: format!("not an Ed25519 PKCS#8 key: {e}"),
        })?;
        Ok(Self { key })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.public_key().as_ref().to_vec())
    }

    /// A ticket for `claims`; `None` if the version id is not 64 hex digits.
    pub fn issue(&self, claims: &Claims) -> Option<String> {
        let mut buf = Vec::with_capacity(TICKET_LEN);
        buf.push(FORMAT);
        buf.push(claims.scope as u8);
        let vid = hex::decode(&claims.version_id).ok()?;
        if vid.len() != 32 {
            return None;
        }
        buf.extend_from_slice(&vid);
        buf.extend_from_slice(&v6(claims.holder).octets());
        buf.extend_from_slice(&claims.expires.to_be_bytes());
        let sig = self.key.sign(&buf);
        buf.extend_from_slice(sig.as_ref());
        Some(URL_SAFE_NO_PAD.encode(buf))
    }
}

/// Writes `bytes` to `path` readable by its owner only, whole or not at all.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// Decodes a ticket and checks its signature against `key` (nothing else).
pub fn decode(key: &PublicKey, ticket: &str) -> Result<Claims, TicketError> {
    if ticket.len() > 2 * TICKET_LEN {
        return Err(TicketError::Malformed);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(ticket.trim())
        .map_err(|_| TicketError::Malformed)?;
    if raw.len() != TICKET_LEN || raw[0] != FORMAT {
        return Err(TicketError::Malformed);
    }
    let (signed, sig) = raw.split_at(SIGNED_LEN);
    UnparsedPublicKey::new(&ED25519, key.as_bytes())
        .verify(signed, sig)
        .map_err(|_| TicketError::BadSignature)?;
    let scope = match signed[1] {
        1 => Scope::Pieces,
        2 => Scope::Index,
        _ => return Err(TicketError::Malformed),
    };
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&signed[34..50]);
    let mut exp = [0u8; 8];
    exp.copy_from_slice(&signed[50..58]);
    Ok(Claims {
        scope,
        version_id: hex::encode(&signed[2..34]),
        holder: Ipv6Addr::from(ip).to_canonical(),
        expires: u64::from_be_bytes(exp),
    })
}

/// Checks that `ticket` lets a request from `from` read `scope` of `version_id` now.
pub fn verify(
    keys: &[PublicKey],
    ticket: Option<&str>,
    scope: Scope,
    version_id: &str,
    from: IpAddr,
) -> Result<Claims, TicketError> {
    let ticket = ticket.ok_or(TicketError::Missing)?;
    let mut last = TicketError::BadSignature;
    for key in keys {
        match decode(key, ticket) {
            Ok(c) => return check(c, scope, version_id, from, now()),
            Err(e @ TicketError::Malformed) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn check(
    c: Claims,
    scope: Scope,
    version_id: &str,
    from: IpAddr,
    now: u64,
) -> Result<Claims, TicketError> {
    if c.scope != scope {
        return Err(TicketError::WrongScope);
    }
    if !c.version_id.eq_ignore_ascii_case(version_id) {
        return Err(TicketError::WrongVersion);
    }
    if now > c.expires.saturating_add(SKEW) {
        return Err(TicketError::Expired);
    }
    if !c.holder.is_unspecified() && c.holder != v6(from).to_canonical() {
        return Err(TicketError::WrongHolder);
    }
    Ok(c)
}

/// The ticket in an `Authorization: Bearer <ticket>` header value.
pub fn from_header(value: Option<&http::HeaderValue>) -> Option<&str> {
    value?.to_str().ok()?.strip_prefix("Bearer ")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        // A ticket is whatever a peer sends: decoded or refused, never a panic, never valid.
        #[test]
        fn arbitrary_tickets_are_refused(t in "\\PC{0,200}", raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let key = Issuer::generate().expect("key").public();
            prop_assert!(decode(&key, &t).is_err());
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
            prop_assert!(decode(&key, &b64).is_err());
        }
    }

    use super::*;

    fn claims(holder: &str) -> Claims {
        Claims {
            scope: Scope::Pieces,
            version_id: "ab".repeat(32),
            holder: holder.parse().expect("ip"),
            expires: now() + 300,
        }
    }

    #[test]
    fn a_ticket_verifies_only_for_its_version_scope_holder_and_key() {
        let issuer = Issuer::generate().expect("key");
        let other = Issuer::generate().expect("key");
        let keys = [issuer.public()];
        let t = issuer.issue(&claims("10.1.2.3")).expect("ticket");
        let vid = "ab".repeat(32);
        let from: IpAddr = "10.1.2.3".parse().expect("ip");
        assert!(verify(&keys, Some(&t), Scope::Pieces, &vid, from).is_ok());
        // The same address as an IPv4-mapped IPv6 peer address.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert!(verify(&keys, Some(&t), Scope::Pieces, &vid, mapped).is_ok());
        let err = |t: Option<&str>, scope, vid: &str, from: &str| {
            verify(&keys, t, scope, vid, from.parse().expect("ip")).expect_err("refused")
        };
        assert_eq!(
            err(None, Scope::Pieces, &vid, "10.1.2.3"),
            TicketError::Missing
        );
        assert_eq!(
            err(Some(&t), Scope::Pieces, &"cd".repeat(32), "10.1.2.3"),
            TicketError::WrongVersion
        );
        assert_eq!(
            err(Some(&t), Scope::Index, &vid, "10.1.2.3"),
            TicketError::WrongScope
        );
        assert_eq!(
            err(Some(&t), Scope::Pieces, &vid, "10.1.2.4"),
            TicketError::WrongHolder
        );
        let forged = other.issue(&claims("10.1.2.3")).expect("ticket");
        assert_eq!(
            err(Some(&forged), Scope::Pieces, &vid, "10.1.2.3"),
            TicketError::BadSignature
        );
        assert_eq!(
            err(Some("not a ticket"), Scope::Pieces, &vid, "10.1.2.3"),
            TicketError::Malformed
        );
        // One flipped bit anywhere breaks the signature.
        let mut raw = URL_SAFE_NO_PAD.decode(&t).expect("b64");
        raw[40] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(
            err(Some(&tampered), Scope::Pieces, &vid, "10.1.2.3"),
            TicketError::BadSignature
        );
    }

    #[test]
    fn expiry_and_unbound_holders() {
        let issuer = Issuer::generate().expect("key");
        let mut c = claims("0.0.0.0");
        c.scope = Scope::Index;
        let t = issuer.issue(&c).expect("ticket");
        let decoded = decode(&issuer.public(), &t).expect("decode");
        let from: IpAddr = "192.0.2.9".parse().expect("ip");
        assert!(check(decoded.clone(), Scope::Index, &c.version_id, from, now()).is_ok());
        assert_eq!(
            check(
                decoded,
                Scope::Index,
                &c.version_id,
                from,
                c.expires + SKEW + 1
            ),
            Err(TicketError::Expired)
        );
    }

    #[test]
    fn the_key_is_kept_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("keys/ticket.key");
        let a = Issuer::load_or_create(&path).expect("create");
        let b = Issuer::load_or_create(&path).expect("load");
        assert_eq!(a.public(), b.public());
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"junk").expect("write");
        assert!(matches!(
            Issuer::load_or_create(&path),
            Err(TicketError::Key { .. })
        ));
    }
}

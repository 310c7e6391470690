//! Sources: where content comes from when it does not come from a peer. Supernodes use them for
//! back-to-source; peers use them only when no supernode is reachable.

mod http;
pub mod policy;
pub mod token;

pub use http::{HttpSource, OriginResponse, Probe};
pub use policy::OriginPolicy;

/// One request header forwarded to the origin (`Authorization`, `Cookie`, `-H ...`).
pub type HeaderPair = (String, String);

/// The error's cause chain on one line: `a: b: c`, skipping repeats.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// `url` without credentials, query and fragment: what may be logged or kept of a URL whose
/// userinfo or signed query parameters are secrets.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            u.set_fragment(None);
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

//! Sources: where content comes from when it does not come from a peer. Supernodes use them for
//! back-to-source; peers use them only when no supernode is reachable.

pub mod hosts;
mod http;
pub mod image;
pub mod policy;
pub mod token;

pub use http::{HttpSource, OriginResponse, Probe};
pub use policy::OriginPolicy;

/// One request header forwarded to the origin (`Authorization`, `Cookie`, `-H ...`).
pub type HeaderPair = (String, String);

/// Why a body could not be read whole: the connection failed, or it passed the bound.
#[derive(Debug)]
pub enum BodyError {
    Read(reqwest::Error),
    TooLarge(usize),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read(e) => f.write_str(&error_chain(e)),
            Self::TooLarge(max) => write!(f, "answer larger than {max} bytes"),
        }
    }
}

/// The whole body of `resp`, read in chunks and given up as soon as it passes `max` bytes
/// (whatever `Content-Length` says or does not say), so a small answer from the network never
/// becomes an unbounded allocation.
pub async fn read_bounded(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<bytes::Bytes, BodyError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    // Sized once from the announced length (already bounded), so the buffer does not double.
    let announced = resp.content_length().map_or(0, |n| n as usize);
    let mut body = bytes::BytesMut::with_capacity(announced);
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The error's cause chain on one line: `a: b: c`, skipping repeats, with every URL in it
/// redacted (HTTP clients name the URL, userinfo and signed query included, in their errors).
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
    redact_urls(&parts.join(": "))
}

/// `text` with every `scheme://…` word in it [`redact`]ed.
pub fn redact_urls(text: &str) -> String {
    if !text.contains("://") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.contains("://") {
            let end = word.trim_end_matches(['.', ',', ';', ':', '"', '\'']).len();
            out.push_str(&redact(&word[..end]));
            out.push_str(&word[end..]);
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace() || matches!(c, '(' | ')' | '<' | '>' | '"' | '\'') {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_urls_without_their_secrets() {
        let msg = "error sending request for url (http://deploy:hunter2@10.0.0.1/a.bin?X-Amz-Signature=s3cr3t&x=1): connection refused";
        let r = redact_urls(msg);
        assert_eq!(
            r,
            "error sending request for url (http://10.0.0.1/a.bin): connection refused"
        );
        assert_eq!(redact_urls("no url here: 42"), "no url here: 42");
        assert_eq!(redact_urls("see https://h/x?token=t."), "see https://h/x.");
    }
}

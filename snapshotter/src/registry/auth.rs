//! Registry authentication: the challenge a registry's `GET /v2/` answers with (`Basic`, or
//! `Bearer realm=..,service=..`) and the token a token server's JSON answer carries.

/// What a registry's `/v2/` answered.
#[derive(Clone, Debug)]
pub enum Challenge {
    None,
    Basic,
    Bearer { realm: String, service: String },
}

/// `Basic ...` or `Bearer realm="..",service=".."`.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, params) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = String::new();
    for part in split_params(params) {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(v),
            "service" => service = v,
            _ => {}
        }
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
    })
}

/// Splits `a="x,y",b=z` at the commas outside quotes.
fn split_params(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The `token` (or `access_token`) of a token server's JSON answer.
pub fn token_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("token")
        .or_else(|| v.get("access_token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_and_tokens() {
        match parse_challenge(r#"Bearer realm="https://t.example/token?x=1,2",service="reg""#) {
            Some(Challenge::Bearer { realm, service }) => {
                assert_eq!(realm, "https://t.example/token?x=1,2");
                assert_eq!(service, "reg");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_challenge("Basic realm=x"),
            Some(Challenge::Basic)
        ));
        assert!(parse_challenge("Negotiate").is_none());

        assert_eq!(token_of(br#"{"access_token":"t1"}"#), Some("t1".into()));
    }
}

//! Docker credential helpers: `docker-credential-<name> get` with the server on standard input
//! answers `{"ServerURL":..,"Username":..,"Secret":..}` on standard output (the protocol of
//! docker/docker-credential-helpers). Run with a deadline and a bounded answer; the secret is
//! never logged, and a helper's refusal is reported by its first line.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};

/// A helper that takes longer than this is given up on.
const DEADLINE: Duration = Duration::from_secs(10);
/// Answers larger than this are refused.
const MAX_ANSWER: u64 = 64 << 10;

/// Whether `name` can be a helper's name (it becomes part of a program name on `PATH`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

/// `(user, password)` from `docker-credential-<helper> get` for `server`.
pub async fn get(helper: &str, server: &str) -> Result<(String, String)> {
    if !valid_name(helper) {
        return Err(Error::Credentials(format!(
            "{helper:?} is not a credential helper name"
        )));
    }
    let program = format!("docker-credential-{helper}");
    let fail = |detail: String| Error::Credentials(format!("{program} get {server}: {detail}"));
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run: {e}")))?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(server.as_bytes()).await?;
        }
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            stdout.take(MAX_ANSWER + 1).read_to_end(&mut out).await?;
        }
        let mut err = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            stderr.take(4096).read_to_end(&mut err).await?;
        }
        Ok::<_, std::io::Error>((child.wait().await?, out, err))
    };
    let (status, out, err) = tokio::time::timeout(DEADLINE, run)
        .await
        .map_err(|_| fail(format!("no answer within {}s", DEADLINE.as_secs())))?
        .map_err(|e| fail(e.to_string()))?;
    if !status.success() {
        // Helpers report "credentials not found" and the like on stdout or stderr.
        let text = if out.is_empty() { &err } else { &out };
        let line = String::from_utf8_lossy(text)
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
        return Err(fail(format!("{status}: {line}")));
    }
    if out.len() as u64 > MAX_ANSWER {
        return Err(fail(format!("answer larger than {MAX_ANSWER} bytes")));
    }
    parse_answer(&out).map_err(fail)
}

/// The user and secret of a helper's answer.
fn parse_answer(out: &[u8]) -> Result<(String, String), String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let a: Answer =
        serde_json::from_slice(out).map_err(|e| format!("answer is not helper JSON: {e}"))?;
    if a.username == "<token>" {
        return Err("identity tokens (Username \"<token>\") are not supported; \
                    store a user and password or an access token"
            .into());
    }
    if a.username.is_empty() || a.secret.is_empty() {
        return Err("answer has no Username or Secret".into());
    }
    Ok((a.username, a.secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_names() {
        assert_eq!(
            parse_answer(br#"{"ServerURL":"r","Username":"alice","Secret":"s"}"#),
            Ok(("alice".into(), "s".into()))
        );
        assert!(parse_answer(br#"{"Username":"<token>","Secret":"rt"}"#).is_err());
        assert!(parse_answer(br#"{"Username":"alice"}"#).is_err());
        let err = parse_answer(b"not json").expect_err("junk");
        assert!(err.contains("not helper JSON"), "{err}");
        assert!(valid_name("ecr-login") && valid_name("pass") && valid_name("test_1.2"));
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_missing_helper_is_named() {
        let err = get("damselfly-no-such-helper", "reg.example")
            .await
            .expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("docker-credential-damselfly-no-such-helper"),
            "{msg}"
        );
    }
}

//! Which token realms the supernode serves: only those a registry under the origin policy
//! announces itself (the `realm` of the Bearer challenge its `GET /v2/` answers with), asked of
//! the registry by the supernode, never taken from the requester. So `Token` cannot be pointed at
//! an arbitrary URL (metadata services, internal admin APIs) with the attacker's headers.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fetcher::source::HttpSource;
use fetcher::source::token::{realm_key, registry_base};

/// How long a registry's announced realms are believed.
const FRESH: Duration = Duration::from_secs(300);
/// Registries remembered.
const MAX_REGISTRIES: usize = 1024;

/// Announced realms per registry base URL.
#[derive(Default)]
pub struct Realms {
    known: Mutex<HashMap<String, (Instant, HashSet<String>)>>,
}

impl Realms {
    /// Ok when `registry` (a base URL) announces the realm of `token_url`; else why not.
    pub async fn check(
        &self,
        source: &HttpSource,
        registry: &str,
        token_url: &url::Url,
    ) -> Result<(), String> {
        let registry = url::Url::parse(registry)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                "the token request names no registry (the agent must be upgraded)".to_owned()
            })?;
        let base = registry_base(&registry);
        let want = realm_key(token_url);
        if self.announces(&base, &want) == Some(true) {
            return Ok(());
        }
        let realms = self.ask(source, &base).await?;
        let ok = realms.contains(&want);
        if let Ok(mut m) = self.known.lock() {
            if m.len() >= MAX_REGISTRIES {
                m.retain(|_, (at, _)| at.elapsed() < FRESH);
            }
            if m.len() < MAX_REGISTRIES {
                m.insert(base.clone(), (Instant::now(), realms));
            }
        }
        if ok {
            Ok(())
        } else {
            Err(format!("{want} is not a token realm {base} announces"))
        }
    }

    fn announces(&self, base: &str, realm: &str) -> Option<bool> {
        let m = self.known.lock().ok()?;
        let (at, set) = m.get(base)?;
        (at.elapsed() < FRESH).then(|| set.contains(realm))
    }

    /// The realms of the Bearer challenges `GET <base>/v2/` answers with.
    async fn ask(&self, source: &HttpSource, base: &str) -> Result<HashSet<String>, String> {
        let url = url::Url::parse(&format!("{base}/v2/")).map_err(|e| e.to_string())?;
        if let Some(p) = source.policy() {
            p.check(&url).map_err(|e| e.to_string())?;
        }
        let resp = source
            .client_for(&url)
            .map_err(|e| e.to_string())?
            .get(url.clone())
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "cannot ask {base} for its token realm: {}",
                    fetcher::source::error_chain(&e)
                )
            })?;
        Ok(resp
            .headers()
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(fetcher::source::token::bearer_realm)
            .map(|u| realm_key(&u))
            .collect())
    }
}

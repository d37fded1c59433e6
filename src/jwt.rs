//! JWT authentication by configuration (docs/auth.md): an [`Extension`] whose
//! `on_authenticate` verifies the client's token with the configured keys and maps its claims
//! to access: the documents it may open (exact names or `*`/`?` glob patterns), read-only
//! access (a claim, or a second list of patterns), and a user object for the connection's
//! context.
//!
//! Verification is `jsonwebtoken`'s: the signature is checked before any claim is read, only the
//! configured algorithms of the key's family are accepted (`none` never is), `exp` is required,
//! `nbf`, `aud` and `iss` are checked, with `jwt_leeway_s` of clock skew either way; `iat` in
//! the future beyond the leeway is refused too. Keys come from a shared secret (HS*), a PEM
//! public key file (RS*, PS*, ES*, EdDSA), a JWKS file, re-read when it changes, or a JWKS URL,
//! fetched at start, every `jwt_jwks_refresh_s` and when a token names an unknown `kid` (at most
//! every 10 s); a key set's keys are chosen by the token's `kid`. A key or key set embedded in the token (`jwk`, `jku`) is never
//! used.
//!
//! **Invariant:** a token longer than [`MAX_TOKEN_BYTES`] is refused before it is decoded;
//! every refusal is Hocuspocus's `permission-denied` (the reason is logged, not sent).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tracing::{debug, warn};

use crate::config::{Config, ConfigError};
use crate::hooks::{AuthPayload, Extension, HookError, HookResult};

/// Longest token accepted (bytes); longer ones are refused undecoded.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most patterns read from one claim.
const MAX_PATTERNS: usize = 256;
/// Longest pattern.
const MAX_PATTERN_BYTES: usize = 1024;
/// How often a JWKS file is checked for changes.
const JWKS_RECHECK: Duration = Duration::from_secs(1);
/// Fewest time between two fetches of a JWKS URL.
const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);
/// Longest wait for a JWKS URL.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read from a URL.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Marks a refusal because the token's `kid` is not in the key set.
const UNKNOWN_KID: &str = "unknown kid";

/// Where the verifying keys come from.
enum Keys {
    /// One key (a secret or a PEM public key).
    Single(Box<DecodingKey>),
    /// A JWKS file, re-read when its modification time changes.
    Jwks {
        path: PathBuf,
        state: Mutex<JwksState>,
    },
    /// A JWKS fetched from a URL, refreshed every `jwt_jwks_refresh_s` and when a token names
    /// a `kid` it does not hold (at most once per [`JWKS_MIN_REFETCH`]).
    JwksUrl(Box<JwksUrl>),
}

/// The state of a JWKS fetched over HTTP.
struct JwksUrl {
    url: reqwest::Url,
    http: reqwest::Client,
    refresh: Duration,
    set: Mutex<UrlState>,
    /// Held while a fetch runs, so concurrent authentications wait for one fetch.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct UrlState {
    set: JwkSet,
    /// When the set was last fetched successfully.
    fetched: Option<Instant>,
    /// When a fetch was last tried.
    tried: Option<Instant>,
}

impl JwksUrl {
    /// Fetches the set once (bounded in time and size); keeps the previous set on any failure.
    async fn fetch(&self) {
        let _one = self.fetching.lock().await;
        let now = Instant::now();
        {
            let mut s = self.set.lock().unwrap_or_else(|p| p.into_inner());
            if s.tried
                .is_some_and(|t| now.duration_since(t) < JWKS_MIN_REFETCH)
            {
                return; // another caller just fetched
            }
            s.tried = Some(now);
        }
        let got = tokio::time::timeout(JWKS_FETCH_TIMEOUT, async {
            let mut r = self
                .http
                .get(self.url.clone())
                .send()
                .await
                .map_err(|e| e.without_url().to_string())?;
            if !r.status().is_success() {
                return Err(format!("answered HTTP {}", r.status()));
            }
            let body = crate::webhook::read_capped(&mut r, MAX_JWKS_BYTES)
                .await
                .map_err(|e| e.without_url().to_string())?
                .ok_or_else(|| format!("key set larger than {MAX_JWKS_BYTES} bytes"))?;
            serde_json::from_slice::<JwkSet>(&body).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {JWKS_FETCH_TIMEOUT:?}")));
        match got {
            Ok(set) if !set.keys.is_empty() => {
                debug!(keys = set.keys.len(), "JWKS fetched");
                let mut s = self.set.lock().unwrap_or_else(|p| p.into_inner());
                s.set = set;
                s.fetched = Some(Instant::now());
            }
            Ok(_) => warn!(url = %self.shown(), "JWKS has no keys; keeping the previous set"),
            Err(e) => {
                warn!(url = %self.shown(), error = %e, "cannot fetch the JWKS; keeping the previous set")
            }
        }
    }

    /// The URL for logs: no credentials, no query.
    fn shown(&self) -> String {
        let mut u = self.url.clone();
        let _ = u.set_username("");
        let _ = u.set_password(None);
        u.set_query(None);
        u.to_string()
    }

    /// True when the set is due for its periodic refresh (or was never fetched).
    fn due(&self) -> bool {
        let s = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let stale = s.fetched.is_none_or(|t| t.elapsed() >= self.refresh);
        let may = s.tried.is_none_or(|t| t.elapsed() >= JWKS_MIN_REFETCH);
        stale && may
    }

    /// True when a fetch may be tried now (the last try is old enough).
    fn may_refetch(&self) -> bool {
        let s = self.set.lock().unwrap_or_else(|p| p.into_inner());
        s.tried.is_none_or(|t| t.elapsed() >= JWKS_MIN_REFETCH)
    }
}

struct JwksState {
    set: JwkSet,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// The JWT extension (built from the `jwt_*` settings).
pub struct JwtAuth {
    keys: Keys,
    algorithms: Vec<Algorithm>,
    audience: Vec<String>,
    issuer: Vec<String>,
    leeway: u64,
    documents_claim: String,
    read_only_claim: String,
    read_only_documents_claim: String,
    user_claim: String,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth")
            .field("algorithms", &self.algorithms)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

fn invalid(name: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        message: message.into(),
    }
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

fn read_jwks(path: &PathBuf) -> Result<(JwkSet, Option<SystemTime>), String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let set: JwkSet =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((set, modified))
}

impl JwtAuth {
    /// The extension for `config`, or `None` when no JWT key is configured. Errors name the
    /// setting and the cause.
    pub fn from_config(config: &Config) -> Result<Option<JwtAuth>, ConfigError> {
        let secret = !config.jwt_secret.is_empty();
        let pem = !config.jwt_public_key_file.as_os_str().is_empty();
        let pem_inline = !config.jwt_public_key.trim().is_empty();
        let jwks = !config.jwt_jwks_file.as_os_str().is_empty();
        let jwks_url = !config.jwt_jwks_url.is_empty();
        match [secret, pem, pem_inline, jwks, jwks_url]
            .iter()
            .filter(|s| **s)
            .count()
        {
            0 => return Ok(None),
            1 => {}
            _ => {
                return Err(invalid(
                    "jwt_secret",
                    "set exactly one of jwt_secret, jwt_public_key, jwt_public_key_file, jwt_jwks_file and jwt_jwks_url",
                ));
            }
        }
        let asymmetric = vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
        ];
        let (keys, family_algs): (Keys, Vec<Algorithm>) = if jwks_url {
            let url = reqwest::Url::parse(&config.jwt_jwks_url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
                .ok_or_else(|| invalid("jwt_jwks_url", "must be an http:// or https:// URL"))?;
            if config.jwt_jwks_refresh_s == 0 {
                return Err(invalid("jwt_jwks_refresh_s", "must be > 0"));
            }
            let http = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::limited(3))
                .connect_timeout(JWKS_FETCH_TIMEOUT)
                .build()
                .map_err(|e| {
                    invalid("jwt_jwks_url", format!("cannot build the HTTP client: {e}"))
                })?;
            let state = JwksUrl {
                url,
                http,
                refresh: Duration::from_secs(config.jwt_jwks_refresh_s),
                set: Mutex::new(UrlState::default()),
                fetching: tokio::sync::Mutex::new(()),
            };
            (Keys::JwksUrl(Box::new(state)), asymmetric)
        } else if secret {
            if config.jwt_secret.len() < 32 {
                return Err(invalid(
                    "jwt_secret",
                    "at least 32 bytes are required for an HMAC key",
                ));
            }
            let key = DecodingKey::from_secret(config.jwt_secret.as_bytes())
                .map_err(|e| invalid("jwt_secret", e.to_string()))?;
            let algs = key.family().algorithms().to_vec();
            (Keys::Single(Box::new(key)), algs)
        } else if pem || pem_inline {
            let (name, shown, bytes) = if pem_inline {
                (
                    "jwt_public_key",
                    "the key".to_owned(),
                    config.jwt_public_key.replace("\\n", "\n").into_bytes(),
                )
            } else {
                let path = &config.jwt_public_key_file;
                let bytes = std::fs::read(path).map_err(|e| {
                    invalid("jwt_public_key_file", format!("{}: {e}", path.display()))
                })?;
                ("jwt_public_key_file", path.display().to_string(), bytes)
            };
            let key = DecodingKey::from_rsa_pem(&bytes)
                .or_else(|_| DecodingKey::from_ec_pem(&bytes))
                .or_else(|_| DecodingKey::from_ed_pem(&bytes))
                .map_err(|_| {
                    invalid(
                        name,
                        format!("{shown}: not a PEM RSA, EC or Ed25519 public key"),
                    )
                })?;
            let algs = key.family().algorithms().to_vec();
            (Keys::Single(Box::new(key)), algs)
        } else {
            let path = config.jwt_jwks_file.clone();
            let (set, modified) = read_jwks(&path).map_err(|e| invalid("jwt_jwks_file", e))?;
            if set.keys.is_empty() {
                return Err(invalid("jwt_jwks_file", "the key set has no keys"));
            }
            let state = Mutex::new(JwksState {
                set,
                modified,
                checked: Instant::now(),
            });
            (Keys::Jwks { path, state }, asymmetric)
        };
        let algorithms = if config.jwt_algorithms.trim().is_empty() {
            family_algs
        } else {
            let mut out = Vec::new();
            for name in list(&config.jwt_algorithms) {
                let alg: Algorithm = name.parse().map_err(|_| {
                    invalid(
                        "jwt_algorithms",
                        format!("unknown algorithm {name:?} (HS256, RS256, ES256, EdDSA, …)"),
                    )
                })?;
                if !family_algs.contains(&alg) {
                    return Err(invalid(
                        "jwt_algorithms",
                        format!("{name} does not fit the configured key"),
                    ));
                }
                out.push(alg);
            }
            out
        };
        Ok(Some(JwtAuth {
            keys,
            algorithms,
            audience: list(&config.jwt_audience),
            issuer: list(&config.jwt_issuer),
            leeway: config.jwt_leeway_s,
            documents_claim: config.jwt_documents_claim.clone(),
            read_only_claim: config.jwt_read_only_claim.clone(),
            read_only_documents_claim: config.jwt_read_only_documents_claim.clone(),
            user_claim: config.jwt_user_claim.clone(),
        }))
    }

    /// The key for a token whose header names `kid`.
    fn key_for(&self, kid: Option<&str>) -> Result<DecodingKey, String> {
        match &self.keys {
            Keys::Single(k) => Ok((**k).clone()),
            Keys::Jwks { path, state } => {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                if s.checked.elapsed() >= JWKS_RECHECK {
                    s.checked = Instant::now();
                    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                    if modified != s.modified {
                        match read_jwks(path) {
                            Ok((set, modified)) if !set.keys.is_empty() => {
                                s.set = set;
                                s.modified = modified;
                            }
                            Ok(_) => debug!("JWKS file has no keys; keeping the previous set"),
                            Err(e) => {
                                debug!(error = %e, "JWKS file unreadable; keeping the previous set")
                            }
                        }
                    }
                }
                key_in(&s.set, kid)
            }
            Keys::JwksUrl(u) => {
                let s = u.set.lock().unwrap_or_else(|p| p.into_inner());
                key_in(&s.set, kid)
            }
        }
    }

    /// Verifies `token`, first fetching a JWKS URL that is due, and once more when the token
    /// names a `kid` the set does not hold (a key rotated in since the last fetch).
    async fn verify_fresh(&self, token: &str) -> Result<Map<String, Value>, String> {
        let Keys::JwksUrl(u) = &self.keys else {
            return self.verify(token);
        };
        if u.due() {
            u.fetch().await;
        }
        match self.verify(token) {
            Err(e) if e.starts_with(UNKNOWN_KID) && u.may_refetch() => {
                u.fetch().await;
                self.verify(token)
            }
            other => other,
        }
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!("token of {} bytes", token.len()));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(format!("algorithm {:?} not accepted", header.alg));
        }
        let key = self.key_for(header.kid.as_deref())?;
        let mut v = Validation::new(header.alg);
        v.algorithms = self
            .algorithms
            .iter()
            .copied()
            .filter(|a| key.family().algorithms().contains(a))
            .collect();
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
        }
        if !self.issuer.is_empty() {
            v.set_issuer(&self.issuer);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v)
            .map_err(|e| format!("{e}"))?;
        let claims = data.claims;
        if let Some(iat) = claims.get("iat").and_then(Value::as_f64) {
            let now = jsonwebtoken::get_current_timestamp() as f64;
            if iat > now + self.leeway as f64 {
                return Err("issued in the future (iat)".into());
            }
        }
        Ok(claims)
    }

    /// The access `claims` give to `document`: `None` (denied) or `Some(read_only)`.
    pub fn access(&self, claims: &Map<String, Value>, document: &str) -> Option<bool> {
        let read_only_claim = claims
            .get(&self.read_only_claim)
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if patterns(claims.get(&self.documents_claim))
            .iter()
            .any(|p| glob_match(p, document))
        {
            return Some(read_only_claim);
        }
        if patterns(claims.get(&self.read_only_documents_claim))
            .iter()
            .any(|p| glob_match(p, document))
        {
            return Some(true);
        }
        None
    }

    /// The user object hooks see as `context.user`.
    fn user(&self, claims: &Map<String, Value>) -> Value {
        let mut user = match claims.get(&self.user_claim) {
            Some(Value::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        if let Some(sub) = claims.get("sub")
            && !user.contains_key("id")
        {
            user.insert("id".into(), sub.clone());
        }
        Value::Object(user)
    }
}

/// The patterns of a claim: a string or an array of strings, bounded.
fn patterns(v: Option<&Value>) -> Vec<&str> {
    match v {
        Some(Value::String(s)) if s.len() <= MAX_PATTERN_BYTES => vec![s.as_str()],
        Some(Value::Array(a)) => a
            .iter()
            .take(MAX_PATTERNS)
            .filter_map(Value::as_str)
            .filter(|s| s.len() <= MAX_PATTERN_BYTES)
            .collect(),
        _ => Vec::new(),
    }
}

/// `*` matches any run of characters (`/` included), `?` exactly one; everything else matches
/// itself. Iterative, O(pattern × name) at worst.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut i, mut j) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || (p[i] != '*' && p[i] == n[j])) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    while i < p.len() && p[i] == '*' {
        i += 1;
    }
    i == p.len()
}

/// The key `kid` names in `set` (or its only key when the token names none).
fn key_in(set: &JwkSet, kid: Option<&str>) -> Result<DecodingKey, String> {
    let jwk = match kid {
        Some(kid) => set
            .find(kid)
            .ok_or_else(|| format!("{UNKNOWN_KID} {kid:?}"))?,
        None if set.keys.len() == 1 => &set.keys[0],
        None if set.keys.is_empty() => return Err(format!("{UNKNOWN_KID}: the key set is empty")),
        None => {
            return Err("the token has no kid and the key set has several keys".into());
        }
    };
    DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))
}

#[async_trait]
impl Extension for JwtAuth {
    fn name(&self) -> &str {
        "jwt"
    }

    /// Fetches a JWKS URL before the node listens (a failure is logged, and the fetch is
    /// tried again at the first authentication).
    async fn on_configure(&self, _config: &Config) -> HookResult {
        if let Keys::JwksUrl(u) = &self.keys {
            u.fetch().await;
        }
        Ok(())
    }

    async fn on_authenticate(&self, payload: &mut AuthPayload<'_>) -> HookResult {
        let claims = match self.verify_fresh(payload.token).await {
            Ok(c) => c,
            Err(why) => {
                debug!(doc = payload.document_name, reason = %why, "JWT refused");
                return Err(HookError::permission_denied());
            }
        };
        let Some(read_only) = self.access(&claims, payload.document_name) else {
            debug!(
                doc = payload.document_name,
                "JWT refused: the document is outside the token's patterns"
            );
            return Err(HookError::permission_denied());
        };
        payload.read_only |= read_only;
        payload.valid_until = self.valid_until(&claims);
        self.set_context(payload, &claims);
        Ok(())
    }

    /// A fresh token for an established connection: it must verify and still give access to
    /// the document, and as much as the connection has (a read-only token cannot keep a
    /// read-write connection); the connection then lives until the new token's expiry.
    async fn on_token_sync(&self, payload: &mut AuthPayload<'_>) -> HookResult {
        let claims = self.verify_fresh(payload.token).await.map_err(|why| {
            debug!(doc = payload.document_name, reason = %why, "JWT token sync refused");
            HookError::reject("Unauthorized")
        })?;
        match self.access(&claims, payload.document_name) {
            Some(read_only) if !read_only || payload.read_only => {
                payload.valid_until = self.valid_until(&claims);
                // the connection now speaks for the new token (revocations match its ids)
                self.set_context(payload, &claims);
                Ok(())
            }
            _ => {
                debug!(
                    doc = payload.document_name,
                    "JWT token sync refused: less access than the connection has"
                );
                Err(HookError::reject("Unauthorized"))
            }
        }
    }
}

impl JwtAuth {
    /// Puts the token's user (`context.user`) and ids (`context.token`: `sub`, `jti`, `exp`,
    /// `iss`) into the connection's context.
    fn set_context(&self, payload: &mut AuthPayload<'_>, claims: &Map<String, Value>) {
        payload.context.insert("user".into(), self.user(claims));
        let mut token = Map::new();
        for k in ["sub", "jti", "exp", "iss"] {
            if let Some(v) = claims.get(k) {
                token.insert(k.into(), v.clone());
            }
        }
        payload.context.insert("token".into(), Value::Object(token));
    }

    /// When the token's access ends: its `exp` plus the leeway.
    fn valid_until(&self, claims: &Map<String, Value>) -> Option<SystemTime> {
        let exp = claims.get("exp").and_then(Value::as_f64)?;
        let secs = (exp.max(0.0) as u64).saturating_add(self.leeway);
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_exact_prefix_and_wildcards() {
        assert!(glob_match("notes/2024", "notes/2024"));
        assert!(!glob_match("notes/2024", "notes/2025"));
        assert!(glob_match("notes/*", "notes/2024"));
        assert!(glob_match("notes/*", "notes/a/b"));
        assert!(!glob_match("notes/*", "other/a"));
        assert!(glob_match("*", ""));
        assert!(glob_match("team-?/*", "team-a/doc"));
        assert!(!glob_match("team-?/*", "team-ab/doc"));
        assert!(glob_match("*-draft", "x-y-draft"));
        assert!(!glob_match("", "x"));
        // a pathological pattern stays polynomial
        let p = "*a".repeat(20);
        let n = "a".repeat(500) + "b";
        assert!(!glob_match(&p, &n));
    }
}

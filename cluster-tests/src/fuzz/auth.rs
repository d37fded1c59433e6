//! The auth target: what reaches the authentication code from outside. A case is a JWT (signed
//! with the target's secret, then maybe mutated) checked against a document name, an
//! authentication webhook answer (status and body), a revocation request body of the admin
//! API, and a revocation payload from a peer node; each goes through the function the server
//! uses.

use std::sync::OnceLock;

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

use super::mutate;
use super::targets::Outcome;

const SECRET: &str = "fuzz-jwt-secret-0123456789abcdef-0123456789";

fn jwt() -> Option<&'static hearth::jwt::JwtAuth> {
    static AUTH: OnceLock<Option<hearth::jwt::JwtAuth>> = OnceLock::new();
    AUTH.get_or_init(|| {
        let config = hearth::Config {
            jwt_secret: SECRET.into(),
            ..hearth::Config::for_tests()
        };
        hearth::jwt::JwtAuth::from_config(&config).ok().flatten()
    })
    .as_ref()
}

fn token(rng: &mut StdRng) -> Vec<u8> {
    let now = jsonwebtoken::get_current_timestamp();
    let docs = match rng.random_range(0..4) {
        0 => json!("*"),
        1 => json!(["a/*", "b?", "exact"]),
        2 => json!([{"nested": [1, 2]}, null, 3]),
        _ => json!(null),
    };
    let claims = json!({ "sub": "u", "jti": "j", "exp": now + 60, "docs": docs,
                         "docs_ro": ["ro/*"], "read_only": rng.random_bool(0.2),
                         "user": { "name": "n", "deep": [[[{}]]] } });
    jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())
        .and_then(|k| jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &k))
        .unwrap_or_default()
        .into_bytes()
}

fn answer(rng: &mut StdRng) -> Vec<u8> {
    let access = ["read-write", "read-only", "deny", "allow", "maybe"][rng.random_range(0..5)];
    json!({ "access": access, "context": { "user": { "id": "42" } }, "reason": "r\u{7}x",
            "expiresAt": rng.random_range(-10.0..3e9f64) })
    .to_string()
    .into_bytes()
}

fn revocation(rng: &mut StdRng) -> Vec<u8> {
    let kind = ["user", "token", "document", "other"][rng.random_range(0..4)];
    json!({ kind: "v", "ttl_s": rng.random_range(0..100_000u64) })
        .to_string()
        .into_bytes()
}

fn node_change(rng: &mut StdRng) -> Vec<u8> {
    if rng.random_bool(0.5) {
        json!({ "revoke": { "user": "u", "until_ms": rng.random::<u64>() } })
    } else {
        json!({ "lift": { "document": "d" } })
    }
    .to_string()
    .into_bytes()
}

/// Builds a case: token, document name, webhook status, webhook body, admin body, node
/// payload.
pub fn build(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let status: u16 = [200, 200, 403, 500, 404, 299][rng.random_range(0..6)];
    let mut parts = vec![
        token(rng),
        b"a/doc".to_vec(),
        status.to_be_bytes().to_vec(),
        answer(rng),
        revocation(rng),
        node_change(rng),
    ];
    for p in &mut parts {
        if rng.random_bool(0.6) {
            *p = mutate::mutate(rng, std::mem::take(p));
        }
    }
    parts
}

/// Runs a case.
pub fn feed(input: &[Vec<u8>], out: &mut Outcome) {
    let [token, doc, status, body, admin, node] = input else {
        return;
    };
    let mut count = |ok: bool| {
        if ok {
            out.accepted += 1;
        } else {
            out.refused += 1;
        }
    };
    if let Some(auth) = jwt() {
        let token = String::from_utf8_lossy(token);
        match auth.verify(&token) {
            Ok(claims) => {
                count(true);
                let _ = auth.access(&claims, &String::from_utf8_lossy(doc));
            }
            Err(_) => count(false),
        }
    }
    let status = match status[..] {
        [a, b] => u16::from_be_bytes([a, b]),
        _ => 200,
    };
    count(hearth::webhook::auth::check_answer(status, body).is_ok());
    count(hearth::admin::parse_revocation(admin).is_ok());
    count(hearth::revoke::NodeChange::parse(node).is_ok());
}

//! JWT authentication by configuration (docs/auth.md): what a client sees on the wire for
//! each kind of token, with an HMAC secret, PEM public keys (RS256, ES256, EdDSA) and a JWKS
//! file chosen by `kid`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::*;
use hearth::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "jwt-test-secret-0123456789abcdef-0123456789";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims valid for an hour for documents `docs`.
fn claims(docs: Value) -> Value {
    json!({ "sub": "user-1", "exp": now() + 3600, "iat": now(), "docs": docs,
            "user": { "name": "Ada" } })
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    encode(&h, claims, key).unwrap()
}

fn hs(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        None,
        claims,
    )
}

/// What the server answers a fresh client's Auth with `token` for `doc`.
async fn answer(server: &TestServer, doc: &str, token: &str) -> Msg {
    let mut c = RawClient::connect(server.addr).await;
    c.send(auth(doc, token)).await;
    c.recv_for(doc).await
}

fn rw() -> Msg {
    Msg::Authenticated("read-write".into())
}
fn ro() -> Msg {
    Msg::Authenticated("readonly".into())
}
fn denied() -> Msg {
    Msg::PermissionDenied("permission-denied".into())
}

#[tokio::test]
async fn hmac_tokens_map_claims_to_access() {
    let s = start(Config {
        jwt_secret: SECRET.into(),
        jwt_audience: "hearth".into(),
        jwt_issuer: "https://app.example".into(),
        // every refusal counts towards the failed-authentication ban; this test makes many
        auth_failures_before_ban: 0,
        ..test_config()
    })
    .await;
    let base = |docs: Value| {
        let mut c = claims(docs);
        c["aud"] = json!("hearth");
        c["iss"] = json!("https://app.example");
        c
    };
    // valid, by exact name, prefix and glob
    assert_eq!(
        answer(&s, "notes/1", &hs(&base(json!("notes/1")))).await,
        rw()
    );
    assert_eq!(
        answer(&s, "notes/2", &hs(&base(json!(["x", "notes/*"])))).await,
        rw()
    );
    assert_eq!(
        answer(&s, "team-a/doc", &hs(&base(json!(["team-?/*"])))).await,
        rw()
    );
    // outside the patterns, or no patterns at all
    assert_eq!(
        answer(&s, "other", &hs(&base(json!(["notes/*"])))).await,
        denied()
    );
    let mut none = base(json!([]));
    none.as_object_mut().unwrap().remove("docs");
    assert_eq!(answer(&s, "notes/1", &hs(&none)).await, denied());
    // read-only: a claim, or the read-only list
    let mut c = base(json!("*"));
    c["read_only"] = json!(true);
    assert_eq!(answer(&s, "any", &hs(&c)).await, ro());
    let mut c = base(json!(["mine/*"]));
    c["docs_ro"] = json!(["shared/*"]);
    assert_eq!(answer(&s, "shared/x", &hs(&c)).await, ro());
    assert_eq!(answer(&s, "mine/x", &hs(&c)).await, rw());
    // time
    let mut c = base(json!("*"));
    c["exp"] = json!(now() - 60);
    assert_eq!(answer(&s, "d", &hs(&c)).await, denied(), "expired");
    let mut c = base(json!("*"));
    c["exp"] = json!(now() + 1);
    assert_eq!(
        answer(&s, "d", &hs(&c)).await,
        rw(),
        "expiring within the leeway"
    );
    let mut c = base(json!("*"));
    c["nbf"] = json!(now() + 600);
    assert_eq!(answer(&s, "d", &hs(&c)).await, denied(), "not yet valid");
    let mut c = base(json!("*"));
    c["iat"] = json!(now() + 600);
    assert_eq!(
        answer(&s, "d", &hs(&c)).await,
        denied(),
        "issued in the future"
    );
    let mut c = base(json!("*"));
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(answer(&s, "d", &hs(&c)).await, denied(), "no exp");
    // audience and issuer
    let mut c = base(json!("*"));
    c["aud"] = json!("someone-else");
    assert_eq!(answer(&s, "d", &hs(&c)).await, denied(), "audience");
    let mut c = base(json!("*"));
    c["iss"] = json!("https://evil.example");
    assert_eq!(answer(&s, "d", &hs(&c)).await, denied(), "issuer");
    // signature and algorithm
    let wrong = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-another-secret-0123").unwrap(),
        None,
        &base(json!("*")),
    );
    assert_eq!(answer(&s, "d", &wrong).await, denied(), "wrong secret");
    let rsa = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap(),
        None,
        &base(json!("*")),
    );
    assert_eq!(
        answer(&s, "d", &rsa).await,
        denied(),
        "RS256 against an HMAC key"
    );
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(base(json!("*")).to_string())
    );
    assert_eq!(answer(&s, "d", &unsigned).await, denied(), "alg none");
    // garbage and oversized tokens
    assert_eq!(answer(&s, "d", "not.a.jwt").await, denied());
    assert_eq!(answer(&s, "d", "").await, denied());
    assert_eq!(answer(&s, "d", &"a".repeat(20_000)).await, denied());
    s.stop().await;
}

#[tokio::test]
async fn public_keys_verify_rs256_es256_and_eddsa() {
    for (public, private, alg) in [
        ("rsa.pub.pem", "rsa.pem", Algorithm::RS256),
        ("ec.pub.pem", "ec.pem", Algorithm::ES256),
        ("ed.pub.pem", "ed.pem", Algorithm::EdDSA),
    ] {
        let s = start(Config {
            jwt_public_key_file: fixture(public),
            ..test_config()
        })
        .await;
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem(private)).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem(private)).unwrap(),
            _ => EncodingKey::from_ed_pem(&pem(private)).unwrap(),
        };
        let token = sign(alg, &key, None, &claims(json!("*")));
        assert_eq!(answer(&s, "d", &token).await, rw(), "{alg:?}");
        // the same claims under an HMAC "secret" made of the public key: key confusion
        let confused = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(&pem(public)).unwrap(),
            None,
            &claims(json!("*")),
        );
        assert_eq!(
            answer(&s, "d", &confused).await,
            denied(),
            "{alg:?} confusion"
        );
        s.stop().await;
    }
    // another RSA key's signature
    let s = start(Config {
        jwt_public_key_file: fixture("rsa.pub.pem"),
        ..test_config()
    })
    .await;
    let other = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&pem("rsa-other.pem")).unwrap(),
        None,
        &claims(json!("*")),
    );
    assert_eq!(answer(&s, "d", &other).await, denied());
    s.stop().await;
    // the same key given inline (an environment variable), its line breaks written as \n
    let inline = String::from_utf8(pem("ec.pub.pem"))
        .unwrap()
        .trim()
        .replace('\n', "\\n");
    let s = start(Config {
        jwt_public_key: inline,
        ..test_config()
    })
    .await;
    let token = sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&pem("ec.pem")).unwrap(),
        None,
        &claims(json!("*")),
    );
    assert_eq!(answer(&s, "d", &token).await, rw(), "inline key");
    s.stop().await;
}

#[tokio::test]
async fn a_jwks_file_chooses_keys_by_kid_and_is_reread() {
    let dir = std::env::temp_dir().join(format!("hearth-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap();
    let other = EncodingKey::from_rsa_pem(&pem("rsa-other.pem")).unwrap();
    let jwk = |key: &EncodingKey, kid: &str| {
        let mut j = jsonwebtoken::jwk::Jwk::from_encoding_key(key, Algorithm::RS256).unwrap();
        j.common.key_id = Some(kid.into());
        j
    };
    let write = |keys: Vec<jsonwebtoken::jwk::Jwk>| {
        let set = jsonwebtoken::jwk::JwkSet { keys };
        std::fs::write(&jwks, serde_json::to_vec(&set).unwrap()).unwrap();
    };
    write(vec![jwk(&rsa, "k1")]);
    let s = start(Config {
        jwt_jwks_file: jwks.clone(),
        ..test_config()
    })
    .await;
    let t = |key: &EncodingKey, kid: Option<&str>| {
        sign(Algorithm::RS256, key, kid, &claims(json!("*")))
    };
    assert_eq!(answer(&s, "d", &t(&rsa, Some("k1"))).await, rw());
    assert_eq!(
        answer(&s, "d", &t(&rsa, None)).await,
        rw(),
        "one key, no kid"
    );
    assert_eq!(
        answer(&s, "d", &t(&other, Some("k2"))).await,
        denied(),
        "unknown kid"
    );
    assert_eq!(
        answer(&s, "d", &t(&other, Some("k1"))).await,
        denied(),
        "kid of another key"
    );
    // rotation: the new key appears in the file (with a modification time of its own, however
    // coarse the file system's clock)
    write(vec![jwk(&rsa, "k1"), jwk(&other, "k2")]);
    let filetime = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    let f = std::fs::File::options().write(true).open(&jwks).unwrap();
    f.set_modified(filetime).unwrap();
    drop(f);
    // the server looks at the file at most once a second (a fixed interval, not a setting)
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        answer(&s, "d", &t(&other, Some("k2"))).await,
        rw(),
        "rotated in"
    );
    assert_eq!(
        answer(&s, "d", &t(&other, None)).await,
        denied(),
        "several keys need a kid"
    );
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A JWKS URL (an identity provider's `jwks_uri`): fetched before the node listens, its keys
/// chosen by `kid`; a token with an unknown `kid` makes the node fetch again, at most once per
/// 10 s, so a rotated-in key is accepted while unknown kids cannot hammer the provider.
#[tokio::test]
async fn a_jwks_url_is_fetched_and_fetched_again_for_a_new_kid() {
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap();
    let other = EncodingKey::from_rsa_pem(&pem("rsa-other.pem")).unwrap();
    let jwk = |key: &EncodingKey, kid: &str| {
        let mut j = jsonwebtoken::jwk::Jwk::from_encoding_key(key, Algorithm::RS256).unwrap();
        j.common.key_id = Some(kid.into());
        j
    };
    let set = |keys| serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys }).unwrap();
    let served = std::sync::Arc::new(std::sync::Mutex::new(set(vec![jwk(&rsa, "k1")])));
    let source = served.clone();
    let idp = common::receiver::Receiver::start("unused-secret-0123456789", move |_| {
        (
            200,
            source.lock().unwrap().clone(),
            std::time::Duration::ZERO,
        )
    })
    .await;
    let s = start(Config {
        jwt_jwks_url: idp.url.clone(),
        auth_failures_before_ban: 0,
        ..test_config()
    })
    .await;
    assert_eq!(idp.count(), 1, "fetched before listening");
    let t =
        |key: &EncodingKey, kid: &str| sign(Algorithm::RS256, key, Some(kid), &claims(json!("*")));
    assert_eq!(answer(&s, "d", &t(&rsa, "k1")).await, rw());
    assert_eq!(answer(&s, "d", &t(&rsa, "k1")).await, rw());
    assert_eq!(idp.count(), 1, "the set is cached");
    // the provider rotates a key in; a token naming it right away: too soon to fetch again
    *served.lock().unwrap() = set(vec![jwk(&rsa, "k1"), jwk(&other, "k2")]);
    assert_eq!(answer(&s, "d", &t(&other, "k2")).await, denied());
    assert_eq!(idp.count(), 1, "unknown kids do not hammer the provider");
    // a JWKS URL is fetched at most every 10 s (a fixed interval, not a setting)
    tokio::time::sleep(std::time::Duration::from_millis(10_100)).await;
    assert_eq!(answer(&s, "d", &t(&other, "k2")).await, rw(), "rotated in");
    assert_eq!(idp.count(), 2);
    assert_eq!(
        answer(&s, "d", &t(&other, "k1")).await,
        denied(),
        "kid of another key"
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_jwt_settings_name_the_setting() {
    for (config, setting) in [
        (
            Config {
                jwt_public_key: "-----BEGIN PUBLIC KEY-----\\nnot a key".into(),
                ..test_config()
            },
            "jwt_public_key",
        ),
        (
            Config {
                jwt_jwks_url: "ftp://idp.example/jwks".into(),
                ..test_config()
            },
            "jwt_jwks_url",
        ),
        (
            Config {
                jwt_secret: "short".into(),
                ..test_config()
            },
            "jwt_secret",
        ),
        (
            Config {
                jwt_public_key_file: fixture("missing.pem"),
                ..test_config()
            },
            "jwt_public_key_file",
        ),
        (
            Config {
                jwt_public_key_file: fixture("README.md"),
                ..test_config()
            },
            "jwt_public_key_file",
        ),
        (
            Config {
                jwt_secret: SECRET.into(),
                jwt_algorithms: "RS256".into(),
                ..test_config()
            },
            "jwt_algorithms",
        ),
        (
            Config {
                jwt_secret: SECRET.into(),
                jwt_algorithms: "none".into(),
                ..test_config()
            },
            "jwt_algorithms",
        ),
    ] {
        let err = hearth::Server::builder(config).bind().await.unwrap_err();
        assert!(err.to_string().contains(setting), "{setting}: {err}");
    }
}

#[tokio::test]
async fn a_token_expires_unless_a_fresh_one_extends_it() {
    let s = start(Config {
        jwt_secret: SECRET.into(),
        jwt_leeway_s: 0,
        auth_failures_before_ban: 0,
        ..test_config()
    })
    .await;
    let short = |secs: i64| {
        let mut c = claims(json!("*"));
        c["exp"] = json!(now() + secs);
        hs(&c)
    };
    let mut c = RawClient::connect(s.addr).await;
    // two documents on one socket, both with a token that ends in about two seconds
    for doc in ["kept", "lapsed"] {
        c.send(auth(doc, &short(2))).await;
        c.expect(doc, rw()).await;
    }
    // a fresh token for one of them: nothing is answered
    c.send(auth("kept", &short(600))).await;
    let frames = c.drain(std::time::Duration::from_millis(300)).await;
    assert!(frames.iter().all(|f| f.address != "kept"), "{frames:?}");
    // the other one is refused when its token ends; the first one stays
    let start = std::time::Instant::now();
    let frames = c
        .recv_until(|f| f.address == "lapsed" && matches!(f.msg, Msg::PermissionDenied(_)))
        .await;
    assert!(start.elapsed() < std::time::Duration::from_secs(4));
    assert_eq!(frames.last().map(|f| f.msg.clone()), Some(denied()));
    assert!(frames.iter().all(|f| f.address != "kept"), "{frames:?}");
    // the refused one comes back with a new token on the same socket
    c.send(auth("lapsed", &short(600))).await;
    c.expect("lapsed", rw()).await;
    // a token sync with a bad token closes that document connection (Hocuspocus's answer)
    c.send(auth("kept", "not-a-token")).await;
    c.expect("kept", Msg::Close("Unauthorized".into())).await;
    // a read-only token cannot keep a read-write connection
    let mut ro_claims = claims(json!("*"));
    ro_claims["read_only"] = json!(true);
    c.send(auth("lapsed", &hs(&ro_claims))).await;
    c.expect("lapsed", Msg::Close("Unauthorized".into())).await;
    s.stop().await;
}

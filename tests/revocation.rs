//! Revocation (docs/auth.md, "Revocation"): revoking a user, a token id or a document refuses
//! every matching open document connection at once and every matching authentication after,
//! and leaves the others alone; lifting it lets the client back in.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use hearth::Config;
use hearth::revoke::Revocation;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

const SECRET: &str = "revocation-test-secret-0123456789abcdef";

fn token(sub: &str, jti: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({"sub": sub, "jti": jti, "exp": now + 3600, "docs": ["*"]});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn denied() -> Msg {
    Msg::PermissionDenied("permission-denied".into())
}

fn hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

async fn joined(s: &TestServer, doc: &str, token: &str) -> RawClient {
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth(doc, token)).await;
    c.send(step1_empty(doc)).await;
    c.expect(doc, Msg::Authenticated("read-write".into())).await;
    c.drain(Duration::from_millis(100)).await;
    c
}

/// The next frame for `doc` other than awareness and sync traffic, within a second.
async fn refused_within_a_second(c: &mut RawClient, doc: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let f = c.recv_frame(left).await;
        if f.address == doc && f.msg == denied() {
            return;
        }
        assert!(
            matches!(
                f.msg,
                Msg::Awareness(_) | Msg::Update(_) | Msg::Ping | Msg::SyncStatus(_)
            ),
            "unexpected {f:?}"
        );
    }
}

#[tokio::test]
async fn revoked_connections_close_at_once_and_others_keep_working() {
    let s = start(Config {
        jwt_secret: SECRET.into(),
        auth_failures_before_ban: 0,
        ..test_config()
    })
    .await;
    let (alice, bob) = (token("alice", "t-alice"), token("bob", "t-bob"));
    let mut a = joined(&s, "d", &alice).await;
    let mut a2 = joined(&s, "other", &alice).await;
    let mut b = joined(&s, "d", &bob).await;
    let mut c = joined(&s, "secret", &bob).await;

    // a user: both of alice's connections, on any document
    s.handle
        .revoke(Revocation::User("alice".into()), hour())
        .await
        .unwrap();
    refused_within_a_second(&mut a, "d").await;
    refused_within_a_second(&mut a2, "other").await;
    // bob still edits
    let y = YDoc::new(3);
    b.edit("d", &y.insert("still here")).await;
    // alice cannot come back, on the same socket or a new one
    a.send(auth("d", &alice)).await;
    assert_eq!(a.recv_for("d").await, denied());
    let mut again = RawClient::connect(s.addr).await;
    again.send(auth("d", &alice)).await;
    assert_eq!(again.recv_for("d").await, denied());

    // a document: everyone on it, no one else
    s.handle
        .revoke(Revocation::Document("secret".into()), hour())
        .await
        .unwrap();
    refused_within_a_second(&mut c, "secret").await;
    b.edit("d", &y.insert("!")).await;

    // a token id: bob's token, while a fresh token of bob's still works
    s.handle
        .revoke(Revocation::Token("t-bob".into()), hour())
        .await
        .unwrap();
    refused_within_a_second(&mut b, "d").await;
    let mut b2 = joined(&s, "d", &token("bob", "t-bob-2")).await;
    b2.edit("d", &y.insert("?")).await;

    let listed = s.handle.revocations();
    assert_eq!(listed.len(), 3, "{listed:?}");

    // lifting lets alice back in
    assert!(
        s.handle
            .lift_revocation(Revocation::User("alice".into()))
            .await
            .unwrap()
    );
    joined(&s, "d", &alice).await;
    s.stop().await;
}

#[tokio::test]
async fn a_revoked_y_websocket_client_is_closed() {
    let s = start(test_config()).await;
    let mut ws = RawClient::connect_path(s.addr, "/y/yws-doc").await;
    // the y-websocket server greets with its sync step 1
    ws.recv_frame(Duration::from_secs(5)).await;
    s.handle
        .revoke(Revocation::Document("yws-doc".into()), hour())
        .await
        .unwrap();
    assert_eq!(ws.expect_end(Duration::from_secs(1)).await, Some(4403));
    s.stop().await;
}

#[tokio::test]
async fn an_ended_revocation_no_longer_refuses() {
    let s = start(Config {
        jwt_secret: SECRET.into(),
        ..test_config()
    })
    .await;
    let until = SystemTime::now() + Duration::from_millis(1000);
    s.handle
        .revoke(Revocation::User("carol".into()), until)
        .await
        .unwrap();
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth("d", &token("carol", "t1"))).await;
    assert_eq!(c.recv_for("d").await, denied());
    assert_eq!(s.handle.revocations().len(), 1);
    wait_until(T, "the revocation ends", || {
        s.handle.revocations().is_empty()
    })
    .await;
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    assert!(ms(SystemTime::now()) >= ms(until), "ended before its end");
    joined(&s, "d", &token("carol", "t2")).await;
    s.stop().await;
}

#[tokio::test]
async fn a_token_sync_with_a_revoked_token_closes_the_connection() {
    let s = start(Config {
        jwt_secret: SECRET.into(),
        auth_failures_before_ban: 0,
        ..test_config()
    })
    .await;
    let mut c = joined(&s, "d", &token("dave", "t-old")).await;
    s.handle
        .revoke(Revocation::Token("t-new".into()), hour())
        .await
        .unwrap();
    // the old token is not revoked: the connection stays
    c.expect_silence(Duration::from_millis(200)).await;
    // a refresh to the revoked token id is refused like a refused token
    c.send(auth("d", &token("dave", "t-new"))).await;
    let f = c.recv_frame(Duration::from_secs(5)).await;
    assert_eq!(f.msg, Msg::Close("Unauthorized".into()));

    // after a refresh, the connection is the new token's: revoking that id closes it
    let mut c = joined(&s, "e", &token("erin", "t-1")).await;
    c.send(auth("e", &token("erin", "t-2"))).await;
    c.expect_silence(Duration::from_millis(300)).await;
    s.handle
        .revoke(Revocation::Token("t-2".into()), hour())
        .await
        .unwrap();
    refused_within_a_second(&mut c, "e").await;
    s.stop().await;
}

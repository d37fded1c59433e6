//! Failed-authentication throttling per client address (`crate::throttle`, docs/configuration.md
//! `auth_failures_before_ban`): repeated refused tokens ban the address; a banned address gets
//! HTTP 429 on every upgrade and `PermissionDenied` for Auth frames on sockets it still has open,
//! without any hook running; another address keeps working; the ban ends after `auth_ban_ms`.
//!
//! The server trusts 127.0.0.1 as a proxy, so each test client picks its address with
//! `X-Forwarded-For`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use hearth::hooks::AuthPayload;
use hearth::{Config, Extension, HookResult};

const ATTACKER: &str = "203.0.113.7";
const NEIGHBOUR: &str = "198.51.100.9";

/// Counts `on_connect` calls (every Auth that reaches the hooks).
#[derive(Debug, Default)]
struct HookCounter(Arc<AtomicUsize>);

#[async_trait]
impl Extension for HookCounter {
    fn name(&self) -> &str {
        "hook-counter"
    }

    async fn on_connect(&self, _payload: &mut AuthPayload<'_>) -> HookResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn config(failures: u32, ban_ms: u64) -> Config {
    Config {
        auth_tokens: "good=read-write".into(),
        trusted_proxies: "127.0.0.1".into(),
        auth_failures_before_ban: failures,
        auth_failure_window_ms: 60_000,
        auth_ban_ms: ban_ms,
        ..test_config()
    }
}

async fn start_counted(config: Config) -> (TestServer, Arc<AtomicUsize>) {
    let hooks = Arc::new(AtomicUsize::new(0));
    let ext = HookCounter(hooks.clone());
    (start_server(config, move |b| b.extension(ext)).await, hooks)
}

async fn client(s: &TestServer, ip: &str) -> RawClient {
    RawClient::try_connect_forwarded(s.addr, "/", ip)
        .await
        .unwrap_or_else(|status| panic!("upgrade from {ip} answered {status}"))
}

async fn denied(c: &mut RawClient, doc: &str, token: &str) {
    c.send(auth(doc, token)).await;
    c.expect(doc, Msg::PermissionDenied("permission-denied".into()))
        .await;
}

/// Auth with the good token, then a sync round: the document works for this client.
async fn works(c: &mut RawClient, doc: &str) {
    c.send(auth(doc, "good")).await;
    c.send(step1_empty(doc)).await;
    c.expect(doc, Msg::Authenticated("read-write".into())).await;
    let frames = c
        .recv_until(|f| f.address == doc && matches!(f.msg, Msg::Step2(_)))
        .await;
    assert!(!frames.is_empty());
}

/// A y-websocket connection with `token` from `ip`: the close code it ends with, or the HTTP
/// status that refused the upgrade.
async fn yws_close_code(s: &TestServer, ip: &str, token: &str) -> Result<Option<u16>, u16> {
    let path = format!("/y/yws-doc?token={token}");
    let mut c = RawClient::try_connect_forwarded(s.addr, &path, ip).await?;
    Ok(c.close_code_unparsed(T).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_bad_tokens_ban_the_address_until_the_ban_ends() {
    let (s, hooks) = start_counted(config(3, 1500)).await;
    let m = s.handle.metrics().clone();

    // Three refused tokens from the attacker, on one socket that stays open.
    let mut attacker = client(&s, ATTACKER).await;
    denied(&mut attacker, "d1", "bad").await;
    denied(&mut attacker, "d2", "bad").await;
    // the ban starts with the third failure, not before this
    let third = std::time::Instant::now();
    denied(&mut attacker, "d3", "bad").await;
    assert_eq!(hooks.load(Ordering::SeqCst), 3);
    assert_eq!(m.auth_failures.get(), 3);
    assert_eq!(m.auth_bans.get(), 1);
    assert_eq!(m.auth_banned.get(), 1);

    // Its open socket: even the good token is denied now, and no hook runs.
    denied(&mut attacker, "d4", "good").await;
    assert_eq!(
        hooks.load(Ordering::SeqCst),
        3,
        "no hook ran for a banned address"
    );
    assert_eq!(m.auth_throttled.with_label_values(&["auth"]).get(), 1);
    assert_eq!(
        m.auth_failures.get(),
        3,
        "a refusal because of the ban is no new failure"
    );

    // New upgrades from it: 429, Hocuspocus and y-websocket alike.
    assert_eq!(
        RawClient::try_connect_forwarded(s.addr, "/", ATTACKER)
            .await
            .err(),
        Some(429)
    );
    assert_eq!(yws_close_code(&s, ATTACKER, "good").await, Err(429));
    assert_eq!(m.auth_throttled.with_label_values(&["upgrade"]).get(), 2);

    // Another address is not affected, not even after a failure of its own.
    let mut neighbour = client(&s, NEIGHBOUR).await;
    denied(&mut neighbour, "n1", "bad").await;
    works(&mut neighbour, "n2").await;
    works(&mut client(&s, NEIGHBOUR).await, "n3").await;
    assert_eq!(m.auth_bans.get(), 1);

    // The ban ends: the attacker's address works again, on a new socket and on the old one.
    let mut fresh = retry_until(T, "an upgrade from the attacker after the ban", || {
        RawClient::try_connect_forwarded(s.addr, "/", ATTACKER)
    })
    .await;
    assert!(
        third.elapsed() >= Duration::from_millis(1500),
        "the ban ended after {:?}, before auth_ban_ms",
        third.elapsed()
    );
    works(&mut fresh, "d5").await;
    works(&mut attacker, "d6").await;
    wait_until(T, "the banned-addresses gauge drops to 0", || {
        m.auth_banned.get() == 0
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn y_websocket_failures_count_and_a_forged_forwarded_for_does_not_help() {
    // No trusted proxy: X-Forwarded-For is the client's own claim and is ignored.
    let cfg = Config {
        trusted_proxies: String::new(),
        ..config(2, 60_000)
    };
    let (s, hooks) = start_counted(cfg).await;
    // two refused y-websocket connections, each claiming another address
    for ip in ["192.0.2.1", "192.0.2.2"] {
        assert_eq!(yws_close_code(&s, ip, "bad").await, Ok(Some(4403)));
    }
    assert_eq!(hooks.load(Ordering::SeqCst), 2);
    // the peer (127.0.0.1) is banned, whatever the header says
    for ip in ["192.0.2.3", ATTACKER] {
        assert_eq!(
            RawClient::try_connect_forwarded(s.addr, "/", ip)
                .await
                .err(),
            Some(429),
            "X-Forwarded-For {ip}"
        );
    }
    assert_eq!(s.handle.metrics().auth_bans.get(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failures_before_ban_never_bans() {
    let (s, hooks) = start_counted(config(0, 60_000)).await;
    let mut c = client(&s, ATTACKER).await;
    for i in 0..25 {
        denied(&mut c, &format!("d{i}"), "bad").await;
    }
    assert_eq!(hooks.load(Ordering::SeqCst), 25);
    works(&mut client(&s, ATTACKER).await, "ok").await;
    assert_eq!(s.handle.metrics().auth_bans.get(), 0);
    s.stop().await;
}

/// A connection that sends more than its traffic limits is closed with 1008 "Rate Limit
/// Exceeded", and each such close counts towards the address's ban.
#[tokio::test]
async fn a_flooding_connection_is_closed_and_its_address_banned() {
    let s = start(Config {
        max_messages_per_second: 50,
        ..config(2, 60_000)
    })
    .await;
    const FLOODER: &str = "203.0.113.20";
    for round in 0..2u64 {
        let mut c = client(&s, FLOODER).await;
        c.auth("flood", "good").await;
        let y = YDoc::new(11 + round);
        for i in 0..200 {
            if c.try_send(update("flood", &y.insert(&i.to_string())))
                .await
                .is_err()
            {
                break;
            }
        }
        c.expect_close_within(1008, Duration::from_secs(5)).await;
    }
    // two closes: banned; a polite neighbour is not
    assert_eq!(
        RawClient::try_connect_forwarded(s.addr, "/", FLOODER)
            .await
            .err(),
        Some(429)
    );
    let mut polite = client(&s, "203.0.113.21").await;
    works(&mut polite, "flood").await;
    let (_, metrics) = http_get(s.operator_addr(), "/metrics").await;
    assert!(
        metrics.contains(r#"hearth_connections_refused_total{reason="rate_limit"} 2"#),
        "{metrics}"
    );
    s.stop().await;
}

/// With `max_connection_attempts_per_ip`, the upgrade over the limit is refused 429 and the
/// address stays banned; other addresses are not.
#[tokio::test]
async fn too_many_connection_attempts_ban_the_address() {
    let s = start(Config {
        max_connection_attempts_per_ip: 5,
        ..config(0, 60_000)
    })
    .await;
    const STORMER: &str = "203.0.113.30";
    for _ in 0..5 {
        client(&s, STORMER).await.close_socket().await;
    }
    for _ in 0..2 {
        assert_eq!(
            RawClient::try_connect_forwarded(s.addr, "/", STORMER)
                .await
                .err(),
            Some(429)
        );
    }
    let mut other = client(&s, "203.0.113.31").await;
    works(&mut other, "d").await;
    s.stop().await;
}

//! Authentication by webhook and event webhooks (docs/auth.md), against a real HTTP endpoint
//! started by the test: what the client sees on the wire for each answer of the endpoint, that
//! every request is signed, and that events arrive in order and never slow a client.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::receiver::{Received, Receiver};
use common::*;
use hearth::Config;
use serde_json::{Value, json};

const SECRET: &str = "webhook-test-secret-0123456789";

fn answer_for(r: &Received) -> (u16, String, Duration) {
    let token = r.body["token"].as_str().unwrap_or_default();
    let ms = Duration::from_millis;
    match token {
        "allow" => (
            200,
            json!({"access": "read-write", "context": {"user": {"id": "u-allow", "plan": "pro"}}})
                .to_string(),
            ms(0),
        ),
        "ro" => (200, json!({"access": "read-only"}).to_string(), ms(0)),
        "deny" => (
            200,
            json!({"access": "deny", "reason": "not your document"}).to_string(),
            ms(0),
        ),
        "forbidden" => (403, String::new(), ms(0)),
        "slow" => (200, json!({"access": "read-write"}).to_string(), ms(400)),
        "timeout" => (200, json!({"access": "read-write"}).to_string(), ms(3000)),
        "error" => (500, "{}".into(), ms(0)),
        "garbage" => (200, "not json".into(), ms(0)),
        "short" => (
            200,
            json!({"access": "read-write",
                   "expiresAt": jsonwebtoken::get_current_timestamp() + 2})
            .to_string(),
            ms(0),
        ),
        _ => (403, String::new(), ms(0)),
    }
}

fn config(url: &str) -> Config {
    Config {
        auth_webhook_url: url.into(),
        auth_webhook_secret: SECRET.into(),
        auth_webhook_timeout_ms: 1000,
        auth_webhook_retries: 1,
        auth_webhook_cache_ms: 0,
        auth_webhook_headers: "x-tenant".into(),
        auth_webhook_query: "share".into(),
        auth_failures_before_ban: 0,
        ..test_config()
    }
}

async fn answer(server: &TestServer, doc: &str, token: &str) -> Msg {
    let mut c = RawClient::connect(server.addr).await;
    c.send(auth(doc, token)).await;
    c.recv_for(doc).await
}

#[tokio::test]
async fn the_endpoint_decides_access() {
    let hook = Receiver::start(SECRET, answer_for).await;
    let s = start(config(&hook.url)).await;
    let rw = Msg::Authenticated("read-write".into());
    assert_eq!(answer(&s, "d", "allow").await, rw);
    assert_eq!(
        answer(&s, "d", "ro").await,
        Msg::Authenticated("readonly".into())
    );
    assert_eq!(
        answer(&s, "d", "deny").await,
        Msg::PermissionDenied("not your document".into())
    );
    assert_eq!(
        answer(&s, "d", "forbidden").await,
        Msg::PermissionDenied("permission-denied".into())
    );
    // a slow answer within the deadline is waited for
    assert_eq!(answer(&s, "d", "slow").await, rw);
    let unavailable = Msg::PermissionDenied("authentication unavailable".into());
    // fail closed: no answer in time, a 500, an answer that is not the expected JSON
    let started = tokio::time::Instant::now();
    assert_eq!(answer(&s, "d", "timeout").await, unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "two attempts of 1 s each and a short backoff: {:?}",
        started.elapsed()
    );
    let before_500 = hook.count();
    assert_eq!(answer(&s, "d", "error").await, unavailable);
    assert_eq!(hook.count() - before_500, 2, "a 500 is retried once");
    let before_garbage = hook.count();
    assert_eq!(answer(&s, "d", "garbage").await, unavailable);
    assert_eq!(
        hook.count() - before_garbage,
        1,
        "an answer that is not JSON is not retried"
    );

    // every request was signed and carried what the docs list
    let all = hook.all();
    assert!(all.iter().all(|r| r.signed), "unsigned request: {all:?}");
    let first = &all[0];
    assert_eq!(first.body["event"], "authenticate");
    assert_eq!(first.body["documentName"], "d");
    assert!(first.body["timestamp"].as_u64().is_some());
    assert!(first.header("x-hearth-delivery").is_some());
    assert_eq!(first.header("x-hearth-event"), Some("authenticate"));
    s.stop().await;
}

#[tokio::test]
async fn forwarded_request_parts_and_context_reach_the_endpoint_and_hooks() {
    let hook = Receiver::start(SECRET, answer_for).await;
    let s = start(config(&hook.url)).await;
    let mut c = RawClient::connect_path(s.addr, "/?share=abc&other=1").await;
    c.send(auth("doc", "allow")).await;
    c.expect("doc", Msg::Authenticated("read-write".into()))
        .await;
    let r = hook.all().pop().unwrap();
    assert_eq!(r.body["requestParameters"], json!({"share": "abc"}));
    assert_eq!(r.body["requestHeaders"], json!({}));
    assert_eq!(r.body["node"], "test");
    s.stop().await;
}

#[tokio::test]
async fn answers_are_cached_for_the_configured_time() {
    let hook = Receiver::start(SECRET, answer_for).await;
    let s = start(Config {
        auth_webhook_cache_ms: 60_000,
        ..config(&hook.url)
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            answer(&s, "cached", "allow").await,
            Msg::Authenticated("read-write".into())
        );
        assert_eq!(
            answer(&s, "cached", "deny").await,
            Msg::PermissionDenied("not your document".into())
        );
    }
    assert_eq!(hook.count(), 2, "one call per token and document");
    // a failure is never cached
    for _ in 0..2 {
        answer(&s, "cached", "error").await;
    }
    assert_eq!(hook.count(), 2 + 4);
    s.stop().await;
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_closed_without_banning_the_client() {
    // port 1: nothing listens there, every connection is refused
    let url = "http://127.0.0.1:1/hook".to_owned();
    let s = start(Config {
        auth_failures_before_ban: 2,
        ..config(&url)
    })
    .await;
    for _ in 0..5 {
        assert_eq!(
            answer(&s, "d", "allow").await,
            Msg::PermissionDenied("authentication unavailable".into())
        );
    }
    // not banned: an upgrade is still accepted
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth("d", "x")).await;
    assert_eq!(
        c.recv_for("d").await,
        Msg::PermissionDenied("authentication unavailable".into())
    );
    s.stop().await;
}

#[tokio::test]
async fn expires_at_ends_the_connection_and_a_token_sync_asks_again() {
    let hook = Receiver::start(SECRET, answer_for).await;
    let s = start(config(&hook.url)).await;
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth("exp", "short")).await;
    c.expect("exp", Msg::Authenticated("read-write".into()))
        .await;
    // the answer said the access ends in ~2 s
    let f = c.recv_frame(Duration::from_secs(5)).await;
    assert_eq!(f.msg, Msg::PermissionDenied("permission-denied".into()));

    // a token sync with a token the endpoint refuses closes the document connection
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth("sync", "allow")).await;
    c.expect("sync", Msg::Authenticated("read-write".into()))
        .await;
    c.send(auth("sync", "deny")).await;
    let f = c.recv_frame(Duration::from_secs(5)).await;
    assert_eq!(f.msg, Msg::Close("Unauthorized".into()));
    let last = hook.all().pop().unwrap();
    assert_eq!(last.body["event"], "token_sync");
    assert_eq!(last.body["readOnly"], false);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// event webhooks
// ---------------------------------------------------------------------------------------------

fn events_config(url: &str, events: &str) -> Config {
    Config {
        webhook_url: url.into(),
        webhook_secret: SECRET.into(),
        webhook_events: events.into(),
        webhook_debounce_ms: 500,
        webhook_max_debounce_ms: 5000,
        webhook_timeout_ms: 1000,
        webhook_retries: 2,
        auth_tokens: "alice=read-write".into(),
        ..test_config()
    }
}

fn kinds(events: &[Received], doc: &str) -> Vec<String> {
    events
        .iter()
        .filter(|r| r.body["payload"]["documentName"] == doc)
        .map(|r| r.body["event"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn events_arrive_signed_debounced_and_in_order() {
    let hook = Receiver::start(SECRET, |_| (200, "{}".into(), Duration::ZERO)).await;
    let s = start(events_config(&hook.url, "all")).await;
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth("ev", "alice")).await;
    c.expect("ev", Msg::Authenticated("read-write".into()))
        .await;
    let y = YDoc::new(7);
    for i in 0..5 {
        c.send(update("ev", &y.insert(&format!("{i}")))).await;
    }
    // five changes sent at once (well within the 500 ms debounce) make one change event
    wait_until(Duration::from_secs(5), "change event", || {
        kinds(&hook.all(), "ev").contains(&"change".to_owned())
    })
    .await;
    c.send(close("ev")).await;
    wait_until(Duration::from_secs(5), "disconnect event", || {
        kinds(&hook.all(), "ev").contains(&"disconnect".to_owned())
    })
    .await;
    let all = hook.all();
    assert!(all.iter().all(|r| r.signed));
    let seen = kinds(&all, "ev");
    let pos = |k: &str| seen.iter().position(|s| s == k).unwrap();
    assert!(pos("create") < pos("connect"), "{seen:?}");
    assert!(pos("connect") < pos("change"), "{seen:?}");
    assert!(pos("change") < pos("disconnect"), "{seen:?}");
    assert_eq!(
        seen.iter().filter(|k| *k == "change").count(),
        1,
        "{seen:?}"
    );
    let change = all.iter().find(|r| r.body["event"] == "change").unwrap();
    assert_eq!(change.body["payload"]["changes"], 5);
    assert_eq!(change.body["payload"]["node"], "test");
    assert!(change.body["id"].as_str().is_some());
    let sequences: Vec<u64> = all
        .iter()
        .map(|r| r.body["sequence"].as_u64().unwrap())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    s.stop().await;
}

#[tokio::test]
async fn failed_deliveries_are_retried_then_counted() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = calls.clone();
    let hook = Receiver::start(SECRET, move |_| {
        // the first attempt of everything fails
        if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            (503, "{}".into(), Duration::ZERO)
        } else {
            (200, "{}".into(), Duration::ZERO)
        }
    })
    .await;
    let s = start(events_config(&hook.url, "connect")).await;
    let mut c = RawClient::connect(s.addr).await;
    c.auth("r", "alice").await;
    wait_until(Duration::from_secs(5), "the retry", || hook.count() == 2).await;
    let all = hook.all();
    assert_eq!(
        all[0].header("x-hearth-delivery"),
        all[1].header("x-hearth-delivery"),
        "a retry is the same delivery"
    );
    // the receiver logs a request before it answers: wait for the answer to be counted
    let delivered = r#"hearth_webhook_events_total{result="delivered"} 1"#;
    wait_until_async(T, "the delivery is counted", || async {
        http_get(s.operator_addr(), "/metrics")
            .await
            .1
            .contains(delivered)
    })
    .await;
    let metrics = http_get(s.operator_addr(), "/metrics").await.1;
    assert!(metrics.contains(r#"hearth_webhook_events_total{result="retried"} 1"#));
    assert!(metrics.contains(r#"hearth_webhook_events_total{result="delivered"} 1"#));
    s.stop().await;
}

#[tokio::test]
async fn an_unreachable_endpoint_slows_no_client() {
    // an endpoint that accepts and never answers
    let hook = Receiver::start(SECRET, |_| (200, "{}".into(), Duration::from_secs(60))).await;
    let s = start(Config {
        webhook_queue_size: 8,
        webhook_timeout_ms: 10_000,
        ..events_config(&hook.url, "all")
    })
    .await;
    let mut a = RawClient::connect(s.addr).await;
    a.auth("busy", "alice").await;
    let y = YDoc::new(9);
    let started = tokio::time::Instant::now();
    for i in 0..50 {
        // every edit is acknowledged at once, while the endpoint answers nothing
        a.send(update("busy", &y.insert(&format!("{i}")))).await;
        let frames = a.recv_until(|f| f.msg == Msg::SyncStatus(1)).await;
        assert!(!frames.is_empty());
        // a new client per edit fills the event queues
        let mut b = RawClient::connect(s.addr).await;
        b.auth(&format!("other-{i}"), "alice").await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "edits and connections went on: {:?}",
        started.elapsed()
    );
    let (_, metrics) = http_get(s.operator_addr(), "/metrics").await;
    let dropped = metrics
        .lines()
        .find(|l| l.starts_with(r#"hearth_webhook_events_total{result="dropped"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "a full queue drops events: {metrics}");
    s.stop().await;
}

#[test]
fn settings_are_checked() {
    let bad = |c: Config| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            match hearth::Server::builder(c).bind().await {
                Ok(_) => panic!("accepted"),
                Err(e) => e.to_string(),
            }
        })
    };
    let e = bad(Config {
        webhook_url: "http://127.0.0.1:9/".into(),
        ..test_config()
    });
    assert!(e.contains("webhook_secret"), "{e}");
    let e = bad(Config {
        webhook_url: "http://127.0.0.1:9/".into(),
        webhook_secret: SECRET.into(),
        webhook_events: "change,typo".into(),
        ..test_config()
    });
    assert!(e.contains("webhook_events") && e.contains("typo"), "{e}");
    let e = bad(Config {
        auth_webhook_url: "ftp://x/".into(),
        auth_webhook_secret: SECRET.into(),
        ..test_config()
    });
    assert!(e.contains("auth_webhook_url"), "{e}");
    let _ = Value::Null;
}

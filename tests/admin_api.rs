//! The admin API on one node without Redis (SQLite storage): every operation over real HTTP,
//! its errors, its limits, and the OpenAPI description against the routes and the docs.
//! Clusters are covered by `cluster-tests/tests/cluster_admin.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hearth::Config;
use hearth::hooks::HookError;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use yrs::updates::decoder::Decode as _;
use yrs::{GetString as _, Text as _, Transact as _};

const TOKEN: &str = "Tq8Ld3Wv6Mz1Kc9Rb4Xn7Hs2";
const OLD_TOKEN: &str = "Pg5Yk2Nc8Vr3Jm6Qw1Zt9Bd4";

/// One HTTP/1.1 request with `Connection: close`; returns the status and the JSON body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // the server may answer (413) and close before the whole body is sent
    let _ = tcp.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match with_timeout(
            Duration::from_secs(30),
            "admin answer",
            tcp.read(&mut chunk),
        )
        .await
        {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, v)
}

fn admin_config(dir: &std::path::Path) -> Config {
    Config {
        admin_tokens: format!("{TOKEN},{OLD_TOKEN}"),
        database_url: format!("sqlite://{}", dir.join("admin.db").display()),
        ..test_config()
    }
}

struct Server {
    s: TestServer,
    admin: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A scratch directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "hearth-admin-{name}-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[derive(serde::Deserialize)]
struct Greet {
    who: String,
}

/// A server with the admin API and three named handlers: `greet` (typed reply), `fail`
/// (handler error), `slow` (sleeps the payload's milliseconds).
async fn server(name: &str) -> Server {
    let dir = tempdir::Dir::new(name);
    let calls = Arc::new(AtomicUsize::new(0));
    let (c1, c2) = (calls.clone(), calls.clone());
    let config = admin_config(&dir.0);
    let server = hearth::Server::builder(config)
        .on_event(
            "greet",
            move |call: hearth::events::handlers::EventCall<Greet>| {
                c1.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok::<_, HookError>(json!({ "hello": call.payload.who, "doc": call.document }))
                }
            },
        )
        .on_event(
            "fail",
            move |_: hearth::events::handlers::EventCall<Value>| {
                c2.fetch_add(1, Ordering::SeqCst);
                async move { Err::<Value, _>(HookError::reject("nope")) }
            },
        )
        .on_event(
            "slow",
            |call: hearth::events::handlers::EventCall<u64>| async move {
                // a handler as slow as the caller asks, for the admin API's timeouts
                tokio::time::sleep(Duration::from_millis(call.payload)).await;
                Ok::<_, HookError>(json!("done"))
            },
        )
        .bind()
        .await
        .unwrap();
    let admin = server.admin_addr().expect("admin listener");
    let addr = server.local_addr();
    let handle = server.handle();
    let join = tokio::spawn(server.run());
    Server {
        s: TestServer {
            addr,
            operator: None,
            handle,
            join,
        },
        admin,
        calls,
        _dir: dir,
    }
}

#[tokio::test]
async fn the_admin_api_is_off_without_tokens_and_weak_tokens_are_refused() {
    let s = hearth::Server::builder(test_config()).bind().await.unwrap();
    assert_eq!(s.admin_addr(), None);
    let weak = Config {
        admin_tokens: "short".into(),
        ..test_config()
    };
    let err = hearth::Server::builder(weak).bind().await.unwrap_err();
    assert!(err.to_string().contains("admin_tokens"), "{err}");
    // long enough, but made of placeholder words: refused with the cluster secret's policy
    let placeholder = Config {
        admin_tokens: format!("{TOKEN},admin-token-0123456789"),
        ..test_config()
    };
    let err = hearth::Server::builder(placeholder)
        .bind()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin_tokens") && err.contains("token 2 is a placeholder"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_401_and_runs_nothing() {
    let s = server("auth").await;
    let body = r#"{"payload":{"who":"x"}}"#;
    for token in [None, Some("wrong-token-wrong-token"), Some("")] {
        let (status, v) = http(
            s.admin,
            "POST",
            "/v1/documents/d/events/greet",
            token,
            Some(body),
        )
        .await;
        assert_eq!(status, 401, "{v}");
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    assert_eq!(s.calls.load(Ordering::SeqCst), 0, "no handler ran");
    assert!(!s.s.is_loaded("d"), "nothing was loaded");
    // both configured tokens work (rotation)
    for token in [TOKEN, OLD_TOKEN] {
        let (status, v) = http(
            s.admin,
            "POST",
            "/v1/documents/d/events/greet",
            Some(token),
            Some(body),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["reply"], json!({ "hello": "x", "doc": "d" }));
    }
    s.s.stop().await;
}

#[tokio::test]
async fn custom_events_distinguish_reply_handler_error_timeout_and_no_handler() {
    let s = server("events").await;
    let t = Some(TOKEN);
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/d/events/fail",
        t,
        Some("{}"),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (422, Some("handler_error")),
        "{v}"
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/d/events/nobody-handles-this",
        t,
        Some("{}"),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("no_handler")),
        "{v}"
    );
    let start = Instant::now();
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/d/events/slow",
        t,
        Some(r#"{"payload":5000,"timeout_ms":300}"#),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{v}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/d/events/slow",
        t,
        Some(r#"{"payload":10}"#),
    )
    .await;
    assert_eq!((st, &v["reply"]), (200, &json!("done")), "{v}");
    // a payload that is not base64, a body that is not JSON, both payload kinds
    for bad in [
        r#"{"payload_base64":"***"}"#,
        "{not json",
        r#"{"payload":1,"payload_base64":"AA=="}"#,
        r#"{"other":1}"#,
    ] {
        let (st, v) = http(
            s.admin,
            "POST",
            "/v1/documents/d/events/greet",
            t,
            Some(bad),
        )
        .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {v}"
        );
    }
    // a thousand events in a row leave nothing loaded and nothing waiting
    for i in 0..1000 {
        let body = format!(r#"{{"payload":{{"who":"{i}"}}}}"#);
        let (st, _) = http(
            s.admin,
            "POST",
            "/v1/documents/many/events/greet",
            t,
            Some(&body),
        )
        .await;
        assert_eq!(st, 200);
    }
    wait_until(Duration::from_secs(5), "nothing loaded", || {
        s.s.handle.documents().is_empty()
    })
    .await;
    s.s.stop().await;
}

#[tokio::test]
async fn documents_are_read_edited_messaged_closed_listed_and_deleted() {
    let s = server("docs").await;
    let t = Some(TOKEN);
    // unknown document: 404, and reading it creates nothing
    let (st, v) = http(s.admin, "GET", "/v1/documents/notes%2Fa", t, None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let (st, v) = http(s.admin, "GET", "/v1/documents?prefix=notes", t, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["documents"], json!([]));

    // a client on the document sees the API's edit like any other update
    let mut c = RawClient::connect(s.s.addr).await;
    c.join("notes/a").await;
    let ops = json!({ "ops": [
        { "op": "text.insert", "type": "content", "text": "Hello" },
        { "op": "text.insert", "type": "content", "index": 5, "text": ", world" },
        { "op": "map.set", "type": "meta", "key": "title", "value": "Greeting" }
    ]});
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/notes%2Fa/ops",
        t,
        Some(&ops.to_string()),
    )
    .await;
    assert_eq!((st, &v["applied"]), (200, &json!(3)), "{v}");
    let frames = c.recv_until(|f| matches!(f.msg, Msg::Update(_))).await;
    assert!(!frames.is_empty());

    // a binary update goes through the same checks as a client's
    let update = {
        let d = yrs::Doc::new();
        let txt = d.get_or_insert_text("other");
        let mut txn = d.transact_mut();
        txt.insert(&mut txn, 0, "from an update");
        txn.encode_update_v1()
    };
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&update);
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/notes%2Fa/updates",
        t,
        Some(&json!({ "update": b64 }).to_string()),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let garbage = base64::engine::general_purpose::STANDARD.encode([0xff, 0xff, 0xff, 0x01, 0x02]);
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/notes%2Fa/updates",
        t,
        Some(&json!({ "update": garbage }).to_string()),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    // an invalid op changes nothing
    let bad_ops = json!({ "ops": [
        { "op": "text.insert", "type": "content", "text": "X" },
        { "op": "text.delete", "type": "content", "index": 100, "length": 1 }
    ]});
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/notes%2Fa/ops",
        t,
        Some(&bad_ops.to_string()),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );

    // read: JSON with hints, state and state vector
    let (st, v) = http(
        s.admin,
        "GET",
        "/v1/documents/notes%2Fa?types=content:text,meta:map,other:text",
        t,
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["json"]["content"], "Hello, world");
    assert_eq!(v["json"]["meta"], json!({ "title": "Greeting" }));
    assert_eq!(v["json"]["other"], "from an update");
    let state = base64::engine::general_purpose::STANDARD
        .decode(v["state"].as_str().unwrap())
        .unwrap();
    let copy = yrs::Doc::new();
    {
        let mut txn = copy.transact_mut();
        txn.apply_update(yrs::Update::decode_v1(&state).unwrap())
            .unwrap();
    }
    let text = copy.get_or_insert_text("content");
    assert_eq!(text.get_string(&copy.transact()), "Hello, world");
    assert!(v["state_vector"].is_string());

    // broadcast reaches the client; close resets it
    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/notes%2Fa/broadcast",
        t,
        Some(r#"{"message":"ping from the backend"}"#),
    )
    .await;
    assert_eq!((st, &v["connections"]), (200, &json!(1)), "{v}");
    let frames = c
        .recv_until(|f| matches!(&f.msg, Msg::Stateless(p) if p == "ping from the backend"))
        .await;
    assert!(!frames.is_empty());

    // listed, with its owner and connection
    let (st, v) = http(s.admin, "GET", "/v1/documents?prefix=notes%2F", t, None).await;
    assert_eq!(st, 200, "{v}");
    let docs = v["documents"].as_array().unwrap();
    assert_eq!(docs.len(), 1, "{v}");
    assert_eq!(docs[0]["name"], "notes/a");
    assert_eq!(docs[0]["owner"], "test");
    assert_eq!(docs[0]["connections"], 1);
    let (st, v) = http(s.admin, "GET", "/v1/documents/notes%2Fa/owner", t, None).await;
    assert_eq!((st, &v["owner"]), (200, &json!("test")), "{v}");

    let (st, v) = http(
        s.admin,
        "POST",
        "/v1/documents/notes%2Fa/close",
        t,
        Some("{}"),
    )
    .await;
    assert_eq!((st, &v["connections"]), (200, &json!(1)), "{v}");
    let frames = c.recv_until(|f| matches!(&f.msg, Msg::Close(_))).await;
    assert!(!frames.is_empty());

    // stored: a fresh server on the same database reads the same content
    wait_until(Duration::from_secs(5), "unloaded", || {
        !s.s.is_loaded("notes/a")
    })
    .await;
    let (st, v) = http(s.admin, "GET", "/v1/documents?prefix=notes%2F", t, None).await;
    assert_eq!(st, 200);
    assert_eq!(v["documents"][0]["stored"], true, "{v}");

    // delete, then it is gone
    let (st, v) = http(s.admin, "DELETE", "/v1/documents/notes%2Fa", t, None).await;
    assert_eq!((st, &v["deleted"]), (200, &json!(true)), "{v}");
    let (st, _) = http(s.admin, "GET", "/v1/documents/notes%2Fa", t, None).await;
    assert_eq!(st, 404);
    let (st, _) = http(s.admin, "DELETE", "/v1/documents/notes%2Fa", t, None).await;
    assert_eq!(st, 404);
    s.s.stop().await;
}

#[tokio::test]
async fn malformed_oversized_and_unknown_requests_are_refused() {
    let s = server("bad").await;
    let t = Some(TOKEN);
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("GET", "/v1/nope", None, 404, "not_found"),
        ("GET", "/elsewhere", None, 404, "not_found"),
        ("PUT", "/v1/documents/d", None, 405, "method_not_allowed"),
        (
            "POST",
            "/v1/documents/d/ops",
            Some("[1,2]"),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/documents/d/ops",
            Some(r#"{"ops":[{"op":"explode"}]}"#),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/documents/d/updates",
            Some(r#"{"update":"%%%"}"#),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/documents/d/broadcast",
            Some(r#"{"message":5}"#),
            400,
            "bad_request",
        ),
        ("GET", "/v1/documents?limit=0", None, 400, "bad_request"),
        ("GET", "/v1/documents?bogus=1", None, 400, "bad_request"),
        ("GET", "/v1/documents/%FF", None, 400, "bad_request"),
        ("GET", "/v1/documents/d?claim=false", None, 409, "not_owned"),
        (
            "POST",
            "/v1/nodes/ghost/drain",
            Some("{}"),
            404,
            "not_found",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (st, v) = http(s.admin, method, path, t, *body).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (*status, Some(*code)),
            "{method} {path}: {v}"
        );
    }
    // a body over admin_max_body_bytes (8 MiB by default): 413 before it is read
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(9 << 20));
    let (st, v) = http(s.admin, "POST", "/v1/documents/d/broadcast", t, Some(&big)).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    assert!(!s.s.is_loaded("d"));
    s.s.stop().await;
}

#[tokio::test]
async fn the_request_rate_is_bounded() {
    let dir = tempdir::Dir::new("rate");
    let config = Config {
        admin_requests_per_second: 5,
        ..admin_config(&dir.0)
    };
    let server = hearth::Server::builder(config).bind().await.unwrap();
    let admin = server.admin_addr().unwrap();
    let handle = server.handle();
    let join = tokio::spawn(server.run());
    let mut limited = 0;
    for _ in 0..30 {
        let (st, v) = http(admin, "GET", "/v1/node", Some(TOKEN), None).await;
        if st == 429 {
            assert_eq!(v["error"]["code"], "rate_limited");
            limited += 1;
        }
    }
    assert!(limited >= 15, "{limited} of 30 limited");
    handle.shutdown();
    join.await.unwrap().unwrap();
}

#[tokio::test]
async fn node_status_and_drain() {
    let s = server("drain").await;
    let t = Some(TOKEN);
    let mut c = RawClient::connect(s.s.addr).await;
    c.join("held").await;
    let (st, v) = http(s.admin, "GET", "/v1/node", t, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (
            v["node"].as_str(),
            v["documents"].as_u64(),
            v["connections"].as_u64(),
            v["cluster"].as_bool()
        ),
        (Some("test"), Some(1), Some(1), Some(false)),
        "{v}"
    );
    let (st, v) = http(s.admin, "GET", "/v1/nodes", t, None).await;
    assert_eq!(
        (st, v["nodes"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );
    let (st, v) = http(s.admin, "POST", "/v1/nodes/test/drain", t, Some("{}")).await;
    assert_eq!(st, 202, "{v}");
    // the client is reset, the document stored and unloaded, the node stays up and says so
    assert!(c.expect_end(Duration::from_secs(5)).await.is_some());
    wait_until(Duration::from_secs(5), "drained", || {
        s.s.handle.documents().is_empty()
    })
    .await;
    let (st, v) = http(s.admin, "GET", "/v1/node", t, None).await;
    assert_eq!((st, &v["draining"]), (200, &json!(true)), "{v}");
    s.s.stop().await;
}

#[tokio::test]
async fn built_in_events_work_in_process() {
    let s = server("inproc").await;
    let h = &s.s.handle;
    let ops = json!({ "ops": [{ "op": "text.insert", "type": "t", "text": "abc" }] });
    let r = h
        .emit("p", hearth::events::APPLY, ops.to_string().into_bytes())
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&r).unwrap(),
        json!({ "applied": 1 })
    );
    let r = h
        .emit(
            "p",
            hearth::events::GET,
            br#"{"include":["json"],"types":"t:text"}"#.to_vec(),
        )
        .await
        .unwrap();
    let view: hearth::events::DocumentView = serde_json::from_slice(&r).unwrap();
    assert_eq!(view.json.unwrap()["t"], "abc");
    let err = h
        .emit("nothing-here", hearth::events::GET, Vec::new())
        .await
        .unwrap_err();
    match err {
        hearth::EmitError::Handler(m) => assert!(matches!(
            hearth::events::BuiltinError::parse(&m),
            Some(hearth::events::BuiltinError::NotFound(_))
        )),
        other => panic!("{other:?}"),
    }
    s.s.stop().await;
}

#[test]
fn the_openapi_description_matches_the_routes_and_the_docs() {
    let spec: Value = serde_json::from_str(include_str!("../src/admin/openapi.json")).unwrap();
    let mut described = std::collections::BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                described.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: std::collections::BTreeSet<(String, String)> = hearth::admin::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        described, served,
        "openapi.json and the served routes differ"
    );
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-api.md")).unwrap();
    for (m, p) in hearth::admin::ROUTES {
        assert!(
            docs.contains(&format!("{m} {p}")) || docs.contains(&format!("`{m} {p}")),
            "docs/admin-api.md does not describe {m} {p}"
        );
    }
}

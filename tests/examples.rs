//! The `custom_server` example (`examples/custom_server.rs`) as a real process: its
//! authentication hook (writer, reader, refused), its stateless message that fires its custom
//! event through `ServerHandle::emit`, and the event's direct edit under `lock_document`, seen
//! by a client and stored. Also the public weak handle: it upgrades while the server runs and not
//! after.
//!
//! `cargo test` builds the examples before the tests; run alone, build the example first
//! (`cargo build --release --example custom_server`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Msg, RawClient, auth, stateless, step1_empty, test_config};
use hearth::Server;
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, Transact, Update};

/// The example binary, next to this test's own directory (`target/<profile>/examples/`).
fn example_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile_dir.join("examples").join("custom_server");
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test` builds it, or run `cargo build --release --example custom_server`",
        bin.display()
    );
    bin
}

/// Kills the example when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_example(dir: &std::path::Path) -> (Process, SocketAddr) {
    let ready = dir.join("ready");
    let child = Command::new(example_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--operator-listen", ""])
        .args(["--database-url", "memory://", "--ready-file"])
        .arg(&ready)
        .env_remove("HEARTH_AUTH_TOKENS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the example");
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready)
            && let Ok(addr) = text.trim().parse()
        {
            return (process, addr);
        }
        assert!(Instant::now() < deadline, "the example never became ready");
        // polling a starting process (no runtime here), bounded by the deadline above
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Text `log` of the state in `update`.
fn log_text(update: &[u8]) -> String {
    let doc = Doc::new();
    let log = doc.get_or_insert_text("log");
    doc.transact_mut()
        .apply_update(Update::decode_v1(update).unwrap())
        .unwrap();
    log.get_string(&doc.transact())
}

/// Auth + empty step1; returns the server's step2 after `Authenticated(scope)`.
async fn join(c: &mut RawClient, doc: &str, token: &str, scope: &str) -> Vec<u8> {
    c.send(auth(doc, token)).await;
    c.send(step1_empty(doc)).await;
    c.expect(doc, Msg::Authenticated(scope.into())).await;
    let frames = c.recv_until(|f| matches!(f.msg, Msg::Step2(_))).await;
    match frames.into_iter().last().map(|f| f.msg) {
        Some(Msg::Step2(s)) => s,
        other => panic!("expected step2, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_server_example_authenticates_and_edits_through_its_event() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("custom-server-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_process, addr) = start_example(&dir);
    let doc = "notes";

    // refused token
    let mut stranger = RawClient::connect(addr).await;
    stranger.send(auth(doc, "guess")).await;
    stranger
        .expect(doc, Msg::PermissionDenied("permission-denied".into()))
        .await;

    // a writer fires the event through a stateless message; the edit reaches it as an update
    let mut writer = RawClient::connect(addr).await;
    join(&mut writer, doc, "writer", "read-write").await;
    writer.send(stateless(doc, "append:hello")).await;
    let frames = writer
        .recv_until(|f| matches!(&f.msg, Msg::Stateless(s) if s.starts_with("appended:") || s.starts_with("error:")))
        .await;
    let seen = Doc::new();
    let log = seen.get_or_insert_text("log");
    for f in &frames {
        if let Msg::Update(u) | Msg::Step2(u) = &f.msg {
            seen.transact_mut()
                .apply_update(Update::decode_v1(u).unwrap())
                .unwrap();
        }
    }
    assert_eq!(
        frames.last().map(|f| f.msg.clone()),
        Some(Msg::Stateless("appended:6".into()))
    );
    assert_eq!(log.get_string(&seen.transact()), "hello\n");

    // a reader sees the edit on join and may not fire the event
    let mut reader = RawClient::connect(addr).await;
    let state = join(&mut reader, doc, "reader", "readonly").await;
    assert_eq!(log_text(&state), "hello\n");
    reader.send(stateless(doc, "append:nope")).await;
    reader
        .recv_until(|f| f.msg == Msg::Stateless("error:read-only".into()))
        .await;

    // a second append lands after the first, for a fresh client too
    writer.send(stateless(doc, "append:world")).await;
    writer
        .recv_until(|f| f.msg == Msg::Stateless("appended:12".into()))
        .await;
    let mut late = RawClient::connect(addr).await;
    let state = join(&mut late, doc, "writer", "read-write").await;
    assert_eq!(log_text(&state), "hello\nworld\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weak_handle_upgrades_only_while_the_server_runs() {
    let builder = Server::builder(test_config());
    let weak = builder.weak_handle();
    assert!(weak.upgrade().is_none(), "nothing to reach before bind");
    let server = builder.bind().await.unwrap();
    let handle = weak.upgrade().expect("upgrades once bound");
    assert!(handle.documents().is_empty());
    let again = handle.downgrade();
    drop(handle);
    let strong = server.handle();
    let join = tokio::spawn(server.run());
    strong.shutdown();
    drop(strong);
    tokio::time::timeout(Duration::from_secs(15), join)
        .await
        .expect("shuts down")
        .unwrap()
        .unwrap();
    assert!(weak.upgrade().is_none(), "gone after shutdown");
    assert!(again.upgrade().is_none());
}

//! A client that must be reset before the server has answered it anything (here: its
//! document cannot be routed because Redis does not respond) gets one message first — a
//! `QueryAwareness` for its document — and only then the close (4205). A provider counts a
//! connection that received no message as a failed attempt and backs off further after each
//! one; with a message first, it counts the connection as made and reconnects at its first
//! back-off step (docs/cluster.md, "Failover timeline").

use std::time::Duration;

use cluster_tests::testbed::client::auth_frame;
use cluster_tests::testbed::raw::step1;
use cluster_tests::testbed::{Cluster, ClusterSpec, RawSocket, Scratch, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_before_any_answer_gets_a_message_first() -> anyhow::Result<()> {
    let test = "cluster_reset_backoff";
    let scratch = Scratch::new(test)?;
    let cluster = Cluster::start(&scratch, ClusterSpec::new(1).lock_ttl_ms(2000)).await?;
    let doc = "reset-backoff";
    cluster.redis().stop()?;
    let socket = RawSocket::connect(&cluster.nodes[0].url()).await?;
    socket.send(auth_frame(doc, "rw", Some("4.8.0")));
    socket.send(step1(doc));
    // routing gives up after the lock's validity (under the 2 s TTL); bounded wait for the close
    let closing = wait_until("the socket closed", Duration::from_secs(20), || async {
        anyhow::Ok(socket.closed().is_some())
    })
    .await;
    cluster.redis().cont()?;
    closing?;
    let closed = socket.closed();
    let transcript = socket.transcript(doc);
    eprintln!("[{test}] frames {transcript:?}, then {closed:?}");
    assert_eq!(
        closed.as_ref().map(|(code, _)| *code),
        Some(4205),
        "reset with 4205"
    );
    assert_eq!(
        transcript,
        vec!["QueryAwareness".to_string()],
        "exactly one message, before the close"
    );
    Ok(())
}

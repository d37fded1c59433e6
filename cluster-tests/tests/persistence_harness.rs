//! Self-tests of the test harness (`cluster_tests::testbed`) against the real binary: the
//! recording client's ack bookkeeping, reconnect re-delivery, awareness, the load balancer and
//! the Redis helper and the port leases. If these fail, the persistence and cluster tests cannot
//! be trusted.

use std::collections::BTreeSet;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Lb, NodeProcess, NodeSpec, PortLease, RedisProcess, Scratch, TestClient, WAIT,
    lease_port,
};

/// Leased ports lie outside the kernel's ephemeral range, are bindable, and are never leased
/// twice while held: each one's lock file is locked.
#[test]
fn leased_ports_are_exclusive_and_outside_the_ephemeral_range() -> anyhow::Result<()> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let bounds: Vec<u16> = range
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [low, high] = bounds[..] else {
        anyhow::bail!("unexpected ip_local_port_range {range:?}");
    };
    let leases = (0..50)
        .map(|_| lease_port())
        .collect::<anyhow::Result<Vec<PortLease>>>()?;
    let ports: BTreeSet<u16> = leases.iter().map(PortLease::port).collect();
    assert_eq!(
        ports.len(),
        leases.len(),
        "a port was leased twice: {ports:?}"
    );
    for &port in &ports {
        if low > 2048 || high < u16::MAX {
            assert!(
                port < low || port > high,
                "{port} is in the ephemeral range {low}-{high}"
            );
        }
        assert!(
            is_leased(port)?,
            "port {port} is leased but its lock file is not locked"
        );
    }
    // a server can bind a leased port
    drop(std::net::TcpListener::bind((
        "127.0.0.1",
        leases[0].port(),
    ))?);
    Ok(())
}

/// Whether some test process holds the lease of `port` (its lock file is locked).
fn is_leased(port: u16) -> anyhow::Result<bool> {
    let path = std::env::temp_dir()
        .join("hearth-test-ports")
        .join(port.to_string());
    let lock = std::fs::File::open(path)?;
    Ok(matches!(
        lock.try_lock(),
        Err(std::fs::TryLockError::WouldBlock)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_handshake_acks_and_reconnect() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_harness_client")?;
    let db = scratch.join("h.db");
    let mut node = NodeProcess::start(
        &scratch,
        NodeSpec::new("1", format!("sqlite://{}", db.display())),
    )
    .await?;

    let a = TestClient::connect_with(&node.url(), "doc", ClientOptions::labelled("a")).await?;
    let b = TestClient::connect_with(&node.url(), "doc", ClientOptions::labelled("b")).await?;
    // the provider's step2 is acknowledged too (durable: after a commit)
    a.wait_for("handshake acked", WAIT, |s| s.handshake_acked())
        .await?;
    for _ in 0..20 {
        a.insert_next();
        b.insert_next();
    }
    a.wait_all_acked(WAIT).await?;
    b.wait_all_acked(WAIT).await?;
    // b sees a's edits through the broadcast and vice versa
    b.wait_for("40 markers", WAIT, |s| s.len() == 40).await?;
    a.wait_for("40 markers", WAIT, |s| s.len() == 40).await?;
    assert_eq!(a.contents(), b.contents(), "converged");
    a.view(|s| {
        assert_eq!(s.statuses(), (21, 0), "20 updates + 1 step2, all acked");
        assert!(s.anomalies().is_empty(), "{:?}", s.anomalies());
    });

    // awareness reaches the other client
    a.set_awareness(Some(r#"{"user":"a"}"#));
    let aid = a.client_id();
    b.wait_for("a's awareness", WAIT, |s| {
        s.awareness().get(&aid).is_some_and(|j| j.contains("\"a\""))
    })
    .await?;

    // offline edits are re-delivered by the next connect's sync exchange and acked by its step2
    a.drop_connection();
    for _ in 0..5 {
        a.insert_next();
    }
    assert_eq!(a.view(|s| s.acked_count()), 20);
    a.reconnect(None).await?;
    a.wait_all_acked(WAIT).await?;
    b.wait_for("45 markers", WAIT, |s| s.len() == 45).await?;

    // the node's data survives SIGTERM + restart on the same port
    let status = node.term().await?;
    assert!(status.success(), "exit status {status}");
    // while it is down, its port stays leased: no other test is handed it
    let port = node.addr().port();
    assert!(
        is_leased(port)?,
        "port {port} of a stopped node is not leased"
    );
    node.restart().await?;
    assert_eq!(node.addr().port(), port);
    let fresh = TestClient::connect(&node.url(), "doc", "").await?;
    let mut got = fresh.contents();
    let mut want = a.contents();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_and_redis() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_harness_lb")?;
    let mut n1 = NodeProcess::start(&scratch, NodeSpec::new("1", "memory://")).await?;
    let n2 = NodeProcess::start(&scratch, NodeSpec::new("2", "memory://")).await?;
    let lb = Lb::start(vec![n1.addr(), n2.addr()]).await?;

    // round robin over both
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(TestClient::connect(&lb.url(), &format!("d{i}"), "").await?);
    }
    let open = lb.open_connections();
    assert_eq!(open.len(), 2, "{open:?}");
    assert!(open.iter().all(|(_, n)| *n == 2), "{open:?}");

    // a dead backend is skipped
    n1.kill()?;
    for i in 0..3 {
        TestClient::connect(&lb.url(), &format!("e{i}"), "").await?;
    }

    // reset_all cuts every proxied connection
    lb.reset_all();
    for c in &clients {
        c.wait_for("socket gone", WAIT, |s| !s.connected()).await?;
    }

    let mut redis = RedisProcess::start(&scratch).await?;
    redis.command(&["SET", "k", "v"]).await?;
    assert_eq!(
        redis.command(&["GET", "k"]).await?.as_str().as_deref(),
        Some("v")
    );
    redis.restart().await?;
    assert_eq!(
        redis.command(&["GET", "k"]).await?,
        cluster_tests::testbed::redis::Resp::Bulk(None),
        "a restarted redis is empty"
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(())
}

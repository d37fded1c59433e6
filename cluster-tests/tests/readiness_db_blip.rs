//! Readiness across a database blip (docs/deployment.md, "Readiness").
//!
//! Claims under test, one node on a private PostgreSQL stopped with `pg_ctl stop -m immediate`:
//! 1. an outage shorter than `readiness_outage_ms` leaves `/readyz` at 200 the whole time (every
//!    node shares the database: an instant 503 would empty the balancer), while
//!    `hearth_dependency_up{dependency="storage"}` turns 0 within a few check intervals;
//! 2. an outage longer than `readiness_outage_ms` turns `/readyz` 503, with the reason (storage
//!    unreachable) in the operator listener's body;
//! 3. once the database is back, `/readyz` answers 200 again and the gauge is 1;
//! 4. `/readyz` answers at once throughout (it never waits for the database).

use std::time::Duration;

use cluster_tests::testbed::{NodeProcess, NodeSpec, PgCluster, Scratch, wait_until};
use tokio::time::{Instant, sleep};

/// `readiness_outage_ms` of the node under test.
const OUTAGE_MS: u64 = 8000;
/// The short outage: well below `OUTAGE_MS`.
const BLIP: Duration = Duration::from_secs(3);
/// Longest `/readyz` answer accepted (it answers from recorded state).
const ANSWER_BOUND: Duration = Duration::from_millis(500);

async fn storage_up(node: &NodeProcess) -> anyhow::Result<f64> {
    Ok(node
        .metrics()
        .await?
        .sum("hearth_dependency_up", &[("dependency", "storage")]))
}

/// `/readyz`'s status, checking that it answered within [`ANSWER_BOUND`].
async fn readyz(node: &NodeProcess) -> anyhow::Result<u16> {
    let t = Instant::now();
    let code = node.readyz().await?;
    let took = t.elapsed();
    anyhow::ensure!(took < ANSWER_BOUND, "/readyz took {took:?}");
    Ok(code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_db_blip() -> anyhow::Result<()> {
    let scratch = Scratch::new("readiness_db_blip")?;
    let mut pg = PgCluster::start(&scratch)?;
    let url = pg.create_database("hearth")?;
    let spec = NodeSpec::new("1", &url).args(["--readiness-outage-ms", &OUTAGE_MS.to_string()]);
    let node = NodeProcess::start(&scratch, spec).await?;
    assert_eq!(readyz(&node).await?, 200);
    assert_eq!(storage_up(&node).await?, 1.0);

    // 1. a blip: ready throughout, the gauge goes 0
    pg.stop_immediate()?;
    let down_at = Instant::now();
    let mut saw_down = false;
    while down_at.elapsed() < BLIP {
        assert_eq!(readyz(&node).await?, 200, "503 during a short blip");
        saw_down |= storage_up(&node).await? == 0.0;
        sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_down, "hearth_dependency_up{{storage}} never went 0");
    pg.start_again()?;
    let started = Instant::now();
    wait_until(
        "storage up after the blip",
        Duration::from_secs(15),
        || async { anyhow::Ok(storage_up(&node).await? == 1.0) },
    )
    .await?;
    let back = started.elapsed();
    assert_eq!(readyz(&node).await?, 200);
    eprintln!("blip of {BLIP:?}: /readyz 200 throughout, storage up again {back:?} after restart");

    // 2. a long outage: 503 after readiness_outage_ms, with the reason
    pg.stop_immediate()?;
    let down_at = Instant::now();
    wait_until(
        "/readyz 503 in a long outage",
        Duration::from_millis(OUTAGE_MS) + Duration::from_secs(10),
        || async { anyhow::Ok(readyz(&node).await? == 503) },
    )
    .await?;
    let unready = down_at.elapsed();
    assert!(
        unready >= Duration::from_millis(OUTAGE_MS) - Duration::from_millis(100),
        "503 after {unready:?}, before readiness_outage_ms"
    );
    let (status, body) = node.operator_get("/readyz").await?;
    assert_eq!(status, 503);
    assert!(
        body.contains("storage unreachable for"),
        "operator /readyz body: {body:?}"
    );
    eprintln!(
        "long outage: /readyz 503 {:?} after the database stopped; reason {:?}",
        down_at.elapsed(),
        body.trim()
    );

    // 3. back: ready again
    pg.start_again()?;
    let started = Instant::now();
    wait_until(
        "/readyz 200 after recovery",
        Duration::from_secs(15),
        || async { anyhow::Ok(readyz(&node).await? == 200) },
    )
    .await?;
    let ready = started.elapsed();
    assert_eq!(storage_up(&node).await?, 1.0);
    eprintln!("database back: /readyz 200 after {ready:?}");
    Ok(())
}

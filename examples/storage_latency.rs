//! Group-commit latency of [`DocumentStore::append`] per backend (not a test; run by hand):
//!
//! ```text
//! cargo run --release --example storage_latency -- [ITERATIONS] [PG_URL]
//! ```
//!
//! One append in flight at a time (like the single group committer of a node), each item one
//! 120-byte update for its own document. Reports p50/p99/max for batches of 1 and 10 items on
//! SQLite (synchronous FULL and NORMAL, file under the system temp dir) and PostgreSQL (a
//! throw-away schema in `PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`; skipped
//! if unreachable).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use hearth::storage::{Append, AppendOutcome, DocumentStore, SqlOptions, SqlStore, Synchronous};
use sqlx::Connection;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let iterations: usize = args.next().map_or(2000, |a| a.parse().expect("ITERATIONS"));
    let pg_url = args
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());

    println!("iterations per row: {iterations} (after 100 warm-up appends)");
    println!(
        "{:<18} {:>5} {:>10} {:>10} {:>10}",
        "backend", "batch", "p50", "p99", "max"
    );

    let dir = std::env::temp_dir().join(format!("hearth-latency-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    for (label, sync) in [
        ("sqlite FULL", Synchronous::Full),
        ("sqlite NORMAL", Synchronous::Normal),
    ] {
        let url = format!(
            "sqlite://{}",
            dir.join(format!("{label}.db").replace(' ', "_")).display()
        );
        let opts = SqlOptions {
            sqlite_synchronous: sync,
            ..SqlOptions::default()
        };
        let store = SqlStore::connect(&url, opts).await.unwrap();
        for batch in [1, 10] {
            run(&store, label, batch, iterations).await;
        }
        store.close().await;
    }
    let _ = std::fs::remove_dir_all(&dir);

    match pg_schema(&pg_url).await {
        Ok((schema, url)) => {
            let store = SqlStore::connect(&url, SqlOptions::default())
                .await
                .unwrap();
            for batch in [1, 10] {
                run(&store, "postgres", batch, iterations).await;
            }
            store.close().await;
            let mut c = sqlx::PgConnection::connect(&pg_url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(&mut c)
            .await
            .unwrap();
        }
        Err(e) => println!("postgres: skipped ({e})"),
    }
}

async fn pg_schema(base: &str) -> Result<(String, String), sqlx::Error> {
    let schema = format!("hearth_bench_{}", uuid::Uuid::new_v4().simple());
    let mut c = sqlx::PgConnection::connect(base).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&mut c)
        .await?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok((
        schema.clone(),
        format!("{base}{sep}options=-c%20search_path%3D{schema}"),
    ))
}

async fn run(store: &SqlStore, label: &str, batch: usize, iterations: usize) {
    let mut epochs = Vec::new();
    for d in 0..batch {
        epochs.push(
            store
                .acquire_epoch(&format!("{label}-{batch}-{d}"))
                .await
                .unwrap(),
        );
    }
    let update = Bytes::from(vec![0xa5u8; 120]);
    let make = || -> Vec<Append> {
        (0..batch)
            .map(|d| Append {
                name: format!("{label}-{batch}-{d}"),
                epoch: epochs[d],
                updates: vec![update.clone()],
            })
            .collect()
    };
    for _ in 0..100 {
        store.append(&make()).await.unwrap();
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let items = make();
        let t = Instant::now();
        let out = store.append(&items).await.unwrap();
        samples.push(t.elapsed());
        assert!(out.iter().all(|o| matches!(o, AppendOutcome::Committed(_))));
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{:<18} {:>5} {:>10} {:>10} {:>10}",
        label,
        batch,
        fmt(pct(0.50)),
        fmt(pct(0.99)),
        fmt(samples[samples.len() - 1])
    );
}

fn fmt(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

//! TLS to PostgreSQL and Redis (docs/configuration.md, "TLS to the database and Redis"): a
//! test CA made here signs the certificates of a private PostgreSQL (`ssl=on`) and a private
//! Redis (`--tls-port`, client certificates required). A node verifies both against the CA
//! (`sslmode=verify-full` + `sslrootcert`, `rediss://` + `redis_tls_ca_file`) and presents its
//! client certificate to Redis; a client edits through it and what it wrote is stored. With the
//! wrong CA the node does not start and says which setting failed and why.

use std::time::Duration;

use cluster_tests::testbed::node::hearth_bin;
use cluster_tests::testbed::{
    ClientOptions, NodeProcess, NodeSpec, PgCluster, RedisProcess, Scratch, TestClient, TestPki,
    WAIT,
};

/// Runs `hearth` with `env` until it exits (≤ 60 s): exit code and stderr.
async fn failed_start(env: &[(&str, String)]) -> anyhow::Result<(Option<i32>, String)> {
    let mut cmd = tokio::process::Command::new(hearth_bin()?);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("HEARTH_LISTEN", "127.0.0.1:0")
        .env("HEARTH_OPERATOR_LISTEN", "")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_verifies_postgres_and_redis_against_a_private_ca() -> anyhow::Result<()> {
    let scratch = Scratch::new("tls")?;
    let pki = TestPki::make(&scratch.join("pki"))?;
    let pg = PgCluster::start_tls(&scratch, &pki)?;
    pg.create_database("hearth_tls")?;
    let redis = RedisProcess::start_tls(&scratch, &pki).await?;
    let redis_url = redis
        .tls_url()
        .ok_or_else(|| anyhow::anyhow!("no TLS port"))?;
    let pg_url = |ca: &std::path::Path| {
        format!(
            "postgres://postgres@localhost:{}/hearth_tls?sslmode=verify-full&sslrootcert={}",
            pg.port(),
            ca.display()
        )
    };
    let files = |ca: &std::path::Path| {
        vec![
            ("HEARTH_REDIS_TLS_CA_FILE", ca.display().to_string()),
            (
                "HEARTH_REDIS_TLS_CERT_FILE",
                pki.client_cert.display().to_string(),
            ),
            (
                "HEARTH_REDIS_TLS_KEY_FILE",
                pki.client_key.display().to_string(),
            ),
        ]
    };

    let secret = cluster_tests::testbed::cluster::random_secret();
    let mut spec = NodeSpec::new("tls-1", pg_url(&pki.ca))
        .env("HEARTH_REDIS_URL", &redis_url)
        .env("HEARTH_CLUSTER_SECRET", &secret);
    for (k, v) in files(&pki.ca) {
        spec = spec.env(k, v);
    }
    let node = NodeProcess::start(&scratch, spec).await?;
    let client =
        TestClient::connect_with(&node.url(), "over-tls", ClientOptions::labelled("writer"))
            .await?;
    for _ in 0..3 {
        client.insert_next();
    }
    client.wait_all_acked(WAIT).await?;
    // the node holds the document's lock in Redis, reached over TLS only
    let keys = redis.command(&["KEYS", "*:lock:*"]).await?;
    anyhow::ensure!(
        matches!(&keys, cluster_tests::testbed::redis::Resp::Array(Some(k)) if !k.is_empty()),
        "no lock in Redis: {keys:?}"
    );
    // and what it acknowledged is in PostgreSQL, reached over TLS only
    let rows = cluster_tests::testbed::pg::psql(
        &pg.url("hearth_tls"),
        "SELECT (SELECT count(*) FROM document_updates WHERE name = 'over-tls') \
         + (SELECT count(*) FROM documents WHERE name = 'over-tls' AND snapshot IS NOT NULL)",
    )?;
    anyhow::ensure!(
        rows.trim().parse::<u64>().unwrap_or(0) > 0,
        "nothing stored: {rows:?}"
    );
    drop(client);
    drop(node);

    // the wrong CA for PostgreSQL: no start, one line naming the setting and the cause
    let mut env = vec![("HEARTH_DATABASE_URL", pg_url(&pki.other_ca))];
    let (code, stderr) = failed_start(&env).await?;
    anyhow::ensure!(code.is_some_and(|c| c != 0), "started: {stderr}");
    anyhow::ensure!(
        stderr.contains("database") && stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );

    // the wrong CA for Redis
    env = vec![
        ("HEARTH_DATABASE_URL", pg_url(&pki.ca)),
        ("HEARTH_REDIS_URL", redis_url.clone()),
        ("HEARTH_CLUSTER_SECRET", secret.clone()),
    ];
    env.extend(files(&pki.other_ca));
    let (code, stderr) = failed_start(&env).await?;
    anyhow::ensure!(code.is_some_and(|c| c != 0), "started: {stderr}");
    anyhow::ensure!(stderr.to_lowercase().contains("redis"), "{stderr}");

    // no client certificate: Redis refuses the node
    env = vec![
        ("HEARTH_DATABASE_URL", pg_url(&pki.ca)),
        ("HEARTH_REDIS_URL", redis_url.clone()),
        ("HEARTH_CLUSTER_SECRET", secret.clone()),
        ("HEARTH_REDIS_TLS_CA_FILE", pki.ca.display().to_string()),
    ];
    let (code, stderr) = failed_start(&env).await?;
    anyhow::ensure!(code.is_some_and(|c| c != 0), "started: {stderr}");
    Ok(())
}

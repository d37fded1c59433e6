//! Revocation across a cluster (docs/auth.md, "Revocation"): three nodes with the same JWT
//! secret and admin token. Alice edits one document from a client on its owner (n1) and from
//! a client attached through a non-owner (n2); Bob edits it through n3. Revoking Alice through
//! n3's admin API refuses both of her attachments within a second, while Bob keeps editing;
//! she cannot come back on any node, every node lists the revocation, and lifting it lets her
//! back in.

use std::time::Duration;

use cluster_tests::testbed::{ClientOptions, Cluster, ClusterSpec, Scratch, TestClient, WAIT};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tokio::time::Instant;

const SECRET: &str = "cluster-revocation-secret-0123456789abcdef";
const ADMIN: &str = "Yc3Nt8Vk1Qz6Lm9Wr4Hb7Xd2F";
const DOC: &str = "rev-doc";

fn token(sub: &str, jti: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({ "sub": sub, "jti": jti, "exp": now + 600, "docs": ["*"] });
    EncodingKey::from_secret(SECRET.as_bytes())
        .and_then(|key| encode(&Header::new(Algorithm::HS256), &claims, &key))
        .unwrap_or_default()
}

async fn client(
    cluster: &Cluster,
    node: usize,
    label: &str,
    token: String,
) -> anyhow::Result<TestClient> {
    TestClient::connect_with(
        &cluster.nodes[node].url(),
        DOC,
        ClientOptions::labelled(label).token(token),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_user_is_refused_on_every_node_within_a_second() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_revocation")?;
    let cluster = Cluster::start(
        &scratch,
        ClusterSpec::new(3)
            .env("HEARTH_JWT_SECRET", SECRET)
            .env("HEARTH_ADMIN_TOKENS", ADMIN)
            .env("HEARTH_AUTH_FAILURES_BEFORE_BAN", "0"),
    )
    .await?;
    // n1 owns the document: Alice opens it there first
    let alice_owner = client(&cluster, 0, "alice-n1", token("alice", "a1")).await?;
    let alice_proxied = client(&cluster, 1, "alice-n2", token("alice", "a2")).await?;
    let bob = client(&cluster, 2, "bob-n3", token("bob", "b1")).await?;
    for c in [&alice_owner, &alice_proxied, &bob] {
        c.insert_next();
    }
    for c in [&alice_owner, &alice_proxied, &bob] {
        c.wait_for("first edit acknowledged", WAIT, |s| s.all_acked())
            .await?;
    }

    let started = Instant::now();
    let (status, answer) = cluster.nodes[2]
        .admin_call(
            ADMIN,
            "POST",
            "/v1/revocations",
            Some(json!({ "user": "alice", "ttl_s": 600 })),
        )
        .await?;
    anyhow::ensure!(status == 200, "revoke answered {status} {answer}");
    let told = answer["nodes"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(told == 3, "every node applied it: {answer}");
    for c in [&alice_owner, &alice_proxied] {
        c.wait_for("refused", Duration::from_secs(1), |s| {
            s.denied().iter().any(|r| r == "permission-denied")
        })
        .await?;
    }
    let took = started.elapsed();
    anyhow::ensure!(
        took < Duration::from_secs(2),
        "both attachments refused {took:?} after the call began"
    );

    // Bob keeps editing, and Alice's refused client is not let in again
    let marker = bob.insert_next();
    bob.wait_for("Bob's edit acknowledged", WAIT, |s| s.all_acked())
        .await?;
    anyhow::ensure!(bob.view(|s| s.denied().is_empty()), "Bob was refused");
    let _ = marker;
    for node in 0..3 {
        let again = TestClient::start(
            &cluster.nodes[node].url(),
            DOC,
            ClientOptions::labelled(format!("alice-again-n{}", node + 1))
                .token(token("alice", "a3")),
        )
        .await?;
        again
            .wait_for("refused on reconnect", WAIT, |s| !s.denied().is_empty())
            .await?;
        let (_, listed) = cluster.nodes[node]
            .admin_call(ADMIN, "GET", "/v1/revocations", None)
            .await?;
        anyhow::ensure!(
            listed["revocations"]
                .as_array()
                .is_some_and(|l| l.iter().any(|r| r["user"] == "alice")),
            "n{} lists {listed}",
            node + 1
        );
    }

    // lifted on every node through another node's API
    let (status, lifted) = cluster.nodes[0]
        .admin_call(ADMIN, "DELETE", "/v1/revocations/user/alice", None)
        .await?;
    anyhow::ensure!(
        status == 200 && lifted["lifted"] == true,
        "{status} {lifted}"
    );
    for node in 0..3 {
        let back = client(
            &cluster,
            node,
            &format!("alice-back-n{}", node + 1),
            token("alice", "a4"),
        )
        .await?;
        back.insert_next();
        back.wait_for("edit after the lift", WAIT, |s| s.all_acked())
            .await?;
    }
    Ok(())
}

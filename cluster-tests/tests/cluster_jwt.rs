//! JWT authentication seen by the real `@hocuspocus/provider`, on the owner and through a
//! non-owner (docs/auth.md): two nodes with the same `HEARTH_JWT_SECRET`; every document is
//! first opened on n1 by a client with a valid token, then each case's provider connects to n1
//! (the owner) and to n2 (a non-owner proxying to n1) and must see the same answer.

use std::process::Stdio;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, Scratch, TestClient, run_auth_cases, workspace_dir,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "cluster-jwt-secret-0123456789abcdef-0123";

fn token(claims: &Value) -> String {
    EncodingKey::from_secret(SECRET.as_bytes())
        .and_then(|key| encode(&Header::new(Algorithm::HS256), claims, &key))
        .unwrap_or_default()
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_sees_the_same_answer_on_the_owner_and_through_a_non_owner()
-> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_jwt")?;
    let cluster = Cluster::start(
        &scratch,
        ClusterSpec::new(2)
            .env("HEARTH_JWT_SECRET", SECRET)
            .env("HEARTH_JWT_AUDIENCE", "hearth")
            // the refusals below would otherwise ban the test's address
            .env("HEARTH_AUTH_FAILURES_BEFORE_BAN", "0"),
    )
    .await?;
    let valid =
        |docs: Value| json!({ "sub": "u", "aud": "hearth", "exp": now() + 600, "docs": docs });
    let mut cases: Vec<(&str, &str, Value, &str)> = vec![
        ("valid", "jwt-a", valid(json!("jwt-*")), "read-write"),
        (
            "outside the patterns",
            "jwt-b",
            valid(json!("other/*")),
            "denied",
        ),
        (
            "read-only claim",
            "jwt-c",
            {
                let mut c = valid(json!("*"));
                c["read_only"] = json!(true);
                c
            },
            "readonly",
        ),
        (
            "read-only patterns",
            "jwt-d",
            json!({ "aud": "hearth", "exp": now() + 600, "docs_ro": ["jwt-d"] }),
            "readonly",
        ),
        (
            "expired",
            "jwt-e",
            {
                let mut c = valid(json!("*"));
                c["exp"] = json!(now() - 60);
                c
            },
            "denied",
        ),
        (
            "not yet valid",
            "jwt-f",
            {
                let mut c = valid(json!("*"));
                c["nbf"] = json!(now() + 600);
                c
            },
            "denied",
        ),
        (
            "wrong audience",
            "jwt-g",
            {
                let mut c = valid(json!("*"));
                c["aud"] = json!("other");
                c
            },
            "denied",
        ),
    ];
    let mut list = Vec::new();
    let mut openers = Vec::new();
    for (label, doc, claims, expect) in cases.drain(..) {
        // the owner is n1: a client with a valid token opens every document there first
        let opener = TestClient::connect_with(
            &cluster.nodes[0].url(),
            doc,
            ClientOptions::labelled(format!("opener-{doc}")).token(token(&valid(json!("*")))),
        )
        .await?;
        openers.push(opener);
        for (node, where_) in [(0usize, "owner"), (1usize, "non-owner")] {
            list.push(json!({
                "label": format!("{label} ({where_})"),
                "url": cluster.nodes[node].url(),
                "doc": doc,
                "token": token(&claims),
                "expect": expect,
            }));
        }
    }
    // a token signed with another secret, and an unsigned one
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &valid(json!("*")),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-0123456")?,
    )?;
    for (node, where_) in [(0usize, "owner"), (1usize, "non-owner")] {
        list.push(json!({ "label": format!("wrong signature ({where_})"), "url": cluster.nodes[node].url(),
                          "doc": "jwt-a", "token": forged, "expect": "denied" }));
        list.push(json!({ "label": format!("alg none ({where_})"), "url": cluster.nodes[node].url(),
                          "doc": "jwt-a", "token": "eyJhbGciOiJub25lIn0.eyJkb2NzIjoiKiJ9.", "expect": "denied" }));
    }
    assert_eq!(list.len(), 18);
    run_auth_cases(list, &cluster.nodes[0].url()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_and_are_refreshed_on_the_owner_and_through_a_non_owner() -> anyhow::Result<()>
{
    let scratch = Scratch::new("cluster_jwt_expiry")?;
    let cluster = Cluster::start(
        &scratch,
        ClusterSpec::new(2)
            .env("HEARTH_JWT_SECRET", SECRET)
            .env("HEARTH_JWT_LEEWAY_S", "0"),
    )
    .await?;
    for (node, doc) in [(0usize, "expiry-owner"), (1usize, "expiry-edge")] {
        // n1 owns both documents; the providers connect to n1, then to n2
        let _opener = TestClient::connect_with(
            &cluster.nodes[0].url(),
            doc,
            ClientOptions::labelled("opener")
                .token(token(&json!({ "exp": now() + 600, "docs": "*" }))),
        )
        .await?;
        let ends = now() + 4;
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(workspace_dir().join("tests/interop/jwt-expiry.mjs"))
            .env("HEARTH_URL", cluster.nodes[node].url())
            .env("DOC", doc)
            .env("SHORT", token(&json!({ "exp": ends, "docs": "*" })))
            .env("FRESH", token(&json!({ "exp": now() + 600, "docs": "*" })))
            .env("SHORT_ENDS_AT_MS", (ends * 1000).to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
        assert!(
            out.status.success(),
            "node {}: {}\n{}",
            node + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

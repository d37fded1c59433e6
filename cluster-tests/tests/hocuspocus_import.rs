//! Moving data from Hocuspocus: `hearth import` of a database written by the real
//! `@hocuspocus/server` with `@hocuspocus/extension-sqlite` (SQLite) and
//! `@hocuspocus/extension-database` (PostgreSQL), and of a directory of update files;
//! `hearth export` back to a directory and to a Hocuspocus table that the real server then
//! serves. Every comparison reads documents through a real `@hocuspocus/provider`: what
//! Hocuspocus's clients saw must be exactly what Hearth's clients see.
//!
//! Needs `npm ci --prefix tests/migration` (scripts/test does it) and PostgreSQL at
//! `HEARTH_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, ensure};
use cluster_tests::testbed::node::hearth_bin;
use cluster_tests::testbed::{NodeProcess, NodeSpec, Scratch, workspace_dir};
use serde_json::Value;

/// Document names with the characters that need care: separators, spaces, non-ASCII, `%`,
/// a leading dot, and a document of a few hundred kilobytes.
const NAMES: &[&str] = &[
    "plain",
    "with space",
    "a/b/c",
    "unicode-é-🔥",
    "100%",
    ".dotted",
    "big-document",
];

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn pg_url() -> String {
    std::env::var("HEARTH_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into())
}

/// Runs `tests/migration/hocuspocus.mjs` in `mode` and returns the JSON of its last line.
async fn script(mode: &str, env: &[(&str, &str)]) -> anyhow::Result<Value> {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(workspace_dir().join("tests/migration/hocuspocus.mjs"))
        .env("MODE", mode)
        .env("NAMES", serde_json::to_string(NAMES)?)
        .env("SCRIPT_TIMEOUT_MS", "90000")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .context("hocuspocus.mjs did not finish")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "hocuspocus.mjs {mode} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(last).with_context(|| {
        format!(
            "hocuspocus.mjs {mode}: {} bytes of unparsable output",
            stdout.len()
        )
    })?;
    ensure!(
        value.as_object().map(|o| o.len()) == Some(NAMES.len()),
        "not every document reported: {value}"
    );
    Ok(value)
}

/// The outcome of one `hearth` command: exit code, stdout, stderr.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the `hearth` binary with `args` (none of the test's own `HEARTH_*` variables).
async fn hearth(args: &[&str]) -> anyhow::Result<Run> {
    let mut cmd = tokio::process::Command::new(hearth_bin()?);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("HEARTH_") {
            cmd.env_remove(k);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .with_context(|| format!("hearth {args:?} did not finish"))??;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `hearth ARGS` and checks it exits 0 with `summary` in its totals line.
async fn transfer(args: &[&str], summary: &str) -> anyhow::Result<Run> {
    let run = hearth(args).await?;
    ensure!(
        run.code == Some(0) && run.stdout.contains(summary),
        "hearth {args:?}: exit {:?}, expected {summary:?}\nstdout: {}\nstderr: {}",
        run.code,
        run.stdout,
        run.stderr
    );
    Ok(run)
}

/// What clients of a Hearth node on `database_url` (with `args`) read for every document.
async fn read_through_hearth(
    scratch: &Scratch,
    id: &str,
    database_url: &str,
    args: &[&str],
) -> anyhow::Result<Value> {
    let spec = NodeSpec::new(id, database_url).args(args.iter().copied());
    let mut node = NodeProcess::start(scratch, spec).await?;
    let url = node.url();
    let read = script("read", &[("URL", &url)]).await;
    node.term().await?;
    read
}

/// Checks that `got` holds exactly the documents of `expected`; names the ones that differ
/// (the documents are too large to print whole).
fn same(what: &str, got: &Value, expected: &Value) -> anyhow::Result<()> {
    let differ: Vec<String> = NAMES
        .iter()
        .filter(|n| got.get(**n) != expected.get(**n))
        .map(|n| {
            let show = |v: Option<&Value>| {
                let text = v.map(Value::to_string).unwrap_or_default();
                text.chars().take(300).collect::<String>()
            };
            format!(
                "{n:?}: got {} expected {}",
                show(got.get(*n)),
                show(expected.get(*n))
            )
        })
        .collect();
    ensure!(
        differ.is_empty(),
        "{what}: documents differ:\n{}",
        differ.join("\n")
    );
    ensure!(got == expected, "{what}: other documents than expected");
    Ok(())
}

fn n(count: usize) -> String {
    count.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_hocuspocus_sqlite_extension_is_imported_and_exported_back()
-> anyhow::Result<()> {
    let scratch = Scratch::new("hocuspocus_import_sqlite")?;
    let hp_file = scratch.join("hocuspocus.sqlite");
    let hp_path = hp_file.display().to_string();
    let hp = format!("sqlite://{hp_path}");
    let expected = script("write", &[("SQLITE", &hp_path)]).await?;
    let all = n(NAMES.len());

    // into a database of Hearth's own
    let hearth_db = format!("sqlite://{}", scratch.join("hearth.db").display());
    let db = ["--database-url", hearth_db.as_str()];
    let first = transfer(
        &[&["import", &hp][..], &db].concat(),
        &format!("{all}/{all} documents, {all} imported, 0 unchanged, 0 failed"),
    )
    .await?;
    ensure!(
        first.stderr.is_empty() || !first.stderr.contains("failed:"),
        "{}",
        first.stderr
    );
    // idempotent: a second run and a dry run find everything in place
    let again = format!("{all}/{all} documents, 0 imported, {all} unchanged, 0 failed");
    transfer(&[&["import", &hp][..], &db].concat(), &again).await?;
    transfer(&[&["import", &hp, "--dry-run"][..], &db].concat(), &again).await?;
    let read = read_through_hearth(&scratch, "reader-1", &hearth_db, &[]).await?;
    same("Hearth after the import", &read, &expected)?;

    // pointed at the Hocuspocus file itself: refused with the way out, the data untouched...
    let refused = hearth(&["--database-url", &hp, "--listen", "127.0.0.1:0"]).await?;
    ensure!(
        refused.code != Some(0) && refused.stderr.contains("database_table_prefix"),
        "exit {:?}: {}",
        refused.code,
        refused.stderr
    );
    // ...and with a prefix Hearth lives beside it in the same file
    let beside = [
        "--database-url",
        hp.as_str(),
        "--database-table-prefix",
        "hearth_",
    ];
    transfer(
        &[&["import", &hp][..], &beside].concat(),
        &format!("{all} imported, 0 unchanged, 0 failed"),
    )
    .await?;
    let read = read_through_hearth(&scratch, "reader-2", &hp, &beside[2..]).await?;
    same("Hearth beside Hocuspocus", &read, &expected)?;

    // back to Hocuspocus: an exported table is served by the real server unchanged
    let back = scratch.join("back.sqlite").display().to_string();
    transfer(
        &[&["export", &format!("sqlite://{back}")][..], &db].concat(),
        &format!("{all}/{all} documents, {all} exported"),
    )
    .await?;
    let served = script("serve-read", &[("SQLITE", &back)]).await?;
    same("Hocuspocus serving the export", &served, &expected)?;

    // and through a directory of update files into a fresh database
    let dir = scratch.join("exported");
    let dir = dir.display().to_string();
    transfer(
        &[&["export", &dir][..], &db].concat(),
        &format!("{all} exported"),
    )
    .await?;
    let fresh = format!("sqlite://{}", scratch.join("fresh.db").display());
    transfer(
        &["import", &dir, "--database-url", &fresh],
        &format!("{all}/{all} documents, {all} imported"),
    )
    .await?;
    let read = read_through_hearth(&scratch, "reader-3", &fresh, &[]).await?;
    same(
        "Hearth after an export and import of files",
        &read,
        &expected,
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_the_hocuspocus_database_extension_on_postgres_is_imported() -> anyhow::Result<()>
{
    let scratch = Scratch::new("hocuspocus_import_postgres")?;
    let base = pg_url();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let table = format!("hp_{}", &id[..12]);
    let back = format!("back_{}", &id[..12]);
    let prefix = format!("h{}_", &id[..12]);
    let result = async {
        let expected = script("write", &[("PG_URL", &base), ("TABLE", &table)]).await?;
        let all = n(NAMES.len());
        let db = [
            "--database-url",
            base.as_str(),
            "--database-table-prefix",
            prefix.as_str(),
        ];
        transfer(
            &[&["import", &base, "--table", &table][..], &db].concat(),
            &format!("{all}/{all} documents, {all} imported, 0 unchanged, 0 failed"),
        )
        .await?;
        transfer(
            &[&["import", &base, "--table", &table][..], &db].concat(),
            &format!("0 imported, {all} unchanged, 0 failed"),
        )
        .await?;
        let read = read_through_hearth(&scratch, "pg-reader", &base, &db[2..]).await?;
        same("Hearth after the import", &read, &expected)?;
        transfer(
            &[&["export", &base, "--table", &back][..], &db].concat(),
            &format!("{all} exported"),
        )
        .await?;
        let served = script("serve-read", &[("PG_URL", &base), ("TABLE", &back)]).await?;
        same("Hocuspocus serving the export", &served, &expected)?;
        Ok(())
    }
    .await;
    drop_tables(
        &base,
        &[
            table.clone(),
            back.clone(),
            format!("{prefix}document_updates"),
            format!("{prefix}documents"),
            format!("{prefix}_sqlx_migrations"),
        ],
    )
    .await;
    result
}

async fn drop_tables(url: &str, tables: &[String]) {
    use sqlx::Connection;
    let Ok(mut c) = sqlx::PgConnection::connect(url).await else {
        return;
    };
    for t in tables {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{t}\"")))
            .execute(&mut c)
            .await;
    }
    let _ = c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_files_are_imported_and_bad_files_are_named() -> anyhow::Result<()> {
    let scratch = Scratch::new("hocuspocus_import_files")?;
    let dir = scratch.join("updates");
    let dir_s = dir.display().to_string();
    let expected = script("files", &[("OUT_DIR", &dir_s)]).await?;
    // files that are not documents: garbage, a bad name, and a file import does not read
    std::fs::write(dir.join("garbage.bin"), b"\xff\xfe not an update")?;
    std::fs::write(dir.join("bad%zz.ystate"), [0u8, 0])?;
    std::fs::write(dir.join("notes.txt"), b"ignored")?;
    let db = format!("sqlite://{}", scratch.join("hearth.db").display());
    let total = n(NAMES.len() + 3);
    let run = hearth(&["import", &dir_s, "--database-url", &db]).await?;
    ensure!(
        run.code == Some(1)
            && run.stdout.contains(&format!(
                "{total}/{total} documents, {} imported, 0 unchanged, 3 failed",
                NAMES.len()
            ))
            && run.stderr.contains("\"garbage\" failed")
            && run
                .stderr
                .contains("\"v2-document\" failed: a Yjs v2 update")
            && run.stderr.contains("bad%zz"),
        "exit {:?}\nstdout: {}\nstderr: {}",
        run.code,
        run.stdout,
        run.stderr
    );
    let read = read_through_hearth(&scratch, "files-reader", &db, &[]).await?;
    same("Hearth after importing files", &read, &expected)?;
    ensure!(Path::new(&dir).is_dir());
    Ok(())
}

//! The Dockerfile's build stage, without Docker: the `RUN cargo build …` line is read from the
//! Dockerfile and run on a copy of the build context (the repository minus `.dockerignore`,
//! mtimes kept) in `<target>/image-build/src`, with the stage's default target directory
//! (`src/target`), so it sees only what `docker build` would send. The binary must then be where
//! the runtime stage's `COPY --from=build` takes it from, answer `--version`, and its
//! `hearth health` (the image's HEALTHCHECK) must pass against a node it serves and fail once
//! that node is gone.
//!
//! Cost: the workspace crates (hearth, hearth-lock, hearth-proxy, the vendored yrs) are compiled
//! from the copied sources — their package paths differ, so nothing of the test's own build of
//! them can be reused. Third-party crates are compiled from the registry sources pinned in
//! Cargo.lock, the same in both; their artefacts are copied from this build's target directory
//! the first time, so a run costs a release build of the workspace crates (731 s on a 2-core
//! machine), and a second run on the same machine only what changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use cluster_tests::testbed::node::hearth_bin;
use cluster_tests::testbed::{NodeProcess, NodeSpec, Scratch, target_dir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// What the test needs of the Dockerfile.
#[derive(Debug)]
struct Dockerfile {
    /// The build stage's `WORKDIR`.
    workdir: String,
    /// The build stage's `RUN cargo build …`, split into words.
    build: Vec<String>,
    /// The source path of the runtime stage's `COPY --from=build`.
    copy_from: String,
}

fn parse_dockerfile(text: &str) -> anyhow::Result<Dockerfile> {
    let mut stage = None;
    let (mut workdir, mut build, mut copy_from) = (None, None, None);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["FROM", .., "AS", name] => stage = Some(name.to_string()),
            ["FROM", ..] => stage = None,
            ["WORKDIR", dir] if stage.as_deref() == Some("build") => {
                workdir = Some(dir.to_string())
            }
            ["RUN", "cargo", "build", ..] if stage.as_deref() == Some("build") => {
                build = Some(words[1..].iter().map(|w| w.to_string()).collect())
            }
            ["COPY", "--from=build", src, _dst] => copy_from = Some(src.to_string()),
            _ => {}
        }
    }
    Ok(Dockerfile {
        workdir: workdir.context("no WORKDIR in the build stage")?,
        build: build.context("no RUN cargo build in the build stage")?,
        copy_from: copy_from.context("no COPY --from=build")?,
    })
}

/// `.dockerignore` patterns: `dir/` (at the root), `**/name/`, `**/*.ext`, `name`.
fn ignored(patterns: &[String], rel: &Path, is_dir: bool) -> bool {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let glob = |pat: &str, name: &str| match pat.strip_prefix('*') {
        Some(suffix) => name.ends_with(suffix),
        None => pat == name,
    };
    patterns.iter().any(|p| {
        let dir_only = p.ends_with('/');
        let p = p.trim_end_matches('/');
        if dir_only && !is_dir {
            return false;
        }
        let Some(name) = parts.last() else {
            return false;
        };
        match p.strip_prefix("**/") {
            Some(p) => glob(p, name),
            None => parts.len() == 1 && glob(p, name),
        }
    })
}

/// The build context's files (relative paths), `.dockerignore` applied.
fn context_files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let patterns: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&dir))? {
            let entry = entry?;
            let rel = dir.join(entry.file_name());
            let kind = entry.file_type()?;
            if ignored(&patterns, &rel, kind.is_dir()) {
                continue;
            }
            if kind.is_dir() {
                stack.push(rel);
            } else if kind.is_file() {
                out.push(rel);
            }
        }
    }
    Ok(out)
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Copies this build's third-party artefacts into `target` once (its `release/deps`,
/// `release/build`, `release/.fingerprint`), so the check compiles only the workspace crates.
fn seed(target: &Path) -> anyhow::Result<()> {
    let release = target.join("release");
    if release.exists() {
        return Ok(());
    }
    let ours = hearth_bin()?;
    let Some(ours) = ours.parent().filter(|p| p.join("deps").is_dir()) else {
        return Ok(()); // no release build to seed from: the check builds everything
    };
    std::fs::create_dir_all(&release)?;
    for dir in ["deps", "build", ".fingerprint"] {
        run(
            Command::new("cp")
                .arg("-a")
                .arg(ours.join(dir))
                .arg(release.join(dir)),
            "cp -a",
        )?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_build_stage_builds_a_working_binary() -> anyhow::Result<()> {
    let root = repo();
    let docker = parse_dockerfile(&std::fs::read_to_string(root.join("Dockerfile"))?)?;
    ensure!(
        docker.build[..3] == ["cargo", "build", "--release"]
            && docker.build.contains(&"--locked".to_owned()),
        "the image builds with --release --locked: {:?}",
        docker.build
    );
    let bin_name = docker
        .build
        .iter()
        .position(|w| w == "--bin")
        .and_then(|i| docker.build.get(i + 1))
        .context("the build names its --bin")?
        .clone();
    let expected_copy = format!(
        "{}/target/release/{bin_name}",
        docker.workdir.trim_end_matches('/')
    );
    ensure!(
        docker.copy_from == expected_copy,
        "the runtime stage copies {} but the build stage produces {expected_copy}",
        docker.copy_from
    );

    // the context: every file docker would send, mtimes kept so a second run is incremental
    let check = target_dir().join("image-build");
    let context = check.join("src");
    let files = context_files(&root)?;
    let names: BTreeSet<String> = files.iter().map(|f| f.display().to_string()).collect();
    ensure!(names.contains("Cargo.lock") && names.contains("src/main.rs"));
    ensure!(
        !names
            .iter()
            .any(|n| n.starts_with("target/") || n.contains("node_modules/")),
        ".dockerignore lets build output or npm installs into the context"
    );
    let list = check.join("files.txt");
    std::fs::create_dir_all(&check)?;
    std::fs::write(
        &list,
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    // sources only: the previous run's copy is replaced, its target/ kept
    for entry in std::fs::read_dir(&context).into_iter().flatten().flatten() {
        if entry.file_name() != "target" {
            let p = entry.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    std::fs::create_dir_all(&context)?;
    run(
        Command::new("sh").arg("-c").arg(format!(
            "tar -C '{}' -cf - -T '{}' | tar -C '{}' -xpf -",
            root.display(),
            list.display(),
            context.display()
        )),
        "copying the build context",
    )?;
    seed(&context.join("target"))?;

    let t = std::time::Instant::now();
    let mut cmd = Command::new(&docker.build[0]);
    cmd.args(&docker.build[1..])
        .current_dir(&context)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    run(&mut cmd, &docker.build.join(" "))?;
    let built = context.join("target/release").join(&bin_name);
    let took = t.elapsed();
    ensure!(
        built.is_file(),
        "{} missing after the build",
        built.display()
    );
    eprintln!(
        "image build stage: `{}` in the context took {took:?} ({} files in the context)",
        docker.build.join(" "),
        files.len()
    );

    let out = run(Command::new(&built).arg("--version"), "hearth --version")?;
    let version = String::from_utf8_lossy(&out.stdout);
    ensure!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "--version: {version:?}"
    );

    // the HEALTHCHECK against a node run by this very binary
    let scratch = Scratch::new("image_build")?;
    let db = format!("sqlite://{}", scratch.join("hearth.db").display());
    let mut spec = NodeSpec::new("image", &db);
    spec.bin = Some(built.clone());
    let mut node = NodeProcess::start(&scratch, spec).await?;
    let health = |listen: String| {
        Command::new(&built)
            .args(["health", "--listen", &listen])
            .env_remove("HEARTH_LISTEN")
            .output()
    };
    let ok = health(node.addr().to_string())?;
    ensure!(
        ok.status.success(),
        "hearth health against a running node: {:?} {}",
        ok.status,
        String::from_utf8_lossy(&ok.stderr)
    );
    let addr = node.addr().to_string();
    node.term_within(Duration::from_secs(15)).await?;
    let down = health(addr)?;
    ensure!(
        !down.status.success(),
        "hearth health passed with no node listening"
    );
    Ok(())
}

#[test]
fn dockerignore_patterns_match_like_docker() {
    let p: Vec<String> = ["target/", "**/node_modules/", "**/*.db", ".git/"]
        .map(str::to_owned)
        .to_vec();
    assert!(ignored(&p, Path::new("target"), true));
    assert!(!ignored(&p, Path::new("lock/target"), true));
    assert!(ignored(&p, Path::new("examples/editor/node_modules"), true));
    assert!(ignored(&p, Path::new("hearth.db"), false));
    assert!(ignored(&p, Path::new("a/b/c.db"), false));
    assert!(!ignored(&p, Path::new("src/db.rs"), false));
    assert!(!ignored(&p, Path::new("target"), false));
}

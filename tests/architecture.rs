//! The module graph of `src/` (ARCHITECTURE.md, "Dependencies"): which top-level modules refer
//! to which (`crate::<module>` anywhere in a module's files, comments excluded). Dependencies
//! point one way: there is no cycle among the modules, the core layers
//! `protocol` ← `doc` ← `connection` ← `cluster` ← `server`/`cli` never refer upwards, and the
//! lock and proxy crates are used only by `cluster/` (and by `config`, which checks the cluster
//! secret with the proxy's strength policy).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The core layers, lowest first: a module may refer only to modules below it.
const LAYERS: &[&str] = &["protocol", "doc", "connection", "cluster", "server", "cli"];

/// The modules that may name the `hearth_lock` and `hearth_proxy` crates.
const LOCK_AND_PROXY_USERS: &[&str] = &["cluster", "config"];

/// Every `.rs` file of `src/`: (top-level module it belongs to, path inside `src/`, code
/// lines with comments cut off).
fn source_files() -> Vec<(String, String, Vec<String>)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel.components().next().unwrap().as_os_str();
            let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
            let code = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| l.split("//").next().unwrap_or("").to_string())
                .collect();
            files.push((module, rel.display().to_string(), code));
        }
    }
    files
}

/// `module → modules it refers to`, for every top-level module of `src/`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, _, code) in source_files() {
        let targets = edges.entry(module.clone()).or_default();
        for line in &code {
            let mut rest = line.as_str();
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module && name.starts_with(char::is_lowercase) {
                    targets.insert(name);
                }
            }
        }
    }
    edges
}

/// The strongly connected components with more than one module (Tarjan's algorithm).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: BTreeSet<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let edges = s.edges;
        for w in edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !edges.contains_key(w) {
                continue; // not a module of this crate (a type, a macro)
            }
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                group.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                s.out.insert(group);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: BTreeSet::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn graph_text(edges: &BTreeMap<String, BTreeSet<String>>) -> String {
    edges
        .iter()
        .map(|(m, t)| {
            format!(
                "{m} -> {}",
                t.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_cycles_between_modules() {
    let edges = graph();
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "modules that refer to each other in a circle: {found:?}\nmodule graph:\n{}",
        graph_text(&edges)
    );
}

#[test]
fn core_layers_refer_only_downwards() {
    let edges = graph();
    for (i, module) in LAYERS.iter().enumerate() {
        let targets = edges.get(*module).unwrap();
        for above in &LAYERS[i + 1..] {
            assert!(
                !targets.contains(*above),
                "`{module}` refers to `{above}`, a layer above it\nmodule graph:\n{}",
                graph_text(&edges)
            );
        }
    }
}

#[test]
fn only_the_cluster_uses_the_lock_and_proxy_crates() {
    for (module, path, code) in source_files() {
        if LOCK_AND_PROXY_USERS.contains(&module.as_str()) {
            continue;
        }
        for line in &code {
            assert!(
                !line.contains("hearth_lock") && !line.contains("hearth_proxy"),
                "{path} uses the lock or proxy crate: {line}"
            );
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut edge = |a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    };
    edge("a", "b");
    edge("b", "c");
    edge("c", "a");
    edge("c", "d");
    edge("d", "e");
    let found = cycles(&g);
    assert_eq!(
        found,
        BTreeSet::from([vec!["a".to_string(), "b".into(), "c".into()]])
    );
}

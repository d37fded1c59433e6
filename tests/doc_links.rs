//! Every reference to a document in the repository resolves: relative markdown links (and
//! their `#anchor`s), `*.md` and `docs/…` paths named in code comments and docs, and the
//! sections they quote (`docs/cluster.md, "Node ids"`). A renamed file or heading fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Directories that hold no reference of the project's own.
const SKIPPED_DIRS: [&str; 5] = ["target", "node_modules", ".git", "vendor", "test-scratch"];

/// File kinds whose text is checked.
const CHECKED: [&str; 9] = ["md", "rs", "mjs", "js", "ts", "sh", "toml", "yml", "yaml"];

/// `*.md` file names that are outputs, not references: `scripts/bench-compare` writes
/// `table.md`.
const OUTPUTS: [&str; 1] = ["table.md"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !SKIPPED_DIRS.contains(&name.as_str()) {
                files(&path, out);
            }
        } else {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            let script = path.parent().is_some_and(|p| p.ends_with("scripts"));
            if CHECKED.contains(&ext) || script || name == "Dockerfile" {
                out.push(path);
            }
        }
    }
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The headings of a markdown text (outside code blocks), and its bold run-in headings
/// (`**Name.**`, `**Name:**`).
fn headings(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            code = !code;
        }
        if code {
            continue;
        }
        if line.starts_with('#') {
            out.push(line.trim_start_matches('#').trim().to_owned());
        }
        let mut rest = line;
        while let Some(start) = rest.find("**") {
            let after = &rest[start + 2..];
            let Some(end) = after.find("**") else { break };
            out.push(after[..end].trim_end_matches(['.', ':']).trim().to_owned());
            rest = &after[end + 2..];
        }
    }
    out
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

/// Where `reference`, found in `file`, may point: relative to the file, to the repository, to
/// `docs/`, or to the crate the file is in.
fn candidates(file: &Path, reference: &str) -> Vec<PathBuf> {
    let root = root();
    let mut out = vec![
        file.parent().unwrap_or(&root).join(reference),
        root.join(reference),
        root.join("docs").join(reference),
    ];
    if let Some(top) = file
        .strip_prefix(&root)
        .ok()
        .and_then(|rel| rel.components().next())
    {
        out.push(root.join(top).join(reference));
    }
    out
}

fn resolve(file: &Path, reference: &str) -> Option<PathBuf> {
    candidates(file, reference).into_iter().find(|p| p.exists())
}

/// The text after a reference, with comment markers and line breaks folded into spaces.
fn following(text: &str, at: usize) -> String {
    let mut out = String::new();
    for (i, line) in text[at..].lines().take(3).enumerate() {
        let line = if i == 0 {
            line
        } else {
            line.trim_start()
                .trim_start_matches("//!")
                .trim_start_matches("///")
                .trim_start_matches("//")
                .trim_start_matches('#')
        };
        out.push_str(line.trim());
        out.push(' ');
    }
    out
}

/// The section a reference quotes right after it (`X.md, "Section"`), if any.
fn quoted_section(after: &str) -> Option<String> {
    let mut rest = after;
    if let Some(link) = rest.strip_prefix("](") {
        rest = &link[link.find(')')? + 1..];
    }
    // `X.md, "S"`, `X.md: "S"` or `X.md "S"`; not the end of a string literal (`X.md")`)
    let rest = [", \"", ": \"", " \""]
        .iter()
        .find_map(|p| rest.strip_prefix(p))?;
    let end = rest.find('"')?;
    Some(rest[..end].split_whitespace().collect::<Vec<_>>().join(" "))
}

#[test]
fn every_document_reference_resolves() {
    let root = root();
    let mut all = Vec::new();
    files(&root, &mut all);
    assert!(all.len() > 50, "walked only {} files", all.len());
    let mut broken = BTreeSet::new();
    let mut checked = 0;
    for file in &all {
        // this file names missing pages on purpose
        if file.ends_with("tests/doc_links.rs") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let markdown = file.extension().is_some_and(|e| e == "md");
        // markdown links: [text](target#anchor)
        if markdown {
            let mut rest = text.as_str();
            while let Some(i) = rest.find("](") {
                rest = &rest[i + 2..];
                let Some(end) = rest.find(')') else { break };
                let target = &rest[..end];
                if target.contains(char::is_whitespace) || target.contains(':') || target.is_empty()
                {
                    continue;
                }
                checked += 1;
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let resolved = if path.is_empty() {
                    Some(file.clone())
                } else {
                    let p = file.parent().unwrap_or(&root).join(path);
                    p.exists().then_some(p)
                };
                match resolved {
                    None => {
                        broken.insert(format!("{shown}: link to missing {target}"));
                    }
                    Some(p) if !anchor.is_empty() && p.extension().is_some_and(|e| e == "md") => {
                        let target_text = std::fs::read_to_string(&p).unwrap_or_default();
                        if !headings(&target_text).iter().any(|h| slug(h) == anchor) {
                            broken.insert(format!("{shown}: no heading for #{anchor} in {path}"));
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        // paths named in text: `*.md` and `docs/…`
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut i = 0;
        while i < chars.len() {
            let (start, c) = chars[i];
            let prev = if i == 0 { ' ' } else { chars[i - 1].1 };
            if !is_path_char(c) || is_path_char(prev) || prev == ':' {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < chars.len() && is_path_char(chars[j].1) {
                j += 1;
            }
            let end = chars.get(j).map_or(text.len(), |(k, _)| *k);
            i = j;
            let token = text[start..end]
                .trim_end_matches(['.', '/', '-'])
                .trim_start_matches('/');
            let is_md = token.ends_with(".md") && token.len() > 3;
            let is_docs = token.starts_with("docs/") && token.len() > 5;
            let name = token.rsplit('/').next().unwrap_or(token);
            if !(is_md || is_docs) || OUTPUTS.contains(&name) {
                continue;
            }
            checked += 1;
            let Some(target) = resolve(file, token) else {
                broken.insert(format!("{shown}: names missing {token}"));
                continue;
            };
            let after = following(&text, start + token.len());
            if let Some(section) = quoted_section(&after) {
                // a heading, or words the page says
                let target_text = std::fs::read_to_string(&target).unwrap_or_default();
                let wanted = section.to_lowercase();
                let words = target_text
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .to_lowercase();
                if !headings(&target_text)
                    .iter()
                    .any(|h| h.to_lowercase().contains(&wanted))
                    && !words.contains(&wanted)
                {
                    broken.insert(format!("{shown}: {token} has no section \"{section}\""));
                }
            }
        }
    }
    assert!(checked > 100, "checked only {checked} references");
    assert!(
        broken.is_empty(),
        "references that do not resolve:\n{}",
        broken.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_checker_finds_what_it_should() {
    assert_eq!(slug("What a client sees"), "what-a-client-sees");
    assert_eq!(
        slug("Rotating the cluster secret"),
        "rotating-the-cluster-secret"
    );
    assert_eq!(slug("`hearth cluster emit`: x"), "hearth-cluster-emit-x");
    assert_eq!(
        quoted_section(", \"Node ids\") more").as_deref(),
        Some("Node ids")
    );
    assert_eq!(
        quoted_section("](cluster.md), \"Flow control\"").as_deref(),
        Some("Flow control")
    );
    assert_eq!(quoted_section(" and more"), None);
    let h = headings("# A\n```\n# not\n```\n4. **Database unavailable:** x\n## B c\n");
    assert_eq!(h, ["A", "Database unavailable", "B c"]);
    let here = root().join("tests/doc_links.rs");
    assert!(resolve(&here, "docs/cluster.md").is_some());
    assert!(resolve(&here, "docs/no-such-page.md").is_none());
}

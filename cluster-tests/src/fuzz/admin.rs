//! The admin target: what a holder of an admin token sends. A case is a document history
//! (valid client updates), then a JSON array of operations (built valid, then mutated), type
//! hints, and a request target; the operations go through the admin API's edit path onto the
//! document, the document is read back as JSON with the hints, and the target is parsed as the
//! router parses it.

use std::panic::{AssertUnwindSafe, catch_unwind};

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::mutate;
use super::targets::{Outcome, apply_unchecked, check_reloadable};
use super::traffic;

const ROOTS: [&str; 5] = ["t", "m", "a", "x", "content"];
const KINDS: [&str; 5] = ["text", "map", "array", "xml", "bogus"];

fn text(rng: &mut StdRng) -> String {
    const PIECES: [&str; 8] = ["a", "hello", "é", "😀", "中文", " ", "\u{0}", "\n"];
    (0..rng.random_range(0..6))
        .map(|_| PIECES[rng.random_range(0..PIECES.len())])
        .collect()
}

fn value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..7) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(rng.random_range(-1_000_000i64..1_000_000)),
        3 => json!(rng.random::<f64>() * 1e300),
        4 => json!(text(rng)),
        5 if depth < 40 => Value::Array(
            (0..rng.random_range(0..3))
                .map(|_| value(rng, depth + 1))
                .collect(),
        ),
        _ if depth < 40 => {
            let mut m = serde_json::Map::new();
            for i in 0..rng.random_range(0..3) {
                m.insert(format!("k{i}"), value(rng, depth + 1));
            }
            Value::Object(m)
        }
        _ => Value::Null,
    }
}

fn op(rng: &mut StdRng) -> Value {
    let root = ROOTS[rng.random_range(0..ROOTS.len())];
    let index = rng.random_range(0..12u64);
    match rng.random_range(0..6) {
        0 => json!({ "op": "map.set", "type": root, "key": text(rng), "value": value(rng, 0) }),
        1 => json!({ "op": "map.delete", "type": root, "key": text(rng) }),
        2 => json!({ "op": "text.insert", "type": root, "index": index, "text": text(rng),
                     "attributes": { "bold": rng.random_bool(0.5) } }),
        3 => {
            json!({ "op": "text.delete", "type": root, "index": index, "length": rng.random_range(0..5) })
        }
        4 => json!({ "op": "text.replace", "type": root, "text": text(rng) }),
        _ => json!({ "op": "array.push", "type": root, "values": [value(rng, 0)] }),
    }
}

fn hints(rng: &mut StdRng) -> String {
    (0..rng.random_range(0..4))
        .map(|_| {
            format!(
                "{}:{}",
                ROOTS[rng.random_range(0..ROOTS.len())],
                KINDS[rng.random_range(0..KINDS.len())]
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn target(rng: &mut StdRng) -> String {
    const PATHS: [&str; 6] = [
        "/v1/documents/notes%2F2024",
        "/v1/documents/a/events/e%20x",
        "/v1/nodes/n1/drain",
        "/v1/documents/%F0%9F%98%80/ops",
        "/v1/documents",
        "/v1/documents/x/owner",
    ];
    const QUERIES: [&str; 5] = [
        "",
        "claim=false&timeout_ms=100",
        "include=json,state&types=t:text",
        "prefix=a%2Fb&after=c&limit=10",
        "limit=5&x",
    ];
    format!(
        "{}?{}",
        PATHS[rng.random_range(0..PATHS.len())],
        QUERIES[rng.random_range(0..QUERIES.len())]
    )
}

/// Builds one case: the history's updates, then the ops, the hints and the target, each of the
/// last three mutated half of the time.
pub fn build(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let mut input = traffic::history(rng);
    let ops: Vec<Value> = (0..rng.random_range(1..6)).map(|_| op(rng)).collect();
    let mut tail = vec![
        Value::Array(ops).to_string().into_bytes(),
        hints(rng).into_bytes(),
        target(rng).into_bytes(),
    ];
    for part in &mut tail {
        if rng.random_bool(0.5) {
            *part = mutate::mutate(rng, std::mem::take(part));
        }
    }
    input.extend(tail);
    input
}

/// Runs a case. The last three inputs are the ops, the hints and the target; the ones before
/// are the history.
pub fn feed(input: &[Vec<u8>], out: &mut Outcome) {
    let Some((rest, [ops, types, target])) = input.split_last_chunk::<3>() else {
        return;
    };
    let doc = yrs::Doc::new();
    for u in rest {
        apply_unchecked(&doc, u);
    }
    // the document task runs the edit under catch_unwind and drops the document on a panic
    match catch_unwind(AssertUnwindSafe(|| {
        hearth::events::apply_ops_json(&doc, ops)
    })) {
        Ok(Ok(_)) => out.accepted += 1,
        Ok(Err(_)) => out.refused += 1,
        Err(_) => {
            out.caught_panics += 1;
            return;
        }
    }
    let types = String::from_utf8_lossy(types);
    match catch_unwind(AssertUnwindSafe(|| {
        hearth::events::document_json(&doc, &types)
    })) {
        Ok(Ok(map)) => {
            out.accepted += 1;
            if serde_json::to_string(&map).is_err() {
                out.violation = Some("the JSON read of a document does not serialize".into());
                return;
            }
        }
        Ok(Err(_)) => out.refused += 1,
        Err(_) => out.caught_panics += 1,
    }
    check_reloadable(&doc, out);
    // the router runs outside any catch_unwind: a panic here is a finding
    let target = String::from_utf8_lossy(target);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    match hearth::admin::parse_target(path, query) {
        Ok(_) => out.accepted += 1,
        Err(_) => out.refused += 1,
    }
}

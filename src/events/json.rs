//! A document as JSON, and a small set of JSON edit operations, for the admin HTTP API.
//!
//! # Reading: [`doc_to_json`]
//!
//! Every root type of the document becomes one entry `{rootName: value}`:
//! * Y.Text → its plain text (formatting and embeds left out);
//! * Y.Map → an object, Y.Array → an array, nested shared types converted the same way;
//! * Y.XmlFragment → ProseMirror/TipTap JSON, as `yXmlFragmentToProsemirrorJSON` gives it:
//!   `{"type":"doc","content":[...]}`, an element `{"type":tag,"attrs"?,"content"?}`, and one
//!   `{"type":"text","text":...,"marks"?}` per formatted chunk of an XmlText (see [`marks`]);
//! * [`yrs::Any`] → JSON: binary as a base64 string (standard alphabet, padded), `undefined`
//!   and non-finite numbers → `null`, integers (bigint included) → numbers.
//!
//! A document loaded from a remote update has roots whose type is not known until a typed getter
//! is called. They are read here without changing the document: a root's branch is viewed
//! through `TextRef`/`MapRef`/`ArrayRef`/`XmlFragmentRef::from(BranchPtr)`, which leaves its type
//! as it is. A root's kind comes from the caller's hint if there is one, else from the type the
//! document already knows, else it is inferred from the content ([`infer_kind`]):
//! * live entries keyed by name → map (whatever its sequence holds);
//! * a sequence holding content that is neither text nor a shared type (`Any` values, binaries,
//!   subdocuments) → array;
//! * else a sequence holding text, formatting or embeds → text;
//! * else a sequence of XmlElement/XmlText → xml; of other shared types → array;
//! * nothing live (an empty root) → **omitted** from the result. A hinted root is always present:
//!   as the empty value of its kind if the document does not have it or it is empty.
//!
//! Embeds whose value is a string cannot be told from text through yrs' public API; they count as
//! text of their own length (a known inaccuracy, for a content shape editors do not produce).
//!
//! Nesting is bounded: a value deeper than [`MAX_DEPTH`] (a root's value is at depth 1) becomes
//! `null`, so a hostile document nested thousands deep is read in bounded stack.
//!
//! # Writing: [`apply_ops`]
//!
//! [`Op`]s (`{"op":"map.set",...}`) are validated together first, against the document and the
//! effects of the earlier ops of the batch, then applied in one transaction. Text indexes and
//! lengths count Unicode code points (an embed counts one), whatever the document's
//! [`OffsetKind`]; they are converted to the document's offsets when applied.

// used by the built-in events
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map as JsonMap, Value};
use yrs::branch::{Branch, BranchPtr};
use yrs::types::text::{Diff, YChange};
use yrs::types::{Attrs, TypeRef};
use yrs::{
    Any, Array, ArrayRef, Doc, GetString, Map, MapRef, Number, OffsetKind, Out, ReadTxn, Text,
    TextRef, Transact, TransactionMut, WriteTxn, Xml, XmlElementRef,
};

/// Values nested deeper than this are emitted as `null` (a root's value is at depth 1).
pub(crate) const MAX_DEPTH: usize = 64;
/// Most operations one [`apply_ops`] call accepts.
pub(crate) const MAX_OPS: usize = 10_000;
/// Deepest JSON value an operation may carry (a scalar has depth 1).
pub(crate) const MAX_VALUE_DEPTH: usize = 32;

/// What kind of shared type a root is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RootKind {
    Text,
    Map,
    Array,
    Xml,
}

impl RootKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RootKind::Text => "text",
            RootKind::Map => "map",
            RootKind::Array => "array",
            RootKind::Xml => "xml",
        }
    }
}

impl fmt::Display for RootKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RootKind {
    type Err = JsonError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(RootKind::Text),
            "map" => Ok(RootKind::Map),
            "array" => Ok(RootKind::Array),
            "xml" => Ok(RootKind::Xml),
            other => Err(JsonError::UnknownKind(other.to_owned())),
        }
    }
}

/// Why hints or operations were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JsonError {
    #[error("unknown root kind {0:?} (expected text, map, array or xml)")]
    UnknownKind(String),
    #[error("bad root hint {entry:?}: {reason}")]
    BadHint { entry: String, reason: String },
    #[error("too many operations: {count} (at most {max})")]
    TooManyOps { count: usize, max: usize },
    #[error("op {index}: {reason}")]
    InvalidOp { index: usize, reason: String },
}

/// Parses hints like `"default:xml,title:text"`: comma-separated `name:kind` entries (the kind is
/// after the last colon, so a name may hold colons; spaces around either part are trimmed, empty
/// entries skipped). The empty string means no hints. A name given twice is refused.
pub(crate) fn parse_hints(s: &str) -> Result<BTreeMap<String, RootKind>, JsonError> {
    let mut hints = BTreeMap::new();
    for entry in s.split(',') {
        if entry.trim().is_empty() {
            continue;
        }
        let bad = |reason: &str| JsonError::BadHint {
            entry: entry.trim().to_owned(),
            reason: reason.to_owned(),
        };
        let (name, kind) = entry
            .rsplit_once(':')
            .ok_or_else(|| bad("expected name:kind"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(bad("the root name is empty"));
        }
        let kind = kind
            .trim()
            .parse::<RootKind>()
            .map_err(|e| bad(&e.to_string()))?;
        if hints.insert(name.to_owned(), kind).is_some() {
            return Err(bad("the root is named twice"));
        }
    }
    Ok(hints)
}

/// Every root type of the document as JSON, `{rootName: value}` (see the module documentation
/// for the kinds and the conversion). Roots with a hint are read as that kind and always present;
/// other roots with no live content are left out. Read-only: the document is not changed. Opens
/// a read transaction, so the caller must not hold a write transaction on `doc`.
pub(crate) fn doc_to_json(doc: &Doc, hints: &BTreeMap<String, RootKind>) -> JsonMap<String, Value> {
    let txn = doc.transact();
    let mut roots: Vec<(String, BranchPtr)> = txn
        .root_refs()
        .filter_map(|(name, out)| Some((name.to_owned(), branch_of(&out)?)))
        .collect();
    roots.sort_by(|a, b| a.0.cmp(&b.0));

    let mut out = JsonMap::new();
    for (name, branch) in roots {
        let kind = match hints.get(&name) {
            Some(kind) => Some(*kind),
            None => infer_kind(&txn, branch),
        };
        if let Some(kind) = kind {
            let value = read_as(&txn, branch, kind, 1);
            out.insert(name, value);
        }
    }
    for (name, kind) in hints {
        if !out.contains_key(name) {
            out.insert(name.clone(), empty_value(*kind));
        }
    }
    out
}

/// The branch behind a shared type.
fn ptr_of(shared: &impl AsRef<Branch>) -> BranchPtr {
    BranchPtr::from(shared.as_ref())
}

/// The branch behind a shared reference, `None` for plain values and subdocuments.
fn branch_of(out: &Out) -> Option<BranchPtr> {
    Some(match out {
        Out::YText(v) => ptr_of(v),
        Out::YArray(v) => ptr_of(v),
        Out::YMap(v) => ptr_of(v),
        Out::YXmlElement(v) => ptr_of(v),
        Out::YXmlFragment(v) => ptr_of(v),
        Out::YXmlText(v) => ptr_of(v),
        Out::UndefinedRef(ptr) => *ptr,
        _ => return None,
    })
}

fn empty_value(kind: RootKind) -> Value {
    match kind {
        RootKind::Text => Value::String(String::new()),
        RootKind::Map => Value::Object(JsonMap::new()),
        RootKind::Array => Value::Array(Vec::new()),
        RootKind::Xml => prosemirror_doc(Vec::new()),
    }
}

fn prosemirror_doc(content: Vec<Value>) -> Value {
    let mut doc = JsonMap::new();
    doc.insert("type".into(), Value::String("doc".into()));
    doc.insert("content".into(), Value::Array(content));
    Value::Object(doc)
}

/// The sequence component of a branch, chunk by chunk, read with the text differ: it walks the
/// items once, joins adjacent strings, and yields every embed and shared type; plain values
/// (`Any` content, binaries, subdocuments) are not in it.
fn chunks<T: ReadTxn>(txn: &T, branch: BranchPtr) -> Vec<Diff<YChange>> {
    TextRef::from(branch).diff(txn, YChange::identity)
}

/// The kind a branch is read as when no hint says: its known type, else its content's shape.
/// `None` for a branch of unknown type with no live content.
pub(crate) fn infer_kind<T: ReadTxn>(txn: &T, branch: BranchPtr) -> Option<RootKind> {
    match branch.type_ref() {
        TypeRef::Text | TypeRef::XmlText => return Some(RootKind::Text),
        TypeRef::Map => return Some(RootKind::Map),
        TypeRef::Array => return Some(RootKind::Array),
        TypeRef::XmlFragment | TypeRef::XmlElement(_) => return Some(RootKind::Xml),
        _ => {}
    }
    if MapRef::from(branch).len(txn) > 0 {
        return Some(RootKind::Map);
    }
    // Live countable content, counted in UTF-16 units for strings and one per other element.
    let sequence_len = u64::from(branch.len());
    if sequence_len == 0 {
        return None;
    }
    let mut covered = 0u64;
    let mut textual = false;
    let mut all_xml = true;
    for chunk in chunks(txn, branch) {
        match &chunk.insert {
            Out::Any(Any::String(s)) => {
                covered += s.encode_utf16().count() as u64;
                textual = true;
            }
            Out::Any(_) => {
                covered += 1;
                textual = true;
            }
            Out::YXmlElement(_) | Out::YXmlText(_) | Out::YXmlFragment(_) => covered += 1,
            _ => {
                covered += 1;
                all_xml = false;
            }
        }
    }
    Some(if covered < sequence_len {
        // Something the differ does not show: plain values.
        RootKind::Array
    } else if textual {
        RootKind::Text
    } else if all_xml {
        RootKind::Xml
    } else {
        RootKind::Array
    })
}

/// A branch read as `kind`, at nesting `depth`.
fn read_as<T: ReadTxn>(txn: &T, branch: BranchPtr, kind: RootKind, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    match kind {
        RootKind::Text => Value::String(TextRef::from(branch).get_string(txn)),
        RootKind::Map => map_to_json(txn, branch, depth),
        RootKind::Array => array_to_json(txn, branch, depth),
        RootKind::Xml => prosemirror_doc(xml_children(txn, branch, depth)),
    }
}

/// A value found inside the document, at nesting `depth`.
fn out_to_json<T: ReadTxn>(txn: &T, out: Out, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    match out {
        Out::Any(any) => any_to_json(&any, depth),
        Out::YText(v) => Value::String(v.get_string(txn)),
        // The plain text, without the XML rendering of its formatting.
        Out::YXmlText(v) => Value::String(TextRef::from(ptr_of(&v)).get_string(txn)),
        Out::YMap(v) => map_to_json(txn, ptr_of(&v), depth),
        Out::YArray(v) => array_to_json(txn, ptr_of(&v), depth),
        Out::YXmlElement(v) => xml_element_to_json(txn, &v, depth),
        Out::YXmlFragment(v) => prosemirror_doc(xml_children(txn, ptr_of(&v), depth)),
        Out::YDoc(subdoc) => {
            let mut obj = JsonMap::new();
            obj.insert("guid".into(), Value::String(subdoc.guid().to_string()));
            Value::Object(obj)
        }
        Out::UndefinedRef(ptr) => match infer_kind(txn, ptr) {
            Some(kind) => read_as(txn, ptr, kind, depth),
            None => Value::Null,
        },
        #[allow(unreachable_patterns)]
        _ => Value::Null,
    }
}

fn map_to_json<T: ReadTxn>(txn: &T, branch: BranchPtr, depth: usize) -> Value {
    let map = MapRef::from(branch);
    let mut entries: Vec<(&str, Out)> = map.iter(txn).collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut obj = JsonMap::new();
    for (key, value) in entries {
        obj.insert(key.to_owned(), out_to_json(txn, value, depth + 1));
    }
    Value::Object(obj)
}

fn array_to_json<T: ReadTxn>(txn: &T, branch: BranchPtr, depth: usize) -> Value {
    let seq = chunks(txn, branch);
    // yrs' array iterator reads strings by characters but advances by the document's offset
    // units, which differ for non-ASCII text and make it spin. Such a sequence (text read as an
    // array, or hostile mixed content) is listed from its chunks instead: each run of text as one
    // string, each embed and shared type as an element; plain values are then not shown.
    let non_ascii_text = seq
        .iter()
        .any(|c| matches!(&c.insert, Out::Any(Any::String(s)) if !s.is_ascii()));
    let items: Vec<Value> = if non_ascii_text {
        seq.into_iter()
            .map(|c| out_to_json(txn, c.insert, depth + 1))
            .collect()
    } else {
        drop(seq);
        ArrayRef::from(branch)
            .iter(txn)
            .map(|v| out_to_json(txn, v, depth + 1))
            .collect()
    };
    Value::Array(items)
}

/// The children of an XML element or fragment as ProseMirror nodes. Content that is not an XML
/// node (text or values put directly in the sequence) is skipped, as y-prosemirror would.
fn xml_children<T: ReadTxn>(txn: &T, branch: BranchPtr, depth: usize) -> Vec<Value> {
    let mut content = Vec::new();
    for chunk in chunks(txn, branch) {
        match chunk.insert {
            Out::YXmlElement(element) => {
                content.push(xml_element_to_json(txn, &element, depth + 1))
            }
            Out::YXmlText(text) => xml_text_nodes(txn, ptr_of(&text), depth + 1, &mut content),
            Out::YXmlFragment(fragment) if depth < MAX_DEPTH => {
                content.extend(xml_children(txn, ptr_of(&fragment), depth + 1))
            }
            _ => {}
        }
    }
    content
}

fn xml_element_to_json<T: ReadTxn>(txn: &T, element: &XmlElementRef, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    let mut node = JsonMap::new();
    let tag = element.try_tag().map(|t| t.to_string()).unwrap_or_default();
    node.insert("type".into(), Value::String(tag));
    let mut attributes: Vec<(&str, Out)> = element.attributes(txn).collect();
    if !attributes.is_empty() {
        attributes.sort_by(|a, b| a.0.cmp(b.0));
        let attrs: JsonMap<String, Value> = attributes
            .into_iter()
            .map(|(k, v)| (k.to_owned(), out_to_json(txn, v, depth + 1)))
            .collect();
        node.insert("attrs".into(), Value::Object(attrs));
    }
    let content = xml_children(txn, ptr_of(element), depth);
    if !content.is_empty() {
        node.insert("content".into(), Value::Array(content));
    }
    Value::Object(node)
}

/// One ProseMirror text node per formatted chunk of an XmlText; empty chunks and embeds are
/// skipped (ProseMirror has no empty text nodes).
fn xml_text_nodes<T: ReadTxn>(txn: &T, branch: BranchPtr, depth: usize, out: &mut Vec<Value>) {
    if depth > MAX_DEPTH {
        out.push(Value::Null);
        return;
    }
    for chunk in chunks(txn, branch) {
        let Out::Any(Any::String(text)) = &chunk.insert else {
            continue;
        };
        if text.is_empty() {
            continue;
        }
        let mut node = JsonMap::new();
        node.insert("type".into(), Value::String("text".into()));
        node.insert("text".into(), Value::String(text.to_string()));
        if let Some(attrs) = &chunk.attributes {
            let marks = marks(attrs, depth);
            if !marks.is_empty() {
                node.insert("marks".into(), Value::Array(marks));
            }
        }
        out.push(Value::Object(node));
    }
}

/// ProseMirror marks from a chunk's formatting attributes, sorted by name: `null`, `undefined`
/// and `false` mean no mark; `true` and an empty object give `{"type":name}`; a non-empty object
/// gives `{"type":name,"attrs":{...}}`; any other value is kept as the mark's `attrs`, as
/// y-prosemirror would.
fn marks(attrs: &Attrs, depth: usize) -> Vec<Value> {
    let mut names: Vec<(&Arc<str>, &Any)> = attrs.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    let mut marks = Vec::new();
    for (name, value) in names {
        let attrs = match value {
            Any::Null | Any::Undefined | Any::Bool(false) => continue,
            Any::Bool(true) => None,
            Any::Map(m) if m.is_empty() => None,
            other => Some(any_to_json(other, depth + 1)),
        };
        let mut mark = JsonMap::new();
        mark.insert("type".into(), Value::String(name.to_string()));
        if let Some(attrs) = attrs {
            mark.insert("attrs".into(), attrs);
        }
        marks.push(Value::Object(mark));
    }
    marks
}

/// A plain value as JSON, at nesting `depth`.
pub(crate) fn any_to_json(any: &Any, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    match any {
        Any::Null | Any::Undefined => Value::Null,
        Any::Bool(b) => Value::Bool(*b),
        Any::Number(Number::Int(i)) => Value::from(*i),
        Any::Number(Number::Float(f)) => float_to_json(*f),
        Any::String(s) => Value::String(s.to_string()),
        Any::Buffer(bytes) => Value::String(base64(bytes)),
        Any::Array(items) => {
            Value::Array(items.iter().map(|v| any_to_json(v, depth + 1)).collect())
        }
        Any::Map(entries) => {
            let mut keys: Vec<(&String, &Any)> = entries.iter().collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                keys.into_iter()
                    .map(|(k, v)| (k.clone(), any_to_json(v, depth + 1)))
                    .collect(),
            )
        }
    }
}

/// A float as JSON: integral values within JavaScript's safe range as integers (as
/// `JSON.stringify` writes them), non-finite values as `null`.
fn float_to_json(f: f64) -> Value {
    if !f.is_finite() {
        return Value::Null;
    }
    if f.trunc() == f && f.abs() <= Number::F64_MAX_SAFE_INTEGER {
        return Value::from(f as i64);
    }
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One edit, as the admin API receives it (`{"op":"text.insert","type":"content",...}`; `type`
/// names the root).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub(crate) enum Op {
    /// Sets `key` of a map root to a JSON value (objects and arrays become plain yrs values).
    #[serde(rename = "map.set")]
    MapSet {
        #[serde(rename = "type")]
        root: String,
        key: String,
        value: Value,
    },
    /// Deletes `key` of a map root; a key that is not there is no change.
    #[serde(rename = "map.delete")]
    MapDelete {
        #[serde(rename = "type")]
        root: String,
        key: String,
    },
    /// Inserts text at a code-point `index` (the end when absent), with optional formatting.
    #[serde(rename = "text.insert")]
    TextInsert {
        #[serde(rename = "type")]
        root: String,
        #[serde(default)]
        index: Option<u64>,
        text: String,
        #[serde(default)]
        attributes: Option<JsonMap<String, Value>>,
    },
    /// Deletes `length` code points from `index`.
    #[serde(rename = "text.delete")]
    TextDelete {
        #[serde(rename = "type")]
        root: String,
        index: u64,
        length: u64,
    },
    /// Replaces the whole text.
    #[serde(rename = "text.replace")]
    TextReplace {
        #[serde(rename = "type")]
        root: String,
        text: String,
    },
    /// Appends values to an array root.
    #[serde(rename = "array.push")]
    ArrayPush {
        #[serde(rename = "type")]
        root: String,
        values: Vec<Value>,
    },
}

impl Op {
    fn root(&self) -> &str {
        match self {
            Op::MapSet { root, .. }
            | Op::MapDelete { root, .. }
            | Op::TextInsert { root, .. }
            | Op::TextDelete { root, .. }
            | Op::TextReplace { root, .. }
            | Op::ArrayPush { root, .. } => root,
        }
    }

    fn kind(&self) -> RootKind {
        match self {
            Op::MapSet { .. } | Op::MapDelete { .. } => RootKind::Map,
            Op::TextInsert { .. } | Op::TextDelete { .. } | Op::TextReplace { .. } => {
                RootKind::Text
            }
            Op::ArrayPush { .. } => RootKind::Array,
        }
    }
}

/// An op checked and converted, ready to apply without failing.
enum Action<'a> {
    MapSet(&'a str, &'a str, Any),
    MapDelete(&'a str, &'a str),
    TextInsert(&'a str, Option<u64>, &'a str, Option<Attrs>),
    TextDelete(&'a str, u64, u64),
    TextReplace(&'a str, &'a str),
    ArrayPush(&'a str, Vec<Any>),
}

/// What validation knows of a root, after the ops before the current one.
#[derive(Clone, Copy)]
enum Sim {
    /// No content and no type yet: the first op decides.
    Unset,
    Map,
    Array,
    Xml,
    /// A text of this many code points.
    Text(u64),
}

/// Validates every op, then applies all of them in one transaction. A refused batch changes
/// nothing. Returns the number of ops applied. Opens a write transaction, so the caller must not
/// hold a transaction on `doc`. Offsets handed to yrs are also clamped to the text's length, so a
/// content shape validation misjudges (a string embed) cannot make yrs panic.
pub(crate) fn apply_ops(doc: &Doc, ops: &[Op]) -> Result<usize, JsonError> {
    if ops.len() > MAX_OPS {
        return Err(JsonError::TooManyOps {
            count: ops.len(),
            max: MAX_OPS,
        });
    }
    if ops.is_empty() {
        return Ok(0);
    }
    let offset_kind = doc.offset_kind();
    let mut txn = doc.transact_mut();
    // Validation only reads, inside the same transaction, so nothing can change in between.
    let actions = validate(&txn, ops)?;
    let mut ascii: HashMap<&str, bool> = HashMap::new();
    for action in actions {
        apply(&mut txn, action, offset_kind, &mut ascii);
    }
    Ok(ops.len())
}

fn validate<'a, T: ReadTxn>(txn: &T, ops: &'a [Op]) -> Result<Vec<Action<'a>>, JsonError> {
    let mut roots: HashMap<&'a str, Sim> = HashMap::new();
    let mut actions = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let fail = |reason: String| JsonError::InvalidOp { index, reason };
        let name = op.root();
        if name.is_empty() {
            return Err(fail("\"type\" must name a root".into()));
        }
        let sim = match roots.get(name) {
            Some(sim) => *sim,
            None => initial_sim(txn, name),
        };
        let wanted = op.kind();
        let sim = match (sim, wanted) {
            (Sim::Unset, RootKind::Map) => Sim::Map,
            (Sim::Unset, RootKind::Array) => Sim::Array,
            (Sim::Unset, RootKind::Text) => Sim::Text(0),
            (Sim::Map, RootKind::Map)
            | (Sim::Array, RootKind::Array)
            | (Sim::Text(_), RootKind::Text) => sim,
            (held, _) => {
                let held = match held {
                    Sim::Map => "map",
                    Sim::Array => "array",
                    Sim::Xml => "xml",
                    Sim::Text(_) => "text",
                    Sim::Unset => "no",
                };
                return Err(fail(format!(
                    "root {name:?} holds {held} content, it cannot be used as {wanted}"
                )));
            }
        };
        let (action, sim) = match op {
            Op::MapSet { key, value, .. } => {
                check_depth(value).map_err(&fail)?;
                (Action::MapSet(name, key, json_to_any(value)), sim)
            }
            Op::MapDelete { key, .. } => (Action::MapDelete(name, key), sim),
            Op::TextInsert {
                index: at,
                text,
                attributes,
                ..
            } => {
                let len = text_len(sim);
                if let Some(at) = at
                    && *at > len
                {
                    return Err(fail(format!(
                        "index {at} is past the end of text {name:?} (length {len})"
                    )));
                }
                let attrs = match attributes {
                    None => None,
                    Some(attributes) => {
                        let mut attrs = Attrs::new();
                        for (key, value) in attributes {
                            check_depth(value)
                                .map_err(|e| fail(format!("attribute {key:?}: {e}")))?;
                            attrs.insert(Arc::from(key.as_str()), json_to_any(value));
                        }
                        Some(attrs)
                    }
                };
                let added = text.chars().count() as u64;
                (
                    Action::TextInsert(name, *at, text, attrs),
                    Sim::Text(len + added),
                )
            }
            Op::TextDelete {
                index: at, length, ..
            } => {
                let len = text_len(sim);
                let end = at.checked_add(*length);
                match end {
                    Some(end) if end <= len => {}
                    _ => {
                        return Err(fail(format!(
                            "range {at}..{} is past the end of text {name:?} (length {len})",
                            at.saturating_add(*length)
                        )));
                    }
                }
                (
                    Action::TextDelete(name, *at, *length),
                    Sim::Text(len - length),
                )
            }
            Op::TextReplace { text, .. } => (
                Action::TextReplace(name, text),
                Sim::Text(text.chars().count() as u64),
            ),
            Op::ArrayPush { values, .. } => {
                let mut anys = Vec::with_capacity(values.len());
                for (i, value) in values.iter().enumerate() {
                    check_depth(value).map_err(|e| fail(format!("value {i}: {e}")))?;
                    anys.push(json_to_any(value));
                }
                (Action::ArrayPush(name, anys), sim)
            }
        };
        roots.insert(name, sim);
        actions.push(action);
    }
    Ok(actions)
}

/// The simulated length of a text root (`validate` has checked the root is one).
fn text_len(sim: Sim) -> u64 {
    match sim {
        Sim::Text(len) => len,
        _ => 0,
    }
}

/// A root's state before the batch: its kind, and for a text its length in code points.
fn initial_sim<T: ReadTxn>(txn: &T, name: &str) -> Sim {
    // Read-only lookup; `get_map` hands out the branch whatever its type.
    let Some(map) = txn.get_map(name) else {
        return Sim::Unset;
    };
    let branch = ptr_of(&map);
    match infer_kind(txn, branch) {
        None => Sim::Unset,
        Some(RootKind::Map) => Sim::Map,
        Some(RootKind::Array) => Sim::Array,
        Some(RootKind::Xml) => Sim::Xml,
        Some(RootKind::Text) => Sim::Text(code_points(&chunks(txn, branch))),
    }
}

/// The length of a text in code points, an embed or shared type counting one.
fn code_points(chunks: &[Diff<YChange>]) -> u64 {
    chunks
        .iter()
        .map(|c| match &c.insert {
            Out::Any(Any::String(s)) => s.chars().count() as u64,
            _ => 1,
        })
        .sum()
}

fn check_depth(value: &Value) -> Result<(), String> {
    fn depth_within(value: &Value, budget: usize) -> bool {
        if budget == 0 {
            return false;
        }
        match value {
            Value::Array(items) => items.iter().all(|v| depth_within(v, budget - 1)),
            Value::Object(entries) => entries.values().all(|v| depth_within(v, budget - 1)),
            _ => true,
        }
    }
    if depth_within(value, MAX_VALUE_DEPTH) {
        Ok(())
    } else {
        Err(format!("value nested deeper than {MAX_VALUE_DEPTH}"))
    }
}

/// A JSON value as a yrs value (called on values whose depth `check_depth` bounded). Integers
/// within JavaScript's safe range stay integers; other numbers become floats.
fn json_to_any(value: &Value) -> Any {
    match value {
        Value::Null => Any::Null,
        Value::Bool(b) => Any::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i)
                if (Number::I64_MIN_SAFE_INTEGER..=Number::I64_MAX_SAFE_INTEGER).contains(&i) =>
            {
                Any::Number(Number::Int(i))
            }
            _ => Any::Number(Number::Float(n.as_f64().unwrap_or(0.0))),
        },
        Value::String(s) => Any::String(Arc::from(s.as_str())),
        Value::Array(items) => Any::Array(items.iter().map(json_to_any).collect()),
        Value::Object(entries) => Any::Map(Arc::new(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), json_to_any(v)))
                .collect(),
        )),
    }
}

fn apply<'a>(
    txn: &mut TransactionMut<'_>,
    action: Action<'a>,
    offset_kind: OffsetKind,
    ascii: &mut HashMap<&'a str, bool>,
) {
    match action {
        Action::MapSet(root, key, value) => {
            let map = txn.get_or_insert_map(root);
            map.insert(txn, key, value);
        }
        Action::MapDelete(root, key) => {
            let map = txn.get_or_insert_map(root);
            map.remove(txn, key);
        }
        Action::TextInsert(root, at, text, attrs) => {
            let target = txn.get_or_insert_text(root);
            let len = target.len(txn);
            let offset = match at {
                None => len,
                Some(at) => to_offset(txn, &target, root, at, offset_kind, ascii).min(len),
            };
            match attrs {
                Some(attrs) => target.insert_with_attributes(txn, offset, text, attrs),
                None => target.insert(txn, offset, text),
            }
            if !text.is_ascii() {
                ascii.insert(root, false);
            }
        }
        Action::TextDelete(root, at, length) => {
            let target = txn.get_or_insert_text(root);
            let len = target.len(txn);
            let start = to_offset(txn, &target, root, at, offset_kind, ascii).min(len);
            let end = to_offset(txn, &target, root, at + length, offset_kind, ascii).min(len);
            if end > start {
                target.remove_range(txn, start, end - start);
            }
        }
        Action::TextReplace(root, text) => {
            let target = txn.get_or_insert_text(root);
            let len = target.len(txn);
            if len > 0 {
                target.remove_range(txn, 0, len);
            }
            target.insert(txn, 0, text);
            ascii.insert(root, text.is_ascii());
        }
        Action::ArrayPush(root, values) => {
            let array = txn.get_or_insert_array(root);
            for value in values {
                array.push_back(txn, value);
            }
        }
    }
}

/// A code-point index of a text as an offset in the document's units. While every string of the
/// text is ASCII the two agree; otherwise the text is walked.
fn to_offset<'a>(
    txn: &TransactionMut<'_>,
    text: &TextRef,
    root: &'a str,
    index: u64,
    offset_kind: OffsetKind,
    ascii: &mut HashMap<&'a str, bool>,
) -> u32 {
    let branch = ptr_of(text);
    let all_ascii = *ascii.entry(root).or_insert_with(|| {
        chunks(txn, branch)
            .iter()
            .all(|c| !matches!(&c.insert, Out::Any(Any::String(s)) if !s.is_ascii()))
    });
    if all_ascii {
        return u32::try_from(index).unwrap_or(u32::MAX);
    }
    let mut remaining = index;
    let mut offset: u64 = 0;
    for chunk in chunks(txn, branch) {
        if remaining == 0 {
            break;
        }
        match &chunk.insert {
            Out::Any(Any::String(s)) => {
                for c in s.chars() {
                    if remaining == 0 {
                        break;
                    }
                    offset += match offset_kind {
                        OffsetKind::Bytes => c.len_utf8() as u64,
                        OffsetKind::Utf16 => c.len_utf16() as u64,
                    };
                    remaining -= 1;
                }
            }
            _ => {
                offset += 1;
                remaining -= 1;
            }
        }
    }
    u32::try_from(offset).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use yrs::updates::decoder::Decode;
    use yrs::{
        ArrayPrelim, MapPrelim, StateVector, TextPrelim, Update, XmlElementPrelim, XmlFragment,
        XmlTextPrelim,
    };

    /// The document's full state loaded into a fresh document, whose roots have no type yet.
    fn reload(doc: &Doc) -> Doc {
        let update = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let fresh = Doc::new();
        fresh
            .transact_mut()
            .apply_update(Update::decode_v1(&update).expect("decodes"))
            .expect("applies");
        fresh
    }

    fn attrs(pairs: &[(&str, Any)]) -> Attrs {
        pairs
            .iter()
            .map(|(k, v)| (Arc::from(*k), v.clone()))
            .collect()
    }

    fn any_map(pairs: &[(&str, Any)]) -> Any {
        Any::Map(Arc::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ))
    }

    fn sample() -> Doc {
        let doc = Doc::new();
        {
            let mut txn = doc.transact_mut();
            let title = txn.get_or_insert_text("title");
            title.insert(&mut txn, 0, "Hello, ");
            title.insert_with_attributes(&mut txn, 7, "wörld", attrs(&[("bold", Any::Bool(true))]));

            let meta = txn.get_or_insert_map("meta");
            meta.insert(&mut txn, "count", 3);
            meta.insert(&mut txn, "ratio", 0.5);
            meta.insert(&mut txn, "blob", Any::Buffer(Arc::from(&b"hi!?"[..])));
            meta.insert(&mut txn, "json", "{\"a\":1}");
            meta.insert(&mut txn, "nothing", Any::Undefined);
            let nested = meta.insert(&mut txn, "nested", MapPrelim::default());
            nested.insert(&mut txn, "deep", true);
            let list = nested.insert(&mut txn, "list", ArrayPrelim::default());
            list.push_back(&mut txn, 1);
            list.push_back(&mut txn, "two");
            let inner_text = list.push_back(&mut txn, TextPrelim::new("three"));
            inner_text.insert(&mut txn, 5, "!");

            let items = txn.get_or_insert_array("items");
            items.push_back(&mut txn, "a");
            items.push_back(&mut txn, any_map(&[("k", Any::Null)]));
            let m = items.push_back(&mut txn, MapPrelim::default());
            m.insert(&mut txn, "x", 1);

            let frag = txn.get_or_insert_xml_fragment("default");
            let heading = frag.push_back(&mut txn, XmlElementPrelim::empty("heading"));
            heading.insert_attribute(&mut txn, "level", 2);
            heading.insert_attribute(&mut txn, "data", "{\"x\":1}");
            heading.push_back(&mut txn, XmlTextPrelim::new("Title"));
            let para = frag.push_back(&mut txn, XmlElementPrelim::empty("paragraph"));
            let text = para.push_back(&mut txn, XmlTextPrelim::new(""));
            text.insert(&mut txn, 0, "Plain ");
            text.insert_with_attributes(&mut txn, 6, "bold", attrs(&[("bold", Any::Bool(true))]));
            text.insert_with_attributes(
                &mut txn,
                10,
                " both",
                attrs(&[("bold", any_map(&[])), ("italic", Any::Bool(true))]),
            );
            text.insert_with_attributes(
                &mut txn,
                15,
                " link",
                attrs(&[(
                    "link",
                    any_map(&[("href", Any::from("https://example.com"))]),
                )]),
            );
            text.insert_with_attributes(&mut txn, 20, " end", attrs(&[("bold", Any::Bool(false))]));
            frag.push_back(&mut txn, XmlElementPrelim::empty("horizontalRule"));
            let quote = frag.push_back(&mut txn, XmlElementPrelim::empty("blockquote"));
            let inner = quote.push_back(&mut txn, XmlElementPrelim::empty("paragraph"));
            inner.push_back(&mut txn, XmlTextPrelim::new("日本語 🎉"));

            // A root that only ever had deleted content.
            let gone = txn.get_or_insert_map("gone");
            gone.insert(&mut txn, "k", 1);
            gone.remove(&mut txn, "k");
        }
        doc
    }

    fn expected_xml() -> Value {
        json!({
            "type": "doc",
            "content": [
                {
                    "type": "heading",
                    "attrs": {"level": 2, "data": "{\"x\":1}"},
                    "content": [{"type": "text", "text": "Title"}]
                },
                {
                    "type": "paragraph",
                    "content": [
                        {"type": "text", "text": "Plain "},
                        {"type": "text", "text": "bold", "marks": [{"type": "bold"}]},
                        {"type": "text", "text": " both", "marks": [{"type": "bold"}, {"type": "italic"}]},
                        {"type": "text", "text": " link", "marks": [
                            {"type": "link", "attrs": {"href": "https://example.com"}}
                        ]},
                        {"type": "text", "text": " end"}
                    ]
                },
                {"type": "horizontalRule"},
                {
                    "type": "blockquote",
                    "content": [{"type": "paragraph", "content": [{"type": "text", "text": "日本語 🎉"}]}]
                }
            ]
        })
    }

    fn expected_rest() -> Value {
        json!({
            "title": "Hello, wörld",
            "meta": {
                "count": 3,
                "ratio": 0.5,
                "blob": "aGkhPw==",
                "json": "{\"a\":1}",
                "nothing": null,
                "nested": {"deep": true, "list": [1, "two", "three!"]}
            },
            "items": ["a", {"k": null}, {"x": 1}]
        })
    }

    #[test]
    fn reads_a_fresh_document_by_inference() {
        let doc = reload(&sample());
        let got = Value::Object(doc_to_json(&doc, &BTreeMap::new()));
        let mut want = expected_rest();
        want["default"] = expected_xml();
        assert_eq!(got, want);
        // Reading left the roots untyped.
        let txn = doc.transact();
        for (_, out) in txn.root_refs() {
            assert!(matches!(out, Out::UndefinedRef(_)), "{out:?}");
        }
    }

    #[test]
    fn reads_the_original_typed_document_the_same() {
        let doc = sample();
        let got = Value::Object(doc_to_json(&doc, &BTreeMap::new()));
        let mut want = expected_rest();
        want["default"] = expected_xml();
        // A typed root is shown even when empty.
        want["gone"] = json!({});
        assert_eq!(got, want);
    }

    #[test]
    fn hints_choose_the_kind_and_name_absent_roots() {
        let doc = reload(&sample());
        let hints =
            parse_hints("default:xml, title:text,meta:map,missing:xml,gone:array").expect("hints");
        let got = Value::Object(doc_to_json(&doc, &hints));
        let mut want = expected_rest();
        want["default"] = expected_xml();
        want["missing"] = json!({"type": "doc", "content": []});
        want["gone"] = json!([]);
        assert_eq!(got, want);

        // A hint that does not fit the content reads what that kind sees.
        let hints = parse_hints("meta:text,title:array,items:xml").expect("hints");
        let got = doc_to_json(&doc, &hints);
        assert_eq!(got["meta"], json!(""));
        assert_eq!(got["title"], json!(["Hello, ", "wörld"]));
        assert_eq!(got["items"], json!({"type": "doc", "content": []}));
    }

    #[test]
    fn parses_hints() {
        assert!(parse_hints("").expect("empty").is_empty());
        let hints = parse_hints("a:text,b:c:map, d : array ,").expect("hints");
        assert_eq!(hints.get("a"), Some(&RootKind::Text));
        assert_eq!(hints.get("b:c"), Some(&RootKind::Map));
        assert_eq!(hints.get("d"), Some(&RootKind::Array));
        let err = parse_hints("a:text,b:tree").expect_err("bad kind");
        assert!(err.to_string().contains("\"b:tree\""), "{err}");
        assert!(
            parse_hints("nokind")
                .expect_err("no colon")
                .to_string()
                .contains("nokind")
        );
        assert!(parse_hints(":map").is_err());
        assert!(parse_hints("a:map,a:text").is_err());
        assert_eq!("xml".parse::<RootKind>(), Ok(RootKind::Xml));
    }

    #[test]
    fn any_values_convert() {
        assert_eq!(
            any_to_json(&Any::Number(Number::Float(f64::NAN)), 1),
            Value::Null
        );
        assert_eq!(
            any_to_json(&Any::Number(Number::Float(f64::INFINITY)), 1),
            Value::Null
        );
        assert_eq!(any_to_json(&Any::Number(Number::Float(2.0)), 1), json!(2));
        assert_eq!(
            any_to_json(&Any::Number(Number::Int(1 << 60)), 1),
            json!(1i64 << 60)
        );
        assert_eq!(any_to_json(&Any::Buffer(Arc::from(&b""[..])), 1), json!(""));
        assert_eq!(
            any_to_json(&Any::Buffer(Arc::from(&b"f"[..])), 1),
            json!("Zg==")
        );
        assert_eq!(
            any_to_json(&Any::Buffer(Arc::from(&b"fo"[..])), 1),
            json!("Zm8=")
        );
        assert_eq!(
            any_to_json(&Any::Buffer(Arc::from(&b"foo"[..])), 1),
            json!("Zm9v")
        );
        // Plain values nest too, and are cut off at the same depth.
        let mut deep = Any::from("bottom");
        for _ in 0..100 {
            deep = Any::Array(Arc::from(vec![deep]));
        }
        let mut v = &any_to_json(&deep, 1);
        let mut levels = 0;
        while let Value::Array(items) = v {
            levels += 1;
            v = &items[0];
        }
        assert_eq!(levels, MAX_DEPTH);
        assert_eq!(*v, Value::Null);
    }

    /// Walks `{"child": {"child": ...}}` and returns how many objects deep it goes and what
    /// ends it.
    fn object_chain(mut v: &Value) -> (usize, &Value) {
        let mut levels = 0;
        while let Value::Object(obj) = v {
            levels += 1;
            match obj.get("child") {
                Some(next) => v = next,
                None => return (levels, v),
            }
        }
        (levels, v)
    }

    #[test]
    fn deep_nesting_is_bounded_on_a_small_stack() {
        let doc = Doc::new();
        {
            let mut txn = doc.transact_mut();
            let mut map = txn.get_or_insert_map("deep");
            for _ in 0..5_000 {
                map = map.insert(&mut txn, "child", MapPrelim::default());
            }
            map.insert(&mut txn, "leaf", 1);
            let mut xml: XmlElementRef = txn
                .get_or_insert_xml_fragment("xml")
                .push_back(&mut txn, XmlElementPrelim::empty("div"));
            for _ in 0..5_000 {
                xml = xml.push_back(&mut txn, XmlElementPrelim::empty("div"));
            }
        }
        let update = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let worker = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let fresh = Doc::new();
                fresh
                    .transact_mut()
                    .apply_update(Update::decode_v1(&update).expect("decodes"))
                    .expect("applies");
                let json = doc_to_json(&fresh, &BTreeMap::new());
                let (levels, end) = object_chain(&json["deep"]);
                assert_eq!(levels, MAX_DEPTH);
                assert_eq!(*end, Value::Null);
                let mut node = &json["xml"];
                let mut levels = 0;
                while let Some(Value::Array(content)) = node.get("content") {
                    levels += 1;
                    node = &content[0];
                }
                assert!(levels <= MAX_DEPTH, "{levels}");
                assert_eq!(*node, Value::Null);
            })
            .expect("spawns");
        worker.join().expect("no overflow");
    }

    fn ops(json: Value) -> Vec<Op> {
        serde_json::from_value(json).expect("ops parse")
    }

    fn state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    #[test]
    fn ops_apply_and_show() {
        let doc = reload(&sample());
        let applied = apply_ops(
            &doc,
            &ops(json!([
                {"op": "map.set", "type": "meta", "key": "count", "value": 4},
                {"op": "map.set", "type": "meta", "key": "obj", "value": {"a": [1, 2.5, null, "x"]}},
                {"op": "map.delete", "type": "meta", "key": "blob"},
                {"op": "map.delete", "type": "meta", "key": "never-there"},
                {"op": "text.insert", "type": "title", "index": 0, "text": ">> "},
                {"op": "text.insert", "type": "title", "text": "!"},
                {"op": "text.delete", "type": "title", "index": 3, "length": 7},
                {"op": "text.insert", "type": "fresh", "text": "new", "attributes": {"bold": true}},
                {"op": "text.replace", "type": "body", "text": "replaced"},
                {"op": "array.push", "type": "items", "values": [true, {"b": 2}]},
                {"op": "array.push", "type": "list", "values": []}
            ])),
        )
        .expect("applies");
        assert_eq!(applied, 11);
        let got = doc_to_json(&reload(&doc), &BTreeMap::new());
        assert_eq!(got["title"], json!(">> wörld!"));
        assert_eq!(got["meta"]["count"], json!(4));
        assert_eq!(got["meta"]["obj"], json!({"a": [1, 2.5, null, "x"]}));
        assert!(got["meta"].get("blob").is_none());
        assert_eq!(got["fresh"], json!("new"));
        assert_eq!(got["body"], json!("replaced"));
        assert_eq!(
            got["items"],
            json!(["a", {"k": null}, {"x": 1}, true, {"b": 2}])
        );
        // An array root that was only ever pushed nothing is still empty, hence left out.
        assert!(got.get("list").is_none());

        // Formatting given with an insert lands on the text.
        let txn = doc.transact();
        let fresh = txn.get_text("fresh").expect("fresh");
        let diff = fresh.diff(&txn, YChange::identity);
        assert_eq!(
            diff[0].attributes.as_deref(),
            Some(&attrs(&[("bold", Any::Bool(true))]))
        );

        // Replacing a text twice in one batch, then editing it.
        drop(txn);
        apply_ops(
            &doc,
            &ops(json!([
                {"op": "text.replace", "type": "body", "text": "one"},
                {"op": "text.replace", "type": "body", "text": "two three"},
                {"op": "text.delete", "type": "body", "index": 3, "length": 6}
            ])),
        )
        .expect("applies");
        assert_eq!(doc_to_json(&doc, &BTreeMap::new())["body"], json!("two"));
    }

    #[test]
    fn text_indexes_count_code_points() {
        for offset_kind in [OffsetKind::Bytes, OffsetKind::Utf16] {
            let doc = Doc::with_options(yrs::Options {
                offset_kind,
                ..Default::default()
            });
            apply_ops(
                &doc,
                &ops(json!([
                    {"op": "text.insert", "type": "t", "text": "a🎉b日本c"},
                    {"op": "text.insert", "type": "t", "index": 2, "text": "X"},
                    {"op": "text.insert", "type": "t", "index": 5, "text": "Y"},
                    {"op": "text.delete", "type": "t", "index": 1, "length": 1},
                ])),
            )
            .expect("applies");
            assert_eq!(
                doc_to_json(&doc, &BTreeMap::new())["t"],
                json!("aXb日Y本c"),
                "{offset_kind:?}"
            );
            // Seven code points: index 7 is the end, 8 is past it.
            apply_ops(
                &doc,
                &ops(json!([{"op": "text.insert", "type": "t", "index": 7, "text": "!"}])),
            )
            .expect("end");
            let err = apply_ops(
                &doc,
                &ops(json!([{"op": "text.insert", "type": "t", "index": 9, "text": "?"}])),
            )
            .expect_err("past the end");
            assert_eq!(
                err.to_string(),
                "op 0: index 9 is past the end of text \"t\" (length 8)"
            );
            // A fresh copy with an embed: the embed counts one.
            let doc = reload(&doc);
            {
                let mut txn = doc.transact_mut();
                let t = txn.get_or_insert_text("t");
                t.insert_embed(&mut txn, 0, any_map(&[("image", Any::from("x.png"))]));
            }
            apply_ops(
                &doc,
                &ops(json!([{"op": "text.delete", "type": "t", "index": 2, "length": 2}])),
            )
            .expect("applies");
            assert_eq!(doc_to_json(&doc, &BTreeMap::new())["t"], json!("a日Y本c!"));
        }
    }

    #[test]
    fn invalid_ops_change_nothing() {
        let doc = reload(&sample());
        let before = state(&doc);
        let cases = [
            (
                json!([
                    {"op": "text.insert", "type": "title", "text": "ok"},
                    {"op": "map.set", "type": "title", "key": "k", "value": 1}
                ]),
                "op 1: root \"title\" holds text content, it cannot be used as map",
            ),
            (
                json!([{"op": "text.insert", "type": "meta", "text": "x"}]),
                "op 0: root \"meta\" holds map content, it cannot be used as text",
            ),
            (
                json!([{"op": "array.push", "type": "default", "values": [1]}]),
                "op 0: root \"default\" holds xml content, it cannot be used as array",
            ),
            (
                json!([
                    {"op": "map.set", "type": "meta", "key": "k", "value": 1},
                    {"op": "text.delete", "type": "title", "index": 10, "length": 3}
                ]),
                "op 1: range 10..13 is past the end of text \"title\" (length 12)",
            ),
            (
                json!([
                    {"op": "text.replace", "type": "title", "text": "abcd"},
                    {"op": "text.insert", "type": "title", "index": 10, "text": "x"}
                ]),
                "op 1: index 10 is past the end of text \"title\" (length 4)",
            ),
            (
                json!([
                    {"op": "map.set", "type": "new", "key": "k", "value": 1},
                    {"op": "array.push", "type": "new", "values": [1]}
                ]),
                "op 1: root \"new\" holds map content, it cannot be used as array",
            ),
            (
                json!([{"op": "map.set", "type": "", "key": "k", "value": 1}]),
                "op 0: \"type\" must name a root",
            ),
        ];
        for (batch, message) in cases {
            let err = apply_ops(&doc, &ops(batch)).expect_err(message);
            assert_eq!(err.to_string(), message);
            assert_eq!(state(&doc), before, "{message}");
        }

        let mut deep = json!(1);
        for _ in 0..MAX_VALUE_DEPTH {
            deep = json!([deep]);
        }
        let err = apply_ops(
            &doc,
            &ops(json!([{"op": "array.push", "type": "items", "values": [1, deep]}])),
        )
        .expect_err("too deep");
        assert_eq!(
            err.to_string(),
            "op 0: value 1: value nested deeper than 32"
        );

        let many = vec![
            Op::MapDelete {
                root: "meta".into(),
                key: "k".into(),
            };
            MAX_OPS + 1
        ];
        assert!(matches!(
            apply_ops(&doc, &many),
            Err(JsonError::TooManyOps { .. })
        ));
        assert_eq!(state(&doc), before);
        assert_eq!(apply_ops(&doc, &[]), Ok(0));
    }

    #[test]
    fn ops_parse_strictly() {
        let parse = |v: Value| serde_json::from_value::<Op>(v);
        assert!(parse(json!({"op": "map.set", "type": "m", "key": "k"})).is_err());
        assert!(
            parse(json!({"op": "map.set", "type": "m", "key": "k", "value": 1, "x": 2})).is_err()
        );
        assert!(parse(json!({"op": "map.merge", "type": "m"})).is_err());
        assert!(
            parse(json!({"op": "text.delete", "type": "t", "index": -1, "length": 1})).is_err()
        );
        assert_eq!(
            parse(json!({"op": "map.set", "type": "m", "key": "k", "value": null})).expect("null"),
            Op::MapSet {
                root: "m".into(),
                key: "k".into(),
                value: Value::Null
            }
        );
        assert_eq!(
            parse(json!({"op": "text.insert", "type": "t", "text": "x"})).expect("insert"),
            Op::TextInsert {
                root: "t".into(),
                index: None,
                text: "x".into(),
                attributes: None
            }
        );
    }
}

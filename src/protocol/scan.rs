//! Structural pre-scan of Yjs v1 updates, run before any recursive decoder sees the bytes.
//!
//! yrs decodes nested `Any` values (arrays and maps inside a block's content) recursively, so
//! a 20 KB update holding 10,000 nested arrays overflows the stack while it is decoded, and a
//! minimal block costs yrs about a hundred times its encoded size in memory. This scanner walks
//! the same encoding iteratively over a borrowed slice, allocating nothing per value, and
//! refuses input that is deeper, larger or stranger than [`ScanLimits`] allows. What it learns
//! on the way (the clock ranges an update inserts, the ids it refers to and the ranges it
//! deletes) lets the caller decide, without decoding, whether the update depends on anything
//! the document lacks and whether a document already contains it.
//!
//! Wire layout (lib0 v1): `varUint clients`, then per client `varUint blocks, varUint client,
//! varUint clock` and its blocks; then the delete set: `varUint clients`, per client
//! `varUint client, varUint ranges` and `varUint clock, varUint len` per range. A block is an
//! info byte (`0` GC, `10` skip, otherwise an item: bit 7 origin, bit 6 right origin, bit 5
//! parent sub-key, low four bits the content kind) followed by its fields.

use std::collections::HashMap;

/// Largest client id a Yjs peer can produce (JavaScript numbers are exact up to 2^53).
pub const MAX_CLIENT_ID: u64 = (1 << 53) - 1;

/// Bounds applied while scanning one update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanLimits {
    /// Deepest nesting of arrays and maps inside one block's content (`Any` values and the
    /// JSON strings of embeds and formatting attributes).
    pub max_depth: u32,
    /// Most blocks (structs) in one update.
    pub max_structs: u32,
    /// Most delete-set ranges in one update.
    pub max_delete_ranges: u32,
}

impl Default for ScanLimits {
    fn default() -> Self {
        Self {
            max_depth: 64,
            max_structs: 250_000,
            max_delete_ranges: 250_000,
        }
    }
}

/// Why an update was refused by the scan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// The input ended in the middle of a value.
    #[error("update is truncated")]
    Truncated,
    /// A number does not fit the field it encodes.
    #[error("update has an out-of-range {0}")]
    OutOfRange(&'static str),
    /// A string is not UTF-8.
    #[error("update has a string that is not UTF-8")]
    InvalidUtf8,
    /// A value this encoding does not define.
    #[error("update has an unknown {0}")]
    Unknown(&'static str),
    /// Content nested deeper than [`ScanLimits::max_depth`].
    #[error("update nests content deeper than {0} levels")]
    TooDeep(u32),
    /// More blocks than [`ScanLimits::max_structs`].
    #[error("update has more than {0} blocks")]
    TooManyStructs(u32),
    /// More delete ranges than [`ScanLimits::max_delete_ranges`].
    #[error("update has more than {0} deleted ranges")]
    TooManyDeletes(u32),
}

/// What a scan learned about an update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateScan {
    /// Runs of consecutive blocks: `(client, first clock, end clock)`, in encoding order.
    segments: Vec<(u64, u32, u32)>,
    /// Every `(client, clock)` the update's blocks refer to (origins, right origins, parents),
    /// in encoding order. At most three per block, so bounded by [`ScanLimits::max_structs`].
    refs: Vec<(u64, u32)>,
    /// Deleted ranges: `(client, clock, end clock)`.
    deletes: Vec<(u64, u32, u32)>,
    /// Number of blocks.
    structs: u32,
    /// Length of the scanned input.
    len: usize,
}

impl UpdateScan {
    /// True when the update inserts and deletes nothing.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.deletes.is_empty()
    }

    /// Number of blocks the update holds.
    pub fn structs(&self) -> u32 {
        self.structs
    }

    /// Length in bytes of the scanned update.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Deleted ranges as `(client, clock, len)`.
    pub fn deletes(&self) -> impl Iterator<Item = (u64, u32, u32)> + '_ {
        self.deletes.iter().map(|&(c, s, e)| (c, s, e - s))
    }

    /// True when every block of the update is already below `known` (a document's state
    /// vector: the next clock it expects from each client).
    pub fn inserts_known(&self, known: impl Fn(u64) -> u32) -> bool {
        self.segments.iter().all(|&(c, _, end)| end <= known(c))
    }

    /// The first thing the update needs that neither a document with state vector `known` nor
    /// the update itself provides: a gap before one of its blocks, an item whose origin or
    /// parent is unknown, or a deletion of unknown content. `None` when it can be integrated
    /// completely.
    pub fn missing(&self, known: impl Fn(u64) -> u32) -> Option<(u64, u32)> {
        let mut avail = Clocks::default();
        for &(client, start, end) in &self.segments {
            let a = avail.entry(client, &known);
            if start > *a {
                return Some((client, *a));
            }
            *a = (*a).max(end);
        }
        let have = |c: u64| avail.get(c).unwrap_or_else(|| known(c));
        for &(client, clock) in &self.refs {
            if clock >= have(client) {
                return Some((client, clock));
            }
        }
        for &(client, _, end) in &self.deletes {
            if end > have(client) {
                return Some((client, end - 1));
            }
        }
        None
    }
}

/// A clock per client: a short list for the usual update (one or two clients), a hash map
/// once an update names more, so a hostile update with thousands of clients stays linear.
enum Clocks {
    Few(Vec<(u64, u32)>),
    Many(HashMap<u64, u32>),
}

impl Default for Clocks {
    fn default() -> Self {
        Clocks::Few(Vec::new())
    }
}

impl Clocks {
    /// Clients kept in a list before switching to a map.
    const FEW: usize = 8;

    fn get(&self, client: u64) -> Option<u32> {
        match self {
            Clocks::Few(v) => v.iter().find(|e| e.0 == client).map(|e| e.1),
            Clocks::Many(m) => m.get(&client).copied(),
        }
    }

    /// The clock for `client`, starting from `init(client)` when absent.
    fn entry(&mut self, client: u64, init: impl Fn(u64) -> u32) -> &mut u32 {
        if let Clocks::Few(v) = self
            && v.len() >= Self::FEW
            && !v.iter().any(|e| e.0 == client)
        {
            *self = Clocks::Many(v.drain(..).collect());
        }
        match self {
            Clocks::Few(v) => {
                let i = match v.iter().position(|e| e.0 == client) {
                    Some(i) => i,
                    None => {
                        v.push((client, init(client)));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Clocks::Many(m) => m.entry(client).or_insert_with(|| init(client)),
        }
    }
}

/// Scans a v1 update. Never recurses deeper than `limits.max_depth` and never allocates in
/// proportion to a declared count.
pub fn scan_update(bytes: &[u8], limits: &ScanLimits) -> Result<UpdateScan, ScanError> {
    let mut s = Scanner {
        buf: bytes,
        pos: 0,
        limits,
    };
    let mut out = UpdateScan {
        len: bytes.len(),
        ..UpdateScan::default()
    };
    let clients = s.var()?;
    for _ in 0..clients {
        let blocks = s.var()?;
        let client = s.client()?;
        let mut clock = s.u32("clock")?;
        let mut run_start = clock;
        for _ in 0..blocks {
            out.structs += 1;
            if out.structs > limits.max_structs {
                return Err(ScanError::TooManyStructs(limits.max_structs));
            }
            let len = match s.byte()? {
                10 => {
                    // skip: a hole in this client's clock range
                    let len = s.u32("skip length")?;
                    if len == 0 {
                        return Err(ScanError::OutOfRange("skip length"));
                    }
                    if clock > run_start {
                        out.segments.push((client, run_start, clock));
                    }
                    clock = add_clock(clock, len)?;
                    run_start = clock;
                    continue;
                }
                0 => {
                    let len = s.u32("gc length")?;
                    if len == 0 {
                        return Err(ScanError::OutOfRange("gc length"));
                    }
                    len
                }
                info => s.item(info, &mut out.refs)?,
            };
            clock = add_clock(clock, len)?;
        }
        if clock > run_start {
            out.segments.push((client, run_start, clock));
        }
    }
    let delete_clients = s.var()?;
    let mut ranges = 0u32;
    for _ in 0..delete_clients {
        let client = s.client()?;
        let n = s.var()?;
        for _ in 0..n {
            ranges += 1;
            if ranges > limits.max_delete_ranges {
                return Err(ScanError::TooManyDeletes(limits.max_delete_ranges));
            }
            let clock = s.u32("delete clock")?;
            let len = s.u32("delete length")?;
            let end = add_clock(clock, len)?;
            if len > 0 {
                out.deletes.push((client, clock, end));
            }
        }
    }
    Ok(out)
}

fn add_clock(clock: u32, len: u32) -> Result<u32, ScanError> {
    clock.checked_add(len).ok_or(ScanError::OutOfRange("clock"))
}

struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a ScanLimits,
}

impl<'a> Scanner<'a> {
    fn byte(&mut self) -> Result<u8, ScanError> {
        let b = *self.buf.get(self.pos).ok_or(ScanError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn skip(&mut self, n: u64) -> Result<&'a [u8], ScanError> {
        let n = usize::try_from(n).map_err(|_| ScanError::Truncated)?;
        if n > self.buf.len() - self.pos {
            return Err(ScanError::Truncated);
        }
        let buf: &'a [u8] = self.buf;
        let out = &buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn var(&mut self) -> Result<u64, ScanError> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(ScanError::OutOfRange("integer"));
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
            if shift > 63 {
                return Err(ScanError::OutOfRange("integer"));
            }
        }
    }

    /// lib0 `varInt` (sign in bit 6 of the first byte): only its extent matters here.
    fn var_int(&mut self) -> Result<(), ScanError> {
        for _ in 0..10 {
            if self.byte()? & 0x80 == 0 {
                return Ok(());
            }
        }
        Err(ScanError::OutOfRange("integer"))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ScanError> {
        u32::try_from(self.var()?).map_err(|_| ScanError::OutOfRange(what))
    }

    fn client(&mut self) -> Result<u64, ScanError> {
        let c = self.var()?;
        if c > MAX_CLIENT_ID {
            return Err(ScanError::OutOfRange("client id"));
        }
        Ok(c)
    }

    fn id(&mut self, refs: &mut Vec<(u64, u32)>) -> Result<(), ScanError> {
        let client = self.client()?;
        let clock = self.u32("clock")?;
        refs.push((client, clock));
        Ok(())
    }

    fn string(&mut self) -> Result<&'a str, ScanError> {
        let len = self.var()?;
        let bytes = self.skip(len)?;
        std::str::from_utf8(bytes).map_err(|_| ScanError::InvalidUtf8)
    }

    /// An item's fields after its info byte; returns its length in clock units.
    fn item(&mut self, info: u8, refs: &mut Vec<(u64, u32)>) -> Result<u32, ScanError> {
        if info & 0x10 != 0 {
            return Err(ScanError::Unknown("content kind"));
        }
        let has_origin = info & 0x80 != 0;
        let has_right = info & 0x40 != 0;
        if has_origin {
            self.id(refs)?;
        }
        if has_right {
            self.id(refs)?;
        }
        if !has_origin && !has_right {
            if self.var()? == 1 {
                self.string()?;
            } else {
                self.id(refs)?;
            }
            if info & 0x20 != 0 {
                self.string()?;
            }
        }
        match info & 0x0f {
            // deleted content
            1 => self.u32("deleted length"),
            // binary
            3 => {
                let n = self.var()?;
                self.skip(n)?;
                Ok(1)
            }
            // string: its length is counted in UTF-16 code units, as Yjs does
            4 => {
                let s = self.string()?;
                let units = s.encode_utf16().count();
                u32::try_from(units).map_err(|_| ScanError::OutOfRange("string length"))
            }
            // embed: one JSON value
            5 => {
                let json = self.string()?;
                json_depth_ok(json, self.limits.max_depth)?;
                Ok(1)
            }
            // format: key and JSON value
            6 => {
                self.string()?;
                let json = self.string()?;
                json_depth_ok(json, self.limits.max_depth)?;
                Ok(1)
            }
            // a nested shared type
            7 => {
                match self.byte()? {
                    0..=2 | 4..=6 | 9 | 15 => {}
                    // XML element: its tag name
                    3 => {
                        self.string()?;
                    }
                    _ => return Err(ScanError::Unknown("type")),
                }
                Ok(1)
            }
            // any values
            8 => {
                let n = self.u32("value count")?;
                for _ in 0..n {
                    self.any(0)?;
                }
                Ok(n)
            }
            // sub-document: guid and options
            9 => {
                self.string()?;
                self.any(0)?;
                Ok(1)
            }
            // 2 is the legacy JSON content no Yjs since v13 writes (and yrs 0.28 decodes it
            // with a different length than it encodes); everything else is undefined
            _ => Err(ScanError::Unknown("content kind")),
        }
    }

    /// One lib0 `Any` value, nested at `depth`.
    fn any(&mut self, depth: u32) -> Result<(), ScanError> {
        match self.byte()? {
            // undefined, null, false, true
            127 | 126 | 121 | 120 => Ok(()),
            125 => self.var_int(),
            124 => self.skip(4).map(drop),
            123 | 122 => self.skip(8).map(drop),
            119 => self.string().map(drop),
            116 => {
                let n = self.var()?;
                self.skip(n).map(drop)
            }
            kind @ (117 | 118) => {
                if depth >= self.limits.max_depth {
                    return Err(ScanError::TooDeep(self.limits.max_depth));
                }
                let n = self.var()?;
                for _ in 0..n {
                    if kind == 118 {
                        self.string()?;
                    }
                    self.any(depth + 1)?;
                }
                Ok(())
            }
            _ => Err(ScanError::Unknown("value kind")),
        }
    }
}

/// Checks that JSON text nests arrays and objects at most `max` deep (a linear scan that
/// skips string literals; validity is left to the JSON parser).
pub fn json_depth_ok(json: &str, max: u32) -> Result<(), ScanError> {
    let mut depth = 0u32;
    let mut in_string = false;
    let mut escaped = false;
    for b in json.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(ScanError::TooDeep(max));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use yrs::updates::decoder::Decode;
    use yrs::{Any, Array, ClientID, Doc, Map, ReadTxn, Text, Transact, Update, XmlFragment};

    fn limits() -> ScanLimits {
        ScanLimits::default()
    }

    fn nested_array_update(depth: usize) -> Vec<u8> {
        // one client, one block: parent named "a", content Any with `depth` nested arrays
        let mut b = vec![1, 1, 7, 0, 0x08, 1, 1, b'a', 1];
        b.extend(std::iter::repeat_n([117u8, 1], depth).flatten());
        b.push(126);
        b.push(0);
        b
    }

    #[test]
    fn realistic_updates_scan_and_report_their_ranges() {
        let doc = Doc::with_client_id(7);
        let text = doc.get_or_insert_text("t");
        let map = doc.get_or_insert_map("m");
        let arr = doc.get_or_insert_array("a");
        let xml = doc.get_or_insert_xml_fragment("x");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "héllo 😀 world");
        text.format(
            &mut txn,
            0,
            3,
            HashMap::from([("bold".into(), Any::Bool(true))]),
        );
        map.insert(
            &mut txn,
            "k",
            Any::Array(Arc::from(vec![Any::Bool(true), Any::from("x")])),
        );
        arr.insert(&mut txn, 0, vec![1, 2, 3]);
        xml.insert(&mut txn, 0, yrs::XmlElementPrelim::empty("p"));
        text.remove_range(&mut txn, 1, 2);
        let bytes = txn.encode_update_v1();
        drop(txn);
        let scan = scan_update(&bytes, &limits()).unwrap();
        let sv = doc.transact().state_vector();
        assert!(scan.inserts_known(|c| sv.get(&ClientID::new(c))));
        assert!(!scan.inserts_known(|_| 0));
        assert_eq!(scan.missing(|_| 0), None, "self-contained");
        assert!(scan.deletes().any(|(c, _, len)| c == 7 && len > 0));
        // yrs agrees the bytes decode
        Update::decode_v1(&bytes).unwrap();
    }

    #[test]
    fn deep_nesting_is_refused_before_decoding() {
        let ok = nested_array_update(10);
        assert!(scan_update(&ok, &limits()).is_ok());
        let deep = nested_array_update(10_000);
        assert_eq!(
            scan_update(&deep, &limits()),
            Err(ScanError::TooDeep(limits().max_depth))
        );
        assert!(json_depth_ok(&"[".repeat(65), 64).is_err());
        assert!(json_depth_ok(r#"{"a":"[[[[[[[[[[["}"#, 2).is_ok());
    }

    #[test]
    fn truncations_and_counts_are_refused() {
        let doc = Doc::with_client_id(9);
        let arr = doc.get_or_insert_array("a");
        let mut txn = doc.transact_mut();
        for i in 0..10 {
            arr.insert(&mut txn, 0, i);
        }
        let bytes = txn.encode_update_v1();
        drop(txn);
        for cut in 0..bytes.len() {
            assert!(scan_update(&bytes[..cut], &limits()).is_err(), "cut {cut}");
        }
        let few = ScanLimits {
            max_structs: 3,
            ..limits()
        };
        assert_eq!(scan_update(&bytes, &few), Err(ScanError::TooManyStructs(3)));
        // a client id beyond 2^53
        let mut big = vec![1, 1];
        big.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        big.extend([0, 0, 1, 0]);
        assert_eq!(
            scan_update(&big, &limits()),
            Err(ScanError::OutOfRange("client id"))
        );
    }

    #[test]
    fn missing_dependencies_are_found() {
        let a = Doc::with_client_id(1);
        let t = a.get_or_insert_text("t");
        let first = {
            let mut txn = a.transact_mut();
            t.insert(&mut txn, 0, "ab");
            txn.encode_update_v1()
        };
        let second = {
            let mut txn = a.transact_mut();
            t.insert(&mut txn, 2, "c");
            txn.encode_update_v1()
        };
        let s1 = scan_update(&first, &limits()).unwrap();
        let s2 = scan_update(&second, &limits()).unwrap();
        assert_eq!(s1.missing(|_| 0), None);
        assert!(s2.missing(|_| 0).is_some(), "second needs the first");
        assert_eq!(s2.missing(|c| if c == 1 { 2 } else { 0 }), None);
        let del = {
            let mut txn = a.transact_mut();
            t.remove_range(&mut txn, 0, 1);
            txn.encode_update_v1()
        };
        let sd = scan_update(&del, &limits()).unwrap();
        assert!(sd.missing(|_| 0).is_some(), "deletes unknown content");
        assert_eq!(sd.missing(|_| 3), None);
    }

    #[test]
    fn missing_dependencies_are_found_across_many_clients() {
        // 20 clients, each appending after the previous one's text: more clients than the
        // short list holds, so the lookup moves to a map part-way through.
        let doc = Doc::new();
        let mut updates = Vec::new();
        for c in 1..=20u64 {
            let d = Doc::with_client_id(c);
            let t = d.get_or_insert_text("t");
            let state = doc
                .transact()
                .encode_state_as_update_v1(&Default::default());
            d.transact_mut()
                .apply_update(Update::decode_v1(&state).unwrap())
                .unwrap();
            let mut txn = d.transact_mut();
            let len = t.len(&txn);
            t.insert(&mut txn, len, "x");
            let u = txn.encode_update_v1();
            drop(txn);
            doc.transact_mut()
                .apply_update(Update::decode_v1(&u).unwrap())
                .unwrap();
            updates.push(u);
        }
        let all = yrs::merge_updates_v1(&updates).unwrap();
        let scan = scan_update(&all, &limits()).unwrap();
        assert_eq!(
            scan.missing(|_| 0),
            None,
            "the merged history is self-contained"
        );
        let without_first = yrs::merge_updates_v1(&updates[1..]).unwrap();
        let scan = scan_update(&without_first, &limits()).unwrap();
        assert_eq!(
            scan.missing(|_| 0),
            Some((1, 0)),
            "client 1's text is referred to"
        );
        assert_eq!(scan.missing(|c| u32::from(c == 1)), None);
        let mut clocks = Clocks::default();
        for c in 0..100u64 {
            *clocks.entry(c, |c| c as u32) += 1;
        }
        assert!(matches!(clocks, Clocks::Many(_)));
        assert_eq!(clocks.get(42), Some(43));
        assert_eq!(clocks.get(100), None);
    }

    #[test]
    fn legacy_json_content_is_refused() {
        // parent "a", content kind 2 (JSON) with one string
        let b = vec![1, 1, 5, 0, 0x02, 1, 1, b'a', 1, 1, b'1', 0];
        assert_eq!(
            scan_update(&b, &limits()),
            Err(ScanError::Unknown("content kind"))
        );
    }
}

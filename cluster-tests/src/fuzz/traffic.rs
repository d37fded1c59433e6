//! Realistic editor traffic for the fuzzer: 2–4 clients concurrently editing text (with
//! formatting and embeds), maps, arrays, nested types and XML fragments, exchanging updates
//! sometimes, so the server sees concurrent, interleaved and occasionally out-of-order updates.
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use std::collections::HashMap;
use std::sync::Arc;
use yrs::types::Attrs;
use yrs::updates::decoder::Decode;
use yrs::{
    Any, Array, ArrayPrelim, ArrayRef, Doc, Map, MapPrelim, MapRef, Options, Out, ReadTxn,
    StateVector, Text, TextPrelim, TextRef, Transact, TransactionMut, Update, XmlElementPrelim,
    XmlFragment, XmlFragmentRef, XmlOut, XmlTextPrelim, XmlTextRef,
};

fn rstr(rng: &mut StdRng, max: usize) -> String {
    let n = rng.random_range(1..=max);
    (0..n)
        .map(|_| {
            let c = rng.random_range(0..30u8);
            if c < 26 { (b'a' + c) as char } else { ' ' }
        })
        .collect()
}

fn rany(rng: &mut StdRng, depth: u32) -> Any {
    match rng.random_range(0..if depth > 1 { 5 } else { 8 }) {
        0 => Any::Null,
        1 => Any::from(rng.random_bool(0.5)),
        2 => Any::from(rng.random_range(-1000.0..1000.0f64)),
        3 => Any::from(rng.random_range(-100000i64..100000)),
        4 => Any::from(rstr(rng, 8)),
        5 => Any::Buffer(Arc::from(vec![rng.random::<u8>(); rng.random_range(0..5)])),
        6 => Any::Array(Arc::from(
            (0..rng.random_range(0..3))
                .map(|_| rany(rng, depth + 1))
                .collect::<Vec<_>>(),
        )),
        _ => {
            let mut m = HashMap::new();
            for _ in 0..rng.random_range(0..3) {
                m.insert(rstr(rng, 4), rany(rng, depth + 1));
            }
            Any::Map(Arc::new(m))
        }
    }
}

const KEYS: &[&str] = &["title", "author", "color", "done", "n", "meta", "cfg", "x"];
const FMT: &[&str] = &["bold", "italic", "underline", "link", "color", "header"];

fn rattrs(rng: &mut StdRng, allow_null: bool) -> Attrs {
    let mut a = Attrs::new();
    for _ in 0..rng.random_range(1..=2) {
        let k: Arc<str> = Arc::from(FMT.choose(rng).copied().unwrap_or("bold"));
        let v = if allow_null && rng.random_bool(0.3) {
            Any::Null
        } else if rng.random_bool(0.6) {
            Any::Bool(true)
        } else {
            Any::from(rstr(rng, 6))
        };
        a.insert(k, v);
    }
    a
}

fn text_op<T: Text>(rng: &mut StdRng, txn: &mut TransactionMut<'_>, t: &T) {
    let len = t.len(txn);
    match rng.random_range(0..10) {
        0..=3 => {
            let i = rng.random_range(0..=len);
            t.insert(txn, i, &rstr(rng, 10));
        }
        4 => {
            let i = rng.random_range(0..=len);
            let a = rattrs(rng, false);
            t.insert_with_attributes(txn, i, &rstr(rng, 6), a);
        }
        5 | 6 if len > 0 => {
            let i = rng.random_range(0..len);
            let l = rng.random_range(1..=(len - i).min(8));
            let a = rattrs(rng, true);
            t.format(txn, i, l, a);
        }
        7 => {
            let i = rng.random_range(0..=len);
            let mut m = HashMap::new();
            m.insert("image".to_string(), Any::from(rstr(rng, 6)));
            if rng.random_bool(0.5) {
                t.insert_embed_with_attributes(txn, i, Any::Map(Arc::new(m)), rattrs(rng, false));
            } else {
                t.insert_embed(txn, i, Any::Map(Arc::new(m)));
            }
        }
        _ if len > 0 => {
            let i = rng.random_range(0..len);
            let l = rng.random_range(1..=(len - i).min(6));
            t.remove_range(txn, i, l);
        }
        _ => t.push(txn, &rstr(rng, 4)),
    }
}

fn map_op(rng: &mut StdRng, txn: &mut TransactionMut<'_>, m: &MapRef, depth: u32) {
    let key = KEYS.choose(rng).copied().unwrap_or("x");
    match rng.random_range(0..10) {
        0..=4 => {
            m.insert(txn, key, rany(rng, 0));
        }
        5 => {
            m.remove(txn, key);
        }
        6 => {
            m.insert(txn, key, TextPrelim::new(rstr(rng, 6)));
        }
        7 => {
            m.insert(
                txn,
                key,
                MapPrelim::from([("k", rany(rng, 1)), ("j", rany(rng, 1))]),
            );
        }
        8 => {
            m.insert(
                txn,
                key,
                ArrayPrelim::from(vec![rany(rng, 1), rany(rng, 1)]),
            );
        }
        _ => {
            // edit an existing nested value if any
            if let Some(v) = m.get(txn, key) {
                nested_op(rng, txn, v, depth + 1);
            } else {
                m.insert(txn, key, rany(rng, 0));
            }
        }
    }
}

fn array_op(rng: &mut StdRng, txn: &mut TransactionMut<'_>, a: &ArrayRef, depth: u32) {
    let len = a.len(txn);
    match rng.random_range(0..10) {
        0..=3 => {
            let i = rng.random_range(0..=len);
            a.insert(txn, i, rany(rng, 0));
        }
        4 => {
            let i = rng.random_range(0..=len);
            let vals: Vec<Any> = (0..rng.random_range(1..4)).map(|_| rany(rng, 1)).collect();
            a.insert_range(txn, i, vals);
        }
        5 => {
            let i = rng.random_range(0..=len);
            if rng.random_bool(0.5) {
                a.insert(txn, i, MapPrelim::from([("id", rany(rng, 1))]));
            } else {
                a.insert(txn, i, TextPrelim::new(rstr(rng, 5)));
            }
        }
        6 | 7 if len > 0 => {
            let i = rng.random_range(0..len);
            let l = rng.random_range(1..=(len - i).min(3));
            a.remove_range(txn, i, l);
        }
        _ if len > 0 => {
            let i = rng.random_range(0..len);
            if let Some(v) = a.get(txn, i) {
                nested_op(rng, txn, v, depth + 1);
            }
        }
        _ => {
            a.push_back(txn, rany(rng, 0));
        }
    }
}

fn xml_frag_op<F: XmlFragment>(rng: &mut StdRng, txn: &mut TransactionMut<'_>, f: &F, depth: u32) {
    let len = f.len(txn);
    match rng.random_range(0..8) {
        0 | 1 => {
            let i = rng.random_range(0..=len);
            let tag = ["p", "h1", "li", "blockquote"]
                .choose(rng)
                .copied()
                .unwrap_or("p");
            f.insert(txn, i, XmlElementPrelim::empty(tag));
        }
        2 | 3 => {
            let i = rng.random_range(0..=len);
            f.insert(txn, i, XmlTextPrelim::new(rstr(rng, 8)));
        }
        4 if len > 0 => {
            let i = rng.random_range(0..len);
            f.remove_range(txn, i, 1);
        }
        _ if len > 0 && depth < 4 => {
            let i = rng.random_range(0..len);
            match f.get(txn, i) {
                Some(XmlOut::Element(e)) => {
                    if rng.random_bool(0.4) {
                        use yrs::Xml;
                        e.insert_attribute(
                            txn,
                            ["class", "id", "style"]
                                .choose(rng)
                                .copied()
                                .unwrap_or("id"),
                            rstr(rng, 4),
                        );
                    } else {
                        xml_frag_op(rng, txn, &e, depth + 1);
                    }
                }
                Some(XmlOut::Text(t)) => xml_text_op(rng, txn, &t),
                Some(XmlOut::Fragment(fr)) => xml_frag_op(rng, txn, &fr, depth + 1),
                None => {}
            }
        }
        _ => {
            f.push_back(txn, XmlTextPrelim::new(rstr(rng, 5)));
        }
    }
}

fn xml_text_op(rng: &mut StdRng, txn: &mut TransactionMut<'_>, t: &XmlTextRef) {
    text_op(rng, txn, t);
}

fn nested_op(rng: &mut StdRng, txn: &mut TransactionMut<'_>, v: Out, depth: u32) {
    if depth > 4 {
        return;
    }
    match v {
        Out::YText(t) => text_op(rng, txn, &t),
        Out::YMap(m) => map_op(rng, txn, &m, depth),
        Out::YArray(a) => array_op(rng, txn, &a, depth),
        Out::YXmlText(t) => xml_text_op(rng, txn, &t),
        Out::YXmlElement(e) => xml_frag_op(rng, txn, &e, depth),
        Out::YXmlFragment(f) => xml_frag_op(rng, txn, &f, depth),
        _ => {}
    }
}

struct Client {
    doc: Doc,
    text: TextRef,
    map: MapRef,
    arr: ArrayRef,
    xml: XmlFragmentRef,
}

fn random_op(rng: &mut StdRng, c: &Client, txn: &mut TransactionMut<'_>) {
    match rng.random_range(0..10) {
        0..=3 => text_op(rng, txn, &c.text),
        4 | 5 => map_op(rng, txn, &c.map, 0),
        6 | 7 => array_op(rng, txn, &c.arr, 0),
        _ => xml_frag_op(rng, txn, &c.xml, 0),
    }
}

/// Generate a history of updates, in the order a server would receive them.
pub fn history(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let n = rng.random_range(2..=4);
    let mut clients = Vec::new();
    let mut used = Vec::new();
    for _ in 0..n {
        let mut id = rng.random_range(1..5000u64);
        while used.contains(&id) {
            id += 1;
        }
        used.push(id);
        let mut o = Options::with_client_id(yrs::ClientID::new(id));
        o.skip_gc = rng.random_bool(0.3);
        let doc = Doc::with_options(o);
        let text = doc.get_or_insert_text("text");
        let map = doc.get_or_insert_map("map");
        let arr = doc.get_or_insert_array("arr");
        let xml = doc.get_or_insert_xml_fragment("xml");
        clients.push(Client {
            doc,
            text,
            map,
            arr,
            xml,
        });
    }
    let steps = rng.random_range(3..=7);
    let mut history: Vec<Vec<u8>> = Vec::new();
    for _ in 0..steps {
        let ci = rng.random_range(0..n);
        let c = &clients[ci];
        let kind = rng.random_range(0..10);
        let upd = if kind < 8 {
            // incremental update of one transaction
            let mut txn = c.doc.transact_mut();
            for _ in 0..rng.random_range(1..=3) {
                random_op(rng, c, &mut txn);
            }
            txn.encode_update_v1()
        } else if kind == 8 {
            // diff against the state of another client (sync step 2)
            {
                let mut txn = c.doc.transact_mut();
                random_op(rng, c, &mut txn);
            }
            // diff against a *different* client's state vector (with other == self the local
            // op would silently vanish from the history)
            let oi = (ci + rng.random_range(1..n)) % n;
            let other = &clients[oi];
            let sv = other.doc.transact().state_vector();
            c.doc.transact().encode_state_as_update_v1(&sv)
        } else {
            {
                let mut txn = c.doc.transact_mut();
                random_op(rng, c, &mut txn);
            }
            c.doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default())
        };
        if upd.len() <= 2 {
            continue;
        }
        // exchange sometimes
        for (oi, o) in clients.iter().enumerate() {
            if oi != ci
                && rng.random_bool(0.5)
                && let Ok(u) = Update::decode_v1(&upd)
            {
                let _ = o.doc.transact_mut().apply_update(u);
            }
        }
        history.push(upd);
    }
    // occasionally a full-sync at the end so that late receivers catch up
    if rng.random_bool(0.3) {
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    let sv = clients[b].doc.transact().state_vector();
                    let u = clients[a].doc.transact().encode_state_as_update_v1(&sv);
                    if let Ok(u) = Update::decode_v1(&u) {
                        let _ = clients[b].doc.transact_mut().apply_update(u);
                    }
                }
            }
        }
    }
    // out-of-order delivery sometimes
    if history.len() > 1 && rng.random_bool(0.15) {
        let i = rng.random_range(0..history.len() - 1);
        history.swap(i, i + 1);
    }
    history
}

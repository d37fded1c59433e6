//! The envelope target: what a peer node (or anyone who can publish on the cluster's Redis
//! channels) sends. Valid envelopes of every kind and batches of them, encoded as the transport
//! encodes them, are mutated and decoded by the receiving codec, signed and unsigned; what
//! decodes goes through the receiver's next steps (the sequence check and, for parts,
//! reassembly).

use std::panic::{AssertUnwindSafe, catch_unwind};

use hearth_proxy::{
    Auth, Body, CloseDoc, Codec, ConnId, DEFAULT_MAX_ENVELOPE_BYTES, Envelope, Header, Holder,
    Incarnation, Kind, LinkId, NodeAddr, NodeId, OpenMeta, Part, Reassembler, ReassemblyLimits,
    RequestId, RpcErrorCode, RpcFailure, RpcReply, RpcRequest, SeqTracker, Session,
};
use rand::Rng;
use rand::rngs::StdRng;

use super::mutate;
use super::targets::Outcome;

/// The secret of the signed half of the cases (fixed: a case is a pure function of its seed).
const SECRET: &[u8] = b"fuzz-envelope-secret-0123456789-abcdefghijklmnop";

/// Both codecs a receiver may run: the signed one of a cluster with a secret, and the unsigned
/// one (signature checks come first, so only this one reaches the msgpack decoder with mutated
/// bytes).
fn codecs() -> Option<[Codec; 2]> {
    let signed = Auth::with_secret(SECRET).ok()?;
    Some([
        Codec::new(signed, DEFAULT_MAX_ENVELOPE_BYTES),
        Codec::new(Auth::disabled(), DEFAULT_MAX_ENVELOPE_BYTES),
    ])
}

/// Builds one case: a valid envelope, encoded by one of the codecs, then mutated. The first
/// byte of the input says which codec decodes it (0 signed, 1 unsigned).
pub fn build(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let Some(codecs) = codecs() else {
        return Vec::new();
    };
    let which = usize::from(rng.random_bool(0.7));
    let encoded = if rng.random_bool(0.4) {
        let n = rng.random_range(1..8);
        let bodies: Vec<Body> = (0..n)
            .map(|_| {
                loop {
                    let body = valid_body(rng);
                    if !matches!(body, Body::Part { .. }) {
                        break body;
                    }
                }
            })
            .collect();
        let to = rng.random_bool(0.9).then(|| node(rng));
        codecs[which].encode_batch(
            &node(rng),
            to.as_ref(),
            rng.random_range(1..1_000_000),
            &bodies,
        )
    } else {
        codecs[which].encode(&valid_envelope(rng))
    };
    let Ok(encoded) = encoded else {
        return Vec::new();
    };
    let mutated = if rng.random_bool(0.3) {
        mutate::flip_bit(rng, encoded)
    } else {
        mutate::mutate(rng, encoded)
    };
    vec![vec![which as u8], mutated]
}

/// Runs one input: decode, and for what decodes, the receiver's next steps.
pub fn feed(input: &[Vec<u8>], out: &mut Outcome) {
    let Some(codecs) = codecs() else {
        out.violation = Some("the fuzz secret is refused as weak".into());
        return;
    };
    let [selector, bytes] = input else {
        return;
    };
    let codec = &codecs[usize::from(selector.first().copied().unwrap_or(0) != 0)];
    let decoded = catch_unwind(AssertUnwindSafe(|| codec.decode_message(bytes)));
    let message = match decoded {
        Err(_) => {
            out.violation = Some("the envelope decoder panicked".into());
            return;
        }
        Ok(Err(_)) => {
            out.refused += 1;
            return;
        }
        Ok(Ok(message)) => message,
    };
    out.accepted += 1;
    let envelopes: Vec<Envelope> = message.envelopes.iter().flatten().cloned().collect();
    // What decodes must encode again and decode to the same envelopes: the receiver forwards
    // and answers with what it decoded.
    // An envelope can decode within the cap and re-encode a few bytes over it (framing); the
    // transport never re-encodes what it received, so only a successful re-encoding is checked.
    if message.batch {
        let all_known = envelopes.len() == message.envelopes.len();
        if let (true, Some(first)) = (all_known, envelopes.first()) {
            let bodies: Vec<Body> = envelopes.iter().map(|e| e.body.clone()).collect();
            let again = codec.encode_batch(
                &first.header.from,
                first.header.to.as_ref(),
                first.header.seq,
                &bodies,
            );
            if let Ok(again) = again {
                match codec.decode_message(&again) {
                    Ok(back) => {
                        let back: Vec<Envelope> = back.envelopes.into_iter().flatten().collect();
                        if back != envelopes {
                            out.violation = Some(format!(
                                "re-encoding changed a batch: {envelopes:?} → {back:?}"
                            ));
                        }
                    }
                    Err(e) => {
                        out.violation = Some(format!("a re-encoded batch does not decode: {e}"))
                    }
                }
            }
        }
    } else if let Some(env) = envelopes.first()
        && let Ok(again) = codec.encode(env)
    {
        match codec.decode(&again) {
            Ok(back) if &back == env => {}
            Ok(back) => {
                out.violation = Some(format!(
                    "re-encoding changed the envelope: {env:?} → {back:?}"
                ));
            }
            Err(e) => out.violation = Some(format!("a re-encoded envelope does not decode: {e}")),
        }
    }
    let mut seqs = SeqTracker::new();
    let mut parts = Reassembler::new(ReassemblyLimits::new(1 << 20));
    for env in envelopes {
        let link = LinkId {
            from: env.header.from.clone(),
            broadcast: env.header.to.is_none(),
        };
        let _ = seqs.observe(&link, env.header.seq);
        if let Body::Part { session, part } = env.body {
            let _ = parts.push(&link, session, part);
        }
    }
}

fn valid_envelope(rng: &mut StdRng) -> Envelope {
    let body = valid_body(rng);
    let to = rng.random_bool(0.7).then(|| node(rng));
    Envelope {
        header: Header {
            version: body.kind().since(),
            from: node(rng),
            to,
            seq: rng.random_range(1..1_000_000),
        },
        body,
    }
}

fn node(rng: &mut StdRng) -> NodeAddr {
    let names = ["n1", "n2", "hearth-0", "pod-7f9c"];
    #[allow(clippy::unwrap_used)] // constant, valid node ids
    let id = NodeId::new(names[rng.random_range(0..names.len())]).unwrap();
    NodeAddr::new(id, Incarnation(rng.random_range(1..u64::MAX)))
}

fn session(rng: &mut StdRng) -> Session {
    let docs = ["doc", "org/1/page", "émoji-😀", ""];
    Session {
        conn: ConnId::generate(),
        doc: docs[rng.random_range(0..docs.len())].into(),
        epoch: rng.random_range(0..1_000),
    }
}

fn bytes(rng: &mut StdRng) -> Vec<u8> {
    let n = rng.random_range(0..64);
    (0..n).map(|_| rng.random()).collect()
}

fn valid_body(rng: &mut StdRng) -> Body {
    let s = session(rng);
    match rng.random_range(0..14) {
        0 => Body::Open {
            session: s,
            meta: OpenMeta {
                path: "/collab".into(),
                query: "room=a&x=1".into(),
                headers: vec![("origin".into(), "https://example.test".into())],
                remote: Some("127.0.0.1".into()),
                provider_version: Some("3.0.0".into()),
            },
        },
        1 => Body::Frame {
            session: s,
            data: bytes(rng),
        },
        2 => Body::Out {
            session: s,
            data: bytes(rng),
        },
        3 => Body::Detach {
            session: s,
            reason: "client left".into(),
        },
        4 => Body::CloseDoc {
            session: s,
            close: CloseDoc {
                code: 4205,
                reason: "Reset Connection".into(),
                resync: rng.random(),
            },
        },
        5 => Body::NotOwner {
            session: s,
            holder: rng.random_bool(0.5).then(|| Holder {
                node: node(rng),
                epoch: 9,
            }),
        },
        6 => Body::Released {
            doc: s.doc,
            epoch: s.epoch,
        },
        7 => Body::Draining { node: node(rng) },
        8 => Body::NodeDown { node: node(rng) },
        9 => Body::Rpc(RpcRequest {
            id: RequestId {
                inc: Incarnation(rng.random_range(1..u64::MAX)),
                n: rng.random(),
            },
            doc: s.doc,
            epoch: rng.random_bool(0.5).then_some(s.epoch),
            name: "rename".into(),
            payload: bytes(rng),
            deadline_ms: 5_000,
            only_if_open: rng.random(),
        }),
        10 => Body::RpcReply(RpcReply {
            id: RequestId {
                inc: Incarnation(rng.random_range(1..u64::MAX)),
                n: rng.random(),
            },
            result: if rng.random_bool(0.5) {
                Ok(bytes(rng))
            } else {
                Err(RpcFailure {
                    code: RpcErrorCode::HandlerError,
                    msg: "boom".into(),
                    holder: None,
                })
            },
        }),
        11 => Body::Keepalive {
            session: rng.random_bool(0.5).then_some(s),
        },
        12 => Body::Fan {
            doc: s.doc,
            epoch: s.epoch,
            conns: (0..rng.random_range(1..5))
                .map(|_| ConnId::generate())
                .collect(),
            data: bytes(rng),
        },
        _ => Body::Part {
            session: s,
            part: Part {
                of: if rng.random() { Kind::Frame } else { Kind::Out },
                index: rng.random_range(0..4),
                last: rng.random(),
                data: bytes(rng),
            },
        },
    }
}

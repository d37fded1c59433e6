#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use serde::Serialize;

use super::*;
use crate::auth::{Secret, Secrets};
use crate::envelope::RpcErrorCode;
use crate::ids::{ConnId, Incarnation, NodeId};

const SECRET: &[u8] = b"Vq7Rk2Xm9Lb4Tz8Wn1Hc6Pd3Jf5Gs0Ye";

fn addr(name: &str, inc: u64) -> NodeAddr {
    NodeAddr::new(NodeId::new(name).unwrap(), Incarnation(inc))
}

fn session() -> Session {
    Session {
        conn: ConnId::generate(),
        doc: "org/1/doc:x {weird}\0name".into(),
        epoch: 42,
    }
}

fn header(to: Option<NodeAddr>) -> Header {
    Header {
        version: SCHEMA_VERSION,
        from: addr("edge-1", 0xdead_beef),
        to,
        seq: 7,
    }
}

/// An envelope stamped as the transport stamps it: with the version of its kind.
fn envelope(body: Body) -> Envelope {
    let to = match body {
        Body::Released { .. } | Body::Draining { .. } | Body::NodeDown { .. } => None,
        _ => Some(addr("owner_2", u64::MAX)),
    };
    Envelope {
        header: Header {
            version: body.kind().since(),
            ..header(to)
        },
        body,
    }
}

/// One body of every kind (some kinds twice, to cover optional fields).
fn all_bodies() -> Vec<Body> {
    let binary: Vec<u8> = (0..=255u8).collect();
    vec![
        Body::Open {
            session: session(),
            meta: OpenMeta {
                path: "/collab".into(),
                query: "token=abc&x=1".into(),
                headers: vec![
                    ("sec-websocket-protocol".into(), "y".into()),
                    ("x-forwarded-for".into(), "10.0.0.1".into()),
                ],
                remote: Some("127.0.0.1:5555".into()),
                provider_version: Some("3.4.6".into()),
            },
        },
        Body::Open {
            session: session(),
            meta: OpenMeta::default(),
        },
        Body::Frame {
            session: session(),
            data: binary.clone(),
        },
        Body::Frame {
            session: session(),
            data: Vec::new(),
        },
        Body::Out {
            session: session(),
            data: binary.clone(),
        },
        Body::Detach {
            session: session(),
            reason: "client closed".into(),
        },
        Body::CloseDoc {
            session: session(),
            close: CloseDoc {
                code: 4205,
                reason: "reset".into(),
                resync: true,
            },
        },
        Body::NotOwner {
            session: session(),
            holder: Some(Holder {
                node: addr("n3", 3),
                epoch: 43,
            }),
        },
        Body::NotOwner {
            session: session(),
            holder: None,
        },
        Body::Released {
            doc: "a:lock".into(),
            epoch: -1,
        },
        Body::Draining {
            node: addr("n4", 4),
        },
        Body::NodeDown {
            node: addr("n5", 5),
        },
        Body::Rpc(RpcRequest {
            id: RequestId {
                inc: Incarnation(9),
                n: 1,
            },
            doc: "d".into(),
            epoch: Some(5),
            name: "rename".into(),
            payload: binary.clone(),
            deadline_ms: 30_000,
            only_if_open: true,
        }),
        Body::RpcReply(RpcReply {
            id: RequestId {
                inc: Incarnation(9),
                n: 1,
            },
            result: Ok(binary.clone()),
        }),
        Body::RpcReply(RpcReply {
            id: RequestId {
                inc: Incarnation(9),
                n: 2,
            },
            result: Err(RpcFailure {
                code: RpcErrorCode::Other("future_code".into()),
                msg: "nope".into(),
                holder: None,
            }),
        }),
        Body::RpcReply(RpcReply {
            id: RequestId {
                inc: Incarnation(9),
                n: 3,
            },
            result: Err(RpcFailure {
                code: RpcErrorCode::NotOwner,
                msg: String::new(),
                holder: Some(Holder {
                    node: addr("n6", 6),
                    epoch: 1,
                }),
            }),
        }),
        Body::Keepalive {
            session: Some(session()),
        },
        Body::Keepalive { session: None },
        Body::Part {
            session: session(),
            part: Part {
                of: Kind::Out,
                index: 0,
                last: false,
                data: binary.clone(),
            },
        },
        Body::Part {
            session: session(),
            part: Part {
                of: Kind::Frame,
                index: u32::MAX,
                last: true,
                data: Vec::new(),
            },
        },
        Body::Fan {
            doc: "doc with spaces".into(),
            epoch: 9,
            conns: vec![ConnId::generate(), ConnId::generate(), ConnId::generate()],
            data: binary.clone(),
        },
    ]
}

fn plain() -> Codec {
    Codec::new(Auth::disabled(), DEFAULT_MAX_ENVELOPE_BYTES)
}

fn signed() -> Codec {
    Codec::new(
        Auth::with_secret(SECRET).unwrap(),
        DEFAULT_MAX_ENVELOPE_BYTES,
    )
}

#[test]
fn every_kind_round_trips_plain_and_signed() {
    let bodies = all_bodies();
    let kinds: std::collections::HashSet<Kind> = bodies.iter().map(Body::kind).collect();
    assert_eq!(
        kinds.len(),
        Kind::ALL.len(),
        "a kind is missing from the test"
    );
    for codec in [plain(), signed()] {
        for body in &bodies {
            let env = envelope(body.clone());
            let bytes = codec.encode(&env).unwrap();
            let expected_tag = if codec.auth().is_enabled() {
                FORMAT_HMAC_SHA256
            } else {
                FORMAT_PLAIN
            };
            assert_eq!(bytes[0], expected_tag);
            assert_eq!(codec.decode(&bytes).unwrap(), env, "{:?}", body.kind());
        }
    }
}

#[test]
fn kind_tags_round_trip() {
    for kind in Kind::ALL {
        assert_eq!(Kind::from_tag(kind.tag()), Some(kind));
    }
    assert_eq!(Kind::from_tag("nope"), None);
}

#[test]
fn byte_fields_are_msgpack_bin() {
    // 1000 bytes >= 0x80 would cost ~2000 bytes as an array of ints.
    let env = envelope(Body::Frame {
        session: session(),
        data: vec![0xff; 1000],
    });
    let bytes = plain().encode(&env).unwrap();
    assert!(bytes.len() < 1000 + 200, "{} bytes", bytes.len());
    // bin16 marker + length 1000 directly followed by the payload.
    let needle = [0xc5, 0x03, 0xe8, 0xff, 0xff];
    assert!(bytes.windows(needle.len()).any(|w| w == needle));
}

#[test]
fn body_is_a_named_map() {
    let bytes = plain()
        .encode(&envelope(Body::Keepalive { session: None }))
        .unwrap();
    // fixmap of 7 entries, first key "v" = 1.
    assert_eq!(&bytes[1..5], &[0x87, 0xa1, b'v', 0x01]);
    let text = String::from_utf8_lossy(&bytes);
    for key in ["from", "seq", "keepalive"] {
        assert!(text.contains(key), "{key} missing");
    }
    // A part: version 2, eight entries (with `s`), its fields named.
    let bytes = plain()
        .encode(&envelope(Body::Part {
            session: session(),
            part: Part {
                of: Kind::Out,
                index: 3,
                last: true,
                data: vec![7; 10],
            },
        }))
        .unwrap();
    assert_eq!(&bytes[1..5], &[0x88, 0xa1, b'v', 0x02]);
    let text = String::from_utf8_lossy(&bytes);
    for key in ["part", "last", "data"] {
        assert!(text.contains(key), "{key} missing");
    }
}

#[test]
fn kinds_carry_the_version_that_introduced_them() {
    for kind in Kind::ALL {
        let want = match kind {
            Kind::Part => 2,
            Kind::Fan => 3,
            _ => 1,
        };
        assert_eq!(kind.since(), want, "{kind:?}");
        assert!(kind.since() <= SCHEMA_VERSION);
    }
}

#[test]
fn malformed_parts_are_rejected() {
    #[derive(Serialize)]
    struct PartBody<'a> {
        k: &'a str,
        n: u32,
        last: bool,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    }
    let codec = plain();
    // A part of a kind that is never split.
    let bytes = codec.wrap_raw(&raw(
        2,
        "part",
        PartBody {
            k: "open",
            n: 0,
            last: true,
            data: b"x",
        },
    ));
    assert_eq!(
        codec.decode(&bytes).unwrap_err().reason(),
        RejectReason::Malformed
    );
    // A well-formed part body, but without a session (`raw` writes no `s`).
    let bytes = codec.wrap_raw(&raw(
        2,
        "part",
        PartBody {
            k: "out",
            n: 0,
            last: true,
            data: b"x",
        },
    ));
    assert_eq!(
        codec.decode(&bytes).unwrap_err().reason(),
        RejectReason::Malformed
    );
}

#[test]
fn truncated_input_is_an_error_at_every_length() {
    for codec in [plain(), signed()] {
        for body in all_bodies() {
            let bytes = codec.encode(&envelope(body)).unwrap();
            for len in 0..bytes.len() {
                let err = codec.decode(&bytes[..len]).unwrap_err();
                assert!(
                    matches!(err.reason(), RejectReason::Malformed | RejectReason::BadMac),
                    "len {len}: {err:?}"
                );
            }
        }
    }
}

#[test]
fn garbage_never_panics_and_is_rejected() {
    let codec = plain();
    // Deterministic xorshift so failures reproduce.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..20_000 {
        let len = (next() % 200) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && !bytes.is_empty() {
            bytes[0] = FORMAT_PLAIN;
        }
        assert!(codec.decode(&bytes).is_err());
    }
    // Valid msgpack that isn't an envelope.
    for body in [
        &[0xc0][..],
        &[0x90],
        &[0x80],
        &[0xa3, b'a', b'b', b'c'],
        &[0x2a],
    ] {
        let mut bytes = vec![FORMAT_PLAIN];
        bytes.extend_from_slice(body);
        assert_eq!(
            codec.decode(&bytes).unwrap_err().reason(),
            RejectReason::Malformed
        );
    }
    assert_eq!(codec.decode(&[]).unwrap_err(), DecodeError::Truncated);
    assert_eq!(
        codec.decode(&[FORMAT_PLAIN]).unwrap_err(),
        DecodeError::Truncated
    );
    assert_eq!(
        codec.decode(&[0x7f, 1, 2]).unwrap_err(),
        DecodeError::UnknownFormat(0x7f)
    );
}

/// Hand-built envelope map for forward-compatibility tests.
#[derive(Serialize)]
struct RawEnvelope<'a, B: Serialize> {
    v: u8,
    t: &'a str,
    from: NodeAddr,
    to: Option<NodeAddr>,
    seq: u64,
    future_header_field: &'a str,
    b: B,
}

fn raw<B: Serialize>(v: u8, t: &str, b: B) -> Vec<u8> {
    let mut buf = Vec::new();
    let value = RawEnvelope {
        v,
        t,
        from: addr("newer", 1),
        to: Some(addr("me", 2)),
        seq: 99,
        future_header_field: "ignored",
        b,
    };
    value
        .serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())
        .unwrap();
    buf
}

#[test]
fn unknown_kind_keeps_the_header() {
    for codec in [plain(), signed()] {
        let mut body = BTreeMap::new();
        body.insert("anything", vec![1u8, 2, 3]);
        let bytes = codec.wrap_raw(&raw(1, "teleport", body));
        let err = codec.decode(&bytes).unwrap_err();
        assert_eq!(err.reason(), RejectReason::UnknownKind);
        let DecodeError::UnknownKind { kind, header } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(kind, "teleport");
        assert_eq!(header.seq, 99);
        assert_eq!(header.from, addr("newer", 1));
        assert_eq!(err.header().map(|h| h.seq), Some(99));
    }
}

#[test]
fn newer_version_keeps_the_header_and_skips_the_body() {
    let codec = signed();
    // A `frame` of the next version, whose body this build couldn't parse.
    let next = SCHEMA_VERSION + 1;
    let bytes = codec.wrap_raw(&raw(next, "frame", ("totally", "different", 3)));
    let err = codec.decode(&bytes).unwrap_err();
    assert_eq!(err.reason(), RejectReason::UnsupportedVersion);
    let DecodeError::UnsupportedVersion { version, header } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*version, next);
    assert_eq!(header.seq, 99);
    // Version 0 is invalid, not "newer".
    let bytes = codec.wrap_raw(&raw(0, "keepalive", BTreeMap::<String, u8>::new()));
    assert_eq!(
        codec.decode(&bytes).unwrap_err().reason(),
        RejectReason::Malformed
    );
}

#[test]
fn unknown_fields_are_ignored() {
    #[derive(Serialize)]
    struct FutureFrameBody<'a> {
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
        compression: &'a str,
    }
    #[derive(Serialize)]
    struct WithSession<'a> {
        v: u8,
        t: &'a str,
        from: NodeAddr,
        to: Option<NodeAddr>,
        seq: u64,
        s: Session,
        extra: u64,
        b: FutureFrameBody<'a>,
    }
    let s = session();
    let value = WithSession {
        v: 1,
        t: "frame",
        from: addr("a", 1),
        to: None,
        seq: 1,
        s: s.clone(),
        extra: 5,
        b: FutureFrameBody {
            data: b"hi",
            compression: "none",
        },
    };
    let mut buf = Vec::new();
    value
        .serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())
        .unwrap();
    let env = plain().decode(&plain().wrap_raw(&buf)).unwrap();
    assert_eq!(
        env.body,
        Body::Frame {
            session: s,
            data: b"hi".to_vec()
        }
    );
}

#[test]
fn structural_errors_are_malformed() {
    let codec = plain();
    // Session kind without `s`.
    let bytes = codec.wrap_raw(&raw(1, "frame", BTreeMap::from([("data", 1u8)])));
    assert_eq!(
        codec.decode(&bytes).unwrap_err().reason(),
        RejectReason::Malformed
    );
    // rpc_reply claiming success without a payload.
    #[derive(Serialize)]
    struct BadReply {
        id: RequestId,
        ok: bool,
    }
    let bytes = codec.wrap_raw(&raw(
        1,
        "rpc_reply",
        BadReply {
            id: RequestId {
                inc: Incarnation(1),
                n: 1,
            },
            ok: true,
        },
    ));
    assert_eq!(
        codec.decode(&bytes).unwrap_err().reason(),
        RejectReason::Malformed
    );
    // `b` before `t`.
    #[derive(Serialize)]
    struct BodyFirst {
        b: BTreeMap<String, u8>,
        v: u8,
        t: &'static str,
    }
    let mut buf = Vec::new();
    BodyFirst {
        b: BTreeMap::new(),
        v: 1,
        t: "keepalive",
    }
    .serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())
    .unwrap();
    assert_eq!(
        codec.decode(&codec.wrap_raw(&buf)).unwrap_err().reason(),
        RejectReason::Malformed
    );
    // Invalid node id inside `from`.
    #[derive(Serialize)]
    struct BadFrom {
        id: &'static str,
        inc: u64,
    }
    #[derive(Serialize)]
    struct Env {
        v: u8,
        t: &'static str,
        from: BadFrom,
        to: Option<u8>,
        seq: u64,
        b: BTreeMap<String, u8>,
    }
    let mut buf = Vec::new();
    Env {
        v: 1,
        t: "keepalive",
        from: BadFrom { id: "a:b", inc: 1 },
        to: None,
        seq: 1,
        b: BTreeMap::new(),
    }
    .serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())
    .unwrap();
    assert_eq!(
        codec.decode(&codec.wrap_raw(&buf)).unwrap_err().reason(),
        RejectReason::Malformed
    );
}

#[test]
fn huge_declared_lengths_and_deep_nesting_are_rejected_cheaply() {
    let codec = plain();
    // `b` = {"data": bin32 of declared length 4 GiB - 1} with no bytes behind it.
    let mut body = raw(1, "frame", BTreeMap::<String, u8>::new());
    body.pop(); // drop the empty map (0x80)
    body.extend_from_slice(&[
        0x81, 0xa4, b'd', b'a', b't', b'a', 0xc6, 0xff, 0xff, 0xff, 0xff,
    ]);
    let err = codec.decode(&codec.wrap_raw(&body)).unwrap_err();
    assert_eq!(err.reason(), RejectReason::Malformed);
    // Declared array of 4G elements inside an ignored field.
    let mut body = raw(1, "teleport", BTreeMap::<String, u8>::new());
    body.pop();
    body.extend_from_slice(&[0x81, 0xa1, b'x', 0xdd, 0xff, 0xff, 0xff, 0xff]);
    assert_eq!(
        codec.decode(&codec.wrap_raw(&body)).unwrap_err().reason(),
        RejectReason::Malformed
    );
    // 100 000 nested arrays in an unknown kind's body.
    let mut body = raw(1, "teleport", BTreeMap::<String, u8>::new());
    body.pop();
    body.extend(std::iter::repeat_n(0x91, 100_000));
    body.push(0xc0);
    assert_eq!(
        codec.decode(&codec.wrap_raw(&body)).unwrap_err().reason(),
        RejectReason::Malformed
    );
}

#[test]
fn size_cap_applies_both_ways() {
    let codec = Codec::new(Auth::disabled(), 4096);
    let big = envelope(Body::Out {
        session: session(),
        data: vec![0; 5000],
    });
    assert!(matches!(
        codec.encode(&big),
        Err(ProxyError::Oversize { max: 4096, .. })
    ));
    let bytes = plain().encode(&big).unwrap();
    assert!(matches!(
        codec.decode(&bytes),
        Err(DecodeError::Oversize { max: 4096, .. })
    ));
    // Just under the cap is fine.
    let ok = envelope(Body::Out {
        session: session(),
        data: vec![0; 3800],
    });
    assert!(codec.decode(&codec.encode(&ok).unwrap()).is_ok());
}

#[test]
fn hmac_accept_and_reject() {
    let signer = signed();
    let env = envelope(Body::Frame {
        session: session(),
        data: b"update".to_vec(),
    });
    let good = signer.encode(&env).unwrap();
    assert_eq!(signer.decode(&good).unwrap(), env);

    // No MAC at all.
    let unsigned = plain().encode(&env).unwrap();
    assert_eq!(signer.decode(&unsigned).unwrap_err(), DecodeError::Unsigned);

    // Wrong MAC.
    let mut bad_mac = good.clone();
    bad_mac[2] ^= 0x01;
    assert_eq!(signer.decode(&bad_mac).unwrap_err(), DecodeError::BadMac);
    let mut zero_mac = good.clone();
    zero_mac[2..SIGNED_PREFIX_LEN].fill(0);
    assert_eq!(signer.decode(&zero_mac).unwrap_err(), DecodeError::BadMac);

    // Tampered body, at every position.
    for i in SIGNED_PREFIX_LEN..good.len() {
        let mut tampered = good.clone();
        tampered[i] ^= 0x20;
        assert_eq!(
            signer.decode(&tampered).unwrap_err(),
            DecodeError::BadMac,
            "byte {i}"
        );
    }
    // Truncated or extended body.
    assert_eq!(
        signer.decode(&good[..good.len() - 1]).unwrap_err(),
        DecodeError::BadMac
    );
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(signer.decode(&longer).unwrap_err(), DecodeError::BadMac);

    // Wrong key, same key id.
    let other = Codec::new(
        Auth::with_secret(b"Mw4Qx8Rz2Kv6Tb9Ln3Hp7Jc1Gd5Fs0Ya").unwrap(),
        DEFAULT_MAX_ENVELOPE_BYTES,
    );
    assert_eq!(other.decode(&good).unwrap_err(), DecodeError::BadMac);

    // Key id changed in flight (it is covered by the MAC).
    let mut other_id = good.clone();
    other_id[1] = 1;
    assert_eq!(
        signer.decode(&other_id).unwrap_err(),
        DecodeError::UnknownKey(1)
    );
    assert_eq!(
        DecodeError::UnknownKey(1).reason(),
        RejectReason::UnknownKey
    );

    // Without a secret, a signed envelope is accepted (nothing to check it with).
    assert_eq!(plain().decode(&good).unwrap(), env);
}

#[test]
fn key_rotation() {
    let old = Secret::new(b"Xo1Lr5Kd9Qm3Tv7Wb2Hn6Pc4Jg8Fs0Za".as_slice()).unwrap();
    let new = Secret::new(b"Nw3Yq7Bm1Rk5Vx9Tc2Hl6Jd8Pf4Gs0Ee".as_slice()).unwrap();
    let codec = |secrets: Secrets| Codec::new(Auth::new(&secrets), DEFAULT_MAX_ENVELOPE_BYTES);
    // the rolling procedure: old only → old + new as previous → swapped → new only
    let steps = [
        codec(Secrets::new(old.clone())),
        codec(Secrets::new(old.clone()).with_previous(new.clone())),
        codec(Secrets::new(new.clone()).with_previous(old.clone())),
        codec(Secrets::new(new.clone())),
    ];
    let env = envelope(Body::Keepalive { session: None });
    let sent: Vec<Vec<u8>> = steps.iter().map(|c| c.encode(&env).unwrap()).collect();
    for bytes in &sent {
        assert_eq!(bytes[1], crate::auth::KEY_ID);
    }
    // neighbouring steps run side by side during a rolling restart: both ways accepted
    for i in 0..steps.len() - 1 {
        assert_eq!(
            steps[i].decode(&sent[i + 1]).unwrap(),
            env,
            "{i} reads {}",
            i + 1
        );
        assert_eq!(
            steps[i + 1].decode(&sent[i]).unwrap(),
            env,
            "{} reads {i}",
            i + 1
        );
    }
    // the two ends do not
    assert_eq!(steps[3].decode(&sent[0]).unwrap_err(), DecodeError::BadMac);
    assert_eq!(steps[0].decode(&sent[3]).unwrap_err(), DecodeError::BadMac);
    // a key id other than 0 is reserved
    let mut other_id = sent[2].clone();
    other_id[1] = 2;
    assert_eq!(
        steps[2].decode(&other_id).unwrap_err(),
        DecodeError::UnknownKey(2)
    );
}

#[test]
fn reject_reason_labels_are_distinct() {
    let labels: std::collections::HashSet<&str> =
        RejectReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels.len(), RejectReason::ALL.len());
}

// === batches ===

/// Every body that may travel in a batch (all but parts), each as the transport would number it.
fn batchable() -> Vec<Body> {
    all_bodies()
        .into_iter()
        .filter(|b| !matches!(b, Body::Part { .. }))
        .collect()
}

#[test]
fn a_batch_round_trips_with_consecutive_numbers() {
    let from = addr("owner-1", 5);
    let to = addr("edge-2", 6);
    let bodies = batchable();
    for codec in [plain(), signed()] {
        let bytes = codec.encode_batch(&from, Some(&to), 41, &bodies).unwrap();
        let message = codec.decode_message(&bytes).unwrap();
        assert!(message.batch);
        assert_eq!(message.sender_reads, SCHEMA_VERSION);
        assert_eq!(message.envelopes.len(), bodies.len());
        for (i, (got, body)) in message.envelopes.into_iter().zip(&bodies).enumerate() {
            let got = got.unwrap();
            assert_eq!(got.header.seq, 41 + i as u64);
            assert_eq!(got.header.from, from);
            assert_eq!(got.header.to.as_ref(), Some(&to));
            assert_eq!(got.header.version, body.kind().since());
            assert_eq!(&got.body, body);
        }
        // one envelope expected: a batch is refused
        assert_eq!(
            codec.decode(&bytes).unwrap_err().reason(),
            RejectReason::Malformed
        );
    }
}

#[test]
fn a_batch_is_smaller_than_its_envelopes_and_signed_once() {
    let from = addr("owner-1", 5);
    let to = addr("edge-2", 6);
    let codec = signed();
    let bodies: Vec<Body> = (0..20)
        .map(|i| Body::Out {
            session: session(),
            data: vec![i; 30],
        })
        .collect();
    let batch = codec.encode_batch(&from, Some(&to), 1, &bodies).unwrap();
    let singles: usize = bodies
        .iter()
        .map(|b| {
            codec
                .encode(&Envelope {
                    header: Header {
                        version: 1,
                        from: from.clone(),
                        to: Some(to.clone()),
                        seq: 1,
                    },
                    body: b.clone(),
                })
                .unwrap()
                .len()
        })
        .sum();
    assert!(batch.len() * 2 < singles, "{} vs {singles}", batch.len());
    // tampering anywhere in the batch fails its one MAC
    for at in [40, batch.len() / 2, batch.len() - 1] {
        let mut bad = batch.clone();
        bad[at] ^= 1;
        assert!(codec.decode_message(&bad).is_err());
    }
}

#[test]
fn encode_batch_refuses_empty_oversized_and_parts() {
    let from = addr("a", 1);
    let codec = plain();
    assert!(codec.encode_batch(&from, None, 1, &[]).is_err());
    let part = all_bodies()
        .into_iter()
        .find(|b| matches!(b, Body::Part { .. }))
        .unwrap();
    assert!(codec.encode_batch(&from, None, 1, &[part]).is_err());
    let many = vec![Body::Keepalive { session: None }; MAX_BATCH_ITEMS + 1];
    assert!(codec.encode_batch(&from, None, 1, &many).is_err());
    let small = Codec::new(Auth::disabled(), 2048);
    let big = vec![
        Body::Frame {
            session: session(),
            data: vec![1; 1500],
        };
        2
    ];
    assert!(matches!(
        small.encode_batch(&from, None, 1, &big),
        Err(ProxyError::Oversize { .. })
    ));
}

/// A hand-built batch map (`items` as given), for the decoder's error paths.
fn raw_batch<I: Serialize>(v: u8, n: u64, items: I) -> Vec<u8> {
    #[derive(Serialize)]
    struct RawBatch<'a, I> {
        v: u8,
        t: &'a str,
        from: NodeAddr,
        to: Option<NodeAddr>,
        seq: u64,
        n: u64,
        items: I,
    }
    let mut buf = vec![FORMAT_PLAIN];
    RawBatch {
        v,
        t: "batch",
        from: addr("peer", 1),
        to: Some(addr("me", 2)),
        seq: 10,
        n,
        items,
    }
    .serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())
    .unwrap();
    buf
}

#[test]
fn unknown_items_and_newer_batches_keep_their_numbers() {
    let codec = plain();
    let conn = ConnId::generate();
    let out = ("out", (conn, "d", 1i64), serde_bytes::Bytes::new(b"xy"));
    let items = (
        out,
        ("teleport", 1, 2, 3),
        (
            "out",
            (conn, "d", 1i64),
            serde_bytes::Bytes::new(b"z"),
            "future",
        ),
    );
    let message = codec.decode_message(&raw_batch(3, 3, items)).unwrap();
    assert_eq!(message.sender_reads, 2, "no `mv`: a version-2 sender");
    let [a, b, c] = <[_; 3]>::try_from(message.envelopes).unwrap();
    assert_eq!(a.unwrap().header.seq, 10);
    let b = b.unwrap_err();
    assert_eq!(b.reason(), RejectReason::UnknownKind);
    assert_eq!(b.header().map(|h| h.seq), Some(11));
    let c = c.unwrap();
    assert_eq!(c.header.seq, 12);
    assert!(matches!(c.body, Body::Out { ref data, .. } if data == b"z"));

    // a batch of a later version: every number accounted for, nothing decoded
    let next = SCHEMA_VERSION + 1;
    let message = codec
        .decode_message(&raw_batch(next, 4, ("whatever", 1)))
        .unwrap();
    let seqs: Vec<u64> = message
        .envelopes
        .iter()
        .map(|e| {
            let e = e.as_ref().unwrap_err();
            assert_eq!(e.reason(), RejectReason::UnsupportedVersion);
            e.header().unwrap().seq
        })
        .collect();
    assert_eq!(seqs, [10, 11, 12, 13]);
}

#[test]
fn malformed_batches_are_rejected() {
    let codec = plain();
    let conn = ConnId::generate();
    let out = || ("out", (conn, "d", 1i64), serde_bytes::Bytes::new(b"xy"));
    let part = ("part", (conn, "d", 1i64), BTreeMap::from([("k", "out")]));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("count mismatch", raw_batch(3, 2, (out(),))),
        ("zero count", raw_batch(3, 0, ())),
        (
            "count over the cap",
            raw_batch(3, MAX_BATCH_ITEMS as u64 + 1, (out(),)),
        ),
        ("batch before version 3", raw_batch(2, 1, (out(),))),
        ("a part inside", raw_batch(3, 1, (part,))),
        (
            "fan without connections",
            raw_batch(
                3,
                1,
                ((
                    "fan",
                    ("d", 1i64),
                    Vec::<ConnId>::new(),
                    serde_bytes::Bytes::new(b"x"),
                ),),
            ),
        ),
        (
            "item too short",
            raw_batch(3, 1, (("out", (conn, "d", 1i64)),)),
        ),
        ("item not an array", raw_batch(3, 1, ("out",))),
        (
            "session of the wrong shape",
            raw_batch(3, 1, (("out", ("d", 1i64), serde_bytes::Bytes::new(b"x")),)),
        ),
        ("items not an array", raw_batch(3, 1, 7)),
    ];
    for (what, bytes) in cases {
        let err = codec.decode_message(&bytes).unwrap_err();
        assert_eq!(err.reason(), RejectReason::Malformed, "{what}: {err}");
    }
    // `items` before the header fields
    #[derive(Serialize)]
    struct ItemsFirst<I> {
        v: u8,
        t: &'static str,
        items: I,
        from: NodeAddr,
        to: Option<NodeAddr>,
        seq: u64,
        n: u64,
    }
    let mut buf = vec![FORMAT_PLAIN];
    ItemsFirst {
        v: 3,
        t: "batch",
        items: (out(),),
        from: addr("peer", 1),
        to: None,
        seq: 1,
        n: 1,
    }
    .serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())
    .unwrap();
    assert_eq!(
        codec.decode_message(&buf).unwrap_err().reason(),
        RejectReason::Malformed
    );
}

#[test]
fn a_truncated_batch_is_an_error_at_every_length() {
    let codec = signed();
    let bytes = codec
        .encode_batch(&addr("a", 1), Some(&addr("b", 2)), 1, &batchable())
        .unwrap();
    for len in 0..bytes.len() {
        assert!(codec.decode_message(&bytes[..len]).is_err(), "length {len}");
    }
    let plain = plain();
    let bytes = plain
        .encode_batch(&addr("a", 1), Some(&addr("b", 2)), 1, &batchable())
        .unwrap();
    for len in 0..bytes.len() {
        assert!(plain.decode_message(&bytes[..len]).is_err(), "length {len}");
    }
}

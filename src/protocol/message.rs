//! Hocuspocus and y-websocket frames: decoding what clients send, encoding what the server sends.
//!
//! Hocuspocus frame = `varString address` + `varUint type` + body; the only
//! exceptions are the one-byte v4 Ping (`09`) and Pong (`0a`). A y-websocket frame is the same
//! type + body without the address. Bodies are shared, so one encoder serves both.

use bytes::Bytes;

use super::lib0::{DecodeError, Reader, Writer};

/// Message type numbers.
pub mod kind {
    /// Yjs sync sub-protocol.
    pub const SYNC: u64 = 0;
    /// Awareness update.
    pub const AWARENESS: u64 = 1;
    /// Auth (token, permission denied, authenticated).
    pub const AUTH: u64 = 2;
    /// Ask for all awareness states.
    pub const QUERY_AWARENESS: u64 = 3;
    /// Server-internal "sync without step1 reply"; treated as Sync when a client sends it.
    pub const SYNC_REPLY: u64 = 4;
    /// Stateless string message.
    pub const STATELESS: u64 = 5;
    /// Server-internal broadcast; rejected from clients.
    pub const BROADCAST_STATELESS: u64 = 6;
    /// Close one document connection.
    pub const CLOSE: u64 = 7;
    /// Acknowledgement of a step2/update (1 = applied, 0 = rejected).
    pub const SYNC_STATUS: u64 = 8;
}

/// The one-byte v4 Ping frame (server → client).
pub const PING_FRAME: u8 = 0x09;
/// The one-byte v4 Pong frame (client → server).
pub const PONG_FRAME: u8 = 0x0a;

/// A Yjs sync sub-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncMessage {
    /// `00 sv`: the sender's state vector.
    Step1(Bytes),
    /// `01 update`: the reply to a step1.
    Step2(Bytes),
    /// `02 update`: an incremental update.
    Update(Bytes),
}

impl SyncMessage {
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let t = r.read_var_uint()?;
        let payload = r.read_var_bytes()?;
        match t {
            0 => Ok(SyncMessage::Step1(payload)),
            1 => Ok(SyncMessage::Step2(payload)),
            2 => Ok(SyncMessage::Update(payload)),
            other => Err(DecodeError::UnknownType {
                what: "sync",
                value: other,
            }),
        }
    }
}

/// The body of a frame a client sent for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Sync (type 0, or 4 which is handled identically).
    Sync(SyncMessage),
    /// Awareness update bytes (type 1).
    Awareness(Bytes),
    /// Auth token (type 2, sub-type 0), with the v4 provider version if present.
    Auth {
        /// The token (empty when the provider has none).
        token: String,
        /// Provider version (v4 only).
        version: Option<String>,
    },
    /// QueryAwareness (type 3).
    QueryAwareness,
    /// Stateless (type 5).
    Stateless(String),
    /// BroadcastStateless (type 6) — never allowed from clients.
    BroadcastStateless,
    /// CLOSE (type 7): the provider detaches.
    Close,
    /// A type with no meaning from clients (SyncStatus, unknown): ignored.
    Ignored(u64),
}

/// A parsed Hocuspocus frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// The one-byte Pong (or a stray Ping) — connection keepalive.
    Keepalive,
    /// A frame for one address. `body` is `Err` when the header parsed but the body did not
    /// (the document connection is reset, the socket survives).
    Addressed {
        /// The address: document name or `name\0sessionId`.
        address: String,
        /// The message type number.
        kind: u64,
        /// The decoded body.
        body: Result<ClientMessage, DecodeError>,
    },
}

/// Parses one Hocuspocus frame. An `Err` means not even the address and type could be read
/// (the socket is closed with 4401).
pub fn decode_client_frame(frame: Bytes) -> Result<ClientFrame, DecodeError> {
    if frame.len() == 1 && (frame[0] == PONG_FRAME || frame[0] == PING_FRAME) {
        return Ok(ClientFrame::Keepalive);
    }
    let mut r = Reader::new(frame);
    let address = r.read_var_string()?;
    let kind = r.read_var_uint()?;
    let body = decode_body(kind, &mut r);
    Ok(ClientFrame::Addressed {
        address,
        kind,
        body,
    })
}

fn decode_body(kind: u64, r: &mut Reader) -> Result<ClientMessage, DecodeError> {
    Ok(match kind {
        kind::SYNC | kind::SYNC_REPLY => ClientMessage::Sync(SyncMessage::decode(r)?),
        kind::AWARENESS => ClientMessage::Awareness(r.read_var_bytes()?),
        kind::AUTH => {
            let sub = r.read_var_uint()?;
            if sub != 0 {
                return Err(DecodeError::UnknownType {
                    what: "auth",
                    value: sub,
                });
            }
            let token = r.read_var_string()?;
            let version = if r.remaining() > 0 {
                Some(r.read_var_string()?)
            } else {
                None
            };
            ClientMessage::Auth { token, version }
        }
        kind::QUERY_AWARENESS => ClientMessage::QueryAwareness,
        kind::STATELESS => ClientMessage::Stateless(r.read_var_string()?),
        kind::BROADCAST_STATELESS => ClientMessage::BroadcastStateless,
        kind::CLOSE => ClientMessage::Close,
        other => ClientMessage::Ignored(other),
    })
}

/// A parsed y-websocket frame (no address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YwsMessage {
    /// Sync sub-message.
    Sync(SyncMessage),
    /// Awareness update bytes.
    Awareness(Bytes),
    /// QueryAwareness.
    QueryAwareness,
    /// Anything else (Auth from a client, unknown): ignored.
    Ignored(u64),
}

/// Parses one y-websocket frame.
pub fn decode_yws_frame(frame: Bytes) -> Result<YwsMessage, DecodeError> {
    let mut r = Reader::new(frame);
    Ok(match r.read_var_uint()? {
        kind::SYNC => YwsMessage::Sync(SyncMessage::decode(&mut r)?),
        kind::AWARENESS => YwsMessage::Awareness(r.read_var_bytes()?),
        kind::QUERY_AWARENESS => YwsMessage::QueryAwareness,
        other => YwsMessage::Ignored(other),
    })
}

/// A server → client message body (type + fields, without the address). Encode it once and
/// frame it per connection with [`frame`].
#[derive(Debug, Clone, Copy)]
pub enum ServerMessage<'a> {
    /// Sync step1 with the server's state vector.
    SyncStep1(&'a [u8]),
    /// Sync step2 with a diff.
    SyncStep2(&'a [u8]),
    /// An incremental update.
    SyncUpdate(&'a [u8]),
    /// Awareness update bytes.
    Awareness(&'a [u8]),
    /// Hocuspocus token request (`02 00`, no token).
    AuthRequest,
    /// Hocuspocus `PermissionDenied(reason)`.
    PermissionDenied(&'a str),
    /// Hocuspocus `Authenticated(scope)`.
    Authenticated {
        /// True → scope `"readonly"`, else `"read-write"`.
        read_only: bool,
    },
    /// y-websocket permission denied (`02 00 reason`).
    YwsPermissionDenied(&'a str),
    /// QueryAwareness.
    QueryAwareness,
    /// Stateless payload.
    Stateless(&'a str),
    /// CLOSE with a reason.
    Close(&'a str),
    /// SyncStatus.
    SyncStatus(bool),
}

impl ServerMessage<'_> {
    /// Encodes type + body.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + self.payload_len());
        match *self {
            ServerMessage::SyncStep1(p) => sync(&mut b, 0, p),
            ServerMessage::SyncStep2(p) => sync(&mut b, 1, p),
            ServerMessage::SyncUpdate(p) => sync(&mut b, 2, p),
            ServerMessage::Awareness(p) => {
                b.write_var_uint(kind::AWARENESS);
                b.write_var_bytes(p);
            }
            ServerMessage::AuthRequest => {
                b.write_var_uint(kind::AUTH);
                b.write_var_uint(0);
            }
            ServerMessage::PermissionDenied(reason) => {
                b.write_var_uint(kind::AUTH);
                b.write_var_uint(1);
                b.write_var_string(reason);
            }
            ServerMessage::Authenticated { read_only } => {
                b.write_var_uint(kind::AUTH);
                b.write_var_uint(2);
                b.write_var_string(if read_only { "readonly" } else { "read-write" });
            }
            ServerMessage::YwsPermissionDenied(reason) => {
                b.write_var_uint(kind::AUTH);
                b.write_var_uint(0);
                b.write_var_string(reason);
            }
            ServerMessage::QueryAwareness => b.write_var_uint(kind::QUERY_AWARENESS),
            ServerMessage::Stateless(p) => {
                b.write_var_uint(kind::STATELESS);
                b.write_var_string(p);
            }
            ServerMessage::Close(reason) => {
                b.write_var_uint(kind::CLOSE);
                b.write_var_string(reason);
            }
            ServerMessage::SyncStatus(ok) => {
                b.write_var_uint(kind::SYNC_STATUS);
                b.write_var_uint(u64::from(ok));
            }
        }
        b
    }

    fn payload_len(&self) -> usize {
        match self {
            ServerMessage::SyncStep1(p)
            | ServerMessage::SyncStep2(p)
            | ServerMessage::SyncUpdate(p)
            | ServerMessage::Awareness(p) => p.len(),
            ServerMessage::PermissionDenied(s)
            | ServerMessage::YwsPermissionDenied(s)
            | ServerMessage::Stateless(s)
            | ServerMessage::Close(s) => s.len(),
            _ => 0,
        }
    }

    /// Encodes a full frame for `address` (`None` = y-websocket framing).
    pub fn frame(&self, address: Option<&str>) -> Bytes {
        frame(address, &self.encode_body())
    }
}

fn sync(b: &mut Vec<u8>, sub: u64, payload: &[u8]) {
    b.write_var_uint(kind::SYNC);
    b.write_var_uint(sub);
    b.write_var_bytes(payload);
}

/// Prefixes an encoded body with the address (Hocuspocus) or nothing (y-websocket).
pub fn frame(address: Option<&str>, body: &[u8]) -> Bytes {
    match address {
        None => Bytes::copy_from_slice(body),
        Some(a) => {
            let mut out = Vec::with_capacity(a.len() + 5 + body.len());
            out.write_var_string(a);
            out.extend_from_slice(body);
            Bytes::from(out)
        }
    }
}

/// Splits an address into (document name, session id) at the first NUL.
pub fn split_address(address: &str) -> (&str, Option<&str>) {
    match address.split_once('\0') {
        Some((name, session)) => (name, Some(session)),
        None => (address, None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addressed(f: ClientFrame) -> (String, u64, Result<ClientMessage, DecodeError>) {
        match f {
            ClientFrame::Addressed {
                address,
                kind,
                body,
            } => (address, kind, body),
            ClientFrame::Keepalive => panic!("keepalive"),
        }
    }

    #[test]
    fn traced_frames_decode() {
        // "docA" Auth Token "t1" "4.8.0"
        let f = hex("04646f63410200027431053 42e382e30");
        let (a, k, body) = addressed(decode_client_frame(f).unwrap());
        assert_eq!((a.as_str(), k), ("docA", 2));
        assert_eq!(
            body.unwrap(),
            ClientMessage::Auth {
                token: "t1".into(),
                version: Some("4.8.0".into())
            }
        );
        // v3 auth: empty token, no version
        let f = hex("04646f6341 02 00 00");
        let (_, _, body) = addressed(decode_client_frame(f).unwrap());
        assert_eq!(
            body.unwrap(),
            ClientMessage::Auth {
                token: String::new(),
                version: None
            }
        );
        // step1 empty
        let (_, _, body) = addressed(decode_client_frame(hex("04646f6341 00 00 01 00")).unwrap());
        assert_eq!(
            body.unwrap(),
            ClientMessage::Sync(SyncMessage::Step1(Bytes::from_static(&[0])))
        );
        // session address
        let (a, _, _) = addressed(decode_client_frame(hex("0573640073 31 07")).unwrap());
        assert_eq!(split_address(&a), ("sd", Some("s1")));
        assert_eq!(
            decode_client_frame(Bytes::from_static(&[0x0a])).unwrap(),
            ClientFrame::Keepalive
        );
    }

    #[test]
    fn server_frames_match_traces() {
        assert_eq!(
            ServerMessage::Authenticated { read_only: false }.frame(Some("docA")),
            hex("04646f6341 0202 0a 726561642d7772697465")
        );
        assert_eq!(
            ServerMessage::Authenticated { read_only: true }.frame(Some("docB")),
            hex("04646f6342 0202 08 726561646f6e6c79")
        );
        assert_eq!(
            ServerMessage::PermissionDenied("permission-denied")
                .frame(Some("d3"))
                .len(),
            23
        );
        assert_eq!(
            ServerMessage::SyncStep1(&[0]).frame(Some("docA")),
            hex("04646f6341 00 00 01 00")
        );
        assert_eq!(
            ServerMessage::SyncStep2(&[0, 0]).frame(Some("docA")),
            hex("04646f6341 00 01 02 0000")
        );
        assert_eq!(
            ServerMessage::SyncStatus(true).frame(Some("docA")),
            hex("04646f6341 08 01")
        );
        assert_eq!(
            ServerMessage::Stateless("hello").frame(Some("doc1")),
            hex("04646f6331 05 05 68656c6c6f")
        );
        assert_eq!(
            ServerMessage::SyncStep1(&[0]).frame(None),
            hex("00 00 01 00")
        );
    }

    #[test]
    fn every_client_type_round_trips_through_the_encoder() {
        let cases: Vec<(Vec<u8>, ClientMessage)> = vec![
            (
                ServerMessage::SyncStep1(&[1, 2]).encode_body(),
                ClientMessage::Sync(SyncMessage::Step1(Bytes::from_static(&[1, 2]))),
            ),
            (
                ServerMessage::SyncStep2(&[3]).encode_body(),
                ClientMessage::Sync(SyncMessage::Step2(Bytes::from_static(&[3]))),
            ),
            (
                ServerMessage::SyncUpdate(&[4]).encode_body(),
                ClientMessage::Sync(SyncMessage::Update(Bytes::from_static(&[4]))),
            ),
            (
                ServerMessage::Awareness(&[5]).encode_body(),
                ClientMessage::Awareness(Bytes::from_static(&[5])),
            ),
            (
                ServerMessage::QueryAwareness.encode_body(),
                ClientMessage::QueryAwareness,
            ),
            (
                ServerMessage::Stateless("x").encode_body(),
                ClientMessage::Stateless("x".into()),
            ),
            (
                ServerMessage::Close("bye").encode_body(),
                ClientMessage::Close,
            ),
            (
                ServerMessage::SyncStatus(true).encode_body(),
                ClientMessage::Ignored(8),
            ),
        ];
        for (body, want) in cases {
            let (a, _, got) = addressed(decode_client_frame(frame(Some("d"), &body)).unwrap());
            assert_eq!(a, "d");
            assert_eq!(got.unwrap(), want);
        }
        let yws = decode_yws_frame(ServerMessage::SyncUpdate(&[9]).frame(None)).unwrap();
        assert_eq!(
            yws,
            YwsMessage::Sync(SyncMessage::Update(Bytes::from_static(&[9])))
        );
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(decode_client_frame(Bytes::from_static(&[0xff])).is_err());
        assert!(decode_client_frame(Bytes::new()).is_err());
        assert!(decode_client_frame(Bytes::from_static(&[5, b'a'])).is_err());
        // header ok, body truncated -> Addressed with Err body
        let full = ServerMessage::SyncUpdate(&[1, 2, 3, 4]).frame(Some("doc"));
        for cut in 5..full.len() {
            let (_, _, body) = addressed(decode_client_frame(full.slice(..cut)).unwrap());
            assert!(body.is_err(), "cut at {cut}");
        }
        // unknown sync subtype
        let (_, _, body) = addressed(decode_client_frame(hex("0164 00 07 00")).unwrap());
        assert!(matches!(
            body,
            Err(DecodeError::UnknownType {
                what: "sync",
                value: 7
            })
        ));
        assert!(decode_yws_frame(hex("00 05 00")).is_err());
    }

    fn hex(s: &str) -> Bytes {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        Bytes::from(
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect::<Vec<_>>(),
        )
    }
}

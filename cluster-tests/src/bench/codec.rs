//! The client side of the Hocuspocus wire protocol: encoding what a v4
//! provider sends, and the server's answers (decoded by `hearth::protocol::client`) in the
//! flat shape the load generator matches on.
//!
//! Decoding borrows the frame: the address and payloads are zero-copy [`Bytes`] slices, so the
//! hot receive path allocates nothing here.

use bytes::Bytes;
use hearth::protocol::client::{self, ServerMsg};
use hearth::protocol::lib0::{DecodeError, Writer};
use hearth::protocol::message::kind;

/// Provider version sent in Auth (a v4 provider, so the server treats us as one).
pub const PROVIDER_VERSION: &str = "4.8.0";

/// A decoded server → client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// `A 00 00 sv`.
    Step1(Bytes),
    /// `A 00 01 update`.
    Step2(Bytes),
    /// `A 00 02 update`.
    Update(Bytes),
    /// `A 01 awareness`.
    Awareness(Bytes),
    /// `A 02 00`: the server asks for a fresh token.
    AuthRequest,
    /// `A 02 01 reason`.
    PermissionDenied(String),
    /// `A 02 02 scope`.
    Authenticated {
        /// Scope was `"readonly"`.
        read_only: bool,
    },
    /// `A 03`.
    QueryAwareness,
    /// `A 05 payload`.
    Stateless(Bytes),
    /// `A 07 reason`.
    Close(String),
    /// `A 08 0|1`.
    SyncStatus(bool),
    /// The one-byte v4 Ping (`09`), to be answered with Pong (`0a`).
    Ping,
    /// A type the bench does not act on.
    Other(u64),
}

/// Parses one server frame into (address, frame). The address is empty for Ping.
pub fn decode_server_frame(frame: Bytes) -> Result<(Bytes, ServerFrame), DecodeError> {
    let (address, msg) = match client::decode_server_frame(frame)? {
        client::ServerFrame::Ping => return Ok((Bytes::new(), ServerFrame::Ping)),
        client::ServerFrame::Addressed { address, msg } => (address, msg),
    };
    let f = match msg {
        ServerMsg::Step1(b) => ServerFrame::Step1(b),
        ServerMsg::Step2(b) => ServerFrame::Step2(b),
        ServerMsg::Update(b) => ServerFrame::Update(b),
        ServerMsg::Awareness(b) => ServerFrame::Awareness(b),
        ServerMsg::AuthRequest => ServerFrame::AuthRequest,
        ServerMsg::PermissionDenied(r) => ServerFrame::PermissionDenied(r),
        ServerMsg::Authenticated(scope) => ServerFrame::Authenticated {
            read_only: scope == "readonly",
        },
        ServerMsg::QueryAwareness => ServerFrame::QueryAwareness,
        ServerMsg::Stateless(p) => ServerFrame::Stateless(Bytes::from(p)),
        ServerMsg::Close(r) => ServerFrame::Close(r),
        ServerMsg::SyncStatus(ok) => ServerFrame::SyncStatus(ok),
        ServerMsg::Other(t) => ServerFrame::Other(t),
    };
    Ok((address, f))
}

fn start(address: &str, kind: u64, extra: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(address.len() + 8 + extra);
    b.write_var_string(address);
    b.write_var_uint(kind);
    b
}

/// `A 02 00 token version` — what a v4 provider sends first.
pub fn auth(address: &str, token: &str) -> Bytes {
    let mut b = start(address, kind::AUTH, token.len() + 8);
    b.write_var_uint(0);
    b.write_var_string(token);
    b.write_var_string(PROVIDER_VERSION);
    Bytes::from(b)
}

/// `A 00 sub payload` (sub: 0 = step1, 1 = step2, 2 = update).
pub fn sync(address: &str, sub: u64, payload: &[u8]) -> Bytes {
    let mut b = start(address, kind::SYNC, payload.len() + 4);
    b.write_var_uint(sub);
    b.write_var_bytes(payload);
    Bytes::from(b)
}

/// `A 01 [1, client, clock, json]` — one client's awareness state.
pub fn awareness(address: &str, client: u64, clock: u64, json: &str) -> Bytes {
    let mut inner = Vec::with_capacity(json.len() + 16);
    inner.write_var_uint(1);
    inner.write_var_uint(client);
    inner.write_var_uint(clock);
    inner.write_var_string(json);
    let mut b = start(address, kind::AWARENESS, inner.len() + 4);
    b.write_var_bytes(&inner);
    Bytes::from(b)
}

/// `A 07` — the provider detaches.
pub fn close(address: &str) -> Bytes {
    Bytes::from(start(address, kind::CLOSE, 0))
}

/// The one-byte v4 Pong.
pub fn pong() -> Bytes {
    Bytes::from_static(&[0x0a])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hearth::protocol::message::{
        ClientFrame, ClientMessage, ServerMessage, SyncMessage, decode_client_frame,
    };

    #[test]
    fn server_frames_decode() {
        let cases = [
            (
                ServerMessage::SyncStep1(&[0]),
                ServerFrame::Step1(Bytes::from_static(&[0])),
            ),
            (
                ServerMessage::SyncStep2(&[0, 0]),
                ServerFrame::Step2(Bytes::from_static(&[0, 0])),
            ),
            (
                ServerMessage::SyncUpdate(&[1, 2]),
                ServerFrame::Update(Bytes::from_static(&[1, 2])),
            ),
            (
                ServerMessage::Awareness(&[3]),
                ServerFrame::Awareness(Bytes::from_static(&[3])),
            ),
            (ServerMessage::AuthRequest, ServerFrame::AuthRequest),
            (
                ServerMessage::PermissionDenied("nope"),
                ServerFrame::PermissionDenied("nope".into()),
            ),
            (
                ServerMessage::Authenticated { read_only: false },
                ServerFrame::Authenticated { read_only: false },
            ),
            (
                ServerMessage::Authenticated { read_only: true },
                ServerFrame::Authenticated { read_only: true },
            ),
            (ServerMessage::QueryAwareness, ServerFrame::QueryAwareness),
            (
                ServerMessage::Close("provider_initiated"),
                ServerFrame::Close("provider_initiated".into()),
            ),
            (
                ServerMessage::SyncStatus(true),
                ServerFrame::SyncStatus(true),
            ),
            (
                ServerMessage::SyncStatus(false),
                ServerFrame::SyncStatus(false),
            ),
        ];
        for (msg, want) in cases {
            let (addr, got) = decode_server_frame(msg.frame(Some("doc-1"))).unwrap();
            assert_eq!(&addr[..], b"doc-1");
            assert_eq!(got, want);
        }
        assert_eq!(
            decode_server_frame(Bytes::from_static(&[9])).unwrap().1,
            ServerFrame::Ping
        );
        assert!(decode_server_frame(Bytes::from_static(&[0xff])).is_err());
    }

    #[test]
    fn client_frames_are_what_the_server_parses() {
        let parse = |b: Bytes| match decode_client_frame(b).unwrap() {
            ClientFrame::Addressed { address, body, .. } => (address, body.unwrap()),
            ClientFrame::Keepalive => panic!("keepalive"),
        };
        assert_eq!(
            parse(auth("d", "tok")),
            (
                "d".into(),
                ClientMessage::Auth {
                    token: "tok".into(),
                    version: Some(PROVIDER_VERSION.into())
                }
            )
        );
        assert_eq!(
            parse(sync("d", 2, &[7, 7])).1,
            ClientMessage::Sync(SyncMessage::Update(Bytes::from_static(&[7, 7])))
        );
        assert_eq!(parse(close("d")).1, ClientMessage::Close);
        let (_, aw) = parse(awareness("d", 501, 3, "{\"name\":\"alice\"}"));
        let ClientMessage::Awareness(bytes) = aw else {
            panic!("not awareness")
        };
        let entries = hearth::protocol::awareness::decode_update(bytes, 1024).unwrap();
        assert_eq!((entries[0].client, entries[0].clock), (501, 3));
        assert_eq!(decode_client_frame(pong()).unwrap(), ClientFrame::Keepalive);
    }
}

//! The client side of the Hocuspocus protocol: decoding what a server sends to a provider.
//! The server never runs this; tests, the load generator and the document task's unit tests
//! read server frames with it, so there is one decoder of server frames.
//!
//! Decoding borrows the frame: the address and byte payloads are zero-copy [`Bytes`] slices.

use bytes::Bytes;

use super::lib0::{DecodeError, Reader};
use super::message::{PING_FRAME, kind};

/// A decoded server → client message (what follows the address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    /// `00 00 sv`.
    Step1(Bytes),
    /// `00 01 update`.
    Step2(Bytes),
    /// `00 02 update`.
    Update(Bytes),
    /// `01 awareness-update`.
    Awareness(Bytes),
    /// `02 00`: the server asks for the token again.
    AuthRequest,
    /// `02 01 reason`.
    PermissionDenied(String),
    /// `02 02 scope` (`"readonly"` or `"read-write"`).
    Authenticated(String),
    /// `03`.
    QueryAwareness,
    /// `05 payload`.
    Stateless(String),
    /// `07 reason` (the reason may be absent).
    Close(String),
    /// `08 0|1`.
    SyncStatus(bool),
    /// Any other type number (a client must never receive these).
    Other(u64),
}

/// A decoded server → client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// The one-byte v4 Ping.
    Ping,
    /// A frame for one address.
    Addressed {
        /// Document name (or `name\0session`), as sent.
        address: Bytes,
        /// The message.
        msg: ServerMsg,
    },
}

/// Decodes one server → client frame.
pub fn decode_server_frame(frame: Bytes) -> Result<ServerFrame, DecodeError> {
    if frame.len() == 1 && frame[0] == PING_FRAME {
        return Ok(ServerFrame::Ping);
    }
    let mut r = Reader::new(frame);
    let address = r.read_var_bytes()?;
    let msg = match r.read_var_uint()? {
        kind::SYNC | kind::SYNC_REPLY => {
            let sub = r.read_var_uint()?;
            let payload = r.read_var_bytes()?;
            match sub {
                0 => ServerMsg::Step1(payload),
                1 => ServerMsg::Step2(payload),
                2 => ServerMsg::Update(payload),
                other => {
                    return Err(DecodeError::UnknownType {
                        what: "sync",
                        value: other,
                    });
                }
            }
        }
        kind::AWARENESS => ServerMsg::Awareness(r.read_var_bytes()?),
        kind::AUTH => match r.read_var_uint()? {
            0 => ServerMsg::AuthRequest,
            1 => ServerMsg::PermissionDenied(r.read_var_string()?),
            2 => ServerMsg::Authenticated(r.read_var_string()?),
            other => {
                return Err(DecodeError::UnknownType {
                    what: "auth",
                    value: other,
                });
            }
        },
        kind::QUERY_AWARENESS => ServerMsg::QueryAwareness,
        kind::STATELESS => ServerMsg::Stateless(r.read_var_string()?),
        kind::CLOSE => ServerMsg::Close(if r.remaining() > 0 {
            r.read_var_string()?
        } else {
            String::new()
        }),
        kind::SYNC_STATUS => ServerMsg::SyncStatus(r.read_var_uint()? == 1),
        other => ServerMsg::Other(other),
    };
    Ok(ServerFrame::Addressed { address, msg })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::message::ServerMessage;

    fn decoded(m: ServerMessage<'_>) -> ServerMsg {
        match decode_server_frame(m.frame(Some("doc"))).unwrap() {
            ServerFrame::Addressed { address, msg } => {
                assert_eq!(&address[..], b"doc");
                msg
            }
            ServerFrame::Ping => panic!("not a ping"),
        }
    }

    #[test]
    fn every_server_message_round_trips() {
        let b = |s: &[u8]| Bytes::copy_from_slice(s);
        assert_eq!(
            decoded(ServerMessage::SyncStep1(&[1, 2])),
            ServerMsg::Step1(b(&[1, 2]))
        );
        assert_eq!(
            decoded(ServerMessage::SyncStep2(&[3])),
            ServerMsg::Step2(b(&[3]))
        );
        assert_eq!(
            decoded(ServerMessage::SyncUpdate(&[4])),
            ServerMsg::Update(b(&[4]))
        );
        assert_eq!(
            decoded(ServerMessage::Awareness(&[5])),
            ServerMsg::Awareness(b(&[5]))
        );
        assert_eq!(decoded(ServerMessage::AuthRequest), ServerMsg::AuthRequest);
        assert_eq!(
            decoded(ServerMessage::PermissionDenied("no")),
            ServerMsg::PermissionDenied("no".into())
        );
        assert_eq!(
            decoded(ServerMessage::Authenticated { read_only: true }),
            ServerMsg::Authenticated("readonly".into())
        );
        assert_eq!(
            decoded(ServerMessage::QueryAwareness),
            ServerMsg::QueryAwareness
        );
        assert_eq!(
            decoded(ServerMessage::Stateless("s")),
            ServerMsg::Stateless("s".into())
        );
        assert_eq!(
            decoded(ServerMessage::Close("bye")),
            ServerMsg::Close("bye".into())
        );
        assert_eq!(
            decoded(ServerMessage::SyncStatus(true)),
            ServerMsg::SyncStatus(true)
        );
        assert_eq!(
            decoded(ServerMessage::SyncStatus(false)),
            ServerMsg::SyncStatus(false)
        );
        assert_eq!(
            decode_server_frame(Bytes::from_static(&[PING_FRAME])).unwrap(),
            ServerFrame::Ping
        );
    }

    #[test]
    fn truncated_frames_are_errors() {
        let full = ServerMessage::SyncStep2(&[1, 2, 3]).frame(Some("doc"));
        for len in 0..full.len() {
            if len == 1 && full[0] == PING_FRAME {
                continue;
            }
            assert!(decode_server_frame(full.slice(..len)).is_err(), "{len}");
        }
    }
}

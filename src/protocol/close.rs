//! Every way Hearth ends a client's WebSocket: one [`Close`] per situation, owning its close
//! code and reason (the table in docs/security.md, "What a client sees").
//!
//! Codes 4xxx are Hocuspocus's: a provider reconnects after 4205 and 4408 and gives up after
//! 4401 and 4403. Across nodes a close travels as its code and reason (a `close_doc` envelope);
//! [`Close::from_wire`] turns them back into the variant.

use super::awareness::Violation;

/// How and why a socket is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Close {
    /// 1003 "Unsupported Data": a text frame.
    UnsupportedData,
    /// 1008: a per-connection awareness limit was broken; the reason names it.
    Awareness(Violation),
    /// 1008 "Policy Violation": a policy close whose reason this build does not know (one that
    /// travelled from a node running another version).
    PolicyViolation,
    /// 1008 "Rate Limit Exceeded": more messages or bytes a second than the connection may send.
    RateLimited,
    /// 1009 "Message Too Big": a message over `max_message_bytes`.
    MessageTooBig,
    /// 1011 "Load Failed": a y-websocket client's document could not be loaded.
    LoadFailed,
    /// 1012 "Service Restart": a y-websocket client at shutdown.
    ServiceRestart,
    /// 1013 "Slow Reader": the client did not read its messages fast enough.
    SlowReader,
    /// 1013 "Try Again Later": a client of another node sent faster than its frames could
    /// travel to the owner or be handled there (shed).
    TryAgainLater,
    /// 4205 "Reset Connection": reconnect and resync (pre-auth limits, shutdown, a document
    /// reset, a lost frame between nodes).
    ResetConnection,
    /// 4400 "Bad Document Name": a y-websocket client's document name (the URL path) is refused.
    BadDocumentName,
    /// 4401 "Unauthorized": a frame that does not parse as address and type.
    Unauthorized,
    /// 4403 "Forbidden": a y-websocket client's token was refused.
    Forbidden,
    /// 4408 "Connection Timeout": idle, or no document authenticated in time.
    ConnectionTimeout,
}

impl Close {
    /// Every variant (with each awareness violation), for tests and docs.
    pub const ALL: [Close; 15] = [
        Close::UnsupportedData,
        Close::RateLimited,
        Close::Awareness(Violation::TooManyClients),
        Close::Awareness(Violation::Rate),
        Close::PolicyViolation,
        Close::MessageTooBig,
        Close::LoadFailed,
        Close::ServiceRestart,
        Close::SlowReader,
        Close::TryAgainLater,
        Close::ResetConnection,
        Close::BadDocumentName,
        Close::Unauthorized,
        Close::Forbidden,
        Close::ConnectionTimeout,
    ];

    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Close::UnsupportedData => 1003,
            Close::Awareness(_) | Close::PolicyViolation | Close::RateLimited => 1008,
            Close::MessageTooBig => 1009,
            Close::LoadFailed => 1011,
            Close::ServiceRestart => 1012,
            Close::SlowReader | Close::TryAgainLater => 1013,
            Close::ResetConnection => 4205,
            Close::BadDocumentName => 4400,
            Close::Unauthorized => 4401,
            Close::Forbidden => 4403,
            Close::ConnectionTimeout => 4408,
        }
    }

    /// The close reason the client sees.
    pub fn reason(self) -> &'static str {
        match self {
            Close::UnsupportedData => "Unsupported Data",
            Close::Awareness(v) => v.reason(),
            Close::PolicyViolation => "Policy Violation",
            Close::RateLimited => "Rate Limit Exceeded",
            Close::MessageTooBig => "Message Too Big",
            Close::LoadFailed => "Load Failed",
            Close::ServiceRestart => "Service Restart",
            Close::SlowReader => "Slow Reader",
            Close::TryAgainLater => "Try Again Later",
            Close::ResetConnection => "Reset Connection",
            Close::BadDocumentName => "Bad Document Name",
            Close::Unauthorized => "Unauthorized",
            Close::Forbidden => "Forbidden",
            Close::ConnectionTimeout => "Connection Timeout",
        }
    }

    /// The close that a code and reason received from another node stand for. A reason this
    /// build does not know keeps its code's meaning where the code has one; anything else
    /// resets the client (4205), which is always safe: it reconnects and resyncs.
    pub fn from_wire(code: u16, reason: &str) -> Close {
        if let Some(known) = Close::ALL
            .into_iter()
            .find(|c| c.code() == code && c.reason() == reason)
        {
            return known;
        }
        match code {
            1008 => Close::PolicyViolation,
            1009 => Close::MessageTooBig,
            1013 => Close::SlowReader,
            4400 => Close::BadDocumentName,
            4401 => Close::Unauthorized,
            4403 => Close::Forbidden,
            4408 => Close::ConnectionTimeout,
            _ => Close::ResetConnection,
        }
    }
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code(), self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_close_survives_the_trip_between_nodes() {
        for c in Close::ALL {
            assert_eq!(Close::from_wire(c.code(), c.reason()), c, "{c}");
        }
    }

    #[test]
    fn unknown_reasons_keep_the_meaning_of_their_code() {
        assert_eq!(Close::from_wire(1008, "new limit"), Close::PolicyViolation);
        assert_eq!(Close::from_wire(1013, "?"), Close::SlowReader);
        assert_eq!(Close::from_wire(1000, "Normal"), Close::ResetConnection);
        assert_eq!(Close::from_wire(4999, ""), Close::ResetConnection);
    }

    #[test]
    fn the_security_docs_list_every_close() {
        let docs = include_str!("../../docs/security.md");
        for c in Close::ALL {
            let row = format!("| {} | {} |", c.code(), c.reason());
            assert!(docs.contains(&row), "docs/security.md lacks the row {row}");
        }
    }

    #[test]
    fn codes_and_reasons_are_distinct_pairs() {
        let mut seen = std::collections::HashSet::new();
        for c in Close::ALL {
            assert!(seen.insert((c.code(), c.reason())), "{c} twice");
        }
    }
}

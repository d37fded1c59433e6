//! Per-link sequence checking (pure; no IO, no clock).
//!
//! Redis pub/sub is at-most-once: a subscriber that reconnects, or that falls behind its output
//! buffer limit, silently loses messages. Every envelope therefore carries a sequence number per
//! link — (sender incarnation → receiver incarnation) for inboxes, (sender incarnation →
//! broadcast) for the broadcast channel — starting at 1. [`SeqTracker`] tells the receiver
//! whether each envelope is the next one, skips some ([`SeqCheck::Gap`]), or repeats or trails
//! one already passed ([`SeqCheck::Duplicate`], [`SeqCheck::Late`]).
//!
//! A 64-entry window behind the highest number seen tells duplicates from late arrivals.

use std::collections::HashMap;

use crate::ids::NodeAddr;

/// One inbound link as the receiver sees it. (The receiver's own incarnation is implicit: a
/// tracker belongs to one receiving process.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinkId {
    /// The sending process.
    pub from: NodeAddr,
    /// `true` for the sender's broadcast stream, `false` for its stream into our inbox.
    pub broadcast: bool,
}

/// The verdict on one sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next number on the link (or the first one seen on a broadcast link). Deliver.
    InOrder,
    /// Numbers `expected..got` never arrived. Deliver this envelope, and resync every session
    /// that uses the link.
    Gap {
        /// The number that was due.
        expected: u64,
        /// The number that arrived.
        got: u64,
    },
    /// This number was already delivered. Drop the envelope.
    Duplicate {
        /// The repeated number.
        got: u64,
    },
    /// Older than the newest number and not seen before: it arrived after a later one (its gap
    /// was already reported), or it's too old for the window, or it's the invalid number 0.
    /// Drop the envelope.
    Late {
        /// The next number the link expects.
        expected: u64,
        /// The number that arrived.
        got: u64,
    },
}

impl SeqCheck {
    /// Whether the envelope should be delivered.
    pub fn deliver(&self) -> bool {
        matches!(self, SeqCheck::InOrder | SeqCheck::Gap { .. })
    }
}

const WINDOW: u64 = 64;

#[derive(Debug, Clone, Copy)]
struct LinkState {
    /// The next expected number (highest seen + 1).
    next: u64,
    /// Bit `i` set: number `next - 1 - i` was seen.
    window: u64,
}

/// Tracks the sequence numbers of every inbound link of one receiving process.
#[derive(Debug, Default)]
pub struct SeqTracker {
    links: HashMap<LinkId, LinkState>,
}

impl SeqTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        SeqTracker::default()
    }

    /// Records `seq` on `link` and says what to do with its envelope.
    ///
    /// The first number seen on a direct link must be 1 (the sender's stream to this
    /// incarnation starts there; anything higher means the first envelopes were lost). On a
    /// broadcast link the first number seen is accepted as is, since a receiver that starts later
    /// joins the sender's stream in the middle.
    pub fn observe(&mut self, link: &LinkId, seq: u64) -> SeqCheck {
        let Some(state) = self.links.get_mut(link) else {
            if seq == 0 {
                return SeqCheck::Late {
                    expected: 1,
                    got: 0,
                };
            }
            self.links.insert(
                link.clone(),
                LinkState {
                    next: seq.saturating_add(1),
                    window: 1,
                },
            );
            return if link.broadcast || seq == 1 {
                SeqCheck::InOrder
            } else {
                SeqCheck::Gap {
                    expected: 1,
                    got: seq,
                }
            };
        };

        let expected = state.next;
        if seq == expected {
            state.window = (state.window << 1) | 1;
            state.next = seq.saturating_add(1);
            return SeqCheck::InOrder;
        }
        if seq > expected {
            let shift = seq - (expected - 1);
            state.window = if shift >= WINDOW {
                1
            } else {
                (state.window << shift) | 1
            };
            state.next = seq.saturating_add(1);
            return SeqCheck::Gap { expected, got: seq };
        }
        // seq < expected
        if seq == 0 {
            return SeqCheck::Late { expected, got: seq };
        }
        let offset = (expected - 1) - seq;
        if offset >= WINDOW {
            return SeqCheck::Late { expected, got: seq };
        }
        let bit = 1u64 << offset;
        if state.window & bit != 0 {
            SeqCheck::Duplicate { got: seq }
        } else {
            state.window |= bit;
            SeqCheck::Late { expected, got: seq }
        }
    }

    /// Forgets every link from `from` (call when that process is known dead). Returns how many
    /// links were removed.
    pub fn forget_node(&mut self, from: &NodeAddr) -> usize {
        let before = self.links.len();
        self.links.retain(|link, _| &link.from != from);
        before - self.links.len()
    }

    /// Number of tracked links (a gauge).
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether no link is tracked.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::{Incarnation, NodeId};

    fn link(inc: u64, broadcast: bool) -> LinkId {
        LinkId {
            from: NodeAddr::new(NodeId::new("n").unwrap(), Incarnation(inc)),
            broadcast,
        }
    }

    #[test]
    fn in_order_stream() {
        let mut t = SeqTracker::new();
        let l = link(1, false);
        for seq in 1..=1000 {
            assert_eq!(t.observe(&l, seq), SeqCheck::InOrder);
        }
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn gap_is_reported_once_then_stream_continues() {
        let mut t = SeqTracker::new();
        let l = link(1, false);
        assert_eq!(t.observe(&l, 1), SeqCheck::InOrder);
        assert_eq!(t.observe(&l, 2), SeqCheck::InOrder);
        assert_eq!(
            t.observe(&l, 5),
            SeqCheck::Gap {
                expected: 3,
                got: 5
            }
        );
        assert!(t.observe(&l, 5).eq(&SeqCheck::Duplicate { got: 5 }));
        assert_eq!(t.observe(&l, 6), SeqCheck::InOrder);
    }

    #[test]
    fn duplicate_and_late_are_told_apart() {
        let mut t = SeqTracker::new();
        let l = link(1, false);
        assert_eq!(t.observe(&l, 1), SeqCheck::InOrder);
        assert_eq!(
            t.observe(&l, 3),
            SeqCheck::Gap {
                expected: 2,
                got: 3
            }
        );
        // 2 arrives after 3: late (reordered), not a duplicate.
        assert_eq!(
            t.observe(&l, 2),
            SeqCheck::Late {
                expected: 4,
                got: 2
            }
        );
        assert!(!t.observe(&l, 2).deliver());
        assert_eq!(t.observe(&l, 2), SeqCheck::Duplicate { got: 2 });
        assert_eq!(t.observe(&l, 1), SeqCheck::Duplicate { got: 1 });
        assert_eq!(t.observe(&l, 3), SeqCheck::Duplicate { got: 3 });
        assert_eq!(t.observe(&l, 4), SeqCheck::InOrder);
    }

    #[test]
    fn window_limits() {
        let mut t = SeqTracker::new();
        let l = link(1, false);
        for seq in 1..=200 {
            t.observe(&l, seq);
        }
        assert_eq!(t.observe(&l, 200 - 63), SeqCheck::Duplicate { got: 137 });
        assert_eq!(
            t.observe(&l, 200 - 64),
            SeqCheck::Late {
                expected: 201,
                got: 136
            }
        );
        // A jump larger than the window clears it.
        assert_eq!(
            t.observe(&l, 1000),
            SeqCheck::Gap {
                expected: 201,
                got: 1000
            }
        );
        assert_eq!(
            t.observe(&l, 999),
            SeqCheck::Late {
                expected: 1001,
                got: 999
            }
        );
        assert_eq!(t.observe(&l, 1000), SeqCheck::Duplicate { got: 1000 });
    }

    #[test]
    fn first_number_direct_vs_broadcast() {
        let mut t = SeqTracker::new();
        assert_eq!(
            t.observe(&link(1, false), 4),
            SeqCheck::Gap {
                expected: 1,
                got: 4
            }
        );
        assert_eq!(t.observe(&link(1, false), 5), SeqCheck::InOrder);
        assert_eq!(t.observe(&link(1, true), 77), SeqCheck::InOrder);
        assert_eq!(
            t.observe(&link(1, true), 79),
            SeqCheck::Gap {
                expected: 78,
                got: 79
            }
        );
    }

    #[test]
    fn links_are_independent_and_forgettable() {
        let mut t = SeqTracker::new();
        assert_eq!(t.observe(&link(1, false), 1), SeqCheck::InOrder);
        // Same node name, new incarnation: a new link starting at 1.
        assert_eq!(t.observe(&link(2, false), 1), SeqCheck::InOrder);
        assert_eq!(t.observe(&link(1, true), 9), SeqCheck::InOrder);
        assert_eq!(t.len(), 3);
        assert_eq!(t.forget_node(&link(1, false).from), 2);
        assert_eq!(t.len(), 1);
        // After forgetting, the old incarnation's stream would be judged from scratch.
        assert_eq!(t.observe(&link(1, false), 1), SeqCheck::InOrder);
    }

    #[test]
    fn zero_is_never_delivered() {
        let mut t = SeqTracker::new();
        assert!(!t.observe(&link(1, false), 0).deliver());
        assert!(t.is_empty());
        t.observe(&link(1, false), 1);
        assert!(!t.observe(&link(1, false), 0).deliver());
    }
}

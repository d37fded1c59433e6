//! Frames larger than one envelope: split into `part`s by the sender, reassembled by the
//! receiver (pure; no IO, no clock).
//!
//! A `frame` or `out` whose envelope would exceed the size cap travels as consecutive `part`
//! envelopes on the same link (sender incarnation → receiver incarnation), each carrying a
//! piece of the bytes, its index from 0 and a last-piece flag ([`Part`]). Every piece is an
//! ordinary envelope: it has its own sequence number and, with a cluster secret, its own MAC.
//!
//! The receiver keeps one partial frame per (link, connection id) in a [`Reassembler`] and
//! delivers the whole frame, as the original kind, when the last piece arrives. Pub/sub from one
//! publisher on one channel is ordered, and the sequence numbers catch any loss: the transport
//! calls [`Reassembler::drop_link`] on a gap, so a lost piece never yields a frame with a hole in
//! it. A piece that doesn't continue its partial frame (wrong index, kind or session, or no
//! partial frame at all) drops what there is.
//!
//! Bounds ([`ReassemblyLimits`]): the size of one reassembled frame, the number of partial frames
//! at once (the least recently extended one is evicted to make room), and the bytes held by all
//! of them together. Anything dropped is reported as [`Reassembly::Dropped`] with its session and
//! a [`DropReason`], so the caller can reset that session; nothing here panics or grows without
//! bound on hostile input.

use std::collections::HashMap;

use crate::envelope::{Body, Kind, Part, Session};
use crate::ids::{ConnId, NodeAddr};
use crate::seq::LinkId;

/// Default cap on one reassembled frame (64 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;

/// Default cap on partial frames held at once.
pub const DEFAULT_MAX_PARTIALS: usize = 64;

/// How much a receiver holds while reassembling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Largest frame reassembled (and, on the sending side, sent). Default
    /// [`DEFAULT_MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// Most partial frames at once; a new one beyond this evicts the least recently extended
    /// one. Default [`DEFAULT_MAX_PARTIALS`].
    pub max_partials: usize,
    /// Most bytes held by all partial frames together; a piece that would go beyond it drops its
    /// own frame. Default: four times `max_frame_bytes`.
    pub max_buffered_bytes: usize,
}

impl ReassemblyLimits {
    /// Limits for frames of at most `max_frame_bytes`, with the default number of partial frames
    /// and room for four maximal frames at once.
    pub fn new(max_frame_bytes: usize) -> Self {
        ReassemblyLimits {
            max_frame_bytes,
            max_partials: DEFAULT_MAX_PARTIALS,
            max_buffered_bytes: max_frame_bytes.saturating_mul(4),
        }
    }
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

/// Why a partial frame was dropped; use [`DropReason::as_str`] as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The frame grew beyond [`ReassemblyLimits::max_frame_bytes`].
    TooLarge,
    /// All partial frames together would exceed [`ReassemblyLimits::max_buffered_bytes`].
    BufferFull,
    /// Evicted to make room for a newer partial frame ([`ReassemblyLimits::max_partials`]).
    Evicted,
    /// A piece out of order, repeated, without its start, or not matching the frame it
    /// continues (kind or session).
    Sequence,
}

impl DropReason {
    /// Every reason (for pre-registering metric label values).
    pub const ALL: [DropReason; 4] = [
        DropReason::TooLarge,
        DropReason::BufferFull,
        DropReason::Evicted,
        DropReason::Sequence,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::TooLarge => "part_too_large",
            DropReason::BufferFull => "part_buffer_full",
            DropReason::Evicted => "part_evicted",
            DropReason::Sequence => "part_sequence",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Splits `data` (the bytes of a `frame` or `out` for `session`) into `part` bodies of at most
/// `part_len` bytes, in order, the last one flagged.
///
/// `None` when `of` is not [`Kind::Frame`] or [`Kind::Out`], `part_len` is 0, `data` is empty
/// (send it whole) or it would take more than `u32::MAX` pieces.
pub fn split<'a>(
    session: &'a Session,
    of: Kind,
    data: &'a [u8],
    part_len: usize,
) -> Option<impl ExactSizeIterator<Item = Body> + 'a> {
    if !matches!(of, Kind::Frame | Kind::Out) || part_len == 0 || data.is_empty() {
        return None;
    }
    let count = data.len().div_ceil(part_len);
    u32::try_from(count).ok()?;
    Some(data.chunks(part_len).enumerate().map(move |(i, piece)| {
        Body::Part {
            session: session.clone(),
            part: Part {
                of,
                // `count` fits in u32, so every index does.
                index: u32::try_from(i).unwrap_or(u32::MAX),
                last: i + 1 == count,
                data: piece.to_vec(),
            },
        }
    }))
}

/// What one piece did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reassembly {
    /// Stored; the frame is not complete yet.
    Pending,
    /// The last piece: the whole `frame` or `out`.
    Complete(Body),
    /// A partial frame (this piece's, or an evicted one's) was dropped; reset `session`.
    Dropped {
        /// The session whose frame was lost.
        session: Session,
        /// Why.
        reason: DropReason,
    },
}

#[derive(Debug)]
struct Partial {
    session: Session,
    of: Kind,
    next: u32,
    data: Vec<u8>,
    /// [`Reassembler::tick`] when last extended (for eviction).
    touched: u64,
}

/// Partial frames of one receiving process, per (inbound link, connection id).
#[derive(Debug, Default)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    partials: HashMap<(LinkId, ConnId), Partial>,
    buffered: usize,
    tick: u64,
}

impl Reassembler {
    /// An empty reassembler with these limits.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits,
            ..Reassembler::default()
        }
    }

    /// The limits.
    pub fn limits(&self) -> &ReassemblyLimits {
        &self.limits
    }

    /// Partial frames held (a gauge).
    pub fn len(&self) -> usize {
        self.partials.len()
    }

    /// Whether no partial frame is held.
    pub fn is_empty(&self) -> bool {
        self.partials.is_empty()
    }

    /// Bytes held by all partial frames (a gauge).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Takes one piece that arrived on `link` (in sequence: the caller has already dropped
    /// duplicates and late envelopes, and called [`Reassembler::drop_link`] on a gap).
    pub fn push(&mut self, link: &LinkId, session: Session, part: Part) -> Reassembly {
        self.tick += 1;
        let key = (link.clone(), session.conn);
        let dropped = |session, reason| Reassembly::Dropped { session, reason };
        if !matches!(part.of, Kind::Frame | Kind::Out) {
            return match self.remove(&key) {
                Some(p) => dropped(p.session, DropReason::Sequence),
                None => dropped(session, DropReason::Sequence),
            };
        }
        if part.index == 0 {
            if let Some(stale) = self.remove(&key) {
                // A new frame while one is unfinished: the rest of that one was lost.
                return dropped(stale.session, DropReason::Sequence);
            }
            if part.data.len() > self.limits.max_frame_bytes {
                return dropped(session, DropReason::TooLarge);
            }
            if part.last {
                return Reassembly::Complete(whole(session, part.of, part.data));
            }
            if self.buffered.saturating_add(part.data.len()) > self.limits.max_buffered_bytes {
                return dropped(session, DropReason::BufferFull);
            }
            let evicted = if self.partials.len() >= self.limits.max_partials {
                self.evict_oldest()
            } else {
                None
            };
            self.buffered += part.data.len();
            self.partials.insert(
                key,
                Partial {
                    session,
                    of: part.of,
                    next: 1,
                    data: part.data,
                    touched: self.tick,
                },
            );
            return match evicted {
                Some(old) => dropped(old.session, DropReason::Evicted),
                None => Reassembly::Pending,
            };
        }
        let Some(partial) = self.partials.get_mut(&key) else {
            // No start: it was lost (gap), evicted or dropped before.
            return dropped(session, DropReason::Sequence);
        };
        if part.index != partial.next || part.of != partial.of || session != partial.session {
            return match self.remove(&key) {
                Some(p) => dropped(p.session, DropReason::Sequence),
                None => dropped(session, DropReason::Sequence),
            };
        }
        let len = part.data.len();
        let reason = if partial.data.len().saturating_add(len) > self.limits.max_frame_bytes {
            Some(DropReason::TooLarge)
        } else if self.buffered.saturating_add(len) > self.limits.max_buffered_bytes {
            Some(DropReason::BufferFull)
        } else {
            None
        };
        if let Some(reason) = reason {
            return match self.remove(&key) {
                Some(p) => dropped(p.session, reason),
                None => dropped(session, reason),
            };
        }
        partial.data.extend_from_slice(&part.data);
        partial.next = partial.next.saturating_add(1);
        partial.touched = self.tick;
        self.buffered += len;
        if !part.last {
            return Reassembly::Pending;
        }
        match self.remove(&key) {
            Some(p) => Reassembly::Complete(whole(p.session, p.of, p.data)),
            None => Reassembly::Pending,
        }
    }

    /// Drops every partial frame on `link` (it lost envelopes); returns how many. Their sessions
    /// are not reported: the caller resets every session of a link with a gap anyway.
    pub fn drop_link(&mut self, link: &LinkId) -> usize {
        self.drop_where(|l| l == link)
    }

    /// Drops every partial frame sent by `node` (that incarnation is gone for good); returns how
    /// many.
    pub fn forget_node(&mut self, node: &NodeAddr) -> usize {
        self.drop_where(|l| &l.from == node)
    }

    /// Drops everything (the subscriber lagged or reconnected: every link may have lost
    /// envelopes).
    pub fn clear(&mut self) -> usize {
        let n = self.partials.len();
        self.partials.clear();
        self.buffered = 0;
        n
    }

    fn drop_where(&mut self, pred: impl Fn(&LinkId) -> bool) -> usize {
        let before = self.partials.len();
        let mut freed = 0;
        self.partials.retain(|(link, _), p| {
            let keep = !pred(link);
            if !keep {
                freed += p.data.len();
            }
            keep
        });
        self.buffered -= freed.min(self.buffered);
        before - self.partials.len()
    }

    fn remove(&mut self, key: &(LinkId, ConnId)) -> Option<Partial> {
        let p = self.partials.remove(key)?;
        self.buffered -= p.data.len().min(self.buffered);
        Some(p)
    }

    fn evict_oldest(&mut self) -> Option<Partial> {
        let key = self
            .partials
            .iter()
            .min_by_key(|(_, p)| p.touched)
            .map(|(k, _)| k.clone())?;
        self.remove(&key)
    }
}

fn whole(session: Session, of: Kind, data: Vec<u8>) -> Body {
    match of {
        Kind::Out => Body::Out { session, data },
        _ => Body::Frame { session, data },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::{Incarnation, NodeId};

    fn addr(name: &str, inc: u64) -> NodeAddr {
        NodeAddr::new(NodeId::new(name).unwrap(), Incarnation(inc))
    }

    fn link(name: &str) -> LinkId {
        LinkId {
            from: addr(name, 1),
            broadcast: false,
        }
    }

    fn session(doc: &str) -> Session {
        Session {
            conn: ConnId::generate(),
            doc: doc.into(),
            epoch: 3,
        }
    }

    fn data(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ salt).collect()
    }

    fn parts(s: &Session, of: Kind, bytes: &[u8], part_len: usize) -> Vec<(Session, Part)> {
        split(s, of, bytes, part_len)
            .unwrap()
            .map(|b| match b {
                Body::Part { session, part } => (session, part),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn limits(max_frame: usize, partials: usize, buffered: usize) -> ReassemblyLimits {
        ReassemblyLimits {
            max_frame_bytes: max_frame,
            max_partials: partials,
            max_buffered_bytes: buffered,
        }
    }

    #[test]
    fn split_numbers_pieces_and_flags_the_last() {
        let s = session("d");
        let bytes = data(10, 0);
        let p = parts(&s, Kind::Out, &bytes, 4);
        let shape: Vec<(u32, bool, usize)> = p
            .iter()
            .map(|(_, p)| (p.index, p.last, p.data.len()))
            .collect();
        assert_eq!(shape, [(0, false, 4), (1, false, 4), (2, true, 2)]);
        assert!(p.iter().all(|(ps, p)| ps == &s && p.of == Kind::Out));
        // Exact multiple: no empty trailing piece.
        let p = parts(&s, Kind::Frame, &bytes, 5);
        assert_eq!(p.len(), 2);
        assert!(p[1].1.last && p[1].1.data.len() == 5);
        // Refusals.
        assert!(split(&s, Kind::Open, &bytes, 4).is_none());
        assert!(split(&s, Kind::Out, &bytes, 0).is_none());
        assert!(split(&s, Kind::Out, &[], 4).is_none());
    }

    #[test]
    fn split_then_reassemble_round_trips_both_kinds() {
        for (of, len, part_len) in [
            (Kind::Out, 1, 1),
            (Kind::Out, 1000, 7),
            (Kind::Frame, 4096, 1024),
            (Kind::Frame, 5000, 4999),
        ] {
            let s = session("doc");
            let bytes = data(len, 9);
            let mut r = Reassembler::new(ReassemblyLimits::new(1 << 20));
            let l = link("owner");
            let mut done = None;
            for (ps, p) in parts(&s, of, &bytes, part_len) {
                assert!(done.is_none(), "a piece after completion");
                match r.push(&l, ps, p) {
                    Reassembly::Pending => {}
                    Reassembly::Complete(body) => done = Some(body),
                    other => panic!("{other:?}"),
                }
            }
            let want = whole(s, of, bytes);
            assert_eq!(done, Some(want));
            assert!(r.is_empty());
            assert_eq!(r.buffered_bytes(), 0);
        }
    }

    #[test]
    fn interleaved_sessions_and_links_reassemble_independently() {
        let mut r = Reassembler::new(ReassemblyLimits::new(1 << 20));
        let (la, lb) = (link("a"), link("b"));
        let (s1, s2) = (session("one"), session("two"));
        // Same connection id on two links must not mix either.
        let s3 = Session {
            doc: "three".into(),
            ..s1.clone()
        };
        let (d1, d2, d3) = (data(300, 1), data(250, 2), data(120, 3));
        let streams = [
            (la.clone(), parts(&s1, Kind::Out, &d1, 64)),
            (la.clone(), parts(&s2, Kind::Out, &d2, 64)),
            (lb.clone(), parts(&s3, Kind::Frame, &d3, 64)),
        ];
        let longest = streams.iter().map(|(_, p)| p.len()).max().unwrap();
        let mut complete = Vec::new();
        for i in 0..longest {
            for (l, stream) in &streams {
                if let Some((ps, p)) = stream.get(i) {
                    match r.push(l, ps.clone(), p.clone()) {
                        Reassembly::Pending => {}
                        Reassembly::Complete(body) => complete.push(body),
                        other => panic!("{other:?}"),
                    }
                }
            }
            if i == 0 {
                assert_eq!(r.len(), 3);
            }
        }
        assert_eq!(
            complete,
            vec![
                whole(s3, Kind::Frame, d3),
                whole(s2, Kind::Out, d2),
                whole(s1, Kind::Out, d1),
            ]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn a_gap_mid_frame_discards_the_partial_and_its_tail() {
        let mut r = Reassembler::new(ReassemblyLimits::new(1 << 20));
        let (la, lb) = (link("a"), link("b"));
        let s = session("d");
        let other = session("e");
        let p = parts(&s, Kind::Out, &data(400, 0), 100);
        let q = parts(&other, Kind::Out, &data(200, 0), 100);
        assert_eq!(
            r.push(&la, p[0].0.clone(), p[0].1.clone()),
            Reassembly::Pending
        );
        assert_eq!(
            r.push(&lb, q[0].0.clone(), q[0].1.clone()),
            Reassembly::Pending
        );
        assert_eq!(r.buffered_bytes(), 200);
        // Piece 1 is lost: the transport sees the gap and drops link a's partial frames only.
        assert_eq!(r.drop_link(&la), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.buffered_bytes(), 100);
        // The rest of that frame never completes into something with a hole in it.
        for (ps, pp) in &p[2..] {
            assert_eq!(
                r.push(&la, ps.clone(), pp.clone()),
                Reassembly::Dropped {
                    session: s.clone(),
                    reason: DropReason::Sequence
                }
            );
        }
        // Link b is untouched.
        assert!(matches!(
            r.push(&lb, q[1].0.clone(), q[1].1.clone()),
            Reassembly::Complete(_)
        ));
        assert!(r.is_empty());
    }

    #[test]
    fn out_of_order_repeated_or_mismatched_pieces_drop_the_frame() {
        let l = link("a");
        let s = session("d");
        let p = parts(&s, Kind::Out, &data(400, 0), 100);
        let drop_of = |s: &Session| Reassembly::Dropped {
            session: s.clone(),
            reason: DropReason::Sequence,
        };
        // Skipped index.
        let mut r = Reassembler::new(ReassemblyLimits::new(1 << 20));
        r.push(&l, s.clone(), p[0].1.clone());
        assert_eq!(r.push(&l, s.clone(), p[2].1.clone()), drop_of(&s));
        assert!(r.is_empty());
        // Repeated index.
        r.push(&l, s.clone(), p[0].1.clone());
        r.push(&l, s.clone(), p[1].1.clone());
        assert_eq!(r.push(&l, s.clone(), p[1].1.clone()), drop_of(&s));
        // A new start while a frame is unfinished.
        r.push(&l, s.clone(), p[0].1.clone());
        assert_eq!(r.push(&l, s.clone(), p[0].1.clone()), drop_of(&s));
        assert!(r.is_empty());
        // Same connection, other kind or other document.
        r.push(&l, s.clone(), p[0].1.clone());
        let mut as_frame = p[1].1.clone();
        as_frame.of = Kind::Frame;
        assert_eq!(r.push(&l, s.clone(), as_frame), drop_of(&s));
        r.push(&l, s.clone(), p[0].1.clone());
        let moved = Session {
            doc: "elsewhere".into(),
            ..s.clone()
        };
        assert_eq!(r.push(&l, moved, p[1].1.clone()), drop_of(&s));
        // A part of a kind that is never split.
        let mut odd = p[0].1.clone();
        odd.of = Kind::Detach;
        assert_eq!(r.push(&l, s.clone(), odd), drop_of(&s));
        assert!(r.is_empty());
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn a_frame_beyond_the_size_cap_is_dropped() {
        let l = link("a");
        let s = session("d");
        let mut r = Reassembler::new(limits(250, 8, 10_000));
        let p = parts(&s, Kind::Out, &data(400, 0), 100);
        assert_eq!(r.push(&l, s.clone(), p[0].1.clone()), Reassembly::Pending);
        assert_eq!(r.push(&l, s.clone(), p[1].1.clone()), Reassembly::Pending);
        assert_eq!(
            r.push(&l, s.clone(), p[2].1.clone()),
            Reassembly::Dropped {
                session: s.clone(),
                reason: DropReason::TooLarge
            }
        );
        assert!(r.is_empty());
        assert_eq!(r.buffered_bytes(), 0);
        // The tail is then out of sequence, never a frame.
        assert!(matches!(
            r.push(&l, s.clone(), p[3].1.clone()),
            Reassembly::Dropped {
                reason: DropReason::Sequence,
                ..
            }
        ));
        // A single oversized first piece.
        let big = parts(&s, Kind::Out, &data(400, 0), 400);
        assert_eq!(
            r.push(&l, s.clone(), big[0].1.clone()),
            Reassembly::Dropped {
                session: s,
                reason: DropReason::TooLarge
            }
        );
    }

    #[test]
    fn the_number_of_partials_is_bounded_by_evicting_the_stalest() {
        let mut r = Reassembler::new(limits(1000, 2, 10_000));
        let l = link("a");
        let (s1, s2, s3) = (session("1"), session("2"), session("3"));
        let p1 = parts(&s1, Kind::Out, &data(300, 0), 100);
        let p2 = parts(&s2, Kind::Out, &data(300, 0), 100);
        let p3 = parts(&s3, Kind::Out, &data(300, 0), 100);
        r.push(&l, s1.clone(), p1[0].1.clone());
        r.push(&l, s2.clone(), p2[0].1.clone());
        // s1 progresses, so s2 is now the least recently extended.
        r.push(&l, s1.clone(), p1[1].1.clone());
        assert_eq!(
            r.push(&l, s3.clone(), p3[0].1.clone()),
            Reassembly::Dropped {
                session: s2,
                reason: DropReason::Evicted
            }
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r.buffered_bytes(), 300);
        assert!(matches!(
            r.push(&l, s1, p1[2].1.clone()),
            Reassembly::Complete(_)
        ));
        assert_eq!(r.push(&l, s3.clone(), p3[1].1.clone()), Reassembly::Pending);
        assert!(matches!(
            r.push(&l, s3, p3[2].1.clone()),
            Reassembly::Complete(_)
        ));
        assert!(r.is_empty());
    }

    #[test]
    fn the_bytes_held_by_all_partials_are_bounded() {
        let mut r = Reassembler::new(limits(1000, 8, 450));
        let l = link("a");
        let (s1, s2) = (session("1"), session("2"));
        let p1 = parts(&s1, Kind::Out, &data(600, 0), 200);
        let p2 = parts(&s2, Kind::Out, &data(600, 0), 200);
        r.push(&l, s1.clone(), p1[0].1.clone());
        r.push(&l, s1.clone(), p1[1].1.clone());
        // 400 held; another 200 would exceed 450: the frame that asks is dropped.
        assert_eq!(
            r.push(&l, s2.clone(), p2[0].1.clone()),
            Reassembly::Dropped {
                session: s2,
                reason: DropReason::BufferFull
            }
        );
        assert_eq!(
            r.push(&l, s1.clone(), p1[2].1.clone()),
            Reassembly::Dropped {
                session: s1,
                reason: DropReason::BufferFull
            }
        );
        assert!(r.is_empty());
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn forget_node_and_clear_release_everything() {
        let mut r = Reassembler::new(ReassemblyLimits::new(1 << 20));
        let (la, lb) = (link("a"), link("b"));
        let s = session("d");
        let p = parts(&s, Kind::Out, &data(300, 0), 100);
        r.push(&la, s.clone(), p[0].1.clone());
        r.push(&lb, s.clone(), p[0].1.clone());
        assert_eq!(r.forget_node(&addr("a", 2)), 0, "another incarnation");
        assert_eq!(r.forget_node(&addr("a", 1)), 1);
        assert_eq!(r.buffered_bytes(), 100);
        assert_eq!(r.clear(), 1);
        assert!(r.is_empty());
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn drop_reason_labels_are_distinct() {
        let mut labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}

//! HMAC-SHA256 envelope authentication with the cluster secret, and the strength policy every
//! cluster secret must meet.
//!
//! # Secrets
//!
//! A [`Secret`] is only built from bytes that pass the policy ([`Secret::new`]):
//!
//! * at least [`MIN_SECRET_LEN`] (32) bytes: 256 bits if random, the HMAC-SHA256 key size;
//! * not a placeholder: printable text whose letters (case-insensitive, ignoring digits,
//!   punctuation and spaces) consist only of words such as `change`, `me`, `secret`,
//!   `password`, `hearth`, `example`, `test` is refused, so `change-me-1234567890123456789012`
//!   or `Hearth_Secret_2024!!!!!!!!!!!!!!!` never authenticate a cluster;
//! * enough variety: at least [`MIN_DISTINCT_BYTES`] distinct bytes, and not a short pattern
//!   repeated (`abcabcabc…`).
//!
//! `openssl rand -base64 48` (or `-hex 32`) always passes.
//!
//! # Rotation without downtime
//!
//! [`Secrets`] holds the `current` secret and an optional `previous` one. Envelopes are signed
//! with `current`; a received envelope is accepted when its MAC verifies under `current` or,
//! failing that, under `previous`. So two nodes configured with the same pair in either order
//! accept each other's envelopes, and a secret is replaced with three rolling restarts: add the
//! new secret as `previous` everywhere; then swap (new `current`, old `previous`); then drop
//! `previous`. At every moment of each step every node accepts what every other node signs.
//!
//! The key-id byte on the wire is always [`KEY_ID`]: which secret signed an envelope is found by
//! checking at most two MACs, each in constant time. Other key ids are reserved and rejected as
//! [`DecodeError::UnknownKey`].

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::codec::DecodeError;

type HmacSha256 = Hmac<Sha256>;

/// Length of the MAC on the wire, in bytes.
pub const MAC_LEN: usize = 32;

/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// Fewest distinct bytes an accepted secret contains.
pub const MIN_DISTINCT_BYTES: usize = 10;

/// The key id written in front of every MAC.
pub const KEY_ID: u8 = 0;

/// Words that placeholder secrets are made of (lower case, letters only).
const PLACEHOLDER_WORDS: &[&str] = &[
    "a",
    "abc",
    "admin",
    "auth",
    "bar",
    "baz",
    "change",
    "changeit",
    "changeme",
    "cluster",
    "current",
    "default",
    "demo",
    "dev",
    "development",
    "do",
    "dummy",
    "enter",
    "example",
    "fixme",
    "foo",
    "for",
    "generate",
    "hearth",
    "here",
    "hmac",
    "hocuspocus",
    "in",
    "insecure",
    "is",
    "it",
    "key",
    "letmein",
    "local",
    "localhost",
    "long",
    "me",
    "my",
    "new",
    "not",
    "of",
    "old",
    "only",
    "our",
    "pass",
    "passwd",
    "password",
    "placeholder",
    "please",
    "previous",
    "prod",
    "production",
    "put",
    "qwerty",
    "random",
    "redis",
    "replace",
    "root",
    "sample",
    "secret",
    "secrets",
    "set",
    "shared",
    "some",
    "staging",
    "string",
    "super",
    "test",
    "testing",
    "the",
    "this",
    "to",
    "todo",
    "token",
    "unsafe",
    "use",
    "value",
    "very",
    "with",
    "xxx",
    "your",
];

/// Why a secret was refused by [`Secret::new`]. The messages never quote the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeakSecret {
    /// No bytes at all.
    #[error("is empty")]
    Empty,
    /// Shorter than [`MIN_SECRET_LEN`].
    #[error("is {len} bytes long, at least {min} are required")]
    TooShort {
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// Made of placeholder words (`change-me`, `secret`, `password`, …), digits and punctuation.
    #[error(
        "is a placeholder (only words such as change-me, secret, password, hearth, example, test, \
         plus digits and punctuation)"
    )]
    Placeholder,
    /// Fewer than [`MIN_DISTINCT_BYTES`] distinct bytes.
    #[error("has only {distinct} distinct characters, at least {min} are required")]
    LowVariety {
        /// Distinct bytes found.
        distinct: usize,
        /// The minimum.
        min: usize,
    },
    /// A short pattern repeated over the whole secret.
    #[error("repeats a pattern of {period} characters")]
    Repetitive {
        /// Length of the repeated pattern.
        period: usize,
    },
}

/// A cluster secret that passed the strength policy (module docs). Its `Debug` output never
/// shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Checks `bytes` against the strength policy.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, WeakSecret> {
        let bytes: Vec<u8> = bytes.into();
        check_strength(&bytes)?;
        Ok(Secret(bytes.into_boxed_slice()))
    }

    /// The secret's bytes (to key a MAC).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// A public, non-reversible name for this secret: the first [`FINGERPRINT_LEN`] bytes of
    /// HMAC-SHA256 keyed with the secret over the fixed label [`FINGERPRINT_LABEL`], in hex.
    /// Processes compare fingerprints to tell whether they share a secret without revealing it.
    ///
    /// Why publishing it is safe: it is a MAC over a public message, exactly like the MAC every
    /// signed envelope already carries over its (public) body, so anyone who can read the
    /// cluster's Redis learns nothing from it that the envelopes did not already give away.
    /// Recovering the secret from it means searching the secret space; every accepted secret
    /// has at least 32 bytes and passes the strength policy (no placeholder, no short pattern),
    /// which puts that search out of reach. The label is used for nothing else, so the
    /// fingerprint can never be replayed as an envelope MAC, and truncation to 64 bits only
    /// leaves a 2^-64 chance that two different secrets look alike.
    pub fn fingerprint(&self) -> String {
        let mut mac = Key::new(&self.0).0;
        mac.update(FINGERPRINT_LABEL);
        mac.finalize().into_bytes()[..FINGERPRINT_LEN]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The message [`Secret::fingerprint`] authenticates.
pub const FINGERPRINT_LABEL: &[u8] = b"hearth cluster secret fingerprint v1";

/// Bytes of the MAC kept in a [`Secret::fingerprint`] (shown as twice as many hex digits).
pub const FINGERPRINT_LEN: usize = 8;

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted, {} bytes>)", self.0.len())
    }
}

/// The secrets of one process: `current` signs and verifies; `previous`, during a rotation,
/// only verifies (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets {
    /// Signs every envelope; checked first.
    pub current: Secret,
    /// Also accepted while a rotation is under way.
    pub previous: Option<Secret>,
}

impl Secrets {
    /// Only `current`, no rotation under way.
    pub fn new(current: Secret) -> Self {
        Secrets {
            current,
            previous: None,
        }
    }

    /// Also accepts `previous` (ignored when it equals `current`).
    pub fn with_previous(mut self, previous: Secret) -> Self {
        self.previous = (previous != self.current).then_some(previous);
        self
    }

    /// Whether envelopes go through both ways between a process with these secrets and one
    /// whose secrets have the fingerprints `theirs` (current, previous): each signs with a
    /// secret the other accepts.
    pub fn accepted_by(&self, theirs: (&str, Option<&str>)) -> bool {
        let mine = (
            self.current.fingerprint(),
            self.previous.as_ref().map(Secret::fingerprint),
        );
        let they_accept_mine = theirs.0 == mine.0 || theirs.1 == Some(mine.0.as_str());
        let i_accept_theirs = theirs.0 == mine.0 || mine.1.as_deref() == Some(theirs.0);
        they_accept_mine && i_accept_theirs
    }
}

fn check_strength(bytes: &[u8]) -> Result<(), WeakSecret> {
    check_secret(bytes, MIN_SECRET_LEN)
}

/// Checks `bytes` against the strength policy with `min_len` as the shortest accepted length
/// instead of [`MIN_SECRET_LEN`]: empty, too short, too few distinct bytes, a placeholder (module
/// docs), a short pattern repeated. For other secrets than the cluster's (bearer tokens, webhook
/// signing keys) that have a length rule of their own; [`Secret::new`] is this with
/// [`MIN_SECRET_LEN`].
pub fn check_secret(bytes: &[u8], min_len: usize) -> Result<(), WeakSecret> {
    if bytes.is_empty() {
        return Err(WeakSecret::Empty);
    }
    if bytes.len() < min_len {
        return Err(WeakSecret::TooShort {
            len: bytes.len(),
            min: min_len,
        });
    }
    let mut seen = [false; 256];
    for &b in bytes {
        seen[usize::from(b)] = true;
    }
    let distinct = seen.iter().filter(|s| **s).count();
    if distinct < MIN_DISTINCT_BYTES {
        return Err(WeakSecret::LowVariety {
            distinct,
            min: MIN_DISTINCT_BYTES,
        });
    }
    if is_placeholder(bytes) {
        return Err(WeakSecret::Placeholder);
    }
    let period = shortest_period(bytes);
    if period * 2 <= bytes.len() {
        return Err(WeakSecret::Repetitive { period });
    }
    Ok(())
}

/// True for typed text (printable ASCII) whose letters are only placeholder words.
fn is_placeholder(bytes: &[u8]) -> bool {
    if !bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return false; // random binary, not a typed placeholder
    }
    let stem: Vec<u8> = bytes
        .iter()
        .filter(|b| b.is_ascii_alphabetic())
        .map(u8::to_ascii_lowercase)
        .collect();
    if stem.is_empty() {
        return false; // digits and punctuation only: the variety checks judge it
    }
    // can[i]: stem[..i] splits into placeholder words
    let mut can = vec![false; stem.len() + 1];
    can[0] = true;
    for end in 1..=stem.len() {
        can[end] = PLACEHOLDER_WORDS.iter().any(|w| {
            let w = w.as_bytes();
            w.len() <= end && can[end - w.len()] && &stem[end - w.len()..end] == w
        });
    }
    can[stem.len()]
}

/// Length of the shortest `p` with `bytes[i] == bytes[i - p]` for every `i >= p` (the whole
/// length when nothing repeats), from the prefix function.
fn shortest_period(bytes: &[u8]) -> usize {
    let mut border = vec![0usize; bytes.len()];
    for i in 1..bytes.len() {
        let mut k = border[i - 1];
        while k > 0 && bytes[i] != bytes[k] {
            k = border[k - 1];
        }
        if bytes[i] == bytes[k] {
            k += 1;
        }
        border[i] = k;
    }
    bytes.len() - border.last().copied().unwrap_or(0)
}

/// HMAC state already keyed with one secret; cloned per message so the key schedule is not
/// recomputed.
#[derive(Clone)]
struct Key(HmacSha256);

impl Key {
    fn new(secret: &[u8]) -> Self {
        // HMAC takes keys of any length (longer ones are hashed first): this never fails, and
        // falling back to some other key would be worse than stopping.
        Key(HmacSha256::new_from_slice(secret).expect("HMAC-SHA256 accepts keys of any length"))
    }

    fn compute(&self, prefix: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.0.clone();
        mac.update(prefix);
        mac.update(body);
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    }

    fn verify(&self, prefix: &[u8], body: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.0.clone();
        mac.update(prefix);
        mac.update(body);
        mac.verify_slice(tag).is_ok()
    }
}

#[derive(Clone)]
struct Keyring {
    current: Key,
    previous: Option<Key>,
}

/// The authentication policy of a process: disabled (unsigned envelopes, accepted from
/// anyone), or [`Secrets`].
#[derive(Clone, Default)]
pub struct Auth {
    keys: Option<Keyring>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.is_enabled())
            .field("previous", &self.has_previous())
            .finish()
    }
}

impl Auth {
    /// No cluster secret: envelopes go out unsigned and unsigned envelopes are accepted. A signed
    /// envelope is accepted too, without checking its MAC (there is no key to check it with).
    /// Call [`Auth::startup_warning`] and log the result.
    pub fn disabled() -> Self {
        Auth { keys: None }
    }

    /// Signs with `secrets.current`; accepts `current`, then `previous`.
    pub fn new(secrets: &Secrets) -> Self {
        Auth {
            keys: Some(Keyring {
                current: Key::new(secrets.current.expose()),
                previous: secrets.previous.as_ref().map(|p| Key::new(p.expose())),
            }),
        }
    }

    /// One secret, no rotation under way: [`Secret::new`] then [`Auth::new`].
    pub fn with_secret(secret: &[u8]) -> Result<Self, WeakSecret> {
        Ok(Auth::new(&Secrets::new(Secret::new(secret)?)))
    }

    /// Whether a cluster secret is configured (envelopes are signed and MACs are required).
    pub fn is_enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// Whether a previous secret is still accepted (a rotation is under way).
    pub fn has_previous(&self) -> bool {
        self.keys.as_ref().is_some_and(|k| k.previous.is_some())
    }

    /// The warning the server should log at startup, if any (no secret configured).
    pub fn startup_warning(&self) -> Option<&'static str> {
        if self.is_enabled() {
            None
        } else {
            Some(
                "no cluster secret configured: cross-node envelopes are not authenticated; \
                 anyone who can PUBLISH to this Redis can inject frames, sessions and events",
            )
        }
    }

    /// The key id to write in front of the MAC, if enabled.
    pub(crate) fn key_id(&self) -> Option<u8> {
        self.keys.as_ref().map(|_| KEY_ID)
    }

    /// MAC of `prefix || body` with the current secret.
    pub(crate) fn sign(&self, prefix: &[u8], body: &[u8]) -> Option<[u8; MAC_LEN]> {
        self.keys.as_ref().map(|k| k.current.compute(prefix, body))
    }

    /// Checks `tag` against `prefix || body` under the current, then the previous secret.
    pub(crate) fn verify(
        &self,
        key_id: u8,
        prefix: &[u8],
        body: &[u8],
        tag: &[u8],
    ) -> Result<(), DecodeError> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        if key_id != KEY_ID {
            return Err(DecodeError::UnknownKey(key_id));
        }
        if keys.current.verify(prefix, body, tag)
            || keys
                .previous
                .as_ref()
                .is_some_and(|p| p.verify(prefix, body, tag))
        {
            Ok(())
        } else {
            Err(DecodeError::BadMac)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: &[u8] = b"pW3x9QzL7mKc2Rv8Tn5Yb1Hd6Jf4Gs0E";
    const B: &[u8] = b"Zr8Kq2Wm5Xv9Lp3Nt7Yc1Bd6Hf4Gj0Sa";

    #[test]
    fn fingerprints_name_a_secret_without_showing_it() {
        let a = Secret::new(A).unwrap();
        let b = Secret::new(B).unwrap();
        let fa = a.fingerprint();
        assert_eq!(fa.len(), 2 * FINGERPRINT_LEN);
        assert_eq!(fa, Secret::new(A).unwrap().fingerprint(), "stable");
        assert_ne!(fa, b.fingerprint());
        let hex: String = A.iter().map(|x| format!("{x:02x}")).collect();
        assert!(!hex.contains(&fa) && !fa.contains(&hex[..8]));
        // never an envelope's MAC: signed envelopes' MACs cover a message starting 0x02
        assert_ne!(FINGERPRINT_LABEL.first(), Some(&0x02));
        let fb = b.fingerprint();
        let only_a = Secrets::new(a.clone());
        assert!(only_a.accepted_by((&fa, None)));
        assert!(!only_a.accepted_by((&fb, None)));
        // rotation: every step of the documented sequence talks both ways
        let add = Secrets::new(a.clone()).with_previous(b.clone()); // new secret b as previous
        let swapped = Secrets::new(b.clone()).with_previous(a.clone());
        assert!(
            add.accepted_by((&fa, None)),
            "step 1 with a node not yet restarted"
        );
        assert!(add.accepted_by((&fa, Some(&fb))));
        assert!(
            swapped.accepted_by((&fa, Some(&fb))),
            "step 2 with a step-1 node"
        );
        assert!(
            swapped.accepted_by((&fb, None)),
            "step 3 with a dropped node"
        );
        assert!(
            !swapped.accepted_by((&fa, None)),
            "a step-0 node cannot read b"
        );
        assert!(
            !Secrets::new(b).accepted_by((&fa, Some(&fb))),
            "b-only cannot read a"
        );
    }

    #[test]
    fn rfc4231_test_case_2() {
        // RFC 4231 test case 2 ("Jefe"), split across prefix and body to check concatenation.
        // The key is far below the policy, so build the state directly.
        let key = Key::new(b"Jefe");
        let tag = key.compute(b"what do ya want ", b"for nothing?");
        let expected = [
            0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95,
            0x75, 0xc7, 0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9,
            0x64, 0xec, 0x38, 0x43,
        ];
        assert_eq!(tag, expected);
        assert!(key.verify(b"what do ya want for nothing?", b"", &expected));
        assert!(!key.verify(b"what do ya want for nothing!", b"", &expected));
        assert!(!key.verify(b"what do ya want for nothing?", b"", &expected[..31]));
    }

    #[test]
    fn strong_secrets_pass() {
        for s in [
            A,
            B,
            b"3q2+7w==kQ9xVb7mZ0pL1sT4uR8yN6cH2fJ5gD3eA1w=".as_slice(),
            b"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".as_slice(),
            // long enough, varied, and not made of placeholder words only
            b"correct horse battery staple 1987".as_slice(),
        ] {
            assert_eq!(
                Secret::new(s).map(|_| ()),
                Ok(()),
                "{}",
                String::from_utf8_lossy(s)
            );
        }
        // random binary (from a file) is fine too
        let binary: Vec<u8> = (0u8..40)
            .map(|i| i.wrapping_mul(73).wrapping_add(200))
            .collect();
        assert!(Secret::new(binary).is_ok());
    }

    #[test]
    fn weak_secrets_are_refused_with_the_cause() {
        assert_eq!(Secret::new(b"".as_slice()), Err(WeakSecret::Empty));
        assert_eq!(
            Secret::new(b"Xk3-q9Lm2Vz8".as_slice()),
            Err(WeakSecret::TooShort { len: 12, min: 32 })
        );
        for placeholder in [
            "change-me-1234567890123456789012",
            "CHANGE_ME_1234567890123456789012!!",
            "changeme!CHANGEME?1234567890-changeme",
            "change-me-to-a-long-random-secret",
            "the-cluster-secret-of-this-test-00",
            "Hearth_Secret_2024!!!!!!!!!!!!!!!!!",
            "password-password-1234567890-@#$%",
            "example-test-secret-key-for-hearth",
            "super secret hearth cluster password",
            "secret0123456789012345678901234567",
            "testtesttest1234567890123456789012",
        ] {
            assert_eq!(
                Secret::new(placeholder),
                Err(WeakSecret::Placeholder),
                "{placeholder}"
            );
        }
        assert_eq!(
            Secret::new("changeme!changeme!changeme!changeme"),
            Err(WeakSecret::LowVariety {
                distinct: 8,
                min: 10
            })
        );
        assert_eq!(
            Secret::new("x".repeat(40)),
            Err(WeakSecret::LowVariety {
                distinct: 1,
                min: 10
            })
        );
        assert_eq!(
            Secret::new("0101010101010101010101010101010101"),
            Err(WeakSecret::LowVariety {
                distinct: 2,
                min: 10
            })
        );
        assert_eq!(
            Secret::new("0123456789abcdef0123456789abcdef"),
            Err(WeakSecret::Repetitive { period: 16 })
        );
        assert_eq!(
            Secret::new("Kq2Wm5Xv9LKq2Wm5Xv9LKq2Wm5Xv9LKq2"),
            Err(WeakSecret::Repetitive { period: 10 })
        );
        // the messages never quote the secret
        let e = Secret::new("change-me-1234567890123456789012").unwrap_err();
        assert!(!e.to_string().contains("1234567890"));
        assert!(!format!("{:?}", Secret::new(A).unwrap()).contains("pW3x"));
    }

    #[test]
    fn shortest_period_finds_borders() {
        assert_eq!(shortest_period(b"abcabcab"), 3);
        assert_eq!(shortest_period(b"abcd"), 4);
        assert_eq!(shortest_period(b"aaaa"), 1);
        assert_eq!(shortest_period(b"a"), 1);
    }

    fn signed(auth: &Auth, body: &[u8]) -> [u8; MAC_LEN] {
        auth.sign(&[0x02, KEY_ID], body).unwrap()
    }

    #[test]
    fn current_then_previous_verify() {
        let a = Secret::new(A).unwrap();
        let b = Secret::new(B).unwrap();
        let old = Auth::new(&Secrets::new(a.clone()));
        let adding = Auth::new(&Secrets::new(a.clone()).with_previous(b.clone()));
        let swapped = Auth::new(&Secrets::new(b.clone()).with_previous(a.clone()));
        let new = Auth::new(&Secrets::new(b.clone()));
        let prefix = [0x02, KEY_ID];
        let body = b"body";
        // every pair that is adjacent in the rolling procedure accepts each other
        let steps = [&old, &adding, &swapped, &new];
        for pair in steps.windows(2) {
            for (x, y) in [(pair[0], pair[1]), (pair[1], pair[0])] {
                assert_eq!(x.verify(KEY_ID, &prefix, body, &signed(y, body)), Ok(()));
            }
        }
        // the ends of the procedure do not
        assert_eq!(
            new.verify(KEY_ID, &prefix, body, &signed(&old, body)),
            Err(DecodeError::BadMac)
        );
        assert_eq!(
            old.verify(KEY_ID, &prefix, body, &signed(&new, body)),
            Err(DecodeError::BadMac)
        );
        // other key ids are reserved
        assert_eq!(
            swapped.verify(7, &prefix, body, &signed(&swapped, body)),
            Err(DecodeError::UnknownKey(7))
        );
        assert!(adding.has_previous() && !old.has_previous());
        // a previous secret equal to the current one is no rotation
        assert!(!Auth::new(&Secrets::new(a.clone()).with_previous(a)).has_previous());
    }

    #[test]
    fn warning_only_when_disabled() {
        assert!(Auth::disabled().startup_warning().is_some());
        assert!(!Auth::disabled().is_enabled());
        let auth = Auth::with_secret(A).unwrap();
        assert!(auth.is_enabled());
        assert!(auth.startup_warning().is_none());
        assert!(!format!("{auth:?}").contains("pW3x"));
        assert_eq!(
            Auth::with_secret(b"change-me").unwrap_err(),
            WeakSecret::TooShort { len: 9, min: 32 }
        );
    }
}

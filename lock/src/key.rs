//! Key derivation: resource names never appear in Redis keys, only a fixed-width hash does.

use sha2::{Digest, Sha256};

/// Number of bytes of `sha256(name)` kept in the tag (128 bits).
const TAG_BYTES: usize = 16;

/// The Redis Cluster hash tag for a resource: `{<32 lowercase hex digits>}`, the hex encoding of
/// the first 16 bytes of `sha256(name)`.
///
/// The braces are included. Every key containing this tag (and no earlier `{`) lands in the same
/// cluster slot, so other crates can keep their per-resource keys and sharded channels next to
/// the lock key, e.g. `format!("{prefix}:doc:{}:updates", doc_tag(name))`. Because the name only
/// enters through the hash, names containing `{`, `}`, `:`, `*`, NUL or anything else can neither
/// change the slot nor collide with another key family.
///
/// ```
/// let tag = hearth_lock::doc_tag("org/1/doc:{x}*");
/// assert_eq!(tag.len(), 34);
/// assert!(tag.starts_with('{') && tag.ends_with('}'));
/// assert_ne!(tag, hearth_lock::doc_tag("org/1/doc:{x}"));
/// ```
pub fn doc_tag(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let mut tag = String::with_capacity(2 * TAG_BYTES + 2);
    tag.push('{');
    for byte in digest.iter().take(TAG_BYTES) {
        tag.push(hex_digit(byte >> 4));
        tag.push(hex_digit(byte & 0x0f));
    }
    tag.push('}');
    tag
}

/// The lock key for `resource` under `prefix`: `<prefix>:lock:<doc_tag(resource)>`.
///
/// ```
/// let key = hearth_lock::lock_key("hearth", "abc");
/// // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
/// assert_eq!(key, "hearth:lock:{ba7816bf8f01cfea414140de5dae2223}");
/// ```
pub fn lock_key(prefix: &str, resource: &str) -> String {
    format!("{prefix}:lock:{}", doc_tag(resource))
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble & 0x0f)])
}

/// Checks a key prefix: non-empty, at most 128 bytes, no braces (they would move the hash tag),
/// no whitespace or control characters.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("prefix is empty".into());
    }
    if prefix.len() > 128 {
        return Err("prefix is longer than 128 bytes".into());
    }
    if prefix
        .chars()
        .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "prefix {prefix:?} contains a brace, whitespace or a control character"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn known_vector() {
        // sha256("") = e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
        assert_eq!(doc_tag(""), "{e3b0c44298fc1c149afbf4c8996fb924}");
    }

    #[test]
    fn tricky_names_give_distinct_well_formed_keys() {
        let names = [
            "a", "a:lock", "{a}", "a*", "a\0b", "a\0", "}", "{", "", " ", "a:b:c", "a?[x]",
        ];
        let keys: HashSet<String> = names.iter().map(|n| lock_key("p", n)).collect();
        assert_eq!(keys.len(), names.len());
        for key in &keys {
            assert_eq!(key.len(), "p:lock:".len() + 34, "{key}");
            assert!(key.starts_with("p:lock:{"));
            assert!(key.ends_with('}'));
            assert_eq!(key.matches('{').count(), 1);
            assert_eq!(key.matches('}').count(), 1);
            let hex = &key["p:lock:{".len()..key.len() - 1];
            assert!(
                hex.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
        }
    }

    #[test]
    fn prefix_validation() {
        assert!(validate_prefix("hearth").is_ok());
        assert!(validate_prefix("hearth:v1").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("a{b").is_err());
        assert!(validate_prefix("a}b").is_err());
        assert!(validate_prefix("a b").is_err());
        assert!(validate_prefix("a\0").is_err());
    }
}

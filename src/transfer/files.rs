//! A directory of update files: one document per file, `<name>.bin` or `<name>.ystate`, the
//! file holding one Yjs update with the document's whole state.
//!
//! A document name becomes a file name by percent-encoding every byte of its UTF-8 form that
//! is not an ASCII letter, digit, `-`, `_` or `.` (and a leading `.`), so any name — `a/b`,
//! `..`, names with spaces or emoji — maps to one plain file in the directory and back. Import
//! decodes the same way; a file name without `%` is the document name as is.

use std::path::{Path, PathBuf};

use super::TransferError;

/// The extensions a directory import reads.
pub const EXTENSIONS: [&str; 2] = ["bin", "ystate"];

/// The extension export writes.
pub const EXPORT_EXTENSION: &str = "bin";

/// The longest file name most file systems take, in bytes.
const MAX_FILE_NAME: usize = 255;

/// The file name (without extension) of document `name`.
pub fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The document name of file stem `stem`, or why it is not one.
pub fn decode_name(stem: &str) -> Result<String, String> {
    let bytes = stem.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{stem:?}: a % not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{stem:?}: the decoded name is not UTF-8"))
}

fn io(path: &Path, source: std::io::Error) -> TransferError {
    TransferError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The update files of `dir` (by extension, not descending into subdirectories), sorted.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, TransferError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The document name of update file `path`.
pub fn document_name(path: &Path) -> Result<String, String> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("{}: the file name is not UTF-8", path.display()))?;
    decode_name(stem)
}

/// Reads update file `path` if it is at most `max_bytes` long (checked before reading).
pub fn read(path: &Path, max_bytes: usize) -> Result<Vec<u8>, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > max_bytes as u64 {
        return Err(format!(
            "{len} bytes, more than max_document_bytes ({max_bytes})"
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes document `name`'s update into `dir` atomically (a reader sees the old file or the
/// whole new one): a temporary file renamed over the target.
pub fn write(dir: &Path, name: &str, data: &[u8]) -> Result<(), String> {
    let file = format!("{}.{EXPORT_EXTENSION}", encode_name(name));
    if file.len() > MAX_FILE_NAME {
        return Err(format!(
            "the encoded name is {} bytes, too long for a file name",
            file.len()
        ));
    }
    let target = dir.join(&file);
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, &target))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", target.display())
        })
}

#[cfg(test)]
mod tests {
    use super::{decode_name, encode_name};

    #[test]
    fn names_round_trip_through_file_names() {
        for name in [
            "plain-name_1.x",
            "a/b",
            "..",
            ".hidden",
            "with space",
            "100%",
            "émoji 🔥",
            "",
        ] {
            let file = encode_name(name);
            assert!(
                file.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.%".contains(&b)),
                "{file}"
            );
            assert!(!file.starts_with('.'), "{file}");
            assert_eq!(decode_name(&file).as_deref(), Ok(name));
        }
        assert_eq!(encode_name("a/b"), "a%2Fb");
        assert_eq!(decode_name("doc").as_deref(), Ok("doc"));
        assert!(decode_name("bad%2").is_err());
        assert!(decode_name("bad%zz").is_err());
        assert!(decode_name("%FF").is_err());
    }
}

//! lib0 encoding primitives (the byte layer under every Yjs and Hocuspocus frame).
//!
//! `varUint` is unsigned LEB128; `varString` and `varUint8Array` are a `varUint` byte length
//! followed by the bytes. The reader never allocates more than the input it was given and never
//! panics: every read is bounds-checked and returns [`DecodeError`].

use bytes::Bytes;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended in the middle of a value.
    #[error("unexpected end of input")]
    UnexpectedEnd,
    /// A varUint longer than 64 bits.
    #[error("varint overflow")]
    VarIntOverflow,
    /// A varString that is not UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A message or sub-message type this protocol does not define.
    #[error("unknown {what} type {value}")]
    UnknownType {
        /// Which field.
        what: &'static str,
        /// The value found.
        value: u64,
    },
}

/// A cursor over a shared buffer; byte arrays are returned as zero-copy [`Bytes`] slices.
#[derive(Debug, Clone)]
pub struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: Bytes) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads one byte.
    pub fn read_u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::UnexpectedEnd)?;
        self.pos += 1;
        Ok(b)
    }

    /// Reads an unsigned LEB128 value of at most 64 bits.
    pub fn read_var_uint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.read_u8()?;
            if shift == 63 && b > 1 {
                return Err(DecodeError::VarIntOverflow);
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
            if shift > 63 {
                return Err(DecodeError::VarIntOverflow);
            }
        }
    }

    /// Reads `len` raw bytes (zero-copy).
    pub fn read_exact(&mut self, len: u64) -> Result<Bytes, DecodeError> {
        let len = usize::try_from(len).map_err(|_| DecodeError::UnexpectedEnd)?;
        if len > self.remaining() {
            return Err(DecodeError::UnexpectedEnd);
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// Reads a `varUint8Array`.
    pub fn read_var_bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.read_var_uint()?;
        self.read_exact(len)
    }

    /// Reads a `varString`.
    pub fn read_var_string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.read_var_bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// The unread rest of the input (zero-copy).
    pub fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }
}

/// Appends lib0 values to a `Vec<u8>`.
pub trait Writer {
    /// Writes an unsigned LEB128 value.
    fn write_var_uint(&mut self, v: u64);
    /// Writes a `varUint8Array`.
    fn write_var_bytes(&mut self, b: &[u8]);
    /// Writes a `varString`.
    fn write_var_string(&mut self, s: &str);
}

impl Writer for Vec<u8> {
    fn write_var_uint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.push(v as u8);
    }

    fn write_var_bytes(&mut self, b: &[u8]) {
        self.write_var_uint(b.len() as u64);
        self.extend_from_slice(b);
    }

    fn write_var_string(&mut self, s: &str) {
        self.write_var_bytes(s.as_bytes());
    }
}

/// Bytes needed to encode `v` as a varUint.
pub fn var_uint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn var_uint_matches_lib0_examples() {
        for (v, enc) in [
            (0u64, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (501, vec![0xf5, 0x03]),
        ] {
            let mut out = Vec::new();
            out.write_var_uint(v);
            assert_eq!(out, enc);
            assert_eq!(var_uint_len(v), enc.len());
            assert_eq!(Reader::new(Bytes::from(enc)).read_var_uint().unwrap(), v);
        }
    }

    #[test]
    fn var_uint_round_trips_extremes() {
        for v in [1u64 << 53, u64::MAX, u64::MAX - 1, 1 << 63] {
            let mut out = Vec::new();
            out.write_var_uint(v);
            assert_eq!(var_uint_len(v), out.len());
            assert_eq!(Reader::new(Bytes::from(out)).read_var_uint().unwrap(), v);
        }
    }

    #[test]
    fn overlong_and_truncated_varints_fail() {
        let overlong = Bytes::from(vec![0xff; 11]);
        assert_eq!(
            Reader::new(overlong).read_var_uint(),
            Err(DecodeError::VarIntOverflow)
        );
        let too_big = Bytes::from(vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
        ]);
        assert_eq!(
            Reader::new(too_big).read_var_uint(),
            Err(DecodeError::VarIntOverflow)
        );
        assert_eq!(
            Reader::new(Bytes::from_static(&[0x80])).read_var_uint(),
            Err(DecodeError::UnexpectedEnd)
        );
    }

    #[test]
    fn length_prefix_beyond_input_fails_without_allocating() {
        // declares 2^40 bytes, has 1
        let mut buf = Vec::new();
        buf.write_var_uint(1 << 40);
        buf.push(0);
        assert_eq!(
            Reader::new(Bytes::from(buf)).read_var_bytes(),
            Err(DecodeError::UnexpectedEnd)
        );
    }

    #[test]
    fn strings_must_be_utf8() {
        assert_eq!(
            Reader::new(Bytes::from_static(&[2, 0xff, 0xfe])).read_var_string(),
            Err(DecodeError::InvalidUtf8)
        );
        let mut buf = Vec::new();
        buf.write_var_string("héllo");
        assert_eq!(
            Reader::new(Bytes::from(buf)).read_var_string().unwrap(),
            "héllo"
        );
    }
}

//! Hearth.
pub mod storage;

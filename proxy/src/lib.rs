//! Cross-node envelopes.

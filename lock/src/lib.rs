//! Redis ownership lock.

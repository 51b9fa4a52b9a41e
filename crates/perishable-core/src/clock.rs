//! The clock: Unix time in whole seconds, the unit of every expiry in tokens, proofs and the
//! store.

/// Now, in Unix seconds.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

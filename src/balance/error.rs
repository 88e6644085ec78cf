//! Error types.

use std::fmt;

/// No backend of the set could take the request: the set is empty, or every backend is
/// unhealthy.
///
/// The balancer returns this at once rather than waiting for a backend to come back; the
/// HTTP layer answers it with `503 Service Unavailable`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NoHealthyBackend(());

impl NoHealthyBackend {
    pub(crate) fn new() -> Self {
        NoHealthyBackend(())
    }
}

impl fmt::Display for NoHealthyBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no healthy backend")
    }
}

impl std::error::Error for NoHealthyBackend {}

use std::fmt;

/// Takes the hashing key out of a request, for [`Hashing`](crate::policy::Hashing).
///
/// The key is a 64-bit hash; use [`stable_hash`](crate::policy::stable_hash) so that every
/// process derives the same key from the same request. Policies that do not hash ignore it.
/// Closures `Fn(&Req) -> Option<u64>` are keys too.
pub trait RequestKey<Req> {
    /// The request's key, or `None` if it has none.
    fn key(&self, request: &Req) -> Option<u64>;
}

/// No key: hashing spreads such requests by rotation.
#[derive(Clone, Copy, Default)]
pub struct NoKey;

impl fmt::Debug for NoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoKey")
    }
}

impl<Req> RequestKey<Req> for NoKey {
    #[inline]
    fn key(&self, _: &Req) -> Option<u64> {
        None
    }
}

impl<Req, F> RequestKey<Req> for F
where
    F: Fn(&Req) -> Option<u64>,
{
    #[inline]
    fn key(&self, request: &Req) -> Option<u64> {
        self(request)
    }
}

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

/// A backend service's error that gives the request back: the backend did not act on it
/// (for HTTP: the connection was refused, or closed before any byte of an answer, for a
/// request that is safe to send again), so [`Balance`](super::Balance) sends it to another
/// backend, as it does when a backend fails `poll_ready`, within its
/// [`Retries`](super::Retries). Where there is no backend left to try, or the retries or
/// the retry budget are used up, the request fails with the error inside.
///
/// ```
/// use tower::{service_fn, ServiceExt};
/// use tower_lb::balance::error::Unsent;
/// use tower_lb::{policy::RoundRobin, Backends, Balance, BoxError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
/// let gone = service_fn(|req: String| async move {
///     Err::<String, BoxError>(Box::new(Unsent::new(req, "connection refused")))
/// });
/// let up = service_fn(|req: String| async move { Ok::<_, BoxError>(format!("b: {req}")) });
/// let backends = Backends::from_services(
///     RoundRobin::new(),
///     [("a", gone.boxed_clone()), ("b", up.boxed_clone())],
/// );
/// let lb = Balance::new(backends);
/// assert_eq!(lb.clone().oneshot("1".into()).await?, "b: 1"); // "a" gave it back
/// assert_eq!(lb.oneshot("2".into()).await?, "b: 2");
/// # Ok(()) }
/// ```
pub struct Unsent<Req> {
    // A lock only to make the error `Sync`; it is taken once, by value.
    request: std::sync::Mutex<Req>,
    error: crate::BoxError,
}

impl<Req> Unsent<Req> {
    /// The request, given back, and why the backend did not take it.
    pub fn new(request: Req, error: impl Into<crate::BoxError>) -> Self {
        Unsent {
            request: std::sync::Mutex::new(request),
            error: error.into(),
        }
    }

    /// The request and the error.
    pub fn into_parts(self) -> (Req, crate::BoxError) {
        let request = self.request.into_inner().unwrap_or_else(|e| e.into_inner());
        (request, self.error)
    }
}

impl<Req> fmt::Debug for Unsent<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unsent")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<Req> fmt::Display for Unsent<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl<Req> std::error::Error for Unsent<Req> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// A backend service's error caused by the request rather than the backend: the request's
/// body failed as the service read it (a client that went away in the middle of an upload,
/// or broke its framing), or the service refused the request as it was.
///
/// Passive health's default [`Classify`](super::outlier::Classify),
/// [`ServerErrorsAsFailures`](super::outlier::ServerErrorsAsFailures), does not count an
/// error with one of these in its chain (itself or any [`source`](std::error::Error::source))
/// against the backend: otherwise any client could eject backends. The HTTP backend
/// services wrap every error of the request body in one; a service of your own can do the
/// same.
///
/// ```
/// use tower_lb::balance::error::RequestFault;
/// use tower_lb::balance::outlier::{Classify, Outcome, ServerErrorsAsFailures};
///
/// let cut = RequestFault::new("the client closed the connection mid-body");
/// assert!(!ServerErrorsAsFailures.is_failure(Outcome::Error(&cut)));
/// assert!(ServerErrorsAsFailures.is_failure(Outcome::Error(&std::fmt::Error)));
/// ```
#[derive(Debug)]
pub struct RequestFault {
    source: crate::BoxError,
}

impl RequestFault {
    /// The request's fault, with its cause.
    pub fn new(source: impl Into<crate::BoxError>) -> Self {
        RequestFault {
            source: source.into(),
        }
    }

    /// The cause. (It is not among the [`source`](std::error::Error::source)s: the marker
    /// stands for it in the chain.)
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Whether `error` or any of its sources is a `RequestFault`: the one test of whose
    /// fault a failure was, for passive health and for the answer a proxy gives.
    pub fn in_chain(error: &(dyn std::error::Error + 'static)) -> bool {
        std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<RequestFault>())
    }
}

impl fmt::Display for RequestFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.source.fmt(f)
    }
}

// A marker, transparent as `Unsent` is: it says what its cause says, and its cause's
// sources follow, so that a chain printed link by link shows each message once.
impl std::error::Error for RequestFault {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

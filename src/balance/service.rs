use std::fmt;
use std::hash::Hash;
use std::task::{Context, Poll, Waker};

use tower::load::completion::{CompleteOnResponse, TrackCompletion};
use tower_service::Service;

use super::future::{ResponseFuture, Retry};
use super::{Backends, InFlight, NoKey, RequestKey, Retries};
use crate::policy::Policy;
use crate::BoxError;

/// Spreads requests over a changing set of backend services with a [`Policy`].
///
/// See the [module docs](super) for the idea. `Balance` is cheap to clone: all clones share
/// one [`Backends`] set and one policy (and so one round-robin cursor and one set of
/// in-flight counters), so a single balancer can serve every connection of a server.
///
/// # Readiness
///
/// - [`poll_ready`](Service::poll_ready) is always ready. The balancer reserves nothing:
///   which backend takes a request is decided in [`call`](Service::call), because a policy
///   may need the request (hashing), and because a shared balancer cannot hold a reservation
///   for a clone that may never call.
/// - `call` picks a backend from the current snapshot. If none can take the request (empty
///   set, all unhealthy) the returned future fails at once with
///   [`NoHealthyBackend`](super::error::NoHealthyBackend); it never waits for a backend to
///   come back.
/// - Otherwise `call` takes a clone of the chosen backend's service and polls its readiness
///   once, with a no-op waker: a backend that is ready at once is called right there. One
///   that is not ready is driven to readiness by the returned future (whose first poll
///   registers the real waker) and then called. A backend that is not ready holds up only
///   the requests picked for it; they count as in flight, so least connections steers away
///   from it.
/// - A backend whose readiness fails never received the request, so the request is tried
///   on another backend ([`Policy::pick_excluding`], then the next healthy backend the
///   request has not tried); if there is none, or the retries are used up, the readiness
///   error is the request's error. (For HTTP, readiness is the connection: a refused
///   connect is retried elsewhere.)
/// - A backend whose call fails with [`Unsent`](super::error::Unsent) gives the request
///   back: it never acted on it, and the request is tried on another backend in the same
///   way. (For HTTP: an idempotent request whose connection the backend closed or reset
///   before any byte of an answer.)
/// - A request gets at most [`Retries::retries`] retries in all (default 1), each on a
///   backend it has not tried, and only while the retry budget allows: see [`Retries`].
/// - The request counts as in flight on its backend from the pick until the
///   [`TrackCompletion`] `C` drops the [`InFlight`] guard: by default when the response
///   arrives; with [`TrackBody`](crate::proxy::TrackBody), when the response body ends.
///   Dropping the future (cancellation) and errors end it too.
pub struct Balance<K, S, P: Policy, E = NoKey, C = CompleteOnResponse> {
    backends: Backends<K, S, P>,
    key: E,
    completion: C,
    retries: Retries,
}

impl<K, S, P: Policy> Balance<K, S, P> {
    /// A balancer over `backends`, with no hashing key and requests complete on response.
    pub fn new(backends: Backends<K, S, P>) -> Self {
        Balance {
            backends,
            key: NoKey,
            completion: CompleteOnResponse::default(),
            retries: Retries::default(),
        }
    }
}

impl<K, S, P: Policy, E, C> Balance<K, S, P, E, C> {
    /// Takes the hashing key of each request from `key`.
    pub fn with_key<E2>(self, key: E2) -> Balance<K, S, P, E2, C> {
        Balance {
            backends: self.backends,
            key,
            completion: self.completion,
            retries: self.retries,
        }
    }

    /// Decides with `completion` when a request stops counting as in flight.
    pub fn with_completion<C2>(self, completion: C2) -> Balance<K, S, P, E, C2> {
        Balance {
            backends: self.backends,
            key: self.key,
            completion,
            retries: self.retries,
        }
    }

    /// Retries requests on other backends as `retries` says (default: one retry, a budget
    /// of 20 percent). Clones share it; [`Retries::set_retries`] changes it live.
    pub fn with_retries(mut self, retries: Retries) -> Self {
        self.retries = retries;
        self
    }

    /// The retry setting, to change it at run time.
    pub fn retries(&self) -> &Retries {
        &self.retries
    }

    /// The backend set, to change it at run time.
    pub fn get_ref(&self) -> &Backends<K, S, P> {
        &self.backends
    }

    /// The backend set, mutably.
    pub fn get_mut(&mut self) -> &mut Backends<K, S, P> {
        &mut self.backends
    }

    /// The backend set.
    pub fn into_inner(self) -> Backends<K, S, P> {
        self.backends
    }
}

impl<K, S, P, E, C, Req> Service<Req> for Balance<K, S, P, E, C>
where
    K: Hash + Eq + Clone,
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Policy,
    Req: 'static,
    E: RequestKey<Req>,
    C: TrackCompletion<InFlight, S::Response>,
{
    type Response = C::Output;
    type Error = BoxError;
    type Future = ResponseFuture<K, S, P, Req, C>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        let completion = self.completion.clone();
        let key = &self.key;
        self.backends.with_snapshot(|snapshot| {
            let key = if snapshot.policy().needs_key() {
                key.key(&request)
            } else {
                None
            };
            let Some(index) = snapshot.pick(key) else {
                return ResponseFuture::unavailable(completion);
            };
            let (mut service, mut guard, id) = snapshot.start(index);
            let left = self.retries.start();
            // Probe readiness now: a backend that is ready at once (a pooled connection, an
            // always-ready service) is called here. The future keeps a handle on the set,
            // for a backend that gives the request back (a pooled connection the backend
            // closed as it went down). The future's first poll registers the real waker
            // for a backend that is not ready.
            let mut probe = Context::from_waker(Waker::noop());
            match service.poll_ready(&mut probe) {
                Poll::Ready(Ok(())) => {
                    let retry = Retry::new(&self.backends, &self.retries, left, key, id);
                    ResponseFuture::sent(service.call(request), guard, retry, completion)
                }
                Poll::Ready(Err(error)) => {
                    let error: BoxError = error.into();
                    guard.fail(&*error);
                    drop(guard);
                    let mut retry = Retry::new(&self.backends, &self.retries, left, key, id);
                    match retry.as_mut().and_then(|r| r.next_in(snapshot)) {
                        Some((service, guard)) => {
                            tracing::debug!(%error, "backend not ready; trying another");
                            ResponseFuture::called(service, request, guard, retry, completion)
                        }
                        None => ResponseFuture::failed(error, completion),
                    }
                }
                Poll::Pending => {
                    let retry = Retry::new(&self.backends, &self.retries, left, key, id);
                    ResponseFuture::called(service, request, guard, retry, completion)
                }
            }
        })
    }
}

impl<K, S, P: Policy, E: Clone, C: Clone> Clone for Balance<K, S, P, E, C> {
    fn clone(&self) -> Self {
        Balance {
            backends: self.backends.clone(),
            key: self.key.clone(),
            completion: self.completion.clone(),
            retries: self.retries.clone(),
        }
    }
}

impl<K: fmt::Debug, S, P: Policy + fmt::Debug, E: fmt::Debug, C> fmt::Debug
    for Balance<K, S, P, E, C>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("backends", &self.backends)
            .field("key", &self.key)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

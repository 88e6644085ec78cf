//! Future types.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::load::completion::TrackCompletion;
use tower_service::Service;

use super::error::{NoHealthyBackend, Unsent};
use super::{Backends, InFlight, Retries, Snapshot};
use crate::policy::Policy;
use crate::BoxError;

pin_project! {
    /// Response future of [`Balance`](super::Balance).
    ///
    /// It carries the request's [`InFlight`] guard: dropping the future (cancelling the
    /// request) ends the request for the policy's bookkeeping. If the chosen backend fails
    /// to become ready, the request (never handed to it) is tried on another backend; so is
    /// a request the backend gives back with an [`Unsent`] error. Each retry goes to a
    /// backend not tried yet, within the balancer's [`Retries`].
    pub struct ResponseFuture<K, S: Service<Req>, P: Policy, Req, C> {
        #[pin]
        state: State<S, Req>,
        guard: Option<InFlight>,
        retry: Option<Retry<K, S, P>>,
        completion: C,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        // Boxed: only a backend that was not ready at once (a new connection) or a retry
        // waits here, and the request and service would make every future as large (it
        // is moved several times on its way to the server).
        Ready { waiting: Box<Waiting<S, Req>> },
        Called { #[pin] call: S::Future },
        Failed { error: Option<BoxError> },
    }
}

/// A backend to call once it is ready, and the request for it.
struct Waiting<S, Req> {
    service: S,
    request: Option<Req>,
}

impl<S, Req> State<S, Req>
where
    S: Service<Req>,
{
    fn ready(service: S, request: Req) -> Self {
        State::Ready {
            waiting: Box::new(Waiting {
                service,
                request: Some(request),
            }),
        }
    }
}

/// What it takes to try another backend.
pub(crate) struct Retry<K, S, P: Policy> {
    backends: Backends<K, S, P>,
    retries: Retries,
    key: Option<u64>,
    /// The id of the backend trying the request now.
    current: u64,
    /// The backends tried before it.
    tried: Vec<u64>,
    /// Retries left to this request.
    left: u32,
}

impl<K, S: Clone, P: Policy> Retry<K, S, P> {
    /// `None` when the request may not be retried at all.
    pub(crate) fn new(
        backends: &Backends<K, S, P>,
        retries: &Retries,
        left: u32,
        key: Option<u64>,
        current: u64,
    ) -> Option<Self> {
        (left > 0).then(|| Retry {
            backends: backends.clone(),
            retries: retries.clone(),
            key,
            current,
            tried: Vec::new(),
            left,
        })
    }

    /// Starts the request on another backend, from the set as it is now.
    fn next(&mut self) -> Option<(S, InFlight)>
    where
        K: std::hash::Hash + Eq + Clone,
    {
        let snapshot = self.backends.snapshot();
        self.next_in(&snapshot)
    }

    /// Starts the request on a backend of `snapshot` that it has not tried, if retries are
    /// left to it and the budget allows one.
    pub(crate) fn next_in(&mut self, snapshot: &Snapshot<K, S, P>) -> Option<(S, InFlight)> {
        if self.left == 0 {
            return None;
        }
        let index = self.untried(snapshot)?;
        if !self.retries.withdraw() {
            tracing::debug!("retry budget spent; not retrying");
            return None;
        }
        self.left -= 1;
        let (service, guard, id) = snapshot.start(index);
        self.tried.push(std::mem::replace(&mut self.current, id));
        crate::stats::retry();
        Some((service, guard))
    }

    /// The policy's choice without the current backend; if that one was tried already, the
    /// next healthy backend after it that was not.
    fn untried(&self, snapshot: &Snapshot<K, S, P>) -> Option<usize> {
        let endpoints = &snapshot.endpoints;
        let current = endpoints.iter().position(|e| e.id() == self.current);
        let first = match current {
            Some(i) => snapshot
                .policy()
                .pick_excluding(&snapshot.table, endpoints, self.key, i)?,
            None => snapshot.pick(self.key)?,
        };
        let untried = |i: &usize| {
            let e = &endpoints[*i];
            e.is_healthy() && e.id() != self.current && !self.tried.contains(&e.id())
        };
        let n = endpoints.len();
        (0..n).map(|d| (first + d) % n).find(untried)
    }
}

impl<K, S: Service<Req>, P: Policy, Req, C> ResponseFuture<K, S, P, Req, C> {
    /// The backend is not ready yet: the future drives it to readiness, then calls it.
    pub(crate) fn called(
        service: S,
        request: Req,
        guard: InFlight,
        retry: Option<Retry<K, S, P>>,
        completion: C,
    ) -> Self {
        ResponseFuture {
            state: State::ready(service, request),
            guard: Some(guard),
            retry,
            completion,
        }
    }

    /// The backend was ready at once and has been called.
    pub(crate) fn sent(
        call: S::Future,
        guard: InFlight,
        retry: Option<Retry<K, S, P>>,
        completion: C,
    ) -> Self {
        ResponseFuture {
            state: State::Called { call },
            guard: Some(guard),
            retry,
            completion,
        }
    }

    pub(crate) fn failed(error: BoxError, completion: C) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            guard: None,
            retry: None,
            completion,
        }
    }

    pub(crate) fn unavailable(completion: C) -> Self {
        ResponseFuture {
            state: State::Failed {
                error: Some(NoHealthyBackend::new().into()),
            },
            guard: None,
            retry: None,
            completion,
        }
    }
}

impl<K, S, P, Req, C> Future for ResponseFuture<K, S, P, Req, C>
where
    K: Hash + Eq + Clone,
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Policy,
    Req: 'static,
    C: TrackCompletion<InFlight, S::Response>,
{
    type Output = Result<C::Output, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Ready { waiting } => match ready!(waiting.service.poll_ready(cx)) {
                    Ok(()) => {
                        let request = waiting.request.take().expect("polled after completion");
                        State::Called {
                            call: waiting.service.call(request),
                        }
                    }
                    Err(error) => {
                        let error: BoxError = error.into();
                        if let Some(mut guard) = this.guard.take() {
                            guard.fail(&*error);
                        }
                        let request = waiting.request.take().expect("polled after completion");
                        match this.retry.as_mut().and_then(Retry::next) {
                            Some((service, guard)) => {
                                tracing::debug!(%error, "backend not ready; trying another");
                                *this.guard = Some(guard);
                                State::ready(service, request)
                            }
                            None => return Poll::Ready(Err(error)),
                        }
                    }
                },
                StateProj::Called { call } => {
                    let result = ready!(call.poll(cx));
                    // The request ends here unless the response carries the guard on.
                    let mut guard = this.guard.take().expect("polled after completion");
                    let error: BoxError = match result {
                        Ok(response) => {
                            guard.answered();
                            return Poll::Ready(Ok(this
                                .completion
                                .track_completion(guard, response)));
                        }
                        Err(error) => error.into(),
                    };
                    // A backend that gives the request back never acted on it: on to
                    // another backend, from the set as it is now. It failed it all the
                    // same, for passive health (with the error inside).
                    let (request, error) = match error.downcast::<Unsent<Req>>() {
                        Ok(unsent) => {
                            let (request, error) = unsent.into_parts();
                            (Some(request), error)
                        }
                        Err(error) => (None, error),
                    };
                    guard.fail(&*error);
                    drop(guard);
                    let Some(request) = request else {
                        return Poll::Ready(Err(error));
                    };
                    match this.retry.as_mut().and_then(Retry::next) {
                        Some((service, guard)) => {
                            tracing::debug!(%error, "backend gave the request back; trying another");
                            *this.guard = Some(guard);
                            State::ready(service, request)
                        }
                        None => return Poll::Ready(Err(error)),
                    }
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
            };
            this.state.set(next);
        }
    }
}

impl<K, S: Service<Req>, P: Policy, Req, C> fmt::Debug for ResponseFuture<K, S, P, Req, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

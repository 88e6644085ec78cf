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
use super::{Backends, InFlight};
use crate::policy::Policy;
use crate::BoxError;

pin_project! {
    /// Response future of [`Balance`](super::Balance).
    ///
    /// It carries the request's [`InFlight`] guard: dropping the future (cancelling the
    /// request) ends the request for the policy's bookkeeping. If the chosen backend fails
    /// to become ready, the request (never handed to it) is tried once on another backend;
    /// so is a request the backend gives back with an [`Unsent`] error.
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
        Ready { service: S, request: Option<Req> },
        Called { #[pin] call: S::Future },
        Failed { error: Option<BoxError> },
    }
}

/// What it takes to pick again.
struct Retry<K, S, P: Policy> {
    backends: Backends<K, S, P>,
    key: Option<u64>,
    failed: u64,
}

impl<K, S: Service<Req>, P: Policy, Req, C> ResponseFuture<K, S, P, Req, C> {
    pub(crate) fn called(
        service: S,
        request: Req,
        guard: InFlight,
        retry: (Backends<K, S, P>, Option<u64>, u64),
        completion: C,
    ) -> Self {
        ResponseFuture {
            state: State::Ready {
                service,
                request: Some(request),
            },
            guard: Some(guard),
            retry: Some(Retry {
                backends: retry.0,
                key: retry.1,
                failed: retry.2,
            }),
            completion,
        }
    }

    /// The backend was ready at once and has been called.
    pub(crate) fn sent(
        call: S::Future,
        guard: InFlight,
        retry: (Backends<K, S, P>, Option<u64>, u64),
        completion: C,
    ) -> Self {
        ResponseFuture {
            state: State::Called { call },
            guard: Some(guard),
            retry: Some(Retry {
                backends: retry.0,
                key: retry.1,
                failed: retry.2,
            }),
            completion,
        }
    }

    /// Waiting for a backend that may no longer be retried elsewhere.
    pub(crate) fn waiting(service: S, request: Req, guard: InFlight, completion: C) -> Self {
        ResponseFuture {
            state: State::Ready {
                service,
                request: Some(request),
            },
            guard: Some(guard),
            retry: None,
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
                StateProj::Ready { service, request } => match ready!(service.poll_ready(cx)) {
                    Ok(()) => {
                        let request = request.take().expect("polled after completion");
                        State::Called {
                            call: service.call(request),
                        }
                    }
                    Err(error) => {
                        let error: BoxError = error.into();
                        if let Some(guard) = this.guard.as_mut() {
                            guard.fail(&*error);
                        }
                        let again = this
                            .retry
                            .take()
                            .and_then(|r| r.backends.start_excluding(r.key, r.failed));
                        match (again, request.take()) {
                            (Some((service, guard, _)), Some(request)) => {
                                tracing::debug!(%error, "backend not ready; trying another");
                                crate::stats::retry();
                                *this.guard = Some(guard);
                                State::Ready {
                                    service,
                                    request: Some(request),
                                }
                            }
                            _ => {
                                this.guard.take();
                                return Poll::Ready(Err(error));
                            }
                        }
                    }
                },
                StateProj::Called { call } => {
                    let result = ready!(call.poll(cx));
                    // The request ends here unless the response carries the guard on.
                    let mut guard = this.guard.take().expect("polled after completion");
                    let retry = this.retry.take();
                    let error: BoxError = match result {
                        Ok(response) => {
                            guard.answered();
                            return Poll::Ready(Ok(this
                                .completion
                                .track_completion(guard, response)));
                        }
                        Err(error) => error.into(),
                    };
                    // A backend that gives the request back never acted on it: once more
                    // on another backend, from the set as it is now. It failed it all the
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
                    match retry.and_then(|r| r.backends.start_excluding(r.key, r.failed)) {
                        Some((service, guard, _)) => {
                            tracing::debug!(%error, "backend gave the request back; trying another");
                            crate::stats::retry();
                            *this.guard = Some(guard);
                            State::Ready {
                                service,
                                request: Some(request),
                            }
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

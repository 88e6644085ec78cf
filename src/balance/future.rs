//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::load::completion::TrackCompletion;
use tower::util::Oneshot;
use tower_service::Service;

use super::error::NoHealthyBackend;
use super::InFlight;
use crate::BoxError;

pin_project! {
    /// Response future of [`Balance`](super::Balance).
    ///
    /// It carries the request's [`InFlight`] guard: dropping the future (cancelling the
    /// request) ends the request for the policy's bookkeeping.
    pub struct ResponseFuture<S: Service<Req>, Req, C> {
        #[pin]
        state: State<S, Req>,
        guard: Option<InFlight>,
        completion: C,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        Called { #[pin] call: Oneshot<S, Req> },
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req, C> ResponseFuture<S, Req, C> {
    pub(crate) fn called(service: S, request: Req, guard: InFlight, completion: C) -> Self {
        ResponseFuture {
            state: State::Called {
                call: Oneshot::new(service, request),
            },
            guard: Some(guard),
            completion,
        }
    }

    pub(crate) fn unavailable(completion: C) -> Self {
        ResponseFuture {
            state: State::Failed {
                error: Some(NoHealthyBackend::new().into()),
            },
            guard: None,
            completion,
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: TrackCompletion<InFlight, S::Response>,
{
    type Output = Result<C::Output, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Called { call } => {
                let result = ready!(call.poll(cx));
                // The request ends here unless the response carries the guard on.
                let guard = this.guard.take().expect("polled after completion");
                Poll::Ready(match result {
                    Ok(response) => Ok(this.completion.track_completion(guard, response)),
                    Err(error) => Err(error.into()),
                })
            }
            StateProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}

impl<S: Service<Req>, Req, C> fmt::Debug for ResponseFuture<S, Req, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

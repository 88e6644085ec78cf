//! Response bodies that keep their request in flight until they end.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::load::completion::TrackCompletion;

use super::upgrade::Hold;
use crate::balance::InFlight;

/// Counts an HTTP request as in flight until its response body has ended (or is dropped),
/// not just until the response headers arrive: a streaming download keeps counting for
/// least connections. An upgraded connection (a WebSocket tunnel, answered `101` by a
/// [`Backend`](super::Backend)) counts until the tunnel closes.
///
/// Use it as the completion of a [`Balance`](crate::Balance) whose backends answer
/// `http::Response<B>`; responses become `http::Response<TrackedBody<B>>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackBody;

impl<B: Body> TrackCompletion<InFlight, Response<B>> for TrackBody {
    type Output = Response<TrackedBody<B>>;

    fn track_completion(&self, mut guard: InFlight, mut response: Response<B>) -> Self::Output {
        let status = response.status().as_u16();
        guard.respond(status);
        if status == 101 {
            // An upgrade: the tunnel holds the guard until it closes; the body is empty.
            if let Some(hold) = response.extensions_mut().remove::<Hold>() {
                hold.keep(guard);
                return response.map(|inner| TrackedBody { inner, guard: None });
            }
        }
        response.map(|body| TrackedBody::new(body, guard))
    }
}

pin_project! {
    /// A body that holds a guard until the body ends: its request's [`InFlight`] guard,
    /// or another (an HTTP/2 backend's response holds its stream's place on its
    /// connection, see [`Http2Body`](super::Http2Body)).
    #[derive(Debug)]
    pub struct TrackedBody<B, G = InFlight> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B: Body, G> TrackedBody<B, G> {
    /// Wraps `inner`, holding `guard` until it ends. An empty body ends at once.
    ///
    /// The end is the first of: a frame after which the body reports
    /// [`is_end_stream`](Body::is_end_stream) (a server stops polling there), the end of
    /// the stream, an error, or the body being dropped.
    pub fn new(inner: B, guard: G) -> Self {
        let guard = (!inner.is_end_stream()).then_some(guard);
        TrackedBody { inner, guard }
    }
}

impl<B: Body, G> Body for TrackedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
        };
        if ended {
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

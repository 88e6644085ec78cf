//! Response bodies that carry per-request state until they end.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::load::completion::TrackCompletion;

use crate::balance::InFlight;

/// Counts an HTTP request as in flight until its response body has ended (or is dropped),
/// not just until the response headers arrive: a streaming download keeps counting for
/// least connections.
///
/// Use it as the completion of a [`Balance`](crate::Balance) whose backends answer
/// `http::Response<B>`; responses become `http::Response<TrackedBody<B>>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackBody;

impl<B: Body> TrackCompletion<InFlight, Response<B>> for TrackBody {
    type Output = Response<TrackedBody<B>>;

    fn track_completion(&self, guard: InFlight, response: Response<B>) -> Self::Output {
        response.map(|body| TrackedBody::new(body, guard))
    }
}

pin_project! {
    /// A body that holds a value (an [`InFlight`] guard, a pooled connection) until the
    /// body's last frame has been read or the body is dropped.
    #[derive(Debug)]
    pub struct TrackedBody<B, H = InFlight> {
        #[pin]
        inner: B,
        handle: Option<H>,
    }
}

impl<B: Body, H: OnEnd> TrackedBody<B, H> {
    /// Wraps `inner`, holding `handle` until it ends. An empty body ends at once.
    ///
    /// The end is the first of: a frame after which the body reports
    /// [`is_end_stream`](Body::is_end_stream) (a server stops polling there), the end of
    /// the stream, or an error. Dropping the body before its end drops the handle.
    pub fn new(inner: B, handle: H) -> Self {
        let handle = if inner.is_end_stream() {
            handle.on_end(true);
            None
        } else {
            Some(handle)
        };
        TrackedBody { handle, inner }
    }
}

/// What a [`TrackedBody`] does with its handle when the body ends.
pub trait OnEnd {
    /// The body ended cleanly (`clean`) or with an error.
    fn on_end(self, clean: bool);
}

impl OnEnd for InFlight {
    fn on_end(self, _clean: bool) {}
}

impl<B, H> Body for TrackedBody<B, H>
where
    B: Body,
    H: OnEnd,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &frame {
            None => Some(true),
            Some(Err(_)) => Some(false),
            Some(Ok(_)) => this.inner.is_end_stream().then_some(true),
        };
        if let Some(clean) = ended {
            if let Some(h) = this.handle.take() {
                h.on_end(clean);
            }
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

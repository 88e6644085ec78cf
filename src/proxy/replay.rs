//! Sending a request body again, for a retry on another backend.
//!
//! A backend that closes or resets its connection before any byte of an answer has not
//! acted on the request, but it may have read some or all of its body, and the client's
//! body cannot be read twice. [`ReplayBody`] keeps what it hands on of an idempotent
//! request's body, up to [`MAX_REPLAY`] bytes, so that the request can be given back to
//! the balancer ([`Unsent`](crate::balance::error::Unsent)) whole. Beyond that size nothing
//! is kept, and a request whose body was sent in part is not retried.
//!
//! The kept part travels with the given-back request as an extension ([`Replayed`]): the
//! next [`Backend`](super::Backend) sends it first, then the rest of the client's body.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Method, Request};
use http_body::{Body, Frame, SizeHint};

/// The largest request body kept for a retry (64 KiB).
pub(crate) const MAX_REPLAY: usize = 64 * 1024;

/// A request body on its way to a backend, with what has been sent of it kept, for a
/// request that may be retried on another backend: idempotent, with a body of at most
/// 64 KiB. Other bodies pass through unchanged and nothing is kept.
///
/// It is the request body type the [`Backend`](super::Backend) sends, and so appears in its
/// response type, [`UpstreamBody<ReplayBody<B>>`](super::UpstreamBody); it has no public
/// constructor.
pub struct ReplayBody<B> {
    inner: B,
    /// `inner` has ended.
    done: bool,
    /// Something taken from `inner` was not kept (too large, or not kept at all), or
    /// `inner` failed: the body cannot be sent again.
    lost: bool,
    /// What was taken from `inner`, when it is being kept. (Boxed with its cursor: the
    /// body travels inside every response of the backend, and is moved with it.)
    kept: Option<Box<Keeping>>,
}

/// A kept body and how far it has been handed on.
#[derive(Debug, Default)]
struct Keeping {
    kept: Kept,
    /// Kept data frames already handed on (all of them, unless replaying).
    next: usize,
    /// The kept trailers are still to be handed on (replaying).
    trailers_next: bool,
}

#[derive(Debug, Clone, Default)]
struct Kept {
    data: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
}

/// The part of a request body that an earlier backend took, carried in the extensions of
/// a request given back to the balancer; `done` when that was all of it.
#[derive(Debug, Clone)]
pub(crate) struct Replayed {
    kept: Kept,
    done: bool,
}

/// Wraps `request`'s body for a backend: it goes on from a [`Replayed`] part if an earlier
/// backend took one, and is kept if the request may be retried.
pub(crate) fn prepare<B: Body>(mut request: Request<B>) -> Request<ReplayBody<B>> {
    let replayed = request.extensions_mut().remove::<Replayed>();
    let keep = replayed.is_none()
        && idempotent(request.method())
        && !request.body().is_end_stream()
        && request.body().size_hint().lower() <= MAX_REPLAY as u64;
    request.map(|body| ReplayBody::new(body, replayed, keep))
}

/// Safe to send twice (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl<B> ReplayBody<B> {
    fn new(inner: B, replayed: Option<Replayed>, keep: bool) -> Self {
        match replayed {
            Some(Replayed { kept, done }) => ReplayBody {
                inner,
                done,
                lost: false,
                kept: Some(Box::new(Keeping {
                    trailers_next: kept.trailers.is_some(),
                    kept,
                    next: 0,
                })),
            },
            None => ReplayBody {
                inner,
                done: false,
                lost: false,
                kept: keep.then(Box::default),
            },
        }
    }

    /// Whether the body can be sent again from its start: nothing of it was taken, or all
    /// that was taken was kept.
    pub(crate) fn can_replay(&self) -> bool {
        !self.lost
    }

    /// Starts the body again from its first byte. Only after [`can_replay`](Self::can_replay).
    pub(crate) fn rewind(&mut self) {
        if let Some(keeping) = self.kept.as_mut() {
            keeping.next = 0;
            keeping.trailers_next = keeping.kept.trailers.is_some();
        }
    }

    /// The client's body and the part of it already taken, to give the request back; `None`
    /// when it cannot be sent again.
    pub(crate) fn into_parts(self) -> Option<(B, Option<Replayed>)> {
        if self.lost {
            return None;
        }
        let replayed = self
            .kept
            .filter(|k| self.done || !k.kept.data.is_empty() || k.kept.trailers.is_some())
            .map(|keeping| Replayed {
                kept: keeping.kept,
                done: self.done,
            });
        Some((self.inner, replayed))
    }

    /// Keeps a frame just taken from `inner`, or gives up keeping.
    fn keep(&mut self, frame: &Frame<Bytes>) {
        let Some(keeping) = self.kept.as_mut() else {
            self.lost = true;
            return;
        };
        let kept = &mut keeping.kept;
        if let Some(data) = frame.data_ref() {
            if kept.len + data.len() > MAX_REPLAY {
                self.kept = None;
                self.lost = true;
                return;
            }
            kept.len += data.len();
            kept.data.push(data.clone());
            keeping.next = kept.data.len();
        } else if let Some(trailers) = frame.trailers_ref() {
            kept.trailers = Some(trailers.clone());
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        // Replaying: the kept part first.
        if let Some(keeping) = this.kept.as_mut() {
            if let Some(data) = keeping.kept.data.get(keeping.next) {
                keeping.next += 1;
                return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
            }
            if keeping.trailers_next && this.done {
                keeping.trailers_next = false;
                let trailers = keeping.kept.trailers.clone();
                return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
            }
        }
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                this.done = true;
                Poll::Ready(None)
            }
            Some(Err(error)) => {
                this.lost = true;
                Poll::Ready(Some(Err(error)))
            }
            Some(Ok(frame)) => {
                let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
                if !this.lost {
                    this.keep(&frame);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(keeping) = &self.kept {
            if keeping.next < keeping.kept.data.len() || keeping.trailers_next {
                return false;
            }
        }
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let pending: u64 = self.kept.as_ref().map_or(0, |k| {
            let data = &k.kept.data;
            data[k.next.min(data.len())..]
                .iter()
                .map(|d| d.len() as u64)
                .sum()
        });
        let rest = if self.done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + pending);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("kept", &self.kept.as_ref().map(|k| k.kept.len))
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn read_all<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> Vec<u8>
    where
        B::Error: fmt::Debug,
    {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                out.extend_from_slice(&data);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_small_body_is_sent_again_byte_for_byte() {
        let request = Request::put("/")
            .body(chunks(&[b"hello ", b"world"]))
            .unwrap();
        let mut body = prepare(request).into_body();
        // Taken in part, then the backend went away.
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "hello "
        );
        assert!(body.can_replay());
        body.rewind();
        assert_eq!(body.size_hint().lower(), 6);
        assert_eq!(read_all(&mut body).await, b"hello world");
        assert!(body.is_end_stream());

        // Given back to another backend, after all of it was taken.
        body.rewind();
        let (inner, replayed) = body.into_parts().unwrap();
        let mut request = Request::put("/").body(inner).unwrap();
        request.extensions_mut().insert(replayed.unwrap());
        let mut body = prepare(request).into_body();
        assert_eq!(body.size_hint().exact(), Some(11));
        assert!(!body.is_end_stream());
        assert_eq!(read_all(&mut body).await, b"hello world");
    }

    #[tokio::test]
    async fn a_large_or_unsafe_body_is_not_kept() {
        let big = Full::new(Bytes::from(vec![7u8; MAX_REPLAY + 1]));
        let mut body = prepare(Request::put("/").body(big).unwrap()).into_body();
        assert!(body.can_replay(), "nothing taken yet");
        read_all(&mut body).await;
        assert!(!body.can_replay());
        assert!(body.into_parts().is_none());

        // Known to be large only once read: kept until it is too large.
        let mut body = prepare(
            Request::put("/")
                .body(chunks(&[&[1; 40_000], &[2; 40_000]]))
                .unwrap(),
        )
        .into_body();
        body.frame().await;
        assert!(body.can_replay());
        body.frame().await;
        assert!(!body.can_replay());

        let mut body = prepare(Request::post("/").body(chunks(&[b"x"])).unwrap()).into_body();
        body.frame().await;
        assert!(!body.can_replay());
    }
}

//! The idle timeout of HTTP/2 client connections: hyper's HTTP/2 server has none. A
//! connection whose streams are all done for `client_idle_timeout` gets a GOAWAY.
//! (The HTTP/1 server keeps its own, in [`super::h1`].)

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

/// The requests open on one HTTP/2 connection, for its idle timeout: hyper's HTTP/2 server
/// has none of its own (only keep-alive pings), and an HTTP/2 connection has no head to wait
/// for between requests, so the count is kept here. A request counts from the moment its
/// headers reach the service until its response body has been sent or dropped.
#[cfg(feature = "http2")]
#[derive(Debug, Clone)]
pub(crate) struct Streams(tokio::sync::watch::Sender<usize>);

#[cfg(feature = "http2")]
impl Streams {
    pub(crate) fn new() -> Self {
        Streams(tokio::sync::watch::Sender::new(0))
    }

    /// Counts one more request open until the returned guard drops.
    pub(crate) fn open(&self) -> StreamGuard {
        self.0.send_modify(|n| *n += 1);
        StreamGuard(self.0.clone())
    }

    /// Completes once no request has been open for `timeout`.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        let mut open = self.0.subscribe();
        loop {
            if open.wait_for(|n| *n == 0).await.is_err() {
                return;
            }
            // Any change (a request opens, or one opens and ends) starts the wait again.
            tokio::select! {
                () = tokio::time::sleep(timeout) => return,
                _ = open.changed() => {}
            }
        }
    }
}

/// One request open on an HTTP/2 connection: see [`Streams`].
#[cfg(feature = "http2")]
#[derive(Debug)]
pub(crate) struct StreamGuard(tokio::sync::watch::Sender<usize>);

#[cfg(feature = "http2")]
impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[cfg(feature = "http2")]
pin_project! {
    /// A response body that keeps its request open (a [`StreamGuard`]) until it is dropped.
    pub(crate) struct GuardedBody<B> {
        #[pin]
        inner: B,
        guard: StreamGuard,
    }
}

#[cfg(feature = "http2")]
impl<B> GuardedBody<B> {
    pub(crate) fn new(inner: B, guard: StreamGuard) -> Self {
        GuardedBody { inner, guard }
    }
}

#[cfg(feature = "http2")]
impl<B: http_body::Body> http_body::Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(all(test, feature = "http2"))]
mod streams_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_with_no_request_open_for_the_whole_timeout() {
        let streams = Streams::new();
        let timeout = Duration::from_secs(60);
        let start = tokio::time::Instant::now();
        let guard = streams.open();
        let idle = streams.idle_for(timeout);
        tokio::pin!(idle);
        // A request open for two minutes: not idle.
        assert!(tokio::time::timeout(Duration::from_secs(120), &mut idle)
            .await
            .is_err());
        drop(guard);
        idle.await;
        assert_eq!(start.elapsed(), Duration::from_secs(180));
    }
}

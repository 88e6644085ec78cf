//! The idle timeout of keep-alive client connections (HTTP/1), on hyper's header timer.
//!
//! hyper 1.x starts its header-read timer whenever a connection waits for a request head:
//! when it opens, and as soon as a keep-alive connection has finished an exchange
//! (`proto/h1/conn.rs`: going idle sets `notify_read`, and the next read of a head starts
//! the timer). So `header_read_timeout` alone closes an idle keep-alive connection after
//! the header timeout: after 10 s, not after the 60 s of `client_idle_timeout`. And it is
//! hyper's only timer on an HTTP/1 server connection.
//!
//! [`IdleTimer`] is that timer in two phases. Until a byte of the next request arrives (the
//! connection's [`Reads`] count moves), the deadline is `client_idle_timeout` from the
//! start; from that byte on, it is `header_read_timeout` from the byte. (The first head of
//! a connection has `header_read_timeout` from the start: the server hands a connection to
//! hyper only once a byte has come.) No request is in
//! flight while hyper waits for a head, so a connection busy with a request is never cut;
//! and a client trickling its head still has `header_read_timeout` to finish it. The cost:
//! one counter increment per read, one small allocation per connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads that brought bytes, on one connection.
#[derive(Debug, Default)]
pub(crate) struct Reads(AtomicU64);

impl Reads {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pin_project! {
    /// A client connection that counts its reads into [`Reads`].
    #[derive(Debug)]
    pub(crate) struct CountReads<T> {
        #[pin]
        inner: T,
        reads: Arc<Reads>,
    }
}

impl<T> CountReads<T> {
    pub(crate) fn new(inner: T, reads: Arc<Reads>) -> Self {
        CountReads { inner, reads }
    }
}

impl<T: AsyncRead> AsyncRead for CountReads<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let poll = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.reads.0.fetch_add(1, Ordering::Relaxed);
        }
        poll
    }
}

impl<T: AsyncWrite> AsyncWrite for CountReads<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// hyper's timer for one HTTP/1 connection: see the [module docs](self).
#[derive(Debug)]
pub(crate) struct IdleTimer {
    reads: Arc<Reads>,
    idle: Duration,
    head: Duration,
    /// No head has been waited for yet: the first wait is not a keep-alive's idle time.
    first: AtomicBool,
}

impl IdleTimer {
    /// `idle`: the wait for a request's first byte; `head`: from there to its last header.
    pub(crate) fn new(reads: Arc<Reads>, idle: Duration, head: Duration) -> Self {
        IdleTimer {
            reads,
            idle,
            head,
            first: AtomicBool::new(true),
        }
    }

    fn head_timer(&self) -> HeadTimer {
        let now = tokio::time::Instant::now();
        if self.first.swap(false, Ordering::Relaxed) {
            return HeadTimer {
                sleep: tokio::time::sleep_until(now + self.head),
                reads: self.reads.clone(),
                seen: None,
                head: self.head,
            };
        }
        HeadTimer {
            sleep: tokio::time::sleep_until(now + self.idle),
            reads: self.reads.clone(),
            seen: Some(self.reads.get()),
            head: self.head,
        }
    }
}

impl Timer for IdleTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        hyper_util::rt::TokioTimer::new().sleep(duration)
    }

    /// The header timer (hyper's only use of `sleep_until` on an HTTP/1 server
    /// connection); hyper's own deadline is the header timeout from now.
    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(self.head_timer())
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, _deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadTimer>() {
            Some(timer) => timer.restart(self),
            None => *sleep = Box::pin(self.head_timer()),
        }
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

pin_project! {
    /// The wait for a request head: `idle` until its first byte, then `head`.
    struct HeadTimer {
        #[pin]
        sleep: tokio::time::Sleep,
        reads: Arc<Reads>,
        // The read count when the wait began; `None` once a byte has come.
        seen: Option<u64>,
        head: Duration,
    }
}

impl HeadTimer {
    fn restart(self: Pin<&mut Self>, timer: &IdleTimer) {
        let this = self.project();
        *this.seen = Some(this.reads.get());
        this.sleep.reset(tokio::time::Instant::now() + timer.idle);
    }
}

impl Future for HeadTimer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // hyper polls the timer after each read that left the head incomplete.
        if this.seen.is_some_and(|seen| this.reads.get() != seen) {
            *this.seen = None;
            let deadline = tokio::time::Instant::now() + *this.head;
            this.sleep.as_mut().reset(deadline);
        }
        this.sleep.poll(cx)
    }
}

impl Sleep for HeadTimer {}

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

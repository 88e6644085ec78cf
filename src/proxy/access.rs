//! The access log: one line per request on the `tower_lb::access` target, at `info`.
//!
//! Off by default; `RUST_LOG=tower_lb::access=info` turns it on. When it is off, a request
//! pays one check of the callsite's cached interest (`tracing::enabled!`) and nothing else:
//! no clock read, no copy of the path, no allocation.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::uri::Authority;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// The target of the access log's lines.
pub(crate) const TARGET: &str = "tower_lb::access";

/// Whether the access log is on (cheap: the callsite caches the subscriber's interest).
#[inline]
pub(crate) fn enabled() -> bool {
    tracing::enabled!(target: "tower_lb::access", tracing::Level::INFO)
}

/// Which backend answered, set on a response while the access log is on.
#[derive(Debug, Clone)]
pub(crate) struct ServedBy(pub(crate) Authority);

/// The status a line gives a request cancelled before its response (its client went away,
/// or a shutdown cut it): nginx's `499`, as no response was sent.
const CANCELLED: u16 = 499;

/// One request's line, written when its response body ends or is dropped.
#[derive(Debug)]
pub(crate) struct Entry {
    client: SocketAddr,
    method: Method,
    path: String,
    start: Instant,
    backend: Option<Authority>,
    status: u16,
    bytes: u64,
}

impl Entry {
    pub(crate) fn new<B>(client: SocketAddr, request: &Request<B>) -> Box<Entry> {
        Box::new(Entry {
            client,
            method: request.method().clone(),
            path: request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            start: Instant::now(),
            backend: None,
            status: 0,
            bytes: 0,
        })
    }

    /// Takes the status and backend of the response.
    pub(crate) fn respond<B>(&mut self, response: &Response<B>) {
        self.status = response.status().as_u16();
        self.backend = response.extensions().get::<ServedBy>().map(|s| s.0.clone());
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let backend = self.backend.as_ref().map_or("-", |b| b.as_str());
        // No response was taken: the request was cancelled.
        let status = match self.status {
            0 => CANCELLED,
            status => status,
        };
        tracing::info!(
            target: TARGET,
            client = %self.client,
            method = %self.method,
            path = %self.path,
            backend,
            status,
            duration = ?self.start.elapsed(),
            bytes = self.bytes,
            "request"
        );
    }
}

pin_project! {
    /// A response body that counts its bytes for the access log; with no entry (the log is
    /// off), it only passes frames on.
    #[derive(Debug)]
    pub(crate) struct LoggedBody<B> {
        #[pin]
        inner: B,
        entry: Option<Box<Entry>>,
    }
}

impl<B> LoggedBody<B> {
    pub(crate) fn new(inner: B, entry: Option<Box<Entry>>) -> Self {
        LoggedBody { inner, entry }
    }
}

impl<B: Body> Body for LoggedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(entry) = this.entry.as_mut() {
            let ended = match &frame {
                None | Some(Err(_)) => true,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        entry.bytes += bytes::Buf::remaining(data) as u64;
                    }
                    this.inner.is_end_stream()
                }
            };
            if ended {
                // Written as the last frame goes out, not when hyper drops the body.
                this.entry.take();
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

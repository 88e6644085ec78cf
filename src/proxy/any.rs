//! A backend of either protocol, for sets that mix HTTP/1.1 and HTTP/2 backends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::Authority;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::backend::ResponseFuture;
use super::h2::{Http2Backend, Http2Body, Http2ResponseFuture};
use super::{Backend, ReplayBody, UpstreamBody};
use crate::BoxError;

/// The protocol a backend service speaks to its backend, as `/status` shows it.
pub trait BackendProtocol {
    /// `"http1"` or `"http2"`.
    fn protocol(&self) -> &'static str;
}

impl BackendProtocol for Backend {
    fn protocol(&self) -> &'static str {
        "http1"
    }
}

impl<B> BackendProtocol for Http2Backend<B> {
    fn protocol(&self) -> &'static str {
        "http2"
    }
}

/// An HTTP/1.1 [`Backend`] or an HTTP/2 [`Http2Backend`], so that one
/// [`Backends`](crate::Backends) set can hold both (the standalone proxy's
/// `servers[].protocol`). The response body is the backend's own, in an [`Either`].
///
/// The HTTP/1.1 side costs one branch more per call and per body frame, no allocation.
///
/// ```
/// use tower_lb::balance::MakeBackend;
/// use tower_lb::policy::RoundRobin;
/// use tower_lb::proxy::{AnyBackend, BackendProtocol, Client, Http2Client};
/// use tower_lb::Backends;
///
/// let (a, b) = ("127.0.0.1:9001".parse().unwrap(), "127.0.0.1:9002".parse().unwrap());
/// let http1 = AnyBackend::from(Client::new().make_backend(&a));
/// let http2 = AnyBackend::from(Http2Client::<hyper::body::Incoming>::new().make_backend(&b));
/// assert_eq!((http1.protocol(), http2.protocol()), ("http1", "http2"));
/// let backends = Backends::from_services(RoundRobin::new(), [(a, http1), (b, http2)]);
/// # drop(backends);
/// ```
#[derive(Debug)]
pub enum AnyBackend<B> {
    /// HTTP/1.1.
    Http1(Backend),
    /// HTTP/2 over cleartext.
    Http2(Http2Backend<B>),
}

impl<B> Clone for AnyBackend<B> {
    fn clone(&self) -> Self {
        match self {
            AnyBackend::Http1(b) => AnyBackend::Http1(b.clone()),
            AnyBackend::Http2(b) => AnyBackend::Http2(b.clone()),
        }
    }
}

impl<B> AnyBackend<B> {
    /// The backend's address.
    pub fn authority(&self) -> &Authority {
        match self {
            AnyBackend::Http1(b) => b.authority(),
            AnyBackend::Http2(b) => b.authority(),
        }
    }
}

impl<B> BackendProtocol for AnyBackend<B> {
    fn protocol(&self) -> &'static str {
        match self {
            AnyBackend::Http1(b) => b.protocol(),
            AnyBackend::Http2(b) => b.protocol(),
        }
    }
}

impl<B> From<Backend> for AnyBackend<B> {
    fn from(backend: Backend) -> Self {
        AnyBackend::Http1(backend)
    }
}

impl<B> From<Http2Backend<B>> for AnyBackend<B> {
    fn from(backend: Http2Backend<B>) -> Self {
        AnyBackend::Http2(backend)
    }
}

/// The response body of an [`AnyBackend`].
pub type AnyBody<B> = Either<UpstreamBody<ReplayBody<B>>, Http2Body>;

impl<B> Service<Request<B>> for AnyBackend<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<AnyBody<B>>;
    type Error = BoxError;
    type Future = AnyResponseFuture<B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            AnyBackend::Http1(b) => Service::<Request<B>>::poll_ready(b, cx),
            AnyBackend::Http2(b) => b.poll_ready(cx),
        }
    }

    #[inline]
    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self {
            AnyBackend::Http1(b) => AnyResponseFuture {
                inner: Inner::Http1 {
                    future: b.call(request),
                },
            },
            AnyBackend::Http2(b) => AnyResponseFuture {
                inner: Inner::Http2 {
                    future: b.call(request),
                },
            },
        }
    }
}

pin_project! {
    /// Response future of [`AnyBackend`].
    #[derive(Debug)]
    pub struct AnyResponseFuture<B> {
        #[pin]
        inner: Inner<B>,
    }
}

pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner<B> {
        Http1 { #[pin] future: ResponseFuture<B> },
        Http2 { #[pin] future: Http2ResponseFuture },
    }
}

impl<B> Future for AnyResponseFuture<B> {
    type Output = Result<Response<AnyBody<B>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            InnerProj::Http1 { future } => future.poll(cx).map_ok(|r| r.map(Either::Left)),
            InnerProj::Http2 { future } => future.poll(cx).map_ok(|r| r.map(Either::Right)),
        }
    }
}

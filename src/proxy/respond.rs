//! Turning balancer and backend errors into HTTP responses.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::error::{
    BackendError, ConnectError, MalformedResponse, RequestBodyTimeout, ResponseTimeout,
};
use crate::balance::error::{NoHealthyBackend, RequestFault};
use crate::BoxError;

/// The body of a proxied response: the backend's, or a short error text.
pub type ProxyBody<B> = Either<B, Full<Bytes>>;

/// Answers errors with responses instead of closing the connection:
///
/// | error | status |
/// | --- | --- |
/// | [`NoHealthyBackend`] | `503 Service Unavailable` |
/// | [`ConnectError`], [`BackendError`] or any other | `502 Bad Gateway` |
/// | [`ResponseTimeout`] | `504 Gateway Timeout` |
/// | a [`RequestFault`] in its chain (the request's own: its body broke, see [`ClientBodyError`](super::error::ClientBodyError)) | `400 Bad Request` |
/// | the same, for a [`RequestBodyTimeout`] (the client stopped sending its body) | `408 Request Timeout` |
///
/// The body is one line of plain text saying which; the full error goes to the log.
///
/// A gRPC request (HTTP/2 with `content-type: application/grpc…`) is answered the way gRPC
/// clients expect instead: `200` with `grpc-status` `14` (UNAVAILABLE) for a `502` or `503`,
/// `4` (DEADLINE_EXCEEDED) for a `504`, and a `grpc-message`, in the head of a response
/// without a body (a trailers-only response).
#[derive(Debug)]
pub struct ErrorResponses<S> {
    inner: S,
    /// A readiness error of `inner`, answered on the next call.
    unready: Option<BoxError>,
}

impl<S: Clone> Clone for ErrorResponses<S> {
    fn clone(&self) -> Self {
        ErrorResponses::new(self.inner.clone())
    }
}

impl<S> ErrorResponses<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        ErrorResponses {
            inner,
            unready: None,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// A [`Layer`] for [`ErrorResponses`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorResponsesLayer;

impl<S> Layer<S> for ErrorResponsesLayer {
    type Service = ErrorResponses<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponses::new(inner)
    }
}

impl<S, B, RB> Service<Request<B>> for ErrorResponses<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody<RB>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.unready.is_none() {
            if let Err(error) = ready!(self.inner.poll_ready(cx)) {
                // Answered by the next call, which must not reach `inner`.
                self.unready = Some(error.into());
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let grpc = is_grpc(&request);
        match self.unready.take() {
            Some(error) => ResponseFuture {
                inner: None,
                error: Some(error),
                grpc,
            },
            None => ResponseFuture {
                inner: Some(self.inner.call(request)),
                error: None,
                grpc,
            },
        }
    }
}

pin_project! {
    /// Response future of [`ErrorResponses`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        error: Option<BoxError>,
        grpc: bool,
    }
}

/// Whether `request` is a gRPC call: HTTP/2 (so that HTTP/1 requests pay one comparison)
/// with a `content-type` of `application/grpc` or `application/grpc+…`.
fn is_grpc<B>(request: &Request<B>) -> bool {
    request.version() == http::Version::HTTP_2
        && request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| {
                let v = v.as_bytes();
                v.starts_with(b"application/grpc") && matches!(v.get(16), None | Some(b'+' | b';'))
            })
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ProxyBody<RB>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The response goes straight out: it is large, and each move copies it.
        let error: BoxError = match this.inner.as_pin_mut() {
            Some(inner) => match ready!(inner.poll(cx)) {
                Ok(response) => return Poll::Ready(Ok(response.map(Either::Left))),
                Err(error) => error.into(),
            },
            None => this
                .error
                .take()
                .unwrap_or_else(|| "polled after completion".into()),
        };
        Poll::Ready(Ok(if *this.grpc {
            grpc_error_response(&error).map(Either::Right)
        } else {
            error_response(&error).map(Either::Right)
        }))
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// The response for a proxying error (see [`ErrorResponses`]).
pub fn error_response(error: &BoxError) -> Response<Full<Bytes>> {
    let (status, text) = classify(error);
    crate::stats::local_response(status.as_u16());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        tracing::debug!(%error, "no healthy backend");
    } else {
        tracing::warn!(%error, "{}", status);
    }
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The gRPC answer for a proxying error (see [`ErrorResponses`]): `200`, `grpc-status` 14
/// (UNAVAILABLE) where HTTP gets `502` or `503`, 4 (DEADLINE_EXCEEDED) where it gets `504`,
/// 13 (INTERNAL) where it gets `400` (the request's body broke), 4 where it gets `408`,
/// and a `grpc-message`, with no body (trailers-only).
pub fn grpc_error_response(error: &BoxError) -> Response<Full<Bytes>> {
    let (status, text) = classify(error);
    crate::stats::local_response(status.as_u16());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        tracing::debug!(%error, "no healthy backend");
    } else {
        tracing::warn!(%error, "{} (gRPC)", status);
    }
    let code = grpc_code(status);
    // "503 Service Unavailable: no healthy backend\n" → "no healthy backend": printable
    // ASCII without `%`, so it needs no percent-encoding.
    let message = text.split_once(": ").map_or(text, |(_, m)| m).trim_end();
    let mut response = Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from_static(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    response
}

fn classify(error: &BoxError) -> (StatusCode, &'static str) {
    known(error).unwrap_or((StatusCode::BAD_GATEWAY, "502 Bad Gateway\n"))
}

/// gRPC's code for an HTTP status the proxy answers itself (gRPC's own mapping has 400 as
/// INTERNAL, not a retryable UNAVAILABLE).
fn grpc_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => "4",
        StatusCode::BAD_REQUEST => "13",
        _ => "14",
    }
}

/// The [`tonic::Status`] a gRPC client should get for an error of the balancer or of this
/// crate's backend services: `UNAVAILABLE` for no healthy backend, a backend that refused
/// or broke the connection or a malformed answer, `DEADLINE_EXCEEDED` for a response
/// timeout or a request body that stopped arriving, `INTERNAL` for a request whose own
/// body broke (as [`grpc_error_response`] answers them); a stream the backend reset after
/// the call was sent by gRPC's mapping of the reset's reason (`CANCELLED`,
/// `RESOURCE_EXHAUSTED`, `INTERNAL`; `UNAVAILABLE` only for `REFUSED_STREAM`); any other
/// error as tonic maps it ([`tonic::Status::from_error`]). tonic alone sees this crate's
/// errors as `UNKNOWN`, which gRPC clients and their retry policies do not take for the
/// transient failure it is. Map a balanced transport's errors with it:
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_lb::proxy::{grpc_status, Http2Backend};
/// use tower_lb::{policy::RoundRobin, Backends, Balance};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let backends: Backends<String, Http2Backend<tonic::body::Body>, _> =
///     Backends::new(RoundRobin::new());
/// // Hand `transport` to a tonic client: `GreeterClient::new(transport)`.
/// let transport = ServiceBuilder::new()
///     .map_err(grpc_status)
///     .service(Balance::new(backends));
/// # use tower::ServiceExt;
/// let call = transport.oneshot(http::Request::new(tonic::body::Body::empty()));
/// let status = call.await.unwrap_err();
/// assert_eq!(status.code(), tonic::Code::Unavailable); // the set is empty
/// # }
/// ```
#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub fn grpc_status(error: BoxError) -> tonic::Status {
    let Some((status, text)) = known(&error) else {
        return tonic::Status::from_error(error);
    };
    let message = text.split_once(": ").map_or(text, |(_, m)| m).trim_end();
    let code = match grpc_code(status) {
        "4" => tonic::Code::DeadlineExceeded,
        "13" => tonic::Code::Internal,
        _ => h2_reset(&error).unwrap_or(tonic::Code::Unavailable),
    };
    let mut grpc = tonic::Status::new(code, message);
    grpc.set_source(std::sync::Arc::from(error));
    grpc
}

/// The code of a call whose HTTP/2 stream the backend reset, or whose connection broke,
/// once the call was sent: gRPC's mapping of the reset's reason (PROTOCOL-HTTP2.md,
/// "Errors"). Not UNAVAILABLE but for `REFUSED_STREAM` and a broken connection: clients
/// retry UNAVAILABLE, and a server that reset a stream may have acted on the call.
#[cfg(feature = "grpc")]
fn h2_reset(error: &BoxError) -> Option<tonic::Code> {
    let h2 = chain(error).find_map(|e| e.downcast_ref::<h2::Error>())?;
    if h2.is_io() {
        return Some(tonic::Code::Unavailable);
    }
    Some(match h2.reason()? {
        h2::Reason::REFUSED_STREAM => tonic::Code::Unavailable,
        h2::Reason::CANCEL => tonic::Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => tonic::Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => tonic::Code::PermissionDenied,
        _ => tonic::Code::Internal,
    })
}

/// The answer to an error of this crate's services, or `None` for an error it does not
/// know.
fn known(error: &BoxError) -> Option<(StatusCode, &'static str)> {
    // Looked for first, as the backend's error wraps them. The request's own fault (its
    // body broke: a malformed chunked upload, or the client went away in the middle of
    // it), whatever backend it was going to; passive health does not count it either.
    if RequestFault::in_chain(&**error) {
        let stalled = chain(error)
            .filter_map(|e| e.downcast_ref::<RequestFault>())
            .any(|fault| fault.get_ref().is::<RequestBodyTimeout>());
        if stalled {
            return Some((
                StatusCode::REQUEST_TIMEOUT,
                "408 Request Timeout: the request body stopped arriving\n",
            ));
        }
        return Some((
            StatusCode::BAD_REQUEST,
            "400 Bad Request: the request or its body is malformed or incomplete\n",
        ));
    }
    if chain(error).any(|e| e.is::<MalformedResponse>()) {
        return Some((
            StatusCode::BAD_GATEWAY,
            "502 Bad Gateway: the backend's response is malformed\n",
        ));
    }
    for e in chain(error) {
        if e.is::<NoHealthyBackend>() {
            return Some((
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: no healthy backend\n",
            ));
        }
        if e.is::<ResponseTimeout>() {
            return Some((
                StatusCode::GATEWAY_TIMEOUT,
                "504 Gateway Timeout: the backend did not answer in time\n",
            ));
        }
        if e.is::<ConnectError>() {
            return Some((
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: cannot connect to the backend\n",
            ));
        }
        if e.is::<BackendError>() {
            return Some((
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: the backend closed or reset the connection\n",
            ));
        }
    }
    None
}

/// `error` and its sources, outermost first.
fn chain(error: &BoxError) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(Some(&**error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::error::ClientBodyError;

    #[test]
    fn statuses() {
        let cases: [(BoxError, u16); 5] = [
            (NoHealthyBackend::new().into(), 503),
            (
                ResponseTimeout {
                    backend: "a:1".parse().unwrap(),
                    after: std::time::Duration::from_secs(1),
                }
                .into(),
                504,
            ),
            ("anything else".into(), 502),
            // As the HTTP/1 backend passes a broken upload up.
            (
                BackendError {
                    backend: "a:1".parse().unwrap(),
                    source: RequestFault::new(ClientBodyError::new("invalid chunk size")).into(),
                }
                .into(),
                400,
            ),
            (
                BackendError {
                    backend: "a:1".parse().unwrap(),
                    source: RequestFault::new(RequestBodyTimeout {
                        after: std::time::Duration::from_secs(1),
                    })
                    .into(),
                }
                .into(),
                408,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(error_response(&error).status(), status);
        }
        // Which 502: a malformed answer says so, a broken connection says that.
        let text = |error: BoxError| {
            let body = error_response(&error).into_body();
            let bytes =
                futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body));
            String::from_utf8(bytes.unwrap().unwrap().to_bytes().to_vec()).unwrap()
        };
        let backend = || "a:1".parse().unwrap();
        let malformed = BackendError {
            backend: backend(),
            source: MalformedResponse {
                source: "invalid status".into(),
            }
            .into(),
        };
        assert!(text(malformed.into()).contains("response is malformed"));
        let reset = BackendError {
            backend: backend(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
        };
        assert!(text(reset.into()).contains("closed or reset"));
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn grpc_status_codes() {
        use tonic::Code;
        let backend = || "a:1".parse().unwrap();
        let reset = |reason| -> BoxError {
            BackendError {
                backend: backend(),
                source: h2::Error::from(reason).into(),
            }
            .into()
        };
        let cases: [(BoxError, Code); 10] = [
            (NoHealthyBackend::new().into(), Code::Unavailable),
            (
                ResponseTimeout {
                    backend: backend(),
                    after: std::time::Duration::from_secs(1),
                }
                .into(),
                Code::DeadlineExceeded,
            ),
            (
                RequestFault::new(ClientBodyError::new("invalid chunk size")).into(),
                Code::Internal,
            ),
            (
                RequestFault::new(RequestBodyTimeout {
                    after: std::time::Duration::from_secs(1),
                })
                .into(),
                Code::DeadlineExceeded,
            ),
            (
                ConnectError {
                    backend: backend(),
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                }
                .into(),
                Code::Unavailable,
            ),
            (reset(h2::Reason::REFUSED_STREAM), Code::Unavailable),
            (reset(h2::Reason::CANCEL), Code::Cancelled),
            (
                reset(h2::Reason::ENHANCE_YOUR_CALM),
                Code::ResourceExhausted,
            ),
            (reset(h2::Reason::INTERNAL_ERROR), Code::Internal),
            // Not this crate's: tonic's own mapping, which finds a status in the chain.
            (
                Box::new(tonic::Status::permission_denied("no")),
                Code::PermissionDenied,
            ),
        ];
        for (error, code) in cases {
            let shown = error.to_string();
            let status = grpc_status(error);
            assert_eq!(status.code(), code, "{shown}");
        }
        let status = grpc_status(NoHealthyBackend::new().into());
        assert_eq!(status.message(), "no healthy backend");
        let source = std::error::Error::source(&status).expect("the error as source");
        assert!(source.is::<NoHealthyBackend>(), "{source:?}");
    }

    #[test]
    fn grpc_statuses() {
        let cases: [(BoxError, &str, &str); 5] = [
            (NoHealthyBackend::new().into(), "14", "no healthy backend"),
            (
                ResponseTimeout {
                    backend: "a:1".parse().unwrap(),
                    after: std::time::Duration::from_secs(1),
                }
                .into(),
                "4",
                "the backend did not answer in time",
            ),
            ("anything else".into(), "14", "502 Bad Gateway"),
            (
                RequestFault::new(ClientBodyError::new("invalid chunk size")).into(),
                "13",
                "the request or its body is malformed or incomplete",
            ),
            (
                RequestFault::new(RequestBodyTimeout {
                    after: std::time::Duration::from_secs(1),
                })
                .into(),
                "4",
                "the request body stopped arriving",
            ),
        ];
        for (error, code, message) in cases {
            let response = grpc_error_response(&error);
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["grpc-status"], code);
            assert_eq!(response.headers()["grpc-message"], message);
            assert_eq!(response.headers()["content-type"], "application/grpc");
        }
    }

    #[test]
    fn grpc_requests_are_http2_with_a_grpc_content_type() {
        let request = |version, content_type: &str| {
            let mut r = Request::post("/x")
                .header("content-type", content_type)
                .body(())
                .unwrap();
            *r.version_mut() = version;
            r
        };
        use http::Version;
        assert!(is_grpc(&request(Version::HTTP_2, "application/grpc")));
        assert!(is_grpc(&request(Version::HTTP_2, "application/grpc+proto")));
        assert!(!is_grpc(&request(Version::HTTP_2, "application/grpc-web")));
        assert!(!is_grpc(&request(Version::HTTP_2, "application/json")));
        assert!(!is_grpc(&request(Version::HTTP_11, "application/grpc")));
    }
}

//! Error types of the HTTP backend service, and the responses they become.

use std::fmt;
use std::time::Duration;

use http::uri::Authority;

/// The connection to a backend could not be opened (refused, unreachable, or not within
/// `connect_timeout`). The request was not sent: the balancer retries it on another backend.
/// Answered with `502 Bad Gateway`.
#[derive(Debug)]
pub struct ConnectError {
    pub(crate) backend: Authority,
    pub(crate) source: std::io::Error,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot connect to backend {}: {}",
            self.backend, self.source
        )
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The backend did not send response headers within `response_timeout`.
/// Answered with `504 Gateway Timeout`.
#[derive(Debug)]
pub struct ResponseTimeout {
    pub(crate) backend: Authority,
    pub(crate) after: Duration,
}

impl fmt::Display for ResponseTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend {} sent no response within {:?}",
            self.backend, self.after
        )
    }
}

impl std::error::Error for ResponseTimeout {}

/// The client stopped sending its request body: none of it arrived for as long as
/// `response_timeout` while the backend waited for it. The request's fault, not the
/// backend's (it comes inside a [`RequestFault`](crate::balance::error::RequestFault)), so
/// passive health does not count it and it is not retried. Answered with
/// `408 Request Timeout`, as nginx answers a client body that times out.
#[derive(Debug)]
pub struct RequestBodyTimeout {
    pub(crate) after: Duration,
}

impl fmt::Display for RequestBodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client sent nothing of its request body for {:?}",
            self.after
        )
    }
}

impl std::error::Error for RequestBodyTimeout {}

/// The backend reset or closed the connection, or sent something that is not HTTP.
/// Answered with `502 Bad Gateway`.
#[derive(Debug)]
pub struct BackendError {
    pub(crate) backend: Authority,
    pub(crate) source: crate::BoxError,
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend {} failed: {}", self.backend, self.source)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// The backend's response head is not one this proxy forwards: not HTTP, a malformed field
/// or status, ambiguous framing, or too large. It comes inside a [`BackendError`]; the
/// answer is `502 Bad Gateway` saying so.
#[derive(Debug)]
pub struct MalformedResponse {
    pub(crate) source: crate::BoxError,
}

impl fmt::Display for MalformedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed response head: {}", self.source)
    }
}

impl std::error::Error for MalformedResponse {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// The client's request body failed: the client went away in the middle of it, or broke
/// its framing (a malformed chunked upload). The fault of the request, not of the backend
/// it was going to: the backend services of this crate pass it up inside a
/// [`RequestFault`](crate::balance::error::RequestFault), which passive health does not
/// count against the backend. A service of your own that reads the body does the same.
#[derive(Debug)]
pub struct ClientBodyError {
    pub(crate) source: crate::BoxError,
}

impl ClientBodyError {
    pub(crate) fn new(source: impl Into<crate::BoxError>) -> Self {
        ClientBodyError {
            source: source.into(),
        }
    }
}

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reading the client's request body failed: {}",
            self.source
        )
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

//! How the server answers a request it refuses: the status, a one-line reason, and the
//! connection closed.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::framing::FramingError;

/// Why the proxy answers a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The request's framing (or an earlier request's on the connection) breaks the rules.
    Framing(FramingError),
}

impl Refusal {
    /// The status of the answer.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Refusal::Framing(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Refusal::Framing(error) => error.as_str(),
        }
    }

    /// The answer: the status, a one-line body, and `Connection: close`.
    pub(crate) fn response<B>(self) -> Response<Either<B, Full<Bytes>>> {
        let status = self.status();
        let text = format!(
            "{} {}: {}\n",
            status.as_str(),
            status.canonical_reason().unwrap_or_default(),
            self.reason()
        );
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(text))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

//! The codec's parsers and checks, reachable for the fuzz targets (`fuzz/`) and the
//! differential test (`tests/differential.rs`). Not part of the API: hidden, unstable.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Body;

use super::body::Framing;
use super::chunked::{decode_chunk, Chunk};
use crate::BoxError;

/// What the server's reading of a connection's bytes, fed in `parts`, made of them: the
/// request heads it read, and the first it refused (its index and the reason).
pub fn scan_requests<'a>(
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> (u64, Option<(u64, &'static str)>) {
    let input: Vec<u8> = parts.into_iter().flatten().copied().collect();
    super::serve::scan(&input)
}

/// `name` as the codec reads a field name, to compare with `HeaderName::from_bytes`.
pub fn field_name(name: &[u8]) -> Result<http::HeaderName, http::header::InvalidHeaderName> {
    super::name::field_name(name)
}

/// Why the server would refuse `request` by the Host, target and method rules: the
/// status and the reason.
pub fn check_request<B>(request: &Request<B>) -> Result<(), (StatusCode, &'static str)> {
    super::request::check_request(request).map_err(|r| (r.status(), r.reason()))
}

/// The head `request` goes to a backend with, the backend's address being `backend`.
pub fn encode_head<B: Body>(request: &Request<B>, backend: &str) -> Option<Bytes> {
    let host = HeaderValue::from_str(backend).ok()?;
    Some(super::encode_head(request, &host, None).bytes)
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status.
    pub status: StatusCode,
    /// The fields forwarded.
    pub headers: HeaderMap,
    /// `"empty"`, `"length N"`, `"chunked"` or `"close"`.
    pub framing: String,
    /// Whether the connection may carry another request.
    pub keep_alive: bool,
}

/// The response head at the front of `buf` (taken off it), `None` if incomplete.
pub fn parse_response_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, BoxError> {
    let Some(p) = super::parse::parse_head(buf, head_request)? else {
        return Ok(None);
    };
    let framing = match p.framing {
        Framing::Empty => "empty".to_owned(),
        Framing::Length(n) => format!("length {n}"),
        Framing::Chunked(_) => "chunked".to_owned(),
        Framing::Close => "close".to_owned(),
    };
    Ok(Some(ResponseHead {
        status: p.parts.status,
        headers: p.parts.headers,
        framing,
        keep_alive: p.keep_alive,
    }))
}

/// A chunked body as the decoder read it.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    /// The data, joined.
    pub data: Vec<u8>,
    /// The trailers, if any were forwarded.
    pub trailers: Option<HeaderMap>,
    /// Whether the body ended.
    pub done: bool,
    /// The bytes after the body.
    pub rest: Vec<u8>,
}

/// A chunked body fed in `parts`, or the decoder's error.
pub fn decode_chunked<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Result<Decoded, BoxError> {
    let mut state = Chunk::Size;
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), None);
    for part in parts {
        buf.extend_from_slice(part);
        while let Some(frame) = decode_chunk(&mut state, &mut buf)? {
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
    }
    Ok(Decoded {
        data,
        trailers,
        done: state == Chunk::Done,
        rest: buf.to_vec(),
    })
}

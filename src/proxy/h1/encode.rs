//! The request as it goes to the backend: its head, encoded once (and again for another
//! backend), and its body, written as it streams, chunked with its trailers when its
//! length is not known.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request};
use http_body::Body;
use tokio::net::TcpStream;

use super::framing::forbidden_trailer;
use super::write::poll_write_with;
use super::MAX_HEADERS;
use crate::balance::error::RequestFault;
use crate::proxy::headers::{forwarded_for_value, HopByHop, CONNECTION_UPGRADE, X_FORWARDED_FOR};
use crate::BoxError;

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upload {
    None,
    Length,
    Chunked,
}

/// The request head, encoded, with what is needed to send it again.
pub(crate) struct Head {
    /// Shared, so that sending it again costs no copy.
    pub(super) bytes: Bytes,
    pub(super) upload: Upload,
    pub(super) head_request: bool,
    /// Safe to send twice (RFC 9110 §9.2.2).
    pub(super) idempotent: bool,
    /// Asks for an upgrade (WebSocket): sent with `Upgrade` and `Connection: upgrade`; a
    /// `101` answer hands the connection over (see `crate::proxy::upgrade`).
    pub(crate) upgrade: bool,
}

/// Encodes `request`'s head for the backend, rewritten as a reverse proxy forwards it:
/// origin form, HTTP/1.1, hop-by-hop fields left out, `client` appended to
/// `X-Forwarded-For`, `host` when the request has no `Host`; and the framing its body
/// needs. A request whose target carries an authority (absolute form, `GET
/// http://a.example/x`, or an HTTP/2 request's `:authority`) goes with that authority as
/// its `Host` (RFC 9112 §3.2.2), any `Host` field it had left out. The request itself is
/// not changed: editing its `HeaderMap` (removals, an entry for `X-Forwarded-For`, a lookup
/// for `Host`) cost more than writing the result directly.
pub(crate) fn encode_head<B: Body>(
    request: &Request<B>,
    host: &HeaderValue,
    client: Option<IpAddr>,
) -> Head {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    // Origin form (`/path?query`), whatever form the client used. `path()` is `/` for the
    // empty path of `http://a.example?q` (found by the request_head fuzz target: the
    // query alone, `GET ?q`, is no request target).
    let uri = request.uri();
    out.extend_from_slice(uri.path().as_bytes());
    if let Some(query) = uri.query() {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The target's authority, without any user information (deprecated, RFC 9110 §4.2.4).
    let target_host = request.uri().authority().map(|a| {
        let a = a.as_str();
        a.rsplit_once('@').map_or(a, |(_, host)| host)
    });
    if let Some(target_host) = target_host {
        field(&mut out, b"host", target_host.as_bytes());
    }
    let headers = request.headers();
    let mut hop = HopByHop::of(headers);
    if hop.upgrade() && !request.body().is_end_stream() {
        // An upgrade with a body is not one (the connection would switch mid-body).
        hop.refuse_upgrade();
    }
    let upgrade = hop.upgrade();
    let (mut has_host, mut has_length, mut forwarded) = (target_host.is_some(), false, false);
    for (name, value) in headers {
        if hop.drops(name) {
            continue;
        }
        if client.is_some() && name == X_FORWARDED_FOR {
            // Joined with the client below.
            forwarded = true;
            continue;
        }
        if name == header::HOST {
            if target_host.is_some() {
                continue;
            }
            has_host = true;
        }
        has_length |= name == header::CONTENT_LENGTH;
        field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !has_host {
        field(&mut out, b"host", host.as_bytes());
    }
    if upgrade {
        field(&mut out, b"connection", CONNECTION_UPGRADE.as_bytes());
    }
    if let Some(client) = client {
        out.extend_from_slice(b"x-forwarded-for: ");
        let existing = forwarded.then(|| headers.get_all(X_FORWARDED_FOR));
        forwarded_for_value(&mut out, existing.into_iter().flatten(), client);
        out.extend_from_slice(b"\r\n");
    }
    let body = request.body();
    let upload = if body.is_end_stream() {
        if !has_length
            && matches!(
                *request.method(),
                Method::POST | Method::PUT | Method::PATCH
            )
        {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Upload::None
    } else if has_length {
        Upload::Length
    } else if let Some(n) = body.size_hint().exact() {
        field(&mut out, b"content-length", n.to_string().as_bytes());
        Upload::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Upload::Chunked
    };
    out.extend_from_slice(b"\r\n");
    let method = request.method();
    Head {
        bytes: Bytes::from(out),
        upload,
        head_request: method == Method::HEAD,
        idempotent: matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        ),
        upgrade,
    }
}

/// Writes one header line.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body: `0`, the trailer fields that may be forwarded, and
/// the blank line.
pub(super) fn last_chunk(trailers: Option<&HeaderMap>) -> Bytes {
    let Some(trailers) = trailers.filter(|t| !t.is_empty()) else {
        return Bytes::from_static(b"0\r\n\r\n");
    };
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        if !forbidden_trailer(name) {
            field(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

impl Head {
    /// The request again, as it went to the backend whose `Host` is `backend`, for another
    /// backend: rebuilt from the encoded head (an error path only). Its `X-Forwarded-For`
    /// already names the client, and a `Host` this proxy added for `backend` is left out
    /// (the next backend adds its own). `None` if the head does not parse, which the
    /// encoder never produces.
    pub(crate) fn request_again<B>(&self, body: B, backend: &HeaderValue) -> Option<Request<B>> {
        let mut fields = vec![httparse::EMPTY_HEADER; MAX_HEADERS + 64];
        let mut parsed = httparse::Request::new(&mut fields);
        if !matches!(parsed.parse(&self.bytes), Ok(httparse::Status::Complete(_))) {
            return None;
        }
        let mut request = Request::builder().method(parsed.method?).uri(parsed.path?);
        for f in parsed.headers.iter() {
            if f.name.eq_ignore_ascii_case("host") && f.value == backend.as_bytes() {
                continue;
            }
            request = request.header(f.name, f.value);
        }
        request.body(body).ok()
    }
}

/// The request body still to be sent, and the bytes of it (or of the head) not yet written.
pub(super) struct Sender<B> {
    pub(super) body: Option<B>,
    pub(super) upload: Upload,
    pub(super) pending: Bytes,
    /// The body once it has ended, kept until the response head: a request that failed
    /// before an answer goes back with its body (see `exchange`).
    pub(super) ended: Option<B>,
    /// Trailers of a chunked body, written with its last chunk. (Boxed: the sender is
    /// part of every response body, and moved with it.)
    pub(super) trailers: Option<Box<HeaderMap>>,
    /// Bytes went out since the exchange last looked: the response timeout starts again.
    pub(super) progressed: bool,
}

impl<B> Sender<B>
where
    B: Body + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(body: B, head: &Head) -> Self {
        Sender {
            body: Some(body),
            upload: head.upload,
            pending: head.bytes.clone(),
            ended: None,
            trailers: None,
            progressed: false,
        }
    }

    /// Writes what it can. `Ready(Ok)` when the request is sent in full.
    pub(super) fn poll_send(
        &mut self,
        io: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), BoxError>> {
        loop {
            while !self.pending.is_empty() {
                let pending = &self.pending;
                let n = ready!(poll_write_with(io, cx, || io.try_write(pending)))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.pending.advance(n);
                self.progressed = true;
            }
            if self.upload == Upload::None {
                return Poll::Ready(Ok(()));
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        if data.is_empty() {
                            continue;
                        }
                        self.pending = match self.upload {
                            Upload::Chunked => {
                                let mut chunk = Vec::with_capacity(data.len() + 16);
                                chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                                chunk.extend_from_slice(&data);
                                chunk.extend_from_slice(b"\r\n");
                                Bytes::from(chunk)
                            }
                            _ => data,
                        };
                    }
                    // Trailers go with the last chunk; a body framed by its length has no
                    // place for them.
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            match &mut self.trailers {
                                Some(all) => all.extend(trailers),
                                None => self.trailers = Some(Box::new(trailers)),
                            }
                        }
                    }
                },
                // The request's own failure: not the backend's (see `RequestFault`).
                Some(Err(e)) => return Poll::Ready(Err(RequestFault::new(e).into())),
                None => {
                    self.ended = self.body.take();
                    if self.upload == Upload::Chunked {
                        self.pending = last_chunk(self.trailers.take().as_deref());
                    }
                }
            }
        }
    }

    /// All written that was taken, and the body's last poll found nothing: the request
    /// waits on its client, not on the backend.
    pub(super) fn awaits_body(&self) -> bool {
        self.pending.is_empty() && self.upload != Upload::None && self.body.is_some()
    }

    pub(super) fn done(&self) -> bool {
        self.pending.is_empty() && (self.upload == Upload::None || self.body.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_keep_upgrade_and_connection_upgrade() {
        use http_body_util::{Empty, Full};
        let request = Request::get("/chat")
            .header("host", "h")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "k")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            encoded(&request, None),
            "GET /chat HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\nsec-websocket-key: k\r\n\
             connection: upgrade\r\n\r\n"
        );
        // With a body, it is no upgrade: `Upgrade` is dropped as hop-by-hop.
        let request = Request::post("/p")
            .header("host", "h")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap();
        let host = HeaderValue::from_static("backend:9001");
        let head = encode_head(&request, &host, None);
        assert!(!head.upgrade);
        assert_eq!(
            String::from_utf8(head.bytes.to_vec()).unwrap(),
            "POST /p HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\n\r\n"
        );
    }

    fn encoded<B: Body>(request: &Request<B>, client: Option<&str>) -> String {
        let host = HeaderValue::from_static("backend:9001");
        let head = encode_head(request, &host, client.map(|c| c.parse().unwrap()));
        String::from_utf8(head.bytes.to_vec()).unwrap()
    }

    #[test]
    fn heads_are_rewritten_as_they_are_encoded() {
        use http_body_util::{Empty, Full};
        let request = Request::get("http://example.com/a?b=1")
            .header("host", "example.com")
            .header("connection", "keep-alive, X-Secret")
            .header("x-secret", "1")
            .header("te", "trailers")
            .header("x-forwarded-for", "203.0.113.9")
            .header("accept", "*/*")
            .header("x-forwarded-for", "10.0.0.1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let before = request.headers().clone();
        assert_eq!(
            encoded(&request, Some("127.0.0.7")),
            "GET /a?b=1 HTTP/1.1\r\nhost: example.com\r\naccept: */*\r\n\
             x-forwarded-for: 203.0.113.9, 10.0.0.1, 127.0.0.7\r\n\r\n"
        );
        // The request itself is left as it was.
        assert_eq!(request.headers(), &before);

        // Without a client address, X-Forwarded-For goes as it came; without Host, the
        // backend's authority is sent.
        let request = Request::post("/p")
            .header("x-forwarded-for", "203.0.113.9")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            encoded(&request, None),
            "POST /p HTTP/1.1\r\nx-forwarded-for: 203.0.113.9\r\nhost: backend:9001\r\n\
             content-length: 0\r\n\r\n"
        );

        // A Content-Length that Connection names is not the body's framing.
        let request = Request::put("/p")
            .header("host", "h")
            .header("connection", "content-length")
            .header("content-length", "2")
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap();
        assert_eq!(
            encoded(&request, Some("::1")),
            "PUT /p HTTP/1.1\r\nhost: h\r\nx-forwarded-for: ::1\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn an_absolute_target_becomes_origin_form_and_its_authority_the_host() {
        use http_body_util::Empty;
        let request = Request::get("http://user@a.example:8080/x?y")
            .header("host", "other.example")
            .header("accept", "*/*")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            encoded(&request, None),
            "GET /x?y HTTP/1.1\r\nhost: a.example:8080\r\naccept: */*\r\n\r\n"
        );
        let request = Request::get("http://a.example")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            encoded(&request, None),
            "GET / HTTP/1.1\r\nhost: a.example\r\n\r\n"
        );
        // A query without a path (the request_head fuzz target's first crash).
        let request = Request::get("http://bs?q")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            encoded(&request, None),
            "GET /?q HTTP/1.1\r\nhost: bs\r\n\r\n"
        );
        let request = Request::options("*").body(Empty::<Bytes>::new()).unwrap();
        assert_eq!(
            encoded(&request, Some("::1")),
            "OPTIONS * HTTP/1.1\r\nhost: backend:9001\r\nx-forwarded-for: ::1\r\n\r\n"
        );
    }

    #[test]
    fn the_last_chunk_carries_the_trailers_that_may_be_forwarded() {
        assert_eq!(&last_chunk(None)[..], b"0\r\n\r\n");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        trailers.insert("content-length", HeaderValue::from_static("5"));
        trailers.append("x-more", HeaderValue::from_static("1"));
        assert_eq!(
            &last_chunk(Some(&trailers))[..],
            b"0\r\nx-checksum: abc\r\nx-more: 1\r\n\r\n"
        );
    }
}

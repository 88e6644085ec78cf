//! An HTTP/1.1 connection to a backend, driven by the task that serves the client.
//!
//! hyper's client gives every upstream connection its own task and hands each request and
//! response body across a channel. For a proxy that costs two task hand-offs per request
//! and about 12,000 instructions (measured with callgrind; see the README). Here the
//! request is written and the response read by the future of the request itself, and the
//! response body reads the upstream socket directly when the server polls it, as pingora
//! does.
//!
//! Parsing uses `httparse` (hyper's parser); framing follows RFC 9112 §6: no body for
//! `HEAD`, 1xx, 204 and 304; chunked when the last transfer coding is chunked; else
//! `Content-Length`; else until the connection closes. A connection is pooled again only
//! when the response ended cleanly, the request body was sent in full, and neither side
//! asked to close.

use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::headers::{
    forwarded_for_value, is_hop_by_hop_in, HopByHop, CONNECTION_UPGRADE, X_FORWARDED_FOR,
};
use crate::BoxError;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Headers per response head.
const MAX_HEADERS: usize = 100;
/// Read buffer reserve per read.
const READ_SIZE: usize = 8 * 1024;

/// Idle connections to one backend, most recently used last.
#[derive(Debug)]
pub(crate) struct Pool {
    idle: std::sync::Mutex<Vec<Conn>>,
    max_idle: usize,
}

impl Pool {
    pub(crate) fn new(max_idle: usize) -> Self {
        Pool {
            idle: std::sync::Mutex::new(Vec::new()),
            max_idle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A usable idle connection, dropping the ones the backend has closed.
    pub(crate) fn checkout(&self, cx: &mut Context<'_>) -> Option<Conn> {
        let mut idle = self.lock();
        while let Some(conn) = idle.pop() {
            if conn.is_usable(cx) {
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn checkin(&self, conn: Conn) {
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// An open connection to a backend.
pub(crate) struct Conn {
    io: TcpStream,
    rbuf: BytesMut,
    /// Has carried a request before (a failure on it may be a stale keep-alive).
    reused: bool,
    /// The response timeout, kept with the connection and moved forward for each request.
    /// A new `Sleep` per request is inserted into and removed from tokio's timer wheel
    /// every time; moving a registered deadline later is one atomic operation, and the
    /// wheel sees the timer again only when its first deadline passes.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    pub(crate) fn new(io: TcpStream) -> Self {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_SIZE),
            reused: false,
            timer: None,
        }
    }

    /// Starts the response timer: it fires at `deadline` unless armed again before.
    fn arm(&mut self, deadline: Instant) {
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    /// Whether the armed deadline has passed; registers `cx` to be woken when it does.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// Whether an idle connection can take a request: it must have nothing to read (data
    /// or EOF from an idle backend means it is closing or broken). Uses the reactor's
    /// cached readiness, without a system call.
    pub(crate) fn is_usable(&self, cx: &mut Context<'_>) -> bool {
        self.rbuf.is_empty() && self.io.poll_read_ready(cx).is_pending()
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.io.peer_addr().ok())
            .finish()
    }
}

/// Why an exchange failed. (The request body comes back with it when the request may be
/// sent again: idempotent, nothing of its body consumed, no byte of an answer received.)
#[derive(Debug)]
pub(crate) struct ExchangeError {
    pub(crate) error: BoxError,
    /// Not the connection's first exchange: closed before an answer, it may have been a
    /// stale keep-alive rather than a backend gone away.
    pub(crate) reused: bool,
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upload {
    None,
    Length,
    Chunked,
}

/// The request head, encoded, with what is needed to send it again.
pub(crate) struct Head {
    /// Shared, so that sending it again costs no copy.
    bytes: Bytes,
    upload: Upload,
    head_request: bool,
    /// Safe to send twice (RFC 9110 §9.2.2).
    idempotent: bool,
    /// Asks for an upgrade (WebSocket): sent with `Upgrade` and `Connection: upgrade`; a
    /// `101` answer hands the connection over (see `super::upgrade`).
    pub(crate) upgrade: bool,
}

/// Encodes `request`'s head for the backend, rewritten as a reverse proxy forwards it:
/// origin form, HTTP/1.1, hop-by-hop fields left out, `client` appended to
/// `X-Forwarded-For`, `host` when the request has no `Host`; and the framing its body
/// needs. The request itself is not changed: editing its `HeaderMap` (removals, an entry
/// for `X-Forwarded-For`, a lookup for `Host`) cost more than writing the result directly.
pub(crate) fn encode_head<B: Body>(
    request: &Request<B>,
    host: &HeaderValue,
    client: Option<IpAddr>,
) -> Head {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    // Origin form (`/path?query`), whatever form the client used.
    match request.uri().path_and_query() {
        Some(p) => out.extend_from_slice(p.as_str().as_bytes()),
        None => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = request.headers();
    let mut hop = HopByHop::of(headers);
    if hop.upgrade() && !request.body().is_end_stream() {
        // An upgrade with a body is not one (the connection would switch mid-body).
        hop.refuse_upgrade();
    }
    let upgrade = hop.upgrade();
    let (mut has_host, mut has_length, mut forwarded) = (false, false, false);
    for (name, value) in headers {
        if hop.drops(name) {
            continue;
        }
        if client.is_some() && name == X_FORWARDED_FOR {
            // Joined with the client below.
            forwarded = true;
            continue;
        }
        has_host |= name == header::HOST;
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
struct Sender<B> {
    body: Option<B>,
    upload: Upload,
    pending: Bytes,
    /// The body once it has ended, kept until the response head: a request that failed
    /// before an answer goes back with its body (see `exchange`).
    ended: Option<B>,
}

impl<B> Sender<B>
where
    B: Body + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Writes what it can. `Ready(Ok)` when the request is sent in full.
    fn poll_send(
        &mut self,
        io: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), BoxError>> {
        loop {
            while !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.pending.advance(n);
            }
            if self.upload == Upload::None {
                return Poll::Ready(Ok(()));
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
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
                    // Trailers are dropped: not forwarded.
                }
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                None => {
                    self.ended = self.body.take();
                    if self.upload == Upload::Chunked {
                        self.pending = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
            }
        }
    }

    fn done(&self) -> bool {
        self.pending.is_empty() && (self.upload == Upload::None || self.body.is_none())
    }
}

/// Sends `head` and `body` on `conn` and reads the response head, which must arrive by
/// `deadline`. The response body reads on from the same connection, and puts it back in
/// `pool` when it is reusable. On failure, the body comes back with the error when the
/// request may be sent again (idempotent, no byte of an answer, no timeout), taken in
/// part or not: whether it can be sent again from its start is the body's to say
/// (`replay::ReplayBody`).
pub(crate) async fn exchange<B>(
    mut conn: Conn,
    head: &Head,
    body: B,
    pool: Arc<Pool>,
    deadline: Instant,
) -> Result<Response<UpstreamBody<B>>, (ExchangeError, Option<B>)>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let reused = conn.reused;
    conn.reused = true;
    let mut sender = Sender {
        body: Some(body),
        upload: head.upload,
        pending: head.bytes.clone(),
        ended: None,
    };
    conn.arm(deadline);
    let fail = |error: BoxError, sender: &mut Sender<B>, conn: &Conn| {
        let timed_out = error.is::<Elapsed>();
        let retryable = !timed_out && head.idempotent && conn.rbuf.is_empty();
        let body = retryable.then(|| sender.body.take().or(sender.ended.take()));
        let body = body.flatten();
        (ExchangeError { error, reused }, body)
    };
    let parsed = std::future::poll_fn(|cx| {
        let poll = poll_head(&mut conn, &mut sender, head, cx);
        if poll.is_pending() && conn.poll_expired(cx) {
            return Poll::Ready(Err(Elapsed.into()));
        }
        poll
    })
    .await;
    let parsed = match parsed {
        Ok(parsed) if parsed.status == StatusCode::SWITCHING_PROTOCOLS && !head.upgrade => {
            let error = "101 to a request that asked for no upgrade".into();
            return Err((ExchangeError { error, reused }, None));
        }
        Ok(parsed) => parsed,
        Err(error) => return Err(fail(error, &mut sender, &conn)),
    };
    sender.ended = None;
    let mut response = Response::new(());
    *response.status_mut() = parsed.status;
    *response.version_mut() = parsed.version;
    *response.headers_mut() = parsed.headers;
    let body = UpstreamBody {
        conn: Some(conn),
        framing: parsed.framing,
        keep_alive: parsed.keep_alive,
        sender,
        pool,
    };
    Ok(response.map(|()| body).map(UpstreamBody::settle))
}

/// Writes what it can of the request and reads until a response head is complete. Write
/// and read together: a backend may answer before it has read the whole body.
fn poll_head<B>(
    conn: &mut Conn,
    sender: &mut Sender<B>,
    head: &Head,
    cx: &mut Context<'_>,
) -> Poll<Result<Parsed, BoxError>>
where
    B: Body + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    if !sender.done() {
        if let Poll::Ready(Err(e)) = sender.poll_send(&mut conn.io, cx) {
            return Poll::Ready(Err(e));
        }
    }
    loop {
        if let Some(parsed) = parse_head(&mut conn.rbuf, head.head_request)? {
            return Poll::Ready(Ok(parsed));
        }
        let n = ready!(poll_read(conn, cx))?;
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            )
            .into()));
        }
    }
}

/// The response head did not arrive in time.
#[derive(Debug)]
pub(crate) struct Elapsed;

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("response timeout")
    }
}

impl std::error::Error for Elapsed {}

fn poll_read(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    conn.rbuf.reserve(READ_SIZE);
    let read = pin!(conn.io.read_buf(&mut conn.rbuf));
    read.poll(cx)
}

struct Parsed {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Parses a response head from the front of `buf`, skipping 1xx informational heads.
/// `None` if more bytes are needed.
///
/// One pass over the raw fields finds the framing and keep-alive, and leaves out the
/// hop-by-hop fields (RFC 9110 §7.6.1, and those that `Connection` names), so the head is
/// ready to forward.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, BoxError> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        // The limit holds however the head arrived: one read can bring in all of it.
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots)?
        {
            httparse::Status::Complete(len) if len <= MAX_HEAD => len,
            httparse::Status::Partial if buf.len() <= MAX_HEAD => return Ok(None),
            _ => return Err("response head too large".into()),
        };
        let code = res.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)?;
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        if status.is_informational() && code != 101 {
            buf.advance(len);
            continue;
        }

        // `101 Switching Protocols`: the connection is handed over; its `Upgrade` goes on.
        let switching = code == 101;
        let mut length: Option<u64> = None;
        let mut chunked: Option<bool> = None;
        let mut close = version != Version::HTTP_11 || switching;
        // Fields that `Connection` names; left out once all of them are known.
        let mut hop = HopByHop::default();
        // Header values are slices of the head, shared rather than copied.
        let base = buf.as_ptr() as usize;
        let mut spans: Vec<(HeaderName, usize, usize)> = Vec::with_capacity(res.headers.len());
        for h in res.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())?;
            if name == header::CONTENT_LENGTH {
                let n = framing_number(h.value.trim_ascii(), 10)
                    .ok_or("invalid Content-Length in response")?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length in response".into());
                }
                length = Some(n);
            } else if name == header::TRANSFER_ENCODING {
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                continue;
            } else if name == header::CONNECTION {
                close |= hop.add_connection(h.value);
                continue;
            } else if is_hop_by_hop_in(&name, switching) {
                continue;
            }
            let start = h.value.as_ptr() as usize - base;
            spans.push((name, start, start + h.value.len()));
        }
        if chunked.is_some() {
            // Transfer-Encoding overrides Content-Length, which an intermediary must
            // remove before forwarding (RFC 9112 §6.3).
            spans.retain(|(name, ..)| name != header::CONTENT_LENGTH);
        }
        if !hop.names_none() {
            spans.retain(|(name, ..)| !hop.names(name));
        }
        let framing = if switching {
            // Not a body: what follows belongs to the upgraded protocol.
            Framing::Close
        } else if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(true), _) => Framing::Chunked(Chunk::Size),
                (Some(false), _) | (None, None) => Framing::Close,
                (None, Some(0)) => Framing::Empty,
                (None, Some(n)) => Framing::Length(n),
            }
        };

        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for (name, start, end) in spans {
            headers.append(
                name,
                HeaderValue::from_maybe_shared(head.slice(start..end))?,
            );
        }
        if switching {
            headers.insert(header::CONNECTION, CONNECTION_UPGRADE);
        }
        return Ok(Some(Parsed {
            status,
            version,
            headers,
            framing,
            keep_alive: !close,
        }));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// A response body read straight from the backend connection.
pub struct UpstreamBody<B> {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    sender: Sender<B>,
    pool: Arc<Pool>,
}

impl<B> fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl<B> UpstreamBody<B>
where
    B: Body + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// An empty body ends at once: its connection goes back to the pool now.
    fn settle(mut self) -> Self {
        if self.framing == Framing::Empty {
            self.finish();
        }
        self
    }

    fn finish(&mut self) {
        self.framing = Framing::Empty;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && self.sender.done() && conn.rbuf.is_empty() {
                self.pool.checkin(conn);
            }
        }
    }

    fn ended(&self) -> bool {
        matches!(self.framing, Framing::Empty | Framing::Chunked(Chunk::Done))
    }

    /// The connection of a `101` answer, with the bytes read past its head, taken out of
    /// HTTP (and never pooled again); the body is then empty. `None` for any other answer.
    pub(crate) fn take_upgraded(&mut self) -> Option<(TcpStream, BytesMut)> {
        if self.framing != Framing::Close || self.keep_alive || !self.sender.done() {
            return None;
        }
        let conn = self.conn.take()?;
        self.framing = Framing::Empty;
        Some((conn.io, conn.rbuf))
    }
}

impl<B> Body for UpstreamBody<B>
where
    B: Body + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Keep uploading while the response streams (an echoing backend needs both).
            if !this.sender.done() {
                if let Poll::Ready(Err(e)) = this.sender.poll_send(&mut conn.io, cx) {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let step = match &mut this.framing {
                Framing::Empty => None,
                Framing::Length(remaining) => {
                    if conn.rbuf.is_empty() {
                        Some(Err(()))
                    } else {
                        let n = (*remaining).min(conn.rbuf.len() as u64);
                        *remaining -= n;
                        let data = conn.rbuf.split_to(n as usize).freeze();
                        if *remaining == 0 {
                            this.framing = Framing::Empty;
                        }
                        Some(Ok(data))
                    }
                }
                Framing::Close => {
                    if conn.rbuf.is_empty() {
                        Some(Err(()))
                    } else {
                        Some(Ok(conn.rbuf.split().freeze()))
                    }
                }
                Framing::Chunked(state) => match decode_chunk(state, &mut conn.rbuf) {
                    Ok(Some(data)) => Some(Ok(data)),
                    Ok(None) if *state == Chunk::Done => None,
                    Ok(None) => Some(Err(())),
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
            };
            match step {
                Some(Ok(data)) => {
                    if this.ended() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                None => {
                    this.finish();
                    return Poll::Ready(None);
                }
                // Need more bytes.
                Some(Err(())) => {
                    let n = match ready!(poll_read(conn, cx)) {
                        Ok(n) => n,
                        Err(e) => {
                            this.conn = None;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    };
                    if n == 0 {
                        if this.framing == Framing::Close {
                            this.keep_alive = false;
                            this.finish();
                            return Poll::Ready(None);
                        }
                        this.conn = None;
                        return Poll::Ready(Some(Err(
                            "backend closed the connection mid-body".into()
                        )));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// A `Content-Length` (`radix` 10) or chunk size (16): digits only, as RFC 9112 has them.
/// Rust's integer parsing alone would also take a leading `+`, and framing that the proxy
/// reads differently from the backend desynchronises the connection.
fn framing_number(digits: &[u8], radix: u32) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(|&b| char::from(b).is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, radix).ok()
}

/// Decodes chunked data from `buf`: `Ok(Some(data))`, or `Ok(None)` when more bytes are
/// needed or the body is done (`state == Done`).
fn decode_chunk(state: &mut Chunk, buf: &mut BytesMut) -> Result<Option<Bytes>, BoxError> {
    loop {
        match *state {
            Chunk::Done => return Ok(None),
            Chunk::Size => {
                let Some(end) = memchr::memchr(b'\n', buf) else {
                    if buf.len() > 1024 {
                        return Err("chunk size line too long".into());
                    }
                    return Ok(None);
                };
                let line = &buf[..end];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let digits = line
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                let size = framing_number(digits, 16).ok_or("invalid chunk size")?;
                buf.advance(end + 1);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(remaining) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = remaining.min(buf.len() as u64);
                let data = buf.split_to(n as usize).freeze();
                *state = if n == remaining {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(remaining - n)
                };
                return Ok(Some(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    if buf.first().is_some_and(|&b| b != b'\r' && b != b'\n') {
                        return Err("missing CRLF after chunk".into());
                    }
                    if buf.first() == Some(&b'\n') {
                        buf.advance(1);
                        *state = Chunk::Size;
                        continue;
                    }
                    return Ok(None);
                }
                match &buf[..2] {
                    b"\r\n" => buf.advance(2),
                    [b'\n', _] => buf.advance(1),
                    _ => return Err("missing CRLF after chunk".into()),
                }
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(end) = memchr::memchr(b'\n', buf) else {
                    // A trailer field is held until its line ends: bound it as a head is.
                    if buf.len() > MAX_HEAD {
                        return Err("trailer line too long".into());
                    }
                    return Ok(None);
                };
                let empty = end == 0 || (end == 1 && buf[0] == b'\r');
                buf.advance(end + 1);
                if empty {
                    *state = Chunk::Done;
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

        // A `101` keeps its `Upgrade`, says `Connection: upgrade`, and has no body: what
        // follows its head is the new protocol's.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-A\r\nX-A: 1\r\nContent-Length: 0\r\nSec-WebSocket-Accept: a\r\n\r\n\x81\x00"[..],
        );
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(p.status, 101);
        let mut names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "connection",
                "content-length",
                "sec-websocket-accept",
                "upgrade"
            ]
        );
        assert_eq!(p.headers["connection"], "upgrade");
        assert_eq!(p.framing, Framing::Close);
        assert!(!p.keep_alive);
        assert_eq!(&buf[..], b"\x81\x00");
    }

    fn decode_all(input: &[u8], split: usize) -> Result<Vec<u8>, BoxError> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in [&input[..split], &input[split..]] {
            buf.extend_from_slice(part);
            while let Some(data) = decode_chunk(&mut state, &mut buf)? {
                out.extend_from_slice(&data);
            }
        }
        assert_eq!(state, Chunk::Done);
        Ok(out)
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in 0..=input.len() {
            assert_eq!(
                decode_all(input, split).unwrap(),
                b"hello world",
                "split at {split}"
            );
        }
    }

    #[test]
    fn bad_chunks_are_errors() {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(&b"zz\r\n"[..]);
        assert!(decode_chunk(&mut state, &mut buf).is_err());
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(&b"2\r\nabXY"[..]);
        assert_eq!(
            &decode_chunk(&mut state, &mut buf).unwrap().unwrap()[..],
            b"ab"
        );
        assert!(decode_chunk(&mut state, &mut buf).is_err());
        // Signs are not hex digits.
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(&b"+2\r\nab\r\n"[..]);
        assert!(decode_chunk(&mut state, &mut buf).is_err());
    }

    #[test]
    fn an_endless_trailer_line_is_an_error_not_a_growing_buffer() {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(&b"0\r\nx-trailer: "[..]);
        assert!(decode_chunk(&mut state, &mut buf).unwrap().is_none());
        buf.extend_from_slice(&vec![b'a'; MAX_HEAD]);
        assert!(decode_chunk(&mut state, &mut buf).is_err());
    }

    #[test]
    fn heads_parse_with_framing() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc"[..],
        );
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(p.status, 200);
        assert_eq!(p.framing, Framing::Length(3));
        assert_eq!(p.headers["x-a"], "b");
        assert!(p.keep_alive);
        assert_eq!(&buf[..], b"abc");

        for bad in ["+3", "-3", "3 3", "", "0x3"] {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\nabc");
            let mut buf = BytesMut::from(head.as_bytes());
            assert!(
                parse_head(&mut buf, false).is_err(),
                "Content-Length: {bad}"
            );
        }

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"[..]);
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(p.framing, Framing::Close);
        assert!(!p.keep_alive);

        // Hop-by-hop fields, and those Connection names, are not forwarded.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\nX-Kept: 1\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        let mut names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert!(p.keep_alive);
        assert_eq!(p.framing, Framing::Empty);

        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"[..]);
        assert!(!parse_head(&mut buf, false).unwrap().unwrap().keep_alive);

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..]);
        assert_eq!(
            parse_head(&mut buf, true).unwrap().unwrap().framing,
            Framing::Empty
        );

        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        );
        assert!(parse_head(&mut buf, false).is_err());

        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        );
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(p.framing, Framing::Chunked(Chunk::Size));
        assert!(!p.headers.contains_key("content-length"));

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut buf, false).unwrap().is_none());
    }
}

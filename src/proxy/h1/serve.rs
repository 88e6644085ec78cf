//! The HTTP/1.1 server side of the codec: one client connection, its requests read and its
//! responses written by the connection's own task.
//!
//! hyper's server holds an 8 KiB read buffer and a write buffer per connection from its
//! first byte to its close, idle or not. Here a connection waiting for a request holds no
//! buffer: bytes are read into a per-thread scratch buffer, and only a request head that
//! arrived (the bytes of that read) is copied out, to be shared by the request's fields. A
//! head that arrives in pieces is kept in a buffer of its own until it is whole. A
//! response head is encoded into a buffer that lives for one write.
//!
//! The rules are the codec's: requests are framed by [`framing`](super::framing) (a
//! request it refuses is answered `400` through the service's refusal path, and the
//! connection closes), the `Host` and `CONNECT` rules are checked by the service of
//! [`Server`](crate::proxy::Server). Keep-alive is HTTP/1.1's default, or HTTP/1.0's with
//! `Connection: keep-alive`; `Expect: 100-continue` is answered when the body is first
//! read, unless the response came first. A response without `Content-Length` whose length
//! is known gets one; else it is chunked (with its trailers when the client sent
//! `TE: trailers`), or, to an HTTP/1.0 client, delimited by the close.
//!
//! Timeouts: a connection waits `idle_timeout` for the first byte of its next request
//! and `header_read_timeout` from that byte to the end of the head; a head over
//! `max_head` bytes is answered `431`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{request, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::chunked::Chunk;
use super::framing::{FramingError, FramingFields, Length};
use super::incoming::{BodyState, ConnIo, Framing, RequestBody};
use super::name::field_name;
use super::read;
use super::recycle;
use super::write::{write_response, write_static, WriteResponse};
use super::MAX_HEADERS;
use crate::proxy::headers::{connection_tokens, has_token, HopByHop};
use crate::proxy::shutdown::Watch;
use crate::BoxError;

/// The settings of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_head: usize,
}

/// A request the codec's framing rules refuse: the service answers it (`400`) and the
/// connection closes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FramingRefused(pub(crate) FramingError);

/// What an upgrade request's client connection becomes after a `101`: the socket, and what
/// the client sent after the request head.
#[derive(Debug)]
pub(crate) struct Upgraded {
    pub(crate) io: TcpStream,
    pub(crate) read_ahead: Bytes,
}

/// The client connection of an upgrade request, handed over once the `101` is written.
#[derive(Debug, Clone)]
pub(crate) struct OnClientUpgrade(Arc<std::sync::Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnClientUpgrade {
    /// The connection, once the `101` has been written; an error if the connection ended
    /// instead (or was taken already).
    pub(crate) async fn upgraded(self) -> io::Result<Upgraded> {
        let receiver = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match receiver {
            Some(receiver) => receiver
                .await
                .map_err(|_| io::Error::other("the client connection was not handed over")),
            None => Err(io::Error::other("the client connection was taken already")),
        }
    }
}

/// Why a connection ended with an error of the client's (counted as a local answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answered {
    /// `400`: not HTTP/1.
    BadRequest,
    /// `431`: the head was too large.
    TooLarge,
}

/// Serves the HTTP/1 connection `io` (whose first bytes have arrived) with `service` until
/// the client closes, a timeout, an error, or the shutdown `watch` asks it to finish.
/// Returns what the server answered itself, if it ended so.
///
/// The returned future is what a connection holds for its life, so it is kept small: an
/// async block rather than an async fn (which keeps a second copy of each argument,
/// rust-lang/rust#62958), and no value held across an await that is not needed after it.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve_connection<S, B>(
    io: TcpStream,
    service: S,
    settings: Settings,
    watch: Watch,
) -> impl Future<Output = Option<Answered>>
where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    async move {
        let conn = Arc::new(ConnIo::new(io));
        let mut pending = BytesMut::new();
        // One timer for the connection's life, moved on lazily (moving a registered deadline
        // later is one atomic operation; a new timer per request is an insert and a removal).
        let mut timer = pin!(tokio::time::sleep(settings.header_read_timeout));
        // One wait for the shutdown for the connection's life: registered once, it is cheap to
        // look at again, where a new wait per request is registered and removed each time.
        let mut waiting = watch.clone();
        let mut shutdown = Shutdown {
            draining: pin!(waiting.draining()),
            begun: false,
        };
        let mut first = true;
        let answer = loop {
            let bytes = match read_head(
                &conn,
                &mut pending,
                first,
                &settings,
                &mut shutdown,
                timer.as_mut(),
            )
            .await
            {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return None,
                Err(answer) => break answer,
            };
            first = false;
            let (request, info, rest) = match build_request(bytes, &conn, &watch, settings.max_head)
            {
                Ok(built) => built,
                Err(answer) => break answer,
            };
            pending = rest;
            // The call and the response's writing in one box: the connection's future stays
            // small while it waits for a request, and allocates once per request.
            let respond = Box::pin(Respond {
                conn: &conn,
                info: &info,
                shutdown: &mut shutdown,
                switching: false,
                // Bytes after the head are the next request: the client is still there.
                watching: pending.is_empty(),
                step: Step::Calling {
                    call: service.call(request),
                },
            });
            let Ok((keep_alive, switching)) = respond.await else {
                return None;
            };
            if switching {
                if let Some(upgrade) = info.upgrade {
                    hand_over(conn, pending, upgrade);
                }
                return None;
            }
            let state = conn.take_body_state();
            // The client may still be sending (a body not read to its end, a refused
            // request's body, bytes after the request): closed gently, or the close would
            // reset the connection and could take the answer with it.
            let unread = info.refused
                || !pending.is_empty()
                || match &state {
                    BodyState::Done(rest) => !rest.is_empty(),
                    _ => info.body,
                };
            if !keep_alive {
                if unread {
                    Box::pin(linger(&conn.io, watch.clone())).await;
                }
                return None;
            }
            match state {
                BodyState::Reading if !info.body => {}
                // What came after the body: the next request, perhaps.
                BodyState::Done(rest) => pending = rest,
                // A body not read to its end leaves the connection at an unknown point
                // (the response said it closes).
                BodyState::Reading | BodyState::Broken => {
                    Box::pin(linger(&conn.io, watch.clone())).await;
                    return None;
                }
            }
            if pending.is_empty() {
                // Waiting without a buffer.
                pending = BytesMut::new();
            }
        };
        // Boxed: seldom taken, and the future that waits for requests would grow by it.
        Box::pin(answer_and_close(&conn, answer, watch)).await
    }
}

pin_project! {
    /// One request's call, then the writing of its response.
    struct Respond<'a, F, W, D> {
        conn: &'a ConnIo,
        info: &'a Info,
        shutdown: &'a mut Shutdown<D>,
        switching: bool,
        // Whether the client's socket is watched for its close while the call waits.
        watching: bool,
        #[pin]
        step: Step<F, W>,
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<F, W> {
        Calling { #[pin] call: F },
        Writing { #[pin] write: W },
    }
}

impl<'a, F, B, D> Future for Respond<'a, F, WriteResponse<'a, B>, D>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    D: std::ops::DerefMut<Target: Future<Output = ()>>,
{
    /// Whether the connection can take another request, and whether it switched protocols.
    type Output = io::Result<(bool, bool)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.step.as_mut().project() {
                StepProj::Calling { call } => {
                    let Poll::Ready(Ok(response)) = call.poll(cx) else {
                        if *this.watching {
                            match poll_client_gone(this.conn, this.info.body, cx) {
                                Poll::Ready(true) => {
                                    return Poll::Ready(
                                        Err(io::ErrorKind::ConnectionAborted.into()),
                                    )
                                }
                                Poll::Ready(false) => *this.watching = false,
                                Poll::Pending => {}
                            }
                        }
                        return Poll::Pending;
                    };
                    let info = *this.info;
                    let begun = this.shutdown.poll_begun(cx);
                    // A body not read to its end by now (the answer came first: the
                    // proxy's own, or a backend's early one) leaves the connection at an
                    // unknown point: the response says it closes.
                    let read = this.conn.responding() || !info.body;
                    let keep_alive = info.keep_alive && !info.refused && !begun && read;
                    *this.switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                    let write = write_response(&this.conn.io, response, info, keep_alive);
                    this.step.set(Step::Writing { write });
                }
                StepProj::Writing { write } => {
                    let keep_alive = ready!(write.poll(cx))?;
                    return Poll::Ready(Ok((keep_alive, *this.switching)));
                }
            }
        }
    }
}

/// While a request waits for its answer: whether its client has closed its connection or
/// reset it (`true`), which cancels the request, as nginx and hyper's server do. A request
/// with a body is watched once the body has been read to its end, as the client has nothing
/// more to send for it; bytes that came or come instead (a pipelined request, read after
/// the answer) end the watch (`false`). A client that shuts only its sending side down is
/// taken to have gone too (nginx's `proxy_ignore_client_abort off`, hyper's default
/// `half_close(false)`).
///
/// Costs nothing while the client is quiet: the read that took the request cleared the
/// socket's readiness, so this registers the task's waker and makes no system call.
fn poll_client_gone(conn: &ConnIo, body: bool, cx: &mut Context<'_>) -> Poll<bool> {
    if body && ready!(conn.poll_body_read(cx)) {
        return Poll::Ready(false);
    }
    let mut byte = [MaybeUninit::uninit()];
    let mut peeked = tokio::io::ReadBuf::uninit(&mut byte);
    match ready!(conn.io.poll_peek(cx, &mut peeked)) {
        Ok(0) | Err(_) => Poll::Ready(true),
        Ok(_) => Poll::Ready(false),
    }
}

async fn answer_and_close(conn: &ConnIo, answer: Answered, watch: Watch) -> Option<Answered> {
    let _ = write_static(&conn.io, answer.response()).await;
    // The rest of a malformed or too large head may still be coming.
    linger(&conn.io, watch).await;
    Some(answer)
}

/// Time a closing connection waits for more bytes from its client before it is closed.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a closing connection reads and drops what its client still sends, in all.
const LINGER_TIME: Duration = Duration::from_secs(10);

/// Closes `io` gently when its client may still be sending: closing a socket with unread
/// bytes resets the connection, and a client then may lose the answer before reading it
/// (a `400` for a broken upload, a `503` for a request whose body was not read). So the
/// sending side is shut first, and what the client still sends is read and dropped until
/// it closes, goes quiet for `LINGER_TIMEOUT` or `LINGER_TIME` is up, or the server begins
/// its shutdown (nginx's lingering close, with shorter times).
async fn linger(io: &TcpStream, mut watch: Watch) {
    if socket2::SockRef::from(io)
        .shutdown(std::net::Shutdown::Write)
        .is_err()
    {
        return;
    }
    let end = tokio::time::Instant::now() + LINGER_TIME;
    let drain = async {
        let mut scratch = vec![0; 4096];
        loop {
            let wait = (tokio::time::Instant::now() + LINGER_TIMEOUT).min(end);
            match tokio::time::timeout_at(wait, io.readable()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
            match io.try_read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        () = drain => {}
        () = watch.draining() => {}
    }
}

/// The server's shutdown, as one connection sees it.
struct Shutdown<F> {
    draining: Pin<F>,
    begun: bool,
}

impl<F: std::ops::DerefMut<Target: Future<Output = ()>>> Shutdown<F> {
    /// Whether the shutdown has begun; registers the task to be woken when it does.
    fn poll_begun(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.begun {
            self.begun = self.draining.as_mut().poll(cx).is_ready();
        }
        self.begun
    }
}

/// Sends the client's connection to the tunnel of its upgrade.
fn hand_over(conn: Arc<ConnIo>, pending: BytesMut, upgrade: oneshot::Sender<Upgraded>) {
    let Ok(conn) = Arc::try_unwrap(conn) else {
        // The request's body is still held somewhere: the connection cannot be handed over.
        return;
    };
    let _ = upgrade.send(Upgraded {
        io: conn.io,
        read_ahead: pending.freeze(),
    });
}

impl Answered {
    /// The status of the answer.
    pub(crate) fn status(self) -> u16 {
        match self {
            Answered::BadRequest => 400,
            Answered::TooLarge => 431,
        }
    }

    /// A short description.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Answered::BadRequest => "malformed request head",
            Answered::TooLarge => "request head too large",
        }
    }

    fn response(self) -> &'static [u8] {
        match self {
            Answered::BadRequest => {
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            }
            Answered::TooLarge => {
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            }
        }
    }
}

/// Whether the beginning of a head in `buf` is no request already.
fn is_malformed(buf: &[u8]) -> bool {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    matches!(
        httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut parsed, buf, &mut slots),
        Err(error) if error != httparse::Error::TooManyHeaders
    )
}

/// Whether `buf` holds the empty line that ends a head.
fn has_head_end(buf: &[u8]) -> bool {
    // Empty lines before the request line are skipped (RFC 9112 §2.2), as httparse does.
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n');
    let buf = &buf[start.unwrap_or(buf.len())..];
    // Each line's end, and what follows it (`memmem::find` would build a searcher per call,
    // several times per request).
    memchr::memchr_iter(b'\n', buf)
        .any(|i| matches!(&buf[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

/// Waits for the bytes of the next request head (with what came after it in the same
/// reads). `Ok(None)`: the connection is to close quietly (the client closed, a timeout,
/// the shutdown between requests).
async fn read_head(
    conn: &ConnIo,
    pending: &mut BytesMut,
    first: bool,
    settings: &Settings,
    shutdown: &mut Shutdown<impl std::ops::DerefMut<Target: Future<Output = ()>>>,
    mut timer: Pin<&mut tokio::time::Sleep>,
) -> Result<Option<Bytes>, Answered> {
    if has_head_end(pending) {
        return Ok(Some(std::mem::take(pending).freeze()));
    }
    // The first head of a connection, and one begun, have the header timeout; the wait for
    // the first byte of the next, the idle timeout.
    let mut started = first || !pending.is_empty();
    let timeout = if started {
        settings.header_read_timeout
    } else {
        settings.idle_timeout
    };
    let mut deadline = Instant::now() + timeout;
    loop {
        if pending.len() > settings.max_head {
            return Err(Answered::TooLarge);
        }
        if timer.deadline() > deadline {
            // Only ever moved on lazily: a deadline sooner than the timer's sets it now.
            timer.as_mut().reset(deadline);
        }
        let idle = !started;
        let read = std::future::poll_fn(|cx| {
            if let Poll::Ready(read) =
                read::poll_read_with(&conn.io, cx, |bytes| take_read(bytes, pending))
            {
                return Poll::Ready(read.unwrap_or(Read::Closed));
            }
            // The timer fires at the deadline it was last set to, perhaps earlier than this
            // one; then it is moved on.
            while timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(Read::Closed);
                }
                timer.as_mut().reset(deadline);
            }
            // Between requests, the shutdown closes the connection at once.
            if idle && shutdown.poll_begun(cx) {
                return Poll::Ready(Read::Closed);
            }
            Poll::Pending
        })
        .await;
        match read {
            Read::Closed => return Ok(None),
            Read::Malformed => return Err(Answered::BadRequest),
            Read::Head(bytes) => return Ok(Some(bytes)),
            Read::More if !started && !pending.is_empty() => {
                started = true;
                deadline = Instant::now() + settings.header_read_timeout;
            }
            Read::More => {}
        }
    }
}

/// What a read brought to the head being read.
enum Read {
    /// The end of the stream, a failed socket, a timeout or the shutdown: close quietly.
    Closed,
    Malformed,
    Head(Bytes),
    More,
}

/// Adds `bytes`, just read, to the head in `pending` (empty: the client closed).
fn take_read(bytes: &[u8], pending: &mut BytesMut) -> Read {
    if bytes.is_empty() {
        Read::Closed
    } else if pending.is_empty() && has_head_end(bytes) {
        Read::Head(Bytes::copy_from_slice(bytes))
    } else {
        pending.extend_from_slice(bytes);
        if has_head_end(pending) {
            Read::Head(std::mem::take(pending).freeze())
        } else if is_malformed(pending) {
            // Answered at once, as hyper does, not when the head would end.
            Read::Malformed
        } else {
            Read::More
        }
    }
}

/// What the response to a request depends on.
pub(super) struct Info {
    /// The client lets the connection stay open.
    keep_alive: bool,
    pub(super) head_request: bool,
    /// The client takes trailers (`TE: trailers`).
    pub(super) trailers: bool,
    pub(super) http10: bool,
    /// The request has a body to read to its end before the next.
    body: bool,
    /// Refused by the framing rules: the connection closes after the answer.
    refused: bool,
    /// Where the client's connection goes after a `101`.
    upgrade: Option<oneshot::Sender<Upgraded>>,
}

/// A request head, parsed and checked by the codec's rules.
pub(crate) struct Parsed {
    /// The head's length in its bytes.
    pub(crate) len: usize,
    /// Method, target, version and fields (the other parts empty).
    parts: request::Parts,
    /// The framing of its body, or why the rules refuse it.
    pub(crate) framing: Result<Length, FramingError>,
    close: bool,
    keep_alive_token: bool,
    expect: bool,
    trailers: bool,
    /// Both `Connection` and `Upgrade` came.
    upgrade_fields: bool,
}

/// Parses the request head at the front of `bytes` (which holds its end) with httparse,
/// hyper's parser. Its fields are slices of `bytes`.
pub(crate) fn parse_request(bytes: &Bytes, max_head: usize) -> Result<Parsed, Answered> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        bytes,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            return Err(Answered::TooLarge)
        }
        // A head ends with its empty line: complete, or not a request.
        Ok(httparse::Status::Partial) | Err(_) => return Err(Answered::BadRequest),
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| Answered::BadRequest)?;
    let target = bytes.slice_ref(parsed.path.unwrap_or_default().as_bytes());
    let uri = Uri::from_maybe_shared(target).map_err(|_| Answered::BadRequest)?;
    let http10 = parsed.version != Some(1);

    let mut parts = recycle::request_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let headers = &mut parts.headers;
    headers.reserve(parsed.headers.len());
    let mut framing = FramingFields::default();
    let (mut close, mut keep_alive_token) = (false, false);
    let (mut expect, mut trailers, mut upgrade_fields) = (false, false, 0u8);
    for field in parsed.headers.iter() {
        let name = field_name(field.name.as_bytes()).map_err(|_| Answered::BadRequest)?;
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(field.value))
            .map_err(|_| Answered::BadRequest)?;
        if name == header::CONTENT_LENGTH {
            let again = framing.has_content_length();
            framing.content_length(field.value);
            // Equal values are one field (RFC 9110 §8.6), and go on as one; different
            // ones are refused by the framing rules.
            if again {
                continue;
            }
        } else if name == header::TRANSFER_ENCODING {
            framing.transfer_encoding(field.value);
        } else if name == header::CONNECTION {
            close |= has_token(field.value, b"close");
            keep_alive_token |= has_token(field.value, b"keep-alive");
            upgrade_fields |= 1;
        } else if name == header::UPGRADE {
            upgrade_fields |= 2;
        } else if name == header::EXPECT {
            expect = field
                .value
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        } else if name == header::TE {
            // `trailers`, perhaps with parameters.
            trailers |= connection_tokens(field.value).any(|t| {
                let coding = t.split(|&b| b == b';').next().unwrap_or_default();
                coding.trim_ascii().eq_ignore_ascii_case(b"trailers")
            });
        }
        headers.append(name, value);
    }
    Ok(Parsed {
        len,
        parts,
        framing: framing.request(http10),
        close,
        keep_alive_token,
        expect,
        trailers,
        upgrade_fields: upgrade_fields == 3,
    })
}

/// Parses the head at the front of `bytes` into a request, its body reading what follows.
/// Returns the request, what its response depends on, and the bytes after the request
/// (none when it has a body, which takes them).
fn build_request(
    bytes: Bytes,
    conn: &Arc<ConnIo>,
    watch: &Watch,
    max_head: usize,
) -> Result<(Request<RequestBody>, Info, BytesMut), Answered> {
    let Parsed {
        len,
        parts,
        framing,
        close,
        keep_alive_token,
        expect,
        trailers,
        upgrade_fields,
    } = parse_request(&bytes, max_head)?;
    let http10 = parts.version == Version::HTTP_10;

    let mut rest = BytesMut::from(&bytes[len..]);
    let mut refused = None;
    let body = match framing {
        Ok(Length::Fixed(0)) => None,
        Ok(Length::Fixed(n)) => Some(Framing::Length(n)),
        Ok(Length::Chunked) => Some(Framing::Chunked(Chunk::Size)),
        Ok(Length::UntilClose) => None,
        Err(error) => {
            refused = Some(error);
            None
        }
    };
    let has_body = body.is_some();
    let body = match body {
        Some(framing) => RequestBody::http1(
            conn.clone(),
            std::mem::take(&mut rest),
            framing,
            expect && !http10,
        ),
        None => RequestBody::empty(),
    };
    let mut request = Request::from_parts(parts, body);

    let mut upgrade = None;
    if upgrade_fields && !has_body && HopByHop::of(request.headers()).upgrade() {
        let (tx, rx) = oneshot::channel();
        request
            .extensions_mut()
            .insert(OnClientUpgrade(Arc::new(std::sync::Mutex::new(Some(rx)))));
        // The tunnel follows the shutdown, and holds the connection's place.
        request.extensions_mut().insert(watch.clone());
        upgrade = Some(tx);
    }
    if let Some(error) = refused {
        request.extensions_mut().insert(FramingRefused(error));
    }
    let keep_alive = !close && (!http10 || keep_alive_token);
    let info = Info {
        keep_alive,
        head_request: request.method() == Method::HEAD,
        trailers,
        http10,
        body: has_body,
        refused: refused.is_some(),
        upgrade,
    };
    Ok((request, info, rest))
}

/// What the server makes of `input` as one connection's bytes, without a socket: how many
/// request heads it reads, and the first it refuses (its index and why): the fuzz targets'
/// and the differential test's view of [`serve_connection`]'s reading. Bodies are skipped
/// by their framing; it reads on after requests that close the connection.
pub(crate) fn scan(input: &[u8]) -> (u64, Option<(u64, &'static str)>) {
    let mut buf = BytesMut::from(input);
    let mut heads = 0;
    loop {
        let skip = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if skip == buf.len() {
            return (heads, None);
        }
        if !has_head_end(&buf) {
            let refused = is_malformed(&buf).then_some((heads, Answered::BadRequest.reason()));
            return (heads, refused);
        }
        let bytes = buf.split().freeze();
        let parsed = match parse_request(&bytes, 64 * 1024) {
            Ok(parsed) => parsed,
            Err(answer) => return (heads, Some((heads, answer.reason()))),
        };
        heads += 1;
        buf = BytesMut::from(&bytes[parsed.len..]);
        match parsed.framing {
            Err(error) => return (heads, Some((heads - 1, error.as_str()))),
            Ok(Length::Fixed(n)) => {
                if (buf.len() as u64) < n {
                    return (heads, None);
                }
                let _ = buf.split_to(n as usize);
            }
            Ok(Length::UntilClose) => return (heads, None),
            Ok(Length::Chunked) => {
                let mut state = Chunk::Size;
                loop {
                    match super::chunked::decode_chunk(&mut state, &mut buf) {
                        Ok(Some(_)) => {}
                        Ok(None) if state == Chunk::Done => break,
                        Ok(None) => return (heads, None),
                        // The request was passed on; its body fails, and the connection
                        // ends with it.
                        Err(_) => return (heads, None),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::has_head_end;

    /// The line-by-line search finds a head's end where a search for its two spellings does,
    /// over every string of up to 7 bytes of `\r`, `\n` and `a`.
    #[test]
    fn a_head_ends_at_an_empty_line() {
        fn by_search(buf: &[u8]) -> bool {
            let start = buf.iter().position(|&b| b != b'\r' && b != b'\n');
            let buf = &buf[start.unwrap_or(buf.len())..];
            buf.windows(3).any(|w| w == b"\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
        }
        let mut buf = Vec::new();
        for len in 0..=7u32 {
            for n in 0..3u32.pow(len) {
                buf.clear();
                let mut rest = n;
                for _ in 0..len {
                    buf.push([b'\r', b'\n', b'a'][(rest % 3) as usize]);
                    rest /= 3;
                }
                assert_eq!(has_head_end(&buf), by_search(&buf), "{buf:?}");
            }
        }
        assert!(has_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!has_head_end(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n"));
    }
}

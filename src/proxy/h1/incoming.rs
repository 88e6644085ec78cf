//! [`RequestBody`]: the body of a request that [`Server`](crate::proxy::Server) read, from
//! its HTTP/1 codec or from hyper's HTTP/2 server.
//!
//! An HTTP/1 body reads the client's socket directly when it is polled, as the response
//! body reads the backend's ([`UpstreamBody`](super::UpstreamBody)): no channel, no task
//! hand-off. The connection waits meanwhile; when the body has ended, what the client sent
//! after it (a pipelined request) goes back to the connection through [`ConnIo`].

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use super::chunked::{decode_chunk, Chunk};
use super::read;
use crate::proxy::error::ClientBodyError;
use crate::BoxError;
/// A client connection of the HTTP/1 server, shared with the body of the request it is
/// reading.
#[derive(Debug)]
pub(crate) struct ConnIo {
    pub(crate) io: TcpStream,
    body: Mutex<Shared>,
}

/// Where the body of the connection's current request is.
#[derive(Debug, Default)]
pub(crate) enum BodyState {
    /// No body, or one not read to its end yet.
    #[default]
    Reading,
    /// Read to its end: these bytes came after it.
    Done(BytesMut),
    /// The client's framing broke or its connection failed: it cannot be read further.
    Broken,
}

/// What the response writer and the body agree on: a `100 Continue` is sent only before the
/// response has begun.
#[derive(Debug, Default)]
struct Shared {
    state: BodyState,
    responding: bool,
    /// The connection's task, waiting for the body's end to watch its client (an HTTP/2
    /// backend's connection reads the body in a task of its own).
    waiting: Option<Waker>,
}

impl ConnIo {
    pub(crate) fn new(io: TcpStream) -> Self {
        ConnIo {
            io,
            body: Mutex::new(Shared::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.body.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The response is about to be written: no `100 Continue` from now on. Returns whether
    /// the request's body (if it has one) has been read to its end: if not, the connection
    /// cannot carry another request.
    pub(crate) fn responding(&self) -> bool {
        let mut shared = self.lock();
        shared.responding = true;
        matches!(shared.state, BodyState::Done(_))
    }

    /// Whether the request's body has been read to its end, and if so whether bytes came
    /// after it (`Ready(true)`, also when it cannot be read further); else `cx`'s task is
    /// woken when it is.
    pub(crate) fn poll_body_read(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut shared = self.lock();
        match &shared.state {
            BodyState::Done(rest) => Poll::Ready(!rest.is_empty()),
            BodyState::Broken => Poll::Ready(true),
            BodyState::Reading => {
                match &mut shared.waiting {
                    Some(waker) => waker.clone_from(cx.waker()),
                    waiting => *waiting = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    /// Takes the state of the body of the request just answered, and resets it for the next.
    pub(crate) fn take_body_state(&self) -> BodyState {
        std::mem::take(&mut *self.lock()).state
    }

    fn end(&self, state: BodyState) {
        let waiting = {
            let mut shared = self.lock();
            shared.state = state;
            shared.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

/// The body of a request served by [`Server`](crate::proxy::Server): HTTP/1 framed by the
/// codec's rules (`Content-Length` or chunked, with trailers), or an HTTP/2 stream.
pub struct RequestBody {
    kind: Kind,
}

enum Kind {
    Empty,
    Http1(Http1Body),
    #[cfg(feature = "http2")]
    Http2(hyper::body::Incoming),
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Http1(_) => "http1",
            #[cfg(feature = "http2")]
            Kind::Http2(_) => "http2",
        };
        f.debug_struct("RequestBody").field("kind", &kind).finish()
    }
}

impl Default for RequestBody {
    fn default() -> Self {
        RequestBody::empty()
    }
}

impl RequestBody {
    /// A body without data.
    pub fn empty() -> Self {
        RequestBody { kind: Kind::Empty }
    }

    /// The body of an HTTP/1 request, `framing` after `buf` (what came with the head).
    pub(crate) fn http1(conn: Arc<ConnIo>, buf: BytesMut, framing: Framing, expect: bool) -> Self {
        RequestBody {
            kind: Kind::Http1(Http1Body {
                conn,
                buf,
                framing,
                continue_pending: expect,
                done: false,
            }),
        }
    }
}

#[cfg(feature = "http2")]
impl From<hyper::body::Incoming> for RequestBody {
    fn from(body: hyper::body::Incoming) -> Self {
        RequestBody {
            kind: Kind::Http2(body),
        }
    }
}

/// How an HTTP/1 request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes still to come.
    Length(u64),
    /// Chunked, at this point of its decoding.
    Chunked(Chunk),
}

struct Http1Body {
    conn: Arc<ConnIo>,
    buf: BytesMut,
    framing: Framing,
    /// The client asked for `100 Continue` before it sends the body; sent at the first poll.
    continue_pending: bool,
    done: bool,
}

impl Http1Body {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.continue_pending {
            ready!(self.poll_continue(cx))?;
        }
        loop {
            match &mut self.framing {
                Framing::Length(0) => return Poll::Ready(self.finish()),
                Framing::Length(remaining) => {
                    if !self.buf.is_empty() {
                        let n = (*remaining).min(self.buf.len() as u64);
                        *remaining -= n;
                        let data = self.buf.split_to(n as usize).freeze();
                        if *remaining == 0 {
                            // Ended with this frame: a reader that stops at
                            // `is_end_stream` (hyper's HTTP/2 client) polls no more.
                            self.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(state) => match decode_chunk(state, &mut self.buf) {
                    Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(None) if *state == Chunk::Done => return Poll::Ready(self.finish()),
                    Ok(None) => {}
                    Err(error) => return Poll::Ready(Some(Err(self.fail(error)))),
                },
            }
            if let Err(error) = ready!(self.poll_read(cx)) {
                return Poll::Ready(Some(Err(self.fail(error.into()))));
            }
        }
    }

    /// Reads more of the body into `buf`.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let want = match self.framing {
            Framing::Length(n) => n.min(read::BODY_READ as u64) as usize,
            Framing::Chunked(_) => read::BODY_READ,
        };
        let n = ready!(read::poll_read_buf(&self.conn.io, cx, &mut self.buf, want))?;
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed before the end of the request body",
            )));
        }
        Poll::Ready(Ok(()))
    }

    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        loop {
            // Before waiting to write: once the response is being written, its writer is
            // the one to be woken when the socket takes more (tokio wakes one writer).
            if self.conn.lock().responding {
                self.continue_pending = false;
                return Poll::Ready(Ok(()));
            }
            ready!(self.conn.io.poll_write_ready(cx))?;
            let shared = self.conn.lock();
            if shared.responding {
                // The answer came first: the client learns from it instead.
                self.continue_pending = false;
                return Poll::Ready(Ok(()));
            }
            match self.conn.io.try_write(CONTINUE) {
                // A partial write of 25 bytes to an empty socket buffer does not happen;
                // were it to, the client would see a broken response and close.
                Ok(_) => {
                    self.continue_pending = false;
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    fn finish(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        self.done = true;
        self.conn
            .end(BodyState::Done(std::mem::take(&mut self.buf)));
        None
    }

    fn fail(&mut self, error: BoxError) -> BoxError {
        self.done = true;
        self.conn.end(BodyState::Broken);
        error
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) if !self.done => SizeHint::with_exact(n),
            Framing::Length(_) => SizeHint::with_exact(0),
            Framing::Chunked(_) => SizeHint::default(),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Http1(body) => body.poll_frame(cx).map_err(ClientBodyError::new),
            #[cfg(feature = "http2")]
            Kind::Http2(body) => Pin::new(body).poll_frame(cx).map_err(ClientBodyError::new),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Http1(body) => body.done || body.framing == Framing::Length(0),
            #[cfg(feature = "http2")]
            Kind::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Http1(body) => body.size_hint(),
            #[cfg(feature = "http2")]
            Kind::Http2(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The connection's task waits for the body's end to watch its client; the end wakes
    /// it even when another task (an HTTP/2 backend's connection) read the body. Then the
    /// bytes after the body tell whether the client is still there.
    #[tokio::test]
    async fn the_end_of_a_body_wakes_the_task_waiting_for_it() {
        let (_client, server) = super::super::socket_pair().await;
        let conn = ConnIo::new(server);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(conn.poll_body_read(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        conn.end(BodyState::Done(BytesMut::new()));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "not woken at the end");
        assert_eq!(conn.poll_body_read(&mut cx), Poll::Ready(false));

        conn.take_body_state();
        assert!(conn.poll_body_read(&mut cx).is_pending());
        conn.end(BodyState::Done(BytesMut::from(&b"GET /next"[..])));
        assert_eq!(conn.poll_body_read(&mut cx), Poll::Ready(true));
    }
}

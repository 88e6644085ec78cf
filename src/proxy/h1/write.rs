//! The response to a client: its head, then its body gathered into as few writes as it
//! allows.
//!
//! [`WriteResponse`] is a future written by hand rather than an async fn: it is what each
//! request holds while its response goes out, and an async fn keeps the response, its parts
//! and its body side by side, each in a place of its own.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, Bytes};
use http::header;
use http::{Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;

use super::serve::Info;
use crate::proxy::headers::has_token;
use crate::BoxError;

/// The largest response head and body bytes gathered into one write.
const WRITE_GATHER: usize = 64 * 1024;

pin_project! {
    /// Writes a response: see [`write_response`]. Not to be polled again once it is ready.
    pub(super) struct WriteResponse<'a, B> {
        io: &'a TcpStream,
        // `None` once it has ended, or when the response has none to send.
        #[pin]
        body: Option<B>,
        // Gathered, and written from `written` on.
        buf: Vec<u8>,
        written: usize,
        // A piece too large to gather, written after `buf` without a copy.
        big: Bytes,
        chunked: bool,
        // The client takes trailers.
        trailers: bool,
        keep_alive: bool,
        // What is gathered goes out before the body is polled again.
        flushing: bool,
        // The body failed: what was gathered goes out, then this is the result.
        failed: Option<BoxError>,
    }
}

/// Encodes the head of `response` (to the request described by `info`) and returns the
/// future that writes it and the body. It resolves to whether the connection can take
/// another request; `Err` if it failed (the client went away, or the body broke off, which
/// the client sees as a response cut short).
pub(super) fn write_response<'a, B>(
    io: &'a TcpStream,
    response: Response<B>,
    info: &Info,
    mut keep_alive: bool,
) -> WriteResponse<'a, B>
where
    B: Body<Data = Bytes>,
{
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let no_body = info.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let headers = &parts.headers;
    let (mut has_length, mut has_date) = (false, false);
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            has_length = true;
        } else if name == header::DATE {
            has_date = true;
        } else if name == header::CONNECTION && has_token(value.as_bytes(), b"close") {
            keep_alive = false;
        }
    }
    // How the body goes: as it is (its length given), chunked, or until the close.
    let mut chunked = false;
    let mut length = None;
    if !no_body && !has_length && status != StatusCode::SWITCHING_PROTOCOLS {
        match body.size_hint().exact() {
            Some(n) => length = Some(n),
            None if info.http10 => keep_alive = false,
            None => chunked = true,
        }
    }

    let mut buf = Vec::with_capacity(256);
    // An HTTP/1.0 client is answered in its version, as hyper and nginx do.
    buf.extend_from_slice(if info.http10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    buf.extend_from_slice(b"\r\n");
    // A connection that closes says so, whatever `Connection` the service set.
    let closing = !keep_alive && status != StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in headers {
        if name == header::TRANSFER_ENCODING
            || (name == header::CONTENT_LENGTH && status == StatusCode::SWITCHING_PROTOCOLS)
            || (name == header::CONNECTION && closing)
        {
            continue;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length {
        let _ = write!(buf, "content-length: {n}\r\n");
    }
    if chunked {
        buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !has_date {
        buf.extend_from_slice(b"date: ");
        DATE.with(|date| buf.extend_from_slice(date.borrow_mut().now()));
        buf.extend_from_slice(b"\r\n");
    }
    if closing {
        buf.extend_from_slice(b"connection: close\r\n");
    } else if info.http10 {
        buf.extend_from_slice(b"connection: keep-alive\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    super::recycle::keep_response(parts);

    let body = (!no_body && status != StatusCode::SWITCHING_PROTOCOLS).then_some(body);
    WriteResponse {
        io,
        body,
        buf,
        written: 0,
        big: Bytes::new(),
        chunked,
        trailers: info.trailers,
        keep_alive,
        flushing: false,
        failed: None,
    }
}

impl<B> Future for WriteResponse<'_, B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = io::Result<bool>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut this = self.project();
        loop {
            if *this.flushing {
                let had_big = !this.big.is_empty();
                let flushed = ready!(poll_flush(this.io, this.buf, this.written, this.big, cx));
                *this.flushing = false;
                if let Some(error) = this.failed.take() {
                    return Poll::Ready(Err(io::Error::other(error)));
                }
                flushed?;
                if had_big && *this.chunked {
                    this.buf.extend_from_slice(b"\r\n");
                }
            }
            let Some(body) = this.body.as_mut().as_pin_mut() else {
                if this.buf.is_empty() {
                    return Poll::Ready(Ok(*this.keep_alive));
                }
                *this.flushing = true;
                continue;
            };
            match body.poll_frame(cx) {
                // Gather what is ready into one write; write when the body waits.
                Poll::Pending if this.buf.is_empty() => return Poll::Pending,
                Poll::Pending => *this.flushing = true,
                Poll::Ready(None) => {
                    if *this.chunked {
                        this.buf.extend_from_slice(b"0\r\n\r\n");
                    }
                    this.body.set(None);
                }
                Poll::Ready(Some(Err(error))) => {
                    let error: BoxError = error.into();
                    tracing::debug!(%error, "response body failed; closing the connection");
                    this.body.set(None);
                    *this.failed = Some(error);
                    *this.flushing = true;
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        if *this.chunked {
                            let _ = write!(this.buf, "{:x}\r\n", data.len());
                        }
                        if this.buf.len() + data.len() <= WRITE_GATHER {
                            this.buf.extend_from_slice(&data);
                            if *this.chunked {
                                this.buf.extend_from_slice(b"\r\n");
                            }
                        } else {
                            // Out with what is gathered, without a copy.
                            *this.big = data;
                            *this.flushing = true;
                        }
                    }
                    Err(frame) => {
                        if let (Ok(fields), true, true) =
                            (frame.into_trailers(), *this.chunked, *this.trailers)
                        {
                            let buf = &mut *this.buf;
                            buf.extend_from_slice(b"0\r\n");
                            for (name, value) in &fields {
                                buf.extend_from_slice(name.as_str().as_bytes());
                                buf.extend_from_slice(b": ");
                                buf.extend_from_slice(value.as_bytes());
                                buf.extend_from_slice(b"\r\n");
                            }
                            buf.extend_from_slice(b"\r\n");
                            *this.chunked = false;
                        }
                    }
                },
            }
        }
    }
}

/// Writes `buf` from `written` on, then `big`; empties both when done.
fn poll_flush(
    io: &TcpStream,
    buf: &mut Vec<u8>,
    written: &mut usize,
    big: &mut Bytes,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    loop {
        let head = &buf[*written..];
        if head.is_empty() && big.is_empty() {
            buf.clear();
            *written = 0;
            return Poll::Ready(Ok(()));
        }
        let result = ready!(poll_write_with(io, cx, || if big.is_empty() {
            io.try_write(head)
        } else {
            io.try_write_vectored(&[IoSlice::new(head), IoSlice::new(big)])
        }));
        match result {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                let from_head = n.min(head.len());
                *written += from_head;
                big.advance(n - from_head);
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Writes with `write`, a `try_write` on `io`, and waits for `io` to take more only when
/// it has not. A socket nearly always has room: asking the reactor first would cost a
/// readiness poll for every write. The write still spends the task's share of tokio's
/// cooperative budget, as the readiness poll would have: a response fed from another task
/// (an HTTP/2 backend's) to a client that keeps taking it still yields in time.
pub(super) fn poll_write_with(
    io: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    let coop = ready!(tokio::task::coop::poll_proceed(cx));
    loop {
        match write() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(io.poll_write_ready(cx))?,
            result => {
                coop.made_progress();
                return Poll::Ready(result);
            }
        }
    }
}

/// Writes all of `bytes`.
pub(super) async fn write_static(io: &TcpStream, bytes: &'static [u8]) -> io::Result<()> {
    let (mut buf, mut written, mut big) = (Vec::new(), 0, Bytes::from_static(bytes));
    std::future::poll_fn(|cx| poll_flush(io, &mut buf, &mut written, &mut big, cx)).await
}

/// The `Date` of responses, formatted once a second.
struct CachedDate {
    second: u64,
    text: String,
}

thread_local! {
    static DATE: RefCell<CachedDate> = const { RefCell::new(CachedDate { second: u64::MAX, text: String::new() }) };
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        self.text.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes that never wait still spend the task's budget: one poll of a task that keeps
    /// writing to a socket with room is told to yield, as tokio's own writes would be.
    #[tokio::test]
    async fn writes_that_never_wait_still_yield_in_time() {
        let (io, _peer) = super::super::socket_pair().await;
        // 1,000 one-byte writes fit in the socket's buffer: none waits for room.
        let written = std::future::poll_fn(|cx| {
            let mut written = 0;
            for _ in 0..1000 {
                match poll_write_with(&io, cx, || io.try_write(b"x")) {
                    Poll::Ready(result) => written += result.unwrap(),
                    Poll::Pending => break,
                }
            }
            Poll::Ready(written)
        })
        .await;
        assert!(written > 0, "writes went out");
        assert!(written < 1000, "the budget ran out first: {written} writes");
    }
}

//! The response body, read straight from the backend connection while the request body
//! is still being sent; the connection goes back to the pool when both have ended cleanly.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::chunked::{decode_chunk, Chunk};
use super::encode::Sender;
use super::pool::{Conn, Pool};
use super::read;
use crate::BoxError;

/// How the rest of a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    Close,
}

/// A response body read straight from the backend connection.
///
/// Its state is boxed: a response is moved through every layer between the backend and
/// the server, and a boxed body makes each move a few words instead of a few hundred
/// bytes.
pub struct UpstreamBody<B>(Box<Upstream<B>>);

/// What an [`UpstreamBody`] reads from, and what it goes back to.
pub(super) struct Upstream<B> {
    pub(super) conn: Option<Conn>,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
    pub(super) sender: Sender<B>,
    pub(super) pool: Arc<Pool>,
}

impl<B> fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("framing", &self.0.framing)
            .finish_non_exhaustive()
    }
}

impl<B> UpstreamBody<B>
where
    B: Body + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// The body of a response whose head was just read. An empty one ends at once: its
    /// connection goes back to the pool now.
    pub(super) fn new(upstream: Upstream<B>) -> Self {
        let mut body = UpstreamBody(Box::new(upstream));
        if body.0.framing == Framing::Empty {
            body.0.finish();
        }
        body
    }

    /// The connection of a `101` answer, with the bytes read past its head, taken out of
    /// HTTP (and never pooled again); the body is then empty. `None` for any other answer.
    pub(crate) fn take_upgraded(&mut self) -> Option<(tokio::net::TcpStream, bytes::BytesMut)> {
        self.0.take_upgraded()
    }
}

impl<B> Upstream<B>
where
    B: Body + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
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

    fn take_upgraded(&mut self) -> Option<(tokio::net::TcpStream, bytes::BytesMut)> {
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
        let this = &mut *self.0;
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
                        Some(Ok(Frame::data(data)))
                    }
                }
                Framing::Close => {
                    if conn.rbuf.is_empty() {
                        Some(Err(()))
                    } else {
                        Some(Ok(Frame::data(conn.rbuf.split().freeze())))
                    }
                }
                Framing::Chunked(state) => match decode_chunk(state, &mut conn.rbuf) {
                    Ok(Some(frame)) => Some(Ok(frame)),
                    Ok(None) if *state == Chunk::Done => None,
                    Ok(None) => Some(Err(())),
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
            };
            match step {
                Some(Ok(frame)) => {
                    if this.ended() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                None => {
                    this.finish();
                    return Poll::Ready(None);
                }
                // Need more bytes.
                Some(Err(())) => {
                    let want = match this.framing {
                        Framing::Length(n) => n.min(read::BODY_READ as u64) as usize,
                        _ => read::BODY_READ,
                    };
                    let n = match ready!(read::poll_read_buf(&conn.io, cx, &mut conn.rbuf, want)) {
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
        self.0.conn.is_none() || self.0.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match self.0.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

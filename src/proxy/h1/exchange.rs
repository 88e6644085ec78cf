//! One request and response on a backend connection, driven by the task that serves the
//! client: the request is written and the response head read by the future of the
//! request itself.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;

use super::body::{Upstream, UpstreamBody};
use super::encode::{Head, Sender, Upload};
use super::parse::{parse_head, Parsed};
use super::pool::{Conn, Pool};
use super::read;
use crate::balance::error::RequestFault;
use crate::proxy::error::{MalformedResponse, RequestBodyTimeout};
use crate::BoxError;

/// Why an exchange failed. (The request body comes back with it when the request may be
/// sent again: idempotent, nothing of its body consumed, no byte of an answer received.)
#[derive(Debug)]
pub(crate) struct ExchangeError {
    pub(crate) error: BoxError,
    /// Not the connection's first exchange: closed before an answer, it may have been a
    /// stale keep-alive rather than a backend gone away.
    pub(crate) reused: bool,
}

/// Sends `head` and `body` on `conn` and reads the response head, which must arrive within
/// `timeout` of the end of the request. (While the body is still being sent, each write
/// starts the timeout again: a slow upload is not cut, and a backend that stops reading
/// it still times out; a client that stops sending it fails the request by its own
/// fault, a [`RequestBodyTimeout`].) The response body reads on from the same connection,
/// and puts it back in `pool` when it is reusable. On failure, the body comes back with the error when the
/// request may be sent again (idempotent, no byte of an answer, no timeout), taken in
/// part or not: whether it can be sent again from its start is the body's to say
/// (`replay::ReplayBody`).
pub(crate) async fn exchange<B>(
    mut conn: Conn,
    head: &Head,
    body: B,
    pool: Arc<Pool>,
    timeout: Duration,
) -> Result<Response<UpstreamBody<B>>, (ExchangeError, Option<B>)>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let reused = conn.reused;
    conn.reused = true;
    let mut sender = Sender::new(body, head);
    conn.arm(Instant::now() + timeout);
    let uploading = head.upload != Upload::None;
    let fail = |error: BoxError, sender: &mut Sender<B>, conn: &Conn| {
        let timed_out = error.is::<Elapsed>();
        let retryable = !timed_out
            && !RequestFault::in_chain(&*error)
            && head.idempotent
            && conn.rbuf.is_empty();
        let body = retryable.then(|| sender.body.take().or(sender.ended.take()));
        let body = body.flatten();
        (ExchangeError { error, reused }, body)
    };
    let parsed = std::future::poll_fn(|cx| {
        let poll = poll_head(&mut conn, &mut sender, head, cx);
        if poll.is_pending() {
            if std::mem::take(&mut sender.progressed) && uploading {
                conn.arm(Instant::now() + timeout);
            }
            if conn.poll_expired(cx) {
                // Waiting for the client's body, not for the backend: the client stalled.
                let error: BoxError = if sender.awaits_body() {
                    RequestFault::new(RequestBodyTimeout { after: timeout }).into()
                } else {
                    Elapsed.into()
                };
                return Poll::Ready(Err(error));
            }
        }
        poll
    })
    .await;
    let parsed = match parsed {
        Ok(parsed) if parsed.parts.status == StatusCode::SWITCHING_PROTOCOLS && !head.upgrade => {
            let error = MalformedResponse {
                source: "101 to a request that asked for no upgrade".into(),
            }
            .into();
            return Err((ExchangeError { error, reused }, None));
        }
        Ok(parsed) => parsed,
        Err(error) => return Err(fail(error, &mut sender, &conn)),
    };
    sender.ended = None;
    let body = UpstreamBody::new(Upstream {
        conn: Some(conn),
        framing: parsed.framing,
        keep_alive: parsed.keep_alive,
        sender,
        pool,
    });
    Ok(Response::from_parts(parsed.parts, body))
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
        let parsed = parse_head(&mut conn.rbuf, head.head_request)
            .map_err(|source| MalformedResponse { source })?;
        if let Some(parsed) = parsed {
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

/// Reads what has arrived into the connection's buffer: one waiting for its response head
/// holds no buffer until bytes come, and then one of their size.
fn poll_read(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    let rbuf = &mut conn.rbuf;
    read::poll_read_with(&conn.io, cx, |bytes| {
        rbuf.extend_from_slice(bytes);
        bytes.len()
    })
}

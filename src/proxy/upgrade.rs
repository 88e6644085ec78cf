//! Upgrades (WebSocket): a `101 Switching Protocols` answer turns the client's connection
//! and the backend's into one two-way tunnel.
//!
//! A request that asks for an upgrade (`Connection: upgrade` and an `Upgrade` field, see
//! [`super::headers`]) goes to the backend with both fields. Any answer but `101` is an
//! ordinary response. On `101`, the backend connection leaves HTTP (it is never pooled
//! again) and, once hyper has sent the `101` to the client and handed over the client's
//! connection ([`hyper::upgrade::on`]), bytes are copied both ways as they come, in one
//! task, until one side closes (then both are closed), or neither has sent a byte for the
//! tunnel idle timeout, or the server's shutdown time is up.
//!
//! The tunnel counts as in flight for the balancer until it closes: [`TrackBody`] hands the
//! request's guard to the tunnel (through [`Hold`]) instead of to the `101`'s empty body.
//!
//! [`TrackBody`]: super::TrackBody

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response, StatusCode};
use http_body::Body;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::h1::{OnClientUpgrade, Upgraded, UpstreamBody};
use super::shutdown::Watch;
use crate::balance::error::Unsent;
use crate::balance::InFlight;
use crate::BoxError;

/// The client's side of an upgrade: from the proxy's own HTTP/1 server, or from hyper's (an
/// embedding).
enum Client {
    Own(OnClientUpgrade),
    Hyper(OnUpgrade),
}

/// What an upgrade request needs to become a tunnel, taken from it before it is sent.
pub(crate) struct Upgrade {
    /// The client's connection, once the server has sent the `101`.
    client: Client,
    /// The server's shutdown, when the request came through [`super::Server`].
    shutdown: Option<Watch>,
    idle_timeout: Duration,
}

impl Upgrade {
    pub(crate) fn take<B>(request: &mut Request<B>, idle_timeout: Duration) -> Upgrade {
        Upgrade {
            // Without hyper's handle (a request that did not come from a hyper server), a
            // `101` still passes, and its tunnel ends at once.
            client: match request.extensions_mut().remove::<OnClientUpgrade>() {
                Some(own) => Client::Own(own),
                None => Client::Hyper(hyper::upgrade::on(&mut *request)),
            },
            shutdown: request.extensions_mut().remove::<Watch>(),
            idle_timeout,
        }
    }

    /// Sends the request with `sent`; a `101` answer starts the tunnel. A request given
    /// back for another backend ([`Unsent`]) takes what it needs for its upgrade along.
    /// `Q` is the body type of a request given back (the client's, which the body sent, `B`,
    /// may wrap).
    pub(crate) async fn after<Q, B, F>(self, sent: F) -> Result<Response<UpstreamBody<B>>, BoxError>
    where
        F: Future<Output = Result<Response<UpstreamBody<B>>, BoxError>>,
        Q: Send + 'static,
        B: Body + Unpin + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let mut response = match sent.await {
            Ok(response) => response,
            Err(error) => return Err(self.give_back::<Q>(error)),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(response);
        }
        let Some((backend, read_ahead)) = response.body_mut().take_upgraded() else {
            return Ok(response);
        };
        let hold = Hold::default();
        response.extensions_mut().insert(hold.clone());
        tokio::spawn(tunnel(self, backend, read_ahead, hold));
        Ok(response)
    }

    fn give_back<B: Send + 'static>(self, error: BoxError) -> BoxError {
        match error.downcast::<Unsent<Request<B>>>() {
            Ok(unsent) => {
                let (mut request, error) = unsent.into_parts();
                match self.client {
                    Client::Own(own) => {
                        request.extensions_mut().insert(own);
                    }
                    Client::Hyper(hyper) => {
                        request.extensions_mut().insert(hyper);
                    }
                }
                if let Some(shutdown) = self.shutdown {
                    request.extensions_mut().insert(shutdown);
                }
                Box::new(Unsent::new(request, error))
            }
            Err(error) => error,
        }
    }
}

/// Holds a tunnel's in-flight guard until the tunnel ends. [`TrackBody`](super::TrackBody)
/// finds it in a `101` response's extensions and puts the request's guard in it.
#[derive(Clone, Default)]
pub(crate) struct Hold(Arc<Mutex<Option<InFlight>>>);

impl Hold {
    pub(crate) fn keep(&self, guard: InFlight) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    }
}

async fn tunnel(upgrade: Upgrade, backend: TcpStream, read_ahead: BytesMut, hold: Hold) {
    let Upgrade {
        client,
        shutdown,
        idle_timeout,
    } = upgrade;
    let peer = backend.peer_addr().ok();
    let observed = shutdown.is_some();
    let run = async {
        match client {
            Client::Own(own) => {
                let Upgraded {
                    io: mut client,
                    read_ahead: client_ahead,
                } = own.upgraded().await?;
                // The server's connection has ended, handing its socket over: the tunnel
                // holds it now, and counts as the client connection it is.
                let _open = observed.then(crate::stats::ClientConnection::open);
                // What each side sent right after the request head and the `101`.
                let mut backend = backend;
                if !client_ahead.is_empty() {
                    backend.write_all(&client_ahead).await?;
                }
                if !read_ahead.is_empty() {
                    client.write_all(&read_ahead).await?;
                }
                drop((client_ahead, read_ahead));
                copy_until_idle(client, backend, idle_timeout).await
            }
            Client::Hyper(hyper) => {
                let mut client = TokioIo::new(hyper.await.map_err(io::Error::other)?);
                // hyper's connection has ended, handing its socket over (what the client
                // sent after its head comes with it).
                let _open = observed.then(crate::stats::ClientConnection::open);
                // What the backend sent right after its `101`.
                if !read_ahead.is_empty() {
                    client.write_all(&read_ahead).await?;
                }
                drop(read_ahead);
                copy_until_idle(client, backend, idle_timeout).await
            }
        }
    };
    let cut = async {
        match shutdown {
            Some(mut shutdown) => shutdown.cut().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = run => match ended {
            Ok(Ended::Closed(up, down)) => {
                tracing::debug!(backend = ?peer, up, down, "tunnel closed");
            }
            Ok(Ended::Idle) => tracing::debug!(backend = ?peer, "tunnel closed: idle"),
            Err(error) => tracing::debug!(backend = ?peer, %error, "tunnel failed"),
        },
        () = cut => tracing::debug!(backend = ?peer, "tunnel closed at shutdown"),
    }
    // The guard goes last: the tunnel counted until both connections were closed.
    drop(hold);
}

/// How a tunnel ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// One side closed (its end passed on to the other): bytes sent from the client, and
    /// from the backend.
    Closed(u64, u64),
    /// Neither side sent a byte for the idle timeout.
    Idle,
}

/// Copies bytes both ways between `client` and `backend` as they come (up to 16 KiB at a
/// time, not a whole message), until one side
/// ends (its end is passed on as a write shutdown, then both are closed, as nginx does: a
/// half-closed tunnel would count in flight for nothing), or until neither has sent a byte
/// for `idle_timeout`.
async fn copy_until_idle<A, B>(
    mut client: A,
    mut backend: B,
    idle_timeout: Duration,
) -> io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut up, mut down) = (Pipe::new(), Pipe::new());
    let mut last = Instant::now();
    // Moved on lazily: when it fires, it is set to the last byte plus the timeout.
    let mut idle = std::pin::pin!(tokio::time::sleep_until(last + idle_timeout));
    std::future::poll_fn(|cx| {
        let mut active = false;
        let up_done = up.poll_copy(cx, &mut client, &mut backend, &mut active)?;
        let down_done = down.poll_copy(cx, &mut backend, &mut client, &mut active)?;
        if up_done.is_ready() || down_done.is_ready() {
            return Poll::Ready(Ok(Ended::Closed(up.copied, down.copied)));
        }
        if active {
            last = Instant::now();
        }
        while idle.as_mut().poll(cx).is_ready() {
            let deadline = last + idle_timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(Ok(Ended::Idle));
            }
            idle.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

/// Bytes read at once from one side of a tunnel.
const CHUNK: usize = 16 * 1024;

/// One direction of a tunnel. Bytes are read into a buffer on the stack and written to the
/// other side at once; only what that side does not take yet waits on the heap. An idle
/// tunnel (most WebSockets, most of the time) holds no buffer.
struct Pipe {
    /// Read, not yet written, from `pos` on.
    pending: Vec<u8>,
    pos: usize,
    eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    copied: u64,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            pending: Vec::new(),
            pos: 0,
            eof: false,
            unflushed: false,
            copied: 0,
        }
    }

    /// Copies from `from` to `to` until `from` ends and the end is passed on (`Ready`).
    /// Sets `active` when it read a byte.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        active: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if !self.pending.is_empty() {
                while self.pos < self.pending.len() {
                    let n = ready!(self.poll_write(cx, to, Stash::No))?;
                    self.pos += n;
                }
                self.pending = Vec::new();
                self.pos = 0;
            }
            if self.eof {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
            let mut storage = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut storage);
            match Pin::new(&mut *from).poll_read(cx, &mut buf) {
                Poll::Ready(read) => read?,
                Poll::Pending => {
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
            let mut data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            *active = true;
            while !data.is_empty() {
                // What the other side does not take now waits in `pending`.
                let n = ready!(self.poll_write(cx, to, Stash::Rest(data)))?;
                data = &data[n..];
            }
        }
    }

    /// Writes the pending bytes, or `stash`'s; a `Pending` write stashes them.
    fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
        stash: Stash<'_>,
    ) -> Poll<io::Result<usize>> {
        let bytes = match stash {
            Stash::No => &self.pending[self.pos..],
            Stash::Rest(bytes) => bytes,
        };
        match Pin::new(&mut *to).poll_write(cx, bytes) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.copied += n as u64;
                self.unflushed = true;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Stash::Rest(bytes) = stash {
                    self.pending = bytes.to_vec();
                    self.pos = 0;
                }
                Poll::Pending
            }
        }
    }
}

/// Bytes to write: the pending ones, or the rest of a read that is not stashed yet.
#[derive(Clone, Copy)]
enum Stash<'a> {
    No,
    Rest(&'a [u8]),
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_closes_after_silence_not_while_bytes_flow() {
        let (mut client, a) = duplex(64);
        let (b, mut backend) = duplex(64);
        let idle = Duration::from_secs(10);
        let copy = tokio::spawn(copy_until_idle(a, b, idle));
        let started = Instant::now();
        let mut byte = [0u8; 1];
        // A byte every 6 s, either way, for a minute: never 10 s of silence.
        for i in 0..10 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            if i % 2 == 0 {
                client.write_all(b"x").await.unwrap();
                backend.read_exact(&mut byte).await.unwrap();
            } else {
                backend.write_all(b"y").await.unwrap();
                client.read_exact(&mut byte).await.unwrap();
            }
        }
        assert!(!copy.is_finished());
        // Then silence: closed 10 s after the last byte.
        assert_eq!(copy.await.unwrap().unwrap(), Ended::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(70));
        // Both sides see the end.
        assert_eq!(client.read(&mut byte).await.unwrap(), 0);
        assert_eq!(backend.read(&mut byte).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_tunnel_ends_when_one_side_closes() {
        let (mut client, a) = duplex(64);
        let (b, mut backend) = duplex(64);
        let copy = tokio::spawn(copy_until_idle(a, b, Duration::from_secs(3600)));
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        backend.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // More than one buffer's worth, then the backend's end.
        let big = vec![5u8; 100_000];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        backend.write_all(&big).await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), big);
        assert_eq!(copy.await.unwrap().unwrap(), Ended::Closed(4, 100_000));
        // The other direction is closed too.
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}

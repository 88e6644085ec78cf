//! Upgrades (WebSocket): a `101 Switching Protocols` answer turns the client's connection
//! and the backend's into one two-way tunnel.
//!
//! A request that asks for an upgrade (`Connection: upgrade` and an `Upgrade` field, see
//! [`super::headers`]) goes to the backend with both fields. Any answer but `101` is an
//! ordinary response. On `101`, the backend connection leaves HTTP (it is never pooled
//! again) and, once hyper has sent the `101` to the client and handed over the client's
//! connection ([`hyper::upgrade::on`]), bytes are copied both ways as they come, in one
//! task, until both sides have closed, or neither has sent a byte for the tunnel idle
//! timeout, or the server's shutdown time is up.
//!
//! The tunnel counts as in flight for the balancer until it closes: [`TrackBody`] hands the
//! request's guard to the tunnel (through [`Hold`]) instead of to the `101`'s empty body.
//!
//! [`TrackBody`]: super::TrackBody

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response, StatusCode};
use http_body::Body;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::shutdown::Watch;
use super::upstream::UpstreamBody;
use crate::balance::InFlight;
use crate::BoxError;

/// What an upgrade request needs to become a tunnel, taken from it before it is sent.
pub(crate) struct Upgrade {
    /// The client's connection, once hyper has sent the `101`.
    client: OnUpgrade,
    /// The server's shutdown, when the request came through [`super::Server`].
    shutdown: Option<Watch>,
    idle_timeout: Duration,
}

impl Upgrade {
    pub(crate) fn take<B>(request: &mut Request<B>, idle_timeout: Duration) -> Upgrade {
        Upgrade {
            // Without hyper's handle (a request that did not come from a hyper server), a
            // `101` still passes, and its tunnel ends at once.
            client: hyper::upgrade::on(&mut *request),
            shutdown: request.extensions_mut().remove::<Watch>(),
            idle_timeout,
        }
    }

    /// Sends the request with `sent`; a `101` answer starts the tunnel.
    pub(crate) async fn after<B, F>(self, sent: F) -> Result<Response<UpstreamBody<B>>, BoxError>
    where
        F: Future<Output = Result<Response<UpstreamBody<B>>, BoxError>>,
        B: Body + Unpin,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let mut response = sent.await?;
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
    let run = async {
        let mut client = TokioIo::new(client.await.map_err(io::Error::other)?);
        // What the backend sent right after its `101`.
        if !read_ahead.is_empty() {
            client.write_all(&read_ahead).await?;
        }
        copy_until_idle(client, backend, idle_timeout).await
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
    /// Both sides closed: bytes sent from the client, and from the backend.
    Closed(u64, u64),
    /// Neither side sent a byte for the idle timeout.
    Idle,
}

/// Copies bytes both ways between `a` and `b` (each side's end passed on as a write
/// shutdown) until both have ended, or until neither has sent a byte for `idle_timeout`.
async fn copy_until_idle<A, B>(a: A, b: B, idle_timeout: Duration) -> io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds from `start` to the last byte read on either side.
    let last = AtomicU64::new(0);
    let mut a = Active {
        io: a,
        last: &last,
        start,
    };
    let mut b = Active {
        io: b,
        last: &last,
        start,
    };
    let idle = async {
        loop {
            let deadline =
                start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            copied.map(|(up, down)| Ended::Closed(up, down))
        }
        () = idle => Ok(Ended::Idle),
    }
}

/// One side of a tunnel, noting when it last read a byte.
struct Active<'a, T> {
    io: T,
    last: &'a AtomicU64,
    start: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = self.start.elapsed().as_millis() as u64;
            self.last.store(now, Ordering::Relaxed);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
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
    async fn a_tunnel_ends_when_both_sides_close() {
        let (mut client, a) = duplex(64);
        let (b, mut backend) = duplex(64);
        let copy = tokio::spawn(copy_until_idle(a, b, Duration::from_secs(3600)));
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        backend.write_all(b"pong!").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pong!");
        assert_eq!(copy.await.unwrap().unwrap(), Ended::Closed(4, 5));
    }
}

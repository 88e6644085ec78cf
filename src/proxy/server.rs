//! Serving HTTP/1.1 connections with a tower service, safely by default.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceExt;
use tower_service::Service;

use super::access::{self, LoggedBody};
use super::h1::FramingGuard;
use super::ClientAddr;
use crate::BoxError;

/// Serves HTTP/1.1 on a listener.
///
/// Safe defaults for a proxy facing clients:
/// - a client must send its request headers within `header_read_timeout` (10 s) or the
///   connection is closed (slowloris);
/// - request heads over `max_header_bytes` (64 KiB) are refused with `431`;
/// - malformed requests get `400` from hyper and only their connection is affected; so do
///   requests that the HTTP/1 codec's rules refuse, which are never passed on: both
///   `Content-Length` and `Transfer-Encoding`, two different `Content-Length`s, two `Host`s
///   or an invalid one (and `CONNECT` gets `405`); the connection closes after the answer;
/// - every request carries its connection's [`ClientAddr`];
/// - TCP_NODELAY on accepted sockets.
///
/// Give it a listener from [`bind`], whose accept queue takes a burst of clients.
#[derive(Debug, Clone)]
pub struct Server {
    header_read_timeout: Duration,
    max_header_bytes: usize,
    observed: bool,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            observed: true,
        }
    }
}

impl Server {
    /// A server with the defaults above.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time a client has to send a request's headers.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Largest request head accepted (at least 8 KiB).
    pub fn max_header_bytes(mut self, bytes: usize) -> Self {
        self.max_header_bytes = bytes.max(8 * 1024);
        self
    }

    /// Whether this server's connections and answers count in [`crate::stats`] (client
    /// connections, local `400`s) and its requests go to the access log (default: yes).
    /// A server that is not the proxy, such as a demo backend, turns it off.
    pub fn observed(mut self, observed: bool) -> Self {
        self.observed = observed;
        self
    }

    /// Accepts connections on `listener` and serves each with a clone of `service` until
    /// `shutdown` completes; then stops accepting (the listener is closed, so new
    /// connections are refused), lets requests in flight finish, and returns.
    pub async fn serve<S, B>(
        &self,
        listener: TcpListener,
        service: S,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()>
    where
        S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        // One buffer for head and body instead of a queue of buffers for writev: most
        // proxied responses are small, and the queue cost about 360 instructions per
        // request (callgrind); an 8 MiB download costs the same CPU either way.
        http.timer(TokioTimer::new())
            .writev(false)
            .header_read_timeout(self.header_read_timeout)
            .max_header_size(self.max_header_bytes);
        let observed = self.observed;
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (stream, verdict) = FramingGuard::new(stream);
            let service = service.clone();
            let requests = AtomicU64::new(0);
            let hyper_service =
                hyper::service::service_fn(move |mut request: Request<Incoming>| {
                    let index = requests.fetch_add(1, Ordering::Relaxed);
                    // Off by default: then one check of a cached interest, nothing more.
                    let entry =
                        (observed && access::enabled()).then(|| access::Entry::new(peer, &request));
                    request.extensions_mut().insert(ClientAddr(peer));
                    // The codec's request rules (framing, Host, CONNECT): refused, never forwarded.
                    let call = match verdict.check(index, &request) {
                        None => Ok(call_now(service.clone(), request)),
                        Some(refusal) => Err(refusal),
                    };
                    async move {
                        let response = match call {
                            Ok(call) => call.await.map(|r| r.map(Either::Left)),
                            Err(refusal) => {
                                tracing::debug!(%peer, %refusal, "refused a request");
                                if observed {
                                    crate::stats::local_response(refusal.status().as_u16());
                                }
                                Ok(refusal.response())
                            }
                        };
                        response.map(|response| {
                            let entry = entry.map(|mut entry| {
                                entry.respond(&response);
                                entry
                            });
                            response.map(|body| LoggedBody::new(body, entry))
                        })
                    }
                });
            let conn = http.serve_connection(TokioIo::new(stream), hyper_service);
            let conn = graceful.watch(conn);
            let open = observed.then(crate::stats::ClientConnection::open);
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    // hyper answered a malformed request itself.
                    if open.is_some() && error.is_parse_too_large() {
                        crate::stats::local_response(431);
                    } else if open.is_some() && error.is_parse() {
                        crate::stats::local_response(400);
                    }
                    tracing::debug!(%peer, %error, "client connection ended with an error");
                }
                drop(open);
            });
        }
        drop(listener);
        graceful.shutdown().await;
        Ok(())
    }
}

/// Calls `service` at once when it is ready (a balancer always is), else once it is.
///
/// hyper reads on from the connection right after handing over a request, before it
/// polls the response future. A request still waiting in that future keeps its head, a
/// slice of the connection's read buffer, alive, so the read has to allocate a new
/// buffer; called at once, the service has encoded and dropped the head by then
/// (callgrind: 480 fewer instructions per request).
fn call_now<S, R>(
    mut service: S,
    request: R,
) -> future::Either<S::Future, tower::util::Oneshot<S, R>>
where
    S: Service<R>,
{
    match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => future::Either::Left(service.call(request)),
        // Not ready, or failed: `oneshot` waits for readiness and reports the error.
        _ => future::Either::Right(service.oneshot(request)),
    }
}

/// Binds a listener for [`Server::serve`] with a listen backlog of 4096 (the kernel caps it
/// at `net.core.somaxconn`).
///
/// `TcpListener::bind` asks for 128, as the standard library does. A burst of clients
/// overflows that: 256 connections opened at once (wrk's start) had 122 SYNs dropped,
/// each retried by its client only after a second.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// [`Server::serve`] with the default settings.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Server::new().serve(listener, service, shutdown).await
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::call_now;

    #[tokio::test]
    async fn a_ready_service_is_called_before_the_future_is_polled() {
        let (service, mut handle) = tower_test::mock::pair::<&str, &str>();
        handle.allow(1);
        let response = call_now(service.clone(), "now");
        let (request, respond) = handle
            .next_request()
            .now_or_never()
            .flatten()
            .expect("called at once");
        assert_eq!(request, "now");
        respond.send_response("done");
        assert_eq!(response.await.unwrap(), "done");

        // Not ready: called once it is, as `oneshot` would.
        let response = call_now(service, "later");
        assert!(handle.next_request().now_or_never().is_none());
        let mut response = tokio_test::task::spawn(response);
        assert!(response.poll().is_pending());
        handle.allow(1);
        assert!(response.is_woken());
        assert!(response.poll().is_pending());
        let (request, respond) = handle.next_request().await.expect("called");
        assert_eq!(request, "later");
        respond.send_response("done");
        assert_eq!(response.await.unwrap(), "done");
    }
}

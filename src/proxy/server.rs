//! Serving HTTP/1.1 connections with a tower service, safely by default.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tower::ServiceExt;
use tower_service::Service;

use super::access::{self, LoggedBody};
use super::framing::{FramingGuard, Verdict};
use super::ClientAddr;
use crate::BoxError;

/// Serves HTTP/1.1 on a listener.
///
/// Safe defaults for a proxy facing clients:
/// - a client must send its request headers within `header_read_timeout` (10 s) or the
///   connection is closed (slowloris);
/// - request heads over `max_header_bytes` (64 KiB) are refused with `431`;
/// - malformed requests get `400` from hyper and only their connection is affected; so do
///   requests with both `Content-Length` and `Transfer-Encoding` (and two different
///   `Content-Length`s), which are never passed on: the connection closes after the `400`;
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
        let builders = Arc::new(self.builders());
        // Ends the wait for a new connection's first bytes when the server stops.
        let (stopping, _) = tokio::sync::watch::channel(());
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
            let service = service.clone();
            let (builders, watcher) = (builders.clone(), graceful.watcher());
            let mut stopping = stopping.subscribe();
            let header_read_timeout = self.header_read_timeout;
            let open = observed.then(crate::stats::ClientConnection::open);
            tokio::spawn(async move {
                // HTTP/2 with prior knowledge opens with its preface; anything else is
                // HTTP/1. A client that sends nothing is dropped as HTTP/1 would drop it.
                let sniffed = tokio::select! {
                    sniffed = tokio::time::timeout(header_read_timeout, is_http2(&stream)) => sniffed,
                    _ = stopping.changed() => return,
                };
                let Ok(http2) = sniffed else { return };
                let result = if http2 {
                    serve_http2(&builders, stream, service, peer, observed, watcher).await
                } else {
                    let (stream, verdict) = FramingGuard::new(stream);
                    let hyper_service = connection_service(service, peer, observed, verdict);
                    let conn = builders
                        .http1
                        .serve_connection(TokioIo::new(stream), hyper_service);
                    watcher.watch(conn).await
                };
                if let Err(error) = result {
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
        drop(stopping);
        graceful.shutdown().await;
        Ok(())
    }
}

/// The connection builders of a [`Server`], shared by its connections.
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    #[cfg(feature = "http2")]
    http2: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
}

impl Server {
    fn builders(&self) -> Builders {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // One buffer for head and body instead of a queue of buffers for writev: most
        // proxied responses are small, and the queue cost about 360 instructions per
        // request (callgrind); an 8 MiB download costs the same CPU either way.
        http1
            .timer(TokioTimer::new())
            .writev(false)
            .header_read_timeout(self.header_read_timeout)
            .max_header_size(self.max_header_bytes);
        #[cfg(feature = "http2")]
        let http2 = {
            let mut http2 =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            // A head over the limit is answered `431` by h2 itself.
            http2
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX));
            http2
        };
        Builders {
            http1,
            #[cfg(feature = "http2")]
            http2,
        }
    }
}

/// The connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4) begins so; no
/// HTTP/1 request does (`PRI` is no method hyper takes).
const PREFACE_START: &[u8] = b"PRI ";

/// Whether the client opened with the HTTP/2 preface, looked at without reading it.
async fn is_http2(stream: &TcpStream) -> bool {
    if !cfg!(feature = "http2") {
        return false;
    }
    let mut start = [0u8; PREFACE_START.len()];
    // Clients send the preface in one write. A first segment of a byte or three that may
    // begin it (`P`, `PR`, `PRI`) is rare: a peek returns it again at once, and cannot
    // tell whether more is coming or the client has closed, so look again for up to
    // 100 ms, then leave it to HTTP/1 (which answers or closes as for any short request).
    for _ in 0..20 {
        let n = match stream.peek(&mut start).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 || start[..n] != PREFACE_START[..n] {
            return false;
        }
        if n == start.len() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[cfg(feature = "http2")]
async fn serve_http2<S, B>(
    builders: &Builders,
    stream: TcpStream,
    service: S,
    peer: SocketAddr,
    observed: bool,
    watcher: hyper_util::server::graceful::Watcher,
) -> hyper::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // HTTP/2 frames its messages itself: no FramingGuard.
    let hyper_service = connection_service(service, peer, observed, Unframed);
    let conn = builders
        .http2
        .serve_connection(TokioIo::new(stream), hyper_service);
    watcher.watch(conn).await
}

#[cfg(not(feature = "http2"))]
async fn serve_http2<S>(
    _: &Builders,
    _: TcpStream,
    _: S,
    _: SocketAddr,
    _: bool,
    _: hyper_util::server::graceful::Watcher,
) -> hyper::Result<()> {
    Ok(())
}

/// Which requests of a connection are refused for ambiguous framing.
trait Refuses: Send + Sync + 'static {
    /// Whether the request with this index (0-based, in arrival order) is.
    fn refuses(&self, index: u64) -> bool;
}

impl Refuses for Verdict {
    #[inline]
    fn refuses(&self, index: u64) -> bool {
        Verdict::refuses(self, index)
    }
}

/// HTTP/2: none (it frames its messages itself).
#[cfg(feature = "http2")]
struct Unframed;

#[cfg(feature = "http2")]
impl Refuses for Unframed {
    #[inline]
    fn refuses(&self, _: u64) -> bool {
        false
    }
}

/// The hyper service of one client connection: every request carries the connection's
/// [`ClientAddr`], goes to the access log, and (HTTP/1) is refused with `400` from the first
/// one whose framing `verdict` found ambiguous.
///
/// Generic over the verdict, so that HTTP/1 and HTTP/2 each get a copy of their own: with a
/// single caller, hyper's HTTP/1 dispatcher inlines it as it did before HTTP/2. Shared by
/// both, it was not inlined, and the moves of each request through the calls cost about
/// 780 instructions per proxied HTTP/1.1 request (callgrind on the release standalone:
/// 20,218 before HTTP/2, 21,000 shared, 20,432 with a copy each).
fn connection_service<S, B, V: Refuses>(
    service: S,
    peer: SocketAddr,
    observed: bool,
    verdict: V,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<LoggedBody<Either<B, Full<Bytes>>>>,
    Error = Infallible,
    Future: Send + 'static,
>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let requests = AtomicU64::new(0);
    hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let index = requests.fetch_add(1, Ordering::Relaxed);
        // Off by default: then one check of a cached interest, nothing more.
        let entry = (observed && access::enabled()).then(|| access::Entry::new(peer, &request));
        request.extensions_mut().insert(ClientAddr(peer));
        let call = (!verdict.refuses(index)).then(|| call_now(service.clone(), request));
        async move {
            let response = match call {
                Some(call) => call.await.map(|r| r.map(Either::Left)),
                None => {
                    tracing::debug!(%peer, "refused a request with both Content-Length and Transfer-Encoding");
                    if observed {
                        crate::stats::local_response(400);
                    }
                    Ok(ambiguous_framing())
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
    })
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

/// `400` for a request whose framing is ambiguous; the connection closes after it.
fn ambiguous_framing<B>() -> Response<Either<B, Full<Bytes>>> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"400 Bad Request: both Content-Length and Transfer-Encoding\n",
    ))));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
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
    use tokio::io::AsyncWriteExt;

    use super::{call_now, is_http2};

    /// What `is_http2` says of a connection whose client sent `bytes` (then closed, with
    /// `close`).
    async fn sniff(bytes: &[u8], close: bool) -> bool {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(bytes).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        tokio::time::timeout(std::time::Duration::from_secs(2), is_http2(&server))
            .await
            .expect("decided within 2 s")
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_from_http1() {
        assert_eq!(
            sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false).await,
            cfg!(feature = "http2")
        );
        assert!(!sniff(b"GET / HTTP/1.1\r\n", false).await);
        assert!(!sniff(b"PUT / HTTP/1.1\r\n", false).await);
        // A byte that may begin the preface, then the end: HTTP/1 answers or closes.
        assert!(!sniff(b"P", true).await);
        assert!(!sniff(b"", true).await);
    }

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

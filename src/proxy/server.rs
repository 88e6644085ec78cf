//! Serving HTTP/1.1 (and, with the `http2` feature, HTTP/2 over cleartext on the same
//! port) with a tower service, safely by default.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{self, FutureExt as _};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
#[cfg(feature = "http2")]
use hyper::body::Incoming;
#[cfg(feature = "http2")]
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::ReadBuf;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_service::Service;

use super::access::{self, LoggedBody};
use super::h1::{check_request, serve_connection, FramingRefused, Refusal, RequestBody, Settings};
#[cfg(feature = "http2")]
use super::idle::{GuardedBody, Streams};
use super::shutdown::{Shutdown, Watch};
use super::ClientAddr;
use crate::BoxError;

/// Serves HTTP/1.1 on a listener and, with the `http2` feature, HTTP/2 with prior knowledge
/// (h2c): a connection that opens with the HTTP/2 preface is served as HTTP/2.
///
/// HTTP/1.1 is served by the proxy's own codec (`h1::serve`), whose connections hold no
/// buffer while they wait for a request; HTTP/2 by hyper. The service sees a
/// [`RequestBody`] either way.
///
/// Safe defaults for a proxy facing clients:
/// - a client must send its request headers within `header_read_timeout` (10 s) or the
///   connection is closed (slowloris);
/// - request heads over `max_header_bytes` (64 KiB) are refused with `431`;
/// - malformed requests get `400` and only their connection is affected; so do
///   requests that the HTTP/1 codec's rules refuse, which are never passed on: both
///   `Content-Length` and `Transfer-Encoding`, two different `Content-Length`s, two `Host`s
///   or an invalid one (and `CONNECT` gets `405`); the connection closes after the answer;
/// - every request carries its connection's [`ClientAddr`];
/// - TCP_NODELAY on accepted sockets;
/// - a keep-alive connection with no request for `client_idle_timeout` (60 s) is closed,
///   so that idle clients cannot hold every connection;
/// - a connection costs a socket and a small task until the client sends something, and
///   then only while a request is under way: a waiting connection holds no buffer (a
///   silent one is closed after `header_read_timeout`);
/// - HTTP/1.0 clients are answered in HTTP/1.0, and kept only with
///   `Connection: keep-alive`; `Expect: 100-continue` is answered when the body is first
///   read; a response whose length is not known is chunked (HTTP/1.1, with trailers when
///   the client sent `TE: trailers`) or ends with the connection (HTTP/1.0);
/// - with [`max_connections`](Self::max_connections), at most that many client connections
///   at once: at the limit the server stops accepting, and new clients wait in the listen
///   backlog until a connection closes (no busy loop, no error for lack of descriptors);
///   a connection upgraded to a tunnel keeps its place until the tunnel closes;
/// - upgrades (WebSocket) pass through: see [`Backend`](super::Backend);
/// - at shutdown, requests and tunnels in flight get `shutdown_timeout` (30 s) to finish;
///   then their connections are closed.
///
/// Give it a listener from [`bind`], whose accept queue takes a burst of clients.
#[derive(Debug, Clone)]
pub struct Server {
    header_read_timeout: Duration,
    max_header_bytes: usize,
    observed: bool,
    max_connections: Option<usize>,
    client_idle_timeout: Duration,
    shutdown_timeout: Duration,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            observed: true,
            max_connections: None,
            client_idle_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
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

    /// Client connections held at once (HTTP/1.1, HTTP/2, upgraded); none by default. At
    /// the limit the server accepts no more until one closes: new clients wait in the
    /// listen backlog. (The standalone proxy derives its default from the open-files limit.)
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = Some(max.clamp(1, Semaphore::MAX_PERMITS));
        self
    }

    /// Time a keep-alive client connection may wait for its next request before it is
    /// closed (default 60 s). Once a byte of the request has come, the rest of its head
    /// has `header_read_timeout`.
    pub fn client_idle_timeout(mut self, timeout: Duration) -> Self {
        self.client_idle_timeout = timeout;
        self
    }

    /// Time that requests in flight and tunnels get to finish once the shutdown begins
    /// (default 30 s); then their connections are closed.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
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
    /// connections are refused), lets requests in flight and tunnels finish within the
    /// [shutdown timeout](Self::shutdown_timeout), closes what is still open, and returns.
    /// Idle keep-alive connections are closed at once.
    pub async fn serve<S, B>(
        &self,
        listener: TcpListener,
        service: S,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()>
    where
        S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let stopping = Shutdown::new();
        // Read by each connection from here: its task is smaller than with a copy.
        let shared = Arc::new(self.shared());
        let observed = self.observed;
        let limit = self.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        tokio::pin!(shutdown);
        loop {
            // At the limit, accept nothing until a connection closes and gives back its
            // permit: new clients wait in the listen backlog.
            let permit = match &limit {
                None => None,
                Some(limit) => tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    permit = limit.clone().acquire_owned() => permit.ok(),
                },
            };
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
            let open = observed.then(crate::stats::ClientConnection::open);
            // The connection's place (its permit) is held by its watch: by the connection,
            // then by the tunnel it may become.
            let mut watch = stopping.watch().holding(permit);
            let (service, shared) = (service.clone(), shared.clone());
            tokio::spawn(async move {
                // Wait for the client's first bytes: HTTP/2 if they are its preface (hyper
                // allocates its buffers as soon as it has a connection), else HTTP/1. A
                // client that sends nothing is closed by the header timeout.
                let timeout = shared.settings.header_read_timeout;
                let sniffed = sniff(&stream, &mut watch, timeout).await;
                match sniffed {
                    Some(true) => {
                        // Boxed, as the HTTP/1 connection below: the task of a connection
                        // that has sent nothing yet stays small.
                        let result =
                            Box::pin(serve_http2(&shared, stream, service, peer, observed, watch))
                                .await;
                        if let Err(error) = result {
                            // h2 answered a malformed request itself.
                            tracing::debug!(%peer, %error, "client connection ended with an error");
                        }
                    }
                    Some(false) => {
                        let service = connection_service(service, peer, observed, Http1);
                        let mut cut = watch.clone();
                        let settings = shared.settings;
                        let conn = Box::pin(serve_connection(stream, service, settings, watch));
                        let answered = tokio::select! {
                            biased;
                            answered = conn => answered,
                            () = cut.cut() => None,
                        };
                        if let (Some(answered), true) = (answered, open.is_some()) {
                            // The codec answered a request that is not HTTP/1, or too large.
                            crate::stats::local_response(answered.status());
                            tracing::debug!(%peer, status = answered.status(), "answered a malformed request");
                        }
                    }
                    None => {
                        tracing::debug!(%peer, "client sent nothing; closing");
                        return;
                    }
                }
                drop(open);
            });
        }
        drop(listener);
        stopping.run(self.shutdown_timeout).await;
        Ok(())
    }
}

/// What the connections of a [`Server`] share: the HTTP/1 settings and the HTTP/2 builder.
struct Shared {
    settings: Settings,
    #[cfg(feature = "http2")]
    http2: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
}

impl Server {
    fn shared(&self) -> Shared {
        #[cfg(feature = "http2")]
        let http2 = {
            let mut http2 =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            // A head over the limit is answered `431` by h2 itself.
            http2
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW);
            http2
        };
        Shared {
            settings: Settings {
                header_read_timeout: self.header_read_timeout,
                idle_timeout: self.client_idle_timeout,
                max_head: self.max_header_bytes,
            },
            #[cfg(feature = "http2")]
            http2,
        }
    }
}

/// What a client may send on one stream before the proxy has passed it on. The h2 crate
/// gives a connection's window back only as each stream's data is read, so an upload its
/// backend has stopped reading holds its stream's window of the connection's. With
/// hyper's defaults, 1 MiB for both, one such upload stops all the others on the client's
/// connection. These are Envoy's values for edge proxies: 16 such uploads before the
/// others wait, and no more memory per connection than before.
#[cfg(feature = "http2")]
const STREAM_WINDOW: u32 = 64 * 1024;
/// The connection's window.
#[cfg(feature = "http2")]
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4) begins so; no
/// HTTP/1 request does (`PRI` is no method hyper takes).
const PREFACE_START: &[u8] = b"PRI ";

/// Waits for the client's first bytes, looked at without reading them: `Some(true)` if they
/// are the HTTP/2 preface (with the `http2` feature), `Some(false)` for anything else, `None`
/// if the client closed, the socket failed, `timeout` passed or the shutdown began first.
/// (A peek, not `readable()`, which may report a socket readable that is not.)
///
/// The task of a connection that has sent nothing yet waits here, so this holds no more
/// than it must: one timer, the shutdown's wait, and no peek future between polls.
async fn sniff(stream: &TcpStream, watch: &mut Watch, timeout: Duration) -> Option<bool> {
    let mut timer = pin!(tokio::time::sleep(timeout));
    let mut draining = pin!(watch.draining());
    let mut start = [0u8; PREFACE_START.len()];
    // Clients send the preface in one write. A first segment of a byte or three that may
    // begin it (`P`, `PR`, `PRI`) is rare: a peek returns it again at once, and cannot
    // tell whether more is coming or the client has closed, so look again for up to
    // 100 ms, then leave it to HTTP/1 (which answers or closes as for any short request).
    for _ in 0..20 {
        let n = std::future::poll_fn(|cx| {
            if let Poll::Ready(peeked) = stream.poll_peek(cx, &mut ReadBuf::new(&mut start)) {
                return Poll::Ready(peeked.ok().filter(|n| *n > 0));
            }
            if timer.as_mut().poll(cx).is_ready() || draining.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await?;
        if !cfg!(feature = "http2") || start[..n] != PREFACE_START[..n] {
            return Some(false);
        }
        if n == start.len() {
            return Some(true);
        }
        // Boxed (rare); the timeout and the shutdown are looked at again after it.
        Box::pin(tokio::time::sleep(Duration::from_millis(5))).await;
    }
    Some(false)
}

#[cfg(feature = "http2")]
async fn serve_http2<S, B>(
    shared: &Shared,
    stream: TcpStream,
    service: S,
    peer: SocketAddr,
    observed: bool,
    watch: Watch,
) -> hyper::Result<()>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // HTTP/2 frames its messages itself: no FramingGuard.
    let service = connection_service(service, peer, observed, Http2);
    // Each request counts as open until its response body is done, for the idle timeout.
    let streams = Streams::new();
    let counted = streams.clone();
    let hyper_service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let guard = counted.open();
        let response = hyper::service::Service::call(&service, request.map(RequestBody::from));
        async move {
            let response = response.await?;
            Ok::<_, Infallible>(response.map(|body| GuardedBody::new(body, guard)))
        }
    });
    let idle = shared.settings.idle_timeout;
    let conn = shared
        .http2
        .serve_connection(TokioIo::new(stream), hyper_service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        ended = watch.clone().connection(conn.as_mut(), |conn| {
            conn.get_mut().as_mut().graceful_shutdown()
        }) => return ended,
        () = streams.idle_for(idle) => {}
    }
    // Idle: a GOAWAY, and the connection ends once the client has answered the PING that
    // hyper sends with it. A client that never answers would keep the connection, and its
    // place under `max_connections`, for good: still idle after a grace (the idle timeout,
    // at most the header timeout), it is closed.
    conn.as_mut().graceful_shutdown();
    let grace = idle.min(shared.settings.header_read_timeout);
    tokio::select! {
        ended = watch.connection(conn, |_| {}) => ended,
        () = streams.idle_for(grace) => Ok(()),
    }
}

#[cfg(not(feature = "http2"))]
async fn serve_http2<S>(
    _: &Shared,
    _: TcpStream,
    _: S,
    _: SocketAddr,
    _: bool,
    _: Watch,
) -> hyper::Result<()> {
    Ok(())
}

/// What differs between the requests of an HTTP/1 and an HTTP/2 connection.
trait Protocol: Send + Sync + 'static {
    /// Whether the request is refused, and why: the HTTP/1 codec's request rules (framing,
    /// `Host`, `CONNECT`).
    fn check(&self, request: &Request<RequestBody>) -> Option<Refusal>;
}

/// HTTP/1: the codec's framing verdict (the request carries it when it refuses), then the
/// rules of `Host` and `CONNECT`.
struct Http1;

impl Protocol for Http1 {
    #[inline]
    fn check(&self, request: &Request<RequestBody>) -> Option<Refusal> {
        match request.extensions().get::<FramingRefused>() {
            Some(refused) => Some(Refusal::Framing(refused.0)),
            None => check_request(request).err(),
        }
    }
}

/// HTTP/2: it frames its messages itself, and has no upgrades.
#[cfg(feature = "http2")]
struct Http2;

#[cfg(feature = "http2")]
impl Protocol for Http2 {
    /// HTTP/2 frames its messages itself; the rules of `Host` and `CONNECT` hold.
    #[inline]
    fn check(&self, request: &Request<RequestBody>) -> Option<Refusal> {
        check_request(request).err()
    }
}

/// The hyper service of one client connection: every request carries the connection's
/// [`ClientAddr`], goes to the access log, and (HTTP/1) is refused with `400` from the first
/// one whose framing `verdict` found ambiguous.
///
/// Generic over the protocol, so that HTTP/1 and HTTP/2 each get a copy of their own: with a
/// single caller, hyper's HTTP/1 dispatcher inlines it as it did before HTTP/2. Shared by
/// both, it was not inlined, and the moves of each request through the calls cost about
/// 780 instructions per proxied HTTP/1.1 request (callgrind on the release standalone:
/// 20,218 before HTTP/2, 21,000 shared, 20,432 with a copy each).
fn connection_service<S, B, V: Protocol>(
    service: S,
    peer: SocketAddr,
    observed: bool,
    protocol: V,
) -> impl hyper::service::Service<
    Request<RequestBody>,
    Response = Response<LoggedBody<Either<B, Full<Bytes>>>>,
    Error = Infallible,
    Future: Send + 'static,
>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    hyper::service::service_fn(move |mut request: Request<RequestBody>| {
        // Off by default: then one check of a cached interest, nothing more.
        let entry = (observed && access::enabled()).then(|| access::Entry::new(peer, &request));
        request.extensions_mut().insert(ClientAddr(peer));
        // The codec's request rules (framing, Host, CONNECT): refused, never forwarded.
        // Combinators rather than an async block, which would keep the call future twice
        // (as captured, and as awaited): this future is moved into each request's box.
        let response = match protocol.check(&request) {
            None => future::Either::Left(
                call_now(service.clone(), request)
                    .map(|result| result.map(|r| r.map(Either::Left))),
            ),
            Some(refusal) => {
                tracing::debug!(%peer, %refusal, "refused a request");
                if observed {
                    crate::stats::local_response(refusal.status().as_u16());
                }
                future::Either::Right(future::ready(Ok(refusal.response())))
            }
        };
        response.map(move |result| {
            let Ok(response) = result;
            let entry = entry.map(|mut entry| {
                entry.respond(&response);
                entry
            });
            Ok(response.map(|body| LoggedBody::new(body, entry)))
        })
    })
}

/// Calls `service` at once when it is ready (a balancer always is), else once it is.
///
/// hyper reads on from the connection right after handing over a request, before it
/// polls the response future. A request still waiting in that future keeps its head, a
/// slice of the connection's read buffer, alive, so the read has to allocate a new
/// buffer; called at once, the service has encoded and dropped the head by then
/// (callgrind: 480 fewer instructions per request).
///
/// The wait for readiness is boxed: it holds the request and a clone of the service, so
/// inline it would make every request's future that much larger, ready or not.
fn call_now<S, R>(
    mut service: S,
    request: R,
) -> future::Either<S::Future, Pin<Box<tower::util::Oneshot<S, R>>>>
where
    S: Service<R>,
{
    match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => future::Either::Left(service.call(request)),
        // Not ready, or failed: `oneshot` waits for readiness and reports the error.
        _ => future::Either::Right(Box::pin(service.oneshot(request))),
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
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
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

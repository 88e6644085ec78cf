//! The per-backend HTTP service and its connection pool.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use sync_wrapper::SyncWrapper;
use tokio::net::TcpStream;
use tower_service::Service;

use super::error::{BackendError, ConnectError, ResponseTimeout};
use super::h1::{encode_head, exchange, keep_request, Conn, Elapsed, Head, Pool, UpstreamBody};
use super::replay::{self, ReplayBody};
use super::upgrade::Upgrade;
use super::{peer_ip, socket_target};
use crate::balance::error::Unsent;
use crate::balance::MakeBackend;
use crate::BoxError;

/// The transport of the HTTP balancer: HTTP/1.1 over pooled keep-alive TCP connections.
///
/// A `Client` holds settings only; [`MakeBackend`] aims it at one backend, giving a
/// [`Backend`] with its own pool of idle connections.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::balance::MakeBackend;
/// use tower_lb::proxy::Client;
///
/// let client: Client = Client::new()
///     .connect_timeout(Duration::from_secs(2))
///     .response_timeout(Duration::from_secs(30));
/// let backend = client.make_backend(&"127.0.0.1:9001".parse().unwrap());
/// assert_eq!(backend.authority(), "127.0.0.1:9001");
/// ```
///
/// Its backends take requests with any body type (see [`Backend`]).
#[derive(Clone)]
pub struct Client {
    settings: Settings,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("settings", &self.settings)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    connect_timeout: Duration,
    response_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    tunnel_idle_timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            settings: Settings {
                connect_timeout: Duration::from_secs(2),
                response_timeout: Duration::from_secs(30),
                max_idle: 1024,
                idle_timeout: Duration::from_secs(60),
                tunnel_idle_timeout: Duration::from_secs(3600),
            },
        }
    }
}

impl Client {
    /// A client with the contract's defaults: 2 s to connect, 30 s for response headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time allowed to open a connection to a backend.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Time allowed from sending a request until its response headers arrive, counted from
    /// the end of the request: while its body is still being sent, each write starts it
    /// again (a slow upload is not cut; a backend that stops reading it times out). A
    /// client that sends nothing of its body for as long fails the request by its own
    /// fault: a [`RequestBodyTimeout`](super::error::RequestBodyTimeout) (`408`).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.settings.response_timeout = timeout;
        self
    }

    /// Time an upgraded connection (a WebSocket tunnel) may carry no byte either way before
    /// it is closed (default an hour).
    pub fn tunnel_idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.tunnel_idle_timeout = timeout;
        self
    }

    /// Idle connections kept per backend (default 1024).
    pub fn max_idle(mut self, max: usize) -> Self {
        self.settings.max_idle = max;
        self
    }

    /// Time an idle connection is kept for another request: one unused for this long is
    /// closed within as long again (default 60 s, nginx's `keepalive_timeout` for
    /// upstreams). One that the backend closed goes at the same sweep. Zero keeps none:
    /// every request has a connection of its own.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.idle_timeout = timeout;
        self
    }
}

impl MakeBackend<Authority> for Client {
    type Service = Backend;

    fn make_backend(&self, authority: &Authority) -> Backend {
        Backend::new(authority.clone(), self.settings)
    }
}

/// Forwards HTTP requests to one backend.
///
/// - [`poll_ready`](Service::poll_ready) takes an idle pooled connection (one the backend
///   has not closed) or opens a new one (TCP_NODELAY, `connect_timeout`). A failure there is
///   a [`ConnectError`] *before* the request was handed over, so the balancer can retry it
///   on another backend.
/// - [`call`](Service::call) rewrites the request for the backend (origin-form target,
///   HTTP/1.1, hop-by-hop headers removed, the client appended to `X-Forwarded-For`, `Host`
///   kept) and sends it. If a pooled connection turns out to have been closed by the
///   backend as the request went out (no byte of an answer), an idempotent request is sent
///   once more on a fresh connection. If the backend refuses that one, or a fresh
///   connection closes or resets before any byte of an answer, the idempotent request is
///   given back to the balancer ([`Unsent`]) for another backend. A body the backend has
///   (partly) read is sent again only if it is at most 64 KiB: the [`ReplayBody`] keeps a
///   copy of such a body as it goes out.
///   Response headers must arrive within `response_timeout` ([`ResponseTimeout`]); the
///   response's hop-by-hop headers are removed.
/// - A request that asks for an upgrade (WebSocket) keeps its `Upgrade` field; a `101`
///   answer turns the client's connection (from hyper, [`hyper::upgrade::on`]) and this
///   one into a tunnel that carries bytes both ways until one side closes (then both are
///   closed) or neither sends a byte for the
///   [tunnel idle timeout](Client::tunnel_idle_timeout). That connection is never pooled
///   again. Any other answer is an ordinary response.
/// - The exchange runs in the task that polls the response future and body (for a proxy,
///   the client's connection task): no task or channel per upstream connection. Bodies
///   stream both ways, the request body still being sent while the response streams. The
///   connection goes back to the pool when the response has been read to its end with the
///   request sent in full and neither side asking to close; a body dropped early closes it.
///
/// It serves `Request<B>` for any body type `B` (hyper's `Incoming`, axum's `Body`, a
/// `Full<Bytes>`, …) that is `Unpin`; the body is streamed as it is, with no boxing,
/// and the response body [`UpstreamBody<ReplayBody<B>>`] carries it while it is still
/// being sent. A
/// body that is not `Unpin` can be sent pinned in a box
/// (`http_body_util::combinators::BoxBody`).
pub struct Backend {
    shared: Arc<Shared>,
    conn: State,
}

struct Shared {
    authority: Authority,
    host: HeaderValue,
    settings: Settings,
    pool: Arc<Pool>,
}

// Only ever reached through `&mut self`: SyncWrapper makes the backend `Sync`, as a
// member of a shared snapshot must be, without a lock.
type Connecting = SyncWrapper<Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>>;

enum State {
    None,
    Connecting(Connecting),
    Ready(Conn),
}

impl Backend {
    fn new(authority: Authority, settings: Settings) -> Self {
        let host = HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        Backend {
            shared: Arc::new(Shared {
                authority,
                host,
                pool: Pool::new(settings.max_idle, settings.idle_timeout),
                settings,
            }),
            conn: State::None,
        }
    }

    /// The backend's address.
    pub fn authority(&self) -> &Authority {
        &self.shared.authority
    }

    /// Idle connections in the pool.
    pub fn idle_connections(&self) -> usize {
        self.shared.pool.len()
    }
}

impl Shared {
    async fn connect(self: Arc<Self>) -> Result<Conn, ConnectError> {
        let err = |source| ConnectError {
            backend: self.authority.clone(),
            source,
        };
        let target = socket_target(&self.authority);
        let stream =
            tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(target))
                .await
                .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
                .map_err(err)?;
        stream.set_nodelay(true).map_err(err)?;
        Ok(Conn::new(stream))
    }
}

impl Clone for Backend {
    /// A clone shares the pool and starts without a reserved connection.
    fn clone(&self) -> Self {
        Backend {
            shared: self.shared.clone(),
            conn: State::None,
        }
    }
}

impl<B> Service<Request<B>> for Backend
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<UpstreamBody<ReplayBody<B>>>;
    type Error = BoxError;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match &mut self.conn {
                State::Ready(_) => return Poll::Ready(Ok(())),
                State::None => {
                    self.conn = match self.shared.pool.checkout() {
                        Some(conn) => State::Ready(conn),
                        None => State::Connecting(SyncWrapper::new(Box::pin(
                            self.shared.clone().connect(),
                        ))),
                    };
                }
                State::Connecting(connecting) => {
                    let result = ready!(connecting.get_mut().as_mut().poll(cx));
                    self.conn = State::None;
                    self.conn = State::Ready(result?);
                }
            }
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let State::Ready(conn) = std::mem::replace(&mut self.conn, State::None) else {
            return ResponseFuture::new(async {
                Err(BoxError::from("Backend::call before poll_ready"))
            });
        };
        // Encoded now, so that the request's head (slices of the server's read buffer) is
        // released before the server reads on: hyper then reuses its buffer instead of
        // allocating a new one for every request.
        // A target with an authority (absolute form, or an HTTP/2 request's `:authority`)
        // gives the backend its `Host`: see `encode_head`.
        let mut request = replay::prepare(request);
        let head = encode_head(&request, &self.shared.host, peer_ip(&request));
        let upgrade = head
            .upgrade
            .then(|| Upgrade::take(&mut request, self.shared.settings.tunnel_idle_timeout));
        // The head is in `head`: the parts go back to the codec for the next request.
        let (parts, body) = request.into_parts();
        keep_request(parts);
        let sent = send(self.shared.clone(), conn, head, body);
        match upgrade {
            Some(upgrade) => ResponseFuture::new(upgrade.after::<B, _, _>(sent)),
            None => ResponseFuture::new(sent),
        }
    }
}

async fn send<B>(
    shared: Arc<Shared>,
    conn: Conn,
    head: Head,
    body: ReplayBody<B>,
) -> Result<Response<UpstreamBody<ReplayBody<B>>>, BoxError>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let timeout = shared.settings.response_timeout;
    match exchange(conn, &head, body, shared.pool.clone(), timeout).await {
        Ok(response) => Ok(shared.served(response)),
        // Kept out of this future (boxed, and only on failure): the response is moved
        // out of it, and every byte of it is copied each time.
        Err((error, body)) => {
            Box::pin(recover(shared, head, error.error, error.reused, body)).await
        }
    }
}

/// After a failed exchange: sends the request once more, gives it back to the balancer,
/// or fails it.
#[cold]
async fn recover<B>(
    shared: Arc<Shared>,
    head: Head,
    error: BoxError,
    reused: bool,
    body: Option<ReplayBody<B>>,
) -> Result<Response<UpstreamBody<ReplayBody<B>>>, BoxError>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let failed = |source| BackendError {
        backend: shared.authority.clone(),
        source,
    };
    // The request, never acted on, back to the balancer for another backend, with what
    // was taken of its body; unless its body was taken in part and not kept.
    let give_back = |body: ReplayBody<B>, error: BoxError| -> BoxError {
        let Some((body, replayed)) = body.into_parts() else {
            return error;
        };
        match head.request_again(body, &shared.host) {
            Some(mut request) => {
                if let Some(replayed) = replayed {
                    request.extensions_mut().insert(replayed);
                }
                Box::new(Unsent::new(request, error))
            }
            None => error,
        }
    };
    let (error, body) = match body {
        // A pooled connection the backend closed as we sent: the request never reached
        // it, so once more on a fresh connection.
        Some(mut body) if reused && body.can_replay() => {
            body.rewind();
            tracing::debug!(backend = %shared.authority, error = %error, "stale connection; sending again");
            let conn = match shared.clone().connect().await {
                Ok(conn) => conn,
                // The backend went away (it closed the connection and now refuses new
                // ones; so does one stopped as it leaves the set).
                Err(refused) => return Err(give_back(body, refused.into())),
            };
            let timeout = shared.settings.response_timeout;
            match exchange(conn, &head, body, shared.pool.clone(), timeout).await {
                Ok(response) => return Ok(shared.served(response)),
                Err((error, body)) => (error.error, body),
            }
        }
        body => (error, body),
    };
    // A fresh connection closed or reset before any answer: the backend is going down (a
    // connection it had queued but not accepted when it stopped listening is reset).
    if let Some(body) = body {
        return Err(give_back(body, failed(error).into()));
    }
    if error.is::<Elapsed>() {
        Err(ResponseTimeout {
            backend: shared.authority.clone(),
            after: shared.settings.response_timeout,
        }
        .into())
    } else {
        Err(failed(error).into())
    }
}

impl Shared {
    /// The response as the client gets it. (The response's hop-by-hop fields were left
    /// out as it was parsed.)
    #[inline]
    fn served<B>(&self, mut response: Response<B>) -> Response<B> {
        if super::access::enabled() {
            let served_by = super::access::ServedBy(self.authority.clone());
            response.extensions_mut().insert(served_by);
        }
        response
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("authority", &self.shared.authority)
            .field("idle", &self.idle_connections())
            .finish()
    }
}

type BoxResponse<B> =
    Pin<Box<dyn Future<Output = Result<Response<UpstreamBody<ReplayBody<B>>>, BoxError>> + Send>>;

pin_project_lite::pin_project! {
    /// Response future of [`Backend`].
    pub struct ResponseFuture<B> {
        inner: BoxResponse<B>,
    }
}

impl<B> ResponseFuture<B> {
    fn new(
        f: impl Future<Output = Result<Response<UpstreamBody<ReplayBody<B>>>, BoxError>>
            + Send
            + 'static,
    ) -> Self {
        ResponseFuture { inner: Box::pin(f) }
    }
}

impl<B> Future for ResponseFuture<B> {
    type Output = Result<Response<UpstreamBody<ReplayBody<B>>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.as_mut().poll(cx)
    }
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

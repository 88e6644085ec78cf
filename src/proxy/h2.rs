//! HTTP/2 over cleartext (h2c, prior knowledge) to backends: one connection per backend.

use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::future::{FutureExt, Shared};
use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower_service::Service;

use super::error::{BackendError, ConnectError};
use super::socket_target;
use crate::balance::MakeBackend;
use crate::BoxError;

/// The transport to HTTP/2 backends (h2c with prior knowledge, as gRPC servers expect):
/// one multiplexed connection per backend.
///
/// An `Http2Client` holds settings only; [`MakeBackend`] aims it at one backend, giving an
/// [`Http2Backend`] whose clones share one connection. This is what a gRPC client needs from
/// a load balancer: requests spread over the backends of a [`Backends`](crate::Backends) set,
/// each backend reached over its own HTTP/2 connection, opened in `poll_ready` so that a
/// backend that refuses the connection is skipped for another one (see
/// [`Balance`](crate::Balance)), and reopened when it closes.
///
/// # Examples
///
/// A tonic client over a balanced set (the whole program, with servers, is
/// `examples/tonic.rs`):
///
/// ```
/// use tower_lb::balance::MakeBackend;
/// use tower_lb::policy::RoundRobin;
/// use tower_lb::proxy::{uri::Authority, Http2Client};
/// use tower_lb::{Backends, Balance};
///
/// let client: Http2Client<tonic::body::Body> = Http2Client::new();
/// let backends = Backends::new(RoundRobin::new());
/// for address in ["127.0.0.1:50051", "127.0.0.1:50052"] {
///     let address: Authority = address.parse().unwrap();
///     backends.insert(address.clone(), client.make_backend(&address));
/// }
/// // Any tonic client takes it as its transport, generated ones too
/// // (`GreeterClient::new(Balance::new(backends))`).
/// let _grpc = tonic::client::Grpc::new(Balance::new(backends));
/// ```
///
/// `B` is the type of request bodies sent: `tonic::body::Body` for tonic.
pub struct Http2Client<B> {
    settings: Settings,
    _body: PhantomData<fn(B)>,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    connect_timeout: Duration,
    keep_alive: Option<(Duration, Duration)>,
}

impl<B> Default for Http2Client<B> {
    fn default() -> Self {
        Http2Client {
            settings: Settings {
                connect_timeout: Duration::from_secs(2),
                keep_alive: None,
            },
            _body: PhantomData,
        }
    }
}

impl<B> Clone for Http2Client<B> {
    fn clone(&self) -> Self {
        Http2Client {
            settings: self.settings,
            _body: PhantomData,
        }
    }
}

impl<B> fmt::Debug for Http2Client<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2Client")
            .field("settings", &self.settings)
            .finish()
    }
}

impl<B> Http2Client<B> {
    /// A client that allows 2 s to connect (TCP and HTTP/2 preface) and sends no pings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time allowed to open a connection to a backend (TCP connect and HTTP/2 handshake).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Sends an HTTP/2 `PING` every `interval`, also while idle, and closes the connection
    /// when none is answered within `timeout`: a backend that vanished without closing its
    /// connections (a host down, a network partition) is then noticed without waiting for
    /// a request to time out, and the next request reconnects.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.settings.keep_alive = Some((interval, timeout));
        self
    }
}

impl<B> MakeBackend<Authority> for Http2Client<B> {
    type Service = Http2Backend<B>;

    fn make_backend(&self, authority: &Authority) -> Http2Backend<B> {
        Http2Backend {
            shared: Arc::new(Inner {
                authority: authority.clone(),
                settings: self.settings,
                slot: Mutex::new(Slot {
                    conn: None,
                    connecting: None,
                }),
            }),
            state: State::Idle,
        }
    }
}

/// Sends HTTP/2 requests to one backend over one shared connection.
///
/// - [`poll_ready`](Service::poll_ready) takes the backend's connection if it is open, or
///   opens it (TCP_NODELAY, `connect_timeout`): the first clone to need it connects, the
///   others wait for that attempt and share its outcome. A failure there is a
///   [`ConnectError`] *before* the request was handed over, so the balancer retries it on
///   another backend. A connection that has closed (the backend went away, or sent
///   `GOAWAY`) is replaced by a new one on the next `poll_ready`.
/// - [`call`](Service::call) sends the request as `http://{authority}{path}`: the request's
///   own authority if it has one (tonic's `Grpc::with_origin`), else the backend's address.
///   A request that the connection closed before taking it is sent once more on a new
///   connection. Failures after that are [`BackendError`]s (for gRPC, tonic reports them
///   as `UNKNOWN`). A request already sent when its backend died fails, as it would with
///   any client, and so does one sent in the instant between the backend's death and this
///   client reading the end of the connection.
/// - The connection is driven by a task of its own, as HTTP/2 multiplexes the requests of
///   all clones over it; it ends when the backend closes it or when the last clone is
///   dropped.
pub struct Http2Backend<B> {
    shared: Arc<Inner<B>>,
    state: State<B>,
}

struct Inner<B> {
    authority: Authority,
    settings: Settings,
    slot: Mutex<Slot<B>>,
}

/// A connection attempt that every clone waiting for the connection polls.
type Connecting<B> = Shared<Pin<Box<dyn Future<Output = Connected<B>> + Send>>>;
type Connected<B> = Result<SendRequest<B>, Arc<io::Error>>;

struct Slot<B> {
    conn: Option<SendRequest<B>>,
    connecting: Option<Connecting<B>>,
}

enum State<B> {
    Idle,
    Connecting(Connecting<B>),
    Ready(SendRequest<B>),
}

impl<B> Http2Backend<B> {
    /// The backend's address.
    pub fn authority(&self) -> &Authority {
        &self.shared.authority
    }

    /// Whether the backend's connection is open (as far as this client has noticed).
    pub fn is_connected(&self) -> bool {
        self.shared
            .lock()
            .conn
            .as_ref()
            .is_some_and(|c| !c.is_closed())
    }
}

impl<B> Inner<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot<B>> {
        // The slot is consistent at every await point; a panic elsewhere leaves it usable.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B> Inner<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// The open connection, or the attempt that will give one (started if none is).
    fn connection(self: &Arc<Self>) -> Result<SendRequest<B>, Connecting<B>> {
        let mut slot = self.lock();
        if let Some(conn) = slot.conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(conn.clone());
        }
        slot.conn = None;
        let connecting =
            slot.connecting.get_or_insert_with(|| {
                let fut: Pin<Box<dyn Future<Output = Connected<B>> + Send>> = Box::pin(
                    Self::connect(Arc::downgrade(self), self.authority.clone(), self.settings),
                );
                fut.shared()
            });
        Err(connecting.clone())
    }

    /// Holds the backend weakly: the slot holds the attempt, which must not keep the
    /// backend alive (an attempt that nobody polls to its end would leak both).
    async fn connect(inner: Weak<Self>, authority: Authority, settings: Settings) -> Connected<B> {
        let result =
            tokio::time::timeout(settings.connect_timeout, handshake(&authority, settings))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
        let inner = inner.upgrade();
        let mut slot = inner.as_ref().map(|inner| inner.lock());
        if let Some(slot) = &mut slot {
            slot.connecting = None;
        }
        match result {
            Ok(conn) => {
                if let Some(slot) = &mut slot {
                    slot.conn = Some(conn.clone());
                }
                Ok(conn)
            }
            Err(error) => Err(Arc::new(error)),
        }
    }

    fn connect_error(&self, error: &Arc<io::Error>) -> ConnectError {
        ConnectError {
            backend: self.authority.clone(),
            source: io::Error::new(error.kind(), error.clone()),
        }
    }
}

async fn handshake<B>(authority: &Authority, settings: Settings) -> io::Result<SendRequest<B>>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(socket_target(authority)).await?;
    stream.set_nodelay(true)?;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if let Some((interval, timeout)) = settings.keep_alive {
        builder
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
    }
    let (sender, conn) = builder
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    let backend = authority.clone();
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%backend, %error, "HTTP/2 connection closed");
        }
    });
    Ok(sender)
}

impl<B> Clone for Http2Backend<B> {
    /// A clone shares the connection and starts without having checked it.
    fn clone(&self) -> Self {
        Http2Backend {
            shared: self.shared.clone(),
            state: State::Idle,
        }
    }
}

impl<B> Service<Request<B>> for Http2Backend<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Http2ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match &mut self.state {
                State::Ready(conn) if !conn.is_closed() => return Poll::Ready(Ok(())),
                State::Ready(_) | State::Idle => {
                    self.state = match self.shared.connection() {
                        Ok(conn) => State::Ready(conn),
                        Err(connecting) => State::Connecting(connecting),
                    };
                }
                State::Connecting(connecting) => {
                    let result = ready!(connecting.poll_unpin(cx));
                    self.state = State::Idle;
                    match result {
                        Ok(conn) => self.state = State::Ready(conn),
                        Err(error) => {
                            return Poll::Ready(Err(self.shared.connect_error(&error).into()))
                        }
                    }
                }
            }
        }
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let State::Ready(mut conn) = std::mem::replace(&mut self.state, State::Idle) else {
            return Http2ResponseFuture::new(async {
                Err(BoxError::from("Http2Backend::call before poll_ready"))
            });
        };
        let shared = self.shared.clone();
        if let Err(error) = set_target(&mut request, &shared.authority) {
            return Http2ResponseFuture::new(async move { Err(error) });
        }
        Http2ResponseFuture::new(async move {
            let failed = |source: hyper::Error| -> BoxError {
                BackendError {
                    backend: shared.authority.clone(),
                    source: source.into(),
                }
                .into()
            };
            match conn.try_send_request(request).await {
                Ok(response) => Ok(response),
                Err(mut error) => match error.take_message() {
                    // The connection closed before it took the request: once more on a
                    // new connection.
                    Some(request) => {
                        tracing::debug!(backend = %shared.authority, error = %error.error(), "HTTP/2 connection closed; sending again");
                        let mut conn = match shared.connection() {
                            Ok(conn) => conn,
                            Err(connecting) => {
                                connecting.await.map_err(|e| shared.connect_error(&e))?
                            }
                        };
                        conn.send_request(request).await.map_err(failed)
                    }
                    None => Err(failed(error.into_error())),
                },
            }
        })
    }
}

/// Aims `request` at `http://{authority}{path}`, keeping its own authority if it has one.
fn set_target<B>(request: &mut Request<B>, backend: &Authority) -> Result<(), BoxError> {
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        parts.authority = Some(backend.clone());
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *request.uri_mut() = Uri::from_parts(parts)?;
    *request.version_mut() = Version::HTTP_2;
    Ok(())
}

impl<B> fmt::Debug for Http2Backend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2Backend")
            .field("authority", &self.shared.authority)
            .field("connected", &self.is_connected())
            .finish()
    }
}

type BoxResponse = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

pin_project_lite::pin_project! {
    /// Response future of [`Http2Backend`].
    pub struct Http2ResponseFuture {
        inner: BoxResponse,
    }
}

impl Http2ResponseFuture {
    fn new(f: impl Future<Output = Result<Response<Incoming>, BoxError>> + Send + 'static) -> Self {
        Http2ResponseFuture { inner: Box::pin(f) }
    }
}

impl Future for Http2ResponseFuture {
    type Output = Result<Response<Incoming>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for Http2ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2ResponseFuture")
            .finish_non_exhaustive()
    }
}

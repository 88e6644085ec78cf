//! The per-backend HTTP service and its connection pool.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Uri};
use http::{header, HeaderValue, Request, Response, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use sync_wrapper::SyncWrapper;
use tokio::net::TcpStream;
use tower_service::Service;

use super::body::{OnEnd, TrackedBody};
use super::error::{BackendError, ConnectError, ResponseTimeout};
use super::headers::{append_forwarded_for, remove_hop_by_hop};
use super::{peer_ip, socket_target};
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
/// use tower_lb::http::Client;
///
/// let client: Client = Client::new()
///     .connect_timeout(Duration::from_secs(2))
///     .response_timeout(Duration::from_secs(30));
/// let backend = client.make_backend(&"127.0.0.1:9001".parse().unwrap());
/// assert_eq!(backend.authority(), "127.0.0.1:9001");
/// ```
///
/// `B` is the type of request bodies sent (by default hyper's, from a server).
pub struct Client<B = Incoming> {
    settings: Settings,
    _body: PhantomData<fn(B)>,
}

impl<B> Clone for Client<B> {
    fn clone(&self) -> Self {
        Client {
            settings: self.settings,
            _body: PhantomData,
        }
    }
}

impl<B> fmt::Debug for Client<B> {
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
}

impl<B> Default for Client<B> {
    fn default() -> Self {
        Client {
            settings: Settings {
                connect_timeout: Duration::from_secs(2),
                response_timeout: Duration::from_secs(30),
                max_idle: 1024,
            },
            _body: PhantomData,
        }
    }
}

impl<B> Client<B> {
    /// A client with the contract's defaults: 2 s to connect, 30 s for response headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time allowed to open a connection to a backend.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Time allowed from sending a request until its response headers arrive.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.settings.response_timeout = timeout;
        self
    }

    /// Idle connections kept per backend (default 1024).
    pub fn max_idle(mut self, max: usize) -> Self {
        self.settings.max_idle = max;
        self
    }
}

impl<B> MakeBackend<Authority> for Client<B> {
    type Service = Backend<B>;

    fn make_backend(&self, authority: &Authority) -> Backend<B> {
        Backend::new(authority.clone(), self.settings)
    }
}

/// Forwards HTTP requests to one backend.
///
/// - [`poll_ready`](Service::poll_ready) takes an idle pooled connection or opens a new one
///   (TCP_NODELAY, `connect_timeout`). A failure there is a [`ConnectError`] *before* the
///   request was handed over, so the balancer can retry it on another backend.
/// - [`call`](Service::call) rewrites the request for the backend (origin-form target, HTTP/1.1,
///   hop-by-hop headers removed, the client appended to `X-Forwarded-For`, `Host` kept) and
///   sends it; a pooled connection that turns out closed before the request was written is
///   replaced by a fresh one once. Response headers must arrive within `response_timeout`
///   ([`ResponseTimeout`]); the response's hop-by-hop headers are removed.
/// - Bodies stream both ways. The connection goes back to the pool when the response body
///   has been read to its end; a body dropped early closes it.
pub struct Backend<B = Incoming> {
    shared: Arc<Shared<B>>,
    conn: Conn<B>,
}

struct Shared<B> {
    authority: Authority,
    host: HeaderValue,
    settings: Settings,
    idle: Mutex<Vec<http1::SendRequest<B>>>,
}

// Only ever reached through `&mut self`: SyncWrapper makes the backend `Sync`, as a
// member of a shared snapshot must be, without a lock.
type Connecting<B> =
    SyncWrapper<Pin<Box<dyn Future<Output = Result<http1::SendRequest<B>, ConnectError>> + Send>>>;

enum Conn<B> {
    None,
    Checking(http1::SendRequest<B>),
    Connecting(Connecting<B>),
    Ready(http1::SendRequest<B>),
}

impl<B> Backend<B> {
    fn new(authority: Authority, settings: Settings) -> Self {
        let host = HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        Backend {
            shared: Arc::new(Shared {
                authority,
                host,
                settings,
                idle: Mutex::new(Vec::new()),
            }),
            conn: Conn::None,
        }
    }

    /// The backend's address.
    pub fn authority(&self) -> &Authority {
        &self.shared.authority
    }

    /// Idle connections in the pool.
    pub fn idle_connections(&self) -> usize {
        self.shared.lock_idle().len()
    }
}

impl<B> Shared<B> {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<http1::SendRequest<B>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkin(&self, conn: http1::SendRequest<B>) {
        let mut idle = self.lock_idle();
        if idle.len() < self.settings.max_idle && !conn.is_closed() {
            idle.push(conn);
        }
    }
}

impl<B> Shared<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn connect(self: Arc<Self>) -> Result<http1::SendRequest<B>, ConnectError> {
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
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(std::io::Error::other(e)))?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(backend = %authority, %error, "backend connection closed");
            }
        });
        Ok(sender)
    }
}

impl<B> Clone for Backend<B> {
    /// A clone shares the pool and starts without a reserved connection.
    fn clone(&self) -> Self {
        Backend {
            shared: self.shared.clone(),
            conn: Conn::None,
        }
    }
}

impl<B> Service<Request<B>> for Backend<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<Incoming, Pooled<B>>>;
    type Error = BoxError;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match &mut self.conn {
                Conn::Ready(_) => return Poll::Ready(Ok(())),
                Conn::None => {
                    let idle = self.shared.lock_idle().pop();
                    self.conn = match idle {
                        Some(conn) => Conn::Checking(conn),
                        None => Conn::Connecting(SyncWrapper::new(Box::pin(
                            self.shared.clone().connect(),
                        ))),
                    };
                }
                Conn::Checking(conn) => match conn.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let Conn::Checking(conn) = std::mem::replace(&mut self.conn, Conn::None)
                        else {
                            unreachable!()
                        };
                        self.conn = Conn::Ready(conn);
                    }
                    // Closed while idle: try the next one.
                    Poll::Ready(Err(_)) => self.conn = Conn::None,
                    Poll::Pending => return Poll::Pending,
                },
                Conn::Connecting(connecting) => {
                    let result = ready!(connecting.get_mut().as_mut().poll(cx));
                    self.conn = Conn::None;
                    self.conn = Conn::Ready(result?);
                }
            }
        }
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Conn::Ready(conn) = std::mem::replace(&mut self.conn, Conn::None) else {
            return ResponseFuture::new(async {
                Err(BoxError::from("Backend::call before poll_ready"))
            });
        };
        self.prepare(&mut request);
        let shared = self.shared.clone();
        ResponseFuture::new(send(shared, conn, request))
    }
}

impl<B> Backend<B> {
    fn prepare(&self, request: &mut Request<B>) {
        let client = peer_ip(request);
        // Origin form (`/path?query`) for the backend, whatever form the client used.
        if request.uri().scheme().is_some() || request.uri().authority().is_some() {
            let path = request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *request.uri_mut() = Uri::from(path);
        }
        *request.version_mut() = Version::HTTP_11;
        let headers = request.headers_mut();
        remove_hop_by_hop(headers);
        if let Some(client) = client {
            append_forwarded_for(headers, client);
        }
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, self.shared.host.clone());
        }
    }
}

async fn send<B>(
    shared: Arc<Shared<B>>,
    mut conn: http1::SendRequest<B>,
    request: Request<B>,
) -> Result<Response<TrackedBody<Incoming, Pooled<B>>>, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let timeout = shared.settings.response_timeout;
    let timed_out = || ResponseTimeout {
        backend: shared.authority.clone(),
        after: timeout,
    };
    let sent = tokio::time::timeout(timeout, conn.try_send_request(request)).await;
    let result = match sent {
        Err(_) => return Err(timed_out().into()),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(mut error)) => match error.take_message() {
            // The pooled connection closed before the request went out: a fresh one.
            Some(request) => {
                conn = shared.clone().connect().await?;
                match tokio::time::timeout(timeout, conn.try_send_request(request)).await {
                    Err(_) => return Err(timed_out().into()),
                    Ok(result) => result.map_err(|e| e.into_error()),
                }
            }
            None => Err(error.into_error()),
        },
    };
    let mut response = result.map_err(|source| BackendError {
        backend: shared.authority.clone(),
        source,
    })?;
    remove_hop_by_hop(response.headers_mut());
    Ok(response.map(|body| TrackedBody::new(body, Pooled { conn, shared })))
}

/// A connection lent to one response: back to the pool when the body ends cleanly.
pub struct Pooled<B> {
    conn: http1::SendRequest<B>,
    shared: Arc<Shared<B>>,
}

impl<B> OnEnd for Pooled<B> {
    fn on_end(self, clean: bool) {
        if clean {
            self.shared.checkin(self.conn);
        }
    }
}

impl<B> fmt::Debug for Pooled<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pooled")
            .field("backend", &self.shared.authority)
            .finish()
    }
}

impl<B> fmt::Debug for Backend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("authority", &self.shared.authority)
            .field("idle", &self.idle_connections())
            .finish()
    }
}

type BoxResponse<B> = Pin<
    Box<dyn Future<Output = Result<Response<TrackedBody<Incoming, Pooled<B>>>, BoxError>> + Send>,
>;

pin_project_lite::pin_project! {
    /// Response future of [`Backend`].
    pub struct ResponseFuture<B> {
        inner: BoxResponse<B>,
        _body: PhantomData<fn(B)>,
    }
}

impl<B> ResponseFuture<B> {
    fn new(
        f: impl Future<Output = Result<Response<TrackedBody<Incoming, Pooled<B>>>, BoxError>>
            + Send
            + 'static,
    ) -> Self {
        ResponseFuture {
            inner: Box::pin(f),
            _body: PhantomData,
        }
    }
}

impl<B> Future for ResponseFuture<B> {
    type Output = Result<Response<TrackedBody<Incoming, Pooled<B>>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.as_mut().poll(cx)
    }
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

//! HTTP/2 over cleartext (h2c, prior knowledge) to backends: one connection per backend,
//! and more while those open are full.

use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::future::{FutureExt, Shared};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use http::{Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use super::error::{BackendError, ConnectError, RequestBodyTimeout, ResponseTimeout};
use super::headers::{append_forwarded_for, remove_hop_by_hop};
use super::{peer_ip, socket_target, TrackedBody};
use crate::balance::error::{RequestFault, Unsent};
use crate::balance::MakeBackend;
use crate::BoxError;

/// The transport to HTTP/2 backends (h2c with prior knowledge, as gRPC servers expect):
/// one multiplexed connection per backend, and another each time those open are full
/// (see [`max_streams`](Self::max_streams)).
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
/// `B` is the type of request bodies sent: `tonic::body::Body` for tonic, hyper's
/// `Incoming` for a proxy.
pub struct Http2Client<B> {
    settings: Settings,
    _body: PhantomData<fn(B)>,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    connect_timeout: Duration,
    response_timeout: Option<Duration>,
    keep_alive: Option<(Duration, Duration)>,
    max_streams: usize,
    max_connections: usize,
}

impl<B> Default for Http2Client<B> {
    fn default() -> Self {
        Http2Client {
            settings: Settings {
                connect_timeout: Duration::from_secs(2),
                response_timeout: None,
                keep_alive: None,
                max_streams: 100,
                max_connections: 16,
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
    /// A client that allows 2 s to connect (TCP and HTTP/2 preface), waits for response
    /// headers as long as it takes (gRPC clients set their own deadlines), sends no pings,
    /// and opens up to 16 connections to a backend, 100 requests on each.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time allowed to open a connection to a backend (TCP connect and HTTP/2 handshake).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Time allowed from sending a request until its response headers arrive, counted from
    /// the end of the request (each frame of a body still being sent starts it again: a
    /// client-streaming call is not cut); then the request fails with [`ResponseTimeout`]
    /// (`504` from a proxy). A client that sends nothing of its body for as long fails it
    /// by its own fault: a [`RequestBodyTimeout`] (`408`). None by default.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.settings.response_timeout = Some(timeout);
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

    /// The most requests a connection to a backend carries at once before the next one
    /// opens another (at least 1; 100 by default). A request counts from `poll_ready` until
    /// its response body ends or is dropped, so a client that stops reading keeps its stream.
    ///
    /// 100 keeps what responses nobody reads hold of a connection within its window (128
    /// streams' worth): they cannot stop its other streams. And it is no more than the
    /// limits on streams servers commonly set (nghttp2's and Envoy's 100, hyper's 200, Go's
    /// 250): requests a backend holds unanswered cannot take all of a connection's streams
    /// either. A backend whose limit is lower can still have its connection's streams
    /// taken; set this to its limit.
    pub fn max_streams(mut self, streams: usize) -> Self {
        self.settings.max_streams = streams.max(1);
        self
    }

    /// The most connections to one backend (at least 1; 16 by default). When all are
    /// full, requests go over the one that carries the fewest, past
    /// [`max_streams`](Self::max_streams) (and queue there once the backend's own limit is
    /// reached): its window can then fill with responses nobody reads, as with one
    /// connection.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.settings.max_connections = connections.max(1);
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
                    links: Vec::new(),
                    connecting: None,
                    generation: 0,
                }),
            }),
            state: State::Idle,
        }
    }
}

/// Sends HTTP/2 requests to one backend over shared connections: one, and more while
/// those open are full.
///
/// - [`poll_ready`](Service::poll_ready) takes the backend's first open connection that
///   carries fewer than [`max_streams`](Http2Client::max_streams) requests, or opens one
///   (TCP_NODELAY, `connect_timeout`): the first clone to need it connects, the others
///   wait for that attempt and share its outcome. A failure there is a [`ConnectError`]
///   *before* the request was handed over, so the balancer retries it on another
///   backend; but when full connections are open, the request goes over the one that
///   carries the fewest instead, as it does once there are
///   [`max_connections`](Http2Client::max_connections). A connection that has closed,
///   or on which the backend sent `GOAWAY`, is no longer taken (its requests finish on
///   it), and the next `poll_ready` takes another or opens one. A connection beyond the
///   first that carries nothing is closed by a later `poll_ready` that finds what is in
///   flight fits in half of one.
/// - A request counts on its connection from `poll_ready` until its response body ends
///   or is dropped: a client that stops reading a response keeps its stream, and the
///   stream's window of the connection's, from other requests.
/// - [`call`](Service::call) rewrites the request as a reverse proxy forwards it: the target
///   becomes `http://{authority}{path}`, the authority being the request's own (an HTTP/2
///   client's `:authority`, tonic's `Grpc::with_origin`), else its `Host` (an HTTP/1.1
///   client's), else the backend's address; hop-by-hop fields are removed (but
///   `te: trailers`, which gRPC servers expect, is kept) and the client (its
///   [`ClientAddr`](super::ClientAddr)) is appended to `X-Forwarded-For`. Bodies and
///   trailers stream both ways.
/// - A request that the backend did not process is given back to the balancer
///   ([`Unsent`]) for another backend, when its body has not been sent yet: one the
///   backend refused (`REFUSED_STREAM`) or left unprocessed by a graceful `GOAWAY` (any
///   method), and an idempotent one whose connection closed or was reset before its
///   response began. A request that the connection closed before taking it is sent once
///   more on a new connection. Other failures are [`BackendError`]s (for gRPC, tonic
///   reports them as `UNKNOWN`; `proxy::grpc_status`, with the `grpc` feature, gives
///   them their codes); a response that does not begin within `response_timeout` is a
///   [`ResponseTimeout`].
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

/// The connection's request sender, over request bodies that can be taken back.
type Sender<B> = SendRequest<Outgoing<B>>;

/// A connection attempt that every clone waiting for the connection polls.
type Connecting = Shared<Pin<Box<dyn Future<Output = Connected> + Send>>>;
/// The generation of the new connection, which each waiter takes from the slot (the
/// attempt's output is kept until every waiter has it: a counted link there would count).
type Connected = Result<u64, Arc<io::Error>>;

struct Slot<B> {
    /// The connections taking requests, oldest first: a request takes the first with room.
    links: Vec<Link<B>>,
    connecting: Option<Connecting>,
    generation: u64,
}

/// One connection to the backend.
struct Link<B> {
    /// Which connection of the backend it is.
    generation: u64,
    sender: Sender<B>,
    /// Held once by the slot's link and once by each request on it, from `poll_ready`
    /// until its response body ends or is dropped.
    streams: Arc<()>,
}

impl<B> Link<B> {
    fn in_flight(&self) -> usize {
        Arc::strong_count(&self.streams) - 1
    }
}

impl<B> Clone for Link<B> {
    fn clone(&self) -> Self {
        Link {
            generation: self.generation,
            sender: self.sender.clone(),
            streams: self.streams.clone(),
        }
    }
}

enum State<B> {
    Idle,
    Connecting(Connecting),
    Ready(Link<B>),
}

impl<B> Http2Backend<B> {
    /// The backend's address.
    pub fn authority(&self) -> &Authority {
        &self.shared.authority
    }

    /// Whether a connection to the backend is open (as far as this client has noticed).
    pub fn is_connected(&self) -> bool {
        self.shared
            .lock()
            .links
            .iter()
            .any(|l| !l.sender.is_closed())
    }

    /// How many connections to the backend take requests (open as far as this client has
    /// noticed, and not going away).
    pub fn connections(&self) -> usize {
        self.shared
            .lock()
            .links
            .iter()
            .filter(|l| !l.sender.is_closed())
            .count()
    }
}

impl<B> Inner<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot<B>> {
        // The slot is consistent at every await point; a panic elsewhere leaves it usable.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops handing out connection `generation` (the backend is going away from it): the
    /// next request takes another or opens a new one. Requests already on it go on.
    fn forget(&self, generation: u64) {
        self.lock().links.retain(|l| l.generation != generation);
    }
}

impl<B> Slot<B> {
    /// The open connection that carries the fewest requests, full or not.
    fn least_loaded(&self) -> Option<Link<B>> {
        let open = self.links.iter().filter(|l| !l.sender.is_closed());
        open.min_by_key(|l| l.in_flight()).cloned()
    }

    /// Connection `generation`, just opened, if it still takes requests and has room.
    fn opened(&self, generation: u64, max_streams: usize) -> Option<Link<B>> {
        let link = self.links.iter().find(|l| l.generation == generation)?;
        (!link.sender.is_closed() && link.in_flight() < max_streams).then(|| link.clone())
    }
}

impl<B> Inner<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// The first open connection with room for a request, or the attempt that will give
    /// one (started if none is); past `max_connections`, the one that carries the fewest.
    fn connection(self: &Arc<Self>) -> Result<Link<B>, Connecting> {
        let max_streams = self.settings.max_streams;
        let mut slot = self.lock();
        slot.links.retain(|l| !l.sender.is_closed());
        if let Some(first) = slot.links.iter().position(|l| l.in_flight() < max_streams) {
            let link = slot.links[first].clone();
            // Past a burst: the connections beyond the one taken that carry nothing close,
            // once what is in flight fits in half of one (not at once below a full one,
            // which would open and close a connection per request at the boundary).
            if slot.links.len() > first + 1
                && slot.links.iter().map(Link::in_flight).sum::<usize>() <= max_streams / 2
            {
                let mut index = 0;
                slot.links.retain(|l| {
                    index += 1;
                    index <= first + 1 || l.in_flight() > 0
                });
            }
            return Ok(link);
        }
        if slot.links.len() >= self.settings.max_connections {
            if let Some(link) = slot.least_loaded() {
                return Ok(link);
            }
        }
        let connecting = slot.connecting.get_or_insert_with(|| {
            let fut: Pin<Box<dyn Future<Output = Connected> + Send>> = Box::pin(Self::connect(
                Arc::downgrade(self),
                self.authority.clone(),
                self.settings,
            ));
            fut.shared()
        });
        Err(connecting.clone())
    }

    /// Holds the backend weakly: the slot holds the attempt, which must not keep the
    /// backend alive (an attempt that nobody polls to its end would leak both).
    async fn connect(inner: Weak<Self>, authority: Authority, settings: Settings) -> Connected {
        let result =
            tokio::time::timeout(settings.connect_timeout, handshake(&authority, settings))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
        // Nobody waits once the backend is gone.
        let Some(inner) = inner.upgrade() else {
            return Err(Arc::new(io::ErrorKind::NotConnected.into()));
        };
        let mut slot = inner.lock();
        slot.connecting = None;
        let sender = result.map_err(Arc::new)?;
        slot.generation += 1;
        let generation = slot.generation;
        slot.links.push(Link {
            generation,
            sender,
            streams: Arc::new(()),
        });
        Ok(generation)
    }

    /// What a waiter takes from an attempt's `result`: its connection if it still has
    /// room (`None`: others waiting for it filled it, or it closed; look again); when the
    /// attempt failed, the open connection that carries the fewest, full or not, else the
    /// error.
    fn connected(&self, result: Connected) -> Result<Option<Link<B>>, ConnectError> {
        let slot = self.lock();
        match result {
            Ok(generation) => Ok(slot.opened(generation, self.settings.max_streams)),
            Err(error) => slot
                .least_loaded()
                .map(Some)
                .ok_or_else(|| self.connect_error(&error)),
        }
    }

    fn connect_error(&self, error: &Arc<io::Error>) -> ConnectError {
        ConnectError {
            backend: self.authority.clone(),
            source: io::Error::new(error.kind(), error.clone()),
        }
    }
}

/// What a backend may send on one stream before the proxy has passed it on. The h2 crate
/// gives a connection's window back only as each stream's data is read, so the data of a
/// response whose client has stopped reading holds its stream's window of the connection's
/// until the stream ends. hyper's defaults (2 MiB a stream, 5 MiB the connection) let three
/// such clients stop every response on a connection to the backend.
const STREAM_WINDOW: u32 = 256 * 1024;
/// The connection's window: room for 128 streams of stalled responses, more than the 100
/// a connection carries by default (`Http2Client::max_streams`). What a stalled stream
/// holds here is its window of flow-controlled data, besides what is already on its way
/// to its client.
const CONNECTION_WINDOW: u32 = 128 * STREAM_WINDOW;

async fn handshake<B>(authority: &Authority, settings: Settings) -> io::Result<Sender<B>>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(socket_target(authority)).await?;
    stream.set_nodelay(true)?;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
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
    type Response = Response<Http2Body>;
    type Error = BoxError;
    type Future = Http2ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match &mut self.state {
                State::Ready(link) if !link.sender.is_closed() => return Poll::Ready(Ok(())),
                State::Ready(..) | State::Idle => {
                    self.state = match self.shared.connection() {
                        Ok(link) => State::Ready(link),
                        Err(connecting) => State::Connecting(connecting),
                    };
                }
                State::Connecting(connecting) => {
                    let result = ready!(connecting.poll_unpin(cx));
                    self.state = State::Idle;
                    match self.shared.connected(result) {
                        Ok(Some(link)) => self.state = State::Ready(link),
                        Ok(None) => {}
                        Err(error) => return Poll::Ready(Err(error.into())),
                    }
                }
            }
        }
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let State::Ready(mut link) = std::mem::replace(&mut self.state, State::Idle) else {
            return Http2ResponseFuture::new(async {
                Err(BoxError::from("Http2Backend::call before poll_ready"))
            });
        };
        let shared = self.shared.clone();
        let aimed = match rewrite(&mut request, &shared.authority) {
            Ok(aimed) => aimed,
            Err(error) => return Http2ResponseFuture::new(async move { Err(error) }),
        };
        // What it takes to send the request again elsewhere: its head (the body stays in
        // `body` until the connection first asks for it), not aimed at this backend.
        let (parts, body) = request.into_parts();
        let again = Again {
            method: parts.method.clone(),
            uri: if aimed {
                parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()))
            } else {
                parts.uri.clone()
            },
            headers: parts.headers.clone(),
        };
        let body = Arc::new(Unread {
            body: Mutex::new(Some(body)),
            failed: AtomicBool::new(false),
            progress: Mutex::new(Progress::default()),
        });
        let request = Request::from_parts(parts, Outgoing::new(body.clone()));
        Http2ResponseFuture::new(async move {
            let timeout = shared.settings.response_timeout;
            let sent = send(&shared, &mut link, request);
            let result = match timeout {
                // From the end of the request: while its body is still being sent, each
                // frame starts the timeout again (a client-streaming call is not cut; a
                // backend that stops taking the body still times out).
                Some(after) => {
                    let mut sent = std::pin::pin!(sent);
                    let mut from = Instant::now();
                    loop {
                        match tokio::time::timeout_at(from + after, sent.as_mut()).await {
                            Ok(result) => break result,
                            Err(_) => match *lock(&body.progress) {
                                Progress {
                                    moved: Some(moved), ..
                                } if moved > from => from = moved,
                                // The client stopped sending the body.
                                Progress { starved: true, .. } => {
                                    return Err(BackendError {
                                        backend: shared.authority.clone(),
                                        source: RequestFault::new(RequestBodyTimeout { after })
                                            .into(),
                                    }
                                    .into())
                                }
                                _ => {
                                    return Err(ResponseTimeout {
                                        backend: shared.authority.clone(),
                                        after,
                                    }
                                    .into())
                                }
                            },
                        }
                    }
                }
                None => sent.await,
            };
            let error = match result {
                Ok(mut response) => {
                    remove_hop_by_hop(response.headers_mut());
                    if super::access::enabled() {
                        let served_by = super::access::ServedBy(shared.authority.clone());
                        response.extensions_mut().insert(served_by);
                    }
                    let stream = link.streams;
                    return Ok(
                        response.map(|body| TrackedBody::new(body, StreamPlace { _held: stream }))
                    );
                }
                Err(error) => error,
            };
            let fate = Fate::of(&error);
            if fate != Fate::Failed {
                // The connection is going away (or gone): new requests take a new one.
                shared.forget(link.generation);
            }
            let failed: BoxError = match error {
                SendError::Connect(error) => error.into(),
                SendError::Http { error, open } => BackendError {
                    backend: shared.authority.clone(),
                    // hyper refused the request itself on a connection that goes on, or
                    // the request's body failed (hyper then resets the stream): the
                    // request's fault.
                    source: if body.failed.load(Ordering::Acquire) || (error.is_user() && open) {
                        RequestFault::new(error).into()
                    } else {
                        error.into()
                    },
                }
                .into(),
            };
            let retry = match fate {
                Fate::Unprocessed => true,
                Fate::Closed => again.idempotent(),
                Fate::Failed => false,
            };
            // Only a body that was never sent can be sent again.
            let unsent = retry.then(|| lock(&body.body).take()).flatten();
            match unsent {
                Some(body) => {
                    tracing::debug!(backend = %shared.authority, error = %failed, "HTTP/2 request not processed; giving it back");
                    let unsent: BoxError = Box::new(Unsent::new(again.into_request(body), failed));
                    Err(unsent)
                }
                None => Err(failed),
            }
        })
    }
}

/// Why sending failed.
enum SendError {
    /// No new connection for a request that the old one closed before taking.
    Connect(ConnectError),
    /// hyper's error, and whether the connection still took requests after it: hyper
    /// calls its dispatch task being gone a user error too, though it is the connection's.
    Http { error: hyper::Error, open: bool },
}

impl From<ConnectError> for SendError {
    fn from(error: ConnectError) -> Self {
        SendError::Connect(error)
    }
}

/// Sends `request` on `link`; once more on another connection (taken or opened as
/// `poll_ready` does), which `link` becomes, if that one closed before it took the request.
async fn send<B>(
    shared: &Arc<Inner<B>>,
    link: &mut Link<B>,
    request: Request<Outgoing<B>>,
) -> Result<Response<Incoming>, SendError>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    match link.sender.try_send_request(request).await {
        Ok(response) => Ok(response),
        Err(mut error) => match error.take_message() {
            Some(request) => {
                tracing::debug!(backend = %shared.authority, error = %error.error(), "HTTP/2 connection closed; sending again");
                *link = loop {
                    match shared.connection() {
                        Ok(link) => break link,
                        Err(connecting) => {
                            if let Some(link) = shared.connected(connecting.await)? {
                                break link;
                            }
                        }
                    }
                };
                let sent = link.sender.send_request(request).await;
                sent.map_err(|error| SendError::Http {
                    error,
                    open: !link.sender.is_closed(),
                })
            }
            None => Err(SendError::Http {
                error: error.into_error(),
                open: !link.sender.is_closed(),
            }),
        },
    }
}

/// What a failed exchange says about whether the backend acted on the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Certainly not processed (RFC 9113 §8.7): refused with `REFUSED_STREAM`, or above the
    /// last stream a graceful `GOAWAY` promised to process (or sent after it).
    Unprocessed,
    /// The connection closed or was reset before any response: maybe processed.
    Closed,
    /// Anything else.
    Failed,
}

impl Fate {
    fn of(error: &SendError) -> Fate {
        let SendError::Http { error, .. } = error else {
            return Fate::Unprocessed;
        };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = source {
            if let Some(h2) = e.downcast_ref::<::h2::Error>() {
                let reason = h2.reason();
                return if h2.is_remote() && reason == Some(::h2::Reason::REFUSED_STREAM)
                    || h2.is_go_away() && h2.is_remote() && reason == Some(::h2::Reason::NO_ERROR)
                {
                    Fate::Unprocessed
                } else if h2.is_io() || h2.is_go_away() {
                    Fate::Closed
                } else {
                    Fate::Failed
                };
            }
            if e.is::<io::Error>() {
                return Fate::Closed;
            }
            source = e.source();
        }
        if error.is_closed() || error.is_canceled() {
            Fate::Closed
        } else {
            Fate::Failed
        }
    }
}

/// The head of a request as sent, to send it again to another backend.
struct Again {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Again {
    /// Safe to send twice (RFC 9110 §9.2.2).
    fn idempotent(&self) -> bool {
        matches!(
            self.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        )
    }

    /// The request again, as it was rewritten for this backend, without the connection's
    /// client address: its `X-Forwarded-For` already names the client.
    fn into_request<B>(self, body: B) -> Request<B> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        // With an authority, HTTP/2 as sent (an HTTP/1.1 backend makes `Host` of it);
        // without one, the next backend's address serves.
        if self.uri.authority().is_some() {
            *request.version_mut() = Version::HTTP_2;
        }
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        request
    }
}

/// Rewrites `request` for an HTTP/2 backend at `backend`: see [`Http2Backend`]. Returns
/// whether its authority is the backend's address, for want of one of its own.
fn rewrite<B>(request: &mut Request<B>, backend: &Authority) -> Result<bool, BoxError> {
    let client = peer_ip(request);
    let headers = request.headers_mut();
    // `TE` is hop-by-hop, but HTTP/2 allows `trailers` in it, and gRPC servers want it.
    let trailers = headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    });
    remove_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(client) = client {
        append_forwarded_for(headers, client);
    }
    // HTTP/2 carries the authority in the target (RFC 9113 §8.3.1).
    let host = headers.remove(header::HOST);
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    let mut aimed = false;
    if parts.authority.is_none() {
        let from_host = host.and_then(|h| Authority::try_from(h.as_bytes()).ok());
        aimed = from_host.is_none();
        parts.authority = Some(from_host.unwrap_or_else(|| backend.clone()));
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *request.uri_mut() = Uri::from_parts(parts)?;
    *request.version_mut() = Version::HTTP_2;
    Ok(aimed)
}

fn lock<T>(slot: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request's body until the connection first polls it, shared with the request's future:
/// a request the backend never read can be sent again to another backend.
struct Unread<B> {
    body: Mutex<Option<B>>,
    /// The body failed as the connection read it: the request fails by its own fault.
    failed: AtomicBool,
    /// How the connection's reading of the body goes.
    progress: Mutex<Progress>,
}

/// The sending of a request body, as its request's future sees it.
#[derive(Default)]
struct Progress {
    /// When the connection last took a frame of the body (or its end): the response
    /// timeout counts from there.
    moved: Option<Instant>,
    /// The connection's last read of the body found nothing: the request waits on its
    /// client. (hyper reads a frame, holds it until the stream has room, and reads no
    /// other meanwhile: a backend that takes no more leaves this false.)
    starved: bool,
}

/// A request body that stays in a slot shared with the request's future until the
/// connection first polls it.
struct Outgoing<B> {
    slot: Arc<Unread<B>>,
    /// Taken from the slot at the first poll.
    body: Option<B>,
}

impl<B> Outgoing<B> {
    fn new(slot: Arc<Unread<B>>) -> Self {
        Outgoing { slot, body: None }
    }
}

impl<B: Body + Unpin> Body for Outgoing<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        if this.body.is_none() {
            this.body = lock(&this.slot.body).take();
        }
        let polled = match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx).map_err(|error| {
                // Noted before hyper resets the stream, whose error the request's future
                // gets: that future reads it (`Acquire`) and marks its error.
                this.slot.failed.store(true, Ordering::Release);
                error
            }),
            None => Poll::Ready(None),
        };
        let mut progress = lock(&this.slot.progress);
        if matches!(polled, Poll::Ready(None | Some(Ok(_)))) {
            progress.moved = Some(Instant::now());
        }
        progress.starved = polled.is_pending();
        drop(progress);
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(body) => body.is_end_stream(),
            None => lock(&self.slot.body)
                .as_ref()
                .is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => lock(&self.slot.body)
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
        }
    }
}

impl<B> fmt::Debug for Http2Backend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2Backend")
            .field("authority", &self.shared.authority)
            .field("connected", &self.is_connected())
            .finish()
    }
}

type BoxResponse = Pin<Box<dyn Future<Output = Result<Response<Http2Body>, BoxError>> + Send>>;

pin_project_lite::pin_project! {
    /// Response future of [`Http2Backend`].
    pub struct Http2ResponseFuture {
        inner: BoxResponse,
    }
}

impl Http2ResponseFuture {
    fn new(
        f: impl Future<Output = Result<Response<Http2Body>, BoxError>> + Send + 'static,
    ) -> Self {
        Http2ResponseFuture { inner: Box::pin(f) }
    }
}

impl Future for Http2ResponseFuture {
    type Output = Result<Response<Http2Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.as_mut().poll(cx)
    }
}

/// The body of a response from an [`Http2Backend`]: it holds its stream's place on its
/// connection (see [`Http2Client::max_streams`]) until it ends or is dropped.
pub type Http2Body = TrackedBody<Incoming, StreamPlace>;

/// A request's place among the streams of its connection to an HTTP/2 backend (see
/// [`Http2Client::max_streams`]), held by its response body.
#[derive(Debug)]
pub struct StreamPlace {
    _held: Arc<()>,
}

impl fmt::Debug for Http2ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2ResponseFuture")
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_moves_host_to_the_target_and_keeps_te_trailers() {
        let mut request = Request::get("/x?y=1")
            .header("host", "api.example:8080")
            .header("te", "trailers, deflate")
            .header("connection", "x-drop")
            .header("x-drop", "1")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap();
        request
            .extensions_mut()
            .insert(super::super::ClientAddr("127.0.0.2:5000".parse().unwrap()));
        assert!(!rewrite(&mut request, &"127.0.0.1:9001".parse().unwrap()).unwrap());
        assert_eq!(request.uri(), "http://api.example:8080/x?y=1");
        assert_eq!(request.version(), Version::HTTP_2);
        let h = request.headers();
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert!(!h.contains_key("host"));
        assert!(!h.contains_key("x-drop") && !h.contains_key("connection"));

        // No Host, no authority: the backend's address.
        let mut request = Request::post("/p").body(()).unwrap();
        assert!(rewrite(&mut request, &"127.0.0.1:9001".parse().unwrap()).unwrap());
        assert_eq!(request.uri(), "http://127.0.0.1:9001/p");
        assert!(!request.headers().contains_key("te"));
    }
}

//! Helpers for tests over real loopback sockets: scriptable backends, clients bound to a
//! chosen 127.0.0.x address, and a proxy started from a configuration.
#![allow(dead_code, unreachable_pub)]

pub mod process;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tower_lb::config::Config;
use tower_lb::standalone::Proxy;

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A backend on 127.0.0.1:0. Paths:
/// - `/health`: 200, or 503 after `set_healthy(false)`; counted, and held while
///   [`hold_probes`](Backend::hold_probes) is on;
/// - `/hold`: headers at once, then the body waits for `release()` (one permit per request);
/// - `/stall`: never answers;
/// - `/wait`: answers (its own address) once `release()` lets it (one permit per request);
/// - `/slow/N`: answers after N milliseconds;
/// - `/echo`: streams the request body back;
/// - `/collect`: reads the whole request body, then answers with its length;
/// - `/download/N`: N bytes, in 64 KiB chunks;
/// - `/hop`: answers with hop-by-hop headers;
/// - `/missing...`: 404;
/// - `/empty`: 204;
/// - anything else: its own address as the body.
///
/// Every non-health request's headers are recorded.
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

struct State {
    healthy: AtomicBool,
    hits: AtomicUsize,
    seen: Mutex<Vec<HeaderMap>>,
    paths: Mutex<Vec<String>>,
    peers: Mutex<Vec<SocketAddr>>,
    gate: Semaphore,
    started: Notify,
    /// Health probes received (counted on arrival, before any hold).
    probes: tokio::sync::watch::Sender<usize>,
    hold_probes: AtomicBool,
    probe_gate: Semaphore,
}

impl Default for State {
    fn default() -> Self {
        State {
            healthy: AtomicBool::new(true),
            hits: AtomicUsize::new(0),
            seen: Mutex::default(),
            paths: Mutex::default(),
            peers: Mutex::default(),
            gate: Semaphore::new(0),
            started: Notify::new(),
            probes: tokio::sync::watch::Sender::new(0),
            hold_probes: AtomicBool::new(false),
            probe_gate: Semaphore::new(0),
        }
    }
}

impl Backend {
    pub async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener)
    }

    pub async fn start_on(addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        state.healthy.store(true, Ordering::SeqCst);
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| handle(st.clone(), addr, peer, req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, state, task }
    }

    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Health probes received so far.
    pub fn probes(&self) -> usize {
        *self.state.probes.borrow()
    }

    /// Waits until `n` health probes have arrived (the last one may still be held).
    #[track_caller]
    pub fn wait_probes(&self, n: usize) -> impl std::future::Future<Output = ()> + '_ {
        let mut probes = self.state.probes.subscribe();
        within(async move {
            probes.wait_for(|&seen| seen >= n).await.unwrap();
        })
    }

    /// While on, each health probe waits for a [`release_probes`](Backend::release_probes)
    /// permit before it is answered (with the health set at that moment). A probe that
    /// arrives while the previous one is held proves that one's result was taken in.
    pub fn hold_probes(&self, hold: bool) {
        self.state.hold_probes.store(hold, Ordering::SeqCst);
    }

    /// Lets `n` held health probes be answered.
    pub fn release_probes(&self, n: usize) {
        self.state.probe_gate.add_permits(n);
    }

    /// With [`hold_probes`](Backend::hold_probes) on: answers health probe `n` (counting
    /// from 1, waiting for it to arrive) as passing or failing, then waits for probe `n + 1`
    /// to arrive, which shows that probe `n`'s result was taken in.
    pub async fn answer_probe(&self, n: usize, pass: bool) {
        self.wait_probes(n).await;
        self.set_healthy(pass);
        self.release_probes(1);
        self.wait_probes(n + 1).await;
    }

    /// Requests other than health checks.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<HeaderMap> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Request targets received, as the backend saw them.
    pub fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }

    /// The client end of the connection each request (other than health checks) came on.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.state.peers.lock().unwrap().clone()
    }

    /// Lets `n` held bodies (`/hold`) or held answers (`/wait`) finish.
    pub fn release(&self, n: usize) {
        self.state.gate.add_permits(n);
    }

    /// Waits until a `/hold`, `/wait` or `/echo` request has started on this backend.
    pub async fn started(&self) {
        self.state.started.notified().await
    }

    /// Stops the backend: the listener closes and connections are dropped.
    pub fn kill(self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn handle(
    st: Arc<State>,
    addr: SocketAddr,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/health" {
        st.probes.send_modify(|n| *n += 1);
        if st.hold_probes.load(Ordering::SeqCst) {
            if let Ok(permit) = st.probe_gate.acquire().await {
                permit.forget();
            }
        }
        let status = if st.healthy.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut r = Response::new(full("health"));
        *r.status_mut() = status;
        return Ok(r);
    }
    st.hits.fetch_add(1, Ordering::SeqCst);
    st.seen.lock().unwrap().push(req.headers().clone());
    st.paths.lock().unwrap().push(req.uri().to_string());
    st.peers.lock().unwrap().push(peer);
    match path.as_str() {
        "/hold" => {
            st.started.notify_one();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"first;"))))
                    .await;
                if let Ok(permit) = st.gate.acquire().await {
                    permit.forget();
                }
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"last")))).await;
            });
            let stream =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
                );
            Ok(Response::new(StreamBody::new(stream).boxed()))
        }
        "/wait" => {
            st.started.notify_one();
            if let Ok(permit) = st.gate.acquire().await {
                permit.forget();
            }
            Ok(Response::new(full(addr.to_string())))
        }
        "/stall" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        "/collect" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other);
            let len = body.map_or(0, |b| b.to_bytes().len());
            Ok(Response::new(full(len.to_string())))
        }
        "/echo" => {
            st.started.notify_one();
            let body = req.into_body().map_err(std::io::Error::other).boxed();
            Ok(Response::new(body))
        }
        "/hop" => {
            let mut r = Response::new(full(addr.to_string()));
            let h = r.headers_mut();
            h.insert("connection", "x-backend-secret".parse().unwrap());
            h.insert("x-backend-secret", "1".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("x-kept", "1".parse().unwrap());
            Ok(r)
        }
        "/empty" => {
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        p if p.starts_with("/slow/") => {
            let ms: u64 = p["/slow/".len()..].parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Response::new(full(addr.to_string())))
        }
        p if p.starts_with("/missing") => {
            let mut r = Response::new(full("not here"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            Ok(r)
        }
        p if p.starts_with("/download/") => {
            let n: usize = p["/download/".len()..].parse().unwrap_or(0);
            let chunks = (0..n).step_by(65536).map(move |i| {
                Ok(Frame::data(Bytes::from(vec![
                    (i / 65536) as u8;
                    65536.min(n - i)
                ])))
            });
            Ok(Response::new(
                StreamBody::new(futures::stream::iter(chunks)).boxed(),
            ))
        }
        _ => Ok(Response::new(full(addr.to_string()))),
    }
}

/// A TCP server on 127.0.0.1:0 that gives each connection to `handler`, in a task of its
/// own: for backends that misbehave as no HTTP server library would. Counts connections;
/// stops when dropped.
pub struct RawServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawServer {
    pub async fn start<F, Fut>(handler: F) -> RawServer
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(stream));
            }
        });
        RawServer {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const HEALTH_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Reads up to the end of one request head; `None` if the connection ends first.
pub async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// A backend that passes health checks, reads any other request and resets the connection
/// without answering.
pub async fn reset_backend() -> RawServer {
    RawServer::start(|mut stream| async move {
        use tokio::io::AsyncWriteExt;
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        if head.starts_with(b"GET /health ") {
            let _ = stream.write_all(HEALTH_OK).await;
            return;
        }
        // A zero linger turns the close into a reset; it does not block.
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
    })
    .await
}

/// A backend that answers the first request on each connection and closes the connection
/// on reading the second, without answering: the race of a keep-alive timeout that fires
/// just as the proxy reuses the connection.
pub async fn one_shot_backend() -> RawServer {
    RawServer::start(|mut stream| async move {
        use tokio::io::AsyncWriteExt;
        if read_head(&mut stream).await.is_none() {
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        // The second request is read, then the connection closes unanswered.
        let _ = read_head(&mut stream).await;
    })
    .await
}

/// A backend that passes its health checks and, for any other request, reads the head
/// and then nothing more: it never answers, and holds the connection until the peer
/// closes it.
pub async fn silent_backend() -> RawServer {
    RawServer::start(|mut stream| async move {
        use tokio::io::AsyncWriteExt;
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        if head.starts_with(b"GET /health ") {
            let _ = stream.write_all(HEALTH_OK).await;
            return;
        }
        std::future::pending::<()>().await;
    })
    .await
}

/// A backend that answers every request except health checks with fixed bytes, then
/// closes the connection.
pub async fn raw_backend(answer: &'static [u8]) -> RawServer {
    raw_backend_with(move |_| answer.to_vec()).await
}

/// A backend that answers request `n` (counting all but health checks, from 0) with
/// `answer(n)`, then closes the connection.
pub async fn raw_backend_with<F>(answer: F) -> RawServer
where
    F: Fn(usize) -> Vec<u8> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    let requests = Arc::new(AtomicUsize::new(0));
    RawServer::start(move |mut stream| {
        let (answer, requests) = (answer.clone(), requests.clone());
        async move {
            use tokio::io::AsyncWriteExt;
            let Some(head) = read_head(&mut stream).await else {
                return;
            };
            let reply = if head.starts_with(b"GET /health ") {
                HEALTH_OK.to_vec()
            } else {
                answer(requests.fetch_add(1, Ordering::SeqCst))
            };
            let _ = stream.write_all(&reply).await;
        }
    })
    .await
}

/// A keep-alive HTTP/1.1 connection to `addr` from the local address `from` (127.0.0.x).
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Body>,
    target: SocketAddr,
}

impl Client {
    pub async fn connect(target: SocketAddr) -> Client {
        Self::connect_from(target, "127.0.0.1".parse().unwrap()).await
    }

    pub async fn connect_from(target: SocketAddr, from: IpAddr) -> Client {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let stream = socket.connect(target).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender, target }
    }

    pub async fn send(&mut self, mut req: Request<Body>) -> Response<Incoming> {
        if !req.headers().contains_key("host") {
            req.headers_mut()
                .insert("host", self.target.to_string().parse().unwrap());
        }
        self.sender.ready().await.unwrap();
        self.sender.send_request(req).await.unwrap()
    }

    pub async fn get(&mut self, path: &str) -> (StatusCode, String) {
        let res = self.send(Request::get(path).body(full("")).unwrap()).await;
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Uploads 6,000 bytes to `path` on `addr` as an HTTP/1.1 chunked `POST`, six chunks 200 ms
/// apart (1.2 s: the pace is the case under test, not a wait for something), and returns
/// the whole answer (the request asks for `Connection: close`).
pub async fn slow_upload(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..6 {
        client.write_all(b"3e8\r\n").await.unwrap();
        client.write_all(&[b'u'; 1000]).await.unwrap();
        client.write_all(b"\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    within(client.read_to_end(&mut answer)).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

pub fn empty() -> Body {
    full("")
}

/// One GET on a fresh connection.
pub async fn get(target: SocketAddr, path: &str) -> (StatusCode, String) {
    Client::connect(target).await.get(path).await
}

/// A config for `backends`, listening on an ephemeral port, with fast health checks.
pub fn config(backends: &[SocketAddr], extra: &str) -> Config {
    let servers: Vec<String> = backends
        .iter()
        .map(|b| format!(r#"{{"host": "127.0.0.1", "port": {}}}"#, b.port()))
        .collect();
    let json = format!(
        r#"{{"listen": "127.0.0.1:0", "servers": [{}], "spawn_backends": false,
            "health_check_interval": 0.2, "health_check_timeout": 0.19{}{}}}"#,
        servers.join(", "),
        if extra.is_empty() { "" } else { ", " },
        extra
    );
    Config::from_json(&json).unwrap()
}

/// Starts a proxy and waits until every backend that answers its health check is healthy.
pub async fn proxy(config: Config) -> Proxy {
    let proxy = Proxy::start(config).await.unwrap();
    let expect = proxy.config().servers.len();
    within(
        proxy
            .backends()
            .wait_until(|s| s.iter().filter(|(_, e)| e.is_healthy()).count() == expect),
    )
    .await;
    proxy
}

/// Fails the test instead of hanging when `f` takes more than 10 s, naming the line that
/// waited.
#[track_caller]
pub fn within<F: std::future::Future>(f: F) -> impl std::future::Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(Duration::from_secs(10), f).await {
            Ok(output) => output,
            Err(_) => panic!("timed out after 10 s, waiting at {caller}"),
        }
    }
}

/// Waits until the proxy's view of `backend`'s health is `healthy`.
pub async fn wait_health(proxy: &Proxy, backend: &Backend, healthy: bool) {
    let key: http::uri::Authority = backend.authority().parse().unwrap();
    within(proxy.backends().wait_until(|s| {
        s.iter()
            .any(|(k, e)| *k == key && e.is_healthy() == healthy)
    }))
    .await;
}

/// Raw bytes on a new connection; returns everything read until the proxy closes it.
/// Fails the test if the connection is still open after 5 s.
#[track_caller]
pub fn raw(target: SocketAddr, bytes: &[u8]) -> impl std::future::Future<Output = String> {
    let caller = std::panic::Location::caller();
    let bytes = bytes.to_vec();
    async move {
        let ex = exchange(target, &bytes, false, Duration::from_secs(5)).await;
        assert!(
            ex.closed(),
            "the connection was still open after 5 s (at {caller}); read: {:?}",
            ex.text()
        );
        ex.text()
    }
}

/// How the peer ended a raw exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The peer closed the connection (EOF).
    Closed,
    /// The peer reset the connection.
    Reset,
    /// The connection was still open when the wait ran out.
    Open,
}

/// What a raw exchange read, and how it ended.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub bytes: Vec<u8>,
    pub end: End,
}

impl Exchange {
    /// The peer ended the connection (closed or reset), rather than leaving it open.
    pub fn closed(&self) -> bool {
        self.end != End::Open
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The proxy answered with `status`, said `Connection: close`, and closed.
    pub fn assert_closed_with(&self, status: u16) {
        let answer = self.text();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{answer}"
        );
        assert!(self.closed(), "{answer}");
    }
}

/// Raw bytes on a new connection, then (with `half_close`) the end of the sending side;
/// returns everything read until the peer ends the connection or `wait` passes, and which
/// of the two happened. A peer that closes while the bytes are being written just ends the
/// exchange early.
pub async fn exchange(
    target: SocketAddr,
    bytes: &[u8],
    half_close: bool,
    wait: Duration,
) -> Exchange {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(target).await.unwrap();
    let mut out = Vec::new();
    if s.write_all(bytes).await.is_err() {
        // The peer is gone already; whatever it sent may still be readable.
        let end = read_until_end(&mut s, &mut out, Duration::from_secs(1)).await;
        return Exchange { bytes: out, end };
    }
    if half_close {
        let _ = s.shutdown().await;
    }
    let end = read_until_end(&mut s, &mut out, wait).await;
    Exchange { bytes: out, end }
}

/// Reads into `out` until the peer ends the connection or `wait` passes.
pub async fn read_until_end(stream: &mut TcpStream, out: &mut Vec<u8>, wait: Duration) -> End {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return End::Closed,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => return End::Reset,
            }
        }
    };
    tokio::time::timeout(wait, read).await.unwrap_or(End::Open)
}

/// A listener on `addr` that never accepts, its accept queue full: connects to it get no
/// answer (the kernel drops their SYNs) until they time out. Waits for the address to be
/// free (a backend just stopped there may still hold it a moment). Keep both values alive.
pub async fn deaf_listener(addr: SocketAddr) -> (TcpListener, Vec<TcpStream>) {
    let deaf = within(async {
        loop {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            if socket.bind(addr).is_ok() {
                break socket.listen(0).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let addr = deaf.local_addr().unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(s)) =
        tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
    {
        queued.push(s);
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    (deaf, queued)
}

/// Waits until no request is in flight on any of the proxy's backends.
#[track_caller]
pub fn nothing_in_flight(proxy: &Proxy) -> impl std::future::Future<Output = ()> + '_ {
    within(
        proxy
            .backends()
            .wait_until(|s| s.iter().all(|(_, e)| e.in_flight() == 0)),
    )
}

/// A fresh directory under the system's temp dir; the caller removes it.
pub fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tower-lb-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Like [`config`], with every server speaking `protocol` (`"http1"` or `"http2"`), and
/// probes given 0.25 s (HTTP/2 probes open a connection and a handshake each).
pub fn config_with_protocol(backends: &[SocketAddr], protocol: &str, extra: &str) -> Config {
    let servers: Vec<String> = backends
        .iter()
        .map(|b| {
            format!(
                r#"{{"host": "127.0.0.1", "port": {}, "protocol": "{protocol}"}}"#,
                b.port()
            )
        })
        .collect();
    let json = format!(
        r#"{{"listen": "127.0.0.1:0", "servers": [{}], "spawn_backends": false,
            "health_check_interval": 0.3, "health_check_timeout": 0.25{}{}}}"#,
        servers.join(", "),
        if extra.is_empty() { "" } else { ", " },
        extra
    );
    Config::from_json(&json).unwrap()
}

/// An HTTP/2 connection (h2c, prior knowledge) to `target`; clones share it, each request
/// on a stream of its own.
#[derive(Clone)]
pub struct H2Client {
    sender: hyper::client::conn::http2::SendRequest<Body>,
}

impl H2Client {
    pub async fn connect(target: SocketAddr) -> H2Client {
        let stream = TcpStream::connect(target).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        H2Client { sender }
    }

    /// Sends `req` (its URI absolute: `http://host/path`).
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        let mut sender = self.sender.clone();
        sender.ready().await?;
        sender.send_request(req).await
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, String) {
        let res = self
            .send(Request::get(uri).body(full("")).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// `message` with one to three seeded byte-level mutations (replace, insert, delete,
/// duplicate a run, truncate), the new bytes drawn mostly from `interesting`: the mutator
/// of `tests/mutations.rs` and `tests/differential.rs`.
pub fn mutate_bytes(rng: &mut rand::rngs::SmallRng, message: &[u8], interesting: &[u8]) -> Vec<u8> {
    use rand::Rng;
    let mut m = message.to_vec();
    for _ in 0..rng.gen_range(1..=3) {
        if m.is_empty() {
            break;
        }
        let at = rng.gen_range(0..m.len());
        let byte = if rng.gen_bool(0.7) {
            interesting[rng.gen_range(0..interesting.len())]
        } else {
            rng.gen()
        };
        match rng.gen_range(0..5) {
            0 => m[at] = byte,
            1 => m.insert(at, byte),
            2 => {
                let end = (at + rng.gen_range(1..=8)).min(m.len());
                m.drain(at..end);
            }
            3 => {
                let end = (at + rng.gen_range(1..=16)).min(m.len());
                let copy = m[at..end].to_vec();
                m.splice(at..at, copy);
            }
            _ => m.truncate(at),
        }
    }
    m
}

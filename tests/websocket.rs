//! Upgrades through the proxy: real WebSocket clients and servers (tokio-tungstenite), the
//! tunnel counted in flight, its idle timeout, shutdown with tunnels and requests open, and
//! the same through the axum embedding.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::process::Running;
use support::{config, empty, get, nothing_in_flight, proxy, tempdir, within, Backend, Client};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower_lb::proxy::uri::Authority;

/// A backend that answers `GET /health` and plain requests (200, its address) and upgrades
/// WebSocket requests to an echo server; `/refuse` answers an upgrade request with `403`.
/// Its `101` names it in `x-backend`.
struct WsBackend {
    addr: SocketAddr,
    /// Heads of the upgrade requests it received.
    upgrades: Arc<Mutex<Vec<HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WsBackend {
    async fn start() -> WsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upgrades = Arc::new(Mutex::new(Vec::new()));
        let seen = upgrades.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let seen = seen.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(addr, request, &seen)) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades(),
                );
            }
        });
        WsBackend {
            addr,
            upgrades,
            task,
        }
    }

    fn upgrades(&self) -> Vec<HeaderMap> {
        self.upgrades.lock().unwrap().clone()
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(
    addr: SocketAddr,
    mut request: Request<Incoming>,
    seen: &Mutex<Vec<HeaderMap>>,
) -> Response<Full<Bytes>> {
    let key = request.headers().get("sec-websocket-key").cloned();
    let Some(key) = key else {
        return Response::new(Full::new(Bytes::from(addr.to_string())));
    };
    seen.lock().unwrap().push(request.headers().clone());
    if request.uri().path() == "/refuse" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"no")));
        *response.status_mut() = StatusCode::FORBIDDEN;
        return response;
    }
    let upgraded = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgraded.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .header("x-backend", addr.to_string())
        .body(Full::default())
        .unwrap()
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket through `proxy` to `path`; the backend that took it.
async fn connect(proxy: SocketAddr, path: &str) -> (Ws, String) {
    let (ws, response) = within(tokio_tungstenite::connect_async(format!(
        "ws://{proxy}{path}"
    )))
    .await
    .expect("handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["upgrade"], "websocket");
    let backend = response.headers()["x-backend"].to_str().unwrap().to_owned();
    (ws, backend)
}

/// Sends `message` and expects it back.
async fn echo(ws: &mut Ws, message: Message) {
    ws.send(message.clone()).await.unwrap();
    let back = within(ws.next()).await.expect("an echo").unwrap();
    assert_eq!(back, message);
}

/// Waits until the tunnel ends: the next read finds the connection closed.
async fn closed(ws: &mut Ws) {
    match within(ws.next()).await {
        None | Some(Err(_)) => {}
        Some(Ok(message)) if message.is_close() => {}
        Some(Ok(message)) => panic!("still open: {message:?}"),
    }
}

fn in_flight(proxy: &tower_lb::standalone::Proxy, backend: SocketAddr) -> Option<usize> {
    let key: Authority = backend.to_string().parse().unwrap();
    proxy.backends().in_flight(&key)
}

#[tokio::test]
async fn websocket_messages_pass_both_ways_through_a_tunnel() {
    let backend = WsBackend::start().await;
    let proxy = proxy(config(&[backend.addr], "")).await;
    let (mut ws, _) = connect(proxy.local_addr(), "/chat?room=1").await;

    echo(&mut ws, Message::text("hello")).await;
    echo(&mut ws, Message::binary((0..=255u8).collect::<Vec<_>>())).await;
    for i in 0..20 {
        echo(&mut ws, Message::text(format!("message {i}"))).await;
    }
    // A 1 MiB message, sent while the echo streams back.
    let large: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    echo(&mut ws, Message::binary(large)).await;

    // The backend saw the upgrade: both fields, the rest of the head as for any request.
    let heads = backend.upgrades();
    assert_eq!(heads.len(), 1);
    let head = &heads[0];
    assert_eq!(head["upgrade"], "websocket");
    assert_eq!(head["connection"], "upgrade");
    assert_eq!(head["x-forwarded-for"], "127.0.0.1");
    assert!(head.contains_key("sec-websocket-key"));

    // Closed by the client: the close handshake passes, and the tunnel ends.
    ws.close(None).await.unwrap();
    closed(&mut ws).await;
    nothing_in_flight(&proxy).await;
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_upgrade_is_an_ordinary_response_on_a_usable_connection() {
    let backend = WsBackend::start().await;
    let proxy = proxy(config(&[backend.addr], "")).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    let request = Request::get("/refuse")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())
        .unwrap();
    let response = client.send(request).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(!response.headers().contains_key("upgrade"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"no");
    assert_eq!(backend.upgrades()[0]["upgrade"], "websocket");

    // The same connection goes on with HTTP.
    let (status, body) = client.get("/next").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, backend.addr.to_string());
    nothing_in_flight(&proxy).await;
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn least_connections_counts_an_open_tunnel() {
    let backends = [WsBackend::start().await, WsBackend::start().await];
    let addrs = [backends[0].addr, backends[1].addr];
    let proxy = proxy(config(
        &addrs,
        r#""algorithm": "least_connections", "admin_listen": "127.0.0.1:0""#,
    ))
    .await;
    let (mut ws, tunneled) = connect(proxy.local_addr(), "/").await;
    let (busy, other) = if tunneled == addrs[0].to_string() {
        (addrs[0], addrs[1])
    } else {
        (addrs[1], addrs[0])
    };
    assert_eq!(in_flight(&proxy, busy), Some(1));

    // Requests one after the other: each goes to the backend without the tunnel.
    for _ in 0..4 {
        assert_eq!(
            get(proxy.local_addr(), "/").await,
            (StatusCode::OK, other.to_string())
        );
    }
    // `/status` shows the tunnel in flight.
    let (status, body) = get(proxy.admin_addr().unwrap(), "/status").await;
    assert_eq!(status, StatusCode::OK);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let entry = |addr: SocketAddr| {
        status["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == addr.to_string())
            .unwrap()
            .clone()
    };
    assert_eq!(entry(busy)["in_flight"], 1);
    assert_eq!(entry(other)["in_flight"], 0);

    echo(&mut ws, Message::text("still there")).await;
    ws.close(None).await.unwrap();
    closed(&mut ws).await;
    nothing_in_flight(&proxy).await;
    proxy.shutdown().await.unwrap();
}

/// A `101` to a request that asked for no upgrade is the backend's error: `502`.
#[tokio::test]
async fn a_tunnel_keeps_its_place_under_max_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let backend = WsBackend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""max_connections": 1"#)).await;
    let (mut ws, _) = connect(proxy.local_addr(), "/").await;

    // hyper has handed the connection over to the tunnel: it still holds the one place.
    let mut next = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    next.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(300), next.read(&mut byte)).await;
    assert!(waited.is_err(), "served beside an open tunnel: {waited:?}");
    echo(&mut ws, Message::text("still there")).await;

    // The tunnel closes: its place goes to the waiting client.
    ws.close(None).await.unwrap();
    closed(&mut ws).await;
    let head = within(support::read_head(&mut next))
        .await
        .expect("a response");
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_101_without_an_upgrade_request_is_a_502() {
    let backend = support::raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
    let proxy = proxy(config(&[backend.addr], r#""retries": 0"#)).await;
    let (status, _) = get(proxy.local_addr(), "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    nothing_in_flight(&proxy).await;
    proxy.shutdown().await.unwrap();
}

/// A backend that resets the upgrade request gives it back; the next backend's tunnel still
/// reaches the client.
#[tokio::test]
async fn an_upgrade_given_back_by_a_failing_backend_tunnels_on_another() {
    let reset = support::reset_backend().await;
    let backend = WsBackend::start().await;
    let proxy = proxy(config(&[reset.addr, backend.addr], "")).await;
    // Round robin: one of the two upgrades goes to the resetting backend first.
    for i in 0..2 {
        let (mut ws, tunneled) = connect(proxy.local_addr(), "/").await;
        assert_eq!(tunneled, backend.addr.to_string());
        echo(&mut ws, Message::text(format!("tunnel {i}"))).await;
    }
    assert_eq!(backend.upgrades().len(), 2);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn tunnel_idle_timeout_closes_a_silent_tunnel_not_an_active_one() {
    let backend = WsBackend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""tunnel_idle_timeout": 1"#)).await;
    let (mut ws, _) = connect(proxy.local_addr(), "/").await;
    // Active for twice the timeout: a message every 0.1 s.
    let active = Instant::now();
    let mut silent = active;
    while active.elapsed() < Duration::from_millis(2000) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo(&mut ws, Message::text("tick")).await;
        silent = Instant::now();
    }
    // Then silent: closed by the proxy, not before the timeout.
    closed(&mut ws).await;
    let after = silent.elapsed();
    assert!(
        after >= Duration::from_millis(950),
        "closed after {after:?}"
    );
    assert!(after < Duration::from_secs(4), "closed after {after:?}");
    nothing_in_flight(&proxy).await;
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_waits_for_a_request_in_flight_within_shutdown_timeout() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""shutdown_timeout": 5"#)).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    let response = client
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let started = Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown());
    backend.release(1);
    let body = within(response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"first;last");
    within(shutdown).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn shutdown_closes_a_request_still_in_flight_at_shutdown_timeout() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""shutdown_timeout": 0.3"#)).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    let response = client
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    let started = Instant::now();
    within(proxy.shutdown()).await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    // The client sees its connection end before the body did.
    assert!(within(response.into_body().collect()).await.is_err());
    backend.release(1);
}

#[tokio::test]
async fn upgrades_pass_through_the_axum_embedding() {
    let backend = WsBackend::start().await;
    let api = tower_lb::proxy::Builder::new()
        .without_health_check()
        .build([backend.addr.to_string().parse().unwrap()])
        .unwrap();
    let set = api.get_ref().get_ref().clone();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "app" }))
        .nest_service("/ws", api);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let (mut ws, _) = connect(addr, "/ws/live").await;
    echo(&mut ws, Message::text("through axum")).await;
    echo(&mut ws, Message::binary(vec![7u8; 100_000])).await;
    assert_eq!(
        set.in_flight(&backend.addr.to_string().parse().unwrap()),
        Some(1)
    );
    ws.close(None).await.unwrap();
    closed(&mut ws).await;
    within(set.wait_until(|s| s.iter().all(|(_, e)| e.in_flight() == 0))).await;
    let heads = backend.upgrades();
    assert_eq!(heads.len(), 1);
    server.abort();
}

// The standalone binary as a process: SIGTERM with a tunnel open.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_a_tunnel_until_shutdown_timeout_then_closes_it_and_exits_0() {
    let backend = WsBackend::start().await;
    let dir = tempdir();
    let path = dir.join("config.json");
    let config = format!(
        r#"{{"listen": "127.0.0.1:0", "servers": [{{"host": "127.0.0.1", "port": {}}}],
            "spawn_backends": false, "health_check_interval": 0.5, "health_check_timeout": 0.25,
            "shutdown_timeout": 2}}"#,
        backend.addr.port()
    );
    std::fs::write(&path, config).unwrap();
    let mut proxy = Running::start(&path);
    let addr = proxy.listening();
    // Perhaps logged before the address: wait_for takes it from the lines read already.
    proxy.wait_for("backend is healthy");

    let (mut ws, _) = connect(addr, "/").await;
    echo(&mut ws, Message::text("before")).await;
    proxy.signal("TERM");
    let signalled = Instant::now();
    proxy.wait_for("shutting down");

    // New connections are refused; the tunnel keeps working.
    within(async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    echo(&mut ws, Message::text("during the shutdown window")).await;
    assert!(proxy.child.try_wait().unwrap().is_none(), "exited early");

    // At shutdown_timeout the tunnel is closed, and the proxy exits 0.
    closed(&mut ws).await;
    let cut = signalled.elapsed();
    assert!(cut >= Duration::from_millis(1900), "closed after {cut:?}");
    assert_eq!(proxy.wait().code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(6));
    std::fs::remove_dir_all(&dir).unwrap();
}

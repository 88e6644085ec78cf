//! Client connection limits: `max_connections`, `client_idle_timeout`, and the header
//! timeout of a client that sends nothing.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";

/// Reads one response head (and what came with it) from a keep-alive connection.
async fn response(stream: &mut TcpStream) -> String {
    let head = read_head(stream).await.expect("a response");
    String::from_utf8_lossy(&head).into_owned()
}

/// Whether the peer closes `stream` (EOF or reset) within `wait`, reading and dropping
/// whatever comes first.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn at_max_connections_a_client_waits_in_the_backlog_until_one_closes() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""max_connections": 2"#)).await;
    let addr = proxy.local_addr();

    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    for client in [&mut first, &mut second] {
        client.write_all(GET).await.unwrap();
        assert!(within(response(client)).await.starts_with("HTTP/1.1 200"));
    }

    // The third connects (the kernel's backlog takes it) but is not served.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(GET).await.unwrap();
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
    assert!(waited.is_err(), "served beyond max_connections: {waited:?}");

    // One closes: the third is accepted and served.
    drop(first);
    assert!(within(response(&mut third))
        .await
        .starts_with("HTTP/1.1 200"));
    // The second still works.
    second.write_all(GET).await.unwrap();
    assert!(within(response(&mut second))
        .await
        .starts_with("HTTP/1.1 200"));
    drop((second, third));
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_one_with_a_request_in_flight_stays() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""client_idle_timeout": 0.3"#)).await;
    let addr = proxy.local_addr();

    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(GET).await.unwrap();
    assert!(within(response(&mut idle))
        .await
        .starts_with("HTTP/1.1 200"));
    let went_idle = Instant::now();

    // A request that takes three times the idle timeout: its connection stays.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /slow/900 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();

    assert!(within(closed_within(&mut idle, Duration::from_secs(5))).await);
    assert!(went_idle.elapsed() >= Duration::from_millis(300));

    let answer = within(response(&mut busy)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    proxy.shutdown().await.unwrap();
}

async fn ok_server(
    server: tower_lb::proxy::Server,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = tower::service_fn(|_: Request<tower_lb::proxy::RequestBody>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        server
            .serve(listener, service, async {
                let _ = stopped.await;
            })
            .await
    });
    (addr, stop)
}

#[tokio::test]
async fn idle_and_header_timeouts_are_separate() {
    let server = tower_lb::proxy::Server::new()
        .header_read_timeout(Duration::from_millis(200))
        .client_idle_timeout(Duration::from_millis(1500));
    let (addr, stop) = ok_server(server).await;

    // A client that connects and sends nothing is closed by the header timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    assert!(within(closed_within(&mut silent, Duration::from_secs(5))).await);
    assert!(started.elapsed() < Duration::from_millis(1500));

    // After a request, the connection may idle past the header timeout...
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(GET).await.unwrap();
    assert!(within(response(&mut kept))
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(!closed_within(&mut kept, Duration::from_millis(500)).await);
    // ...and a request trickled in then has the header timeout to finish its head.
    kept.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let trickled = Instant::now();
    assert!(within(closed_within(&mut kept, Duration::from_secs(5))).await);
    assert!(trickled.elapsed() < Duration::from_millis(1000));

    // A connection left idle is closed after the idle timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(GET).await.unwrap();
    assert!(within(response(&mut idle))
        .await
        .starts_with("HTTP/1.1 200"));
    let went_idle = Instant::now();
    assert!(within(closed_within(&mut idle, Duration::from_secs(5))).await);
    assert!(went_idle.elapsed() >= Duration::from_millis(1500));
    let _ = stop.send(());
}

#[tokio::test]
async fn shutdown_closes_at_once_connections_without_a_request() {
    // The header timeout (30 s) and the idle timeout (60 s) would close these much later,
    // and the shutdown would wait for them until its own timeout (30 s).
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = tower::service_fn(|_: Request<tower_lb::proxy::RequestBody>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let server = tower_lb::proxy::Server::new()
        .header_read_timeout(Duration::from_secs(30))
        .client_idle_timeout(Duration::from_secs(60))
        .shutdown_timeout(Duration::from_secs(30));
    let server = tokio::spawn(async move {
        server
            .serve(listener, service, async {
                let _ = stopped.await;
            })
            .await
    });
    // One that has sent nothing, one between requests.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(GET).await.unwrap();
    assert!(within(response(&mut kept))
        .await
        .starts_with("HTTP/1.1 200"));

    let started = Instant::now();
    let _ = stop.send(());
    assert!(within(closed_within(&mut silent, Duration::from_secs(5))).await);
    assert!(within(closed_within(&mut kept, Duration::from_secs(5))).await);
    within(server).await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

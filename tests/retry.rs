//! Retries on another backend (`retries`, `retry_budget`), through the standalone proxy,
//! against backends that close or reset connections before answering.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;

/// A backend that passes health checks; for any other request it reads the head and the
/// `Content-Length` body, records the body, and closes (or, with `reset`, resets) the
/// connection without a byte of an answer.
struct Failing {
    server: RawServer,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Failing {
    async fn start(reset: bool) -> Failing {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        let server = RawServer::start(move |mut stream| {
            let seen = seen.clone();
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                if head.starts_with(b"GET /health ") {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
                let split = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let text = String::from_utf8_lossy(&head[..split]).to_ascii_lowercase();
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                let mut body = head[split..].to_vec();
                let mut buf = vec![0u8; 16 * 1024];
                while body.len() < length {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock().unwrap().push(body);
                if reset {
                    #[allow(deprecated)]
                    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
                }
            }
        })
        .await;
        Failing { server, bodies }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Requests (other than health checks) it has read.
    fn requests(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }
}

/// Passive health off, so that failing backends stay in rotation: the retries are what is
/// tested.
fn retry_config(backends: &[SocketAddr], extra: &str) -> tower_lb::config::Config {
    let passive = r#""passive_health": {"consecutive_failures": 0}"#;
    let extra = if extra.is_empty() {
        passive.to_owned()
    } else {
        format!("{passive}, {extra}")
    };
    config(backends, &extra)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Body::new(http_body_util::Full::new(bytes.into()).map_err(|never| match never {}))
}

async fn send(proxy: SocketAddr, request: Request<Body>) -> (StatusCode, Bytes) {
    let response = Client::connect(proxy).await.send(request).await;
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn a_get_reset_before_an_answer_succeeds_on_another_backend() {
    let (a, b, good) = (
        Failing::start(true).await,
        Failing::start(false).await,
        Backend::start().await,
    );
    let proxy = proxy(retry_config(
        &[a.addr(), b.addr(), good.addr],
        r#""retries": 2"#,
    ))
    .await;
    let before = tower_lb::stats::global().retries();
    for _ in 0..6 {
        let (status, body) = within(get(proxy.local_addr(), "/")).await;
        assert_eq!((status, body), (StatusCode::OK, good.authority()));
    }
    // Round robin started two of the six on each failing backend; each of those was
    // retried, on a backend it had not tried.
    assert!(
        a.requests() >= 2 && b.requests() >= 2,
        "{} {}",
        a.requests(),
        b.requests()
    );
    assert_eq!(good.hits(), 6);
    assert!(tower_lb::stats::global().retries() - before >= (a.requests() + b.requests()) as u64);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn retries_zero_turns_them_off() {
    let (bad, good) = (Failing::start(true).await, Backend::start().await);
    let proxy = proxy(retry_config(&[bad.addr(), good.addr], r#""retries": 0"#)).await;
    let mut failed = 0;
    for _ in 0..4 {
        let (status, _) = within(get(proxy.local_addr(), "/")).await;
        if status == StatusCode::BAD_GATEWAY {
            failed += 1;
        } else {
            assert_eq!(status, StatusCode::OK);
        }
    }
    assert_eq!(failed, 2);
    assert_eq!(bad.requests(), 2);
    assert_eq!(good.hits(), 2);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_post_whose_body_was_sent_is_not_retried() {
    let (bad, good) = (Failing::start(false).await, Backend::start().await);
    let proxy = proxy(retry_config(&[bad.addr(), good.addr], "")).await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let request = Request::post("/echo").body(full("order #1")).unwrap();
        statuses.push(within(send(proxy.local_addr(), request)).await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_GATEWAY]);
    assert_eq!(*bad.bodies.lock().unwrap(), [b"order #1".to_vec()]);
    assert_eq!(good.hits(), 1);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn no_retry_once_a_response_byte_has_come() {
    let half = raw_backend(b"HTTP/1.1 200 OK\r\ncontent-le").await;
    let good = Backend::start().await;
    let proxy = proxy(retry_config(&[half.addr, good.addr], "")).await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(within(get(proxy.local_addr(), "/")).await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_GATEWAY]);
    assert_eq!(good.hits(), 1);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_small_body_is_replayed_byte_for_byte_a_large_one_is_not() {
    let (bad, good) = (Failing::start(false).await, Backend::start().await);
    let proxy = proxy(retry_config(&[bad.addr(), good.addr], "")).await;
    // Every byte value, 60 KiB: under the 64 KiB kept for a retry.
    let small: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
    for _ in 0..2 {
        let request = Request::put("/echo").body(full(small.clone())).unwrap();
        let (status, body) = within(send(proxy.local_addr(), request)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == small, "the echo differs from what was sent");
    }
    // The failing backend had read all of it before it closed (each request started there:
    // the retry's pick took the next round-robin turn): the proxy sent it again.
    let seen = bad.bodies.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|body| *body == small));
    assert_eq!(good.hits(), 2);

    // Streamed without a length (chunked), in two parts: replayed too.
    let parts = [
        Bytes::from_static(b"first part, "),
        Bytes::from_static(b"second part"),
    ];
    for _ in 0..2 {
        let frames = parts
            .clone()
            .map(|p| Ok::<_, std::io::Error>(Frame::data(p)));
        let body = Body::new(StreamBody::new(futures::stream::iter(frames)));
        let request = Request::put("/echo").body(body).unwrap();
        let (status, body) = within(send(proxy.local_addr(), request)).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"first part, second part"[..])
        );
    }

    // 100 KiB: not kept, so not sent again once the backend has read it.
    let large = vec![b'x'; 100 * 1024];
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let request = Request::put("/echo").body(full(large.clone())).unwrap();
        statuses.push(within(send(proxy.local_addr(), request)).await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_GATEWAY]);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_budget_caps_retries_when_every_backend_fails() {
    let (a, b) = (Failing::start(true).await, Failing::start(true).await);
    // A budget of 1 percent of 60 requests is less than the floor of 3 a second: 30 retries
    // in 10 s, whatever the percentage.
    let started = std::time::Instant::now();
    let proxy = proxy(retry_config(
        &[a.addr(), b.addr()],
        r#""retries": 1, "retry_budget": 1"#,
    ))
    .await;
    for _ in 0..60 {
        let (status, _) = within(get(proxy.local_addr(), "/")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    // Without the budget the backends would have seen 120 attempts.
    assert!(
        started.elapsed().as_secs() < 9,
        "the test assumes one 10 s window"
    );
    assert_eq!(a.requests() + b.requests(), 60 + 30);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn retries_change_on_reload() {
    let (bad, good) = (Failing::start(true).await, Backend::start().await);
    let backends = [bad.addr(), good.addr];
    let mut proxy = proxy(retry_config(&backends, r#""retries": 0"#)).await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(within(get(proxy.local_addr(), "/")).await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_GATEWAY]);
    let mut next = retry_config(&backends, r#""retries": 1"#);
    next.listen = proxy.local_addr();
    assert!(proxy.apply(next).await.retries);
    for _ in 0..4 {
        let (status, body) = within(get(proxy.local_addr(), "/")).await;
        assert_eq!((status, body), (StatusCode::OK, good.authority()));
    }
    proxy.shutdown().await.unwrap();
}

//! HTTP/2 through the standalone proxy: h2c clients on the listener's port, `http2`
//! backends, and either protocol on either side.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::{config, config_with_protocol, proxy, wait_health, within, Backend, H2Client};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_lb::proxy::Server;

/// What an HTTP/2 backend saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    uri: String,
    headers: HeaderMap,
    trailers: Option<HeaderMap>,
}

/// A backend that speaks HTTP/2 (and HTTP/1.1): tower-lb's own server, which stops
/// gracefully (`GOAWAY`, requests in flight finish). `/health`: 200; `/big/N`: N chunks of
/// [`CHUNK`] bytes, counted in `produced` as its server takes each; `/deaf`: never reads
/// its request body nor answers, counted in `deaf` while it waits; `/slow/N`: its address
/// after N ms, counted in `sleeping` while it waits; anything else: its address, after reading the whole request body.
struct H2Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    count: tokio::sync::watch::Receiver<usize>,
    produced: tokio::sync::watch::Receiver<usize>,
    deaf: tokio::sync::watch::Receiver<usize>,
    sleeping: tokio::sync::watch::Receiver<usize>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl H2Backend {
    async fn start() -> H2Backend {
        let listener = tower_lb::proxy::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let (counter, count) = tokio::sync::watch::channel(0);
        let counter = Arc::new(counter);
        let (producer, produced) = tokio::sync::watch::channel(0);
        let producer = Arc::new(producer);
        let (deafened, deaf) = tokio::sync::watch::channel(0);
        let deafened = Arc::new(deafened);
        let (sleeper, sleeping) = tokio::sync::watch::channel(0);
        let sleeper = Arc::new(sleeper);
        let service = tower::service_fn(move |request: Request<tower_lb::proxy::RequestBody>| {
            let log = log.clone();
            let counter = counter.clone();
            let producer = producer.clone();
            let deafened = deafened.clone();
            let sleeper = sleeper.clone();
            async move {
                let (head, body) = request.into_parts();
                let path = head.uri.path().to_owned();
                if path == "/health" {
                    return Ok::<_, Infallible>(Response::new(support::full("ok")));
                }
                if let Some(n) = path.strip_prefix("/big/") {
                    let chunk = Bytes::from(vec![b'x'; CHUNK]);
                    let chunks = (0..n.parse().unwrap_or(0)).map(move |_| {
                        producer.send_modify(|p| *p += CHUNK);
                        Ok::<_, Infallible>(Frame::data(chunk.clone()))
                    });
                    let body = StreamBody::new(futures::stream::iter(chunks))
                        .map_err(|never| -> std::io::Error { match never {} });
                    return Ok(Response::new(support::Body::new(body)));
                }
                if path == "/deaf" {
                    // Held, never read; counted until the proxy gives up the stream.
                    let _held = &body;
                    deafened.send_modify(|n| *n += 1);
                    let _counted = DropGuard(|| deafened.send_modify(|n| *n -= 1));
                    std::future::pending::<()>().await;
                }
                let collected = body.collect().await.ok();
                let trailers = collected.as_ref().and_then(|c| c.trailers().cloned());
                log.lock().unwrap().push(Seen {
                    version: head.version,
                    uri: head.uri.to_string(),
                    headers: head.headers,
                    trailers,
                });
                counter.send_modify(|n| *n += 1);
                if let Some(ms) = path.strip_prefix("/slow/") {
                    sleeper.send_modify(|n| *n += 1);
                    let _counted = DropGuard(|| sleeper.send_modify(|n| *n -= 1));
                    let ms = ms.parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Ok(Response::new(support::full(addr.to_string())))
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            Server::new()
                .observed(false)
                .serve(listener, service, async {
                    let _ = stopped.await;
                })
                .await
        });
        H2Backend {
            addr,
            seen,
            count,
            produced,
            deaf,
            sleeping,
            stop: Some(stop),
            task,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `n` requests (other than health checks) have arrived.
    async fn wait_seen(&self, n: usize) {
        let mut count = self.count.clone();
        within(count.wait_for(|&c| c >= n)).await.unwrap();
    }

    /// Stops gracefully: no new connections, `GOAWAY` on open ones, requests in flight
    /// answered. Returns once they are.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within(&mut self.task).await.unwrap().unwrap();
    }
}

impl Drop for H2Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs its function when dropped.
struct DropGuard<F: FnMut()>(F);

impl<F: FnMut()> Drop for DropGuard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The chunk of a `/big/N` response.
const CHUNK: usize = 16 * 1024;

fn empty() -> support::Body {
    support::empty()
}

#[tokio::test]
async fn streams_of_one_connection_are_balanced_per_request_with_forwarded_for() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let proxy = proxy(config(&addrs, "")).await;
    let client = H2Client::connect(proxy.local_addr()).await;

    // 30 concurrent streams on one connection.
    let answers = within(futures::future::join_all((0..30).map(|i| {
        let client = client.clone();
        async move {
            let response = client
                .send(
                    Request::get(format!("http://app.example:8443/x/{i}?q=1"))
                        .body(empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.version(), Version::HTTP_2);
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        }
    })))
    .await;
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for answer in answers {
        *per_backend.entry(answer).or_default() += 1;
    }
    for backend in &backends {
        // Round robin per request, not per connection.
        assert_eq!(
            per_backend.get(&backend.authority()),
            Some(&10),
            "{per_backend:?}"
        );
        for (headers, path) in backend.seen().iter().zip(backend.paths()) {
            // An HTTP/1.1 backend gets origin form and a Host made from `:authority`.
            assert!(path.starts_with("/x/") && path.ends_with("?q=1"), "{path}");
            assert_eq!(headers["host"], "app.example:8443");
            assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
        }
    }
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn no_healthy_backend_is_503_at_once_over_http2() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], "")).await;
    backend.set_healthy(false);
    wait_health(&proxy, &backend, false).await;

    let client = H2Client::connect(proxy.local_addr()).await;
    let started = Instant::now();
    let (status, _) = within(client.get("http://app.example/")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(backend.hits(), 0);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn response_timeout_is_504_over_http2() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""response_timeout": 0.3"#)).await;
    let client = H2Client::connect(proxy.local_addr()).await;
    let (status, _) = within(client.get("http://app.example/stall")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    proxy.shutdown().await.unwrap();
}

/// Clients that stop reading large responses from an HTTP/2 backend hold no more than
/// their streams' windows of the proxy's one connection to it: the backend's other
/// responses still come through.
#[tokio::test]
async fn clients_that_stop_reading_leave_the_http2_backend_connection_to_others() {
    const MIB: usize = 1024 * 1024;
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(&[backend.addr], "http2", "")).await;
    // 24 responses of 8 MiB each on one client connection that reads none of them: what
    // the client takes is bounded by its connection window (hyper's 5 MiB), and the rest
    // stays with the proxy, a stream's window each.
    let stalled = H2Client::connect(proxy.local_addr()).await;
    let mut held = Vec::new();
    for _ in 0..24 {
        let response = within(
            stalled.send(
                Request::get("http://app.example/big/512")
                    .body(empty())
                    .unwrap(),
            ),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        held.push(response);
    }
    // Once the backend has handed over 10 MiB, the proxy holds at least 4.25 MiB of it
    // (5 MiB went to the client, at most a chunk a stream waits at each end). Under
    // hyper's default 5 MiB connection window that leaves less than the 1 MiB response
    // below needs, and what it frees the stalled streams take: it never completes. The
    // proxy's streams hold 256 KiB each, so the stalled streams reach 11 MiB in all, 6 of
    // it with the proxy, and leave the connection room to spare.
    let mut produced = backend.produced.clone();
    within(produced.wait_for(|&p| p >= 10 * MIB)).await.unwrap();
    let other = H2Client::connect(proxy.local_addr()).await;
    let (status, body) = within(other.get("http://app.example/big/64")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 64 * CHUNK);
    drop(held);
    proxy.shutdown().await.unwrap();
}

/// Requests that a backend holds without answering take no more than 100 of a
/// connection's streams (`Http2Client::max_streams`): the next ones go over another
/// connection, so the limit the backend sets on one connection's streams (200, hyper's,
/// on tower-lb's server) does not keep other clients' requests from it.
#[tokio::test]
async fn requests_a_backend_holds_open_another_connection_to_it() {
    const HELD: usize = 210;
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(&[backend.addr], "http2", "")).await;
    let mut held = tokio::task::JoinSet::new();
    // Three client connections, each within the listener's own limit on streams.
    for _ in 0..3 {
        let client = H2Client::connect(proxy.local_addr()).await;
        for _ in 0..HELD / 3 {
            let client = client.clone();
            let request = Request::get("http://app.example/deaf")
                .body(empty())
                .unwrap();
            held.spawn(async move { client.send(request).await });
        }
    }
    // All of them at once: more than one connection to the backend carries.
    let mut deaf = backend.deaf.clone();
    within(deaf.wait_for(|&n| n == HELD)).await.unwrap();
    let other = H2Client::connect(proxy.local_addr()).await;
    let (status, body) = within(other.get("http://app.example/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, backend.addr.to_string());
    held.abort_all();
    proxy.shutdown().await.unwrap();
}

/// An embedded `Http2Backend` opens a second connection for the requests beyond
/// `max_streams`, and closes it once they are over.
#[tokio::test]
async fn an_http2_backend_adds_a_connection_past_max_streams_and_closes_it_after() {
    use tower::{Service, ServiceExt};
    use tower_lb::balance::MakeBackend;
    use tower_lb::proxy::Http2Client;

    const STREAMS: usize = 4;
    let backend = H2Backend::start().await;
    let authority = backend.addr.to_string().parse().unwrap();
    let client = Http2Client::<support::Body>::new().max_streams(STREAMS);
    let service = client.make_backend(&authority);
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..STREAMS + 1 {
        let request = Request::get("/deaf").body(empty()).unwrap();
        held.spawn(service.clone().oneshot(request));
    }
    let mut deaf = backend.deaf.clone();
    within(deaf.wait_for(|&n| n == STREAMS + 1)).await.unwrap();
    assert_eq!(service.connections(), 2);

    // Their streams end with their futures; the next request finds the second
    // connection idle and closes it.
    held.abort_all();
    while held.join_next().await.is_some() {}
    within(deaf.wait_for(|&n| n == 0)).await.unwrap();
    let mut next = service.clone();
    let call = within(next.ready())
        .await
        .unwrap()
        .call(Request::get("/").body(empty()).unwrap());
    let response = within(call).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(service.connections(), 1);
}

/// Past `max_connections` full connections to a backend, a request goes over the one
/// that carries the fewest (here within the backend's limit, so it reaches the backend).
#[tokio::test]
async fn an_http2_backend_opens_at_most_max_connections() {
    use tower::ServiceExt;
    use tower_lb::balance::MakeBackend;
    use tower_lb::proxy::Http2Client;

    const STREAMS: usize = 4;
    const CONNECTIONS: usize = 3;
    let backend = H2Backend::start().await;
    let authority = backend.addr.to_string().parse().unwrap();
    let client = Http2Client::<support::Body>::new()
        .max_streams(STREAMS)
        .max_connections(CONNECTIONS);
    let service = client.make_backend(&authority);
    let held = CONNECTIONS * STREAMS + 2;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..held {
        let request = Request::get("/deaf").body(empty()).unwrap();
        calls.spawn(service.clone().oneshot(request));
    }
    let mut deaf = backend.deaf.clone();
    within(deaf.wait_for(|&n| n == held)).await.unwrap();
    assert_eq!(service.connections(), CONNECTIONS);
    calls.abort_all();
    while calls.join_next().await.is_some() {}
}

/// Uploads that the backend has stopped reading hold no more than their streams' windows
/// of the client's connection to the proxy: the client's other uploads on it go through.
#[tokio::test]
async fn uploads_a_backend_stopped_reading_leave_the_client_connection_to_others() {
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(&[backend.addr], "http2", "")).await;
    let client = H2Client::connect(proxy.local_addr()).await;
    let (sent, mut taken) = tokio::sync::watch::channel(0usize);
    let sent = Arc::new(sent);
    // A body of `n` chunks, counted in `taken` as the client's connection takes each.
    let upload = |n: usize, counted: bool| {
        let sent = sent.clone();
        let chunks = (0..n).map(move |_| {
            if counted {
                sent.send_modify(|s| *s += CHUNK);
            }
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; CHUNK])))
        });
        support::Body::new(StreamBody::new(futures::stream::iter(chunks)))
    };
    // Four uploads of 8 MiB that the backend never reads.
    let mut deaf = Vec::new();
    for _ in 0..4 {
        let request = Request::post("http://app.example/deaf")
            .body(upload(512, true))
            .unwrap();
        let client = client.clone();
        deaf.push(tokio::spawn(async move { client.send(request).await }));
    }
    // Each gets as far as the backend's stream window (64 KiB: the backend is tower-lb's
    // server) and the proxy's: 128 KiB, whatever the proxy's window is; the wait stops a
    // chunk short of that. Under hyper's default windows on the listener (1 MiB for a
    // stream and for the connection alike) the first of them would go on to fill the
    // connection's whole window, and the upload below would never finish; with 64 KiB a
    // stream, four take a quarter of it. (Toward the backend the windows are the
    // backend's: one whose stream window is its connection's, as hyper's and tonic's
    // defaults are, stops taking uploads once one of them stalls.)
    within(taken.wait_for(|&t| t >= 4 * (128 * 1024 - CHUNK)))
        .await
        .unwrap();
    let request = Request::post("http://app.example/upload")
        .body(upload(32, false))
        .unwrap();
    let response = within(client.send(request)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = within(response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, backend.addr.to_string());
    for upload in deaf {
        upload.abort();
    }
    proxy.shutdown().await.unwrap();
}

/// To an HTTP/2 backend too, the response timeout counts from the end of the request: a
/// slow upload (a client-streaming call) is not cut; a backend that does not answer once
/// the request is in still times out.
#[tokio::test]
async fn a_slow_upload_to_an_http2_backend_is_not_cut_by_the_response_timeout() {
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(
        &[backend.addr],
        "http2",
        r#""response_timeout": 0.4"#,
    ))
    .await;
    let answer = support::slow_upload(proxy.local_addr(), "/upload").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&backend.addr.to_string()), "{answer}");
    let mut client = support::Client::connect(proxy.local_addr()).await;
    let (status, _) = within(client.get("/slow/3000")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    proxy.shutdown().await.unwrap();
}

/// A client that stops sending its upload to an HTTP/2 backend: `408` by the client's
/// fault after `response_timeout` without a frame of it; passive health does not count
/// it, and the connection to the backend serves on.
#[tokio::test]
async fn a_client_that_stalls_its_upload_to_an_http2_backend_gets_408() {
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(
        &[backend.addr],
        "http2",
        r#""response_timeout": 0.3, "passive_health": {"consecutive_failures": 1, "ejection_time": 30}"#,
    ))
    .await;
    let upload = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhello";
    for _ in 0..2 {
        let ex = support::exchange(proxy.local_addr(), upload, false, Duration::from_secs(3)).await;
        ex.assert_closed_with(408);
    }
    let key: http::uri::Authority = backend.addr.to_string().parse().unwrap();
    assert_eq!(proxy.backends().is_ejected(&key), Some(false));
    assert_eq!(
        support::get(proxy.local_addr(), "/").await.0,
        StatusCode::OK
    );
    // Waiting on the backend, not the client: its own failure, 504.
    let mut client = support::Client::connect(proxy.local_addr()).await;
    let (status, _) = within(client.get("/slow/3000")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(proxy.backends().is_ejected(&key), Some(true));
    proxy.shutdown().await.unwrap();
}

/// An HTTP/1.1 upload framed by its length, to an HTTP/2 backend: hyper's client stops
/// reading the body at its last byte, and the client's connection still carries the next
/// request.
#[tokio::test]
async fn an_http1_upload_to_an_http2_backend_keeps_the_client_connection() {
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(&[backend.addr], "http2", "")).await;
    let mut client = support::Client::connect(proxy.local_addr()).await;
    for i in 0..3 {
        let response = within(
            client.send(
                Request::post("/upload")
                    .header("host", "app.example")
                    .body(support::full(format!("upload {i}")))
                    .unwrap(),
            ),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers().get("connection").is_none(),
            "{i}: {:?}",
            response.headers()
        );
        response.into_body().collect().await.unwrap();
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 3);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_http1_client_reaches_an_http2_backend_and_back() {
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(&[backend.addr], "http2", "")).await;

    let mut client = support::Client::connect(proxy.local_addr()).await;
    let response = within(
        client.send(
            Request::get("/a?b=c")
                .header("host", "app.example")
                .header("connection", "x-secret")
                .header("x-secret", "1")
                .body(empty())
                .unwrap(),
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, backend.addr.to_string());

    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.version, Version::HTTP_2);
    // The client's Host became the target's authority.
    assert_eq!(seen.uri, "http://app.example/a?b=c");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert!(!seen.headers.contains_key("x-secret"));
    assert!(!seen.headers.contains_key("host"));
    // `/status` names the protocol.
    let status = tower_lb::admin::status(proxy.backends());
    assert_eq!(status["backends"][0]["protocol"], "http2");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn request_trailers_over_http2_reach_an_http2_backend() {
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(&[backend.addr], "http2", "")).await;
    let client = H2Client::connect(proxy.local_addr()).await;

    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc123".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(b"part one, "))),
        Ok(Frame::data(Bytes::from_static(b"part two"))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures::stream::iter(frames)).boxed();
    let request = Request::post("http://app.example/upload")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let response = within(client.send(request)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let trailers = seen[0]
        .trailers
        .as_ref()
        .expect("trailers reached the backend");
    assert_eq!(trailers["x-checksum"], "abc123");
    // HTTP/2 allows `te: trailers`, and gRPC servers want it.
    assert_eq!(seen[0].headers["te"], "trailers");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_backend_going_away_gracefully_fails_no_request() {
    let mut backends = vec![
        H2Backend::start().await,
        H2Backend::start().await,
        H2Backend::start().await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let proxy = proxy(config_with_protocol(&addrs, "http2", "")).await;
    let client = H2Client::connect(proxy.local_addr()).await;

    // Eight streams at a time, each worker sending requests one after another.
    let (done_tx, done) = tokio::sync::watch::channel(false);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                while !*done.borrow() {
                    let (status, body) = client.get("http://app.example/slow/5").await;
                    if status == StatusCode::OK {
                        ok += 1;
                    } else {
                        failed.push((status, body));
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    // Every backend serves, then one stops in the middle of the traffic.
    let first = backends.remove(0);
    first.wait_seen(20).await;
    for backend in &backends {
        backend.wait_seen(20).await;
    }
    first.stop().await;
    // The others take the traffic on.
    for backend in &backends {
        let n = backend.seen().len();
        backend.wait_seen(n + 50).await;
    }
    done_tx.send(true).unwrap();

    let mut total = 0;
    for worker in workers {
        let (ok, failed) = within(worker).await.unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    assert!(total > 100, "{total}");
    proxy.shutdown().await.unwrap();
}

/// An HTTP/2 backend that answers its health checks and refuses every other request with
/// `REFUSED_STREAM` (RFC 9113 §8.7: not processed, safe to send elsewhere). Counts them.
async fn refusing_backend() -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let counter = refused.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    if request.uri().path() == "/health" {
                        let _ = respond.send_response(Response::new(()), true);
                    } else {
                        counter.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                }
            });
        }
    });
    (addr, refused, task)
}

#[tokio::test]
async fn a_refused_stream_is_sent_to_another_backend() {
    let (refuser, refused, task) = refusing_backend().await;
    let good = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(&[refuser, good.addr], "http2", "")).await;
    let client = H2Client::connect(proxy.local_addr()).await;

    for _ in 0..10 {
        let (status, body) = within(client.get("http://app.example/x")).await;
        assert_eq!((status, body), (StatusCode::OK, good.addr.to_string()));
    }
    // Round robin sent about half of them to the refusing backend first.
    assert!(refused.load(std::sync::atomic::Ordering::SeqCst) >= 4);
    assert_eq!(good.seen().len(), 10);
    task.abort();
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_head_over_the_limit_never_reaches_the_backend_over_http2() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], "")).await;
    let client = H2Client::connect(proxy.local_addr()).await;
    let big = "x".repeat(70 * 1024);
    let request = Request::get("http://app.example/")
        .header("x-big", big.as_str())
        .body(empty())
        .unwrap();
    match within(client.send(request)).await {
        // h2 answers a head over SETTINGS_MAX_HEADER_LIST_SIZE with 431 itself...
        Ok(response) => assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        ),
        // ...or the client, told the limit in the server's SETTINGS, does not send it.
        Err(error) => eprintln!("the client refused to send it: {error:?}"),
    }
    assert_eq!(backend.hits(), 0);
    // The connection serves on (`get` fails the test if it was closed). The status is the
    // backend's, unless a 0.1 s health probe timed out on a loaded machine meanwhile.
    let (status, _) = within(client.get("http://app.example/")).await;
    assert!(
        matches!(status, StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE),
        "{status}"
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn new_timeouts_keep_each_backends_protocol_and_removed_servers_out() {
    let h2 = H2Backend::start().await;
    let h1 = Backend::start().await;
    let json = |timeout: f64, with_h1: bool| {
        let mut servers = vec![format!(
            r#"{{"host": "127.0.0.1", "port": {}, "protocol": "http2"}}"#,
            h2.addr.port()
        )];
        if with_h1 {
            servers.push(format!(
                r#"{{"host": "127.0.0.1", "port": {}}}"#,
                h1.addr.port()
            ));
        }
        format!(
            r#"{{"listen": "127.0.0.1:0", "servers": [{}], "spawn_backends": false,
                "health_check_interval": 0.3, "health_check_timeout": 0.25,
                "response_timeout": {timeout}}}"#,
            servers.join(", ")
        )
    };
    let config =
        |timeout, with_h1| tower_lb::config::Config::from_json(&json(timeout, with_h1)).unwrap();
    let mut proxy = proxy(config(30.0, true)).await;
    let mut next = config(20.0, false);
    next.listen = proxy.local_addr();
    let diff = proxy.apply(next).await;
    assert!(diff.timeouts && diff.removed.len() == 1);

    let status = tower_lb::admin::status(proxy.backends());
    let backends = status["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 1, "{status}");
    assert_eq!(backends[0]["protocol"], "http2");
    let client = H2Client::connect(proxy.local_addr()).await;
    let (status, body) = within(client.get("http://app.example/")).await;
    assert_eq!((status, body), (StatusCode::OK, h2.addr.to_string()));
    assert_eq!(h2.seen().last().unwrap().version, Version::HTTP_2);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_one_with_a_request_open_stays() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""client_idle_timeout": 0.3"#)).await;
    let stream = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);

    // A request open for twice the idle timeout keeps the connection.
    let started = Instant::now();
    let response = sender
        .send_request(
            Request::get("http://app.example/slow/600")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(!conn.is_finished(), "closed with a request open");

    // Then nothing: the proxy says GOAWAY and the connection ends.
    let ended = within(conn).await;
    assert!(ended.is_ok(), "{ended:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    proxy.shutdown().await.unwrap();
}

/// A client that goes silent, acknowledging not even the GOAWAY's PING, is closed all the
/// same: it cannot hold its place under `max_connections` for good.
#[tokio::test]
async fn an_idle_http2_client_that_never_answers_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], r#""client_idle_timeout": 0.3"#)).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    // The preface and an empty SETTINGS frame; then not a byte more.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut received = Vec::new();
    let read = within(stream.read_to_end(&mut received)).await;
    // The proxy closed the connection (an end, or a reset for the bytes it had not read).
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    // Its frames: a GOAWAY among them, sent when the connection went idle.
    let mut types = Vec::new();
    let mut at = 0;
    while let Some(header) = received.get(at..at + 9) {
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        types.push(header[3]);
        at += 9 + length;
    }
    assert!(types.contains(&0x7), "frame types {types:?}");
    assert_eq!(backend.hits(), 0);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn host_rules_and_connect_hold_over_http2() {
    let backend = Backend::start().await;
    let proxy = proxy(config(&[backend.addr], "")).await;
    let client = H2Client::connect(proxy.local_addr()).await;

    // CONNECT (no extended CONNECT protocol): 405, never forwarded.
    let response = within(client.send(Request::connect("app.example:443").body(empty()).unwrap()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    // A Host that is no authority: 400, never forwarded.
    let response = within(
        client.send(
            Request::get("http://app.example/")
                .header("host", "a b")
                .body(empty())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(backend.hits(), 0);
    // The connection serves on.
    let (status, _) = within(client.get("http://app.example/")).await;
    assert_eq!(status, StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

/// A client whose upload breaks off fails its request at the HTTP/2 backend service too,
/// but passive health does not count it against the backend.
#[tokio::test]
async fn an_upload_failing_on_its_way_to_an_http2_backend_does_not_eject_it() {
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(
        &[backend.addr],
        "http2",
        r#""passive_health": {"consecutive_failures": 1, "ejection_time": 30}"#,
    ))
    .await;
    let upload = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n";
    for _ in 0..3 {
        support::exchange(proxy.local_addr(), upload, false, Duration::from_secs(2)).await;
    }
    let stats = proxy.backends().snapshot().endpoint(0).unwrap().stats();
    assert!(
        stats.errors > 0,
        "the uploads did not fail at the backend service"
    );
    let key: http::uri::Authority = backend.addr.to_string().parse().unwrap();
    assert_eq!(proxy.backends().is_ejected(&key), Some(false));
    assert_eq!(
        support::get(proxy.local_addr(), "/").await.0,
        StatusCode::OK
    );
    proxy.shutdown().await.unwrap();
}

/// A client that goes away once its request body has been read cancels the request on an
/// HTTP/2 backend too, whose connection reads that body in a task of its own: the stream
/// is reset, and the request counts as cancelled.
#[tokio::test]
async fn a_client_that_goes_away_after_its_body_cancels_the_backend_stream() {
    use tokio::io::AsyncWriteExt;
    let backend = H2Backend::start().await;
    let proxy = proxy(config_with_protocol(&[backend.addr], "http2", "")).await;
    let mut client = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    client
        .write_all(b"POST /slow/60000 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    // The backend has the whole body and waits.
    let mut sleeping = backend.sleeping.clone();
    within(sleeping.wait_for(|&n| n == 1)).await.unwrap();
    drop(client);
    within(sleeping.wait_for(|&n| n == 0)).await.unwrap();
    let stats = proxy.backends().snapshot().endpoint(0).unwrap().stats();
    assert_eq!((stats.cancelled, stats.requests(), stats.errors), (1, 0, 0));
    proxy.shutdown().await.unwrap();
}

//! Live reconfiguration of a running proxy: servers added and removed (draining), algorithm
//! and health settings switched, state kept by staying backends, and no request failed by a
//! reload. Plus the file watcher that feeds reloads.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use http::uri::Authority;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tower_lb::config::{self, Config};

fn key(b: &Backend) -> Authority {
    b.authority().parse().unwrap()
}

/// `config` for these backends, keeping the running proxy's listen address.
fn next(proxy: &tower_lb::standalone::Proxy, backends: &[&Backend], extra: &str) -> Config {
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut c = config(&addrs, extra);
    c.listen = proxy.config().listen;
    c
}

#[tokio::test]
async fn servers_are_added_and_removed_live_and_removed_ones_drain() {
    let (a, b, c) = (
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    );
    let mut proxy = proxy(config(&[a.addr, b.addr], "")).await;

    // A request held open on "a" or "b".
    let mut held = Client::connect(proxy.local_addr()).await;
    let res = held
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    let holder = if a.hits() == 1 { &a } else { &b };
    let other = if a.hits() == 1 { &b } else { &a };

    // Remove the holder, add "c".
    let diff = proxy.apply(next(&proxy, &[other, &c], "")).await;
    assert_eq!(diff.added.len(), 1);
    assert_eq!(diff.removed.len(), 1);
    assert!(
        proxy.backends().in_flight(&key(holder)).is_none(),
        "removed from the set"
    );
    wait_health(&proxy, &c, true).await;

    // New requests: only the remaining and the new backend.
    let mut client = Client::connect(proxy.local_addr()).await;
    let mut seen = HashSet::new();
    for _ in 0..6 {
        seen.insert(client.get("/").await.1);
    }
    assert_eq!(seen, HashSet::from([other.authority(), c.authority()]));

    // The held request on the removed backend completes.
    holder.release(1);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first;last");
    assert_eq!(holder.hits(), 1);
    proxy.shutdown().await.unwrap();
}

/// Thresholds of 3, so that a staying backend's counts of consecutive results show: "b"
/// has two failures when the configuration changes, and its third, after the change,
/// turns it unhealthy. Its probes are held until the test answers them, so each reload
/// happens between two known results. A request held open on "a" stays in flight.
#[tokio::test]
async fn staying_backends_keep_health_counters_and_requests() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    b.hold_probes(true);
    let mut cfg = config(
        &[a.addr, b.addr],
        r#""algorithm": "least_connections", "healthy_threshold": 3, "unhealthy_threshold": 3"#,
    );
    cfg.health.interval = Duration::from_millis(250);
    cfg.health.timeout = Duration::from_millis(200);
    let mut proxy = tower_lb::standalone::Proxy::start(cfg).await.unwrap();
    wait_health(&proxy, &a, true).await;

    // While "b" has not passed a probe yet, a request held open goes to "a".
    b.wait_probes(1).await;
    let mut held = Client::connect(proxy.local_addr()).await;
    let res = held
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    assert_eq!(proxy.backends().in_flight(&key(&a)), Some(1));

    // "b": healthy on its first pass, then two failures of three.
    b.answer_probe(1, true).await;
    b.answer_probe(2, false).await;
    b.answer_probe(3, false).await;
    assert_eq!(proxy.backends().is_healthy(&key(&b)), Some(true));

    // Algorithm, timeouts and health interval change; both servers stay.
    let json = r#""algorithm": "round_robin", "connect_timeout": 1, "response_timeout": 20,
        "healthy_threshold": 3, "unhealthy_threshold": 3"#;
    let mut changed = next(&proxy, &[&a, &b], json);
    changed.health.interval = Duration::from_millis(300);
    changed.health.timeout = Duration::from_millis(200);
    let diff = proxy.apply(changed).await;
    assert_eq!(diff.algorithm.map(|a| a.name()), Some("round_robin"));
    assert!(diff.timeouts && diff.health);
    assert_eq!(proxy.backends().in_flight(&key(&a)), Some(1));
    assert_eq!(proxy.backends().is_healthy(&key(&a)), Some(true));
    assert_eq!(proxy.backends().is_healthy(&key(&b)), Some(true));

    // The third failure in a row, counted across the change.
    b.answer_probe(4, false).await;
    assert_eq!(
        proxy.backends().is_healthy(&key(&b)),
        Some(false),
        "the failure counts were reset by the reload"
    );

    // An unhealthy backend stays unhealthy across a change.
    let json =
        r#""algorithm": "least_connections", "healthy_threshold": 3, "unhealthy_threshold": 3"#;
    let diff = proxy.apply(next(&proxy, &[&a, &b], json)).await;
    assert!(diff.timeouts && diff.health);
    assert_eq!(proxy.backends().is_healthy(&key(&b)), Some(false));
    assert_eq!(proxy.backends().in_flight(&key(&a)), Some(1));

    a.release(1);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first;last");
    assert_eq!(proxy.backends().in_flight(&key(&a)), Some(0));
    b.hold_probes(false);
    b.release_probes(1);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn algorithm_switch_takes_effect() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut proxy = proxy(config(&addrs, "")).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    let rr: HashSet<String> = [
        client.get("/").await.1,
        client.get("/").await.1,
        client.get("/").await.1,
    ]
    .into();
    assert_eq!(rr.len(), 3);

    proxy
        .apply(next(&proxy, &refs, r#""algorithm": "hashing""#))
        .await;
    let sticky: HashSet<String> = [
        client.get("/").await.1,
        client.get("/").await.1,
        client.get("/").await.1,
    ]
    .into();
    assert_eq!(sticky.len(), 1);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_settings_change_live() {
    let a = Backend::start().await;
    let mut proxy = proxy(config(&[a.addr], "")).await;
    assert_eq!(get(proxy.local_addr(), "/").await.0, StatusCode::OK);
    // Probing a path that 404s: the backend leaves rotation.
    proxy
        .apply(next(&proxy, &[&a], r#""health_check_url": "/missing""#))
        .await;
    wait_health(&proxy, &a, false).await;
    assert_eq!(
        get(proxy.local_addr(), "/").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    proxy
        .apply(next(&proxy, &[&a], r#""health_check_url": "/health""#))
        .await;
    wait_health(&proxy, &a, true).await;
    assert_eq!(get(proxy.local_addr(), "/").await.0, StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_listen_change_needs_a_restart_and_is_not_applied() {
    let a = Backend::start().await;
    let mut proxy = proxy(config(&[a.addr], "")).await;
    let mut c = next(&proxy, &[&a], "");
    c.listen = "127.0.0.1:1".parse().unwrap();
    let diff = proxy.apply(c).await;
    assert_eq!(diff.needs_restart, ["listen"]);
    assert_eq!(get(proxy.local_addr(), "/").await.0, StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

/// A backend that goes down when its server is removed and comes back on the same address
/// when it is added, as the standalone's demo backends do: `tower_lb::proxy::Server`,
/// stopped gracefully (the listener closes, idle keep-alive connections close, requests in
/// progress finish). `/hold/N` answers at once with `x-served-by` and the first part of its
/// body; the body ends once `released` reaches N. Anything else: its own address.
struct Restartable {
    addr: std::net::SocketAddr,
    released: tokio::sync::watch::Sender<usize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Restartable {
    async fn start(released: tokio::sync::watch::Sender<usize>) -> Restartable {
        let mut backend = Restartable {
            addr: "127.0.0.1:0".parse().unwrap(),
            released,
            stop: None,
            task: None,
        };
        backend.come_back();
        backend
    }

    /// Listens (again) on its address and serves.
    fn come_back(&mut self) {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let listener = tower_lb::proxy::bind(self.addr).unwrap();
        self.addr = listener.local_addr().unwrap();
        let (addr, released) = (self.addr, self.released.clone());
        let service = tower::service_fn(move |req: Request<tower_lb::proxy::RequestBody>| {
            let path = req.uri().path().to_owned();
            let mut released = released.subscribe();
            async move {
                type Frames = futures::stream::BoxStream<
                    'static,
                    Result<Frame<bytes::Bytes>, std::convert::Infallible>,
                >;
                let Some(round) = path.strip_prefix("/hold/") else {
                    let body: Frames = futures::stream::once(async move {
                        Ok(Frame::data(bytes::Bytes::from(addr.to_string())))
                    })
                    .boxed();
                    return Ok::<_, std::convert::Infallible>(http::Response::new(
                        StreamBody::new(body),
                    ));
                };
                let round: usize = round.parse().unwrap();
                let first = futures::stream::once(async { Ok(Frame::data("first;".into())) });
                let last = futures::stream::once(async move {
                    let _ = released.wait_for(|r| *r >= round).await;
                    Ok(Frame::data("last".into()))
                });
                let body: Frames = first.chain(last).boxed();
                let mut response = http::Response::new(StreamBody::new(body));
                let served_by = addr.to_string().parse().unwrap();
                response.headers_mut().insert("x-served-by", served_by);
                Ok(response)
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(async move {
            tower_lb::proxy::Server::new()
                .serve(listener, service, async {
                    let _ = stopped.await;
                })
                .await
        }));
    }

    /// Stops listening and closes idle connections now; the future returned ends when
    /// every connection has ended (requests in progress first finish).
    fn go_down(&mut self) -> impl std::future::Future<Output = ()> + 'static {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        async move { within(task).await.unwrap().unwrap() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_fail_no_request() {
    // Under load, each round puts a request in flight on a backend, takes that backend
    // down as a demo backend goes down (closing the idle keep-alive connections that
    // requests which picked it may be using) as it is removed from the set, lets the held
    // request finish, and brings the backend back. No request may fail, and the one in
    // flight on the removed backend must end complete. (Before requests were given back to
    // the balancer, 1 or 2 of them got 502 in each of 6 runs.)
    let released = tokio::sync::watch::Sender::new(0usize);
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(Restartable::start(released.clone()).await);
    }
    let config_of =
        |proxy: &tower_lb::standalone::Proxy, up: &[std::net::SocketAddr], extra: &str| {
            let mut c = config(up, extra);
            c.listen = proxy.local_addr();
            c
        };
    let all: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut proxy = proxy(config(&all, "")).await;
    let target = proxy.local_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = tokio::sync::watch::Sender::new(0usize);
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (stop, answered) = (stop.clone(), answered.clone());
            tokio::spawn(async move {
                let mut client = Client::connect(target).await;
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    statuses.push(client.get("/").await.0);
                    answered.send_modify(|n| *n += 1);
                }
                statuses
            })
        })
        .collect();

    let algorithms = ["least_connections", "hashing", "round_robin"];
    let mut clients = 2u8..;
    for round in 1..=9 {
        let victim = all[round % 3];
        // Held requests (from distinct client IPs, for hashing) until one is on the victim.
        let mut held = Vec::new();
        let on_victim = within(async {
            loop {
                let from = format!("127.0.0.{}", clients.next().unwrap());
                let mut client = Client::connect_from(target, from.parse().unwrap()).await;
                let req = Request::get(format!("/hold/{round}"))
                    .body(empty())
                    .unwrap();
                let res = client.send(req).await;
                assert_eq!(res.status(), StatusCode::OK);
                let by = res.headers()["x-served-by"].to_str().unwrap().to_owned();
                held.push(res);
                if by == victim.to_string() {
                    return;
                }
            }
        });
        on_victim.await;
        let victim_key: Authority = victim.to_string().parse().unwrap();
        assert!(proxy.backends().in_flight(&victim_key) >= Some(1));

        // The victim goes down as it is removed: it stops listening and closes its idle
        // connections (the held request's once that has finished) just before the removal
        // is applied, while 16 of the load's requests go by, some of them picking it and
        // the pooled connections it is closing.
        let going_down = backends[round % 3].go_down();
        let seen = *answered.borrow();
        within(answered.subscribe().wait_for(|n| *n >= seen + 16))
            .await
            .unwrap();
        let up: Vec<_> = all.iter().copied().filter(|a| *a != victim).collect();
        let extra = format!(r#""algorithm": "{}""#, algorithms[round % 3]);
        let diff = proxy.apply(config_of(&proxy, &up, &extra)).await;
        assert_eq!(diff.removed.len(), 1);
        released.send_replace(round);
        for res in held {
            let body = within(res.into_body().collect()).await.unwrap().to_bytes();
            assert_eq!(&body[..], b"first;last", "a held request ended early");
        }
        going_down.await;

        backends[round % 3].come_back();
        proxy.apply(config_of(&proxy, &all, "")).await;
        within(
            proxy
                .backends()
                .wait_until(|s| s.iter().filter(|(_, e)| e.is_healthy()).count() == 3),
        )
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        let statuses = within(t).await.unwrap();
        total += statuses.len();
        let failed: Vec<_> = statuses.iter().filter(|s| **s != StatusCode::OK).collect();
        assert!(
            failed.is_empty(),
            "requests failed during reloads: {failed:?}"
        );
    }
    assert!(total > 100, "only {total} requests");
    proxy.shutdown().await.unwrap();
}

/// A backend that goes down when the test says: it answers the first request on each
/// connection (keep-alive), holds the second one unanswered and reports it, and on
/// `go_down` stops listening, then closes every connection without answering.
struct Doomed {
    addr: std::net::SocketAddr,
    /// A second request on a connection (a pooled one) has arrived.
    arrived: Option<tokio::sync::oneshot::Receiver<()>>,
    down: Option<tokio::sync::oneshot::Sender<()>>,
    closed: tokio::sync::watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Doomed {
    async fn start() -> Doomed {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
        let arrived_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(arrived_tx)));
        let (down, mut down_rx) = tokio::sync::oneshot::channel::<()>();
        let closed = tokio::sync::watch::Sender::new(false);
        let watch = closed.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let mut stream = tokio::select! {
                    biased;
                    _ = &mut down_rx => return, // the listener closes here
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (arrived_tx, mut closed) = (arrived_tx.clone(), watch.subscribe());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 1.. {
                        // One request head (GETs without bodies).
                        let head = loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break buf.drain(..end + 4).collect::<Vec<u8>>();
                            }
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        };
                        if head.starts_with(b"GET /health ") {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                            let _ = stream.write_all(ok).await;
                            return;
                        }
                        if n == 1 {
                            let body = addr.to_string();
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if let Some(tx) = arrived_tx.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        // Unanswered until the backend goes down; then the connection closes.
                        let _ = closed.wait_for(|c| *c).await;
                        return;
                    }
                });
            }
        });
        Doomed {
            addr,
            arrived: Some(arrived),
            down: Some(down),
            closed,
            accepting,
        }
    }

    /// Waits until a request has arrived on a connection that answered one before.
    async fn pooled_request_arrived(&mut self) {
        within(self.arrived.take().unwrap()).await.unwrap();
    }

    /// Stops listening (new connections are refused from when this returns), then closes
    /// every connection, answering nothing more.
    async fn go_down(&mut self) {
        let _ = self.down.take().unwrap().send(());
        within(&mut self.accepting).await.unwrap();
        self.closed.send_replace(true);
    }
}

#[tokio::test]
async fn a_backend_that_goes_down_as_it_is_removed_fails_no_request() {
    // The race of a removed backend that stops at once, as demo backends did: a request
    // that picked it before the removal is on a pooled connection when the backend closes
    // it and stops listening. The request never reached the application, so it must go to
    // another backend, not be answered 502 after a refused reconnect to the same one.
    let mut doomed = Doomed::start().await;
    let other = Backend::start().await;
    let mut proxy = proxy(config(&[doomed.addr, other.addr], "")).await;

    // Round robin alternates: of four requests in a row on one client connection, two
    // reach `doomed`, the second of them on its pooled connection, where it is held.
    let target = proxy.local_addr();
    let requests = tokio::spawn(async move {
        let mut client = Client::connect(target).await;
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(client.get("/").await);
        }
        answers
    });
    doomed.pooled_request_arrived().await;

    // Removed, then down, while that request is in flight on it.
    let doomed_key: Authority = doomed.addr.to_string().parse().unwrap();
    assert_eq!(proxy.backends().in_flight(&doomed_key), Some(1));
    let mut without = config(&[other.addr], "");
    without.listen = target;
    assert_eq!(proxy.apply(without).await.removed.len(), 1);
    doomed.go_down().await;

    let answers = within(requests).await.unwrap();
    let statuses: Vec<StatusCode> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [StatusCode::OK; 4], "{answers:?}");
    let served_by_other = answers
        .iter()
        .filter(|(_, b)| *b == other.authority())
        .count();
    assert_eq!(
        served_by_other, 3,
        "the held request went to the other backend"
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_connection_reset_before_any_answer_sends_an_idempotent_request_elsewhere() {
    // A backend going down resets the connections it had queued but not yet accepted, so
    // a fresh connection can fail before any byte of an answer too: a GET goes to another
    // backend; a POST, which the backend may have acted on, is answered 502.
    let reset = reset_backend().await;
    let good = Backend::start().await;
    let proxy = proxy(config(&[reset.addr, good.addr], "")).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..4 {
        assert_eq!(client.get("/").await, (StatusCode::OK, good.authority()));
    }
    assert!(reset.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let res = client.send(Request::post("/").body(empty()).unwrap()).await;
        statuses.push(res.status());
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_GATEWAY]);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_watcher_sees_edits_and_reports_invalid_ones() {
    let dir = tempdir();
    let path = dir.join("config.json");
    let valid = |port: u16| format!(r#"{{"servers": [{{"host": "127.0.0.1", "port": {port}}}]}}"#);
    std::fs::write(&path, valid(9001)).unwrap();
    let mut edits = config::watch(&path, Duration::from_millis(200));
    let first = within(edits.next()).await.unwrap().unwrap();
    assert_eq!(first.servers[0].port(), 9001);

    // An edit in place.
    std::fs::write(&path, valid(9002)).unwrap();
    let edited = within(edits.next()).await.unwrap().unwrap();
    assert_eq!(edited.servers[0].port(), 9002);

    // A half-written file is reported, never applied; the completed one follows.
    std::fs::write(&path, r#"{"servers": [{"host": "127.0."#).unwrap();
    let broken = within(edits.next()).await.unwrap().unwrap_err();
    assert!(
        broken.to_string().contains("config.json: invalid JSON"),
        "{broken}"
    );
    std::fs::write(&path, r#"{"servers": [{"host": "127.0.0.1", "port": 0}]}"#).unwrap();
    let invalid = within(edits.next()).await.unwrap().unwrap_err();
    assert!(
        invalid
            .to_string()
            .ends_with("servers[0].port: 0 is not a port (1-65535)"),
        "{invalid}"
    );

    // Replaced by rename, as editors do.
    let tmp = dir.join("config.json.tmp");
    std::fs::write(&tmp, valid(9003)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let renamed = within(edits.next()).await.unwrap().unwrap();
    assert_eq!(renamed.servers[0].port(), 9003);
    drop(edits);
    std::fs::remove_dir_all(&dir).unwrap();
}

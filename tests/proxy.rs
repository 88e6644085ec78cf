//! The HTTP proxy over real loopback sockets: every line of the contract's HTTP behaviour.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;
use tower_lb::config::Config;

#[tokio::test]
async fn round_robin_per_request_on_one_keep_alive_connection() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = proxy(config(&addrs, "")).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (status, body) = client.get("/").await;
        assert_eq!(status, StatusCode::OK);
        seen.push(body);
    }
    let names: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let expected: Vec<String> = names.iter().chain(&names).cloned().collect();
    assert_eq!(seen, expected);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn weights_split_traffic() {
    let backends = [Backend::start().await, Backend::start().await];
    let json = format!(
        r#"{{"listen": "127.0.0.1:0", "spawn_backends": false, "health_check_interval": 0.2, "health_check_timeout": 0.1,
            "servers": [{{"host": "127.0.0.1", "port": {}, "weight": 3}}, {{"host": "127.0.0.1", "port": {}}}]}}"#,
        backends[0].addr.port(),
        backends[1].addr.port()
    );
    let proxy = proxy(Config::from_json(&json).unwrap()).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..40 {
        client.get("/").await;
    }
    assert_eq!((backends[0].hits(), backends[1].hits()), (30, 10));
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn least_connections_counts_until_the_response_body_ends() {
    let backends = [Backend::start().await, Backend::start().await];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = proxy(config(&addrs, r#""algorithm": "least_connections""#)).await;

    // A download whose headers arrived but whose body is still streaming.
    let mut slow = Client::connect(proxy.local_addr()).await;
    let res = slow
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first;");
    let busy = if backends[0].hits() == 1 { 0 } else { 1 };

    // Every other request goes to the other backend while that body is open.
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..5 {
        let (_, who) = client.get("/").await;
        assert_eq!(who, addrs[1 - busy].to_string());
    }
    let key: http::uri::Authority = addrs[busy].to_string().parse().unwrap();
    assert_eq!(proxy.backends().in_flight(&key), Some(1));

    // The body ends: the count drops, and the backends take turns again.
    backends[busy].release(1);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"last");
    nothing_in_flight(&proxy).await;
    let mut seen = HashSet::new();
    for _ in 0..2 {
        seen.insert(client.get("/").await.1);
    }
    assert_eq!(seen.len(), 2);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn hashing_by_client_ip_is_sticky_and_consistent() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut proxy = proxy(config(&addrs, r#""algorithm": "hashing""#)).await;

    let clients: Vec<IpAddr> = (2..=17)
        .map(|i| format!("127.0.0.{i}").parse().unwrap())
        .collect();
    let mut owner = HashMap::new();
    for ip in &clients {
        // Several connections (different source ports) from one IP: same backend.
        for _ in 0..3 {
            let (_, who) = Client::connect_from(proxy.local_addr(), *ip)
                .await
                .get("/")
                .await;
            assert_eq!(*owner.entry(*ip).or_insert(who.clone()), who, "{ip} moved");
        }
    }
    // A client cannot choose its backend with X-Forwarded-For (not trusted by default).
    let mut c = Client::connect_from(proxy.local_addr(), clients[0]).await;
    for fake in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"] {
        let res = c
            .send(
                Request::get("/")
                    .header("x-forwarded-for", fake)
                    .body(empty())
                    .unwrap(),
            )
            .await;
        let who = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec())
            .unwrap();
        assert_eq!(who, owner[&clients[0]]);
    }
    assert!(
        owner.values().collect::<HashSet<_>>().len() >= 2,
        "16 clients all on one backend"
    );

    // One backend leaves: only its clients move.
    let gone = owner[&clients[0]].clone();
    let rest: Vec<_> = addrs
        .iter()
        .filter(|a| a.to_string() != gone)
        .copied()
        .collect();
    let next = config(&rest, r#""algorithm": "hashing""#);
    let mut next = next;
    next.listen = proxy.config().listen;
    proxy.apply(next).await;
    for ip in &clients {
        let (_, who) = Client::connect_from(proxy.local_addr(), *ip)
            .await
            .get("/")
            .await;
        if owner[ip] == gone {
            assert_ne!(who, gone);
        } else {
            assert_eq!(who, owner[ip], "{ip} moved although its backend stayed");
        }
    }
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn unhealthy_backends_leave_rotation_and_come_back() {
    let backends = [Backend::start().await, Backend::start().await];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = proxy(config(&addrs, "")).await;
    backends[0].set_healthy(false);
    wait_health(&proxy, &backends[0], false).await;
    let before = backends[0].hits();
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..6 {
        assert_eq!(client.get("/").await.1, addrs[1].to_string());
    }
    assert_eq!(backends[0].hits(), before);

    backends[0].set_healthy(true);
    wait_health(&proxy, &backends[0], true).await;
    let seen: HashSet<String> = [client.get("/").await.1, client.get("/").await.1].into();
    assert_eq!(seen.len(), 2);
    proxy.shutdown().await.unwrap();
}

/// Every timeout and interval is 10 s or more, so a 503 that waited for any of them (a
/// connect, a response, the next health check) would take that long. Idleness, which needs
/// a process of its own to measure, is `tests/standalone.rs`'s
/// `idle_with_no_healthy_backend_and_with_every_backend_down`.
#[tokio::test]
async fn no_healthy_backend_is_503_at_once() {
    let backends = [Backend::start().await, Backend::start().await];
    for b in &backends {
        b.set_healthy(false);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut cfg = config(&addrs, "");
    cfg.health.interval = Duration::from_secs(30);
    cfg.health.timeout = Duration::from_secs(10);
    cfg.connect_timeout = Duration::from_secs(10);
    cfg.response_timeout = Duration::from_secs(10);
    let proxy = tower_lb::standalone::Proxy::start(cfg).await.unwrap();
    // Each backend has had its first probe, answered 503; the next is 15 s or more away.
    for b in &backends {
        b.wait_probes(1).await;
    }
    let mut client = Client::connect(proxy.local_addr()).await;
    for i in 0..4 {
        let started = std::time::Instant::now();
        let (status, body) = if i % 2 == 0 {
            within(client.get("/")).await
        } else {
            within(get(proxy.local_addr(), "/")).await
        };
        let took = started.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("no healthy backend"), "{body}");
        assert!(
            took < Duration::from_secs(1),
            "request {i}: 503 after {took:?}"
        );
    }
    assert_eq!(backends.iter().map(Backend::hits).sum::<usize>(), 0);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_backend() {
    let up = Backend::start().await;
    let doomed = Backend::start().await;
    let addrs = [doomed.addr, up.addr];
    // Long health interval: the proxy does not know the backend died.
    let mut cfg = config(&addrs, "");
    cfg.health.interval = Duration::from_secs(60);
    cfg.health.timeout = Duration::from_secs(1);
    let proxy = proxy(cfg).await;
    doomed.kill();
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..6 {
        let (status, body) = client.get("/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, up.addr.to_string());
    }
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_dead_only_backend_is_502() {
    let doomed = Backend::start().await;
    let mut cfg = config(&[doomed.addr], "");
    cfg.health.interval = Duration::from_secs(60);
    cfg.health.timeout = Duration::from_secs(1);
    let proxy = proxy(cfg).await;
    doomed.kill();
    let (status, body) = get(proxy.local_addr(), "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("cannot connect"), "{body}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_reset_is_502() {
    let reset = reset_backend().await;
    let proxy = proxy(config(&[reset.addr], "")).await;
    let (status, body) = get(proxy.local_addr(), "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("closed or reset"), "{body}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_malformed_response_is_502_saying_so() {
    let bad = raw_backend(b"HTTP/1.1 2x0 Nearly\r\ncontent-length: 0\r\n\r\n").await;
    let proxy = proxy(config(&[bad.addr], "")).await;
    let (status, body) = get(proxy.local_addr(), "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("response is malformed"), "{body}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn stale_pooled_connections_are_not_a_client_error() {
    // Every pooled connection to this backend is closed by it as the next request arrives:
    // the request was never answered, so the proxy sends it again on a fresh connection.
    let backend = one_shot_backend().await;
    let mut cfg = config(&[backend.addr], "");
    cfg.health.interval = Duration::from_secs(60);
    cfg.health.timeout = Duration::from_secs(1);
    let proxy = proxy(cfg).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    for i in 0..20 {
        let (status, body) = client.get("/").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    // One connection per request (the first, then one fresh one per resent request), and
    // the health probe's.
    assert_eq!(
        backend.accepted.load(std::sync::atomic::Ordering::SeqCst),
        20 + 1
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_slow_backend_is_504() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], r#""response_timeout": 0.3"#)).await;
    let (status, body) = within(get(proxy.local_addr(), "/stall")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(body.contains("did not answer in time"), "{body}");
    // The proxy still serves.
    assert_eq!(get(proxy.local_addr(), "/").await.0, StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

/// The response timer travels with the pooled connection and is moved forward for each
/// request: a request on a reused connection gets its whole timeout, also when it ends
/// after an earlier request's deadline, and after the connection sat idle past one.
#[tokio::test]
async fn each_request_on_a_reused_connection_gets_the_whole_response_timeout() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], r#""response_timeout": 1"#)).await;
    let addr = proxy.local_addr();
    let t0 = tokio::time::Instant::now();
    assert_eq!(get(addr, "/").await.0, StatusCode::OK);
    // The elapsed time is what is tested here: this request ends after the first one's
    // deadline, within its own.
    tokio::time::sleep_until(t0 + Duration::from_millis(600)).await;
    assert_eq!(get(addr, "/slow/700").await.0, StatusCode::OK);
    // Idle in the pool past the last deadline, then used again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(addr, "/slow/100").await.0, StatusCode::OK);
    assert_eq!(get(addr, "/stall").await.0, StatusCode::GATEWAY_TIMEOUT);
    // All on one backend connection, so one timer served them all.
    let peers = b.peers();
    assert_eq!(peers.len(), 4);
    assert!(peers.iter().all(|p| *p == peers[0]), "{peers:?}");
    proxy.shutdown().await.unwrap();
}

/// The response timeout counts from the end of the request: an upload slower than the
/// timeout, read by its backend as it comes, is answered, not cut with a 504.
#[tokio::test]
async fn a_slow_upload_is_not_cut_by_the_response_timeout() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], r#""response_timeout": 0.4"#)).await;
    let answer = slow_upload(proxy.local_addr(), "/collect").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n6000"), "{answer}");
    // A backend that does not answer once the request is in still times out.
    assert_eq!(
        get(proxy.local_addr(), "/stall").await.0,
        StatusCode::GATEWAY_TIMEOUT
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways_and_forwarded_for_appended() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let mut client = Client::connect_from(proxy.local_addr(), "127.0.0.7".parse().unwrap()).await;
    let req = Request::get("/hop")
        .header("connection", "keep-alive, x-client-secret")
        .header("x-client-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("upgrade", "websocket")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-kept", "1")
        .body(empty())
        .unwrap();
    let res = client.send(req).await;
    for h in ["x-backend-secret", "keep-alive"] {
        assert!(!res.headers().contains_key(h), "response kept {h}");
    }
    assert_eq!(res.headers()["x-kept"], "1");
    let seen = b.seen().pop().unwrap();
    for h in [
        "connection",
        "x-client-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(!seen.contains_key(h), "request kept {h}");
    }
    assert_eq!(seen["x-kept"], "1");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.7");
    assert_eq!(seen["host"], proxy.local_addr().to_string());
    // Origin form, as a server expects from a reverse proxy.
    assert_eq!(b.paths(), ["/hop"]);
    proxy.shutdown().await.unwrap();
}

/// The codec keeps the parts of each message it is done with for the next one: nothing of
/// one request or response may reach the next, on the same connection or another.
#[tokio::test]
async fn no_field_of_one_message_reaches_the_next() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    for (i, from) in ["127.0.0.7", "127.0.0.8"].into_iter().enumerate() {
        let mut client = Client::connect_from(proxy.local_addr(), from.parse().unwrap()).await;
        let req = Request::get("/hop")
            .header("x-first", "1")
            .body(empty())
            .unwrap();
        let res = client.send(req).await;
        assert_eq!(res.headers()["x-kept"], "1");
        let res = client.send(Request::get("/").body(empty()).unwrap()).await;
        assert!(
            !res.headers().contains_key("x-kept"),
            "response {i} kept x-kept"
        );
        let seen = b.seen();
        let (first, second) = (&seen[2 * i], &seen[2 * i + 1]);
        assert_eq!(first["x-first"], "1");
        assert!(!second.contains_key("x-first"), "request {i} kept x-first");
        assert_eq!(first["x-forwarded-for"], from);
        assert_eq!(second["x-forwarded-for"], from);
    }
    assert_eq!(b.paths(), ["/hop", "/", "/hop", "/"]);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn eight_mib_stream_each_way_without_buffering() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    const SIZE: usize = 8 << 20;
    const CHUNK: usize = 64 << 10;

    // Upload through /echo: the backend starts answering before the client has sent it all,
    // which a proxy that buffered the request body could not do.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut client = Client::connect(proxy.local_addr()).await;
    let sending = tokio::spawn(async move {
        let res = client
            .send(
                Request::post("/echo")
                    .body(StreamBody::new(stream).boxed())
                    .unwrap(),
            )
            .await;
        let mut body = res.into_body();
        let mut received = 0usize;
        let mut sum = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                received += data.len();
                sum += data.iter().map(|&b| u64::from(b)).sum::<u64>();
            }
        }
        (received, sum)
    });
    tx.send(Ok(Frame::data(Bytes::from(vec![1u8; CHUNK]))))
        .await
        .unwrap();
    within(b.started()).await;
    let mut expected_sum = CHUNK as u64;
    for i in 1..SIZE / CHUNK {
        let byte = (i % 251) as u8;
        expected_sum += u64::from(byte) * CHUNK as u64;
        tx.send(Ok(Frame::data(Bytes::from(vec![byte; CHUNK]))))
            .await
            .unwrap();
    }
    drop(tx);
    let (received, sum) = within(sending).await.unwrap();
    assert_eq!(received, SIZE);
    assert_eq!(sum, expected_sum);

    // Download: 8 MiB arrive intact.
    let mut client = Client::connect(proxy.local_addr()).await;
    let res = client
        .send(
            Request::get(format!("/download/{SIZE}"))
                .body(empty())
                .unwrap(),
        )
        .await;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), SIZE);
    // Every byte in its place (the server gathers small pieces and writes large ones
    // without a copy: an error in either order shows here).
    let misplaced = body
        .iter()
        .enumerate()
        .position(|(i, &b)| b != (i / 65536) as u8);
    assert_eq!(misplaced, None);

    // And a held body streams: its first part arrives before the backend finishes it.
    let res = client
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    let mut body = res.into_body();
    let first = within(body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"first;");
    b.release(1);
    assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"last");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn bodiless_responses_and_length_framed_uploads() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let mut client = Client::connect(proxy.local_addr()).await;

    // HEAD: the length of what GET would send, and no body; the connection stays usable.
    let res = client.send(Request::head("/").body(empty()).unwrap()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-length"],
        b.addr.to_string().len().to_string()
    );
    assert!(res
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());

    // 204: no body.
    let (status, body) = client.get("/empty").await;
    assert_eq!((status, body.as_str()), (StatusCode::NO_CONTENT, ""));

    // An upload framed by Content-Length, echoed back.
    let payload = vec![b'x'; 300_000];
    let req = Request::post("/echo")
        .header("content-length", payload.len())
        .body(
            http_body_util::Full::new(Bytes::from(payload.clone()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let res = client.send(req).await;
    assert_eq!(res.status(), StatusCode::OK);
    let echoed = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), payload.len());
    let seen = b.seen().pop().unwrap();
    assert_eq!(seen["content-length"], "300000");
    assert!(!seen.contains_key("transfer-encoding"));

    // Still one healthy keep-alive connection to the client.
    assert_eq!(client.get("/").await.0, StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn odd_and_broken_backend_responses() {
    let cases: [(&'static [u8], StatusCode, &str); 4] = [
        // Framed by the connection's end.
        (b"HTTP/1.1 200 OK\r\n\r\nuntil close", StatusCode::OK, "until close"),
        // Transfer-Encoding wins over Content-Length, which is not passed on.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            StatusCode::OK,
            "hello",
        ),
        // Not HTTP.
        (b"SSH-2.0-OpenSSH_9.2\r\n", StatusCode::BAD_GATEWAY, "502 Bad Gateway"),
        // Two different lengths.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            StatusCode::BAD_GATEWAY,
            "502 Bad Gateway",
        ),
    ];
    for (answer, status, body) in cases {
        let backend = raw_backend(answer).await;
        let proxy = proxy(config(&[backend.addr], "")).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        let res = client.send(Request::get("/").body(empty()).unwrap()).await;
        assert_eq!(res.status(), status, "{}", String::from_utf8_lossy(answer));
        // A length the body does not have never reaches the client.
        assert_ne!(
            res.headers().get("content-length").map(|v| v.as_bytes()),
            Some(&b"99"[..])
        );
        let got = res.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&got).starts_with(body), "{got:?}");
        // The proxy keeps serving this client.
        let res = client.send(Request::get("/").body(empty()).unwrap()).await;
        assert_eq!(res.status(), status);
        proxy.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_clients() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    // Health checks at their defaults (every 10 s, 2 s timeout) rather than the helper's
    // 0.1 s timeout: 100 clients on a loaded 2-CPU machine delayed probes past 0.1 s, so
    // every backend turned unhealthy and about one run in six got 503s.
    let mut cfg = config(&addrs, r#""algorithm": "least_connections""#);
    cfg.health.interval = Duration::from_secs(10);
    cfg.health.timeout = Duration::from_secs(2);
    let proxy = proxy(cfg).await;
    let target = proxy.local_addr();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(target).await;
                let mut ok = 0;
                for _ in 0..20 {
                    if client.get("/").await.0 == StatusCode::OK {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += within(t).await.unwrap();
    }
    assert_eq!(ok, 2000);
    let hits: Vec<usize> = backends.iter().map(|b| b.hits()).collect();
    assert_eq!(hits.iter().sum::<usize>(), 2000);
    assert!(hits.iter().all(|&h| h > 300), "{hits:?}");
    nothing_in_flight(&proxy).await;
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_malformed_request_is_400_and_the_proxy_keeps_serving() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let answer = raw(proxy.local_addr(), b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw(
        proxy.local_addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(get(proxy.local_addr(), "/").await.0, StatusCode::OK);
    assert_eq!(b.hits(), 1);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn ambiguous_framing_is_400_and_closed_and_never_forwarded() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let cases: [&[u8]; 3] = [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ];
    for case in cases {
        let ex = exchange(proxy.local_addr(), case, false, Duration::from_secs(5)).await;
        let answer = ex.text();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        // One answer, then the proxy ends the connection (not the 5 s wait).
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
        assert!(ex.closed(), "the connection stayed open after {answer:?}");
    }
    assert_eq!(b.hits(), 0, "the backend saw an ambiguous request");
    // Equal values are not ambiguous: one field, and one field goes on.
    let answer = raw(
        proxy.local_addr(),
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = b.seen();
    let lengths: Vec<_> = seen[0].get_all("content-length").iter().collect();
    assert_eq!(lengths, ["3"]);
    proxy.shutdown().await.unwrap();
}

/// The proxy answers a request before reading its body (here: no healthy backend, so `503`
/// at once): the answer says the connection closes, and the client, still sending, reads
/// it and then an orderly end, not a reset that could have taken the answer with it.
#[tokio::test]
async fn an_answer_before_the_body_says_close_and_the_connection_ends_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    b.set_healthy(false);
    wait_health(&proxy, &b, false).await;
    let mut client = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    client.write_all(&[b'a'; 1000]).await.unwrap();
    // The answer's head and body (its length is in the head).
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("no healthy backend\n") {
        let n = within(client.read(&mut buf)).await.unwrap();
        assert!(
            n > 0,
            "closed before the answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    // More of the body after the answer, then the client is done: the proxy drained it
    // and ends the connection in order.
    for _ in 0..10 {
        let sent = client.write_all(&[b'a'; 1000]).await;
        assert!(sent.is_ok(), "the proxy reset the connection: {sent:?}");
        tokio::task::yield_now().await;
    }
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let end = within(client.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "{end:?}");
    assert!(rest.is_empty(), "{rest:?}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let answer = raw(proxy.local_addr(), big.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(100)]
    );
    assert_eq!(b.hits(), 0);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_refuses_new_connections_and_finishes_requests_in_flight() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let addr = proxy.local_addr();
    let mut client = Client::connect(addr).await;
    let res = client
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    let stopping = tokio::spawn(proxy.shutdown());
    // The listener closes: new connections are refused.
    within(async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!stopping.is_finished());
    // The request in flight completes.
    b.release(1);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first;last");
    within(stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_too_slow_with_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = tower::service_fn(|_req: Request<tower_lb::proxy::RequestBody>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
            Bytes::from_static(b"ok"),
        )))
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        tower_lb::proxy::Server::new()
            .header_read_timeout(Duration::from_millis(200))
            .serve(listener, service, async {
                let _ = stopped.await;
            })
            .await
    });
    // Half a request head, then nothing: the server closes the connection (hyper's default
    // would wait 30 s, past the 10 s guard).
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    within(slow.read_to_end(&mut rest)).await.unwrap();
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "{rest:?}"
    );
    // A client that sends its head in time is served.
    let answer = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let _ = stop.send(());
    within(server).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_backend_that_does_not_accept_fails_by_connect_timeout() {
    use tower_lb::policy::RoundRobin;
    use tower_lb::proxy::{self, Client as LbClient, ClientIpKey};
    // A listener that never accepts, its queue full: further connects get no answer.
    let (deaf, queued) = deaf_listener("127.0.0.1:0".parse().unwrap()).await;
    let deaf_addr = deaf.local_addr().unwrap();

    let timeout = Duration::from_millis(300);
    let client = LbClient::new().connect_timeout(timeout);
    let set = proxy::backends(
        RoundRobin::new(),
        &client,
        [deaf_addr.to_string().parse().unwrap()],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(proxy::serve(
        listener,
        proxy::balancer(set, ClientIpKey::new()),
        async {
            let _ = stopped.await;
        },
    ));
    let started = tokio::time::Instant::now();
    let (status, body) = within(get(addr, "/")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("cannot connect"), "{body}");
    // The configured bound, not the 2 s default, ended the attempt.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let _ = stop.send(());
    within(server).await.unwrap().unwrap();
    drop((deaf, queued));
}

/// 300 clients connecting at once, before the server accepts any: all are queued. With
/// the backlog of 128 that `TcpListener::bind` asks for, the kernel drops the SYNs past
/// it and those clients try again only after a second.
#[tokio::test]
async fn a_burst_of_connections_is_queued_not_dropped() {
    let listener = tower_lb::proxy::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let connects = (0..300).map(|_| tokio::net::TcpStream::connect(addr));
    let streams = tokio::time::timeout(
        Duration::from_millis(900),
        futures::future::join_all(connects),
    )
    .await
    .expect("every connection is established before a SYN retry");
    assert!(streams.iter().all(Result::is_ok));
    drop(listener);
}

/// The demo backends listen the same way: 300 connections queue while the backend's
/// runtime is busy (this test holds the only thread, so nothing is accepted meanwhile).
/// With a backlog of 128, connection 129 finds the queue full and times out.
#[tokio::test]
async fn a_demo_backend_queues_a_burst_of_connections() {
    let demo = tower_lb::standalone::DemoBackend::spawn(
        "127.0.0.1:0".parse().unwrap(),
        "/health".parse().unwrap(),
    )
    .await
    .unwrap();
    let addr = demo.local_addr();
    let streams: Vec<_> = (0..300)
        .map(|i| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    assert_eq!(streams.len(), 300);
    drop(streams);
    demo.stop().await;
}

#[tokio::test]
async fn a_backend_response_head_over_the_limits_is_502() {
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let big = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    for extra in [many, big] {
        let answer = format!("HTTP/1.1 200 OK\r\n{extra}content-length: 2\r\n\r\nok");
        let b = raw_backend_with(move |_| answer.clone().into_bytes()).await;
        let proxy = proxy(config(&[b.addr], "")).await;
        let (status, body) = get(proxy.local_addr(), "/").await;
        assert_eq!(
            status,
            StatusCode::BAD_GATEWAY,
            "{}",
            &body[..body.len().min(100)]
        );
        proxy.shutdown().await.unwrap();
    }
}

/// `connect_timeout` in config.json bounds a connect that gets no answer: a backend that
/// passed its first probe, then stopped accepting (its accept queue full).
#[tokio::test]
async fn connect_timeout_from_config_json_bounds_a_connect() {
    let b = Backend::start().await;
    let port = b.addr.port();
    let json = format!(
        r#"{{"listen": "127.0.0.1:0", "servers": [{{"host": "127.0.0.1", "port": {port}}}],
            "spawn_backends": false, "health_check_interval": 30, "health_check_timeout": 10,
            "connect_timeout": 0.3, "response_timeout": 10}}"#
    );
    let proxy = proxy(Config::from_json(&json).unwrap()).await;
    b.kill();
    let deaf = deaf_listener(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let started = std::time::Instant::now();
    let (status, body) = within(get(proxy.local_addr(), "/")).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("cannot connect"), "{body}");
    // Ended by the configured 0.3 s, not by a refusal and not by the 2 s default.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    proxy.shutdown().await.unwrap();
    drop(deaf);
}

/// `healthy_threshold` and `unhealthy_threshold` in config.json: the state flips on the
/// configured number of consecutive results, not one sooner. Every probe is held until the
/// test answers it; the arrival of the next probe shows that the previous result was taken
/// in (one probe in flight at a time).
#[tokio::test]
async fn health_thresholds_from_config_json_count_consecutive_probes() {
    let b = Backend::start().await;
    b.hold_probes(true);
    let json = format!(
        r#"{{"listen": "127.0.0.1:0", "servers": [{{"host": "127.0.0.1", "port": {}}}],
            "spawn_backends": false, "health_check_interval": 0.2, "health_check_timeout": 0.15,
            "healthy_threshold": 3, "unhealthy_threshold": 2}}"#,
        b.addr.port()
    );
    let proxy = tower_lb::standalone::Proxy::start(Config::from_json(&json).unwrap())
        .await
        .unwrap();
    let key: http::uri::Authority = b.authority().parse().unwrap();
    let healthy = || proxy.backends().is_healthy(&key).unwrap();
    // A new backend: its first pass is enough.
    b.answer_probe(1, true).await;
    assert!(healthy());
    b.answer_probe(2, false).await;
    assert!(healthy(), "unhealthy after 1 failure of 2");
    b.answer_probe(3, false).await;
    assert!(!healthy(), "healthy after 2 failures of 2");
    b.answer_probe(4, true).await;
    b.answer_probe(5, true).await;
    assert!(!healthy(), "healthy after 2 passes of 3");
    b.answer_probe(6, true).await;
    assert!(healthy(), "unhealthy after 3 passes of 3");
    // A pass in between starts the count again.
    b.answer_probe(7, false).await;
    b.answer_probe(8, true).await;
    b.answer_probe(9, false).await;
    assert!(healthy(), "two failures, not in a row, made it unhealthy");
    b.release_probes(1);
    proxy.shutdown().await.unwrap();
}

/// A backend `host` given as a name is resolved, for requests and for health checks.
#[tokio::test]
async fn a_backend_host_given_as_a_name() {
    let b = Backend::start().await;
    let json = format!(
        r#"{{"listen": "127.0.0.1:0", "servers": [{{"host": "localhost", "port": {}}}],
            "spawn_backends": false, "health_check_interval": 0.2, "health_check_timeout": 0.1}}"#,
        b.addr.port()
    );
    let proxy = proxy(Config::from_json(&json).unwrap()).await;
    let key: http::uri::Authority = format!("localhost:{}", b.addr.port()).parse().unwrap();
    assert_eq!(proxy.backends().is_healthy(&key), Some(true));
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..3 {
        assert_eq!(
            client.get("/").await,
            (StatusCode::OK, b.addr.to_string()),
            "through the backend named localhost"
        );
    }
    assert_eq!(b.hits(), 3);
    proxy.shutdown().await.unwrap();
}

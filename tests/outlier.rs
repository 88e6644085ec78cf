//! Passive health (outlier ejection): through the standalone proxy over loopback, a backend
//! that answers 500, refuses or resets connections or stalls is ejected after its failures
//! in a row and comes back after the ejection time; at most `max_ejection_percent` of the
//! backends are out at once; `consecutive_failures: 0` turns it off, and so does a reload;
//! `/status` and `/metrics` show it. On the library, with tokio's paused clock: the
//! multiplier and its reset, ejection apart from the active health state, and a classifier
//! of one's own.

mod support;

#[allow(dead_code)]
#[path = "../examples/hyper.rs"]
mod hyper_example;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use support::*;
use tower::{service_fn, ServiceExt};
use tower_lb::balance::outlier::{Outcome, PassiveHealth};
use tower_lb::policy::RoundRobin;
use tower_lb::proxy::TrackBody;
use tower_lb::standalone::Proxy;
use tower_lb::{Backends, Balance, BoxError};

const ANSWER_500: &[u8] =
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\nfail";

fn key(addr: SocketAddr) -> http::uri::Authority {
    addr.to_string().parse().unwrap()
}

/// `config` with probes every `interval` seconds, timing out after half of it.
fn probing_every(mut config: tower_lb::config::Config, interval: f64) -> tower_lb::config::Config {
    config.health.interval = Duration::from_secs_f64(interval);
    config.health.timeout = Duration::from_secs_f64(interval / 2.0);
    config
}

/// Waits until `addr`'s backend is ejected (`true`) or back (`false`).
async fn wait_ejected(proxy: &Proxy, addr: SocketAddr, ejected: bool) {
    let key = key(addr);
    within(proxy.backends().wait_until(|s| {
        s.iter()
            .any(|(k, e)| *k == key && e.is_ejected() == ejected)
    }))
    .await;
}

fn is_ejected(proxy: &Proxy, addr: SocketAddr) -> bool {
    proxy.backends().is_ejected(&key(addr)).expect("in the set")
}

/// `n` GETs of `/`, each on a fresh connection: the statuses.
async fn gets(proxy: &Proxy, n: usize) -> Vec<StatusCode> {
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        statuses.push(get(proxy.local_addr(), "/").await.0);
    }
    statuses
}

/// A GET on the admin listener: status and body.
async fn admin(proxy: &Proxy, path: &str) -> String {
    let (status, body) = get(proxy.admin_addr().expect("admin listener"), path).await;
    assert_eq!(status, StatusCode::OK);
    body
}

#[tokio::test]
async fn a_backend_answering_500_is_ejected_then_gets_traffic_again() {
    let good = Backend::start().await;
    let bad = raw_backend(ANSWER_500).await;
    // Probes every 0.1 s: they keep passing during the ejection and must not end it.
    let proxy = proxy(probing_every(
        config(
            &[good.addr, bad.addr],
            r#""admin_listen": "127.0.0.1:0",
               "passive_health": {"consecutive_failures": 3, "ejection_time": 0.5}"#,
        ),
        0.1,
    ))
    .await;
    let bad_name = bad.addr.to_string();

    // Round robin: the bad backend answers every other request, 500 three times, and is out.
    let statuses = gets(&proxy, 6).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::INTERNAL_SERVER_ERROR)
            .count(),
        3
    );
    let ejected_at = std::time::Instant::now();
    wait_ejected(&proxy, bad.addr, true).await;
    // Only the good backend answers now.
    assert!(gets(&proxy, 6).await.iter().all(|s| *s == StatusCode::OK));

    // /status: healthy by its probes, and ejected; /metrics: one ejection, not up.
    let status: serde_json::Value = serde_json::from_str(&admin(&proxy, "/status").await).unwrap();
    let entry = status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == bad_name.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (&entry["healthy"], &entry["ejected"]),
        (&true.into(), &true.into())
    );
    let metrics = admin(&proxy, "/metrics").await;
    let line = |name: &str, backend: &str| format!("{name}{{backend=\"{backend}\"}}");
    assert!(metrics.contains(&format!(
        "{} 1\n",
        line("tower_lb_ejections_total", &bad_name)
    )));
    assert!(metrics.contains(&format!("{} 0\n", line("tower_lb_backend_up", &bad_name))));
    assert!(metrics.contains(&format!(
        "{} 0\n",
        line("tower_lb_ejections_total", &good.authority())
    )));

    // Back after the ejection time (not before, for all the passing probes), and picked.
    wait_ejected(&proxy, bad.addr, false).await;
    assert!(
        ejected_at.elapsed() >= Duration::from_millis(450),
        "{:?}",
        ejected_at.elapsed()
    );
    assert_eq!(proxy.backends().is_healthy(&key(bad.addr)), Some(true));
    let statuses = gets(&proxy, 2).await;
    assert!(
        statuses.contains(&StatusCode::INTERNAL_SERVER_ERROR),
        "{statuses:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&admin(&proxy, "/status").await).unwrap();
    assert!(status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["ejected"] == false));
    let metrics = admin(&proxy, "/metrics").await;
    assert!(metrics.contains(&format!("{} 1\n", line("tower_lb_backend_up", &bad_name))));
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn at_most_max_ejection_percent_of_the_backends_are_ejected() {
    let bad = [
        raw_backend(ANSWER_500).await,
        raw_backend(ANSWER_500).await,
        raw_backend(ANSWER_500).await,
    ];
    let addrs: Vec<SocketAddr> = bad.iter().map(|b| b.addr).collect();
    // Probed once, at start: from then on a connection is a proxied request.
    let proxy = proxy(probing_every(
        config(
            &addrs,
            r#""passive_health": {"consecutive_failures": 2, "ejection_time": 30, "max_ejection_percent": 50}"#,
        ),
        60.0,
    ))
    .await;
    // Every backend fails far more than twice in a row: 50 % of 3, rounded down, is one.
    let statuses = gets(&proxy, 18).await;
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::INTERNAL_SERVER_ERROR));
    let ejected: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| is_ejected(&proxy, *a))
        .collect();
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    // The two others still take turns.
    let before: Vec<usize> = bad
        .iter()
        .map(|b| b.accepted.load(Ordering::SeqCst))
        .collect();
    gets(&proxy, 4).await;
    for (b, before) in bad.iter().zip(before) {
        let took = b.accepted.load(Ordering::SeqCst) - before;
        if ejected.contains(&b.addr) {
            assert_eq!(took, 0);
        } else {
            assert!(took >= 2, "{} took {took}", b.addr);
        }
    }
    proxy.shutdown().await.unwrap();
}

/// A backend that passes its first health check and then is gone: connections refused.
#[tokio::test]
async fn refused_connections_count_and_the_request_goes_elsewhere() {
    let good = Backend::start().await;
    let gone = raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let gone_addr = gone.addr;
    // Probed once at start; the next probe would come after a minute.
    let proxy = proxy(probing_every(
        config(
            &[good.addr, gone_addr],
            r#""passive_health": {"consecutive_failures": 2, "ejection_time": 30}"#,
        ),
        60.0,
    ))
    .await;
    drop(gone);
    // Each request picked for it is retried on the good backend: every answer is a 200.
    let statuses = gets(&proxy, 6).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert!(is_ejected(&proxy, gone_addr));
    // Ejection leaves the active health state alone.
    assert_eq!(proxy.backends().is_healthy(&key(gone_addr)), Some(true));
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn resets_before_the_response_head_count() {
    let good = Backend::start().await;
    let reset = reset_backend().await;
    let proxy = proxy(config(
        &[good.addr, reset.addr],
        r#""passive_health": {"consecutive_failures": 2, "ejection_time": 30}"#,
    ))
    .await;
    // GET is idempotent: each reset request is tried again on the good backend.
    let statuses = gets(&proxy, 6).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert!(is_ejected(&proxy, reset.addr));
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn response_timeouts_count() {
    let good = Backend::start().await;
    // Passes its health checks; never answers anything else.
    let stalled = silent_backend().await;
    let proxy = proxy(config(
        &[good.addr, stalled.addr],
        r#""response_timeout": 0.1, "passive_health": {"consecutive_failures": 2, "ejection_time": 30}"#,
    ))
    .await;
    let statuses = gets(&proxy, 4).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::GATEWAY_TIMEOUT)
            .count(),
        2,
        "{statuses:?}"
    );
    assert!(is_ejected(&proxy, stalled.addr));
    assert!(gets(&proxy, 4).await.iter().all(|s| *s == StatusCode::OK));
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn zero_consecutive_failures_turns_it_off_and_a_reload_ends_ejections() {
    let good = Backend::start().await;
    let bad = raw_backend(ANSWER_500).await;
    let off = r#""passive_health": {"consecutive_failures": 0, "ejection_time": 30}"#;
    let on = r#""passive_health": {"consecutive_failures": 2, "ejection_time": 30}"#;
    let mut proxy = proxy(config(&[good.addr, bad.addr], off)).await;
    let statuses = gets(&proxy, 20).await;
    let failed = statuses
        .iter()
        .filter(|s| **s == StatusCode::INTERNAL_SERVER_ERROR)
        .count();
    assert_eq!(failed, 10, "off: the bad backend keeps its turn");
    assert!(!is_ejected(&proxy, bad.addr));

    // Turned on by a reload, it ejects; turned off again, the ejection ends at once.
    let listen = proxy.local_addr();
    let with = |extra| {
        let mut c = config(&[good.addr, bad.addr], extra);
        c.listen = listen;
        c
    };
    assert!(proxy.apply(with(on)).await.passive_health);
    gets(&proxy, 4).await;
    assert!(is_ejected(&proxy, bad.addr));
    assert!(proxy.apply(with(off)).await.passive_health);
    assert!(!is_ejected(&proxy, bad.addr));
    assert!(gets(&proxy, 2)
        .await
        .contains(&StatusCode::INTERNAL_SERVER_ERROR));
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_whose_upload_fails_does_not_eject_the_backend() {
    let b = Backend::start().await;
    let proxy = proxy(config(
        &[b.addr],
        r#""passive_health": {"consecutive_failures": 1, "ejection_time": 30}"#,
    ))
    .await;
    // A chunked upload whose second chunk-size line is not hex: the request fails as the
    // proxy reads it, after its head went to the backend.
    let upload = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n";
    for _ in 0..3 {
        let ex = exchange(proxy.local_addr(), upload, false, Duration::from_secs(2)).await;
        // The client's fault: 400, as for any malformed request, not the backend's 502.
        ex.assert_closed_with(400);
    }
    let errors = proxy
        .backends()
        .snapshot()
        .endpoint(0)
        .unwrap()
        .stats()
        .errors;
    assert!(
        errors > 0,
        "the uploads did not fail at the backend service"
    );
    assert!(!is_ejected(&proxy, b.addr));
    assert_eq!(get(proxy.local_addr(), "/").await.0, StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

/// The same in the embedding of `examples/hyper.rs`: hyper's server reads the client's
/// body, and its error reaches the backend service as a `hyper::Error`.
#[tokio::test]
async fn an_upload_failing_in_a_hyper_server_does_not_eject_the_backend() {
    let b = Backend::start().await;
    let api = tower_lb::proxy::Builder::new()
        .without_health_check()
        .passive_health(PassiveHealth::new(1).ejection_time(Duration::from_secs(30)))
        .build([key(b.addr)])
        .unwrap();
    let backends = api.get_ref().get_ref().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(hyper_example::serve(listener, api));
    let upload = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n";
    for _ in 0..3 {
        exchange(addr, upload, false, Duration::from_secs(2)).await;
    }
    let errors = backends.snapshot().endpoint(0).unwrap().stats().errors;
    assert!(
        errors > 0,
        "the uploads did not fail at the backend service"
    );
    assert_eq!(backends.is_ejected(&key(b.addr)), Some(false));
    assert_eq!(get(addr, "/").await.0, StatusCode::OK);
    server.abort();
}

/// Backends "a" (failing while `failing` is set) and "b", round robin, passive health after
/// 2 failures for 10 s.
fn library_set(
    failing: &Arc<AtomicBool>,
) -> Backends<&'static str, tower::util::BoxCloneSyncService<(), &'static str, BoxError>, RoundRobin>
{
    let failing = failing.clone();
    let a = service_fn(move |()| {
        let failed = failing.load(Ordering::SeqCst);
        async move {
            if failed {
                Err::<&str, BoxError>("down".into())
            } else {
                Ok("a")
            }
        }
    });
    let b = service_fn(|()| async { Ok::<_, BoxError>("b") });
    let backends = Backends::from_services(
        RoundRobin::new(),
        [
            ("a", tower::util::BoxCloneSyncService::new(a)),
            ("b", tower::util::BoxCloneSyncService::new(b)),
        ],
    );
    backends.passive_health(PassiveHealth::new(2).ejection_time(Duration::from_secs(10)));
    backends
}

/// Sends requests until "a" is ejected (at most 10).
async fn eject_a<S>(lb: &Balance<&'static str, S, RoundRobin>)
where
    S: tower::Service<(), Response = &'static str, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    for _ in 0..10 {
        let _ = lb.clone().oneshot(()).await;
        if lb.get_ref().is_ejected(&"a") == Some(true) {
            return;
        }
    }
    panic!("a was not ejected");
}

/// How long "a" stays ejected, to the millisecond, from now (on the paused clock; at most
/// 200 s).
async fn ejection_lasts<S: Clone>(lb: &Balance<&'static str, S, RoundRobin>) -> Duration {
    let start = tokio::time::Instant::now();
    while lb.get_ref().is_ejected(&"a") == Some(true) {
        assert!(
            start.elapsed() < Duration::from_secs(200),
            "a never came back"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

#[tokio::test(start_paused = true)]
async fn ejections_in_a_row_last_longer_until_a_quiet_spell() {
    let failing = Arc::new(AtomicBool::new(true));
    let lb = Balance::new(library_set(&failing));
    let secs = |s: u64| Duration::from_secs(s);
    let about = |d: Duration, s: u64| d >= secs(s) && d <= secs(s) + Duration::from_millis(2);

    eject_a(&lb).await;
    let first = ejection_lasts(&lb).await;
    assert!(about(first, 10), "{first:?}");
    // Failing again at once: twice as long.
    eject_a(&lb).await;
    let second = ejection_lasts(&lb).await;
    assert!(about(second, 20), "{second:?}");
    // 19 s of good service, less than the last ejection: three times.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(secs(19)).await;
    failing.store(true, Ordering::SeqCst);
    eject_a(&lb).await;
    let third = ejection_lasts(&lb).await;
    assert!(about(third, 30), "{third:?}");
    // 30 s of good service, as long as the last ejection: back to once.
    failing.store(false, Ordering::SeqCst);
    for _ in 0..30 {
        lb.clone().oneshot(()).await.unwrap();
        tokio::time::sleep(secs(1)).await;
    }
    failing.store(true, Ordering::SeqCst);
    eject_a(&lb).await;
    let fourth = ejection_lasts(&lb).await;
    assert!(about(fourth, 10), "{fourth:?}");
    assert_eq!(
        lb.get_ref()
            .snapshot()
            .endpoint(0)
            .unwrap()
            .stats()
            .ejections,
        4
    );
}

#[tokio::test(start_paused = true)]
async fn ejection_is_apart_from_the_active_health_state() {
    let failing = Arc::new(AtomicBool::new(true));
    let backends = library_set(&failing);
    let lb = Balance::new(backends.clone());
    eject_a(&lb).await;
    assert_eq!(backends.is_healthy(&"a"), Some(true));

    // A probe that fails and one that passes again: still ejected, never picked.
    backends.set_healthy(&"a", false);
    backends.set_healthy(&"a", true);
    assert_eq!(backends.is_ejected(&"a"), Some(true));
    for _ in 0..4 {
        assert_eq!(lb.clone().oneshot(()).await.unwrap(), "b");
    }
    // Unhealthy when the ejection ends: back from ejection, but still not picked.
    backends.set_healthy(&"a", false);
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    assert_eq!(backends.is_ejected(&"a"), Some(false));
    assert_eq!(backends.is_healthy(&"a"), Some(false));
    for _ in 0..4 {
        assert_eq!(lb.clone().oneshot(()).await.unwrap(), "b");
    }
    failing.store(false, Ordering::SeqCst);
    backends.set_healthy(&"a", true);
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(lb.clone().oneshot(()).await.unwrap());
    }
    assert!(answers.contains(&"a"), "{answers:?}");
}

/// "a" answers 429, "b" 200; the default classifier lets 429 pass, a custom one does not.
#[tokio::test]
async fn a_classifier_of_ones_own_decides_what_fails() {
    let answer = |status: u16| {
        service_fn(move |()| async move {
            let mut response = http::Response::new(Empty::<Bytes>::new());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, BoxError>(response)
        })
    };
    let set = |settings: PassiveHealth| {
        let backends = Backends::from_services(
            RoundRobin::new(),
            [
                ("a", tower::util::BoxCloneSyncService::new(answer(429))),
                ("b", tower::util::BoxCloneSyncService::new(answer(200))),
            ],
        );
        backends.passive_health(settings);
        Balance::new(backends).with_completion(TrackBody)
    };
    let send = |lb: &Balance<_, _, _, _, TrackBody>, n| {
        let lb = lb.clone();
        async move {
            for _ in 0..n {
                lb.clone().oneshot(()).await.unwrap();
            }
        }
    };

    let default = set(PassiveHealth::new(2));
    send(&default, 10).await;
    assert_eq!(default.get_ref().is_ejected(&"a"), Some(false));

    let too_many_requests = |outcome: Outcome<'_>| match outcome {
        Outcome::Status(status) => status == 429 || status >= 500,
        _ => true,
    };
    let custom = set(PassiveHealth::new(2).classify(too_many_requests));
    send(&custom, 4).await;
    assert_eq!(custom.get_ref().is_ejected(&"a"), Some(true));
}

/// A client that stops sending its upload: the request fails by the client's fault, `408`
/// after `response_timeout` without a byte of it, and passive health does not count it
/// against the backend, which was only waiting for the body. A backend that does not
/// answer a request it has in full is still its own failure, a `504` that ejects it.
#[tokio::test]
async fn a_client_that_stalls_its_upload_gets_408_and_does_not_eject_the_backend() {
    let b = Backend::start().await;
    let proxy = proxy(config(
        &[b.addr],
        r#""response_timeout": 0.3, "passive_health": {"consecutive_failures": 1, "ejection_time": 30}"#,
    ))
    .await;
    let timeouts = || {
        tower_lb::stats::global()
            .local_responses()
            .find(|&(s, _)| s == 408)
            .unwrap()
            .1
    };
    let before = timeouts();
    // 5 of 100 bytes, then nothing: `/collect` reads the body to its end before answering.
    let upload = b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhello";
    for _ in 0..2 {
        let ex = exchange(proxy.local_addr(), upload, false, Duration::from_secs(3)).await;
        ex.assert_closed_with(408);
    }
    assert!(timeouts() - before >= 2);
    let stats = proxy.backends().snapshot().endpoint(0).unwrap().stats();
    assert!(
        stats.errors >= 2,
        "the uploads did not fail at the backend service"
    );
    assert!(!is_ejected(&proxy, b.addr));
    assert_eq!(get(proxy.local_addr(), "/").await.0, StatusCode::OK);
    assert_eq!(
        get(proxy.local_addr(), "/stall").await.0,
        StatusCode::GATEWAY_TIMEOUT
    );
    assert!(is_ejected(&proxy, b.addr));
    proxy.shutdown().await.unwrap();
}

/// The other side of the same timer: a backend that stops reading an upload that its
/// client still sends is the backend's failure, `504`, which passive health counts.
#[tokio::test]
async fn a_backend_that_stops_reading_an_upload_gets_504_and_is_ejected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Reads the head and nothing more of the upload.
    let deaf = silent_backend().await;
    let proxy = proxy(config(
        &[deaf.addr],
        r#""response_timeout": 0.3, "passive_health": {"consecutive_failures": 1, "ejection_time": 30}"#,
    ))
    .await;
    let client = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    let (mut read, mut write) = client.into_split();
    // Far more than the socket buffers on the way hold: the client is never the one
    // that stops.
    let upload = tokio::spawn(async move {
        let head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n";
        let chunk = vec![b'u'; 64 * 1024];
        let mut sent = write.write_all(head).await;
        while sent.is_ok() {
            sent = write.write_all(&chunk).await;
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0; 4096];
    within(async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = read.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(is_ejected(&proxy, deaf.addr));
    upload.abort();
    proxy.shutdown().await.unwrap();
}

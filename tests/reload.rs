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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_fail_no_request() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut proxy = proxy(config(&addrs, "")).await;
    let target = proxy.local_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = Client::connect(target).await;
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    statuses.push(client.get("/").await.0);
                }
                statuses
            })
        })
        .collect();
    // Cycle through configurations that always keep at least one healthy backend.
    let refs: Vec<&Backend> = backends.iter().collect();
    let algorithms = ["least_connections", "hashing", "round_robin"];
    for round in 0..9 {
        let keep: Vec<&Backend> = refs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != round % 3)
            .map(|(_, b)| *b)
            .collect();
        proxy
            .apply(next(
                &proxy,
                &keep,
                &format!(r#""algorithm": "{}""#, algorithms[round % 3]),
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.apply(next(&proxy, &refs, "")).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        let statuses = within(t).await.unwrap();
        total += statuses.len();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "a request failed during a reload"
        );
    }
    assert!(total > 100, "only {total} requests");
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

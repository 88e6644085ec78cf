//! DNS discovery: `discover::Dns` on injected answers (tokio's paused clock, no network),
//! and `resolve: true` servers in the standalone proxy, where `localhost` is 127.0.0.1 and
//! ::1.

mod support;

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http::uri::Authority;
use support::*;
use tokio::time::Instant;
use tower::discover::Change;
use tower_lb::config::Config;
use tower_lb::discover::Dns;
use tower_lb::policy::RoundRobin;
use tower_lb::proxy::HttpBackends;
use tower_lb::standalone::Proxy;
use tower_lb::Backends;

/// A resolver that gives the queued answers in turn, repeating the last, and counts calls.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<io::Result<Vec<IpAddr>>>>>,
    calls: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl Script {
    fn push(&self, answer: io::Result<&[&str]>) {
        let answer = answer.map(|ips| ips.iter().map(|ip| ip.parse().unwrap()).collect());
        self.answers.lock().unwrap().push_back(answer);
    }

    fn resolver(&self) -> impl Fn(&str) -> std::future::Ready<io::Result<Vec<IpAddr>>> {
        let script = self.clone();
        move |host: &str| {
            script
                .calls
                .lock()
                .unwrap()
                .push((host.to_owned(), Instant::now()));
            let mut answers = script.answers.lock().unwrap();
            let answer = match answers.len() {
                0 => Ok(Vec::new()),
                1 => match &answers[0] {
                    Ok(ips) => Ok(ips.clone()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                },
                _ => answers.pop_front().unwrap(),
            };
            std::future::ready(answer)
        }
    }

    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn describe(change: Change<SocketAddr, SocketAddr>) -> String {
    match change {
        Change::Insert(key, service) => {
            assert_eq!(key, service, "the service is made for its address");
            format!("+{key}")
        }
        Change::Remove(key) => format!("-{key}"),
    }
}

/// The next change, and when it came.
async fn next<S>(dns: &mut S, start: Instant) -> (String, Duration)
where
    S: futures::Stream<Item = Result<Change<SocketAddr, SocketAddr>, std::convert::Infallible>>
        + Unpin,
{
    let change = dns.next().await.unwrap().unwrap();
    (describe(change), Instant::now() - start)
}

#[tokio::test(start_paused = true)]
async fn answers_are_followed_at_every_refresh_add_remove_change() {
    let script = Script::default();
    script.push(Ok(&["10.0.0.1", "10.0.0.2", "::1"]));
    script.push(Ok(&["10.0.0.2", "10.0.0.3", "::1"])); // one changes
    script.push(Err(io::Error::other("SERVFAIL"))); // kept as it was
    script.push(Ok(&["10.0.0.3", "::1"])); // one goes
    script.push(Ok(&["10.0.0.3", "10.0.0.4", "::1"])); // one comes
    script.push(Ok(&[])); // an empty answer is an answer

    let start = Instant::now();
    let mut dns = Dns::new("api.internal", 8080, script.resolver(), |a: &SocketAddr| *a)
        .refresh(Duration::from_secs(10));
    let at = Duration::from_secs;

    // Resolved at once, on the first poll; IPv6 addresses too.
    assert_eq!(
        next(&mut dns, start).await,
        ("+10.0.0.1:8080".into(), at(0))
    );
    assert_eq!(
        next(&mut dns, start).await,
        ("+10.0.0.2:8080".into(), at(0))
    );
    assert_eq!(next(&mut dns, start).await, ("+[::1]:8080".into(), at(0)));
    // A change: the new address comes before the old one goes.
    assert_eq!(
        next(&mut dns, start).await,
        ("+10.0.0.3:8080".into(), at(10))
    );
    assert_eq!(
        next(&mut dns, start).await,
        ("-10.0.0.1:8080".into(), at(10))
    );
    // The failure at 20 s changed nothing; the answer at 30 s removes one.
    assert_eq!(
        next(&mut dns, start).await,
        ("-10.0.0.2:8080".into(), at(30))
    );
    assert_eq!(
        next(&mut dns, start).await,
        ("+10.0.0.4:8080".into(), at(40))
    );
    // Everything goes on an empty answer.
    let mut gone = HashSet::new();
    for _ in 0..3 {
        let (change, when) = next(&mut dns, start).await;
        assert_eq!(when, at(50));
        gone.insert(change);
    }
    let expected = ["-10.0.0.3:8080", "-10.0.0.4:8080", "-[::1]:8080"];
    assert_eq!(gone, expected.map(String::from).into());
    assert_eq!(script.calls(), 6);
    assert!(script
        .calls
        .lock()
        .unwrap()
        .iter()
        .all(|(h, _)| h == "api.internal"));
    assert_eq!(dns.addresses().count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_backend_set_follows_the_answers() {
    let script = Script::default();
    script.push(Ok(&["10.0.0.1", "10.0.0.2"]));
    script.push(Ok(&["10.0.0.2", "10.0.0.3"]));
    let dns = Dns::new("api.internal", 80, script.resolver(), |_: &SocketAddr| ())
        .refresh(Duration::from_secs(5));
    let backends = Backends::<SocketAddr, (), _>::new(RoundRobin::new());
    backends.healthy_on_insert(false);
    let following = tokio::spawn(backends.discover(dns));
    let members = |backends: &Backends<SocketAddr, (), RoundRobin>| {
        let snapshot = backends.snapshot();
        let mut keys: Vec<SocketAddr> = snapshot.iter().map(|(k, _)| *k).collect();
        keys.sort();
        keys
    };
    within(backends.wait_until(|s| s.len() == 2)).await;
    assert_eq!(
        members(&backends),
        [addr("10.0.0.1:80"), addr("10.0.0.2:80")]
    );
    // New addresses join unhealthy: no traffic before a health check passes.
    assert_eq!(backends.pick(None), None);
    backends.set_healthy(&addr("10.0.0.2:80"), true);

    within(backends.wait_until(|s| s.iter().any(|(k, _)| *k == addr("10.0.0.3:80")))).await;
    within(backends.wait_until(|s| s.len() == 2)).await;
    assert_eq!(
        members(&backends),
        [addr("10.0.0.2:80"), addr("10.0.0.3:80")]
    );
    // The address that stayed kept its state.
    assert_eq!(backends.is_healthy(&addr("10.0.0.2:80")), Some(true));
    assert_eq!(backends.is_healthy(&addr("10.0.0.3:80")), Some(false));
    following.abort();
}

#[tokio::test(start_paused = true)]
async fn an_http_set_is_keyed_by_authority() {
    let script = Script::default();
    script.push(Ok(&["10.0.0.1", "::1"]));
    // The proxy's Client makes backends for authorities: the keys follow.
    let dns = Dns::new(
        "api.internal",
        8080,
        script.resolver(),
        tower_lb::proxy::Client::new(),
    );
    let backends: HttpBackends<RoundRobin> = Backends::new(RoundRobin::new());
    let following = tokio::spawn(backends.discover(dns));
    within(backends.wait_until(|s| s.len() == 2)).await;
    let snapshot = backends.snapshot();
    let mut keys: Vec<&str> = snapshot.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["10.0.0.1:8080", "[::1]:8080"]);
    following.abort();
}

/// A port free on both 127.0.0.1 and ::1.
fn dual_stack_port() -> u16 {
    for _ in 0..20 {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

fn localhost_config(port: u16, spawn_backends: bool) -> Config {
    Config::from_json(&format!(
        r#"{{"listen": "127.0.0.1:0", "spawn_backends": {spawn_backends},
            "servers": [{{"host": "localhost", "port": {port}, "resolve": true}}],
            "health_check_interval": 0.2, "health_check_timeout": 0.1}}"#
    ))
    .unwrap()
}

fn key(text: &str) -> Authority {
    text.parse().unwrap()
}

/// The backends that answer `n` requests through the proxy.
async fn answers(proxy: &Proxy, n: usize) -> HashSet<String> {
    let mut client = Client::connect(proxy.local_addr()).await;
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (status, body) = client.get("/").await;
        assert!(status.is_success(), "{status}");
        seen.insert(body);
    }
    seen
}

#[tokio::test]
async fn localhost_is_two_backends_each_health_checked_before_traffic() {
    let port = dual_stack_port();
    let v4 = Backend::start_on(([127, 0, 0, 1], port).into()).await;
    let v6 = Backend::start_on(addr(&format!("[::1]:{port}"))).await;
    v6.set_healthy(false);
    let (k4, k6) = (key(&v4.authority()), key(&v6.authority()));
    assert_eq!(k6.as_str(), format!("[::1]:{port}"));

    let proxy = Proxy::start(localhost_config(port, false)).await.unwrap();
    within(
        proxy
            .backends()
            .wait_until(|s| s.len() == 2 && s.iter().any(|(k, e)| *k == k4 && e.is_healthy())),
    )
    .await;
    // [::1] is in the set but fails its probe: it gets nothing.
    assert_eq!(proxy.backends().is_healthy(&k6), Some(false));
    assert_eq!(answers(&proxy, 6).await, HashSet::from([v4.authority()]));
    assert_eq!(v6.hits(), 0);

    // Once its probe passes, both addresses serve.
    v6.set_healthy(true);
    wait_health(&proxy, &v6, true).await;
    assert_eq!(
        answers(&proxy, 6).await,
        HashSet::from([v4.authority(), v6.authority()])
    );
    assert_eq!(v6.hits(), 3);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn localhost_with_spawn_backends_starts_a_demo_backend_per_address() {
    let port = dual_stack_port();
    let proxy = Proxy::start(localhost_config(port, true)).await.unwrap();
    within(
        proxy
            .backends()
            .wait_until(|s| s.len() == 2 && s.iter().all(|(_, e)| e.is_healthy())),
    )
    .await;
    assert_eq!(
        answers(&proxy, 4).await,
        HashSet::from([format!("127.0.0.1:{port}"), format!("[::1]:{port}")])
    );
    proxy.shutdown().await.unwrap();
    // The demo backends stopped with the proxy.
    assert!(std::net::TcpStream::connect(("::1", port)).is_err());
}

#[tokio::test]
async fn reloads_add_reweight_and_remove_resolve_servers() {
    let fixed = Backend::start().await;
    let port = dual_stack_port();
    let v4 = Backend::start_on(([127, 0, 0, 1], port).into()).await;
    let v6 = Backend::start_on(addr(&format!("[::1]:{port}"))).await;
    let mut proxy = proxy(config(&[fixed.addr], "")).await;
    let reload = |proxy: &Proxy, resolve: Option<u32>, refresh: u32| {
        let mut servers = vec![format!(
            r#"{{"host": "127.0.0.1", "port": {}}}"#,
            fixed.addr.port()
        )];
        if let Some(weight) = resolve {
            servers.push(format!(
                r#"{{"host": "localhost", "port": {port}, "resolve": true, "weight": {weight}}}"#
            ));
        }
        let mut next = Config::from_json(&format!(
            r#"{{"servers": [{}], "spawn_backends": false, "dns_refresh": {refresh},
                "health_check_interval": 0.2, "health_check_timeout": 0.1}}"#,
            servers.join(", ")
        ))
        .unwrap();
        next.listen = proxy.config().listen;
        next
    };
    let weights = |proxy: &Proxy| -> Vec<u32> {
        let snapshot = proxy.backends().snapshot();
        let mut w: Vec<u32> = snapshot.iter().map(|(_, e)| e.weight()).collect();
        w.sort();
        w
    };

    // Added: two backends, probed, then serving with the fixed one.
    let diff = proxy.apply(reload(&proxy, Some(1), 30)).await;
    assert_eq!(diff.added.len(), 1);
    within(
        proxy
            .backends()
            .wait_until(|s| s.len() == 3 && s.iter().all(|(_, e)| e.is_healthy())),
    )
    .await;
    let all = HashSet::from([fixed.authority(), v4.authority(), v6.authority()]);
    assert_eq!(answers(&proxy, 6).await, all);

    // Reweighted: both addresses take the entry's weight; health stays.
    let diff = proxy.apply(reload(&proxy, Some(3), 30)).await;
    assert_eq!(diff.reweighted.len(), 1);
    within(
        proxy
            .backends()
            .wait_until(|s| s.iter().filter(|(_, e)| e.weight() == 3).count() == 2),
    )
    .await;
    assert_eq!(weights(&proxy), [1, 3, 3]);
    assert_eq!(
        proxy.backends().is_healthy(&key(&v6.authority())),
        Some(true)
    );

    // A new dns_refresh keeps the backends as they are.
    let diff = proxy.apply(reload(&proxy, Some(3), 5)).await;
    assert!(diff.dns_refresh && diff.added.is_empty() && diff.removed.is_empty());
    assert_eq!(weights(&proxy), [1, 3, 3]);

    // Removed: both addresses leave the set and get no more requests.
    let diff = proxy.apply(reload(&proxy, None, 5)).await;
    assert_eq!(diff.removed.len(), 1);
    within(proxy.backends().wait_until(|s| s.len() == 1)).await;
    let (h4, h6) = (v4.hits(), v6.hits());
    assert_eq!(answers(&proxy, 4).await, HashSet::from([fixed.authority()]));
    assert_eq!((v4.hits(), v6.hits()), (h4, h6));
    proxy.shutdown().await.unwrap();
}

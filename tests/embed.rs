//! Embedding the balancer as the README and the examples do, over loopback: health checks
//! attached to the backend set, built by `proxy::Builder`.

mod support;

#[allow(dead_code)]
#[path = "../examples/hyper.rs"]
mod hyper_example;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get as route_get;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tower::discover::Change;
use tower_lb::balance::MakeBackend;
use tower_lb::health::{HealthCheck, Settings};
use tower_lb::policy::{Hashing, RoundRobin};
use tower_lb::proxy::{self, HttpBackends};
use tower_lb::{Backends, BoxError};

use support::{get, within};

/// A backend on 127.0.0.1:0 that answers `/health` with a status that the test sets,
/// anything else with 200 and its address; it counts both.
struct Counted {
    addr: SocketAddr,
    health: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    probes: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Counted {
    async fn start(health: StatusCode) -> Counted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(health.as_u16()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (probed, probes) = watch::channel(0);
        let probed = Arc::new(probed);
        let (st, h) = (status.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (st, h, probed) = (st.clone(), h.clone(), probed.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let response = if req.uri().path() == "/health" {
                        probed.send_modify(|n| *n += 1);
                        let status = StatusCode::from_u16(st.load(Ordering::SeqCst)).unwrap();
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::new()))
                    } else {
                        h.fetch_add(1, Ordering::SeqCst);
                        Ok(Response::new(Full::new(Bytes::from(addr.to_string()))))
                    };
                    async move { response }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        Counted {
            addr,
            health: status,
            hits,
            probes,
            task,
        }
    }

    fn authority(&self) -> String {
        self.addr.to_string()
    }

    fn key(&self) -> proxy::uri::Authority {
        self.authority().parse().unwrap()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn probes(&self) -> usize {
        *self.probes.borrow()
    }

    fn set_health(&self, status: StatusCode) {
        self.health.store(status.as_u16(), Ordering::SeqCst);
    }

    /// Waits until this backend has answered `n` probes in all.
    async fn probed(&self, n: usize) {
        let mut probes = self.probes.clone();
        within(probes.wait_for(|p| *p >= n)).await.unwrap();
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_healthy<P: tower_lb::policy::Policy>(
    set: &HttpBackends<P>,
    key: &proxy::uri::Authority,
    healthy: bool,
) {
    within(set.wait_until(|s| s.iter().any(|(k, e)| k == key && e.is_healthy() == healthy))).await;
}

/// Sends `n` requests for `path` to `addr`, each from another client IP (127.0.0.2, …,
/// so that hashing spreads them too); all must be answered by `up`.
async fn all_on(addr: SocketAddr, path: &str, n: usize, up: &Counted) {
    for i in 0..n {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + i as u8).into();
        let (status, who) = support::Client::connect_from(addr, ip)
            .await
            .get(path)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(who, up.authority());
    }
}

/// The README's "Embedding (axum)" snippet, run against two loopback backends, one of
/// which fails `/health` from the start but would answer `/` fine: it gets no request.
#[tokio::test]
async fn the_readme_axum_app_never_serves_a_backend_failing_its_health_check() {
    let up = Counted::start(StatusCode::OK).await;
    let down = Counted::start(StatusCode::SERVICE_UNAVAILABLE).await;
    let listener = proxy::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = (up.authority(), down.authority());
    let (tx, set) = oneshot::channel();
    let app = tokio::spawn(async move {
        // The README's lines, but for the addresses; the set is sent out to wait on.
        let addrs = [a.parse()?, b.parse()?];
        let api = proxy::Builder::new().policy(Hashing::new()).build(addrs)?; // GET /health every 10 s
        let _ = tx.send(api.get_ref().get_ref().clone());
        let app = Router::new()
            .route("/", route_get(|| async { "the app's own route" }))
            .nest_service("/api", api);
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await?;
        Ok::<_, BoxError>(())
    });
    let set = set.await.unwrap();
    wait_healthy(&set, &up.key(), true).await;
    down.probed(1).await;

    assert_eq!(
        get(addr, "/").await,
        (StatusCode::OK, "the app's own route".to_owned())
    );
    all_on(addr, "/api/", 20, &up).await;
    assert_eq!(down.hits(), 0);
    assert_eq!(up.hits(), 20);
    app.abort();
}

/// Every line of the README's axum snippet but the addresses is a line of the test above.
#[test]
fn the_readme_snippet_is_the_tested_one() {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("## Embedding").unwrap()..];
    let snippet = &section[section.find("```rust\n").unwrap() + 8..];
    let snippet = &snippet[..snippet.find("```").unwrap()];
    // Compared without whitespace: rustfmt lays the test's lines out its way.
    let squeeze = |s: &str| s.split_whitespace().collect::<String>().replace(",)", ")");
    let test = squeeze(&include_str!("embed.rs").replace("route_get(", "get("));
    let lines: Vec<&str> = snippet.lines().map(str::trim).collect();
    assert!(lines.len() <= 6, "{snippet}");
    assert!(lines[0].starts_with("let addrs = ["), "{snippet}");
    for line in &lines[1..] {
        assert!(test.contains(&squeeze(line)), "not tested: {line}");
    }
    assert!(lines.iter().any(|l| l.contains(".nest_service(")));
}

/// The hyper example's way: its `serve` and its builder line.
#[tokio::test]
async fn the_hyper_example_never_serves_a_backend_failing_its_health_check() {
    let up = Counted::start(StatusCode::OK).await;
    let down = Counted::start(StatusCode::SERVICE_UNAVAILABLE).await;
    let addrs = [up.key(), down.key()];
    let api = proxy::Builder::new().build(addrs).unwrap();
    let set = api.get_ref().get_ref().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(hyper_example::serve(listener, api));
    wait_healthy(&set, &up.key(), true).await;
    down.probed(1).await;

    all_on(addr, "/", 20, &up).await;
    assert_eq!(down.hits(), 0);
    assert_eq!(set.is_healthy(&down.key()), Some(false));
    server.abort();
}

fn quick<P, E>(builder: proxy::Builder<P, E>) -> proxy::Builder<P, E> {
    builder
        .health_interval(Duration::from_millis(50))
        .health_timeout(Duration::from_millis(40))
}

/// A backend inserted into a running checked set is probed, and takes requests only
/// once a probe has passed; one that is removed is no longer probed.
#[tokio::test]
async fn a_backend_joining_a_checked_set_takes_traffic_after_its_first_pass() {
    let first = Counted::start(StatusCode::OK).await;
    let set = quick(proxy::Builder::new())
        .build_backends([first.key()])
        .unwrap();
    let api = proxy::balancer(set.clone(), proxy::ClientIpKey::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(hyper_example::serve(listener, api));
    wait_healthy(&set, &first.key(), true).await;

    // Joins failing its probes: it is probed, again and again, and gets nothing.
    let late = Counted::start(StatusCode::SERVICE_UNAVAILABLE).await;
    set.insert(late.key(), proxy::Client::new().make_backend(&late.key()));
    assert_eq!(set.is_healthy(&late.key()), Some(false));
    late.probed(2).await;
    all_on(addr, "/", 20, &first).await;
    assert_eq!(late.hits(), 0);

    // Its probe passes: now it takes its share.
    late.set_health(StatusCode::OK);
    wait_healthy(&set, &late.key(), true).await;
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.0, StatusCode::OK);
    }
    assert_eq!(late.hits(), 10);

    // Removed: no more probes. `first` is the clock: 4 more of its probes are 4 intervals.
    set.remove(&late.key());
    let (at_removal, clock) = (late.probes(), first.probes());
    first.probed(clock + 4).await;
    // A probe in flight at the removal may still arrive.
    assert!(
        late.probes() <= at_removal + 1,
        "{} {}",
        late.probes(),
        at_removal
    );
    server.abort();
}

/// The checks the builder spawned end with the balancer: no more probes.
#[tokio::test]
async fn dropping_the_balancer_stops_its_checks() {
    let (clock, watched) = (
        Counted::start(StatusCode::OK).await,
        Counted::start(StatusCode::OK).await,
    );
    let clock_set = quick(proxy::Builder::new())
        .build_backends([clock.key()])
        .unwrap();
    let api = quick(proxy::Builder::new()).build([watched.key()]).unwrap();
    watched.probed(2).await;
    drop(api);
    // `clock`'s checks go on: 4 more of its probes are 4 intervals.
    let (at_drop, t) = (watched.probes(), clock.probes());
    clock.probed(t + 4).await;
    assert!(
        watched.probes() <= at_drop + 1,
        "{} {at_drop}",
        watched.probes()
    );
    drop(clock_set);
}

/// Backends found by discovery are checked before they take traffic, like any other.
#[tokio::test]
async fn discovered_backends_are_checked() {
    let up = Counted::start(StatusCode::OK).await;
    let down = Counted::start(StatusCode::SERVICE_UNAVAILABLE).await;
    let set = quick(proxy::Builder::new())
        .build_backends(std::iter::empty())
        .unwrap();
    let client = proxy::Client::new();
    let changes = futures::stream::iter(
        [&up, &down]
            .map(|b| Ok::<_, BoxError>(Change::Insert(b.key(), client.make_backend(&b.key())))),
    );
    set.discover(changes).await.unwrap();
    wait_healthy(&set, &up.key(), true).await;
    down.probed(2).await;
    assert_eq!(set.is_healthy(&down.key()), Some(false));
}

fn scripted(
    up: Arc<std::sync::Mutex<Vec<&'static str>>>,
) -> impl Fn(&&'static str) -> futures::future::Ready<Result<(), BoxError>> + Unpin {
    move |target: &&'static str| {
        let pass = up.lock().unwrap().contains(target);
        futures::future::ready(if pass { Ok(()) } else { Err("down".into()) })
    }
}

fn settings() -> Settings {
    Settings {
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    }
}

/// Attaching takes the set's backends out of rotation until they pass; the stream ends
/// when the set is dropped.
#[tokio::test(start_paused = true)]
async fn attached_checks_follow_the_set_and_end_with_it() {
    let up = Arc::new(std::sync::Mutex::new(vec!["a"]));
    let set = Backends::new(RoundRobin::new());
    set.insert("a", ());
    set.insert("b", ()); // healthy: inserted before the checks
    let (checks, _handle) = HealthCheck::new(scripted(up.clone()), settings());
    let mut checks = checks.attach(&set);
    assert_eq!(set.is_healthy(&"a"), Some(false));
    assert_eq!(set.is_healthy(&"b"), Some(false));
    let t = checks.next().await.unwrap();
    assert_eq!((t.target, t.healthy), ("a", true));
    assert_eq!(set.is_healthy(&"a"), Some(true));

    // Health set by hand is put back at the next change of the set.
    set.set_healthy(&"b", true);
    let driver = tokio::spawn(checks.drive());
    within(set.wait_until(|s| s.iter().all(|(k, e)| e.is_healthy() == (*k == "a")))).await;

    // Removed and inserted again, now failing: a new backend, not the healthy one it
    // replaced. (The clock is paused: the sleep lets its first probe run, no more.)
    up.lock().unwrap().clear();
    set.update(|u| {
        u.remove(&"a");
        u.insert("a", ());
    });
    assert_eq!(set.is_healthy(&"a"), Some(false));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(set.is_healthy(&"a"), Some(false));
    up.lock().unwrap().push("a");
    within(set.wait_until(|s| s.iter().any(|(k, e)| *k == "a" && e.is_healthy()))).await;

    drop(set);
    within(driver).await.unwrap();
}

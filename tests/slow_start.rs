//! Slow start: a backend that joins, or turns healthy again, after the start ramps from a
//! tenth of its weight to all of it; backends healthy at start take their full weight at
//! once. The ramp's clock is tokio's, so paused time drives it in the library tests.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;
use tower::{Service, ServiceExt};
use tower_lb::balance::Snapshot;
use tower_lb::policy::{LeastConnections, Policy, RoundRobin};
use tower_lb::Backends;

const RAMP: Duration = Duration::from_secs(4);

/// Who gets `n` picks.
fn shares<P: Policy>(
    backends: &Backends<&'static str, (), P>,
    n: usize,
) -> HashMap<&'static str, usize> {
    let mut count = HashMap::new();
    for _ in 0..n {
        *count.entry(backends.pick(None).unwrap()).or_default() += 1;
    }
    count
}

fn warmup<P: Policy>(snapshot: &Snapshot<&'static str, (), P>, key: &str) -> Option<f64> {
    snapshot
        .iter()
        .find(|(k, _)| **k == key)
        .and_then(|(_, e)| e.warmup())
}

/// The set as a health-checked proxy builds it: backends present at the start join
/// unhealthy, slow start is turned on, then their first probes pass.
fn started<S, P>(policy: P, service: S) -> Backends<&'static str, S, P>
where
    S: Clone + Send + Sync + 'static,
    P: Policy,
{
    let backends = Backends::new(policy);
    backends.healthy_on_insert(false);
    backends.update(|set| {
        set.insert("a", service.clone());
        set.insert("b", service);
    });
    backends.slow_start(RAMP);
    backends.set_healthy(&"a", true);
    backends.set_healthy(&"b", true);
    backends
}

#[tokio::test(start_paused = true)]
async fn a_joining_backend_ramps_and_those_of_the_start_do_not() {
    let backends = started(RoundRobin::new(), ());
    let snapshot = backends.snapshot();
    assert!(snapshot.iter().all(|(_, e)| !e.is_warming()));
    assert_eq!(
        shares(&backends, 200),
        HashMap::from([("a", 100), ("b", 100)])
    );

    backends.insert("c", ());
    backends.set_healthy(&"c", true);
    let joined = tokio::time::Instant::now();
    assert_eq!(warmup(&backends.snapshot(), "c"), Some(0.1));
    // A tenth of its weight: 1 pick in 21 (weights 10, 10, 1).
    let first = shares(&backends, 210);
    assert_eq!(first[&"c"], 10, "{first:?}");

    // Halfway, about half its weight: the task republished the set at each step.
    tokio::time::sleep(RAMP / 2).await;
    let half = warmup(&backends.snapshot(), "c").unwrap();
    assert!((0.5..=0.6).contains(&half), "{half}");
    let middle = shares(&backends, 1000);
    assert!((170..=260).contains(&middle[&"c"]), "{middle:?}");

    // Then all of it, at the end of the ramp.
    within(backends.wait_until(|s| s.iter().all(|(_, e)| !e.is_warming()))).await;
    assert_eq!(joined.elapsed(), RAMP);
    assert_eq!(
        shares(&backends, 300),
        HashMap::from([("a", 100), ("b", 100), ("c", 100)])
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_back_from_unhealthy_ramps_again() {
    let backends = started(RoundRobin::new(), ());
    backends.set_healthy(&"b", false);
    backends.set_healthy(&"b", true);
    assert_eq!(warmup(&backends.snapshot(), "b"), Some(0.1));
    assert_eq!(warmup(&backends.snapshot(), "a"), None);
    // Time passes only while the task waits for its next step: the ramp ends on its own.
    within(backends.wait_until(|s| s.iter().all(|(_, e)| !e.is_warming()))).await;
}

#[tokio::test(start_paused = true)]
async fn least_connections_counts_a_warming_backend_as_lighter() {
    let backends = started(LeastConnections::new(), Hang);
    backends.insert("c", Hang);
    backends.set_healthy(&"c", true);
    // Requests held open: "c" takes one for every ten on "a" and on "b".
    let mut balance = tower_lb::Balance::new(backends.clone());
    let mut held = Vec::new();
    for _ in 0..210 {
        held.push(balance.ready().await.unwrap().call(()));
    }
    let in_flight = |key| backends.in_flight(&key).unwrap();
    assert_eq!(
        [in_flight("a"), in_flight("b"), in_flight("c")],
        [100, 100, 10]
    );
    drop(held);
    assert_eq!(in_flight("c"), 0);
}

/// A backend whose answers never come: a request on it stays in flight until dropped.
#[derive(Clone)]
struct Hang;

impl tower::Service<()> for Hang {
    type Response = ();
    type Error = std::convert::Infallible;
    type Future = std::future::Pending<Result<(), std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        std::future::pending()
    }
}

#[tokio::test(start_paused = true)]
async fn zero_is_off() {
    let backends = started(RoundRobin::new(), ());
    backends.slow_start(Duration::ZERO);
    backends.insert("c", ());
    backends.set_healthy(&"c", true);
    assert!(!backends.snapshot().iter().any(|(_, e)| e.is_warming()));
}

/// Through the proxy over sockets: a server added by a reload gets a small part of the
/// traffic at first and its share later; the servers of the start are not ramped.
#[tokio::test]
async fn a_server_added_by_reload_ramps_up() {
    let (a, b, c) = (
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    );
    let mut proxy = proxy(config(&[a.addr, b.addr], r#""slow_start": 2"#)).await;
    assert!(!proxy
        .backends()
        .snapshot()
        .iter()
        .any(|(_, e)| e.is_warming()));

    let mut next = config(&[a.addr, b.addr, c.addr], r#""slow_start": 2"#);
    next.listen = proxy.config().listen;
    proxy.apply(next).await;
    wait_health(&proxy, &c, true).await;

    let mut client = Client::connect(proxy.local_addr()).await;
    // At full weight "c" would take 20 of 60; warming, a few (a tenth of its weight at
    // first, more as the ramp goes on while the requests run).
    let first = count(&mut client, 60).await;
    let on_c = first.get(&c.authority()).copied().unwrap_or(0);
    assert!((1..=10).contains(&on_c), "{first:?}");

    within(
        proxy
            .backends()
            .wait_until(|s| s.iter().all(|(_, e)| !e.is_warming())),
    )
    .await;
    let later = count(&mut client, 60).await;
    assert_eq!(later[&c.authority()], 20, "{later:?}");
    proxy.shutdown().await.unwrap();
}

/// Who answers `n` requests.
async fn count(client: &mut Client, n: usize) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for _ in 0..n {
        *count.entry(client.get("/").await.1).or_default() += 1;
    }
    count
}

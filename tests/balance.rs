//! Service semantics of `Balance`, with tower-test mocks: readiness, picks, in-flight
//! bookkeeping under cancellation and failure, and set changes while requests are pending.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok, task};
use tower::discover::Change;
use tower::{Service, ServiceExt};
use tower_lb::balance::error::NoHealthyBackend;
use tower_lb::policy::{Algorithm, Hashing, LeastConnections, Policy, RoundRobin};
use tower_lb::{Backends, Balance};
use tower_test::mock;

type Mock = mock::Mock<&'static str, &'static str>;
type Handle = mock::Handle<&'static str, &'static str>;

fn mocks<P: Policy>(
    policy: P,
    names: &[&'static str],
) -> (Backends<&'static str, Mock, P>, Vec<Handle>) {
    let backends = Backends::new(policy);
    let mut handles = Vec::new();
    for name in names {
        let (svc, handle) = mock::pair();
        backends.insert(*name, svc);
        handles.push(handle);
    }
    (backends, handles)
}

/// How long a test waits for a request to reach a mock backend. A request that goes
/// elsewhere never arrives: the test fails instead of hanging.
const ARRIVAL: Duration = Duration::from_secs(1);

/// The next request to reach `handle`, within [`ARRIVAL`].
async fn next_request(
    handle: &mut Handle,
    name: &str,
) -> (&'static str, mock::SendResponse<&'static str>) {
    match tokio::time::timeout(ARRIVAL, handle.next_request()).await {
        Ok(Some(request)) => request,
        Ok(None) => panic!("backend {name:?}: its service was dropped"),
        Err(_) => panic!("no request reached backend {name:?} within {ARRIVAL:?}"),
    }
}

/// Answers the next request on `handle` with its own name; returns the request.
async fn answer(handle: &mut Handle, name: &'static str) -> &'static str {
    let (req, send) = next_request(handle, name).await;
    send.send_response(name);
    req
}

#[tokio::test]
async fn is_always_ready_and_fails_fast_without_backends() {
    let (backends, _) = mocks(RoundRobin::new(), &[]);
    let mut lb = Balance::new(backends.clone());
    // Ready even though nothing can take a request: readiness reserves nothing.
    let mut ready = task::spawn(lb.ready());
    assert_ready_ok!(ready.poll());
    drop(ready);
    let mut fut = task::spawn(lb.call("x"));
    let err = assert_ready_err!(fut.poll());
    assert!(err.is::<NoHealthyBackend>(), "{err}");
    assert_eq!(err.to_string(), "no healthy backend");
}

#[tokio::test]
async fn all_unhealthy_fails_at_once_and_recovers() {
    let (backends, mut handles) = mocks(RoundRobin::new(), &["a", "b"]);
    let lb = Balance::new(backends.clone());
    backends.set_healthy(&"a", false);
    backends.set_healthy(&"b", false);
    let mut fut = task::spawn(lb.clone().oneshot("x"));
    assert!(assert_ready_err!(fut.poll()).is::<NoHealthyBackend>());

    backends.set_healthy(&"b", true);
    let mut fut = task::spawn(lb.clone().oneshot("y"));
    assert_pending!(fut.poll());
    assert_eq!(answer(&mut handles[1], "b").await, "y");
    assert_eq!(assert_ready_ok!(fut.poll()), "b");
}

#[tokio::test]
async fn round_robin_per_request_across_clones() {
    let (backends, mut handles) = mocks(RoundRobin::new(), &["a", "b", "c"]);
    let lb = Balance::new(backends);
    let mut seen = Vec::new();
    for i in 0..7 {
        // A fresh clone each time, like one per connection: the rotation is shared.
        let mut fut = task::spawn(lb.clone().oneshot("req"));
        assert_pending!(fut.poll());
        let idx = i % 3;
        let name = ["a", "b", "c"][idx];
        answer(&mut handles[idx], name).await;
        seen.push(assert_ready_ok!(fut.poll()));
    }
    assert_eq!(seen, ["a", "b", "c", "a", "b", "c", "a"]);
}

#[tokio::test]
async fn least_connections_counts_until_completion_cancel_or_error() {
    let (backends, mut handles) = mocks(LeastConnections::new(), &["a", "b", "c"]);
    let lb = Balance::new(backends.clone());
    let in_flight = |b: &Backends<_, _, _>| ["a", "b", "c"].map(|k| b.in_flight(&k).unwrap());

    // Three held requests: one per backend (ties rotate).
    let mut a = task::spawn(lb.clone().oneshot("1"));
    let mut b = task::spawn(lb.clone().oneshot("2"));
    let mut c = task::spawn(lb.clone().oneshot("3"));
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    assert_pending!(c.poll());
    assert_eq!(in_flight(&backends), [1, 1, 1]);

    // "b" finishes: the next request goes to it, the least loaded.
    answer(&mut handles[1], "b").await;
    assert_eq!(assert_ready_ok!(b.poll()), "b");
    assert_eq!(in_flight(&backends), [1, 0, 1]);
    let mut d = task::spawn(lb.clone().oneshot("4"));
    assert_pending!(d.poll());
    assert_eq!(in_flight(&backends), [1, 1, 1]);

    // Cancelling a request (dropping its future) releases it.
    drop(a);
    assert_eq!(in_flight(&backends), [0, 1, 1]);

    // A failed request releases it.
    let (_, send) = next_request(&mut handles[2], "c").await;
    send.send_error("boom");
    assert_eq!(assert_ready_err!(c.poll()).to_string(), "boom");
    assert_eq!(in_flight(&backends), [0, 1, 0]);

    drop(d);
    assert_eq!(in_flight(&backends), [0, 0, 0]);

    // The counters: an answer is not a cancellation (a plain `Balance` has no status to
    // count it by), a dropped future is, and a failure is an error.
    let snapshot = backends.snapshot();
    let counts = |i| {
        let stats = snapshot.endpoint(i).unwrap().stats();
        (stats.requests(), stats.errors, stats.cancelled)
    };
    assert_eq!(
        [counts(0), counts(1), counts(2)],
        [(0, 0, 1), (0, 0, 1), (0, 1, 0)]
    );
}

#[tokio::test]
async fn a_backend_that_is_not_ready_holds_up_only_its_requests() {
    let (backends, mut handles) = mocks(RoundRobin::new(), &["slow", "fast"]);
    handles[0].allow(0);
    let lb = Balance::new(backends.clone());

    let mut stuck = task::spawn(lb.clone().oneshot("1"));
    assert_pending!(stuck.poll());
    // The next request goes to "fast" and completes while "slow" is still not ready.
    let mut ok = task::spawn(lb.clone().oneshot("2"));
    assert_pending!(ok.poll());
    answer(&mut handles[1], "fast").await;
    assert_eq!(assert_ready_ok!(ok.poll()), "fast");
    assert_eq!(backends.in_flight(&"slow"), Some(1));

    // Once ready, the waiting request goes through.
    handles[0].allow(1);
    assert!(stuck.is_woken());
    assert_pending!(stuck.poll());
    answer(&mut handles[0], "slow").await;
    assert_eq!(assert_ready_ok!(stuck.poll()), "slow");
    assert_eq!(backends.in_flight(&"slow"), Some(0));
}

#[tokio::test]
async fn a_readiness_error_retries_once_on_another_backend() {
    let (backends, mut handles) = mocks(RoundRobin::new(), &["bad", "good"]);
    handles[0].send_error("connect refused");
    let lb = Balance::new(backends.clone());
    // Picked for "bad", whose readiness fails before it got the request: "good" gets it.
    let mut fut = task::spawn(lb.clone().oneshot("1"));
    assert_pending!(fut.poll());
    assert_eq!(backends.in_flight(&"bad"), Some(0));
    assert_eq!(backends.in_flight(&"good"), Some(1));
    assert_eq!(answer(&mut handles[1], "good").await, "1");
    assert_eq!(assert_ready_ok!(fut.poll()), "good");
    assert_eq!(backends.in_flight(&"good"), Some(0));
}

#[tokio::test]
async fn a_readiness_error_after_waiting_retries_once_on_another_backend() {
    let (backends, mut handles) = mocks(RoundRobin::new(), &["slow", "good"]);
    handles[0].allow(0);
    let lb = Balance::new(backends.clone());
    // Picked for "slow", which is not ready: the request waits in the future.
    let mut fut = task::spawn(lb.clone().oneshot("1"));
    assert_pending!(fut.poll());
    assert_eq!(backends.in_flight(&"slow"), Some(1));
    // Then its readiness fails (a connect refused): "good" gets the request.
    handles[0].send_error("connect refused");
    assert!(fut.is_woken());
    assert_pending!(fut.poll());
    assert_eq!(backends.in_flight(&"slow"), Some(0));
    assert_eq!(answer(&mut handles[1], "good").await, "1");
    assert_eq!(assert_ready_ok!(fut.poll()), "good");
    assert_eq!(backends.in_flight(&"good"), Some(0));
}

#[tokio::test]
async fn a_readiness_error_with_nowhere_else_to_go_is_the_error() {
    let (backends, mut handles) = mocks(RoundRobin::new(), &["only"]);
    handles[0].send_error("connect refused");
    let lb = Balance::new(backends.clone());
    let mut fut = task::spawn(lb.clone().oneshot("1"));
    assert_eq!(assert_ready_err!(fut.poll()).to_string(), "connect refused");
    assert_eq!(backends.in_flight(&"only"), Some(0));

    // Two failing backends: one retry, then the second error.
    let (backends, mut handles) = mocks(RoundRobin::new(), &["a", "b", "c"]);
    handles[0].send_error("a refused");
    handles[1].send_error("b refused");
    let lb = Balance::new(backends.clone());
    let mut fut = task::spawn(lb.clone().oneshot("1"));
    assert_eq!(assert_ready_err!(fut.poll()).to_string(), "b refused");
    assert!(["a", "b", "c"]
        .iter()
        .all(|k| backends.in_flight(k) == Some(0)));
}

#[tokio::test]
async fn removed_between_pick_and_call_still_finishes_and_takes_nothing_new() {
    let (backends, mut handles) = mocks(RoundRobin::new(), &["old", "new"]);
    handles[0].allow(0);
    let lb = Balance::new(backends.clone());

    // Picked for "old", which is not ready yet: the backend call has not happened.
    let mut picked = task::spawn(lb.clone().oneshot("1"));
    assert_pending!(picked.poll());
    let old = backends.snapshot().endpoint(0).unwrap().clone();
    assert!(backends.remove(&"old"));

    // New requests go to "new" only.
    for _ in 0..3 {
        let mut fut = task::spawn(lb.clone().oneshot("n"));
        assert_pending!(fut.poll());
        answer(&mut handles[1], "new").await;
        assert_eq!(assert_ready_ok!(fut.poll()), "new");
    }

    // The removed backend drains: its request is called and completes, then it is idle.
    assert_eq!(old.in_flight(), 1);
    handles[0].allow(1);
    assert_pending!(picked.poll());
    assert_eq!(answer(&mut handles[0], "old").await, "1");
    assert_eq!(assert_ready_ok!(picked.poll()), "old");
    assert_eq!(old.in_flight(), 0);
}

#[tokio::test]
async fn staying_backends_keep_state_across_changes() {
    let (backends, _handles) = mocks(LeastConnections::new(), &["a", "b"]);
    let lb = Balance::new(backends.clone());
    let mut held = task::spawn(lb.clone().oneshot("1"));
    assert_pending!(held.poll());
    backends.set_healthy(&"b", false);

    // Membership, weight and policy changes around "a" and "b".
    let (c, _hc) = mock::pair();
    backends.update(|set| {
        set.insert("c", c);
        set.set_weight(&"a", 3);
        set.set_policy(LeastConnections::new());
    });
    assert_eq!(backends.in_flight(&"a"), Some(1));
    assert_eq!(backends.is_healthy(&"b"), Some(false));

    // Re-inserting a present key replaces its service but keeps its count and health.
    let (a2, _ha2) = mock::pair();
    backends.insert("a", a2);
    let (b2, _hb2) = mock::pair();
    backends.insert("b", b2);
    assert_eq!(backends.in_flight(&"a"), Some(1));
    assert_eq!(backends.is_healthy(&"b"), Some(false));
    drop(held);
    assert_eq!(backends.in_flight(&"a"), Some(0));
}

#[tokio::test]
async fn follows_a_discover_stream() {
    let backends = Backends::<&str, Mock, _>::new(RoundRobin::new());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Change<&str, Mock>, Infallible>>();
    let follow = tokio::spawn(backends.discover(tokio_stream_from(rx)));
    let (a, _ha) = mock::pair();
    let (b, _hb) = mock::pair();
    tx.send(Ok(Change::Insert("a", a))).unwrap();
    tx.send(Ok(Change::Insert("b", b))).unwrap();
    tx.send(Ok(Change::Remove("a"))).unwrap();
    drop(tx);
    follow.await.unwrap().unwrap();
    let keys: Vec<_> = backends.snapshot().iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, ["b"]);
}

/// The follower holds the set weakly: following a stream that never ends (as DNS does), it
/// does not keep the set alive, and ends once the set is dropped.
#[tokio::test]
async fn following_a_stream_that_never_ends_stops_with_the_set() {
    let backends = Backends::<&str, Mock, _>::new(RoundRobin::new());
    let never = futures::stream::pending::<Result<Change<&str, Mock>, Infallible>>();
    let follow = tokio::spawn(backends.discover(never));
    tokio::task::yield_now().await;
    assert!(!follow.is_finished());
    drop(backends);
    tokio::time::timeout(Duration::from_secs(5), follow)
        .await
        .expect("the follower outlived the set")
        .unwrap()
        .unwrap();
}

fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Which backend got the request just sent (exactly one must have); answers it.
fn routed(handles: &mut [Handle], names: &[&'static str]) -> usize {
    let mut got = Vec::new();
    for (i, handle) in handles.iter_mut().enumerate() {
        if let std::task::Poll::Ready(Some((_, send))) = handle.poll_request() {
            send.send_response(names[i]);
            got.push(i);
        }
    }
    assert_eq!(got.len(), 1, "the request reached {got:?}");
    got[0]
}

#[tokio::test]
async fn hashing_sends_a_key_to_the_same_backend() {
    const NAMES: [&str; 3] = ["a", "b", "c"];
    let keys: Vec<&'static str> = (0..60)
        .map(|i| &*Box::leak(format!("client-{i}").into_boxed_str()))
        .collect();
    // Two balancers over sets of the same backends: like two proxies in front of one pool.
    let mut owners = Vec::new();
    for _ in 0..2 {
        let (backends, mut handles) = mocks(Hashing::new(), &NAMES);
        let lb = Balance::new(backends.clone())
            .with_key(|req: &&str| Some(tower_lb::policy::stable_hash(*req)));
        let mut owner: HashMap<&str, usize> = HashMap::new();
        // Every key three times, interleaved with the others.
        for _ in 0..3 {
            for key in &keys {
                // Give tokio's cooperative budget back: mock handles are channels, which
                // report an exhausted budget as empty.
                tokio::task::yield_now().await;
                let mut fut = task::spawn(lb.clone().oneshot(*key));
                assert_pending!(fut.poll());
                let i = routed(&mut handles, &NAMES);
                assert_eq!(assert_ready_ok!(fut.poll()), NAMES[i]);
                assert_eq!(*owner.entry(key).or_insert(i), i, "{key} moved");
            }
        }
        owners.push(owner);
    }
    assert_eq!(
        owners[0], owners[1],
        "two sets of the same backends disagree"
    );
    // The keys spread over every backend.
    let mut share = [0; 3];
    for &i in owners[0].values() {
        share[i] += 1;
    }
    assert!(share.iter().all(|&n| n >= 8), "60 keys split {share:?}");
}

#[tokio::test]
async fn algorithm_can_be_switched_live() {
    let (backends, mut handles) = mocks(Algorithm::default(), &["a", "b"]);
    assert_eq!(backends.snapshot().policy().name(), "round_robin");
    let lb = Balance::new(backends.clone());
    let send = |lb: &Balance<_, _, _>| task::spawn(lb.clone().oneshot("req"));

    // Round robin: one request held on "a"; the turns go on regardless of load.
    let mut held = send(&lb);
    assert_pending!(held.poll());
    let (_, held_response) = next_request(&mut handles[0], "a").await;
    for (i, name) in [(1, "b"), (0, "a"), (1, "b")] {
        let mut fut = send(&lb);
        assert_pending!(fut.poll());
        answer(&mut handles[i], name).await;
        assert_eq!(assert_ready_ok!(fut.poll()), name);
    }

    // Least connections: while "a" holds its request, every new one goes to "b".
    backends.set_policy("least_connections".parse().unwrap());
    assert_eq!(backends.snapshot().policy().name(), "least_connections");
    for _ in 0..4 {
        let mut fut = send(&lb);
        assert_pending!(fut.poll());
        assert_eq!(
            backends.in_flight(&"b"),
            Some(1),
            "went to the busy backend"
        );
        answer(&mut handles[1], "b").await;
        assert_eq!(assert_ready_ok!(fut.poll()), "b");
    }

    // Back to round robin: both again, "a" still busy.
    backends.set_policy("round_robin".parse().unwrap());
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut fut = send(&lb);
        assert_pending!(fut.poll());
        let i = routed(&mut handles, &["a", "b"]);
        seen.push(assert_ready_ok!(fut.poll()));
        assert_eq!(seen.last(), Some(&["a", "b"][i]));
    }
    seen.sort_unstable();
    assert_eq!(seen, ["a", "b"]);

    held_response.send_response("a");
    assert_eq!(assert_ready_ok!(held.poll()), "a");
    assert_eq!(backends.in_flight(&"a"), Some(0));
}

//! A seeded randomized stress test of the balancer's bookkeeping: 200,000 operations mixing
//! inserts, removals, weight and health flips, policy switches, calls, completions, failures
//! and cancellations. After every operation the in-flight counters must add up to the
//! requests actually pending, and every request must have been sent to a backend that was
//! in the set and healthy when it was picked. At the end every counter is back to zero.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;
use tower::{Service, ServiceExt};
use tower_lb::balance::error::NoHealthyBackend;
use tower_lb::policy::{Algorithm, Endpoint};
use tower_lb::{Backends, Balance, BoxError};

type Reply = oneshot::Sender<Result<u32, BoxError>>;

/// A backend whose responses the test sends by hand; it records which backend was called.
#[derive(Clone)]
struct Backend {
    key: u32,
    calls: Arc<Mutex<Vec<(u32, Reply)>>>,
}

impl Service<()> for Backend {
    type Response = u32;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let (tx, rx) = oneshot::channel();
        self.calls.lock().unwrap().push((self.key, tx));
        Box::pin(async move { rx.await.map_err(|_| BoxError::from("backend went away"))? })
    }
}

type Fut = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

#[test]
fn bookkeeping_survives_200k_random_operations() {
    const OPS: usize = 200_000;
    const KEYS: u32 = 6;
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let backends: Backends<u32, Backend, Algorithm> = Backends::new(Algorithm::default());
    let lb = Balance::new(backends.clone()).with_key(|_: &()| None);
    let mut cx = Context::from_waker(Waker::noop());

    // Removed backends that still had requests in flight: their counts may only fall.
    let mut removed: Vec<Endpoint> = Vec::new();
    let mut finished: Vec<Fut> = Vec::new();
    // Requests whose future is alive, and the backend sender of each that got that far.
    let mut pending: Vec<Fut> = Vec::new();
    let mut replies: HashMap<usize, Reply> = HashMap::new();
    let mut next_id = 0usize;
    let mut ids: Vec<usize> = Vec::new();
    let (mut completed, mut failed, mut cancelled, mut unavailable) = (0, 0, 0, 0);

    for _ in 0..OPS {
        let key = rng.gen_range(0..KEYS);
        match rng.gen_range(0..100) {
            0..=4 => {
                let svc = Backend {
                    key,
                    calls: calls.clone(),
                };
                if rng.gen_bool(0.5) {
                    backends.insert(key, svc);
                } else {
                    backends.insert_with(key, svc, rng.gen_range(1..5), rng.gen_bool(0.8));
                }
            }
            5..=8 => {
                let snap = backends.snapshot();
                removed.extend(
                    snap.iter()
                        .filter(|(k, _)| **k == key)
                        .map(|(_, e)| e.clone()),
                );
                backends.remove(&key);
            }
            9..=14 => {
                backends.set_healthy(&key, rng.gen_bool(0.6));
            }
            15 => {
                backends.set_weight(&key, rng.gen_range(1..6));
            }
            16 => {
                let name = Algorithm::NAMES[rng.gen_range(0..Algorithm::NAMES.len())];
                backends.set_policy(name.parse().unwrap());
            }
            17..=54 => {
                // A call: the backend service is called on the first poll.
                let snap = backends.snapshot();
                let mut fut: Fut = Box::pin(lb.clone().oneshot(()));
                let before = calls.lock().unwrap().len();
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(Err(e)) => {
                        assert!(e.is::<NoHealthyBackend>());
                        assert!(
                            snap.iter().all(|(_, e)| !e.is_healthy()),
                            "503 with a healthy backend"
                        );
                        unavailable += 1;
                    }
                    Poll::Ready(Ok(_)) => panic!("no backend answered yet"),
                    Poll::Pending => {
                        let mut calls = calls.lock().unwrap();
                        assert_eq!(calls.len(), before + 1);
                        let (called, tx) = calls.pop().unwrap();
                        let healthy = snap.iter().any(|(k, e)| *k == called && e.is_healthy());
                        assert!(healthy, "request sent to {called}, not a healthy member");
                        replies.insert(next_id, tx);
                        ids.push(next_id);
                        next_id += 1;
                        pending.push(fut);
                    }
                }
            }
            55..=79 if !pending.is_empty() => {
                // The backend answers (or fails); the future completes.
                let i = rng.gen_range(0..pending.len());
                let tx = replies.remove(&ids[i]).unwrap();
                let ok = rng.gen_bool(0.8);
                let _ = tx.send(if ok {
                    Ok(1)
                } else {
                    Err("backend error".into())
                });
                let mut fut = pending.swap_remove(i);
                ids.swap_remove(i);
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(_)) => completed += 1,
                    Poll::Ready(Err(_)) => failed += 1,
                    Poll::Pending => panic!("answered request still pending"),
                }
                // A finished future that is kept around must not hold a count.
                if rng.gen_bool(0.5) {
                    finished.push(fut);
                }
            }
            80..=99 if !pending.is_empty() => {
                let i = rng.gen_range(0..pending.len());
                drop(pending.swap_remove(i));
                replies.remove(&ids.swap_remove(i));
                cancelled += 1;
            }
            _ => {}
        }
        removed.retain(|e| e.in_flight() > 0);
        let live: usize = backends.snapshot().iter().map(|(_, e)| e.in_flight()).sum();
        let draining: usize = removed.iter().map(Endpoint::in_flight).sum();
        assert_eq!(
            live + draining,
            pending.len(),
            "in-flight counters disagree with pending requests"
        );
    }

    drop(pending);
    drop(finished);
    for e in removed
        .iter()
        .chain(backends.snapshot().iter().map(|(_, e)| e))
    {
        assert_eq!(e.in_flight(), 0, "{e:?}");
    }
    // The run exercised every path.
    for (what, n) in [
        ("completed", completed),
        ("failed", failed),
        ("cancelled", cancelled),
        ("unavailable", unavailable),
    ] {
        assert!(n > 100, "only {n} {what}");
    }
}

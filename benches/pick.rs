//! Pick cost per policy and backend count: one `Snapshot::pick` on a warm snapshot; and the
//! cost of a whole request through `Balance` (pick, in-flight count up and down), where
//! least connections pays for keeping its tree ordered.
//!
//! `cargo bench --bench pick`

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::task::{Context, Poll};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tower::{Service, ServiceExt};
use tower_lb::policy::{stable_hash, Hashing, LeastConnections, PeakEwma, Policy, RoundRobin};
use tower_lb::{Backends, Balance};

const SIZES: [usize; 5] = [1, 10, 100, 1_000, 10_000];

fn set<S: Clone, P: Policy>(policy: P, n: usize, service: S) -> Backends<usize, S, P> {
    let backends = Backends::new(policy);
    backends.update(|set| {
        (0..n).for_each(|i| set.insert_with(i, service.clone(), 1 + (i % 3) as u32, true))
    });
    backends
}

fn bench_policy<P: Policy>(c: &mut Criterion, name: &str, policy: impl Fn() -> P) {
    let mut group = c.benchmark_group(format!("pick/{name}"));
    // Distinct keys, as from many clients; cycled so the key stream costs nothing.
    let keys: Vec<u64> = (0..4096u64).map(|i| stable_hash(&i)).collect();
    for n in SIZES {
        let backends = set(policy(), n, ());
        let snapshot = backends.snapshot();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(snapshot.pick(Some(keys[i])))
            })
        });
    }
    group.finish();
}

fn picks(c: &mut Criterion) {
    bench_policy(c, "round_robin", RoundRobin::new);
    bench_policy(c, "least_connections", LeastConnections::new);
    bench_policy(c, "hashing", Hashing::new);
    bench_policy(c, "peak_ewma", PeakEwma::new);
    bench_sampled_peak_ewma(c);
}

/// Peak EWMA once its backends have latency samples of their own: in `pick/peak_ewma` all
/// estimates are the default, so every comparison is settled without `exp`; here two
/// candidates' estimates differ and some comparisons need it.
fn bench_sampled_peak_ewma(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick/peak_ewma_sampled");
    for n in [10, 10_000] {
        let backends = set(PeakEwma::new(), n, Echo);
        let mut balance = Balance::new(backends.clone());
        for _ in 0..20 * n {
            futures::executor::block_on(async {
                let svc = balance.ready().await.unwrap();
                svc.call(1).await.unwrap()
            });
        }
        let snapshot = backends.snapshot();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(snapshot.pick(None)))
        });
    }
    group.finish();
}

/// A backend that answers at once.
#[derive(Clone, Copy)]
struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u64) -> Self::Future {
        ready(Ok(req))
    }
}

fn bench_request<P: Policy>(c: &mut Criterion, name: &str, policy: impl Fn() -> P) {
    let mut group = c.benchmark_group(format!("request/{name}"));
    for n in SIZES {
        let mut balance = Balance::new(set(policy(), n, Echo));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                futures::executor::block_on(async {
                    let svc = balance.ready().await.unwrap();
                    black_box(svc.call(1).await.unwrap())
                })
            })
        });
    }
    group.finish();
}

fn requests(c: &mut Criterion) {
    bench_request(c, "round_robin", RoundRobin::new);
    bench_request(c, "least_connections", LeastConnections::new);
    bench_request(c, "peak_ewma", PeakEwma::new);
}

criterion_group!(benches, picks, requests);
criterion_main!(benches);

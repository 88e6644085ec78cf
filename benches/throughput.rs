//! Calls through one shared balancer from 2 threads at once, over mock backends that answer
//! immediately, against the peer to beat: `tower::balance::p2c::Balance` behind `Buffer`
//! (p2c is not `Clone`, so sharing it needs the buffer's channel and worker task).
//!
//! Both run on the same 2-worker tokio runtime, with 2 tasks making `CALLS` sequential calls
//! each; the measured time is for all `2 × CALLS` calls.
//!
//! `cargo bench --bench throughput`

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tower::balance::p2c;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::Constant;
use tower::{Service, ServiceExt};
use tower_lb::policy::{LeastConnections, RoundRobin};
use tower_lb::{Backends, Balance, BoxError};

const CALLS: u64 = 10_000;
const BACKENDS: usize = 8;
const TASKS: u64 = 2;

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

/// Runs `TASKS` tasks of `CALLS` calls each on clones of `svc`; returns the wall time.
fn run<S>(rt: &tokio::runtime::Runtime, svc: S, iters: u64) -> Duration
where
    S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    rt.block_on(async move {
        let start = Instant::now();
        for _ in 0..iters {
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let mut svc = svc.clone();
                    tokio::spawn(async move {
                        for i in 0..CALLS {
                            let r = svc.ready().await.unwrap().call(i).await.unwrap();
                            assert_eq!(r, i);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
        start.elapsed()
    })
}

fn shared_calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("calls_2_threads");
    group.throughput(Throughput::Elements(TASKS * CALLS));
    group.sample_size(20);

    let rr = Balance::new(Backends::from_services(
        RoundRobin::new(),
        (0..BACKENDS).map(|i| (i, Echo)),
    ));
    group.bench_function(BenchmarkId::new("tower_lb", "round_robin"), |b| {
        b.iter_custom(|iters| run(&rt, rr.clone(), iters))
    });

    let lc = Balance::new(Backends::from_services(
        LeastConnections::new(),
        (0..BACKENDS).map(|i| (i, Echo)),
    ));
    group.bench_function(BenchmarkId::new("tower_lb", "least_connections"), |b| {
        b.iter_custom(|iters| run(&rt, lc.clone(), iters))
    });

    let p2c = rt.block_on(async {
        let list = ServiceList::new((0..BACKENDS).map(|_| Constant::new(Echo, 0)));
        Buffer::new(p2c::Balance::new(list), 1024)
    });
    group.bench_function(BenchmarkId::new("tower_p2c_buffer", "p2c"), |b| {
        b.iter_custom(|iters| run(&rt, p2c.clone(), iters))
    });
    group.finish();
}

criterion_group!(benches, shared_calls);
criterion_main!(benches);

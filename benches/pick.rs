//! Pick cost per policy and backend count: one `Snapshot::pick` on a warm snapshot.
//!
//! `cargo bench --bench pick`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tower_lb::policy::{stable_hash, Hashing, LeastConnections, Policy, RoundRobin};
use tower_lb::Backends;

const SIZES: [usize; 5] = [1, 8, 64, 1_024, 10_000];

fn set<P: Policy>(policy: P, n: usize) -> Backends<usize, (), P> {
    let backends = Backends::new(policy);
    backends.update(|set| (0..n).for_each(|i| set.insert_with(i, (), 1 + (i % 3) as u32, true)));
    backends
}

fn bench_policy<P: Policy>(c: &mut Criterion, name: &str, policy: impl Fn() -> P) {
    let mut group = c.benchmark_group(format!("pick/{name}"));
    // Distinct keys, as from many clients; cycled so the key stream costs nothing.
    let keys: Vec<u64> = (0..4096u64).map(|i| stable_hash(&i)).collect();
    for n in SIZES {
        let backends = set(policy(), n);
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
}

criterion_group!(benches, picks);
criterion_main!(benches);

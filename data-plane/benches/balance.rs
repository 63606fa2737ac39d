//! Cost of one pick per strategy at 100 backends, the size the request path must stay cheap at.
//! Every backend is usable and the in-flight counts and latencies vary, so the strategies that
//! compare backends do real comparisons rather than short-circuiting on ties.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use data_plane::policy::balance::{Balancer, Candidates, hash_bytes};

const BACKENDS: usize = 100;

struct View {
    usable: Vec<bool>,
    in_flight: Vec<u32>,
    latency_us: Vec<u64>,
}

impl View {
    fn new(n: usize) -> View {
        // Fixed, spread-out values: deterministic across runs, so numbers compare between builds.
        View {
            usable: vec![true; n],
            in_flight: (0..n).map(|i| ((i * 7) % 13) as u32).collect(),
            latency_us: (0..n).map(|i| 500 + ((i * 37) % 101) as u64 * 20).collect(),
        }
    }
}

impl Candidates for View {
    fn len(&self) -> usize {
        self.usable.len()
    }
    fn usable(&self, i: usize) -> bool {
        self.usable[i]
    }
    fn in_flight(&self, i: usize) -> u32 {
        self.in_flight[i]
    }
    fn latency_us(&self, i: usize) -> u64 {
        self.latency_us[i]
    }
}

fn pick_100_backends(c: &mut Criterion) {
    let addresses: Vec<String> = (0..BACKENDS)
        .map(|i| format!("10.1.{}.{}:8080", i / 250, i % 250 + 1))
        .collect();
    let ids: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let weights: Vec<u32> = (0..BACKENDS).map(|i| (i % 5) as u32 + 1).collect();
    let view = View::new(BACKENDS);
    // Precomputed client hashes: the bench measures the pick, not hashing the client address.
    let affinities: Vec<u64> = (0..1024u32)
        .map(|i| hash_bytes(format!("192.0.2.{}:{}", i % 256, i).as_bytes()))
        .collect();

    let mut group = c.benchmark_group("pick_100_backends");
    for strategy in lb_proto::validate::STRATEGIES {
        let balancer = Balancer::build(strategy, &ids, &weights);
        let mut k = 0usize;
        group.bench_function(*strategy, |b| {
            b.iter(|| {
                k = (k + 1) % affinities.len();
                black_box(balancer.pick(black_box(&view), affinities[k]))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pick_100_backends);
criterion_main!(benches);

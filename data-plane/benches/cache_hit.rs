//! Cost of the pure parts of a cache hit and a fill: the response built from a stored entry
//! (fields cloned, `Age`, `X-Cache`, `Cache-Status`), `Cache-Status` on its own, and the
//! storage decision for a typical response. The entry is a 100-byte JSON body with the fields a
//! backend commonly sends, so numbers compare between builds.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use data_plane::cache::policy::{self, Freshness, Storable};
use data_plane::cache::{Entry, Policy, status};
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};

const NOW: u64 = 1_700_000_000_000;

fn response_fields() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("content-length", "100"),
        (
            "cache-control",
            "public, max-age=60, stale-while-revalidate=30",
        ),
        ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
        ("etag", "\"5f2b-1a\""),
        ("last-modified", "Tue, 14 Nov 2023 20:00:00 GMT"),
        ("vary", "accept-encoding"),
        ("server", "backend"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn entry() -> Entry {
    let fields = response_fields();
    let storable = Storable {
        freshness: Freshness {
            fresh_until_ms: NOW + 60_000,
            stale_while_revalidate_until_ms: NOW + 90_000,
            stale_if_error_until_ms: NOW + 60_000,
            keep_until_ms: NOW + 690_000,
        },
        public: true,
        vary: vec![HeaderName::from_static("accept-encoding")],
        initial_age_ms: 0,
        strip: Vec::new(),
    };
    Entry::new(
        StatusCode::OK,
        &fields,
        Bytes::from(vec![b'x'; 100]),
        storable,
        "/data",
        NOW,
    )
}

fn bench(c: &mut Criterion) {
    let e = entry();
    let req = HeaderMap::new();
    c.bench_function("hit response", |b| {
        b.iter(|| black_box(e.response(black_box(&req), false, NOW + 1_500)))
    });
    c.bench_function("cache-status of a hit", |b| {
        b.iter(|| {
            black_box(status::hit(status::ttl_s(
                black_box(NOW + 60_000),
                NOW + 1_500,
            )))
        })
    });
    let fields = response_fields();
    let p = Policy {
        enabled: true,
        ..Policy::default()
    };
    c.bench_function("storage decision", |b| {
        b.iter(|| {
            black_box(policy::storable_exchange(
                StatusCode::OK,
                black_box(&fields),
                false,
                &p,
                NOW - 2,
                NOW,
            ))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

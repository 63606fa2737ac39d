//! The shared response cache, end to end: data planes in this process (their configuration
//! applied directly), one Redis of the test's own where they share it, in front of backends
//! whose `/cacheable` answers with the caching rules a test asks for.

#[path = "support/backends.rs"]
mod backends;
#[path = "support/dp.rs"]
mod dp;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/scripted.rs"]
mod scripted;

use std::sync::atomic::Ordering;

use backends::{Backends, Faults};
use bytes::Bytes;
use dp::common::{Reply, get, get_with, http_client, send};
use dp::{Dp, poll_until, wait_until};
use http_body_util::{BodyExt, Full};
use lb_proto::v1::*;
use redis_server::RedisServer;
use scripted::Scripted;

fn cache_on(s: &mut ConfigSnapshot) {
    s.cache = Some(CachePolicy {
        enabled: true,
        ..lb_proto::defaults::cache()
    });
}

/// Three backends and `n` data planes with the cache on, sharing `redis` when given.
async fn fleet(redis: Option<&RedisServer>, n: usize) -> (Backends, Vec<Dp>) {
    let backends = Backends::start(3).await;
    let mut snapshot = dp::snapshot(&backends.addrs());
    cache_on(&mut snapshot);
    let mut dps = Vec::new();
    for _ in 0..n {
        let url = redis.map(RedisServer::url);
        dps.push(Dp::start(move |s| s.redis = url, snapshot.clone()).await);
    }
    (backends, dps)
}

fn x_cache(r: &Reply) -> &str {
    r.header("x-cache")
}

fn x_cache_in(h: &http::HeaderMap) -> &str {
    h.get("x-cache").map_or("", |v| v.to_str().unwrap())
}

/// A GET of `path` from `dp`, for a resource clients reach on every data plane under one name
/// (the Host is part of the key).
fn shared_name(dp: &Dp, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(dp.url(path))
        .header("host", "api.example.com")
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn filled_through_one_data_plane_is_a_hit_through_another() {
    let redis = RedisServer::start().await;
    let (backends, dps) = fleet(Some(&redis), 2).await;
    let client = http_client();
    let a = send(&client, shared_name(&dps[0], "/cacheable?max_age=60")).await;
    assert_eq!((a.status, x_cache(&a)), (200, "MISS"));
    // The fill lands in Redis just after the body; wait for it rather than for a time.
    redis.wait_for_cache_entries(1).await;
    let b = send(&client, shared_name(&dps[1], "/cacheable?max_age=60")).await;
    assert_eq!(x_cache(&b), "HIT");
    assert!(b.headers.contains_key("age"));
    assert_eq!(a.body, b.body, "the same stored response");
    assert_eq!(
        backends.served("/cacheable"),
        1,
        "the backend saw one request"
    );
}

#[tokio::test]
async fn a_stampede_of_two_hundred_misses_sends_one_request() {
    let redis = RedisServer::start().await;
    let (backends, dps) = fleet(Some(&redis), 2).await;
    let client = http_client();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (client, req) = (
                client.clone(),
                shared_name(&dps[i % 2], "/cacheable?max_age=60&stampede=1"),
            );
            tokio::spawn(async move { send(&client, req).await })
        })
        .collect();
    let mut labels = std::collections::BTreeMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        *labels.entry(x_cache(&r).to_owned()).or_insert(0) += 1;
    }
    let stats: Vec<String> = dps
        .iter()
        .map(|d| format!("{:?}", d.shared.cache.stats()))
        .collect();
    assert_eq!(
        backends.served("/cacheable"),
        1,
        "backend requests for 200 concurrent misses over two data planes: {labels:?} {stats:#?}"
    );
}

#[tokio::test]
async fn http_caching_rules_are_honoured() {
    let (_backends, dps) = fleet(None, 1).await;
    let client = http_client();
    let dp = &dps[0];
    let twice = |url: String| {
        let client = client.clone();
        async move {
            let first = get(&client, &url).await;
            let second = get(&client, &url).await;
            (first, second)
        }
    };
    // no-store and private are never stored.
    for cc in ["no-store", "private,%20max-age=60"] {
        let (a, b) = twice(dp.url(&format!("/cacheable?cc={cc}"))).await;
        assert_eq!((x_cache(&a), x_cache(&b)), ("MISS", "MISS"), "{cc}");
    }
    // Vary: each value of the varied header is its own entry.
    let vary = |v: &str| {
        http::Request::get(dp.url("/cacheable?max_age=60&vary=x-lang"))
            .header("x-lang", v)
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let en = send(&client, vary("en")).await;
    let fr = send(&client, vary("fr")).await;
    assert_eq!((x_cache(&en), x_cache(&fr)), ("MISS", "MISS"));
    let en2 = send(&client, vary("en")).await;
    assert_eq!(x_cache(&en2), "HIT");
    assert_eq!(en2.json()["vary_value"], "en");
    // With Authorization, only an explicitly public response is shared.
    let twice_with_auth = |path: &str| {
        let (client, url) = (client.clone(), dp.url(path));
        async move {
            let auth = [("authorization", "Basic dXNlcjpwYXNz")];
            let first = send(&client, get_with(&url, &auth)).await;
            let second = send(&client, get_with(&url, &auth)).await;
            (x_cache(&first).to_owned(), x_cache(&second).to_owned())
        }
    };
    assert_eq!(
        twice_with_auth("/cacheable?cc=max-age=60").await,
        ("MISS".into(), "MISS".into()),
        "not public: not shared"
    );
    assert_eq!(
        twice_with_auth("/cacheable?cc=public,%20max-age=60").await,
        ("MISS".into(), "HIT".into()),
        "public: shared"
    );
    // POST is not cached.
    let post = send(
        &client,
        http::Request::post(dp.url("/cacheable"))
            .body(Full::new(Bytes::from("x")))
            .unwrap(),
    )
    .await;
    assert_eq!(x_cache(&post), "BYPASS");
}

#[tokio::test]
async fn stale_if_error_serves_stale_inside_its_window_only() {
    let (backends, dps) = fleet(None, 1).await;
    let client = http_client();
    let dp = &dps[0];
    let within = "/cacheable?cc=max-age=0,%20stale-if-error=300";
    let without = "/cacheable?cc=max-age=0";
    assert_eq!(get(&client, &dp.url(within)).await.status, 200);
    assert_eq!(get(&client, &dp.url(without)).await.status, 200);
    backends.set_faults(&Faults {
        error_status: 503,
        ..Faults::default()
    });
    let r = get(&client, &dp.url(within)).await;
    assert_eq!((r.status, x_cache(&r)), (200, "STALE"));
    let r = get(&client, &dp.url(without)).await;
    assert!(
        r.status >= 500,
        "outside any stale window: an error ({})",
        r.status
    );
}

#[tokio::test]
async fn redis_dying_leaves_the_memory_tier_serving() {
    let mut redis = RedisServer::start().await;
    let (_backends, dps) = fleet(Some(&redis), 1).await;
    let client = http_client();
    let dp = &dps[0];
    assert_eq!(
        get(&client, &dp.url("/cacheable?max_age=60")).await.status,
        200
    );
    // The entry is stored once its body has gone to the client, by a task of its own.
    let url = dp.url("/cacheable?max_age=60");
    poll_until("the entry stored", || async {
        match x_cache(&get(&client, &url).await) {
            "HIT" => Ok(()),
            label => Err(label.to_owned()),
        }
    })
    .await;
    redis.kill();
    for _ in 0..20 {
        let r = get(&client, &dp.url("/cacheable?max_age=60")).await;
        assert_eq!((r.status, x_cache(&r)), (200, "HIT"));
    }
    for i in 0..10 {
        let r = get(&client, &dp.url(&format!("/cacheable?max_age=60&n={i}"))).await;
        assert_eq!(r.status, 200);
    }
}

#[tokio::test]
async fn purge_by_prefix_reaches_both_tiers_on_every_data_plane() {
    let redis = RedisServer::start().await;
    let (_backends, dps) = fleet(Some(&redis), 2).await;
    let client = http_client();
    for dp in &dps {
        for path in ["/cacheable?max_age=300&p=a", "/cacheable?max_age=300&p=b"] {
            get(&client, &dp.url(path)).await;
        }
    }
    for dp in &dps {
        for path in ["/cacheable?max_age=300&p=a", "/cacheable?max_age=300&p=b"] {
            assert_eq!(x_cache(&get(&client, &dp.url(path)).await), "HIT");
        }
    }
    // The purge travels as a directive in the next configuration, to every data plane.
    let purge = Directive {
        seq: 1,
        kind: Some(directive::Kind::Purge(CachePurge {
            target: Some(cache_purge::Target::PathPrefix("/cache".into())),
        })),
    };
    for dp in &dps {
        dp.update(|s| s.directives.push(purge.clone()));
    }
    // The purge runs as each data plane applies the snapshot; it is done when a lookup misses.
    // Each data plane checks a path of its own: a miss refills Redis, where the other data
    // plane would find it.
    for (dp, path) in dps.iter().zip(["p=a", "p=b"]) {
        let url = dp.url(&format!("/cacheable?max_age=300&{path}"));
        poll_until(&format!("a miss for {url} after the purge"), || async {
            match x_cache(&get(&client, &url).await) {
                "MISS" => Ok(()),
                label => Err(label.to_owned()),
            }
        })
        .await;
    }
}

/// Reads at least `n` bytes of a body that must not end.
async fn read_at_least(body: &mut hyper::body::Incoming, n: usize) {
    let mut got = 0;
    while got < n {
        let frame = body.frame().await.expect("the body ended").unwrap();
        got += frame.data_ref().map_or(0, Bytes::len);
    }
}

#[tokio::test]
async fn a_cacheable_answer_that_never_ends_streams_through_and_is_not_kept() {
    const LIMIT: u64 = 64 << 10;
    // `/endless`: a cacheable, chunked answer that never ends (until the socket fails).
    let backend = Scripted::start().await;
    let mut snapshot = dp::snapshot(&[backend.addr]);
    snapshot.cache = Some(CachePolicy {
        enabled: true,
        max_entry_bytes: LIMIT,
        ..lb_proto::defaults::cache()
    });
    let dp = Dp::start(|_| {}, snapshot).await;
    let client = http_client();
    let endless = || {
        let client = client.clone();
        let url = dp.url("/endless");
        async move {
            let req = http::Request::get(url).body(Full::default()).unwrap();
            client.request(req).await.unwrap()
        }
    };
    let open = &backend.streaming;

    // The first request leads the fill; a second one for the same key waits on it.
    let mut first = endless().await;
    assert_eq!(
        (first.status().as_u16(), x_cache_in(first.headers())),
        (200, "MISS")
    );
    read_at_least(first.body_mut(), (LIMIT / 4) as usize).await;
    let second = tokio::spawn(endless());
    // The first body outgrows the entry size: it keeps streaming, the fill is given up and the
    // waiting request goes to the backend itself rather than hang.
    read_at_least(first.body_mut(), 4 * LIMIT as usize).await;
    let mut second = second.await.unwrap();
    assert_eq!(second.status(), 200);
    read_at_least(second.body_mut(), 2 * LIMIT as usize).await;

    // Clients gone: the proxy drops both backend streams rather than read them forever.
    drop((first, second));
    wait_until("the backend streams to close", || {
        open.load(Ordering::SeqCst) == 0
    })
    .await;

    // Nothing was kept, and the resource now passes the cache by (for `PASS_MEMO`) rather
    // than lead another fill; it still streams.
    let mut third = endless().await;
    assert_eq!(
        (third.status().as_u16(), x_cache_in(third.headers())),
        (200, "MISS")
    );
    read_at_least(third.body_mut(), 2 * LIMIT as usize).await;
    drop(third);
    let stats = dp.shared.cache.stats();
    assert_eq!((stats.stored, stats.memory.bytes), (0, 0), "{stats:?}");
    assert!(stats.not_stored >= 1 && stats.passes >= 1, "{stats:?}");
    wait_until("the backend streams to close", || {
        open.load(Ordering::SeqCst) == 0
    })
    .await;
}

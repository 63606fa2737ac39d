//! The shared response cache, end to end: two data planes on one Redis in front of the mock
//! backends.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::redis_server::RedisServer;
use common::*;
use http_body_util::{BodyExt, Full};
use lb_proto::v1::*;
use mock_backends::Faults;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fleet {
    mock: mock_backends::MockBackends,
    _cp: Cp,
    dps: Vec<Dp>,
}

async fn fleet(redis: Option<&RedisServer>, n: usize) -> Fleet {
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 3])
        .await
        .unwrap();
    let mut snapshot = snapshot_with(&mock.addrs());
    snapshot.cache = Some(CachePolicy {
        enabled: true,
        ..lb_proto::defaults::cache()
    });
    let cp = Cp::start(snapshot, None).await;
    let mut dps = Vec::new();
    for i in 0..n {
        let url = redis.map(RedisServer::url);
        let dp = Dp::start_with(&cp.url(), &format!("dp-{i}"), move |s| s.redis = url).await;
        dp.wait_version(1).await;
        dps.push(dp);
    }
    Fleet { mock, _cp: cp, dps }
}

impl Fleet {
    /// How many times the backends served `path`.
    fn served(&self, path: &str) -> u64 {
        self.mock
            .backends()
            .iter()
            .map(|b| b.stats().by_path.get(path).copied().unwrap_or(0))
            .sum()
    }
}

/// Waits until Redis holds at least `n` cache entries.
async fn wait_for_entries(redis: &RedisServer, n: usize) {
    let mut conn = redis.conn().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("lb:cache:{*")
            .query_async(&mut conn)
            .await
            .unwrap();
        if keys.iter().filter(|k| !k.contains(":lock:")).count() >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cache entry reached redis: {keys:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn x_cache(r: &Reply) -> &str {
    x_cache_in(&r.headers)
}

fn x_cache_in(h: &http::HeaderMap) -> &str {
    h.get("x-cache").map_or("", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn filled_through_one_data_plane_is_a_hit_through_another() {
    let redis = RedisServer::start().await;
    let f = fleet(Some(&redis), 2).await;
    let client = http_client();
    // Clients reach every data plane under one name: the Host is part of the key.
    let request = |dp: &Dp| {
        http::Request::get(dp.url("/cacheable?max_age=60"))
            .header("host", "api.example.com")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let a = send(&client, request(&f.dps[0])).await;
    assert_eq!((a.status, x_cache(&a)), (200, "MISS"));
    // The fill lands in Redis just after the body; wait for it rather than for a time.
    wait_for_entries(&redis, 1).await;
    let b = send(&client, request(&f.dps[1])).await;
    assert_eq!(x_cache(&b), "HIT");
    assert!(b.headers.contains_key("age"));
    assert_eq!(a.body, b.body, "the same stored response");
    assert_eq!(f.served("/cacheable"), 1, "the backend saw one request");
}

#[tokio::test]
async fn a_stampede_of_two_hundred_misses_sends_one_request() {
    let redis = RedisServer::start().await;
    let f = fleet(Some(&redis), 2).await;
    let client = http_client();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            let url = f.dps[i % 2].url("/cacheable?max_age=60&stampede=1");
            tokio::spawn(async move {
                let req = http::Request::get(url)
                    .header("host", "api.example.com")
                    .body(Full::<Bytes>::default())
                    .unwrap();
                send(&client, req).await
            })
        })
        .collect();
    let mut labels = std::collections::BTreeMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        *labels.entry(x_cache(&r).to_owned()).or_insert(0) += 1;
    }
    let served = f.served("/cacheable");
    let stats: Vec<String> = f
        .dps
        .iter()
        .map(|d| format!("{:?}", d.shared.cache.stats()))
        .collect();
    assert!(
        served <= 2,
        "{served} backend requests for 200 concurrent misses: {labels:?} {stats:#?}"
    );
}

#[tokio::test]
async fn http_caching_rules_are_honoured() {
    let f = fleet(None, 1).await;
    let client = http_client();
    let dp = &f.dps[0];
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
    let with_auth = |path: &str| {
        http::Request::get(dp.url(path))
            .header("authorization", "Basic dXNlcjpwYXNz")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let p1 = send(&client, with_auth("/cacheable?cc=max-age=60")).await;
    let p2 = send(&client, with_auth("/cacheable?cc=max-age=60")).await;
    assert_eq!(
        (x_cache(&p1), x_cache(&p2)),
        ("MISS", "MISS"),
        "not public: not shared"
    );
    let q1 = send(&client, with_auth("/cacheable?cc=public,%20max-age=60")).await;
    let q2 = send(&client, with_auth("/cacheable?cc=public,%20max-age=60")).await;
    assert_eq!(
        (x_cache(&q1), x_cache(&q2)),
        ("MISS", "HIT"),
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
    let f = fleet(None, 1).await;
    let client = http_client();
    let dp = &f.dps[0];
    let within = "/cacheable?cc=max-age=0,%20stale-if-error=300";
    let without = "/cacheable?cc=max-age=0";
    assert_eq!(get(&client, &dp.url(within)).await.status, 200);
    assert_eq!(get(&client, &dp.url(without)).await.status, 200);
    for b in f.mock.backends() {
        b.set_faults(Faults {
            error_status: 503,
            ..Faults::default()
        });
    }
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
    let f = fleet(Some(&redis), 1).await;
    let client = http_client();
    let dp = &f.dps[0];
    assert_eq!(
        get(&client, &dp.url("/cacheable?max_age=60")).await.status,
        200
    );
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
    let f = fleet(Some(&redis), 2).await;
    let client = http_client();
    for dp in &f.dps {
        for path in ["/cacheable?max_age=300&p=a", "/cacheable?max_age=300&p=b"] {
            get(&client, &dp.url(path)).await;
        }
    }
    for dp in &f.dps {
        for path in ["/cacheable?max_age=300&p=a", "/cacheable?max_age=300&p=b"] {
            assert_eq!(x_cache(&get(&client, &dp.url(path)).await), "HIT");
        }
    }
    let mut admin = f._cp.admin(Some(TOKEN)).await;
    let v = admin
        .purge_cache(CachePurge {
            target: Some(cache_purge::Target::PathPrefix("/cache".into())),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    for dp in &f.dps {
        dp.wait_version(v).await;
    }
    // The purge runs as each data plane applies the snapshot; it is done when a lookup misses.
    // Each data plane checks a path of its own: a miss refills Redis, where the other data
    // plane would find it.
    for (dp, path) in f.dps.iter().zip(["p=a", "p=b"]) {
        let url = dp.url(&format!("/cacheable?max_age=300&{path}"));
        let mut label = String::new();
        for _ in 0..200 {
            label = x_cache(&get(&client, &url).await).to_owned();
            if label == "MISS" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(label, "MISS", "purged on every data plane: {url}");
    }
    let bad = admin
        .purge_cache(CachePurge {
            target: Some(cache_purge::Target::PathPrefix("no-slash".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

/// A backend whose `GET /endless` answer is cacheable, chunked and never ends (until the socket
/// fails); anything else gets a small 200. Counts the endless answers still being written.
async fn endless_backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&open);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let open = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut read = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut read).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&read[..n]),
                        }
                    };
                    let endless = buf.starts_with(b"GET /endless ");
                    buf.drain(..end);
                    if !endless {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    open.fetch_add(1, Ordering::SeqCst);
                    let head = b"HTTP/1.1 200 OK\r\ncache-control: public, max-age=60\r\n\
                                 transfer-encoding: chunked\r\n\r\n";
                    let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
                    if s.write_all(head).await.is_ok() {
                        while s.write_all(chunk.as_bytes()).await.is_ok() {}
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            });
        }
    });
    (addr, open)
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
    let (backend, open) = endless_backend().await;
    let mut snapshot = snapshot_with(&[backend]);
    snapshot.cache = Some(CachePolicy {
        enabled: true,
        max_entry_bytes: LIMIT,
        ..lb_proto::defaults::cache()
    });
    let cp = Cp::start(snapshot, None).await;
    let dp = Dp::start(&cp.url(), "dp-0").await;
    dp.wait_version(1).await;
    let client = http_client();
    let endless = || {
        let client = client.clone();
        let url = dp.url("/endless");
        async move {
            let req = http::Request::get(url).body(Full::default()).unwrap();
            client.request(req).await.unwrap()
        }
    };

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
    eventually("the backend streams to close", || {
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
    eventually("the backend streams to close", || {
        open.load(Ordering::SeqCst) == 0
    })
    .await;
}

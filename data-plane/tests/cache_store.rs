//! The response cache against a real Redis: the shared tier's records, keys that keep
//! credentials out of Redis, single flight across two data planes, purges of both tiers, and
//! falling back to the memory tier when Redis goes away.

#[path = "support/redis_server.rs"]
mod redis_server;
use redis_server::RedisServer;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use data_plane::cache::key::{self, CacheKey};
use data_plane::cache::shared::{self, INDEX_PATHS};
use data_plane::cache::{
    Cache, CacheRequest, Entry, Fill, Lookup, Policy, Purge, SharedError, Tier, policy,
};
use data_plane::redis::RedisConn;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use tokio::task::JoinSet;

const NOW: u64 = 1_700_000_000_000;

fn policy() -> Policy {
    Policy {
        enabled: true,
        ignored_query_params: Vec::new(),
        coalesce_timeout_ms: 60_000,
        ..Policy::default()
    }
}

fn h(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    m
}

fn req(cache: &Cache, path: &str, headers: &HeaderMap) -> CacheRequest {
    let uri: Uri = format!("http://example.com{path}").parse().unwrap();
    cache.request(&Method::GET, &uri, headers).unwrap()
}

fn lead(l: Lookup) -> Fill {
    match l {
        Lookup::Lead(f) => f,
        Lookup::Hit(h) => panic!("expected to lead, got a hit from {:?}", h.tier),
        Lookup::Pass(p) => panic!("expected to lead, got a pass: {:?}", p.reason),
    }
}

fn hit_tier(l: Lookup) -> (Tier, Bytes) {
    match l {
        Lookup::Hit(h) => (h.tier, h.entry.body.clone()),
        Lookup::Lead(_) => panic!("expected a hit, got a lead"),
        Lookup::Pass(p) => panic!("expected a hit, got a pass: {:?}", p.reason),
    }
}

/// Looks `path` up and fills it with `body`, varying on `vary` when given.
async fn fill(
    cache: &Cache,
    conn: &RedisConn,
    path: &str,
    headers: &HeaderMap,
    vary: Option<&str>,
    body: &'static str,
) {
    let r = req(cache, path, headers);
    let f = lead(cache.lookup(Some(conn), &r, headers, NOW).await);
    let mut resp = h(&[("cache-control", "max-age=600")]);
    if let Some(v) = vary {
        resp.insert("vary", HeaderValue::from_str(v).unwrap());
    }
    f.store(
        Some(conn),
        StatusCode::OK,
        &resp,
        Bytes::from_static(body.as_bytes()),
        NOW,
    )
    .await
    .unwrap();
}

fn entry(path: &str, cc: &str, body: &'static str, vary: Option<&str>) -> Entry {
    let mut resp = h(&[("cache-control", cc), ("content-type", "text/plain")]);
    if let Some(v) = vary {
        resp.insert("vary", HeaderValue::from_str(v).unwrap());
    }
    let s = policy::storable(StatusCode::OK, &resp, false, &policy(), NOW).unwrap();
    Entry::new(
        StatusCode::OK,
        &resp,
        Bytes::from_static(body.as_bytes()),
        s,
        path,
        NOW,
    )
}

fn key(path: &str) -> CacheKey {
    CacheKey::new(&Method::GET, "example.com", &path.parse().unwrap(), &[]).unwrap()
}

async fn all_keys(conn: &mut RedisConn) -> Vec<Vec<u8>> {
    redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap()
}

#[tokio::test]
async fn the_shared_tier_round_trips_entries_and_variants() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    let none = HeaderMap::new();
    let k = key("/plain");
    let missing = shared::get(&mut conn, &k, &none).await.unwrap();
    assert_eq!((missing.variant, missing.entry), (*k.primary(), None));
    let e = entry("/plain", "max-age=60, stale-if-error=30", "hello", None);
    shared::put(&mut conn, k.primary(), k.primary(), &e, NOW)
        .await
        .unwrap();
    let found = shared::get(&mut conn, &k, &none).await.unwrap();
    assert_eq!(found.entry, Some(e));
    assert_eq!(&found.variant, k.primary());
    let pttl: i64 = redis::cmd("PTTL")
        .arg(key::redis_key(k.primary(), k.primary()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        pttl > 60_000 && pttl <= 90_000,
        "TTL runs to the end of stale-if-error: {pttl}"
    );

    // Two variants of one resource, each found by its request's header values.
    let k = key("/varied");
    let gzip = h(&[("accept-encoding", "gzip")]);
    let br = h(&[("accept-encoding", "br")]);
    for (headers, body) in [(&gzip, "gz"), (&br, "br")] {
        let e = entry("/varied", "max-age=60", body, Some("Accept-Encoding"));
        let v = key::variant(k.primary(), &e.vary, headers);
        shared::put(&mut conn, k.primary(), &v, &e, NOW)
            .await
            .unwrap();
    }
    let got = |headers: HeaderMap| {
        let (mut conn, k) = (conn.clone(), k.clone());
        async move { shared::get(&mut conn, &k, &headers).await.unwrap().entry }
    };
    assert_eq!(got(gzip.clone()).await.unwrap().body, "gz");
    assert_eq!(got(br.clone()).await.unwrap().body, "br");
    let zstd = h(&[("accept-encoding", "zstd")]);
    assert_eq!(got(zstd.clone()).await, None);
    // The variant a request maps to is known even before it is stored.
    let e = entry("/varied", "max-age=60", "", Some("Accept-Encoding"));
    let found = shared::get(&mut conn, &k, &zstd).await.unwrap();
    assert_eq!(found.variant, key::variant(k.primary(), &e.vary, &zstd));

    // Whatever else sits under a cache key is an error, not a panic; a record of another
    // format version (another release) is a miss.
    let k = key("/garbage");
    let raw_conn = conn.clone();
    let put_raw = |raw: &'static [u8]| {
        let (mut conn, k) = (raw_conn.clone(), k.clone());
        async move {
            let _: () = redis::cmd("SET")
                .arg(key::redis_key(k.primary(), k.primary()))
                .arg(raw)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    put_raw(b"LBC\x02\x01\xff\xff").await;
    assert!(matches!(
        shared::get(&mut conn, &k, &none).await,
        Err(SharedError::Decode(_))
    ));
    put_raw(b"LBC\x01\x01\xff\xff").await;
    assert_eq!(shared::get(&mut conn, &k, &none).await.unwrap().entry, None);
}

#[tokio::test]
async fn credentials_in_the_query_never_reach_redis() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let gzip = h(&[("accept-encoding", "gzip")]);
    fill(
        &cache,
        &conn,
        "/report?api_key=secret&day=1",
        &none,
        None,
        "r",
    )
    .await;
    fill(
        &cache,
        &conn,
        "/data?x=1&api_key=secret",
        &gzip,
        Some("accept-encoding"),
        "d",
    )
    .await;
    // A fill in progress, so that its lock is among the keys looked at.
    let r = req(&cache, "/slow?api_key=secret", &none);
    let in_progress = lead(cache.lookup(Some(&conn), &r, &none, NOW).await);
    assert!(in_progress.holds_lock());
    let keys = all_keys(&mut conn).await;
    // An entry; a vary spec and its one variant; two index sets; one lock.
    assert_eq!(keys.len(), 6);
    for k in keys {
        let shown = String::from_utf8_lossy(&k).into_owned();
        assert!(!shown.contains("secret"), "key {shown}");
        assert!(!shown.contains("api_key"), "key {shown}");
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![
                redis::cmd("GET")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .unwrap(),
            ],
            "zset" => redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            other => panic!("unexpected {other} at {shown}"),
        };
        for v in values {
            let v = String::from_utf8_lossy(&v);
            assert!(!v.contains("secret"), "value under {shown}: {v:?}");
        }
    }
    drop(in_progress);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_data_planes_never_hold_a_fill_lock_together() {
    let redis = RedisServer::start().await;
    let planes = [
        (Cache::new(policy()), redis.manager().await),
        (Cache::new(policy()), redis.manager().await),
    ];
    let holders = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    for round in 0..5 {
        let path = format!("/cold/{round}");
        let mut tasks = JoinSet::new();
        for i in 0..100 {
            let (cache, conn) = planes[i % 2].clone();
            let (holders, most, path) = (Arc::clone(&holders), Arc::clone(&most), path.clone());
            tasks.spawn(async move {
                let none = HeaderMap::new();
                let r = req(&cache, &path, &none);
                match cache.lookup(Some(&conn), &r, &none, NOW).await {
                    Lookup::Lead(f) => {
                        let held = f.holds_lock();
                        if held {
                            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                        }
                        // The backend request: a few round trips' worth of waiting.
                        for _ in 0..3 {
                            let mut c = conn.clone();
                            let _: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
                        }
                        if held {
                            holders.fetch_sub(1, Ordering::SeqCst);
                        }
                        let resp = h(&[("cache-control", "max-age=600")]);
                        f.store(
                            Some(&conn),
                            StatusCode::OK,
                            &resp,
                            Bytes::from_static(b"x"),
                            NOW,
                        )
                        .await
                        .unwrap();
                        (true, held)
                    }
                    Lookup::Hit(_) => (false, false),
                    Lookup::Pass(p) => panic!("pass: {:?}", p.reason),
                }
            });
        }
        let outcomes = tasks.join_all().await;
        let leads = outcomes.iter().filter(|(lead, _)| *lead).count();
        let with_lock = outcomes.iter().filter(|(_, held)| *held).count();
        assert_eq!(
            (leads, with_lock),
            (1, 1),
            "round {round}: one fetch for 100 requests"
        );
    }
    assert_eq!(most.load(Ordering::SeqCst), 1);
    let (a, b) = (planes[0].0.stats(), planes[1].0.stats());
    assert_eq!(a.leads + b.leads, 5);
    assert!(
        a.hits_shared + b.hits_shared >= 5,
        "the other plane took the entry from redis"
    );
}

#[tokio::test]
async fn purges_clear_both_tiers_on_every_plane() {
    let redis = RedisServer::start().await;
    purges_clear_both_tiers(redis.manager().await).await;
}

/// Records, variants and the index spread over every node; the purges (by prefix, by key,
/// everything) still find them all.
#[tokio::test]
async fn purges_clear_both_tiers_on_a_redis_cluster_too() {
    let cluster = redis_server::RedisCluster::start(3).await;
    purges_clear_both_tiers(cluster.conn().await).await;
}

/// Fills `/api/items`, which varies on `Accept-Encoding`, for gzip and for br.
async fn fill_items(cache: &Cache, conn: &RedisConn) {
    for (encoding, body) in [("gzip", "items-gz"), ("br", "items-br")] {
        let headers = h(&[("accept-encoding", encoding)]);
        fill(
            cache,
            conn,
            "/api/items",
            &headers,
            Some("accept-encoding"),
            body,
        )
        .await;
    }
}

async fn purges_clear_both_tiers(conn: RedisConn) {
    let (a, b) = (Cache::new(policy()), Cache::new(policy()));
    let none = HeaderMap::new();
    let gzip = h(&[("accept-encoding", "gzip")]);
    let br = h(&[("accept-encoding", "br")]);
    fill(&a, &conn, "/api/users?page=1", &none, None, "users").await;
    fill_items(&a, &conn).await;
    fill(&a, &conn, "/static/app.js", &none, None, "js").await;
    fill(&a, &conn, "/apix", &none, None, "apix").await;
    // The other plane sees them through Redis.
    let look = |cache: &Cache, path: &str, headers: &HeaderMap| {
        let (cache, conn, headers) = (cache.clone(), conn.clone(), headers.clone());
        let r = req(&cache, path, &headers);
        async move { cache.lookup(Some(&conn), &r, &headers, NOW).await }
    };
    assert_eq!(
        hit_tier(look(&b, "/api/items", &br).await),
        (Tier::Shared, Bytes::from("items-br"))
    );
    assert_eq!(hit_tier(look(&b, "/api/items", &br).await).0, Tier::Memory);

    // Every plane runs the directive: each clears its memory, and Redis is cleared (again).
    let purge = Purge::PathPrefix("/api/".to_owned());
    let removed = a.purge(Some(&conn), &purge).await.unwrap();
    assert_eq!(
        removed, 4,
        "two plain records, a vary spec and two variants, less /apix"
    );
    assert_eq!(b.purge(Some(&conn), &purge).await.unwrap(), 0);
    for cache in [&a, &b] {
        lead(look(cache, "/api/users?page=1", &none).await);
        lead(look(cache, "/api/items", &gzip).await);
        lead(look(cache, "/api/items", &br).await);
        assert_eq!(hit_tier(look(cache, "/static/app.js", &none).await).1, "js");
        assert_eq!(hit_tier(look(cache, "/apix", &none).await).1, "apix");
    }

    // By key: the resource with every variant, whatever the request's headers.
    let mut c = conn.clone();
    fill_items(&a, &conn).await;
    let id = req(&a, "/api/items", &none).key.id();
    let purge = Purge::Key(key::parse_id(&id).unwrap());
    assert_eq!(a.purge(Some(&conn), &purge).await.unwrap(), 3);
    let under: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("lb:cache:{{{id}}}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(under.is_empty());
    lead(look(&a, "/api/items", &gzip).await);

    // Everything, index included.
    assert!(a.purge(Some(&conn), &Purge::All).await.unwrap() >= 3);
    assert!(all_keys(&mut c).await.is_empty());
    lead(look(&a, "/static/app.js", &none).await);
}

#[tokio::test]
async fn the_index_forgets_expired_records_a_bounded_batch_per_write() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    for i in 0..150 {
        let path = format!("/short/{i}");
        let e = entry(&path, "max-age=1", "s", None);
        let k = key(&path);
        shared::put(&mut conn, k.primary(), k.primary(), &e, NOW)
            .await
            .unwrap();
    }
    let card = |mut c: RedisConn| async move {
        redis::cmd("ZCARD")
            .arg(INDEX_PATHS)
            .query_async::<u64>(&mut c)
            .await
            .unwrap()
    };
    assert_eq!(card(conn.clone()).await, 150);
    let later = NOW + 10_000;
    let long = |i: u32| {
        let path = format!("/long/{i}");
        let s = policy::storable(
            StatusCode::OK,
            &h(&[("cache-control", "max-age=600")]),
            false,
            &policy(),
            later,
        )
        .unwrap();
        (
            key(&path),
            Entry::new(
                StatusCode::OK,
                &HeaderMap::new(),
                Bytes::new(),
                s,
                &path,
                later,
            ),
        )
    };
    let (k, e) = long(1);
    shared::put(&mut conn, k.primary(), k.primary(), &e, later)
        .await
        .unwrap();
    assert_eq!(
        card(conn.clone()).await,
        150 + 1 - shared::CLEANUP_PER_PUT as u64
    );
    let (k, e) = long(2);
    shared::put(&mut conn, k.primary(), k.primary(), &e, later)
        .await
        .unwrap();
    assert_eq!(card(conn.clone()).await, 2);
}

#[tokio::test]
async fn an_unreachable_redis_leaves_the_memory_tier_serving() {
    let redis = RedisServer::start().await;
    let conn = redis.manager().await;
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    fill(&cache, &conn, "/before", &none, None, "before").await;
    drop(redis);
    assert!(!cache.is_degraded());
    let r = req(&cache, "/after", &none);
    let f = lead(cache.lookup(Some(&conn), &r, &none, NOW).await);
    assert!(cache.is_degraded());
    assert!(!f.holds_lock());
    let resp = h(&[("cache-control", "max-age=600")]);
    f.store(
        Some(&conn),
        StatusCode::OK,
        &resp,
        Bytes::from_static(b"after"),
        NOW,
    )
    .await
    .unwrap();
    for (path, body) in [("/before", "before"), ("/after", "after")] {
        let r = req(&cache, path, &none);
        let got = hit_tier(cache.lookup(Some(&conn), &r, &none, NOW).await);
        assert_eq!(got, (Tier::Memory, Bytes::from(body)));
    }
    assert!(cache.stats().shared_errors >= 1);
}

//! The cache's lookups, fills and purges, without Redis.

use super::*;
use http::header::HeaderName;
use http::{HeaderValue, StatusCode};
use tokio::task::JoinSet;

const NOW: u64 = 1_700_000_000_000;

fn policy() -> Policy {
    Policy {
        enabled: true,
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

fn req(cache: &Cache, method: Method, path: &str, headers: &HeaderMap) -> CacheRequest {
    let uri: Uri = format!("http://example.com{path}").parse().unwrap();
    cache.request(&method, &uri, headers).unwrap()
}

async fn lookup(cache: &Cache, r: &CacheRequest, headers: &HeaderMap, now: u64) -> Lookup {
    cache.lookup(None, r, headers, now).await
}

fn lead(l: Lookup) -> Fill {
    match l {
        Lookup::Lead(f) => f,
        Lookup::Hit(h) => panic!("expected to lead, got a hit from {:?}", h.tier),
        Lookup::Pass(p) => panic!("expected to lead, got a pass: {:?}", p.reason),
    }
}

fn hit(l: Lookup) -> Hit {
    match l {
        Lookup::Hit(h) => h,
        Lookup::Lead(_) => panic!("expected a hit, got a lead"),
        Lookup::Pass(p) => panic!("expected a hit, got a pass: {:?}", p.reason),
    }
}

fn pass(l: Lookup) -> Pass {
    match l {
        Lookup::Pass(p) => p,
        Lookup::Lead(_) => panic!("expected a pass, got a lead"),
        Lookup::Hit(h) => panic!("expected a pass, got a hit from {:?}", h.tier),
    }
}

async fn store(fill: Fill, cc: &str, body: &'static str, now: u64) -> Arc<Entry> {
    fill.store(
        None,
        StatusCode::OK,
        &h(&[("cache-control", cc)]),
        Bytes::from_static(body.as_bytes()),
        now,
    )
    .await
    .unwrap()
}

#[test]
fn bypasses_are_decided_before_any_lookup() {
    let off = Cache::new(Policy::default());
    let uri: Uri = "/x".parse().unwrap();
    let none = HeaderMap::new();
    assert_eq!(
        off.request(&Method::GET, &uri, &none).unwrap_err(),
        Bypass::Disabled
    );
    let cache = Cache::new(policy());
    assert_eq!(
        cache.request(&Method::POST, &uri, &none).unwrap_err(),
        Bypass::Method
    );
    let long: Uri = format!("/{}", "a".repeat(9000)).parse().unwrap();
    assert_eq!(
        cache.request(&Method::GET, &long, &none).unwrap_err(),
        Bypass::KeyTooLong
    );
    assert_eq!(cache.stats().bypasses, 2);
    let r = req(&cache, Method::HEAD, "/x", &h(&[("cookie", "a=1")]));
    assert!(r.head && r.credentials && !r.conditional);
}

#[tokio::test]
async fn two_hundred_concurrent_misses_make_exactly_one_leader() {
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let r = req(&cache, Method::GET, "/cold", &none);
    let id = *r.key.primary();
    let mut tasks = JoinSet::new();
    for _ in 0..200 {
        let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
        tasks.spawn(async move {
            match cache.lookup(None, &r, &none, NOW).await {
                Lookup::Lead(fill) => {
                    // Fill only once every other request waits on this flight, so none
                    // of them can have found the entry in memory instead.
                    while cache.waiting(&id) < 199 {
                        tokio::task::yield_now().await;
                    }
                    store(fill, "max-age=60", "body", NOW).await;
                    "lead"
                }
                Lookup::Hit(h) => {
                    assert_eq!(h.tier, Tier::Coalesced);
                    assert_eq!(h.entry.body, "body");
                    "hit"
                }
                Lookup::Pass(p) => panic!("pass: {:?}", p.reason),
            }
        });
    }
    let outcomes: Vec<&str> = tasks.join_all().await;
    assert_eq!(outcomes.iter().filter(|o| **o == "lead").count(), 1);
    assert_eq!(outcomes.iter().filter(|o| **o == "hit").count(), 199);
    let s = cache.stats();
    assert_eq!(
        (s.leads, s.hits_coalesced, s.stored, s.in_flight),
        (1, 199, 1, 0)
    );
    let again = hit(lookup(&cache, &r, &none, NOW + 1000).await);
    assert_eq!(again.tier, Tier::Memory);
    let resp = again.response(&none, NOW + 3500);
    assert_eq!(resp.headers()[header::AGE], "3");
    assert_eq!(resp.headers()[X_CACHE], "HIT");
}

#[tokio::test]
async fn a_leader_that_goes_away_hands_over_to_a_follower() {
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let r = req(&cache, Method::GET, "/gone", &none);
    let first = lead(lookup(&cache, &r, &none, NOW).await);
    let follower = {
        let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
        tokio::spawn(async move { lead(cache.lookup(None, &r, &none, NOW).await) })
    };
    while cache.waiting(r.key.primary()) < 1 {
        tokio::task::yield_now().await;
    }
    drop(first);
    let second = follower.await.unwrap();
    store(second, "max-age=60", "b", NOW).await;
    assert_eq!(hit(lookup(&cache, &r, &none, NOW).await).entry.body, "b");
}

#[tokio::test]
async fn uncacheable_responses_release_followers_and_skip_the_cache_for_a_while() {
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let r = req(&cache, Method::GET, "/private", &none);
    let fill = lead(lookup(&cache, &r, &none, NOW).await);
    let follower = {
        let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
        tokio::spawn(async move { pass(cache.lookup(None, &r, &none, NOW).await) })
    };
    while cache.waiting(r.key.primary()) < 1 {
        tokio::task::yield_now().await;
    }
    let refused = fill
        .store(
            None,
            StatusCode::OK,
            &h(&[("cache-control", "private")]),
            Bytes::new(),
            NOW,
        )
        .await;
    assert_eq!(refused.unwrap_err(), NotStored::Private);
    assert_eq!(follower.await.unwrap().reason, PassReason::NotStored);
    assert_eq!(
        pass(lookup(&cache, &r, &none, NOW).await).reason,
        PassReason::Uncacheable
    );
}

#[tokio::test]
async fn followers_of_another_variant_lead_their_own_fill() {
    let cache = Cache::new(policy());
    let gzip = h(&[("accept-encoding", "gzip")]);
    let br = h(&[("accept-encoding", "br")]);
    let r = req(&cache, Method::GET, "/v", &gzip);
    let fill = lead(lookup(&cache, &r, &gzip, NOW).await);
    let spawn_follower = |headers: HeaderMap| {
        let (cache, r) = (cache.clone(), r.clone());
        tokio::spawn(async move { cache.lookup(None, &r, &headers, NOW).await })
    };
    let same = spawn_follower(gzip.clone());
    let other = spawn_follower(br.clone());
    while cache.waiting(r.key.primary()) < 2 {
        tokio::task::yield_now().await;
    }
    let stored = fill
        .store(
            None,
            StatusCode::OK,
            &h(&[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")]),
            Bytes::from_static(b"gzipped"),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(stored.vary, [HeaderName::from_static("accept-encoding")]);
    assert_eq!(hit(same.await.unwrap()).entry.body, "gzipped");
    let other = lead(other.await.unwrap());
    other
        .store(
            None,
            StatusCode::OK,
            &h(&[("cache-control", "max-age=60"), ("vary", "accept-encoding")]),
            Bytes::from_static(b"brotli"),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(hit(lookup(&cache, &r, &br, NOW).await).entry.body, "brotli");
    assert_eq!(
        hit(lookup(&cache, &r, &gzip, NOW).await).entry.body,
        "gzipped"
    );
}

#[tokio::test]
async fn requests_with_credentials_are_served_only_public_entries() {
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let auth = h(&[("authorization", "Bearer t")]);
    let anon = req(&cache, Method::GET, "/doc", &none);
    let authed = req(&cache, Method::GET, "/doc", &auth);
    store(
        lead(lookup(&cache, &anon, &none, NOW).await),
        "max-age=60",
        "anon",
        NOW,
    )
    .await;
    let fill = lead(lookup(&cache, &authed, &auth, NOW).await);
    let refused = fill
        .store(
            None,
            StatusCode::OK,
            &h(&[("cache-control", "max-age=60")]),
            Bytes::new(),
            NOW,
        )
        .await;
    assert_eq!(refused.unwrap_err(), NotStored::Credentials);
    // Refusals because of credentials are not remembered for everyone.
    assert_eq!(
        hit(lookup(&cache, &anon, &none, NOW).await).entry.body,
        "anon"
    );
    let fill = lead(lookup(&cache, &authed, &auth, NOW).await);
    store(fill, "public, max-age=60", "public", NOW).await;
    assert_eq!(
        hit(lookup(&cache, &authed, &auth, NOW).await).entry.body,
        "public"
    );
}

#[tokio::test]
async fn stale_while_revalidate_serves_and_hands_out_one_refresh() {
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let r = req(&cache, Method::GET, "/swr", &none);
    let fill = lead(lookup(&cache, &r, &none, NOW).await);
    store(fill, "max-age=1, stale-while-revalidate=30", "old", NOW).await;
    let later = NOW + 2_000;
    let first = hit(lookup(&cache, &r, &none, later).await);
    assert_eq!(first.state, State::StaleRevalidate);
    assert_eq!(first.response(&none, later).headers()[X_CACHE], "STALE");
    let refresh = first.refresh.expect("a refresh for the first caller");
    assert_eq!(refresh.stale().unwrap().body, "old");
    let second = hit(lookup(&cache, &r, &none, later).await);
    assert_eq!(second.entry.body, "old");
    assert!(second.refresh.is_none(), "one refresh at a time");
    store(refresh, "max-age=60", "new", later).await;
    let third = hit(lookup(&cache, &r, &none, later).await);
    assert_eq!(
        (third.state, third.entry.body.as_ref()),
        (State::Fresh, &b"new"[..])
    );
}

#[tokio::test]
async fn stale_if_error_goes_to_the_backend_and_serves_stale_when_it_fails() {
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let r = req(&cache, Method::GET, "/sie", &none);
    let fill = lead(lookup(&cache, &r, &none, NOW).await);
    store(fill, "max-age=1, stale-if-error=60", "old", NOW).await;
    let later = NOW + 2_000;
    let fill = lead(lookup(&cache, &r, &none, later).await);
    assert_eq!(fill.stale().unwrap().body, "old");
    let follower = {
        let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
        tokio::spawn(async move { hit(cache.lookup(None, &r, &none, later).await) })
    };
    while cache.waiting(r.key.primary()) < 1 {
        tokio::task::yield_now().await;
    }
    fill.failed().await;
    let served = follower.await.unwrap();
    assert_eq!(served.state, State::StaleIfError);
    assert_eq!(served.entry.body, "old");
    // Past every window the entry is gone.
    let fill = lead(lookup(&cache, &r, &none, NOW + 120_000).await);
    assert!(fill.stale().is_none());
}

#[tokio::test]
async fn a_5xx_is_a_failure_not_an_uncacheable_resource() {
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let r = req(&cache, Method::GET, "/flaky", &none);
    let fill = lead(lookup(&cache, &r, &none, NOW).await);
    store(fill, "max-age=1, stale-if-error=60", "old", NOW).await;
    let later = NOW + 2_000;
    let fill = lead(lookup(&cache, &r, &none, later).await);
    let follower = {
        let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
        tokio::spawn(async move { hit(cache.lookup(None, &r, &none, later).await) })
    };
    while cache.waiting(r.key.primary()) < 1 {
        tokio::task::yield_now().await;
    }
    let status = StatusCode::SERVICE_UNAVAILABLE;
    let refused = fill.store(None, status, &none, Bytes::new(), later).await;
    assert_eq!(refused.unwrap_err(), NotStored::Status);
    assert_eq!(follower.await.unwrap().state, State::StaleIfError);
    // Not remembered as uncacheable: the next request leads, with the stale entry at hand.
    let fill = lead(lookup(&cache, &r, &none, later).await);
    assert_eq!(fill.stale().unwrap().body, "old");
}

#[tokio::test]
async fn head_shares_get_entries_and_never_fills() {
    let cache = Cache::new(policy());
    let none = HeaderMap::new();
    let get = req(&cache, Method::GET, "/h", &none);
    let head = req(&cache, Method::HEAD, "/h", &none);
    assert_eq!(
        pass(lookup(&cache, &head, &none, NOW).await).reason,
        PassReason::Head
    );
    store(
        lead(lookup(&cache, &get, &none, NOW).await),
        "max-age=60",
        "body",
        NOW,
    )
    .await;
    let served = hit(lookup(&cache, &head, &none, NOW).await);
    let resp = served.response(&none, NOW);
    assert!(resp.body().is_empty());
    assert_eq!(resp.status(), StatusCode::OK);
    // Conditional requests get a 304 on a hit and pass on a miss.
    let cond = h(&[("if-none-match", "*")]);
    let r = req(&cache, Method::GET, "/h", &cond);
    let resp = hit(lookup(&cache, &r, &cond, NOW).await).response(&cond, NOW);
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    let miss = req(&cache, Method::GET, "/other", &cond);
    assert_eq!(
        pass(lookup(&cache, &miss, &cond, NOW).await).reason,
        PassReason::Conditional
    );
}

#[tokio::test]
async fn bodies_over_max_entry_bytes_are_not_stored() {
    let cache = Cache::new(Policy {
        max_entry_bytes: 4,
        ..policy()
    });
    let none = HeaderMap::new();
    let r = req(&cache, Method::GET, "/big", &none);
    let fill = lead(lookup(&cache, &r, &none, NOW).await);
    let declared = h(&[("content-length", "5"), ("cache-control", "max-age=60")]);
    assert_eq!(
        fill.check(StatusCode::OK, &declared, NOW).unwrap_err(),
        NotStored::TooLarge
    );
    let refused = fill
        .store(
            None,
            StatusCode::OK,
            &h(&[("cache-control", "max-age=60")]),
            Bytes::from_static(b"12345"),
            NOW,
        )
        .await;
    assert_eq!(refused.unwrap_err(), NotStored::TooLarge);
}

#[test]
fn purges_come_from_directives() {
    use lb_proto::v1::CachePurge;
    use lb_proto::v1::cache_purge::Target;
    let p = |t| Purge::from_proto(&CachePurge { target: Some(t) });
    let id = "ab".repeat(32);
    assert_eq!(p(Target::Key(id)), Some(Purge::Key([0xab; 32])));
    assert_eq!(p(Target::Key("GET /x".into())), None);
    assert_eq!(
        p(Target::PathPrefix("/a".into())),
        Some(Purge::PathPrefix("/a".into()))
    );
    assert_eq!(p(Target::All(true)), Some(Purge::All));
    assert_eq!(p(Target::All(false)), None);
    assert_eq!(Purge::from_proto(&CachePurge { target: None }), None);
}

//! The response cache against RFC 9111 (and RFC 9211 `Cache-Status`, RFC 9213
//! `CDN-Cache-Control`), one test per rule, named after its section: real requests through a
//! data plane to a backend scripted per test, checking what the client gets and what reached
//! the backend. Time never passes in these tests: a response is made stale on arrival with
//! `Age` (or `max-age=0`) rather than by waiting.

#[path = "support/dp.rs"]
mod dp;
#[path = "support/origin.rs"]
mod origin;
#[path = "support/redis_server.rs"]
mod redis_server;

use bytes::Bytes;
use dp::{Dp, Seen, wait_until};
use http_body_util::Full;
use lb_proto::v1::*;
use origin::{Origin, reply};
use redis_server::RedisServer;

const HOST: &str = "api.example.com";

fn snapshot(origin: &Origin, cache: impl FnOnce(&mut CachePolicy)) -> ConfigSnapshot {
    let mut s = dp::snapshot(&[origin.addr]);
    let mut c = CachePolicy {
        enabled: true,
        ..lb_proto::defaults::cache()
    };
    cache(&mut c);
    s.cache = Some(c);
    s
}

/// One data plane with the cache on (defaults), no Redis.
async fn plane(origin: &Origin) -> Dp {
    Dp::start(|_| {}, snapshot(origin, |_| {})).await
}

/// `n` data planes sharing `redis`.
async fn fleet(origin: &Origin, redis: &RedisServer, n: usize) -> Vec<Dp> {
    let mut dps = Vec::new();
    for _ in 0..n {
        let url = redis.url();
        dps.push(Dp::start(move |s| s.redis = Some(url), snapshot(origin, |_| {})).await);
    }
    dps
}

fn request(method: &str, path: &str, fields: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", HOST);
    for (k, v) in fields {
        b = b.header(*k, *v);
    }
    b.body(Full::default()).unwrap()
}

async fn get(dp: &Dp, path: &str) -> Seen {
    get_with(dp, path, &[]).await
}

async fn get_with(dp: &Dp, path: &str, fields: &[(&str, &str)]) -> Seen {
    dp.send(request("GET", path, fields)).await.unwrap()
}

fn x_cache(s: &Seen) -> &str {
    s.header("x-cache").unwrap_or("")
}

fn cache_status(s: &Seen) -> &str {
    s.header("cache-status").unwrap_or("")
}

/// A GET that should be a hit, and the same number of backend requests before and after.
async fn assert_hit(dp: &Dp, origin: &Origin, path: &str) -> Seen {
    let before = origin.count(path);
    let r = get(dp, path).await;
    assert_eq!(x_cache(&r), "HIT", "{path}: {:?}", r.headers);
    assert!(
        cache_status(&r).starts_with("lb; hit"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(
        origin.count(path),
        before,
        "{path}: a hit reaches no backend"
    );
    r
}

/// Two GETs of `path` both reach the backend.
async fn assert_not_reused(dp: &Dp, origin: &Origin, path: &str) {
    let before = origin.count(path);
    let a = get(dp, path).await;
    let b = get(dp, path).await;
    assert_eq!(
        (x_cache(&a), x_cache(&b)),
        ("MISS", "MISS"),
        "{path}: {:?}",
        b.headers
    );
    assert_eq!(origin.count(path), before + 2, "{path}");
}

// Section 3: storing responses.

#[tokio::test]
async fn s3_no_store_and_private_responses_are_not_stored() {
    let origin = Origin::start().await;
    origin.route("/ns", |_, _| {
        reply(200, &[("cache-control", "no-store, max-age=60")], "x")
    });
    origin.route("/p", |_, _| {
        reply(200, &[("cache-control", "private, max-age=60")], "x")
    });
    let dp = plane(&origin).await;
    let r = get(&dp, "/ns").await;
    assert_eq!(cache_status(&r), "lb; fwd=uri-miss; detail=no_store");
    assert_not_reused(&dp, &origin, "/ns").await;
    assert_not_reused(&dp, &origin, "/p").await;
}

#[tokio::test]
async fn s5_2_2_7_qualified_private_stores_the_response_without_the_named_fields() {
    let origin = Origin::start().await;
    origin.route("/p", |_, _| {
        reply(
            200,
            &[
                ("cache-control", "private=\"x-user\", max-age=60"),
                ("x-user", "alice"),
                ("x-shared", "yes"),
            ],
            "x",
        )
    });
    let dp = plane(&origin).await;
    let first = get(&dp, "/p").await;
    assert_eq!(
        first.header("x-user"),
        Some("alice"),
        "the requester gets all"
    );
    let r = assert_hit(&dp, &origin, "/p").await;
    assert_eq!(r.header("x-user"), None);
    assert_eq!(r.header("x-shared"), Some("yes"));
}

#[tokio::test]
async fn s5_2_2_4_qualified_no_cache_stores_the_response_without_the_named_fields() {
    let origin = Origin::start().await;
    origin.route("/nc", |_, _| {
        reply(
            200,
            &[
                ("cache-control", "no-cache=\"x-debug\", max-age=60"),
                ("x-debug", "backend-7"),
            ],
            "x",
        )
    });
    let dp = plane(&origin).await;
    get(&dp, "/nc").await;
    let r = assert_hit(&dp, &origin, "/nc").await;
    assert_eq!(r.header("x-debug"), None);
}

#[tokio::test]
async fn s3_set_cookie_is_never_served_to_another_client() {
    let origin = Origin::start().await;
    origin.route("/c", |_, n| {
        reply(
            200,
            &[
                ("cache-control", "public, max-age=60"),
                ("set-cookie", &format!("session={n}")),
            ],
            "x",
        )
    });
    origin.route("/q", |_, n| {
        reply(
            200,
            &[
                ("cache-control", "private=\"set-cookie\", max-age=60"),
                ("set-cookie", &format!("session={n}")),
            ],
            "x",
        )
    });
    let dp = plane(&origin).await;
    let a = get(&dp, "/c").await;
    let b = get(&dp, "/c").await;
    assert_eq!(a.header("set-cookie"), Some("session=0"));
    assert_eq!(
        b.header("set-cookie"),
        Some("session=1"),
        "its own, from the backend"
    );
    // Stored once the field is declared private, and served without it.
    get(&dp, "/q").await;
    let r = assert_hit(&dp, &origin, "/q").await;
    assert_eq!(r.header("set-cookie"), None);
}

#[tokio::test]
async fn s4_1_vary_selects_a_variant_by_normalised_values_and_vary_star_is_not_stored() {
    let origin = Origin::start().await;
    origin.route("/v", |g, _| {
        let lang = g.header("accept-language").unwrap_or("none").to_owned();
        reply(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            &lang,
        )
    });
    origin.route("/star", |_, _| {
        reply(200, &[("cache-control", "max-age=60"), ("vary", "*")], "x")
    });
    let dp = plane(&origin).await;
    let en = get_with(&dp, "/v", &[("accept-language", "en, fr")]).await;
    assert_eq!(en.text(), "en, fr");
    let same = get_with(&dp, "/v", &[("accept-language", "en,fr")]).await;
    assert_eq!((x_cache(&same), same.text().as_str()), ("HIT", "en, fr"));
    let other = get_with(&dp, "/v", &[("accept-language", "de")]).await;
    assert_eq!((x_cache(&other), other.text().as_str()), ("MISS", "de"));
    // RFC 9211 section 2.2: the cache holds the resource, but not this variant.
    assert_eq!(
        other.header("cache-status"),
        Some("lb; fwd=vary-miss; stored")
    );
    assert_eq!(origin.count("/v"), 2);
    assert_not_reused(&dp, &origin, "/star").await;
}

#[tokio::test]
async fn s3_5_a_request_with_authorization_is_served_from_the_cache_only_when_allowed() {
    let origin = Origin::start().await;
    origin.route("/plain", |_, _| {
        reply(200, &[("cache-control", "max-age=60")], "x")
    });
    origin.route("/shared", |_, _| {
        reply(200, &[("cache-control", "s-maxage=60")], "x")
    });
    let dp = plane(&origin).await;
    let auth = [("authorization", "Bearer t")];
    for path in ["/plain", "/shared"] {
        get_with(&dp, path, &auth).await;
        get_with(&dp, path, &auth).await;
    }
    assert_eq!(
        origin.count("/plain"),
        2,
        "not stored for requests with credentials"
    );
    assert_eq!(origin.count("/shared"), 1, "s-maxage allows it");
}

#[tokio::test]
async fn s3_4_range_requests_and_206_pass_through_unstored() {
    let origin = Origin::start().await;
    origin.route("/r", |g, _| match g.header("range") {
        Some(_) => reply(
            206,
            &[
                ("cache-control", "max-age=60"),
                ("content-range", "bytes 0-1/4"),
            ],
            "ab",
        ),
        None => reply(200, &[("cache-control", "max-age=60")], "abcd"),
    });
    let dp = plane(&origin).await;
    for _ in 0..2 {
        let r = get_with(&dp, "/r", &[("range", "bytes=0-1")]).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (206, "ab"));
        assert_eq!(cache_status(&r), "lb; fwd=bypass; detail=range");
    }
    assert_eq!(origin.count("/r"), 2);
    assert_eq!(origin.got("/r")[1].header("range"), Some("bytes=0-1"));
    // The whole representation is stored as usual.
    get(&dp, "/r").await;
    let r = assert_hit(&dp, &origin, "/r").await;
    assert_eq!(r.text(), "abcd");
}

// Section 4.2: freshness.

#[tokio::test]
async fn s4_2_2_heuristic_freshness_needs_last_modified() {
    let origin = Origin::start().await;
    origin.route("/lm", |_, _| {
        reply(
            200,
            &[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")],
            "x",
        )
    });
    origin.route("/none", |_, _| reply(200, &[], "x"));
    origin.route("/found", |_, _| {
        reply(
            302,
            &[
                ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("location", "/lm"),
            ],
            "",
        )
    });
    let dp = plane(&origin).await;
    get(&dp, "/lm").await;
    let r = assert_hit(&dp, &origin, "/lm").await;
    // 10% of 29 years, capped at heuristic_max_ms (a day).
    let ttl: i64 = cache_status(&r)
        .rsplit("ttl=")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((86_000..=86_400).contains(&ttl), "{}", cache_status(&r));
    assert_not_reused(&dp, &origin, "/none").await;
    // 302 is not heuristically cacheable.
    assert_not_reused(&dp, &origin, "/found").await;
}

#[tokio::test]
async fn s4_2_2_default_ttl_ms_is_an_explicit_override() {
    let origin = Origin::start().await;
    origin.route("/none", |_, _| reply(200, &[], "x"));
    let dp = Dp::start(|_| {}, snapshot(&origin, |c| c.default_ttl_ms = 30_000)).await;
    get(&dp, "/none").await;
    assert_hit(&dp, &origin, "/none").await;
}

#[tokio::test]
async fn s4_2_1_a_negative_or_malformed_max_age_means_stale_not_expires() {
    let origin = Origin::start().await;
    for (path, cc) in [("/neg", "max-age=-1"), ("/bad", "max-age=60s")] {
        origin.route(path, move |_, _| {
            reply(
                200,
                &[
                    ("cache-control", cc),
                    ("expires", "Fri, 31 Dec 9999 23:59:59 GMT"),
                ],
                "x",
            )
        });
    }
    origin.route("/quoted", |_, _| {
        reply(200, &[("cache-control", "max-age=\"60\"")], "x")
    });
    let dp = plane(&origin).await;
    assert_not_reused(&dp, &origin, "/neg").await;
    assert_not_reused(&dp, &origin, "/bad").await;
    get(&dp, "/quoted").await;
    assert_hit(&dp, &origin, "/quoted").await;
}

#[tokio::test]
async fn s4_2_3_age_includes_the_backends_age() {
    let origin = Origin::start().await;
    origin.route("/aged", |_, _| {
        reply(
            200,
            &[("cache-control", "max-age=600"), ("age", "100")],
            "x",
        )
    });
    origin.route("/suffix", |_, _| {
        reply(
            200,
            &[("cache-control", "max-age=600"), ("age", "100s")],
            "x",
        )
    });
    origin.route("/old", |_, _| {
        reply(200, &[("cache-control", "max-age=60"), ("age", "61")], "x")
    });
    let dp = plane(&origin).await;
    get(&dp, "/aged").await;
    let r = assert_hit(&dp, &origin, "/aged").await;
    let age: u64 = r.header("age").unwrap().parse().unwrap();
    assert!((100..110).contains(&age), "{age}");
    let ttl: i64 = cache_status(&r)
        .rsplit("ttl=")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((490..=500).contains(&ttl), "{}", cache_status(&r));
    // An invalid Age is ignored.
    get(&dp, "/suffix").await;
    let r = assert_hit(&dp, &origin, "/suffix").await;
    assert!(r.header("age").unwrap().parse::<u64>().unwrap() < 10);
    // Older than its lifetime on arrival: stale at once.
    assert_not_reused(&dp, &origin, "/old").await;
}

#[tokio::test]
async fn s5_3_expires_on_several_disagreeing_lines_is_stale() {
    let origin = Origin::start().await;
    origin.route("/two", |_, _| {
        reply(
            200,
            &[
                ("expires", "Fri, 31 Dec 9999 23:59:59 GMT"),
                ("expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ],
            "x",
        )
    });
    origin.route("/one-digit", |_, _| {
        reply(200, &[("expires", "Fri, 31 Dec 9999 1:59:59 GMT")], "x")
    });
    let dp = plane(&origin).await;
    assert_not_reused(&dp, &origin, "/two").await;
    get(&dp, "/one-digit").await;
    assert_hit(&dp, &origin, "/one-digit").await;
}

// Section 4.3: validation.

/// A resource whose first answer is stale on arrival, with an `ETag`; later requests that
/// carry it get a 304 with a minute of freshness.
fn validated(origin: &Origin, path: &str, first_cc: &'static str) {
    origin.route(path, move |g, n| match g.header("if-none-match") {
        Some("\"v1\"") => reply(
            304,
            &[
                ("cache-control", "max-age=60"),
                ("etag", "\"v1\""),
                ("x-updated", "yes"),
            ],
            "",
        ),
        _ => reply(
            200,
            &[
                ("cache-control", first_cc),
                ("etag", "\"v1\""),
                ("x-updated", "no"),
            ],
            &format!("body {n}"),
        ),
    });
}

#[tokio::test]
async fn s4_3_a_stale_entry_is_revalidated_and_a_304_serves_the_stored_body_with_new_fields() {
    let origin = Origin::start().await;
    validated(&origin, "/e", "max-age=0");
    let dp = plane(&origin).await;
    assert_eq!(get(&dp, "/e").await.text(), "body 0");
    let r = get(&dp, "/e").await;
    let sent = origin.got("/e");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].header("if-none-match"), Some("\"v1\""));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "body 0"));
    assert_eq!(
        r.header("x-updated"),
        Some("yes"),
        "stored fields updated from the 304"
    );
    assert_eq!(x_cache(&r), "REVALIDATED");
    assert!(
        cache_status(&r).starts_with("lb; fwd=stale; fwd-status=304; stored; ttl="),
        "{}",
        cache_status(&r)
    );
    assert_eq!(dp.shared.cache.stats().revalidated, 1);
    // Fresh again for the 304's minute.
    let r = assert_hit(&dp, &origin, "/e").await;
    assert_eq!(
        (r.text().as_str(), r.header("x-updated")),
        ("body 0", Some("yes"))
    );
}

#[tokio::test]
async fn s4_3_1_last_modified_alone_validates_with_if_modified_since() {
    let origin = Origin::start().await;
    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    origin.route("/lm", |g, _| match g.header("if-modified-since") {
        Some(LM) => reply(304, &[("cache-control", "max-age=60")], ""),
        _ => reply(
            200,
            &[("cache-control", "max-age=0"), ("last-modified", LM)],
            "lm",
        ),
    });
    let dp = plane(&origin).await;
    get(&dp, "/lm").await;
    let r = get(&dp, "/lm").await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("REVALIDATED", "lm"));
    let sent = origin.got("/lm");
    assert_eq!(sent[1].header("if-modified-since"), Some(LM));
    assert_eq!(sent[1].header("if-none-match"), None);
}

#[tokio::test]
async fn s4_3_4_a_200_to_the_conditional_request_replaces_the_stored_response() {
    let origin = Origin::start().await;
    origin.route("/new", |_, n| {
        reply(
            200,
            &[
                (
                    "cache-control",
                    if n == 0 { "max-age=0" } else { "max-age=60" },
                ),
                ("etag", &format!("\"v{n}\"")),
            ],
            &format!("version {n}"),
        )
    });
    let dp = plane(&origin).await;
    get(&dp, "/new").await;
    let r = get(&dp, "/new").await;
    assert_eq!(
        origin.got("/new")[1].header("if-none-match"),
        Some("\"v0\"")
    );
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "version 1"));
    assert!(
        cache_status(&r).contains("fwd=stale"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(assert_hit(&dp, &origin, "/new").await.text(), "version 1");
}

#[tokio::test]
async fn s5_2_2_4_no_cache_forces_revalidation_before_every_use() {
    let origin = Origin::start().await;
    origin.route("/nc", |g, _| match g.header("if-none-match") {
        Some("\"v1\"") => reply(304, &[("cache-control", "no-cache, max-age=60")], ""),
        _ => reply(
            200,
            &[
                ("cache-control", "no-cache, max-age=60"),
                ("etag", "\"v1\""),
            ],
            "nc",
        ),
    });
    let dp = plane(&origin).await;
    get(&dp, "/nc").await;
    for i in 2..5 {
        let r = get(&dp, "/nc").await;
        assert_eq!((x_cache(&r), r.text().as_str()), ("REVALIDATED", "nc"));
        assert_eq!(origin.count("/nc"), i);
        assert_eq!(
            origin.got("/nc")[i - 1].header("if-none-match"),
            Some("\"v1\"")
        );
    }
}

#[tokio::test]
async fn s5_2_2_2_must_revalidate_stale_entries_are_revalidated_not_served() {
    let origin = Origin::start().await;
    origin.route("/mr-age", |g, _| match g.header("if-none-match") {
        Some(_) => reply(500, &[], "down"),
        None => reply(
            200,
            &[
                (
                    "cache-control",
                    "max-age=1, must-revalidate, stale-if-error=60",
                ),
                ("etag", "\"v1\""),
                ("age", "1"),
            ],
            "x",
        ),
    });
    let dp = plane(&origin).await;
    get(&dp, "/mr-age").await;
    let r = get(&dp, "/mr-age").await;
    assert_eq!(
        r.status.as_u16(),
        500,
        "must-revalidate: no stale answer when validation fails"
    );
    assert_eq!(
        origin.got("/mr-age")[1].header("if-none-match"),
        Some("\"v1\"")
    );
}

#[tokio::test]
async fn s4_3_2_a_clients_conditional_request_gets_a_304_from_a_fresh_entry() {
    let origin = Origin::start().await;
    origin.route("/f", |_, _| {
        reply(
            200,
            &[("cache-control", "max-age=60"), ("etag", "\"v1\"")],
            "f",
        )
    });
    let dp = plane(&origin).await;
    get(&dp, "/f").await;
    let r = get_with(&dp, "/f", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(r.status.as_u16(), 304);
    assert_eq!(origin.count("/f"), 1);
}

#[tokio::test]
async fn s4_3_revalidation_is_coalesced_one_backend_request_for_many_clients() {
    let origin = Origin::start().await;
    validated(&origin, "/many", "max-age=0");
    let dp = plane(&origin).await;
    get(&dp, "/many").await;
    origin.hold("/many");
    let dp = std::sync::Arc::new(dp);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let dp = std::sync::Arc::clone(&dp);
            tokio::spawn(async move { get(&dp, "/many").await })
        })
        .collect();
    // Every request waits: one at the backend, the others on its flight.
    let key =
        data_plane::cache::CacheKey::new(&http::Method::GET, HOST, &"/many".parse().unwrap(), &[])
            .unwrap();
    wait_until("19 requests waiting on one revalidation", || {
        origin.count("/many") == 2 && dp.shared.cache.waiting(key.primary()) == 19
    })
    .await;
    origin.release();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "body 0"));
    }
    assert_eq!(origin.count("/many"), 2);
}

#[tokio::test]
async fn s4_3_stale_while_revalidate_revalidates_in_the_background() {
    let origin = Origin::start().await;
    origin.route("/swr", |g, _| match g.header("if-none-match") {
        Some("\"v1\"") => reply(304, &[("cache-control", "max-age=60")], ""),
        _ => reply(
            200,
            &[
                ("cache-control", "max-age=1, stale-while-revalidate=60"),
                ("age", "2"),
                ("etag", "\"v1\""),
            ],
            "swr",
        ),
    });
    let dp = plane(&origin).await;
    get(&dp, "/swr").await;
    let r = get(&dp, "/swr").await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("STALE", "swr"));
    assert!(
        cache_status(&r).starts_with("lb; hit; ttl=-"),
        "{}",
        cache_status(&r)
    );
    wait_until("the background revalidation", || {
        dp.shared.cache.stats().stored >= 2
    })
    .await;
    assert_eq!(
        origin.got("/swr")[1].header("if-none-match"),
        Some("\"v1\"")
    );
    assert_hit(&dp, &origin, "/swr").await;
}

// RFC 9211 and RFC 9213.

#[tokio::test]
async fn rfc9211_cache_status_on_every_response_through_the_cache() {
    let origin = Origin::start().await;
    origin.route("/s", |_, _| {
        reply(200, &[("cache-control", "max-age=60")], "s")
    });
    let dp = plane(&origin).await;
    let miss = get(&dp, "/s").await;
    assert_eq!(cache_status(&miss), "lb; fwd=uri-miss; stored");
    assert_eq!(x_cache(&miss), "MISS");
    let hit = get(&dp, "/s").await;
    assert!(
        cache_status(&hit).starts_with("lb; hit; ttl=5"),
        "{}",
        cache_status(&hit)
    );
    let post = dp.send(request("POST", "/s", &[])).await.unwrap();
    assert_eq!(cache_status(&post), "lb; fwd=method");
    let ns = get_with(&dp, "/s", &[("cache-control", "no-store")]).await;
    assert_eq!(cache_status(&ns), "lb; fwd=request");
}

#[tokio::test]
async fn rfc9213_cdn_cache_control_takes_precedence_and_is_not_forwarded() {
    let origin = Origin::start().await;
    origin.route("/cdn", |_, _| {
        reply(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60"),
            ],
            "x",
        )
    });
    origin.route("/cdn-off", |_, _| {
        reply(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store"),
            ],
            "x",
        )
    });
    let dp = plane(&origin).await;
    let first = get(&dp, "/cdn").await;
    assert_eq!(first.header("cdn-cache-control"), None);
    assert_eq!(
        first.header("cache-control"),
        Some("no-store"),
        "for caches after this one"
    );
    let r = assert_hit(&dp, &origin, "/cdn").await;
    assert_eq!(r.header("cdn-cache-control"), None);
    assert_not_reused(&dp, &origin, "/cdn-off").await;
}

#[tokio::test]
async fn rfc9213_an_operator_named_targeted_field_comes_first_and_is_not_forwarded() {
    let origin = Origin::start().await;
    origin.route("/own", |_, _| {
        reply(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "no-store"),
                ("lb-cache-control", "max-age=60"),
            ],
            "x",
        )
    });
    let snapshot = snapshot(&origin, |c| c.targeted_field = "lb-cache-control".into());
    let dp = Dp::start(|_| {}, snapshot).await;
    let first = get(&dp, "/own").await;
    assert_eq!(first.header("lb-cache-control"), None);
    let r = assert_hit(&dp, &origin, "/own").await;
    assert_eq!(r.header("lb-cache-control"), None);
    assert_eq!(r.header("cache-control"), Some("no-store"));
}

#[tokio::test]
async fn s4_3_revalidation_through_redis_updates_every_plane() {
    let redis = RedisServer::start().await;
    let origin = Origin::start().await;
    validated(&origin, "/shared", "max-age=0");
    let dps = fleet(&origin, &redis, 2).await;
    get(&dps[0], "/shared").await;
    redis.wait_for_cache_entries(1).await;
    let r = get(&dps[1], "/shared").await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("REVALIDATED", "body 0"));
    assert_eq!(origin.count("/shared"), 2);
}

// Section 4.4: invalidation.

/// A resource whose GETs answer its current version (fresh for a minute), bumped by every
/// PUT, which answers `put_status` with `fields`.
fn versioned(origin: &Origin, path: &str, put_status: u16, fields: &'static [(&str, &str)]) {
    let version = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    origin.route(path, move |g, _| {
        use std::sync::atomic::Ordering::SeqCst;
        if g.method == http::Method::GET {
            let v = version.load(SeqCst);
            reply(
                200,
                &[("cache-control", "max-age=60")],
                &format!("version {v}"),
            )
        } else {
            version.fetch_add(1, SeqCst);
            reply(put_status, fields, "")
        }
    });
}

async fn put(dp: &Dp, path: &str) -> Seen {
    dp.send(request("PUT", path, &[])).await.unwrap()
}

#[tokio::test]
async fn s4_4_a_non_error_response_to_an_unsafe_method_invalidates_the_target() {
    let origin = Origin::start().await;
    versioned(&origin, "/doc", 204, &[]);
    versioned(&origin, "/failed", 500, &[]);
    let dp = plane(&origin).await;
    get(&dp, "/doc").await;
    assert_hit(&dp, &origin, "/doc").await;
    let p = put(&dp, "/doc").await;
    assert_eq!(cache_status(&p), "lb; fwd=method");
    let r = get(&dp, "/doc").await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("MISS", "version 1"));
    assert_eq!(dp.shared.cache.stats().invalidated, 1);
    // Unknown methods invalidate too.
    let r = dp.send(request("FROB", "/doc", &[])).await.unwrap();
    assert_eq!(r.status.as_u16(), 204);
    assert_eq!(get(&dp, "/doc").await.text(), "version 2");
    // An error leaves the stored response.
    get(&dp, "/failed").await;
    put(&dp, "/failed").await;
    assert_eq!(
        assert_hit(&dp, &origin, "/failed").await.text(),
        "version 0"
    );
}

#[tokio::test]
async fn s4_4_same_origin_location_and_content_location_are_invalidated_too() {
    let origin = Origin::start().await;
    for path in ["/a", "/b", "/c", "/d"] {
        versioned(&origin, path, 200, &[]);
    }
    origin.route("/post", |_, _| {
        reply(
            201,
            &[
                ("location", "/a"),
                ("content-location", "http://api.example.com/b"),
            ],
            "",
        )
    });
    origin.route("/elsewhere", |_, _| {
        reply(
            201,
            &[
                ("location", "http://other.example/c"),
                ("content-location", "//other.example/d"),
            ],
            "",
        )
    });
    let dp = plane(&origin).await;
    for path in ["/a", "/b", "/c", "/d"] {
        get(&dp, path).await;
    }
    dp.send(request("POST", "/post", &[])).await.unwrap();
    dp.send(request("POST", "/elsewhere", &[])).await.unwrap();
    for path in ["/a", "/b"] {
        assert_eq!(x_cache(&get(&dp, path).await), "MISS", "{path}");
    }
    for path in ["/c", "/d"] {
        assert_hit(&dp, &origin, path).await;
    }
}

#[tokio::test]
async fn s4_4_after_a_put_through_one_plane_no_plane_serves_the_old_body() {
    let redis = RedisServer::start().await;
    let origin = Origin::start().await;
    versioned(&origin, "/doc", 204, &[]);
    let dps = fleet(&origin, &redis, 3).await;
    wait_until("every plane follows invalidations", || {
        dps.iter().all(|d| d.shared.cache.follows_invalidations())
    })
    .await;
    for round in 1..=10 {
        // Every plane holds the current version in its memory tier.
        for (i, dp) in dps.iter().enumerate() {
            get(dp, "/doc").await;
            redis.wait_for_cache_entries(1).await;
            let before = dp.shared.cache.stats().hits_memory;
            let r = get(dp, "/doc").await;
            assert_eq!(r.text(), format!("version {}", round - 1));
            assert_eq!(
                dp.shared.cache.stats().hits_memory,
                before + 1,
                "plane {i} serves from memory"
            );
        }
        put(&dps[round % 3], "/doc").await;
        for (i, dp) in dps.iter().enumerate() {
            let r = get(dp, "/doc").await;
            assert_eq!(
                r.text(),
                format!("version {round}"),
                "plane {i} after PUT {round} through plane {}",
                round % 3
            );
        }
    }
}

#[tokio::test]
async fn s3_interim_1xx_responses_are_never_stored() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that sends 103 Early Hints before each final response.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let counter = std::sync::Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let answer: &[u8] = if head.starts_with("GET /hints") {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\
                              cache-control: max-age=600\r\n\r\n\
                              HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n\
                              content-length: 5\r\n\r\nfinal"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 2\r\n\r\nok"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    let mut s = dp::snapshot(&[addr]);
    s.cache = Some(CachePolicy {
        enabled: true,
        ..lb_proto::defaults::cache()
    });
    let dp = Dp::start(|_| {}, s).await;
    let first = get(&dp, "/hints").await;
    assert_eq!(
        (first.status.as_u16(), first.text().as_str()),
        (200, "final")
    );
    let r = get(&dp, "/hints").await;
    assert_eq!((x_cache(&r), r.text().as_str()), ("HIT", "final"));
    assert_eq!(r.header("link"), None, "nothing of the 103 is stored");
    assert!(
        cache_status(&r).contains("ttl=5"),
        "the final response's freshness"
    );
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
}

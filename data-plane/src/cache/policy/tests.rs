//! Storage rules, freshness and directive parsing, on headers made here.

use super::*;

const NOW: u64 = 1_700_000_000_000;

fn policy() -> Policy {
    Policy {
        enabled: true,
        default_ttl_ms: 30_000,
        max_stale_while_revalidate_ms: 60_000,
        max_stale_if_error_ms: 300_000,
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

fn store(pairs: &[(&str, &str)]) -> Result<Storable, NotStored> {
    storable(StatusCode::OK, &h(pairs), false, &policy(), NOW)
}

fn lifetime(pairs: &[(&str, &str)]) -> u64 {
    store(pairs).unwrap().freshness.fresh_until_ms - NOW
}

#[test]
fn only_get_and_head_without_no_store_range_or_upgrade_use_the_cache() {
    let none = HeaderMap::new();
    assert_eq!(request_bypass(&Method::GET, &none), None);
    assert_eq!(request_bypass(&Method::HEAD, &none), None);
    for m in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
        assert_eq!(request_bypass(&m, &none), Some(Bypass::Method));
    }
    let cases = [
        ("cache-control", "No-Store", Bypass::NoStore),
        ("cache-control", "max-age=0, no-store", Bypass::NoStore),
        ("range", "bytes=0-10", Bypass::Range),
        ("upgrade", "websocket", Bypass::Upgrade),
    ];
    for (k, v, want) in cases {
        assert_eq!(request_bypass(&Method::GET, &h(&[(k, v)])), Some(want));
    }
    // Request no-cache and max-age=0 are ignored on purpose.
    let nc = h(&[("cache-control", "no-cache, max-age=0")]);
    assert_eq!(request_bypass(&Method::GET, &nc), None);
}

#[test]
fn credentials_are_a_flag_not_a_bypass() {
    for (k, v) in [("authorization", "Bearer x"), ("cookie", "a=b")] {
        let req = h(&[(k, v)]);
        assert_eq!(request_bypass(&Method::GET, &req), None);
        assert!(has_credentials(&req));
    }
    assert!(!has_credentials(&h(&[("x-api-key", "k")])));
}

#[test]
fn responses_to_requests_with_credentials_need_explicit_permission() {
    let p = policy();
    let ok = StatusCode::OK;
    let plain = h(&[("cache-control", "max-age=60")]);
    assert_eq!(
        storable(ok, &plain, true, &p, NOW),
        Err(NotStored::Credentials)
    );
    assert!(!storable(ok, &plain, false, &p, NOW).unwrap().public);
    for cc in [
        "public, max-age=60",
        "s-maxage=60",
        "must-revalidate, max-age=60",
    ] {
        let s = storable(ok, &h(&[("cache-control", cc)]), true, &p, NOW).unwrap();
        assert!(s.public, "{cc}");
    }
    assert!(!NotStored::Credentials.is_intrinsic());
}

#[test]
fn no_store_private_no_cache_set_cookie_and_vary_star_are_not_stored() {
    let cases = [
        (
            ("cache-control", "no-store, max-age=60"),
            NotStored::NoStore,
        ),
        (("cache-control", "PRIVATE"), NotStored::Private),
        (
            ("cache-control", "private=\"x-user\", public"),
            NotStored::Private,
        ),
        (("cache-control", "no-cache"), NotStored::NoCache),
        (
            ("cache-control", "no-cache=\"set-cookie\""),
            NotStored::NoCache,
        ),
        (("vary", "accept-encoding, *"), NotStored::VaryStar),
    ];
    for ((k, v), want) in cases {
        assert_eq!(store(&[(k, v)]), Err(want), "{k}: {v}");
    }
    assert_eq!(
        store(&[
            ("cache-control", "public, max-age=60"),
            ("set-cookie", "s=1")
        ]),
        Err(NotStored::SetCookie)
    );
}

#[test]
fn only_the_heuristically_cacheable_statuses_are_stored() {
    let p = policy();
    let cc = h(&[("cache-control", "max-age=60")]);
    for s in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
        let status = StatusCode::from_u16(s).unwrap();
        assert!(storable(status, &cc, false, &p, NOW).is_ok(), "{s}");
    }
    for s in [201, 206, 302, 304, 400, 403, 500, 502, 503] {
        let status = StatusCode::from_u16(s).unwrap();
        assert_eq!(
            storable(status, &cc, false, &p, NOW),
            Err(NotStored::Status),
            "{s}"
        );
    }
}

#[test]
fn vary_names_are_lower_cased_sorted_and_deduplicated() {
    let s = store(&[
        ("vary", "Accept-Encoding, accept-language"),
        ("vary", "ACCEPT-ENCODING"),
    ])
    .unwrap();
    let names: Vec<&str> = s.vary.iter().map(HeaderName::as_str).collect();
    assert_eq!(names, ["accept-encoding", "accept-language"]);
}

#[test]
fn lifetime_comes_from_s_maxage_then_max_age_then_expires_then_the_default() {
    assert_eq!(
        lifetime(&[("cache-control", "max-age=60, s-maxage=120")]),
        120_000
    );
    assert_eq!(
        lifetime(&[
            ("cache-control", "s-maxage=5"),
            ("cache-control", "max-age=60")
        ]),
        5_000
    );
    assert_eq!(
        lifetime(&[
            ("cache-control", "max-age=60"),
            ("expires", "Thu, 01 Dec 2094 16:00:00 GMT")
        ]),
        60_000
    );
    assert_eq!(
        lifetime(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:59:37 GMT")
        ]),
        600_000
    );
    assert_eq!(lifetime(&[]), 30_000);
    assert_eq!(lifetime(&[("cache-control", "public")]), 30_000);
}

#[test]
fn expires_without_date_counts_from_arrival_and_an_invalid_one_is_in_the_past() {
    // NOW is 2023-11-14T22:13:20Z.
    let exp = lifetime(&[("expires", "Tue, 14 Nov 2023 22:14:20 GMT")]);
    assert_eq!(exp, 60_000);
    assert_eq!(store(&[("expires", "0")]), Err(NotStored::Expired));
    assert_eq!(
        store(&[
            ("expires", "yesterday"),
            ("cache-control", "stale-if-error=10")
        ])
        .unwrap()
        .freshness,
        Freshness {
            fresh_until_ms: NOW,
            stale_while_revalidate_until_ms: NOW,
            stale_if_error_until_ms: NOW + 10_000
        }
    );
}

#[test]
fn age_from_upstream_is_subtracted() {
    assert_eq!(
        lifetime(&[("cache-control", "max-age=60"), ("age", "20")]),
        40_000
    );
    assert_eq!(
        store(&[("cache-control", "max-age=60"), ("age", "100")]),
        Err(NotStored::Expired)
    );
    let s = store(&[
        ("cache-control", "max-age=60, stale-while-revalidate=60"),
        ("age", "90"),
    ])
    .unwrap();
    assert_eq!(s.freshness.state(NOW), State::StaleRevalidate);
    assert_eq!(s.freshness.stale_while_revalidate_until_ms, NOW + 30_000);
    assert_eq!(
        lifetime(&[("cache-control", "max-age=60"), ("age", "x")]),
        60_000
    );
}

#[test]
fn stale_windows_are_capped_by_the_policy_and_off_with_must_revalidate() {
    let f = store(&[(
        "cache-control",
        "max-age=10, stale-while-revalidate=30, stale-if-error=86400",
    )])
    .unwrap()
    .freshness;
    assert_eq!(f.fresh_until_ms, NOW + 10_000);
    assert_eq!(f.stale_while_revalidate_until_ms, NOW + 40_000);
    assert_eq!(f.stale_if_error_until_ms, NOW + 10_000 + 300_000);
    let f = store(&[("cache-control", "max-age=10, stale-while-revalidate=3600")])
        .unwrap()
        .freshness;
    assert_eq!(f.stale_while_revalidate_until_ms, NOW + 70_000);
    for cc in [
        "max-age=10, must-revalidate, stale-if-error=60",
        "max-age=10, proxy-revalidate, stale-while-revalidate=60",
    ] {
        let f = store(&[("cache-control", cc)]).unwrap().freshness;
        assert_eq!(f.expires_at_ms(), NOW + 10_000, "{cc}");
    }
    // Explicit windows next to s-maxage are honoured.
    let f = store(&[("cache-control", "s-maxage=10, stale-if-error=60")])
        .unwrap()
        .freshness;
    assert_eq!(f.stale_if_error_until_ms, NOW + 70_000);
}

#[test]
fn states_follow_the_windows() {
    let f = Freshness {
        fresh_until_ms: 100,
        stale_while_revalidate_until_ms: 200,
        stale_if_error_until_ms: 300,
    };
    assert_eq!(f.state(0), State::Fresh);
    assert_eq!(f.state(99), State::Fresh);
    assert_eq!(f.state(100), State::StaleRevalidate);
    assert_eq!(f.state(200), State::StaleIfError);
    assert_eq!(f.state(300), State::Expired);
    assert_eq!(f.expires_at_ms(), 300);
    // A stale-if-error window shorter than the revalidation one.
    let g = Freshness {
        stale_if_error_until_ms: 150,
        ..f
    };
    assert_eq!(g.state(160), State::StaleRevalidate);
    assert_eq!(g.state(250), State::Expired);
    assert_eq!(g.expires_at_ms(), 200);
}

#[test]
fn cache_control_parsing_is_robust() {
    let cc = |v: &str| cache_control(&h(&[("cache-control", v)]));
    assert_eq!(cc("MAX-AGE=60").max_age, Some(60));
    assert_eq!(cc("max-age=\"60\"").max_age, Some(60));
    assert_eq!(cc("  max-age = 60 ").max_age, Some(60));
    assert_eq!(cc("max-age=60, max-age=10").max_age, Some(60));
    assert_eq!(cc("max-age=abc").max_age, None);
    assert_eq!(cc("max-age=-1").max_age, None);
    assert_eq!(cc("max-age=1.5").max_age, None);
    assert_eq!(cc("max-age=").max_age, None);
    assert_eq!(cc("max-age").max_age, None);
    assert_eq!(cc("max-age=\"60").max_age, None);
    assert_eq!(
        cc("max-age=x, max-age=60").max_age,
        None,
        "first occurrence decides"
    );
    assert_eq!(
        cc("max-age=99999999999999999999999999").max_age,
        Some(1 << 31)
    );
    let c = cc("private=\"a, b\", max-age=5,,, ,no-store=1");
    assert!(c.private && c.no_store);
    assert_eq!(c.max_age, Some(5));
    let c = cc("foo=\"a\\\"b, max-age=9\", s-maxage=7");
    assert_eq!((c.max_age, c.s_maxage), (None, Some(7)));
}

#[test]
fn malformed_max_age_counts_as_absent_and_absurd_ones_are_capped() {
    assert_eq!(lifetime(&[("cache-control", "max-age=soon")]), 30_000);
    assert_eq!(
        lifetime(&[
            ("cache-control", "max-age=-5"),
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
        ]),
        60_000
    );
    assert_eq!(
        lifetime(&[("cache-control", "max-age=999999999999999")]),
        MAX_LIFETIME_MS
    );
    assert_eq!(
        lifetime(&[
            ("date", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ("expires", "Fri, 31 Dec 9999 23:59:59 GMT")
        ]),
        MAX_LIFETIME_MS
    );
}

#[test]
fn a_64_kib_cache_control_header_and_binary_garbage_never_panic() {
    let big = format!("{}max-age=60", "x=\"\\\",".repeat(64 * 1024 / 6));
    let _ = cache_control(&h(&[("cache-control", &big)]));
    let big = format!("{}, max-age=60", "a".repeat(64 * 1024));
    assert_eq!(lifetime(&[("cache-control", &big)]), 60_000);
    let big = "9".repeat(64 * 1024);
    assert_eq!(
        cache_control(&h(&[("cache-control", &format!("max-age={big}"))])).max_age,
        Some(1 << 31)
    );
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..2000 {
        let len = rng.usize(0..64);
        let alphabet = b"max-age=s,\"\\ =09\tpublicno-store\x80\xff";
        let bytes: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.usize(0..alphabet.len())])
            .collect();
        if let Ok(v) = HeaderValue::from_bytes(&bytes) {
            let mut m = HeaderMap::new();
            m.insert(header::CACHE_CONTROL, v.clone());
            m.insert(header::EXPIRES, v.clone());
            m.insert(header::AGE, v.clone());
            m.insert(header::VARY, v);
            let _ = storable(StatusCode::OK, &m, false, &policy(), NOW);
            let _ = not_modified(&m, &m);
        }
    }
}

#[test]
fn http_dates_in_all_three_formats() {
    let d = |s: &str| http_date(&HeaderValue::from_str(s).unwrap());
    let want = Some(784_111_777_000);
    assert_eq!(d("Sun, 06 Nov 1994 08:49:37 GMT"), want);
    assert_eq!(d("Sunday, 06-Nov-94 08:49:37 GMT"), want);
    assert_eq!(d("Sun Nov  6 08:49:37 1994"), want);
    assert_eq!(d("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
    assert_eq!(d("Thu, 29 Feb 2024 12:00:00 GMT"), Some(1_709_208_000_000));
    for bad in [
        "0",
        "",
        "Sun, 06 Nov 1994 25:00:00 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 PST",
    ] {
        assert_eq!(d(bad), None, "{bad}");
    }
}

#[test]
fn conditional_requests_match_validators() {
    let stored = h(&[
        ("etag", "W/\"v1\""),
        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ]);
    assert!(not_modified(
        &h(&[("if-none-match", "\"v0\", \"v1\"")]),
        &stored
    ));
    assert!(not_modified(&h(&[("if-none-match", "*")]), &stored));
    assert!(!not_modified(&h(&[("if-none-match", "\"v2\"")]), &stored));
    // If-None-Match decides alone when present.
    assert!(!not_modified(
        &h(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
        ]),
        &stored
    ));
    assert!(not_modified(
        &h(&[("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT")]),
        &stored
    ));
    assert!(!not_modified(
        &h(&[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")]),
        &stored
    ));
    assert!(!not_modified(
        &h(&[("if-modified-since", "garbage")]),
        &stored
    ));
    assert!(is_conditional(&h(&[("if-none-match", "*")])));
}

//! Storage rules, freshness and directive parsing, on headers made here.

use http::HeaderValue;

use super::*;

const NOW: u64 = 1_700_000_000_000;

fn policy() -> Policy {
    Policy {
        enabled: true,
        default_ttl_ms: 0,
        heuristic_percent: 10,
        heuristic_max_ms: 86_400_000,
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
fn s3_no_store_private_no_cache_set_cookie_and_vary_star_are_not_stored() {
    let cases = [
        (
            ("cache-control", "no-store, max-age=60"),
            NotStored::NoStore,
        ),
        (("cache-control", "PRIVATE, max-age=60"), NotStored::Private),
        (("cache-control", "private=\"\", max-age=60"), NotStored::Private),
        (("cache-control", "no-cache, max-age=60"), NotStored::NoCache),
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
fn s5_2_2_qualified_private_and_no_cache_store_the_response_without_those_fields() {
    let s = store(&[
        ("cache-control", "private=\"x-user, Set-Cookie\", max-age=60"),
        ("set-cookie", "s=1"),
    ])
    .unwrap();
    assert_eq!(s.strip, [HeaderName::from_static("x-user"), header::SET_COOKIE]);
    let s = store(&[("cache-control", "no-cache=x-debug, max-age=60")]).unwrap();
    assert_eq!(s.strip, [HeaderName::from_static("x-debug")]);
    assert_eq!(s.freshness.fresh_until_ms, NOW + 60_000);
}

#[test]
fn s5_2_2_4_unqualified_no_cache_is_stored_only_to_be_revalidated() {
    let s = store(&[
        ("cache-control", "no-cache, max-age=60, stale-while-revalidate=60"),
        ("etag", "\"v1\""),
    ])
    .unwrap();
    assert_eq!(s.freshness.state(NOW), State::Expired, "stale at once, no window");
    assert_eq!(s.freshness.keep_until_ms, NOW + VALIDATION_KEEP_MS);
}

#[test]
fn s3_final_statuses_with_explicit_freshness_are_stored_and_others_only_heuristically() {
    let p = policy();
    let cc = h(&[("cache-control", "max-age=60")]);
    for st in [200, 201, 203, 204, 300, 301, 302, 307, 308, 400, 403, 404, 410, 501] {
        let status = StatusCode::from_u16(st).unwrap();
        assert!(storable(status, &cc, false, &p, NOW).is_ok(), "{st}");
    }
    for st in [100, 101, 103, 206, 304, 500, 502, 503] {
        let status = StatusCode::from_u16(st).unwrap();
        assert_eq!(
            storable(status, &cc, false, &p, NOW),
            Err(NotStored::Status),
            "{st}"
        );
    }
    // Without explicit freshness, only the heuristically cacheable ones (or public).
    let lm = h(&[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]);
    assert!(storable(StatusCode::OK, &lm, false, &p, NOW).is_ok());
    assert_eq!(
        storable(StatusCode::FOUND, &lm, false, &p, NOW),
        Err(NotStored::Status)
    );
}

#[test]
fn vary_names_are_lower_cased_sorted_and_deduplicated() {
    let s = store(&[
        ("cache-control", "max-age=60"),
        ("vary", "Accept-Encoding, accept-language"),
        ("vary", "ACCEPT-ENCODING"),
    ])
    .unwrap();
    let names: Vec<&str> = s.vary.iter().map(HeaderName::as_str).collect();
    assert_eq!(names, ["accept-encoding", "accept-language"]);
}

#[test]
fn s4_2_1_lifetime_comes_from_s_maxage_then_max_age_then_expires() {
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
            ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
            ("expires", "Tue, 14 Nov 2023 22:23:20 GMT")
        ]),
        600_000
    );
}

#[test]
fn s4_2_2_heuristic_freshness_needs_last_modified() {
    // Nothing stated and nothing to validate with: not stored.
    assert_eq!(store(&[]), Err(NotStored::Expired));
    assert_eq!(store(&[("cache-control", "public")]), Err(NotStored::Expired));
    // 10% of the 10 000 s since Last-Modified.
    assert_eq!(
        lifetime(&[
            ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
            ("last-modified", "Tue, 14 Nov 2023 19:26:40 GMT")
        ]),
        1_000_000
    );
    // Capped by heuristic_max_ms.
    assert_eq!(
        lifetime(&[("last-modified", "Thu, 01 Jan 1970 00:00:00 GMT")]),
        86_400_000
    );
    // A Last-Modified in the future gives nothing; the entry is kept only to validate.
    let s = store(&[("last-modified", "Fri, 31 Dec 9999 23:59:59 GMT")]).unwrap();
    assert_eq!(s.freshness.state(NOW), State::Expired);
    // Turned off.
    let off = Policy {
        heuristic_percent: 0,
        ..policy()
    };
    let lm = h(&[("last-modified", "Thu, 01 Jan 1970 00:00:00 GMT")]);
    let s = storable(StatusCode::OK, &lm, false, &off, NOW).unwrap();
    assert_eq!(s.freshness.state(NOW), State::Expired);
}

#[test]
fn s4_2_2_default_ttl_is_an_explicit_override_for_responses_stating_nothing() {
    let p = Policy {
        default_ttl_ms: 30_000,
        ..policy()
    };
    let s = storable(StatusCode::OK, &HeaderMap::new(), false, &p, NOW).unwrap();
    assert_eq!(s.freshness.fresh_until_ms, NOW + 30_000);
    // Never in place of what the response states.
    let cc = h(&[("cache-control", "max-age=5")]);
    let s = storable(StatusCode::OK, &cc, false, &p, NOW).unwrap();
    assert_eq!(s.freshness.fresh_until_ms, NOW + 5_000);
}

#[test]
fn s4_2_3_age_counts_the_backends_age_the_response_delay_and_the_apparent_age() {
    let p = policy();
    let cc = |extra: &[(&str, &str)]| {
        let mut m = h(&[("cache-control", "max-age=600")]);
        for (k, v) in extra {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    };
    // Sent 2 s before it arrived, with Age 10: 12 s old on arrival.
    let m = cc(&[("age", "10")]);
    let s = storable_exchange(StatusCode::OK, &m, false, &p, NOW - 2_000, NOW).unwrap();
    assert_eq!(s.initial_age_ms, 12_000);
    assert_eq!(s.freshness.fresh_until_ms, NOW + 588_000);
    // A Date 30 s before arrival: the apparent age wins.
    let date = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(NOW - 30_000),
    );
    let m = cc(&[("age", "10"), ("date", &date)]);
    let s = storable_exchange(StatusCode::OK, &m, false, &p, NOW, NOW).unwrap();
    assert_eq!(s.initial_age_ms, 30_000);
    // A Date in the future is no negative age.
    let s = store(&[
        ("cache-control", "max-age=60"),
        ("date", "Fri, 31 Dec 9999 23:59:59 GMT"),
    ])
    .unwrap();
    assert_eq!(s.initial_age_ms, 0);
}

#[test]
fn s5_1_age_takes_the_first_member_and_ignores_an_invalid_value() {
    let age = |v: &[&str]| {
        let mut m = HeaderMap::new();
        for v in v {
            m.append(header::AGE, v.parse().unwrap());
        }
        age_value(&m)
    };
    assert_eq!(age(&["10"]), 10);
    assert_eq!(age(&[" 10 "]), 10);
    assert_eq!(age(&["10, 20"]), 10);
    assert_eq!(age(&["10", "20"]), 10);
    assert_eq!(age(&["10s"]), 0);
    assert_eq!(age(&["-5"]), 0);
    assert_eq!(age(&["1.5"]), 0);
    assert_eq!(age(&["\"10\""]), 0);
    assert_eq!(age(&["99999999999999999999"]), 1 << 31);
}

#[test]
fn s5_3_expires_on_several_lines_or_invalid_means_already_expired() {
    // NOW is 2023-11-14T22:13:20Z.
    assert_eq!(
        lifetime(&[("expires", "Tue, 14 Nov 2023 22:14:20 GMT")]),
        60_000
    );
    for (a, b) in [
        (
            "Tue, 14 Nov 2023 22:14:20 GMT",
            "Tue, 14 Nov 2023 23:14:20 GMT",
        ),
        ("Tue, 14 Nov 2023 22:14:20 GMT", "0"),
    ] {
        assert_eq!(
            store(&[("expires", a), ("expires", b)]),
            Err(NotStored::Expired),
            "{a} / {b}"
        );
    }
    assert_eq!(store(&[("expires", "0")]), Err(NotStored::Expired));
    // The same date twice is one date.
    assert_eq!(
        lifetime(&[
            ("expires", "Tue, 14 Nov 2023 22:14:20 GMT"),
            ("expires", "Tue, 14 Nov 2023 22:14:20 GMT")
        ]),
        60_000
    );
    // A one-digit hour or day, as some servers write them, is read.
    assert_eq!(
        lifetime(&[("expires", "Wed, 15 Nov 2023 1:00:00 GMT")]),
        10_000_000
    );
    assert_eq!(
        lifetime(&[
            ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
            ("expires", "Tue, 14 Nov 2023 22:23:20 GMT"),
        ]),
        600_000
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
        keep_until_ms: 300,
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
        keep_until_ms: 0,
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
    // Invalid: stale at once (RFC 9111 section 4.2.1).
    assert_eq!(cc("max-age=abc").max_age, Some(0));
    assert_eq!(cc("max-age=-1").max_age, Some(0));
    assert_eq!(cc("max-age=\"-1\"").max_age, Some(0));
    assert_eq!(cc("max-age=1.5").max_age, Some(0));
    assert_eq!(cc("max-age=").max_age, Some(0));
    assert_eq!(cc("max-age").max_age, Some(0));
    assert_eq!(cc("max-age=\"60").max_age, Some(0));
    assert_eq!(cc("stale-if-error=-1").stale_if_error, None);
    assert_eq!(
        cc("max-age=x, max-age=60").max_age,
        Some(0),
        "first occurrence decides"
    );
    assert_eq!(
        cc("max-age=99999999999999999999999999").max_age,
        Some(1 << 31)
    );
    let c = cc("private=\"a, b\", max-age=5,,, ,no-store=1");
    assert!(!c.private && c.no_store);
    assert_eq!(c.private_fields.len(), 2);
    assert_eq!(c.max_age, Some(5));
    let c = cc("foo=\"a\\\"b, max-age=9\", s-maxage=7");
    assert_eq!((c.max_age, c.s_maxage), (None, Some(7)));
}

#[test]
fn s4_2_1_negative_or_malformed_max_age_means_stale_and_absurd_ones_are_capped() {
    for cc in ["max-age=soon", "max-age=-5", "max-age=\"-5\"", "s-maxage=1e3"] {
        assert_eq!(
            store(&[
                ("cache-control", cc),
                ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
                ("expires", "Tue, 14 Nov 2023 22:23:20 GMT")
            ]),
            Err(NotStored::Expired),
            "{cc}: no fallback to Expires"
        );
    }
    assert_eq!(lifetime(&[("cache-control", "max-age=\"60\"")]), 60_000);
    assert_eq!(
        lifetime(&[("cache-control", "max-age=999999999999999")]),
        MAX_LIFETIME_MS
    );
    assert_eq!(
        lifetime(&[
            ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
            ("expires", "Fri, 31 Dec 9999 23:59:59 GMT")
        ]),
        MAX_LIFETIME_MS
    );
}

#[test]
fn targeted_cdn_cache_control_takes_precedence_over_cache_control() {
    let s = store(&[
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=120"),
    ])
    .unwrap();
    assert_eq!(s.freshness.fresh_until_ms, NOW + 120_000);
    assert_eq!(
        store(&[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store")
        ]),
        Err(NotStored::NoStore)
    );
    // An empty one is ignored.
    assert_eq!(
        lifetime(&[("cache-control", "max-age=60"), ("cdn-cache-control", " ")]),
        60_000
    );
}

#[test]
fn an_operator_named_targeted_field_comes_before_cdn_cache_control_and_is_not_stored() {
    let p = Policy {
        targeted_field: Some(HeaderName::from_static("lb-cache-control")),
        ..policy()
    };
    let m = h(&[
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=10"),
        ("lb-cache-control", "max-age=120"),
    ]);
    let s = storable(StatusCode::OK, &m, false, &p, NOW).unwrap();
    assert_eq!(s.freshness.fresh_until_ms, NOW + 120_000);
    assert_eq!(s.strip, [HeaderName::from_static("lb-cache-control")]);
    // Without it configured, the field means nothing here.
    let s = storable(StatusCode::OK, &m, false, &policy(), NOW).unwrap();
    assert_eq!(s.freshness.fresh_until_ms, NOW + 10_000);
}

#[test]
fn s3_2_a_304_updates_the_stored_fields_but_not_the_body_framing() {
    let stored = h(&[
        ("content-length", "5"),
        ("etag", "\"v1\""),
        ("x-a", "1"),
        ("x-a", "2"),
        ("cache-control", "max-age=1"),
    ]);
    let nm = h(&[
        ("content-length", "0"),
        ("cache-control", "max-age=60"),
        ("x-a", "3"),
        ("x-b", "4"),
    ]);
    let u = updated_headers(&stored, &nm);
    assert_eq!(u["content-length"], "5");
    assert_eq!(u["cache-control"], "max-age=60");
    assert_eq!(u.get_all("x-a").iter().collect::<Vec<_>>(), ["3"]);
    assert_eq!(u["x-b"], "4");
    assert_eq!(u["etag"], "\"v1\"");
}

#[test]
fn a_64_kib_cache_control_header_and_binary_garbage_never_panic() {
    let big = format!("{}max-age=60", "x=\"\\\",".repeat(64 * 1024 / 6));
    let _ = cache_control(&h(&[("cache-control", &big)]));
    let big = format!("{}, max-age=60", "a".repeat(64 * 1024));
    assert_eq!(lifetime(&[("cache-control", &big)]), 60_000);
    let names = format!("private=\"{}\"", "a,".repeat(32 * 1024));
    let c = cache_control(&h(&[("cache-control", &names)]));
    assert!(c.private_fields.len() <= 64);
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
            m.insert(header::DATE, v.clone());
            m.insert(header::LAST_MODIFIED, v.clone());
            m.insert(CDN_CACHE_CONTROL, v.clone());
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
    assert_eq!(d("Sun, 6 Nov 1994 8:49:37 GMT"), want);
    assert_eq!(d("Sun,  06 Nov  1994 08:49:37 GMT"), want);
    assert_eq!(d("Sun Nov 6 8:49:37 1994"), want);
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

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn value(s: &str) -> Option<HeaderValue> {
        HeaderValue::from_str(s).ok()
    }

    proptest! {
        #[test]
        fn delta_seconds_reads_any_digits_and_caps_them(n in any::<u64>(), zeros in 0usize..5) {
            let text = format!("{}{n}", "0".repeat(zeros));
            prop_assert_eq!(delta_seconds(text.as_bytes()), Some(n.min(1 << 31)));
        }

        #[test]
        fn delta_seconds_refuses_anything_but_digits(s in "[^0-9]{1,4}[0-9]{0,3}") {
            prop_assert_eq!(delta_seconds(s.as_bytes()), None);
        }

        #[test]
        fn max_age_is_found_among_any_other_directives(
            n in 0u64..1_000_000,
            before in proptest::collection::vec("[a-z-]{1,12}(=[a-z0-9]{0,5})?", 0..5),
            quoted in any::<bool>(),
        ) {
            let arg = if quoted { format!("\"{n}\"") } else { n.to_string() };
            let mut parts: Vec<String> =
                before.into_iter().filter(|d| !d.starts_with("max-age")).collect();
            parts.push(format!("max-age={arg}"));
            let m = h(&[("cache-control", &parts.join(", "))]);
            prop_assert_eq!(cache_control(&m).max_age, Some(n));
        }

        #[test]
        fn http_dates_round_trip_with_or_without_leading_zeros(secs in 0u64..253_402_300_799) {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let imf = httpdate::fmt_http_date(t);
            prop_assert_eq!(http_date(&value(&imf).unwrap()), Some(secs * 1000));
            // The same with a one-digit day and hour, where they have a leading zero.
            let loose = imf
                .split(' ')
                .enumerate()
                .map(|(i, w)| match (i, w.as_bytes()) {
                    (1 | 4, [b'0', rest @ ..]) => String::from_utf8_lossy(rest).into_owned(),
                    _ => w.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(" ");
            prop_assert_eq!(http_date(&value(&loose).unwrap()), Some(secs * 1000), "{}", loose);
        }

        #[test]
        fn parsers_never_panic_on_any_field_value(s in "\\PC{0,80}", n in 0usize..3) {
            if let Some(v) = value(&s) {
                let mut m = HeaderMap::new();
                for name in [
                    header::CACHE_CONTROL,
                    header::EXPIRES,
                    header::AGE,
                    header::DATE,
                    header::LAST_MODIFIED,
                    header::VARY,
                    CDN_CACHE_CONTROL,
                ] {
                    for _ in 0..=n {
                        m.append(name.clone(), v.clone());
                    }
                }
                let _ = http_date(&v);
                let _ = age_value(&m);
                let _ = storable_exchange(StatusCode::OK, &m, false, &policy(), NOW - 5, NOW);
                let _ = not_modified(&m, &m);
                let _ = updated_headers(&m, &m);
            }
        }

        #[test]
        fn freshness_stays_within_the_cap_and_the_age_counts_at_least_the_backends(
            max_age in any::<u32>(),
            age in any::<u32>(),
            sent_before in 0u64..100_000,
        ) {
            let m = h(&[
                ("cache-control", &format!("max-age={max_age}")),
                ("age", &age.to_string()),
            ]);
            let stored =
                storable_exchange(StatusCode::OK, &m, false, &policy(), NOW - sent_before, NOW);
            if let Ok(s) = stored {
                prop_assert!(s.freshness.fresh_until_ms <= NOW + MAX_LIFETIME_MS);
                prop_assert!(s.freshness.keep_until_ms > NOW);
                let backend = (u64::from(age) * 1000).min(MAX_LIFETIME_MS);
                prop_assert!(s.initial_age_ms >= backend);
            }
        }
    }
}

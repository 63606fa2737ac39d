//! The request head reader: examples of each framing rule, and properties over generated heads
//! (whatever the bytes and however they arrive, nothing panics, the result does not depend on
//! the cut, and framing follows the rules of RFC 9112 section 6.3 as a model states them).

use bytes::BytesMut;
use http::{Method, Version};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use super::{Head, HeadError, parse};
use crate::upstream::parse::Framing;

const MAX: usize = 64 * 1024;

fn head_of(text: &[u8]) -> Result<Option<Head>, HeadError> {
    parse(&mut BytesMut::from(text), MAX)
}

fn framing_of(text: &str) -> Result<Framing, HeadError> {
    head_of(text.as_bytes()).map(|h| h.expect("a whole head").framing)
}

#[test]
fn a_get_has_no_body_and_keeps_its_fields_and_the_bytes_after_it() {
    let mut buf =
        BytesMut::from(&b"\r\nGET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nX-Two: 2\r\n\r\nNEXT"[..]);
    let h = parse(&mut buf, MAX).unwrap().unwrap();
    assert_eq!(h.request.method(), Method::GET);
    assert_eq!(h.request.uri(), "/a?b=c");
    assert_eq!(h.request.version(), Version::HTTP_11);
    assert_eq!(h.request.headers()["host"], "x");
    assert_eq!(h.request.headers().get_all("x-two").iter().count(), 2);
    assert_eq!(h.framing, Framing::Empty);
    assert!(h.keep_alive);
    assert_eq!(&buf[..], b"NEXT");
}

#[test]
fn framing_follows_rfc_9112_section_6_3() {
    let req = |fields: &str| format!("POST / HTTP/1.1\r\nhost: a\r\n{fields}\r\n");
    assert_eq!(framing_of(&req("content-length: 5\r\n")), Ok(Framing::Length(5)));
    assert_eq!(framing_of(&req("content-length: 0\r\n")), Ok(Framing::Empty));
    assert_eq!(
        framing_of(&req("content-length: 5\r\ncontent-length: 5\r\n")),
        Ok(Framing::Length(5))
    );
    assert_eq!(framing_of(&req("content-length: 5, 5\r\n")), Ok(Framing::Length(5)));
    assert_eq!(framing_of(&req("transfer-encoding: chunked\r\n")), Ok(Framing::Chunked));
    assert_eq!(
        framing_of(&req("transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n")),
        Ok(Framing::Chunked)
    );
    for refused in [
        "content-length: 5\r\ncontent-length: 6\r\n",
        "content-length: 5, 6\r\n",
        "content-length: -5\r\n",
        "content-length: +5\r\n",
        "content-length: 5x\r\n",
        "content-length: \r\n",
        "content-length: 99999999999999999999\r\n",
        "transfer-encoding: chunked\r\ncontent-length: 5\r\n",
        "content-length: 5\r\ntransfer-encoding: chunked\r\n",
        "transfer-encoding: gzip\r\n",
        "transfer-encoding: chunked, gzip\r\n",
    ] {
        assert!(
            matches!(framing_of(&req(refused)), Err(HeadError::Invalid(_))),
            "{refused:?}"
        );
    }
    assert!(matches!(
        framing_of("POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n"),
        Err(HeadError::Invalid(_))
    ));
}

#[test]
fn keep_alive_is_what_the_version_and_connection_say() {
    let ka = |text: &str| head_of(text.as_bytes()).unwrap().unwrap().keep_alive;
    assert!(ka("GET / HTTP/1.1\r\n\r\n"));
    assert!(!ka("GET / HTTP/1.1\r\nconnection: close\r\n\r\n"));
    assert!(!ka("GET / HTTP/1.1\r\nconnection: upgrade, Close\r\n\r\n"));
    assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
    assert!(ka("GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"));
}

#[test]
fn expect_100_continue_is_seen_on_http_1_1_only() {
    let exp = |text: &str| head_of(text.as_bytes()).unwrap().unwrap().expects_continue;
    assert!(exp("PUT / HTTP/1.1\r\nexpect: 100-Continue\r\ncontent-length: 1\r\n\r\n"));
    assert!(!exp("PUT / HTTP/1.0\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n"));
    assert!(!exp("PUT / HTTP/1.1\r\ncontent-length: 1\r\n\r\n"));
}

#[test]
fn heads_over_the_limits_are_too_large() {
    let long = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(100));
    assert_eq!(
        parse(&mut BytesMut::from(long.as_bytes()), 64).unwrap_err(),
        HeadError::TooLarge(64)
    );
    // Incomplete, but already past the limit.
    assert_eq!(
        parse(&mut BytesMut::from(&long.as_bytes()[..80]), 64).unwrap_err(),
        HeadError::TooLarge(64)
    );
    let many: String = (0..=super::MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
    assert!(matches!(head_of(many.as_bytes()), Err(HeadError::TooLarge(_))));
}

#[test]
fn what_is_not_a_request_head_is_invalid() {
    for bad in [
        &b"GET / HTTP/1.1\r\nbad header\r\n\r\n"[..],
        b"GET / HTTP/2.0\r\n\r\n",
        b"G@T / HTTP/1.1\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n",
    ] {
        assert!(
            matches!(head_of(bad), Err(HeadError::Invalid(_))),
            "{}",
            bad.escape_ascii()
        );
    }
}

/// The parsers' property-test settings: no regression files, `PROPTEST_CASES` honoured.
fn config() -> ProptestConfig {
    crate::upstream::parse_props::config(256)
}

/// A framing field, as a generated head may carry it.
#[derive(Debug, Clone)]
enum Field {
    Length(String),
    Coding(String),
    Other(String, String),
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![
        prop_oneof![
            (0u64..100_000).prop_map(|n| n.to_string()),
            select(vec!["", "-1", "1x", " 7 ", "3, 3", "3, 4", "00012"]).prop_map(String::from),
        ]
        .prop_map(Field::Length),
        select(vec!["chunked", "gzip", "gzip, chunked", "chunked, gzip", "Chunked", " chunked "])
            .prop_map(|c| Field::Coding(c.to_owned())),
        ("[a-z][a-z0-9-]{0,12}", "[ -~]{0,20}").prop_map(|(n, v)| Field::Other(n, v)),
    ]
}

fn render(version: &str, fields: &[Field]) -> String {
    let mut text = format!("POST /x HTTP/{version}\r\n");
    for f in fields {
        let (n, v) = match f {
            Field::Length(v) => ("content-length", v.as_str()),
            Field::Coding(v) => ("transfer-encoding", v.as_str()),
            Field::Other(n, v) => (n.as_str(), v.as_str()),
        };
        text.push_str(&format!("{n}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text
}

/// RFC 9112 section 6.3 as this server applies it: the framing, or `None` for a refusal.
fn model(version: &str, fields: &[Field]) -> Option<Framing> {
    let codings: Vec<&str> = fields
        .iter()
        .filter_map(|f| match f {
            Field::Coding(c) => Some(c.as_str()),
            Field::Other(n, _) if n == "transfer-encoding" => Some("?"),
            _ => None,
        })
        .collect();
    let lengths: Vec<Option<u64>> = fields
        .iter()
        .filter_map(|f| match f {
            Field::Length(v) => Some(v),
            _ => None,
        })
        .flat_map(|v| v.split(',').map(|p| p.trim().parse::<u64>().ok()).collect::<Vec<_>>())
        .collect();
    let other_lengths = fields
        .iter()
        .any(|f| matches!(f, Field::Other(n, _) if n == "content-length"));
    if other_lengths || codings.contains(&"?") {
        return None;
    }
    if !codings.is_empty() {
        let last = codings.last()?.rsplit(',').next()?.trim();
        return (version == "1.1" && lengths.is_empty() && last.eq_ignore_ascii_case("chunked"))
            .then_some(Framing::Chunked);
    }
    let mut length = None;
    for l in lengths {
        let l = l?;
        if length.is_some_and(|x| x != l) {
            return None;
        }
        length = Some(l);
    }
    Some(match length {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn framing_is_the_models(
        version in select(vec!["1.0", "1.1"]),
        fields in vec(field(), 0..5),
    ) {
        let text = render(version, &fields);
        let got = head_of(text.as_bytes());
        let expected = model(version, &fields);
        match (got, expected) {
            (Ok(Some(h)), Some(f)) => prop_assert_eq!(h.framing, f, "{}", text),
            (Err(HeadError::Invalid(_)), None) => {}
            (got, expected) => prop_assert!(false, "{text:?}: got {got:?}, model says {expected:?}"),
        }
    }

    #[test]
    fn a_head_read_in_pieces_is_the_head_read_whole(
        fields in vec(field(), 0..5),
        cuts in vec(any::<usize>(), 0..6),
        rest in vec(any::<u8>(), 0..16),
    ) {
        let mut whole = render("1.1", &fields).into_bytes();
        let head_len = whole.len();
        whole.extend_from_slice(&rest);
        let at_once = head_of(&whole);
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (whole.len() + 1)).collect();
        at.sort_unstable();
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut got = None;
        for end in at.into_iter().chain([whole.len()]) {
            buf.extend_from_slice(&whole[fed..end.max(fed)]);
            fed = end.max(fed);
            match parse(&mut buf, MAX) {
                Ok(None) => prop_assert!(fed < head_len, "a whole head not seen"),
                other => {
                    got = Some(other);
                    break;
                }
            }
        }
        let got = got.expect("the whole head gives an answer");
        match (&got, &at_once) {
            (Ok(Some(a)), Ok(Some(b))) => {
                prop_assert_eq!(a.framing, b.framing);
                prop_assert_eq!(a.request.headers(), b.request.headers());
                let mut left = buf.to_vec();
                left.extend_from_slice(&whole[fed..]);
                prop_assert_eq!(left, rest);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            _ => prop_assert!(false, "{got:?} against {at_once:?}"),
        }
    }

    #[test]
    fn any_bytes_give_an_answer_and_never_a_panic(bytes in vec(any::<u8>(), 0..300)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        if let Ok(Some(_)) = parse(&mut buf, 256) {
            prop_assert!(buf.len() < before);
        }
    }
}

//! Robustness (whatever comes, in whatever pieces, nothing panics and the result does not depend
//! on the cuts) and valid framings decoding to exactly their body.

use super::*;

/// Bytes that look like a response head, more or less.
fn head_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..400),
        case().prop_map(|c| c.wire()),
        (case(), edits()).prop_map(|(c, e)| mutate(c.wire(), &e)),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// Any bytes, whole or in pieces: no panic, and the same head (or refusal) however they
    /// were cut; then the body after it decodes the same way too.
    #[test]
    fn any_head_parses_the_same_whole_or_in_pieces(
        bytes in head_like(),
        cuts in vec(any::<usize>(), 0..16),
        body_cuts in vec(any::<usize>(), 0..16),
        head_only in any::<bool>(),
    ) {
        let whole = read_head(&[&bytes], head_only);
        let pieces = read_head(&split(&bytes, &cuts), head_only);
        prop_assert_eq!(&pieces, &whole);
        if let HeadOutcome::Head(head, rest) = whole {
            if head_only || matches!(head.status, 204 | 304) {
                prop_assert_eq!(head.framing, Framing::Empty);
            }
            let all = decode(head.framing, &[&rest.0]);
            let cut = decode(head.framing, &split(&rest.0, &body_cuts));
            prop_assert_eq!(cut, all);
        }
    }

    /// Any bytes under any framing, whole or in pieces: no panic, the same data and the same
    /// ending (data is never empty, the end stays the end: checked in `decode`).
    #[test]
    fn any_body_decodes_the_same_whole_or_in_pieces(
        framing in framing(),
        bytes in chunked_like(),
        cuts in vec(any::<usize>(), 0..24),
    ) {
        let whole = decode(framing, &[&bytes]);
        let pieces = decode(framing, &split(&bytes, &cuts));
        prop_assert_eq!(&pieces, &whole);
        if let (Framing::Length(n), (data, Ending::End(rest))) = (framing, &whole) {
            prop_assert_eq!(data.0.len() as u64, n);
            prop_assert_eq!(&rest.0[..], &bytes[n as usize..]);
        }
        if framing == Framing::UntilClose {
            prop_assert_eq!(whole, (Shown(bytes), Ending::Closed));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Valid framings decode to exactly their body.

/// Harmless fields a head may carry around its framing field.
fn harmless() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    vec(
        select(vec![
            ("content-type", "text/plain"),
            ("cache-control", "no-store"),
            ("x-empty", ""),
            ("connection", "keep-alive"),
            ("etag", "\"v1\""),
        ]),
        0..5,
    )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_chunked_body_decodes_to_itself_and_nothing_more(
        enc in chunked(3000),
        suffix in vec(any::<u8>(), 0..40),
        cuts in vec(any::<usize>(), 0..24),
    ) {
        let mut wire = enc.wire.0.clone();
        wire.extend_from_slice(&suffix);
        let (data, ending) = decode(Framing::Chunked, &split(&wire, &cuts));
        prop_assert_eq!(data, enc.body);
        prop_assert_eq!(ending, Ending::End(Shown(suffix)));
    }

    #[test]
    fn a_sized_body_decodes_to_itself_and_nothing_more(
        body in vec(any::<u8>(), 0..3000),
        suffix in vec(any::<u8>(), 0..40),
        cuts in vec(any::<usize>(), 0..24),
    ) {
        let mut wire = body.clone();
        wire.extend_from_slice(&suffix);
        let (data, ending) = decode(Framing::Length(body.len() as u64), &split(&wire, &cuts));
        prop_assert_eq!(data, Shown(body));
        prop_assert_eq!(ending, Ending::End(Shown(suffix)));
    }

    /// A whole response, interim heads first, in pieces: the head takes exactly its bytes, the
    /// body exactly its own, and what follows (the next response) stays.
    #[test]
    fn a_whole_response_takes_its_head_then_its_body_and_nothing_more(
        interims in vec(interim(), 0..3),
        fields in harmless(),
        sized in any::<bool>(),
        enc in chunked(2000),
        suffix in vec(any::<u8>(), 0..40),
        cuts in vec(any::<usize>(), 0..24),
        body_cuts in vec(any::<usize>(), 0..24),
    ) {
        let mut wire = Vec::new();
        for h in &interims {
            h.wire(&mut wire);
        }
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for (n, v) in &fields {
            wire.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        let (framing, body) = if sized {
            let n = enc.body.0.len();
            wire.extend_from_slice(format!("content-length: {n}\r\n\r\n").as_bytes());
            let framing = if n == 0 { Framing::Empty } else { Framing::Length(n as u64) };
            (framing, enc.body.0.clone())
        } else {
            wire.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            (Framing::Chunked, enc.wire.0.clone())
        };
        wire.extend_from_slice(&body);
        wire.extend_from_slice(&suffix);
        let HeadOutcome::Head(head, rest) = read_head(&split(&wire, &cuts), false) else {
            return Err(TestCaseError::fail(format!("no head in {:?}", Shown(wire))));
        };
        prop_assert_eq!(head.status, 200);
        prop_assert_eq!(head.framing, framing);
        prop_assert!(head.reusable);
        // Hop-by-hop fields stay behind; the others come through in order.
        let kept: Vec<(String, Shown)> = fields
            .iter()
            .filter(|(n, _)| *n != "connection")
            .map(|(n, v)| (n.to_string(), Shown(v.as_bytes().to_vec())))
            .collect();
        let mut seen = head.fields.clone();
        seen.retain(|(n, _)| n != "content-length");
        let mut expected = kept;
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(seen, expected);
        let (data, ending) = decode(head.framing, &split(&rest.0, &body_cuts));
        prop_assert_eq!(data, enc.body);
        prop_assert_eq!(ending, Ending::End(Shown(suffix)));
    }
}

//! Property tests of the response parser and body decoder ([`super::parse`]): whatever a backend
//! sends, fed in whatever pieces, nothing panics and the result does not depend on how the bytes
//! were cut; valid chunked and `Content-Length` bodies decode to exactly themselves and leave the
//! bytes after them alone; and response heads are read as hyper's HTTP/1 client (the reference)
//! reads them, but for the differences listed at [`Difference`].

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::parse::{
    Decoded, Decoder, Framing, MAX_CHUNK_LINE, MAX_HEAD_BYTES, MAX_HEADERS, MAX_TRAILERS,
    ParsedHead, parse_head,
};

/// Bytes shown as an escaped string in failures.
#[derive(Clone, PartialEq, Eq)]
struct Shown(Vec<u8>);

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// No regression files written next to the sources: a failure prints its input. At least
/// `cases` cases, more when `PROPTEST_CASES` asks (CI's longer fuzzing run).
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let asked = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    ProptestConfig {
        cases: asked.map_or(cases, |n| n.max(cases)),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `bytes` cut at `cuts` (taken modulo its length), in order; no piece is empty.
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.extend([0, bytes.len()]);
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

fn rest_of(buf: &BytesMut, pieces: &[&[u8]]) -> Vec<u8> {
    let mut rest = buf.to_vec();
    for p in pieces {
        rest.extend_from_slice(p);
    }
    rest
}

/// What a response head parsed into, as far as anyone can see.
#[derive(Debug, PartialEq)]
struct HeadSummary {
    status: u16,
    version: http::Version,
    framing: Framing,
    reusable: bool,
    fields: Vec<(String, Shown)>,
}

fn summary(p: &ParsedHead) -> HeadSummary {
    HeadSummary {
        status: p.response.status().as_u16(),
        version: p.response.version(),
        framing: p.framing,
        reusable: p.reusable,
        fields: p
            .response
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), Shown(v.as_bytes().to_vec())))
            .collect(),
    }
}

#[derive(Debug, PartialEq)]
enum HeadOutcome {
    /// The head, and every byte after it (left in the buffer or not fed yet).
    Head(HeadSummary, Shown),
    /// No complete head: what is left of the buffer (interim heads taken out).
    Partial(Shown),
    Refused,
}

/// Feeds `pieces` to [`parse_head`] one at a time, as reads from a socket would.
fn read_head(pieces: &[&[u8]], head_only: bool) -> HeadOutcome {
    let mut buf = BytesMut::new();
    for (i, piece) in pieces.iter().enumerate() {
        buf.extend_from_slice(piece);
        match parse_head(&mut buf, head_only, false) {
            Ok(None) => {}
            Ok(Some(head)) => {
                return HeadOutcome::Head(summary(&head), Shown(rest_of(&buf, &pieces[i + 1..])));
            }
            Err(_) => return HeadOutcome::Refused,
        }
    }
    HeadOutcome::Partial(Shown(buf.to_vec()))
}

/// How decoding a body ended.
#[derive(Debug, PartialEq)]
enum Ending {
    /// The body's end, and every byte after it.
    End(Shown),
    /// Waiting for more when the connection closed: the end of a body delimited by the close.
    Closed,
    /// Waiting for more when the connection closed: a body cut short.
    Short,
    Error,
}

/// Feeds `pieces` to a [`Decoder`] one at a time: the body bytes decoded and how it ended.
fn decode(framing: Framing, pieces: &[&[u8]]) -> (Shown, Ending) {
    let mut decoder = Decoder::new(framing);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut fed = 0;
    // A first turn with nothing fed: a body with no bytes ends at once.
    for (i, piece) in std::iter::once(&[][..])
        .chain(pieces.iter().copied())
        .enumerate()
    {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => {
                    assert!(!d.is_empty(), "the decoder returned empty data");
                    data.extend_from_slice(&d);
                    assert!(data.len() <= fed, "more data decoded than fed");
                }
                Ok(Decoded::End) => {
                    // The end stays the end, and leaves the bytes after it alone.
                    let before = buf.clone();
                    assert_eq!(decoder.decode(&mut buf).unwrap(), Decoded::End);
                    assert_eq!(buf, before);
                    assert!(decoder.is_done());
                    assert_eq!(decoder.remaining(), Some(0));
                    return (Shown(data), Ending::End(Shown(rest_of(&buf, &pieces[i..]))));
                }
                Ok(Decoded::NeedMore) => break,
                Err(_) => return (Shown(data), Ending::Error),
            }
        }
    }
    match decoder.at_close() {
        Ok(()) => (Shown(data), Ending::Closed),
        Err(_) => (Shown(data), Ending::Short),
    }
}

// ---------------------------------------------------------------------------------------------
// Generators.

/// A chunked body: the bytes it carries and their encoding.
#[derive(Debug, Clone)]
struct Chunked {
    body: Shown,
    wire: Shown,
}

/// Chunk extensions, as RFC 9112 section 7.1.1 allows them (whitespace before `;` included).
fn extension() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        4 => Just(""),
        1 => select(vec![
            ";a",
            ";name=value",
            ";n=\"quoted;value\"",
            " ;bws=1",
            "\t;tab",
            ";a;b=c",
        ]),
    ]
}

fn trailer() -> impl Strategy<Value = String> {
    (0u8..10, select(vec!["1", "abc", "a, b", "\"quoted\""]))
        .prop_map(|(n, v)| format!("x-trailer-{n}: {v}"))
}

/// A body of up to `max` bytes in chunks of random sizes, each size in upper or lower case hex
/// with up to two leading zeros and an optional extension; an optional extension on the last
/// chunk and up to three trailer fields.
fn chunked(max: usize) -> impl Strategy<Value = Chunked> {
    (
        vec(any::<u8>(), 0..max),
        vec((1usize..300, any::<bool>(), 0usize..3, extension()), 1..24),
        extension(),
        vec(trailer(), 0..3),
    )
        .prop_map(|(body, chunks, last_ext, trailers)| {
            let mut wire = Vec::new();
            let mut at = 0;
            for (size, upper, zeros, ext) in chunks.iter().cycle() {
                if at == body.len() {
                    break;
                }
                let n = (*size).min(body.len() - at);
                let hex = if *upper {
                    format!("{n:X}")
                } else {
                    format!("{n:x}")
                };
                wire.extend_from_slice(format!("{}{hex}{ext}\r\n", "0".repeat(*zeros)).as_bytes());
                wire.extend_from_slice(&body[at..at + n]);
                wire.extend_from_slice(b"\r\n");
                at += n;
            }
            wire.extend_from_slice(format!("0{last_ext}\r\n").as_bytes());
            for t in trailers {
                wire.extend_from_slice(t.as_bytes());
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            Chunked {
                body: Shown(body),
                wire: Shown(wire),
            }
        })
}

/// Random edits of `bytes`: (position, byte, kind) with kind 0 replace, 1 insert, 2 delete.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(pos, byte, kind) in edits {
        let at = pos % (bytes.len() + 1);
        match kind {
            0 if at < bytes.len() => bytes[at] = byte,
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => bytes.insert(at, byte),
        }
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6)
}

/// Bytes that look like a chunked body, more or less.
fn chunked_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..300),
        chunked(200).prop_map(|c| c.wire.0),
        (chunked(200), edits()).prop_map(|(c, e)| mutate(c.wire.0, &e)),
        // Token soup of what chunk lines are made of.
        vec(
            select(vec![
                "0",
                "1",
                "a",
                "F",
                "ff",
                "10",
                "\r\n",
                "\n",
                "\r",
                ";",
                "=",
                " ",
                "\t",
                "x",
                "z",
                "0\r\n\r\n",
                "5\r\nhello\r\n",
            ]),
            0..60
        )
        .prop_map(|t| t.concat().into_bytes()),
        // A chunk-size line around the limit.
        (MAX_CHUNK_LINE - 2..MAX_CHUNK_LINE + 3).prop_map(|n| {
            let mut v = b"1;".to_vec();
            v.resize(n, b'x');
            v.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
            v
        }),
        // A trailer section around the limit.
        (MAX_TRAILERS - 8..MAX_TRAILERS + 8).prop_map(|n| {
            let mut v = b"0\r\nx-t: ".to_vec();
            v.resize(n, b'y');
            v.extend_from_slice(b"\r\n\r\n");
            v
        }),
    ]
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        Just(Framing::Empty),
        (0u64..600).prop_map(Framing::Length),
        Just(Framing::Length(u64::MAX)),
        Just(Framing::Chunked),
        Just(Framing::UntilClose),
    ]
}

/// One response head as generated: each part kept apart, so a case can be told apart from the
/// ones hyper reads differently on purpose.
#[derive(Clone)]
struct Head {
    version: &'static str,
    status: String,
    reason: Vec<u8>,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    eol: &'static str,
}

impl fmt::Debug for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut wire = Vec::new();
        self.wire(&mut wire);
        Shown(wire).fmt(f)
    }
}

impl Head {
    fn wire(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.version.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.status.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.reason);
        out.extend_from_slice(self.eol.as_bytes());
        for (name, value) in &self.fields {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(self.eol.as_bytes());
        }
        out.extend_from_slice(self.eol.as_bytes());
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &v[..])
    }
}

/// A whole response as a backend sends it: interim heads, the final head, then body bytes, then
/// the close.
#[derive(Clone)]
struct Case {
    interim: Vec<Head>,
    last: Head,
    body: Vec<u8>,
}

impl Case {
    fn wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for h in &self.interim {
            h.wire(&mut out);
        }
        self.last.wire(&mut out);
        out.extend_from_slice(&self.body);
        out
    }
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Shown(self.wire()).fmt(f)
    }
}

const ODD_LENGTHS: [&[u8]; 13] = [
    b"",
    b"+5",
    b"-1",
    b"0x5",
    b" 7\t",
    b"05",
    b"5 5",
    b"5,",
    b"99999999999999999999999",
    b"18446744073709551615",
    // Unicode whitespace (no-break space, em space) around digits: obs-text to HTTP.
    b"5\xc2\xa0",
    b"\xe2\x80\x835",
    b"\x805",
];

fn content_length() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (0u32..40).prop_map(|n| n.to_string().into_bytes()),
        1 => (0u32..40).prop_map(|n| format!("{n}, {n}").into_bytes()),
        1 => (0u32..40, 0u32..40).prop_map(|(a, b)| format!("{a},{b}").into_bytes()),
        2 => select(ODD_LENGTHS.to_vec()).prop_map(<[u8]>::to_vec),
    ]
}

const CODINGS: [&[u8]; 13] = [
    b"chunked",
    b"Chunked",
    b"CHUNKED",
    b"gzip, chunked",
    b"gzip,chunked",
    b"chunked, gzip",
    b"chunked,",
    b"gzip",
    b"identity",
    b"",
    b"chunked \t",
    b"x\x80y, chunked",
    b"chunked\xff",
];

fn transfer_encoding() -> impl Strategy<Value = Vec<u8>> {
    select(CODINGS.to_vec()).prop_map(<[u8]>::to_vec)
}

/// Whitespace before the colon, an obs-fold continuation, bad names, control characters.
const ODD_FIELDS: [(&[u8], &[u8]); 7] = [
    (b"content-length ", b"3"),
    (b"transfer-encoding\t", b"chunked"),
    (b"x-fold", b"a\r\n b"),
    (b"", b"x"),
    (b"bad name", b"x"),
    (b"x-ctl", b"a\x01b"),
    (b"x-del", b"a\x7fb"),
];

/// Header fields, tricky ones among them.
fn field() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let name = |names: Vec<&'static str>| select(names).prop_map(|n| n.as_bytes().to_vec());
    prop_oneof![
        4 => (name(vec!["content-length", "Content-Length", "CONTENT-LENGTH"]), content_length()),
        3 => (name(vec!["transfer-encoding", "Transfer-Encoding"]), transfer_encoding()),
        1 => (
            name(vec!["connection"]),
            select(vec!["close", "keep-alive", "upgrade", "x-a, close"]).prop_map(|v| v.as_bytes().to_vec())
        ),
        // obs-text and whitespace inside values.
        2 => (
            name(vec!["x-obs", "content-type", "etag"]),
            vec(prop_oneof![0x80u8..=0xff, 0x20u8..0x7f, Just(b'\t')], 0..12)
        ),
        1 => select(ODD_FIELDS.to_vec()).prop_map(|(n, v)| (n.to_vec(), v.to_vec())),
    ]
}

/// Field counts on either side of the limit, sometimes.
fn filler() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => Just(0usize),
        1 => select(vec![100usize, 127, 128, 129, 150]),
    ]
}

const REASONS: [&[u8]; 5] = [b"OK", b"", b"Some Reason", b"obs \x80\xff", b"tab\there"];

fn head() -> impl Strategy<Value = Head> {
    (
        prop_oneof![
            8 => Just("HTTP/1.1"),
            3 => Just("HTTP/1.0"),
            1 => select(vec!["HTTP/1.2", "HTTP/2.0", "http/1.1", "HTTP/1.1 "]),
        ],
        prop_oneof![
            8 => select(vec![200u16, 201, 204, 206, 299, 304, 404, 500, 503, 599, 600, 999])
                .prop_map(|s| s.to_string()),
            1 => select(vec![100u16, 101, 103, 199]).prop_map(|s| s.to_string()),
            1 => (0u16..1000).prop_map(|s| format!("{s:03}")),
            1 => select(vec!["20", "2000", "2x0", ""]).prop_map(str::to_owned),
        ],
        select(REASONS.to_vec()).prop_map(<[u8]>::to_vec),
        filler(),
        vec(field(), 0..6),
        prop_oneof![6 => Just("\r\n"), 1 => Just("\n")],
    )
        .prop_map(|(version, status, reason, filler, mut fields, eol)| {
            let mut all: Vec<(Vec<u8>, Vec<u8>)> = (0..filler)
                .map(|i| {
                    (
                        format!("x-fill-{i}").into_bytes(),
                        i.to_string().into_bytes(),
                    )
                })
                .collect();
            all.append(&mut fields);
            Head {
                version,
                status,
                reason,
                fields: all,
                eol,
            }
        })
}

/// An interim head, as a backend sends before its answer (never 101: see [`Difference`]).
fn interim() -> impl Strategy<Value = Head> {
    (
        select(vec![100u16, 102, 103, 199]),
        vec(
            select(vec![
                ("link", "</style.css>; rel=preload"),
                ("x-progress", "50"),
                ("content-length", "12"),
            ])
            .prop_map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())),
            0..2,
        ),
    )
        .prop_map(|(status, fields)| Head {
            version: "HTTP/1.1",
            status: status.to_string(),
            reason: b"Interim".to_vec(),
            fields,
            eol: "\r\n",
        })
}

/// What follows the head: a chunked body, or plain letters (none of them a hex digit).
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![chunked(40).prop_map(|c| c.wire.0), vec(b'g'..=b'z', 0..40),]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![3 => Just(Vec::new()), 1 => vec(interim(), 1..3)],
        head(),
        body(),
    )
        .prop_map(|(interim, last, body)| Case {
            interim,
            last,
            body,
        })
}

mod against_hyper;
mod limits;
mod pieces;

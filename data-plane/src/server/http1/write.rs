//! A response as an HTTP/1.1 client receives it: the head, and how its body is delimited.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderValue};
use http::{Method, StatusCode, response};
use http_body::SizeHint;

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// No body (HEAD, 1xx, 204, 304): whatever the body yields is dropped.
    None,
    /// Exactly this many bytes, as `Content-Length` says.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    UntilClose,
}

/// What the response's head is written for.
pub struct For<'a> {
    pub method: &'a Method,
    /// The client speaks HTTP/1.1 (else HTTP/1.0).
    pub http11: bool,
    /// The connection stays open after this response (false: `Connection: close` is sent).
    pub keep_alive: bool,
}

/// Writes `parts`' head into `out` and says how its body is to be sent, and whether the
/// connection can stay open after it. `hint` is the body's size hint. The response's own
/// framing fields are replaced by the ones that match what is sent.
pub fn head(
    parts: &mut response::Parts,
    hint: &SizeHint,
    to: &For<'_>,
    out: &mut Vec<u8>,
) -> (Sending, bool) {
    let status = parts.status;
    let bodiless = to.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let h = &mut parts.headers;
    h.remove(header::TRANSFER_ENCODING);
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut keep_alive = to.keep_alive;
    let sending = if bodiless {
        if status.is_informational() || status == StatusCode::NO_CONTENT {
            h.remove(header::CONTENT_LENGTH);
        }
        Sending::None
    } else if let Some(n) = declared.or(hint.exact()) {
        if declared.is_none() {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Sending::Length(n)
    } else if to.http11 {
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        Sending::Chunked
    } else {
        h.remove(header::CONTENT_LENGTH);
        keep_alive = false;
        Sending::UntilClose
    };
    if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
    } else if !keep_alive {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if !to.http11 {
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    if !h.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        with_date(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in h.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (sending, keep_alive)
}

/// A chunk's size line.
pub fn chunk_size(len: usize, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let _ = write!(out, "{len:x}\r\n");
}

thread_local! {
    /// The `Date` value of the current second: formatted once a second per thread.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

/// Calls `f` with the current time as an HTTP date (RFC 9110 section 5.6.7).
fn with_date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            let formatted = httpdate::fmt_http_date(now);
            if formatted.len() == text.len() {
                text.copy_from_slice(formatted.as_bytes());
                *at = second;
            }
        }
        f(text.as_slice());
    });
}

//! A response as an HTTP/1.1 client receives it: the head, how its body is delimited, and the
//! bytes on their way ([`Writer`]).

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode, response};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWrite;

/// Response bytes gathered before they are written: small frames go out together.
pub(super) const WRITE_GATHER: usize = 16 * 1024;

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
    // A response that says it closes the connection does.
    let closes = h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    let mut keep_alive = to.keep_alive && !closes;
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

/// Response bytes on their way to the client.
#[derive(Default)]
pub(super) struct Writer {
    /// Bytes not yet written.
    pub(super) out: Vec<u8>,
    /// A large body frame, written after `out` without a copy.
    pub(super) big: Option<Bytes>,
}

impl Writer {
    /// Writes `out`, then `big`, then (for a chunk: `chunked`) its CRLF.
    pub(super) fn poll_write<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        chunked: bool,
    ) -> Poll<io::Result<()>> {
        loop {
            while !self.out.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.out.drain(..n);
            }
            let Some(big) = &mut self.big else {
                break;
            };
            while !big.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, big))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                bytes::Buf::advance(big, n);
            }
            self.big = None;
            if !chunked {
                break;
            }
            self.out.extend_from_slice(b"\r\n");
        }
        Poll::Ready(Ok(()))
    }
}

/// Puts a data frame on its way, framed as `sending` says.
pub(super) fn put_data(
    w: &mut Writer,
    sending: Sending,
    left: &mut u64,
    keep_alive: &mut bool,
    mut data: Bytes,
) {
    if data.is_empty() {
        return;
    }
    match sending {
        Sending::None => return,
        Sending::Length(_) => {
            if data.len() as u64 > *left {
                // More than declared: the rest is dropped and the connection closed.
                data.truncate(*left as usize);
                *keep_alive = false;
            }
            *left -= data.len() as u64;
        }
        Sending::Chunked => chunk_size(data.len(), &mut w.out),
        Sending::UntilClose => {}
    }
    let chunked = sending == Sending::Chunked;
    if data.len() <= WRITE_GATHER / 4 {
        w.out.extend_from_slice(&data);
        if chunked {
            w.out.extend_from_slice(b"\r\n");
        }
    } else {
        // Written after `out` without a copy; a chunk's CRLF follows it (`poll_write_out`).
        w.big = Some(data);
    }
}

/// Trailers go out only in a chunked body to a client that takes them (HTTP/1.1); elsewhere
/// they are dropped.
/// Whether they went (with the last chunk, which they end).
pub(super) fn put_trailers(out: &mut Vec<u8>, sending: Sending, frame: Frame<Bytes>, http11: bool) -> bool {
    let (Sending::Chunked, true, Ok(trailers)) = (sending, http11, frame.into_trailers()) else {
        return false;
    };
    out.extend_from_slice(b"0\r\n");
    for (name, value) in &trailers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head written for a response with `fields` and a body of `hint`, and what it says.
    fn written(
        status: u16,
        fields: &[(&str, &str)],
        hint: SizeHint,
        to: For<'_>,
    ) -> (String, Sending, bool) {
        let mut resp = http::Response::builder().status(status);
        for (n, v) in fields {
            resp = resp.header(*n, *v);
        }
        let (mut parts, ()) = resp.body(()).unwrap().into_parts();
        let mut out = Vec::new();
        let (sending, keep_alive) = head(&mut parts, &hint, &to, &mut out);
        (String::from_utf8(out).unwrap(), sending, keep_alive)
    }

    fn to(method: &Method, http11: bool) -> For<'_> {
        For {
            method,
            http11,
            keep_alive: true,
        }
    }

    #[test]
    fn a_known_length_is_sent_as_content_length() {
        let (text, sending, ka) = written(200, &[], SizeHint::with_exact(5), to(&Method::GET, true));
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ndate: "), "{text}");
        assert!(text.contains("\r\ncontent-length: 5\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"));
        assert_eq!((sending, ka), (Sending::Length(5), true));
    }

    #[test]
    fn an_unknown_length_is_chunked_for_http_1_1_and_closes_for_http_1_0() {
        let (text, sending, ka) = written(200, &[], SizeHint::new(), to(&Method::GET, true));
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert_eq!((sending, ka), (Sending::Chunked, true));
        let (text, sending, ka) = written(200, &[], SizeHint::new(), to(&Method::GET, false));
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(!text.contains("transfer-encoding"), "{text}");
        assert_eq!((sending, ka), (Sending::UntilClose, false));
    }

    #[test]
    fn bodiless_answers_send_no_body_and_keep_what_head_and_304_declare() {
        let declared = [("content-length", "42")];
        let (text, sending, _) =
            written(200, &declared, SizeHint::with_exact(0), to(&Method::HEAD, true));
        assert!(text.contains("content-length: 42\r\n"), "{text}");
        assert_eq!(sending, Sending::None);
        let (text, sending, _) = written(304, &declared, SizeHint::new(), to(&Method::GET, true));
        assert!(text.contains("content-length: 42\r\n"), "{text}");
        assert_eq!(sending, Sending::None);
        let (text, sending, _) = written(204, &declared, SizeHint::new(), to(&Method::GET, true));
        assert!(!text.contains("content-length"), "{text}");
        assert_eq!(sending, Sending::None);
    }

    #[test]
    fn a_response_that_closes_the_connection_closes_it() {
        let (text, _, ka) = written(
            200,
            &[("connection", "Close")],
            SizeHint::with_exact(0),
            to(&Method::GET, true),
        );
        assert!(!ka);
        assert_eq!(text.matches("connection").count(), 1, "{text}");
    }

    #[test]
    fn framing_fields_from_the_response_are_replaced() {
        let (text, sending, _) = written(
            200,
            &[("transfer-encoding", "gzip, chunked")],
            SizeHint::with_exact(3),
            to(&Method::GET, true),
        );
        assert!(!text.contains("transfer-encoding"), "{text}");
        assert_eq!(sending, Sending::Length(3));
    }
}

//! A client's request head (RFC 9112 sections 2 to 6), read with `httparse` from the bytes
//! received, with no I/O: the request itself, how its body is delimited, and what the client
//! says of the connection.
//!
//! Framing is taken only where it is unambiguous (RFC 9112 section 6.3): `Transfer-Encoding`
//! ending in `chunked` (on HTTP/1.1), else one `Content-Length` (repeated only with the same
//! value), else no body. A request with both, with a transfer coding on HTTP/1.0, with one that
//! does not end in `chunked`, or with lengths that disagree, is refused: a proxy that guessed
//! would read a different request boundary than the server behind it (request smuggling).
//! The head's fields are kept as they came (the request path takes the hop-by-hop ones out),
//! their values as slices of the head's bytes: no field is copied.

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Uri, Version};

use crate::upstream::parse::Framing;

/// Most header fields accepted in a request head.
pub const MAX_HEADERS: usize = 100;

/// A request head, with what the connection needs to know of it.
#[derive(Debug)]
pub struct Head {
    pub request: Request<()>,
    /// How the body is delimited: [`Framing::Empty`], a length or chunked.
    pub framing: Framing,
    /// The client allows another request on the connection after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before sending its body.
    pub expects_continue: bool,
}

/// Why a request head is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Larger than the limit, or with more than [`MAX_HEADERS`] fields (431).
    #[error("request head is larger than {0} bytes or has more than {MAX_HEADERS} fields")]
    TooLarge(usize),
    /// Not a request head, or framed ambiguously (400).
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> HeadError {
    HeadError::Invalid(msg.into())
}

/// The request head at the front of `buf`, taken out of it; `None` while `buf` holds no
/// complete one. Empty lines before it are skipped (RFC 9112 section 2.2). `max` bounds the
/// head's size.
pub fn parse(buf: &mut BytesMut, max: usize) -> Result<Option<Head>, HeadError> {
    let blank = buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    buf.advance(blank);
    if buf.is_empty() {
        return Ok(None);
    }
    // Left uninitialised: the parser writes only the fields it finds.
    let mut fields = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len > max => return Err(HeadError::TooLarge(max)),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max => return Err(HeadError::TooLarge(max)),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge(max)),
        Err(e) => return Err(invalid(format!("malformed request head: {e}"))),
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| invalid("request method is not valid"))?;
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let target = span(parsed.path.unwrap_or_default().as_bytes());
    let mut spans = Vec::with_capacity(parsed.headers.len());
    let mut framing = Framing::Empty;
    let (mut chunked, mut length, mut close, mut keep_alive, mut expects_continue) =
        (false, None::<u64>, false, false, false);
    for f in parsed.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| invalid(format!("header name {:?} is not valid", f.name)))?;
        if name == header::TRANSFER_ENCODING {
            if version == Version::HTTP_10 {
                return Err(invalid("Transfer-Encoding in an HTTP/1.0 request"));
            }
            // Whether the last coding, over all its lines, is chunked.
            if let Some(last) = f
                .value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|c| !c.is_empty())
            {
                chunked = last.eq_ignore_ascii_case(b"chunked");
            }
            framing = Framing::Chunked;
        } else if name == header::CONTENT_LENGTH {
            let n = content_length(f.value)?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("Content-Length values disagree"));
            }
            length = Some(n);
        } else if name == header::CONNECTION {
            for token in f.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expects_continue = f.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        spans.push((name, span(f.value)));
    }
    if framing == Framing::Chunked {
        if length.is_some() {
            return Err(invalid("both Transfer-Encoding and Content-Length"));
        }
        if !chunked {
            return Err(invalid("Transfer-Encoding does not end in chunked"));
        }
    } else if let Some(n) = length {
        framing = if n == 0 { Framing::Empty } else { Framing::Length(n) };
    }
    let raw = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(raw.slice(target.0..target.1))
        .map_err(|e| invalid(format!("request target is not valid: {e}")))?;
    let mut headers = HeaderMap::with_capacity(spans.len() + 4);
    for (name, (start, end)) in spans {
        let value = HeaderValue::from_maybe_shared(raw.slice(start..end))
            .map_err(|_| invalid(format!("header {name} has an invalid value")))?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    let keep_alive = match version {
        Version::HTTP_10 => keep_alive && !close,
        _ => !close,
    };
    Ok(Some(Head {
        request,
        framing,
        keep_alive,
        expects_continue: expects_continue && version == Version::HTTP_11,
    }))
}

/// A `Content-Length` value: digits only (a list of the same value, which some clients send
/// when a field is repeated, counts once).
fn content_length(value: &[u8]) -> Result<u64, HeadError> {
    let mut found = None;
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        let n = (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| invalid("Content-Length is not a number"))?;
        if found.is_some_and(|f| f != n) {
            return Err(invalid("Content-Length values disagree"));
        }
        found = Some(n);
    }
    found.ok_or_else(|| invalid("Content-Length is empty"))
}

#[cfg(test)]
#[path = "head_tests.rs"]
mod tests;

//! What a backend sends, read as pure functions of the bytes received, with no I/O: the response
//! head (RFC 9112 section 4, through `httparse`), how its body is delimited (section 6.3), and
//! the body itself, decoded from a buffer as it fills ([`Decoder`]).
//!
//! Responses are framed as RFC 9112 section 6.3 says: none for HEAD, 1xx, 204 and 304; chunked
//! when that is the last transfer coding; otherwise `Content-Length` (conflicting values are an
//! error); otherwise until the backend closes. A connection may carry another request only after
//! an HTTP/1.1 response without `Connection: close` whose length is known.
//!
//! Every limit is checked before bytes are kept: a head of at most [`MAX_HEAD_BYTES`] and
//! [`MAX_HEADERS`] fields, chunk-size lines of at most [`MAX_CHUNK_LINE`] bytes, trailers of at
//! most [`MAX_TRAILERS`].

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode, Version};

/// Largest response head accepted from a backend.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields accepted in a response head.
pub const MAX_HEADERS: usize = 128;

/// Longest chunk-size line (size and extensions) accepted.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Largest trailer section accepted (trailers are read and dropped).
pub const MAX_TRAILERS: usize = 16 * 1024;

pub(crate) fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

pub(crate) fn eof(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, msg.into())
}

/// A response head, with what the connection needs to know of it.
#[derive(Debug)]
pub struct ParsedHead {
    /// Status, version and the end-to-end fields (hop-by-hop ones left out).
    pub response: Response<()>,
    pub framing: Framing,
    /// The connection may carry another request once the body is read to its end.
    pub reusable: bool,
    /// A `101 Switching Protocols` to a request that asked for it: the connection now carries
    /// the protocol named in the response's `Upgrade` field (kept in its fields), no longer HTTP.
    pub switched: bool,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The first response head in `buf` that is not interim (1xx heads before it are dropped), taken
/// out of the buffer; `None` while the buffer holds no complete one. An error for a head that
/// cannot be read, one larger than [`MAX_HEAD_BYTES`] or with more than [`MAX_HEADERS`] fields,
/// a `101 Switching Protocols` the request did not ask for, or framing that contradicts itself.
/// `head_only`: the request was a HEAD, so the response has no body whatever its fields say.
/// `upgrade`: the request asked to switch protocols, so a `101` ends the HTTP exchange
/// ([`ParsedHead::switched`]).
pub fn parse_head(
    buf: &mut BytesMut,
    head_only: bool,
    upgrade: bool,
) -> std::io::Result<Option<ParsedHead>> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        // Left uninitialised: the parser writes only the fields it finds.
        let mut fields =
            [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
                return Err(invalid(format!(
                    "backend response head is larger than {MAX_HEAD_BYTES} bytes"
                )));
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(invalid(format!(
                    "backend response head is larger than {MAX_HEAD_BYTES} bytes"
                )));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(invalid(format!(
                    "backend response has more than {MAX_HEADERS} header fields"
                )));
            }
            Err(e) => return Err(invalid(format!("malformed backend response head: {e}"))),
        };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| invalid(format!("backend response status {code} is not valid")))?;
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        if switched && !upgrade {
            return Err(invalid(
                "backend switched protocols without being asked to",
            ));
        }
        if status.is_informational() && !switched {
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let fields = Fields::read(parsed.headers, buf.as_ptr() as usize)?;
        if switched {
            let upgrade = fields.upgrade.and_then(|v| HeaderValue::from_bytes(v).ok());
            let Fields { spans, named, .. } = fields;
            let headers = end_to_end(spans, named, buf.split_to(len).freeze())?;
            return switched_head(headers, upgrade).map(Some);
        }
        let framing = framing(status, fields.transfer_encoding, parsed.headers, head_only)?;
        // RFC 9112 section 6.1: HTTP/1.0 has no transfer codings, so a body framed by one is
        // faulty.
        if version == Version::HTTP_10
            && fields.transfer_encoding.is_some()
            && framing != Framing::Empty
        {
            return Err(invalid(
                "backend sent Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        let reusable =
            version == Version::HTTP_11 && !matches!(framing, Framing::UntilClose) && !fields.close;
        let Fields { spans, named, .. } = fields;
        let headers = end_to_end(spans, named, buf.split_to(len).freeze())?;
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        return Ok(Some(ParsedHead {
            response: resp,
            framing,
            reusable,
            switched: false,
        }));
    }
}

/// A `101 Switching Protocols` head: its end-to-end fields and the protocol it switched to
/// (`Upgrade`, which a proxy passes on with the switch). A switch to no named protocol is not
/// one.
fn switched_head(
    mut headers: HeaderMap,
    upgrade: Option<HeaderValue>,
) -> std::io::Result<ParsedHead> {
    let upgrade = upgrade
        .filter(|v| !v.as_bytes().trim_ascii().is_empty())
        .ok_or_else(|| invalid("backend switched protocols without naming one in Upgrade"))?;
    headers.insert(header::UPGRADE, upgrade);
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = headers;
    Ok(ParsedHead {
        response: resp,
        framing: Framing::Empty,
        reusable: false,
        switched: true,
    })
}

/// A response head's fields as read: where each end-to-end value lies in the head, and what
/// the hop-by-hop fields (RFC 9110 section 7.6.1: the classic set, `Connection` and the fields it
/// names) say, which is read here, for framing and reuse, and left out of the response passed on.
struct Fields<'h> {
    /// Name and value span (offsets into the head) of each end-to-end field. Values are kept as
    /// slices of the head, so no field is copied.
    spans: Vec<(HeaderName, usize, usize)>,
    /// `Connection: close`.
    close: bool,
    /// Fields `Connection` names, to leave out.
    named: Vec<HeaderName>,
    transfer_encoding: Option<&'h [u8]>,
    upgrade: Option<&'h [u8]>,
}

impl<'h> Fields<'h> {
    /// Reads the parsed fields of a head starting at address `base`.
    fn read(parsed: &[httparse::Header<'h>], base: usize) -> std::io::Result<Fields<'h>> {
        let mut fields = Fields {
            spans: Vec::with_capacity(parsed.len()),
            close: false,
            named: Vec::new(),
            transfer_encoding: None,
            upgrade: None,
        };
        for f in parsed {
            let name = HeaderName::from_bytes(f.name.as_bytes())
                .map_err(|_| invalid(format!("backend header name {:?} is not valid", f.name)))?;
            if name == header::CONNECTION {
                for token in f.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        fields.close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive")
                        && let Ok(n) = HeaderName::from_bytes(token)
                    {
                        fields.named.push(n);
                    }
                }
                continue;
            }
            if name == header::TRANSFER_ENCODING {
                fields.transfer_encoding = Some(f.value);
            }
            if name == header::UPGRADE {
                fields.upgrade = Some(f.value);
            }
            if is_hop_by_hop(&name) {
                continue;
            }
            let start = f.value.as_ptr() as usize - base;
            fields.spans.push((name, start, start + f.value.len()));
        }
        Ok(fields)
    }

}

/// The end-to-end fields as a map whose values share `raw`, the head's bytes: those at `spans`,
/// but for those `Connection` `named`.
fn end_to_end(
    spans: Vec<(HeaderName, usize, usize)>,
    named: Vec<HeaderName>,
    raw: Bytes,
) -> std::io::Result<HeaderMap> {
    // Room for the fields the proxy adds (request id, rate-limit and cache headers).
    let mut headers = HeaderMap::with_capacity(spans.len() + 8);
    for (name, start, end) in spans {
        let value = HeaderValue::from_maybe_shared(raw.slice(start..end))
            .map_err(|_| invalid(format!("backend header {name} has an invalid value")))?;
        headers.append(name, value);
    }
    for n in named {
        headers.remove(n);
    }
    Ok(headers)
}

/// Fields that describe one connection rather than the message (RFC 9110 section 7.6.1), never
/// passed on by a proxy; fields named in `Connection` are too.
pub const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    // RFC 9113 section 3.1 (RFC 7540 section 3.2.1): the settings of an h2c upgrade offer.
    HeaderName::from_static("http2-settings"),
];

pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// RFC 9112 section 6.3, from the last `Transfer-Encoding` field and the `Content-Length` ones.
pub(crate) fn framing(
    status: StatusCode,
    transfer_encoding: Option<&[u8]>,
    fields: &[httparse::Header<'_>],
    head_only: bool,
) -> std::io::Result<Framing> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if let Some(te) = transfer_encoding {
        let last = te.rsplit(|&b| b == b',').next().map(<[u8]>::trim_ascii);
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut length: Option<u64> = None;
    for f in fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("content-length"))
    {
        for part in std::str::from_utf8(f.value).unwrap_or("x").split(',') {
            // Only the whitespace HTTP knows (space and tab), not Unicode's.
            let part = part.trim_matches([' ', '\t']);
            let n = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| invalid("backend sent an invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("backend sent conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// Where a chunked body's reading is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line; bytes of them seen so far.
    Trailers(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeState {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    /// Read to its end.
    Done,
}

/// What one step of decoding gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes, in order.
    Data(Bytes),
    /// The body's end, just reached.
    End,
    /// Nothing more can be decoded until more bytes arrive.
    NeedMore,
}

/// Decodes a response body from the bytes of its connection, as they arrive.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: DecodeState,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        Decoder {
            state: match framing {
                Framing::Empty => DecodeState::Done,
                Framing::Length(n) => DecodeState::Length(n),
                Framing::Chunked => DecodeState::Chunked(Chunk::Size),
                Framing::UntilClose => DecodeState::UntilClose,
            },
        }
    }

    /// The whole body has been decoded (or none was left to decode).
    pub fn is_done(&self) -> bool {
        matches!(self.state, DecodeState::Done | DecodeState::Length(0))
    }

    /// Bytes left, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            DecodeState::Done => Some(0),
            DecodeState::Length(n) => Some(n),
            _ => None,
        }
    }

    /// The connection ended: the end of a body delimited by the close, an error for any other.
    pub fn at_close(&mut self) -> std::io::Result<()> {
        match self.state {
            DecodeState::UntilClose | DecodeState::Done => {
                self.state = DecodeState::Done;
                Ok(())
            }
            _ => Err(eof(
                "backend closed the connection before the end of the response body",
            )),
        }
    }

    /// Decodes from the front of `buf` what can be: body bytes, the end, or nothing yet. The
    /// bytes decoded (and framing around them) are taken out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> std::io::Result<Decoded> {
        loop {
            match self.state {
                DecodeState::Done => return Ok(Decoded::End),
                DecodeState::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                DecodeState::Length(0) => {
                    self.state = DecodeState::Done;
                }
                DecodeState::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let (data, left) = take_up_to(buf, left);
                    self.state = if left == 0 {
                        DecodeState::Done
                    } else {
                        DecodeState::Length(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                DecodeState::Chunked(chunk) => {
                    if let Some(decoded) = self.decode_chunked(chunk, buf)? {
                        return Ok(decoded);
                    }
                }
            }
        }
    }

    /// One step of a chunked body from `chunk`'s state: what it gave, or `None` when it only
    /// moved on to the next state.
    fn decode_chunked(
        &mut self,
        chunk: Chunk,
        buf: &mut BytesMut,
    ) -> std::io::Result<Option<Decoded>> {
        let next = match chunk {
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Some(Decoded::NeedMore));
                }
                let (data, left) = take_up_to(buf, left);
                self.state = DecodeState::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                return Ok(Some(Decoded::Data(data)));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Some(Decoded::NeedMore));
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("backend chunk data is not followed by CRLF"));
                }
                buf.advance(2);
                Chunk::Size
            }
            Chunk::Size => {
                let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(invalid("backend chunk-size line is too long"));
                    }
                    return Ok(Some(Decoded::NeedMore));
                };
                if end > MAX_CHUNK_LINE {
                    return Err(invalid("backend chunk-size line is too long"));
                }
                let size = chunk_size(&buf[..end])?;
                buf.advance(end + 1);
                if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                }
            }
            Chunk::Trailers(seen) => {
                let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                    if seen + buf.len() > MAX_TRAILERS {
                        return Err(invalid("backend trailer section is too large"));
                    }
                    return Ok(Some(Decoded::NeedMore));
                };
                if seen + end + 1 > MAX_TRAILERS {
                    return Err(invalid("backend trailer section is too large"));
                }
                let empty = end == 0 || (end == 1 && buf[0] == b'\r');
                buf.advance(end + 1);
                if empty {
                    self.state = DecodeState::Done;
                    return Ok(Some(Decoded::End));
                }
                // Trailer fields are not forwarded.
                Chunk::Trailers(seen + end + 1)
            }
        };
        self.state = DecodeState::Chunked(next);
        Ok(None)
    }
}

/// Up to `left` bytes from the front of `buf`, and how many are left after them.
fn take_up_to(buf: &mut BytesMut, left: u64) -> (Bytes, u64) {
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
    (buf.split_to(n).freeze(), left - n as u64)
}

/// The size on a chunk-size line (hex digits, then optional extensions), without its LF.
fn chunk_size(line: &[u8]) -> std::io::Result<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = &line[digits..];
    let rest_ok = rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t');
    if digits == 0 || digits > 16 || !rest_ok {
        return Err(invalid("backend sent an invalid chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| invalid("invalid chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| invalid("backend sent an invalid chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"1a\r").unwrap(), 26);
        assert_eq!(chunk_size(b"0").unwrap(), 0);
        assert_eq!(chunk_size(b"FF;name=value\r").unwrap(), 255);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"zz\r").is_err());
        assert!(chunk_size(b"1x\r").is_err());
        assert!(chunk_size(b"11111111111111111\r").is_err());
    }

    /// Framing of a head with these fields, as parsed.
    fn framing_of(
        status: StatusCode,
        pairs: &[(&'static str, &'static str)],
        head_only: bool,
    ) -> std::io::Result<Framing> {
        let fields: Vec<httparse::Header<'_>> = pairs
            .iter()
            .map(|(n, v)| httparse::Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect();
        let te = pairs
            .iter()
            .rev()
            .find(|(n, _)| *n == "transfer-encoding")
            .map(|(_, v)| v.as_bytes());
        framing(status, te, &fields, head_only)
    }

    #[test]
    fn responses_are_framed_as_rfc_9112_says() {
        let ok = StatusCode::OK;
        let f = |h: &[(&'static str, &'static str)]| framing_of(ok, h, false);
        assert!(matches!(
            f(&[("content-length", "12")]),
            Ok(Framing::Length(12))
        ));
        assert!(matches!(
            f(&[("content-length", "12, 12")]),
            Ok(Framing::Length(12))
        ));
        assert!(f(&[("content-length", "12, 13")]).is_err());
        assert!(f(&[("content-length", "-1")]).is_err());
        assert!(f(&[("content-length", "+5")]).is_err());
        assert!(matches!(
            f(&[
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "5")
            ]),
            Ok(Framing::Chunked)
        ));
        assert!(matches!(
            f(&[("transfer-encoding", "gzip")]),
            Ok(Framing::UntilClose)
        ));
        assert!(matches!(f(&[]), Ok(Framing::UntilClose)));
        assert!(matches!(
            framing_of(ok, &[("content-length", "12")], true),
            Ok(Framing::Empty)
        ));
        assert!(matches!(
            framing_of(StatusCode::NOT_MODIFIED, &[], false),
            Ok(Framing::Empty)
        ));
    }
}

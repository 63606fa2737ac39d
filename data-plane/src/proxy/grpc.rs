//! gRPC on the request path. A gRPC call (`content-type: application/grpc…`) is a request like
//! another, with two differences a gRPC client needs:
//!
//! - the data plane's own answers (rate limit, ban, no backend, timeout…) are given in gRPC form:
//!   HTTP 200 with `grpc-status` and `grpc-message` in a trailers-only response, as a gRPC
//!   client reads no HTTP status; the `Retry-After` and `RateLimit` fields stay;
//! - `grpc-timeout` bounds the call as the request timeout does, whichever is shorter;
//! - a call whose backend fails before answering (its connection lost, or UNAVAILABLE answered
//!   straight away) goes whole to another backend, within the retry budget, when its body was
//!   small enough to keep ([`RESEND_LIMIT`]).
//!
//! Trailers (`grpc-status` of the backend's answer) pass through as the body's last frame.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use crate::upstream::request_body::{ClientBody, Recording};
use crate::telemetry::report::Outcome;

/// Largest request body of a gRPC call kept to send it again to another backend, should its
/// backend's connection fail before any answer, or answer UNAVAILABLE straight away. Unary calls
/// are small; a longer client stream is not sent again.
pub const RESEND_LIMIT: usize = 64 * 1024;

/// How long a call's first message is awaited before the call goes to a backend without it
/// (a bidirectional call whose client waits for the server to speak first).
const FIRST_MESSAGE_GRACE: Duration = Duration::from_millis(10);

/// The record of a call's body for a second send: the body is read ahead until it ends (a
/// unary or server-streaming call's single message, whole) or the client pauses after its first
/// message; the rest is recorded as it goes to the backend.
pub async fn record(body: &mut ClientBody) -> Recording {
    let one_message = |b: &[u8]| {
        b.get(1..5).is_some_and(|len| {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            b.len() >= 5 + len
        })
    };
    match body
        .read_ahead(RESEND_LIMIT, one_message, FIRST_MESSAGE_GRACE)
        .await
    {
        Some(whole) => Recording::whole_body(&whole),
        None => {
            let recording = Recording::new(RESEND_LIMIT);
            body.record_into(recording.clone());
            recording
        }
    }
}

/// Whether a request is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The deadline a call carries in `grpc-timeout` (an integer of at most 8 digits and a unit:
/// `H`, `M`, `S`, `m`, `u`, `n`); none when absent or unreadable.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status code (as in `google.rpc.Code`) of one of the data plane's own answers, by
/// its reason.
fn code(reason: &str) -> u32 {
    match reason {
        "rate_limited" | "banned" | "body_too_large" => 8, // RESOURCE_EXHAUSTED
        "blocked" => 7,                                    // PERMISSION_DENIED
        "unknown_key" => 16,                               // UNAUTHENTICATED
        "invalid_api_key" | "bad_request" | "body_invalid" => 3, // INVALID_ARGUMENT
        "body_timeout" | "gateway_timeout" => 4,           // DEADLINE_EXCEEDED
        "body_aborted" => 1,                               // CANCELLED
        "method_not_allowed" | "unsupported_transfer_coding" | "unsupported_protocol" => 12, // UNIMPLEMENTED
        _ => 14, // UNAVAILABLE: the service cannot be reached now
    }
}

/// One of the data plane's own answers (a [`super::refusal::Refusal`]) in gRPC form; any other
/// response as it is.
pub fn answer(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let reason = match resp.extensions().get::<Outcome>() {
        Some(o) if matches!(resp.body(), ProxyBody::Local(_)) && resp.status() != StatusCode::OK => {
            o.decision
        }
        _ => return resp,
    };
    let (mut parts, body) = resp.into_parts();
    let message = match body {
        ProxyBody::Local(Some(json)) => serde_json::from_slice::<serde_json::Value>(&json)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_default(),
        _ => String::new(),
    };
    parts.status = StatusCode::OK;
    let h = &mut parts.headers;
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code(reason)));
    if let Ok(m) = HeaderValue::from_str(&percent_encode(&message)) {
        h.insert("grpc-message", m);
    }
    Response::from_parts(parts, ProxyBody::Local(None))
}

/// `grpc-message` encoding: visible ASCII and space as they are, but `%`; every other byte as
/// `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_str(timeout).unwrap());
        h
    }

    #[test]
    fn deadlines_are_read_in_every_unit() {
        for (v, d) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("5n", Duration::from_nanos(5)),
        ] {
            assert_eq!(timeout(&headers(v)), Some(d), "{v}");
        }
        for bad in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10"] {
            assert_eq!(timeout(&headers(bad)), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_header_value_reads_as_a_deadline_or_none(v in "[ -~]{0,12}") {
            let _ = timeout(&headers(&v));
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("rate limit 100% hit"), "rate limit 100%25 hit");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}

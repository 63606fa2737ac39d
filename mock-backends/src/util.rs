//! Bodies and helpers the paths share: generated patterns, a body that aborts, JSON
//! answers, query parsing.

use super::*;

pub(crate) fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    // One chunk plus one period, so any chunk at any offset is a sub-slice.
    PATTERN.get_or_init(|| {
        (0..CHUNK_SIZE as u64 + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect()
    })
}

/// Deterministic bytes `i % 251`, generated without allocation.
pub(crate) struct PatternBody {
    pub(crate) sent: u64,
    pub(crate) total: u64,
    /// Whether the size is announced; when not, HTTP/1 falls back to chunked encoding.
    pub(crate) exact: bool,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let remaining = this.total - this.sent;
        if remaining == 0 {
            return Poll::Ready(None);
        }
        let len = remaining.min(CHUNK_SIZE as u64) as usize;
        let start = (this.sent % PATTERN_PERIOD) as usize;
        this.sent += len as u64;
        let chunk = Bytes::from_static(&pattern()[start..start + len]);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.total
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.total - self.sent)
        } else {
            SizeHint::default()
        }
    }
}

/// Sends part of the announced body, pauses so it is flushed, then fails,
/// which makes hyper cut the connection (HTTP/1) or reset the stream (HTTP/2).
pub(crate) struct AbortBody {
    pub(crate) sent_head: bool,
    pub(crate) pause: Pin<Box<Sleep>>,
}

impl Body for AbortBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.sent_head {
            this.sent_head = true;
            let chunk = Bytes::from_static(&pattern()[..ABORT_BODY_SENT]);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match this.pause.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                Poll::Ready(Some(Err("response body aborted by /abort-body".into())))
            }
        }
    }
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> RespBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn json_response(status: StatusCode, value: &impl Serialize) -> Resp {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(body) => (status, body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":\"serializing the response failed: {e}\"}}").into_bytes(),
        ),
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Like `json_response`, but without a body where HTTP forbids one.
pub(crate) fn status_response(method: &Method, status: StatusCode, value: &Value) -> Resp {
    let bodyless = matches!(status.as_u16(), 204 | 205 | 304) || method == Method::HEAD;
    if bodyless {
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        resp
    } else {
        json_response(status, value)
    }
}

pub(crate) fn error_response(e: ApiError) -> Resp {
    let mut payload = json!({"error": e.message});
    if let Some(field) = e.field {
        payload["field"] = Value::String(field);
    }
    json_response(e.status, &payload)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// First value of `name` in a raw query string, percent-decoded.
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter(|pair| !pair.is_empty())
        .find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key) == name).then(|| percent_decode(value))
        })
}

pub(crate) fn percent_decode(s: &str) -> String {
    pub(crate) fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'+' => Some((b' ', 1)),
            b'%' => bytes
                .get(i + 1..i + 3)
                .and_then(|h| Some((hex(h[0])? << 4 | hex(h[1])?, 3))),
            _ => None,
        };
        let (byte, width) = decoded.unwrap_or((bytes[i], 1));
        out.push(byte);
        i += width;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Uniform in [0, 1). Statistical quality is irrelevant here; independence
/// from extra crates and from a seeded global is what matters.
pub(crate) fn random_unit() -> f64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(0x6d6f_636b_u64));
    // splitmix64
    let mut z = seed.wrapping_add(COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

//! The quota a request was counted against, and how a response tells the client about it.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::gcra::{Decision, Rate};

/// The quota a request was admitted (or refused) under.
#[derive(Debug)]
pub struct Quota {
    /// Key id of a keyed request, for the request log.
    pub key_id: Option<String>,
    /// The tier's name, or "ip".
    pub policy: String,
    pub rate: Rate,
    pub decision: Decision,
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl Quota {
    /// Writes what is left of the quota into a response's fields: the IETF draft's
    /// `RateLimit-Policy` and `RateLimit`, and the common `X-RateLimit-*`.
    pub fn headers(&self, h: &mut HeaderMap) {
        use std::fmt::Write as _;
        let window = self.rate.period_ms.div_ceil(1000);
        let reset = self.decision.reset_ms.div_ceil(1000);
        let mut text = String::with_capacity(2 * self.policy.len() + 48);
        let mut put = |name: &HeaderName, text: &str| {
            if let Ok(v) = HeaderValue::from_str(text) {
                h.insert(name.clone(), v);
            }
        };
        // draft-ietf-httpapi-ratelimit-headers: the policy, and what is left of it.
        let _ = write!(
            text,
            "\"{}\";q={};w={window}",
            self.policy, self.rate.requests
        );
        put(&RATELIMIT_POLICY, &text);
        text.clear();
        let _ = write!(
            text,
            "\"{}\";r={};t={reset}",
            self.policy, self.decision.remaining
        );
        put(&RATELIMIT, &text);
        h.insert(
            X_RATELIMIT_LIMIT.clone(),
            HeaderValue::from(self.rate.requests),
        );
        h.insert(
            X_RATELIMIT_REMAINING.clone(),
            HeaderValue::from(self.decision.remaining),
        );
        h.insert(X_RATELIMIT_RESET.clone(), HeaderValue::from(reset));
    }
}

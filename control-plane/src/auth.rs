//! Bearer-token checks for the Admin service (admin token) and, when configured, the Discovery
//! service (cluster token).

use tonic::Status;
use tonic::metadata::MetadataMap;

/// Compares in time independent of where the strings differ, so the token cannot be guessed
/// byte by byte from response times.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `authorization: Bearer <token>` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// `Unauthenticated` without a bearer token, `PermissionDenied` with a wrong one.
pub fn check(metadata: &MetadataMap, expected: &str, what: &str) -> Result<(), Status> {
    let Some(value) = metadata.get("authorization") else {
        return Err(Status::unauthenticated(format!(
            "missing authorization: Bearer <{what}>"
        )));
    };
    let token =
        value.to_str().ok().and_then(bearer).ok_or_else(|| {
            Status::unauthenticated(format!("authorization must be Bearer <{what}>"))
        })?;
    if constant_time_eq(token.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!("wrong {what}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}

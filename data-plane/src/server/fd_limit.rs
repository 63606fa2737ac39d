//! The open-file limit against `max_connections`. Each client connection may hold a backend
//! connection too, so a data plane needs about two descriptors per connection, plus a few for its
//! listeners, Redis and files. At start the soft limit is raised as far as the hard one allows,
//! as HAProxy does for itself; when even that is short, one warning says so, naming the setting,
//! the limit and the fix, rather than accepts failing later with `EMFILE`.

/// Descriptors kept for listeners, Redis, the control plane, certificates and logs.
const SPARE: u64 = 256;

/// Descriptors `max_connections` client connections need, with their backend connections.
pub fn needed(max_connections: usize) -> u64 {
    (max_connections as u64).saturating_mul(2).saturating_add(SPARE)
}

/// The soft limit to set, given the current `soft` and `hard` limits and what is `needed`:
/// raised to what is needed, within the hard limit; never lowered.
pub fn plan(soft: u64, hard: u64, needed: u64) -> u64 {
    soft.max(needed.min(hard))
}

/// Raises the soft open-file limit towards what `max_connections` needs, and warns when the
/// hard limit leaves it short.
#[cfg(target_os = "linux")]
pub fn raise(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = needed(max_connections);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let target = plan(soft, hard, needed);
    let soft = if target > soft && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        target
    } else {
        soft
    };
    if soft < needed {
        tracing::warn!(
            max_connections,
            open_file_limit = soft,
            needed,
            "the open-file limit is below what max_connections needs (two descriptors a \
             connection): accepts will fail with EMFILE before max_connections is reached; \
             raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd, --ulimit in Docker) \
             or lower --max-connections"
        );
    }
}

#[cfg(not(target_os = "linux"))]
pub fn raise(_max_connections: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_within_the_hard_one_and_never_lowered() {
        let need = needed(10_000);
        assert_eq!(need, 20_256);
        // Room under the hard limit: raised to what is needed.
        assert_eq!(plan(1_024, 1_048_576, need), need);
        // The hard limit is short: raised to it, and still short (the warning's case).
        assert_eq!(plan(1_024, 4_096, need), 4_096);
        // Already above: left as it is.
        assert_eq!(plan(100_000, 1_048_576, need), 100_000);
        assert_eq!(needed(usize::MAX), u64::MAX);
    }
}

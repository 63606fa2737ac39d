//! Setting one policy of the configuration: the fields given are merged into the policy in
//! force, so a change names only what it changes.
//!
//! On the wire a field left at 0, false or empty cannot be told from one not sent, so those
//! keep their current value; `update_mask` names the fields to set to such a value anyway.

use lb_proto::v1::{ConfigSnapshot, SetPolicyRequest, set_policy_request::Policy};
use lb_proto::{defaults, validate::Invalid};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::cluster::{ControlPlane, UpdateError};

/// Merges the request's policy into the one in force; returns the version (the current one
/// when nothing changes).
pub async fn set_policy(cp: &ControlPlane, req: SetPolicyRequest) -> Result<u64, UpdateError> {
    let policy = req.policy.ok_or_else(|| {
        Invalid::new(
            "policy",
            "missing (health_check, outlier, circuit_breaker, retry, queue, timeouts, hash or cache)",
        )
    })?;
    let mask = req.update_mask;
    cp.update(|s| apply(s, policy, &mask)).await
}

fn apply(s: &mut ConfigSnapshot, policy: Policy, mask: &[String]) -> Result<(), UpdateError> {
    match policy {
        Policy::HealthCheck(p) => merge_into(
            &mut s.health_check,
            "health_check",
            &p,
            mask,
            defaults::health_check,
        ),
        Policy::Outlier(p) => merge_into(&mut s.outlier, "outlier", &p, mask, defaults::outlier),
        Policy::CircuitBreaker(p) => merge_into(
            &mut s.circuit_breaker,
            "circuit_breaker",
            &p,
            mask,
            defaults::circuit_breaker,
        ),
        Policy::Retry(p) => merge_into(&mut s.retry, "retry", &p, mask, defaults::retry),
        Policy::Queue(p) => merge_into(&mut s.queue, "queue", &p, mask, defaults::queue),
        Policy::Timeouts(p) => {
            merge_into(&mut s.timeouts, "timeouts", &p, mask, defaults::timeouts)
        }
        Policy::Hash(p) => merge_into(&mut s.hash, "hash", &p, mask, defaults::hash),
        Policy::Cache(p) => merge_into(&mut s.cache, "cache", &p, mask, defaults::cache),
    }
}

fn merge_into<T>(
    slot: &mut Option<T>,
    name: &str,
    given: &T,
    mask: &[String],
    default: fn() -> T,
) -> Result<(), UpdateError>
where
    T: Serialize + DeserializeOwned + Default + Clone,
{
    let current = slot.clone().unwrap_or_else(default);
    *slot = Some(merge(name, &current, given, mask)?);
    Ok(())
}

fn object<T: Serialize>(name: &str, value: &T) -> Result<Map<String, Value>, Invalid> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Invalid::new(name, "cannot be represented field by field")),
    }
}

/// `given`'s fields over `current`'s: those not at their zero value, and those in `mask`.
pub fn merge<T>(name: &str, current: &T, given: &T, mask: &[String]) -> Result<T, Invalid>
where
    T: Serialize + DeserializeOwned + Default,
{
    let zero = object(name, &T::default())?;
    let given = object(name, given)?;
    let mut merged = object(name, current)?;
    for field in mask {
        if !zero.contains_key(field.as_str()) {
            let fields: Vec<&str> = zero.keys().map(String::as_str).collect();
            return Err(Invalid::new(
                "update_mask",
                format_args!("{field:?} is not a field of {name} ({})", fields.join(", ")),
            ));
        }
    }
    let mut any = false;
    for (field, value) in given {
        if zero.get(&field) != Some(&value) || mask.contains(&field) {
            merged.insert(field, value);
            any = true;
        }
    }
    if !any {
        return Err(Invalid::new(
            name,
            "no field given: a field at 0, false or empty keeps its current value; name the \
             fields to set to such a value in update_mask",
        ));
    }
    serde_json::from_value(Value::Object(merged)).map_err(|e| Invalid::new(name, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_proto::v1::CachePolicy;

    fn mask(fields: &[&str]) -> Vec<String> {
        fields.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn fields_given_replace_the_current_ones_and_the_rest_stay() {
        let current = defaults::cache();
        let given = CachePolicy {
            enabled: true,
            default_ttl_ms: 5_000,
            ..Default::default()
        };
        let m = merge("cache", &current, &given, &[]).unwrap();
        assert!(m.enabled);
        assert_eq!(m.default_ttl_ms, 5_000);
        assert_eq!(m.memory_bytes, current.memory_bytes);
        assert_eq!(m.ignored_query_params, current.ignored_query_params);
    }

    #[test]
    fn zero_values_need_the_mask() {
        let current = CachePolicy {
            enabled: true,
            ..defaults::cache()
        };
        let off = CachePolicy::default();
        let e = merge("cache", &current, &off, &[]).unwrap_err();
        assert_eq!(e.field, "cache");
        let m = merge("cache", &current, &off, &mask(&["enabled"])).unwrap();
        assert!(!m.enabled);
        assert_eq!(m.default_ttl_ms, current.default_ttl_ms);
        let e = merge("cache", &current, &off, &mask(&["enable"])).unwrap_err();
        assert_eq!(e.field, "update_mask");
        assert!(e.message.contains("default_ttl_ms"), "{e}");
    }
}

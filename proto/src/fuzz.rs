//! Snapshot validation against whatever arrives: a data plane validates every snapshot it is
//! sent, and the control plane every change it is asked for, so arbitrary bytes and arbitrary
//! field values must give a verdict, never a panic. `PROPTEST_CASES` sets how many cases run
//! (CI runs many more than the default, within a time bound).

use proptest::prelude::*;
use prost::Message;

use crate::v1::{Backend, ConfigSnapshot, HashPolicy, Limit, Tier};
use crate::validate;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,12}",
        ".{0,40}",
        Just(String::new()),
        Just("round_robin".to_owned()),
        Just("127.0.0.1:1".to_owned()),
        Just("[::1]:65535".to_owned()),
    ]
}

/// A snapshot from the defaults with fields replaced by arbitrary values.
fn snapshot() -> impl Strategy<Value = ConfigSnapshot> {
    (
        text(),
        proptest::collection::vec((text(), any::<u32>(), any::<bool>(), any::<u32>()), 0..6),
        proptest::collection::vec((text(), any::<u64>(), any::<u64>(), any::<u32>()), 0..6),
        (text(), any::<i32>(), any::<i32>()),
        (text(), text()),
        (any::<u64>(), any::<u64>()),
        proptest::collection::vec(text(), 0..4),
    )
        .prop_map(
            |(strategy, backends, tiers, (default_tier, unknown, mode), hash, ip, trusted)| {
                let mut s = crate::defaults::snapshot();
                s.version = 1;
                s.strategy = strategy;
                s.backends = backends
                    .into_iter()
                    .map(|(address, weight, draining, max_in_flight)| Backend {
                        address,
                        weight,
                        draining,
                        max_in_flight,
                    })
                    .collect();
                let rl = s.rate_limit.as_mut().unwrap();
                rl.tiers.extend(
                    tiers
                        .into_iter()
                        .map(|(name, requests, period_ms, priority)| Tier {
                            name,
                            limit: Some(Limit {
                                requests,
                                period_ms,
                            }),
                            priority,
                        }),
                );
                rl.default_tier = default_tier;
                rl.unknown_key = unknown;
                rl.on_store_failure = mode;
                rl.ip_limit = Some(Limit {
                    requests: ip.0,
                    period_ms: ip.1,
                });
                rl.trusted_proxies = trusted;
                s.hash = Some(HashPolicy {
                    source: hash.0,
                    name: hash.1,
                });
                s
            },
        )
}

proptest! {
    #[test]
    fn arbitrary_bytes_give_a_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(s) = ConfigSnapshot::decode(&bytes[..]) {
            let _ = validate::snapshot(&s);
        }
    }

    #[test]
    fn arbitrary_fields_give_a_verdict_naming_a_field(s in snapshot()) {
        if let Err(e) = validate::snapshot(&s) {
            prop_assert!(!e.field.is_empty());
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn a_valid_snapshot_survives_its_encoding(s in snapshot()) {
        if validate::snapshot(&s).is_ok() {
            let again = ConfigSnapshot::decode(&s.encode_to_vec()[..]).unwrap();
            prop_assert!(validate::snapshot(&again).is_ok());
        }
    }
}

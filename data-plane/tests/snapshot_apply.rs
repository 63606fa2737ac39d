//! A snapshot is checked whole before anything is made from it: one refused at any step (a
//! backend address, the TLS to a backend, the hash header's name, the contract's rules) leaves
//! the data plane exactly as it was, with no new backend, no changed breaker policy and no new
//! metric series. Applying one is one swap.

#[path = "support/dp.rs"]
mod dp;

use std::path::PathBuf;

use dp::{Dp, backend, snapshot};
use lb_proto::v1::{CircuitBreakerPolicy, ConfigSnapshot, HashPolicy};

const NEW_BACKEND: &str = "127.0.0.1:1";

/// The configuration in force with one more backend and a changed breaker policy, as version 2,
/// broken by `break_it`.
fn broken(base: &ConfigSnapshot, break_it: impl FnOnce(&mut ConfigSnapshot)) -> ConfigSnapshot {
    let mut s = base.clone();
    s.version = 2;
    s.backends.push(lb_proto::v1::Backend {
        address: NEW_BACKEND.into(),
        weight: 1,
        ..Default::default()
    });
    s.circuit_breaker = Some(CircuitBreakerPolicy {
        failure_rate_percent: 99,
        ..lb_proto::defaults::circuit_breaker()
    });
    break_it(&mut s);
    s
}

/// Nothing of a refused snapshot shows: no endpoint, metric series or breaker policy of it.
fn assert_unchanged(dp: &Dp, base: &ConfigSnapshot) {
    let active = dp.shared.active().unwrap();
    assert_eq!(active.version(), 1);
    assert!(
        dp.shared.endpoint(NEW_BACKEND).is_none(),
        "a backend joined"
    );
    assert!(
        !dp.shared.render_metrics().contains(NEW_BACKEND),
        "a metric series of the refused backend"
    );
    let existing = dp.shared.endpoint(&base.backends[0].address).unwrap();
    assert_eq!(
        existing.breaker_policy(),
        lb_proto::defaults::circuit_breaker(),
        "the breaker policy changed"
    );
}

#[tokio::test]
async fn a_snapshot_refused_at_any_step_changes_nothing() {
    let base = snapshot(&[backend(|_| "ok".into()).await]);
    let dp = Dp::start(|_| {}, base.clone()).await;
    type Break = fn(&mut ConfigSnapshot);
    let steps: [(&str, Break); 3] = [
        ("the contract's rules", |s| s.strategy = "fastest".into()),
        ("the hash header's name", |s| {
            s.hash = Some(HashPolicy {
                source: "header".into(),
                name: "not a header".into(),
            })
        }),
        ("a backend's address", |s| {
            s.backends.last_mut().unwrap().address = "bad host:1".into()
        }),
    ];
    for (step, break_it) in steps {
        let refused = dp.shared.prepare(broken(&base, break_it));
        assert!(refused.is_err(), "{step}: accepted");
        assert_unchanged(&dp, &base);
    }
    // The same change, unbroken, applies whole.
    let good = broken(&base, |_| {});
    dp.shared.apply(dp.shared.prepare(good).unwrap());
    assert_eq!(dp.shared.active().unwrap().version(), 2);
    assert!(dp.shared.endpoint(NEW_BACKEND).is_some());
    let existing = dp.shared.endpoint(&base.backends[0].address).unwrap();
    assert_eq!(existing.breaker_policy().failure_rate_percent, 99);
    dp.stop().await;
}

#[tokio::test]
async fn a_snapshot_whose_backend_tls_cannot_be_set_up_changes_nothing() {
    // Backend TLS whose CA file does not exist: no backend's transport can be made.
    let (mut settings, _proxy, _admin) = Dp::settings(|_| {}).await;
    settings.backend_tls = Some(data_plane::tls::client::BackendTlsSettings {
        all: true,
        ca: Some(PathBuf::from("/nonexistent/ca.pem")),
        server_name: None,
    });
    let shared = data_plane::Shared::new(settings);
    let s = snapshot(&[NEW_BACKEND.parse().unwrap()]);
    let e = shared
        .prepare(s)
        .err()
        .expect("a backend without a transport");
    assert_eq!(e.field, "backend_tls", "{e}");
    assert!(shared.endpoint(NEW_BACKEND).is_none());
    assert!(!shared.render_metrics().contains(NEW_BACKEND));
}

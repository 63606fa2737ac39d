//! Admin input as a newcomer types it: a mistyped key, a zero weight, a partial policy, a
//! change to what is already in force. Each is answered as what it is, over gRPC and REST.

mod common;

use common::*;
use http::Method;
use lb_proto::v1::set_policy_request::Policy;
use lb_proto::v1::*;
use tonic::Code;

#[tokio::test]
async fn blocking_a_key_nobody_created_is_not_found_and_registers_nothing() {
    let stack = Stack::start(0).await;
    let cp = &stack.cp;
    let client = http_client();
    let before = cp.cp.version();
    let r = send(
        &client,
        request(
            Method::POST,
            &cp.http_url("/admin/block_key"),
            Some(TOKEN),
            r#"{"api_key":"lbk_x"}"#,
        ),
    )
    .await;
    r.assert_error(404, "no API key");
    let mut admin = cp.admin(Some(TOKEN)).await;
    let e = admin.block_key(by_key("lbk_x")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = admin.unblock_key(by_key("lbk_x")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let users = get_with(
        &cp.http_url("/admin/users"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(
        send(&client, users).await.json()["users"],
        serde_json::json!([])
    );
    assert_eq!(cp.cp.version(), before);

    // A created key is blocked as before.
    let k = admin.create_api_key(new_key("", "")).await.answer();
    let body = format!(r#"{{"api_key":"{}"}}"#, k.api_key);
    let r = send(
        &client,
        request(
            Method::POST,
            &cp.http_url("/admin/block_key"),
            Some(TOKEN),
            &body,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["blocked"], true);
}

#[tokio::test]
async fn a_backend_weight_of_zero_is_refused_naming_the_field() {
    let stack = Stack::start(0).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let before = stack.cp.cp.version();
    let e = admin
        .add_backend(AddBackendRequest {
            address: "127.0.0.1:5999".into(),
            weight: 0,
            max_in_flight: 0,
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "weight");
    let existing = stack.mock.addrs()[0].to_string();
    let e = admin
        .set_backend_weight(SetBackendWeightRequest {
            address: existing,
            weight: 0,
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "weight");
    assert_eq!(stack.cp.cp.version(), before);
    let v = admin
        .add_backend(AddBackendRequest {
            address: "127.0.0.1:5999".into(),
            weight: 3,
            max_in_flight: 0,
        })
        .await
        .new_version();
    let added = stack.cp.cp.snapshot();
    assert_eq!(added.version, v);
    assert_eq!(added.backends.last().unwrap().weight, 3);
}

fn policy(p: Policy, mask: &[&str]) -> SetPolicyRequest {
    SetPolicyRequest {
        policy: Some(p),
        update_mask: mask.iter().map(|f| (*f).to_owned()).collect(),
    }
}

#[tokio::test]
async fn a_partial_policy_changes_only_the_fields_given() {
    let stack = Stack::start(1).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let before = stack.cp.cp.snapshot().health_check.clone().unwrap();
    let v = admin
        .set_policy(policy(
            Policy::HealthCheck(HealthCheckPolicy {
                interval_ms: 20_000,
                ..Default::default()
            }),
            &[],
        ))
        .await
        .new_version();
    stack.dps[0].wait_version(v).await;
    let applied = stack.dps[0]
        .shared
        .active()
        .unwrap()
        .snapshot
        .health_check
        .clone()
        .unwrap();
    assert_eq!(applied.interval_ms, 20_000);
    assert_eq!(
        (applied.path, applied.timeout_ms),
        (before.path, before.timeout_ms)
    );

    // A zero: refused as the field it names, not as another one.
    let e = admin
        .set_policy(policy(
            Policy::HealthCheck(HealthCheckPolicy::default()),
            &["interval_ms"],
        ))
        .await
        .unwrap_err();
    assert_invalid(&e, "health_check.interval_ms");
    let e = admin
        .set_policy(policy(
            Policy::HealthCheck(HealthCheckPolicy::default()),
            &[],
        ))
        .await
        .unwrap_err();
    assert_invalid(&e, "update_mask");
    let e = admin
        .set_policy(policy(Policy::Cache(CachePolicy::default()), &["enable"]))
        .await
        .unwrap_err();
    assert_invalid(&e, "update_mask");
    assert_eq!(stack.cp.cp.version(), v);

    // Turning the cache on, then off again, one field each time.
    let on = CachePolicy {
        enabled: true,
        ..Default::default()
    };
    admin
        .set_policy(policy(Policy::Cache(on), &[]))
        .await
        .new_version();
    assert!(stack.cp.cp.snapshot().cache.as_ref().unwrap().enabled);
    let v = admin
        .set_policy(policy(Policy::Cache(CachePolicy::default()), &["enabled"]))
        .await
        .new_version();
    let cache = stack.cp.cp.snapshot().cache.clone().unwrap();
    assert!(!cache.enabled);
    assert_eq!(
        cache.default_ttl_ms,
        lb_proto::defaults::cache().default_ttl_ms
    );
    assert_eq!(stack.cp.cp.version(), v);
}

#[tokio::test]
async fn a_change_to_what_is_in_force_makes_no_new_version() {
    let stack = Stack::start(1).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let current = stack.cp.cp.snapshot().strategy.clone();
    let v = stack.cp.cp.version();
    assert_eq!(
        admin.set_strategy(strategy(&current)).await.new_version(),
        v
    );
    let client = http_client();
    let body = format!(r#"{{"strategy":"{current}"}}"#);
    let r = send(
        &client,
        request(
            Method::POST,
            &stack.cp.http_url("/change_strategy"),
            Some(TOKEN),
            &body,
        ),
    )
    .await;
    assert_eq!(r.json()["version"], v);
    let k = admin.create_api_key(new_key("basic", "")).await.answer();
    let v = stack.cp.cp.version();
    let same_tier = SetKeyTierRequest {
        key: Some(by_id(&k.key_id)),
        tier: "basic".into(),
    };
    assert_eq!(admin.set_key_tier(same_tier).await.new_version(), v);
    // A real change still makes one.
    assert_eq!(
        admin.set_strategy(strategy("ip_hash")).await.new_version(),
        v + 1
    );
    stack.dps[0].wait_version(v + 1).await;
}

#[tokio::test]
async fn rest_creates_a_key_shown_once_that_the_proxy_then_limits() {
    let stack = Stack::start(1).await;
    let cp = &stack.cp;
    let client = http_client();
    let create = |token: Option<&str>, body: &str| {
        request(Method::POST, &cp.http_url("/admin/keys"), token, body)
    };
    send(&client, create(None, "{}"))
        .await
        .assert_error(401, "Authorization");
    send(&client, create(Some("wrong"), "{}"))
        .await
        .assert_error(403, "token");
    for (body, needle) in [
        (r#"{"tier":"gold"}"#, "tier"),
        (r#"{"tier":"free","colour":"red"}"#, "colour"),
        (r#"{"tier":5}"#, "tier"),
        ("not json", "JSON"),
    ] {
        send(&client, create(Some(TOKEN), body))
            .await
            .assert_error(400, needle);
    }
    let r = send(
        &client,
        create(Some(TOKEN), r#"{"tier":"free","label":"tour"}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let k = r.json();
    let key = k["api_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("lbk_") && key.len() == 44, "{k}");
    assert_eq!(
        (k["tier"].as_str(), k["label"].as_str()),
        (Some("free"), Some("tour"))
    );
    let id = k["api_key_id"].as_str().unwrap().to_owned();

    // Listed by id, never with the key itself.
    let users = get_with(
        &cp.http_url("/admin/users"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    );
    let users = send(&client, users).await;
    assert!(users.text().contains(&id) && !users.text().contains(&key));
    // An empty body takes the default tier.
    let r = send(&client, create(Some(TOKEN), "")).await;
    assert_eq!(
        (r.status, r.json()["tier"].as_str()),
        (201, Some("free")),
        "{}",
        r.text()
    );

    // The data plane knows the key: five admitted, then 429.
    stack.dps[0]
        .wait_version(k["version"].as_u64().unwrap())
        .await;
    let url = stack.dps[0].url("/data");
    let replies: Vec<u16> = {
        let mut out = Vec::new();
        for _ in 0..6 {
            out.push(
                send(&client, get_with(&url, &[("x-api-key", &key)]))
                    .await
                    .status,
            );
        }
        out
    };
    assert_eq!(replies, [200, 200, 200, 200, 200, 429]);
}

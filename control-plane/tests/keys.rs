//! API keys and bans on the embedded store, end to end: the gRPC calls, what the snapshots carry
//! to data planes, the REST endpoints of the original system, and restarts from the state file.

mod common;

use common::*;
use control_plane::keys::{hash_key, key_id};
use lb_proto::v1::*;
use tonic::Code;

#[tokio::test]
async fn key_lifecycle_reaches_the_snapshot_with_every_change() {
    let stack = Stack::start(1).await;
    let dp = &stack.dps[0];
    let mut admin = stack.cp.admin(Some(TOKEN)).await;

    let created = admin
        .create_api_key(new_key("", "mobile app"))
        .await
        .answer();
    assert_eq!(created.api_key.len(), 44);
    assert!(created.api_key.starts_with("lbk_"));
    assert!(
        created.api_key[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    let hash = hash_key(&created.api_key);
    assert_eq!(created.key_id, key_id(&hash));
    assert_eq!(created.tier, "free");
    // Every created key travels, so data planes tell it from an invented one; a default-tier
    // key with no tier.
    let config = admin.get_config(GetConfigRequest {}).await.answer();
    assert_eq!(
        config.keys,
        vec![KeyOverride {
            key_hash: hash.clone(),
            tier: String::new(),
            blocked: false,
        }]
    );

    let list = admin
        .list_api_keys(ListApiKeysRequest {})
        .await
        .answer()
        .keys;
    assert_eq!(list.len(), 1);
    let info = &list[0];
    assert_eq!(
        (info.key_id.as_str(), info.tier.as_str(), info.blocked),
        (created.key_id.as_str(), "free", false)
    );
    assert_eq!(info.label, "mobile app");
    assert!(info.created_at_ms > 0);
    assert_eq!((info.last_seen_ms, info.requests, info.rejected), (0, 0, 0));

    let v = admin
        .set_key_tier(SetKeyTierRequest {
            key: Some(by_id(&created.key_id)),
            tier: "premium".into(),
        })
        .await
        .new_version();
    dp.wait_version(v).await;
    let expect = |tier: &str, blocked: bool| {
        vec![KeyOverride {
            key_hash: hash.clone(),
            tier: tier.into(),
            blocked,
        }]
    };
    assert_eq!(
        dp.shared.active().unwrap().snapshot.keys,
        expect("premium", false)
    );

    let v = admin.block_key(by_id(&created.key_id)).await.new_version();
    dp.wait_version(v).await;
    assert_eq!(
        dp.shared.active().unwrap().snapshot.keys,
        expect("premium", true)
    );

    let v = admin
        .unblock_key(by_key(&created.api_key))
        .await
        .new_version();
    dp.wait_version(v).await;
    assert_eq!(
        dp.shared.active().unwrap().snapshot.keys,
        expect("premium", false)
    );

    // Back to the default tier: sent with no tier.
    let v = admin
        .set_key_tier(SetKeyTierRequest {
            key: Some(by_key(&created.api_key)),
            tier: String::new(),
        })
        .await
        .new_version();
    dp.wait_version(v).await;
    assert_eq!(dp.shared.active().unwrap().snapshot.keys, expect("", false));
    stack.cp.wait_acked(&["dp-1"], v).await;

    // Blocked with the default tier travels, with no tier.
    admin.block_key(by_id(&created.key_id)).await.unwrap();
    assert_eq!(stack.cp.cp.snapshot().keys, expect("", true));
    let list = admin
        .list_api_keys(ListApiKeysRequest {})
        .await
        .answer()
        .keys;
    assert_eq!((list[0].tier.as_str(), list[0].blocked), ("free", true));
}

#[tokio::test]
async fn created_keys_are_distinct_and_take_the_tier_asked_for() {
    let stack = Stack::start(0).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let k = admin
            .create_api_key(new_key("enterprise", ""))
            .await
            .answer();
        assert_eq!(k.tier, "enterprise");
        ids.insert(k.key_id);
    }
    assert_eq!(ids.len(), 5);
    let snapshot = stack.cp.cp.snapshot();
    assert_eq!(snapshot.keys.len(), 5);
    assert!(snapshot.keys.iter().all(|k| k.tier == "enterprise"));

    let before = stack.cp.cp.version();
    let e = admin.create_api_key(new_key("gold", "")).await.unwrap_err();
    assert_invalid(&e, "gold");
    assert!(
        e.message().contains("premium"),
        "lists the tiers: {}",
        e.message()
    );
    let e = admin
        .create_api_key(new_key("", &"x".repeat(300)))
        .await
        .unwrap_err();
    assert_invalid(&e, "label");
    stack.cp.assert_unchanged(before);
}

#[tokio::test]
async fn any_key_string_can_be_upgraded_and_bad_keys_are_refused() {
    let stack = Stack::start(0).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    admin
        .set_key_tier(SetKeyTierRequest {
            key: Some(by_key("my_key")),
            tier: "basic".into(),
        })
        .await
        .unwrap();
    let list = admin
        .list_api_keys(ListApiKeysRequest {})
        .await
        .answer()
        .keys;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].key_id, key_id(&hash_key("my_key")));
    assert_eq!(list[0].tier, "basic");
    assert_eq!(stack.cp.cp.snapshot().keys[0].key_hash, hash_key("my_key"));

    let before = stack.cp.cp.version();
    let long = "k".repeat(10 * 1024);
    for bad in ["", long.as_str(), "ctl\u{1}char", "with space", "tab\t"] {
        let e = admin
            .set_key_tier(SetKeyTierRequest {
                key: Some(by_key(bad)),
                tier: "basic".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            e.message().contains("api_key") && e.message().contains("visible ASCII"),
            "{}",
            e.message()
        );
        let e = admin.block_key(by_key(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        let e = admin.get_key_usage(by_key(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
    }
    let unknown = "0123456789abcdef";
    let e = admin.block_key(by_id(unknown)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains(unknown), "{}", e.message());
    let e = admin.get_key_usage(by_id(unknown)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = admin
        .set_key_tier(SetKeyTierRequest {
            key: Some(by_id(unknown)),
            tier: "basic".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = admin.unblock_key(by_id("NOT-AN-ID")).await.unwrap_err();
    assert_invalid(&e, "key_id");
    let e = admin.block_key(KeyRef { key: None }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = admin
        .set_key_tier(SetKeyTierRequest {
            key: Some(by_key("my_key")),
            tier: "gold".into(),
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "gold");
    stack.cp.assert_unchanged(before);

    // A tier some key uses cannot go away.
    let e = admin
        .delete_tier(DeleteTierRequest {
            name: "basic".into(),
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "basic");
}

#[tokio::test]
async fn usage_without_redis_is_the_whole_limit() {
    let stack = Stack::start(0).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let k = admin.create_api_key(new_key("basic", "")).await.answer();
    admin.block_key(by_id(&k.key_id)).await.unwrap();
    let u = admin.get_key_usage(by_key(&k.api_key)).await.answer();
    assert_eq!(
        u,
        KeyUsage {
            key_id: k.key_id.clone(),
            tier: "basic".into(),
            blocked: true,
            limit: 20,
            period_ms: 60_000,
            remaining: 20,
            reset_ms: 0,
            banned_for_ms: 0,
            per_data_plane: true,
        }
    );
    // A key never registered is a default-tier key.
    let u = admin.get_key_usage(by_key("never-seen")).await.answer();
    assert_eq!((u.tier.as_str(), u.limit, u.remaining), ("free", 5, 5));
    assert_eq!(u.key_id, key_id(&hash_key("never-seen")));
}

#[tokio::test]
async fn lifting_a_ban_without_redis_is_a_directive_for_every_data_plane() {
    let stack = Stack::start(1).await;
    let dp = &stack.dps[0];
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let bans = admin.list_bans(ListBansRequest {}).await.answer();
    assert!(bans.bans.is_empty());

    admin
        .lift_ban(LiftBanRequest {
            client: "ip:203.0.113.7".into(),
        })
        .await
        .unwrap();
    let v = admin
        .lift_ban(LiftBanRequest {
            client: "key:0123456789abcdef".into(),
        })
        .await
        .new_version();
    dp.wait_version(v).await;
    let directives = dp.shared.active().unwrap().snapshot.directives.clone();
    let lifted: Vec<(u64, String)> = directives
        .iter()
        .map(|d| match &d.kind {
            Some(directive::Kind::LiftBan(l)) => (d.seq, l.client.clone()),
            other => panic!("unexpected directive {other:?}"),
        })
        .collect();
    assert_eq!(
        lifted,
        vec![
            (1, "ip:203.0.113.7".to_owned()),
            (2, "key:0123456789abcdef".to_owned())
        ]
    );

    let before = stack.cp.cp.version();
    for bad in [
        "203.0.113.7",
        "ip:not-an-address",
        "key:short",
        "user:1",
        "",
    ] {
        let e = admin
            .lift_ban(LiftBanRequest { client: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        assert!(e.message().contains("client"), "{}", e.message());
    }
    assert_eq!(stack.cp.cp.version(), before);
}

#[tokio::test]
async fn keys_survive_a_restart_from_the_state_file() {
    let dir = TempDir::new("keys");
    let file = dir.join("state.pb");
    let cp = Cp::start(snapshot_with(&[]), Some(file.clone())).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let k = admin
        .create_api_key(new_key("premium", "kept"))
        .await
        .answer();
    let version = cp.cp.version();
    cp.stop().await;

    let cp = Cp::start(snapshot_with(&[]), Some(file)).await;
    assert_eq!(cp.cp.version(), version);
    let mut admin = cp.admin(Some(TOKEN)).await;
    let list = admin
        .list_api_keys(ListApiKeysRequest {})
        .await
        .answer()
        .keys;
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            list[0].key_id.as_str(),
            list[0].tier.as_str(),
            list[0].label.as_str()
        ),
        (k.key_id.as_str(), "premium", "kept")
    );
    assert_eq!(cp.cp.snapshot().keys.len(), 1);
}

#[tokio::test]
async fn rest_key_endpoints_keep_the_original_shapes_and_need_the_token() {
    let stack = Stack::start(0).await;
    let cp = &stack.cp;
    let client = http_client();
    let post = |path: &str, token: Option<&str>, body: &str| {
        request(http::Method::POST, &cp.http_url(path), token, body)
    };
    let id = key_id(&hash_key("my_key"));

    let r = get(&client, &cp.http_url("/usage?api_key=my_key")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({
            "api_key_id": id, "tier": "free", "limit": 5, "period_ms": 60000,
            "remaining": 5, "reset_ms": 0,
            "banned_for_ms": 0,
            "per_data_plane": true, "blocked": false,
        })
    );
    for bad in ["/usage", "/usage?api_key=", "/usage?api_key=a%20b"] {
        let r = get(&client, &cp.http_url(bad)).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(
            r.json()["error"].as_str().unwrap().contains("api_key"),
            "{bad}: {}",
            r.json()
        );
    }

    let body = r#"{"api_key":"my_key","tier":"premium"}"#;
    assert_eq!(
        send(&client, post("/admin/upgrade_tier", None, body))
            .await
            .status,
        401
    );
    assert_eq!(
        send(&client, post("/admin/upgrade_tier", Some("wrong"), body))
            .await
            .status,
        403
    );
    send(
        &client,
        post(
            "/admin/upgrade_tier",
            Some(TOKEN),
            r#"{"api_key":"my_key"}"#,
        ),
    )
    .await
    .assert_error(400, "tier");
    send(
        &client,
        post(
            "/admin/upgrade_tier",
            Some(TOKEN),
            r#"{"api_key":"my_key","tier":"gold"}"#,
        ),
    )
    .await
    .assert_error(400, "gold");
    let r = send(&client, post("/admin/upgrade_tier", Some(TOKEN), body)).await;
    assert_eq!(r.status, 200, "{}", r.json());
    let j = r.json();
    assert_eq!(
        (j["status"].as_str(), j["api_key_id"].as_str()),
        (Some("ok"), Some(id.as_str()))
    );
    assert_eq!(j["version"].as_u64(), Some(cp.cp.version()));

    let r = send(
        &client,
        post("/admin/block_key", None, r#"{"api_key":"my_key"}"#),
    )
    .await;
    assert_eq!(r.status, 401);
    send(
        &client,
        post("/admin/block_key", Some(TOKEN), r#"{"key":"my_key"}"#),
    )
    .await
    .assert_error(400, "api_key");
    let r = send(
        &client,
        post("/admin/block_key", Some(TOKEN), r#"{"api_key":""}"#),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(
        &client,
        post("/admin/block_key", Some(TOKEN), r#"{"api_key":"my_key"}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["blocked"], true);

    let u = get(&client, &cp.http_url("/usage?api_key=my_key"))
        .await
        .json();
    assert_eq!(
        (
            u["tier"].as_str(),
            u["limit"].as_u64(),
            u["blocked"].as_bool()
        ),
        (Some("premium"), Some(100), Some(true))
    );
    assert_eq!(
        cp.cp.snapshot().keys,
        vec![KeyOverride {
            key_hash: hash_key("my_key"),
            tier: "premium".into(),
            blocked: true,
        }]
    );

    let users_url = cp.http_url("/admin/users");
    assert_eq!(get(&client, &users_url).await.status, 401);
    let r = send(
        &client,
        request(http::Method::GET, &users_url, Some(TOKEN), ""),
    )
    .await;
    assert_eq!(r.status, 200);
    let users = r.json()["users"].as_array().unwrap().clone();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["api_key_id"], id.as_str());
    assert_eq!(users[0]["tier"], "premium");
    assert_eq!(users[0]["blocked"], true);

    let logs_url = cp.http_url("/logs");
    assert_eq!(get(&client, &logs_url).await.status, 401);
    let r = send(
        &client,
        request(http::Method::GET, &logs_url, Some(TOKEN), ""),
    )
    .await;
    assert_eq!((r.status, r.json()), (200, serde_json::json!({"logs": []})));
}

#[tokio::test]
async fn without_a_shared_store_bans_are_listed_per_data_plane() {
    let stack = Stack::start(2).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let k = admin.create_api_key(new_key("free", "")).await.answer();
    let v = stack.cp.cp.version();
    for dp in &stack.dps {
        dp.wait_version(v).await;
    }
    let client = http_client();
    let key = [("x-api-key", k.api_key.as_str())];
    let mut banned = false;
    for _ in 0..16 {
        let r = send(&client, get_with(&stack.dps[0].url("/data"), &key)).await;
        if r.status == 429 && r.header("retry-after").parse::<u64>().unwrap() > 100 {
            banned = true;
            break;
        }
    }
    assert!(banned, "the key was not banned on dp-1");
    // Each data plane counts on its own: dp-2 still admits the key.
    let r = send(&client, get_with(&stack.dps[1].url("/data"), &key)).await;
    assert_eq!(r.status, 200);

    let who = format!("key:{}", k.key_id);
    let bans = poll_until("dp-1's ban in ListBans", || {
        let grpc = stack.cp.grpc;
        async move {
            let mut admin = admin_client(grpc, Some(TOKEN)).await;
            let bans = admin.list_bans(ListBansRequest {}).await.answer().bans;
            if bans.is_empty() { Err(bans) } else { Ok(bans) }
        }
    })
    .await;
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(
        (bans[0].client.as_str(), bans[0].node_id.as_str()),
        (who.as_str(), "dp-1")
    );
    let u = admin.get_key_usage(by_key(&k.api_key)).await.answer();
    assert!(u.per_data_plane, "{u:?}");
    assert!(u.banned_for_ms > 250_000 && u.remaining == 0, "{u:?}");
    let rest = get(
        &client,
        &stack.cp.http_url(&format!("/usage?api_key={}", k.api_key)),
    )
    .await;
    assert_eq!(rest.json()["per_data_plane"], true, "{}", rest.text());

    admin
        .lift_ban(LiftBanRequest { client: who })
        .await
        .unwrap();
    assert!(
        admin
            .list_bans(ListBansRequest {})
            .await
            .answer()
            .bans
            .is_empty()
    );
    assert_eq!(
        admin
            .get_key_usage(by_key(&k.api_key))
            .await
            .answer()
            .banned_for_ms,
        0
    );
}

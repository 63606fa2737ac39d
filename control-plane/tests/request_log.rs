//! The request log as `/logs` shows it, fed by the data planes' reports: a light user's every
//! request is there; a flood of one client's refusals is a few entries with counts; refusals of
//! a key name the key.

mod common;

use common::*;
use lb_proto::v1::UnknownKeyPolicy;
use serde_json::Value;

/// `/logs`, as the admin sees it.
async fn logs(cp: &Cp) -> Vec<Value> {
    let url = cp.http_url("/logs");
    let r = send(
        &http_client(),
        request(http::Method::GET, &url, Some(TOKEN), ""),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["logs"].as_array().unwrap().clone()
}

/// Waits until `/logs` holds entries `pick` chooses and `done` accepts them; those entries.
async fn logged(
    cp: &Cp,
    what: &str,
    pick: impl Fn(&Value) -> bool,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let (pick, done) = (&pick, &done);
    poll_until(what, || async move {
        let mine: Vec<Value> = logs(cp).await.into_iter().filter(|e| pick(e)).collect();
        if done(&mine) { Ok(mine) } else { Err(mine) }
    })
    .await
}

fn count(e: &Value) -> u64 {
    e["count"].as_u64().unwrap()
}

#[tokio::test]
async fn every_request_of_a_light_user_is_logged() {
    let stack = Stack::start(1).await;
    let client = http_client();
    for i in 0..20 {
        let id = format!("light-{i}");
        let req = get_with(&stack.dps[0].url("/data"), &[("x-request-id", &id)]);
        assert_eq!(send(&client, req).await.status, 200);
    }
    let seen = logged(
        &stack.cp,
        "the twenty requests in /logs",
        |e| e["request_id"].as_str().unwrap().starts_with("light-"),
        |mine| mine.len() == 20,
    )
    .await;
    for e in &seen {
        assert_eq!(
            (e["decision"].as_str(), e["status"].as_u64(), count(e)),
            (Some("proxied"), Some(200), 1),
            "{e}"
        );
        assert_eq!(
            (e["path"].as_str(), e["method"].as_str()),
            (Some("/data"), Some("GET"))
        );
    }
}

#[tokio::test]
async fn a_flood_of_refusals_is_a_few_entries_with_their_count() {
    let stack = Stack::start(1).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let k = admin
        .create_api_key(new_key("free", "flood"))
        .await
        .answer();
    stack.dps[0].wait_version(stack.cp.cp.version()).await;
    let urls = urls(&stack.dps, "/data");
    let key = [("x-api-key", k.api_key.as_str())];
    let mut refused = 0;
    for _ in 0..20 {
        let replies = burst(&urls, 100, &key).await;
        assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
        refused += replies.iter().filter(|r| r.status == 429).count() as u64;
    }
    assert!(refused >= 1990, "{refused} refused of 2000");
    let is_refusal = |e: &Value| e["status"] == 429;
    let entries = logged(
        &stack.cp,
        "the refusals counted in /logs",
        |e| e["key_id"] == k.key_id.as_str() && is_refusal(e),
        |mine| mine.iter().map(count).sum::<u64>() == refused,
    )
    .await;
    assert!(
        entries.len() <= 40,
        "{} entries: {entries:?}",
        entries.len()
    );
    let decisions: std::collections::BTreeSet<&str> = entries
        .iter()
        .map(|e| e["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["banned", "rate_limited"].into(), "{entries:?}");
    assert!(entries.iter().any(|e| count(e) > 100), "{entries:?}");
}

#[tokio::test]
async fn blocked_and_unknown_key_refusals_name_the_key() {
    let stack = Stack::start_with(1, |s| {
        s.rate_limit.as_mut().unwrap().unknown_key = UnknownKeyPolicy::Reject as i32;
    })
    .await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let k = admin.create_api_key(new_key("free", "")).await.answer();
    admin.block_key(by_id(&k.key_id)).await.answer();
    stack.dps[0].wait_version(stack.cp.cp.version()).await;
    let client = http_client();
    let url = stack.dps[0].url("/data");
    let r = send(&client, get_with(&url, &[("x-api-key", &k.api_key)])).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let unknown = "lbk_nobody_made_this_one";
    let r = send(&client, get_with(&url, &[("x-api-key", unknown)])).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let unknown_id = control_plane::keys::key_id(&control_plane::keys::hash_key(unknown));
    for (decision, key_id) in [("blocked", &k.key_id), ("unknown_key", &unknown_id)] {
        let seen = logged(
            &stack.cp,
            &format!("the {decision} refusal in /logs"),
            |e| e["decision"] == decision,
            |mine| !mine.is_empty(),
        )
        .await;
        assert_eq!(
            seen[0]["key_id"].as_str(),
            Some(key_id.as_str()),
            "{seen:?}"
        );
    }
}

//! `control-plane dev`, the one-process stack, as a user runs it: with the embedded store its
//! control plane answers usage and bans from the limiter state its data planes decide with.

mod common;

use common::*;
use control_plane::dev::{DevArgs, Stack as DevStack};
use control_plane::settings::CommonArgs;
use http::Method;
use lb_proto::v1::{LiftBanRequest, ListBansRequest};
use mock_backends::MockBackends;

fn any_port() -> Option<std::net::SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

/// `dev` over these backends (`None`: its own mock backends), every listener on a free port.
fn dev_args(backends: Option<&MockBackends>, planes: u16) -> DevArgs {
    let list = backends.map(|b| {
        let list: Vec<String> = b.addrs().iter().map(|a| a.to_string()).collect();
        vec![control_plane::settings::BackendEntry::Short(list.join(","))]
    });
    DevArgs {
        common: CommonArgs {
            backends: list,
            grpc_listen: any_port(),
            http_listen: any_port(),
            ..Default::default()
        },
        data_planes: planes,
        listen: any_port(),
        admin_listen: any_port(),
        ports: String::new(),
        backend_protocol: "http".into(),
    }
}

async fn start_dev(planes: u16) -> (MockBackends, DevStack) {
    let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let stack = DevStack::start(dev_args(Some(&mock), planes))
        .await
        .unwrap();
    wait_applied(&stack, 1).await;
    (mock, stack)
}

/// Waits until every data plane of the stack runs `version` or a later one.
async fn wait_applied(stack: &DevStack, version: u64) {
    let n = stack.proxies().len();
    wait_until(&format!("{n} data planes on version {version}"), || {
        let planes = stack.cp.data_planes();
        planes.len() == n
            && planes
                .iter()
                .all(|p| p.connected && p.applied_version >= version)
    })
    .await;
}

/// A GET through data plane `i` with the API key.
async fn proxied(client: &HttpClient, stack: &DevStack, i: usize, key: &str) -> Reply {
    let url = format!("http://{}/data", stack.proxies()[i]);
    send(client, get_with(&url, &[("x-api-key", key)])).await
}

async fn rest_usage(client: &HttpClient, stack: &DevStack, key: &str) -> serde_json::Value {
    let reply = get(
        client,
        &format!("http://{}/usage?api_key={key}", stack.http),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

#[tokio::test]
async fn usage_and_bans_are_what_the_data_planes_enforce() {
    let (_mock, stack) = start_dev(2).await;
    let client = http_client();
    let mut admin = admin_client(stack.grpc, Some(&stack.token)).await;
    let k = admin.create_api_key(new_key("free", "tour")).await.answer();
    wait_applied(&stack, stack.cp.version()).await;

    // Two requests: the proxy says three remain, and so do REST and gRPC.
    for _ in 0..2 {
        assert_eq!(proxied(&client, &stack, 0, &k.api_key).await.status, 200);
    }
    let last = proxied(&client, &stack, 1, &k.api_key).await;
    assert_eq!(last.header("x-ratelimit-remaining"), "2");
    let u = rest_usage(&client, &stack, &k.api_key).await;
    assert_eq!(
        (u["remaining"].as_u64(), u["banned_for_ms"].as_u64()),
        (Some(2), Some(0))
    );
    let g = admin.get_key_usage(by_key(&k.api_key)).await.answer();
    assert_eq!((g.remaining, g.limit, g.banned_for_ms), (2, 5, 0));
    assert!(g.reset_ms > 24_000 && g.reset_ms <= 36_000, "{g:?}");

    // The two data planes share one limit: two more anywhere, then refusals until a ban.
    for i in 0..2 {
        assert_eq!(proxied(&client, &stack, i, &k.api_key).await.status, 200);
    }
    let mut banned = false;
    for _ in 0..12 {
        let r = proxied(&client, &stack, 0, &k.api_key).await;
        assert_eq!(r.status, 429);
        if r.header("retry-after").parse::<u64>().unwrap() > 100 {
            banned = true;
            break;
        }
    }
    assert!(banned, "ten refusals did not ban the key");
    let u = rest_usage(&client, &stack, &k.api_key).await;
    assert_eq!(u["remaining"], 0);
    assert!(u["banned_for_ms"].as_u64().unwrap() > 250_000, "{u}");
    assert!(u["reset_ms"].as_u64().unwrap() >= u["banned_for_ms"].as_u64().unwrap());
    let bans = admin.list_bans(ListBansRequest {}).await.answer().bans;
    let client_id = format!("key:{}", k.key_id);
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(
        (bans[0].client.as_str(), bans[0].count),
        (client_id.as_str(), 1)
    );
    assert!(bans[0].until_ms > now_ms() + 250_000);

    // A bigger tier does not lift the ban: usage says so, and the proxy agrees.
    let upgraded = send(
        &client,
        request(
            Method::POST,
            &format!("http://{}/admin/upgrade_tier", stack.http),
            Some(&stack.token),
            &format!(r#"{{"api_key":"{}","tier":"premium"}}"#, k.api_key),
        ),
    )
    .await;
    assert_eq!(upgraded.status, 200, "{}", upgraded.text());
    wait_applied(&stack, upgraded.json()["version"].as_u64().unwrap()).await;
    let u = rest_usage(&client, &stack, &k.api_key).await;
    assert_eq!(
        (u["tier"].as_str(), u["limit"].as_u64()),
        (Some("premium"), Some(100))
    );
    assert_eq!(u["remaining"], 0);
    assert!(u["banned_for_ms"].as_u64().unwrap() > 0, "{u}");
    assert_eq!(proxied(&client, &stack, 1, &k.api_key).await.status, 429);

    // Lifting the ban: gone from the list and from usage, and the proxy admits the key again.
    let lifted = admin
        .lift_ban(LiftBanRequest {
            client: client_id.clone(),
        })
        .await
        .answer();
    assert!(
        admin
            .list_bans(ListBansRequest {})
            .await
            .answer()
            .bans
            .is_empty()
    );
    let u = rest_usage(&client, &stack, &k.api_key).await;
    assert_eq!(u["banned_for_ms"], 0, "{u}");
    assert!(u["remaining"].as_u64().unwrap() > 0, "{u}");
    wait_applied(&stack, lifted.version).await;
    for i in 0..2 {
        assert_eq!(proxied(&client, &stack, i, &k.api_key).await.status, 200);
    }
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_flag_is_reported_before_any_port_is_bound() {
    // A port already taken, as on a busy machine: the bad strategy is what gets reported.
    let busy = listener().await;
    let port = busy.local_addr().unwrap().port();
    let mut args = dev_args(None, 1);
    args.ports = port.to_string();
    args.common.strategy = Some("fastest".into());
    let e = DevStack::start(args.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("strategy") && e.contains("fastest"), "{e}");
    assert!(!e.contains("listen"), "{e}");
    // With every flag valid, the taken port is named.
    args.common.strategy = None;
    let e = format!("{:#}", DevStack::start(args).await.err().unwrap());
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("--ports"),
        "{e}"
    );
}

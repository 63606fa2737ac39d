//! The dashboards end to end: the pages in a real headless Chromium (through chromedriver)
//! against a stack of mock backends, a control plane and two data planes; the `/ws` feed with a
//! bare WebSocket client; the REST bodies that name keys by id; and `/openapi.json` against the
//! routes the control plane serves.
//!
//! The browser test needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian packages
//! `chromium` and `chromium-driver`) and fails, saying so, without them.

mod common;
#[path = "common/webdriver.rs"]
mod webdriver;

use std::time::Duration;

use common::*;
use control_plane::http::{DASHBOARD_PATHS, REST_PATHS};
use control_plane::keys::{hash_key, key_id};
use lb_proto::v1::admin_client::AdminClient;
use lb_proto::v1::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use webdriver::{Browser, artifact};

/// The number in a counter's text ("–" before the first update counts as 0).
fn count(text: &str) -> u64 {
    text.chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

async fn send_requests(
    client: &HttpClient,
    url: &str,
    n: usize,
    api_key: Option<&str>,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        let mut req = http::Request::get(url);
        if let Some(k) = api_key {
            req = req.header("x-api-key", k);
        }
        let r = send(client, req.body(Default::default()).unwrap()).await;
        statuses.push(r.status);
    }
    statuses
}

/// Saves the token typed on the page, applies `least_connections`, and waits for the result
/// `what` to show.
async fn apply_least_connections(browser: &Browser, what: &str, shown: impl Fn(&str) -> bool) {
    browser.click(&browser.find("#token-save").await).await;
    browser
        .click(
            &browser
                .find("#strategy-select option[value=\"least_connections\"]")
                .await,
        )
        .await;
    browser.click(&browser.find("#strategy-apply").await).await;
    browser.wait_text("#strategy-result", what, shown).await;
}

/// Every API key, through the Admin API.
async fn list_api_keys(
    admin: &mut AdminClient<InterceptedService<Channel, impl Interceptor>>,
) -> Vec<ApiKeyInfo> {
    admin
        .list_api_keys(ListApiKeysRequest {})
        .await
        .answer()
        .keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_work_in_a_real_browser() {
    webdriver::require_installed();
    let stack = Stack::start(2).await;
    let client = http_client();
    let browser = Browser::start().await;
    let base = format!("http://{}", stack.cp.http);

    // --- load balancing ---
    browser.goto(&format!("{base}/dashboard")).await;
    let addrs: Vec<String> = stack.mock.addrs().iter().map(ToString::to_string).collect();
    let script = format!(
        "const want = {}; return want.every(a => document.querySelector(`#backends tbody tr[data-address=\"${{a}}\"]`));",
        json!(addrs)
    );
    browser
        .wait_for("the three backends in the table", &script)
        .await;
    browser
        .wait_text("#conn-status", "live", |t| t == "live")
        .await;

    let before = count(&browser.text_of("#total-requests").await);
    for dp in &stack.dps {
        let statuses = send_requests(&client, &dp.url("/data"), 20, None).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }
    browser
        .wait_text("#total-requests", "40 more requests", |t| {
            count(t) >= before + 40
        })
        .await;

    // A wrong token: the API's answer is shown and nothing changes.
    let input = browser.find("#token-input").await;
    browser.send_keys(&input, "wrong-token").await;
    apply_least_connections(&browser, "the API error", |t| {
        t.contains("wrong admin token")
    })
    .await;
    assert_eq!(stack.cp.cp.snapshot().strategy, "round_robin");
    assert_eq!(stack.cp.cp.version(), 1);

    // The right token: the strategy changes everywhere.
    browser.clear(&input).await;
    browser.send_keys(&input, TOKEN).await;
    apply_least_connections(&browser, "the change confirmed", |t| {
        t.contains("least_connections")
    })
    .await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let strategy = admin.get_strategy(GetStrategyRequest {}).await.answer();
    assert_eq!(strategy.strategy, "least_connections");
    let config = admin.get_config(GetConfigRequest {}).await.answer();
    assert_eq!(config.strategy, "least_connections");
    let v = config.version;
    assert_eq!(v, 2);
    stack.cp.wait_acked(&["dp-1", "dp-2"], v).await;
    for dp in &stack.dps {
        assert_eq!(dp.strategy(), "least_connections");
    }
    browser
        .wait_text("#strategy-current", "least_connections", |t| {
            t == "least_connections"
        })
        .await;
    for id in ["dp-1", "dp-2"] {
        browser
            .wait_text(
                &format!("#data-planes tbody tr[data-id=\"{id}\"] td[data-field=applied_version]"),
                "the new version, current",
                |t| t.starts_with(&v.to_string()) && t.contains("current"),
            )
            .await;
        let live = browser
            .text_of(&format!(
                "#data-planes tbody tr[data-id=\"{id}\"] td[data-field=liveness]"
            ))
            .await;
        assert_eq!(live, "live");
    }
    browser
        .wait_for(
            "a chart area per backend",
            "return document.querySelectorAll('#chart polygon').length === 3",
        )
        .await;
    let health = browser
        .text_of(&format!(
            "#backends tbody tr[data-address=\"{}\"] td[data-field=health]",
            addrs[0]
        ))
        .await;
    assert_eq!(health, "healthy");
    browser.save_screenshot(&artifact("dashboard.png")).await;

    // --- rate limiting ---
    let key = admin
        .create_api_key(new_key("", "dashboard test"))
        .await
        .answer();
    let statuses = send_requests(&client, &stack.dps[0].url("/data"), 1, Some(&key.api_key)).await;
    assert_eq!(statuses, [200]);
    // A second key, on the free tier (5 a minute), goes over its limit.
    let noisy = admin
        .create_api_key(new_key("free", "noisy"))
        .await
        .answer();
    let statuses =
        send_requests(&client, &stack.dps[1].url("/data"), 8, Some(&noisy.api_key)).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        3,
        "{statuses:?}"
    );

    browser.goto(&format!("{base}/dashboard/ratelimit")).await;
    browser
        .wait_text("#conn-status", "live", |t| t == "live")
        .await;
    let row = format!("#keys tbody tr[data-key-id=\"{}\"]", key.key_id);
    browser
        .wait_text(
            &format!("{row} td[data-field=requests]"),
            "the key's request counted",
            |t| t == "1",
        )
        .await;
    let noisy_row = format!("#keys tbody tr[data-key-id=\"{}\"]", noisy.key_id);
    browser
        .wait_text(
            &format!("{noisy_row} td[data-field=rejected]"),
            "the noisy key's rejections",
            |t| t == "3",
        )
        .await;
    browser
        .wait_for(
            "the sampled request log",
            "return document.querySelectorAll('#log tbody tr').length > 0",
        )
        .await;
    browser
        .wait_text("#total-refused", "the 429s counted", |t| count(t) >= 3)
        .await;

    // Change the tier on the page.
    browser
        .click(
            &browser
                .find(&format!(
                    "{row} select.tier-select option[value=\"premium\"]"
                ))
                .await,
        )
        .await;
    browser
        .click(&browser.find(&format!("{row} button.tier-apply")).await)
        .await;
    browser
        .wait_text("#key-result", "the tier change confirmed", |t| {
            t.contains("premium")
        })
        .await;
    let listed = |keys: &[ApiKeyInfo]| {
        keys.iter()
            .find(|k| k.key_id == key.key_id)
            .cloned()
            .unwrap()
    };
    let info = listed(&list_api_keys(&mut admin).await);
    assert_eq!(info.tier, "premium");
    assert_eq!(info.requests, 1);
    browser
        .wait_for(
            "the row showing premium",
            &format!(
                "return document.querySelector('{row} .tier-current').textContent === 'premium'"
            ),
        )
        .await;

    // Block, then unblock, by id.
    let toggle = format!("{row} button.block-toggle");
    browser.click(&browser.find(&toggle).await).await;
    browser
        .wait_text(&toggle, "Unblock", |t| t == "Unblock")
        .await;
    let info = listed(&list_api_keys(&mut admin).await);
    assert!(info.blocked);
    let blocked_version = stack.cp.cp.version();
    for dp in &stack.dps {
        dp.wait_version(blocked_version).await;
    }
    let statuses = send_requests(&client, &stack.dps[0].url("/data"), 1, Some(&key.api_key)).await;
    assert_eq!(statuses, [403]);
    browser.click(&browser.find(&toggle).await).await;
    browser.wait_text(&toggle, "Block", |t| t == "Block").await;
    let info = listed(&list_api_keys(&mut admin).await);
    assert!(!info.blocked);
    browser
        .wait_for(
            "the decisions chart",
            "return document.querySelectorAll('#rl-chart polygon').length === 4",
        )
        .await;
    browser
        .save_screenshot(&artifact("dashboard-ratelimit.png"))
        .await;

    // --- the control plane goes away and comes back ---
    let Stack { mock, cp, dps } = stack;
    let (grpc_addr, http_addr) = (cp.grpc, cp.http);
    cp.stop().await;
    browser
        .wait_text("#conn-status", "disconnected", |t| {
            t.contains("disconnected")
        })
        .await;
    let grpc = tokio::net::TcpListener::bind(grpc_addr).await.unwrap();
    let http = tokio::net::TcpListener::bind(http_addr).await.unwrap();
    let cp = Cp::start_on(snapshot_with(&mock.addrs()), None, grpc, http).await;
    browser
        .wait_text("#conn-status", "live again", |t| t == "live")
        .await;
    drop(browser);
    for dp in dps {
        dp.stop().await;
    }
    cp.stop().await;
}

/// A bare WebSocket client: enough of RFC 6455 to read text frames and send masked ones.
struct Ws {
    stream: TcpStream,
}

impl Ws {
    /// Opens `/ws`; the HTTP status when the upgrade is refused.
    async fn connect(addr: std::net::SocketAddr, origin: Option<&str>) -> Result<Ws, u16> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        // Read the response head byte by byte, so no frame bytes are consumed with it.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = stream.read_u8().await.unwrap();
            head.push(b);
        }
        let head = String::from_utf8_lossy(&head);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap();
        if status == 101 {
            Ok(Ws { stream })
        } else {
            Err(status)
        }
    }

    /// The next text message; `None` when the server closed the socket.
    async fn recv(&mut self) -> Option<String> {
        loop {
            let b0 = self.stream.read_u8().await.ok()?;
            let b1 = self.stream.read_u8().await.ok()?;
            assert_eq!(b1 & 0x80, 0, "server frames are not masked");
            let len = match b1 & 0x7f {
                126 => u64::from(self.stream.read_u16().await.ok()?),
                127 => self.stream.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0; usize::try_from(len).unwrap()];
            self.stream.read_exact(&mut payload).await.ok()?;
            match b0 & 0x0f {
                0x1 => {
                    assert_ne!(b0 & 0x80, 0, "text messages arrive in one frame");
                    return Some(String::from_utf8(payload).unwrap());
                }
                0x8 => return None,
                _ => {}
            }
        }
    }

    /// The next message as JSON, within 5 s.
    async fn next(&mut self) -> Option<Value> {
        let text = tokio::time::timeout(Duration::from_secs(5), self.recv())
            .await
            .expect("a message within 5 s")?;
        Some(serde_json::from_str(&text).unwrap())
    }

    /// The next message whose `type` is `kind`, within [`WAIT`].
    async fn next_of(&mut self, kind: &str) -> Value {
        let wanted = async {
            loop {
                let m = self.next().await.expect("socket open");
                if m["type"] == kind {
                    return m;
                }
            }
        };
        tokio::time::timeout(WAIT, wanted)
            .await
            .unwrap_or_else(|_| panic!("no {kind} message within {WAIT:?}"))
    }

    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x80 | opcode];
        if payload.len() < 126 {
            frame.push(0x80 | payload.len() as u8);
        } else {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn send_text(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes()).await;
    }
}

#[tokio::test]
async fn a_key_created_on_the_page_is_shown_once_with_a_copy_button() {
    webdriver::require_installed();
    let stack = Stack::start(1).await;
    let browser = Browser::start().await;
    browser
        .goto(&format!("http://{}/dashboard/ratelimit", stack.cp.http))
        .await;
    let input = browser.find("#token-input").await;
    browser.send_keys(&input, TOKEN).await;
    browser.click(&browser.find("#token-save").await).await;
    browser
        .wait_for(
            "the tiers offered for a new key",
            "return !!document.querySelector('#new-key-tier option[value=\"basic\"]')",
        )
        .await;
    browser
        .click(&browser.find("#new-key-tier option[value=\"basic\"]").await)
        .await;
    let label = browser.find("#new-key-label").await;
    browser.send_keys(&label, "made on the page").await;
    browser
        .click(&browser.find("#create-key-submit").await)
        .await;
    let key = browser
        .wait_text("#new-key-value", "the new key", |t| t.starts_with("lbk_"))
        .await;
    browser.click(&browser.find("#new-key-copy").await).await;
    browser
        .wait_text("#new-key-copied", "the copy acknowledged", |t| {
            !t.is_empty()
        })
        .await;
    browser
        .save_screenshot(&artifact("dashboard-create-key.png"))
        .await;
    // The key is the one stored, with the tier and label chosen, and it works.
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let listed = list_api_keys(&mut admin).await;
    let made = listed
        .iter()
        .find(|k| k.key_id == key_id(&hash_key(&key)))
        .unwrap_or_else(|| panic!("{key} not among {listed:?}"));
    assert_eq!(
        (made.tier.as_str(), made.label.as_str()),
        ("basic", "made on the page")
    );
    stack.dps[0].wait_version(stack.cp.cp.version()).await;
    let statuses = send_requests(&http_client(), &stack.dps[0].url("/data"), 1, Some(&key)).await;
    assert_eq!(statuses, [200]);
    // Shown once: a new page does not show it again.
    browser
        .goto(&format!("http://{}/dashboard/ratelimit", stack.cp.http))
        .await;
    browser
        .wait_text("#conn-status", "live", |t| t == "live")
        .await;
    let shown = browser
        .execute("return document.getElementById('new-key').hidden && document.getElementById('new-key-value').textContent", vec![])
        .await;
    assert_eq!(shown, json!(""), "the key is shown again");
}

#[tokio::test]
async fn feed_sends_state_then_admin_data_after_the_token() {
    let stack = Stack::start(1).await;
    let mut ws = Ws::connect(stack.cp.http, None).await.unwrap();
    let first = ws.next_of("state").await;
    assert_eq!(first["strategy"], "round_robin");
    assert_eq!(first["backends"].as_array().unwrap().len(), 3);
    assert_eq!(
        first["history"].as_array().unwrap().len() as u64,
        control_plane::traffic::HISTORY_SECONDS,
        "a new socket gets the whole kept history"
    );
    assert_eq!(first["admin"], false);
    assert!(first.get("keys").is_none() && first.get("log").is_none());
    assert!(
        first["tiers"]
            .as_array()
            .unwrap()
            .contains(&json!("premium"))
    );

    // Whatever else a client sends is ignored; the feed goes on.
    ws.send_text("not json").await;
    ws.send_text(r#"{"token": 5}"#).await;
    ws.send_frame(0x2, b"\x00\x01binary").await;
    let next = ws.next_of("state").await;
    assert!(
        next["history"].as_array().unwrap().len() <= 2,
        "later messages carry only new seconds: {}",
        next["history"]
    );

    ws.send_text(r#"{"token": "wrong"}"#).await;
    let refused = ws.next_of("auth").await;
    assert_eq!(refused["error"], "wrong admin token");

    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let key = admin
        .create_api_key(new_key("basic", "feed"))
        .await
        .answer();
    ws.send_text(&json!({"token": TOKEN}).to_string()).await;
    let m = ws.next_of("state").await;
    assert_eq!(m["admin"], true);
    let keys = m["keys"].as_array().unwrap();
    assert!(
        keys.iter()
            .any(|k| k["api_key_id"] == key.key_id.as_str() && k["tier"] == "basic"),
        "{keys:?}"
    );
    assert!(m["log"].is_array());

    // A request shows up in the per-second history and the totals.
    let client = http_client();
    send_requests(&client, &stack.dps[0].url("/data"), 5, Some(&key.api_key)).await;
    let mut seen = 0;
    for _ in 0..10 {
        let m = ws.next_of("state").await;
        seen += m["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["requests"].as_u64().unwrap())
            .sum::<u64>();
        if seen >= 5 && m["totals"]["requests"] == 5 {
            let k = m["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["api_key_id"] == key.key_id.as_str())
                .unwrap()
                .clone();
            assert_eq!(k["requests"], 5);
            break;
        }
    }
    assert!(seen >= 5, "5 requests in the history, saw {seen}");

    // Another site's page may not open the feed.
    let e = Ws::connect(stack.cp.http, Some("http://evil.example"))
        .await
        .err();
    assert_eq!(e, Some(403));
    assert!(
        Ws::connect(stack.cp.http, Some(&format!("http://{}", stack.cp.http)))
            .await
            .is_ok()
    );

    // Shutting the control plane down closes the feed instead of waiting for it.
    let Stack {
        mock: _mock,
        cp,
        dps,
    } = stack;
    for dp in dps {
        dp.stop().await;
    }
    tokio::time::timeout(Duration::from_secs(10), cp.stop())
        .await
        .expect("the control plane stops with a socket open");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while ws.recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the socket is closed at shutdown");
}

#[tokio::test]
async fn rest_names_keys_by_id_and_unblocks() {
    let stack = Stack::start(0).await;
    let cp = &stack.cp;
    let client = http_client();
    let post =
        |path: &str, body: &str| request(http::Method::POST, &cp.http_url(path), Some(TOKEN), body);
    let mut admin = cp.admin(Some(TOKEN)).await;
    let key = admin
        .create_api_key(CreateApiKeyRequest::default())
        .await
        .answer();
    let info = |keys: Vec<ApiKeyInfo>| keys.into_iter().find(|k| k.key_id == key.key_id).unwrap();

    let body = json!({"api_key_id": key.key_id, "tier": "enterprise"}).to_string();
    let r = send(&client, post("/admin/upgrade_tier", &body)).await;
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(r.json()["api_key_id"], key.key_id.as_str());
    assert_eq!(r.json()["tier"], "enterprise");
    let keys = list_api_keys(&mut admin).await;
    assert_eq!(info(keys).tier, "enterprise");

    let body = json!({"api_key_id": key.key_id}).to_string();
    let r = send(&client, post("/admin/block_key", &body)).await;
    assert_eq!((r.status, r.json()["blocked"].clone()), (200, json!(true)));
    let keys = list_api_keys(&mut admin).await;
    assert!(info(keys).blocked);
    let body = json!({"api_key_id": key.key_id, "blocked": false}).to_string();
    let r = send(&client, post("/admin/block_key", &body)).await;
    assert_eq!((r.status, r.json()["blocked"].clone()), (200, json!(false)));
    let keys = list_api_keys(&mut admin).await;
    assert!(!info(keys).blocked);

    // The original shape still works, and unblocks too, on a key the system knows (setting a
    // tier registers a key; blocking one nobody registered is a 404).
    let r = send(
        &client,
        post("/admin/block_key", r#"{"api_key":"raw-key"}"#),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = send(
        &client,
        post(
            "/admin/upgrade_tier",
            r#"{"api_key":"raw-key","tier":"free"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        &client,
        post("/admin/block_key", r#"{"api_key":"raw-key"}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["api_key_id"],
        key_id(&hash_key("raw-key")).as_str()
    );
    let r = send(
        &client,
        post(
            "/admin/block_key",
            r#"{"api_key":"raw-key","blocked":false}"#,
        ),
    )
    .await;
    assert_eq!((r.status, r.json()["blocked"].clone()), (200, json!(false)));

    let version = cp.cp.version();
    for (path, body, status, needle) in [
        (
            "/admin/upgrade_tier",
            json!({"api_key": "raw-key", "api_key_id": key.key_id, "tier": "basic"}),
            400,
            "not both",
        ),
        (
            "/admin/upgrade_tier",
            json!({"tier": "basic"}),
            400,
            "api_key",
        ),
        (
            "/admin/upgrade_tier",
            json!({"api_key_id": "NOT-AN-ID", "tier": "basic"}),
            400,
            "api_key_id",
        ),
        (
            "/admin/upgrade_tier",
            json!({"api_key_id": "0000000000000000", "tier": "basic"}),
            404,
            "0000000000000000",
        ),
        ("/admin/block_key", json!({}), 400, "api_key"),
        (
            "/admin/block_key",
            json!({"api_key_id": key.key_id, "blocked": "no"}),
            400,
            "boolean",
        ),
        (
            "/admin/block_key",
            json!({"api_key": "a", "api_key_id": key.key_id}),
            400,
            "not both",
        ),
    ] {
        let r = send(&client, post(path, &body.to_string())).await;
        assert_eq!(r.status, status, "{path} {body}: {}", r.json());
        let message = r.json()["error"].as_str().unwrap().to_owned();
        assert!(message.contains(needle), "{path} {body}: {message}");
    }
    cp.assert_unchanged(version);
    let r = send(
        &client,
        request(
            http::Method::POST,
            &cp.http_url("/admin/block_key"),
            Some("wrong"),
            &json!({"api_key_id": key.key_id}).to_string(),
        ),
    )
    .await;
    assert_eq!(r.status, 403);
}

/// The property names of a schema in the OpenAPI document.
fn schema_fields(doc: &Value, name: &str) -> std::collections::BTreeSet<String> {
    doc["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has no properties"))
        .keys()
        .cloned()
        .collect()
}

fn fields(v: &Value) -> std::collections::BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn openapi_documents_every_route_and_the_shapes_served() {
    let stack = Stack::start(1).await;
    let cp = &stack.cp;
    let client = http_client();
    let r = get(&client, &cp.http_url("/openapi.json")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let paths = doc["paths"].as_object().unwrap();
    let served: Vec<&str> = REST_PATHS.iter().chain(DASHBOARD_PATHS).copied().collect();
    for p in &served {
        assert!(paths.contains_key(*p), "{p} is not in /openapi.json");
        let status = get(&client, &cp.http_url(p)).await.status;
        assert_ne!(status, 404, "{p} is listed but not served");
    }
    for p in paths.keys() {
        assert!(
            served.contains(&p.as_str()),
            "{p} is documented but not served"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    for (p, method) in [
        ("/change_strategy", "post"),
        ("/admin/users", "get"),
        ("/admin/upgrade_tier", "post"),
        ("/admin/block_key", "post"),
        ("/admin/bans", "get"),
        ("/admin/lift_ban", "post"),
        ("/logs", "get"),
    ] {
        assert_eq!(
            paths[p][method]["security"],
            json!([{"bearerAuth": []}]),
            "{p} needs the token"
        );
    }

    let index = get(&client, &cp.http_url("/")).await.json();
    assert_eq!(index["endpoints"], json!(REST_PATHS));
    assert_eq!(index["dashboards"]["load_balancing"], "/dashboard");

    // The documented shapes are the served ones.
    send_requests(&client, &stack.dps[0].url("/data"), 3, None).await;
    let stats = stats_until(
        &client,
        &cp.http_url("/stats"),
        "the 3 requests reported",
        |s| s["totals"]["requests"] == 3 && s["data_planes_reporting"] == 1,
    )
    .await;
    assert_eq!(fields(&stats), schema_fields(&doc, "Stats"));
    assert_eq!(fields(&stats["totals"]), schema_fields(&doc, "Totals"));
    assert_eq!(fields(&stats["per_second"]), schema_fields(&doc, "Second"));
    assert_eq!(
        fields(&stats["backends"][0]),
        schema_fields(&doc, "Backend")
    );
    assert_eq!(
        fields(&stats["data_planes"][0]),
        schema_fields(&doc, "DataPlane")
    );
    assert_eq!(stats["data_planes"][0]["liveness"], "live");
    let backend = &stats["backends"][0];
    assert_eq!(backend["health"], "healthy");
    assert_eq!(backend["circuit"], "closed");

    let mut admin = cp.admin(Some(TOKEN)).await;
    admin
        .create_api_key(CreateApiKeyRequest::default())
        .await
        .unwrap();
    let users = admin_get(&client, cp, "/admin/users").await.json();
    assert_eq!(fields(&users["users"][0]), schema_fields(&doc, "User"));

    for (p, content_type, needle) in [
        ("/dashboard", "text/html; charset=utf-8", "conn-status"),
        (
            "/dashboard/ratelimit",
            "text/html; charset=utf-8",
            "conn-status",
        ),
        (
            "/dashboard/app.js",
            "text/javascript; charset=utf-8",
            "WebSocket",
        ),
        ("/dashboard/app.css", "text/css; charset=utf-8", ".status"),
    ] {
        let r = get(&client, &cp.http_url(p)).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(r.headers["content-type"], content_type, "{p}");
        assert!(r.headers.contains_key("content-security-policy"), "{p}");
        assert!(
            String::from_utf8_lossy(&r.body).contains(needle),
            "{p} lacks {needle}"
        );
    }
}

/// `GET path` on the control plane's HTTP listener with the admin token.
async fn admin_get(client: &HttpClient, cp: &Cp, path: &str) -> Reply {
    send(
        client,
        request(http::Method::GET, &cp.http_url(path), Some(TOKEN), ""),
    )
    .await
}

/// Sends requests with `key` to `url` until one is refused as banned (a 429 whose
/// `Retry-After` is longer than the rate-limit window); panics after `limit` requests.
async fn until_banned(client: &HttpClient, url: &str, key: &str, limit: usize) {
    for _ in 0..limit {
        let r = send(client, get_with(url, &[("x-api-key", key)])).await;
        if r.status == 429 && r.header("retry-after").parse::<u64>().unwrap_or(0) > 100 {
            return;
        }
    }
    panic!("no ban after {limit} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_are_listed_with_time_left_and_lifted_on_the_page() {
    webdriver::require_installed();
    let stack = Stack::start(1).await;
    let cp = &stack.cp;
    let client = http_client();
    let mut admin = cp.admin(Some(TOKEN)).await;
    let key = admin
        .create_api_key(new_key("free", "banned on purpose"))
        .await
        .answer();
    stack.dps[0].wait_version(cp.cp.version()).await;
    let url = stack.dps[0].url("/data");
    until_banned(&client, &url, &key.api_key, 20).await;
    // A flood of banned requests dwarfs the 5 allowed ones.
    let statuses = send_requests(&client, &url, 150, Some(&key.api_key)).await;
    assert!(statuses.iter().all(|s| *s == 429), "{statuses:?}");
    let who = format!("key:{}", key.key_id);

    // REST: the ban, who enforces it, and the key's status.
    let listed = poll_until("the ban reported", || async {
        let r = admin_get(&client, cp, "/admin/bans").await;
        let bans = r.json()["bans"].clone();
        if bans.as_array().is_some_and(|b| !b.is_empty()) {
            Ok(bans)
        } else {
            Err(bans)
        }
    })
    .await;
    assert_eq!(listed[0]["client"], who.as_str(), "{listed}");
    assert_eq!(listed[0]["api_key_id"], key.key_id.as_str());
    assert_eq!(listed[0]["data_plane"], "dp-1");
    assert!(
        listed[0]["ends_in_ms"].as_u64().unwrap() > 250_000,
        "{listed}"
    );
    let users = admin_get(&client, cp, "/admin/users").await.json();
    let user = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["api_key_id"] == key.key_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(user["status"], "banned", "{user}");
    assert!(user["banned_for_ms"].as_u64().unwrap() > 250_000, "{user}");
    let lift = |body: &str, token| {
        request(
            http::Method::POST,
            &cp.http_url("/admin/lift_ban"),
            token,
            body,
        )
    };
    assert_eq!(
        send(&client, lift(&json!({"client": who}).to_string(), None))
            .await
            .status,
        401
    );
    let bad = send(&client, lift(r#"{"client": "key:nothex"}"#, Some(TOKEN))).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"].as_str().unwrap().starts_with("client:"),
        "{}",
        bad.text()
    );

    // The page: the ban with its time left, the key banned, the chart split.
    let browser = Browser::start().await;
    browser
        .goto(&format!("http://{}/dashboard/ratelimit", cp.http))
        .await;
    browser
        .send_keys(&browser.find("#token-input").await, TOKEN)
        .await;
    browser.click(&browser.find("#token-save").await).await;
    let row = format!("#bans tbody tr[data-ban=\"{who}@dp-1\"]");
    let left = browser
        .wait_text(&format!("{row} td[data-field=left]"), "minutes left", |t| {
            t.starts_with("4 min") || t.starts_with("5 min")
        })
        .await;
    assert!(left.ends_with(" s"), "{left}");
    assert_eq!(
        browser
            .text_of(&format!("{row} td[data-field=data_plane]"))
            .await,
        "dp-1"
    );
    let status = format!(
        "#keys tbody tr[data-key-id=\"{}\"] .block-state",
        key.key_id
    );
    browser
        .wait_text(&status, "banned", |t| t == "banned")
        .await;
    browser
        .wait_for(
            "the chart split, one scale per series",
            "return document.getElementById('rl-chart').dataset.mode === 'split' \
             && document.querySelectorAll('#rl-chart text[data-band]').length === 4",
        )
        .await;
    browser
        .save_screenshot(&artifact("dashboard-bans.png"))
        .await;
    // The operator can ask for the stacked chart anyway.
    browser
        .click(&browser.find("#chart-mode option[value=\"stacked\"]").await)
        .await;
    browser
        .wait_for(
            "the stacked chart",
            "return document.getElementById('rl-chart').dataset.mode === 'stacked'",
        )
        .await;

    // Lift it on the page: gone from the list and from the data plane.
    let before = cp.cp.version();
    browser
        .click(&browser.find(&format!("{row} button.lift-ban")).await)
        .await;
    browser
        .wait_text("#ban-result", "the lift confirmed", |t| {
            t.contains("ban lifted")
        })
        .await;
    assert!(cp.cp.version() > before);
    stack.dps[0].wait_version(cp.cp.version()).await;
    let r = send(&client, get_with(&url, &[("x-api-key", &key.api_key)])).await;
    assert!(
        r.status == 200 || r.header("retry-after").parse::<u64>().unwrap() <= 60,
        "still banned: {} {}",
        r.status,
        r.header("retry-after")
    );
    browser
        .wait_for(
            "the ban gone from the page",
            "return document.querySelectorAll('#bans tbody tr').length === 0",
        )
        .await;
    browser
        .wait_text(&status, "active", |t| t == "active")
        .await;
    let bans = admin.list_bans(ListBansRequest {}).await.answer().bans;
    assert!(bans.is_empty(), "{bans:?}");
    drop(browser);
    for dp in stack.dps {
        dp.stop().await;
    }
    stack.cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_cache_hits_have_cards_and_every_table_fits_900_px() {
    webdriver::require_installed();
    let stack = Stack::start_with(1, |s| {
        s.cache = Some(CachePolicy {
            enabled: true,
            ..lb_proto::defaults::cache()
        });
    })
    .await;
    let cp = &stack.cp;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let steady = admin
        .create_api_key(new_key("enterprise", "steady"))
        .await
        .answer();
    let blocked = admin
        .create_api_key(new_key("free", "blocked"))
        .await
        .answer();
    admin.block_key(by_key(&blocked.api_key)).await.unwrap();
    stack.dps[0].wait_version(cp.cp.version()).await;
    let blocked_id = blocked.key_id.clone();

    // Traffic for as long as the test looks: a forwarded request, a cache hit and a refusal
    // every 100 ms.
    let dp_url = stack.dps[0].url("");
    let traffic = tokio::spawn(async move {
        let client = http_client();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            for (path, key) in [
                ("/data", &steady.api_key),
                ("/cacheable", &steady.api_key),
                ("/data", &blocked.api_key),
            ] {
                let url = format!("{dp_url}{path}");
                send(&client, get_with(&url, &[("x-api-key", key)])).await;
            }
        }
    });

    let browser = Browser::start().await;
    browser.set_window_size(900, 1000).await;
    browser.goto(&format!("http://{}/dashboard", cp.http)).await;
    browser
        .wait_for(
            "every rate card above 0",
            "return ['rps', 'forwarded-rate', 'refused-rate', 'cache-hit-rate'].every(\
             id => Number(document.getElementById(id).textContent) > 0)",
        )
        .await;
    let asked = browser
        .execute("return document.documentElement.clientWidth", vec![])
        .await;
    assert!(asked.as_u64().unwrap() <= 900, "viewport {asked}");
    // Every table fits its panel: nothing to scroll sideways.
    let fits = "return Array.from(document.querySelectorAll('table')).every(t => \
                t.closest('.panel').scrollWidth <= t.closest('.panel').clientWidth) \
                && document.documentElement.scrollWidth <= document.documentElement.clientWidth";
    browser
        .wait_for("the load-balancing tables in 900 px", fits)
        .await;
    browser
        .save_screenshot(&artifact("dashboard-900px.png"))
        .await;

    browser
        .goto(&format!("http://{}/dashboard/ratelimit", cp.http))
        .await;
    browser
        .send_keys(&browser.find("#token-input").await, TOKEN)
        .await;
    browser.click(&browser.find("#token-save").await).await;
    browser
        .wait_for(
            "keys and the request log",
            "return document.querySelectorAll('#keys tbody tr').length === 2 \
             && document.querySelectorAll('#log tbody tr').length > 5",
        )
        .await;
    browser
        .wait_for("the rate-limiting tables in 900 px", fits)
        .await;
    // A blocked key's refusals are its rejections.
    browser
        .wait_text(
            &format!(
                "#keys tbody tr[data-key-id=\"{}\"] td[data-field=rejected]",
                blocked_id
            ),
            "the blocked key's refusals counted",
            |t| count(t) > 0,
        )
        .await;
    browser
        .save_screenshot(&artifact("dashboard-ratelimit-900px.png"))
        .await;
    traffic.abort();

    // The icon browsers ask for.
    let icon = get(&http_client(), &cp.http_url("/favicon.ico")).await;
    assert_eq!(icon.status, 200);
    assert_eq!(icon.header("content-type"), "image/x-icon");
    assert!(icon.body.starts_with(&[0, 0, 1, 0]), "not an ICO");
    drop(browser);
    for dp in stack.dps {
        dp.stop().await;
    }
    stack.cp.stop().await;
}

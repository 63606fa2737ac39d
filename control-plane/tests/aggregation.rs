//! The control plane adds up what every data plane reports, and notices a data plane that stops.

mod common;

use common::*;

fn liveness<'a>(stats: &'a serde_json::Value, id: &str) -> Option<&'a str> {
    stats["data_planes"]
        .as_array()?
        .iter()
        .find(|p| p["id"] == id)?["liveness"]
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_adds_up_and_a_stopped_data_plane_is_no_longer_live() {
    let mut stack = Stack::start(2).await;
    let client = http_client();
    for _ in 0..4 {
        assert_eq!(
            get(&client, &stack.dps[0].url("/api/data")).await.status,
            200
        );
    }
    for _ in 0..6 {
        assert_eq!(
            get(&client, &stack.dps[1].url("/api/data")).await.status,
            200
        );
    }
    let url = stack.cp.http_url("/stats");
    // A backend's count is taken when its exchange ends, the total when the response goes
    // out: a report may fall between the two, and the next one brings them together.
    let stats = stats_until(&client, &url, "both data planes' requests adding up", |s| {
        s["totals"]["requests"] == 10
            && s["data_planes_reporting"] == 2
            && backend_requests(s) == 10
    })
    .await;
    assert_eq!(liveness(&stats, "dp-1"), Some("live"));
    assert_eq!(liveness(&stats, "dp-2"), Some("live"));

    stack.dps.pop().unwrap().stop().await;
    let stats = stats_until(&client, &url, "dp-2 marked as not live", |s| {
        liveness(s, "dp-2").is_some_and(|l| l != "live") && s["data_planes_reporting"] == 1
    })
    .await;
    assert_eq!(liveness(&stats, "dp-1"), Some("live"));
    assert_eq!(stats["totals"]["requests"], 10, "what it reported is kept");
}

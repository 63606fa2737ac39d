//! `control-plane serve` takes its settings in layers: a YAML file sets policies, `LB_…__…`
//! variables change single fields of them, and the tokens come from files named by
//! `LB_ADMIN_TOKEN_FILE` and `LB_CLUSTER_TOKEN_FILE`, as Kubernetes mounts secrets.

mod common;

use std::process::Stdio;

use common::{Running, TempDir, admin_client, free_port, line_with, lines_of, serve_command};
use lb_proto::v1::GetConfigRequest;

const ADMIN_TOKEN: &str = "admin-token-from-a-mounted-secret";

#[tokio::test]
async fn a_yaml_file_and_nested_variables_set_policies_and_secrets_come_from_files() {
    let dir = TempDir::new("cp-settings-layers");
    let config = dir.write(
        "control-plane.yaml",
        "strategy: least_connections\n\
         backends: [\"127.0.0.1:9=2\"]\n\
         health_check:\n  path: /ready\n  interval_ms: 2s\n\
         cache:\n  enabled: false\n  max_entry_bytes: 4096\n\
         tiers:\n  - {name: free, requests: 7, period_ms: 1m}\n",
    );
    // A secret file as Kubernetes writes it: the value and a newline.
    let admin_file = dir.write("admin-token", &format!("{ADMIN_TOKEN}\n"));
    let cluster_file = dir.write("cluster-token", "cluster-token-from-a-file\n");
    let grpc = free_port();
    let mut child = Running(
        std::process::Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args(["serve", "--http-listen", "127.0.0.1:0"])
            .args(["--config", config.to_str().unwrap()])
            .env("LB_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
            .env("LB_ADMIN_TOKEN_FILE", &admin_file)
            .env("LB_CLUSTER_TOKEN_FILE", &cluster_file)
            .env("LB_HEALTH_CHECK__TIMEOUT_MS", "750ms")
            .env("LB_CACHE__ENABLED", "true")
            .env("LB_CACHE__DEFAULT_TTL_MS", "5s")
            .env("LB_STRATEGY", "ip_hash")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = lines_of(child.0.stderr.take().unwrap());
    line_with(&mut lines, "control plane started").await;

    let addr = ([127, 0, 0, 1], grpc).into();
    let wrong = admin_client(addr, Some("not-the-token"))
        .await
        .get_config(GetConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::PermissionDenied);
    let s = admin_client(addr, Some(ADMIN_TOKEN))
        .await
        .get_config(GetConfigRequest {})
        .await
        .expect("the token from LB_ADMIN_TOKEN_FILE is the admin token")
        .into_inner();
    drop(child);

    assert_eq!(s.strategy, "ip_hash", "the variable beats the file");
    assert_eq!(s.backends.len(), 1);
    assert_eq!(s.backends[0].weight, 2);
    let hc = s.health_check.unwrap();
    assert_eq!(hc.path, "/ready", "from the file");
    assert_eq!(hc.interval_ms, 2_000, "from the file, as a duration");
    assert_eq!(hc.timeout_ms, 750, "from LB_HEALTH_CHECK__TIMEOUT_MS");
    let cache = s.cache.unwrap();
    assert!(cache.enabled, "LB_CACHE__ENABLED beats the file");
    assert_eq!(cache.max_entry_bytes, 4096, "the file's other fields stay");
    assert_eq!(cache.default_ttl_ms, 5_000);
    let free = &s.rate_limit.unwrap().tiers[0];
    assert_eq!(free.limit.unwrap().period_ms, 60_000);
}

#[test]
fn a_misspelt_nested_variable_stops_the_start_naming_it() {
    let out = serve_command()
        .args(["--insecure-discovery"])
        .env("LB_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("LB_HEALTH_CHECK__INTERVL_MS", "5s")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("LB_HEALTH_CHECK__INTERVL_MS") && err.contains("unknown field `intervl_ms`"),
        "{err}"
    );
}

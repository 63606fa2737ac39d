//! `data-plane healthcheck`: exit 0 when the data plane named by the same settings is ready
//! (its admin listener's /readyz answers 200), else 1 with the reason, for container health
//! checks in an image without curl.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/common.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use bin::{save_snapshot, spawn_offline};
use common::{free_port, poll_within};

/// `data-plane healthcheck` against the admin listener on `port`: exit code and stderr.
fn healthcheck(port: u16) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_data-plane"))
        .arg("healthcheck")
        .env_clear()
        .env("LB_ADMIN_LISTEN", format!("0.0.0.0:{port}"))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a data plane on `admin` with `state_dir` and asks until `done` holds of the answer
/// (at most 20 s): that answer.
async fn ask_until(
    admin: u16,
    state_dir: &std::path::Path,
    what: &str,
    done: impl Fn(&(Option<i32>, String)) -> bool,
) -> (Option<i32>, String) {
    let _child = spawn_offline(free_port(), admin, state_dir, &[], &[]);
    poll_within(Duration::from_secs(20), what, || async {
        let answer = healthcheck(admin);
        if done(&answer) {
            Ok(answer)
        } else {
            Err(answer)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_says_whether_the_data_plane_is_ready() {
    // Nothing listening.
    let admin = free_port();
    let (code, err) = healthcheck(admin);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{admin}")), "{err}");

    // Listening, without a configuration: not ready (until the listener is up, the connection
    // is refused).
    let dir = std::env::temp_dir().join(format!("lb-healthcheck-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (code, err) = ask_until(admin, &dir, "a 503 from /readyz", |(_, err)| {
        err.contains("503")
    })
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("503"), "{err}");

    // With a saved configuration in force: ready.
    save_snapshot(&dir, "127.0.0.1:9", |_| {});
    let (code, err) = ask_until(admin, &dir, "ready", |(code, _)| *code == Some(0)).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(0), "{err}");
}

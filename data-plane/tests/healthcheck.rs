//! `data-plane healthcheck`: exit 0 when the data plane named by the same settings is ready
//! (its admin listener's /readyz answers 200), else 1 with the reason, for container health
//! checks in an image without curl.

use std::process::{Command, Stdio};
use std::time::Duration;

use prost::Message;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

#[test]
fn healthcheck_says_whether_the_data_plane_is_ready() {
    // Nothing listening.
    let admin = free_port();
    let (code, err) = healthcheck(admin);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{admin}")), "{err}");

    // Listening, without a configuration: not ready.
    let dir = std::env::temp_dir().join(format!("lb-healthcheck-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_data-plane"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control-plane",
            "http://127.0.0.1:1",
        ])
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--state-dir")
        .arg(&dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (code, err) = loop {
        let (code, err) = healthcheck(admin);
        // Until the listener is up, the connection is refused.
        if err.contains("503") || std::time::Instant::now() > deadline {
            break (code, err);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("503"), "{err}");

    // With a saved configuration in force: ready.
    let mut snapshot = lb_proto::defaults::snapshot();
    snapshot.version = 1;
    snapshot.backends = vec![lb_proto::v1::Backend {
        address: "127.0.0.1:9".into(),
        weight: 1,
        ..Default::default()
    }];
    std::fs::write(dir.join("snapshot.pb"), snapshot.encode_to_vec()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_data-plane"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control-plane",
            "http://127.0.0.1:1",
        ])
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--state-dir")
        .arg(&dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let (code, err) = healthcheck(admin);
        if code == Some(0) || std::time::Instant::now() > deadline {
            break (code, err);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(ready.0, Some(0), "{}", ready.1);
}

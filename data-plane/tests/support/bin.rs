//! The data-plane binary run as a process: what it refuses at start, and what it does with a
//! saved configuration and no control plane.

#![allow(dead_code)]

use std::process::Child;

/// Runs the binary on free ports with `args` and `env` added; its exit code and standard error.
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_data-plane"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("LB_CONFIG")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes the default configuration with `backend` as the one backend and no per-IP limit into
/// `dir` as the snapshot a data plane saved, so the binary started with `--state-dir dir` serves
/// it with no control plane reachable; `tweak` changes it first.
pub fn save_snapshot(
    dir: &std::path::Path,
    backend: &str,
    tweak: impl FnOnce(&mut lb_proto::v1::ConfigSnapshot),
) {
    use prost::Message;
    let mut snapshot = lb_proto::defaults::snapshot();
    snapshot.version = 1;
    if let Some(rl) = snapshot.rate_limit.as_mut() {
        rl.ip_limit = Some(lb_proto::v1::Limit {
            requests: 0,
            period_ms: 60_000,
        });
    }
    snapshot.backends = vec![lb_proto::v1::Backend {
        address: backend.to_owned(),
        weight: 1,
        ..Default::default()
    }];
    tweak(&mut snapshot);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("snapshot.pb"), snapshot.encode_to_vec()).unwrap();
}

/// The binary with no control plane reachable, listening on `listen` and (admin) `admin`, its
/// saved snapshot (if any) in `state_dir`, `args` added; nothing inherited from the environment
/// but `env`. Its standard error is piped. The process is killed when the handle is dropped,
/// also when a test fails.
pub fn spawn_offline(
    listen: u16,
    admin: u16,
    state_dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Running {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_data-plane"))
        .args(["--control-plane", "http://127.0.0.1:1"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{listen}"))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    Running(child)
}

/// A running binary, killed when dropped.
pub struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! What `control-plane` prints for a person at a terminal or into a log file: log lines coloured
//! only on a terminal (and never with `NO_COLOR`), errors said once and readably, and a warning
//! for each flag a stored state overrides.

mod common;
#[path = "../../data-plane/tests/support/terminal.rs"]
mod terminal;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{TempDir, free_port, serve_command};
use terminal::{Stderr, assert_caret_under, has_escape, stderr_until};

const STARTED: &str = "control plane started";

/// `serve` on free ports that starts, with `NO_COLOR` as given.
fn serve(no_color: Option<&str>) -> Command {
    let mut c = serve_command();
    c.arg("--insecure-discovery")
        .env("LB_ADMIN_TOKEN", "an-admin-token-long-enough")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    if let Some(v) = no_color {
        c.env("NO_COLOR", v);
    }
    c
}

#[test]
fn logs_piped_to_a_file_carry_no_colour_codes() {
    let out = stderr_until(serve(None), Stderr::Pipe, STARTED);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(STARTED), "{text}");
    assert!(!has_escape(&out), "escape codes in piped logs:\n{text:?}");
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let out = stderr_until(serve(None), Stderr::Terminal, STARTED);
    assert!(has_escape(&out), "{}", String::from_utf8_lossy(&out));
    let out = stderr_until(serve(Some("1")), Stderr::Terminal, STARTED);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(STARTED), "{text}");
    assert!(!has_escape(&out), "escape codes with NO_COLOR=1:\n{text:?}");
}

/// `serve` on free ports with `args`: its exit code and standard error.
fn serve_fails(args: &[&str]) -> (Option<i32>, String) {
    let out = serve(None).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), err)
}

#[test]
fn a_missing_config_file_is_named_with_its_cause_once() {
    let (code, err) = serve_fails(&["--config", "/nonexistent/lb.toml"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/nonexistent/lb.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_toml_error_is_printed_with_a_caret_under_its_place() {
    let dir = TempDir::new("console-toml");
    let path = dir.write(
        "cp.toml",
        "strategy = \"round_robin\"\nbackends = [\"127.0.0.1:1\" 2]\n",
    );
    let (code, err) = serve_fails(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert_caret_under(&err, "backends = [\"127.0.0.1:1\" 2]", "2]");
}

#[test]
fn a_state_file_that_cannot_be_written_is_named_with_its_cause_once() {
    let dir = TempDir::new("console-state");
    // The file is written aside (`state.tmp`) and renamed: a directory there stops the write.
    std::fs::create_dir(dir.join("state.tmp")).unwrap();
    let state = dir.join("state");
    let (code, err) = serve_fails(&["--state-file", state.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.matches(state.to_str().unwrap()).count(), 1, "{err}");
    assert_eq!(err.matches("Is a directory").count(), 1, "{err}");
}

#[test]
fn a_state_file_that_cannot_be_read_is_named_with_its_cause_once() {
    let dir = TempDir::new("console-state-read");
    let state = dir.join("state");
    std::fs::write(&state, b"\xff\xff\xff not a saved state").unwrap();
    let (code, err) = serve_fails(&["--state-file", state.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.matches(state.to_str().unwrap()).count(), 1, "{err}");
    assert!(err.contains("does not decode"), "{err}");
}

/// `control-plane dev` with every listener on a free port, and a cleared environment.
fn dev_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_control-plane"));
    c.arg("dev");
    for flag in [
        "--listen",
        "--admin-listen",
        "--grpc-listen",
        "--http-listen",
    ] {
        c.args([flag, "127.0.0.1:0"]);
    }
    for var in [
        "LB_CONFIG",
        "LB_REDIS_URL",
        "RUST_LOG",
        "LB_BACKENDS",
        "LB_STRATEGY",
    ] {
        c.env_remove(var);
    }
    c.env("LB_ADMIN_TOKEN", "an-admin-token-long-enough")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

/// The lines of `err` that warn that a stored state replaces a setting.
fn overridden(err: &str) -> Vec<&str> {
    err.lines()
        .filter(|l| l.contains("is not used: the stored state has"))
        .collect()
}

#[tokio::test]
async fn each_flag_a_state_in_redis_overrides_is_named_once_with_the_stored_value() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    // The first start stores its state: round robin, the default per-IP limit.
    let mut first = serve(None);
    first.args(["--redis", &url]);
    let first = stderr_until(first, Stderr::Pipe, STARTED);
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(overridden(&first).is_empty(), "{first}");
    let mut again = serve(None);
    again.args([
        "--redis",
        &url,
        "--strategy",
        "ip_hash",
        "--ip-limit",
        "10/60",
    ]);
    let err = String::from_utf8_lossy(&stderr_until(again, Stderr::Pipe, STARTED)).into_owned();
    let warnings = overridden(&err);
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(
        warnings[0].contains("--strategy ip_hash is not used: the stored state has round_robin"),
        "{err}"
    );
    assert!(
        warnings[1].contains("--ip-limit 10/60 is not used: the stored state has 100/60"),
        "{err}"
    );
    assert!(warnings.iter().all(|w| w.contains("WARN")), "{err}");
}

#[test]
fn dev_names_a_flag_its_state_file_overrides_and_not_one_it_agrees_with() {
    let dir = TempDir::new("console-dev-state");
    let state = dir.join("state");
    let state_flag = [
        "--backends",
        "127.0.0.1:9",
        "--state-file",
        state.to_str().unwrap(),
    ];
    let dev = |extra: &[&str]| {
        let mut c = dev_command();
        c.args(state_flag).args(extra);
        let out = stderr_until(c, Stderr::Pipe, STARTED);
        String::from_utf8_lossy(&out).into_owned()
    };
    let first = dev(&[]);
    assert!(
        first.contains(STARTED) && overridden(&first).is_empty(),
        "{first}"
    );
    let err = dev(&["--strategy", "least_connections"]);
    let warnings = overridden(&err);
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0]
            .contains("--strategy least_connections is not used: the stored state has round_robin"),
        "{err}"
    );
}

/// Lines of `reader` as they come, on a channel that closes when it ends.
fn lines_of(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines from `lines` until one contains `needle` (that one included); panics after 60 s.
fn until(lines: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(e) => panic!("no {needle:?} ({e}); seen:\n{}", seen.join("\n")),
        }
    }
}

/// A child process killed if the test ends (or fails) before it is taken out.
struct Stopped(Option<std::process::Child>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn dev_stops_at_once_on_its_signal_and_each_part_logs_under_its_name() {
    let ports: Vec<String> = (0..3).map(|_| free_port().to_string()).collect();
    let child = dev_command()
        .args(["--ports", &ports.join(","), "--data-planes", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Stopped(Some(child));
    let lines = lines_of(child.0.as_mut().unwrap().stderr.take().unwrap());
    let mut seen = until(&lines, STARTED);
    for node in ["dev-1", "dev-2"] {
        let applied = format!("configuration applied node_id={node}");
        if !seen.iter().any(|l| l.contains(&applied)) {
            seen.extend(until(&lines, &applied));
        }
    }
    let mut child = child.0.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let signalled = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let (tx, exited) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let Ok(status) = exited.recv_timeout(Duration::from_secs(30)) else {
        // Leave nothing running.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("dev still running 30 s after SIGINT");
    };
    let status = status.unwrap();
    let took = signalled.elapsed();
    seen.extend(lines.iter());
    let log = seen.join("\n");
    assert!(status.success(), "{status}:\n{log}");
    // A stop takes milliseconds; a second is far above this machine's noise, and below any wait
    // on a timer of a second or more.
    assert!(
        took < Duration::from_secs(1),
        "dev took {took:?} to stop:\n{log}"
    );
    let received = seen.iter().find(|l| l.contains("shutdown signal received"));
    let received = received.unwrap_or_else(|| panic!("no shutdown line:\n{log}"));
    assert!(received.contains(" control_plane: "), "{received}");
    assert!(
        seen.iter().any(|l| l.contains("control plane stopped")),
        "{log}"
    );
}

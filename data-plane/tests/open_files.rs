//! The open-file limit against `max_connections`: a data plane whose hard limit cannot hold its
//! connections says so at start, naming the setting and the fix, instead of failing accepts with
//! `EMFILE` later; under a hard limit with room, its soft limit is raised to what it needs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The data plane under `prlimit --nofile=SOFT:HARD`, with `--max-connections MAX`.
fn start(soft: u64, hard: u64, max: usize) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg(env!("CARGO_BIN_EXE_data-plane"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--control-plane", "http://127.0.0.1:1", "--max-connections"])
        .arg(max.to_string())
        .env_remove("LB_CONFIG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs the data plane");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// The first line that contains `text`, within a generous bound.
fn line_with(rx: &mpsc::Receiver<String>, text: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(text) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// The soft and hard open-file limits of process `pid` ("self" for this one).
fn limits(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut n = line.split_whitespace().skip(3).map(|v| v.parse().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

#[test]
fn a_limit_too_low_for_max_connections_is_named_at_start() {
    let (mut child, rx) = start(512, 1024, 10_000);
    let warning = line_with(&rx, "open-file limit").expect("a warning about the open-file limit");
    assert!(
        warning.contains("max_connections") && warning.contains("ulimit -Hn"),
        "{warning}"
    );
    // Raised as far as the hard limit allows.
    assert_eq!(limits(&child.id().to_string()).0, 1024);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_soft_limit_is_raised_to_what_max_connections_needs() {
    // Within this process's own hard limit: only a privileged process may raise that.
    let hard = limits("self").1;
    assert!(
        hard >= 2_256,
        "this test needs a hard limit of 2256 or more, not {hard}"
    );
    let (mut child, rx) = start(512, hard, 1_000);
    // The limit is set before the data plane says it started.
    line_with(&rx, "data plane started").expect("the data plane starts");
    assert_eq!(limits(&child.id().to_string()).0, 2_256);
    let _ = child.kill();
    let _ = child.wait();
}

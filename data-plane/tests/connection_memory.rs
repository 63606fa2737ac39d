//! Memory stays bounded over connections that come and go: the data-plane binary takes 10 rounds
//! of 2,000 client connections, each sending one request through to a backend before all close,
//! and the peak of its resident memory (`VmHWM`) after the last round is no higher than after
//! the first three, give or take the allocator's slack: memory a round frees serves the next. A
//! per-connection leak of 1 KB would add 20 MB over the rounds.
//!
//! The peak, not the current level: the data plane hands freed memory back every 5 s
//! (`server::memory`), so the level after a round depends on when that last happened; the peak
//! does not.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/common.rs"]
mod common;

use std::time::Duration;

use bin::{save_snapshot, spawn_offline};
use common::{free_port, poll_within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 2_000;
const ROUNDS: usize = 10;
/// Allowed growth of the peak from round 3 to the last (allocator pages and caches that settle
/// at their own pace).
const SLACK_KB: u64 = 12 * 1024;

/// The highest resident memory of the process so far.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The value of an unlabelled gauge in the admin listener's /metrics, when it answers.
async fn gauge(admin: u16, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (at most 20 s) until the gauge `name` reads `value`.
async fn gauge_at(admin: u16, name: &str, value: f64, what: &str) {
    poll_within(Duration::from_secs(20), what, || async {
        match gauge(admin, name).await {
            Some(v) if v == value => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

/// Opens `n` connections at once, sends a request on each, reads each whole answer (the
/// request asks to close), and checks every one is a 200.
async fn round(listen: u16, n: usize) {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(TcpStream::connect(("127.0.0.1", listen)).await.unwrap());
    }
    let mut answers = tokio::task::JoinSet::new();
    for mut c in conns {
        answers.spawn(async move {
            c.write_all(b"GET /data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            c.read_to_end(&mut answer).await.unwrap();
            String::from_utf8_lossy(&answer[..answer.len().min(400)]).into_owned()
        });
    }
    let answers = answers.join_all().await;
    let refused: Vec<&String> = answers
        .iter()
        .filter(|a| !a.starts_with("HTTP/1.1 200"))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {n} not answered 200, as {:?}",
        refused.len(),
        refused.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_over_rounds_of_2000_connections() {
    // Room for this side's sockets.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= 2 * CONNECTIONS as u64 + 256,
        "hard open-file limit {hard}"
    );

    let backend = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("lb-connection-memory-{}", std::process::id()));
    // At most 64 requests at once to the one backend (a test-process server); the rest wait in
    // the queue, and the connections to it are reused.
    save_snapshot(&dir, &backend.addrs()[0].to_string(), |s| {
        s.queue = Some(lb_proto::v1::QueuePolicy {
            max_in_flight_per_backend: 64,
            capacity: 4_096,
            timeout_ms: 30_000,
        });
    });
    let (listen, admin) = (free_port(), free_port());
    let child = spawn_offline(listen, admin, &dir, &[], &[]);
    let pid = child.id();

    gauge_at(admin, "lb_config_version", 1.0, "the data plane started").await;
    let mut rss = Vec::new();
    for _ in 0..ROUNDS {
        round(listen, CONNECTIONS).await;
        // Every connection closed on the data plane's side too.
        gauge_at(
            admin,
            "lb_client_connections",
            0.0,
            "every connection closed",
        )
        .await;
        rss.push(peak_rss_kb(pid));
    }
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("peak resident KB after each round: {rss:?}");
    let (first, last) = (rss[2], rss[ROUNDS - 1]);
    assert!(
        last <= first + SLACK_KB,
        "peak of {last} KB after round {ROUNDS}, {first} KB after round 3: {rss:?}"
    );
}

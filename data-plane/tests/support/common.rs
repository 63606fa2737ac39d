//! What every test here needs whatever it runs: loopback listeners and free ports, waits for a
//! condition that end with a message at a deadline, scratch directories removed at the end, and
//! an HTTP client with its whole-response reader. Shared by the data plane's and the control
//! plane's tests (each support file that needs it includes it, so any of them can be used on
//! its own).

#![allow(dead_code)]

use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// How long a test waits for a condition before it fails, unless it says otherwise.
pub const WAIT: Duration = Duration::from_secs(10);

/// How often a wait looks again.
const EVERY: Duration = Duration::from_millis(5);

/// A listener on a free loopback port.
pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A loopback port nothing listens on (at the time of asking), for programs that must be told
/// their port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `cond` to hold, looking every few milliseconds, for at most [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    poll_until(what, || {
        std::future::ready(if cond() { Ok(()) } else { Err(()) })
    })
    .await;
}

/// Runs `probe` until it gives `Ok`, for at most [`WAIT`]: its value. Past the deadline the
/// test fails naming `what` and showing the last `Err`.
pub async fn poll_until<T, E: Debug, F: Future<Output = Result<T, E>>>(
    what: &str,
    probe: impl FnMut() -> F,
) -> T {
    poll_within(WAIT, what, probe).await
}

/// As [`poll_until`], for at most `within`.
pub async fn poll_within<T, E: Debug, F: Future<Output = Result<T, E>>>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}; last seen: {last:?}"
        );
        tokio::time::sleep(EVERY).await;
    }
}

/// A scratch directory of its own (tests run in parallel), removed when dropped unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "lb-test-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path, keep: false }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a file whole or not at all (written aside, then renamed), as a deployment
    /// replaces certificates; its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// Leaves the directory in place when dropped (for a failed test's logs).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client keeping its connections for reuse, as most clients do.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A response read whole.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub async fn read(resp: http::Response<hyper::body::Incoming>) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Checks the reply is a refusal with this status whose JSON `error` mentions `needle`.
    pub fn assert_error(&self, status: u16, needle: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        let error = self.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.contains(needle),
            "{needle:?} not in the error: {}",
            self.text()
        );
    }

    /// A header field's value as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or("<not text>"))
    }
}

pub async fn send(client: &HttpClient, req: http::Request<Full<Bytes>>) -> Reply {
    Reply::read(client.request(req).await.unwrap()).await
}

pub async fn get(client: &HttpClient, url: &str) -> Reply {
    send(
        client,
        http::Request::get(url).body(Full::default()).unwrap(),
    )
    .await
}

/// A GET of `url` with these header fields.
pub fn get_with(url: &str, headers: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::get(url);
    for (name, value) in headers {
        b = b.header(*name, *value);
    }
    b.body(Full::default()).unwrap()
}

/// `n` GETs of `urls` (in turn) sent at once, with these header fields: the replies, in order.
pub async fn burst(urls: &[String], n: usize, headers: &[(&str, &str)]) -> Vec<Reply> {
    let client = http_client();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, req) = (client.clone(), get_with(&urls[i % urls.len()], headers));
            tokio::spawn(async move { send(&client, req).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// How many replies are a 200.
pub fn admitted(replies: &[Reply]) -> usize {
    replies.iter().filter(|r| r.status == 200).count()
}

/// The lines a child process writes to `out` (its piped stderr, say), as they come, read on a
/// thread of their own; the channel ends when the stream does.
pub fn lines_of(
    out: impl std::io::Read + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use std::io::BufRead;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The first of `lines` that contains `needle`, within 20 s; panics naming it otherwise.
pub async fn line_with(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.recv().await {
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        Ok(None) => panic!("the output ended before a line with {needle:?}"),
        Err(_) => panic!("no line with {needle:?} within 20 s"),
    }
}

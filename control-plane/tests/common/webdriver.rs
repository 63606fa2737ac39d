//! A minimal W3C WebDriver client driving headless Chromium through chromedriver, for the
//! dashboard tests. It speaks the protocol's JSON over HTTP with the tests' hyper client.
//!
//! [`Browser`] owns everything it starts: a chromedriver on a free port and, through it, one
//! Chromium with a fresh profile directory. Dropping it (also when a test panics) ends the
//! session, kills chromedriver and any process still running with that profile directory, and
//! removes the directory.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{HttpClient, TempDir, free_port, http_client, poll_within, request};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The key under which W3C WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long waits for page state last before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// An error answer from the driver: its `error` code and message.
#[derive(Debug, Clone)]
pub struct WdError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

pub struct Browser {
    client: HttpClient,
    port: u16,
    driver: Child,
    /// Holds the chromedriver log and the profile.
    dir: TempDir,
    profile: PathBuf,
    session: Option<String>,
}

/// Fails the test, saying how to get the browser, when it is not installed.
pub fn require_installed() {
    for (path, what) in [(CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: the dashboard tests drive a real browser; install the Debian \
             packages chromium and chromium-driver (`apt-get install chromium chromium-driver`; \
             .ci/run does it) ({what} provides {path})"
        );
    }
}

impl Browser {
    /// Starts chromedriver, waits until it answers `/status` as ready, and opens a session with
    /// headless Chromium.
    pub async fn start() -> Browser {
        require_installed();
        let port = free_port();
        let dir = TempDir::new("dashboard");
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).unwrap();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let mut browser = Browser {
            client: http_client(),
            port,
            driver,
            dir,
            profile,
            session: None,
        };
        browser.wait_ready().await;
        let caps = json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-quic",
                        "--no-first-run",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        "--disable-dev-shm-usage",
                        "--window-size=1400,1100",
                        format!("--user-data-dir={}", browser.profile.display()),
                    ],
                },
            }},
        });
        let answer = browser
            .call(http::Method::POST, "/session", Some(caps))
            .await
            .unwrap_or_else(|e| panic!("cannot open a browser session: {e}"));
        let id = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {answer}"))
            .to_owned();
        browser.session = Some(id);
        browser
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.driver.try_wait() {
                panic!(
                    "chromedriver exited with {status}; its log: {}",
                    self.dir.join("chromedriver.log").display()
                );
            }
            if let Ok(v) = self.call(http::Method::GET, "/status", None).await
                && v["ready"] == true
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not become ready on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One WebDriver command: its `value`, or the driver's error.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WdError> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = request(method, &url, None, &body);
        let reply = tokio::time::timeout(Duration::from_secs(60), async {
            self.client.request(req).await
        })
        .await
        .map_err(|_| WdError {
            error: "timeout".into(),
            message: format!("{path}: no answer in 60 s"),
        })?
        .map_err(|e| WdError {
            error: "transport".into(),
            message: format!("{path}: {e}"),
        })?;
        let status = reply.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(reply.into_body())
            .await
            .map_err(|e| WdError {
                error: "transport".into(),
                message: e.to_string(),
            })?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| WdError {
            error: "bad answer".into(),
            message: format!("{path}: {e}: {}", String::from_utf8_lossy(&bytes)),
        })?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if status >= 400 || value.get("error").is_some_and(Value::is_string) {
            return Err(WdError {
                error: value["error"].as_str().unwrap_or("unknown").to_owned(),
                message: value["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(value)
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session.as_deref().unwrap_or(""))
    }

    async fn cmd(&self, method: http::Method, rest: &str, body: Option<Value>) -> Value {
        let path = self.session_path(rest);
        self.call(method, &path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {rest}: {e}"))
    }

    /// Resizes the browser window (the viewport is a little smaller than the window).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.cmd(
            http::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(http::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The first element matching a CSS selector.
    pub async fn try_find(&self, css: &str) -> Result<String, WdError> {
        let path = self.session_path("/element");
        let v = self
            .call(
                http::Method::POST,
                &path,
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        v[ELEMENT].as_str().map(str::to_owned).ok_or(WdError {
            error: "bad answer".into(),
            message: format!("no element reference in {v}"),
        })
    }

    /// The first element matching `css`, waiting for it to appear.
    pub async fn find(&self, css: &str) -> String {
        poll_within(WAIT, &format!("an element matching {css}"), || async {
            match self.try_find(css).await {
                Err(e) if e.error != "no such element" => panic!("finding {css}: {e}"),
                found => found,
            }
        })
        .await
    }

    pub async fn click(&self, element: &str) {
        self.cmd(
            http::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    pub async fn clear(&self, element: &str) {
        self.cmd(
            http::Method::POST,
            &format!("/element/{element}/clear"),
            Some(json!({})),
        )
        .await;
    }

    pub async fn send_keys(&self, element: &str, text: &str) {
        self.cmd(
            http::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The rendered text of an element.
    pub async fn text(&self, element: &str) -> String {
        let v = self
            .cmd(http::Method::GET, &format!("/element/{element}/text"), None)
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The text of the first element matching `css` (waiting for it).
    pub async fn text_of(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.text(&e).await
    }

    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.cmd(
            http::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Runs `script` until it returns something other than null, false or "" (at most
    /// [`WAIT`]), and returns that.
    pub async fn wait_for(&self, what: &str, script: &str) -> Value {
        poll_within(WAIT, what, || async {
            let v = self.execute(script, vec![]).await;
            if v.is_null() || v == false || v == "" {
                Err(v)
            } else {
                Ok(v)
            }
        })
        .await
    }

    /// Waits until the text of the first element matching `css` satisfies `pred`.
    pub async fn wait_text(&self, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        poll_within(WAIT, &format!("{css} to be {what}"), || async {
            let text = match self.try_find(css).await {
                Ok(e) => self.text(&e).await,
                Err(_) => String::new(),
            };
            if pred(&text) { Ok(text) } else { Err(text) }
        })
        .await
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(http::Method::GET, "/screenshot", None).await;
        base64_decode(v.as_str().unwrap_or_default())
    }

    /// Writes a screenshot to `path`, creating its directory.
    pub async fn save_screenshot(&self, path: &Path) {
        let png = self.screenshot().await;
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "screenshot is not a PNG"
        );
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    /// Ends the session (chromedriver closes its Chromium) with a plain blocking request, so it
    /// also works from `drop`.
    fn end_session(&mut self) {
        let Some(id) = self.session.take() else {
            return;
        };
        let Ok(mut s) = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(2),
        ) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = write!(
            s,
            "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            self.port
        );
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }

    /// Kills any process still running with this browser's profile directory on its command
    /// line: a Chromium that outlived chromedriver.
    fn kill_leftovers(&self) {
        let marker = self.profile.to_string_lossy().into_owned();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let name = p.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.end_session();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        self.kill_leftovers();
        if std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.profile);
            self.dir.keep();
            eprintln!(
                "chromedriver log kept: {}",
                self.dir.join("chromedriver.log").display()
            );
        }
    }
}

/// Standard base64 (with or without padding) to bytes.
pub fn base64_decode(s: &str) -> Vec<u8> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(value) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Where test artifacts go: `<target dir>/test-artifacts/<name>`, the target directory being
/// `CARGO_TARGET_DIR` when set, else the workspace's `target`.
pub fn artifact(name: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
        Some(t) => workspace.join(t),
        None => workspace.join("target"),
    };
    target.join("test-artifacts").join(name)
}

#[test]
fn base64_round_trips_known_values() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGVsbG8h"), b"hello!");
    assert_eq!(base64_decode(""), b"");
}

//! HTTP backends in the test's process, for what the data plane does with backends that fail:
//! each answers with its name, counts the requests it serves by path, and takes faults at run
//! time (refusing connections, answering an error status, answering late). A request for
//! `/hold…` waits at the backend until the test releases it, so a test can fill a backend's
//! capacity and free it when it chooses.
//!
//! Paths: `/health` answers 200; `/abort` closes the connection without an answer;
//! `/slow?ms=N` answers after N ms of simulated work; `/cacheable` answers with the
//! `Cache-Control` asked for (`max_age=S`, or the whole value in `cc`) and `Vary` (`vary=NAME`),
//! a JSON body naming the backend and the varied value; anything else answers the status the
//! backend's `status` function gives the path, with the name as the body and `no-store`.
//! Request bodies are read whole before the answer; one that breaks closes the connection.
//! Faults apply to every path, `/health` included; `/health` is not counted.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Faults of one backend, all off by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Nothing listens on the backend's address, and its open connections are cut; the address
    /// is bound again when this goes back to `false`.
    pub refuse_connections: bool,
    /// Every path answers this status (0: off).
    pub error_status: u16,
    /// Every answer comes this much later.
    pub latency: Duration,
}

/// A request held at a backend until the test releases it (or drops this).
pub struct Held {
    /// Path and query of the request.
    pub target: String,
    /// The backend holding it.
    pub backend: String,
    release: oneshot::Sender<()>,
}

impl Held {
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

struct State {
    name: String,
    addr: SocketAddr,
    /// The status of an answer, by path (`/health` and `/cacheable` excepted).
    status: fn(&str) -> u16,
    /// Simulated work before each answer.
    service: Duration,
    faults: Mutex<Faults>,
    served: Mutex<BTreeMap<String, u64>>,
    cacheable_served: AtomicU64,
    /// Where held requests are reported.
    held: mpsc::UnboundedSender<Held>,
    /// Once true, held requests (and later ones) go on without waiting.
    release_all: watch::Sender<bool>,
    /// The listener; `None` while refusing connections.
    listener: Mutex<Option<TcpListener>>,
    /// Wakes the accept loop when the listener changes.
    listener_changed: Notify,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A listener on `addr` that can be bound again while connections it accepted linger.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// 200 for every path.
pub fn ok(_path: &str) -> u16 {
    200
}

/// One backend. Dropping it stops it.
pub struct Backend {
    state: Arc<State>,
    /// Held requests, for a backend started on its own.
    held: Option<mpsc::UnboundedReceiver<Held>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// A backend named `name` answering every path 200.
    pub async fn start(name: &str) -> Backend {
        Backend::with(name, ok, Duration::ZERO).await
    }

    /// A backend named `name` answering each path with the status `status` gives it, after
    /// `service` of simulated work.
    pub async fn with(name: &str, status: fn(&str) -> u16, service: Duration) -> Backend {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut b = Backend::spawn(name, status, service, tx).await;
        b.held = Some(rx);
        b
    }

    async fn spawn(
        name: &str,
        status: fn(&str) -> u16,
        service: Duration,
        held: mpsc::UnboundedSender<Held>,
    ) -> Backend {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            name: name.to_owned(),
            addr,
            status,
            service,
            faults: Mutex::default(),
            served: Mutex::default(),
            cacheable_served: AtomicU64::new(0),
            held,
            release_all: watch::channel(false).0,
            listener: Mutex::new(Some(listener)),
            listener_changed: Notify::new(),
            cut: watch::channel(0).0,
        });
        let accept = tokio::spawn(accept_loop(Arc::clone(&state)));
        Backend {
            state,
            held: None,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Replaces the backend's faults. Refusing takes effect before this returns: nothing
    /// listens on the address any more. Going back binds the address again before it returns.
    pub fn set_faults(&self, faults: Faults) {
        let mut current = lock(&self.state.faults);
        let mut listener = lock(&self.state.listener);
        if faults.refuse_connections && listener.is_some() {
            *listener = None;
            self.state.cut.send_modify(|n| *n += 1);
        } else if !faults.refuse_connections && listener.is_none() {
            *listener = Some(bind(self.state.addr).expect("the backend's address again"));
        }
        *current = faults;
        self.state.listener_changed.notify_one();
    }

    /// Requests served for `path` (without query).
    pub fn served(&self, path: &str) -> u64 {
        lock(&self.state.served).get(path).copied().unwrap_or(0)
    }

    /// Requests served, `/health` excepted.
    pub fn requests(&self) -> u64 {
        lock(&self.state.served).values().sum()
    }

    pub fn reset_stats(&self) {
        lock(&self.state.served).clear();
    }

    /// The next request held at this backend (started on its own), within 10 s.
    pub async fn next_held(&mut self) -> Held {
        let rx = self.held.as_mut().expect("a backend started on its own");
        next_held(rx).await
    }

    /// Lets every held request, and every later one, be answered.
    pub fn release_all(&self) {
        self.state.release_all.send_replace(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
        lock(&self.state.listener).take();
        self.state.cut.send_modify(|n| *n += 1);
    }
}

async fn next_held(rx: &mut mpsc::UnboundedReceiver<Held>) -> Held {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a request held at a backend within 10 s")
        .expect("backends running")
}

/// Several backends, named `backend-0`, `backend-1`…, reporting held requests in one queue.
pub struct Backends {
    list: Vec<Backend>,
    held: mpsc::UnboundedReceiver<Held>,
}

impl Backends {
    pub async fn start(n: usize) -> Backends {
        Backends::with(n, ok, Duration::ZERO).await
    }

    pub async fn with(n: usize, status: fn(&str) -> u16, service: Duration) -> Backends {
        let (tx, held) = mpsc::unbounded_channel();
        let mut list = Vec::new();
        for i in 0..n {
            list.push(Backend::spawn(&format!("backend-{i}"), status, service, tx.clone()).await);
        }
        Backends { list, held }
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.list.iter().map(Backend::addr).collect()
    }

    pub fn all(&self) -> &[Backend] {
        &self.list
    }

    /// Requests all the backends served for `path`.
    pub fn served(&self, path: &str) -> u64 {
        self.list.iter().map(|b| b.served(path)).sum()
    }

    /// The share of the requests for `path` each backend served, since its stats were reset.
    pub fn shares(&self, path: &str) -> Vec<f64> {
        let counts: Vec<u64> = self.list.iter().map(|b| b.served(path)).collect();
        let total = counts.iter().sum::<u64>().max(1);
        counts.iter().map(|&c| c as f64 / total as f64).collect()
    }

    pub fn reset_stats(&self) {
        self.list.iter().for_each(Backend::reset_stats);
    }

    /// Sets the faults of every backend.
    pub fn set_faults(&self, faults: &Faults) {
        self.list.iter().for_each(|b| b.set_faults(faults.clone()));
    }

    /// The next request held at any of the backends, within 10 s.
    pub async fn next_held(&mut self) -> Held {
        next_held(&mut self.held).await
    }
}

impl std::ops::Index<usize> for Backends {
    type Output = Backend;

    fn index(&self, i: usize) -> &Backend {
        &self.list[i]
    }
}

async fn accept_loop(state: Arc<State>) {
    loop {
        let changed = state.listener_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // Polled under the lock, so a refusal drops the listener between two accepts.
        let accepted = poll_fn(|cx| match lock(&state.listener).as_ref() {
            Some(l) => l.poll_accept(cx).map(Some),
            None => std::task::Poll::Ready(None),
        });
        let accepted = tokio::select! {
            a = accepted => a,
            () = &mut changed => continue,
        };
        match accepted {
            Some(Ok((tcp, _))) => {
                tokio::spawn(serve(Arc::clone(&state), tcp));
            }
            Some(Err(_)) => tokio::task::yield_now().await,
            None => changed.await,
        }
    }
}

async fn serve(state: Arc<State>, tcp: TcpStream) {
    let mut cut = state.cut.subscribe();
    let svc = {
        let state = Arc::clone(&state);
        service_fn(move |req| answer(Arc::clone(&state), req))
    };
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
    tokio::select! {
        _ = conn => {}
        _ = cut.changed() => {}
    }
}

type Answer = Response<Full<Bytes>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn answer(state: Arc<State>, req: Request<Incoming>) -> Result<Answer, BoxError> {
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let (parts, body) = req.into_parts();
    // A body that breaks closes the connection, as a server that cannot read the request does.
    body.collect().await?;
    if path != "/health" {
        *lock(&state.served).entry(path.clone()).or_default() += 1;
    }
    let faults = lock(&state.faults).clone();
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if faults.error_status != 0 {
        return Ok(text(&state.name, faults.error_status));
    }
    if path.starts_with("/hold") {
        hold(&state, target).await;
    }
    if !state.service.is_zero() {
        tokio::time::sleep(state.service).await;
    }
    Ok(match path.as_str() {
        "/health" => text(&state.name, 200),
        "/slow" => {
            let ms = param(&query, "ms").map_or(0, |v| v.parse().unwrap());
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(&state.name, 200)
        }
        "/cacheable" => cacheable(&state, &parts.headers, &query),
        // A service that fails has hyper close the connection with nothing sent.
        "/abort" => return Err("aborted, as asked".into()),
        _ => text(&state.name, (state.status)(&path)),
    })
}

/// Reports the request as held and waits until the test releases it.
async fn hold(state: &State, target: String) {
    let mut all = state.release_all.subscribe();
    if *all.borrow() {
        return;
    }
    let (release, released) = oneshot::channel();
    let held = Held {
        target,
        backend: state.name.clone(),
        release,
    };
    if state.held.send(held).is_err() {
        return;
    }
    tokio::select! {
        _ = released => {}
        _ = all.wait_for(|r| *r) => {}
    }
}

fn text(name: &str, status: u16) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::from(name.to_owned())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    let h = resp.headers_mut();
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert("x-backend", HeaderValue::from_str(name).unwrap());
    resp
}

fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// `%20` and `%2C` back to what they stand for, the rest as it is.
fn unescape(v: &str) -> String {
    v.replace("%20", " ").replace("%2C", ",")
}

fn cacheable(state: &State, headers: &http::HeaderMap, query: &str) -> Answer {
    let served = state.cacheable_served.fetch_add(1, Ordering::Relaxed) + 1;
    let max_age = param(query, "max_age").unwrap_or("30");
    let cc = param(query, "cc").map_or_else(|| format!("public, max-age={max_age}"), unescape);
    let vary = param(query, "vary");
    let vary_value = vary
        .and_then(|v| headers.get(v))
        .map(|v| v.to_str().unwrap().to_owned());
    let body = serde_json::json!({
        "backend": state.name,
        "served": served,
        "vary_value": vary_value,
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("cache-control", HeaderValue::from_str(&cc).unwrap());
    h.insert("x-backend", HeaderValue::from_str(&state.name).unwrap());
    if let Some(v) = vary {
        h.insert("vary", HeaderValue::from_str(v).unwrap());
    }
    resp
}

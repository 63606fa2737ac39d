//! A backend whose answers a test scripts per path, and which records every request it gets
//! (method, target, fields): what reached the backend, for tests of what a cache in front of
//! it forwards. Paths with no script answer 404 `no-store`. A path can be held: its requests
//! wait at the backend until the test releases them.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A request as the backend got it.
#[derive(Debug, Clone)]
pub struct Got {
    pub method: Method,
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

type Script = Arc<dyn Fn(&Got, usize) -> Response<Full<Bytes>> + Send + Sync>;

#[derive(Default)]
struct Inner {
    scripts: Mutex<HashMap<String, Script>>,
    got: Mutex<Vec<Got>>,
    held: Mutex<Vec<String>>,
}

pub struct Origin {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    release: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A response of `status` with `fields` and `body`.
pub fn reply(status: u16, fields: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in fields {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

impl Origin {
    pub async fn start() -> Origin {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let inner = Arc::new(Inner::default());
        let (release, _) = watch::channel(0u64);
        let (i, rel) = (Arc::clone(&inner), release.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (i, rel) = (Arc::clone(&i), rel.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (i, mut rx) = (Arc::clone(&i), rel.subscribe());
                    async move {
                        let (parts, body) = req.into_parts();
                        let _ = body.collect().await;
                        let path = parts.uri.path().to_owned();
                        let got = Got {
                            method: parts.method,
                            target: parts
                                .uri
                                .path_and_query()
                                .map_or_else(|| path.clone(), |p| p.to_string()),
                            headers: parts.headers,
                        };
                        let held = lock(&i.held).contains(&path);
                        let script = lock(&i.scripts).get(&path).cloned();
                        let n = {
                            let mut all = lock(&i.got);
                            let n = all
                                .iter()
                                .filter(|g| g.target.split('?').next() == Some(&path))
                                .count();
                            all.push(got.clone());
                            n
                        };
                        if held {
                            let _ = rx.wait_for(|v| *v > 0).await;
                        }
                        let resp = match script {
                            Some(s) => s(&got, n),
                            None => reply(404, &[("cache-control", "no-store")], "none"),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        let origin = Origin {
            addr,
            inner,
            release,
        };
        // Health checks.
        origin.route("/health", |_, _| {
            reply(200, &[("cache-control", "no-store")], "ok")
        });
        origin
    }

    /// Answers requests for `path` with `script(request, how many came before it)`.
    pub fn route(
        &self,
        path: &str,
        script: impl Fn(&Got, usize) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) {
        lock(&self.inner.scripts).insert(path.to_owned(), Arc::new(script));
    }

    /// Requests for `path` wait at the backend until [`Origin::release`].
    pub fn hold(&self, path: &str) {
        lock(&self.inner.held).push(path.to_owned());
    }

    /// Lets held requests, and later ones, go on.
    pub fn release(&self) {
        self.release.send_modify(|v| *v += 1);
    }

    /// The requests for `path` so far, in order.
    pub fn got(&self, path: &str) -> Vec<Got> {
        lock(&self.inner.got)
            .iter()
            .filter(|g| g.target.split('?').next() == Some(path))
            .cloned()
            .collect()
    }

    pub fn count(&self, path: &str) -> usize {
        self.got(path).len()
    }
}

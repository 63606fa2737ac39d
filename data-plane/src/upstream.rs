//! Connections to backends: a pooled HTTP/1.1 client per worker thread, so a request, its pooled
//! connection and that connection's task all stay on one thread. The connect timeout is read at
//! each connect from a value the current snapshot sets, so a timeout change needs no new pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::proxy::UpstreamBody;

pub type HttpClient = Client<TimeoutConnector, UpstreamBody>;

/// Idle pooled connections are closed after this long; below the usual 60-75 s keep-alive
/// timeout of backend servers, so the pool rarely hands out a connection the backend is closing.
const POOL_IDLE: Duration = Duration::from_secs(50);

/// An [`HttpConnector`] whose connect timeout follows the configuration in force.
#[derive(Clone)]
pub struct TimeoutConnector {
    inner: HttpConnector,
    timeout_ms: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0} ms")]
pub struct ConnectTimeout(u64);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TimeoutConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let ms = self.timeout_ms.load(Ordering::Relaxed).max(1);
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_millis(ms), connecting).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout(ms)) as BoxError),
            }
        })
    }
}

/// A pooled client; `timeout_ms` is the connect timeout in milliseconds, read at each connect.
pub fn client(timeout_ms: Arc<AtomicU64>) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(4096)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(TimeoutConnector {
            inner: http,
            timeout_ms,
        })
}

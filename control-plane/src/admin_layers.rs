//! The tower stack around `lb.v1.Admin`, outermost first:
//!
//! 1. tracing ([`crate::trace::AdminTraceLayer`]): a span per call, refused ones included;
//! 2. the admin token (tonic's `InterceptorLayer`): `UNAUTHENTICATED` without it;
//! 3. a concurrency limit ([`MAX_CONCURRENT`] calls at once, over every connection; the rest
//!    wait their turn), so a burst of writes cannot pile up on the store;
//! 4. a deadline ([`DEADLINE`]): a call still running then is answered `DEADLINE_EXCEEDED`
//!    (a client's shorter `grpc-timeout` is tonic's to enforce).
//!
//! Discovery streams, health and reflection are outside this stack.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Admin calls served at once per control plane.
pub const MAX_CONCURRENT: usize = 64;
/// Longest an Admin call may run.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Answers `DEADLINE_EXCEEDED` for a call that runs longer than its deadline.
#[derive(Clone, Copy)]
pub struct DeadlineLayer(pub Duration);

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            after: self.0,
        }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    after: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = self.inner.call(req);
        let after = self.after;
        Box::pin(async move {
            match tokio::time::timeout(after, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the Admin call took longer than {after:?}"
                ))
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer as _, Service as _, ServiceExt as _};

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_is_answered_deadline_exceeded() {
        let never = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
        });
        let mut svc = DeadlineLayer(Duration::from_secs(30)).layer(never);
        let call = svc.ready().await.unwrap().call(http::Request::new(()));
        let answer = call.await.unwrap();
        assert_eq!(answer.headers()["grpc-status"], "4");
        let quick = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new("done".to_owned()))
        });
        let mut svc = DeadlineLayer(Duration::from_secs(30)).layer(quick);
        let answer = svc.call(http::Request::new(())).await.unwrap();
        assert_eq!(answer.body(), "done");
    }
}

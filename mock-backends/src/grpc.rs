//! The gRPC side of a backend, on the same port as its HTTP paths (over HTTP/2, clear text or
//! prior knowledge): `lb.mock.v1.Echo`, every kind of call with each reply naming the backend,
//! and `grpc.health.v1.Health/Check`, which follows the `fail_health` fault. The other faults
//! reach gRPC calls too: latency delays them, `error_status` and `error_rate` fail them with
//! UNAVAILABLE, and refusing connections cuts them.

use super::*;

use tokio_stream::StreamExt as _;
use tonic::codegen::Service as _;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The generated types of `lb.mock.v1`.
pub mod pb {
    tonic::include_proto!("lb.mock.v1");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

/// Most replies of one ServerStream call.
const MAX_STREAM_REPLIES: u32 = 10_000;

/// Whether a request is a gRPC call.
pub(crate) fn is_grpc(parts: &Parts) -> bool {
    parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC services of one backend, for one connection.
pub(crate) fn routes(inner: Arc<Inner>) -> tonic::service::Routes {
    tonic::service::Routes::new(EchoServer::new(EchoService {
        name: inner.name.clone(),
    }))
    .add_service(HealthServer::new(HealthService { inner }))
}

/// Serves one gRPC call with the backend's faults applied first.
pub(crate) async fn call(
    parts: Parts,
    body: Incoming,
    ctx: &ConnCtx,
    faults: &Faults,
) -> Result<Resp, BoxError> {
    let failing =
        faults.error_status != 0 || (faults.error_rate > 0.0 && random_unit() < faults.error_rate);
    if failing {
        drain(body).await;
        return Ok(status_only(
            tonic::Code::Unavailable,
            &format!("injected fault on {}", ctx.inner.name),
        ));
    }
    let mut routes = ctx.grpc.clone();
    poll_fn(|cx| tonic::codegen::Service::<Request<Incoming>>::poll_ready(&mut routes, cx)).await?;
    let resp = routes.call(Request::from_parts(parts, body)).await?;
    Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
}

/// A trailers-only gRPC answer: HTTP 200 with the status in its head.
fn status_only(code: tonic::Code, message: &str) -> Resp {
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code as i32));
    if let Ok(m) = HeaderValue::from_str(message) {
        h.insert("grpc-message", m);
    }
    resp
}

struct EchoService {
    name: String,
}

impl EchoService {
    fn reply(&self, message: String, index: u32) -> EchoReply {
        EchoReply {
            message,
            backend: self.name.clone(),
            index,
        }
    }
}

/// The request's own failure, when it asks for one.
fn asked_failure(req: &EchoRequest) -> Result<(), Status> {
    match req.fail_with {
        0 => Ok(()),
        code => Err(Status::new(
            tonic::Code::from_i32(i32::try_from(code).unwrap_or(2)),
            req.message.clone(),
        )),
    }
}

type ReplyStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        req: GrpcRequest<EchoRequest>,
    ) -> Result<GrpcResponse<EchoReply>, Status> {
        let req = req.into_inner();
        asked_failure(&req)?;
        Ok(GrpcResponse::new(self.reply(req.message, 0)))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: GrpcRequest<EchoRequest>,
    ) -> Result<GrpcResponse<ReplyStream>, Status> {
        let req = req.into_inner();
        asked_failure(&req)?;
        let replies: Vec<_> = (0..req.count.min(MAX_STREAM_REPLIES))
            .map(|i| Ok(self.reply(format!("{} {i}", req.message), i)))
            .collect();
        Ok(GrpcResponse::new(Box::pin(tokio_stream::iter(replies))))
    }

    async fn client_stream(
        &self,
        req: GrpcRequest<Streaming<EchoRequest>>,
    ) -> Result<GrpcResponse<EchoReply>, Status> {
        let mut stream = req.into_inner();
        let mut words = Vec::new();
        while let Some(r) = stream.next().await {
            let r = r?;
            asked_failure(&r)?;
            words.push(r.message);
        }
        let count = u32::try_from(words.len()).unwrap_or(u32::MAX);
        Ok(GrpcResponse::new(self.reply(words.join(" "), count)))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: GrpcRequest<Streaming<EchoRequest>>,
    ) -> Result<GrpcResponse<ReplyStream>, Status> {
        let name = self.name.clone();
        let mut index = 0;
        let replies = req.into_inner().map(move |r| {
            let r = r?;
            asked_failure(&r)?;
            let reply = EchoReply {
                message: r.message,
                backend: name.clone(),
                index,
            };
            index += 1;
            Ok(reply)
        });
        Ok(GrpcResponse::new(Box::pin(replies)))
    }
}

/// `grpc.health.v1.Health`: SERVING for the server (`""`) and `lb.mock.v1.Echo`, NOT_SERVING
/// while the `fail_health` fault is on.
struct HealthService {
    inner: Arc<Inner>,
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        req: GrpcRequest<HealthCheckRequest>,
    ) -> Result<GrpcResponse<HealthCheckResponse>, Status> {
        let service = req.into_inner().service;
        if !service.is_empty() && service != "lb.mock.v1.Echo" {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        let status = if self.inner.faults_snapshot().fail_health {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        Ok(GrpcResponse::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        _: GrpcRequest<HealthCheckRequest>,
    ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "Watch is not served by the mock backends",
        ))
    }
}

//! What each path answers: data, health, echo, slow, status, bytes, cacheable and abort paths,
//! and the `/_admin` paths that change a backend's faults.

use super::*;

pub(crate) async fn handle(req: Request<Incoming>, ctx: Arc<ConnCtx>) -> Result<Resp, BoxError> {
    let request_id = req.headers().get(X_REQUEST_ID).cloned();
    let mut resp = route(req, &ctx).await?;
    let headers = resp.headers_mut();
    headers.insert(X_BACKEND, ctx.inner.name_header.clone());
    if let Some(id) = request_id {
        headers.insert(X_REQUEST_ID, id);
    }
    Ok(resp)
}

pub(crate) fn is_admin(path: &str) -> bool {
    path == "/_admin" || path.starts_with("/_admin/")
}

pub(crate) async fn route(req: Request<Incoming>, ctx: &ConnCtx) -> Result<Resp, BoxError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if is_admin(&path) {
        return Ok(admin(parts, body, ctx).await.unwrap_or_else(error_response));
    }
    let inner = &ctx.inner;
    inner.count_request(&path);

    let faults = inner.faults_snapshot();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms.min(MAX_LATENCY_MS))).await;
    }
    if grpc::is_grpc(&parts) {
        return grpc::call(parts, body, ctx, &faults).await;
    }
    if faults.error_status != 0 {
        drain(body).await;
        let status = StatusCode::from_u16(faults.error_status)
            .ok()
            .filter(|s| (200..=599).contains(&s.as_u16()))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let payload = json!({
            "backend": inner.name,
            "status": status.as_u16(),
            "error": "injected fault: error_status",
        });
        return Ok(status_response(&parts.method, status, &payload));
    }
    if faults.error_rate > 0.0 && random_unit() < faults.error_rate {
        drain(body).await;
        let payload = json!({
            "backend": inner.name,
            "status": 500,
            "error": "injected fault: error_rate",
        });
        return Ok(json_response(StatusCode::INTERNAL_SERVER_ERROR, &payload));
    }

    let result = match path.as_str() {
        "/ws" => Ok(websocket(parts, inner)),
        "/echo" => echo(&parts, body, inner).await,
        "/echo/stream" => Ok(echo_stream(&parts, body)),
        "/abort" => return Err("connection aborted by /abort".into()),
        other => {
            drain(body).await;
            match other {
                "/health" => Ok(health(inner, faults.fail_health)),
                "/slow" => slow(&parts, inner).await,
                "/bytes" => bytes_endpoint(&parts),
                "/cacheable" => cacheable(&parts, inner),
                "/abort-body" => Ok(abort_body()),
                p if p.starts_with("/status/") => status_endpoint(&parts, inner),
                _ => Ok(json_response(StatusCode::OK, &data_json(&parts, inner))),
            }
        }
    };
    Ok(result.unwrap_or_else(error_response))
}

/// Reads and discards the request body, so the connection stays reusable for
/// keep-alive even when the endpoint ignores the body.
pub(crate) async fn drain(mut body: Incoming) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
}

pub(crate) fn health(inner: &Inner, fail: bool) -> Resp {
    if fail {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unhealthy", "backend": inner.name}),
        )
    } else {
        json_response(
            StatusCode::OK,
            &json!({"status": "ok", "backend": inner.name}),
        )
    }
}

pub(crate) fn data_json(parts: &Parts, inner: &Inner) -> Value {
    let request_id = parts
        .headers
        .get(X_REQUEST_ID)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    json!({
        "backend": inner.name,
        "port": inner.addr.port(),
        "method": parts.method.as_str(),
        "request_id": request_id,
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "timestamp_ms": now_ms(),
        "message": format!("hello from {}", inner.name),
    })
}

pub(crate) async fn slow(parts: &Parts, inner: &Inner) -> Result<Resp, ApiError> {
    let raw = query_param(parts.uri.query(), "ms")
        .ok_or_else(|| ApiError::field("ms", "missing query parameter 'ms'"))?;
    let ms = raw
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms <= MAX_LATENCY_MS)
        .ok_or_else(|| {
            ApiError::field(
                "ms",
                format!("invalid query parameter 'ms': {raw:?} (expected 0..={MAX_LATENCY_MS})"),
            )
        })?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(json_response(StatusCode::OK, &data_json(parts, inner)))
}

pub(crate) fn status_endpoint(parts: &Parts, inner: &Inner) -> Result<Resp, ApiError> {
    let raw = &parts.uri.path()["/status/".len()..];
    let status = raw
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| {
            ApiError::field(
                "code",
                format!("invalid status code {raw:?} (expected 200..=599)"),
            )
        })?;
    let payload = json!({"backend": inner.name, "status": status.as_u16()});
    Ok(status_response(&parts.method, status, &payload))
}

pub(crate) async fn echo(parts: &Parts, body: Incoming, inner: &Inner) -> Result<Resp, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body exceeds the /echo limit of {MAX_ECHO_BODY} bytes (use /echo/stream)"
            ),
        )
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_ECHO_BODY as u64) {
        return Err(too_large());
    }
    let bytes = match Limited::new(body, MAX_ECHO_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("reading the request body failed: {e}"),
            ));
        }
    };
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_string(), Value::String(joined));
    }
    let payload = json!({
        "backend": inner.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&bytes),
        "body_bytes": bytes.len(),
    });
    Ok(json_response(StatusCode::OK, &payload))
}

/// The request body becomes the response body frame by frame, so arbitrarily
/// large bodies stream through without being held in memory.
pub(crate) fn echo_stream(parts: &Parts, body: Incoming) -> Resp {
    let mut resp = Response::new(body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync());
    let headers = resp.headers_mut();
    if let Ok(method) = HeaderValue::from_str(parts.method.as_str()) {
        headers.insert(X_ECHO_METHOD, method);
    }
    if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, ct.clone());
    }
    resp
}

pub(crate) fn bytes_endpoint(parts: &Parts) -> Result<Resp, ApiError> {
    let query = parts.uri.query();
    let raw = query_param(query, "n")
        .ok_or_else(|| ApiError::field("n", "missing query parameter 'n'"))?;
    let n = raw
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= MAX_BYTES)
        .ok_or_else(|| {
            ApiError::field(
                "n",
                format!("invalid query parameter 'n': {raw:?} (expected 0..={MAX_BYTES})"),
            )
        })?;
    let chunked = match query_param(query, "chunked").as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            return Err(ApiError::field(
                "chunked",
                format!("invalid query parameter 'chunked': {other:?} (expected 0 or 1)"),
            ));
        }
    };
    let mut resp = Response::new(
        PatternBody {
            sent: 0,
            total: n,
            exact: !chunked,
        }
        .boxed_unsync(),
    );
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if !chunked {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(resp)
}

pub(crate) fn cacheable(parts: &Parts, inner: &Inner) -> Result<Resp, ApiError> {
    let query = parts.uri.query();
    let max_age = match query_param(query, "max_age") {
        None => 30,
        Some(raw) => raw.parse::<u32>().map_err(|_| {
            ApiError::field(
                "max_age",
                format!("invalid query parameter 'max_age': {raw:?} (expected seconds)"),
            )
        })?,
    };
    let vary = match query_param(query, "vary") {
        None => None,
        Some(raw) => Some(HeaderName::from_bytes(raw.as_bytes()).map_err(|_| {
            ApiError::field(
                "vary",
                format!("invalid query parameter 'vary': {raw:?} is not a header name"),
            )
        })?),
    };
    let served = inner.cacheable_served.fetch_add(1, Ordering::Relaxed) + 1;
    let vary_value = vary.as_ref().and_then(|name| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    });
    let payload = json!({
        "backend": inner.name,
        "served": served,
        "path": parts.uri.path(),
        "vary": vary.as_ref().map(HeaderName::as_str),
        "vary_value": vary_value,
        "timestamp_ms": now_ms(),
    });
    let mut resp = json_response(StatusCode::OK, &payload);
    let headers = resp.headers_mut();
    // `cc` replaces the whole Cache-Control value (no-store, private, stale windows...).
    let cc = query_param(query, "cc").unwrap_or_else(|| format!("public, max-age={max_age}"));
    match HeaderValue::from_str(&cc) {
        Ok(v) => {
            headers.insert(CACHE_CONTROL, v);
        }
        Err(_) => {
            return Err(ApiError::field(
                "cc",
                format!("invalid query parameter 'cc': {cc:?} is not a header value"),
            ));
        }
    }
    if let Some(name) = vary {
        headers.insert(VARY, HeaderValue::from(name));
    }
    Ok(resp)
}

pub(crate) fn abort_body() -> Resp {
    let mut resp = Response::new(
        AbortBody {
            sent_head: false,
            pause: Box::pin(tokio::time::sleep(ABORT_BODY_PAUSE)),
        }
        .boxed_unsync(),
    );
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(ABORT_BODY_DECLARED));
    resp
}

// ---------------------------------------------------------------------------
// Admin
// ---------------------------------------------------------------------------

pub(crate) async fn admin(parts: Parts, body: Incoming, ctx: &ConnCtx) -> Result<Resp, ApiError> {
    let target = match query_param(parts.uri.query(), "backend") {
        None => ctx.inner.clone(),
        Some(raw) => {
            let port = raw.parse::<u16>().map_err(|_| {
                ApiError::field(
                    "backend",
                    format!("invalid query parameter 'backend': {raw:?} is not a port"),
                )
            })?;
            ctx.group
                .iter()
                .find(|b| b.inner.addr.port() == port)
                .map(|b| b.inner.clone())
                .ok_or_else(|| ApiError {
                    status: StatusCode::NOT_FOUND,
                    field: Some("backend".to_string()),
                    message: format!("no backend on port {port} in this process"),
                })?
        }
    };
    let spare = Arc::ptr_eq(&target, &ctx.inner).then_some(ctx.conn_id);
    let path = parts.uri.path();
    let method = &parts.method;
    match path {
        "/_admin/fault" if method == Method::GET || method == Method::HEAD => {
            Ok(json_response(StatusCode::OK, &target.faults_snapshot()))
        }
        "/_admin/fault" if method == Method::PUT => {
            let patch = read_json_object(body).await?;
            let faults = target.update_faults(spare, |current| merge_faults(current, &patch))?;
            Ok(json_response(StatusCode::OK, &faults))
        }
        "/_admin/fault" if method == Method::DELETE => {
            drain(body).await;
            let faults = target.update_faults(spare, |_| Ok(Faults::default()))?;
            Ok(json_response(StatusCode::OK, &faults))
        }
        "/_admin/stats" if method == Method::GET || method == Method::HEAD => {
            Ok(json_response(StatusCode::OK, &*lock(&target.stats)))
        }
        "/_admin/stats" if method == Method::DELETE => {
            drain(body).await;
            target.reset_stats();
            Ok(json_response(StatusCode::OK, &Stats::default()))
        }
        "/_admin/fault" | "/_admin/stats" => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed on {path}"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown admin path {path} (known: /_admin/fault, /_admin/stats)"),
        )),
    }
}

pub(crate) async fn read_json_object(
    body: Incoming,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = Limited::new(body, MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("reading the body failed: {e}"),
            )
        })?
        .to_bytes();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "expected a JSON object of fault fields",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
        )),
    }
}

/// Applies a partial fault object: absent fields keep their current value.
/// Each field is parsed and validated on its own so errors can name it.
pub(crate) fn merge_faults(
    current: &Faults,
    patch: &serde_json::Map<String, Value>,
) -> Result<Faults, ApiError> {
    pub(crate) fn field<T: serde::de::DeserializeOwned>(
        name: &str,
        value: &Value,
    ) -> Result<T, ApiError> {
        T::deserialize(value)
            .map_err(|e| ApiError::field(name, format!("invalid value for '{name}': {e}")))
    }
    let mut faults = current.clone();
    for (name, value) in patch {
        match name.as_str() {
            "fail_health" => faults.fail_health = field(name, value)?,
            "refuse_connections" => faults.refuse_connections = field(name, value)?,
            "error_status" => {
                let status: u16 = field(name, value)?;
                if status != 0 && !(200..=599).contains(&status) {
                    return Err(ApiError::field(
                        name,
                        format!(
                            "invalid value for 'error_status': {status} (expected 0 or 200..=599)"
                        ),
                    ));
                }
                faults.error_status = status;
            }
            "error_rate" => {
                let rate: f64 = field(name, value)?;
                if !(0.0..=1.0).contains(&rate) {
                    return Err(ApiError::field(
                        name,
                        format!("invalid value for 'error_rate': {rate} (expected 0.0..=1.0)"),
                    ));
                }
                faults.error_rate = rate;
            }
            "latency_ms" => {
                let ms: u64 = field(name, value)?;
                if ms > MAX_LATENCY_MS {
                    return Err(ApiError::field(
                        name,
                        format!(
                            "invalid value for 'latency_ms': {ms} (expected 0..={MAX_LATENCY_MS})"
                        ),
                    ));
                }
                faults.latency_ms = ms;
            }
            other => {
                return Err(ApiError::field(
                    other,
                    format!(
                        "unknown field '{other}' (known: fail_health, error_status, error_rate, latency_ms, refuse_connections)"
                    ),
                ));
            }
        }
    }
    Ok(faults)
}

// ---------------------------------------------------------------------------
// Bodies and helpers
// ---------------------------------------------------------------------------

/// `/ws`: a WebSocket echo. Every text and binary message comes back as it went; a ping is
/// answered. A request that is not a WebSocket handshake gets 426. The socket is dropped when
/// the backend refuses connections or stops, as a killed process's would be.
pub(crate) fn websocket(mut parts: Parts, inner: &Inner) -> Resp {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let asked = parts
        .headers
        .get(http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = parts.headers.get(http::header::SEC_WEBSOCKET_KEY).cloned();
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let (true, Some(key), Some(on_upgrade)) = (asked, key, on_upgrade) else {
        return json_response(
            StatusCode::UPGRADE_REQUIRED,
            &json!({"backend": inner.name, "error": "a WebSocket handshake is expected"}),
        );
    };
    let (name, close) = (inner.name.clone(), inner.close.subscribe());
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => echo_messages(TokioIo::new(upgraded), close).await,
            Err(e) => tracing::debug!(backend = %name, error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(http::header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

/// Echoes a WebSocket's messages until it closes, or the backend closes its connections.
async fn echo_messages(
    io: TokioIo<hyper::upgrade::Upgraded>,
    mut close: watch::Receiver<crate::server::CloseSignal>,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = close.wait_for(|c| c.mode != crate::server::CloseMode::Open) => return,
        };
        let Some(Ok(msg)) = msg else {
            return;
        };
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => return,
            // Pings are answered by the library; pongs and raw frames need nothing.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

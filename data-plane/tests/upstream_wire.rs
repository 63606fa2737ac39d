//! What the upstream code does with what a backend puts on the wire, through a data plane in
//! this process and a scripted backend that answers each path with exact bytes: response heads
//! past the size or field limit, a switch of protocols, connections that must not be reused
//! (HTTP/1.0, `Connection: close`), chunked bodies that break or stop, and a chunked upload of
//! unknown length on its way to the backend.

#[path = "support/dp.rs"]
mod dp;
#[path = "support/scripted.rs"]
mod scripted;

use std::sync::atomic::Ordering;

use bytes::Bytes;
use dp::{Dp, get_request, wait_until};
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use scripted::Scripted;
use tokio_stream::wrappers::ReceiverStream;

/// The scripted backend behind a one-worker data plane (one pool of backend connections), with
/// the default policies.
async fn stack() -> (Scripted, Dp) {
    let backend = Scripted::start().await;
    let dp = Dp::start(|_| {}, dp::snapshot(&[backend.addr])).await;
    (backend, dp)
}

/// Requests to the backend counted as its failures.
fn errors(dp: &Dp, backend: &Scripted) -> u64 {
    let active = dp.shared.active().unwrap();
    active.slots[dp.slot_of(backend.addr)]
        .endpoint
        .errors
        .load(Ordering::Relaxed)
}

/// GET `path`: the status, and the body, which must be whole.
async fn get(dp: &Dp, path: &str) -> dp::Seen {
    let seen = dp.send(get_request(path)).await.expect("a response head");
    assert!(seen.body.is_ok(), "{path}: the body was cut short");
    seen
}

#[tokio::test]
async fn a_response_head_larger_than_64_kib_is_a_502_charged_to_the_backend() {
    let (backend, dp) = stack().await;
    let seen = get(&dp, "/huge-head").await;
    assert_eq!(seen.status, 502);
    assert_eq!(seen.json()["error"], "bad_gateway");
    assert_eq!(errors(&dp, &backend), 1);
    // Only that exchange failed.
    assert_eq!(get(&dp, "/keep").await.status, 200);
    assert_eq!(errors(&dp, &backend), 1);
    dp.stop().await;
}

#[tokio::test]
async fn a_response_with_more_than_128_fields_is_a_502_and_128_are_passed_on() {
    let (backend, dp) = stack().await;
    let seen = get(&dp, "/fields-129").await;
    assert_eq!(seen.status, 502);
    assert_eq!(seen.json()["error"], "bad_gateway");
    assert_eq!(errors(&dp, &backend), 1);
    let seen = get(&dp, "/fields-128").await;
    assert_eq!((seen.status.as_u16(), seen.text().as_str()), (200, "ok"));
    for i in 0..127 {
        assert_eq!(seen.header(&format!("x-f{i}")), Some(&*i.to_string()));
    }
    dp.stop().await;
}

#[tokio::test]
async fn switching_protocols_from_a_backend_is_a_502_not_passed_on() {
    let (backend, dp) = stack().await;
    let seen = get(&dp, "/switch").await;
    assert_eq!(seen.status, 502);
    assert_eq!(seen.json()["error"], "bad_gateway");
    assert!(seen.header("upgrade").is_none());
    assert_eq!(errors(&dp, &backend), 1);
    dp.stop().await;
}

/// The backend connection a GET of `path` went out on.
async fn conn_of(dp: &Dp, path: &str) -> String {
    let seen = get(dp, path).await;
    assert_eq!((seen.status.as_u16(), seen.text().as_str()), (200, "ok"));
    seen.header("x-conn").expect("x-conn").to_owned()
}

#[tokio::test]
async fn connections_are_reused_after_keep_alive_only() {
    let (_backend, dp) = stack().await;
    // HTTP/1.1 without `Connection: close`: the next request goes on the same connection.
    let first = conn_of(&dp, "/keep").await;
    assert_eq!(conn_of(&dp, "/keep").await, first);
    // After an HTTP/1.0 answer (on the pooled connection), the connection is left; the next
    // request, HTTP/1.0 again, goes on a new one, and so does the one after it.
    let http10 = conn_of(&dp, "/http10").await;
    assert_eq!(http10, first, "the pooled connection carried it");
    let again = conn_of(&dp, "/http10").await;
    assert_ne!(again, http10, "reused after an HTTP/1.0 answer");
    let after = conn_of(&dp, "/keep").await;
    assert_ne!(after, again, "reused after an HTTP/1.0 answer");
    // `Connection: close` likewise, though the backend keeps the connection open.
    let closing = conn_of(&dp, "/close").await;
    assert_eq!(closing, after, "the pooled connection carried it");
    let next = conn_of(&dp, "/close").await;
    assert_ne!(next, closing, "reused after Connection: close");
    assert_ne!(
        conn_of(&dp, "/keep").await,
        next,
        "reused after Connection: close"
    );
    dp.stop().await;
}

#[tokio::test]
async fn a_chunked_body_that_breaks_or_stops_ends_short_and_counts_against_the_backend() {
    let (backend, dp) = stack().await;
    for (i, path) in ["/bad-chunk-size", "/no-crlf", "/cut"]
        .into_iter()
        .enumerate()
    {
        // The head and a first chunk ("hello") come; the rest only once the client has the
        // head, so what the client sees does not depend on timing.
        let resp = dp.open(get_request(path)).await.expect("a response head");
        assert_eq!(resp.status(), 200, "{path}");
        backend.gate.notify_one();
        let body = resp.into_body().collect().await;
        assert!(body.is_err(), "{path}: the client got a whole body");
        wait_until(&format!("{path} to count as the backend's error"), || {
            errors(&dp, &backend) == i as u64 + 1
        })
        .await;
    }
    // Each broken connection was dropped: the next request is served.
    assert_eq!(get(&dp, "/keep").await.status, 200);
    dp.stop().await;
}

#[tokio::test]
async fn a_chunked_upload_of_unknown_length_reaches_the_backend_chunked_and_whole() {
    let (_backend, dp) = stack().await;
    let parts: Vec<Bytes> = [1usize, 10, 4096, 100_000, 7]
        .iter()
        .enumerate()
        .map(|(i, &n)| Bytes::from(vec![b'a' + i as u8; n]))
        .collect();
    let sent: Vec<u8> = parts.concat();
    // A body of unknown length, fed as the request goes: the client frames it chunked.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let feeder = tokio::spawn(async move {
        for p in parts {
            tx.send(Ok(Frame::data(p))).await.unwrap();
        }
    });
    let req = Request::post("/echo")
        .header("host", "localhost")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    let seen = dp.send(req).await.expect("a response head");
    feeder.await.unwrap();
    assert_eq!(seen.status, 200);
    assert_eq!(seen.header("x-framing"), Some("chunked"));
    let echoed = seen.body.expect("a whole body");
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "the backend got other bytes than were sent");
    dp.stop().await;
}

//! A response body copied into the cache as it streams to the client.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use super::{Fill, NotStored};
use crate::redis::RedisConn;

/// Copies a response body on its way to the client, up to the cache's entry size, and stores
/// it when the body is complete. A body that grows too large is streamed on and not stored; one
/// the client abandons is not stored either (the [`Fill`] is dropped, releasing the requests
/// waiting for it).
pub struct Tee {
    fill: Option<Fill>,
    redis: Option<RedisConn>,
    status: StatusCode,
    headers: HeaderMap,
    buf: BytesMut,
    limit: usize,
    over: bool,
}

impl Tee {
    /// Copies a body of at most `limit` bytes for `fill`, to store with this status and head.
    pub fn new(
        fill: Fill,
        redis: Option<RedisConn>,
        status: StatusCode,
        headers: HeaderMap,
        limit: usize,
    ) -> Tee {
        Tee {
            fill: Some(fill),
            redis,
            status,
            headers,
            buf: BytesMut::new(),
            limit,
            over: false,
        }
    }

    /// Copies the next part of the body.
    pub fn push(&mut self, data: &Bytes) {
        if self.over {
            return;
        }
        if self.buf.len() + data.len() > self.limit {
            self.over = true;
            self.buf = BytesMut::new();
            if let Some(f) = self.fill.take() {
                tokio::spawn(f.not_stored(NotStored::TooLarge));
            }
            return;
        }
        self.buf.extend_from_slice(data);
    }

    /// The body is complete: stores it, unless it grew too large.
    pub fn finish(&mut self) {
        let Some(fill) = self.fill.take() else { return };
        if self.over {
            return;
        }
        let body = std::mem::take(&mut self.buf).freeze();
        let (redis, status, headers) = (
            self.redis.take(),
            self.status,
            std::mem::take(&mut self.headers),
        );
        tokio::spawn(async move {
            let _ = fill
                .store(
                    redis.as_ref(),
                    status,
                    &headers,
                    body,
                    crate::clock::unix_ms(),
                )
                .await;
        });
    }
}

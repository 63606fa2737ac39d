//! The shared tier in Redis, seen by every data plane. Every call is bounded by [`TIMEOUT`]
//! (per round trip) and reports failure as an error; the caller then carries on with the
//! memory tier alone and marks the cache degraded.
//!
//! Layout (see [`super::key`] for the digests):
//! - `lb:cache:{P}:F`: the entry of resource `P`, or its vary spec when the response varies,
//!   in record format `F` ([`key::FORMAT`]);
//! - `lb:cache:{P}:F:v:V`: the entry of variant `V` of `P`;
//! - `lb:cache:lock:{P}[:V]`: the fill lock (`SET NX PX`, released by compare-and-delete);
//! - `lb:cache:{index}:paths`: a sorted set, all scores 0, of `<path>\0<redis key>` for every
//!   record written, so that `ZRANGEBYLEX` finds the records under a path prefix in
//!   O(log N + M) without scanning the keyspace;
//! - `lb:cache:{index}:expiry`: the same members scored by expiry time (unix ms). Each write
//!   removes up to [`CLEANUP_PER_PUT`] members whose records have expired from both sets, so
//!   the index stays within the live records plus a backlog that every write drains.
//!
//! Records expire with Redis TTLs at the end of their last stale window (kept longer when they
//! can be revalidated, see [`super::policy::VALIDATION_KEEP_MS`]); a vary spec lives as
//! long as its longest-lived variant, so a purge by key, which finds the variants through the
//! path the spec holds, never misses one. The index is written before the records it lists: a
//! failure between the two leaves an index member without a record (harmless), never a record
//! a purge cannot find. On Redis Cluster each command and script touches one slot: a record
//! and its variants and lock share `P`'s hash tag, the two index sets share `{index}` (one
//! slot takes every index write: fills, not requests, so a modest rate).
//!
//! Costs: a lookup is one `GET`, two for a varying resource; a fill is two round trips; a purge
//! by key three; a purge by prefix one per 500 matching records; purging everything `SCAN`s the
//! keyspace for `lb:cache:*` (O(keys in the database), batches of 1000).

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use crate::redis::RedisConn;
use bytes::Bytes;
use http::HeaderMap;
use redis::{RedisResult, Script};

use super::entry::{DecodeError, Entry, Record, VarySpec};
use super::key::{self, CacheKey, Digest32, REDIS_PREFIX, lock_key, redis_key};

/// Longest wait for one Redis round trip; the same bound as the rate limiter's.
pub const TIMEOUT: Duration = crate::redis::link::TIMEOUT;

pub const INDEX_PATHS: &str = "lb:cache:{index}:paths";
pub const INDEX_EXPIRY: &str = "lb:cache:{index}:expiry";

/// Expired index members removed by each write.
pub const CLEANUP_PER_PUT: usize = 100;
/// Records deleted per round trip of a purge.
const PURGE_BATCH: usize = 500;

/// Lists records in both index sets and drops a bounded number of expired members.
/// ARGV: now (ms), expiry (ms), cleanup limit, members.
static INDEX_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 4, #ARGV do
  redis.call('ZADD', KEYS[1], 0, ARGV[i])
  redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[i])
end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
if #old > 0 then
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
return #old
",
    )
});

/// Writes a vary spec and one variant; the spec keeps the longer of its current and the new
/// TTL, so it outlives every variant.
static VARIANT_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ttl = tonumber(ARGV[3])
local left = redis.call('PTTL', KEYS[1])
local spec_ttl = ttl
if left > ttl then spec_ttl = left end
redis.call('SET', KEYS[1], ARGV[1], 'PX', spec_ttl)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
return 1
",
    )
});

static UNLOCK_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {} ms", TIMEOUT.as_millis())]
    Timeout,
    #[error("undecodable cache record in redis: {0}")]
    Decode(#[from] DecodeError),
}

async fn timed<T>(call: impl Future<Output = RedisResult<T>>) -> Result<T, SharedError> {
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SharedError::Timeout),
    }
}

/// What Redis holds for a request: the digest it maps to (its variant's when Redis holds a
/// vary spec, else the primary one) and the entry, if stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub variant: Digest32,
    pub entry: Option<Entry>,
}

async fn get_raw(conn: &mut RedisConn, k: &str) -> Result<Option<Bytes>, SharedError> {
    let raw: Option<Vec<u8>> = timed(redis::cmd("GET").arg(k).query_async(conn)).await?;
    Ok(raw.map(Bytes::from))
}

/// Looks a request up, following a vary spec (a second round trip).
pub async fn get(
    conn: &mut RedisConn,
    key: &CacheKey,
    headers: &HeaderMap,
) -> Result<Found, SharedError> {
    let p = key.primary();
    let missing = |variant| Found {
        variant,
        entry: None,
    };
    let Some(raw) = get_raw(conn, &redis_key(p, p)).await? else {
        return Ok(missing(*p));
    };
    match decode(raw)? {
        None => Ok(missing(*p)),
        Some(Record::Entry(entry)) => Ok(Found {
            variant: *p,
            entry: Some(entry),
        }),
        Some(Record::Vary(spec)) => {
            let v = key::variant(p, &spec.vary, headers);
            let Some(raw) = get_raw(conn, &redis_key(p, &v)).await? else {
                return Ok(missing(v));
            };
            match decode(raw)? {
                Some(Record::Entry(entry)) => Ok(Found {
                    variant: v,
                    entry: Some(entry),
                }),
                Some(Record::Vary(_)) | None => Ok(missing(v)),
            }
        }
    }
}

/// A record, or `None` for one written in another version of the format (by a data plane of
/// another release sharing this Redis): a miss, which the fill then overwrites, rather than a
/// failure of Redis.
fn decode(raw: Bytes) -> Result<Option<Record>, SharedError> {
    match Record::decode(raw) {
        Ok(r) => Ok(Some(r)),
        Err(DecodeError::Magic) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn member(path: &str, redis_key: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(path.len() + 1 + redis_key.len());
    m.extend_from_slice(path.as_bytes());
    m.push(0);
    m.extend_from_slice(redis_key.as_bytes());
    m
}

/// Stores an entry under `variant` of `primary` (its vary spec under `primary` when they
/// differ) until its last stale window ends. Does nothing for an entry already expired.
pub async fn put(
    conn: &mut RedisConn,
    primary: &Digest32,
    variant: &Digest32,
    entry: &Entry,
    now_ms: u64,
) -> Result<(), SharedError> {
    let expires = entry.freshness.expires_at_ms();
    let ttl = expires.saturating_sub(now_ms);
    if ttl == 0 {
        return Ok(());
    }
    let pk = redis_key(primary, primary);
    let vk = redis_key(primary, variant);
    let mut index = INDEX_SCRIPT.key(INDEX_PATHS);
    index
        .key(INDEX_EXPIRY)
        .arg(now_ms)
        .arg(expires)
        .arg(CLEANUP_PER_PUT)
        .arg(member(&entry.path, &pk));
    if vk != pk {
        index.arg(member(&entry.path, &vk));
    }
    timed(index.invoke_async::<i64>(conn)).await?;
    if vk == pk {
        timed(
            redis::cmd("SET")
                .arg(&pk)
                .arg(entry.encode())
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(conn),
        )
        .await
    } else {
        let spec = Record::Vary(VarySpec {
            vary: entry.vary.clone(),
            path: entry.path.clone(),
        });
        timed(
            VARIANT_SCRIPT
                .key(&pk)
                .key(&vk)
                .arg(spec.encode())
                .arg(entry.encode())
                .arg(ttl)
                .invoke_async::<i64>(conn),
        )
        .await
        .map(drop)
    }
}

/// Deletes the records of every index member between `min` and `max` (ZRANGEBYLEX bounds) and
/// the members themselves, in batches. The number of batches is fixed up front from the
/// count, so records written meanwhile cannot keep it going.
async fn purge_range(conn: &mut RedisConn, min: &[u8], max: &[u8]) -> Result<u64, SharedError> {
    let count: u64 = timed(
        redis::cmd("ZLEXCOUNT")
            .arg(INDEX_PATHS)
            .arg(min)
            .arg(max)
            .query_async(conn),
    )
    .await?;
    let mut removed = 0;
    for _ in 0..count.div_ceil(PURGE_BATCH as u64) {
        let members: Vec<Vec<u8>> = timed(
            redis::cmd("ZRANGEBYLEX")
                .arg(INDEX_PATHS)
                .arg(min)
                .arg(max)
                .arg("LIMIT")
                .arg(0)
                .arg(PURGE_BATCH)
                .query_async(conn),
        )
        .await?;
        if members.is_empty() {
            break;
        }
        let keys: Vec<&[u8]> = members
            .iter()
            .filter_map(|m| m.iter().position(|&b| b == 0).map(|i| &m[i + 1..]))
            .collect();
        // The records first, then their index members (the index may list a record that is
        // gone, never miss one that is there). The records span slots: on Redis Cluster the
        // client splits the UNLINK per slot, while the index sets share one.
        if !keys.is_empty() {
            let n: u64 = timed(redis::cmd("UNLINK").arg(&keys).query_async(conn)).await?;
            removed += n;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(INDEX_PATHS).arg(&members).ignore();
        pipe.cmd("ZREM").arg(INDEX_EXPIRY).arg(&members).ignore();
        timed(pipe.query_async::<()>(conn)).await?;
    }
    Ok(removed)
}

/// The ZRANGEBYLEX bounds of every member starting with `prefix`. Paths are UTF-8, where the
/// byte 0xff never occurs, so it sorts after any continuation of the prefix.
fn prefix_bounds(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut min = Vec::with_capacity(prefix.len() + 1);
    min.push(b'[');
    min.extend_from_slice(prefix);
    let mut max = min.clone();
    max.push(0xff);
    (min, max)
}

/// Deletes every record whose path starts with `prefix`; returns how many existed.
pub async fn purge_prefix(conn: &mut RedisConn, prefix: &str) -> Result<u64, SharedError> {
    let (min, max) = prefix_bounds(prefix.as_bytes());
    purge_range(conn, &min, &max).await
}

/// Deletes every record of one resource (its entry, or its vary spec and every variant);
/// returns how many existed.
pub async fn purge_key(conn: &mut RedisConn, primary: &Digest32) -> Result<u64, SharedError> {
    let pk = redis_key(primary, primary);
    let mut removed = 0;
    if let Some(raw) = get_raw(conn, &pk).await?
        && let Ok(record) = Record::decode(raw)
    {
        let (min, max) = prefix_bounds(&member(record.path(), &pk));
        removed = purge_range(conn, &min, &max).await?;
    }
    let n: u64 = timed(redis::cmd("UNLINK").arg(&pk).query_async(conn)).await?;
    Ok(removed + n)
}

/// Deletes every key of the cache, index and locks included; returns how many there were.
/// On Redis Cluster every primary is scanned.
pub async fn purge_all(conn: &mut RedisConn) -> Result<u64, SharedError> {
    let pattern = format!("{REDIS_PREFIX}*");
    let mut scan = timed(crate::redis::Scan::start(conn, &pattern, 1000)).await?;
    let mut removed = 0;
    while let Some(keys) = timed(scan.next(conn)).await? {
        if !keys.is_empty() {
            let n: u64 = timed(redis::cmd("UNLINK").arg(&keys).query_async(conn)).await?;
            removed += n;
        }
    }
    Ok(removed)
}

/// Takes the fill lock of a record for `ttl_ms` unless another holder has it.
pub async fn try_lock(
    conn: &mut RedisConn,
    primary: &Digest32,
    variant: &Digest32,
    token: &str,
    ttl_ms: u64,
) -> Result<bool, SharedError> {
    let ok: Option<String> = timed(
        redis::cmd("SET")
            .arg(lock_key(primary, variant))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(conn),
    )
    .await?;
    Ok(ok.is_some())
}

/// Releases the fill lock if `token` still holds it (it may have expired and passed on).
pub async fn unlock(
    conn: &mut RedisConn,
    primary: &Digest32,
    variant: &Digest32,
    token: &str,
) -> Result<(), SharedError> {
    timed(
        UNLOCK_SCRIPT
            .key(lock_key(primary, variant))
            .arg(token)
            .invoke_async::<i64>(conn),
    )
    .await
    .map(drop)
}

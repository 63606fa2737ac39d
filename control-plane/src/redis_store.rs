//! Redis as the control plane's store, shared by every control plane of a cluster, and the
//! reader of the data planes' rate-limit state.
//!
//! Layout (the `{...}` hash tag keeps each group in one Redis Cluster slot):
//!
//! - `lb:cp:{state}`: hash, `version` (decimal) and `state` (an encoded `lb.v1.StoredState` whose
//!   configuration has that version). The version sits beside the encoded state so the save
//!   script can compare versions without decoding protobuf.
//! - `lb:cp:changes`: pub/sub channel; each save publishes its version there.
//! - `lb:rl:{<identity>}:*`: the data planes' rate-limit state, see [`crate::ratelimit`].
//!
//! Saves never go backwards: a Lua script writes the state only when the stored version is lower
//! than the new one and publishes in the same step, so of two control planes racing to save the
//! same next version exactly one wins; the other refuses its change and loads the winner's state.
//! Every control plane follows the channel on a connection of its own (see [`spawn_follower`]) and
//! adopts newer states as they are announced, so a change made on one reaches the data planes of
//! all. A control plane that missed messages (the subscription dropped) compares versions when it
//! resubscribes and every [`HEALTH_INTERVAL`], so it converges without them; finding an older
//! version than its own (Redis lost its data) it saves its state again.
//!
//! A `rediss://` URL is reached over TLS (rustls), the certificate checked against the
//! `redis_ca` file when set, else the system's roots. A `redis+cluster://` URL names a Redis
//! Cluster ([`data_plane::common::RedisTarget`]): the state key and the save script live in one slot,
//! a cluster carries published messages to every node, so the follower subscribes on any node
//! (the next one listed after a failure), and listing bans scans every primary.
//!
//! Every call has a deadline ([`DEFAULT_CALL_TIMEOUT`] unless set): with Redis gone, admin calls
//! that need it fail promptly with an error naming Redis, while the published configuration keeps
//! being served to data planes from memory.

use std::sync::{Arc, Weak};
use std::time::Duration;

use data_plane::common::{RedisConn, RedisTarget, RedisTimeouts as Timeouts, Scan};
use lb_proto::redis_keys;
use lb_proto::v1::{BanInfo, StoredState};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::cluster::{ControlPlane, UpdateError};
use crate::ratelimit::{GcraState, SharedLimits};
use crate::store::{Store, StoreError};

/// The control plane's state.
pub const STATE_KEY: &str = "lb:cp:{state}";

/// Where saves announce their version.
pub const CHANGES_CHANNEL: &str = "lb:cp:changes";
/// Pub/sub channel of data-plane reports: each control plane publishes those of its own data
/// planes (its origin id, 32 hex digits, then the encoded `lb.v1.StatsReport`) and adds up the
/// others', so every control plane shows the whole fleet.
pub const REPORTS_CHANNEL: &str = "lb:cp:reports";
/// Reports waiting to be published; more are dropped (the local view is unaffected).
const REPORTS_QUEUED: usize = 1024;
const ORIGIN_LEN: usize = 32;

/// Deadline of one Redis call: long enough for a loaded Redis to answer, short enough that an
/// admin call with Redis gone fails well before a client's own timeout.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the follower checks its subscription and the stored version.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Reconnection delays of the follower: doubling from the first to the last, with jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keys asked for per SCAN step.
const SCAN_COUNT: usize = 500;

/// Most bans listed at once; bounds the answer and the time one listing holds Redis.
pub const MAX_BANS_LISTED: usize = 10_000;

/// KEYS[1] state hash; ARGV[1] new version, ARGV[2] encoded state, ARGV[3] channel.
/// Returns {1, new version} when written, {0, stored version} when the stored one is not older.
const SAVE_SCRIPT: &str = r"
local stored = redis.call('HGET', KEYS[1], 'version')
local current = 0
if stored then
  current = tonumber(stored)
  if current == nil then
    return redis.error_reply('BADVALUE field version is not a number')
  end
end
if current >= tonumber(ARGV[1]) then
  return {0, tostring(stored)}
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'state', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {1, ARGV[1]}
";

pub struct RedisStore {
    /// host:port, for messages (the URL may hold a password).
    addr: String,
    target: RedisTarget,
    conn: RedisConn,
    timeout: Duration,
    save_script: redis::Script,
}

impl RedisStore {
    /// A store on the Redis at `url` with every call bounded by `timeout`. Nothing is sent yet:
    /// an unreachable Redis shows in the first call.
    pub async fn open(url: &str, timeout: Duration) -> Result<RedisStore, StoreError> {
        RedisStore::open_with_ca(url, None, timeout).await
    }

    /// As [`RedisStore::open`], with the PEM CA certificates a `rediss://` Redis's certificate
    /// must chain to (the `redis_ca` setting; `None`: the system's roots).
    pub async fn open_with_ca(
        url: &str,
        root_ca: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let target = RedisTarget {
            url: url.to_owned(),
            root_ca: root_ca.map(Arc::from),
        };
        let addr = target.addr();
        // Few, quick reconnection attempts: the call deadline is what callers wait on, and a
        // later call starts a new attempt anyway.
        let conn = target
            .connect_lazy(Timeouts {
                connect: timeout,
                response: timeout,
                retries: 2,
            })
            .map_err(|e| StoreError::RedisUrl(e.to_string()))?;
        Ok(RedisStore {
            addr,
            target,
            conn,
            timeout,
            save_script: redis::Script::new(SAVE_SCRIPT),
        })
    }

    /// host:port of the Redis.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs one call within the deadline, naming the operation and key in errors.
    async fn call<T>(
        &self,
        op: &str,
        key: &str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.code() == Some("WRONGTYPE") => Err(bad(key, "it is not a hash")),
            Ok(Err(e)) if e.code() == Some("BADVALUE") => {
                Err(bad(key, e.detail().unwrap_or("unreadable")))
            }
            Ok(Err(e)) => Err(StoreError::Redis {
                addr: self.addr.clone(),
                op: format!("{op} {key}"),
                message: e.to_string(),
            }),
            Err(_) => Err(StoreError::Redis {
                addr: self.addr.clone(),
                op: format!("{op} {key}"),
                message: format!("no answer within {} ms", self.timeout.as_millis()),
            }),
        }
    }

    /// Runs an idempotent command, again once if the connection turns out to have dropped: the
    /// first command after Redis restarts meets the dead connection, the retry a new one. (Saves
    /// are not retried: their first attempt may have been applied.)
    async fn idempotent<T, F, Fut>(&self, op: &str, key: &str, attempt: F) -> Result<T, StoreError>
    where
        F: Fn(RedisConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let twice = async {
            match attempt(self.conn.clone()).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                    attempt(self.conn.clone()).await
                }
                r => r,
            }
        };
        self.call(op, key, twice).await
    }

    /// The fields of a hash, `None` for the absent ones.
    async fn hmget(&self, key: &str, fields: &[&str]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let values: Vec<Option<Vec<u8>>> = self
            .idempotent("HMGET", key, |mut conn| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(fields)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        if values.len() != fields.len() {
            return Err(bad(
                key,
                format!(
                    "HMGET answered {} values for {}",
                    values.len(),
                    fields.len()
                ),
            ));
        }
        Ok(values)
    }

    /// The version of the stored state (0 = none).
    pub async fn stored_version(&self) -> Result<u64, StoreError> {
        let v = self.hmget(STATE_KEY, &["version"]).await?;
        match v.into_iter().next().flatten() {
            None => Ok(0),
            Some(b) => {
                decimal::<u64>(&b).ok_or_else(|| bad(STATE_KEY, "field version is not a number"))
            }
        }
    }
}

/// A value the limiter script writes as two numbers, `"<a> <b>"`.
fn pair(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|&b| b == b' ')?;
    Some((&value[..space], &value[space + 1..]))
}

/// A decimal number in a Redis value.
fn decimal<T: std::str::FromStr>(bytes: &[u8]) -> Option<T> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// A whole number of milliseconds or a count, also when written by a script as `12.0` or
/// `1.7e+12` (Lua has only floats).
fn whole(bytes: &[u8]) -> Option<u64> {
    decimal::<u64>(bytes).or_else(|| {
        decimal::<f64>(bytes)
            .filter(|x| x.is_finite() && *x >= 0.0)
            .map(|x| x as u64)
    })
}

fn bad(key: &str, message: impl Into<String>) -> StoreError {
    StoreError::BadValue {
        key: key.to_owned(),
        message: message.into(),
    }
}

#[tonic::async_trait]
impl Store for RedisStore {
    async fn load(&self) -> Result<Option<StoredState>, StoreError> {
        let mut v = self
            .hmget(STATE_KEY, &["version", "state"])
            .await?
            .into_iter();
        let (version, bytes) = (v.next().flatten(), v.next().flatten());
        let Some(bytes) = bytes else {
            return match version {
                None => Ok(None),
                Some(_) => Err(bad(STATE_KEY, "field version is set but state is missing")),
            };
        };
        let state = StoredState::decode(bytes.as_slice())
            .map_err(|e| bad(STATE_KEY, format!("field state: {e}")))?;
        let inner = state.config.as_ref().map_or(0, |c| c.version);
        if version.as_deref().and_then(decimal::<u64>) != Some(inner) {
            let outer = String::from_utf8_lossy(version.as_deref().unwrap_or_default());
            return Err(bad(
                STATE_KEY,
                format!("field version {outer:?} differs from the state's version {inner}"),
            ));
        }
        Ok(Some(state))
    }

    /// Asks the node that holds the state (`EXISTS` on its key: cheap, and routed to that node
    /// in a cluster).
    async fn ping(&self) -> Result<(), StoreError> {
        let _: i64 = self
            .idempotent("EXISTS", STATE_KEY, |mut conn| async move {
                redis::cmd("EXISTS")
                    .arg(STATE_KEY)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        let attempted = state.config.as_ref().map_or(0, |c| c.version);
        let mut conn = self.conn.clone();
        let mut invocation = self.save_script.prepare_invoke();
        invocation
            .key(STATE_KEY)
            .arg(attempted)
            .arg(state.encode_to_vec())
            .arg(CHANGES_CHANNEL);
        let (written, stored): (i64, String) = self
            .call("EVALSHA", STATE_KEY, invocation.invoke_async(&mut conn))
            .await?;
        if written == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                stored: stored.parse().unwrap_or(0),
                attempted,
            })
        }
    }
}

impl RedisStore {
    /// `GET key`, retried like every idempotent call.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.idempotent("GET", key, |mut conn| async move {
            redis::cmd("GET").arg(key).query_async(&mut conn).await
        })
        .await
    }
}

#[tonic::async_trait]
impl SharedLimits for RedisStore {
    async fn gcra(&self, identity: &str) -> Result<Option<GcraState>, StoreError> {
        let key = redis_keys::gcra_key(identity);
        let value = self.get(&key).await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let (tat, t) = pair(&value)
            .and_then(|(a, b)| Some((decimal::<f64>(a)?, decimal::<f64>(b)?)))
            .filter(|(a, b)| a.is_finite() && b.is_finite())
            .ok_or_else(|| bad(&key, "is not a GCRA state \"<tat_ms> <interval_ms>\""))?;
        Ok(Some(GcraState {
            tat_ms: tat,
            interval_ms: Some(t),
        }))
    }

    async fn ban(&self, identity: &str, now_ms: u64) -> Result<Option<BanInfo>, StoreError> {
        let key = redis_keys::ban_key(identity);
        let value = self.get(&key).await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let (until_ms, count) = pair(&value)
            .and_then(|(a, b)| Some((whole(a)?, whole(b)?)))
            .ok_or_else(|| bad(&key, "is not a ban \"<until_ms> <count>\""))?;
        Ok((until_ms > now_ms).then(|| BanInfo {
            client: identity.to_owned(),
            until_ms,
            count: u32::try_from(count).unwrap_or(u32::MAX),
            node_id: String::new(),
        }))
    }

    async fn bans(&self, now_ms: u64) -> Result<Vec<BanInfo>, StoreError> {
        let mut out = Vec::new();
        let pattern = redis_keys::BAN_KEY_PATTERN;
        let mut conn = self.conn.clone();
        let mut scan = self
            .idempotent("SCAN", pattern, |mut conn| async move {
                Scan::start(&mut conn, pattern, SCAN_COUNT).await
            })
            .await?;
        loop {
            // A step only advances when it succeeds, so a dropped connection can retry it.
            let step = async {
                match scan.next(&mut conn).await {
                    Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                        scan.next(&mut conn).await
                    }
                    r => r,
                }
            };
            let Some(keys) = self.call("SCAN", pattern, step).await? else {
                return Ok(out);
            };
            let keys: Vec<(String, String)> = keys
                .into_iter()
                .filter_map(|k| {
                    let client = redis_keys::identity_of_ban_key(&k)?.to_owned();
                    Some((k, client))
                })
                .collect();
            // One round trip for the whole batch (on Redis Cluster, one per slot, in parallel).
            let values: Vec<Option<Vec<u8>>> = if keys.is_empty() {
                Vec::new()
            } else {
                self.idempotent("MGET", pattern, |mut conn| {
                    let mut get = redis::cmd("MGET");
                    for (k, _) in &keys {
                        get.arg(k);
                    }
                    async move { get.query_async(&mut conn).await }
                })
                .await?
            };
            if values.len() != keys.len() {
                return Err(bad(
                    pattern,
                    format!(
                        "MGET answered {} values for {} keys",
                        values.len(),
                        keys.len()
                    ),
                ));
            }
            for ((key, client), value) in keys.into_iter().zip(values) {
                // Expired between SCAN and GET.
                let Some(value) = value else {
                    continue;
                };
                let (until_ms, count) = pair(&value)
                    .and_then(|(a, b)| Some((whole(a)?, whole(b)?)))
                    .ok_or_else(|| bad(&key, "is not a ban \"<until_ms> <count>\""))?;
                if until_ms > now_ms {
                    out.push(BanInfo {
                        client,
                        until_ms,
                        count: u32::try_from(count).unwrap_or(u32::MAX),
                        node_id: String::new(),
                    });
                    if out.len() >= MAX_BANS_LISTED {
                        return Ok(out);
                    }
                }
            }
        }
    }

    async fn lift(&self, identity: &str) -> Result<(), StoreError> {
        let (ban, strikes) = (
            redis_keys::ban_key(identity),
            redis_keys::strikes_key(identity),
        );
        // Both keys carry the identity's hash tag, so one DEL is valid on Redis Cluster too.
        let _: i64 = self
            .idempotent("DEL", &ban, |mut conn| {
                let (ban, strikes) = (&ban, &strikes);
                async move {
                    redis::cmd("DEL")
                        .arg(ban)
                        .arg(strikes)
                        .query_async(&mut conn)
                        .await
                }
            })
            .await?;
        Ok(())
    }
}

/// A control plane whose state lives in `store`: loaded from it (or saved there as version 1
/// from `initial` when it holds none), every change saved there, the changes other control
/// planes save followed, and key usage and bans read from the data planes' shared state.
pub async fn control_plane(
    store: Arc<RedisStore>,
    initial: lb_proto::v1::ConfigSnapshot,
    admin_token: String,
    cluster_token: Option<String>,
) -> Result<Arc<ControlPlane>, UpdateError> {
    let cp = ControlPlane::new(
        Arc::clone(&store) as Arc<dyn Store>,
        initial,
        admin_token,
        cluster_token,
    )
    .await?
    .with_shared_limits(Arc::clone(&store) as Arc<dyn SharedLimits>);
    let cp = Arc::new(cp);
    // Tells this replica's own messages apart on the shared channel; not a secret.
    let origin = format!("{:032x}", fastrand::u128(..));
    let (tx, rx) = tokio::sync::mpsc::channel(REPORTS_QUEUED);
    let _ = cp.report_sink.set(tx);
    tokio::spawn(publish_reports(Arc::clone(&store), origin.clone(), rx));
    tokio::spawn(follow(
        store,
        Arc::downgrade(&cp),
        cp.stopping(),
        Some(origin),
    ));
    Ok(cp)
}

/// Publishes this control plane's reports on [`REPORTS_CHANNEL`] until its sink closes.
async fn publish_reports(
    store: Arc<RedisStore>,
    origin: String,
    mut reports: tokio::sync::mpsc::Receiver<lb_proto::v1::StatsReport>,
) {
    use prost::Message;
    let mut failing = false;
    while let Some(report) = reports.recv().await {
        let mut payload = Vec::with_capacity(ORIGIN_LEN + report.encoded_len());
        payload.extend_from_slice(origin.as_bytes());
        report.encode(&mut payload).expect("a Vec grows as needed");
        let mut conn = store.conn.clone();
        let sent = tokio::time::timeout(
            store.timeout,
            redis::cmd("PUBLISH")
                .arg(REPORTS_CHANNEL)
                .arg(payload)
                .query_async::<i64>(&mut conn),
        )
        .await;
        match sent {
            Ok(Ok(_)) => failing = false,
            // Said once per outage: reports come every second.
            _ if !failing => {
                failing = true;
                tracing::warn!(redis = %store.addr, "cannot share data-plane reports with other control planes");
            }
            _ => {}
        }
    }
}

/// A report published by another control plane, or why it is unusable.
fn foreign_report(
    payload: &[u8],
    origin: &str,
) -> Result<Option<lb_proto::v1::StatsReport>, String> {
    use prost::Message;
    if payload.len() < ORIGIN_LEN {
        return Err(format!(
            "{} bytes, shorter than the origin id",
            payload.len()
        ));
    }
    let (from, body) = payload.split_at(ORIGIN_LEN);
    if from == origin.as_bytes() {
        return Ok(None);
    }
    lb_proto::v1::StatsReport::decode(body)
        .map(Some)
        .map_err(|e| format!("not a StatsReport: {e}"))
}

/// Follows [`CHANGES_CHANNEL`] and adopts every newer state into `cp`, until `cp` stops or is
/// dropped. Runs on a pub/sub connection of its own, reconnected with backoff when Redis goes
/// away.
pub fn spawn_follower(store: Arc<RedisStore>, cp: &Arc<ControlPlane>) -> JoinHandle<()> {
    let stop = cp.stopping();
    tokio::spawn(follow(store, Arc::downgrade(cp), stop, None))
}

/// Adopts the stored state when it is newer than `cp`'s, and saves `cp`'s again when Redis holds
/// an older one (saves never go backwards, so Redis lost data).
async fn catch_up(store: &RedisStore, cp: &ControlPlane) {
    let ours = cp.version();
    match store.stored_version().await {
        Ok(v) if v > ours => {
            if let Err(e) = cp.reload().await {
                tracing::warn!(error = %e, "cannot load the newer state from Redis");
            }
        }
        Ok(v) if v < ours => {
            tracing::warn!(
                redis = %store.addr,
                stored = v,
                published = ours,
                "Redis lost the state (restarted without persistence?); saving it again"
            );
            if let Err(e) = cp.resave().await {
                tracing::warn!(error = %e, "cannot save the state to Redis again");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the stored version"),
    }
}

/// Resolves when `stop` says so or its control plane is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// With `origin`, also adds up the reports other control planes publish.
async fn follow(
    store: Arc<RedisStore>,
    cp: Weak<ControlPlane>,
    mut stop: watch::Receiver<bool>,
    origin: Option<String>,
) {
    let mut backoff = BACKOFF_MIN;
    // Any node will do: on Redis Cluster a message published on one node reaches subscribers
    // on all. After a failure the next node named is tried.
    let clients = match store.target.node_clients() {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => return,
        Err(e) => {
            tracing::error!(redis = %store.addr, error = %e, "cannot follow configuration changes");
            return;
        }
    };
    let mut node = 0;
    loop {
        let client = &clients[node % clients.len()];
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANGES_CHANNEL).await?;
            if origin.is_some() {
                pubsub.subscribe(REPORTS_CHANNEL).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = tokio::select! {
            r = tokio::time::timeout(store.timeout, subscribe) => r,
            () = stopped(&mut stop) => return,
        };
        match subscribed {
            Ok(Ok(pubsub)) => {
                tracing::debug!(redis = %store.addr, "following configuration changes");
                backoff = BACKOFF_MIN;
                let Some(strong) = cp.upgrade() else { return };
                // Whatever was saved while not subscribed.
                catch_up(&store, &strong).await;
                drop(strong);
                let (mut sink, mut messages) = pubsub.split();
                let mut health = tokio::time::interval(HEALTH_INTERVAL);
                health.tick().await;
                loop {
                    tokio::select! {
                        msg = messages.next() => {
                            let Some(msg) = msg else { break };
                            let Some(strong) = cp.upgrade() else { return };
                            if msg.get_channel_name() == REPORTS_CHANNEL {
                                let Some(origin) = &origin else { continue };
                                match foreign_report(msg.get_payload_bytes(), origin) {
                                    Ok(Some(report)) => strong.traffic.record(report, crate::clock::now_ms()),
                                    Ok(None) => {}
                                    Err(e) => tracing::debug!(error = %e, "ignored a message on {REPORTS_CHANNEL}"),
                                }
                                continue;
                            }
                            let announced = msg.get_payload::<String>().ok().and_then(|p| p.parse::<u64>().ok());
                            // An unreadable announcement still means something changed.
                            if announced.is_none_or(|v| v > strong.version())
                                && let Err(e) = strong.reload().await
                            {
                                tracing::warn!(error = %e, "cannot load the newer state from Redis");
                            }
                        }
                        _ = health.tick() => {
                            let ping = tokio::time::timeout(store.timeout, sink.ping::<redis::Value>()).await;
                            if !matches!(ping, Ok(Ok(_))) { break; }
                            let Some(strong) = cp.upgrade() else { return };
                            catch_up(&store, &strong).await;
                        }
                        () = stopped(&mut stop) => return,
                    }
                }
                tracing::warn!(redis = %store.addr, "lost the subscription to configuration changes; reconnecting");
            }
            Ok(Err(e)) => {
                tracing::warn!(redis = %store.addr, error = %e, "cannot subscribe to configuration changes");
            }
            Err(_) => {
                tracing::warn!(redis = %store.addr, "cannot subscribe to configuration changes: no answer");
            }
        }
        node += 1;
        let half = backoff / 2;
        let delay = half + half.mul_f64(fastrand::f64());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn reports_from_other_control_planes_are_decoded_and_bad_ones_named() {
        let ours = "a".repeat(ORIGIN_LEN);
        let theirs = "b".repeat(ORIGIN_LEN);
        let report = lb_proto::v1::StatsReport {
            interval_ms: 1000,
            ..Default::default()
        };
        let mut payload = theirs.into_bytes();
        report.encode(&mut payload).unwrap();
        assert_eq!(foreign_report(&payload, &ours), Ok(Some(report.clone())));
        let mut own = ours.clone().into_bytes();
        report.encode(&mut own).unwrap();
        assert_eq!(foreign_report(&own, &ours), Ok(None));
        assert!(
            foreign_report(b"short", &ours)
                .unwrap_err()
                .contains("origin")
        );
        let mut garbage = "c".repeat(ORIGIN_LEN).into_bytes();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(
            foreign_report(&garbage, &ours)
                .unwrap_err()
                .contains("StatsReport")
        );
    }
}

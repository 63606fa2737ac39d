//! The way to Redis shared by the rate limiter, the response cache and the control plane's
//! store: one Redis server, or a Redis Cluster.
//!
//! - `redis://[user:password@]host:port[/db]` names one server; `rediss://` the same over TLS.
//! - `redis+cluster://[user:password@]host:port[,host:port...]` names a Redis Cluster by one or
//!   more of its nodes (`rediss+cluster://` over TLS). The other nodes and the slot map are
//!   learned from them; each command goes to the node holding its keys' slot, and the map is
//!   refreshed when slots move or a node fails over.
//!
//! Every script and multi-key command the planes send touches keys of one hash tag, so it runs
//! on one slot. What does span slots is sent per slot ([`crate::ratelimit::redis::check_many`])
//! or per node ([`scan`]).

pub mod link;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

const CLUSTER_SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// A Redis to connect to: one server or a cluster, as its URL says.
#[derive(Clone)]
pub struct RedisTarget {
    pub url: String,
    /// PEM CA certificates a TLS server's certificate must chain to; `None`: the system's
    /// roots.
    pub root_ca: Option<Arc<[u8]>>,
}

/// How long connecting and answering may take, and how often to retry.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    /// Attempts after the first to (re)connect before a call fails.
    pub retries: u32,
}

/// The nodes a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    One(String),
    /// One `redis://` or `rediss://` URL per seed node, each with the credentials.
    Cluster(Vec<String>),
}

/// Why a Redis URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

/// Reads a Redis URL into the nodes it names. A cluster URL lists `host:port` seeds after the
/// optional credentials; it has no database (a cluster has only database 0) and no options.
pub fn endpoints(url: &str) -> Result<Endpoints, UrlError> {
    let bad = |m: &str| Err(UrlError(m.to_owned()));
    let Some((rest, scheme)) = CLUSTER_SCHEMES
        .iter()
        .find_map(|(c, one)| url.strip_prefix(c).map(|r| (r, *one)))
    else {
        if ["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|s| url.starts_with(s))
        {
            return Ok(Endpoints::One(url.to_owned()));
        }
        return bad("must be a redis://, rediss://, redis+cluster:// or rediss+cluster:// URL");
    };
    let (credentials, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    if hosts.contains(['/', '?', '#']) {
        return bad(
            "a redis+cluster:// URL takes no database or options: every cluster node serves database 0 only",
        );
    }
    let mut seeds = Vec::new();
    for host in hosts.split(',') {
        let Some((name, port)) = host.rsplit_once(':') else {
            return bad(&format!("cluster node {host:?} is not host:port"));
        };
        if name.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return bad(&format!("cluster node {host:?} is not host:port"));
        }
        seeds.push(format!("{scheme}{credentials}{host}"));
    }
    Ok(Endpoints::Cluster(seeds))
}

impl RedisTarget {
    pub fn new(url: impl Into<String>) -> RedisTarget {
        RedisTarget {
            url: url.into(),
            root_ca: None,
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(endpoints(&self.url), Ok(Endpoints::Cluster(_)))
    }

    pub fn is_tls(&self) -> bool {
        self.url.starts_with("rediss")
    }

    /// The nodes named, as `host:port` (without credentials), for messages.
    pub fn addr(&self) -> String {
        match endpoints(&self.url) {
            Ok(Endpoints::One(url)) => self
                .client_for(&url)
                .map(|c| c.get_connection_info().addr().to_string())
                .unwrap_or_else(|_| "redis".to_owned()),
            Ok(Endpoints::Cluster(_)) => {
                let rest = self.url.split_once("://").map_or("", |x| x.1);
                let hosts = rest.rsplit_once('@').map_or(rest, |x| x.1);
                format!("cluster {}", hosts.trim_end_matches('/'))
            }
            Err(_) => "redis".to_owned(),
        }
    }

    fn client_for(&self, url: &str) -> RedisResult<redis::Client> {
        match &self.root_ca {
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            ),
            None => redis::Client::open(url),
        }
    }

    /// A client of each node named: the server, or every seed of a cluster. Pub/sub uses
    /// these: a message published on any node of a cluster reaches subscribers on every node.
    pub fn node_clients(&self) -> RedisResult<Vec<redis::Client>> {
        let urls = match endpoints(&self.url) {
            Ok(Endpoints::One(url)) => vec![url],
            Ok(Endpoints::Cluster(seeds)) => seeds,
            Err(e) => return Err(invalid(&e.0)),
        };
        urls.iter().map(|u| self.client_for(u)).collect()
    }

    fn cluster_client(&self, seeds: &[String], t: Timeouts) -> RedisResult<ClusterClient> {
        let mut b = ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(t.connect)
            .response_timeout(t.response)
            .retries(t.retries);
        if let Some(pem) = &self.root_ca {
            b = b.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            });
        }
        b.build()
    }

    /// A connection that reconnects by itself, opened now: fails when Redis does not answer.
    pub async fn connect(&self, t: Timeouts) -> RedisResult<RedisConn> {
        match endpoints(&self.url).map_err(|e| invalid(&e.0))? {
            Endpoints::One(url) => {
                let client = self.client_for(&url)?;
                ConnectionManager::new_with_config(client, manager_config(t))
                    .await
                    .map(RedisConn::One)
            }
            Endpoints::Cluster(seeds) => {
                let client = self.cluster_client(&seeds, t)?;
                client
                    .get_async_connection_with_config(cluster_config(t))
                    .await
                    .map(RedisConn::Cluster)
            }
        }
    }

    /// A connection that reconnects by itself and opens on first use. Must be called on the
    /// runtime that will use it.
    pub fn connect_lazy(&self, t: Timeouts) -> RedisResult<RedisConn> {
        match endpoints(&self.url).map_err(|e| invalid(&e.0))? {
            Endpoints::One(url) => {
                let client = self.client_for(&url)?;
                ConnectionManager::new_lazy_with_config(client, manager_config(t))
                    .map(RedisConn::One)
            }
            Endpoints::Cluster(seeds) => {
                let client = self.cluster_client(&seeds, t)?;
                Ok(RedisConn::Cluster(
                    client.get_pending_async_connection_with_config(cluster_config(t)),
                ))
            }
        }
    }
}

impl std::fmt::Debug for RedisTarget {
    // The URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("cluster", &self.is_cluster())
            .field("tls", &self.is_tls())
            .field("root_ca", &self.root_ca.is_some())
            .finish_non_exhaustive()
    }
}

fn invalid(message: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "unusable redis URL",
        message.to_owned(),
    ))
}

fn manager_config(t: Timeouts) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(t.connect))
        .set_response_timeout(Some(t.response))
        .set_number_of_retries(t.retries as usize)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2))
}

fn cluster_config(t: Timeouts) -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(t.connect)
        .set_response_timeout(t.response)
}

/// A connection to one Redis or to a cluster; commands, pipelines and scripts run on either.
/// Cheap to clone: clones share the connections.
#[derive(Clone)]
pub enum RedisConn {
    One(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::One(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::One(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::One(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The primaries of a cluster as `(host, port)`, from `CLUSTER SLOTS`.
async fn primaries(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let slots: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let mut out: Vec<(String, u16)> = Vec::new();
    for range in slots {
        // [start, end, [host, port, id, ...], replicas...]
        let Value::Array(parts) = range else { continue };
        let Some(Value::Array(node)) = parts.get(2) else {
            continue;
        };
        let host: Option<String> = node
            .first()
            .and_then(|v| redis::from_redis_value(v.clone()).ok());
        let port: Option<u16> = node
            .get(1)
            .and_then(|v| redis::from_redis_value(v.clone()).ok());
        if let (Some(host), Some(port)) = (host, port)
            && !out.iter().any(|(h, p)| *h == host && *p == port)
        {
            out.push((host, port));
        }
    }
    if out.is_empty() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "CLUSTER SLOTS named no primary",
        )));
    }
    Ok(out)
}

/// The keys matching a pattern, step by step with `SCAN`, on the one server or on every primary
/// of a cluster in turn. Keys created or deleted meanwhile may or may not be seen, as with
/// `SCAN`; each step is bounded by the connection's response timeout.
pub struct Scan {
    pattern: String,
    count: usize,
    /// Primaries still to scan (`None`: the one server), the current one last.
    nodes: Vec<Option<(String, u16)>>,
    cursor: u64,
}

impl Scan {
    /// A scan of `pattern`, asking for `count` keys per step.
    pub async fn start(conn: &mut RedisConn, pattern: &str, count: usize) -> RedisResult<Scan> {
        let mut nodes = match conn {
            RedisConn::One(_) => vec![None],
            RedisConn::Cluster(c) => primaries(c).await?.into_iter().map(Some).collect(),
        };
        nodes.reverse();
        Ok(Scan {
            pattern: pattern.to_owned(),
            count,
            nodes,
            cursor: 0,
        })
    }

    /// The next keys (possibly none), or `None` when every node has been scanned.
    pub async fn next(&mut self, conn: &mut RedisConn) -> RedisResult<Option<Vec<String>>> {
        let Some(node) = self.nodes.last() else {
            return Ok(None);
        };
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(self.count);
        let reply: Value = match (node, &mut *conn) {
            (Some((host, port)), RedisConn::Cluster(c)) => {
                let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                c.route_command(cmd, at).await?
            }
            (_, c) => cmd.query_async(c).await?,
        };
        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
        self.cursor = next;
        if next == 0 {
            self.nodes.pop();
        }
        Ok(Some(keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_list_their_seeds_with_the_credentials() {
        assert_eq!(
            endpoints("redis+cluster://u:p@a:7000,b:7001/"),
            Ok(Endpoints::Cluster(vec![
                "redis://u:p@a:7000".into(),
                "redis://u:p@b:7001".into()
            ]))
        );
        assert_eq!(
            endpoints("rediss+cluster://[::1]:7000"),
            Ok(Endpoints::Cluster(vec!["rediss://[::1]:7000".into()]))
        );
        assert_eq!(
            endpoints("redis://a:6379/2"),
            Ok(Endpoints::One("redis://a:6379/2".into()))
        );
    }

    #[test]
    fn unusable_urls_say_what_is_wrong() {
        for (url, says) in [
            ("http://a:1", "must be a redis://"),
            ("redis+cluster://a:7000/1", "no database"),
            ("redis+cluster://a:7000,b", "\"b\" is not host:port"),
            ("redis+cluster://a:0", "\"a:0\" is not host:port"),
            ("redis+cluster://", "\"\" is not host:port"),
            ("redis+cluster://a:1?x=1", "no database or options"),
        ] {
            let e = endpoints(url).unwrap_err();
            assert!(e.0.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn messages_name_the_nodes_not_the_password() {
        let t = RedisTarget::new("redis+cluster://u:secret@a:7000,b:7001");
        assert_eq!(t.addr(), "cluster a:7000,b:7001");
        assert!(t.is_cluster());
        assert!(!format!("{t:?}").contains("secret"));
    }
}

//! A redis-server of the test's own on a free port, stopped (killed) on drop or on demand, and
//! restartable on the same port. Shared by the data plane's and the control plane's tests.
//! [`RedisServer::start_tls`] starts one that speaks TLS only (`rediss://`); [`RedisCluster`]
//! forms a Redis Cluster of several.

#![allow(dead_code)]

// Each support file can be used on its own, so each that needs these loads them.
#[allow(clippy::duplicate_mod)]
#[path = "common.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TempDir, free_port, poll_until, poll_within};

/// The default tier's limit (5 a minute), as the tests on Redis check it.
pub const FREE: data_plane::ratelimit::gcra::Rate = data_plane::ratelimit::gcra::Rate {
    requests: 5,
    period_ms: 60_000,
};

/// The default ban policy: three strikes in a minute, five minutes doubling up to a day.
pub const BAN: data_plane::ratelimit::gcra::BanRule = data_plane::ratelimit::gcra::BanRule {
    strikes: 3,
    strike_window_ms: 60_000,
    base_ban_ms: 300_000,
    multiplier: 2,
    max_ban_ms: 86_400_000,
    strike_decay_ms: 3_600_000,
};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// PEM CA certificate of a TLS server: its clients trust it, its URL is `rediss://`.
    tls_ca: Option<Vec<u8>>,
}

/// Arguments for TLS only on `port` with this certificate chain, key and CA; clients are not
/// asked for certificates.
fn tls_args<'a>(
    port: &'a str,
    cert: &'a Path,
    key: &'a Path,
    ca: &'a Path,
) -> [&'a std::ffi::OsStr; 12] {
    [
        "--port".as_ref(),
        "0".as_ref(),
        "--tls-port".as_ref(),
        port.as_ref(),
        "--tls-cert-file".as_ref(),
        cert.as_ref(),
        "--tls-key-file".as_ref(),
        key.as_ref(),
        "--tls-ca-cert-file".as_ref(),
        ca.as_ref(),
        "--tls-auth-clients".as_ref(),
        "no".as_ref(),
    ]
}

/// How many free ports a server is tried on: another process may take a port between our
/// finding it free and redis-server binding it.
const PORT_ATTEMPTS: usize = 5;

impl RedisServer {
    pub async fn start() -> RedisServer {
        on_a_free_port(RedisServer::try_start_on).await
    }

    /// A server on `port` (a restart on the port of one killed).
    pub async fn start_on(port: u16) -> RedisServer {
        RedisServer::try_start_on(port)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn try_start_on(port: u16) -> Result<RedisServer, String> {
        RedisServer::spawn(&["--port".as_ref(), port.to_string().as_ref()], port, None).await
    }

    /// A server on a free port speaking TLS only, with the certificate chain and key given;
    /// clients are not asked for certificates. `ca` is the PEM file clients verify it with.
    pub async fn start_tls(cert: &Path, key: &Path, ca: &Path) -> RedisServer {
        let pem = std::fs::read(ca).unwrap();
        on_a_free_port(|port| {
            let pem = pem.clone();
            async move {
                let port_arg = port.to_string();
                let args = tls_args(&port_arg, cert, key, ca);
                RedisServer::spawn(&args, port, Some(pem)).await
            }
        })
        .await
    }

    /// Starts `redis-server` with `args` plus loopback only and no persistence, and waits until
    /// it answers on `port`; or says why it exited first (its port was taken, say).
    async fn spawn(
        args: &[&std::ffi::OsStr],
        port: u16,
        tls_ca: Option<Vec<u8>>,
    ) -> Result<RedisServer, String> {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        let mut server = RedisServer {
            child: Some(child),
            port,
            tls_ca,
        };
        let client = server.client();
        let pid = server.child.as_ref().unwrap().id();
        let answered = poll_until(&format!("redis-server to answer on {port}"), || {
            let exited = server.child.as_mut().unwrap().try_wait().unwrap();
            let client = client.clone();
            async move {
                if let Some(status) = exited {
                    return Ok(Err(format!("redis-server on {port} exited: {status}")));
                }
                let mut c = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                let info: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                // The server on the port is this one, not another that had the port first.
                let ours = format!("process_id:{pid}\r\n");
                if info.contains(&ours) {
                    Ok(Ok(()))
                } else {
                    Err(format!("not {ours:?}"))
                }
            }
        })
        .await;
        answered.map(|()| server)
    }

    /// A client of this server (trusting its CA when it speaks TLS).
    pub fn client(&self) -> redis::Client {
        match &self.tls_ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )
            .unwrap(),
            None => redis::Client::open(self.url()).unwrap(),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// A reconnecting connection, as the data planes hold.
    pub async fn manager(&self) -> data_plane::redis::RedisConn {
        data_plane::redis::RedisConn::One(
            redis::aio::ConnectionManager::new(self.client())
                .await
                .unwrap(),
        )
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until this server holds at least `n` response cache entries (a fill lands in Redis
    /// just after the body it stores); their keys.
    pub async fn wait_for_cache_entries(&self, n: usize) -> Vec<String> {
        let conn = self.conn().await;
        poll_until(&format!("{n} cache entries in Redis"), || {
            let mut conn = conn.clone();
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg("lb:cache:{*")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let entries: Vec<String> =
                    keys.into_iter().filter(|k| !k.contains(":lock:")).collect();
                if entries.len() >= n {
                    Ok(entries)
                } else {
                    Err(entries)
                }
            }
        })
        .await
    }

    /// Calls of one command since start, from `INFO commandstats`.
    pub async fn calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// Runs `start` on free ports until one serves.
async fn on_a_free_port<F: std::future::Future<Output = Result<RedisServer, String>>>(
    mut start: impl FnMut(u16) -> F,
) -> RedisServer {
    let mut failures = Vec::new();
    for _ in 0..PORT_ATTEMPTS {
        match start(free_port()).await {
            Ok(server) => return server,
            Err(e) => failures.push(e),
        }
    }
    panic!("redis-server did not start: {failures:?}")
}

/// A Redis Cluster of the test's own: `n` primaries on free ports, no replicas, the slots split
/// evenly, each node's cluster file in a directory removed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// Each node's cluster bus port, chosen free too: the default, its port + 10000, is past
    /// 65535 for ports above 55535, and redis-server then refuses to start.
    bus: Vec<u16>,
    dir: TempDir,
    /// Certificate, key and CA files when the nodes speak TLS only (to clients and each other).
    tls: Option<[std::path::PathBuf; 3]>,
}

impl RedisCluster {
    pub async fn start(n: usize) -> RedisCluster {
        RedisCluster::start_with(n, None).await
    }

    /// As [`RedisCluster::start`], every node speaking TLS only (to clients and on the cluster
    /// bus) with this certificate chain (usable as client certificate too), key and CA.
    pub async fn start_tls(n: usize, cert: &Path, key: &Path, ca: &Path) -> RedisCluster {
        RedisCluster::start_with(n, Some([cert.into(), key.into(), ca.into()])).await
    }

    async fn start_with(n: usize, tls: Option<[std::path::PathBuf; 3]>) -> RedisCluster {
        let dir = TempDir::new("redis-cluster");
        let (mut nodes, mut bus) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let mut failures = Vec::new();
            let (node, bus_port) = loop {
                let (port, bus_port) = (free_port(), free_port());
                match RedisCluster::node(dir.path(), port, bus_port, tls.as_ref()).await {
                    Ok(node) => break (node, bus_port),
                    Err(e) if failures.len() + 1 < PORT_ATTEMPTS => failures.push(e),
                    Err(e) => panic!("a cluster node did not start: {failures:?} {e}"),
                }
            };
            nodes.push(node);
            bus.push(bus_port);
        }
        let cluster = RedisCluster {
            nodes,
            bus,
            dir,
            tls,
        };
        cluster.form().await;
        cluster
    }

    /// A cluster node on `port`, its cluster file in `dir` (so a restart rejoins as itself).
    async fn node(
        dir: &Path,
        port: u16,
        bus: u16,
        tls: Option<&[std::path::PathBuf; 3]>,
    ) -> Result<RedisServer, String> {
        let conf = dir.join(format!("nodes-{port}.conf"));
        let (port_arg, bus_arg) = (port.to_string(), bus.to_string());
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--cluster-port".as_ref(),
            bus_arg.as_ref(),
            "--cluster-enabled".as_ref(),
            "yes".as_ref(),
            "--cluster-config-file".as_ref(),
            conf.as_ref(),
            "--cluster-node-timeout".as_ref(),
            "2000".as_ref(),
        ];
        match tls {
            None => args.extend::<[&std::ffi::OsStr; 2]>(["--port".as_ref(), port_arg.as_ref()]),
            Some([cert, key, ca]) => {
                args.extend(tls_args(&port_arg, cert, key, ca));
                args.extend::<[&std::ffi::OsStr; 2]>(["--tls-cluster".as_ref(), "yes".as_ref()]);
            }
        }
        let ca = tls.map(|[_, _, ca]| std::fs::read(ca).unwrap());
        RedisServer::spawn(&args, port, ca).await
    }

    /// Kills node `i` (as a crash would).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its port and waits until the cluster is whole again.
    pub async fn restart(&mut self, i: usize) {
        let port = self.nodes[i].port;
        let node = RedisCluster::node(self.dir.path(), port, self.bus[i], self.tls.as_ref()).await;
        self.nodes[i] = node.unwrap_or_else(|e| panic!("{e}"));
        self.wait_ok().await;
    }

    /// The node holding `key`'s slot (the slots are split evenly, in node order).
    pub async fn node_of(&self, key: &str) -> usize {
        let slot: u32 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut self.nodes[0].conn().await)
            .await
            .unwrap();
        let n = self.nodes.len() as u32;
        (0..n).find(|&i| slot < 16384 * (i + 1) / n).unwrap() as usize
    }

    /// Splits the slots, introduces the nodes, and waits until every node sees them all and
    /// says the cluster is ok.
    async fn form(&self) {
        let n = self.nodes.len() as u32;
        for (i, node) in self.nodes.iter().enumerate() {
            let i = i as u32;
            let (first, last) = (16384 * i / n, 16384 * (i + 1) / n - 1);
            let mut c = node.conn().await;
            let _: () = redis::cmd("CLUSTER")
                .arg("SET-CONFIG-EPOCH")
                .arg(i + 1)
                .query_async(&mut c)
                .await
                .unwrap();
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        let mut first = self.nodes[0].conn().await;
        for (node, bus) in self.nodes[1..].iter().zip(&self.bus[1..]) {
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port)
                .arg(*bus)
                .query_async(&mut first)
                .await
                .unwrap();
        }
        self.wait_ok().await;
    }

    /// Waits until every node knows every other and says the cluster is ok.
    async fn wait_ok(&self) {
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        for node in &self.nodes {
            let c = node.conn().await;
            poll_within(Duration::from_secs(20), "the cluster to form", || {
                let (mut c, known) = (c.clone(), &known);
                async move {
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    let ok = info.contains("cluster_state:ok") && info.contains(known.as_str());
                    if ok { Ok(()) } else { Err(info) }
                }
            })
            .await;
        }
    }

    /// `redis+cluster://` naming every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let scheme = if self.tls.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://{}", hosts.join(","))
    }

    /// Keys held by each node.
    pub async fn sizes(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push(
                redis::cmd("DBSIZE")
                    .query_async(&mut n.conn().await)
                    .await
                    .unwrap(),
            );
        }
        out
    }

    /// Calls of one command on all nodes together.
    pub async fn calls(&self, command: &str) -> u64 {
        let mut total = 0;
        for n in &self.nodes {
            total += n.calls(command).await;
        }
        total
    }

    /// A cluster connection, as the data planes hold.
    pub async fn conn(&self) -> data_plane::redis::RedisConn {
        let target = data_plane::redis::RedisTarget {
            url: self.url(),
            root_ca: self.nodes[0].tls_ca.clone().map(std::sync::Arc::from),
        };
        target
            .connect(data_plane::redis::Timeouts {
                connect: Duration::from_secs(2),
                response: Duration::from_secs(2),
                retries: 2,
            })
            .await
            .unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // The nodes go before their directory.
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

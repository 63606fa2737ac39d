//! A redis-server of the test's own on a free port, stopped (killed) on drop or on demand, and
//! restartable on the same port. Shared by the data plane's and the control plane's tests.
//! [`RedisServer::start_tls`] starts one that speaks TLS only (`rediss://`).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// PEM CA certificate of a TLS server: its clients trust it, its URL is `rediss://`.
    tls_ca: Option<Vec<u8>>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer::start_on(port).await
    }

    pub async fn start_on(port: u16) -> RedisServer {
        RedisServer::spawn(&["--port".as_ref(), port.to_string().as_ref()], port, None).await
    }

    /// A server on a free port speaking TLS only, with the certificate chain and key given;
    /// clients are not asked for certificates. `ca` is the PEM file clients verify it with.
    pub async fn start_tls(cert: &Path, key: &Path, ca: &Path) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port_arg = port.to_string();
        let args: [&std::ffi::OsStr; 12] = [
            "--port".as_ref(),
            "0".as_ref(),
            "--tls-port".as_ref(),
            port_arg.as_ref(),
            "--tls-cert-file".as_ref(),
            cert.as_ref(),
            "--tls-key-file".as_ref(),
            key.as_ref(),
            "--tls-ca-cert-file".as_ref(),
            ca.as_ref(),
            "--tls-auth-clients".as_ref(),
            "no".as_ref(),
        ];
        RedisServer::spawn(&args, port, Some(std::fs::read(ca).unwrap())).await
    }

    /// Starts `redis-server` with `args` plus loopback only and no persistence, and waits until
    /// it answers on `port`.
    async fn spawn(args: &[&std::ffi::OsStr], port: u16, tls_ca: Option<Vec<u8>>) -> RedisServer {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        let server = RedisServer {
            child: Some(child),
            port,
            tls_ca,
        };
        server.wait_ready().await;
        server
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

    async fn wait_ready(&self) {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
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
    pub async fn manager(&self) -> redis::aio::ConnectionManager {
        redis::aio::ConnectionManager::new(self.client())
            .await
            .unwrap()
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

//! What the request path, the admin listener and the control link share: the settings, the
//! configuration in force (swapped atomically), the endpoint of every configured backend, the
//! metrics, the limiter, the cache, the reporter and the tracer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use lb_proto::v1::{ConfigSnapshot, directive};
use lb_proto::validate::{self, BackendProtocol, Invalid};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::Endpoint;
use crate::clock::millis;
use crate::config::active::{self, Active, Slot};
use crate::config::settings::Settings;
use crate::policy::admission::Admission;
use crate::policy::breaker::CircuitState;
use crate::ratelimit::Limiter;
use crate::ratelimit::local::LocalLimits;
use crate::redis::RedisTarget;
use crate::redis::link::Link;
use crate::redis::link::Health;
use crate::telemetry::metrics::{BackendSample, CacheSample, LiveValues, Metrics};
use crate::upstream::Transport;

/// State shared by the proxy, the admin listener and the discovery client.
pub struct Shared {
    pub settings: Settings,
    active: ArcSwapOption<Active>,
    /// Every configured backend's endpoint, by address (shared with the metrics collector).
    endpoints: Arc<Mutex<HashMap<String, Arc<Endpoint>>>>,
    pub metrics: Metrics,
    /// Upgraded connections open (bounded by `--max-tunnels`).
    pub tunnels: std::sync::atomic::AtomicUsize,
    pub control_plane_connected: AtomicBool,
    /// The last snapshot refused: its version and why.
    pub last_rejected: Mutex<Option<(u64, String)>>,
    /// Requests waiting for a backend with free capacity.
    pub admission: Arc<Admission>,
    pub limiter: Limiter,
    /// The link to Redis, when one is configured: the limiter's and the cache's.
    pub redis: Option<Arc<Link>>,
    /// Bumped by every apply, for lock-free checks on the request path.
    generation: AtomicU64,
    pub reporter: crate::telemetry::report::Reporter,
    /// The response cache (its policy follows the snapshot).
    pub cache: crate::cache::Cache,
    /// Highest directive sequence number run (ban lifts), so each runs once.
    directives_seen: AtomicU64,
    applied: watch::Sender<u64>,
    /// Span export, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub tracer: Option<crate::telemetry::otel::Tracing>,
    /// The proxy listener's TLS, when configured; an error here stops `run` before it serves.
    tls: Option<Result<Arc<crate::tls::Tls>, crate::tls::TlsError>>,
    /// TLS to backends, when configured; an error here stops `run` likewise.
    backend_tls: Option<Result<crate::tls::client::BackendTls, crate::tls::TlsError>>,
    /// TLS to `https://` backends when no backend TLS setting is given: the system's roots,
    /// read when the first such backend is configured.
    system_tls: std::sync::OnceLock<Result<crate::tls::client::BackendTls, crate::tls::TlsError>>,
    /// The `redis_ca` file could not be used; stops `run` likewise.
    redis_ca_error: Option<crate::tls::TlsError>,
}

impl Shared {
    pub fn new(settings: Settings) -> Shared {
        Shared::with_local_limits(settings, &LocalLimits::default())
    }

    /// As [`Shared::new`], keeping in-process limiter state in `local` (which other data planes
    /// of this process may share).
    pub fn with_local_limits(settings: Settings, local: &LocalLimits) -> Shared {
        let mut redis_ca_error = None;
        let redis = settings.redis.clone().map(|url| {
            let root_ca = settings.redis_ca.as_ref().and_then(|path| {
                crate::tls::client::read_roots("redis_ca", path)
                    .map(|roots| Arc::from(roots.pem))
                    .inspect_err(|e| tracing::error!(cause = %e, "Redis CA file not usable"))
                    .map_err(|e| redis_ca_error = Some(e))
                    .ok()
            });
            Arc::new(Link::new(RedisTarget { url, root_ca }))
        });
        let limiter = Limiter::with_local(redis.clone(), local);
        let cache_health = redis.as_ref().map_or_else(Arc::default, |l| Arc::clone(l.health()));
        let backend_tls = settings.backend_tls.as_ref().map(|b| {
            crate::tls::client::BackendTls::load(b)
                .inspect_err(|e| tracing::error!(cause = %e, "backend TLS not usable"))
        });
        let tracer = settings.tracing.as_ref().and_then(|t| {
            crate::telemetry::otel::Tracing::start(t, "data-plane", &settings.node_id)
                .inspect_err(|e| tracing::error!(cause = %e, "traces are not exported"))
                .ok()
        });
        let metrics = Metrics::new();
        let endpoints = Arc::default();
        let admission = Arc::new(Admission::new(0));
        let cache = crate::cache::Cache::with_health(
            crate::cache::Policy::from(&lb_proto::defaults::cache()),
            cache_health,
        );
        metrics.register_live(live_values(
            Arc::clone(&endpoints),
            Arc::clone(&admission),
            cache.clone(),
            redis.as_ref().map(|l| Arc::clone(l.health())),
        ));
        let tls = settings.tls.clone().map(|files| {
            crate::tls::Tls::load(files, metrics.tls().clone())
                .map(Arc::new)
                .inspect_err(|e| tracing::error!(cause = %e, "TLS certificate not usable"))
        });
        Shared {
            settings,
            active: ArcSwapOption::empty(),
            endpoints,
            metrics,
            tunnels: std::sync::atomic::AtomicUsize::new(0),
            control_plane_connected: AtomicBool::new(false),
            last_rejected: Mutex::new(None),
            admission,
            limiter,
            generation: AtomicU64::new(0),
            reporter: crate::telemetry::report::Reporter::default(),
            cache,
            redis,
            directives_seen: AtomicU64::new(u64::MAX),
            applied: watch::channel(0).0,
            tracer,
            tls,
            backend_tls,
            system_tls: std::sync::OnceLock::new(),
            redis_ca_error,
        }
    }

    /// The proxy listener's TLS, when configured and loaded.
    pub fn tls(&self) -> Option<&Arc<crate::tls::Tls>> {
        self.tls.as_ref().and_then(|t| t.as_ref().ok())
    }

    /// The reason TLS (the listener's, to backends or to Redis) is configured but cannot be
    /// used, if so.
    pub fn tls_error(&self) -> Option<&crate::tls::TlsError> {
        self.tls
            .as_ref()
            .and_then(|t| t.as_ref().err())
            .or_else(|| self.backend_tls.as_ref().and_then(|t| t.as_ref().err()))
            .or(self.redis_ca_error.as_ref())
    }

    /// How connections to the backend at `address` are opened: `https://` over TLS offering
    /// HTTP/2 and HTTP/1.1, `h2c://` in clear text, the others as `--backend-tls` says.
    fn transport(&self, address: &str) -> Result<Transport, Invalid> {
        let (protocol, target) = lb_proto::validate::backend_target(address);
        let tls = match protocol {
            BackendProtocol::H2c => return Ok(Transport::Plain),
            BackendProtocol::Http1 if !self.settings.backend_tls.as_ref().is_some_and(|b| b.all) => {
                return Ok(Transport::Plain);
            }
            BackendProtocol::Http1 => self.backend_tls.as_ref(),
            BackendProtocol::Https => Some(self.backend_tls.as_ref().unwrap_or_else(|| {
                self.system_tls.get_or_init(|| {
                    crate::tls::client::BackendTls::load(&Default::default())
                        .inspect_err(|e| tracing::error!(cause = %e, "https:// backends cannot be checked"))
                })
            })),
        };
        match tls {
            None => Ok(Transport::Plain),
            Some(Ok(tls)) => tls
                .for_backend(target, protocol == BackendProtocol::Https)
                .map(|(connector, name)| Transport::Tls { connector, name })
                .map_err(|e| Invalid::new("backend.address", e)),
            Some(Err(e)) => Err(Invalid::new("backend_tls", e)),
        }
    }

    /// The endpoint of a configured backend.
    pub fn endpoint(&self, address: &str) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        endpoints.get(address).cloned()
    }

    /// The configuration in force, if any yet.
    pub fn active(&self) -> Option<Arc<Active>> {
        self.active.load_full()
    }

    /// Changes with every applied configuration (even one with the same version number),
    /// read without a lock.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Version in force (0 = none), and a way to wait for a change.
    pub fn applied_version(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Checks a snapshot against the contract and this data plane's own rules, and builds what
    /// it would run on. Nothing is changed: a refused snapshot leaves no trace but the error.
    pub fn prepare(&self, snapshot: ConfigSnapshot) -> Result<Active, Invalid> {
        validate::snapshot(&snapshot)?;
        if !self.settings.allowed_backends.is_empty() {
            for b in &snapshot.backends {
                let target = lb_proto::validate::backend_target(&b.address).1;
                let (host, _) = target.rsplit_once(':').unwrap_or((target, ""));
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let allowed = host.parse::<IpAddr>().is_ok_and(|ip| {
                    self.settings
                        .allowed_backends
                        .iter()
                        .any(|n| n.contains(&ip))
                });
                if !allowed {
                    let nets: Vec<String> = self
                        .settings
                        .allowed_backends
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    return Err(Invalid::new(
                        "backends",
                        format_args!(
                            "backend {} is outside the networks this data plane may reach ({})",
                            b.address,
                            nets.join(", ")
                        ),
                    ));
                }
            }
        }
        // Everything that can fail is checked before anything is made: a refused snapshot
        // leaves no trace but the error. New endpoints join the registry when it is applied.
        let breaker = snapshot.circuit_breaker.unwrap_or_default();
        let known: HashMap<String, Arc<Endpoint>> = {
            let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            snapshot
                .backends
                .iter()
                .filter_map(|b| Some((b.address.clone(), Arc::clone(endpoints.get(&b.address)?))))
                .collect()
        };
        let mut new = HashMap::new();
        for b in snapshot.backends.iter().filter(|b| !known.contains_key(&b.address)) {
            let made = (Endpoint::authority(&b.address)?, self.transport(&b.address)?);
            new.insert(b.address.clone(), made);
        }
        active::check(&snapshot)?;
        let queue = snapshot.queue.unwrap_or_default();
        let mut made: HashMap<String, Arc<Endpoint>> = HashMap::new();
        let mut slots = Vec::with_capacity(snapshot.backends.len());
        for b in &snapshot.backends {
            let endpoint = match (known.get(&b.address), new.remove(&b.address)) {
                (Some(e), _) => Arc::clone(e),
                (None, Some((authority, transport))) => {
                    let e = Arc::new(Endpoint::new(
                        &b.address,
                        authority,
                        &self.metrics,
                        self.settings.workers,
                        &breaker,
                        transport,
                    ));
                    made.insert(b.address.clone(), Arc::clone(&e));
                    e
                }
                // The same address twice (validation refuses it): one endpoint for both.
                (None, None) => Arc::clone(&made[&b.address]),
            };
            slots.push(Slot {
                endpoint,
                weight: b.weight,
                draining: b.draining,
                max_in_flight: if b.max_in_flight > 0 {
                    b.max_in_flight
                } else {
                    queue.max_in_flight_per_backend
                },
            });
        }
        Active::build(snapshot, slots)
    }

    /// The Prometheus text of every metric, per-backend counters included.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// Runs the snapshot's directives not run yet. The first snapshot only sets the mark: its
    /// directives predate this process, whose in-process state they cannot concern.
    fn run_directives(&self, snapshot: &ConfigSnapshot) {
        let newest = snapshot.directives.iter().map(|d| d.seq).max().unwrap_or(0);
        let seen = self.directives_seen.swap(newest, Ordering::Relaxed);
        if seen == u64::MAX {
            return;
        }
        for d in snapshot.directives.iter().filter(|d| d.seq > seen) {
            match &d.kind {
                Some(directive::Kind::LiftBan(l)) => {
                    self.limiter.lift_local_ban(&l.client);
                    tracing::info!(client = %l.client, "ban lifted");
                }
                Some(directive::Kind::Purge(p)) => {
                    if let Some(purge) = crate::cache::Purge::from_proto(p) {
                        let cache = self.cache.clone();
                        let redis = self.redis.clone();
                        tracing::info!(?purge, "cache purge");
                        // Every data plane purges its memory tier, and Redis too (the same
                        // keys many times over is harmless; one data plane missing is not).
                        tokio::spawn(async move {
                            let conn = match &redis {
                                Some(link) => link.connect().await,
                                None => None,
                            };
                            if let Err(e) = cache.purge(conn.as_ref(), &purge).await {
                                tracing::warn!(cause = %e, "cache purge in redis failed");
                            }
                        });
                    }
                }
                None => {}
            }
        }
    }

    /// Puts a prepared configuration in force, in one atomic swap.
    pub fn apply(&self, active: Active) {
        let version = active.version();
        let keep: std::collections::HashSet<&str> = active
            .slots
            .iter()
            .map(|s| s.endpoint.address.as_str())
            .collect();
        {
            let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            let breaker = active.snapshot.circuit_breaker.unwrap_or_default();
            for slot in &active.slots {
                slot.endpoint.set_breaker_policy(&breaker);
                endpoints
                    .entry(slot.endpoint.address.clone())
                    .or_insert_with(|| Arc::clone(&slot.endpoint));
            }
            endpoints.retain(|addr, e| {
                let k = keep.contains(addr.as_str());
                if !k {
                    self.metrics.forget_backend(addr);
                    e.idle.clear();
                }
                k
            });
        }
        self.admission.set_capacity(active.queue.capacity as usize);
        self.cache.set_policy(crate::cache::Policy::from(
            &active.snapshot.cache.clone().unwrap_or_default(),
        ));
        self.run_directives(&active.snapshot);
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.active.store(Some(Arc::new(active)));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.applied.send_replace(version);
    }
}

/// What the metrics collector reads at each scrape.
fn live_values(
    endpoints: Arc<Mutex<HashMap<String, Arc<Endpoint>>>>,
    admission: Arc<Admission>,
    cache: crate::cache::Cache,
    redis: Option<Arc<Health>>,
) -> impl Fn() -> LiveValues + Send + Sync + 'static {
    move || {
        let now_ms = millis(Instant::now());
        let backends = endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| BackendSample {
                address: e.address.clone(),
                requests: e.requests.load(Ordering::Relaxed),
                errors: e.errors.load(Ordering::Relaxed),
                in_flight: e.in_flight(),
                healthy: e.is_healthy(),
                ejected: e.is_ejected(now_ms),
                circuit: match e.circuit_state() {
                    CircuitState::Closed => 0,
                    CircuitState::Open => 1,
                    CircuitState::HalfOpen => 2,
                },
            })
            .collect();
        let c = cache.stats();
        LiveValues {
            backends,
            queue_depth: admission.depth(),
            cache: CacheSample {
                hits_memory: c.hits_memory,
                hits_shared: c.hits_shared,
                hits_coalesced: c.hits_coalesced,
                hits_stale: c.hits_stale,
                misses: c.leads + c.passes,
                bypasses: c.bypasses,
                memory_bytes: c.memory.bytes,
                evictions: c.memory.evictions,
            },
            redis_degraded: redis.as_ref().is_some_and(|h| h.is_degraded()),
        }
    }
}

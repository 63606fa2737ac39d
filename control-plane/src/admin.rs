//! `lb.v1.Admin`: the operators' API. Every change is a [`ControlPlane::update`] (or
//! [`ControlPlane::change`] for API keys), so it is validated whole, versioned, saved and pushed
//! to every data plane; the answer carries the new version. The token check runs in an
//! interceptor before any of this. API keys and bans are in [`crate::keys`] and
//! [`crate::ratelimit`], shared with the REST endpoints.

use std::pin::Pin;
use std::sync::Arc;

use lb_proto::v1::admin_server::Admin;
use lb_proto::v1::*;
use lb_proto::validate::{self, Invalid};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::cluster::{ControlPlane, UpdateError};
use crate::keys::KeyTarget;
use crate::ratelimit;

pub struct AdminService {
    pub cp: Arc<ControlPlane>,
}

fn change(version: u64) -> Response<ConfigChange> {
    Response::new(ConfigChange { version })
}

fn not_found(address: &str) -> UpdateError {
    UpdateError::NotFound(format!("no backend {address}"))
}

/// Changes the backend at `address` with `f`; `NotFound` when there is none.
async fn change_backend(
    cp: &ControlPlane,
    address: &str,
    f: impl FnOnce(&mut Backend),
) -> Result<u64, UpdateError> {
    cp.update(|s| {
        let b = s
            .backends
            .iter_mut()
            .find(|b| b.address == address)
            .ok_or_else(|| not_found(address))?;
        f(b);
        Ok(())
    })
    .await
}

/// Sets the strategy; shared by gRPC and REST.
pub async fn set_strategy(cp: &ControlPlane, strategy: &str) -> Result<u64, UpdateError> {
    validate::strategy(strategy)?;
    let strategy = strategy.to_owned();
    cp.update(|s| {
        s.strategy = strategy;
        Ok(())
    })
    .await
}

impl AdminService {
    /// A change to the configuration, answered with its version.
    async fn update(
        &self,
        change: impl FnOnce(&mut ConfigSnapshot) -> Result<(), UpdateError>,
    ) -> Result<Response<ConfigChange>, Status> {
        let version = self.cp.update(change).await?;
        Ok(Response::new(ConfigChange { version }))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_config(
        &self,
        _: Request<GetConfigRequest>,
    ) -> Result<Response<ConfigSnapshot>, Status> {
        Ok(Response::new((*self.cp.snapshot()).clone()))
    }

    async fn get_strategy(
        &self,
        _: Request<GetStrategyRequest>,
    ) -> Result<Response<GetStrategyResponse>, Status> {
        Ok(Response::new(GetStrategyResponse {
            strategy: self.cp.snapshot().strategy.clone(),
            available: validate::STRATEGIES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }))
    }

    async fn set_strategy(
        &self,
        r: Request<SetStrategyRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        Ok(change(
            set_strategy(&self.cp, &r.into_inner().strategy).await?,
        ))
    }

    async fn list_backends(
        &self,
        _: Request<ListBackendsRequest>,
    ) -> Result<Response<ListBackendsResponse>, Status> {
        Ok(Response::new(ListBackendsResponse {
            backends: self.cp.snapshot().backends.clone(),
        }))
    }

    async fn add_backend(
        &self,
        r: Request<AddBackendRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        let r = r.into_inner();
        validate::backend_address(&r.address).map_err(UpdateError::from)?;
        let weight = r.weight;
        validate::weight(weight).map_err(UpdateError::from)?;
        self.update(|s| {
            if s.backends.iter().any(|b| b.address == r.address) {
                return Err(Invalid::new(
                    "backend.address",
                    format!("duplicate backend {}", r.address),
                )
                .into());
            }
            s.backends.push(Backend {
                address: r.address,
                weight,
                draining: false,
                max_in_flight: r.max_in_flight,
            });
            Ok(())
        })
        .await
    }

    async fn remove_backend(
        &self,
        r: Request<RemoveBackendRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        let address = r.into_inner().address;
        self.update(|s| {
            let before = s.backends.len();
            s.backends.retain(|b| b.address != address);
            if s.backends.len() == before {
                return Err(not_found(&address));
            }
            Ok(())
        })
        .await
    }

    async fn set_backend_weight(
        &self,
        r: Request<SetBackendWeightRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        let r = r.into_inner();
        validate::weight(r.weight).map_err(UpdateError::from)?;
        let v = change_backend(&self.cp, &r.address, |b| b.weight = r.weight).await?;
        Ok(change(v))
    }

    async fn drain_backend(
        &self,
        r: Request<DrainBackendRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        let r = r.into_inner();
        let v = change_backend(&self.cp, &r.address, |b| b.draining = r.drain).await?;
        Ok(change(v))
    }

    async fn list_tiers(
        &self,
        _: Request<ListTiersRequest>,
    ) -> Result<Response<ListTiersResponse>, Status> {
        let rl = self.cp.snapshot().rate_limit.clone().unwrap_or_default();
        Ok(Response::new(ListTiersResponse {
            tiers: rl.tiers,
            default_tier: rl.default_tier,
        }))
    }

    async fn set_tier(&self, r: Request<SetTierRequest>) -> Result<Response<ConfigChange>, Status> {
        let tier = r
            .into_inner()
            .tier
            .ok_or_else(|| Status::invalid_argument("tier: missing"))?;
        validate::tier(&tier).map_err(UpdateError::from)?;
        self.update(|s| {
            let rl = s
                .rate_limit
                .get_or_insert_with(lb_proto::defaults::rate_limit);
            match rl.tiers.iter_mut().find(|t| t.name == tier.name) {
                Some(t) => *t = tier,
                None => rl.tiers.push(tier),
            }
            Ok(())
        })
        .await
    }

    async fn delete_tier(
        &self,
        r: Request<DeleteTierRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        let name = r.into_inner().name;
        self.update(|s| {
            let rl = s
                .rate_limit
                .get_or_insert_with(lb_proto::defaults::rate_limit);
            if rl.default_tier == name {
                return Err(
                    Invalid::new("tier.name", format!("{name} is the default tier")).into(),
                );
            }
            if s.keys.iter().any(|k| k.tier == name) {
                return Err(
                    Invalid::new("tier.name", format!("API keys still use tier {name}")).into(),
                );
            }
            let before = rl.tiers.len();
            rl.tiers.retain(|t| t.name != name);
            if rl.tiers.len() == before {
                return Err(UpdateError::NotFound(format!("no tier {name}")));
            }
            Ok(())
        })
        .await
    }

    async fn set_ip_limit(
        &self,
        r: Request<SetIpLimitRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        let limit = r
            .into_inner()
            .limit
            .ok_or_else(|| Status::invalid_argument("limit: missing"))?;
        validate::limit(&limit, "limit").map_err(UpdateError::from)?;
        self.update(|s| {
            s.rate_limit
                .get_or_insert_with(lb_proto::defaults::rate_limit)
                .ip_limit = Some(limit);
            Ok(())
        })
        .await
    }

    async fn set_policy(
        &self,
        r: Request<SetPolicyRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        Ok(change(
            crate::ops::policy::set_policy(&self.cp, r.into_inner()).await?,
        ))
    }

    async fn create_api_key(
        &self,
        r: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let r = r.into_inner();
        let created = crate::ops::keys::create(&self.cp, &r.tier, &r.label).await?;
        Ok(Response::new(CreateApiKeyResponse {
            api_key: created.api_key,
            key_id: created.key_id,
            tier: created.tier,
        }))
    }

    async fn set_key_tier(
        &self,
        r: Request<SetKeyTierRequest>,
    ) -> Result<Response<ConfigChange>, Status> {
        let r = r.into_inner();
        let target = KeyTarget::from_ref(r.key.as_ref()).map_err(UpdateError::from)?;
        let (v, _) = crate::ops::keys::set_tier(&self.cp, &target, &r.tier).await?;
        Ok(change(v))
    }

    async fn block_key(&self, r: Request<KeyRef>) -> Result<Response<ConfigChange>, Status> {
        let target = KeyTarget::from_ref(Some(r.get_ref())).map_err(UpdateError::from)?;
        let (v, _) = crate::ops::keys::set_blocked(&self.cp, &target, true).await?;
        Ok(change(v))
    }

    async fn unblock_key(&self, r: Request<KeyRef>) -> Result<Response<ConfigChange>, Status> {
        let target = KeyTarget::from_ref(Some(r.get_ref())).map_err(UpdateError::from)?;
        let (v, _) = crate::ops::keys::set_blocked(&self.cp, &target, false).await?;
        Ok(change(v))
    }

    async fn list_api_keys(
        &self,
        _: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        Ok(Response::new(ListApiKeysResponse {
            keys: crate::ops::keys::list(&self.cp),
        }))
    }

    async fn get_key_usage(&self, r: Request<KeyRef>) -> Result<Response<KeyUsage>, Status> {
        let target = KeyTarget::from_ref(Some(r.get_ref())).map_err(UpdateError::from)?;
        Ok(Response::new(
            crate::ops::keys::usage(&self.cp, &target).await?,
        ))
    }

    async fn list_bans(
        &self,
        _: Request<ListBansRequest>,
    ) -> Result<Response<ListBansResponse>, Status> {
        Ok(Response::new(ListBansResponse {
            bans: crate::ops::bans::list_bans(&self.cp).await?,
        }))
    }

    async fn lift_ban(&self, r: Request<LiftBanRequest>) -> Result<Response<ConfigChange>, Status> {
        Ok(change(
            crate::ops::bans::lift_ban(&self.cp, &r.into_inner().client).await?,
        ))
    }

    async fn list_data_planes(
        &self,
        _: Request<ListDataPlanesRequest>,
    ) -> Result<Response<ListDataPlanesResponse>, Status> {
        Ok(Response::new(ListDataPlanesResponse {
            data_planes: self.cp.data_planes(),
            current_version: self.cp.snapshot().version,
        }))
    }

    async fn get_stats(
        &self,
        _: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let snapshot = self.cp.snapshot();
        let now = crate::clock::now_ms();
        Ok(Response::new(GetStatsResponse {
            totals: Some(self.cp.traffic.totals()),
            backends: self.cp.traffic.backends(now),
            data_planes: self.cp.traffic.live(now) as u32,
            current_version: snapshot.version,
            strategy: snapshot.strategy.clone(),
        }))
    }

    /// A purge travels as a directive in the next snapshot: every data plane drops the
    /// matching entries from its memory tier and from Redis.
    async fn purge_cache(&self, r: Request<CachePurge>) -> Result<Response<ConfigChange>, Status> {
        let purge = r.into_inner();
        match &purge.target {
            Some(cache_purge::Target::Key(k))
                if k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) => {}
            Some(cache_purge::Target::Key(k)) => {
                return Err(Status::invalid_argument(format!(
                    "key: {k:?} is not a cache key id (64 hex digits)"
                )));
            }
            Some(cache_purge::Target::PathPrefix(p)) if p.starts_with('/') && p.len() <= 8192 => {}
            Some(cache_purge::Target::PathPrefix(p)) => {
                return Err(Status::invalid_argument(format!(
                    "path_prefix: {p:?} must start with '/'"
                )));
            }
            Some(cache_purge::Target::All(true)) => {}
            _ => {
                return Err(Status::invalid_argument(
                    "target: one of key, path_prefix or all=true",
                ));
            }
        }
        self.update(|s| {
            ratelimit::push_directive(&mut s.directives, directive::Kind::Purge(purge));
            Ok(())
        })
        .await
    }

    type TailLogStream = Pin<Box<dyn Stream<Item = Result<RequestLogEntry, Status>> + Send>>;

    async fn tail_log(
        &self,
        r: Request<TailLogRequest>,
    ) -> Result<Response<Self::TailLogStream>, Status> {
        let backlog = (r.into_inner().backlog as usize).min(crate::traffic::LOG_KEPT);
        let mut live = self.cp.traffic.subscribe_log();
        let past = self.cp.traffic.recent_log(backlog);
        let mut stop = self.cp.stopping();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            for e in past {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    e = live.recv() => match e {
                        Ok(e) => if tx.send(Ok(e)).await.is_err() { return },
                        // A reader too slow for the log skips ahead instead of holding memory.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    },
                    () = async { let _ = stop.wait_for(|s| *s).await; } => return,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

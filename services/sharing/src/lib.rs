//! The sharing service (global): owns the shared ownership maps (image -> owner, image ->
//! accounts shared with, account -> images shared with it), in Redis (one server or a Redis
//! Cluster) or, for a quick local start without redis-server, in an embedded log.
//!
//! - `maps`: the maps, over either backend (`redis_maps` over `redis_conn`, `embedded`).
//! - `service`: the gRPC service; `readiness`: health that follows the backend.
//! - [`run`] serves it all.

pub mod embedded;
pub mod floor;
pub mod maps;
pub mod readiness;
pub mod redis_conn;
pub mod redis_maps;
pub mod rules;
pub mod service;

use imagefleet_proto::sharing::v1::sharing_internal_service_server::SharingInternalServiceServer;
use imagefleet_rpc::auth::Verifier;
use imagefleet_rpc::client::{CatalogAccountKeys, SHARING_SCOPE};
use imagefleet_rpc::server::{serve, ServerRoutes};
use imagefleet_rpc::Credentials;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;

pub use redis_conn::RedisTarget;

/// Where the ownership maps live.
#[derive(Clone, Debug)]
pub enum MapsBackend {
    /// A Redis server or a Redis Cluster. On a cluster, every write is acknowledged only once
    /// `replica_acks` replicas hold it (ignored on a single server).
    Redis {
        target: RedisTarget,
        replica_acks: usize,
    },
    /// In memory, logged durably under `dir` (only when no redis-server is available).
    Embedded { dir: PathBuf },
}

/// How many replicas must hold a write on a Redis Cluster before it is acknowledged, unless
/// configured otherwise.
pub const DEFAULT_REPLICA_ACKS: usize = 1;

impl MapsBackend {
    /// Redis at `url`: `redis://host:port` (one server) or `redis+cluster://host:port,...`
    /// (a cluster, with `DEFAULT_REPLICA_ACKS`).
    pub fn redis(url: &str) -> anyhow::Result<MapsBackend> {
        Ok(MapsBackend::Redis {
            target: RedisTarget::from_url(url)?,
            replica_acks: DEFAULT_REPLICA_ACKS,
        })
    }
}

#[derive(Clone)]
pub struct SharingConfig {
    pub backend: MapsBackend,
    /// The key every service credential is signed with.
    pub service_key: String,
    /// The catalog, where the verifier looks up account keys.
    pub catalog_url: String,
}

impl std::fmt::Debug for SharingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharingConfig")
            .field("catalog_url", &self.catalog_url)
            .finish_non_exhaustive()
    }
}

/// Serves `SharingInternalService` (with health and reflection) on `listener` until `shutdown`
/// completes. Health is `NOT_SERVING` until the backend answers, and follows it afterwards.
pub async fn run(
    config: SharingConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let maps = maps::OwnershipMaps::open(&config.backend).await?;
    let account_keys = CatalogAccountKeys::new(
        &config.catalog_url,
        Credentials::service("sharing", &config.service_key),
    )?;
    let floor: Arc<dyn imagefleet_rpc::auth::FloorStore> = match &config.backend {
        MapsBackend::Redis { target, .. } => Arc::new(floor::RedisFloor::new(target)?),
        MapsBackend::Embedded { dir } => Arc::new(imagefleet_rpc::auth::FileFloor::new(
            dir.join("auth-replay-floor"),
        )),
    };
    let verifier = Arc::new(
        Verifier::new(
            SHARING_SCOPE,
            config.service_key.clone(),
            Arc::new(account_keys),
        )
        .with_replay_floor(floor),
    );
    let ServerRoutes { routes, health } = ServerRoutes::new(&[
        imagefleet_proto::sharing::v1::sharing_internal_service_server::SERVICE_NAME,
    ]);
    readiness::report(&health, tonic_health::ServingStatus::NotServing).await;
    let watcher = tokio::spawn(readiness::watch(maps.clone(), health));
    let routes = routes.add_service(SharingInternalServiceServer::new(service::SharingApi::new(
        maps,
    )));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "sharing serving");
    }
    let served = serve(
        listener,
        routes,
        verifier,
        imagefleet_rpc::server::Delivery::Coalesced,
        shutdown,
    )
    .await;
    watcher.abort();
    served?;
    tracing::info!("sharing stopped");
    Ok(())
}

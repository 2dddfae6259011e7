//! The catalog service (global): the directory of regions and their endpoints, the global image
//! index, the public-image catalogue and accounts, kept in one SQLite database.
//!
//! - `store`: the database (durable writes, schema migrations).
//! - `accounts`, `regions`, `images`: what the catalog knows, as methods on [`Catalog`].
//! - `ids`: the formats of image and account ids.
//! - `service`: the gRPC services; [`run`] serves them.

pub mod accounts;
pub mod error;
pub mod ids;
pub mod images;
pub mod regions;
pub mod service;
mod store;

use imagefleet_proto::catalog::v1::catalog_internal_service_server::CatalogInternalServiceServer;
use imagefleet_proto::catalog::v1::catalog_service_server::CatalogServiceServer;
use imagefleet_rpc::auth::Verifier;
use imagefleet_rpc::client::CATALOG_SCOPE;
use imagefleet_rpc::server::{serve, ServerRoutes};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;

pub use error::CatalogError;
pub use imagefleet_proto::catalog::v1::Account;

/// Where the catalog keeps its database, and the cluster's service key.
#[derive(Clone)]
pub struct CatalogConfig {
    pub data_dir: PathBuf,
    /// The key every service credential is signed with.
    pub service_key: String,
}

impl std::fmt::Debug for CatalogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogConfig")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// The catalog: its store and what it needs to serve.
pub struct Catalog {
    store: store::Store,
    service_key: String,
    /// Where the verifier keeps its replay floor.
    data_dir: PathBuf,
}

impl Catalog {
    /// Opens (creating) the store at `data_dir/catalog.db`.
    pub fn open(config: CatalogConfig) -> anyhow::Result<Arc<Catalog>> {
        let store = store::Store::open(&config.data_dir)?;
        tracing::info!(dir = %config.data_dir.display(), "catalog store open");
        Ok(Arc::new(Catalog {
            store,
            service_key: config.service_key,
            data_dir: config.data_dir,
        }))
    }
}

/// The file in the data directory that keeps the verifier's replay floor.
pub const REPLAY_FLOOR_FILE: &str = "auth-replay-floor";

/// Serves `CatalogService` and `CatalogInternalService` (with health and reflection) on
/// `listener` until `shutdown` completes. Health is `SERVING` from the start: the store is
/// already open.
pub async fn run(
    catalog: Arc<Catalog>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let floor = imagefleet_rpc::auth::FileFloor::new(catalog.data_dir.join(REPLAY_FLOOR_FILE));
    let verifier = Arc::new(
        Verifier::new(
            CATALOG_SCOPE,
            catalog.service_key.clone(),
            catalog.account_keys(),
        )
        .with_replay_floor(Arc::new(floor)),
    );
    let api = service::CatalogApi::new(catalog);
    let ServerRoutes { routes, health } = ServerRoutes::new(&[
        imagefleet_proto::catalog::v1::catalog_service_server::SERVICE_NAME,
        imagefleet_proto::catalog::v1::catalog_internal_service_server::SERVICE_NAME,
    ]);
    health
        .set_serving::<CatalogServiceServer<service::CatalogApi>>()
        .await;
    health
        .set_serving::<CatalogInternalServiceServer<service::CatalogApi>>()
        .await;
    let routes = routes
        .add_service(CatalogServiceServer::new(api.clone()))
        .add_service(CatalogInternalServiceServer::new(api));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "catalog serving");
    }
    serve(
        listener,
        routes,
        verifier,
        imagefleet_rpc::server::Delivery::Immediate,
        shutdown,
    )
    .await?;
    tracing::info!("catalog stopped");
    Ok(())
}

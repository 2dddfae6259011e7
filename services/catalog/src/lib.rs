//! The catalog service (global): the directory of regions and their endpoints, the global image
//! index, the public-image catalogue and accounts, kept in one SQLite database.
//!
//! - `store`: the database (durable writes, schema migrations).
//! - `accounts`, `regions`, `images`: what the catalog knows, as methods on [`Catalog`].
//! - `ids`: the formats of image and account ids.
//! - `service`: the gRPC services; [`run`] serves them, and the billing services
//!   (`imagefleet_billing::service`) beside them, with the usage store in the same data
//!   directory (`billing.db`).

pub mod accounts;
pub mod error;
pub mod ids;
pub mod images;
pub mod regions;
pub mod service;
mod store;

use imagefleet_billing::BillingApi;
use imagefleet_proto::billing::v1::billing_internal_service_server::BillingInternalServiceServer;
use imagefleet_proto::billing::v1::billing_service_server::BillingServiceServer;
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

/// Where the catalog keeps its databases, the cluster's service key, and what billing prices
/// and dates usage by.
#[derive(Clone)]
pub struct CatalogConfig {
    pub data_dir: PathBuf,
    /// The key every service credential is signed with.
    pub service_key: String,
    /// The prices bills and quotes are rated with.
    pub price_book: imagefleet_billing::PriceBook,
    /// "Now" for billing: the default end of a bill and the month its default start is in.
    pub clock: imagefleet_rpc::clock::Clock,
}

impl std::fmt::Debug for CatalogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogConfig")
            .field("data_dir", &self.data_dir)
            .field("price_book_currency", &self.price_book.currency())
            .field("clock", &self.clock.spec())
            .finish_non_exhaustive()
    }
}

/// The catalog: its store and what it needs to serve.
pub struct Catalog {
    store: store::Store,
    service_key: String,
    /// Where the verifier keeps its replay floor.
    data_dir: PathBuf,
    /// The billing services' state: the usage store, the price book, the clock.
    billing: Arc<imagefleet_billing::Billing>,
}

impl Catalog {
    /// Opens (creating) the store at `data_dir/catalog.db` and the usage store at
    /// `data_dir/billing.db`.
    pub fn open(config: CatalogConfig) -> anyhow::Result<Arc<Catalog>> {
        let store = store::Store::open(&config.data_dir)?;
        let billing =
            imagefleet_billing::Billing::open(&config.data_dir, config.price_book, config.clock)?;
        tracing::info!(
            dir = %config.data_dir.display(),
            currency = billing.book().currency(),
            regions = billing.book().regions().count(),
            clock = %billing.clock().spec(),
            "catalog and billing stores open"
        );
        Ok(Arc::new(Catalog {
            store,
            service_key: config.service_key,
            data_dir: config.data_dir,
            billing: Arc::new(billing),
        }))
    }

    /// The billing services' state.
    pub fn billing(&self) -> &Arc<imagefleet_billing::Billing> {
        &self.billing
    }
}

/// The file in the data directory that keeps the verifier's replay floor.
pub const REPLAY_FLOOR_FILE: &str = "auth-replay-floor";

/// Serves `CatalogService`, `CatalogInternalService`, `BillingService` and
/// `BillingInternalService` (with health and reflection) on `listener` until `shutdown`
/// completes. Health is `SERVING` from the start: the stores are already open.
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
    let billing = BillingApi::new(catalog.billing.clone());
    let api = service::CatalogApi::new(catalog);
    let ServerRoutes { routes, health } = ServerRoutes::new(&[
        imagefleet_proto::catalog::v1::catalog_service_server::SERVICE_NAME,
        imagefleet_proto::catalog::v1::catalog_internal_service_server::SERVICE_NAME,
        imagefleet_proto::billing::v1::billing_service_server::SERVICE_NAME,
        imagefleet_proto::billing::v1::billing_internal_service_server::SERVICE_NAME,
    ]);
    health
        .set_serving::<CatalogServiceServer<service::CatalogApi>>()
        .await;
    health
        .set_serving::<CatalogInternalServiceServer<service::CatalogApi>>()
        .await;
    health
        .set_serving::<BillingServiceServer<BillingApi>>()
        .await;
    health
        .set_serving::<BillingInternalServiceServer<BillingApi>>()
        .await;
    let routes = routes
        .add_service(CatalogServiceServer::new(api.clone()))
        .add_service(CatalogInternalServiceServer::new(api))
        .add_service(BillingServiceServer::new(billing.clone()))
        .add_service(BillingInternalServiceServer::new(billing));
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

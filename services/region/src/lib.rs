//! The region service: one per region. It owns the region's image store (chunks behind a
//! backend seam, metadata in SQLite), its instances and their copy-on-write system disks, and
//! answers the account-facing `RegionService` API and the region-to-region service. It
//! registers itself and its images with the catalog and image ownership with the sharing
//! service, both over gRPC with service credentials, and reports billable usage to the billing
//! service from a durable outbox.
//!
//! Layers, each importing only those above it:
//! - `model` (states as enums, rows) and `error` (one error type, a status only at the edge);
//! - `meta`: the metadata store, one file per entity, admission of new images, migrations;
//! - `region`: the running region's state and shared primitives; `disk`: disk ranges over
//!   chunks; `seed` and `catalogue`: public images and instance types;
//! - `lifecycle`: the finish step, deletion, restart recovery and upkeep; `shares`: who may use
//!   an image; `billing`: delivery of the usage outbox, prices of launches;
//! - `copy`: cross-region copies (source side of the call, the peer service, the engine);
//! - `api`: the account-facing handlers, with their input checks in `validate` and each
//!   account's calls paced by `pacing`.

mod api;
mod batch;
mod billing;
pub mod catalogue;
mod copy;
mod disk;
pub mod error;
mod export;
pub mod fairness;
mod fetch;
mod import;
mod lifecycle;
mod memo;
pub mod meta;
pub mod model;
mod pacing;
mod region;
pub mod seed;
mod shares;
mod telemetry;
mod validate;

pub use fairness::FairShare;
pub use region::{service_credentials, ImportLimits, Region, RegionConfig, StorageLimits};
pub use shares::{ShareChecker, SharingClient};

use imagefleet_proto::catalog::v1::{RegisterImageRequest, RegisterRegionRequest};
use imagefleet_proto::region::v1::region_internal_service_server::RegionInternalServiceServer;
use imagefleet_proto::region::v1::region_service_server::RegionServiceServer;
use imagefleet_rpc::auth::{Credentials, Verifier};
use imagefleet_rpc::client::{CatalogAccountKeys, MAX_MESSAGE_BYTES};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic_health::ServingStatus;

/// How often the region purges expired rows and pins.
const UPKEEP_EVERY: Duration = Duration::from_secs(60);

/// Registers the region and its public images with the catalog.
async fn register(region: &Region) -> error::Result<()> {
    let mut catalog = region.catalog.clone();
    catalog
        .register_region(RegisterRegionRequest {
            region: region.config.region.clone(),
            endpoint: region.config.advertise_url.clone(),
            public_endpoint: region.config.public_url.clone(),
        })
        .await?;
    let store = region.store.clone();
    let public = region::blocking(move || store.visible_images("")).await?;
    for image in public {
        catalog
            .register_image(RegisterImageRequest {
                image: Some(region.record(&image)),
            })
            .await?;
    }
    Ok(())
}

/// The file in the region's data directory that keeps the verifier's replay floor.
pub const REPLAY_FLOOR_FILE: &str = "auth-replay-floor";

/// Serves the region on `listener` until `shutdown`. Health reports `NOT_SERVING` until the
/// region is registered with the catalog.
pub async fn run(
    region: Arc<Region>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let service_key = region.config.service_key.clone();
    let credentials =
        Credentials::service(&format!("region-{}", region.config.region), &service_key);
    let accounts = Arc::new(CatalogAccountKeys::new(
        &region.config.catalog_url,
        credentials,
    )?);
    let floor =
        imagefleet_rpc::auth::FileFloor::new(region.config.data_dir.join(REPLAY_FLOOR_FILE));
    let verifier = Arc::new(
        Verifier::new(
            imagefleet_rpc::client::region_scope(&region.config.region),
            service_key,
            accounts,
        )
        .with_replay_floor(Arc::new(floor)),
    );
    let routes = imagefleet_rpc::server::ServerRoutes::new(&[
        imagefleet_proto::region::v1::region_service_server::SERVICE_NAME,
        imagefleet_proto::region::v1::region_internal_service_server::SERVICE_NAME,
    ]);
    let health = routes.health.clone();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<RegionServiceServer<api::RegionApi>>()
        .await;
    let service = RegionServiceServer::new(api::RegionApi::new(region.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let peer_service =
        RegionInternalServiceServer::new(copy::peer::RegionPeerApi::new(region.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = routes.routes.add_service(service).add_service(peer_service);

    telemetry::watch_store(&region.config.region, region.chunks.clone());
    region.resume()?;
    let registering = {
        let region = region.clone();
        tokio::spawn(async move {
            region
                .retry("register with the catalog", || register(&region))
                .await;
            health.set_service_status("", ServingStatus::Serving).await;
            health
                .set_serving::<RegionServiceServer<api::RegionApi>>()
                .await;
            tracing::info!(region = %region.config.region, "region registered and serving");
        })
    };
    let upkeep = tokio::spawn(region.clone().keep_up(UPKEEP_EVERY));
    let delivery = tokio::spawn(billing::deliver(region.clone()));
    tracing::info!(region = %region.config.region, addr = ?listener.local_addr().ok(), "region service listening");
    let result = imagefleet_rpc::server::serve(
        listener,
        routes,
        verifier,
        imagefleet_rpc::server::Delivery::Immediate,
        shutdown,
    )
    .await;
    registering.abort();
    upkeep.abort();
    delivery.abort();
    for (_, running) in region
        .copies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
    {
        running.task.abort();
    }
    result?;
    tracing::info!(region = %region.config.region, "region service stopped");
    Ok(())
}

//! The region service: one per region. It owns the region's image store (chunks on local disk,
//! metadata in SQLite), its instances and their copy-on-write system disks, and answers the
//! account-facing `RegionService` API. It registers itself and its images with the catalog and
//! image ownership with the sharing service, both over gRPC with service credentials.
//!
//! - `store`: the metadata (images, snapshots, instances) and chunk references.
//! - `disk`: reading and writing disk ranges over chunks; manifest digests.
//! - `api`: the gRPC handlers, with their input checks in `validate`.
//! - `seed` and `catalogue`: public images and instance types.

mod api;
pub mod catalogue;
pub mod disk;
pub mod seed;
mod shares;
pub mod store;
mod sync;
pub mod validate;

use imagefleet_chunkstore::{ChunkDigest, ChunkStore};
use imagefleet_proto::catalog::v1::catalog_internal_service_client::CatalogInternalServiceClient;
use imagefleet_proto::catalog::v1::{
    ImageRecord, RegisterImageRequest, RegisterRegionRequest, UnregisterImageRequest,
};
use imagefleet_proto::region::v1::region_service_server::RegionServiceServer;
use imagefleet_proto::sharing::v1::sharing_internal_service_client::SharingInternalServiceClient;
use imagefleet_proto::sharing::v1::{RemoveImageRequest, SetImageOwnerRequest};
use imagefleet_rpc::auth::{Credentials, Verifier};
use imagefleet_rpc::client::{
    signed_channel, CatalogAccountKeys, SignedChannel, CATALOG_SCOPE, SHARING_SCOPE,
};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use store::{ImageRow, Store};
use tonic::Status;
use tonic_health::ServingStatus;

/// How a region service is set up.
#[derive(Clone, Debug)]
pub struct RegionConfig {
    /// e.g. `ap-guangzhou`.
    pub region: String,
    /// Where this region keeps its store (`metadata.db`, `chunks/`).
    pub data_dir: PathBuf,
    /// The URL other services reach this region at (registered in the catalog).
    pub advertise_url: String,
    /// The URL clients reach it at, when that differs (a published port); empty otherwise.
    pub public_url: String,
    pub catalog_url: String,
    pub sharing_url: String,
    /// The cluster's service key (service-to-service signing).
    pub service_key: String,
    /// Custom images per account in this region.
    pub image_quota: u32,
}

/// A running region: its store and its peers.
pub struct Region {
    config: RegionConfig,
    store: Store,
    chunks: ChunkStore,
    catalog: CatalogInternalServiceClient<SignedChannel>,
    sharing: SharingInternalServiceClient<SignedChannel>,
    /// Held shared by anything that stores chunks and then records references to them, and
    /// exclusively while reclaiming unreferenced chunks, so a chunk is never deleted between
    /// being written and being referenced.
    chunk_refs: Arc<RwLock<()>>,
    /// One lock per resource: instance disks (writes are read-modify-write of whole chunks),
    /// and images whose shares change or which are being deleted.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Region-to-region clients, by region.
    peers: Mutex<HashMap<String, imagefleet_proto::region::v1::region_internal_service_client::RegionInternalServiceClient<SignedChannel>>>,
    /// Images whose copy is running in this process.
    syncing: Mutex<std::collections::HashSet<String>>,
}

/// Runs a blocking store operation off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        imagefleet_proto::error::status(
            tonic::Code::Internal,
            "InternalError",
            format!("task failed: {e}"),
        )
    })?
}

impl Region {
    /// Opens the region's store (creating it) and seeds public images on first start.
    pub fn open(config: RegionConfig) -> anyhow::Result<Arc<Region>> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store = Store::open(&config.data_dir.join("metadata.db"))?;
        let chunks = ChunkStore::open(config.data_dir.join("chunks"))?;
        let credentials =
            Credentials::service(&format!("region-{}", config.region), &config.service_key);
        let catalog = CatalogInternalServiceClient::new(signed_channel(
            &config.catalog_url,
            credentials.clone(),
            CATALOG_SCOPE,
        )?);
        let sharing = SharingInternalServiceClient::new(signed_channel(
            &config.sharing_url,
            credentials,
            SHARING_SCOPE,
        )?);
        let region = Arc::new(Region {
            config,
            store,
            chunks,
            catalog,
            sharing,
            chunk_refs: Arc::new(RwLock::new(())),
            locks: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            syncing: Mutex::new(std::collections::HashSet::new()),
        });
        region.sweep_orphan_chunks()?;
        region.seed_public_images()?;
        Ok(region)
    }

    pub fn name(&self) -> &str {
        &self.config.region
    }

    /// Deletes chunk files that nothing references: left behind by a crash between storing a
    /// chunk and recording it. Runs before serving, so nothing is being written.
    fn sweep_orphan_chunks(&self) -> anyhow::Result<()> {
        let referenced = self.store.referenced()?;
        let mut removed = 0;
        for digest in self.chunks.list()? {
            if !referenced.contains(&digest) {
                self.chunks.remove(&digest)?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(region = %self.config.region, removed, "swept orphan chunks");
        }
        Ok(())
    }

    fn seed_public_images(&self) -> anyhow::Result<()> {
        let mainland = catalogue::is_mainland(&self.config.region);
        for def in catalogue::PUBLIC_IMAGES {
            let image_id = seed::image_id(def);
            if self.store.image(&image_id)?.is_some() {
                continue;
            }
            let _guard = self.chunk_refs.read().unwrap_or_else(|e| e.into_inner());
            let mut manifest = Vec::new();
            for idx in 0..seed::chunk_count(def) {
                if let Some(data) = seed::chunk(def, idx) {
                    if let Some(d) = self.chunks.put(&data)? {
                        manifest.push((idx, d));
                    }
                }
            }
            let virtual_size = def.virtual_size_mib << 20;
            let row = ImageRow {
                image_id: image_id.clone(),
                owner: String::new(),
                name: def.name.to_string(),
                description: format!("{} public image", def.os_name),
                image_type: "PUBLIC_IMAGE".into(),
                source: "OFFICIAL".into(),
                state: "NORMAL".into(),
                os_name: def.os_name.into(),
                platform: def.platform.into(),
                architecture: def.architecture.into(),
                virtual_size,
                created_at: 1_700_000_000,
                snapshot_id: Some(seed::snapshot_id(def)),
                license_type: "TencentCloud".into(),
                root_image_id: image_id.clone(),
                root_paid: def.paid_in(mainland),
                content_digest: disk::manifest_digest(virtual_size, &manifest),
                ..Default::default()
            };
            self.store.insert_public_image(&row, &manifest)?;
            tracing::info!(region = %self.config.region, image = %image_id, name = def.name, "seeded public image");
        }
        Ok(())
    }

    fn record(&self, image: &ImageRow) -> ImageRecord {
        ImageRecord {
            image_id: image.image_id.clone(),
            region: self.config.region.clone(),
            owner_account_id: image.owner.clone(),
            image_type: image.image_type.clone(),
            image_name: image.name.clone(),
            platform: image.platform.clone(),
            os_name: image.os_name.clone(),
            parent_image_id: image.parent_image_id.clone(),
            parent_region: image.parent_region.clone(),
            ultimate_source_image_id: image.root_image_id.clone(),
            ultimate_source_paid: image.root_paid,
            image_source: image.source.clone(),
            content_digest: image.content_digest.clone(),
        }
    }

    /// Registers the region and its public images with the catalog.
    async fn register(&self) -> Result<(), Status> {
        let mut catalog = self.catalog.clone();
        catalog
            .register_region(RegisterRegionRequest {
                region: self.config.region.clone(),
                endpoint: self.config.advertise_url.clone(),
                public_endpoint: self.config.public_url.clone(),
            })
            .await?;
        let store = self.store.clone();
        let public = blocking(move || store.visible_images("")).await?;
        for image in public {
            catalog
                .register_image(RegisterImageRequest {
                    image: Some(self.record(&image)),
                })
                .await?;
        }
        Ok(())
    }

    /// Finishes a `CREATING` image: digest, catalog and ownership entries, then `NORMAL`.
    /// Idempotent, so it is simply run again after a restart.
    async fn finish_create(&self, image_id: &str) -> Result<(), Status> {
        let store = self.store.clone();
        let id = image_id.to_string();
        let image = blocking(move || {
            let Some(mut image) = store.image(&id)? else {
                return Ok(None);
            };
            let manifest =
                store.snapshot_manifest(image.snapshot_id.as_deref().unwrap_or_default())?;
            image.content_digest = disk::manifest_digest(image.virtual_size, &manifest);
            store.set_content_digest(&id, &image.content_digest)?;
            Ok(Some(image))
        })
        .await?;
        let Some(image) = image else { return Ok(()) };
        self.catalog
            .clone()
            .register_image(RegisterImageRequest {
                image: Some(self.record(&image)),
            })
            .await?;
        self.sharing
            .clone()
            .set_image_owner(SetImageOwnerRequest {
                image_id: image.image_id.clone(),
                owner_account_id: image.owner.clone(),
            })
            .await?;
        let store = self.store.clone();
        let id = image_id.to_string();
        blocking(move || store.set_image_state(&id, "NORMAL", "")).await?;
        tracing::info!(region = %self.config.region, image = %image_id, "image created");
        Ok(())
    }

    /// Finishes a `DELETING` image: catalog and ownership entries, rows, then unreferenced
    /// chunks. Idempotent.
    async fn finish_delete(&self, image_id: &str) -> Result<(), Status> {
        self.catalog
            .clone()
            .unregister_image(UnregisterImageRequest {
                image_id: image_id.to_string(),
                region: self.config.region.clone(),
            })
            .await?;
        self.sharing
            .clone()
            .remove_image(RemoveImageRequest {
                image_id: image_id.to_string(),
            })
            .await?;
        let store = self.store.clone();
        let id = image_id.to_string();
        let dropped = blocking(move || store.finish_delete(&id)).await?;
        self.reclaim(dropped).await?;
        tracing::info!(region = %self.config.region, image = %image_id, "image deleted");
        Ok(())
    }

    /// Deletes the chunk files among `candidates` that nothing references any more.
    async fn reclaim(&self, candidates: Vec<ChunkDigest>) -> Result<(), Status> {
        if candidates.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let chunks = self.chunks.clone();
        let lock = self.chunk_refs.clone();
        blocking(move || {
            let _exclusive = lock.write().unwrap_or_else(|e| e.into_inner());
            for digest in store.unreferenced(&candidates)? {
                chunks.remove(&digest).map_err(disk::io_error)?;
            }
            Ok(())
        })
        .await
    }

    /// Runs `step` until it succeeds, backing off between tries (peers may be restarting).
    async fn retry<F, Fut>(&self, what: &str, step: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), Status>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            match step().await {
                Ok(()) => return,
                Err(status) => {
                    tracing::warn!(region = %self.config.region, what, error = %status.message(), "retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Resumes what a restart interrupted: instances still `PENDING`, images still
    /// `CREATING` or `DELETING`.
    fn resume(self: &Arc<Self>) -> anyhow::Result<()> {
        let pending = self.store.instances_in_state("PENDING")?;
        self.store
            .set_instances_state(&pending, "PENDING", "RUNNING")?;
        for image in self.store.images_in_state("CREATING")? {
            let region = self.clone();
            tokio::spawn(async move {
                region
                    .retry("finish image creation", || {
                        region.finish_create(&image.image_id)
                    })
                    .await
            });
        }
        for image in self.store.images_in_state("SYNCING")? {
            self.spawn_sync(image.image_id);
        }
        for image in self.store.images_in_state("DELETING")? {
            let region = self.clone();
            tokio::spawn(async move {
                region
                    .retry("finish image deletion", || {
                        region.finish_delete(&image.image_id)
                    })
                    .await
            });
        }
        Ok(())
    }
}

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
    let verifier = Arc::new(Verifier::new(
        imagefleet_rpc::client::region_scope(&region.config.region),
        service_key,
        accounts,
    ));
    let routes = imagefleet_rpc::server::ServerRoutes::new();
    let health = routes.health.clone();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<RegionServiceServer<api::RegionApi>>()
        .await;
    let service = RegionServiceServer::new(api::RegionApi::new(region.clone()))
        .max_decoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES);
    let peer_service =
        imagefleet_proto::region::v1::region_internal_service_server::RegionInternalServiceServer::new(
            sync::RegionPeerApi::new(region.clone()),
        )
        .max_decoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES);
    let routes = routes.routes.add_service(service).add_service(peer_service);

    region.resume()?;
    let registering = {
        let region = region.clone();
        tokio::spawn(async move {
            region
                .retry("register with the catalog", || region.register())
                .await;
            health.set_service_status("", ServingStatus::Serving).await;
            health
                .set_serving::<RegionServiceServer<api::RegionApi>>()
                .await;
            tracing::info!(region = %region.config.region, "region registered and serving");
        })
    };
    tracing::info!(region = %region.config.region, addr = ?listener.local_addr().ok(), "region service listening");
    let result = imagefleet_rpc::server::serve(listener, routes, verifier, shutdown).await;
    registering.abort();
    result?;
    tracing::info!(region = %region.config.region, "region service stopped");
    Ok(())
}

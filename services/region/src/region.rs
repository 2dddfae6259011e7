//! A running region: its configuration, its two stores (metadata and chunks), its clients of
//! the catalog, the sharing service and peer regions, and the few primitives every operation
//! shares (running store calls off the async threads, per-resource locks, reclaiming chunks).

use crate::error::{RegionError, Result};
use crate::meta::{Limits, NewImage, Store};
use imagefleet_chunkstore::{ChunkDigest, ChunkStore};
use imagefleet_proto::billing::v1::billing_internal_service_client::BillingInternalServiceClient;
use imagefleet_proto::catalog::v1::catalog_internal_service_client::CatalogInternalServiceClient;
use imagefleet_proto::catalog::v1::DescribeRegionsRequest;
use imagefleet_proto::region::v1::region_internal_service_client::RegionInternalServiceClient;
use imagefleet_rpc::auth::Credentials;
use imagefleet_rpc::client::{region_scope, signed_channel, SignedChannel, CATALOG_SCOPE};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

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
    /// The billing service (usage reports, prices); empty: the catalog's URL (the catalog
    /// process serves billing).
    pub billing_url: String,
    /// The clock that dates usage events (the system clock but for tests and trials).
    pub clock: imagefleet_rpc::clock::Clock,
    /// The cluster's service key (service-to-service signing).
    pub service_key: String,
    /// Custom images per account in this region.
    pub image_quota: u32,
    /// How long a copy keeps retrying transient failures (source down, disk full) before it
    /// fails for good.
    pub copy_deadline: Duration,
    /// How long terminated instances stay visible before their rows are purged.
    pub instance_retention: Duration,
    /// Where chunks live; `None`: local disk under `data_dir/chunks`.
    pub chunks: Option<ChunkStore>,
    /// Calls per second each account may make to this region (0: unlimited); calls over it
    /// wait their turn, or are refused with `RequestLimitExceeded` past a second's wait.
    pub account_rate: u32,
    /// Per-account limits on streams, exports and copies, and the stall timeout of streams.
    pub fair_share: crate::fairness::FairShare,
    /// Per-account instance and stored-bytes quotas, and the region's free-space reserve.
    pub storage: StorageLimits,
    /// Limits of image imports.
    pub imports: ImportLimits,
}

/// What an import may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportLimits {
    /// Imports an account may have under way at once (`LimitExceeded.ConcurrentImports`);
    /// 0: no limit.
    pub max_imports: u32,
    /// Largest virtual (guest) size of an imported disk (`InvalidImage.VirtualSizeTooLarge`).
    pub max_virtual_size: u64,
    /// Largest imported file (`InvalidImage.FileTooLarge`).
    pub max_file_size: u64,
    /// Whether `ImportImage` may pull from hosts whose addresses are not public (loopback,
    /// private, link-local...). Off in production; tests serve files on loopback.
    pub allow_private_urls: bool,
    /// How long a URL import may take in all, from the first connection to the last byte.
    pub timeout: Duration,
    /// A PEM file of CA certificates `ImportImage` trusts for https URLs besides the Mozilla
    /// roots (read when the region opens).
    pub ca_file: Option<std::path::PathBuf>,
}

impl ImportLimits {
    pub const DEFAULT_MAX_IMPORTS: u32 = 4;
    pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 500 << 30;
    pub const DEFAULT_MAX_FILE_SIZE: u64 = 50 << 30;
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
}

impl Default for ImportLimits {
    fn default() -> Self {
        ImportLimits {
            max_imports: Self::DEFAULT_MAX_IMPORTS,
            max_virtual_size: Self::DEFAULT_MAX_VIRTUAL_SIZE,
            max_file_size: Self::DEFAULT_MAX_FILE_SIZE,
            allow_private_urls: false,
            timeout: Self::DEFAULT_TIMEOUT,
            ca_file: None,
        }
    }
}

/// What one account may hold in a region, and the free space the region keeps for itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageLimits {
    /// Instances (not terminated) per account (`LimitExceeded.InstanceQuota`).
    pub instance_quota: u32,
    /// Stored bytes per account, as `DescribeImageQuota` defines them
    /// (`LimitExceeded.StorageQuota`).
    pub storage_bytes_quota: u64,
    /// Free bytes the filesystem under the region's directory must keep: a call that would
    /// store data (disk writes, new images, copies arriving) is refused with
    /// `ResourceInsufficient.DiskSpace` when it would leave less.
    pub free_space_reserve_bytes: u64,
}

impl StorageLimits {
    pub const DEFAULT_INSTANCE_QUOTA: u32 = 200;
    pub const DEFAULT_STORAGE_BYTES_QUOTA: u64 = 1 << 40;
    pub const DEFAULT_FREE_SPACE_RESERVE_BYTES: u64 = 256 << 20;
}

impl Default for StorageLimits {
    fn default() -> Self {
        StorageLimits {
            instance_quota: Self::DEFAULT_INSTANCE_QUOTA,
            storage_bytes_quota: Self::DEFAULT_STORAGE_BYTES_QUOTA,
            free_space_reserve_bytes: Self::DEFAULT_FREE_SPACE_RESERVE_BYTES,
        }
    }
}

impl RegionConfig {
    /// Where the billing service is: `billing_url`, or the catalog's URL.
    pub fn billing_url(&self) -> &str {
        if self.billing_url.is_empty() {
            &self.catalog_url
        } else {
            &self.billing_url
        }
    }

    pub const DEFAULT_COPY_DEADLINE: Duration = Duration::from_secs(24 * 3600);
    pub const DEFAULT_INSTANCE_RETENTION: Duration = Duration::from_secs(3600);
    pub const DEFAULT_ACCOUNT_RATE: u32 = 1000;
}

/// A copy running in this process, on the destination side.
pub(crate) struct RunningCopy {
    /// Set when the copy is cancelled: in-flight chunk writes check it before storing.
    pub cancelled: Arc<AtomicBool>,
    pub task: tokio::task::AbortHandle,
}

/// A running region: its store and its peers.
pub struct Region {
    pub(crate) config: RegionConfig,
    pub(crate) store: Store,
    pub(crate) chunks: ChunkStore,
    pub(crate) catalog: CatalogInternalServiceClient<SignedChannel>,
    pub(crate) sharing: crate::shares::SharingClient,
    /// Share checks, on the same channel as `sharing`.
    pub(crate) shares: crate::shares::ShareChecker,
    pub(crate) billing: BillingInternalServiceClient<SignedChannel>,
    /// Held shared by anything that stores chunks and then records references to them, and
    /// exclusively while reclaiming unreferenced chunks, so a chunk is never deleted between
    /// being written and being referenced.
    pub(crate) chunk_refs: Arc<RwLock<()>>,
    /// One lock per resource: instance disks (writes are read-modify-write of whole chunks),
    /// and images whose shares change or which are being deleted.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Region-to-region clients, by region.
    peers: Mutex<HashMap<String, RegionInternalServiceClient<SignedChannel>>>,
    /// Copies running in this process, by destination image.
    pub(crate) copies: Mutex<HashMap<String, RunningCopy>>,
    /// Paces each account's calls (one account cannot take the region's cores from others).
    pub(crate) pacer: crate::pacing::Pacer,
    /// What each account holds of the `fair_share` limits.
    pub(crate) gate: Arc<crate::fairness::Gate>,
    /// The TLS client of https URL imports: the Mozilla roots and `imports.ca_file`.
    pub(crate) import_tls: Arc<tokio_rustls::rustls::ClientConfig>,
    /// Store reads of the listing and lookup paths (`Region::read`) in progress at once: as
    /// many as the store keeps idle read connections.
    reads: Arc<tokio::sync::Semaphore>,
    /// Each account's `DescribeImages` listing (public and own images, as messages) while the
    /// store is unchanged.
    pub(crate) listings: crate::memo::Memo<Vec<imagefleet_proto::region::v1::Image>>,
    /// Image rows by id (`resolve_image`) while the store is unchanged.
    pub(crate) image_rows: crate::memo::Memo<Option<crate::model::ImageRow>>,
    /// The progress of imports and copies by image id (`DescribeImages`) while the store is
    /// unchanged.
    pub(crate) progress: crate::memo::Memo<ImageProgress>,
    /// The threads that write imported chunks, shared by every import of the region.
    pub(crate) chunk_writers: crate::import::ChunkWriters,
}

/// An image's import progress and copy progress, as `DescribeImages` gives them.
pub(crate) type ImageProgress = (
    Option<imagefleet_proto::region::v1::ImportProgress>,
    Option<imagefleet_proto::region::v1::SyncProgress>,
);

/// The most images the listing memory holds, over all accounts (a few MiB).
const REMEMBERED_LISTED_IMAGES: usize = 20_000;

/// Deletes the chunks among `candidates` that nothing references, holding the chunk
/// references lock exclusively.
fn reclaim_now(
    store: &Store,
    chunks: &ChunkStore,
    lock: &RwLock<()>,
    candidates: &[ChunkDigest],
) -> Result<()> {
    let _exclusive = lock.write().unwrap_or_else(|e| e.into_inner());
    for digest in store.unreferenced(candidates)? {
        // A bucket shared with other replicas keeps chunks inside its grace window.
        chunks.reclaim(&digest)?;
    }
    Ok(())
}

/// Runs a blocking store or chunk operation off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegionError::Task(e.to_string()))?
}

/// The service credentials region `region` signs its calls to other services with.
pub fn service_credentials(region: &str, service_key: &str) -> Credentials {
    Credentials::service(&format!("region-{region}"), service_key)
}

impl Region {
    /// Runs a read of the metadata store off the async threads, at most
    /// `meta::MAX_IDLE_READERS` at once: many concurrent calls then reuse the store's idle read
    /// connections (instead of opening, and closing, one each) on a few blocking threads
    /// (instead of one thread each).
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _permit = self
            .reads
            .acquire()
            .await
            .map_err(|e| RegionError::Task(e.to_string()))?;
        let store = self.store.clone();
        blocking(move || f(&store)).await
    }

    /// Runs a read of one row by its key on the calling thread. Such a read takes a few
    /// microseconds (the store's pages are in memory) where handing it to a blocking thread
    /// and back costs two thread wake-ups, more than the read (DescribeImages by id: ~50 us of
    /// system time a call). Reads of many rows go through `read`.
    pub(crate) fn read_row<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        f(&self.store)
    }

    /// Opens the region's stores (creating them); no network yet.
    pub fn open(config: RegionConfig) -> anyhow::Result<Arc<Region>> {
        imagefleet_rpc::fsutil::private_dir(&config.data_dir)?;
        let store = Store::open(&config.data_dir.join(crate::meta::DB_FILE))?;
        store.set_usage_source(&config.region, config.clock.clone());
        let chunks = match &config.chunks {
            Some(chunks) => chunks.clone(),
            None => ChunkStore::local(config.data_dir.join("chunks"))?,
        };
        let credentials = Self::credentials(&config);
        let catalog = CatalogInternalServiceClient::new(signed_channel(
            &config.catalog_url,
            credentials.clone(),
            CATALOG_SCOPE,
        )?);
        let shares =
            crate::shares::ShareChecker::connect(&config.sharing_url, credentials.clone())?;
        let sharing = shares.client();
        let billing = BillingInternalServiceClient::new(signed_channel(
            config.billing_url(),
            credentials,
            CATALOG_SCOPE,
        )?)
        .max_decoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES);
        let pacer = crate::pacing::Pacer::new(config.account_rate, config.account_rate);
        let import_tls = crate::fetch::tls_config(config.imports.ca_file.as_deref())?;
        let region = Arc::new(Region {
            import_tls,
            pacer,
            config,
            store,
            chunks,
            catalog,
            sharing,
            shares,
            billing,
            chunk_refs: Arc::new(RwLock::new(())),
            locks: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            copies: Mutex::new(HashMap::new()),
            gate: Arc::default(),
            reads: Arc::new(tokio::sync::Semaphore::new(crate::meta::MAX_IDLE_READERS)),
            listings: crate::memo::Memo::new(REMEMBERED_LISTED_IMAGES),
            image_rows: crate::memo::Memo::new(REMEMBERED_LISTED_IMAGES),
            progress: crate::memo::Memo::new(REMEMBERED_LISTED_IMAGES),
            chunk_writers: Default::default(),
        });
        region.sweep_orphan_chunks()?;
        crate::seed::seed_public_images(
            &region.config.region,
            &region.store,
            &region.chunks,
            &region.chunk_refs,
        )?;
        // Accounts' snapshot bytes as billing last heard them (after an upgrade: what they
        // already hold).
        region.store.reconcile_snapshot_bytes()?;
        Ok(region)
    }

    fn credentials(config: &RegionConfig) -> Credentials {
        service_credentials(&config.region, &config.service_key)
    }

    pub fn name(&self) -> &str {
        &self.config.region
    }

    /// The metadata store (for tests and tools in this process).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The chunk store (for tests and tools in this process).
    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// Deletes chunks that nothing references: left behind by a crash between storing a chunk
    /// and recording it. Runs before serving, so nothing is being written.
    fn sweep_orphan_chunks(&self) -> anyhow::Result<()> {
        let referenced = self.store.referenced()?;
        let mut removed = 0;
        for digest in self.chunks.list()? {
            if !referenced.contains(&digest) && self.chunks.reclaim(&digest)? {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(region = %self.config.region, removed, "swept orphan chunks");
        }
        Ok(())
    }

    /// Deletes the chunks among `candidates` that nothing references any more.
    pub(crate) async fn reclaim(&self, candidates: Vec<ChunkDigest>) -> Result<()> {
        if candidates.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let chunks = self.chunks.clone();
        let lock = self.chunk_refs.clone();
        blocking(move || reclaim_now(&store, &chunks, &lock, &candidates)).await
    }

    /// [`Region::reclaim`] on the calling (blocking) thread.
    pub(crate) fn reclaim_blocking(&self, candidates: &[ChunkDigest]) -> Result<()> {
        if candidates.is_empty() {
            return Ok(());
        }
        reclaim_now(&self.store, &self.chunks, &self.chunk_refs, candidates)
    }

    /// What admission applies in this region: the configured quotas.
    pub(crate) fn limits(&self) -> Limits<'_> {
        Limits {
            image_quota: self.config.image_quota,
            region: &self.config.region,
            instance_quota: self.config.storage.instance_quota,
            storage_bytes_quota: self.config.storage.storage_bytes_quota,
        }
    }

    /// Refuses (`ResourceInsufficient.DiskSpace`) a call that would store `needed` bytes when
    /// that would leave less than the free-space reserve on the region's filesystem. A call
    /// that stores data always needs room for at least one chunk: a region that cannot store
    /// one more chunk above its reserve is out of space for every such call. Calls that
    /// store nothing never ask.
    pub(crate) async fn check_free_space(&self, needed: u64) -> Result<()> {
        let chunks = self.chunks.clone();
        let space = blocking(move || Ok(chunks.space()?)).await?;
        self.check_space(space.free_bytes, needed)
    }

    /// [`Region::check_free_space`] on the calling (blocking) thread.
    pub(crate) fn check_free_space_blocking(&self, needed: u64) -> Result<()> {
        let space = self.chunks.space()?;
        self.check_space(space.free_bytes, needed)
    }

    fn check_space(&self, free_bytes: u64, needed: u64) -> Result<()> {
        let needed = needed.max(imagefleet_chunkstore::CHUNK_SIZE as u64);
        let reserve = self.config.storage.free_space_reserve_bytes;
        if free_bytes < reserve.saturating_add(needed) {
            return Err(RegionError::DiskSpace {
                free: free_bytes,
                reserve,
                needed,
            });
        }
        Ok(())
    }

    /// Admits new images of `owner` (see [`Store::admit`]) once the region has room for them:
    /// the one way every new image (created, copied in, imported) is admitted.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        owner: &str,
        batch: Vec<NewImage>,
        dry_run: bool,
    ) -> Result<Vec<crate::model::ImageRow>> {
        // A new image stores its rows and manifest now; a copy's chunks ask for room again as
        // they arrive (and wait for it).
        self.check_free_space(0).await?;
        let region = self.clone();
        let owner = owner.to_string();
        blocking(move || region.store.admit(&owner, &batch, region.limits(), dry_run)).await
    }

    /// One lock per resource id (instance disks, image share changes and deletes).
    pub(crate) fn resource_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.len() > 10_000 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(id.to_string()).or_default().clone()
    }

    /// Runs `step` until it succeeds, backing off between tries (peers may be restarting).
    pub(crate) async fn retry<F, Fut>(&self, what: &str, step: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let mut backoff = Backoff::new();
        loop {
            match step().await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(region = %self.config.region, what, error = %e, "retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// The region-to-region client of `region`, found through the catalog.
    pub(crate) async fn peer(
        &self,
        region: &str,
    ) -> Result<RegionInternalServiceClient<SignedChannel>> {
        if let Some(client) = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(region)
        {
            return Ok(client.clone());
        }
        let endpoint = self
            .region_directory()
            .await?
            .into_iter()
            .find(|r| r.region == region)
            .map(|r| r.endpoint)
            .ok_or_else(|| {
                imagefleet_proto::error::status(
                    tonic::Code::Unavailable,
                    "InvalidRegion.NotFound",
                    format!("{region} is not registered"),
                )
            })?;
        // Through the emulated link of (this region -> peer), if one is set (docs/links.md).
        let channel = imagefleet_rpc::client::signed_link_channel(
            &endpoint,
            Self::credentials(&self.config),
            &region_scope(region),
            imagefleet_rpc::link::Links::global(),
            (self.config.region.as_str(), region),
        )
        .map_err(|e| {
            imagefleet_proto::error::status(
                tonic::Code::Unavailable,
                "ServiceUnavailable",
                e.to_string(),
            )
        })?;
        let client = RegionInternalServiceClient::new(channel)
            .max_decoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES);
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(region.to_string(), client.clone());
        Ok(client)
    }

    /// Registered regions, from the catalog.
    pub(crate) async fn region_directory(
        &self,
    ) -> Result<Vec<imagefleet_proto::catalog::v1::Region>> {
        let response = self
            .catalog
            .clone()
            .list_regions(DescribeRegionsRequest {})
            .await
            .map_err(|s| imagefleet_rpc::unavailable("catalog", s))?;
        Ok(response.into_inner().region_set)
    }
}

/// Exponential backoff from 100 ms to `cap` (5 s by default), for retry loops.
pub(crate) struct Backoff {
    delay: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff::with_cap(Duration::from_secs(5))
    }

    pub fn with_cap(cap: Duration) -> Self {
        Backoff {
            delay: Duration::from_millis(100),
            cap,
        }
    }

    /// Sleeps the current delay, then doubles it (up to the cap).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(self.cap);
    }
}

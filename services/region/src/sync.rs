//! Cross-region copies (`SyncImages`): a real transfer between two region services.
//!
//! The source region checks the call and asks each destination to `StartSync`; from then on the
//! destination drives: it fetches the source image's manifest, works out which chunks it lacks
//! (public-image content, an earlier version of the image, an interrupted earlier attempt are
//! already there), and pulls only those with `FetchChunks` streams from the source. Every chunk
//! is verified against its digest and fsynced before it counts; the whole manifest is verified
//! against the image's content digest before the image becomes `NORMAL`. Interruptions (a
//! dropped connection, either region restarting) are retried with backoff and resume where
//! they stopped; a copy that cannot succeed ends `CREATEFAILED` with the reason.

use crate::store::{ImageRow, SyncCounters, SyncTaskRow};
use crate::{blocking, catalogue, disk, validate, Region};
use futures::{StreamExt, TryStreamExt};
use imagefleet_chunkstore::{ChunkDigest, CHUNK_SIZE};
use imagefleet_proto::catalog::v1::DescribeRegionsRequest;
use imagefleet_proto::error::{self, invalid_argument};
use imagefleet_proto::region::v1::region_internal_service_client::RegionInternalServiceClient;
use imagefleet_proto::region::v1::region_internal_service_server::RegionInternalService;
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::auth::Credentials;
use imagefleet_rpc::client::{region_scope, signed_channel, SignedChannel};
use imagefleet_rpc::time::unix_now;
use sha2::Digest;
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

/// Chunks asked for in one `FetchChunks` call.
const FETCH_BATCH: usize = 32;
/// `FetchChunks` calls in flight per copy: overlaps the source's reads, the wire and the
/// destination's writes.
const FETCH_STREAMS: usize = 4;
/// Manifest entries per `ManifestPage`.
const MANIFEST_PAGE: usize = 4096;
pub const MAX_SYNC_IMAGES: usize = 10;
pub const MAX_SYNC_REGIONS: usize = 10;

/// Why a copy attempt stopped.
enum CopyError {
    /// Worth another try (peer unreachable, restarting, connection dropped).
    Retry(Status),
    /// Will never succeed; the image fails with this reason.
    Fail(String),
}

impl From<Status> for CopyError {
    fn from(status: Status) -> Self {
        match status.code() {
            Code::NotFound
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::PermissionDenied => {
                CopyError::Fail(format!("source refused the copy: {}", status.message()))
            }
            _ => CopyError::Retry(status),
        }
    }
}

impl Region {
    /// The region-to-region client of `region`, found through the catalog.
    pub(crate) async fn peer(
        &self,
        region: &str,
    ) -> Result<RegionInternalServiceClient<SignedChannel>, Status> {
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
                error::status(
                    Code::Unavailable,
                    "InvalidRegion.NotFound",
                    format!("{region} is not registered"),
                )
            })?;
        let credentials = Credentials::service(
            &format!("region-{}", self.config.region),
            &self.config.service_key,
        );
        let channel = signed_channel(&endpoint, credentials, &region_scope(region))
            .map_err(|e| error::status(Code::Unavailable, "ServiceUnavailable", e.to_string()))?;
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
    async fn region_directory(&self) -> Result<Vec<imagefleet_proto::catalog::v1::Region>, Status> {
        let response = self
            .catalog
            .clone()
            .list_regions(DescribeRegionsRequest {})
            .await
            .map_err(|s| imagefleet_rpc::unavailable("catalog", s))?;
        Ok(response.into_inner().region_set)
    }

    /// Runs the copy into `image_id` until it is `NORMAL` or has failed for good. At most one
    /// runner per image.
    pub(crate) fn spawn_sync(self: &Arc<Self>, image_id: String) {
        if !self
            .syncing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image_id.clone())
        {
            return;
        }
        let region = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match region.copy(&image_id).await {
                    Ok(()) => break,
                    Err(CopyError::Fail(reason)) => {
                        tracing::warn!(region = %region.config.region, image = %image_id, %reason, "copy failed");
                        let store = region.store.clone();
                        let id = image_id.clone();
                        match blocking(move || store.fail_sync(&id, &reason)).await {
                            Ok(released) => {
                                let _ = region.reclaim(released).await;
                                break;
                            }
                            Err(_) => tokio::time::sleep(delay).await,
                        }
                    }
                    Err(CopyError::Retry(status)) => {
                        tracing::info!(region = %region.config.region, image = %image_id, error = %status.message(), "copy interrupted; retrying");
                        let store = region.store.clone();
                        let id = image_id.clone();
                        let message = format!("{:?}: {}", status.code(), status.message());
                        let _ =
                            blocking(move || store.record_sync_attempt(&id, Some(&message))).await;
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
            region
                .syncing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&image_id);
        });
    }

    /// One attempt at a copy: resumes from whatever the region already holds.
    async fn copy(self: &Arc<Self>, image_id: &str) -> Result<(), CopyError> {
        let store = self.store.clone();
        let id = image_id.to_string();
        let (task, image) =
            blocking(move || Ok((store.sync_task(&id)?, store.image(&id)?))).await?;
        let (Some(task), Some(image)) = (task, image) else {
            return Ok(());
        };
        if image.state != "SYNCING" || task.state == "FAILED" {
            return Ok(());
        }
        if task.state != "DONE" {
            let store = self.store.clone();
            let id = image_id.to_string();
            let attempt = blocking(move || store.record_sync_attempt(&id, None)).await?;
            // deploy/compose-test.sh waits for this line to interrupt a copy: keep its text.
            tracing::info!(region = %self.config.region, image = %image_id, source = %task.source_image_id, from = %task.source_region, attempt, "copy starting");
            self.transfer(&task, &image).await?;
        }
        self.finish_create(image_id).await.map_err(CopyError::Retry)
    }

    async fn transfer(
        self: &Arc<Self>,
        task: &SyncTaskRow,
        image: &ImageRow,
    ) -> Result<(), CopyError> {
        let mut source = self
            .peer(&task.source_region)
            .await
            .map_err(CopyError::Retry)?;
        if !task.manifest_loaded {
            let manifest = fetch_manifest(&mut source, &task.source_image_id, image).await?;
            let store = self.store.clone();
            let id = image.image_id.clone();
            blocking(move || store.set_sync_manifest(&id, &manifest)).await?;
        }
        let store = self.store.clone();
        let chunks = self.chunks.clone();
        let id = image.image_id.clone();
        let (manifest, missing) = blocking(move || {
            let manifest = store.sync_manifest(&id)?;
            let mut seen = HashSet::new();
            let missing: Vec<ChunkDigest> = manifest
                .iter()
                .map(|(_, d)| *d)
                .filter(|d| seen.insert(*d) && !chunks.contains(d))
                .collect();
            Ok((manifest, missing))
        })
        .await?;
        let missing_set: HashSet<ChunkDigest> = missing.iter().copied().collect();
        let bytes_total = manifest.len() as u64 * CHUNK_SIZE as u64;
        let present = manifest
            .iter()
            .filter(|(_, d)| !missing_set.contains(d))
            .count() as u64;
        let progress = Arc::new(Progress {
            chunks_done: AtomicU64::new(present),
            chunks_transferred: AtomicU64::new(task.chunks_transferred),
            bytes_transferred: AtomicU64::new(task.bytes_transferred),
            // How many manifest entries each digest stands for (a chunk can repeat).
            weight: manifest
                .iter()
                .fold(std::collections::HashMap::new(), |mut m, (_, d)| {
                    *m.entry(*d).or_insert(0u64) += 1;
                    m
                }),
        });
        self.save_progress(&image.image_id, &progress, bytes_total)
            .await?;
        let mut fetches = Vec::new();
        for batch in missing.chunks(FETCH_BATCH) {
            let batch = batch.to_vec();
            let source = source.clone();
            let progress = progress.clone();
            let region = self.clone();
            let source_image = task.source_image_id.clone();
            let image_id = image.image_id.clone();
            fetches.push(async move {
                region
                    .fetch_batch(source, &source_image, batch, &progress)
                    .await?;
                region
                    .save_progress(&image_id, &progress, bytes_total)
                    .await
            });
        }
        futures::stream::iter(fetches)
            .buffer_unordered(FETCH_STREAMS)
            .try_collect::<Vec<()>>()
            .await?;
        // Every entry must now be here, and the whole must be the image the source has.
        let store = self.store.clone();
        let chunks = self.chunks.clone();
        let id = image.image_id.clone();
        let expected = image.content_digest.clone();
        let virtual_size = image.virtual_size;
        blocking(move || {
            if let Some((idx, _)) = manifest.iter().find(|(_, d)| !chunks.contains(d)) {
                return Err(error::status(
                    Code::Unavailable,
                    "ServiceUnavailable",
                    format!("chunk {idx} is still missing"),
                ));
            }
            if disk::manifest_digest(virtual_size, &manifest) != expected {
                return Err(error::status(
                    Code::DataLoss,
                    "InvalidImage.DigestMismatch",
                    "the copied manifest does not match the image's digest",
                ));
            }
            store.finish_sync(&id)
        })
        .await
        .map_err(|s| match s.code() {
            Code::DataLoss => CopyError::Fail(s.message().to_string()),
            _ => CopyError::Retry(s),
        })?;
        tracing::info!(
            region = %self.config.region,
            image = %image.image_id,
            transferred = progress.chunks_transferred.load(Ordering::Relaxed),
            "copy complete"
        );
        Ok(())
    }

    /// Pulls one batch of chunks, verifying and storing each durably as it arrives.
    async fn fetch_batch(
        &self,
        mut source: RegionInternalServiceClient<SignedChannel>,
        source_image: &str,
        batch: Vec<ChunkDigest>,
        progress: &Progress,
    ) -> Result<(), CopyError> {
        let request = FetchChunksRequest {
            image_id: source_image.to_string(),
            digests: batch.iter().map(|d| d.0.to_vec()).collect(),
        };
        let mut stream = source.fetch_chunks(request).await?.into_inner();
        let mut expected = batch.into_iter();
        while let Some(piece) = stream.message().await? {
            let Some(digest) = expected.next() else {
                return Err(CopyError::Fail("source sent more chunks than asked".into()));
            };
            if piece.digest != digest.0 {
                return Err(CopyError::Fail("source sent chunks out of order".into()));
            }
            let chunks = self.chunks.clone();
            let len = piece.data.len() as u64;
            blocking(move || {
                chunks
                    .put_verified_batch(&digest, &piece.data)
                    .map_err(|e| {
                        error::status(
                            Code::DataLoss,
                            "InvalidImage.ChunkDigestMismatch",
                            format!("chunk {}: {e}", digest.to_hex()),
                        )
                    })
            })
            .await
            .map_err(|s| match s.code() {
                Code::DataLoss => CopyError::Fail(s.message().to_string()),
                _ => CopyError::Retry(s),
            })?;
            progress.chunks_transferred.fetch_add(1, Ordering::Relaxed);
            progress.bytes_transferred.fetch_add(len, Ordering::Relaxed);
            progress.chunks_done.fetch_add(
                progress.weight.get(&digest).copied().unwrap_or(1),
                Ordering::Relaxed,
            );
        }
        if expected.next().is_some() {
            return Err(CopyError::Retry(error::status(
                Code::Unavailable,
                "ServiceUnavailable",
                "chunk stream ended early",
            )));
        }
        Ok(())
    }

    async fn save_progress(
        &self,
        image_id: &str,
        progress: &Progress,
        bytes_total: u64,
    ) -> Result<(), CopyError> {
        let chunks_done = progress.chunks_done.load(Ordering::Relaxed);
        let counters = SyncCounters {
            chunks_done,
            bytes_done: chunks_done * CHUNK_SIZE as u64,
            chunks_transferred: progress.chunks_transferred.load(Ordering::Relaxed),
            bytes_transferred: progress.bytes_transferred.load(Ordering::Relaxed),
        };
        let store = self.store.clone();
        let id = image_id.to_string();
        blocking(move || store.record_sync_progress(&id, &counters, bytes_total))
            .await
            .map_err(CopyError::Retry)
    }
}

struct Progress {
    chunks_done: AtomicU64,
    chunks_transferred: AtomicU64,
    bytes_transferred: AtomicU64,
    weight: std::collections::HashMap<ChunkDigest, u64>,
}

async fn fetch_manifest(
    source: &mut RegionInternalServiceClient<SignedChannel>,
    source_image: &str,
    image: &ImageRow,
) -> Result<Vec<(u64, ChunkDigest)>, CopyError> {
    let mut stream = source
        .get_image_manifest(GetImageManifestRequest {
            image_id: source_image.to_string(),
        })
        .await?
        .into_inner();
    let mut manifest = Vec::new();
    while let Some(page) = stream.message().await? {
        if page.virtual_size_bytes != image.virtual_size
            || page.content_digest != image.content_digest
        {
            return Err(CopyError::Fail(
                "the source image changed since the copy started".into(),
            ));
        }
        for entry in page.entries {
            let digest = ChunkDigest::from_slice(&entry.digest)
                .ok_or_else(|| CopyError::Fail("source sent a malformed chunk digest".into()))?;
            manifest.push((entry.index, digest));
        }
    }
    if disk::manifest_digest(image.virtual_size, &manifest) != image.content_digest {
        return Err(CopyError::Fail(
            "the source manifest does not match the image's digest".into(),
        ));
    }
    Ok(manifest)
}

/// The idempotency key of one (image, destination) of a `SyncImages` call.
fn request_key(owner: &str, client_token: &str, image_id: &str, region: &str) -> String {
    if client_token.is_empty() {
        return format!("once:{}", hex::encode(rand::random::<[u8; 16]>()));
    }
    let mut h = sha2::Sha256::new();
    for part in [owner, client_token, image_id, region] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("token:{}", hex::encode(h.finalize()))
}

/// `SyncImages`, on the source region: checks every rule, then has each destination start.
pub(crate) async fn sync_images(
    region: &Arc<Region>,
    caller: &str,
    req: SyncImagesRequest,
) -> Result<SyncImagesResponse, Status> {
    if req.image_ids.is_empty() {
        return Err(invalid_argument(
            "image_ids",
            "MissingParameter",
            "give at least one image id",
        ));
    }
    if req.image_ids.len() > MAX_SYNC_IMAGES {
        return Err(invalid_argument(
            "image_ids",
            "InvalidParameterValue.LimitExceeded",
            format!("at most {MAX_SYNC_IMAGES} images per call"),
        ));
    }
    validate::id_list("image_ids", &req.image_ids, validate::image_id)?;
    if req.destination_regions.is_empty() {
        return Err(invalid_argument(
            "destination_regions",
            "MissingParameter",
            "give at least one destination region",
        ));
    }
    if req.destination_regions.len() > MAX_SYNC_REGIONS {
        return Err(invalid_argument(
            "destination_regions",
            "InvalidParameterValue.LimitExceeded",
            format!("at most {MAX_SYNC_REGIONS} destination regions per call"),
        ));
    }
    let mut seen = HashSet::new();
    for r in &req.destination_regions {
        if !seen.insert(r) {
            return Err(invalid_argument(
                "destination_regions",
                "InvalidParameterValue.Duplicate",
                format!("{r} is listed twice"),
            ));
        }
    }
    if !req.image_name.is_empty() {
        validate::image_name("image_name", &req.image_name)?;
    }
    if req.client_token.chars().count() > 64 || req.client_token.chars().any(char::is_control) {
        return Err(invalid_argument(
            "client_token",
            "InvalidParameterValue.ClientToken",
            "client tokens are at most 64 printable characters",
        ));
    }

    let here = region.config.region.clone();
    let directory = region.region_directory().await?;
    for dest in &req.destination_regions {
        if dest == &here {
            return Err(error::status(
                Code::InvalidArgument,
                "UnsupportedOperation.Region",
                "an image cannot be copied to its own region",
            ));
        }
        if !directory.iter().any(|r| &r.region == dest) {
            return Err(invalid_argument(
                "destination_regions",
                "InvalidRegion.NotFound",
                format!("region {dest} does not exist"),
            ));
        }
        if catalogue::is_mainland(dest) != catalogue::is_mainland(&here) {
            return Err(error::status(
                Code::InvalidArgument,
                "UnsupportedOperation.Region",
                format!("copies stay on one side of the mainland China line: {here} -> {dest} is not allowed"),
            ));
        }
    }

    let mut sources = Vec::new();
    for image_id in &req.image_ids {
        let image = match region.resolve_image(image_id, caller).await? {
            (image, crate::shares::Access::Own) => image,
            _ => return Err(crate::shares::not_yours(image_id)),
        };
        if image.state != "NORMAL" {
            return Err(crate::store::incorrect_state(&image));
        }
        sources.push(image);
    }

    let mut plan: Vec<(SyncSource, String, String)> = Vec::new();
    for image in &sources {
        for dest in &req.destination_regions {
            let source = SyncSource {
                region: here.clone(),
                image_id: image.image_id.clone(),
                owner_account_id: caller.to_string(),
                image_name: if req.image_name.is_empty() {
                    image.name.clone()
                } else {
                    req.image_name.clone()
                },
                image_description: image.description.clone(),
                os_name: image.os_name.clone(),
                platform: image.platform.clone(),
                architecture: image.architecture.clone(),
                license_type: image.license_type.clone(),
                virtual_size_bytes: image.virtual_size,
                content_digest: image.content_digest.clone(),
                ultimate_source_image_id: image.root_image_id.clone(),
                ultimate_source_paid: image.root_paid,
            };
            let key = request_key(caller, &req.client_token, &image.image_id, dest);
            plan.push((source, dest.clone(), key));
        }
    }

    // Every destination checks quota and names first: all start, or none does.
    for (source, dest, key) in &plan {
        let mut peer = region.peer(dest).await?;
        peer.start_sync(StartSyncRequest {
            source: Some(source.clone()),
            request_key: key.clone(),
            dry_run: true,
        })
        .await
        .map_err(|s| imagefleet_rpc::unavailable(dest, s))?;
    }
    let mut image_set = Vec::new();
    for (source, dest, key) in plan {
        let image_id = if req.dry_run {
            String::new()
        } else {
            let mut peer = region.peer(&dest).await?;
            peer.start_sync(StartSyncRequest {
                source: Some(source.clone()),
                request_key: key,
                dry_run: false,
            })
            .await
            .map_err(|s| imagefleet_rpc::unavailable(&dest, s))?
            .into_inner()
            .image_id
        };
        image_set.push(SyncedImage {
            source_image_id: source.image_id,
            region: dest,
            image_id,
        });
    }
    if !req.dry_run {
        tracing::info!(region = %here, copies = image_set.len(), "copies started");
    }
    Ok(SyncImagesResponse { image_set })
}

/// The region-to-region service.
pub struct RegionPeerApi {
    region: Arc<Region>,
}

impl RegionPeerApi {
    pub fn new(region: Arc<Region>) -> Self {
        RegionPeerApi { region }
    }

    async fn normal_image(&self, image_id: &str) -> Result<ImageRow, Status> {
        validate::image_id("image_id", image_id)?;
        let store = self.region.store.clone();
        let id = image_id.to_string();
        let image = blocking(move || store.image(&id))
            .await?
            .filter(|i| !i.owner.is_empty())
            .ok_or_else(|| {
                error::status(
                    Code::NotFound,
                    "InvalidImageId.NotFound",
                    format!("{image_id} does not exist"),
                )
            })?;
        if image.state != "NORMAL" {
            return Err(crate::store::incorrect_state(&image));
        }
        Ok(image)
    }
}

type ManifestStream = Pin<Box<dyn Stream<Item = Result<ManifestPage, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

#[tonic::async_trait]
impl RegionInternalService for RegionPeerApi {
    async fn start_sync(
        &self,
        request: Request<StartSyncRequest>,
    ) -> Result<Response<StartSyncResponse>, Status> {
        let req = request.into_inner();
        let source = req.source.ok_or_else(|| {
            invalid_argument("source", "MissingParameter", "the source image is required")
        })?;
        validate::image_id("source.image_id", &source.image_id)?;
        imagefleet_proto::ids::check_account_id(
            "source.owner_account_id",
            &source.owner_account_id,
        )?;
        validate::image_name("source.image_name", &source.image_name)?;
        if req.request_key.is_empty() || req.request_key.len() > 128 {
            return Err(invalid_argument(
                "request_key",
                "InvalidParameterValue",
                "request_key is 1 to 128 characters",
            ));
        }
        if source.region == self.region.config.region {
            return Err(error::status(
                Code::InvalidArgument,
                "UnsupportedOperation.Region",
                "an image cannot be copied to its own region",
            ));
        }
        let image_id = crate::api::random_id("img");
        let image = ImageRow {
            image_id,
            owner: source.owner_account_id.clone(),
            name: source.image_name.clone(),
            description: source.image_description.clone(),
            image_type: "PRIVATE_IMAGE".into(),
            source: "SYNC".into(),
            state: "SYNCING".into(),
            os_name: source.os_name.clone(),
            platform: source.platform.clone(),
            architecture: source.architecture.clone(),
            virtual_size: source.virtual_size_bytes,
            created_at: unix_now(),
            snapshot_id: Some(crate::api::random_id("snap")),
            license_type: source.license_type.clone(),
            parent_image_id: source.image_id.clone(),
            parent_region: source.region.clone(),
            root_image_id: source.ultimate_source_image_id.clone(),
            root_paid: source.ultimate_source_paid,
            content_digest: source.content_digest.clone(),
            ..Default::default()
        };
        let task = SyncTaskRow {
            request_key: req.request_key.clone(),
            source_region: source.region.clone(),
            source_image_id: source.image_id.clone(),
            ..Default::default()
        };
        let store = self.region.store.clone();
        let quota = self.region.config.image_quota;
        let dry_run = req.dry_run;
        let image_id =
            blocking(move || store.create_sync_image(image, &task, quota, dry_run)).await?;
        if !dry_run {
            self.region.spawn_sync(image_id.clone());
        }
        Ok(Response::new(StartSyncResponse { image_id }))
    }

    type GetImageManifestStream = ManifestStream;

    async fn get_image_manifest(
        &self,
        request: Request<GetImageManifestRequest>,
    ) -> Result<Response<Self::GetImageManifestStream>, Status> {
        let image = self.normal_image(&request.into_inner().image_id).await?;
        let store = self.region.store.clone();
        let snapshot = image.snapshot_id.clone().unwrap_or_default();
        let manifest = blocking(move || store.snapshot_manifest(&snapshot)).await?;
        let mut pages: Vec<Result<ManifestPage, Status>> = manifest
            .chunks(MANIFEST_PAGE)
            .map(|page| {
                Ok(ManifestPage {
                    virtual_size_bytes: image.virtual_size,
                    content_digest: image.content_digest.clone(),
                    entries: page
                        .iter()
                        .map(|(index, digest)| ManifestEntry {
                            index: *index,
                            digest: digest.0.to_vec(),
                        })
                        .collect(),
                })
            })
            .collect();
        if pages.is_empty() {
            pages.push(Ok(ManifestPage {
                virtual_size_bytes: image.virtual_size,
                content_digest: image.content_digest.clone(),
                entries: Vec::new(),
            }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }

    type FetchChunksStream = ChunkStream;

    async fn fetch_chunks(
        &self,
        request: Request<FetchChunksRequest>,
    ) -> Result<Response<Self::FetchChunksStream>, Status> {
        let req = request.into_inner();
        if req.digests.len() > 1024 {
            return Err(invalid_argument(
                "digests",
                "InvalidParameterValue.LimitExceeded",
                "at most 1024 digests per call",
            ));
        }
        let mut wanted = Vec::with_capacity(req.digests.len());
        for d in &req.digests {
            wanted.push(ChunkDigest::from_slice(d).ok_or_else(|| {
                invalid_argument(
                    "digests",
                    "InvalidParameterValue.Digest",
                    "digests are 32 bytes",
                )
            })?);
        }
        let image = self.normal_image(&req.image_id).await?;
        let store = self.region.store.clone();
        let snapshot = image.snapshot_id.clone().unwrap_or_default();
        let manifest = blocking(move || store.snapshot_manifest(&snapshot)).await?;
        let members: HashSet<ChunkDigest> = manifest.into_iter().map(|(_, d)| d).collect();
        if let Some(stranger) = wanted.iter().find(|d| !members.contains(d)) {
            return Err(invalid_argument(
                "digests",
                "InvalidParameterValue.Digest",
                format!(
                    "chunk {} is not part of {}",
                    stranger.to_hex(),
                    req.image_id
                ),
            ));
        }
        let chunks = self.region.chunks.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            for digest in wanted {
                let message = chunks
                    .get(&digest)
                    .map_err(disk::io_error)
                    .map(|data| ChunkData {
                        digest: digest.0.to_vec(),
                        data,
                    });
                let failed = message.is_err();
                if tx.blocking_send(message).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

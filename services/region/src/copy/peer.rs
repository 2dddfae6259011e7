//! The region-to-region service: destinations admit and cancel copies, sources serve the
//! manifests and chunks of the snapshots pinned for them and release the pins.

use super::{MANIFEST_PAGE, MAX_FETCH_DIGESTS, MAX_SYNC_IMAGES, MAX_SYNC_REGIONS};
use crate::error::{RegionError, Result};
use crate::meta::{CopySource, NewContent, NewImage};
use crate::model::{Chain, CopyTask, ImageRow, ImageSource, ImageState, LineageLink, RootKind};
use crate::region::{blocking, Region};
use crate::validate;
use imagefleet_chunkstore::ChunkDigest;
use imagefleet_proto::region::v1::region_internal_service_server::RegionInternalService;
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::time::unix_now;
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The region-to-region service.
pub struct RegionPeerApi {
    region: Arc<Region>,
}

impl RegionPeerApi {
    pub fn new(region: Arc<Region>) -> Self {
        RegionPeerApi { region }
    }

    /// What a copy may read of `image_id` as `snapshot_id`, and the image's owner (whose
    /// streams the copy's streams count as), or why not.
    async fn copy_source(&self, image_id: &str, snapshot_id: &str) -> Result<(CopySource, String)> {
        validate::image_id("image_id", image_id)?;
        let store = self.region.store.clone();
        let (id, snap) = (image_id.to_string(), snapshot_id.to_string());
        let found = blocking(move || {
            let source = store.copy_source(&id, &snap, unix_now())?;
            Ok((source, store.image(&id)?))
        })
        .await?;
        match found {
            (Some(source), image) => Ok((source, image.map(|i| i.owner).unwrap_or_default())),
            (None, Some(image)) if !image.is_public() && image.state != ImageState::Normal => {
                Err(RegionError::image_state(&image))
            }
            _ => Err(RegionError::ImageNotFound(image_id.to_string())),
        }
    }

    /// Refuses copies that would take `owner` past its copies in flight into this region
    /// (`LimitExceeded.ConcurrentCopies`, naming the first copy's image and this region).
    async fn check_copies_limit(
        &self,
        owner: &str,
        copies: &[SyncCopy],
        first: &NewImage,
    ) -> Result<()> {
        let limit = self.region.config.fair_share.max_copies;
        if limit == 0 {
            return Ok(());
        }
        let store = self.region.store.clone();
        let who = owner.to_string();
        let keys: Vec<String> = copies.iter().map(|c| c.request_key.clone()).collect();
        let (in_flight, new) = blocking(move || store.copies_in_flight(&who, &keys)).await?;
        if new == 0 || in_flight + new <= limit {
            return Ok(());
        }
        let (image_id, region) = first.refusal_context.clone().unwrap_or_default();
        Err(RegionError::CopyRefused {
            image_id,
            region,
            source: Box::new(RegionError::Limit {
                reason: "LimitExceeded.ConcurrentCopies",
                limit,
                message: format!(
                    "at most {limit} copies into {} in flight per account: {in_flight} under \
                     way, {new} more asked for",
                    self.region.config.region
                ),
            }),
        })
    }

    /// The destination image one `SyncCopy` asks for.
    fn new_copy(&self, copy: &SyncCopy, deadline_at: i64) -> Result<NewImage> {
        let source = copy.source.as_ref().ok_or_else(|| {
            RegionError::invalid(
                "copies.source",
                "MissingParameter",
                "every copy names its source",
            )
        })?;
        validate::image_id("copies.source.image_id", &source.image_id)?;
        imagefleet_proto::ids::check_account_id(
            "copies.source.owner_account_id",
            &source.owner_account_id,
        )?;
        validate::image_name("copies.source.image_name", &source.image_name)?;
        validate::description("copies.source.image_description", &source.image_description)?;
        if copy.request_key.is_empty() || copy.request_key.len() > 128 {
            return Err(RegionError::invalid(
                "copies.request_key",
                "InvalidParameterValue",
                "request_key is 1 to 128 characters",
            ));
        }
        if source.region == self.region.config.region {
            return Err(RegionError::unsupported(
                "UnsupportedOperation.Region",
                "an image cannot be copied to its own region",
            ));
        }
        let mut row = ImageRow::new_custom(
            &source.owner_account_id,
            &source.image_name,
            ImageSource::Sync,
            ImageState::Syncing,
        );
        row.description = source.image_description.clone();
        row.os_name = source.os_name.clone();
        row.platform = source.platform.clone();
        row.architecture = source.architecture.clone();
        row.virtual_size = source.virtual_size_bytes;
        row.license_type = source.license_type.clone();
        row.parent_image_id = source.image_id.clone();
        row.parent_region = source.region.clone();
        // Only an image's owner copies it.
        row.parent_owner = row.owner.clone();
        row.root_image_id = source.ultimate_source_image_id.clone();
        row.root_paid = source.ultimate_source_paid;
        // The source's chain; admission puts the copy itself first.
        row.chain = if source.lineage_chain.is_empty() {
            // A source region that predates chains: its image, then its ultimate source.
            let mut links = vec![LineageLink {
                image_id: source.image_id.clone(),
                region: source.region.clone(),
                owner: source.owner_account_id.clone(),
            }];
            if !source.ultimate_source_image_id.is_empty()
                && source.ultimate_source_image_id != source.image_id
            {
                links.push(LineageLink {
                    image_id: source.ultimate_source_image_id.clone(),
                    region: source.region.clone(),
                    owner: String::new(),
                });
            }
            Chain(links)
        } else {
            Chain::from_proto(&source.lineage_chain)
        };
        row.root_kind = RootKind::parse(&source.root_kind)
            .unwrap_or_else(|| RootKind::from_paid(source.ultimate_source_paid, &source.platform));
        let mut task = CopyTask::new(
            &copy.request_key,
            &source.region,
            &source.image_id,
            &source.snapshot_id,
            &source.content_digest,
            deadline_at,
        );
        task.bytes_total = source.stored_bytes;
        Ok(NewImage {
            row,
            content: NewContent::Copy {
                task: Box::new(task),
            },
            refusal_context: Some((source.image_id.clone(), self.region.config.region.clone())),
        })
    }
}

type ManifestStream = Pin<Box<dyn Stream<Item = Result<ManifestPage, Status>> + Send>>;
type ChunkStream = crate::disk::ChunkStream<ChunkData>;

#[tonic::async_trait]
impl RegionInternalService for RegionPeerApi {
    async fn start_sync(
        &self,
        request: Request<StartSyncRequest>,
    ) -> Result<Response<StartSyncResponse>, Status> {
        let req = request.into_inner();
        if req.copies.is_empty() || req.copies.len() > MAX_SYNC_IMAGES * MAX_SYNC_REGIONS {
            return Err(RegionError::invalid(
                "copies",
                "InvalidParameterValue.LimitExceeded",
                format!("give 1 to {} copies", MAX_SYNC_IMAGES * MAX_SYNC_REGIONS),
            )
            .into());
        }
        let deadline_at = unix_now() + self.region.config.copy_deadline.as_secs() as i64;
        let batch = req
            .copies
            .iter()
            .map(|c| self.new_copy(c, deadline_at))
            .collect::<Result<Vec<_>>>()?;
        let owner = batch[0].row.owner.clone();
        if batch.iter().any(|n| n.row.owner != owner) {
            return Err(RegionError::invalid(
                "copies.source.owner_account_id",
                "InvalidParameterValue",
                "the copies of one call belong to one account",
            )
            .into());
        }
        // One admission at a time per account, so two calls cannot both pass the copies
        // limit.
        let lock = self.region.resource_lock(&format!("copies:{owner}"));
        let _admitting = lock.lock().await;
        self.check_copies_limit(&owner, &req.copies, &batch[0])
            .await?;
        let dry_run = req.dry_run;
        let admitted = self.region.admit(&owner, batch, dry_run).await?;
        if dry_run {
            return Ok(Response::new(StartSyncResponse { image_ids: vec![] }));
        }
        for image in &admitted {
            if image.state == ImageState::Syncing {
                self.region.spawn_copy(image.image_id.clone());
            }
        }
        Ok(Response::new(StartSyncResponse {
            image_ids: admitted.into_iter().map(|i| i.image_id).collect(),
        }))
    }

    async fn cancel_sync(
        &self,
        request: Request<CancelSyncRequest>,
    ) -> Result<Response<CancelSyncResponse>, Status> {
        let req = request.into_inner();
        validate::id_list("image_ids", &req.image_ids, validate::image_id)?;
        let mut doomed = Vec::new();
        for id in req.image_ids {
            let store = self.region.store.clone();
            let images = blocking(move || {
                let Some(image) = store.image(&id)?.filter(|i| i.source == ImageSource::Sync)
                else {
                    return Ok(Vec::new());
                };
                store.begin_delete(std::slice::from_ref(&id), &image.owner)
            })
            .await?;
            doomed.extend(images);
        }
        self.region.delete_images(doomed).await;
        Ok(Response::new(CancelSyncResponse {}))
    }

    async fn release_copy_source(
        &self,
        request: Request<ReleaseCopySourceRequest>,
    ) -> Result<Response<ReleaseCopySourceResponse>, Status> {
        let keys = request.into_inner().request_keys;
        if keys.len() > MAX_SYNC_IMAGES * MAX_SYNC_REGIONS || keys.iter().any(|k| k.len() > 128) {
            return Err(RegionError::invalid(
                "request_keys",
                "InvalidParameterValue.LimitExceeded",
                "at most 100 request keys of at most 128 characters",
            )
            .into());
        }
        let store = self.region.store.clone();
        let released = blocking(move || store.release_pins(&keys, unix_now())).await?;
        self.region.reclaim(released).await?;
        Ok(Response::new(ReleaseCopySourceResponse {}))
    }

    async fn set_links(
        &self,
        request: Request<SetLinksRequest>,
    ) -> Result<Response<SetLinksResponse>, Status> {
        let links = self.region.set_links(&request.into_inner().links).await?;
        Ok(Response::new(SetLinksResponse { links }))
    }

    async fn list_links(
        &self,
        _request: Request<ListLinksRequest>,
    ) -> Result<Response<ListLinksResponse>, Status> {
        let links = self.region.list_links().await?;
        Ok(Response::new(ListLinksResponse { links }))
    }

    type GetImageManifestStream = ManifestStream;

    async fn get_image_manifest(
        &self,
        request: Request<GetImageManifestRequest>,
    ) -> Result<Response<Self::GetImageManifestStream>, Status> {
        let req = request.into_inner();
        let (source, owner) = self.copy_source(&req.image_id, &req.snapshot_id).await?;
        let permits = self.region.stream_permits(&owner, false)?;
        let store = self.region.store.clone();
        let snapshot = source.snapshot_id.clone();
        let manifest = blocking(move || store.snapshot_manifest(&snapshot)).await?;
        let page = |entries: &[(u64, ChunkDigest)]| {
            Ok(ManifestPage {
                virtual_size_bytes: source.virtual_size,
                content_digest: source.content_digest.clone(),
                entries: entries
                    .iter()
                    .map(|(index, digest)| ManifestEntry {
                        index: *index,
                        digest: digest.0.to_vec(),
                    })
                    .collect(),
            })
        };
        let mut pages: Vec<Result<ManifestPage, Status>> =
            manifest.chunks(MANIFEST_PAGE).map(page).collect();
        if pages.is_empty() {
            pages.push(page(&[]));
        }
        let pages = Box::pin(futures::stream::iter(pages));
        Ok(Response::new(self.region.guarded(pages, permits)))
    }

    type FetchChunksStream = ChunkStream;

    async fn fetch_chunks(
        &self,
        request: Request<FetchChunksRequest>,
    ) -> Result<Response<Self::FetchChunksStream>, Status> {
        let req = request.into_inner();
        if req.digests.len() > MAX_FETCH_DIGESTS {
            return Err(RegionError::invalid(
                "digests",
                "InvalidParameterValue.LimitExceeded",
                format!("at most {MAX_FETCH_DIGESTS} digests per call"),
            )
            .into());
        }
        let mut wanted = Vec::with_capacity(req.digests.len());
        for d in &req.digests {
            wanted.push(ChunkDigest::from_slice(d).ok_or_else(|| {
                RegionError::invalid(
                    "digests",
                    "InvalidParameterValue.Digest",
                    "digests are 32 bytes",
                )
            })?);
        }
        let (source, owner) = self.copy_source(&req.image_id, &req.snapshot_id).await?;
        let permits = self.region.stream_permits(&owner, false)?;
        let store = self.region.store.clone();
        let snapshot = source.snapshot_id.clone();
        let manifest = blocking(move || store.snapshot_manifest(&snapshot)).await?;
        let members: HashSet<ChunkDigest> = manifest.into_iter().map(|(_, d)| d).collect();
        if let Some(stranger) = wanted.iter().find(|d| !members.contains(d)) {
            return Err(RegionError::invalid(
                "digests",
                "InvalidParameterValue.Digest",
                format!(
                    "chunk {} is not part of {}",
                    stranger.to_hex(),
                    req.image_id
                ),
            )
            .into());
        }
        let chunks = crate::disk::stream_chunks(
            self.region.chunks.clone(),
            wanted.into_iter().map(|d| (d, d)).collect(),
            false,
            |digest: ChunkDigest, data| ChunkData {
                digest: digest.0.to_vec(),
                data,
            },
            None,
        );
        Ok(Response::new(self.region.guarded(chunks, permits)))
    }
}

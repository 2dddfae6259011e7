//! The account-facing `RegionService` handlers: check the input (`validate`), check what the
//! caller may see and do, then act on the store. Another account's private image or instance
//! does not exist for the caller (`NOT_FOUND`).

use crate::error::{RegionError, Result};
use crate::meta::{ImageChanges, InstanceQuery, NewContent, NewImage};
use crate::model::{
    random_id, CopyTask, ImageRow, ImageSource, ImageState, InstanceRow, InstanceState,
};
use crate::region::{blocking, Region};
use crate::shares::Access;
use crate::{catalogue, disk, validate};
use imagefleet_chunkstore::CHUNK_SIZE;
use imagefleet_proto::region::v1 as pb;
use imagefleet_proto::region::v1::region_service_server::RegionService;
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::auth::account_id;
use imagefleet_rpc::time::{rfc3339, unix_now};
use std::sync::Arc;
use tonic::{Request, Response, Status};

const GIB: u64 = 1 << 30;
const DEFAULT_SYSTEM_DISK_GIB: u64 = 50;
const MAX_SYSTEM_DISK_GIB: u64 = 2048;
const MAX_INSTANCES_PER_CALL: u32 = 100;

/// The most hours a price is asked for (a leap year).
const MAX_QUOTE_HOURS: u64 = 8784;

/// Checks what a launch (or the price of one) names: the image id, the instance type, and the
/// instance count (0 means 1). Returns the type and the count.
fn check_launch(
    image_id: &str,
    instance_type: &str,
    instance_count: u32,
) -> Result<(catalogue::InstanceType, u32)> {
    validate::image_id("image_id", image_id)?;
    let found = catalogue::instance_type(instance_type).ok_or_else(|| {
        RegionError::invalid(
            "instance_type",
            "InvalidInstanceType.Malformed",
            format!(
                "unknown instance type {:?}; valid types: {}",
                instance_type,
                catalogue::instance_types_listed()
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let count = if instance_count == 0 {
        1
    } else {
        instance_count
    };
    if count > MAX_INSTANCES_PER_CALL {
        return Err(RegionError::invalid(
            "instance_count",
            "InvalidParameterValue.LimitExceeded",
            format!("at most {MAX_INSTANCES_PER_CALL} instances per call"),
        ));
    }
    Ok((found, count))
}

pub struct RegionApi {
    region: Arc<Region>,
}

impl RegionApi {
    pub fn new(region: Arc<Region>) -> Self {
        RegionApi { region }
    }
}

type ExportStream = disk::ChunkStream<ExportImageChunk>;
type ExportImagesStream = disk::ChunkStream<ExportImagesChunk>;
/// The most images one ExportImages call may name.
const MAX_EXPORTS_PER_CALL: usize = 10;

fn export_format(format: i32) -> Result<ExportFormat> {
    match ExportFormat::try_from(format) {
        Ok(ExportFormat::Unspecified) => Ok(ExportFormat::Raw),
        Ok(format) => Ok(format),
        Err(_) => Err(RegionError::invalid(
            "format",
            "InvalidParameterValue.Format",
            "format is not one of RAW, QCOW2, VHD, VMDK",
        )),
    }
}

fn enum_name<E: Into<i32>>(value: E, name: impl Fn(i32) -> Option<&'static str>) -> String {
    name(value.into()).unwrap_or_default().to_string()
}

/// The image as `caller` sees it.
fn image_message(row: &ImageRow, caller: &str, region: &str) -> Image {
    let image_type = if row.is_public() {
        ImageType::PublicImage
    } else if row.owner == caller {
        ImageType::PrivateImage
    } else {
        ImageType::SharedImage
    };
    Image {
        image_id: row.image_id.clone(),
        image_name: row.name.clone(),
        image_description: row.description.clone(),
        image_type: image_type.into(),
        image_source: row.source.to_proto().into(),
        image_state: row.state.to_proto().into(),
        state_reason: row.state_reason.clone(),
        os_name: row.os_name.clone(),
        platform: row.platform.clone(),
        architecture: row.architecture.clone(),
        image_size_gib: row.virtual_size.div_ceil(GIB),
        virtual_size_bytes: row.virtual_size,
        created_time: rfc3339(row.created_at),
        image_creator: row.owner.clone(),
        snapshot_set: row
            .snapshot_id
            .iter()
            .map(|id| Snapshot {
                snapshot_id: id.clone(),
                disk_size_bytes: row.virtual_size,
                stored_bytes: row.stored_bytes,
            })
            .collect(),
        license_type: row.license_type.clone(),
        // A NORMAL image is complete whatever wrote its row (rows from before `make_normal`
        // set the percent read 0 for images made by CreateImage).
        sync_percent: if row.state == ImageState::Normal {
            100
        } else {
            row.sync_percent
        },
        lineage: Some(Lineage {
            parent_image_id: row.parent_image_id.clone(),
            parent_region: row.parent_region.clone(),
            ultimate_source_image_id: row.root_image_id.clone(),
            ultimate_source_paid: row.root_paid,
            parent_owner_account_id: row.parent_owner.clone(),
        }),
        content_digest: row.content_digest.clone(),
        is_deprecated: row.deprecated,
        region: region.to_string(),
        sync_progress: None,
        import_progress: None,
    }
}

fn sync_progress(task: &CopyTask) -> SyncProgress {
    SyncProgress {
        source_region: task.source_region.clone(),
        source_image_id: task.source_image_id.clone(),
        chunks_total: task.chunks_total,
        bytes_total: task.bytes_total,
        chunks_done: task.chunks_done,
        bytes_done: task.bytes_done,
        chunks_transferred: task.chunks_transferred,
        bytes_transferred: task.bytes_transferred,
        attempts: task.attempts,
        last_error: task.last_error.clone(),
    }
}

/// The name of instance `index` (from 0) of a launch of `count`: the name asked for, with
/// `-1` .. `-N` appended when a launch makes more than one; without a name asked for, the
/// instance's own id (one rule whatever the count: no instance is ever named `unnamed`).
pub fn instance_name(requested: &str, instance_id: &str, index: u32, count: u32) -> String {
    if requested.is_empty() {
        instance_id.to_string()
    } else if count == 1 {
        requested.to_string()
    } else {
        format!("{requested}-{}", index + 1)
    }
}

fn instance_message(row: &InstanceRow, region: &str) -> Instance {
    Instance {
        instance_id: row.instance_id.clone(),
        instance_name: row.name.clone(),
        instance_type: row.instance_type.clone(),
        cpu: row.cpu,
        memory_gib: row.memory_gib,
        image_id: row.image_id.clone(),
        instance_state: row.state.to_proto().into(),
        system_disk: Some(SystemDisk {
            disk_size_gib: row.disk_size / GIB,
        }),
        created_time: rfc3339(row.created_at),
        region: region.to_string(),
        owner: row.owner.clone(),
    }
}

/// The filters of `DescribeImages`, with the values each can match.
fn image_filters() -> Vec<validate::FilterSpec> {
    use validate::{FilterSpec, FilterValues};
    vec![
        FilterSpec {
            name: "image-id",
            values: FilterValues::Ids(validate::image_id),
        },
        FilterSpec {
            name: "image-type",
            values: FilterValues::OneOf(
                [
                    ImageType::PublicImage,
                    ImageType::PrivateImage,
                    ImageType::SharedImage,
                ]
                .iter()
                .map(|t| t.as_str_name())
                .collect(),
            ),
        },
        FilterSpec {
            name: "image-name",
            values: FilterValues::Text,
        },
        FilterSpec {
            name: "platform",
            values: FilterValues::Text,
        },
        FilterSpec {
            name: "image-state",
            values: FilterValues::OneOf(ImageState::ALL.iter().map(|s| s.as_str()).collect()),
        },
    ]
}

/// The filters of `DescribeInstances`, with the values each can match.
fn instance_filters() -> Vec<validate::FilterSpec> {
    use validate::{FilterSpec, FilterValues};
    vec![
        FilterSpec {
            name: "instance-id",
            values: FilterValues::Ids(validate::instance_id),
        },
        FilterSpec {
            name: "instance-name",
            values: FilterValues::Text,
        },
        FilterSpec {
            name: "instance-state",
            values: FilterValues::OneOf(InstanceState::ALL.iter().map(|s| s.as_str()).collect()),
        },
        FilterSpec {
            name: "image-id",
            values: FilterValues::Ids(validate::image_id),
        },
    ]
}

impl RegionApi {
    /// The calling account, once the account's pacing lets the call go.
    async fn caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let caller = account_id(request)?;
        self.region.pacer.turn(&caller).await?;
        Ok(caller)
    }

    /// An instance of the caller, or `NOT_FOUND`.
    async fn own_instance(&self, instance_id: &str, caller: &str) -> Result<InstanceRow> {
        let store = self.region.store.clone();
        let id = instance_id.to_string();
        blocking(move || store.instance(&id))
            .await?
            .filter(|i| i.owner == caller)
            .ok_or_else(|| RegionError::InstanceNotFound(instance_id.to_string()))
    }

    async fn describe_images(
        &self,
        caller: String,
        req: DescribeImagesRequest,
    ) -> Result<DescribeImagesResponse> {
        if !req.image_ids.is_empty() && !req.filters.is_empty() {
            return Err(RegionError::invalid(
                "image_ids",
                "InvalidParameter.InvalidParameterCoexistImageIdsFilters",
                "give image_ids or filters, not both",
            ));
        }
        validate::id_list("image_ids", &req.image_ids, validate::image_id)?;
        validate::filters(&req.filters, &image_filters())?;
        let (offset, limit) = validate::page(
            validate::Listing::Images,
            req.offset,
            req.limit,
            &req.page_token,
        )?;
        let region = self.region.name().to_string();
        let (total, image_set): (usize, Vec<Image>) = if req.image_ids.is_empty() {
            // The caller's own and the public images (as messages, from memory while nothing
            // was written since they were read) and the sharing service's list, asked at the
            // same time.
            let (own, shared) = tokio::join!(
                self.visible_images(&caller),
                self.region.shared_with(&caller)
            );
            let own = own?;
            // Listings go on without shared images while the sharing service is down.
            let shared = shared.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "listing without shared images");
                Vec::new()
            });
            let mut shared: Vec<Image> = shared
                .iter()
                .map(|r| image_message(r, &caller, &region))
                .collect();
            self.attach_progress(&mut shared).await?;
            let all = own.iter().chain(shared.iter());
            if req.filters.is_empty() {
                let total = own.len() + shared.len();
                (total, all.skip(offset).take(limit).cloned().collect())
            } else {
                let matching: Vec<&Image> = all
                    .filter(|image| {
                        validate::matches(&req.filters, |name| match name {
                            "image-id" => image.image_id.clone(),
                            "image-type" => enum_name(image.image_type, |v| {
                                ImageType::try_from(v).ok().map(|t| t.as_str_name())
                            }),
                            "image-name" => image.image_name.clone(),
                            "platform" => image.platform.clone(),
                            "image-state" => enum_name(image.image_state, |v| {
                                pb::ImageState::try_from(v).ok().map(|t| t.as_str_name())
                            }),
                            _ => String::new(),
                        })
                    })
                    .collect();
                (
                    matching.len(),
                    matching
                        .into_iter()
                        .skip(offset)
                        .take(limit)
                        .cloned()
                        .collect(),
                )
            }
        } else {
            // Each image by its id: public, the caller's, shared with the caller, or not there.
            let mut found = Vec::with_capacity(req.image_ids.len());
            for id in &req.image_ids {
                let (row, _) = self.region.resolve_image(id, &caller).await?;
                found.push(image_message(&row, &caller, &region));
            }
            let total = found.len();
            let mut page: Vec<Image> = found.into_iter().skip(offset).take(limit).collect();
            self.attach_progress(&mut page).await?;
            (total, page)
        };
        Ok(DescribeImagesResponse {
            image_set,
            total_count: total as u32,
            next_page_token: validate::next_page_token(
                validate::Listing::Images,
                offset,
                limit,
                total,
            ),
        })
    }

    /// The public images and the caller's own, as `DescribeImages` gives them (progress of
    /// imports and copies included), in listing order. Kept in memory per account until the
    /// next write to the store (`Memo`), so repeated listings read nothing.
    async fn visible_images(&self, caller: &str) -> Result<Arc<Vec<Image>>> {
        let generation = self.region.store.generation();
        if let Some(images) = self.region.listings.get(caller, generation) {
            return Ok(images);
        }
        let owner = caller.to_string();
        let rows = self
            .region
            .read(move |store| store.visible_images(&owner))
            .await?;
        let region = self.region.name().to_string();
        let mut images: Vec<Image> = rows
            .iter()
            .map(|r| image_message(r, caller, &region))
            .collect();
        self.attach_progress(&mut images).await?;
        let images = Arc::new(images);
        self.region
            .listings
            .put(caller, generation, images.clone(), images.len());
        Ok(images)
    }

    /// Adds the progress of imports and copies to the images that have one: from memory while
    /// the store is unchanged since it was read, else from one read for all of them.
    async fn attach_progress(&self, images: &mut [Image]) -> Result<()> {
        let generation = self.region.store.generation();
        let mut copied = Vec::new();
        let mut imported = Vec::new();
        for image in images.iter_mut() {
            let copy = image.image_source == pb::ImageSource::Sync as i32;
            let import = image.image_source == pb::ImageSource::ExternalImport as i32;
            if !copy && !import {
                continue;
            }
            match self.region.progress.get(&image.image_id, generation) {
                Some(known) => {
                    image.import_progress = known.0.clone();
                    image.sync_progress = known.1.clone();
                }
                None if copy => copied.push(image.image_id.clone()),
                None => imported.push(image.image_id.clone()),
            }
        }
        if copied.is_empty() && imported.is_empty() {
            return Ok(());
        }
        let (imports, tasks) = self
            .region
            .read(move |store| {
                let imports = if imported.is_empty() {
                    Default::default()
                } else {
                    store.imports_for(&imported)?
                };
                let tasks = if copied.is_empty() {
                    Default::default()
                } else {
                    store.copy_tasks_for(&copied)?
                };
                Ok((imports, tasks))
            })
            .await?;
        for image in images.iter_mut() {
            let import = imports.get(&image.image_id).map(|row| ImportProgress {
                bytes_read: row.bytes_read,
                size_bytes: row.size_bytes,
                format: row.format.clone(),
                format_variant: row.format_variant.clone(),
                error_reason: row.error_reason.clone(),
                image_url: row.image_url.clone(),
            });
            let sync = tasks.get(&image.image_id).map(sync_progress);
            let read = imports.contains_key(&image.image_id) || tasks.contains_key(&image.image_id);
            if import.is_some() || sync.is_some() {
                image.import_progress = import.clone();
                image.sync_progress = sync.clone();
            }
            if read {
                self.region
                    .progress
                    .put(&image.image_id, generation, Arc::new((import, sync)), 1);
            }
        }
        Ok(())
    }

    async fn modify_image_attribute(
        &self,
        caller: String,
        req: ModifyImageAttributeRequest,
    ) -> Result<()> {
        validate::image_id("image_id", &req.image_id)?;
        if let Some(name) = &req.image_name {
            validate::image_name("image_name", name)?;
        }
        if let Some(text) = &req.image_description {
            validate::description("image_description", text)?;
        }
        if req.image_name.is_none()
            && req.image_description.is_none()
            && req.is_deprecated.is_none()
        {
            return Err(RegionError::invalid(
                "image_name",
                "MissingParameter",
                "give at least one of image_name, image_description, is_deprecated",
            ));
        }
        if let (_, Access::Shared) = self.region.resolve_image(&req.image_id, &caller).await? {
            return Err(RegionError::unsupported(
                "UnsupportedOperation.SharedImageModifyUnsupported",
                "images shared with you cannot be modified",
            ));
        }
        let changes = ImageChanges {
            name: req.image_name,
            description: req.image_description,
            deprecated: req.is_deprecated,
        };
        let store = self.region.store.clone();
        blocking(move || store.modify_image(&req.image_id, &caller, &changes)).await
    }

    async fn delete_images(&self, caller: String, req: DeleteImagesRequest) -> Result<()> {
        if req.image_ids.is_empty() {
            return Err(RegionError::invalid(
                "image_ids",
                "MissingParameter",
                "give at least one image id",
            ));
        }
        validate::id_list("image_ids", &req.image_ids, validate::image_id)?;
        // Hold each image's lock (in id order) so no share is added between the check and
        // the delete.
        let mut ordered = req.image_ids.clone();
        ordered.sort();
        let locks: Vec<_> = ordered
            .iter()
            .map(|id| self.region.resource_lock(id))
            .collect();
        let mut _guards = Vec::new();
        for lock in &locks {
            _guards.push(lock.lock().await);
        }
        for id in &req.image_ids {
            match self.region.resolve_image(id, &caller).await? {
                (_, Access::Own) => {
                    if !self.region.shares_of(id).await?.is_empty() {
                        return Err(RegionError::InShared(id.clone()));
                    }
                }
                (_, Access::Shared) => return Err(RegionError::NotYours(id.clone())),
                (_, Access::Public) => {}
            }
        }
        let store = self.region.store.clone();
        let ids = req.image_ids.clone();
        let images = blocking(move || store.begin_delete(&ids, &caller)).await?;
        self.region.delete_images(images).await;
        Ok(())
    }

    async fn create_image(
        &self,
        caller: String,
        req: CreateImageRequest,
    ) -> Result<CreateImageResponse> {
        validate::instance_id("instance_id", &req.instance_id)?;
        validate::image_name("image_name", &req.image_name)?;
        validate::description("image_description", &req.image_description)?;
        let mut row = ImageRow::new_custom(
            &caller,
            &req.image_name,
            ImageSource::CreateImage,
            ImageState::Creating,
        );
        row.description = req.image_description;
        row.parent_region = self.region.name().to_string();
        let image_id = row.image_id.clone();
        let new = NewImage {
            row,
            content: NewContent::Instance {
                instance_id: req.instance_id,
            },
            refusal_context: None,
        };
        self.region.admit(&caller, vec![new], false).await?;
        self.region.finish_in_background(image_id.clone());
        Ok(CreateImageResponse { image_id })
    }

    async fn export_image(&self, caller: String, req: ExportImageRequest) -> Result<ExportStream> {
        validate::image_id("image_id", &req.image_id)?;
        let format = export_format(req.format)?;
        let image = self.exportable(&caller, &req.image_id).await?;
        self.open_export(&caller, image, format).await
    }

    /// Exports several images in one call: every image is checked before anything is sent (one
    /// that cannot be exported refuses the whole call), then each is streamed in turn, its
    /// messages tagged with its id; each takes its stream permits when the one before it ends.
    async fn export_images(
        &self,
        caller: String,
        req: ExportImagesRequest,
    ) -> Result<ExportImagesStream> {
        if req.image_ids.is_empty() {
            return Err(RegionError::invalid(
                "image_ids",
                "MissingParameter",
                "name at least one image",
            ));
        }
        if req.image_ids.len() > MAX_EXPORTS_PER_CALL {
            return Err(RegionError::invalid(
                "image_ids",
                "InvalidParameterValue.TooManyImages",
                format!("at most {MAX_EXPORTS_PER_CALL} images per call"),
            ));
        }
        for (i, id) in req.image_ids.iter().enumerate() {
            validate::image_id(&format!("image_ids[{i}]"), id)?;
            if req.image_ids[..i].contains(id) {
                return Err(RegionError::invalid(
                    &format!("image_ids[{i}]"),
                    "InvalidParameterValue.Duplicate",
                    format!("{id} is named twice"),
                ));
            }
        }
        let format = export_format(req.format)?;
        let mut images = Vec::with_capacity(req.image_ids.len());
        for id in &req.image_ids {
            images.push(self.exportable(&caller, id).await?);
        }
        use futures::StreamExt;
        let region = self.region.clone();
        let stream = futures::stream::iter(images)
            .then(move |image| {
                let api = RegionApi::new(region.clone());
                let caller = caller.clone();
                async move {
                    let id = image.image_id.clone();
                    match api.open_export(&caller, image, format).await {
                        Ok(stream) => stream
                            .map(move |item| {
                                item.map(|chunk| ExportImagesChunk {
                                    image_id: id.clone(),
                                    chunk: Some(chunk),
                                })
                            })
                            .boxed(),
                        Err(e) => {
                            futures::stream::once(async move { Err(Status::from(e)) }).boxed()
                        }
                    }
                }
            })
            .flatten();
        Ok(Box::pin(stream))
    }

    /// The checks of an export: the caller's own NORMAL image, not public, shared or Windows.
    async fn exportable(&self, caller: &str, image_id: &str) -> Result<ImageRow> {
        let (image, access) = self.region.resolve_image(image_id, caller).await?;
        match access {
            Access::Own => {}
            Access::Public => {
                return Err(RegionError::unsupported(
                    "UnsupportedOperation.PublicImageExportUnsupported",
                    "public images cannot be exported",
                ))
            }
            Access::Shared => {
                return Err(RegionError::unsupported(
                    "UnsupportedOperation.SharedImageExportUnsupported",
                    "images shared with you cannot be exported",
                ))
            }
        }
        if image.platform == "Windows" {
            return Err(RegionError::unsupported(
                "UnsupportedOperation.WindowsImageExportUnsupported",
                "Windows images cannot be exported",
            ));
        }
        if image.state != ImageState::Normal {
            return Err(RegionError::image_state(&image));
        }
        Ok(image)
    }

    /// The stream of one checked image's export.
    async fn open_export(
        &self,
        caller: &str,
        image: ImageRow,
        format: ExportFormat,
    ) -> Result<ExportStream> {
        let caller = caller.to_string();
        let permits = self.region.stream_permits(&caller, true)?;
        let store = self.region.store.clone();
        let chunks = self.region.chunks.clone();
        let snapshot = image.snapshot_id.clone().unwrap_or_default();
        let manifest = blocking(move || store.snapshot_manifest(&snapshot)).await?;
        if format != ExportFormat::Raw {
            let seed = image
                .content_digest
                .bytes()
                .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
            let (header, writer) = crate::export::plan(
                format,
                image.virtual_size,
                &image.content_digest,
                &manifest,
                seed,
            )?;
            let stream = crate::export::stream(chunks, manifest, header, writer);
            return Ok(self.region.guarded(stream, permits));
        }
        let (size, digest) = (image.virtual_size, image.content_digest.clone());
        let piece = move |offset: u64, data: Vec<u8>| ExportImageChunk {
            offset,
            data,
            virtual_size_bytes: size,
            content_digest: digest.clone(),
            format: ExportFormat::Raw as i32,
            file_size_bytes: size,
        };
        // An image of zeros still tells the client its size.
        let last = piece(size, Vec::new());
        let items = manifest
            .into_iter()
            .map(|(idx, d)| (idx * CHUNK_SIZE as u64, d))
            .collect();
        let stream = disk::stream_chunks(
            chunks,
            items,
            true,
            move |offset, mut data| {
                data.truncate(size.saturating_sub(offset).min(CHUNK_SIZE as u64) as usize);
                piece(offset, data)
            },
            Some(last),
        );
        Ok(self.region.guarded(stream, permits))
    }

    async fn upload_image(
        &self,
        caller: String,
        mut stream: tonic::Streaming<UploadImageRequest>,
    ) -> Result<UploadImageResponse, Status> {
        use crate::import::Piece;
        let stall = self.region.config.fair_share.stream_stall_timeout;
        let first = match tokio::time::timeout(stall, stream.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => {
                return Err(RegionError::invalid(
                    "parameters",
                    "MissingParameter",
                    "the call carried no message",
                )
                .into())
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(slow_writer(stall)),
        };
        let Some(params) = first.parameters.as_ref() else {
            return Err(RegionError::invalid(
                "parameters",
                "MissingParameter",
                "the first message carries the parameters",
            )
            .into());
        };
        if first.size_bytes == 0 {
            return Err(RegionError::invalid(
                "size_bytes",
                "MissingParameter",
                "the first message carries the file's size",
            )
            .into());
        }
        let job = self
            .region
            .prepare_import(&caller, params, Some(first.size_bytes), "")
            .await?;
        let (tx, worker) = self.region.start_import(job, None);
        let mut next = Some(Piece::Data(first.data.into()));
        loop {
            if let Some(piece) = next.take() {
                let end = !matches!(piece, Piece::Data(_));
                if tx.send(piece).await.is_err() || end {
                    // The worker stopped reading (a refusal), or the file is complete.
                    break;
                }
            }
            next = Some(match tokio::time::timeout(stall, stream.message()).await {
                Ok(Ok(Some(message))) => Piece::Data(message.data.into()),
                Ok(Ok(None)) => Piece::End,
                Ok(Err(status)) => Piece::Abort(imagefleet_proto::error::status(
                    tonic::Code::Cancelled,
                    crate::import::INTERRUPTED,
                    format!("the upload was interrupted: {}", status.message()),
                )),
                Err(_) => Piece::Abort(slow_writer(stall)),
            });
        }
        drop(tx);
        let outcome = worker
            .await
            .map_err(|e| Status::from(RegionError::Task(e.to_string())))?;
        let (image_id, summary) = self.region.conclude_import(outcome).await?;
        let store = self.region.store.clone();
        let id = image_id.clone();
        let image = blocking(move || store.image(&id)).await?;
        Ok(UploadImageResponse {
            image_id,
            virtual_size_bytes: summary.virtual_size,
            content_digest: image.map(|i| i.content_digest).unwrap_or_default(),
            format: summary.format.as_str().to_string(),
            format_variant: summary.format.variant().to_string(),
        })
    }

    async fn run_instances(
        &self,
        caller: String,
        req: RunInstancesRequest,
    ) -> Result<RunInstancesResponse> {
        let (instance_type, count) =
            check_launch(&req.image_id, &req.instance_type, req.instance_count)?;
        validate::instance_name("instance_name", &req.instance_name)?;
        if req.system_disk_size_gib > MAX_SYSTEM_DISK_GIB {
            return Err(RegionError::invalid(
                "system_disk_size_gib",
                "InvalidParameterValue.DiskSizeTooLarge",
                format!("system disks are at most {MAX_SYSTEM_DISK_GIB} GiB"),
            ));
        }
        let (image, _) = self.region.resolve_image(&req.image_id, &caller).await?;
        if image.state != ImageState::Normal {
            return Err(RegionError::image_state(&image));
        }
        let image_gib = image.virtual_size.div_ceil(GIB);
        let disk_gib = match req.system_disk_size_gib {
            0 => DEFAULT_SYSTEM_DISK_GIB.max(image_gib),
            g if g < image_gib => {
                return Err(RegionError::invalid(
                    "system_disk_size_gib",
                    "InvalidParameterValue.InsufficientSystemDiskSize",
                    format!("the image needs a system disk of at least {image_gib} GiB"),
                ))
            }
            g => g,
        };
        let now = unix_now();
        let instances: Vec<InstanceRow> = (0..count)
            .map(|i| {
                let instance_id = random_id("ins");
                let name = instance_name(&req.instance_name, &instance_id, i, count);
                (instance_id, name)
            })
            .map(|(instance_id, name)| InstanceRow {
                instance_id,
                owner: caller.clone(),
                name,
                instance_type: instance_type.name.to_string(),
                cpu: instance_type.cpu,
                memory_gib: instance_type.memory_gib,
                image_id: image.image_id.clone(),
                base_snapshot_id: image.snapshot_id.clone(),
                disk_size: disk_gib * GIB,
                state: InstanceState::Pending,
                created_at: now,
                root_image_id: image.root_image_id.clone(),
                root_paid: image.root_paid,
                image_owner: image.owner.clone(),
                chain: image.chain.clone(),
                root_kind: image.root_kind,
            })
            .collect();
        let ids: Vec<String> = instances.iter().map(|i| i.instance_id.clone()).collect();
        let region = self.region.clone();
        let image_id = image.image_id.clone();
        blocking(move || {
            region
                .store
                .insert_instances(&image_id, &instances, region.limits())
        })
        .await?;
        // The disk is ready when the rows are: boot is immediate (retried until it is
        // recorded, e.g. once a full disk has room again).
        let region = self.region.clone();
        let booting = ids.clone();
        imagefleet_rpc::trace::spawn(async move {
            region
                .retry("boot instances", || {
                    let store = region.store.clone();
                    let booting = booting.clone();
                    async move {
                        blocking(move || {
                            store.set_instances_state(
                                &booting,
                                InstanceState::Pending,
                                InstanceState::Running,
                            )
                        })
                        .await
                    }
                })
                .await
        });
        tracing::info!(image = %image.image_id, count, "instances launched");
        Ok(RunInstancesResponse {
            instance_id_set: ids,
        })
    }

    async fn inquiry_price_run_instances(
        &self,
        caller: String,
        req: InquiryPriceRunInstancesRequest,
    ) -> Result<InquiryPriceRunInstancesResponse> {
        let (instance_type, count) =
            check_launch(&req.image_id, &req.instance_type, req.instance_count)?;
        let hours = match req.hours {
            0 => 1,
            h if h > MAX_QUOTE_HOURS => {
                return Err(RegionError::invalid(
                    "hours",
                    "InvalidParameterValue.LimitExceeded",
                    format!("at most {MAX_QUOTE_HOURS} hours"),
                ))
            }
            h => h,
        };
        let (image, access) = self.region.resolve_image(&req.image_id, &caller).await?;
        // The owner's snapshot storage is priced only for the owner.
        let owner_snapshot_bytes = match access {
            Access::Own => {
                let store = self.region.store.clone();
                Some(blocking(move || store.snapshot_bytes(&caller)).await?)
            }
            _ => None,
        };
        let price = self
            .region
            .quote_run(crate::billing::Quote {
                image: &image,
                instance_type: instance_type.name,
                vcpu: instance_type.cpu,
                instance_count: count,
                hours,
                owner_snapshot_bytes,
            })
            .await?;
        Ok(InquiryPriceRunInstancesResponse { price: Some(price) })
    }

    async fn describe_instances(
        &self,
        caller: String,
        req: DescribeInstancesRequest,
    ) -> Result<DescribeInstancesResponse> {
        if !req.instance_ids.is_empty() && !req.filters.is_empty() {
            return Err(RegionError::invalid(
                "instance_ids",
                "InvalidParameter.InvalidParameterCoexistInstanceIdsFilters",
                "give instance_ids or filters, not both",
            ));
        }
        validate::id_list("instance_ids", &req.instance_ids, validate::instance_id)?;
        validate::filters(&req.filters, &instance_filters())?;
        let (offset, limit) = validate::page(
            validate::Listing::Instances,
            req.offset,
            req.limit,
            &req.page_token,
        )?;
        let mut query = InstanceQuery {
            owner: caller,
            instance_ids: req.instance_ids.clone(),
            offset,
            limit,
            ..Default::default()
        };
        for f in &req.filters {
            match f.name.as_str() {
                "instance-id" => query.instance_ids.extend(f.values.iter().cloned()),
                "instance-name" => query.names.extend(f.values.iter().cloned()),
                "image-id" => query.image_ids.extend(f.values.iter().cloned()),
                "instance-state" => {
                    for v in &f.values {
                        query.states.push(InstanceState::parse(v).ok_or_else(|| {
                            RegionError::invalid(
                                "filters",
                                "InvalidFilterValue",
                                format!(
                                    "instance-state {v:?} is not one of {}",
                                    InstanceState::ALL
                                        .iter()
                                        .map(|s| s.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            )
                        })?);
                    }
                }
                _ => {}
            }
        }
        let store = self.region.store.clone();
        let wanted = req.instance_ids.clone();
        let page = blocking(move || store.list_instances(&query)).await?;
        if let Some(missing) = wanted
            .iter()
            .find(|id| !page.instances.iter().any(|i| &i.instance_id == *id))
        {
            if wanted.len() <= limit && offset == 0 {
                return Err(RegionError::InstanceNotFound(missing.clone()));
            }
        }
        let region = self.region.name().to_string();
        Ok(DescribeInstancesResponse {
            instance_set: page
                .instances
                .iter()
                .map(|r| instance_message(r, &region))
                .collect(),
            total_count: page.total as u32,
            next_page_token: validate::next_page_token(
                validate::Listing::Instances,
                offset,
                limit,
                page.total,
            ),
        })
    }

    async fn terminate_instances(
        &self,
        caller: String,
        req: TerminateInstancesRequest,
    ) -> Result<()> {
        if req.instance_ids.is_empty() {
            return Err(RegionError::invalid(
                "instance_ids",
                "MissingParameter",
                "give at least one instance id",
            ));
        }
        validate::id_list("instance_ids", &req.instance_ids, validate::instance_id)?;
        let store = self.region.store.clone();
        let dropped =
            blocking(move || store.terminate(&req.instance_ids, &caller, unix_now())).await?;
        self.region.reclaim(dropped).await
    }

    async fn reset_instance(&self, caller: String, req: ResetInstanceRequest) -> Result<()> {
        validate::instance_id("instance_id", &req.instance_id)?;
        if !req.image_id.is_empty() {
            validate::image_id("image_id", &req.image_id)?;
        }
        let instance = self.own_instance(&req.instance_id, &caller).await?;
        let image_id = if req.image_id.is_empty() {
            instance.image_id.clone()
        } else {
            req.image_id.clone()
        };
        let (image, _) = self.region.resolve_image(&image_id, &caller).await?;
        if image.state != ImageState::Normal {
            return Err(RegionError::image_state(&image));
        }
        let lock = self.region.resource_lock(&instance.instance_id);
        let _guard = lock.lock().await;
        let store = self.region.store.clone();
        let dropped = blocking(move || store.reset(&req.instance_id, &caller, &image)).await?;
        self.region.reclaim(dropped).await
    }

    async fn write_instance_disk(
        &self,
        caller: String,
        req: WriteInstanceDiskRequest,
    ) -> Result<WriteInstanceDiskResponse> {
        validate::instance_id("instance_id", &req.instance_id)?;
        if req.data.len() as u64 > validate::MAX_IO_BYTES {
            return Err(RegionError::invalid(
                "data",
                "InvalidParameterValue.TooLarge",
                format!("at most {} bytes per call", validate::MAX_IO_BYTES),
            ));
        }
        let lock = self.region.resource_lock(&req.instance_id);
        let _guard = lock.lock().await;
        // The caller's right to write is established before any byte is stored.
        let store = self.region.store.clone();
        let (id, owner) = (req.instance_id.clone(), caller.clone());
        let instance = blocking(move || store.writable_instance(&id, &owner)).await?;
        disk::check_range(&instance, req.offset, req.data.len() as u64)?;
        self.region
            .check_free_space(disk::chunks_touched_bytes(
                req.offset,
                req.data.len() as u64,
            ))
            .await?;
        let region = self.region.clone();
        let written = req.data.len() as u64;
        let outcome = blocking(move || {
            let _shared = region.chunk_refs.read().unwrap_or_else(|e| e.into_inner());
            Ok(disk::write(
                &region.store,
                &region.chunks,
                &instance,
                &caller,
                req.offset,
                &req.data,
                region.limits(),
            ))
        })
        .await?;
        match outcome {
            Ok(dropped) => {
                self.region.reclaim(dropped).await?;
                Ok(WriteInstanceDiskResponse {
                    bytes_written: written,
                })
            }
            Err(refused) => {
                self.region.reclaim(refused.stored).await?;
                Err(refused.error)
            }
        }
    }

    async fn read_instance_disk(
        &self,
        caller: String,
        req: ReadInstanceDiskRequest,
    ) -> Result<ReadInstanceDiskResponse> {
        validate::instance_id("instance_id", &req.instance_id)?;
        if req.length > validate::MAX_IO_BYTES {
            return Err(RegionError::invalid(
                "length",
                "InvalidParameterValue.TooLarge",
                format!("at most {} bytes per call", validate::MAX_IO_BYTES),
            ));
        }
        let instance = self.own_instance(&req.instance_id, &caller).await?;
        if instance.state == InstanceState::Terminated {
            return Err(RegionError::InstanceState {
                instance_id: instance.instance_id,
                state: instance.state,
            });
        }
        let store = self.region.store.clone();
        let chunks = self.region.chunks.clone();
        let data = blocking(move || disk::read(&store, &chunks, &instance, req.offset, req.length))
            .await?;
        Ok(ReadInstanceDiskResponse { data })
    }
}

/// The status of an upload whose client sent nothing for `stall`.
fn slow_writer(stall: std::time::Duration) -> Status {
    imagefleet_proto::error::status_with_metadata(
        tonic::Code::DeadlineExceeded,
        crate::import::SLOW_WRITER,
        format!(
            "the upload was cut off: its client sent nothing for {}",
            humantime::format_duration(stall)
        ),
        [(
            "stall_timeout".to_string(),
            humantime::format_duration(stall).to_string(),
        )],
    )
}

/// Answers a handler's result: its error becomes a status here.
fn answer<T>(result: Result<T>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl RegionService for RegionApi {
    async fn describe_images(
        &self,
        request: Request<DescribeImagesRequest>,
    ) -> Result<Response<DescribeImagesResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::describe_images(self, caller, request.into_inner()).await)
    }

    async fn describe_image_quota(
        &self,
        request: Request<DescribeImageQuotaRequest>,
    ) -> Result<Response<DescribeImageQuotaResponse>, Status> {
        let caller = self.caller(&request).await?;
        let store = self.region.store.clone();
        let used = blocking(move || store.usage(&caller)).await;
        let limits = self.region.config.storage;
        answer(used.map(|used| DescribeImageQuotaResponse {
            image_num_quota: self.region.config.image_quota,
            image_num_used: used.images,
            instance_quota: limits.instance_quota,
            instance_count: used.instances.min(u64::from(u32::MAX)) as u32,
            storage_bytes_quota: limits.storage_bytes_quota,
            storage_bytes_used: used.storage_bytes,
        }))
    }

    async fn modify_image_attribute(
        &self,
        request: Request<ModifyImageAttributeRequest>,
    ) -> Result<Response<ModifyImageAttributeResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(
            RegionApi::modify_image_attribute(self, caller, request.into_inner())
                .await
                .map(|()| ModifyImageAttributeResponse {}),
        )
    }

    async fn delete_images(
        &self,
        request: Request<DeleteImagesRequest>,
    ) -> Result<Response<DeleteImagesResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(
            RegionApi::delete_images(self, caller, request.into_inner())
                .await
                .map(|()| DeleteImagesResponse {}),
        )
    }

    async fn create_image(
        &self,
        request: Request<CreateImageRequest>,
    ) -> Result<Response<CreateImageResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::create_image(self, caller, request.into_inner()).await)
    }

    type ExportImageStream = ExportStream;

    async fn export_image(
        &self,
        request: Request<ExportImageRequest>,
    ) -> Result<Response<Self::ExportImageStream>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::export_image(self, caller, request.into_inner()).await)
    }

    type ExportImagesStream = ExportImagesStream;

    async fn export_images(
        &self,
        request: Request<ExportImagesRequest>,
    ) -> Result<Response<Self::ExportImagesStream>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::export_images(self, caller, request.into_inner()).await)
    }

    async fn upload_image(
        &self,
        request: Request<tonic::Streaming<UploadImageRequest>>,
    ) -> Result<Response<UploadImageResponse>, Status> {
        let caller = self.caller(&request).await?;
        RegionApi::upload_image(self, caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn import_image(
        &self,
        request: Request<ImportImageRequest>,
    ) -> Result<Response<ImportImageResponse>, Status> {
        let caller = self.caller(&request).await?;
        crate::fetch::import_image(&self.region, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn describe_import_image_os(
        &self,
        request: Request<DescribeImportImageOsRequest>,
    ) -> Result<Response<DescribeImportImageOsResponse>, Status> {
        self.caller(&request).await?;
        Ok(Response::new(DescribeImportImageOsResponse {
            import_os_list_support: catalogue::IMPORT_OS
                .iter()
                .map(|(platform, versions)| ImportImageOs {
                    platform: platform.to_string(),
                    os_versions: versions.iter().map(|v| v.to_string()).collect(),
                })
                .collect(),
            architectures: catalogue::IMPORT_ARCHITECTURES
                .iter()
                .map(|a| a.to_string())
                .collect(),
            image_formats: catalogue::IMPORT_FORMATS
                .iter()
                .map(|f| f.to_string())
                .collect(),
        }))
    }

    async fn run_instances(
        &self,
        request: Request<RunInstancesRequest>,
    ) -> Result<Response<RunInstancesResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::run_instances(self, caller, request.into_inner()).await)
    }

    async fn inquiry_price_run_instances(
        &self,
        request: Request<InquiryPriceRunInstancesRequest>,
    ) -> Result<Response<InquiryPriceRunInstancesResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::inquiry_price_run_instances(self, caller, request.into_inner()).await)
    }

    async fn describe_instances(
        &self,
        request: Request<DescribeInstancesRequest>,
    ) -> Result<Response<DescribeInstancesResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::describe_instances(self, caller, request.into_inner()).await)
    }

    async fn terminate_instances(
        &self,
        request: Request<TerminateInstancesRequest>,
    ) -> Result<Response<TerminateInstancesResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(
            RegionApi::terminate_instances(self, caller, request.into_inner())
                .await
                .map(|()| TerminateInstancesResponse {}),
        )
    }

    async fn reset_instance(
        &self,
        request: Request<ResetInstanceRequest>,
    ) -> Result<Response<ResetInstanceResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(
            RegionApi::reset_instance(self, caller, request.into_inner())
                .await
                .map(|()| ResetInstanceResponse {}),
        )
    }

    async fn write_instance_disk(
        &self,
        request: Request<WriteInstanceDiskRequest>,
    ) -> Result<Response<WriteInstanceDiskResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::write_instance_disk(self, caller, request.into_inner()).await)
    }

    async fn read_instance_disk(
        &self,
        request: Request<ReadInstanceDiskRequest>,
    ) -> Result<Response<ReadInstanceDiskResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(RegionApi::read_instance_disk(self, caller, request.into_inner()).await)
    }

    async fn sync_images(
        &self,
        request: Request<SyncImagesRequest>,
    ) -> Result<Response<SyncImagesResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(crate::copy::request::sync_images(&self.region, &caller, request.into_inner()).await)
    }

    async fn modify_image_share_permission(
        &self,
        request: Request<ModifyImageSharePermissionRequest>,
    ) -> Result<Response<ModifyImageSharePermissionResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(
            self.region
                .modify_share_permission(&caller, request.into_inner())
                .await
                .map(|()| ModifyImageSharePermissionResponse {}),
        )
    }

    async fn describe_image_share_permission(
        &self,
        request: Request<DescribeImageSharePermissionRequest>,
    ) -> Result<Response<DescribeImageSharePermissionResponse>, Status> {
        let caller = self.caller(&request).await?;
        answer(
            self.region
                .describe_share_permission(&caller, request.into_inner())
                .await,
        )
    }

    async fn describe_instance_type_configs(
        &self,
        request: Request<DescribeInstanceTypeConfigsRequest>,
    ) -> Result<Response<DescribeInstanceTypeConfigsResponse>, Status> {
        self.caller(&request).await?;
        let filters = request.into_inner().filters;
        let types = catalogue::instance_types_listed();
        let mut families: Vec<&'static str> = types.iter().map(|t| t.family()).collect();
        families.dedup();
        validate::filters(
            &filters,
            &[
                validate::FilterSpec {
                    name: "instance-family",
                    values: validate::FilterValues::OneOf(families),
                },
                validate::FilterSpec {
                    name: "instance-type",
                    values: validate::FilterValues::OneOf(types.iter().map(|t| t.name).collect()),
                },
            ],
        )?;
        let region = self.region.name();
        let set = types
            .into_iter()
            .filter(|t| {
                validate::matches(&filters, |name| match name {
                    "instance-family" => t.family().to_string(),
                    _ => t.name.to_string(),
                })
            })
            .map(|t| InstanceTypeConfig {
                instance_type: t.name.to_string(),
                instance_family: t.family().to_string(),
                cpu: t.cpu,
                memory_gib: t.memory_gib,
                region: region.to_string(),
            })
            .collect();
        Ok(Response::new(DescribeInstanceTypeConfigsResponse {
            instance_type_config_set: set,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::instance_name;

    #[test]
    fn instances_are_named_by_one_rule() {
        assert_eq!(instance_name("web", "ins-aaaaaaaa", 0, 1), "web");
        assert_eq!(instance_name("web", "ins-aaaaaaaa", 0, 2), "web-1");
        assert_eq!(instance_name("web", "ins-bbbbbbbb", 1, 2), "web-2");
        assert_eq!(instance_name("", "ins-aaaaaaaa", 0, 1), "ins-aaaaaaaa");
        assert_eq!(instance_name("", "ins-bbbbbbbb", 1, 2), "ins-bbbbbbbb");
    }
}

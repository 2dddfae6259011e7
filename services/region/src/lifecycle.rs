//! The image lifecycle after admission: the one finish step every new image goes through
//! (digest from what the region stored, catalog and ownership entries, then `NORMAL`), deletion,
//! failure, and the background upkeep (purging old terminated instances, expired copy pins).
//! Every step is idempotent, so after a restart it is simply run again by state.

use crate::disk;
use crate::error::{RegionError, Result};
use crate::model::{CopyState, ImageRow, ImageState};
use crate::region::{blocking, Region};
use imagefleet_proto::catalog::v1::{ImageRecord, RegisterImageRequest, UnregisterImageRequest};
use imagefleet_proto::region::v1::ReleaseCopySourceRequest;
use imagefleet_proto::sharing::v1::{RemoveImageRequest, SetImageOwnerRequest};
use imagefleet_rpc::time::unix_now;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

/// Terminated instance rows deleted per purge transaction.
const PURGE_BATCH: usize = 1000;

impl Region {
    /// The catalog's record of an image.
    pub(crate) fn record(&self, image: &ImageRow) -> ImageRecord {
        ImageRecord {
            image_id: image.image_id.clone(),
            region: self.config.region.clone(),
            owner_account_id: image.owner.clone(),
            image_type: image.kind.as_str().to_string(),
            image_name: image.name.clone(),
            platform: image.platform.clone(),
            os_name: image.os_name.clone(),
            parent_image_id: image.parent_image_id.clone(),
            parent_region: image.parent_region.clone(),
            ultimate_source_image_id: image.root_image_id.clone(),
            ultimate_source_paid: image.root_paid,
            image_source: image.source.as_str().to_string(),
            content_digest: image.content_digest.clone(),
        }
    }

    /// Finishes an image whose content is complete: computes its digest from the manifest the
    /// region stored (a copy's must equal the digest its source computed), registers it with
    /// the catalog and the sharing service, then makes it `NORMAL`. Nothing if the image is
    /// not being filled any more.
    pub(crate) async fn finish_image(&self, image_id: &str) -> Result<()> {
        let store = self.store.clone();
        let id = image_id.to_string();
        let loaded = blocking(move || {
            let Some(image) = store.image(&id)? else {
                return Ok(None);
            };
            if !image.state.is_filling() {
                return Ok(None);
            }
            let task = store.copy_task(&id)?;
            let manifest =
                store.snapshot_manifest(image.snapshot_id.as_deref().unwrap_or_default())?;
            Ok(Some((image, task, manifest)))
        })
        .await?;
        let Some((mut image, task, manifest)) = loaded else {
            return Ok(());
        };
        if let Some(task) = &task {
            if task.state != CopyState::Done {
                return Err(RegionError::image_state(&image));
            }
        }
        image.content_digest = disk::manifest_digest(image.virtual_size, &manifest);
        if let Some(task) = &task {
            if image.content_digest != task.expected_digest {
                let reason = format!(
                    "the copy's content ({}) does not match the source's ({})",
                    image.content_digest, task.expected_digest
                );
                self.fail_copy(image_id, &reason).await?;
                return Ok(());
            }
        }
        self.catalog
            .clone()
            .register_image(RegisterImageRequest {
                image: Some(self.record(&image)),
            })
            .await
            .map_err(|s| imagefleet_rpc::unavailable("catalog", s))?;
        self.sharing
            .clone()
            .set_image_owner(SetImageOwnerRequest {
                image_id: image.image_id.clone(),
                owner_account_id: image.owner.clone(),
            })
            .await
            .map_err(|s| imagefleet_rpc::unavailable("sharing", s))?;
        let store = self.store.clone();
        let id = image_id.to_string();
        let (from, digest) = (image.state, image.content_digest.clone());
        if !blocking(move || store.make_normal(&id, from, &digest)).await? {
            return Ok(());
        }
        tracing::info!(region = %self.config.region, image = %image_id, source = %image.source, "image ready");
        if let Some(task) = task {
            self.release_copy_source(&task.source_region, &task.request_key)
                .await;
        }
        Ok(())
    }

    /// A copy that cannot succeed ends `CREATEFAILED` with `reason`; what it gathered is
    /// reclaimed and its source released.
    pub(crate) async fn fail_copy(&self, image_id: &str, reason: &str) -> Result<()> {
        tracing::warn!(region = %self.config.region, image = %image_id, %reason, "copy failed");
        let store = self.store.clone();
        let id = image_id.to_string();
        let why = reason.to_string();
        let (task, released) =
            blocking(move || Ok((store.copy_task(&id)?, store.fail_copy(&id, &why)?))).await?;
        self.reclaim(released).await?;
        if let Some(task) = task {
            self.release_copy_source(&task.source_region, &task.request_key)
                .await;
        }
        Ok(())
    }

    /// Tells a copy's source region it may unpin what it was keeping for the copy. Best
    /// effort: pins expire at the copy's deadline anyway.
    pub(crate) async fn release_copy_source(&self, source_region: &str, request_key: &str) {
        let released = async {
            self.peer(source_region)
                .await?
                .release_copy_source(ReleaseCopySourceRequest {
                    request_keys: vec![request_key.to_string()],
                })
                .await?;
            Ok::<_, RegionError>(())
        }
        .await;
        if let Err(e) = released {
            tracing::info!(region = %self.config.region, source = %source_region, error = %e, "source not told the copy ended; its pin expires");
        }
    }

    /// Finishes a `DELETING` image: catalog and ownership entries, rows (a copy's task and
    /// what it had gathered included), then unreferenced chunks. Idempotent.
    pub(crate) async fn finish_delete(&self, image_id: &str) -> Result<()> {
        let unregistered = self
            .catalog
            .clone()
            .unregister_image(UnregisterImageRequest {
                image_id: image_id.to_string(),
                region: self.config.region.clone(),
            })
            .await;
        match unregistered {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(imagefleet_rpc::unavailable("catalog", s).into()),
        }
        self.sharing
            .clone()
            .remove_image(RemoveImageRequest {
                image_id: image_id.to_string(),
            })
            .await
            .map_err(|s| imagefleet_rpc::unavailable("sharing", s))?;
        let store = self.store.clone();
        let id = image_id.to_string();
        let (task, dropped) =
            blocking(move || Ok((store.copy_task(&id)?, store.finish_delete(&id)?))).await?;
        self.reclaim(dropped).await?;
        if let Some(task) = task.filter(|t| t.state != CopyState::Failed) {
            self.release_copy_source(&task.source_region, &task.request_key)
                .await;
        }
        tracing::info!(region = %self.config.region, image = %image_id, "image deleted");
        Ok(())
    }

    /// Deletes `images` (already `DELETING`): copies under way are cancelled first. What
    /// cannot finish now (a peer down) goes on in the background.
    pub(crate) async fn delete_images(self: &Arc<Self>, images: Vec<ImageRow>) {
        for image in images {
            if image.state == ImageState::Syncing {
                self.cancel_copy(&image.image_id).await;
            }
            if let Err(e) = self.finish_delete(&image.image_id).await {
                tracing::warn!(image = %image.image_id, error = %e, "delete continues in the background");
                self.delete_in_background(image.image_id);
            }
        }
    }

    /// Runs the finish step of `image_id` until it succeeds.
    pub(crate) fn finish_in_background(self: &Arc<Self>, image_id: String) {
        let region = self.clone();
        imagefleet_rpc::trace::spawn(async move {
            region
                .retry("finish image", || region.finish_image(&image_id))
                .await
        });
    }

    /// Runs the deletion of `image_id` until it succeeds.
    fn delete_in_background(self: &Arc<Self>, image_id: String) {
        let region = self.clone();
        imagefleet_rpc::trace::spawn(async move {
            region
                .retry("finish image deletion", || region.finish_delete(&image_id))
                .await
        });
    }

    /// Puts back what a restart interrupted: instances still `PENDING` boot, images still being
    /// created are finished, copies resume, imports (which cannot resume) fail, deletions finish.
    pub(crate) fn resume(self: &Arc<Self>) -> Result<()> {
        use crate::model::InstanceState;
        let pending = self.store.instances_in_state(InstanceState::Pending)?;
        self.store
            .set_instances_state(&pending, InstanceState::Pending, InstanceState::Running)?;
        for image in self.store.images_in_state(ImageState::Creating)? {
            self.finish_in_background(image.image_id);
        }
        for image in self.store.images_in_state(ImageState::Syncing)? {
            self.spawn_copy(image.image_id);
        }
        for image in self.store.images_in_state(ImageState::Importing)? {
            let dropped = self.store.fail_import(
                &image.image_id,
                crate::import::INTERRUPTED,
                "the import was interrupted by a region restart",
            )?;
            self.reclaim_blocking(&dropped)?;
        }
        for image in self.store.images_in_state(ImageState::Deleting)? {
            self.delete_in_background(image.image_id);
        }
        Ok(())
    }

    /// One round of upkeep: terminated instances past their retention are purged, expired
    /// copy pins released, and what they held reclaimed.
    pub(crate) async fn upkeep(&self) -> Result<()> {
        let now = unix_now();
        let before = now - self.config.instance_retention.as_secs() as i64;
        loop {
            let store = self.store.clone();
            let purged = blocking(move || store.purge_terminated(before, PURGE_BATCH)).await?;
            if purged > 0 {
                tracing::info!(region = %self.config.region, purged, "purged terminated instances");
            }
            if purged < PURGE_BATCH {
                break;
            }
        }
        let store = self.store.clone();
        let released = blocking(move || store.release_pins(&[], now)).await?;
        self.reclaim(released).await
    }

    /// Runs `upkeep` every `every` until the region stops.
    pub(crate) async fn keep_up(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.upkeep().await {
                tracing::warn!(region = %self.config.region, error = %e, "upkeep failed; next round retries");
            }
        }
    }
}

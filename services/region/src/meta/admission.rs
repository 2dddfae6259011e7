//! Admission of new images, the one transaction every new image goes through whatever its
//! source (an instance, a copy, an import): ownership of what it is made from, the account's
//! image quota and the name are checked, and the image row (with its snapshot) reserved,
//! before any of its bytes are moved. A batch is admitted whole or not at all; a dry run makes
//! exactly the same checks and writes nothing.

use super::outbox::Emitter;
use super::{copies, images, instances, snapshots, Store};
use crate::error::{RegionError, Result};
use crate::model::{Chain, CopyTask, ImageRow, ImageState, LineageLink, RootKind};
use rusqlite::{params, Connection, Transaction};
use std::collections::HashSet;

/// What a new image's content comes from.
#[derive(Clone, Debug)]
pub enum NewContent {
    /// The disk of one of the owner's instances, frozen at admission.
    Instance { instance_id: String },
    /// Another region's image; chunks arrive afterwards. An image already admitted under the
    /// task's request key is returned as it is (idempotent retries).
    Copy { task: Box<CopyTask> },
    /// A disk file read in afterwards: its size (0: unknown) and where it comes from.
    Import { size_bytes: u64, image_url: String },
}

/// One image to admit.
#[derive(Clone, Debug)]
pub struct NewImage {
    pub row: ImageRow,
    pub content: NewContent,
    /// Names the image and region a refusal is about (the source image and destination of a
    /// copy), so a caller of a many-image call knows which one failed.
    pub refusal_context: Option<(String, String)>,
}

impl NewImage {
    fn refuse(&self, e: RegionError) -> RegionError {
        match &self.refusal_context {
            Some((image_id, region)) => RegionError::CopyRefused {
                image_id: image_id.clone(),
                region: region.clone(),
                source: Box::new(e),
            },
            None => e,
        }
    }
}

/// Quota and rules the admission applies.
#[derive(Clone, Copy, Debug)]
pub struct Limits<'a> {
    pub image_quota: u32,
    pub region: &'a str,
    /// Instances (not terminated) per account.
    pub instance_quota: u32,
    /// Stored bytes per account (as [`Usage`] counts them).
    pub storage_bytes_quota: u64,
}

/// What an account holds in a region, as its quotas count it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub images: u32,
    /// Instances not terminated.
    pub instances: u64,
    /// Stored bytes: each of the account's custom images' stored bytes (its snapshot's
    /// non-zero chunks; for a copy still arriving, the source's), plus the chunks written to
    /// its instances' disks (beyond their base images), in whole chunks.
    pub storage_bytes: u64,
}

/// The account's usage, read inside a transaction (or on a read connection).
pub(super) fn usage(c: &Connection, owner: &str) -> rusqlite::Result<Usage> {
    Ok(Usage {
        images: images::count_custom_images(c, owner)?,
        instances: instances::live_instances(c, owner)?,
        storage_bytes: storage_bytes(c, owner)?,
    })
}

/// The account's stored bytes, as [`Usage`] counts them.
fn storage_bytes(c: &Connection, owner: &str) -> rusqlite::Result<u64> {
    let image_bytes: i64 = c
        .prepare_cached(
            "SELECT COALESCE(SUM(CASE WHEN i.state = ?2 \
                 THEN MAX(COALESCE(s.stored_bytes, 0), COALESCE(t.bytes_total, 0)) \
                 ELSE COALESCE(s.stored_bytes, 0) END), 0) \
             FROM images i LEFT JOIN snapshots s ON s.snapshot_id = i.snapshot_id \
             LEFT JOIN sync_tasks t ON t.image_id = i.image_id WHERE i.owner = ?1",
        )?
        .query_row(params![owner, ImageState::Syncing], |r| r.get(0))?;
    let written = instances::written_chunks(c, owner)?;
    Ok((image_bytes.max(0) as u64).saturating_add(super::chunk_bytes(written)))
}

/// Refuses `asked` more instances of `owner` past the instance quota.
pub(super) fn check_instances(
    c: &Connection,
    owner: &str,
    asked: u64,
    limits: Limits<'_>,
) -> Result<()> {
    let used = instances::live_instances(c, owner)?;
    if used.saturating_add(asked) > u64::from(limits.instance_quota) {
        return Err(RegionError::InstanceQuota {
            quota: limits.instance_quota,
            used,
            asked,
            region: limits.region.to_string(),
        });
    }
    Ok(())
}

/// Refuses storing `asked` more bytes for `owner` past the storage quota. Nothing asked is
/// never refused (rewriting what is there, dropping chunks).
pub(super) fn check_storage(
    c: &Connection,
    owner: &str,
    asked: u64,
    limits: Limits<'_>,
) -> Result<()> {
    if asked == 0 {
        return Ok(());
    }
    let used = storage_bytes(c, owner)?;
    if used.saturating_add(asked) > limits.storage_bytes_quota {
        return Err(RegionError::StorageQuota {
            quota: limits.storage_bytes_quota,
            used,
            asked,
            region: limits.region.to_string(),
        });
    }
    Ok(())
}

fn admit_in(
    tx: &Transaction<'_>,
    emitter: &Emitter<'_>,
    owner: &str,
    batch: &[NewImage],
    limits: Limits<'_>,
) -> Result<Vec<ImageRow>> {
    let mut used = images::count_custom_images(tx, owner)?;
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(batch.len());
    for new in batch {
        if let NewContent::Copy { task } = &new.content {
            if let Some(existing) = copies::image_of_request(tx, &task.request_key)? {
                let row = images::get_image(tx, &existing)?
                    .ok_or_else(|| RegionError::ImageNotFound(existing.clone()))?;
                out.push(row);
                continue;
            }
        }
        let mut row = new.row.clone();
        debug_assert_eq!(row.owner, owner);
        if !names.insert(row.name.clone()) {
            return Err(new.refuse(RegionError::NameTaken(row.name.clone())));
        }
        images::check_name_free(tx, owner, &row.name, None).map_err(|e| new.refuse(e))?;
        if used >= limits.image_quota {
            return Err(new.refuse(RegionError::ImageQuota {
                quota: limits.image_quota,
                region: limits.region.to_string(),
            }));
        }
        used += 1;
        let snapshot_id = row.snapshot_id.clone().unwrap_or_default();
        // The image itself heads its lineage chain.
        let this = LineageLink {
            image_id: row.image_id.clone(),
            region: limits.region.to_string(),
            owner: owner.to_string(),
        };
        let manifest = match &new.content {
            NewContent::Instance { instance_id } => {
                let instance = instances::get_instance(tx, instance_id)?
                    .filter(|i| i.owner == owner)
                    .ok_or_else(|| RegionError::InstanceNotFound(instance_id.clone()))?;
                if !instance.state.has_live_disk() {
                    return Err(RegionError::InstanceState {
                        instance_id: instance_id.clone(),
                        state: instance.state,
                    });
                }
                let manifest = snapshots::instance_manifest(tx, &instance)?;
                check_storage(tx, owner, super::chunk_bytes(manifest.len()), limits)?;
                row.virtual_size = instance.disk_size;
                row.parent_image_id = instance.image_id.clone();
                row.parent_owner = instance.image_owner.clone();
                row.root_image_id = instance.root_image_id.clone();
                row.root_paid = instance.root_paid;
                // Made from an instance: the chain of the image the instance runs (for a
                // shared image, the sharer's chain).
                row.chain = Chain::derived(this, &instance.chain);
                row.root_kind = instance.root_kind;
                if let Some(parent) = images::get_image(tx, &instance.image_id)? {
                    row.os_name = parent.os_name;
                    row.platform = parent.platform;
                    row.architecture = parent.architecture;
                    row.license_type = parent.license_type;
                }
                manifest
            }
            NewContent::Copy { task } => {
                // A copy's row carries its source's chain.
                row.chain = Chain::derived(this, &row.chain);
                let mut task = (**task).clone();
                task.image_id = row.image_id.clone();
                // Earlier copies of the batch are in the transaction, so they count already.
                check_storage(tx, owner, task.bytes_total, limits).map_err(|e| new.refuse(e))?;
                copies::insert_task(tx, &task)?;
                Vec::new()
            }
            NewContent::Import {
                size_bytes,
                image_url,
            } => {
                // An account already at its storage quota imports nothing; the chunks are
                // counted as they are stored.
                check_storage(tx, owner, super::chunk_bytes(1), limits)?;
                // An imported image is the root of its own lineage.
                row.chain = Chain(vec![this]);
                row.root_kind = RootKind::Free;
                super::imports::insert_import(tx, &row.image_id, *size_bytes, image_url)?;
                Vec::new()
            }
        };
        snapshots::insert_snapshot(
            tx,
            &snapshot_id,
            &row.image_id,
            row.virtual_size,
            &manifest,
            row.created_at,
        )?;
        images::insert_image(tx, &row)?;
        row.stored_bytes = super::chunk_bytes(manifest.len());
        out.push(row);
    }
    emitter.snapshot_bytes(tx, owner)?;
    Ok(out)
}

impl Store {
    /// What `owner` holds in this region, as its quotas count it.
    pub fn usage(&self, owner: &str) -> Result<Usage> {
        self.read(|c| Ok(usage(c, owner)?))
    }

    /// Admits `batch` (new images of `owner`): every check, then every row, in one
    /// transaction. Returns the admitted rows (or, for a copy whose request key was seen
    /// before, the image it admitted then). With `dry_run`, the same checks and nothing kept.
    pub fn admit(
        &self,
        owner: &str,
        batch: &[NewImage],
        limits: Limits<'_>,
        dry_run: bool,
    ) -> Result<Vec<ImageRow>> {
        if dry_run {
            self.rehearse(|tx| admit_in(tx, &self.emitter(), owner, batch, limits))
        } else {
            self.write(|tx| admit_in(tx, &self.emitter(), owner, batch, limits))
        }
    }
}

//! Image rows: reading them, their state changes, attribute changes and deletion.

use super::{snapshots, Store};
use crate::error::{RegionError, Result};
use crate::model::{ImageKind, ImageRow, ImageState, Manifest};
use imagefleet_chunkstore::ChunkDigest;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

const IMAGE_COLUMNS: &str = "i.image_id, i.owner, i.name, i.description, i.image_type, i.source, i.state, \
    i.state_reason, i.os_name, i.platform, i.architecture, i.virtual_size, i.created_at, i.snapshot_id, \
    i.license_type, i.sync_percent, i.parent_image_id, i.parent_region, i.root_image_id, i.root_paid, \
    i.content_digest, i.deprecated, COALESCE(s.stored_bytes, 0), i.parent_owner, i.lineage_chain, i.root_kind";

const FROM_IMAGES: &str = "FROM images i LEFT JOIN snapshots s ON s.snapshot_id = i.snapshot_id";

fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        image_id: r.get(0)?,
        owner: r.get(1)?,
        name: r.get(2)?,
        description: r.get(3)?,
        kind: r.get(4)?,
        source: r.get(5)?,
        state: r.get(6)?,
        state_reason: r.get(7)?,
        os_name: r.get(8)?,
        platform: r.get(9)?,
        architecture: r.get(10)?,
        virtual_size: r.get::<_, i64>(11)? as u64,
        created_at: r.get(12)?,
        snapshot_id: r.get(13)?,
        license_type: r.get(14)?,
        sync_percent: r.get::<_, i64>(15)? as u32,
        parent_image_id: r.get(16)?,
        parent_region: r.get(17)?,
        root_image_id: r.get(18)?,
        root_paid: r.get(19)?,
        content_digest: r.get(20)?,
        deprecated: r.get(21)?,
        stored_bytes: r.get::<_, i64>(22)? as u64,
        parent_owner: r.get(23)?,
        chain: r.get(24)?,
        root_kind: r.get(25)?,
    })
}

pub(super) fn get_image(c: &Connection, image_id: &str) -> rusqlite::Result<Option<ImageRow>> {
    c.prepare_cached(&format!(
        "SELECT {IMAGE_COLUMNS} {FROM_IMAGES} WHERE i.image_id = ?1"
    ))?
    .query_row([image_id], image_from_row)
    .optional()
}

pub(super) fn insert_image(tx: &Transaction<'_>, i: &ImageRow) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO images (image_id, owner, name, description, image_type, source, state, state_reason, \
         os_name, platform, architecture, virtual_size, created_at, snapshot_id, license_type, sync_percent, \
         parent_image_id, parent_region, root_image_id, root_paid, content_digest, deprecated, parent_owner, \
         lineage_chain, root_kind) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)",
        params![
            i.image_id,
            i.owner,
            i.name,
            i.description,
            i.kind,
            i.source,
            i.state,
            i.state_reason,
            i.os_name,
            i.platform,
            i.architecture,
            i.virtual_size as i64,
            i.created_at,
            i.snapshot_id,
            i.license_type,
            i.sync_percent as i64,
            i.parent_image_id,
            i.parent_region,
            i.root_image_id,
            i.root_paid,
            i.content_digest,
            i.deprecated,
            i.parent_owner,
            i.chain,
            i.root_kind
        ],
    )?;
    Ok(())
}

/// Refuses `name` if another image of `owner` has it.
pub(super) fn check_name_free(
    c: &Connection,
    owner: &str,
    name: &str,
    except: Option<&str>,
) -> Result<()> {
    let taken: Option<String> = c
        .prepare_cached("SELECT image_id FROM images WHERE owner = ?1 AND name = ?2")?
        .query_row(params![owner, name], |r| r.get(0))
        .optional()?;
    match taken {
        Some(id) if Some(id.as_str()) != except => Err(RegionError::NameTaken(name.to_string())),
        _ => Ok(()),
    }
}

pub(super) fn count_custom_images(c: &Connection, owner: &str) -> rusqlite::Result<u32> {
    c.prepare_cached("SELECT COUNT(*) FROM images WHERE owner = ?1")?
        .query_row([owner], |r| r.get::<_, i64>(0))
        .map(|n| n as u32)
}

/// Fields `ModifyImageAttribute` may change.
#[derive(Default, Debug)]
pub struct ImageChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub deprecated: Option<bool>,
}

impl Store {
    pub fn image(&self, image_id: &str) -> Result<Option<ImageRow>> {
        self.read(|c| Ok(get_image(c, image_id)?))
    }

    /// Public images and the images of `owner`, in listing order (public first, then oldest first).
    pub fn visible_images(&self, owner: &str) -> Result<Vec<ImageRow>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {IMAGE_COLUMNS} {FROM_IMAGES} WHERE i.owner = '' OR i.owner = ?1 \
                 ORDER BY (i.owner <> ''), i.seq"
            ))?;
            let rows = stmt.query_map([owner], image_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Images in a given state (recovery at start-up).
    pub fn images_in_state(&self, state: ImageState) -> Result<Vec<ImageRow>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {IMAGE_COLUMNS} {FROM_IMAGES} WHERE i.state = ?1 ORDER BY i.seq"
            ))?;
            let rows = stmt.query_map([state], image_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    pub fn custom_image_count(&self, owner: &str) -> Result<u32> {
        self.read(|c| Ok(count_custom_images(c, owner)?))
    }

    /// Adds a public image with its manifest (seeding); nothing if it is already there. The
    /// manifest's chunks must be durable already.
    pub fn insert_public_image(&self, image: &ImageRow, manifest: &Manifest) -> Result<bool> {
        debug_assert_eq!(image.kind, ImageKind::Public);
        self.write(|tx| {
            if get_image(tx, &image.image_id)?.is_some() {
                return Ok(false);
            }
            let snapshot_id = image.snapshot_id.clone().unwrap_or_default();
            snapshots::insert_snapshot(
                tx,
                &snapshot_id,
                &image.image_id,
                image.virtual_size,
                manifest,
                image.created_at,
            )?;
            insert_image(tx, image)?;
            Ok(true)
        })
    }

    /// Moves an image from `from` to `to` with `reason`; false if it was not in `from`.
    pub fn transition_image(
        &self,
        image_id: &str,
        from: ImageState,
        to: ImageState,
        reason: &str,
    ) -> Result<bool> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE images SET state = ?3, state_reason = ?4 WHERE image_id = ?1 AND state = ?2",
                params![image_id, from, to, reason],
            )?;
            Ok(n > 0)
        })
    }

    /// Sets the reason shown beside an image's state (what a copy is waiting for).
    pub fn set_state_reason(&self, image_id: &str, reason: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE images SET state_reason = ?2 WHERE image_id = ?1",
                params![image_id, reason],
            )?;
            Ok(())
        })
    }

    /// The finish step's last write: the digest computed from what the region stored, and
    /// `NORMAL`. Only from `from` (the filling state): false if the image left it meanwhile.
    pub fn make_normal(&self, image_id: &str, from: ImageState, digest: &str) -> Result<bool> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE images SET state = ?3, state_reason = '', content_digest = ?4, sync_percent = 100 \
                 WHERE image_id = ?1 AND state = ?2",
                params![image_id, from, ImageState::Normal, digest],
            )?;
            Ok(n > 0)
        })
    }

    pub fn modify_image(&self, image_id: &str, owner: &str, changes: &ImageChanges) -> Result<()> {
        self.write(|tx| {
            let image = get_image(tx, image_id)?
                .filter(|i| i.owner == owner || i.is_public())
                .ok_or_else(|| RegionError::ImageNotFound(image_id.to_string()))?;
            if image.is_public() {
                return Err(RegionError::NotYours(image_id.to_string()));
            }
            if image.state == ImageState::Deleting {
                return Err(RegionError::image_state(&image));
            }
            if let Some(name) = &changes.name {
                check_name_free(tx, owner, name, Some(image_id))?;
                tx.execute(
                    "UPDATE images SET name = ?2 WHERE image_id = ?1",
                    params![image_id, name],
                )?;
            }
            if let Some(description) = &changes.description {
                tx.execute(
                    "UPDATE images SET description = ?2 WHERE image_id = ?1",
                    params![image_id, description],
                )?;
            }
            if let Some(deprecated) = changes.deprecated {
                tx.execute(
                    "UPDATE images SET deprecated = ?2 WHERE image_id = ?1",
                    params![image_id, deprecated],
                )?;
            }
            Ok(())
        })
    }

    /// Checks every image can be deleted by `owner`, then marks them all `DELETING`; all or
    /// none. A copy still `SYNCING` may be deleted (that cancels it); images being created or
    /// imported may not. Returns the images as they were.
    pub fn begin_delete(&self, image_ids: &[String], owner: &str) -> Result<Vec<ImageRow>> {
        self.write(|tx| {
            let mut images = Vec::new();
            for id in image_ids {
                let image = get_image(tx, id)?
                    .filter(|i| i.owner == owner || i.is_public())
                    .ok_or_else(|| RegionError::ImageNotFound(id.clone()))?;
                if image.is_public() {
                    return Err(RegionError::NotYours(id.clone()));
                }
                if matches!(image.state, ImageState::Creating | ImageState::Importing) {
                    return Err(RegionError::image_state(&image));
                }
                images.push(image);
            }
            for image in &images {
                tx.execute(
                    "UPDATE images SET state = ?2, state_reason = '' WHERE image_id = ?1",
                    params![image.image_id, ImageState::Deleting],
                )?;
            }
            Ok(images)
        })
    }

    /// Removes a `DELETING` image, its copy task and what the copy had gathered; its snapshot
    /// goes too unless instances or a copy elsewhere still use it. Returns the digests whose
    /// references were dropped.
    pub fn finish_delete(&self, image_id: &str) -> Result<Vec<ChunkDigest>> {
        self.write(|tx| {
            let Some(image) = get_image(tx, image_id)? else {
                return Ok(Vec::new());
            };
            tx.execute("DELETE FROM images WHERE image_id = ?1", [image_id])?;
            tx.execute("DELETE FROM imports WHERE image_id = ?1", [image_id])?;
            let mut dropped = super::copies::drop_copy(tx, image_id)?;
            let Some(snapshot_id) = image.snapshot_id else {
                return Ok(dropped);
            };
            tx.execute(
                "UPDATE snapshots SET image_id = NULL WHERE snapshot_id = ?1",
                [&snapshot_id],
            )?;
            dropped.extend(snapshots::drop_snapshot_if_unused(tx, &snapshot_id)?);
            self.emitter().snapshot_bytes(tx, &image.owner)?;
            Ok(dropped)
        })
    }
}

//! Imports: the file behind each imported image (its size, how much of it was read, its
//! format) and the chunks an import records as it reads. An import's chunks go straight into
//! its image's snapshot, so they count against the owner's storage quota as they arrive and
//! are referenced (never reclaimed under it); a failed import drops them.

use super::snapshots::digests;
use super::{admission, chunk_bytes, images, Limits, Store};
use crate::error::{RegionError, Result};
use crate::model::{ImageState, Manifest};
use imagefleet_chunkstore::ChunkDigest;
use rusqlite::{params, OptionalExtension, Transaction};
use std::collections::HashMap;

/// What the region knows of an import.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportRow {
    pub image_id: String,
    pub size_bytes: u64,
    pub bytes_read: u64,
    pub format: String,
    pub format_variant: String,
    pub error_reason: String,
    pub image_url: String,
}

pub(super) fn insert_import(
    tx: &Transaction<'_>,
    image_id: &str,
    size_bytes: u64,
    image_url: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO imports (image_id, size_bytes, image_url) VALUES (?1, ?2, ?3)",
        params![image_id, size_bytes as i64, image_url],
    )?;
    Ok(())
}

/// The image of an import that is still `IMPORTING`, or `IncorrectState`.
fn importing(tx: &Transaction<'_>, image_id: &str) -> Result<crate::model::ImageRow> {
    let image = images::get_image(tx, image_id)?
        .ok_or_else(|| RegionError::ImageNotFound(image_id.to_string()))?;
    if image.state != ImageState::Importing {
        return Err(RegionError::image_state(&image));
    }
    Ok(image)
}

impl Store {
    /// The imports behind `image_ids` (those that are imports).
    pub fn imports_for(&self, image_ids: &[String]) -> Result<HashMap<String, ImportRow>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT image_id, size_bytes, bytes_read, format, format_variant, error_reason, \
                 image_url FROM imports WHERE image_id = ?1",
            )?;
            let mut out = HashMap::new();
            for id in image_ids {
                let row = stmt
                    .query_row([id], |r| {
                        Ok(ImportRow {
                            image_id: r.get(0)?,
                            size_bytes: r.get::<_, i64>(1)? as u64,
                            bytes_read: r.get::<_, i64>(2)? as u64,
                            format: r.get(3)?,
                            format_variant: r.get(4)?,
                            error_reason: r.get(5)?,
                            image_url: r.get(6)?,
                        })
                    })
                    .optional()?;
                if let Some(row) = row {
                    out.insert(id.clone(), row);
                }
            }
            Ok(out)
        })
    }

    /// The headers of an import's file were read: its format, and its virtual size when known.
    pub fn set_import_format(
        &self,
        image_id: &str,
        format: &str,
        variant: &str,
        virtual_size: Option<u64>,
    ) -> Result<()> {
        self.write(|tx| {
            let image = importing(tx, image_id)?;
            tx.execute(
                "UPDATE imports SET format = ?2, format_variant = ?3 WHERE image_id = ?1",
                params![image_id, format, variant],
            )?;
            if let Some(size) = virtual_size {
                set_virtual_size(tx, &image, size)?;
            }
            Ok(())
        })
    }

    /// Records chunks an import stored (durable already) and how far it read, in one
    /// transaction; refused past the owner's storage quota (nothing recorded then).
    pub fn record_import_chunks(
        &self,
        image_id: &str,
        entries: &Manifest,
        bytes_read: u64,
        limits: Limits<'_>,
    ) -> Result<()> {
        self.write(|tx| {
            let image = importing(tx, image_id)?;
            admission::check_storage(tx, &image.owner, chunk_bytes(entries.len()), limits)?;
            let snapshot_id = image.snapshot_id.clone().unwrap_or_default();
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO snapshot_chunks (snapshot_id, idx, digest) VALUES (?1, ?2, ?3)",
            )?;
            for (idx, digest) in entries {
                stmt.execute(params![snapshot_id, *idx as i64, &digest.0[..]])?;
            }
            tx.execute(
                "UPDATE snapshots SET stored_bytes = \
                 (SELECT COUNT(*) FROM snapshot_chunks WHERE snapshot_id = ?1) * ?2 \
                 WHERE snapshot_id = ?1",
                params![snapshot_id, chunk_bytes(1) as i64],
            )?;
            tx.execute(
                "UPDATE imports SET bytes_read = ?2 WHERE image_id = ?1",
                params![image_id, bytes_read as i64],
            )?;
            Ok(())
        })
    }

    /// The whole file was read and every chunk recorded: the image's final virtual size and
    /// format (the finish step makes it `NORMAL`).
    pub fn complete_import(
        &self,
        image_id: &str,
        virtual_size: u64,
        format: &str,
        variant: &str,
        bytes_read: u64,
    ) -> Result<()> {
        self.write(|tx| {
            let image = importing(tx, image_id)?;
            set_virtual_size(tx, &image, virtual_size)?;
            tx.execute(
                "UPDATE imports SET format = ?2, format_variant = ?3, bytes_read = ?4 WHERE image_id = ?1",
                params![image_id, format, variant, bytes_read as i64],
            )?;
            // The chunks were counted as they came; billing hears of them once, now.
            self.emitter().snapshot_bytes(tx, &image.owner)?;
            Ok(())
        })
    }

    /// An import that cannot succeed: the image is `IMPORTFAILED` with `reason` (the stable
    /// code) and `message`, and every chunk it recorded is dropped. Returns the digests
    /// dropped (nothing if the image is not `IMPORTING`).
    pub fn fail_import(
        &self,
        image_id: &str,
        reason: &str,
        message: &str,
    ) -> Result<Vec<ChunkDigest>> {
        self.write(|tx| {
            let Some(image) = images::get_image(tx, image_id)? else {
                return Ok(Vec::new());
            };
            if image.state != ImageState::Importing {
                return Ok(Vec::new());
            }
            let snapshot_id = image.snapshot_id.clone().unwrap_or_default();
            let dropped = digests(
                tx,
                "SELECT digest FROM snapshot_chunks WHERE snapshot_id = ?1",
                &snapshot_id,
            )?;
            tx.execute(
                "DELETE FROM snapshot_chunks WHERE snapshot_id = ?1",
                [&snapshot_id],
            )?;
            tx.execute(
                "UPDATE snapshots SET stored_bytes = 0 WHERE snapshot_id = ?1",
                [&snapshot_id],
            )?;
            tx.execute(
                "UPDATE images SET state = ?2, state_reason = ?3 WHERE image_id = ?1",
                params![image_id, ImageState::ImportFailed, message],
            )?;
            tx.execute(
                "UPDATE imports SET error_reason = ?2 WHERE image_id = ?1",
                params![image_id, reason],
            )?;
            self.emitter().snapshot_bytes(tx, &image.owner)?;
            Ok(dropped)
        })
    }
}

fn set_virtual_size(
    tx: &Transaction<'_>,
    image: &crate::model::ImageRow,
    size: u64,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE images SET virtual_size = ?2 WHERE image_id = ?1",
        params![image.image_id, size as i64],
    )?;
    if let Some(snapshot_id) = &image.snapshot_id {
        tx.execute(
            "UPDATE snapshots SET virtual_size = ?2 WHERE snapshot_id = ?1",
            params![snapshot_id, size as i64],
        )?;
    }
    Ok(())
}

//! The global image index: one record per (image id, region) saying who owns the image, its
//! type and its lineage, and the public-image catalogue derived from it.

use crate::error::CatalogError;
use crate::ids;
use crate::regions::check_region;
use crate::Catalog;
use imagefleet_proto::catalog::v1::{ImageRecord, PublicImage};
use rusqlite::{params, Row};
use tonic::Status;

pub const PUBLIC_IMAGE: &str = "PUBLIC_IMAGE";
pub const PRIVATE_IMAGE: &str = "PRIVATE_IMAGE";
/// The image sources a record may name (empty: not told).
const IMAGE_SOURCES: &[&str] = &["OFFICIAL", "CREATE_IMAGE", "EXTERNAL_IMPORT", "SYNC"];
const MAX_IMAGE_NAME_CHARS: usize = 60;
const MAX_LABEL_CHARS: usize = 128;

const IMAGE_COLUMNS: &str = "image_id, region, owner_account_id, image_type, image_name, \
    platform, os_name, parent_image_id, parent_region, ultimate_source_image_id, \
    ultimate_source_paid, image_source, content_digest";

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        image_id: row.get(0)?,
        region: row.get(1)?,
        owner_account_id: row.get(2)?,
        image_type: row.get(3)?,
        image_name: row.get(4)?,
        platform: row.get(5)?,
        os_name: row.get(6)?,
        parent_image_id: row.get(7)?,
        parent_region: row.get(8)?,
        ultimate_source_image_id: row.get(9)?,
        ultimate_source_paid: row.get(10)?,
        image_source: row.get(11)?,
        content_digest: row.get(12)?,
    })
}

/// Checks every field of a record; field names are as in `RegisterImageRequest`.
fn check_record(r: &ImageRecord) -> Result<(), CatalogError> {
    ids::check_image_id("image.image_id", &r.image_id)?;
    check_region("image.region", &r.region)?;
    match r.image_type.as_str() {
        PUBLIC_IMAGE => {
            if !r.owner_account_id.is_empty() {
                ids::check_account_id("image.owner_account_id", &r.owner_account_id)?;
            }
        }
        PRIVATE_IMAGE => ids::check_account_id("image.owner_account_id", &r.owner_account_id)?,
        other => {
            return Err(CatalogError::invalid(
                "image.image_type",
                "InvalidParameterValue.ImageType",
                format!("{other:?} is not PUBLIC_IMAGE or PRIVATE_IMAGE"),
            ))
        }
    }
    ids::check_text("image.image_name", &r.image_name, MAX_IMAGE_NAME_CHARS)?;
    ids::check_text("image.platform", &r.platform, MAX_LABEL_CHARS)?;
    ids::check_text("image.os_name", &r.os_name, MAX_LABEL_CHARS)?;
    ids::check_text("image.content_digest", &r.content_digest, MAX_LABEL_CHARS)?;
    if !r.parent_image_id.is_empty() {
        ids::check_image_id("image.parent_image_id", &r.parent_image_id)?;
    }
    if !r.parent_region.is_empty() {
        check_region("image.parent_region", &r.parent_region)?;
    }
    if !r.ultimate_source_image_id.is_empty() {
        ids::check_image_id(
            "image.ultimate_source_image_id",
            &r.ultimate_source_image_id,
        )?;
    }
    if !r.image_source.is_empty() && !IMAGE_SOURCES.contains(&r.image_source.as_str()) {
        return Err(CatalogError::invalid(
            "image.image_source",
            "InvalidParameterValue.ImageSource",
            format!(
                "{:?} is not one of {}",
                r.image_source,
                IMAGE_SOURCES.join(", ")
            ),
        ));
    }
    Ok(())
}

impl Catalog {
    /// Adds or replaces the index record of one image in one region.
    pub fn register_image(&self, record: &ImageRecord) -> Result<(), Status> {
        check_record(record)?;
        self.store.write(|tx| {
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO images ({IMAGE_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    record.image_id,
                    record.region,
                    record.owner_account_id,
                    record.image_type,
                    record.image_name,
                    record.platform,
                    record.os_name,
                    record.parent_image_id,
                    record.parent_region,
                    record.ultimate_source_image_id,
                    record.ultimate_source_paid,
                    record.image_source,
                    record.content_digest,
                ],
            )?;
            Ok(())
        })?;
        tracing::debug!(image = %record.image_id, region = %record.region, "image registered");
        Ok(())
    }

    /// Removes the record of an image in a region. Removing a record that is not there
    /// succeeds, so that a retried call does not fail.
    pub fn unregister_image(&self, image_id: &str, region: &str) -> Result<(), Status> {
        ids::check_image_id("image_id", image_id)?;
        check_region("region", region)?;
        self.store.write(|tx| {
            tx.execute(
                "DELETE FROM images WHERE image_id = ?1 AND region = ?2",
                params![image_id, region],
            )?;
            Ok(())
        })?;
        tracing::debug!(image = %image_id, region, "image unregistered");
        Ok(())
    }

    /// Every record of an image, by region (`InvalidImageId.NotFound` if there is none).
    pub fn lookup_image(&self, image_id: &str) -> Result<Vec<ImageRecord>, Status> {
        ids::check_image_id("image_id", image_id)?;
        let records = self.store.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {IMAGE_COLUMNS} FROM images WHERE image_id = ?1 ORDER BY region"
            ))?;
            let rows = stmt.query_map([image_id], record_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        if records.is_empty() {
            return Err(CatalogError::ImageNotFound(image_id.to_string()).into());
        }
        Ok(records)
    }

    /// The public images, each with the regions it is available in, by image id.
    pub fn public_images(&self) -> Result<Vec<PublicImage>, Status> {
        let records = self.store.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {IMAGE_COLUMNS} FROM images WHERE image_type = ?1
                 ORDER BY image_id, region"
            ))?;
            let rows = stmt.query_map([PUBLIC_IMAGE], record_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        let mut images: Vec<PublicImage> = Vec::new();
        for record in records {
            match images.last_mut() {
                Some(image) if image.image_id == record.image_id => {
                    image.regions.push(record.region)
                }
                _ => images.push(PublicImage {
                    image_id: record.image_id,
                    image_name: record.image_name,
                    platform: record.platform,
                    os_name: record.os_name,
                    regions: vec![record.region],
                }),
            }
        }
        Ok(images)
    }
}

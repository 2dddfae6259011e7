//! Copies between regions, both sides. Destination: the copy task of a `SYNCING` image, the
//! manifest it must reproduce (`sync_chunks`, which keeps arriving chunks referenced), its
//! progress, and the step that turns the gathered manifest into the image's snapshot. Source:
//! pins on the snapshots being copied, so deleting the source image does not break a copy.

use super::{chunk_bytes, images, snapshots, Store};
use crate::error::{RegionError, Result};
use crate::model::{CopyCounters, CopyState, CopyTask, ImageState, Manifest};
use imagefleet_chunkstore::ChunkDigest;
use rusqlite::{params, OptionalExtension, Transaction};
use std::collections::HashMap;

const TASK_COLUMNS: &str =
    "image_id, request_key, source_region, source_image_id, source_snapshot_id, \
    expected_digest, state, manifest_loaded, chunks_total, bytes_total, chunks_done, bytes_done, \
    chunks_transferred, bytes_transferred, attempts, last_error, deadline_at";

fn task_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CopyTask> {
    Ok(CopyTask {
        image_id: r.get(0)?,
        request_key: r.get(1)?,
        source_region: r.get(2)?,
        source_image_id: r.get(3)?,
        source_snapshot_id: r.get(4)?,
        expected_digest: r.get(5)?,
        state: r.get(6)?,
        manifest_loaded: r.get(7)?,
        chunks_total: r.get::<_, i64>(8)? as u64,
        bytes_total: r.get::<_, i64>(9)? as u64,
        chunks_done: r.get::<_, i64>(10)? as u64,
        bytes_done: r.get::<_, i64>(11)? as u64,
        chunks_transferred: r.get::<_, i64>(12)? as u64,
        bytes_transferred: r.get::<_, i64>(13)? as u64,
        attempts: r.get::<_, i64>(14)? as u32,
        last_error: r.get(15)?,
        deadline_at: r.get(16)?,
    })
}

pub(super) fn insert_task(tx: &Transaction<'_>, task: &CopyTask) -> rusqlite::Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO sync_tasks ({TASK_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, 0, ?9, 0, 0, 0, 0, 0, '', ?8)"
        ),
        params![
            task.image_id,
            task.request_key,
            task.source_region,
            task.source_image_id,
            task.source_snapshot_id,
            task.expected_digest,
            CopyState::Running,
            task.deadline_at,
            task.bytes_total as i64
        ],
    )?;
    Ok(())
}

/// The image a request key already admitted, if any.
pub(super) fn image_of_request(
    tx: &Transaction<'_>,
    request_key: &str,
) -> rusqlite::Result<Option<String>> {
    tx.prepare_cached("SELECT image_id FROM sync_tasks WHERE request_key = ?1")?
        .query_row([request_key], |r| r.get(0))
        .optional()
}

/// Releases the manifest a copy had gathered; returns its digests.
fn release_gathered(tx: &Transaction<'_>, image_id: &str) -> rusqlite::Result<Vec<ChunkDigest>> {
    let released = snapshots::digests(
        tx,
        "SELECT digest FROM sync_chunks WHERE image_id = ?1",
        image_id,
    )?;
    tx.execute("DELETE FROM sync_chunks WHERE image_id = ?1", [image_id])?;
    Ok(released)
}

/// Drops a copy's task and what it had gathered; returns the digests released.
pub(super) fn drop_copy(
    tx: &Transaction<'_>,
    image_id: &str,
) -> rusqlite::Result<Vec<ChunkDigest>> {
    let released = release_gathered(tx, image_id)?;
    tx.execute("DELETE FROM sync_tasks WHERE image_id = ?1", [image_id])?;
    Ok(released)
}

/// A pin of a snapshot being copied out of this region.
#[derive(Clone, Debug)]
pub struct CopyPin {
    pub request_key: String,
    pub image_id: String,
    pub dest_region: String,
    pub expires_at: i64,
}

/// What a pinned (or current) source snapshot is.
#[derive(Clone, Debug)]
pub struct CopySource {
    pub snapshot_id: String,
    pub virtual_size: u64,
    pub content_digest: String,
}

impl Store {
    /// How many copies into this region `owner` has in flight (its `SYNCING` images), and
    /// how many of `request_keys` are not admitted yet (a retried call's copies are not new).
    pub fn copies_in_flight(&self, owner: &str, request_keys: &[String]) -> Result<(u32, u32)> {
        self.read(|c| {
            let in_flight: u32 = c
                .prepare_cached("SELECT COUNT(*) FROM images WHERE owner = ?1 AND state = ?2")?
                .query_row(params![owner, ImageState::Syncing.as_str()], |r| r.get(0))?;
            let mut known = c.prepare_cached("SELECT 1 FROM sync_tasks WHERE request_key = ?1")?;
            let mut new = 0;
            for key in request_keys {
                if known.query_row([key], |_| Ok(())).optional()?.is_none() {
                    new += 1;
                }
            }
            Ok((in_flight, new))
        })
    }

    pub fn copy_task(&self, image_id: &str) -> Result<Option<CopyTask>> {
        self.read(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM sync_tasks WHERE image_id = ?1"
            ))?
            .query_row([image_id], task_from_row)
            .optional()?)
        })
    }

    /// Copy tasks of the given images, by image id.
    pub fn copy_tasks_for(&self, image_ids: &[String]) -> Result<HashMap<String, CopyTask>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM sync_tasks WHERE image_id = ?1"
            ))?;
            let mut out = HashMap::new();
            for id in image_ids {
                if let Some(task) = stmt.query_row([id], task_from_row).optional()? {
                    out.insert(task.image_id.clone(), task);
                }
            }
            Ok(out)
        })
    }

    /// Records the manifest a copy must reproduce (once: a pinned snapshot never changes).
    /// From then on its chunks count as referenced, so none that arrives is reclaimed.
    pub fn set_copy_manifest(&self, image_id: &str, manifest: &Manifest) -> Result<()> {
        self.write(|tx| {
            let loaded: Option<bool> = tx
                .query_row(
                    "SELECT manifest_loaded FROM sync_tasks WHERE image_id = ?1",
                    [image_id],
                    |r| r.get(0),
                )
                .optional()?;
            match loaded {
                None => return Err(RegionError::ImageNotFound(image_id.to_string())),
                Some(true) => return Ok(()),
                Some(false) => {}
            }
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO sync_chunks (image_id, idx, digest) VALUES (?1, ?2, ?3)",
            )?;
            for (idx, digest) in manifest {
                stmt.execute(params![image_id, *idx as i64, &digest.0[..]])?;
            }
            tx.execute(
                "UPDATE sync_tasks SET manifest_loaded = 1, chunks_total = ?2, bytes_total = ?3 WHERE image_id = ?1",
                params![image_id, manifest.len() as i64, chunk_bytes(manifest.len()) as i64],
            )?;
            Ok(())
        })
    }

    /// The manifest a copy must reproduce.
    pub fn copy_manifest(&self, image_id: &str) -> Result<Manifest> {
        self.read(|c| {
            Ok(snapshots::read_manifest(
                c,
                "SELECT idx, digest FROM sync_chunks WHERE image_id = ?1 ORDER BY idx",
                image_id,
            )?)
        })
    }

    /// Records a copy's progress (and the image's `sync_percent`, below 100 until the copy is
    /// finished).
    pub fn record_copy_progress(
        &self,
        image_id: &str,
        counters: &CopyCounters,
        bytes_total: u64,
    ) -> Result<()> {
        let percent = (counters.bytes_done * 100)
            .checked_div(bytes_total)
            .unwrap_or(0)
            .min(99);
        self.write(|tx| {
            tx.execute(
                "UPDATE sync_tasks SET chunks_done = ?2, bytes_done = ?3, chunks_transferred = ?4, bytes_transferred = ?5 \
                 WHERE image_id = ?1",
                params![
                    image_id,
                    counters.chunks_done as i64,
                    counters.bytes_done as i64,
                    counters.chunks_transferred as i64,
                    counters.bytes_transferred as i64
                ],
            )?;
            tx.execute(
                "UPDATE images SET sync_percent = ?2 WHERE image_id = ?1 AND state = ?3",
                params![image_id, percent as i64, ImageState::Syncing],
            )?;
            Ok(())
        })
    }

    /// Counts an attempt; returns how many there have been.
    pub fn record_copy_attempt(&self, image_id: &str) -> Result<u32> {
        self.write(|tx| {
            tx.execute(
                "UPDATE sync_tasks SET attempts = attempts + 1 WHERE image_id = ?1",
                [image_id],
            )?;
            Ok(tx
                .query_row(
                    "SELECT attempts FROM sync_tasks WHERE image_id = ?1",
                    [image_id],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .unwrap_or(0) as u32)
        })
    }

    /// Remembers what interrupted a copy, on the task and as the image's state reason.
    pub fn record_copy_error(&self, image_id: &str, message: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE sync_tasks SET last_error = ?2 WHERE image_id = ?1",
                params![image_id, message],
            )?;
            tx.execute(
                "UPDATE images SET state_reason = ?2 WHERE image_id = ?1 AND state = ?3",
                params![image_id, message, ImageState::Syncing],
            )?;
            Ok(())
        })
    }

    /// Every chunk has arrived and is durable: the gathered manifest becomes the image's
    /// snapshot, and the copy is `DONE` (the finish step remains).
    pub fn finish_copy(&self, image_id: &str) -> Result<()> {
        self.write(|tx| {
            let image = images::get_image(tx, image_id)?
                .ok_or_else(|| RegionError::ImageNotFound(image_id.to_string()))?;
            if image.state != ImageState::Syncing {
                return Err(RegionError::image_state(&image));
            }
            let snapshot_id = image.snapshot_id.unwrap_or_default();
            let moved = tx.execute(
                "INSERT OR REPLACE INTO snapshot_chunks (snapshot_id, idx, digest) \
                 SELECT ?2, idx, digest FROM sync_chunks WHERE image_id = ?1",
                params![image_id, snapshot_id],
            )?;
            tx.execute("DELETE FROM sync_chunks WHERE image_id = ?1", [image_id])?;
            tx.execute(
                "UPDATE snapshots SET stored_bytes = ?2 WHERE snapshot_id = ?1",
                params![snapshot_id, chunk_bytes(moved) as i64],
            )?;
            tx.execute(
                "UPDATE sync_tasks SET state = ?2, chunks_done = chunks_total, bytes_done = bytes_total \
                 WHERE image_id = ?1",
                params![image_id, CopyState::Done],
            )?;
            self.emitter().snapshot_bytes(tx, &image.owner)?;
            Ok(())
        })
    }

    /// A copy that cannot succeed: the image is `CREATEFAILED` with `reason`, and what had
    /// arrived is released. Returns the digests released.
    pub fn fail_copy(&self, image_id: &str, reason: &str) -> Result<Vec<ChunkDigest>> {
        self.write(|tx| {
            let released = release_gathered(tx, image_id)?;
            tx.execute(
                "UPDATE sync_tasks SET state = ?3, last_error = ?2 WHERE image_id = ?1",
                params![image_id, reason, CopyState::Failed],
            )?;
            tx.execute(
                "UPDATE images SET state = ?3, state_reason = ?2 WHERE image_id = ?1 AND state = ?4",
                params![image_id, reason, ImageState::CreateFailed, ImageState::Syncing],
            )?;
            Ok(released)
        })
    }

    /// Source side: pins the snapshot of each own `NORMAL` image for a copy (idempotent per
    /// request key). All or none.
    pub fn pin_for_copies(&self, owner: &str, pins: &[CopyPin]) -> Result<Vec<CopySource>> {
        self.write(|tx| {
            let mut out = Vec::new();
            for pin in pins {
                let image = images::get_image(tx, &pin.image_id)?
                    .filter(|i| i.owner == owner)
                    .ok_or_else(|| RegionError::ImageNotFound(pin.image_id.clone()))?;
                if image.state != ImageState::Normal {
                    return Err(RegionError::image_state(&image));
                }
                let snapshot_id = image.snapshot_id.clone().unwrap_or_default();
                tx.execute(
                    "INSERT INTO copy_pins (request_key, snapshot_id, image_id, dest_region, virtual_size, content_digest, expires_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                     ON CONFLICT(request_key) DO UPDATE SET expires_at = MAX(expires_at, excluded.expires_at)",
                    params![
                        pin.request_key,
                        snapshot_id,
                        pin.image_id,
                        pin.dest_region,
                        image.virtual_size as i64,
                        image.content_digest,
                        pin.expires_at
                    ],
                )?;
                let (snapshot_id, virtual_size, content_digest): (String, i64, String) = tx.query_row(
                    "SELECT snapshot_id, virtual_size, content_digest FROM copy_pins WHERE request_key = ?1",
                    [&pin.request_key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                out.push(CopySource {
                    snapshot_id,
                    virtual_size: virtual_size as u64,
                    content_digest,
                });
            }
            Ok(out)
        })
    }

    /// Source side: what a copy of `image_id` may read as `snapshot_id`: a pinned snapshot, or
    /// the image's current one while it is `NORMAL` (copies admitted before pins existed).
    pub fn copy_source(
        &self,
        image_id: &str,
        snapshot_id: &str,
        now: i64,
    ) -> Result<Option<CopySource>> {
        self.read(|c| {
            let pinned = c
                .prepare_cached(
                    "SELECT snapshot_id, virtual_size, content_digest FROM copy_pins \
                     WHERE image_id = ?1 AND snapshot_id = ?2 AND expires_at > ?3 LIMIT 1",
                )?
                .query_row(params![image_id, snapshot_id, now], |r| {
                    Ok(CopySource {
                        snapshot_id: r.get(0)?,
                        virtual_size: r.get::<_, i64>(1)? as u64,
                        content_digest: r.get(2)?,
                    })
                })
                .optional()?;
            if pinned.is_some() {
                return Ok(pinned);
            }
            Ok(images::get_image(c, image_id)?
                .filter(|i| {
                    !i.is_public()
                        && i.state == ImageState::Normal
                        && (snapshot_id.is_empty() || i.snapshot_id.as_deref() == Some(snapshot_id))
                })
                .map(|i| CopySource {
                    snapshot_id: i.snapshot_id.unwrap_or_default(),
                    virtual_size: i.virtual_size,
                    content_digest: i.content_digest,
                }))
        })
    }

    /// Source side: releases the pins of `request_keys` and any that expired before `now`;
    /// snapshots nothing uses any more go. Returns the digests released.
    pub fn release_pins(&self, request_keys: &[String], now: i64) -> Result<Vec<ChunkDigest>> {
        self.write(|tx| {
            let mut snapshots_touched = Vec::new();
            for key in request_keys {
                if let Some(s) = tx
                    .query_row(
                        "DELETE FROM copy_pins WHERE request_key = ?1 RETURNING snapshot_id",
                        [key],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()?
                {
                    snapshots_touched.push(s);
                }
            }
            {
                let mut stmt = tx.prepare_cached(
                    "DELETE FROM copy_pins WHERE expires_at <= ?1 RETURNING snapshot_id",
                )?;
                let rows = stmt.query_map([now], |r| r.get::<_, String>(0))?;
                for row in rows {
                    snapshots_touched.push(row?);
                }
            }
            let mut released = Vec::new();
            for s in snapshots_touched {
                released.extend(snapshots::drop_snapshot_if_unused(tx, &s)?);
            }
            Ok(released)
        })
    }
}

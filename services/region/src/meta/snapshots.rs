//! Snapshots (frozen manifests) and chunk references: which chunks a snapshot, an instance
//! disk or a copy in progress names, and which are named by nothing any more.

use super::{chunk_bytes, digest_of, Store};
use crate::error::Result;
use crate::model::{InstanceRow, Manifest};
use imagefleet_chunkstore::{ChunkDigest, CHUNK_SIZE};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::{BTreeMap, HashSet};

/// Reads `(index, digest)` rows of one manifest with `sql` (one parameter, the manifest's key).
pub(super) fn read_manifest(c: &Connection, sql: &str, key: &str) -> rusqlite::Result<Manifest> {
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map([key], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (idx, d) = row?;
        if let Some(d) = digest_of(d) {
            out.push((idx as u64, d));
        }
    }
    Ok(out)
}

/// The digests one query returns (one parameter).
pub(super) fn digests(c: &Connection, sql: &str, key: &str) -> rusqlite::Result<Vec<ChunkDigest>> {
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map([key], |r| r.get::<_, Vec<u8>>(0))?;
    let mut out = Vec::new();
    for row in rows {
        if let Some(d) = digest_of(row?) {
            out.push(d);
        }
    }
    Ok(out)
}

pub(super) fn insert_snapshot(
    tx: &Transaction<'_>,
    snapshot_id: &str,
    image_id: &str,
    virtual_size: u64,
    manifest: &Manifest,
    now: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO snapshots (snapshot_id, virtual_size, stored_bytes, created_at, image_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![snapshot_id, virtual_size as i64, chunk_bytes(manifest.len()) as i64, now, image_id],
    )?;
    let mut stmt = tx.prepare_cached(
        "INSERT INTO snapshot_chunks (snapshot_id, idx, digest) VALUES (?1, ?2, ?3)",
    )?;
    for (idx, digest) in manifest {
        stmt.execute(params![snapshot_id, *idx as i64, &digest.0[..]])?;
    }
    Ok(())
}

/// Drops a snapshot that no image, no live instance and no unexpired copy pin uses any more;
/// returns its digests.
pub(super) fn drop_snapshot_if_unused(
    tx: &Transaction<'_>,
    snapshot_id: &str,
) -> rusqlite::Result<Vec<ChunkDigest>> {
    let image: Option<Option<String>> = tx
        .query_row(
            "SELECT image_id FROM snapshots WHERE snapshot_id = ?1",
            [snapshot_id],
            |r| r.get(0),
        )
        .optional()?;
    let Some(None) = image else {
        return Ok(Vec::new());
    };
    let used: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM instances WHERE base_snapshot_id = ?1) \
         OR EXISTS(SELECT 1 FROM copy_pins WHERE snapshot_id = ?1)",
        [snapshot_id],
        |r| r.get(0),
    )?;
    if used {
        return Ok(Vec::new());
    }
    let dropped = digests(
        tx,
        "SELECT digest FROM snapshot_chunks WHERE snapshot_id = ?1",
        snapshot_id,
    )?;
    tx.execute(
        "DELETE FROM snapshot_chunks WHERE snapshot_id = ?1",
        [snapshot_id],
    )?;
    tx.execute(
        "DELETE FROM snapshots WHERE snapshot_id = ?1",
        [snapshot_id],
    )?;
    Ok(dropped)
}

/// What a new snapshot of an instance's disk is made of: its base, overridden by its own chunks.
pub(super) fn instance_manifest(
    c: &Connection,
    instance: &InstanceRow,
) -> rusqlite::Result<Manifest> {
    let chunks = instance.disk_size.div_ceil(CHUNK_SIZE as u64);
    let mut merged = BTreeMap::new();
    if let Some(base) = &instance.base_snapshot_id {
        let mut stmt = c.prepare_cached(
            "SELECT idx, digest FROM snapshot_chunks WHERE snapshot_id = ?1 AND idx < ?2",
        )?;
        let rows = stmt.query_map(params![base, chunks as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        for row in rows {
            let (idx, digest) = row?;
            if let Some(d) = digest_of(digest) {
                merged.insert(idx as u64, d);
            }
        }
    }
    let mut stmt =
        c.prepare_cached("SELECT idx, digest FROM instance_chunks WHERE instance_id = ?1")?;
    let rows = stmt.query_map([&instance.instance_id], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
    })?;
    for row in rows {
        let (idx, digest) = row?;
        match digest.and_then(digest_of) {
            Some(d) => merged.insert(idx as u64, d),
            None => merged.remove(&(idx as u64)),
        };
    }
    Ok(merged.into_iter().collect())
}

impl Store {
    /// A snapshot's non-zero chunks, by index.
    pub fn snapshot_manifest(&self, snapshot_id: &str) -> Result<Manifest> {
        self.read(|c| {
            Ok(read_manifest(
                c,
                "SELECT idx, digest FROM snapshot_chunks WHERE snapshot_id = ?1 ORDER BY idx",
                snapshot_id,
            )?)
        })
    }

    /// Of `candidates`, those no manifest, disk or copy references any more.
    pub fn unreferenced(&self, candidates: &[ChunkDigest]) -> Result<Vec<ChunkDigest>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM snapshot_chunks WHERE digest = ?1) \
                 OR EXISTS(SELECT 1 FROM instance_chunks WHERE digest = ?1) \
                 OR EXISTS(SELECT 1 FROM sync_chunks WHERE digest = ?1)",
            )?;
            let mut out = Vec::new();
            let mut seen = HashSet::new();
            for d in candidates {
                if seen.insert(*d) && !stmt.query_row([&d.0[..]], |r| r.get::<_, bool>(0))? {
                    out.push(*d);
                }
            }
            Ok(out)
        })
    }

    /// Every digest any manifest, disk or copy references.
    pub fn referenced(&self) -> Result<HashSet<ChunkDigest>> {
        self.read(|c| {
            let mut out = HashSet::new();
            for sql in [
                "SELECT DISTINCT digest FROM snapshot_chunks",
                "SELECT DISTINCT digest FROM instance_chunks WHERE digest IS NOT NULL",
                "SELECT DISTINCT digest FROM sync_chunks",
            ] {
                let mut stmt = c.prepare(sql)?;
                let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
                for row in rows {
                    if let Some(d) = digest_of(row?) {
                        out.insert(d);
                    }
                }
            }
            Ok(out)
        })
    }
}

//! The region's metadata store: images, snapshots (chunk manifests), instances and their
//! copy-on-write disk overrides, in SQLite (WAL, `synchronous=FULL`: a committed transaction
//! survives `kill -9` and power loss).
//!
//! Manifests list only non-zero chunks: a chunk index with no row reads as zeros. An instance
//! disk is its base snapshot plus its own rows in `instance_chunks`, where a NULL digest marks a
//! chunk the guest overwrote with zeros. A chunk file is referenced while any row of
//! `snapshot_chunks` or `instance_chunks` names it; operations that drop rows return the
//! digests they dropped so that the caller can reclaim those no longer referenced.

use imagefleet_chunkstore::ChunkDigest;
use imagefleet_proto::error;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tonic::{Code, Status};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    image_type TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    state_reason TEXT NOT NULL,
    os_name TEXT NOT NULL,
    platform TEXT NOT NULL,
    architecture TEXT NOT NULL,
    virtual_size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    snapshot_id TEXT,
    license_type TEXT NOT NULL,
    sync_percent INTEGER NOT NULL,
    parent_image_id TEXT NOT NULL,
    parent_region TEXT NOT NULL,
    root_image_id TEXT NOT NULL,
    root_paid INTEGER NOT NULL,
    content_digest TEXT NOT NULL,
    deprecated INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS images_owner_name ON images(owner, name) WHERE owner <> '';
CREATE TABLE IF NOT EXISTS snapshots (
    snapshot_id TEXT PRIMARY KEY,
    virtual_size INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    image_id TEXT
);
CREATE TABLE IF NOT EXISTS snapshot_chunks (
    snapshot_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (snapshot_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS snapshot_chunks_digest ON snapshot_chunks(digest);
CREATE TABLE IF NOT EXISTS instances (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    cpu INTEGER NOT NULL,
    memory_gib INTEGER NOT NULL,
    image_id TEXT NOT NULL,
    base_snapshot_id TEXT,
    disk_size INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    root_image_id TEXT NOT NULL,
    root_paid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_base ON instances(base_snapshot_id);
CREATE TABLE IF NOT EXISTS instance_chunks (
    instance_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest BLOB,
    PRIMARY KEY (instance_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instance_chunks_digest ON instance_chunks(digest);
CREATE TABLE IF NOT EXISTS sync_tasks (
    image_id TEXT PRIMARY KEY,
    request_key TEXT NOT NULL UNIQUE,
    source_region TEXT NOT NULL,
    source_image_id TEXT NOT NULL,
    state TEXT NOT NULL,
    manifest_loaded INTEGER NOT NULL,
    chunks_total INTEGER NOT NULL,
    bytes_total INTEGER NOT NULL,
    chunks_done INTEGER NOT NULL,
    bytes_done INTEGER NOT NULL,
    chunks_transferred INTEGER NOT NULL,
    bytes_transferred INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sync_chunks (
    image_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (image_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sync_chunks_digest ON sync_chunks(digest);
"#;

/// One image row.
#[derive(Clone, Debug, Default)]
pub struct ImageRow {
    pub image_id: String,
    /// Empty for public images.
    pub owner: String,
    pub name: String,
    pub description: String,
    /// `PUBLIC_IMAGE` or `PRIVATE_IMAGE`.
    pub image_type: String,
    pub source: String,
    pub state: String,
    pub state_reason: String,
    pub os_name: String,
    pub platform: String,
    pub architecture: String,
    pub virtual_size: u64,
    pub created_at: i64,
    pub snapshot_id: Option<String>,
    pub license_type: String,
    pub sync_percent: u32,
    pub parent_image_id: String,
    pub parent_region: String,
    pub root_image_id: String,
    pub root_paid: bool,
    pub content_digest: String,
    pub deprecated: bool,
    /// Bytes of non-zero chunks in the image's snapshot (not a column: joined in).
    pub stored_bytes: u64,
}

/// One instance row.
#[derive(Clone, Debug, Default)]
pub struct InstanceRow {
    pub instance_id: String,
    pub owner: String,
    pub name: String,
    pub instance_type: String,
    pub cpu: u32,
    pub memory_gib: u32,
    pub image_id: String,
    pub base_snapshot_id: Option<String>,
    pub disk_size: u64,
    pub state: String,
    pub created_at: i64,
    pub root_image_id: String,
    pub root_paid: bool,
}

/// The metadata store. Cloning shares one connection.
#[derive(Clone)]
pub struct Store {
    /// A std mutex: every use is a short synchronous transaction on a blocking thread.
    conn: Arc<Mutex<Connection>>,
}

fn db(e: rusqlite::Error) -> Status {
    error::status(
        Code::Internal,
        "InternalError.Store",
        format!("metadata store: {e}"),
    )
}

fn not_found(reason: &str, what: &str) -> Status {
    error::status(Code::NotFound, reason, format!("{what} does not exist"))
}

const IMAGE_COLUMNS: &str = "i.image_id, i.owner, i.name, i.description, i.image_type, i.source, i.state, \
    i.state_reason, i.os_name, i.platform, i.architecture, i.virtual_size, i.created_at, i.snapshot_id, \
    i.license_type, i.sync_percent, i.parent_image_id, i.parent_region, i.root_image_id, i.root_paid, \
    i.content_digest, i.deprecated, COALESCE(s.stored_bytes, 0)";

fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        image_id: r.get(0)?,
        owner: r.get(1)?,
        name: r.get(2)?,
        description: r.get(3)?,
        image_type: r.get(4)?,
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
    })
}

const INSTANCE_COLUMNS: &str =
    "instance_id, owner, name, instance_type, cpu, memory_gib, image_id, \
    base_snapshot_id, disk_size, state, created_at, root_image_id, root_paid";

fn instance_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceRow> {
    Ok(InstanceRow {
        instance_id: r.get(0)?,
        owner: r.get(1)?,
        name: r.get(2)?,
        instance_type: r.get(3)?,
        cpu: r.get::<_, i64>(4)? as u32,
        memory_gib: r.get::<_, i64>(5)? as u32,
        image_id: r.get(6)?,
        base_snapshot_id: r.get(7)?,
        disk_size: r.get::<_, i64>(8)? as u64,
        state: r.get(9)?,
        created_at: r.get(10)?,
        root_image_id: r.get(11)?,
        root_paid: r.get(12)?,
    })
}

/// Reads `(index, digest)` rows of one manifest with `sql` (one parameter, the manifest's key).
fn read_manifest(c: &Connection, sql: &str, key: &str) -> Result<Vec<(u64, ChunkDigest)>, Status> {
    let mut stmt = c.prepare_cached(sql).map_err(db)?;
    let rows = stmt
        .query_map([key], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for row in rows {
        let (idx, d) = row.map_err(db)?;
        if let Some(d) = digest_of(d) {
            out.push((idx as u64, d));
        }
    }
    Ok(out)
}

fn digest_of(bytes: Vec<u8>) -> Option<ChunkDigest> {
    ChunkDigest::from_slice(&bytes)
}

fn get_image(tx: &Connection, image_id: &str) -> rusqlite::Result<Option<ImageRow>> {
    tx.query_row(
        &format!(
            "SELECT {IMAGE_COLUMNS} FROM images i LEFT JOIN snapshots s ON s.snapshot_id = i.snapshot_id \
             WHERE i.image_id = ?1"
        ),
        [image_id],
        image_from_row,
    )
    .optional()
}

fn get_instance(tx: &Connection, instance_id: &str) -> rusqlite::Result<Option<InstanceRow>> {
    tx.query_row(
        &format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?1"),
        [instance_id],
        instance_from_row,
    )
    .optional()
}

/// Drops a snapshot that no image and no live instance uses any more; returns its digests.
fn drop_snapshot_if_unused(
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
    let users: i64 = tx.query_row(
        "SELECT COUNT(*) FROM instances WHERE base_snapshot_id = ?1",
        [snapshot_id],
        |r| r.get(0),
    )?;
    if users > 0 {
        return Ok(Vec::new());
    }
    let digests = {
        let mut stmt = tx.prepare("SELECT digest FROM snapshot_chunks WHERE snapshot_id = ?1")?;
        let rows = stmt.query_map([snapshot_id], |r| r.get::<_, Vec<u8>>(0))?;
        rows.filter_map(|r| r.ok().and_then(digest_of)).collect()
    };
    tx.execute(
        "DELETE FROM snapshot_chunks WHERE snapshot_id = ?1",
        [snapshot_id],
    )?;
    tx.execute(
        "DELETE FROM snapshots WHERE snapshot_id = ?1",
        [snapshot_id],
    )?;
    Ok(digests)
}

fn drop_instance_chunks(
    tx: &Transaction<'_>,
    instance_id: &str,
) -> rusqlite::Result<Vec<ChunkDigest>> {
    let digests = {
        let mut stmt = tx.prepare(
            "SELECT digest FROM instance_chunks WHERE instance_id = ?1 AND digest IS NOT NULL",
        )?;
        let rows = stmt.query_map([instance_id], |r| r.get::<_, Vec<u8>>(0))?;
        rows.filter_map(|r| r.ok().and_then(digest_of)).collect()
    };
    tx.execute(
        "DELETE FROM instance_chunks WHERE instance_id = ?1",
        [instance_id],
    )?;
    Ok(digests)
}

/// What a new snapshot of an instance's disk is made of.
fn instance_manifest(
    tx: &Connection,
    instance: &InstanceRow,
) -> rusqlite::Result<Vec<(u64, ChunkDigest)>> {
    let chunks = instance
        .disk_size
        .div_ceil(imagefleet_chunkstore::CHUNK_SIZE as u64);
    let mut merged = std::collections::BTreeMap::new();
    if let Some(base) = &instance.base_snapshot_id {
        let mut stmt = tx.prepare(
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
    let mut stmt = tx.prepare("SELECT idx, digest FROM instance_chunks WHERE instance_id = ?1")?;
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

fn insert_manifest(
    tx: &Transaction<'_>,
    snapshot_id: &str,
    image_id: &str,
    virtual_size: u64,
    manifest: &[(u64, ChunkDigest)],
    now: i64,
) -> rusqlite::Result<()> {
    let stored = manifest.len() as u64 * imagefleet_chunkstore::CHUNK_SIZE as u64;
    tx.execute(
        "INSERT INTO snapshots (snapshot_id, virtual_size, stored_bytes, created_at, image_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![snapshot_id, virtual_size as i64, stored as i64, now, image_id],
    )?;
    let mut stmt =
        tx.prepare("INSERT INTO snapshot_chunks (snapshot_id, idx, digest) VALUES (?1, ?2, ?3)")?;
    for (idx, digest) in manifest {
        stmt.execute(params![snapshot_id, *idx as i64, &digest.0[..]])?;
    }
    Ok(())
}

fn insert_image(tx: &Transaction<'_>, i: &ImageRow) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO images (image_id, owner, name, description, image_type, source, state, state_reason, \
         os_name, platform, architecture, virtual_size, created_at, snapshot_id, license_type, sync_percent, \
         parent_image_id, parent_region, root_image_id, root_paid, content_digest, deprecated) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
        params![
            i.image_id,
            i.owner,
            i.name,
            i.description,
            i.image_type,
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
            i.deprecated
        ],
    )?;
    Ok(())
}

/// Fields `ModifyImageAttribute` may change.
#[derive(Default, Debug)]
pub struct ImageChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub deprecated: Option<bool>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, Status>) -> Result<T, Status> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn)
    }

    fn tx<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T, Status>) -> Result<T, Status> {
        self.with(|conn| {
            let tx = conn.transaction().map_err(db)?;
            let out = f(&tx)?;
            tx.commit().map_err(db)?;
            Ok(out)
        })
    }

    pub fn image(&self, image_id: &str) -> Result<Option<ImageRow>, Status> {
        self.with(|c| get_image(c, image_id).map_err(db))
    }

    /// Public images and the images of `owner`, in listing order (public first, then oldest first).
    pub fn visible_images(&self, owner: &str) -> Result<Vec<ImageRow>, Status> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {IMAGE_COLUMNS} FROM images i LEFT JOIN snapshots s ON s.snapshot_id = i.snapshot_id \
                     WHERE i.owner = '' OR i.owner = ?1 ORDER BY (i.owner <> ''), i.seq"
                ))
                .map_err(db)?;
            let rows = stmt.query_map([owner], image_from_row).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
    }

    /// Images in a given state (recovery at start-up).
    pub fn images_in_state(&self, state: &str) -> Result<Vec<ImageRow>, Status> {
        self.with(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {IMAGE_COLUMNS} FROM images i LEFT JOIN snapshots s ON s.snapshot_id = i.snapshot_id \
                     WHERE i.state = ?1 ORDER BY i.seq"
                ))
                .map_err(db)?;
            let rows = stmt.query_map([state], image_from_row).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
    }

    pub fn custom_image_count(&self, owner: &str) -> Result<u32, Status> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM images WHERE owner = ?1",
                [owner],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u32)
            .map_err(db)
        })
    }

    /// Adds a public image with its manifest (seeding); nothing if it is already there.
    pub fn insert_public_image(
        &self,
        image: &ImageRow,
        manifest: &[(u64, ChunkDigest)],
    ) -> Result<bool, Status> {
        self.tx(|tx| {
            if get_image(tx, &image.image_id).map_err(db)?.is_some() {
                return Ok(false);
            }
            let snapshot_id = image.snapshot_id.clone().unwrap_or_default();
            insert_manifest(
                tx,
                &snapshot_id,
                &image.image_id,
                image.virtual_size,
                manifest,
                image.created_at,
            )
            .map_err(db)?;
            insert_image(tx, image).map_err(db)?;
            Ok(true)
        })
    }

    /// Freezes an instance's disk into a new snapshot behind a new `CREATING` image, checking
    /// the name and quota in the same transaction.
    pub fn create_image_from_instance(
        &self,
        instance_id: &str,
        owner: &str,
        mut image: ImageRow,
        quota: u32,
    ) -> Result<ImageRow, Status> {
        self.tx(|tx| {
            let instance = get_instance(tx, instance_id)
                .map_err(db)?
                .filter(|i| i.owner == owner)
                .ok_or_else(|| not_found("InvalidInstanceId.NotFound", instance_id))?;
            if instance.state == "TERMINATED" {
                return Err(error::status(
                    Code::FailedPrecondition,
                    "UnsupportedOperation.InstanceStateTerminated",
                    "the instance is terminated",
                ));
            }
            check_name_free(tx, owner, &image.name, None)?;
            let used: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM images WHERE owner = ?1",
                    [owner],
                    |r| r.get(0),
                )
                .map_err(db)?;
            if used as u32 >= quota {
                return Err(error::status(
                    Code::ResourceExhausted,
                    "ImageQuotaLimitExceeded",
                    format!("the custom image quota of {quota} in this region is used up"),
                ));
            }
            let manifest = instance_manifest(tx, &instance).map_err(db)?;
            let parent = get_image(tx, &instance.image_id).map_err(db)?;
            image.virtual_size = instance.disk_size;
            image.parent_image_id = instance.image_id.clone();
            image.root_image_id = instance.root_image_id.clone();
            image.root_paid = instance.root_paid;
            if let Some(parent) = parent {
                image.os_name = parent.os_name;
                image.platform = parent.platform;
                image.architecture = parent.architecture;
                image.license_type = parent.license_type;
            }
            let snapshot_id = image.snapshot_id.clone().unwrap_or_default();
            insert_manifest(
                tx,
                &snapshot_id,
                &image.image_id,
                image.virtual_size,
                &manifest,
                image.created_at,
            )
            .map_err(db)?;
            insert_image(tx, &image).map_err(db)?;
            image.stored_bytes = manifest.len() as u64 * imagefleet_chunkstore::CHUNK_SIZE as u64;
            Ok(image)
        })
    }

    pub fn set_image_state(&self, image_id: &str, state: &str, reason: &str) -> Result<(), Status> {
        self.with(|c| {
            c.execute(
                "UPDATE images SET state = ?2, state_reason = ?3 WHERE image_id = ?1",
                params![image_id, state, reason],
            )
            .map(|_| ())
            .map_err(db)
        })
    }

    pub fn set_content_digest(&self, image_id: &str, digest: &str) -> Result<(), Status> {
        self.with(|c| {
            c.execute(
                "UPDATE images SET content_digest = ?2 WHERE image_id = ?1",
                params![image_id, digest],
            )
            .map(|_| ())
            .map_err(db)
        })
    }

    pub fn modify_image(
        &self,
        image_id: &str,
        owner: &str,
        changes: &ImageChanges,
    ) -> Result<(), Status> {
        self.tx(|tx| {
            let image = get_image(tx, image_id).map_err(db)?;
            let Some(image) = image.filter(|i| i.owner == owner || i.owner.is_empty()) else {
                return Err(not_found("InvalidImageId.NotFound", image_id));
            };
            if image.owner.is_empty() {
                return Err(error::status(
                    Code::PermissionDenied,
                    "UnauthorizedOperation.ImageNotBelongToAccount",
                    "public images cannot be modified",
                ));
            }
            if image.state == "DELETING" {
                return Err(incorrect_state(&image));
            }
            if let Some(name) = &changes.name {
                check_name_free(tx, owner, name, Some(image_id))?;
                tx.execute(
                    "UPDATE images SET name = ?2 WHERE image_id = ?1",
                    params![image_id, name],
                )
                .map_err(db)?;
            }
            if let Some(description) = &changes.description {
                tx.execute(
                    "UPDATE images SET description = ?2 WHERE image_id = ?1",
                    params![image_id, description],
                )
                .map_err(db)?;
            }
            if let Some(deprecated) = changes.deprecated {
                tx.execute(
                    "UPDATE images SET deprecated = ?2 WHERE image_id = ?1",
                    params![image_id, deprecated],
                )
                .map_err(db)?;
            }
            Ok(())
        })
    }

    /// Checks every image can be deleted by `owner`, then marks them all `DELETING`; all or none.
    pub fn begin_delete(&self, image_ids: &[String], owner: &str) -> Result<Vec<ImageRow>, Status> {
        self.tx(|tx| {
            let mut images = Vec::new();
            for id in image_ids {
                let image = get_image(tx, id)
                    .map_err(db)?
                    .filter(|i| i.owner == owner || i.owner.is_empty())
                    .ok_or_else(|| not_found("InvalidImageId.NotFound", id))?;
                if image.owner.is_empty() {
                    return Err(error::status(
                        Code::PermissionDenied,
                        "UnauthorizedOperation.ImageNotBelongToAccount",
                        format!("{id} is a public image"),
                    ));
                }
                if matches!(image.state.as_str(), "CREATING" | "SYNCING" | "IMPORTING") {
                    return Err(incorrect_state(&image));
                }
                images.push(image);
            }
            for image in &images {
                tx.execute(
                    "UPDATE images SET state = 'DELETING', state_reason = '' WHERE image_id = ?1",
                    [&image.image_id],
                )
                .map_err(db)?;
            }
            Ok(images)
        })
    }

    /// Removes a `DELETING` image; its snapshot goes too unless instances still use it.
    /// Returns the digests whose references were dropped.
    pub fn finish_delete(&self, image_id: &str) -> Result<Vec<ChunkDigest>, Status> {
        self.tx(|tx| {
            let Some(image) = get_image(tx, image_id).map_err(db)? else {
                return Ok(Vec::new());
            };
            tx.execute("DELETE FROM images WHERE image_id = ?1", [image_id])
                .map_err(db)?;
            tx.execute("DELETE FROM sync_tasks WHERE image_id = ?1", [image_id])
                .map_err(db)?;
            let Some(snapshot_id) = image.snapshot_id else {
                return Ok(Vec::new());
            };
            tx.execute(
                "UPDATE snapshots SET image_id = NULL WHERE snapshot_id = ?1",
                [&snapshot_id],
            )
            .map_err(db)?;
            drop_snapshot_if_unused(tx, &snapshot_id).map_err(db)
        })
    }

    /// Creates `instances` from `image_id` if it is still launchable; all or none.
    pub fn insert_instances(
        &self,
        image_id: &str,
        instances: &[InstanceRow],
    ) -> Result<(), Status> {
        self.tx(|tx| {
            let image = get_image(tx, image_id)
                .map_err(db)?
                .ok_or_else(|| not_found("InvalidImageId.NotFound", image_id))?;
            if image.state != "NORMAL" {
                return Err(incorrect_state(&image));
            }
            let mut stmt = tx
                .prepare(
                    "INSERT INTO instances (instance_id, owner, name, instance_type, cpu, memory_gib, image_id, \
                     base_snapshot_id, disk_size, state, created_at, root_image_id, root_paid) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )
                .map_err(db)?;
            for i in instances {
                stmt.execute(params![
                    i.instance_id,
                    i.owner,
                    i.name,
                    i.instance_type,
                    i.cpu as i64,
                    i.memory_gib as i64,
                    image_id,
                    image.snapshot_id,
                    i.disk_size as i64,
                    i.state,
                    i.created_at,
                    i.root_image_id,
                    i.root_paid
                ])
                .map_err(db)?;
            }
            Ok(())
        })
    }

    pub fn set_instances_state(&self, ids: &[String], from: &str, to: &str) -> Result<(), Status> {
        self.tx(|tx| {
            for id in ids {
                tx.execute(
                    "UPDATE instances SET state = ?3 WHERE instance_id = ?1 AND state = ?2",
                    params![id, from, to],
                )
                .map_err(db)?;
            }
            Ok(())
        })
    }

    pub fn instances_in_state(&self, state: &str) -> Result<Vec<String>, Status> {
        self.with(|c| {
            let mut stmt = c
                .prepare("SELECT instance_id FROM instances WHERE state = ?1")
                .map_err(db)?;
            let rows = stmt.query_map([state], |r| r.get(0)).map_err(db)?;
            rows.collect::<Result<Vec<String>, _>>().map_err(db)
        })
    }

    pub fn instance(&self, instance_id: &str) -> Result<Option<InstanceRow>, Status> {
        self.with(|c| get_instance(c, instance_id).map_err(db))
    }

    pub fn instances_of(&self, owner: &str) -> Result<Vec<InstanceRow>, Status> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances WHERE owner = ?1 ORDER BY seq"
                ))
                .map_err(db)?;
            let rows = stmt.query_map([owner], instance_from_row).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
    }

    /// Terminates instances of `owner` (all must exist): their disks are dropped.
    pub fn terminate(&self, ids: &[String], owner: &str) -> Result<Vec<ChunkDigest>, Status> {
        self.tx(|tx| {
            let mut dropped = Vec::new();
            for id in ids {
                let instance = get_instance(tx, id)
                    .map_err(db)?
                    .filter(|i| i.owner == owner)
                    .ok_or_else(|| not_found("InvalidInstanceId.NotFound", id))?;
                if instance.state == "TERMINATED" {
                    continue;
                }
                dropped.extend(drop_instance_chunks(tx, id).map_err(db)?);
                tx.execute(
                    "UPDATE instances SET state = 'TERMINATED', base_snapshot_id = NULL WHERE instance_id = ?1",
                    [id],
                )
                .map_err(db)?;
                if let Some(base) = instance.base_snapshot_id {
                    dropped.extend(drop_snapshot_if_unused(tx, &base).map_err(db)?);
                }
            }
            Ok(dropped)
        })
    }

    /// Replaces an instance's system disk with `image`'s content.
    pub fn reset(
        &self,
        instance_id: &str,
        owner: &str,
        image: &ImageRow,
    ) -> Result<Vec<ChunkDigest>, Status> {
        self.tx(|tx| {
            let instance = get_instance(tx, instance_id)
                .map_err(db)?
                .filter(|i| i.owner == owner)
                .ok_or_else(|| not_found("InvalidInstanceId.NotFound", instance_id))?;
            if instance.state == "TERMINATED" {
                return Err(error::status(
                    Code::FailedPrecondition,
                    "UnsupportedOperation.InstanceStateTerminated",
                    "the instance is terminated",
                ));
            }
            let current = get_image(tx, &image.image_id)
                .map_err(db)?
                .filter(|i| i.state == "NORMAL")
                .ok_or_else(|| not_found("InvalidImageId.NotFound", &image.image_id))?;
            if current.virtual_size > instance.disk_size {
                return Err(error::invalid_argument(
                    "image_id",
                    "InvalidParameterValue.ImageSizeLargerThanSystemDisk",
                    "the image is larger than the instance's system disk",
                ));
            }
            let mut dropped = drop_instance_chunks(tx, instance_id).map_err(db)?;
            tx.execute(
                "UPDATE instances SET image_id = ?2, base_snapshot_id = ?3, root_image_id = ?4, root_paid = ?5 \
                 WHERE instance_id = ?1",
                params![instance_id, current.image_id, current.snapshot_id, current.root_image_id, current.root_paid],
            )
            .map_err(db)?;
            if let Some(base) = instance.base_snapshot_id.filter(|b| Some(b) != current.snapshot_id.as_ref()) {
                dropped.extend(drop_snapshot_if_unused(tx, &base).map_err(db)?);
            }
            Ok(dropped)
        })
    }

    /// The chunk behind index `idx` of an instance's disk (`None`: zeros).
    pub fn instance_chunk(
        &self,
        instance: &InstanceRow,
        idx: u64,
    ) -> Result<Option<ChunkDigest>, Status> {
        self.with(|c| {
            let own: Option<Option<Vec<u8>>> = c
                .prepare_cached(
                    "SELECT digest FROM instance_chunks WHERE instance_id = ?1 AND idx = ?2",
                )
                .and_then(|mut s| {
                    s.query_row(params![instance.instance_id, idx as i64], |r| r.get(0))
                        .optional()
                })
                .map_err(db)?;
            if let Some(own) = own {
                return Ok(own.and_then(digest_of));
            }
            let Some(base) = &instance.base_snapshot_id else {
                return Ok(None);
            };
            c.prepare_cached(
                "SELECT digest FROM snapshot_chunks WHERE snapshot_id = ?1 AND idx = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![base, idx as i64], |r| r.get::<_, Vec<u8>>(0))
                    .optional()
            })
            .map(|d| d.and_then(digest_of))
            .map_err(db)
        })
    }

    /// Records new content for chunks of an instance's disk (`None`: zeros). Returns the
    /// digests the instance itself no longer references.
    pub fn write_instance_chunks(
        &self,
        instance_id: &str,
        chunks: &[(u64, Option<ChunkDigest>)],
    ) -> Result<Vec<ChunkDigest>, Status> {
        self.tx(|tx| {
            let state: Option<String> = tx
                .query_row("SELECT state FROM instances WHERE instance_id = ?1", [instance_id], |r| r.get(0))
                .optional()
                .map_err(db)?;
            if state.as_deref() != Some("RUNNING") && state.as_deref() != Some("STOPPED") {
                return Err(error::status(
                    Code::FailedPrecondition,
                    "InvalidInstanceState",
                    "the instance's disk can only be written while it is RUNNING or STOPPED",
                ));
            }
            let mut dropped = Vec::new();
            for (idx, digest) in chunks {
                let old: Option<Option<Vec<u8>>> = tx
                    .query_row(
                        "SELECT digest FROM instance_chunks WHERE instance_id = ?1 AND idx = ?2",
                        params![instance_id, *idx as i64],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db)?;
                if let Some(old) = old.flatten().and_then(digest_of) {
                    dropped.push(old);
                }
                tx.execute(
                    "INSERT OR REPLACE INTO instance_chunks (instance_id, idx, digest) VALUES (?1, ?2, ?3)",
                    params![instance_id, *idx as i64, digest.as_ref().map(|d| d.0.to_vec())],
                )
                .map_err(db)?;
            }
            Ok(dropped)
        })
    }

    /// A snapshot's non-zero chunks, by index.
    pub fn snapshot_manifest(&self, snapshot_id: &str) -> Result<Vec<(u64, ChunkDigest)>, Status> {
        self.with(|c| {
            read_manifest(
                c,
                "SELECT idx, digest FROM snapshot_chunks WHERE snapshot_id = ?1 ORDER BY idx",
                snapshot_id,
            )
        })
    }

    /// Of `candidates`, those no manifest or disk references any more.
    pub fn unreferenced(&self, candidates: &[ChunkDigest]) -> Result<Vec<ChunkDigest>, Status> {
        self.with(|c| {
            let mut out = Vec::new();
            let mut seen = HashSet::new();
            for d in candidates {
                if !seen.insert(*d) {
                    continue;
                }
                let used: bool = c
                    .prepare_cached(
                        "SELECT EXISTS(SELECT 1 FROM snapshot_chunks WHERE digest = ?1) \
                         OR EXISTS(SELECT 1 FROM instance_chunks WHERE digest = ?1) \
                         OR EXISTS(SELECT 1 FROM sync_chunks WHERE digest = ?1)",
                    )
                    .and_then(|mut s| s.query_row([&d.0[..]], |r| r.get(0)))
                    .map_err(db)?;
                if !used {
                    out.push(*d);
                }
            }
            Ok(out)
        })
    }

    /// Every digest any manifest or disk references.
    pub fn referenced(&self) -> Result<HashSet<ChunkDigest>, Status> {
        self.with(|c| {
            let mut out = HashSet::new();
            for sql in [
                "SELECT DISTINCT digest FROM snapshot_chunks",
                "SELECT DISTINCT digest FROM instance_chunks WHERE digest IS NOT NULL",
                "SELECT DISTINCT digest FROM sync_chunks",
            ] {
                let mut stmt = c.prepare(sql).map_err(db)?;
                let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).map_err(db)?;
                for row in rows {
                    if let Some(d) = digest_of(row.map_err(db)?) {
                        out.insert(d);
                    }
                }
            }
            Ok(out)
        })
    }
}

pub fn incorrect_state(image: &ImageRow) -> Status {
    error::status(
        Code::FailedPrecondition,
        "InvalidImageId.IncorrectState",
        format!("image {} is {}", image.image_id, image.state),
    )
}

fn check_name_free(
    tx: &Connection,
    owner: &str,
    name: &str,
    except: Option<&str>,
) -> Result<(), Status> {
    let taken: Option<String> = tx
        .query_row(
            "SELECT image_id FROM images WHERE owner = ?1 AND name = ?2",
            params![owner, name],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)?;
    match taken {
        Some(id) if Some(id.as_str()) != except => Err(error::status(
            Code::AlreadyExists,
            "InvalidImageName.Duplicate",
            format!("an image named {name:?} already exists in this region"),
        )),
        _ => Ok(()),
    }
}

/// The state of a copy into this region (the destination side of `SyncImages`).
#[derive(Clone, Debug, Default)]
pub struct SyncTaskRow {
    pub image_id: String,
    pub request_key: String,
    pub source_region: String,
    pub source_image_id: String,
    /// `RUNNING`, `DONE` (all chunks in; registering) or `FAILED`.
    pub state: String,
    pub manifest_loaded: bool,
    pub chunks_total: u64,
    pub bytes_total: u64,
    pub chunks_done: u64,
    pub bytes_done: u64,
    pub chunks_transferred: u64,
    pub bytes_transferred: u64,
    pub attempts: u32,
    pub last_error: String,
}

const SYNC_COLUMNS: &str = "image_id, request_key, source_region, source_image_id, state, manifest_loaded, \
    chunks_total, bytes_total, chunks_done, bytes_done, chunks_transferred, bytes_transferred, attempts, last_error";

fn sync_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SyncTaskRow> {
    Ok(SyncTaskRow {
        image_id: r.get(0)?,
        request_key: r.get(1)?,
        source_region: r.get(2)?,
        source_image_id: r.get(3)?,
        state: r.get(4)?,
        manifest_loaded: r.get(5)?,
        chunks_total: r.get::<_, i64>(6)? as u64,
        bytes_total: r.get::<_, i64>(7)? as u64,
        chunks_done: r.get::<_, i64>(8)? as u64,
        bytes_done: r.get::<_, i64>(9)? as u64,
        chunks_transferred: r.get::<_, i64>(10)? as u64,
        bytes_transferred: r.get::<_, i64>(11)? as u64,
        attempts: r.get::<_, i64>(12)? as u32,
        last_error: r.get(13)?,
    })
}

/// Progress of a copy, as last recorded.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncCounters {
    pub chunks_done: u64,
    pub bytes_done: u64,
    pub chunks_transferred: u64,
    pub bytes_transferred: u64,
}

impl Store {
    /// Creates the `SYNCING` image and its copy task, unless `request_key` already made one (then
    /// returns that image's id). Quota and name are checked in the same transaction; with
    /// `dry_run` nothing is written.
    pub fn create_sync_image(
        &self,
        image: ImageRow,
        task: &SyncTaskRow,
        quota: u32,
        dry_run: bool,
    ) -> Result<String, Status> {
        self.tx(|tx| {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT image_id FROM sync_tasks WHERE request_key = ?1",
                    [&task.request_key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            if let Some(id) = existing {
                return Ok(id);
            }
            check_name_free(tx, &image.owner, &image.name, None)?;
            let used: i64 = tx
                .query_row("SELECT COUNT(*) FROM images WHERE owner = ?1", [&image.owner], |r| r.get(0))
                .map_err(db)?;
            if used as u32 >= quota {
                return Err(error::status(
                    Code::ResourceExhausted,
                    "ImageQuotaLimitExceeded",
                    format!("the custom image quota of {quota} in the destination region is used up"),
                ));
            }
            if dry_run {
                return Ok(String::new());
            }
            let snapshot_id = image.snapshot_id.clone().unwrap_or_default();
            insert_manifest(tx, &snapshot_id, &image.image_id, image.virtual_size, &[], image.created_at)
                .map_err(db)?;
            insert_image(tx, &image).map_err(db)?;
            tx.execute(
                &format!("INSERT INTO sync_tasks ({SYNC_COLUMNS}) VALUES (?1, ?2, ?3, ?4, 'RUNNING', 0, 0, 0, 0, 0, 0, 0, 0, '')"),
                params![image.image_id, task.request_key, task.source_region, task.source_image_id],
            )
            .map_err(db)?;
            Ok(image.image_id.clone())
        })
    }

    pub fn sync_task(&self, image_id: &str) -> Result<Option<SyncTaskRow>, Status> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {SYNC_COLUMNS} FROM sync_tasks WHERE image_id = ?1"),
                [image_id],
                sync_from_row,
            )
            .optional()
            .map_err(db)
        })
    }

    /// Records the manifest a copy must reproduce (once: a NORMAL source never changes).
    /// From then on its chunks count as referenced, so none that arrives is reclaimed.
    pub fn set_sync_manifest(
        &self,
        image_id: &str,
        manifest: &[(u64, ChunkDigest)],
    ) -> Result<(), Status> {
        self.tx(|tx| {
            let loaded: bool = tx
                .query_row("SELECT manifest_loaded FROM sync_tasks WHERE image_id = ?1", [image_id], |r| r.get(0))
                .map_err(db)?;
            if loaded {
                return Ok(());
            }
            let mut stmt = tx
                .prepare("INSERT OR REPLACE INTO sync_chunks (image_id, idx, digest) VALUES (?1, ?2, ?3)")
                .map_err(db)?;
            for (idx, digest) in manifest {
                stmt.execute(params![image_id, *idx as i64, &digest.0[..]]).map_err(db)?;
            }
            let bytes = manifest.len() as u64 * imagefleet_chunkstore::CHUNK_SIZE as u64;
            tx.execute(
                "UPDATE sync_tasks SET manifest_loaded = 1, chunks_total = ?2, bytes_total = ?3 WHERE image_id = ?1",
                params![image_id, manifest.len() as i64, bytes as i64],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    /// The manifest a copy must reproduce.
    pub fn sync_manifest(&self, image_id: &str) -> Result<Vec<(u64, ChunkDigest)>, Status> {
        self.with(|c| {
            read_manifest(
                c,
                "SELECT idx, digest FROM sync_chunks WHERE image_id = ?1 ORDER BY idx",
                image_id,
            )
        })
    }

    /// Records a copy's progress (and the image's `sync_percent`, which reaches 100 only with
    /// `finish_sync`).
    pub fn record_sync_progress(
        &self,
        image_id: &str,
        counters: &SyncCounters,
        bytes_total: u64,
    ) -> Result<(), Status> {
        let percent = (counters.bytes_done * 100)
            .checked_div(bytes_total)
            .unwrap_or(0)
            .min(99);
        self.tx(|tx| {
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
            )
            .map_err(db)?;
            tx.execute(
                "UPDATE images SET sync_percent = ?2 WHERE image_id = ?1 AND state = 'SYNCING'",
                params![image_id, percent as i64],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    /// Counts an attempt and remembers what interrupted the previous one.
    pub fn record_sync_attempt(
        &self,
        image_id: &str,
        last_error: Option<&str>,
    ) -> Result<u32, Status> {
        self.tx(|tx| {
            if let Some(e) = last_error {
                tx.execute(
                    "UPDATE sync_tasks SET last_error = ?2 WHERE image_id = ?1",
                    params![image_id, e],
                )
                .map_err(db)?;
                return Ok(0);
            }
            tx.execute(
                "UPDATE sync_tasks SET attempts = attempts + 1 WHERE image_id = ?1",
                [image_id],
            )
            .map_err(db)?;
            tx.query_row(
                "SELECT attempts FROM sync_tasks WHERE image_id = ?1",
                [image_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u32)
            .map_err(db)
        })
    }

    /// Every chunk has arrived: the copied manifest becomes the image's snapshot.
    pub fn finish_sync(&self, image_id: &str) -> Result<(), Status> {
        self.tx(|tx| {
            let image = get_image(tx, image_id)
                .map_err(db)?
                .ok_or_else(|| not_found("InvalidImageId.NotFound", image_id))?;
            let snapshot_id = image.snapshot_id.unwrap_or_default();
            let moved = tx
                .execute(
                    "INSERT OR REPLACE INTO snapshot_chunks (snapshot_id, idx, digest) \
                     SELECT ?2, idx, digest FROM sync_chunks WHERE image_id = ?1",
                    params![image_id, snapshot_id],
                )
                .map_err(db)?;
            tx.execute("DELETE FROM sync_chunks WHERE image_id = ?1", [image_id]).map_err(db)?;
            tx.execute(
                "UPDATE snapshots SET stored_bytes = ?2 WHERE snapshot_id = ?1",
                params![snapshot_id, (moved as u64 * imagefleet_chunkstore::CHUNK_SIZE as u64) as i64],
            )
            .map_err(db)?;
            tx.execute(
                "UPDATE sync_tasks SET state = 'DONE', chunks_done = chunks_total, bytes_done = bytes_total \
                 WHERE image_id = ?1",
                [image_id],
            )
            .map_err(db)?;
            tx.execute("UPDATE images SET sync_percent = 100 WHERE image_id = ?1", [image_id]).map_err(db)?;
            Ok(())
        })
    }

    /// A copy that cannot succeed: the image is `CREATEFAILED` with `reason`, and what had
    /// arrived is released. Returns the digests released.
    pub fn fail_sync(&self, image_id: &str, reason: &str) -> Result<Vec<ChunkDigest>, Status> {
        self.tx(|tx| {
            let digests = {
                let mut stmt = tx
                    .prepare("SELECT digest FROM sync_chunks WHERE image_id = ?1")
                    .map_err(db)?;
                let rows = stmt
                    .query_map([image_id], |r| r.get::<_, Vec<u8>>(0))
                    .map_err(db)?;
                rows.filter_map(|r| r.ok().and_then(digest_of)).collect()
            };
            tx.execute("DELETE FROM sync_chunks WHERE image_id = ?1", [image_id])
                .map_err(db)?;
            tx.execute(
                "UPDATE sync_tasks SET state = 'FAILED', last_error = ?2 WHERE image_id = ?1",
                params![image_id, reason],
            )
            .map_err(db)?;
            tx.execute(
                "UPDATE images SET state = 'CREATEFAILED', state_reason = ?2 WHERE image_id = ?1",
                params![image_id, reason],
            )
            .map_err(db)?;
            Ok(digests)
        })
    }

    /// Copy tasks of the given images, by image id.
    pub fn sync_tasks_for(
        &self,
        image_ids: &[&str],
    ) -> Result<std::collections::HashMap<String, SyncTaskRow>, Status> {
        self.with(|c| {
            let mut out = std::collections::HashMap::new();
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {SYNC_COLUMNS} FROM sync_tasks WHERE image_id = ?1"
                ))
                .map_err(db)?;
            for id in image_ids {
                if let Some(task) = stmt.query_row([id], sync_from_row).optional().map_err(db)? {
                    out.insert(task.image_id.clone(), task);
                }
            }
            Ok(out)
        })
    }
}

//! The metadata schema and its migrations. `PRAGMA user_version` counts the migrations applied;
//! each runs once, in order, in one transaction with the version bump. Version 1 is the schema
//! the store had before it was versioned (its statements are idempotent, so a store from then
//! opens at version 0 and is brought forward without conversion).

use crate::catalogue;
use crate::error::Result;
use crate::model::{Chain, LineageLink, RootKind};
use rusqlite::{params, Connection, Transaction};
use std::collections::HashMap;

const MIGRATIONS: &[&str] = &[
    // 1: images, snapshots and their chunks, instances and their disk overrides, copies.
    r#"
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
"#,
    // 2: lookups by owner and state, each owner's instance count kept beside its rows (so an
    // unfiltered listing's total costs one row, not a scan); terminated instances remember when
    // (for purging); copies
    // read a pinned source snapshot, carry the digest they must reproduce and a deadline for
    // retries; the source side pins the snapshots being copied.
    r#"
CREATE INDEX images_by_owner ON images(owner, seq);
CREATE INDEX images_by_state ON images(state);
ALTER TABLE instances ADD COLUMN terminated_at INTEGER;
UPDATE instances SET terminated_at = strftime('%s', 'now') WHERE state = 'TERMINATED';
CREATE INDEX instances_by_owner ON instances(owner, seq);
CREATE INDEX instances_by_state ON instances(state, terminated_at);
CREATE TABLE instance_counts (
    owner TEXT PRIMARY KEY,
    instances INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO instance_counts (owner, instances) SELECT owner, COUNT(*) FROM instances GROUP BY owner;
ALTER TABLE sync_tasks ADD COLUMN source_snapshot_id TEXT NOT NULL DEFAULT '';
ALTER TABLE sync_tasks ADD COLUMN expected_digest TEXT NOT NULL DEFAULT '';
ALTER TABLE sync_tasks ADD COLUMN deadline_at INTEGER NOT NULL DEFAULT 0;
UPDATE sync_tasks SET
    expected_digest = (SELECT content_digest FROM images WHERE images.image_id = sync_tasks.image_id),
    deadline_at = strftime('%s', 'now') + 86400;
UPDATE images SET content_digest = '' WHERE state = 'SYNCING';
CREATE TABLE copy_pins (
    request_key TEXT PRIMARY KEY,
    snapshot_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    dest_region TEXT NOT NULL,
    virtual_size INTEGER NOT NULL,
    content_digest TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX copy_pins_by_snapshot ON copy_pins(snapshot_id);
"#,
    // 3: lineage names the parent image's owner (for an image made from an instance launched
    // from a shared image: the account that shared it), kept on the instance from its launch
    // so that neither a cancelled share nor a deleted parent loses it.
    r#"
ALTER TABLE instances ADD COLUMN image_owner TEXT NOT NULL DEFAULT '';
UPDATE instances SET image_owner = COALESCE(
    (SELECT p.owner FROM images p WHERE p.image_id = instances.image_id), '');
ALTER TABLE images ADD COLUMN parent_owner TEXT NOT NULL DEFAULT '';
UPDATE images SET parent_owner = CASE
    WHEN source = 'SYNC' THEN owner
    ELSE COALESCE((SELECT p.owner FROM images p WHERE p.image_id = images.parent_image_id), '')
END WHERE parent_image_id != '';
"#,
    // 4: each owner's instances not terminated and chunks written to instance disks (non-NULL
    // rows of `instance_chunks`), kept beside the rows so a quota check costs one row, not a
    // scan.
    r#"
CREATE TABLE account_usage (
    owner TEXT PRIMARY KEY,
    live_instances INTEGER NOT NULL DEFAULT 0,
    written_chunks INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO account_usage (owner, live_instances)
    SELECT owner, COUNT(*) FROM instances WHERE state <> 'TERMINATED' GROUP BY owner;
INSERT INTO account_usage (owner, written_chunks)
    SELECT i.owner, COUNT(*) FROM instance_chunks c JOIN instances i ON i.instance_id = c.instance_id
    WHERE c.digest IS NOT NULL GROUP BY i.owner
    ON CONFLICT(owner) DO UPDATE SET written_chunks = excluded.written_chunks;
"#,
    // 5: imports: the file behind each imported image, how much of it was read, and why an
    // import failed.
    r#"
CREATE TABLE imports (
    image_id TEXT PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    format TEXT NOT NULL DEFAULT '',
    format_variant TEXT NOT NULL DEFAULT '',
    error_reason TEXT NOT NULL DEFAULT '',
    image_url TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
"#,
    // 6: billing. Each image keeps its full lineage chain (itself first, its ultimate source
    // last, as JSON text of {image_id, region, owner}) and what kind of source that is (FREE,
    // WINDOWS, LICENSED); each instance keeps the chain and root kind of the image it runs.
    // Usage events wait in `usage_outbox` until the billing service has them; each account's
    // snapshot bytes as last reported are kept beside (the chains of existing rows are filled
    // in by `fill_lineage`).
    r#"
ALTER TABLE images ADD COLUMN root_kind TEXT NOT NULL DEFAULT 'FREE';
ALTER TABLE images ADD COLUMN lineage_chain TEXT NOT NULL DEFAULT '[]';
ALTER TABLE instances ADD COLUMN root_kind TEXT NOT NULL DEFAULT 'FREE';
ALTER TABLE instances ADD COLUMN lineage_chain TEXT NOT NULL DEFAULT '[]';
CREATE TABLE usage_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    event BLOB NOT NULL
);
CREATE TABLE snapshot_bytes_held (
    owner TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
"#,
];

/// Steps in code that run after a migration's statements, in its transaction.
type CodeStep = fn(&Transaction<'_>) -> rusqlite::Result<()>;
const CODE_STEPS: &[(usize, CodeStep)] = &[(6, fill_lineage)];

/// One image as it was before chains were kept.
struct OldImage {
    owner: String,
    source: String,
    parent_image_id: String,
    parent_region: String,
    parent_owner: String,
    root_image_id: String,
    root_paid: bool,
    platform: String,
}

/// The kind of the source `root_image_id`: a public image's by the catalogue (whatever the
/// region), otherwise by whether it was paid and the platform.
fn old_root_kind(root_image_id: &str, root_paid: bool, platform: &str) -> RootKind {
    catalogue::PUBLIC_IMAGES
        .iter()
        .find(|def| crate::seed::image_id(def) == root_image_id)
        .map(|def| def.root_kind())
        .unwrap_or_else(|| RootKind::from_paid(root_paid, platform))
}

/// The chain of an image from the parent and root columns: its parents while they are in
/// this region (their regions left empty), then the last parent known and the root.
fn old_chain(images: &HashMap<String, OldImage>, image_id: &str, depth: usize) -> Chain {
    let Some(image) = images.get(image_id) else {
        return Chain::default();
    };
    let mut links = vec![LineageLink {
        image_id: image_id.to_string(),
        region: String::new(),
        owner: image.owner.clone(),
    }];
    let root_link = |links: &mut Vec<LineageLink>, after: &str| {
        if !image.root_image_id.is_empty() && image.root_image_id != after {
            links.push(LineageLink {
                image_id: image.root_image_id.clone(),
                region: String::new(),
                owner: images
                    .get(&image.root_image_id)
                    .map(|r| r.owner.clone())
                    .unwrap_or_default(),
            });
        }
    };
    if image.parent_image_id.is_empty() {
        root_link(&mut links, image_id);
    } else if image.source != "SYNC" && images.contains_key(&image.parent_image_id) && depth < 64 {
        links.extend(old_chain(images, &image.parent_image_id, depth + 1).0);
    } else {
        links.push(LineageLink {
            image_id: image.parent_image_id.clone(),
            region: if image.source == "SYNC" {
                image.parent_region.clone()
            } else {
                String::new()
            },
            owner: image.parent_owner.clone(),
        });
        root_link(&mut links, &image.parent_image_id);
    }
    Chain(links)
}

/// Migration 6: fills the chain and root kind of every image and instance from the parent
/// and root columns (`root_paid` becomes WINDOWS for a Windows platform, LICENSED otherwise).
fn fill_lineage(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let mut images = HashMap::new();
    {
        let mut stmt = tx.prepare(
            "SELECT image_id, owner, source, parent_image_id, parent_region, parent_owner, \
             root_image_id, root_paid, platform FROM images",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                OldImage {
                    owner: r.get(1)?,
                    source: r.get(2)?,
                    parent_image_id: r.get(3)?,
                    parent_region: r.get(4)?,
                    parent_owner: r.get(5)?,
                    root_image_id: r.get(6)?,
                    root_paid: r.get(7)?,
                    platform: r.get(8)?,
                },
            ))
        })?;
        for row in rows {
            let (id, image) = row?;
            images.insert(id, image);
        }
    }
    let mut update =
        tx.prepare("UPDATE images SET lineage_chain = ?2, root_kind = ?3 WHERE image_id = ?1")?;
    for (id, image) in &images {
        let kind = old_root_kind(&image.root_image_id, image.root_paid, &image.platform);
        update.execute(params![id, old_chain(&images, id, 0), kind])?;
    }
    let instances = {
        let mut stmt = tx.prepare(
            "SELECT instance_id, image_id, image_owner, root_image_id, root_paid FROM instances",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    let mut update = tx.prepare(
        "UPDATE instances SET lineage_chain = ?2, root_kind = ?3 WHERE instance_id = ?1",
    )?;
    for (instance_id, image_id, image_owner, root_image_id, root_paid) in instances {
        let (chain, platform) = match images.get(&image_id) {
            Some(image) => (old_chain(&images, &image_id, 0), image.platform.clone()),
            None => {
                let mut links = vec![LineageLink {
                    image_id: image_id.clone(),
                    region: String::new(),
                    owner: image_owner,
                }];
                if !root_image_id.is_empty() && root_image_id != image_id {
                    links.push(LineageLink {
                        image_id: root_image_id.clone(),
                        region: String::new(),
                        owner: String::new(),
                    });
                }
                (Chain(links), String::new())
            }
        };
        let kind = old_root_kind(&root_image_id, root_paid, &platform);
        update.execute(params![instance_id, chain, kind])?;
    }
    Ok(())
}

/// The schema version this build writes.
pub const CURRENT_VERSION: u32 = MIGRATIONS.len() as u32;

/// Applies every migration the store has not had yet.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > CURRENT_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the metadata store is at schema version {version}, newer than this build's {CURRENT_VERSION}"
        ))
        .into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        for (_, step) in CODE_STEPS.iter().filter(|(v, _)| *v == i + 1) {
            step(&tx)?;
        }
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "metadata schema migrated");
    }
    Ok(())
}

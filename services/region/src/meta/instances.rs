//! Instance rows and their disks: launching, listing (paged in SQL, by the owner index),
//! terminating, resetting, the chunks behind a disk range, and purging old terminated rows.

use super::{digest_of, snapshots, Limits, Store};
use crate::error::{RegionError, Result};
use crate::model::{ImageRow, ImageState, InstanceRow, InstanceState};
use imagefleet_chunkstore::ChunkDigest;
use imagefleet_proto::billing::v1 as billing;
use imagefleet_proto::billing::v1::usage_event::Usage;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Transaction};

const INSTANCE_COLUMNS: &str =
    "instance_id, owner, name, instance_type, cpu, memory_gib, image_id, \
    base_snapshot_id, disk_size, state, created_at, root_image_id, root_paid, image_owner, \
    lineage_chain, root_kind";

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
        image_owner: r.get(13)?,
        chain: r.get(14)?,
        root_kind: r.get(15)?,
    })
}

pub(super) fn get_instance(
    c: &Connection,
    instance_id: &str,
) -> rusqlite::Result<Option<InstanceRow>> {
    c.prepare_cached(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?1"
    ))?
    .query_row([instance_id], instance_from_row)
    .optional()
}

/// An instance of `owner` whose disk can be read or written, or why not.
pub(super) fn live_instance(c: &Connection, instance_id: &str, owner: &str) -> Result<InstanceRow> {
    let instance = get_instance(c, instance_id)?
        .filter(|i| i.owner == owner)
        .ok_or_else(|| RegionError::InstanceNotFound(instance_id.to_string()))?;
    if !instance.state.has_live_disk() {
        return Err(RegionError::InstanceState {
            instance_id: instance_id.to_string(),
            state: instance.state,
        });
    }
    Ok(instance)
}

/// Adds `n` (may be negative) to the owner's instance count.
fn count_instances(tx: &Transaction<'_>, owner: &str, n: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO instance_counts (owner, instances) VALUES (?1, ?2) \
         ON CONFLICT(owner) DO UPDATE SET instances = instances + excluded.instances",
    )?
    .execute(params![owner, n])?;
    Ok(())
}

/// Adds `n` (may be negative) to one of the owner's counters in `account_usage`.
fn add_usage(tx: &Transaction<'_>, owner: &str, column: &str, n: i64) -> rusqlite::Result<()> {
    if n == 0 {
        return Ok(());
    }
    tx.prepare_cached(&format!(
        "INSERT INTO account_usage (owner, {column}) VALUES (?1, MAX(?2, 0)) \
         ON CONFLICT(owner) DO UPDATE SET {column} = MAX({column} + ?2, 0)"
    ))?
    .execute(params![owner, n])?;
    Ok(())
}

/// Adds `n` (may be negative) to the chunks the owner has written to instance disks.
fn count_written(tx: &Transaction<'_>, owner: &str, n: i64) -> rusqlite::Result<()> {
    add_usage(tx, owner, "written_chunks", n)
}

/// One of the owner's counters in `account_usage` (0 without a row).
fn usage_counter(c: &Connection, owner: &str, column: &str) -> rusqlite::Result<u64> {
    Ok(c.prepare_cached(&format!(
        "SELECT {column} FROM account_usage WHERE owner = ?1"
    ))?
    .query_row([owner], |r| r.get::<_, i64>(0))
    .optional()?
    .unwrap_or(0)
    .max(0) as u64)
}

/// Chunks the owner has written to its instances' disks (what they hold beyond their bases).
pub(super) fn written_chunks(c: &Connection, owner: &str) -> rusqlite::Result<usize> {
    Ok(usage_counter(c, owner, "written_chunks")? as usize)
}

/// The owner's instances that are not terminated.
pub(super) fn live_instances(c: &Connection, owner: &str) -> rusqlite::Result<u64> {
    usage_counter(c, owner, "live_instances")
}

fn drop_instance_chunks(
    tx: &Transaction<'_>,
    instance: &InstanceRow,
) -> rusqlite::Result<Vec<ChunkDigest>> {
    let dropped = snapshots::digests(
        tx,
        "SELECT digest FROM instance_chunks WHERE instance_id = ?1 AND digest IS NOT NULL",
        &instance.instance_id,
    )?;
    tx.execute(
        "DELETE FROM instance_chunks WHERE instance_id = ?1",
        [&instance.instance_id],
    )?;
    count_written(tx, &instance.owner, -(dropped.len() as i64))?;
    Ok(dropped)
}

/// Which instances a listing asks for: the owner's, narrowed by filters (each a set of
/// accepted values), one page of them.
#[derive(Debug, Default)]
pub struct InstanceQuery {
    pub owner: String,
    pub instance_ids: Vec<String>,
    pub names: Vec<String>,
    pub states: Vec<InstanceState>,
    pub image_ids: Vec<String>,
    pub offset: usize,
    pub limit: usize,
}

/// One page of a listing, and how many match in all.
#[derive(Debug)]
pub struct InstancePage {
    pub instances: Vec<InstanceRow>,
    pub total: usize,
}

impl Store {
    /// Creates `instances` from `image_id` if it is still launchable and each owner's
    /// instance quota has room for them; all or none. Each is charged for the image's lineage
    /// (its `chain` and `root_kind` are the image's, whatever the rows say), and its start is
    /// reported in the same transaction.
    pub fn insert_instances(
        &self,
        image_id: &str,
        instances: &[InstanceRow],
        limits: Limits<'_>,
    ) -> Result<()> {
        self.write(|tx| {
            let image = super::images::get_image(tx, image_id)?
                .ok_or_else(|| RegionError::ImageNotFound(image_id.to_string()))?;
            if image.state != ImageState::Normal {
                return Err(RegionError::image_state(&image));
            }
            let mut asked: std::collections::BTreeMap<&str, u64> = Default::default();
            for i in instances {
                *asked.entry(i.owner.as_str()).or_default() += 1;
            }
            for (owner, n) in asked {
                super::admission::check_instances(tx, owner, n, limits)?;
            }
            let mut stmt = tx.prepare_cached(
                "INSERT INTO instances (instance_id, owner, name, instance_type, cpu, memory_gib, image_id, \
                 base_snapshot_id, disk_size, state, created_at, root_image_id, root_paid, image_owner, \
                 lineage_chain, root_kind) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            let emitter = self.emitter();
            let mut added: std::collections::HashMap<&str, i64> = Default::default();
            for i in instances {
                *added.entry(i.owner.as_str()).or_default() += 1;
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
                    i.root_paid,
                    image.owner,
                    image.chain,
                    image.root_kind
                ])?;
                emitter.emit(
                    tx,
                    &i.owner,
                    Usage::InstanceStarted(billing::InstanceStarted {
                        instance_id: i.instance_id.clone(),
                        instance_type: i.instance_type.clone(),
                        vcpu: i.cpu,
                        image: Some(emitter.charge(&image.chain, image.root_kind)),
                    }),
                )?;
            }
            for (owner, n) in added {
                count_instances(tx, owner, n)?;
                add_usage(tx, owner, "live_instances", n)?;
            }
            Ok(())
        })
    }

    pub fn set_instances_state(
        &self,
        ids: &[String],
        from: InstanceState,
        to: InstanceState,
    ) -> Result<()> {
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "UPDATE instances SET state = ?3 WHERE instance_id = ?1 AND state = ?2",
            )?;
            for id in ids {
                stmt.execute(params![id, from, to])?;
            }
            Ok(())
        })
    }

    pub fn instances_in_state(&self, state: InstanceState) -> Result<Vec<String>> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT instance_id FROM instances WHERE state = ?1")?;
            let rows = stmt.query_map([state], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
    }

    pub fn instance(&self, instance_id: &str) -> Result<Option<InstanceRow>> {
        self.read(|c| Ok(get_instance(c, instance_id)?))
    }

    /// Instances of the owner that are not terminated.
    pub fn live_instance_count(&self, owner: &str) -> Result<u64> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT COUNT(*) FROM instances WHERE owner = ?1 AND state <> 'TERMINATED'",
            )?
            .query_row([owner], |r| r.get::<_, i64>(0))? as u64)
        })
    }

    /// One page of the owner's instances that match the query, oldest first, and the total.
    pub fn list_instances(&self, q: &InstanceQuery) -> Result<InstancePage> {
        let mut clauses = vec!["owner = ?".to_string()];
        let mut args: Vec<Value> = vec![Value::Text(q.owner.clone())];
        let mut any_of = |column: &str, values: Vec<Value>| {
            if !values.is_empty() {
                clauses.push(format!(
                    "{column} IN ({})",
                    vec!["?"; values.len()].join(", ")
                ));
                args.extend(values);
            }
        };
        any_of(
            "instance_id",
            q.instance_ids.iter().cloned().map(Value::Text).collect(),
        );
        any_of("name", q.names.iter().cloned().map(Value::Text).collect());
        any_of(
            "state",
            q.states
                .iter()
                .map(|s| Value::Text(s.as_str().to_string()))
                .collect(),
        );
        any_of(
            "image_id",
            q.image_ids.iter().cloned().map(Value::Text).collect(),
        );
        let unfiltered = clauses.len() == 1;
        let filter = clauses.join(" AND ");
        self.read(|c| {
            let total: i64 = if unfiltered {
                c.prepare_cached("SELECT instances FROM instance_counts WHERE owner = ?1")?
                    .query_row([&q.owner], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0)
            } else {
                c.prepare_cached(&format!("SELECT COUNT(*) FROM instances WHERE {filter}"))?
                    .query_row(params_from_iter(args.iter()), |r| r.get(0))?
            };
            let mut page_args = args.clone();
            page_args.push(Value::Integer(q.limit as i64));
            page_args.push(Value::Integer(q.offset.min(i64::MAX as usize) as i64));
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {INSTANCE_COLUMNS} FROM instances WHERE {filter} ORDER BY seq LIMIT ? OFFSET ?"
            ))?;
            let rows = stmt.query_map(params_from_iter(page_args.iter()), instance_from_row)?;
            Ok(InstancePage {
                instances: rows.collect::<rusqlite::Result<Vec<_>>>()?,
                total: total as usize,
            })
        })
    }

    /// Terminates instances of `owner` (all must exist): their disks are dropped.
    pub fn terminate(&self, ids: &[String], owner: &str, now: i64) -> Result<Vec<ChunkDigest>> {
        self.write(|tx| {
            let mut dropped = Vec::new();
            for id in ids {
                let instance = get_instance(tx, id)?
                    .filter(|i| i.owner == owner)
                    .ok_or_else(|| RegionError::InstanceNotFound(id.clone()))?;
                if instance.state == InstanceState::Terminated {
                    continue;
                }
                dropped.extend(drop_instance_chunks(tx, &instance)?);
                add_usage(tx, owner, "live_instances", -1)?;
                tx.execute(
                    "UPDATE instances SET state = ?2, base_snapshot_id = NULL, terminated_at = ?3 \
                     WHERE instance_id = ?1",
                    params![id, InstanceState::Terminated, now],
                )?;
                if let Some(base) = instance.base_snapshot_id {
                    dropped.extend(snapshots::drop_snapshot_if_unused(tx, &base)?);
                }
                self.emitter().emit(
                    tx,
                    owner,
                    Usage::InstanceTerminated(billing::InstanceTerminated {
                        instance_id: id.clone(),
                    }),
                )?;
            }
            Ok(dropped)
        })
    }

    /// Deletes the rows of instances terminated before `before` (unix seconds), at most
    /// `batch` of them; returns how many went.
    pub fn purge_terminated(&self, before: i64, batch: usize) -> Result<usize> {
        self.write(|tx| {
            let mut removed: std::collections::HashMap<String, i64> = Default::default();
            {
                let mut stmt = tx.prepare_cached(
                    "DELETE FROM instances WHERE instance_id IN (SELECT instance_id FROM instances \
                     WHERE state = ?1 AND terminated_at < ?2 LIMIT ?3) RETURNING owner",
                )?;
                let rows = stmt.query_map(
                    params![InstanceState::Terminated, before, batch as i64],
                    |r| r.get::<_, String>(0),
                )?;
                for owner in rows {
                    *removed.entry(owner?).or_default() += 1;
                }
            }
            let purged = removed.values().sum::<i64>() as usize;
            for (owner, n) in removed {
                count_instances(tx, &owner, -n)?;
            }
            Ok(purged)
        })
    }

    /// Replaces an instance's system disk with `image`'s content.
    pub fn reset(
        &self,
        instance_id: &str,
        owner: &str,
        image: &ImageRow,
    ) -> Result<Vec<ChunkDigest>> {
        self.write(|tx| {
            let instance = live_instance(tx, instance_id, owner)?;
            let current = super::images::get_image(tx, &image.image_id)?
                .filter(|i| i.state == ImageState::Normal)
                .ok_or_else(|| RegionError::ImageNotFound(image.image_id.clone()))?;
            if current.virtual_size > instance.disk_size {
                return Err(RegionError::invalid(
                    "image_id",
                    "InvalidParameterValue.ImageSizeLargerThanSystemDisk",
                    "the image is larger than the instance's system disk",
                ));
            }
            let mut dropped = drop_instance_chunks(tx, &instance)?;
            tx.execute(
                "UPDATE instances SET image_id = ?2, base_snapshot_id = ?3, root_image_id = ?4, root_paid = ?5, \
                 image_owner = ?6, lineage_chain = ?7, root_kind = ?8 WHERE instance_id = ?1",
                params![
                    instance_id,
                    current.image_id,
                    current.snapshot_id,
                    current.root_image_id,
                    current.root_paid,
                    current.owner,
                    current.chain,
                    current.root_kind
                ],
            )?;
            let emitter = self.emitter();
            emitter.emit(
                tx,
                owner,
                Usage::InstanceImageChanged(billing::InstanceImageChanged {
                    instance_id: instance_id.to_string(),
                    image: Some(emitter.charge(&current.chain, current.root_kind)),
                }),
            )?;
            if let Some(base) = instance
                .base_snapshot_id
                .filter(|b| Some(b) != current.snapshot_id.as_ref())
            {
                dropped.extend(snapshots::drop_snapshot_if_unused(tx, &base)?);
            }
            Ok(dropped)
        })
    }

    /// The chunk behind index `idx` of an instance's disk (`None`: zeros).
    pub fn instance_chunk(&self, instance: &InstanceRow, idx: u64) -> Result<Option<ChunkDigest>> {
        self.read(|c| {
            let own: Option<Option<Vec<u8>>> = c
                .prepare_cached(
                    "SELECT digest FROM instance_chunks WHERE instance_id = ?1 AND idx = ?2",
                )?
                .query_row(params![instance.instance_id, idx as i64], |r| r.get(0))
                .optional()?;
            if let Some(own) = own {
                return Ok(own.and_then(digest_of));
            }
            let Some(base) = &instance.base_snapshot_id else {
                return Ok(None);
            };
            Ok(c.prepare_cached(
                "SELECT digest FROM snapshot_chunks WHERE snapshot_id = ?1 AND idx = ?2",
            )?
            .query_row(params![base, idx as i64], |r| r.get::<_, Vec<u8>>(0))
            .optional()?
            .and_then(digest_of))
        })
    }

    /// Checks that `owner` may write the instance's disk now (before any byte is stored).
    pub fn writable_instance(&self, instance_id: &str, owner: &str) -> Result<InstanceRow> {
        self.read(|c| live_instance(c, instance_id, owner))
    }

    /// Records new content for chunks of an instance's disk (`None`: zeros); the chunks must
    /// be durable already. Refused whole if the owner's storage quota has no room for the
    /// chunks it adds. Returns the digests the instance itself no longer references.
    pub fn write_instance_chunks(
        &self,
        instance_id: &str,
        owner: &str,
        chunks: &[(u64, Option<ChunkDigest>)],
        limits: Limits<'_>,
    ) -> Result<Vec<ChunkDigest>> {
        self.write(|tx| {
            live_instance(tx, instance_id, owner)?;
            let mut added = 0i64;
            let mut dropped = Vec::new();
            let mut old_of = tx.prepare_cached(
                "SELECT digest FROM instance_chunks WHERE instance_id = ?1 AND idx = ?2",
            )?;
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO instance_chunks (instance_id, idx, digest) VALUES (?1, ?2, ?3)",
            )?;
            for (idx, digest) in chunks {
                let old: Option<Option<Vec<u8>>> = old_of
                    .query_row(params![instance_id, *idx as i64], |r| r.get(0))
                    .optional()?;
                if let Some(old) = old.flatten().and_then(digest_of) {
                    dropped.push(old);
                    added -= 1;
                }
                if digest.is_some() {
                    added += 1;
                }
                put.execute(params![
                    instance_id,
                    *idx as i64,
                    digest.as_ref().map(|d| d.0.to_vec())
                ])?;
            }
            drop((old_of, put));
            if added > 0 {
                let asked = super::chunk_bytes(added as usize);
                super::admission::check_storage(tx, owner, asked, limits)?;
            }
            count_written(tx, owner, added)?;
            Ok(dropped)
        })
    }
}

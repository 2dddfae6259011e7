//! The usage outbox: billable usage (instances started, reset to another image, terminated;
//! each account's snapshot bytes held) written as encoded `billing.v1.UsageEvent` rows in the
//! same transaction as the change it reports, and deleted only once the billing service has
//! them. The row's `seq` is the event's sequence number: increasing, never reused.

use super::Store;
use crate::error::Result;
use crate::model::{Chain, RootKind};
use imagefleet_proto::billing::v1 as billing;
use imagefleet_proto::billing::v1::usage_event::Usage;
use imagefleet_rpc::clock::Clock;
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::Notify;

/// Where events are dated and which region they name.
#[derive(Clone, Debug, Default)]
pub(super) struct Source {
    pub region: String,
    pub clock: Clock,
}

/// The outbox's shared state: its source, and who to wake when events are written.
#[derive(Default)]
pub(super) struct Outbox {
    pub source: RwLock<Source>,
    pub notify: Arc<Notify>,
    /// Set by a transaction that wrote events; the writer wakes the delivery once it commits.
    pub written: AtomicBool,
}

/// Writes events in one transaction.
pub(crate) struct Emitter<'a> {
    source: Source,
    outbox: &'a Outbox,
}

fn kind_of(usage: &Usage) -> &'static str {
    match usage {
        Usage::InstanceStarted(_) => "INSTANCE_STARTED",
        Usage::InstanceImageChanged(_) => "INSTANCE_IMAGE_CHANGED",
        Usage::InstanceTerminated(_) => "INSTANCE_TERMINATED",
        Usage::SnapshotBytesHeld(_) => "SNAPSHOT_BYTES_HELD",
    }
}

/// The owner's snapshot bytes in the region: the stored bytes of every snapshot of its images
/// (copies still arriving count once their chunks are in).
pub(super) fn snapshot_bytes(c: &Connection, owner: &str) -> rusqlite::Result<u64> {
    let bytes: i64 = c
        .prepare_cached(
            "SELECT COALESCE(SUM(s.stored_bytes), 0) FROM images i \
             JOIN snapshots s ON s.snapshot_id = i.snapshot_id WHERE i.owner = ?1",
        )?
        .query_row([owner], |r| r.get(0))?;
    Ok(bytes.max(0) as u64)
}

impl Emitter<'_> {
    /// What launching an image with `chain` costs, as billing is told.
    pub fn charge(&self, chain: &Chain, kind: RootKind) -> billing::ImageCharge {
        chain.charge(kind, &self.source.region)
    }

    /// Writes one event of `account` (none for public images: they belong to nobody).
    pub fn emit(&self, tx: &Transaction<'_>, account: &str, usage: Usage) -> rusqlite::Result<()> {
        if account.is_empty() {
            return Ok(());
        }
        let at = self.source.clock.now();
        tx.prepare_cached(
            "INSERT INTO usage_outbox (account_id, at, kind, event) VALUES (?1, ?2, ?3, x'')",
        )?
        .execute(params![account, at, kind_of(&usage)])?;
        let seq = tx.last_insert_rowid();
        let event = billing::UsageEvent {
            region: self.source.region.clone(),
            seq: seq as u64,
            at,
            account_id: account.to_string(),
            usage: Some(usage),
        };
        tx.prepare_cached("UPDATE usage_outbox SET event = ?2 WHERE seq = ?1")?
            .execute(params![seq, event.encode_to_vec()])?;
        self.outbox.written.store(true, Ordering::Release);
        Ok(())
    }

    /// Reports the owner's snapshot bytes if they changed since last reported.
    pub fn snapshot_bytes(&self, tx: &Transaction<'_>, owner: &str) -> rusqlite::Result<()> {
        if owner.is_empty() {
            return Ok(());
        }
        let now = snapshot_bytes(tx, owner)?;
        let before: Option<i64> = tx
            .prepare_cached("SELECT bytes FROM snapshot_bytes_held WHERE owner = ?1")?
            .query_row([owner], |r| r.get(0))
            .optional()?;
        if before.map(|b| b.max(0) as u64) == Some(now) || (before.is_none() && now == 0) {
            return Ok(());
        }
        tx.prepare_cached(
            "INSERT INTO snapshot_bytes_held (owner, bytes) VALUES (?1, ?2) \
             ON CONFLICT(owner) DO UPDATE SET bytes = excluded.bytes",
        )?
        .execute(params![owner, now as i64])?;
        self.emit(
            tx,
            owner,
            Usage::SnapshotBytesHeld(billing::SnapshotBytesHeld { bytes: now }),
        )
    }
}

/// One event waiting for delivery.
#[derive(Clone, Debug)]
pub struct PendingEvent {
    pub seq: u64,
    /// The encoded `billing.v1.UsageEvent`.
    pub event: Vec<u8>,
}

impl Store {
    /// Names the region events are of and the clock that dates them (the region sets them
    /// when it opens; a store on its own reports for region "" on the system clock).
    pub fn set_usage_source(&self, region: &str, clock: Clock) {
        *self
            .inner
            .outbox
            .source
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Source {
            region: region.to_string(),
            clock,
        };
    }

    pub(crate) fn emitter(&self) -> Emitter<'_> {
        Emitter {
            source: self
                .inner
                .outbox
                .source
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            outbox: &self.inner.outbox,
        }
    }

    /// Notified whenever a transaction that wrote events commits.
    pub fn usage_written(&self) -> Arc<Notify> {
        self.inner.outbox.notify.clone()
    }

    /// The first `limit` events waiting for delivery, oldest first.
    pub fn pending_usage(&self, limit: usize) -> Result<Vec<PendingEvent>> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT seq, event FROM usage_outbox ORDER BY seq LIMIT ?1")?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok(PendingEvent {
                    seq: r.get::<_, i64>(0)? as u64,
                    event: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Every event waiting for delivery, decoded, oldest first (for tests and tools).
    pub fn usage_outbox(&self) -> Result<Vec<billing::UsageEvent>> {
        Ok(self
            .pending_usage(usize::MAX >> 1)?
            .into_iter()
            .filter_map(|p| billing::UsageEvent::decode(p.event.as_slice()).ok())
            .collect())
    }

    /// Deletes delivered events: every one up to `seq`.
    pub fn delivered_usage(&self, seq: u64) -> Result<usize> {
        self.write(|tx| {
            Ok(tx
                .prepare_cached("DELETE FROM usage_outbox WHERE seq <= ?1")?
                .execute([seq as i64])?)
        })
    }

    /// The owner's snapshot bytes in the region (what billing is told it holds).
    pub fn snapshot_bytes(&self, owner: &str) -> Result<u64> {
        self.read(|c| Ok(snapshot_bytes(c, owner)?))
    }

    /// Reports every account's snapshot bytes that differ from what was last reported (at
    /// start-up: the first start after the migration reports what accounts already hold).
    pub fn reconcile_snapshot_bytes(&self) -> Result<()> {
        let owners: Vec<String> = self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT DISTINCT owner FROM images WHERE owner <> '' \
                 UNION SELECT owner FROM snapshot_bytes_held",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })?;
        for owner in owners {
            self.write(|tx| Ok(self.emitter().snapshot_bytes(tx, &owner)?))?;
        }
        Ok(())
    }
}

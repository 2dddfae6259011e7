//! The region's metadata store: images, snapshots (chunk manifests), instances with their
//! copy-on-write disk overrides, and copies, in SQLite (WAL, `synchronous=FULL`: a committed
//! transaction survives `kill -9` and power loss).
//!
//! Writes go through one connection in `IMMEDIATE` transactions; reads run on a small pool of
//! their own connections, so a reader never waits behind a writer or another account's reads.
//! The schema is versioned (`PRAGMA user_version`) and brought up to date by ordered
//! migrations when the store opens.
//!
//! Manifests list only non-zero chunks: a chunk index with no row reads as zeros. An instance
//! disk is its base snapshot plus its own rows in `instance_chunks`, where a NULL digest marks a
//! chunk the guest overwrote with zeros. A chunk is referenced while any row of
//! `snapshot_chunks`, `instance_chunks` or `sync_chunks` (a copy's manifest) names it; operations that drop rows
//! return the digests they dropped, so the caller can reclaim those no longer referenced.
//!
//! Billable changes (instances started, reset, terminated; an account's snapshot bytes) write
//! their usage events into `usage_outbox` in the same transaction (`outbox`), where they stay
//! until the billing service acknowledges them.

mod admission;
mod copies;
mod images;
mod imports;
mod instances;
mod outbox;
mod schema;
pub use schema::CURRENT_VERSION as SCHEMA_VERSION;
mod snapshots;

pub use admission::{Limits, NewContent, NewImage, Usage};
pub use copies::{CopyPin, CopySource};
pub use images::ImageChanges;
pub use imports::ImportRow;
pub use instances::{InstancePage, InstanceQuery};
pub use outbox::PendingEvent;

use crate::error::Result;
use imagefleet_chunkstore::ChunkDigest;
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The database file inside a region's directory.
pub const DB_FILE: &str = "metadata.db";

/// Idle read connections kept open.
pub(crate) const MAX_IDLE_READERS: usize = 8;

/// The metadata store. Cloning shares the connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The one writer. A std mutex: it is only taken on blocking threads, for one transaction.
    writer: Mutex<Connection>,
    /// Read connections not in use.
    readers: Mutex<Vec<Connection>>,
    /// The usage events' source and the delivery's wake-up.
    outbox: outbox::Outbox,
    /// Counts committed write transactions (`generation`).
    generation: AtomicU64,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

impl Store {
    /// Opens (creating) the store at `path` and migrates its schema to the current version.
    pub fn open(path: &Path) -> Result<Store> {
        let mut writer = Connection::open(path)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "FULL")?;
        imagefleet_rpc::fsutil::private_database(path).map_err(|e| {
            crate::error::RegionError::Task(format!("making the store owner-only: {e}"))
        })?;
        configure(&writer)?;
        schema::migrate(&mut writer)?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
                outbox: outbox::Outbox::default(),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// The schema version the store is at.
    pub fn schema_version(&self) -> Result<u32> {
        self.read(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
    }

    /// Runs `f` on a read connection of its own (WAL: it sees the last committed state and
    /// does not wait for writers).
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let idle = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = Connection::open_with_flags(
                    &self.inner.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                configure(&conn)?;
                conn
            }
        };
        let out = f(&conn);
        let mut readers = self.inner.readers.lock().unwrap_or_else(|e| e.into_inner());
        if readers.len() < MAX_IDLE_READERS {
            readers.push(conn);
        }
        out
    }

    /// How many write transactions have committed since the store opened. A value computed
    /// from reads made after `generation()` returned `g` is still current while it returns
    /// `g` (it moves before a writer's caller hears of its commit).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Runs `f` in one immediate transaction on the writer, committing if it returns `Ok`.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = match f(&tx) {
            Ok(out) => out,
            Err(e) => {
                // Rolled back: so were any events it wrote.
                self.inner
                    .outbox
                    .written
                    .store(false, std::sync::atomic::Ordering::Release);
                return Err(e);
            }
        };
        tx.commit()?;
        // Before the writer's caller hears of it: whoever asks after that reads anew.
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        drop(conn);
        if self
            .inner
            .outbox
            .written
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            self.inner.outbox.notify.notify_one();
        }
        Ok(out)
    }

    /// Runs `f` in a transaction that is always rolled back: a dry run of a write.
    pub(crate) fn rehearse<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx);
        tx.rollback()?;
        // Events the dry run wrote went with it.
        self.inner
            .outbox
            .written
            .store(false, std::sync::atomic::Ordering::Release);
        out
    }
}

fn digest_of(bytes: Vec<u8>) -> Option<ChunkDigest> {
    ChunkDigest::from_slice(&bytes)
}

fn chunk_bytes(count: usize) -> u64 {
    count as u64 * imagefleet_chunkstore::CHUNK_SIZE as u64
}

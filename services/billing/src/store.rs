//! The usage store: every event a region reported, once, in SQLite (`billing.db`).
//!
//! Opened like the catalog's store: WAL and `synchronous=FULL`, so an event a `ReportUsage`
//! call was told is stored survives `kill -9` and power loss. Events are keyed by their
//! fleet-wide id `(region, seq)`; storing one that is already there does nothing (`INSERT OR
//! IGNORE`), which makes delivery idempotent: a region may send a batch again until it is
//! acknowledged. An event is kept as its encoded `UsageEvent` message, beside the columns it
//! is looked up by (`account_id`, `at`).

use anyhow::Context;
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::convert;
use crate::usage::{EventId, UsageEvent};

/// The database file inside the data directory.
pub const DB_FILE: &str = "billing.db";

/// Schema migrations; `PRAGMA user_version` counts how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: usage events by id, looked up by account and time.
    "CREATE TABLE usage_events (
        region TEXT NOT NULL,
        seq INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        event BLOB NOT NULL,
        PRIMARY KEY (region, seq)
    ) WITHOUT ROWID;
    CREATE INDEX usage_events_by_account ON usage_events (account_id, at);",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An event's sequence number does not fit the store's signed 64-bit column (the API
    /// refuses such events before they get here).
    #[error("event {region}/{seq}: the sequence number is above {}", i64::MAX)]
    Seq { region: String, seq: u64 },
    #[error("billing database: {0}")]
    Database(#[from] rusqlite::Error),
}

/// What was read back: the events, and the stored rows that no longer decode (by id and why).
#[derive(Debug, Default)]
pub struct Loaded {
    pub events: Vec<UsageEvent>,
    pub unreadable: Vec<(EventId, String)>,
}

/// Opens (creating) the SQLite database `dir/file` of the service `what` as every global store
/// of the project keeps one: an owner-only directory and file, WAL, `synchronous=FULL` (a
/// committed transaction survives a crash), a 5 s busy timeout.
pub fn open_durable(dir: &Path, file: &str, what: &str) -> anyhow::Result<Connection> {
    imagefleet_rpc::fsutil::private_dir(dir)
        .with_context(|| format!("creating the {what} directory {}", dir.display()))?;
    let path = dir.join(file);
    let conn = Connection::open(&path)
        .with_context(|| format!("opening the {what} database {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(%mode, "sqlite did not switch to WAL");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    imagefleet_rpc::fsutil::private_database(&path)
        .with_context(|| format!("making {} owner-only", path.display()))?;
    Ok(conn)
}

/// The usage store: one SQLite connection behind a mutex.
pub struct EventStore {
    /// A std mutex: it is only taken on blocking threads (`spawn_blocking`) for one statement
    /// or transaction, never across an await.
    conn: Mutex<Connection>,
}

impl EventStore {
    /// Opens (creating) `dir/billing.db` and brings its schema up to date.
    pub fn open(dir: &Path) -> anyhow::Result<EventStore> {
        let mut conn = open_durable(dir, DB_FILE, "billing")?;
        migrate(&mut conn)?;
        Ok(EventStore {
            conn: Mutex::new(conn),
        })
    }

    /// Stores `events` in one transaction: all or none. Returns how many were new; an event
    /// whose id is already stored (or repeated in `events`) is left as it was.
    pub fn insert(&self, events: &[UsageEvent]) -> Result<u32, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut stored: u32 = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO usage_events (region, seq, account_id, at, event)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for event in events {
                let seq = i64::try_from(event.id.seq).map_err(|_| StoreError::Seq {
                    region: event.id.region.clone(),
                    seq: event.id.seq,
                })?;
                let bytes = convert::usage_event_to_proto(event).encode_to_vec();
                let changed = insert.execute(params![
                    event.id.region,
                    seq,
                    event.account,
                    event.at,
                    bytes
                ])?;
                if changed > 0 {
                    stored = stored.saturating_add(1);
                }
            }
        }
        tx.commit()?;
        Ok(stored)
    }

    /// Every event of `account` dated `to` or earlier, in `(at, region, seq)` order.
    pub fn events_of(&self, account: &str, to: i64) -> Result<Loaded, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut query = conn.prepare_cached(
            "SELECT region, seq, event FROM usage_events
             WHERE account_id = ?1 AND at <= ?2 ORDER BY at, region, seq",
        )?;
        let rows = query.query_map(params![account, to], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut loaded = Loaded::default();
        for row in rows {
            let (region, seq, bytes) = row?;
            let id = EventId {
                region,
                seq: u64::try_from(seq).unwrap_or(0),
            };
            let decoded = imagefleet_proto::billing::v1::UsageEvent::decode(bytes.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|message| {
                    convert::usage_event("event", &message).map_err(|s| s.message().to_string())
                });
            match decoded {
                Ok(event) if event.id == id && event.account == account => {
                    loaded.events.push(event)
                }
                Ok(_) => loaded
                    .unreadable
                    .push((id, "the stored event does not match its key".to_string())),
                Err(reason) => loaded
                    .unreadable
                    .push((id, format!("the stored event does not decode: {reason}"))),
            }
        }
        Ok(loaded)
    }

    /// How many events are stored (all accounts).
    pub fn count(&self) -> Result<u64, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let n: Option<i64> = conn
            .query_row("SELECT COUNT(*) FROM usage_events", [], |row| row.get(0))
            .optional()?;
        Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
    }
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        anyhow::bail!(
            "the billing database has schema version {applied}, newer than this build knows ({})",
            MIGRATIONS.len()
        );
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tracing::info!(version = i + 1, "billing schema migrated");
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{ImageCharge, RootKind, Usage};

    fn event(seq: u64, at: i64, account: &str) -> UsageEvent {
        UsageEvent {
            id: EventId {
                region: "ap-singapore".into(),
                seq,
            },
            at,
            account: account.into(),
            usage: Usage::InstanceStarted {
                instance_id: "ins-abcdefgh".into(),
                instance_type: "S5.LARGE8".into(),
                vcpu: 8,
                image: ImageCharge::root("img-windows1", RootKind::Windows),
            },
        }
    }

    #[test]
    fn stores_each_id_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = EventStore::open(dir.path()).unwrap();
        let a = "100000000001";
        let b = "100000000002";
        let batch = [event(1, 100, a), event(2, 200, a), event(3, 150, b)];
        assert_eq!(store.insert(&batch).unwrap(), 3);
        assert_eq!(store.insert(&batch).unwrap(), 0);
        // A repeat inside one batch counts once; a different event with a stored id is not
        // stored over the first.
        let mut changed = event(1, 999, a);
        changed.usage = Usage::SnapshotBytesHeld { bytes: 5 };
        assert_eq!(
            store
                .insert(&[event(4, 300, a), event(4, 300, a), changed])
                .unwrap(),
            1
        );
        assert_eq!(store.count().unwrap(), 4);
        drop(store);

        let store = EventStore::open(dir.path()).unwrap();
        let loaded = store.events_of(a, 250).unwrap();
        assert!(loaded.unreadable.is_empty());
        assert_eq!(loaded.events, [event(1, 100, a), event(2, 200, a)]);
        let all = store.events_of(a, i64::MAX).unwrap();
        assert_eq!(all.events.len(), 3);
        assert_eq!(store.events_of(b, 1000).unwrap().events, [event(3, 150, b)]);
        assert!(store
            .events_of("100000000003", 1000)
            .unwrap()
            .events
            .is_empty());
    }

    #[test]
    fn a_batch_is_stored_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = EventStore::open(dir.path()).unwrap();
        let a = "100000000001";
        let err = store
            .insert(&[event(1, 100, a), event(u64::MAX, 100, a)])
            .unwrap_err();
        assert!(matches!(err, StoreError::Seq { .. }));
        assert_eq!(store.count().unwrap(), 0);
    }
}

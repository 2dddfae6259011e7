//! The catalog's SQLite store: opening it (WAL, `synchronous=FULL`, so a write that returned
//! survives `kill -9` and power loss), the schema and its migrations, and the two ways the rest
//! of the crate touches it: a read on the connection, or a write in one immediate transaction.

use crate::error::CatalogError;
use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::path::Path;
use std::sync::Mutex;

/// The database file inside the data directory.
pub const DB_FILE: &str = "catalog.db";

/// Schema migrations; `PRAGMA user_version` counts how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: accounts, the region directory, the global image index.
    "CREATE TABLE accounts (
        account_id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        secret_id TEXT NOT NULL UNIQUE,
        secret_key TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE regions (
        region TEXT PRIMARY KEY NOT NULL,
        endpoint TEXT NOT NULL,
        public_endpoint TEXT NOT NULL DEFAULT '',
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE images (
        image_id TEXT NOT NULL,
        region TEXT NOT NULL,
        owner_account_id TEXT NOT NULL,
        image_type TEXT NOT NULL,
        image_name TEXT NOT NULL,
        platform TEXT NOT NULL,
        os_name TEXT NOT NULL,
        parent_image_id TEXT NOT NULL,
        parent_region TEXT NOT NULL,
        ultimate_source_image_id TEXT NOT NULL,
        ultimate_source_paid INTEGER NOT NULL,
        image_source TEXT NOT NULL,
        content_digest TEXT NOT NULL,
        PRIMARY KEY (image_id, region)
    );
    CREATE INDEX images_by_type ON images (image_type, image_id);",
];

/// One SQLite connection behind a mutex.
pub struct Store {
    /// A std mutex: it is only taken on blocking threads (`spawn_blocking`) for one short
    /// statement or transaction, never across an await.
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating) `dir/catalog.db` and brings its schema up to date.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        // The database holds account secret keys: owner-only, as every store opened so.
        let mut conn = imagefleet_billing::store::open_durable(dir, DB_FILE, "catalog")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Runs `f` on the connection (for reads).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn)
    }

    /// Runs `f` in one immediate transaction and commits it (durably) if `f` succeeds; on error
    /// nothing `f` did is kept.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        anyhow::bail!(
            "the catalog database has schema version {applied}, newer than this build knows ({})",
            MIGRATIONS.len()
        );
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tracing::info!(version = i + 1, "catalog schema migrated");
    }
    tx.commit()?;
    Ok(())
}

/// Runs a store call on a blocking thread (SQLite calls and their fsyncs must not stall the
/// async workers).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, tonic::Status> + Send + 'static,
) -> Result<T, tonic::Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(CatalogError::Task(e.to_string()).into()),
    }
}

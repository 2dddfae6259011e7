//! Accounts: creating them with fresh API credentials, importing them from an accounts file,
//! looking them up by id or by SecretId, and the verifier's key store backed by the catalog's
//! own database.

use crate::error::CatalogError;
use crate::ids;
use crate::store::blocking;
use crate::Catalog;
use imagefleet_proto::catalog::v1::Account;
use imagefleet_rpc::auth::{AccountKey, AccountKeys, BoxFuture, SERVICE_SECRET_ID_PREFIX};
use imagefleet_rpc::cluster::AccountEntry;
use imagefleet_rpc::time::{rfc3339, unix_now};
use rand::distr::{Alphanumeric, SampleString};
use rusqlite::{params, OptionalExtension, Row, Transaction};
use std::path::Path;
use std::sync::Arc;
use tonic::Status;

/// The first id the catalog hands out when the caller does not choose one.
pub const FIRST_ACCOUNT_ID: u64 = 100_000_000_001;
/// The largest 12-digit account id.
const LAST_ACCOUNT_ID: u64 = 999_999_999_999;
/// Account SecretIds: this prefix and 32 random alphanumerics.
const SECRET_ID_PREFIX: &str = "AKID";
const SECRET_ID_RANDOM_LEN: usize = 32;
const SECRET_KEY_LEN: usize = 40;
const MAX_NAME_CHARS: usize = 60;
const MAX_SECRET_CHARS: usize = 128;

const ACCOUNT_COLUMNS: &str = "account_id, name, secret_id, secret_key, created_at";

fn account_from_row(row: &Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        account_id: row.get(0)?,
        name: row.get(1)?,
        secret_id: row.get(2)?,
        secret_key: row.get(3)?,
        created_time: rfc3339(row.get(4)?),
    })
}

/// Random alphanumerics from the thread's CSPRNG.
fn random_alphanumeric(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

fn check_secret(field: &'static str, value: &str) -> Result<(), CatalogError> {
    if value.is_empty() || value.len() > MAX_SECRET_CHARS {
        return Err(CatalogError::invalid(
            field,
            "InvalidParameterValue",
            format!("must be 1 to {MAX_SECRET_CHARS} characters"),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CatalogError::invalid(
            field,
            "InvalidParameterValue",
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

fn next_free_account_id(tx: &Transaction<'_>) -> Result<String, CatalogError> {
    let highest: Option<i64> = tx.query_row(
        "SELECT MAX(CAST(account_id AS INTEGER)) FROM accounts",
        [],
        |row| row.get(0),
    )?;
    let next = highest
        .and_then(|h| u64::try_from(h).ok())
        .map_or(FIRST_ACCOUNT_ID, |h| (h + 1).max(FIRST_ACCOUNT_ID));
    if next > LAST_ACCOUNT_ID {
        return Err(CatalogError::AccountIdsExhausted);
    }
    Ok(format!("{next:012}"))
}

fn account_exists(tx: &Transaction<'_>, account_id: &str) -> Result<bool, CatalogError> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM accounts WHERE account_id = ?1",
            [account_id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

impl Catalog {
    /// Creates an account with fresh credentials: `account_id` if given (it must be 12 digits
    /// and free), else the next free id from 100000000001 on.
    pub fn create_account(&self, account_id: Option<&str>, name: &str) -> Result<Account, Status> {
        self.insert_new_account(account_id.filter(|id| !id.is_empty()), name)
            .map_err(Status::from)
    }

    fn insert_new_account(
        &self,
        account_id: Option<&str>,
        name: &str,
    ) -> Result<Account, CatalogError> {
        if let Some(id) = account_id {
            ids::check_account_id("account_id", id)?;
        }
        ids::check_text("name", name, MAX_NAME_CHARS)?;
        let secret_id = format!(
            "{SECRET_ID_PREFIX}{}",
            random_alphanumeric(SECRET_ID_RANDOM_LEN)
        );
        let secret_key = random_alphanumeric(SECRET_KEY_LEN);
        let created_at = unix_now();
        let account_id = self.store.write(|tx| {
            let account_id = match account_id {
                Some(id) if account_exists(tx, id)? => {
                    return Err(CatalogError::AccountAlreadyExists(id.to_string()))
                }
                Some(id) => id.to_string(),
                None => next_free_account_id(tx)?,
            };
            tx.execute(
                "INSERT INTO accounts (account_id, name, secret_id, secret_key, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![account_id, name, secret_id, secret_key, created_at],
            )?;
            Ok(account_id)
        })?;
        tracing::info!(account = %account_id, "account created");
        Ok(Account {
            account_id,
            name: name.to_string(),
            secret_id,
            secret_key,
            created_time: rfc3339(created_at),
        })
    }

    /// Every account, with its keys, oldest first.
    pub fn accounts(&self) -> Result<Vec<Account>, Status> {
        self.store
            .read(|conn| {
                let mut stmt = conn.prepare(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, rowid"
                ))?;
                let rows = stmt.query_map([], account_from_row)?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .map_err(Status::from)
    }

    /// One account, without its secret key (`InvalidAccountId.NotFound` if there is none).
    pub fn account(&self, account_id: &str) -> Result<Account, Status> {
        ids::check_account_id("account_id", account_id)?;
        let account = self.store.read(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?1"),
                    [account_id],
                    account_from_row,
                )
                .optional()?)
        })?;
        match account {
            Some(account) => Ok(Account {
                secret_key: String::new(),
                ..account
            }),
            None => Err(CatalogError::AccountNotFound(account_id.to_string()).into()),
        }
    }

    /// The account and key behind a SecretId (`AuthFailure.SecretIdNotFound` if unknown).
    pub fn account_credential(&self, secret_id: &str) -> Result<AccountKey, Status> {
        check_secret("secret_id", secret_id)?;
        self.account_key(secret_id)?
            .ok_or_else(|| CatalogError::SecretIdNotFound.into())
    }

    fn account_key(&self, secret_id: &str) -> Result<Option<AccountKey>, CatalogError> {
        self.store.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT account_id, secret_key FROM accounts WHERE secret_id = ?1",
                    [secret_id],
                    |row| {
                        Ok(AccountKey {
                            account_id: row.get(0)?,
                            secret_key: row.get(1)?,
                        })
                    },
                )
                .optional()?)
        })
    }

    /// Imports the accounts of a JSON file (`[{"account_id", "name", "secret_id",
    /// "secret_key"}]`), keeping their credentials: new ones are added, existing ones updated.
    /// All or nothing. Returns how many accounts the file held.
    pub fn load_accounts_file(&self, path: &Path) -> anyhow::Result<usize> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading accounts file {}", path.display()))?;
        let entries: Vec<AccountEntry> = serde_json::from_str(&text)
            .with_context(|| format!("parsing accounts file {}", path.display()))?;
        for entry in &entries {
            check_entry(entry)
                .with_context(|| format!("account {:?} in {}", entry.account_id, path.display()))?;
        }
        let created_at = unix_now();
        self.store
            .write(|tx| {
                for entry in &entries {
                    upsert_entry(tx, entry, created_at)?;
                }
                Ok(())
            })
            .with_context(|| format!("importing accounts file {}", path.display()))?;
        tracing::info!(count = entries.len(), file = %path.display(), "accounts imported");
        Ok(entries.len())
    }

    /// The verifier's key store, backed by this catalog's own database.
    pub fn account_keys(self: &Arc<Self>) -> Arc<dyn AccountKeys> {
        Arc::new(CatalogKeys {
            catalog: self.clone(),
        })
    }
}

fn check_entry(entry: &AccountEntry) -> Result<(), CatalogError> {
    ids::check_account_id("account_id", &entry.account_id)?;
    ids::check_text("name", &entry.name, MAX_NAME_CHARS)?;
    check_secret("secret_id", &entry.secret_id)?;
    check_secret("secret_key", &entry.secret_key)?;
    if entry.secret_id.starts_with(SERVICE_SECRET_ID_PREFIX) {
        return Err(CatalogError::invalid(
            "secret_id",
            "InvalidParameterValue",
            format!("account SecretIds must not start with {SERVICE_SECRET_ID_PREFIX:?}"),
        ));
    }
    Ok(())
}

fn upsert_entry(
    tx: &Transaction<'_>,
    entry: &AccountEntry,
    created_at: i64,
) -> Result<(), CatalogError> {
    let owner: Option<String> = tx
        .query_row(
            "SELECT account_id FROM accounts WHERE secret_id = ?1",
            [&entry.secret_id],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(owner) = owner.filter(|owner| *owner != entry.account_id) {
        return Err(CatalogError::SecretIdTaken {
            secret_id: entry.secret_id.clone(),
            owner,
        });
    }
    tx.execute(
        "INSERT INTO accounts (account_id, name, secret_id, secret_key, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (account_id) DO UPDATE SET
            name = excluded.name, secret_id = excluded.secret_id, secret_key = excluded.secret_key",
        params![
            entry.account_id,
            entry.name,
            entry.secret_id,
            entry.secret_key,
            created_at
        ],
    )?;
    Ok(())
}

/// Account keys read from the catalog's own database (the catalog's verifier cannot ask itself
/// over gRPC).
struct CatalogKeys {
    catalog: Arc<Catalog>,
}

impl AccountKeys for CatalogKeys {
    fn lookup<'a>(
        &'a self,
        secret_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<AccountKey>, Status>> {
        let catalog = self.catalog.clone();
        let secret_id = secret_id.to_string();
        Box::pin(blocking(move || {
            catalog.account_key(&secret_id).map_err(Status::from)
        }))
    }
}

//! The embedded fallback for the ownership maps, for the one-command quick start when no
//! redis-server is around: the maps live in memory and every change is first appended to a log
//! of JSON lines and fsynced, so an acknowledged change survives a crash. The log is replayed
//! at start and then rewritten compactly (one line per entry still in the maps).

use crate::rules::{MapsError, OwnershipBackend, ShareChange, ShareRefusal, MAX_SHARES};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The log file inside the backend's directory.
pub const LOG_FILE: &str = "sharing-maps.jsonl";

/// One change to the maps: a line of the log. One entry is applied as a whole, so a change to
/// several maps (removing an image with its shares) is atomic. Share operations will add their
/// own variants (and lines in `Maps::snapshot`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    SetOwner {
        image_id: String,
        owner: String,
    },
    RemoveImage {
        image_id: String,
    },
    Share {
        image_id: String,
        account: String,
        at: i64,
    },
    Cancel {
        image_id: String,
        account: String,
    },
    /// Several changes as one line: a torn write loses all of them, never some.
    Batch {
        changes: Vec<Change>,
    },
}

/// The maps themselves (the same shape as the Redis keys).
#[derive(Default)]
struct Maps {
    /// image id -> owner account id
    owners: HashMap<String, String>,
    /// image id -> (account id -> unix time shared)
    image_shares: HashMap<String, BTreeMap<String, i64>>,
    /// account id -> (image id -> unix time shared)
    account_shares: HashMap<String, BTreeMap<String, i64>>,
}

impl Maps {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::SetOwner { image_id, owner } => {
                self.owners.insert(image_id.clone(), owner.clone());
            }
            Change::Batch { changes } => changes.iter().for_each(|c| self.apply(c)),
            Change::Share {
                image_id,
                account,
                at,
            } => {
                self.image_shares
                    .entry(image_id.clone())
                    .or_default()
                    .insert(account.clone(), *at);
                self.account_shares
                    .entry(account.clone())
                    .or_default()
                    .insert(image_id.clone(), *at);
            }
            Change::Cancel { image_id, account } => {
                if let Some(accounts) = self.image_shares.get_mut(image_id) {
                    accounts.remove(account);
                    if accounts.is_empty() {
                        self.image_shares.remove(image_id);
                    }
                }
                if let Some(images) = self.account_shares.get_mut(account) {
                    images.remove(image_id);
                    if images.is_empty() {
                        self.account_shares.remove(account);
                    }
                }
            }
            Change::RemoveImage { image_id } => {
                self.owners.remove(image_id);
                for account in self
                    .image_shares
                    .remove(image_id)
                    .unwrap_or_default()
                    .keys()
                {
                    if let Some(images) = self.account_shares.get_mut(account) {
                        images.remove(image_id);
                        if images.is_empty() {
                            self.account_shares.remove(account);
                        }
                    }
                }
            }
        }
    }

    /// The changes that rebuild these maps from nothing, in a stable order.
    fn snapshot(&self) -> Vec<Change> {
        let mut owners: Vec<_> = self.owners.iter().collect();
        owners.sort();
        let mut changes: Vec<Change> = owners
            .into_iter()
            .map(|(image_id, owner)| Change::SetOwner {
                image_id: image_id.clone(),
                owner: owner.clone(),
            })
            .collect();
        let mut shares: Vec<_> = self.image_shares.iter().collect();
        shares.sort_by(|a, b| a.0.cmp(b.0));
        for (image_id, accounts) in shares {
            for (account, at) in accounts {
                changes.push(Change::Share {
                    image_id: image_id.clone(),
                    account: account.clone(),
                    at: *at,
                });
            }
        }
        changes
    }

    /// The changes a share modification makes, or why it is refused.
    fn plan(
        &self,
        image_id: &str,
        owner: &str,
        change: ShareChange,
        accounts: &[String],
        now: i64,
    ) -> Result<Vec<Change>, ShareRefusal> {
        if self.owners.get(image_id).map(String::as_str) != Some(owner) {
            return Err(ShareRefusal::NotOwner);
        }
        let current = self.image_shares.get(image_id);
        let has = |a: &String| current.is_some_and(|c| c.contains_key(a));
        match change {
            ShareChange::Share => {
                if let Some(a) = accounts.iter().find(|a| has(a)) {
                    return Err(ShareRefusal::AlreadyShared(a.clone()));
                }
                let count = current.map_or(0, BTreeMap::len);
                if count + accounts.len() > MAX_SHARES {
                    return Err(ShareRefusal::TooMany {
                        current: count,
                        adding: accounts.len(),
                    });
                }
                Ok(accounts
                    .iter()
                    .map(|a| Change::Share {
                        image_id: image_id.to_string(),
                        account: a.clone(),
                        at: now,
                    })
                    .collect())
            }
            ShareChange::Cancel => {
                if let Some(a) = accounts.iter().find(|a| !has(a)) {
                    return Err(ShareRefusal::NotShared(a.clone()));
                }
                Ok(accounts
                    .iter()
                    .map(|a| Change::Cancel {
                        image_id: image_id.to_string(),
                        account: a.clone(),
                    })
                    .collect())
            }
        }
    }
}

struct Log {
    file: File,
    /// Length of the log up to its last complete line; a failed append is cut back to it.
    len: u64,
}

pub struct EmbeddedMaps {
    /// A std mutex: held on a blocking thread for one append, fsync and in-memory update, so
    /// the order of the log is the order of the changes; never across an await.
    inner: Arc<Mutex<(Maps, Log)>>,
}

fn encode(changes: &[Change]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for change in changes {
        serde_json::to_writer(&mut out, change).map_err(std::io::Error::other)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Replays the log text. A torn last line (a crash in the middle of an append that was never
/// acknowledged) is dropped; a bad line anywhere else is corruption.
fn replay(text: &str) -> std::io::Result<Maps> {
    let mut maps = Maps::default();
    let (complete, torn) = text.split_at(text.rfind('\n').map_or(0, |end| end + 1));
    if !torn.is_empty() {
        tracing::warn!("dropping a torn last line of the sharing maps log");
    }
    for (number, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let change: Change = serde_json::from_str(line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("sharing maps log line {}: {e}", number + 1),
            )
        })?;
        maps.apply(&change);
    }
    Ok(maps)
}

impl EmbeddedMaps {
    /// Replays `dir/sharing-maps.jsonl` (if any), rewrites it compactly and opens it for
    /// appending.
    pub fn open(dir: &Path) -> std::io::Result<EmbeddedMaps> {
        imagefleet_rpc::fsutil::private_dir(dir)?;
        let path = dir.join(LOG_FILE);
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8(bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let maps = replay(&text)?;
        let compact = encode(&maps.snapshot())?;
        imagefleet_rpc::fsutil::write_durably(&path, &compact)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        tracing::info!(images = maps.owners.len(), "sharing maps log replayed");
        Ok(EmbeddedMaps {
            inner: Arc::new(Mutex::new((
                maps,
                Log {
                    file,
                    len: compact.len() as u64,
                },
            ))),
        })
    }

    /// Appends `change` to the log, fsyncs it, then applies it to the maps.
    /// Reads the maps as they are now.
    fn read<T>(&self, f: impl FnOnce(&Maps) -> T) -> T {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&guard.0)
    }

    async fn commit(&self, change: Change) -> Result<(), MapsError> {
        self.commit_planned(move |_| Ok::<_, ShareRefusal>(vec![change]))
            .await?
            .map_err(|r| MapsError::Task(format!("unexpected refusal {r:?}")))
    }

    /// Under the lock: `plan` decides the changes from the current maps (or refuses), then they
    /// are appended to the log as one write, fsynced, and applied. Atomic: all or none.
    async fn commit_planned<F>(&self, plan: F) -> Result<Result<(), ShareRefusal>, MapsError>
    where
        F: FnOnce(&Maps) -> Result<Vec<Change>, ShareRefusal> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
            let (maps, log) = &mut *guard;
            let changes = match plan(maps) {
                Ok(changes) => changes,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let change = Change::Batch { changes };
            let line = encode(std::slice::from_ref(&change))?;
            let written = log
                .file
                .write_all(&line)
                .and_then(|()| log.file.sync_data());
            if let Err(e) = written {
                // Cut a partly written line so that later appends stay readable.
                let _ = log.file.set_len(log.len);
                return Err(MapsError::Log(e));
            }
            log.len += line.len() as u64;
            maps.apply(&change);
            Ok(Ok(()))
        })
        .await
        .map_err(|e| MapsError::Task(e.to_string()))?
    }
}

#[tonic::async_trait]
impl OwnershipBackend for EmbeddedMaps {
    async fn set_owner(&self, image_id: &str, owner: &str) -> Result<(), MapsError> {
        self.commit(Change::SetOwner {
            image_id: image_id.to_string(),
            owner: owner.to_string(),
        })
        .await
    }

    async fn remove_image(&self, image_id: &str) -> Result<(), MapsError> {
        self.commit(Change::RemoveImage {
            image_id: image_id.to_string(),
        })
        .await
    }

    async fn owner(&self, image_id: &str) -> Result<Option<String>, MapsError> {
        Ok(self.read(|maps| maps.owners.get(image_id).cloned()))
    }

    async fn modify_shares(
        &self,
        image_id: &str,
        owner: &str,
        change: ShareChange,
        accounts: &[String],
        now: i64,
    ) -> Result<Result<(), ShareRefusal>, MapsError> {
        let (image_id, owner, accounts) =
            (image_id.to_string(), owner.to_string(), accounts.to_vec());
        self.commit_planned(move |maps| maps.plan(&image_id, &owner, change, &accounts, now))
            .await
    }

    async fn shares(&self, image_id: &str) -> Result<Vec<(String, i64)>, MapsError> {
        Ok(self.read(|maps| {
            maps.image_shares
                .get(image_id)
                .map(|m| m.iter().map(|(a, t)| (a.clone(), *t)).collect())
                .unwrap_or_default()
        }))
    }

    async fn is_shared(&self, image_id: &str, account: &str) -> Result<bool, MapsError> {
        Ok(self.read(|maps| {
            maps.image_shares
                .get(image_id)
                .is_some_and(|m| m.contains_key(account))
        }))
    }

    async fn shared_with(&self, account: &str) -> Result<Vec<String>, MapsError> {
        Ok(self.read(|maps| {
            maps.account_shares
                .get(account)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        }))
    }

    /// The log is local: it always answers.
    async fn ping(&self) -> Result<(), MapsError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_drops_a_torn_last_line_only() {
        let good = r#"{"op":"set_owner","image_id":"img-aaaaaaaa","owner":"100000000001"}"#;
        let maps = replay(&format!("{good}\n{{\"op\":\"set_ow")).unwrap();
        assert_eq!(
            maps.owners.get("img-aaaaaaaa").map(String::as_str),
            Some("100000000001")
        );
        assert!(replay(&format!("garbage\n{good}\n")).is_err());
    }

    #[test]
    fn remove_image_clears_shares_both_ways() {
        let mut maps = Maps::default();
        maps.apply(&Change::SetOwner {
            image_id: "img-aaaaaaaa".into(),
            owner: "100000000001".into(),
        });
        maps.image_shares.insert(
            "img-aaaaaaaa".into(),
            BTreeMap::from([("100000000002".to_string(), 1)]),
        );
        maps.account_shares.insert(
            "100000000002".into(),
            BTreeMap::from([("img-aaaaaaaa".to_string(), 1)]),
        );
        maps.apply(&Change::RemoveImage {
            image_id: "img-aaaaaaaa".into(),
        });
        assert!(maps.owners.is_empty());
        assert!(maps.image_shares.is_empty());
        assert!(maps.account_shares.is_empty());
    }
}

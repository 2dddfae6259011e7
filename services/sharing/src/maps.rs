//! The shared ownership maps, whichever backend holds them: image -> owner today, and the
//! layout for shares (image -> accounts it is shared with, with the time of sharing; account ->
//! images shared with it), whose multi-key updates are atomic in both backends.

use crate::embedded::EmbeddedMaps;
use crate::redis_maps::RedisMaps;
use crate::MapsBackend;
use imagefleet_proto::error;
use std::sync::Arc;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer in time")]
    Timeout,
    #[error("embedded maps log: {0}")]
    Log(#[from] std::io::Error),
    #[error("maps task failed: {0}")]
    Task(String),
}

/// The maps are a dependency the caller may retry against: every failure is `UNAVAILABLE`,
/// never `INTERNAL`, and never taken as "no owner".
impl From<MapsError> for Status {
    fn from(e: MapsError) -> Status {
        tracing::warn!(error = %e, "ownership maps unavailable");
        error::status(
            Code::Unavailable,
            "ServiceUnavailable",
            format!("the sharing maps are unavailable: {e}"),
        )
    }
}

/// Why a share change was refused (checked atomically with the change itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareRefusal {
    /// The map does not name the caller as the image's owner.
    NotOwner,
    /// SHARE for an account the image is already shared with.
    AlreadyShared(String),
    /// CANCEL for an account the image is not shared with.
    NotShared(String),
    /// The change would take the image past `MAX_SHARES` accounts.
    TooMany { current: usize, adding: usize },
}

/// The most accounts one image may be shared with.
pub const MAX_SHARES: usize = 500;

impl From<ShareRefusal> for Status {
    fn from(r: ShareRefusal) -> Status {
        match r {
            ShareRefusal::NotOwner => error::status(
                Code::PermissionDenied,
                "UnauthorizedOperation.ImageNotBelongToAccount",
                "the image does not belong to this account",
            ),
            ShareRefusal::AlreadyShared(account) => error::status(
                Code::AlreadyExists,
                "FailedOperation.AccountAlreadyExists",
                format!("the image is already shared with {account}"),
            ),
            ShareRefusal::NotShared(account) => error::status(
                Code::FailedPrecondition,
                "FailedOperation.AccountNotShared",
                format!("the image is not shared with {account}"),
            ),
            ShareRefusal::TooMany { current, adding } => error::status(
                Code::ResourceExhausted,
                "OverQuota",
                format!(
                    "an image can be shared with at most {MAX_SHARES} accounts ({current} now, {adding} more asked)"
                ),
            ),
        }
    }
}

/// A share change, for both backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareChange {
    Share,
    Cancel,
}

/// The maps, in Redis or in the embedded log. Cheap to clone.
#[derive(Clone)]
pub enum OwnershipMaps {
    Redis(Arc<RedisMaps>),
    Embedded(Arc<EmbeddedMaps>),
}

impl OwnershipMaps {
    /// Opens the backend. Redis is connected lazily (it may not be up yet); the embedded log is
    /// replayed now.
    pub async fn open(backend: &MapsBackend) -> anyhow::Result<OwnershipMaps> {
        match backend {
            MapsBackend::Redis { url } => Ok(OwnershipMaps::Redis(Arc::new(RedisMaps::new(url)?))),
            MapsBackend::Embedded { dir } => {
                tracing::warn!(
                    dir = %dir.display(),
                    "no redis: the sharing maps use the embedded fallback (for local use only)"
                );
                let dir = dir.clone();
                let maps = tokio::task::spawn_blocking(move || EmbeddedMaps::open(&dir)).await??;
                Ok(OwnershipMaps::Embedded(Arc::new(maps)))
            }
        }
    }

    /// Records `owner` as the owner of `image_id` (replacing any previous owner).
    pub async fn set_owner(&self, image_id: &str, owner: &str) -> Result<(), MapsError> {
        match self {
            OwnershipMaps::Redis(m) => m.set_owner(image_id, owner).await,
            OwnershipMaps::Embedded(m) => m.set_owner(image_id, owner).await,
        }
    }

    /// Forgets an image: its owner and every share of it, in one atomic step.
    pub async fn remove_image(&self, image_id: &str) -> Result<(), MapsError> {
        match self {
            OwnershipMaps::Redis(m) => m.remove_image(image_id).await,
            OwnershipMaps::Embedded(m) => m.remove_image(image_id).await,
        }
    }

    /// The owner of `image_id`, if it is in the map.
    pub async fn owner(&self, image_id: &str) -> Result<Option<String>, MapsError> {
        match self {
            OwnershipMaps::Redis(m) => m.owner(image_id).await,
            OwnershipMaps::Embedded(m) => Ok(m.owner(image_id)),
        }
    }

    /// Shares `image_id` with `accounts` (or cancels those shares) if `owner` owns it and
    /// every rule holds; all accounts or none.
    pub async fn modify_shares(
        &self,
        image_id: &str,
        owner: &str,
        change: ShareChange,
        accounts: &[String],
        now: i64,
    ) -> Result<Result<(), ShareRefusal>, MapsError> {
        match self {
            OwnershipMaps::Redis(m) => {
                m.modify_shares(image_id, owner, change, accounts, now)
                    .await
            }
            OwnershipMaps::Embedded(m) => {
                m.modify_shares(image_id, owner, change, accounts, now)
                    .await
            }
        }
    }

    /// The accounts an image is shared with, with the unix time of each share, oldest first.
    pub async fn shares(&self, image_id: &str) -> Result<Vec<(String, i64)>, MapsError> {
        let mut shares = match self {
            OwnershipMaps::Redis(m) => m.shares(image_id).await?,
            OwnershipMaps::Embedded(m) => m.shares(image_id),
        };
        shares.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        Ok(shares)
    }

    /// Whether `image_id` is shared with `account` now.
    pub async fn is_shared(&self, image_id: &str, account: &str) -> Result<bool, MapsError> {
        match self {
            OwnershipMaps::Redis(m) => m.is_shared(image_id, account).await,
            OwnershipMaps::Embedded(m) => Ok(m.is_shared(image_id, account)),
        }
    }

    /// The images shared with `account`.
    pub async fn shared_with(&self, account: &str) -> Result<Vec<String>, MapsError> {
        let mut images = match self {
            OwnershipMaps::Redis(m) => m.shared_with(account).await?,
            OwnershipMaps::Embedded(m) => m.shared_with(account),
        };
        images.sort();
        Ok(images)
    }

    /// Succeeds when the backend answers.
    pub async fn ping(&self) -> Result<(), MapsError> {
        match self {
            OwnershipMaps::Redis(m) => m.ping().await,
            OwnershipMaps::Embedded(_) => Ok(()),
        }
    }
}

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

    /// Succeeds when the backend answers.
    pub async fn ping(&self) -> Result<(), MapsError> {
        match self {
            OwnershipMaps::Redis(m) => m.ping().await,
            OwnershipMaps::Embedded(_) => Ok(()),
        }
    }
}

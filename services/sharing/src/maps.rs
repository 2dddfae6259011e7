//! The shared ownership maps, whichever backend holds them: image -> owner, image -> accounts
//! it is shared with (with the time of sharing), account -> images shared with it. The facade
//! opens the configured backend and gives its answers a stable order.

use crate::embedded::EmbeddedMaps;
use crate::redis_maps::RedisMaps;
pub use crate::rules::{MapsError, OwnershipBackend, ShareChange, ShareRefusal, MAX_SHARES};
use crate::MapsBackend;
use std::sync::Arc;

/// The maps, in whichever backend. Cheap to clone.
#[derive(Clone)]
pub struct OwnershipMaps {
    backend: Arc<dyn OwnershipBackend>,
}

impl OwnershipMaps {
    /// Opens the backend. Redis is connected lazily (it may not be up yet); the embedded log is
    /// replayed now.
    pub async fn open(backend: &MapsBackend) -> anyhow::Result<OwnershipMaps> {
        let backend: Arc<dyn OwnershipBackend> = match backend {
            MapsBackend::Redis {
                target,
                replica_acks,
            } => Arc::new(RedisMaps::new(target, *replica_acks)?),
            MapsBackend::Embedded { dir } => {
                tracing::warn!(
                    dir = %dir.display(),
                    "no redis: the sharing maps use the embedded fallback (for local use only)"
                );
                let dir = dir.clone();
                Arc::new(tokio::task::spawn_blocking(move || EmbeddedMaps::open(&dir)).await??)
            }
        };
        Ok(OwnershipMaps { backend })
    }

    /// Wraps a backend already open.
    pub fn new(backend: Arc<dyn OwnershipBackend>) -> OwnershipMaps {
        OwnershipMaps { backend }
    }

    pub async fn set_owner(&self, image_id: &str, owner: &str) -> Result<(), MapsError> {
        self.backend.set_owner(image_id, owner).await
    }

    pub async fn remove_image(&self, image_id: &str) -> Result<(), MapsError> {
        self.backend.remove_image(image_id).await
    }

    pub async fn owner(&self, image_id: &str) -> Result<Option<String>, MapsError> {
        self.backend.owner(image_id).await
    }

    pub async fn modify_shares(
        &self,
        image_id: &str,
        owner: &str,
        change: ShareChange,
        accounts: &[String],
        now: i64,
    ) -> Result<Result<(), ShareRefusal>, MapsError> {
        self.backend
            .modify_shares(image_id, owner, change, accounts, now)
            .await
    }

    /// The accounts an image is shared with, with the unix time of each share, oldest first.
    pub async fn shares(&self, image_id: &str) -> Result<Vec<(String, i64)>, MapsError> {
        let mut shares = self.backend.shares(image_id).await?;
        shares.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        Ok(shares)
    }

    pub async fn is_shared(&self, image_id: &str, account: &str) -> Result<bool, MapsError> {
        self.backend.is_shared(image_id, account).await
    }

    /// `is_shared` for many checks at once, in order.
    pub async fn are_shared(&self, checks: &[(&str, &str)]) -> Result<Vec<bool>, MapsError> {
        self.backend.are_shared(checks).await
    }

    /// The images shared with `account`, sorted.
    pub async fn shared_with(&self, account: &str) -> Result<Vec<String>, MapsError> {
        let mut images = self.backend.shared_with(account).await?;
        images.sort();
        Ok(images)
    }

    pub async fn ping(&self) -> Result<(), MapsError> {
        self.backend.ping().await
    }
}

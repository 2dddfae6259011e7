//! What every ownership-maps backend shares: the errors, the share rules' refusals and limits,
//! and the `OwnershipBackend` trait each backend implements. Backends depend on this module
//! only, never on the facade (`maps`) that holds them.

use imagefleet_proto::error;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer in time")]
    Timeout,
    #[error("redis did not copy the write to {wanted} replica(s) in time ({got} did): not acknowledged, it may or may not stay")]
    Unreplicated { wanted: usize, got: usize },
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

/// One place the ownership maps live (Redis, or the embedded log). Multi-key changes are
/// atomic in every backend; reads see every change acknowledged before them.
#[tonic::async_trait]
pub trait OwnershipBackend: Send + Sync {
    /// Records `owner` as the owner of `image_id` (replacing any previous owner).
    async fn set_owner(&self, image_id: &str, owner: &str) -> Result<(), MapsError>;
    /// Forgets an image: its owner and every share of it, in one atomic step.
    async fn remove_image(&self, image_id: &str) -> Result<(), MapsError>;
    /// The owner of `image_id`, if it is in the map.
    async fn owner(&self, image_id: &str) -> Result<Option<String>, MapsError>;
    /// Shares `image_id` with `accounts` (or cancels those shares) if `owner` owns it and
    /// every rule holds; all accounts or none.
    async fn modify_shares(
        &self,
        image_id: &str,
        owner: &str,
        change: ShareChange,
        accounts: &[String],
        now: i64,
    ) -> Result<Result<(), ShareRefusal>, MapsError>;
    /// The accounts an image is shared with, with the unix time of each share (any order).
    async fn shares(&self, image_id: &str) -> Result<Vec<(String, i64)>, MapsError>;
    /// Whether `image_id` is shared with `account` now.
    async fn is_shared(&self, image_id: &str, account: &str) -> Result<bool, MapsError>;
    /// `is_shared` for each `(image, account)`, in order; all read after the call was made.
    async fn are_shared(&self, checks: &[(&str, &str)]) -> Result<Vec<bool>, MapsError> {
        futures::future::try_join_all(checks.iter().map(|(i, a)| self.is_shared(i, a))).await
    }
    /// The images shared with `account` (any order).
    async fn shared_with(&self, account: &str) -> Result<Vec<String>, MapsError>;
    /// Succeeds when the backend answers.
    async fn ping(&self) -> Result<(), MapsError>;
}

//! The catalog's errors and their mapping to canonical gRPC statuses with the CVM-style reason.

use imagefleet_proto::error;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Bad input, naming the request field.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
        message: String,
    },
    #[error("account {0} already exists")]
    AccountAlreadyExists(String),
    #[error("account {0} does not exist")]
    AccountNotFound(String),
    #[error("unknown SecretId")]
    SecretIdNotFound,
    #[error("SecretId {secret_id} already belongs to account {owner}")]
    SecretIdTaken { secret_id: String, owner: String },
    #[error("image {0} is not in the index")]
    ImageNotFound(String),
    #[error("every account id is taken")]
    AccountIdsExhausted,
    /// The store failed (disk, corruption); the write, if any, did not happen.
    #[error("catalog database: {0}")]
    Database(#[from] rusqlite::Error),
    /// A blocking task running a store call did not finish (it panicked or was cancelled).
    #[error("catalog task failed: {0}")]
    Task(String),
}

impl CatalogError {
    pub fn invalid(field: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        CatalogError::Invalid {
            field,
            reason,
            message: message.into(),
        }
    }
}

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Status {
        let message = e.to_string();
        match e {
            CatalogError::Invalid {
                field,
                reason,
                message,
            } => error::invalid_argument(field, reason, message),
            CatalogError::AccountAlreadyExists(_) => error::status(
                Code::AlreadyExists,
                "FailedOperation.AccountAlreadyExists",
                message,
            ),
            CatalogError::AccountNotFound(_) => {
                error::status(Code::NotFound, "InvalidAccountId.NotFound", message)
            }
            CatalogError::SecretIdNotFound => {
                error::status(Code::NotFound, "AuthFailure.SecretIdNotFound", message)
            }
            CatalogError::SecretIdTaken { .. } => error::status(
                Code::AlreadyExists,
                "FailedOperation.SecretIdAlreadyExists",
                message,
            ),
            CatalogError::ImageNotFound(_) => {
                error::status(Code::NotFound, "InvalidImageId.NotFound", message)
            }
            CatalogError::AccountIdsExhausted => {
                error::status(Code::ResourceExhausted, "LimitExceeded.AccountId", message)
            }
            CatalogError::Database(ref db) => {
                tracing::error!(error = %db, "catalog database error");
                error::status(Code::Internal, "InternalError", message)
            }
            CatalogError::Task(_) => {
                tracing::error!(error = %message, "catalog task failed");
                error::status(Code::Internal, "InternalError", message)
            }
        }
    }
}

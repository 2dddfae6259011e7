//! The region's errors. The store, admission, the copy engine and the handlers return
//! `RegionError`; it becomes a gRPC status (with its CVM-style reason) in one place, here.

use crate::model::{ImageState, InstanceState};
use imagefleet_chunkstore::ChunkError;
use imagefleet_proto::error;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Bad input, naming the request field.
    #[error("{field}: {message}")]
    Invalid {
        field: String,
        reason: &'static str,
        message: String,
    },
    #[error("{0} does not exist")]
    ImageNotFound(String),
    #[error("{0} does not exist")]
    InstanceNotFound(String),
    #[error("{0} does not belong to this account")]
    NotYours(String),
    #[error("image {image_id} is {state}")]
    ImageState { image_id: String, state: ImageState },
    #[error("instance {instance_id} is {state}")]
    InstanceState {
        instance_id: String,
        state: InstanceState,
    },
    #[error("an image named {0:?} already exists in this region")]
    NameTaken(String),
    #[error("the custom image quota of {quota} in {region} is used up")]
    ImageQuota { quota: u32, region: String },
    #[error("{0} is shared with other accounts: cancel the shares first")]
    InShared(String),
    /// An operation the rules do not allow (`UnsupportedOperation.*`).
    #[error("{message}")]
    Unsupported {
        reason: &'static str,
        message: String,
    },
    /// The account is over its call rate in this region.
    #[error("{0}")]
    RequestLimit(String),
    /// The account holds as many streams, exports or copies as it may at once
    /// (`LimitExceeded.*`).
    #[error("{message}")]
    Limit {
        reason: &'static str,
        limit: u32,
        message: String,
    },
    /// A refusal of one copy of a `SyncImages` call, naming the image and destination.
    #[error("copy of {image_id} to {region}: {source}")]
    CopyRefused {
        image_id: String,
        region: String,
        #[source]
        source: Box<RegionError>,
    },
    /// The chunk backend failed.
    #[error("chunk store: {0}")]
    Chunks(#[from] ChunkError),
    /// The metadata store failed; the write, if any, did not happen.
    #[error("metadata store: {0}")]
    Database(#[from] rusqlite::Error),
    /// A blocking task did not finish (it panicked or was cancelled).
    #[error("region task failed: {0}")]
    Task(String),
    /// A status from elsewhere (a peer service, shared input checks), passed through.
    #[error("{}", .0.message())]
    Status(Status),
}

impl From<Status> for RegionError {
    fn from(status: Status) -> Self {
        RegionError::Status(status)
    }
}

impl RegionError {
    pub fn invalid(field: &str, reason: &'static str, message: impl Into<String>) -> Self {
        RegionError::Invalid {
            field: field.to_string(),
            reason,
            message: message.into(),
        }
    }

    pub fn unsupported(reason: &'static str, message: impl Into<String>) -> Self {
        RegionError::Unsupported {
            reason,
            message: message.into(),
        }
    }

    pub fn unsupported_limit(message: String) -> Self {
        RegionError::RequestLimit(message)
    }

    pub fn image_state(image: &crate::model::ImageRow) -> Self {
        RegionError::ImageState {
            image_id: image.image_id.clone(),
            state: image.state,
        }
    }

    /// Whether trying again later may succeed (a peer or the disk may come back).
    pub fn is_transient(&self) -> bool {
        match self {
            RegionError::Chunks(ChunkError::NoSpace(_) | ChunkError::Io(_)) => true,
            RegionError::Database(_) | RegionError::Task(_) => true,
            RegionError::Status(s) => matches!(
                s.code(),
                Code::Unavailable
                    | Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Internal
                    | Code::ResourceExhausted
                    | Code::Aborted
            ),
            RegionError::CopyRefused { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}

impl From<RegionError> for Status {
    fn from(e: RegionError) -> Status {
        let message = e.to_string();
        match e {
            RegionError::Invalid {
                field,
                reason,
                message,
            } => error::invalid_argument(&field, reason, message),
            RegionError::ImageNotFound(_) => {
                error::status(Code::NotFound, "InvalidImageId.NotFound", message)
            }
            RegionError::InstanceNotFound(_) => {
                error::status(Code::NotFound, "InvalidInstanceId.NotFound", message)
            }
            RegionError::NotYours(_) => error::status(
                Code::PermissionDenied,
                "UnauthorizedOperation.ImageNotBelongToAccount",
                message,
            ),
            RegionError::ImageState { .. } => error::status(
                Code::FailedPrecondition,
                "InvalidImageId.IncorrectState",
                message,
            ),
            RegionError::InstanceState { state, .. } => {
                let reason = if state == InstanceState::Terminated {
                    "UnsupportedOperation.InstanceStateTerminated"
                } else {
                    "InvalidInstanceState"
                };
                error::status(Code::FailedPrecondition, reason, message)
            }
            RegionError::NameTaken(_) => {
                error::status(Code::AlreadyExists, "InvalidImageName.Duplicate", message)
            }
            RegionError::ImageQuota { .. } => {
                error::status(Code::ResourceExhausted, "ImageQuotaLimitExceeded", message)
            }
            RegionError::RequestLimit(_) => {
                error::status(Code::ResourceExhausted, "RequestLimitExceeded", message)
            }
            RegionError::Limit { reason, limit, .. } => error::status_with_metadata(
                Code::ResourceExhausted,
                reason,
                message,
                [("limit".to_string(), limit.to_string())],
            ),
            RegionError::InShared(_) => {
                error::status(Code::FailedPrecondition, "InvalidImageId.InShared", message)
            }
            RegionError::Unsupported { reason, .. } => {
                error::status(Code::FailedPrecondition, reason, message)
            }
            RegionError::CopyRefused {
                image_id,
                region,
                source,
            } => {
                let inner = Status::from(*source);
                let mut extra = vec![
                    ("image_id".to_string(), image_id),
                    ("region".to_string(), region),
                ];
                for (key, value) in error::metadata(&inner) {
                    if key != "image_id" && key != "region" {
                        extra.push((key, value));
                    }
                }
                let reason = error::reason(&inner).unwrap_or_else(|| "FailedOperation".into());
                error::status_with_metadata(inner.code(), &reason, message, extra)
            }
            RegionError::Chunks(ChunkError::NoSpace(_)) => error::status(
                Code::ResourceExhausted,
                "ResourceInsufficient.DiskSpace",
                message,
            ),
            RegionError::Chunks(ChunkError::Io(_)) => {
                error::status(Code::Unavailable, "ServiceUnavailable.ChunkStore", message)
            }
            RegionError::Chunks(_) => {
                error::status(Code::Internal, "InternalError.ChunkStore", message)
            }
            RegionError::Database(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::DiskFull =>
            {
                error::status(
                    Code::ResourceExhausted,
                    "ResourceInsufficient.DiskSpace",
                    message,
                )
            }
            RegionError::Database(_) => {
                error::status(Code::Internal, "InternalError.Store", message)
            }
            RegionError::Task(_) => error::status(Code::Internal, "InternalError", message),
            RegionError::Status(status) => status,
        }
    }
}

pub type Result<T, E = RegionError> = std::result::Result<T, E>;

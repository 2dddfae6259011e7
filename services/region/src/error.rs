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
    #[error("the instance quota of {quota} in {region} is used up ({used} instances, {asked} more asked)")]
    InstanceQuota {
        quota: u32,
        used: u64,
        asked: u64,
        region: String,
    },
    #[error("the storage quota of {quota} bytes in {region} is used up ({used} bytes stored, {asked} more asked)")]
    StorageQuota {
        quota: u64,
        used: u64,
        asked: u64,
        region: String,
    },
    /// The region's filesystem is at (or past) its free-space reserve.
    #[error("the region is short of disk space: {free} bytes free, {reserve} kept in reserve, {needed} needed")]
    DiskSpace {
        free: u64,
        reserve: u64,
        needed: u64,
    },
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
            RegionError::DiskSpace { .. } => true,
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
            RegionError::InstanceQuota { .. } => error::status(
                Code::ResourceExhausted,
                "LimitExceeded.InstanceQuota",
                message,
            ),
            RegionError::StorageQuota { .. } => error::status(
                Code::ResourceExhausted,
                "LimitExceeded.StorageQuota",
                message,
            ),
            RegionError::DiskSpace { .. } => error::status(
                Code::ResourceExhausted,
                "ResourceInsufficient.DiskSpace",
                message,
            ),
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
            RegionError::Database(ref e) if is_disk_full(e) => error::status(
                Code::ResourceExhausted,
                "ResourceInsufficient.DiskSpace",
                message,
            ),
            RegionError::Database(_) => {
                error::status(Code::Internal, "InternalError.Store", message)
            }
            RegionError::Task(_) => error::status(Code::Internal, "InternalError", message),
            RegionError::Status(status) => status,
        }
    }
}

/// Whether SQLite failed for want of space: `SQLITE_FULL` (a write hit ENOSPC), or the
/// shared-memory index could not grow (`SQLITE_IOERR_SHMSIZE`, also ENOSPC underneath).
pub fn is_disk_full(e: &rusqlite::Error) -> bool {
    const SQLITE_IOERR_SHMSIZE: std::ffi::c_int = 10 | (19 << 8);
    match e {
        rusqlite::Error::SqliteFailure(f, _) => {
            f.code == rusqlite::ErrorCode::DiskFull || f.extended_code == SQLITE_IOERR_SHMSIZE
        }
        _ => false,
    }
}

pub type Result<T, E = RegionError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(code: std::ffi::c_int) -> RegionError {
        RegionError::Database(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some("database or disk is full".into()),
        ))
    }

    #[test]
    fn running_out_of_space_is_resource_exhausted_never_internal() {
        let shmsize = 10 | (19 << 8);
        for e in [
            RegionError::Chunks(ChunkError::NoSpace("No space left on device".into())),
            sqlite(rusqlite::ffi::SQLITE_FULL),
            sqlite(shmsize),
            RegionError::DiskSpace {
                free: 0,
                reserve: 1,
                needed: 1,
            },
        ] {
            assert!(e.is_transient(), "{e:?}");
            let status = Status::from(e);
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert_eq!(
                error::reason(&status).as_deref(),
                Some("ResourceInsufficient.DiskSpace")
            );
        }
        let status = Status::from(sqlite(rusqlite::ffi::SQLITE_CORRUPT));
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn quotas_have_their_reasons() {
        let status = Status::from(RegionError::InstanceQuota {
            quota: 2,
            used: 2,
            asked: 1,
            region: "ap-guangzhou".into(),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            error::reason(&status).as_deref(),
            Some("LimitExceeded.InstanceQuota")
        );
        let status = Status::from(RegionError::StorageQuota {
            quota: 2,
            used: 2,
            asked: 1,
            region: "ap-guangzhou".into(),
        });
        assert_eq!(
            error::reason(&status).as_deref(),
            Some("LimitExceeded.StorageQuota")
        );
    }
}

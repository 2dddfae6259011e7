//! Cross-region copies (`SyncImages`): a real transfer between two region services.
//!
//! - `request`: the source side of the call: checks every rule, pins the source snapshots, and
//!   has every destination admit its copies, all of them or none.
//! - `peer`: the region-to-region service: admitting copies (destination), serving manifests
//!   and chunks of pinned snapshots (source), cancelling and releasing.
//! - `engine`: the destination's runner: pulls the chunks it lacks, verifies and stores them
//!   durably, retries transient failures with backoff until the copy's deadline, and hands the
//!   complete image to the finish step.
//! - `links`: the emulated links of this region's connections to other regions (operators'
//!   `SetLinks`, `ListLinks`).

mod engine;
mod links;
pub(crate) mod peer;
pub(crate) mod request;

use crate::error::RegionError;

/// Chunks asked for in one `FetchChunks` call.
const FETCH_BATCH: usize = 32;
/// `FetchChunks` calls in flight per copy: overlaps the source's reads, the wire and the
/// destination's writes.
const FETCH_STREAMS: usize = 4;
/// Manifest entries per `ManifestPage`.
const MANIFEST_PAGE: usize = 4096;
/// Digests one `FetchChunks` call may ask for.
const MAX_FETCH_DIGESTS: usize = 1024;
pub const MAX_SYNC_IMAGES: usize = 10;
pub const MAX_SYNC_REGIONS: usize = 10;

/// Why a copy attempt stopped.
#[derive(Debug)]
enum CopyError {
    /// Worth another try until the deadline (peer unreachable or restarting, connection
    /// dropped, disk full).
    Retry(RegionError),
    /// Will never succeed; the image fails with this reason.
    Fail(String),
    /// The copy was cancelled (its image deleted).
    Cancelled,
}

impl From<RegionError> for CopyError {
    fn from(e: RegionError) -> Self {
        if e.is_transient() {
            CopyError::Retry(e)
        } else {
            CopyError::Fail(e.to_string())
        }
    }
}

impl From<tonic::Status> for CopyError {
    fn from(status: tonic::Status) -> Self {
        CopyError::from(RegionError::from(status))
    }
}

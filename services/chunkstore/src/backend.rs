//! The `ChunkBackend` trait: the seam between `ChunkStore` and where chunk bytes live.

use crate::error::ChunkError;
use crate::types::{ChunkDigest, Space};

/// Where chunks live. Backends store bytes under digests; hashing, zero elision and
/// verification belong to [`ChunkStore`](crate::ChunkStore).
///
/// Durability: a chunk handed to `put_batch` may be lost by a crash or power loss until a
/// later `sync` has returned `Ok`. Every backend must pass [`conformance::run_all`](crate::conformance::run_all).
pub trait ChunkBackend: Send + Sync + std::fmt::Debug {
    /// Stores each chunk (exactly `CHUNK_SIZE` bytes; digest already verified by the caller;
    /// a chunk of another length is refused with `Mismatch`). Chunks already present are
    /// skipped. Not durable until `sync` returns `Ok`. On error, some chunks of the batch may
    /// have been stored.
    fn put_batch(&self, chunks: &[(ChunkDigest, &[u8])]) -> Result<(), ChunkError>;

    /// Makes every chunk stored so far durable (survives power loss). Local disk: each chunk
    /// file is fsynced before its rename, and `sync` fsyncs the chunk directory.
    fn sync(&self) -> Result<(), ChunkError>;

    /// The chunk's bytes, unverified: `NotFound` if absent, `Corrupt` if short.
    fn get(&self, digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError>;

    fn contains(&self, digest: &ChunkDigest) -> Result<bool, ChunkError>;

    /// Deletes a chunk; no error if it is already gone.
    fn delete(&self, digest: &ChunkDigest) -> Result<(), ChunkError>;

    /// Deletes a chunk that this store's metadata no longer references. A backend that other
    /// writers may share (an object-store bucket several region replicas use) keeps a chunk
    /// stored or re-stored within its grace window, and returns `Ok(false)`; otherwise this is
    /// `delete`, and returns `Ok(true)`.
    fn reclaim(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        self.delete(digest).map(|()| true)
    }

    /// Every stored chunk (for reclaiming what metadata no longer references).
    fn list(&self) -> Result<Vec<ChunkDigest>, ChunkError>;

    /// Bytes held by chunks, and bytes still free for new ones.
    fn space(&self) -> Result<Space, ChunkError>;

    /// Short description for logs, e.g. "local:/path/chunks" or "memory".
    fn describe(&self) -> String;
}

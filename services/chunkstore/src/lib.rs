//! The chunk store: disk content as content-addressed chunks of `CHUNK_SIZE` bytes, named by
//! the sha256 of their bytes, kept by a pluggable backend.
//!
//! # The seam
//!
//! - [`ChunkStore`] is what the services use. It owns everything about chunk *content*:
//!   hashing, zero elision (all-zero chunks are never stored; `put` returns `None` and
//!   manifests leave them out), zero-padding a short tail chunk, and verifying bytes that
//!   arrive with a claimed digest (`put_verified`) or are read back (`get`).
//! - A [`ChunkBackend`] only stores bytes under digests: [`LocalDisk`] (a flat directory,
//!   `<dir>/<lowercase hex sha256>`, the format this crate always wrote), [`Memory`] (tests and
//!   in-process use; models capacity and crashes), and [`Recording`] (wraps another backend and
//!   records puts, syncs and deletes, for tests of ordering contracts), and [`ObjectStore`]
//!   (an S3-compatible bucket, `s3://bucket/prefix`, through the `object_store` crate).
//! - Every backend must pass [`conformance::run_all`].
//!
//! # Durability contract
//!
//! A chunk stored by `put`/`put_verified` may be lost by a crash or power loss until a later
//! [`ChunkStore::sync`] returns `Ok`. **Metadata may reference a chunk only after `sync`
//! returned Ok after it was stored.** A failed `sync` promises nothing: the caller must not
//! commit metadata that references the chunks. Bulk writers store many chunks, sync once,
//! then commit.
//!
//! Chunks are immutable; storing bytes that are already present writes nothing. Which chunks
//! are still referenced is the metadata store's business; `remove` deletes one and `list`
//! enumerates them for reclaiming the unreferenced.
//!
//! Errors are [`ChunkError`]s by kind: `NotFound`, `Corrupt` (stored bytes damaged),
//! `Mismatch` (bytes handed in do not match their digest), `NoSpace` (refuse the work),
//! `Io` (storage unavailable; retry later).

mod backend;
pub mod conformance;
mod error;
mod local;
mod memory;
mod object;
mod recording;
mod store;
mod types;

pub use backend::ChunkBackend;
pub use error::ChunkError;
pub use local::LocalDisk;
pub use memory::Memory;
pub use object::{ObjectStore, ObjectStoreConfig, DEFAULT_GRACE};
pub use recording::{Event, Recording};
pub use store::ChunkStore;
pub use types::{is_zero, ChunkDigest, Space, CHUNK_SIZE};

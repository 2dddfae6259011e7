//! `ChunkStore`: what the services use. Hashing, zero elision, padding and verification over
//! whichever `ChunkBackend` holds the bytes.

use crate::backend::ChunkBackend;
use crate::error::ChunkError;
use crate::local::LocalDisk;
use crate::memory::Memory;
use crate::types::{is_zero, ChunkDigest, Space, CHUNK_SIZE};
use std::path::PathBuf;
use std::sync::Arc;

/// Content-addressed chunks over a backend. Cheap to clone (shares the backend).
#[derive(Clone, Debug)]
pub struct ChunkStore {
    backend: Arc<dyn ChunkBackend>,
}

impl ChunkStore {
    pub fn new(backend: Arc<dyn ChunkBackend>) -> Self {
        ChunkStore { backend }
    }

    /// A store on local disk under `dir` (see [`LocalDisk::open`]).
    pub fn local(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        Ok(ChunkStore::new(Arc::new(LocalDisk::open(dir)?)))
    }

    /// A store as `spec` says: `s3://bucket/prefix[?grace=..&quota=..]` for an S3-compatible
    /// bucket (see [`ObjectStore`](crate::ObjectStore)), or `local` (or empty) for local disk
    /// under `local_dir`.
    pub fn open(spec: &str, local_dir: impl Into<PathBuf>) -> Result<Self, ChunkError> {
        match spec.trim() {
            "" | "local" => Ok(ChunkStore::local(local_dir)?),
            url if url.starts_with("s3://") => Ok(ChunkStore::new(Arc::new(
                crate::object::ObjectStore::open(url)?,
            ))),
            other => Err(ChunkError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("chunk store {other:?} is neither `local` nor an s3://bucket/prefix URL"),
            ))),
        }
    }

    /// A store in memory, unbounded.
    pub fn memory() -> Self {
        ChunkStore::new(Arc::new(Memory::new()))
    }

    pub fn backend(&self) -> &Arc<dyn ChunkBackend> {
        &self.backend
    }

    /// Hashes `data` (at most `CHUNK_SIZE` bytes, zero-padded to `CHUNK_SIZE`) and stores it.
    /// Returns `None` for an all-zero chunk, which is not stored. Durable only after `sync`.
    /// Longer input is refused with `Mismatch`.
    pub fn put(&self, data: &[u8]) -> Result<Option<ChunkDigest>, ChunkError> {
        if data.len() > CHUNK_SIZE {
            return Err(ChunkError::Mismatch(ChunkDigest::of(data)));
        }
        if is_zero(data) {
            return Ok(None);
        }
        let padded;
        let data = if data.len() < CHUNK_SIZE {
            let mut v = Vec::with_capacity(CHUNK_SIZE);
            v.extend_from_slice(data);
            v.resize(CHUNK_SIZE, 0);
            padded = v;
            &padded[..]
        } else {
            data
        };
        let digest = ChunkDigest::of(data);
        self.backend.put_batch(&[(digest, data)])?;
        Ok(Some(digest))
    }

    /// Stores chunks that arrived with claimed digests. Refuses the whole call, storing
    /// nothing, with `Mismatch` if any chunk is not `CHUNK_SIZE` long or does not hash to its
    /// digest. Durable only after `sync`.
    pub fn put_verified(&self, chunks: &[(ChunkDigest, &[u8])]) -> Result<(), ChunkError> {
        for (digest, data) in chunks {
            if data.len() != CHUNK_SIZE || ChunkDigest::of(data) != *digest {
                return Err(ChunkError::Mismatch(*digest));
            }
        }
        if chunks.is_empty() {
            return Ok(());
        }
        self.backend.put_batch(chunks)
    }

    /// Makes every chunk stored so far durable. Metadata may reference a chunk only after a
    /// `sync` that began after the chunk was stored has returned `Ok`.
    pub fn sync(&self) -> Result<(), ChunkError> {
        self.backend.sync()
    }

    /// Reads a chunk and verifies it: `NotFound` if absent, `Corrupt` if short or its bytes do
    /// not hash to `digest`.
    pub fn get(&self, digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError> {
        let data = self.get_unverified(digest)?;
        if ChunkDigest::of(&data) != *digest {
            return Err(ChunkError::Corrupt {
                digest: *digest,
                detail: format!("bytes hash to {}", ChunkDigest::of(&data).to_hex()),
            });
        }
        Ok(data)
    }

    /// Reads a chunk without hashing it, for a reader that verifies the digest itself (a
    /// region receiving a copy): `NotFound` if absent, `Corrupt` if not `CHUNK_SIZE` long.
    pub fn get_unverified(&self, digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError> {
        let data = self.backend.get(digest)?;
        if data.len() != CHUNK_SIZE {
            return Err(ChunkError::Corrupt {
                digest: *digest,
                detail: format!("{} bytes, not {CHUNK_SIZE}", data.len()),
            });
        }
        Ok(data)
    }

    pub fn contains(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        self.backend.contains(digest)
    }

    /// Deletes a chunk (no error if it is already gone).
    pub fn remove(&self, digest: &ChunkDigest) -> Result<(), ChunkError> {
        self.backend.delete(digest)
    }

    /// Deletes a chunk nothing references any more, unless the backend keeps it for its grace
    /// window (a bucket shared with other writers); returns whether it is gone.
    pub fn reclaim(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        self.backend.reclaim(digest)
    }

    /// Every stored chunk, in no particular order.
    pub fn list(&self) -> Result<Vec<ChunkDigest>, ChunkError> {
        self.backend.list()
    }

    pub fn space(&self) -> Result<Space, ChunkError> {
        self.backend.space()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_are_not_stored_and_data_round_trips() {
        let store = ChunkStore::memory();
        assert_eq!(store.put(&vec![0u8; CHUNK_SIZE]).unwrap(), None);
        assert_eq!(store.put(&[]).unwrap(), None);
        assert_eq!(store.put(&[0u8; 10]).unwrap(), None);
        assert!(store.list().unwrap().is_empty());
        let mut data = vec![0u8; CHUNK_SIZE];
        data[12345] = 7;
        let d = store.put(&data).unwrap().unwrap();
        assert_eq!(d, ChunkDigest::of(&data));
        store.sync().unwrap();
        assert_eq!(store.get(&d).unwrap(), data);
        assert_eq!(store.put(&data).unwrap(), Some(d));
        assert_eq!(store.list().unwrap(), vec![d]);
        assert_eq!(store.space().unwrap().used_bytes, CHUNK_SIZE as u64);
        store.remove(&d).unwrap();
        assert!(!store.contains(&d).unwrap());
        assert!(matches!(store.get(&d), Err(ChunkError::NotFound(x)) if x == d));
    }

    #[test]
    fn short_chunks_are_padded_and_long_ones_refused() {
        let store = ChunkStore::memory();
        let d = store.put(b"hello").unwrap().unwrap();
        let got = store.get(&d).unwrap();
        assert_eq!(got.len(), CHUNK_SIZE);
        assert_eq!(&got[..5], b"hello");
        assert!(is_zero(&got[5..]));
        let mut padded = b"hello".to_vec();
        padded.resize(CHUNK_SIZE, 0);
        assert_eq!(store.put(&padded).unwrap(), Some(d));
        assert!(matches!(
            store.put(&vec![1u8; CHUNK_SIZE + 1]),
            Err(ChunkError::Mismatch(_))
        ));
        assert_eq!(store.list().unwrap(), vec![d]);
    }

    #[test]
    fn put_verified_refuses_a_mismatched_batch_and_stores_none_of_it() {
        let store = ChunkStore::memory();
        let good = vec![1u8; CHUNK_SIZE];
        let good_d = ChunkDigest::of(&good);
        let other = vec![2u8; CHUNK_SIZE];
        let other_d = ChunkDigest::of(&other);

        // Bytes that hash to something else.
        let err = store
            .put_verified(&[(good_d, &good), (good_d, &other)])
            .unwrap_err();
        assert!(
            matches!(err, ChunkError::Mismatch(d) if d == good_d),
            "{err:?}"
        );
        // Right digest, wrong length.
        let short = &good[..CHUNK_SIZE - 1];
        let err = store
            .put_verified(&[(other_d, &other), (ChunkDigest::of(short), short)])
            .unwrap_err();
        assert!(matches!(err, ChunkError::Mismatch(_)), "{err:?}");
        assert!(store.list().unwrap().is_empty());

        store
            .put_verified(&[(good_d, &good), (other_d, &other)])
            .unwrap();
        store.put_verified(&[]).unwrap();
        store.sync().unwrap();
        assert_eq!(store.get(&good_d).unwrap(), good);
        assert_eq!(store.get(&other_d).unwrap(), other);
    }

    #[test]
    fn corrupt_backend_bytes_are_detected_by_get_only() {
        // A backend that hands back other bytes than it was given.
        let memory = Arc::new(Memory::new());
        let store = ChunkStore::new(memory.clone());
        let real = vec![3u8; CHUNK_SIZE];
        let fake = vec![4u8; CHUNK_SIZE];
        let d = ChunkDigest::of(&real);
        memory.put_batch(&[(d, &fake)]).unwrap();
        assert!(matches!(store.get(&d), Err(ChunkError::Corrupt { digest, .. }) if digest == d));
        assert_eq!(store.get_unverified(&d).unwrap(), fake);
    }

    #[test]
    fn clones_share_the_backend() {
        let store = ChunkStore::memory();
        let copy = store.clone();
        let d = store.put(b"x").unwrap().unwrap();
        assert!(copy.contains(&d).unwrap());
        assert_eq!(copy.backend().describe(), "memory");
    }
}

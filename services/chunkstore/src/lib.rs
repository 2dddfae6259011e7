//! The chunk store: disk content as content-addressed chunks of `CHUNK_SIZE` bytes on local
//! disk, named by the sha256 of their bytes.
//!
//! - All-zero chunks are never stored: manifests leave them out (`put` returns `None`).
//! - A chunk is written to a temporary file, fsynced, renamed into place and the directory
//!   fsynced before `put` returns, so a chunk that a caller was told about survives a crash.
//!   Bulk writers (`put_verified_batch`) fsync the directory once for a whole batch.
//! - Chunks are immutable; storing bytes that are already present writes nothing.
//! - Which chunks are still referenced is the metadata store's business; `remove` deletes one.

use sha2::{Digest as _, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Every chunk is exactly this long (a disk's tail chunk is zero-padded).
pub const CHUNK_SIZE: usize = 1 << 20;

/// The sha256 of a chunk's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkDigest(pub [u8; 32]);

impl ChunkDigest {
    pub fn of(data: &[u8]) -> Self {
        ChunkDigest(Sha256::digest(data).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(ChunkDigest)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        hex::decode(text).ok().and_then(|b| Self::from_slice(&b))
    }
}

impl std::fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

/// True if every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-fold word-sized steps; the compiler vectorises this well.
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    }) == 0
        && tail.iter().all(|&b| b == 0)
}

/// Chunks in one directory, one file each, named by the hex digest (`<dir>/<hex digest>`; a
/// flat directory lets a batch of new chunks be made durable with one directory fsync).
#[derive(Clone, Debug)]
pub struct ChunkStore {
    dir: PathBuf,
}

impl ChunkStore {
    /// Opens (creating) the store under `dir`, and clears temporary files a crash left behind.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(ChunkStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, digest: &ChunkDigest) -> PathBuf {
        self.dir.join(digest.to_hex())
    }

    pub fn contains(&self, digest: &ChunkDigest) -> bool {
        self.path(digest).exists()
    }

    /// Stores one chunk (at most `CHUNK_SIZE` bytes; shorter input is zero-padded) durably.
    /// Returns `None` for an all-zero chunk, which is not stored.
    pub fn put(&self, data: &[u8]) -> io::Result<Option<ChunkDigest>> {
        if data.len() > CHUNK_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "chunk longer than CHUNK_SIZE",
            ));
        }
        if is_zero(data) {
            return Ok(None);
        }
        let padded;
        let data = if data.len() < CHUNK_SIZE {
            let mut v = data.to_vec();
            v.resize(CHUNK_SIZE, 0);
            padded = v;
            &padded[..]
        } else {
            data
        };
        let digest = ChunkDigest::of(data);
        self.write_new(&digest, data)?;
        Ok(Some(digest))
    }

    /// Stores a chunk that arrived with its claimed digest, refusing bytes that do not match.
    pub fn put_verified(&self, digest: &ChunkDigest, data: &[u8]) -> io::Result<()> {
        self.put_verified_batch(digest, data)?;
        self.sync_batch()
    }

    /// Like `put_verified`, but the chunk is durable only after the next `sync_batch`: for
    /// writers that store many chunks and acknowledge them together.
    pub fn put_verified_batch(&self, digest: &ChunkDigest, data: &[u8]) -> io::Result<()> {
        if data.len() != CHUNK_SIZE || ChunkDigest::of(data) != *digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunk does not match its digest",
            ));
        }
        self.write_file(digest, data)
    }

    /// Makes every chunk stored since the last sync durable (their directory entries).
    pub fn sync_batch(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn write_new(&self, digest: &ChunkDigest, data: &[u8]) -> io::Result<()> {
        self.write_file(digest, data)?;
        self.sync_batch()
    }

    /// Writes and fsyncs the chunk's file under a temporary name, then renames it into place.
    fn write_file(&self, digest: &ChunkDigest, data: &[u8]) -> io::Result<()> {
        let path = self.path(digest);
        if path.exists() {
            return Ok(());
        }
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            digest.to_hex(),
            rand::random::<u64>()
        ));
        let result = write_durably(&tmp, data).and_then(|()| fs::rename(&tmp, &path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Reads a chunk; an error if it is missing, short, or its bytes do not match its name.
    pub fn get(&self, digest: &ChunkDigest) -> io::Result<Vec<u8>> {
        let data = self.get_unverified(digest)?;
        if ChunkDigest::of(&data) != *digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {} is corrupt", digest.to_hex()),
            ));
        }
        Ok(data)
    }

    /// Reads a chunk without hashing it, for a reader that verifies the digest itself (a
    /// region receiving a copy); an error if it is missing or short.
    pub fn get_unverified(&self, digest: &ChunkDigest) -> io::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(CHUNK_SIZE);
        File::open(self.path(digest))?.read_to_end(&mut data)?;
        if data.len() != CHUNK_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {} is truncated", digest.to_hex()),
            ));
        }
        Ok(data)
    }

    /// Deletes a chunk (no error if it is already gone).
    pub fn remove(&self, digest: &ChunkDigest) -> io::Result<()> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every chunk on disk.
    pub fn list(&self) -> io::Result<Vec<ChunkDigest>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            if let Some(d) = entry?.file_name().to_str().and_then(ChunkDigest::from_hex) {
                out.push(d);
            }
        }
        Ok(out)
    }
}

/// Writes `data` to a new file at `path` and fsyncs it. On Linux the data bypasses the page
/// cache (`O_DIRECT`, from a page-aligned copy): a chunk written once is rarely read back soon,
/// and skipping the cache halves the kernel's work per byte. Filesystems without `O_DIRECT`
/// (tmpfs) get an ordinary buffered write.
fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if data.len().is_multiple_of(4096) {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match direct {
            Ok(mut file) => {
                let mut buf = vec![0u8; data.len() + 4096];
                let start = buf.as_ptr().align_offset(4096);
                let aligned = &mut buf[start..start + data.len()];
                aligned.copy_from_slice(data);
                file.write_all(aligned)?;
                return file.sync_all();
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let mut file = File::create(path)?;
    file.write_all(data)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_are_not_stored_and_data_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        assert_eq!(store.put(&vec![0u8; CHUNK_SIZE]).unwrap(), None);
        assert!(store.list().unwrap().is_empty());
        let mut data = vec![0u8; CHUNK_SIZE];
        data[12345] = 7;
        let d = store.put(&data).unwrap().unwrap();
        assert_eq!(store.get(&d).unwrap(), data);
        assert_eq!(store.put(&data).unwrap(), Some(d));
        assert_eq!(store.list().unwrap(), vec![d]);
        store.remove(&d).unwrap();
        assert!(!store.contains(&d));
    }

    #[test]
    fn short_chunks_are_padded_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let d = store.put(b"hello").unwrap().unwrap();
        let got = store.get(&d).unwrap();
        assert_eq!(&got[..5], b"hello");
        assert!(is_zero(&got[5..]));
        std::fs::write(store.path(&d), b"tampered").unwrap();
        assert!(store.get(&d).is_err());
        assert!(store.put_verified(&d, &[1u8; CHUNK_SIZE]).is_err());
    }
}

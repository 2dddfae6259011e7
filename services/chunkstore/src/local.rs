//! `LocalDisk`: chunks as files in one flat directory named by their lowercase hex sha256
//! (`<dir>/<hex>`), each written to a `.tmp-*` file (O_DIRECT where the filesystem allows),
//! fsynced, then renamed into place; `sync` fsyncs the directory.

use crate::backend::ChunkBackend;
use crate::error::ChunkError;
use crate::types::{ChunkDigest, Space, CHUNK_SIZE};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Name prefix of files being written; whatever a crash leaves behind is removed by `open`.
const TMP_PREFIX: &str = ".tmp-";

/// Chunks in one directory, one file each (a flat directory lets a batch of new chunks be
/// made durable with one directory fsync). The format is the one this crate always wrote, so
/// existing stores open without conversion.
#[derive(Debug)]
pub struct LocalDisk {
    dir: PathBuf,
    /// Bytes held by chunk files. The lock also serialises "is the chunk there? rename it in /
    /// delete it", so concurrent puts of one chunk count it once.
    used_bytes: Mutex<u64>,
}

impl LocalDisk {
    /// Opens (creating) the store under `dir`, removes temporary files a crash left behind,
    /// and counts the chunks already there.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        let mut chunks = 0u64;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            } else if name.to_str().and_then(chunk_name).is_some() {
                chunks += 1;
            }
        }
        Ok(LocalDisk {
            dir,
            used_bytes: Mutex::new(chunks * CHUNK_SIZE as u64),
        })
    }

    /// The chunk directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, digest: &ChunkDigest) -> PathBuf {
        self.dir.join(digest.to_hex())
    }

    fn used(&self) -> MutexGuard<'_, u64> {
        // The counter is a plain number; a panic elsewhere cannot leave it half-updated.
        self.used_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes and fsyncs one chunk under a temporary name, then renames it into place.
    fn put_one(&self, digest: &ChunkDigest, data: &[u8]) -> Result<(), ChunkError> {
        if data.len() != CHUNK_SIZE {
            return Err(ChunkError::Mismatch(*digest));
        }
        let path = self.path(digest);
        if exists(&path)? {
            return Ok(());
        }
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{}-{}",
            digest.to_hex(),
            rand::random::<u64>()
        ));
        if let Err(e) = write_durably(&tmp, data) {
            let _ = fs::remove_file(&tmp);
            return Err(with_path(&tmp, e));
        }
        let renamed = {
            let mut used = self.used();
            match exists(&path) {
                // Another writer finished the same chunk meanwhile.
                Ok(true) => Ok(false),
                Ok(false) => match fs::rename(&tmp, &path) {
                    Ok(()) => {
                        *used += CHUNK_SIZE as u64;
                        Ok(true)
                    }
                    Err(e) => Err(with_path(&path, e)),
                },
                Err(e) => Err(e),
            }
        };
        if !matches!(renamed, Ok(true)) {
            let _ = fs::remove_file(&tmp);
        }
        renamed.map(|_| ())
    }
}

impl ChunkBackend for LocalDisk {
    fn put_batch(&self, chunks: &[(ChunkDigest, &[u8])]) -> Result<(), ChunkError> {
        for (digest, data) in chunks {
            self.put_one(digest, data)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), ChunkError> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| with_path(&self.dir, e))
    }

    fn get(&self, digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError> {
        let path = self.path(digest);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ChunkError::NotFound(*digest))
            }
            Err(e) => return Err(with_path(&path, e)),
        };
        let mut data = Vec::with_capacity(CHUNK_SIZE);
        file.take(CHUNK_SIZE as u64 + 1)
            .read_to_end(&mut data)
            .map_err(|e| with_path(&path, e))?;
        if data.len() != CHUNK_SIZE {
            let detail = if data.len() < CHUNK_SIZE {
                format!(
                    "{} holds {} bytes, not {CHUNK_SIZE}",
                    path.display(),
                    data.len()
                )
            } else {
                format!("{} is longer than {CHUNK_SIZE} bytes", path.display())
            };
            return Err(ChunkError::Corrupt {
                digest: *digest,
                detail,
            });
        }
        Ok(data)
    }

    fn contains(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        exists(&self.path(digest))
    }

    fn delete(&self, digest: &ChunkDigest) -> Result<(), ChunkError> {
        let path = self.path(digest);
        let mut used = self.used();
        match fs::remove_file(&path) {
            Ok(()) => {
                *used = used.saturating_sub(CHUNK_SIZE as u64);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(with_path(&path, e)),
        }
    }

    fn list(&self) -> Result<Vec<ChunkDigest>, ChunkError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| with_path(&self.dir, e))? {
            let entry = entry.map_err(|e| with_path(&self.dir, e))?;
            if let Some(d) = entry.file_name().to_str().and_then(chunk_name) {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn space(&self) -> Result<Space, ChunkError> {
        let free_bytes = free_bytes(&self.dir).map_err(|e| with_path(&self.dir, e))?;
        Ok(Space {
            used_bytes: *self.used(),
            free_bytes,
        })
    }

    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }
}

/// The digest a chunk file's name stands for: exactly a lowercase hex digest.
fn chunk_name(name: &str) -> Option<ChunkDigest> {
    ChunkDigest::from_hex(name).filter(|d| d.to_hex() == name)
}

fn exists(path: &Path) -> Result<bool, ChunkError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(with_path(path, e)),
    }
}

/// Converts an I/O error (ENOSPC and EDQUOT to `NoSpace`) and names the path in its message.
fn with_path(path: &Path, e: io::Error) -> ChunkError {
    match ChunkError::from(e) {
        ChunkError::NoSpace(msg) => ChunkError::NoSpace(format!("{}: {msg}", path.display())),
        ChunkError::Io(e) => {
            ChunkError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        }
        other => other,
    }
}

/// Bytes an unprivileged writer can still use on the filesystem holding `dir`.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `cpath` is a NUL-terminated path and `st` points to writable memory the size
    // of a `statvfs`, which the call fills in.
    let rc = unsafe { libc::statvfs(cpath.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 on some, u64 on Linux).
    #[allow(clippy::unnecessary_cast)]
    let (avail, frsize) = (st.f_bavail as u64, st.f_frsize as u64);
    Ok(avail.saturating_mul(frsize))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> io::Result<u64> {
    Ok(u64::MAX)
}

/// Writes `data` to a new file at `path` and fsyncs it. On Linux the data bypasses the page
/// cache (`O_DIRECT`, from a page-aligned copy in a buffer each writing thread keeps): a chunk
/// written once is rarely read back soon, and skipping the cache halves the kernel's work per
/// byte. Filesystems without `O_DIRECT` (tmpfs) get an ordinary buffered write.
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
                ALIGNED.with_borrow_mut(|buf| {
                    let aligned = aligned_copy(buf, data);
                    file.write_all(aligned)
                })?;
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

#[cfg(target_os = "linux")]
thread_local! {
    /// The page-aligned staging buffer of `O_DIRECT` writes, reused by each thread (a chunk's
    /// worth, kept while the thread lives) instead of a fresh zeroed allocation per chunk.
    static ALIGNED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `data` copied to a 4096-aligned slice of `buf`, which grows as needed.
#[cfg(target_os = "linux")]
fn aligned_copy<'a>(buf: &'a mut Vec<u8>, data: &[u8]) -> &'a [u8] {
    if buf.len() < data.len() + 4096 {
        buf.resize(data.len() + 4096, 0);
    }
    let start = buf.as_ptr().align_offset(4096);
    let aligned = &mut buf[start..start + data.len()];
    aligned.copy_from_slice(data);
    aligned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChunkStore;

    fn chunk(byte: u8) -> Vec<u8> {
        let mut data = vec![0u8; CHUNK_SIZE];
        data[0] = byte;
        data[CHUNK_SIZE - 1] = byte;
        data
    }

    #[test]
    fn reads_a_store_written_in_the_old_layout() {
        let dir = tempfile::tempdir().unwrap();
        let data = chunk(9);
        let d = ChunkDigest::of(&data);
        // What the previous code left on disk: `<dir>/<hex>`, plus a crash's leftover.
        fs::write(dir.path().join(d.to_hex()), &data).unwrap();
        fs::write(
            dir.path().join(format!(".tmp-{}-1", d.to_hex())),
            b"partial",
        )
        .unwrap();
        fs::write(dir.path().join("README"), b"not a chunk").unwrap();

        let disk = LocalDisk::open(dir.path()).unwrap();
        assert!(!dir.path().join(format!(".tmp-{}-1", d.to_hex())).exists());
        assert_eq!(disk.list().unwrap(), vec![d]);
        assert!(disk.contains(&d).unwrap());
        assert_eq!(disk.space().unwrap().used_bytes, CHUNK_SIZE as u64);
        let store = ChunkStore::new(std::sync::Arc::new(disk));
        assert_eq!(store.get(&d).unwrap(), data);
    }

    #[test]
    fn writes_the_same_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::local(dir.path()).unwrap();
        let data = chunk(3);
        let d = store.put(&data).unwrap().unwrap();
        store.sync().unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![d.to_hex()]);
        assert_eq!(fs::read(dir.path().join(d.to_hex())).unwrap(), data);
        assert_eq!(
            store.backend().describe(),
            format!("local:{}", dir.path().display())
        );
    }

    #[test]
    fn corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::local(dir.path()).unwrap();
        let a = store.put(&chunk(1)).unwrap().unwrap();
        let b = store.put(&chunk(2)).unwrap().unwrap();
        store.sync().unwrap();

        // Same length, other bytes: only hashing notices.
        fs::write(dir.path().join(a.to_hex()), chunk(7)).unwrap();
        assert!(matches!(
            store.get(&a),
            Err(ChunkError::Corrupt { digest, .. }) if digest == a
        ));
        assert_eq!(store.get_unverified(&a).unwrap(), chunk(7));

        // Short file: the backend itself notices.
        fs::write(dir.path().join(b.to_hex()), b"tampered").unwrap();
        assert!(matches!(
            store.get_unverified(&b),
            Err(ChunkError::Corrupt { digest, .. }) if digest == b
        ));
        assert!(matches!(store.get(&b), Err(ChunkError::Corrupt { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn enospc_maps_to_no_space_naming_the_path() {
        let err = with_path(
            Path::new("/chunks/x"),
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        match err {
            ChunkError::NoSpace(msg) => assert!(msg.starts_with("/chunks/x: "), "{msg}"),
            other => panic!("expected NoSpace, got {other:?}"),
        }
        let err = with_path(
            Path::new("/chunks/x"),
            io::Error::from_raw_os_error(libc::EIO),
        );
        assert!(matches!(err, ChunkError::Io(_)), "{err:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_staging_buffer_is_aligned_and_reused() {
        let mut buf = Vec::new();
        let data = chunk(5);
        let first = aligned_copy(&mut buf, &data).as_ptr() as usize;
        assert_eq!(first % 4096, 0);
        assert_eq!(aligned_copy(&mut buf, &data), &data[..]);
        let capacity = buf.capacity();
        let other = chunk(6);
        assert_eq!(aligned_copy(&mut buf, &other), &other[..]);
        assert_eq!(
            buf.capacity(),
            capacity,
            "no new allocation for a second chunk"
        );
    }

    #[test]
    fn space_reports_free_bytes_of_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let disk = LocalDisk::open(dir.path()).unwrap();
        let space = disk.space().unwrap();
        assert_eq!(space.used_bytes, 0);
        assert!(space.free_bytes > 0);
    }
}

//! The files of a data directory: durable small-file writes (temp file, fsync, rename, fsync
//! the directory, so a crash leaves either the old or the new content), owner-only modes for
//! everything that may hold a secret, and the lock that keeps two servers off one directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mode of every file a service writes: data directories hold account secret keys (the
/// catalog's database), the cluster's service key and `cluster.json`.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every data directory a service creates.
pub const DIR_MODE: u32 = 0o700;

/// Writes `bytes` to `path` durably, the file owner-only.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        // `mode` applies to new files only; a temp file left by a crash keeps its old mode.
        f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// fsyncs a directory, so that entries created or renamed in it survive a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (and missing parents) and makes it owner-only; an existing directory is
/// narrowed too, so data written by an older version is covered.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
}

/// Makes a SQLite database and its `-wal` and `-shm` files owner-only (those that exist).
pub fn private_database(path: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(FILE_MODE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Narrows the process umask so that every file created afterwards (by this process, SQLite,
/// or a child such as `redis-server`) is owner-only.
pub fn owner_only_umask() {
    // SAFETY: umask only swaps the process's file-mode mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// An exclusive lock on a data directory (`flock` on `<dir>/.lock`), held until dropped or the
/// process dies. The lock file names the holder's pid, for the message a second server gets.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{dir} is in use by another imagefleet process{holder}; stop it first, or use another data directory")]
    Busy { dir: String, holder: String },
    #[error("cannot lock {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

impl DirLock {
    /// The lock file inside a directory.
    pub const FILE: &'static str = ".lock";

    /// Locks `dir` (created owner-only if missing), waiting up to `patience` for a holder that
    /// is going away (a child of a killed server dies a moment after it).
    pub fn acquire(dir: &Path, patience: Duration) -> Result<DirLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.display().to_string(),
            source,
        };
        private_dir(dir).map_err(io)?;
        let path = dir.join(Self::FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(io)?;
        let deadline = Instant::now() + patience;
        loop {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            if Instant::now() >= deadline {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|pid| pid.trim().to_string())
                    .filter(|pid| !pid.is_empty())
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(LockError::Busy {
                    dir: dir.display().to_string(),
                    holder,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut lock = DirLock { file, path };
        lock.note_holder().map_err(io)?;
        Ok(lock)
    }

    fn note_holder(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        let mut file = &self.file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())
    }

    /// The lock's descriptor, for a child that must keep the directory locked as long as it
    /// lives (see `share_with_child`).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// For use in a child's `pre_exec`: keeps the lock descriptor `fd` open across `exec`, so the
/// child holds the directory's lock too (a `flock` belongs to the open file, which parent and
/// child then share) and no second server can take the directory while the child lives.
///
/// # Safety
/// Only async-signal-safe calls: meant for `pre_exec`.
pub unsafe fn share_with_child(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// For use in a child's `pre_exec`: the child gets `signal` when the process that started it
/// dies, however it dies (`kill -9` included). `parent` is the starter's pid, read before the
/// fork: if it already died, the child exits at once.
///
/// The signal follows the *thread* that forked the child, so children must be started from a
/// thread that lives as long as the server (the main thread or a runtime worker).
///
/// # Safety
/// Only async-signal-safe calls: meant for `pre_exec`.
pub unsafe fn die_with_parent(parent: u32, signal: libc::c_int) -> std::io::Result<()> {
    if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) == -1 {
        return Err(std::io::Error::last_os_error());
    }
    if libc::getppid() as u32 != parent {
        libc::_exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn durable_writes_are_owner_only_even_over_a_wider_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_durably(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn private_dir_narrows_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
    }

    #[test]
    fn a_locked_directory_refuses_a_second_holder_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let second = DirLock::acquire(dir.path(), Duration::from_millis(200)).unwrap_err();
        let message = second.to_string();
        assert!(message.contains("in use"), "{message}");
        assert!(
            message.contains(&std::process::id().to_string()),
            "names the holder: {message}"
        );
        drop(first);
        DirLock::acquire(dir.path(), Duration::ZERO).expect("free once released");
    }
}

//! `ChunkError`: what went wrong, by kind, so a caller can decide to retry, refuse for space,
//! or fail; and the mapping from `io::Error` that turns a full disk into `NoSpace`.

use crate::types::ChunkDigest;
use std::io;

/// What went wrong with a chunk operation.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The chunk is not stored.
    #[error("chunk {} is not stored", .0.to_hex())]
    NotFound(ChunkDigest),
    /// The stored chunk is damaged: short, or its bytes do not hash to its name.
    #[error("chunk {} is corrupt: {detail}", .digest.to_hex())]
    Corrupt { digest: ChunkDigest, detail: String },
    /// Bytes handed in do not hash to the claimed digest, or are the wrong length.
    #[error("chunk bytes do not match digest {} (or are not CHUNK_SIZE long)", .0.to_hex())]
    Mismatch(ChunkDigest),
    /// The backend is out of space (ENOSPC, EDQUOT, or past a memory backend's capacity).
    #[error("no space for chunks: {0}")]
    NoSpace(String),
    /// Anything else: the backend is unavailable.
    #[error("chunk storage unavailable: {0}")]
    Io(#[source] io::Error),
}

impl From<io::Error> for ChunkError {
    /// A full filesystem or exhausted quota becomes `NoSpace`; every other error is `Io`.
    fn from(e: io::Error) -> Self {
        if is_no_space(&e) {
            ChunkError::NoSpace(e.to_string())
        } else {
            ChunkError::Io(e)
        }
    }
}

fn is_no_space(e: &io::Error) -> bool {
    if matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) {
        return true;
    }
    #[cfg(unix)]
    if let Some(code) = e.raw_os_error() {
        return code == libc::ENOSPC || code == libc::EDQUOT;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn enospc_and_edquot_map_to_no_space() {
        for code in [libc::ENOSPC, libc::EDQUOT] {
            let err = ChunkError::from(io::Error::from_raw_os_error(code));
            assert!(matches!(err, ChunkError::NoSpace(_)), "{code}: {err:?}");
        }
    }

    #[test]
    fn storage_full_kind_maps_to_no_space_and_others_to_io() {
        let full = io::Error::new(io::ErrorKind::StorageFull, "full");
        assert!(matches!(ChunkError::from(full), ChunkError::NoSpace(_)));
        let denied = io::Error::new(io::ErrorKind::PermissionDenied, "no");
        match ChunkError::from(denied) {
            ChunkError::Io(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied),
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn messages_name_the_chunk() {
        let d = ChunkDigest([0xab; 32]);
        assert_eq!(
            ChunkError::NotFound(d).to_string(),
            format!("chunk {} is not stored", d.to_hex())
        );
    }
}

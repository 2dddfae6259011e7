//! Disk content over chunks: the manifest digest of an image, and reading and writing ranges of
//! an instance's copy-on-write system disk.

use crate::store::{InstanceRow, Store};
use imagefleet_chunkstore::{ChunkDigest, ChunkStore, CHUNK_SIZE};
use imagefleet_proto::error;
use sha2::{Digest, Sha256};
use tonic::{Code, Status};

/// The content digest of a disk: sha256 over a header, the virtual size and every non-zero
/// chunk's index and digest (`docs/storage.md`). Two disks have equal digests exactly when
/// their bytes are equal.
pub fn manifest_digest(virtual_size: u64, manifest: &[(u64, ChunkDigest)]) -> String {
    let mut h = Sha256::new();
    h.update(b"imagefleet-manifest-v1\n");
    h.update(virtual_size.to_le_bytes());
    for (idx, digest) in manifest {
        h.update(idx.to_le_bytes());
        h.update(digest.0);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

pub fn io_error(e: std::io::Error) -> Status {
    error::status(
        Code::Internal,
        "InternalError.ChunkStore",
        format!("chunk store: {e}"),
    )
}

/// Checks that `[offset, offset + len)` lies on the disk.
pub fn check_range(instance: &InstanceRow, offset: u64, len: u64) -> Result<(), Status> {
    match offset.checked_add(len) {
        Some(end) if end <= instance.disk_size => Ok(()),
        _ => Err(error::invalid_argument(
            "offset",
            "InvalidParameterValue.OutOfRange",
            format!(
                "range is beyond the end of the {}-byte disk",
                instance.disk_size
            ),
        )),
    }
}

/// Reads `len` bytes at `offset` of an instance's disk.
pub fn read(
    store: &Store,
    chunks: &ChunkStore,
    instance: &InstanceRow,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, Status> {
    check_range(instance, offset, len)?;
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let idx = pos / CHUNK_SIZE as u64;
        let within = (pos % CHUNK_SIZE as u64) as usize;
        let take = ((CHUNK_SIZE - within) as u64).min(end - pos) as usize;
        match store.instance_chunk(instance, idx)? {
            Some(d) => {
                let data = chunks.get(&d).map_err(io_error)?;
                out.extend_from_slice(&data[within..within + take]);
            }
            None => out.resize(out.len() + take, 0),
        }
        pos += take as u64;
    }
    Ok(out)
}

/// The new content of each chunk a write of `data` at `offset` touches (`None`: zeros). New
/// chunks are stored durably before this returns; the caller records them in the store.
pub fn prepare_write(
    store: &Store,
    chunks: &ChunkStore,
    instance: &InstanceRow,
    offset: u64,
    data: &[u8],
) -> Result<Vec<(u64, Option<ChunkDigest>)>, Status> {
    check_range(instance, offset, data.len() as u64)?;
    let mut out = Vec::new();
    let mut pos = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let idx = pos / CHUNK_SIZE as u64;
        let within = (pos % CHUNK_SIZE as u64) as usize;
        let take = (CHUNK_SIZE - within).min(rest.len());
        let digest = if take == CHUNK_SIZE {
            chunks.put(&rest[..take]).map_err(io_error)?
        } else {
            let mut buf = match store.instance_chunk(instance, idx)? {
                Some(d) => chunks.get(&d).map_err(io_error)?,
                None => vec![0u8; CHUNK_SIZE],
            };
            buf[within..within + take].copy_from_slice(&rest[..take]);
            chunks.put(&buf).map_err(io_error)?
        };
        out.push((idx, digest));
        pos += take as u64;
        rest = &rest[take..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_size_and_every_chunk() {
        let a = ChunkDigest([1; 32]);
        let b = ChunkDigest([2; 32]);
        let base = manifest_digest(10 << 20, &[(0, a), (3, b)]);
        assert_ne!(base, manifest_digest(11 << 20, &[(0, a), (3, b)]));
        assert_ne!(base, manifest_digest(10 << 20, &[(0, a), (4, b)]));
        assert_ne!(base, manifest_digest(10 << 20, &[(0, b), (3, a)]));
        assert_eq!(base, manifest_digest(10 << 20, &[(0, a), (3, b)]));
    }
}

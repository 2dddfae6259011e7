//! Disk content over chunks: the manifest digest of an image, and reading and writing ranges of
//! an instance's copy-on-write system disk.

use crate::error::{RegionError, Result};
use crate::meta::{Limits, Store};
use crate::model::InstanceRow;
use imagefleet_chunkstore::{ChunkDigest, ChunkStore, CHUNK_SIZE};
use sha2::{Digest, Sha256};

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

/// Bytes of chunks a write of `len` bytes at `offset` may store (every chunk it touches).
pub fn chunks_touched_bytes(offset: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let size = CHUNK_SIZE as u64;
    let first = offset / size;
    let last = offset.saturating_add(len - 1) / size;
    (last - first + 1).saturating_mul(size)
}

/// Checks that `[offset, offset + len)` lies on the disk.
pub fn check_range(instance: &InstanceRow, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= instance.disk_size => Ok(()),
        _ => Err(RegionError::invalid(
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
) -> Result<Vec<u8>> {
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
                let data = chunks.get(&d)?;
                out.extend_from_slice(&data[within..within + take]);
            }
            None => out.resize(out.len() + take, 0),
        }
        pos += take as u64;
    }
    Ok(out)
}

/// A write the store refused after its chunks were stored: the error, and the chunks the
/// write stored, which the caller reclaims so the chunk store is left as it was.
pub struct WriteRefused {
    pub error: RegionError,
    pub stored: Vec<ChunkDigest>,
}

/// Writes `data` at `offset` of an instance's disk, for `owner`: the new chunks are stored,
/// made durable, and only then recorded. The caller has checked that the instance is
/// writable (before any byte is stored) and holds the instance's lock and the chunk
/// references lock shared. Returns the digests the disk no longer references.
pub fn write(
    store: &Store,
    chunks: &ChunkStore,
    instance: &InstanceRow,
    owner: &str,
    offset: u64,
    data: &[u8],
    limits: Limits<'_>,
) -> std::result::Result<Vec<ChunkDigest>, WriteRefused> {
    let mut stored = Vec::new();
    let outcome = (|| {
        check_range(instance, offset, data.len() as u64)?;
        let mut updates = Vec::new();
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = pos / CHUNK_SIZE as u64;
            let within = (pos % CHUNK_SIZE as u64) as usize;
            let take = (CHUNK_SIZE - within).min(rest.len());
            let digest = if take == CHUNK_SIZE {
                chunks.put(&rest[..take])?
            } else {
                let mut buf = match store.instance_chunk(instance, idx)? {
                    Some(d) => chunks.get(&d)?,
                    None => vec![0u8; CHUNK_SIZE],
                };
                buf[within..within + take].copy_from_slice(&rest[..take]);
                chunks.put(&buf)?
            };
            stored.extend(digest);
            updates.push((idx, digest));
            pos += take as u64;
            rest = &rest[take..];
        }
        chunks.sync()?;
        store.write_instance_chunks(&instance.instance_id, owner, &updates, limits)
    })();
    outcome.map_err(|error| WriteRefused { error, stored })
}

/// A stream of messages made from chunks read off the async threads, one ahead of the reader;
/// it ends after `last` (if any), or at the first chunk that cannot be read.
pub type ChunkStream<T> = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = std::result::Result<T, tonic::Status>> + Send>,
>;

type ChunkRead =
    tokio::task::JoinHandle<std::result::Result<Vec<u8>, imagefleet_chunkstore::ChunkError>>;

/// Streams `items` (each with the chunk it needs) as messages made by `make` from the chunk's
/// bytes: the one way the region streams chunks out (exports, copies to other regions).
/// `verify`: hash every chunk read (a receiver that verifies itself passes false).
///
/// A chunk is read only when the reader has taken the message before the one read ahead:
/// each read is one short blocking task, and nothing waits on the reader but this stream
/// (which `fairness::Guarded` cuts off when its reader stalls).
pub fn stream_chunks<I, T>(
    chunks: ChunkStore,
    items: Vec<(I, ChunkDigest)>,
    verify: bool,
    make: impl Fn(I, Vec<u8>) -> T + Send + 'static,
    last: Option<T>,
) -> ChunkStream<T>
where
    I: Send + 'static,
    T: Send + 'static,
{
    let read = move |digest: ChunkDigest| -> ChunkRead {
        let chunks = chunks.clone();
        tokio::task::spawn_blocking(move || {
            if verify {
                chunks.get(&digest)
            } else {
                chunks.get_unverified(&digest)
            }
        })
    };
    let mut items = items.into_iter();
    // The read in flight (or done and not yet sent): the chunk read ahead.
    let ahead = items.next().map(|(item, digest)| (item, read(digest)));
    let state = (items, ahead, last, read, make);
    Box::pin(futures::stream::unfold(Some(state), |state| async move {
        let (mut items, ahead, mut last, read, make) = state?;
        let Some((item, reading)) = ahead else {
            return last.take().map(|last| (Ok(last), None));
        };
        let data = match reading.await {
            Ok(data) => data.map_err(|e| tonic::Status::from(RegionError::from(e))),
            Err(e) => Err(tonic::Status::from(RegionError::Task(e.to_string()))),
        };
        match data {
            Ok(data) => {
                let ahead = items.next().map(|(item, digest)| (item, read(digest)));
                let message = make(item, data);
                Some((Ok(message), Some((items, ahead, last, read, make))))
            }
            Err(status) => Some((Err(status), None)),
        }
    }))
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

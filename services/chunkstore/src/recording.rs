//! `Recording`: wraps a backend and records every put, sync and delete in order, so tests
//! can check ordering contracts (chunks synced before metadata references them).

use crate::backend::ChunkBackend;
use crate::error::ChunkError;
use crate::types::{ChunkDigest, Space};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

/// One call that changed what the backend holds or how durable it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A chunk was stored (recorded after the inner put succeeded).
    Put(ChunkDigest),
    /// A sync succeeded: every `Put` recorded before it is durable.
    Sync,
    /// A chunk was deleted (recorded after the inner delete succeeded).
    Delete(ChunkDigest),
}

/// A backend that records calls to the one it wraps.
///
/// A `Sync` event is exact: syncs exclude puts and deletes while they run, so every `Put`
/// recorded before a `Sync` completed before that sync started.
pub struct Recording<B> {
    inner: B,
    events: Mutex<Vec<Event>>,
    /// Puts and deletes hold it shared, syncs exclusively.
    gate: RwLock<()>,
    fail_sync: AtomicBool,
}

impl<B: ChunkBackend> Recording<B> {
    pub fn new(inner: B) -> Self {
        Recording {
            inner,
            events: Mutex::new(Vec::new()),
            gate: RwLock::new(()),
            fail_sync: AtomicBool::new(false),
        }
    }

    /// The wrapped backend (e.g. to `crash` a `Memory`).
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Every recorded event, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.log().clone()
    }

    /// Digests put but not yet followed by a successful sync (each once, in order of first
    /// put).
    pub fn pending(&self) -> Vec<ChunkDigest> {
        let log = self.log();
        let since_sync = log
            .iter()
            .rposition(|e| *e == Event::Sync)
            .map_or(0, |i| i + 1);
        let mut out: Vec<ChunkDigest> = Vec::new();
        for event in &log[since_sync..] {
            if let Event::Put(digest) = event {
                if !out.contains(digest) {
                    out.push(*digest);
                }
            }
        }
        out
    }

    /// While set, `sync` fails with `ChunkError::Io` (without calling the inner backend or
    /// recording anything).
    pub fn fail_sync(&self, fail: bool) {
        self.fail_sync.store(fail, Ordering::SeqCst);
    }

    fn log(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<B: ChunkBackend> std::fmt::Debug for Recording<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("inner", &self.inner)
            .field("events", &self.log().len())
            .field("fail_sync", &self.fail_sync.load(Ordering::SeqCst))
            .finish()
    }
}

impl<B: ChunkBackend> ChunkBackend for Recording<B> {
    fn put_batch(&self, chunks: &[(ChunkDigest, &[u8])]) -> Result<(), ChunkError> {
        let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        self.inner.put_batch(chunks)?;
        self.log()
            .extend(chunks.iter().map(|(digest, _)| Event::Put(*digest)));
        Ok(())
    }

    fn sync(&self) -> Result<(), ChunkError> {
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(ChunkError::Io(io::Error::other(
                "sync failed (injected by Recording::fail_sync)",
            )));
        }
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        self.inner.sync()?;
        self.log().push(Event::Sync);
        Ok(())
    }

    fn get(&self, digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError> {
        self.inner.get(digest)
    }

    fn contains(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        self.inner.contains(digest)
    }

    fn delete(&self, digest: &ChunkDigest) -> Result<(), ChunkError> {
        let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        self.inner.delete(digest)?;
        self.log().push(Event::Delete(*digest));
        Ok(())
    }

    fn list(&self) -> Result<Vec<ChunkDigest>, ChunkError> {
        self.inner.list()
    }

    fn space(&self) -> Result<Space, ChunkError> {
        self.inner.space()
    }

    fn describe(&self) -> String {
        format!("recording({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChunkStore, Memory, CHUNK_SIZE};
    use std::sync::Arc;

    #[test]
    fn records_puts_then_sync_in_order() {
        let recording = Arc::new(Recording::new(Memory::new()));
        let store = ChunkStore::new(recording.clone());
        let a = store.put(b"a").unwrap().unwrap();
        let b = store.put(b"b").unwrap().unwrap();
        assert_eq!(store.put(&[0u8; 100]).unwrap(), None);
        assert_eq!(recording.pending(), vec![a, b]);
        store.sync().unwrap();
        assert!(recording.pending().is_empty());
        store.remove(&a).unwrap();
        assert_eq!(
            recording.events(),
            vec![Event::Put(a), Event::Put(b), Event::Sync, Event::Delete(a)]
        );
    }

    #[test]
    fn fail_sync_fails_records_nothing_and_keeps_chunks_pending() {
        let recording = Recording::new(Memory::new());
        let data = vec![5u8; CHUNK_SIZE];
        let d = ChunkDigest::of(&data);
        recording.put_batch(&[(d, &data)]).unwrap();
        recording.fail_sync(true);
        assert!(matches!(recording.sync(), Err(ChunkError::Io(_))));
        assert_eq!(recording.events(), vec![Event::Put(d)]);
        assert_eq!(recording.pending(), vec![d]);
        // The inner backend never synced, so a crash loses the chunk.
        recording.inner().crash();
        assert!(!recording.contains(&d).unwrap());

        recording.put_batch(&[(d, &data)]).unwrap();
        recording.fail_sync(false);
        recording.sync().unwrap();
        assert!(recording.pending().is_empty());
        assert_eq!(
            recording.events(),
            vec![Event::Put(d), Event::Put(d), Event::Sync]
        );
        recording.inner().crash();
        assert!(recording.contains(&d).unwrap());
    }

    #[test]
    fn failed_put_records_nothing() {
        let recording = Recording::new(Memory::with_capacity(0));
        let data = vec![5u8; CHUNK_SIZE];
        let d = ChunkDigest::of(&data);
        assert!(matches!(
            recording.put_batch(&[(d, &data)]),
            Err(ChunkError::NoSpace(_))
        ));
        assert!(recording.events().is_empty());
    }
}

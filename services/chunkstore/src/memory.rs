//! `Memory`: chunks held in process memory, for tests and in-process use, with an optional
//! capacity and a model of durability (`crash` loses what was not synced).

use crate::backend::ChunkBackend;
use crate::error::ChunkError;
use crate::types::{ChunkDigest, Space, CHUNK_SIZE};
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Chunks in memory. Chunks put since the last `sync` are pending; `crash` drops them, as a
/// power loss would, so tests can check a durability contract.
pub struct Memory {
    capacity: Option<u64>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    chunks: HashMap<ChunkDigest, Vec<u8>>,
    /// Stored but not yet synced.
    pending: HashSet<ChunkDigest>,
}

impl State {
    fn used_bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_SIZE as u64
    }
}

impl Memory {
    /// An unbounded store.
    pub fn new() -> Self {
        Memory {
            capacity: None,
            state: Mutex::default(),
        }
    }

    /// A store that refuses (`NoSpace`) a batch that would take it past `bytes`.
    pub fn with_capacity(bytes: u64) -> Self {
        Memory {
            capacity: Some(bytes),
            state: Mutex::default(),
        }
    }

    /// Loses every chunk put since the last successful `sync`, as a power loss would.
    pub fn crash(&self) {
        let mut state = self.state();
        let State { chunks, pending } = &mut *state;
        for digest in pending.drain() {
            chunks.remove(&digest);
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update below leaves `State` consistent before anything that could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new()
    }
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("Memory")
            .field("capacity", &self.capacity)
            .field("chunks", &state.chunks.len())
            .field("pending", &state.pending.len())
            .finish()
    }
}

impl ChunkBackend for Memory {
    fn put_batch(&self, chunks: &[(ChunkDigest, &[u8])]) -> Result<(), ChunkError> {
        if let Some((digest, _)) = chunks.iter().find(|(_, data)| data.len() != CHUNK_SIZE) {
            return Err(ChunkError::Mismatch(*digest));
        }
        let mut state = self.state();
        if let Some(capacity) = self.capacity {
            let new: HashSet<&ChunkDigest> = chunks
                .iter()
                .map(|(digest, _)| digest)
                .filter(|digest| !state.chunks.contains_key(digest))
                .collect();
            let needed = new.len() as u64 * CHUNK_SIZE as u64;
            let used = state.used_bytes();
            if used.saturating_add(needed) > capacity {
                return Err(ChunkError::NoSpace(format!(
                    "memory backend holds {used} of {capacity} bytes; {} new chunks need {needed} more",
                    new.len()
                )));
            }
        }
        for (digest, data) in chunks {
            if !state.chunks.contains_key(digest) {
                state.chunks.insert(*digest, data.to_vec());
                state.pending.insert(*digest);
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), ChunkError> {
        self.state().pending.clear();
        Ok(())
    }

    fn get(&self, digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError> {
        self.state()
            .chunks
            .get(digest)
            .cloned()
            .ok_or(ChunkError::NotFound(*digest))
    }

    fn contains(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        Ok(self.state().chunks.contains_key(digest))
    }

    fn delete(&self, digest: &ChunkDigest) -> Result<(), ChunkError> {
        let mut state = self.state();
        state.chunks.remove(digest);
        state.pending.remove(digest);
        Ok(())
    }

    fn list(&self) -> Result<Vec<ChunkDigest>, ChunkError> {
        Ok(self.state().chunks.keys().copied().collect())
    }

    fn space(&self) -> Result<Space, ChunkError> {
        let used_bytes = self.state().used_bytes();
        let free_bytes = match self.capacity {
            Some(capacity) => capacity.saturating_sub(used_bytes),
            None => u64::MAX - used_bytes,
        };
        Ok(Space {
            used_bytes,
            free_bytes,
        })
    }

    fn describe(&self) -> String {
        match self.capacity {
            Some(capacity) => format!("memory (capacity {capacity} bytes)"),
            None => "memory".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(byte: u8) -> (ChunkDigest, Vec<u8>) {
        let data = vec![byte; CHUNK_SIZE];
        (ChunkDigest::of(&data), data)
    }

    #[test]
    fn crash_drops_exactly_the_unsynced_chunks() {
        let memory = Memory::new();
        let (a, a_data) = chunk(1);
        let (b, b_data) = chunk(2);
        let (c, c_data) = chunk(3);
        memory.put_batch(&[(a, &a_data)]).unwrap();
        memory.sync().unwrap();
        memory.put_batch(&[(b, &b_data), (c, &c_data)]).unwrap();
        // Re-putting a durable chunk does not make it pending again.
        memory.put_batch(&[(a, &a_data)]).unwrap();
        memory.crash();
        assert_eq!(memory.list().unwrap(), vec![a]);
        assert_eq!(memory.get(&a).unwrap(), a_data);
        assert!(matches!(memory.get(&b), Err(ChunkError::NotFound(d)) if d == b));

        // After a sync, a crash loses nothing.
        memory.put_batch(&[(b, &b_data)]).unwrap();
        memory.sync().unwrap();
        memory.crash();
        let mut listed = memory.list().unwrap();
        listed.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(listed, expected);
    }

    #[test]
    fn capacity_refuses_with_no_space_and_stores_nothing_of_the_batch() {
        let memory = Memory::with_capacity(2 * CHUNK_SIZE as u64);
        let (a, a_data) = chunk(1);
        let (b, b_data) = chunk(2);
        let (c, c_data) = chunk(3);
        memory.put_batch(&[(a, &a_data)]).unwrap();
        assert_eq!(
            memory.space().unwrap(),
            Space {
                used_bytes: CHUNK_SIZE as u64,
                free_bytes: CHUNK_SIZE as u64
            }
        );
        let err = memory.put_batch(&[(b, &b_data), (c, &c_data)]).unwrap_err();
        assert!(matches!(err, ChunkError::NoSpace(_)), "{err:?}");
        assert!(!memory.contains(&b).unwrap());
        // Chunks already present cost nothing; one more new chunk fits exactly.
        memory.put_batch(&[(a, &a_data), (b, &b_data)]).unwrap();
        assert_eq!(memory.space().unwrap().free_bytes, 0);
        assert!(matches!(
            memory.put_batch(&[(c, &c_data)]),
            Err(ChunkError::NoSpace(_))
        ));
        // Deleting frees room.
        memory.delete(&a).unwrap();
        memory.put_batch(&[(c, &c_data)]).unwrap();
    }

    #[test]
    fn debug_does_not_print_chunk_bytes() {
        let memory = Memory::new();
        let (a, a_data) = chunk(1);
        memory.put_batch(&[(a, &a_data)]).unwrap();
        let text = format!("{memory:?}");
        assert!(text.len() < 200, "{text}");
    }
}

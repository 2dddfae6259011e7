//! Every backend in this crate passes the conformance suite.

use imagefleet_chunkstore::{
    conformance, ChunkBackend, ChunkDigest, ChunkError, LocalDisk, Memory, Recording, Space,
};
use std::sync::Mutex;

#[test]
fn local_disk_conforms() {
    // One fresh temporary directory per check, removed when the test ends.
    let dirs = Mutex::new(Vec::new());
    conformance::run_all(&|| {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let disk = LocalDisk::open(dir.path().join("chunks")).expect("open LocalDisk");
        dirs.lock().expect("dirs lock").push(dir);
        Box::new(disk) as Box<dyn ChunkBackend>
    });
}

#[test]
fn memory_conforms() {
    conformance::run_all(&|| Box::new(Memory::new()));
}

#[test]
fn memory_with_capacity_conforms() {
    conformance::run_all(&|| Box::new(Memory::with_capacity(1 << 30)));
}

#[test]
fn recording_memory_conforms() {
    conformance::run_all(&|| Box::new(Recording::new(Memory::new())));
}

#[test]
fn recording_local_disk_conforms() {
    let dirs = Mutex::new(Vec::new());
    conformance::run_all(&|| {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let disk = LocalDisk::open(dir.path()).expect("open LocalDisk");
        dirs.lock().expect("dirs lock").push(dir);
        Box::new(Recording::new(disk)) as Box<dyn ChunkBackend>
    });
}

/// A faulty backend: deleting a missing chunk is an error. The suite must catch it.
#[derive(Debug, Default)]
struct StrictDelete(Memory);

impl ChunkBackend for StrictDelete {
    fn put_batch(&self, chunks: &[(ChunkDigest, &[u8])]) -> Result<(), ChunkError> {
        self.0.put_batch(chunks)
    }
    fn sync(&self) -> Result<(), ChunkError> {
        self.0.sync()
    }
    fn get(&self, digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError> {
        self.0.get(digest)
    }
    fn contains(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        self.0.contains(digest)
    }
    fn delete(&self, digest: &ChunkDigest) -> Result<(), ChunkError> {
        if !self.0.contains(digest)? {
            return Err(ChunkError::NotFound(*digest));
        }
        self.0.delete(digest)
    }
    fn list(&self) -> Result<Vec<ChunkDigest>, ChunkError> {
        self.0.list()
    }
    fn space(&self) -> Result<Space, ChunkError> {
        self.0.space()
    }
    fn describe(&self) -> String {
        "strict-delete".to_string()
    }
}

#[test]
#[should_panic(expected = "check `delete_missing_is_ok` failed on strict-delete")]
fn the_suite_catches_a_faulty_backend() {
    conformance::run_all(&|| Box::new(StrictDelete::default()));
}

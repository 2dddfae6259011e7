//! The conformance suite: the properties every `ChunkBackend` must have. Compiled always (not
//! only under `cfg(test)`) so crates with their own backends can run it. Each check panics
//! with a message naming the check, the backend and what went wrong.

use crate::backend::ChunkBackend;
use crate::error::ChunkError;
use crate::types::{ChunkDigest, CHUNK_SIZE};
use std::fmt::Display;

const CHUNK: u64 = CHUNK_SIZE as u64;

/// Runs every check, each on a fresh (empty) backend from `make`.
pub fn run_all(make: &dyn Fn() -> Box<dyn ChunkBackend>) {
    let checks: &[fn(&dyn ChunkBackend)] = &[
        sync_on_empty_is_ok,
        describe_is_not_empty,
        round_trip,
        put_is_idempotent,
        put_rejects_wrong_length,
        contains_and_delete,
        delete_missing_is_ok,
        put_after_delete,
        get_missing_is_not_found,
        list_enumerates_exactly,
        space_accounts_for_chunks,
        batch_of_many,
        concurrent_puts_of_same_chunk,
    ];
    for check in checks {
        let backend = make();
        check(&*backend);
    }
}

/// A fresh backend holds nothing, and syncing it (twice) succeeds.
pub fn sync_on_empty_is_ok(backend: &dyn ChunkBackend) {
    let c = Check::new("sync_on_empty_is_ok", backend);
    c.expect_eq("list of a fresh backend", c.list(), vec![]);
    c.expect_eq("used_bytes of a fresh backend", c.used(), 0);
    c.ok("sync", backend.sync());
    c.ok("second sync", backend.sync());
}

/// `describe` says something.
pub fn describe_is_not_empty(backend: &dyn ChunkBackend) {
    let c = Check::new("describe_is_not_empty", backend);
    c.expect(!backend.describe().trim().is_empty(), "describe() is empty");
}

/// Chunks put in one batch read back byte for byte, before and after `sync`.
pub fn round_trip(backend: &dyn ChunkBackend) {
    let c = Check::new("round_trip", backend);
    let (a, a_data) = sample_chunk(1);
    let (b, b_data) = sample_chunk(2);
    c.ok(
        "put_batch",
        backend.put_batch(&[(a, &a_data), (b, &b_data)]),
    );
    c.expect(
        c.contains(&a),
        format!("contains({a:?}) is false after put"),
    );
    c.expect(c.get(&a) == a_data, "get before sync returned other bytes");
    c.ok("sync", backend.sync());
    c.expect(
        c.get(&a) == a_data,
        "get of first chunk returned other bytes",
    );
    c.expect(
        c.get(&b) == b_data,
        "get of second chunk returned other bytes",
    );
}

/// Putting a stored chunk again (alone, or twice in one batch) keeps one copy.
pub fn put_is_idempotent(backend: &dyn ChunkBackend) {
    let c = Check::new("put_is_idempotent", backend);
    let (a, a_data) = sample_chunk(3);
    c.ok("first put", backend.put_batch(&[(a, &a_data)]));
    c.ok("second put", backend.put_batch(&[(a, &a_data)]));
    c.ok(
        "batch with the chunk twice",
        backend.put_batch(&[(a, &a_data), (a, &a_data)]),
    );
    c.ok("sync", backend.sync());
    c.expect_eq("list", c.list(), vec![a]);
    c.expect_eq("used_bytes", c.used(), CHUNK);
    c.expect(c.get(&a) == a_data, "get returned other bytes");
}

/// A chunk that is not exactly `CHUNK_SIZE` long is refused with `Mismatch` and not stored.
pub fn put_rejects_wrong_length(backend: &dyn ChunkBackend) {
    let c = Check::new("put_rejects_wrong_length", backend);
    let (_, data) = sample_chunk(4);
    for (what, bytes) in [("short", &data[..CHUNK_SIZE - 1]), ("empty", &data[..0])] {
        let d = ChunkDigest::of(bytes);
        match backend.put_batch(&[(d, bytes)]) {
            Err(ChunkError::Mismatch(got)) if got == d => {}
            other => c.fail(format!(
                "put of a {what} chunk: expected Mismatch({d:?}), got {other:?}"
            )),
        }
        c.expect(!c.contains(&d), format!("{what} chunk was stored"));
    }
    let long = [&data[..], &[1u8]].concat();
    let d = ChunkDigest::of(&long);
    match backend.put_batch(&[(d, &long)]) {
        Err(ChunkError::Mismatch(got)) if got == d => {}
        other => c.fail(format!(
            "put of a long chunk: expected Mismatch({d:?}), got {other:?}"
        )),
    }
    c.expect_eq("list", c.list(), vec![]);
}

/// `contains` follows puts and deletes; a deleted chunk is `NotFound`.
pub fn contains_and_delete(backend: &dyn ChunkBackend) {
    let c = Check::new("contains_and_delete", backend);
    let (a, a_data) = sample_chunk(5);
    let (b, b_data) = sample_chunk(6);
    c.expect(!c.contains(&a), "contains is true before put");
    c.ok(
        "put_batch",
        backend.put_batch(&[(a, &a_data), (b, &b_data)]),
    );
    c.ok("sync", backend.sync());
    c.expect(
        c.contains(&a) && c.contains(&b),
        "contains is false after put",
    );
    c.ok("delete", backend.delete(&a));
    c.expect(!c.contains(&a), "contains is true after delete");
    c.expect(c.contains(&b), "delete removed another chunk too");
    c.expect_not_found(&a, "get after delete");
    c.expect_eq("list after delete", c.list(), vec![b]);
}

/// Deleting a chunk that is not there (never stored, or already deleted) succeeds.
pub fn delete_missing_is_ok(backend: &dyn ChunkBackend) {
    let c = Check::new("delete_missing_is_ok", backend);
    let (a, a_data) = sample_chunk(7);
    let (never, _) = sample_chunk(8);
    c.ok("delete of a never-stored chunk", backend.delete(&never));
    c.ok("put_batch", backend.put_batch(&[(a, &a_data)]));
    c.ok("delete", backend.delete(&a));
    c.ok("second delete", backend.delete(&a));
    c.expect_eq("list", c.list(), vec![]);
    c.expect_eq("used_bytes", c.used(), 0);
}

/// A chunk deleted and put again is stored again (and counted once).
pub fn put_after_delete(backend: &dyn ChunkBackend) {
    let c = Check::new("put_after_delete", backend);
    let (a, a_data) = sample_chunk(9);
    c.ok("put_batch", backend.put_batch(&[(a, &a_data)]));
    c.ok("sync", backend.sync());
    c.ok("delete", backend.delete(&a));
    c.ok("put again", backend.put_batch(&[(a, &a_data)]));
    c.ok("sync", backend.sync());
    c.expect(c.get(&a) == a_data, "get returned other bytes");
    c.expect_eq("list", c.list(), vec![a]);
    c.expect_eq("used_bytes", c.used(), CHUNK);
}

/// Reading a chunk that is not stored is `NotFound` naming that digest.
pub fn get_missing_is_not_found(backend: &dyn ChunkBackend) {
    let c = Check::new("get_missing_is_not_found", backend);
    let (a, _) = sample_chunk(10);
    c.expect_not_found(&a, "get of a never-stored chunk");
    c.expect(!c.contains(&a), "contains is true for a never-stored chunk");
}

/// `list` returns every stored chunk exactly once, and nothing else.
pub fn list_enumerates_exactly(backend: &dyn ChunkBackend) {
    let c = Check::new("list_enumerates_exactly", backend);
    let chunks: Vec<_> = (11..16).map(sample_chunk).collect();
    let batch: Vec<(ChunkDigest, &[u8])> = chunks.iter().map(|(d, v)| (*d, &v[..])).collect();
    c.ok("put_batch", backend.put_batch(&batch));
    c.ok("put_batch again", backend.put_batch(&batch[..2]));
    c.ok("sync", backend.sync());
    c.ok("delete", backend.delete(&chunks[1].0));
    c.ok("delete", backend.delete(&chunks[3].0));
    let mut expected = vec![chunks[0].0, chunks[2].0, chunks[4].0];
    expected.sort();
    c.expect_eq("list", c.list(), expected);
}

/// `used_bytes` is `CHUNK_SIZE` per distinct stored chunk, following puts and deletes.
pub fn space_accounts_for_chunks(backend: &dyn ChunkBackend) {
    let c = Check::new("space_accounts_for_chunks", backend);
    c.expect_eq("used_bytes when empty", c.used(), 0);
    let chunks: Vec<_> = (16..19).map(sample_chunk).collect();
    let batch: Vec<(ChunkDigest, &[u8])> = chunks.iter().map(|(d, v)| (*d, &v[..])).collect();
    c.ok("put_batch", backend.put_batch(&batch));
    c.expect_eq("used_bytes after 3 puts", c.used(), 3 * CHUNK);
    c.ok("put_batch again", backend.put_batch(&batch));
    c.ok("sync", backend.sync());
    c.expect_eq("used_bytes after putting them again", c.used(), 3 * CHUNK);
    c.ok("delete", backend.delete(&chunks[0].0));
    c.expect_eq("used_bytes after a delete", c.used(), 2 * CHUNK);
    c.ok("delete again", backend.delete(&chunks[0].0));
    c.expect_eq(
        "used_bytes after deleting a missing chunk",
        c.used(),
        2 * CHUNK,
    );
}

/// Many chunks in one batch are all stored, listed and read back.
pub fn batch_of_many(backend: &dyn ChunkBackend) {
    const N: u64 = 40;
    let c = Check::new("batch_of_many", backend);
    let chunks: Vec<_> = (100..100 + N).map(sample_chunk).collect();
    let batch: Vec<(ChunkDigest, &[u8])> = chunks.iter().map(|(d, v)| (*d, &v[..])).collect();
    c.ok("put_batch", backend.put_batch(&batch));
    c.ok("sync", backend.sync());
    let mut expected: Vec<ChunkDigest> = chunks.iter().map(|(d, _)| *d).collect();
    expected.sort();
    c.expect_eq("list", c.list(), expected);
    c.expect_eq("used_bytes", c.used(), N * CHUNK);
    for (d, data) in &chunks {
        c.expect(
            c.get(d) == *data,
            format!("get({d:?}) returned other bytes"),
        );
    }
}

/// Threads putting the same chunk at once (and each its own) leave one copy of each.
pub fn concurrent_puts_of_same_chunk(backend: &dyn ChunkBackend) {
    const THREADS: u64 = 4;
    let c = Check::new("concurrent_puts_of_same_chunk", backend);
    let (shared, shared_data) = sample_chunk(200);
    let own: Vec<_> = (0..THREADS).map(|i| sample_chunk(201 + i)).collect();
    std::thread::scope(|scope| {
        for (d, data) in &own {
            let (c, shared_data) = (&c, &shared_data);
            scope.spawn(move || {
                for round in 0..3 {
                    c.ok(
                        &format!("put of the shared chunk (round {round})"),
                        backend.put_batch(&[(shared, shared_data)]),
                    );
                }
                c.ok(
                    "put of own and shared chunk",
                    backend.put_batch(&[(*d, data), (shared, shared_data)]),
                );
            });
        }
    });
    c.ok("sync", backend.sync());
    let mut expected: Vec<ChunkDigest> = own.iter().map(|(d, _)| *d).collect();
    expected.push(shared);
    expected.sort();
    c.expect_eq("list", c.list(), expected);
    c.expect_eq("used_bytes", c.used(), (THREADS + 1) * CHUNK);
    c.expect(
        c.get(&shared) == shared_data,
        "shared chunk reads back other bytes",
    );
    for (d, data) in &own {
        c.expect(
            c.get(d) == *data,
            format!("get({d:?}) returned other bytes"),
        );
    }
}

/// A distinct chunk (never all zero) for each seed, with its digest.
fn sample_chunk(seed: u64) -> (ChunkDigest, Vec<u8>) {
    let mut data = Vec::with_capacity(CHUNK_SIZE);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while data.len() < CHUNK_SIZE {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        data.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    data.truncate(CHUNK_SIZE);
    data[..8].copy_from_slice(&seed.to_le_bytes());
    data[8] = 0xff;
    (ChunkDigest::of(&data), data)
}

/// One check running against one backend; failures name both.
struct Check<'a> {
    name: &'static str,
    backend: &'a dyn ChunkBackend,
}

impl<'a> Check<'a> {
    fn new(name: &'static str, backend: &'a dyn ChunkBackend) -> Self {
        Check { name, backend }
    }

    #[track_caller]
    fn fail(&self, message: impl Display) -> ! {
        panic!(
            "chunk backend conformance check `{}` failed on {}: {message}",
            self.name,
            self.backend.describe()
        )
    }

    #[track_caller]
    fn expect(&self, condition: bool, message: impl Display) {
        if !condition {
            self.fail(message)
        }
    }

    #[track_caller]
    fn expect_eq<T: PartialEq + std::fmt::Debug>(&self, what: &str, got: T, want: T) {
        if got != want {
            self.fail(format!("{what}: got {got:?}, expected {want:?}"))
        }
    }

    #[track_caller]
    fn ok<T>(&self, what: &str, result: Result<T, ChunkError>) -> T {
        match result {
            Ok(value) => value,
            Err(e) => self.fail(format!("{what} returned an error: {e}")),
        }
    }

    #[track_caller]
    fn expect_not_found(&self, digest: &ChunkDigest, what: &str) {
        match self.backend.get(digest) {
            Err(ChunkError::NotFound(d)) if d == *digest => {}
            Ok(_) => self.fail(format!(
                "{what}: expected NotFound({digest:?}), got the chunk"
            )),
            Err(e) => self.fail(format!("{what}: expected NotFound({digest:?}), got {e:?}")),
        }
    }

    #[track_caller]
    fn contains(&self, digest: &ChunkDigest) -> bool {
        self.ok("contains", self.backend.contains(digest))
    }

    #[track_caller]
    fn get(&self, digest: &ChunkDigest) -> Vec<u8> {
        self.ok("get", self.backend.get(digest))
    }

    /// The listing, sorted.
    #[track_caller]
    fn list(&self) -> Vec<ChunkDigest> {
        let mut listed = self.ok("list", self.backend.list());
        listed.sort();
        listed
    }

    #[track_caller]
    fn used(&self) -> u64 {
        self.ok("space", self.backend.space()).used_bytes
    }
}

//! The region's own metrics, beside the call metrics every server has
//! (`imagefleet_rpc::metrics`): copies into the region and its chunk store.
//!
//! - `imagefleet_copy_bytes_total{region}`, `imagefleet_copy_chunks_total{region}`: chunk data
//!   copies brought into the region (their rate is the copy throughput);
//! - `imagefleet_copies_active{region}`: copies working now;
//! - `imagefleet_copy_retries_total{region}`: interrupted copy attempts that will be retried;
//! - `imagefleet_chunk_store_used_bytes{region}`, `imagefleet_chunk_store_free_bytes{region}`:
//!   read from the store at each scrape.

use std::sync::Arc;

use imagefleet_rpc::metrics::{registry, Registry, Series};

fn identity(region: &str) -> String {
    format!("{}{region}", imagefleet_rpc::identity::REGION_PREFIX)
}

fn metrics(region: &str) -> Arc<Registry> {
    registry(&identity(region))
}

/// A copy's chunk arrived and is stored.
pub(crate) fn copy_chunk(region: &str, bytes: u64) {
    let r = metrics(region);
    r.counter(
        "imagefleet_copy_bytes_total",
        "Chunk bytes copies brought into the region.",
        &[("region", region)],
    )
    .add(bytes);
    r.counter(
        "imagefleet_copy_chunks_total",
        "Chunks copies brought into the region.",
        &[("region", region)],
    )
    .inc();
}

/// A copy attempt was interrupted and will be retried.
pub(crate) fn copy_retry(region: &str) {
    metrics(region)
        .counter(
            "imagefleet_copy_retries_total",
            "Interrupted copy attempts that are retried.",
            &[("region", region)],
        )
        .inc();
}

/// Counts a copy as active while it lives.
pub(crate) struct ActiveCopy(Arc<Series>);

impl ActiveCopy {
    pub(crate) fn new(region: &str) -> ActiveCopy {
        let gauge = metrics(region).gauge(
            "imagefleet_copies_active",
            "Copies into the region working now.",
            &[("region", region)],
        );
        gauge.inc();
        ActiveCopy(gauge)
    }
}

impl Drop for ActiveCopy {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reports the chunk store's space at each scrape.
pub(crate) fn watch_store(region: &str, chunks: imagefleet_chunkstore::ChunkStore) {
    let name = region.to_string();
    metrics(region).on_render(move |r| {
        if let Ok(space) = chunks.space() {
            r.gauge(
                "imagefleet_chunk_store_used_bytes",
                "Bytes held by the region's stored chunks.",
                &[("region", &name)],
            )
            .set(i64::try_from(space.used_bytes).unwrap_or(i64::MAX));
            r.gauge(
                "imagefleet_chunk_store_free_bytes",
                "Bytes free for new chunks on the chunk store's file system.",
                &[("region", &name)],
            )
            .set(i64::try_from(space.free_bytes).unwrap_or(i64::MAX));
        }
        // SAFETY: sqlite3_memory_used only reads SQLite's own counter.
        let sqlite = unsafe { rusqlite::ffi::sqlite3_memory_used() };
        r.gauge(
            "imagefleet_sqlite_memory_bytes",
            "Heap memory SQLite holds in this process (page caches, statements), in bytes.",
            &[],
        )
        .set(sqlite);
    });
}

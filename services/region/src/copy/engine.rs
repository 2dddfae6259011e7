//! The destination's copy runner: one per `SYNCING` image in this process.

use super::{CopyError, FETCH_BATCH, FETCH_STREAMS};
use crate::disk;
use crate::error::RegionError;
use crate::model::{CopyCounters, CopyState, CopyTask, ImageRow, ImageState, Manifest};
use crate::region::{blocking, Backoff, Region, RunningCopy};
use futures::{StreamExt, TryStreamExt};
use imagefleet_chunkstore::{ChunkDigest, CHUNK_SIZE};
use imagefleet_proto::region::v1::region_internal_service_client::RegionInternalServiceClient;
use imagefleet_proto::region::v1::{FetchChunksRequest, GetImageManifestRequest};
use imagefleet_rpc::client::SignedChannel;
use imagefleet_rpc::time::{rfc3339, unix_now};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait between two attempts of a copy.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// How long a copy waits before asking again for a stream the source refused for the
/// account's concurrent streams.
const STREAM_WAIT: Duration = Duration::from_millis(500);

type Source = RegionInternalServiceClient<SignedChannel>;

struct Progress {
    chunks_done: AtomicU64,
    chunks_transferred: AtomicU64,
    bytes_transferred: AtomicU64,
    /// How many manifest entries each digest stands for (a chunk can repeat).
    weight: HashMap<ChunkDigest, u64>,
    bytes_total: u64,
}

impl Progress {
    fn counters(&self) -> CopyCounters {
        let chunks_done = self.chunks_done.load(Ordering::Relaxed);
        CopyCounters {
            chunks_done,
            bytes_done: chunks_done * CHUNK_SIZE as u64,
            chunks_transferred: self.chunks_transferred.load(Ordering::Relaxed),
            bytes_transferred: self.bytes_transferred.load(Ordering::Relaxed),
        }
    }
}

impl Region {
    /// Runs the copy into `image_id` until it is `NORMAL`, has failed for good, or is
    /// cancelled. At most one runner per image.
    pub(crate) fn spawn_copy(self: &Arc<Self>, image_id: String) {
        let mut copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
        if copies.contains_key(&image_id) {
            return;
        }
        let cancelled = Arc::new(AtomicBool::new(false));
        let region = self.clone();
        let flag = cancelled.clone();
        let id = image_id.clone();
        let task = imagefleet_rpc::trace::spawn(async move {
            region.run_copy(&id, &flag).await;
            region
                .copies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
        copies.insert(
            image_id,
            RunningCopy {
                cancelled,
                task: task.abort_handle(),
            },
        );
    }

    /// Stops the copy into `image_id` if it runs here; chunk writes already under way finish
    /// or see the cancellation before storing anything.
    pub(crate) async fn cancel_copy(&self, image_id: &str) {
        let running = self
            .copies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(image_id);
        if let Some(running) = running {
            running.cancelled.store(true, Ordering::SeqCst);
            running.task.abort();
            tracing::info!(region = %self.config.region, image = %image_id, "copy cancelled");
        }
    }

    async fn run_copy(self: &Arc<Self>, image_id: &str, cancelled: &Arc<AtomicBool>) {
        let _active = crate::telemetry::ActiveCopy::new(&self.config.region);
        let mut backoff = Backoff::with_cap(MAX_RETRY_DELAY);
        loop {
            let outcome = self.copy_attempt(image_id, cancelled).await;
            let failure = match outcome {
                Ok(()) | Err(CopyError::Cancelled) => return,
                Err(CopyError::Fail(reason)) => reason,
                Err(CopyError::Retry(e)) => {
                    let store = self.store.clone();
                    let id = image_id.to_string();
                    let deadline = blocking(move || store.copy_task(&id))
                        .await
                        .ok()
                        .flatten()
                        .map(|t| t.deadline_at);
                    match deadline {
                        Some(deadline) if unix_now() < deadline => {
                            let message =
                                format!("waiting to retry (until {}): {e}", rfc3339(deadline));
                            tracing::info!(region = %self.config.region, image = %image_id, error = %e, "copy interrupted; retrying");
                            let store = self.store.clone();
                            let id = image_id.to_string();
                            let _ = blocking(move || store.record_copy_error(&id, &message)).await;
                            crate::telemetry::copy_retry(&self.config.region);
                            backoff.wait().await;
                            continue;
                        }
                        Some(_) => format!("gave up at the copy's deadline: {e}"),
                        None => return,
                    }
                }
            };
            if cancelled.load(Ordering::SeqCst) {
                return;
            }
            match self.fail_copy(image_id, &failure).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(region = %self.config.region, image = %image_id, error = %e, "cannot record the copy's failure yet");
                    backoff.wait().await;
                }
            }
        }
    }

    /// One attempt at a copy: resumes from whatever the region already holds.
    async fn copy_attempt(
        self: &Arc<Self>,
        image_id: &str,
        cancelled: &Arc<AtomicBool>,
    ) -> Result<(), CopyError> {
        let store = self.store.clone();
        let id = image_id.to_string();
        let (task, image) =
            blocking(move || Ok((store.copy_task(&id)?, store.image(&id)?))).await?;
        let (Some(task), Some(image)) = (task, image) else {
            return Ok(());
        };
        if image.state != ImageState::Syncing || task.state == CopyState::Failed {
            return Ok(());
        }
        if task.state != CopyState::Done {
            let store = self.store.clone();
            let id = image_id.to_string();
            let attempt = blocking(move || store.record_copy_attempt(&id)).await?;
            // deploy/compose-test.sh waits for this line to interrupt a copy: keep its text.
            tracing::info!(region = %self.config.region, image = %image_id, source = %task.source_image_id, from = %task.source_region, attempt, "copy starting");
            self.transfer(&task, &image, cancelled).await?;
        }
        if cancelled.load(Ordering::SeqCst) {
            return Err(CopyError::Cancelled);
        }
        self.finish_image(image_id).await.map_err(CopyError::Retry)
    }

    async fn transfer(
        self: &Arc<Self>,
        task: &CopyTask,
        image: &ImageRow,
        cancelled: &Arc<AtomicBool>,
    ) -> Result<(), CopyError> {
        let mut source = self
            .peer(&task.source_region)
            .await
            .map_err(CopyError::Retry)?;
        if !task.manifest_loaded {
            let manifest = fetch_manifest(&mut source, task, image).await?;
            let store = self.store.clone();
            let id = image.image_id.clone();
            blocking(move || store.set_copy_manifest(&id, &manifest)).await?;
        }
        let store = self.store.clone();
        let chunks = self.chunks.clone();
        let id = image.image_id.clone();
        let (manifest, missing) = blocking(move || {
            let manifest = store.copy_manifest(&id)?;
            let mut seen = HashSet::new();
            let mut missing = Vec::new();
            for (_, d) in &manifest {
                if seen.insert(*d) && !chunks.contains(d)? {
                    missing.push(*d);
                }
            }
            Ok((manifest, missing))
        })
        .await?;
        let missing_set: HashSet<ChunkDigest> = missing.iter().copied().collect();
        let progress = Arc::new(Progress {
            chunks_done: AtomicU64::new(
                manifest
                    .iter()
                    .filter(|(_, d)| !missing_set.contains(d))
                    .count() as u64,
            ),
            chunks_transferred: AtomicU64::new(task.chunks_transferred),
            bytes_transferred: AtomicU64::new(task.bytes_transferred),
            weight: manifest.iter().fold(HashMap::new(), |mut m, (_, d)| {
                *m.entry(*d).or_insert(0u64) += 1;
                m
            }),
            bytes_total: manifest.len() as u64 * CHUNK_SIZE as u64,
        });
        self.save_progress(&image.image_id, &progress).await?;
        let fetches: Vec<_> = missing
            .chunks(FETCH_BATCH)
            .map(|batch| {
                let (region, source, progress) = (self.clone(), source.clone(), progress.clone());
                let (task, batch, cancelled) = (task.clone(), batch.to_vec(), cancelled.clone());
                async move {
                    region
                        .fetch_batch(source, &task, batch, &progress, &cancelled)
                        .await?;
                    region.save_progress(&task.image_id, &progress).await
                }
            })
            .collect();
        futures::stream::iter(fetches)
            .buffer_unordered(FETCH_STREAMS)
            .try_collect::<Vec<()>>()
            .await?;
        // Every entry must be here and durable before the manifest becomes the snapshot:
        // chunks another writer stored are made durable by this sync too.
        let store = self.store.clone();
        let chunks = self.chunks.clone();
        let id = image.image_id.clone();
        let refs = self.chunk_refs.clone();
        blocking(move || {
            let _shared = refs.read().unwrap_or_else(|e| e.into_inner());
            for (idx, d) in &manifest {
                if !chunks.contains(d)? {
                    return Err(RegionError::from(imagefleet_proto::error::status(
                        tonic::Code::Unavailable,
                        "ServiceUnavailable",
                        format!("chunk {idx} is still missing"),
                    )));
                }
            }
            chunks.sync()?;
            store.finish_copy(&id)
        })
        .await?;
        tracing::info!(
            region = %self.config.region,
            image = %image.image_id,
            transferred = progress.chunks_transferred.load(Ordering::Relaxed),
            "copy complete"
        );
        Ok(())
    }

    /// Pulls one batch of chunks, verifying each as it arrives; the batch is made durable
    /// before it counts as done.
    async fn fetch_batch(
        &self,
        mut source: Source,
        task: &CopyTask,
        batch: Vec<ChunkDigest>,
        progress: &Progress,
        cancelled: &AtomicBool,
    ) -> Result<(), CopyError> {
        let request = FetchChunksRequest {
            image_id: task.source_image_id.clone(),
            digests: batch.iter().map(|d| d.0.to_vec()).collect(),
            snapshot_id: task.source_snapshot_id.clone(),
        };
        // The source limits the streams it serves per account: a copy over it waits for a
        // stream to end rather than starting over.
        let mut stream = loop {
            match source.fetch_chunks(request.clone()).await {
                Ok(response) => break response.into_inner(),
                Err(status)
                    if status.code() == tonic::Code::ResourceExhausted
                        && imagefleet_proto::error::reason(&status).as_deref()
                            == Some("LimitExceeded.ConcurrentStreams") =>
                {
                    if cancelled.load(Ordering::SeqCst) {
                        return Err(CopyError::Cancelled);
                    }
                    let pause = STREAM_WAIT + Duration::from_millis(rand::random::<u64>() % 500);
                    tokio::time::sleep(pause).await;
                }
                Err(status) => return Err(status.into()),
            }
        };
        let mut expected = batch.iter();
        let mut arrived = Vec::with_capacity(batch.len());
        while let Some(piece) = stream.message().await? {
            let Some(digest) = expected.next().copied() else {
                return Err(CopyError::Fail("source sent more chunks than asked".into()));
            };
            if piece.digest != digest.0 {
                return Err(CopyError::Fail("source sent chunks out of order".into()));
            }
            let chunks = self.chunks.clone();
            let refs = self.chunk_refs.clone();
            let len = piece.data.len() as u64;
            let stop = cancelled.load(Ordering::SeqCst);
            if stop {
                return Err(CopyError::Cancelled);
            }
            // Below the free-space reserve the copy waits (and retries) instead of filling
            // the disk other accounts' data lives on.
            self.check_free_space(CHUNK_SIZE as u64)
                .await
                .map_err(CopyError::Retry)?;
            blocking(move || {
                let _shared = refs.read().unwrap_or_else(|e| e.into_inner());
                chunks.put_verified(&[(digest, &piece.data)])?;
                Ok(())
            })
            .await
            .map_err(|e| match e {
                RegionError::Chunks(imagefleet_chunkstore::ChunkError::Mismatch(d)) => {
                    CopyError::Fail(format!("chunk {} arrived corrupt", d.to_hex()))
                }
                e => CopyError::from(e),
            })?;
            progress.chunks_transferred.fetch_add(1, Ordering::Relaxed);
            progress.bytes_transferred.fetch_add(len, Ordering::Relaxed);
            crate::telemetry::copy_chunk(&self.config.region, len);
            arrived.push(digest);
        }
        if expected.next().is_some() {
            return Err(CopyError::Retry(RegionError::from(
                imagefleet_proto::error::status(
                    tonic::Code::Unavailable,
                    "ServiceUnavailable",
                    "chunk stream ended early",
                ),
            )));
        }
        let chunks = self.chunks.clone();
        blocking(move || Ok(chunks.sync()?)).await?;
        for digest in arrived {
            progress.chunks_done.fetch_add(
                progress.weight.get(&digest).copied().unwrap_or(1),
                Ordering::Relaxed,
            );
        }
        Ok(())
    }

    async fn save_progress(&self, image_id: &str, progress: &Progress) -> Result<(), CopyError> {
        let counters = progress.counters();
        let bytes_total = progress.bytes_total;
        let store = self.store.clone();
        let id = image_id.to_string();
        blocking(move || store.record_copy_progress(&id, &counters, bytes_total))
            .await
            .map_err(CopyError::Retry)
    }
}

/// The source snapshot's manifest, checked against the digest the source computed.
async fn fetch_manifest(
    source: &mut Source,
    task: &CopyTask,
    image: &ImageRow,
) -> Result<Manifest, CopyError> {
    let mut stream = source
        .get_image_manifest(GetImageManifestRequest {
            image_id: task.source_image_id.clone(),
            snapshot_id: task.source_snapshot_id.clone(),
        })
        .await?
        .into_inner();
    let mut manifest = Vec::new();
    while let Some(page) = stream.message().await? {
        if page.virtual_size_bytes != image.virtual_size
            || page.content_digest != task.expected_digest
        {
            return Err(CopyError::Fail(
                "the source image changed since the copy started".into(),
            ));
        }
        for entry in page.entries {
            let digest = ChunkDigest::from_slice(&entry.digest)
                .ok_or_else(|| CopyError::Fail("source sent a malformed chunk digest".into()))?;
            manifest.push((entry.index, digest));
        }
    }
    if disk::manifest_digest(image.virtual_size, &manifest) != task.expected_digest {
        return Err(CopyError::Fail(
            "the source manifest does not match the image's digest".into(),
        ));
    }
    Ok(manifest)
}

//! Image imports: a disk file read as it arrives (an upload's messages, an HTTP body), checked
//! and decoded by `imagefleet-inspect`, cut into chunks that are stored as they complete.
//!
//! The file's bytes go to one blocking worker per import through a small bounded channel, so
//! a fast sender waits for the worker and nothing holds more than a few messages, the
//! decoder's bounded reorder buffer and two batches of chunks. The worker admits the image once
//! the headers have been read (a refusal before that leaves nothing behind); each batch of
//! chunks is then stored by a thread of its own while the worker decodes the next, made
//! durable and recorded in the image's snapshot in file order, and at the end the worker records the
//! final size; the finish step makes the image `NORMAL`. Any failure after admission makes the
//! image `IMPORTFAILED` and drops every chunk it recorded.

use crate::error::{RegionError, Result};
use crate::meta::{NewContent, NewImage};
use crate::model::{ImageRow, ImageSource, ImageState, Manifest};
use crate::region::Region;
use crate::{catalogue, validate};
use bytes::Bytes;
use imagefleet_chunkstore::{is_zero, ChunkDigest, CHUNK_SIZE};
use imagefleet_inspect::{DeclaredFormat, Decoder, Extent, Refusal, Summary};
use imagefleet_proto::region::v1::ImportImageParameters;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

/// Chunks stored and recorded together (one `sync`, one transaction).
const BATCH_CHUNKS: usize = 16;

/// Threads that write the chunks of a region's imports (they mostly wait for their fsyncs).
const CHUNK_WRITERS: usize = 8;

/// File bytes read between two records of the progress (and of the chunks ready by then).
const PROGRESS_EVERY: u64 = 16 << 20;

/// Messages of the file queued for the worker.
pub(crate) const QUEUE: usize = 4;

/// Why an import failed that is not the file's fault.
pub(crate) const INTERRUPTED: &str = "FailedOperation.ImportInterrupted";
pub(crate) const SLOW_WRITER: &str = "RequestTimeout.SlowWriter";

/// What the worker is handed, in order.
pub(crate) enum Piece {
    /// The next bytes of the file.
    Data(Bytes),
    /// The file is complete.
    End,
    /// The source stopped: the import fails with this status (its reason is recorded).
    Abort(Status),
}

/// A checked import, ready to read its file.
pub(crate) struct ImportJob {
    pub owner: String,
    /// The image to admit (its size comes from the headers).
    pub row: ImageRow,
    pub declared: Option<DeclaredFormat>,
    pub force: bool,
    /// The file's size, when known.
    pub size: Option<u64>,
    pub image_url: String,
    /// Held while the import runs.
    pub _permit: crate::fairness::Permit,
}

/// How an import ended.
pub(crate) enum Outcome {
    /// Refused before the image existed: nothing is left behind.
    Refused(Status),
    /// The image exists and is `IMPORTFAILED`; the status names it.
    Failed(Status),
    /// Every chunk is recorded; the finish step makes the image `NORMAL`.
    Done { image_id: String, summary: Summary },
}

/// The status of a refused file.
pub(crate) fn refusal_status(refusal: &Refusal) -> Status {
    imagefleet_proto::error::invalid_argument("data", refusal.reason(), refusal.message())
}

/// Checks the parameters every import takes, and builds the image to admit.
pub(crate) fn check_parameters(
    owner: &str,
    params: &ImportImageParameters,
) -> Result<(ImageRow, Option<DeclaredFormat>)> {
    validate::image_name("parameters.image_name", &params.image_name)?;
    validate::description("parameters.image_description", &params.image_description)?;
    let declared = if params.format.is_empty() {
        None
    } else {
        Some(params.format.parse::<DeclaredFormat>().map_err(|e| {
            RegionError::invalid(
                "parameters.format",
                "InvalidParameterValue.Format",
                e.to_string(),
            )
        })?)
    };
    let Some((platform, versions)) = catalogue::IMPORT_OS
        .iter()
        .find(|(p, _)| p.eq_ignore_ascii_case(&params.platform))
    else {
        return Err(RegionError::invalid(
            "parameters.platform",
            "InvalidParameterValue.Platform",
            format!(
                "platform {:?} is not one of {} (DescribeImportImageOs)",
                params.platform,
                catalogue::IMPORT_OS
                    .iter()
                    .map(|(p, _)| *p)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    let Some(version) = versions.iter().find(|v| **v == params.os_version) else {
        return Err(RegionError::invalid(
            "parameters.os_version",
            "InvalidParameterValue.OsVersion",
            format!(
                "os_version {:?} is not one of {} for {platform} (DescribeImportImageOs)",
                params.os_version,
                versions.join(", ")
            ),
        ));
    };
    let architecture = if params.architecture.is_empty() {
        "x86_64"
    } else {
        catalogue::IMPORT_ARCHITECTURES
            .iter()
            .find(|a| **a == params.architecture)
            .copied()
            .ok_or_else(|| {
                RegionError::invalid(
                    "parameters.architecture",
                    "InvalidParameterValue.Architecture",
                    format!(
                        "architecture {:?} is not one of {}",
                        params.architecture,
                        catalogue::IMPORT_ARCHITECTURES.join(", ")
                    ),
                )
            })?
    };
    let mut row = ImageRow::new_custom(
        owner,
        &params.image_name,
        ImageSource::ExternalImport,
        ImageState::Importing,
    );
    row.description = params.image_description.clone();
    row.platform = platform.to_string();
    row.os_name = format!("{platform} {version}");
    row.architecture = architecture.to_string();
    // An imported image is the root of its own lineage, and not paid.
    row.root_image_id = row.image_id.clone();
    row.root_paid = false;
    Ok((row, declared))
}

impl Region {
    /// Checks what an import of `owner` needs before any byte is read: the account's
    /// concurrent imports, the admission rules (name, image quota, storage quota) as a dry
    /// run, and room for the file.
    pub(crate) async fn prepare_import(
        self: &Arc<Self>,
        owner: &str,
        params: &ImportImageParameters,
        size: Option<u64>,
        image_url: &str,
    ) -> Result<ImportJob> {
        let (row, declared) = check_parameters(owner, params)?;
        let max_file_size = self.config.imports.max_file_size;
        if let Some(size) = size.filter(|s| *s > max_file_size) {
            let refusal = Refusal::new(
                imagefleet_inspect::RefusalKind::FileTooLarge,
                format!("the file is {size} bytes, over the limit of {max_file_size} bytes"),
            );
            return Err(refusal_status(&refusal).into());
        }
        let permit = self.import_permit(owner)?;
        let new = NewImage {
            row: row.clone(),
            content: NewContent::Import {
                size_bytes: size.unwrap_or(0),
                image_url: image_url.to_string(),
            },
            refusal_context: None,
        };
        self.admit(owner, vec![new], true).await?;
        if let Some(size) = size {
            self.check_free_space(size).await?;
        }
        Ok(ImportJob {
            owner: owner.to_string(),
            row,
            declared,
            force: params.force,
            size,
            image_url: image_url.to_string(),
            _permit: permit,
        })
    }

    /// Starts the worker of `job`, reading what arrives on the returned sender. `admitted`
    /// hears the image id once the headers passed (or the refusal).
    pub(crate) fn start_import(
        self: &Arc<Self>,
        job: ImportJob,
        admitted: Option<oneshot::Sender<std::result::Result<String, Status>>>,
    ) -> (mpsc::Sender<Piece>, tokio::task::JoinHandle<Outcome>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let region = self.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let mut worker = Worker {
                region: &region,
                job,
                image_id: None,
                admitted,
                chunker: Chunker::default(),
                recorded: 0,
                in_flight: None,
            };
            let outcome = worker.run(rx);
            if let (Some(tell), Outcome::Refused(status)) = (worker.admitted.take(), &outcome) {
                let _ = tell.send(Err(status.clone()));
            }
            outcome
        });
        (tx, worker)
    }

    /// After the worker: the finish step of a complete import (in the background if a peer
    /// service is down), and the status of one that is not.
    pub(crate) async fn conclude_import(
        self: &Arc<Self>,
        outcome: Outcome,
    ) -> std::result::Result<(String, Summary), Status> {
        match outcome {
            Outcome::Refused(status) | Outcome::Failed(status) => Err(status),
            Outcome::Done { image_id, summary } => {
                if let Err(e) = self.finish_image(&image_id).await {
                    tracing::warn!(image = %image_id, error = %e, "import finish continues in the background");
                    self.finish_in_background(image_id.clone());
                }
                Ok((image_id, summary))
            }
        }
    }
}

struct Worker<'a> {
    region: &'a Arc<Region>,
    job: ImportJob,
    image_id: Option<String>,
    admitted: Option<oneshot::Sender<std::result::Result<String, Status>>>,
    chunker: Chunker,
    /// File bytes read as last handed to be stored.
    recorded: u64,
    /// The batch being stored and recorded while the worker decodes on.
    in_flight: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Worker<'_> {
    fn run(&mut self, mut rx: mpsc::Receiver<Piece>) -> Outcome {
        let limits = imagefleet_inspect::Limits {
            max_virtual_size: self.region.config.imports.max_virtual_size,
            max_actual_size: self.region.config.imports.max_file_size,
            allow_iso: self.job.force,
            ..Default::default()
        };
        let mut decoder = Decoder::new(limits, self.job.declared, self.job.size);
        let result = (|| -> std::result::Result<Summary, Status> {
            loop {
                let piece = rx.blocking_recv().unwrap_or_else(|| {
                    Piece::Abort(imagefleet_proto::error::status(
                        Code::Cancelled,
                        INTERRUPTED,
                        "the import was interrupted: its source went away",
                    ))
                });
                match piece {
                    Piece::Data(bytes) => {
                        let chunker = &mut self.chunker;
                        decoder
                            .feed(&bytes, &mut |e| chunker.push(e))
                            .map_err(|r| refusal_status(&r))?;
                        if self.image_id.is_none() {
                            if let Some(header) = decoder.header().cloned() {
                                self.admit(header.virtual_size, header.format)?;
                            }
                        }
                        let read = decoder.bytes_read();
                        if self.image_id.is_some()
                            && (self.chunker.ready.len() >= BATCH_CHUNKS
                                || read.saturating_sub(self.recorded) >= PROGRESS_EVERY)
                        {
                            self.store_ready(read)?;
                        }
                    }
                    Piece::Abort(status) => return Err(status),
                    Piece::End => {
                        let chunker = &mut self.chunker;
                        let summary = decoder
                            .finish(&mut |e| chunker.push(e))
                            .map_err(|r| refusal_status(&r))?;
                        self.chunker.finish();
                        if self.image_id.is_none() {
                            self.admit(Some(summary.virtual_size), summary.format)?;
                        }
                        self.store_ready(summary.bytes_read)?;
                        return Ok(summary);
                    }
                }
            }
        })();
        // Nothing more is read: a sender still sending finds the channel closed.
        drop(rx);
        // The last batch is recorded (or reclaimed) before the import ends either way, so a
        // failure drops every chunk recorded.
        let stored = self.wait_stored().map_err(Status::from);
        let summary = match (result, stored) {
            (Ok(summary), Ok(())) => summary,
            (Err(status), _) | (Ok(_), Err(status)) => return self.fail(status),
        };
        let Some(image_id) = self.image_id.clone() else {
            return Outcome::Refused(Status::internal("the import ended without its image"));
        };
        let completed = self.region.store.complete_import(
            &image_id,
            summary.virtual_size,
            summary.format.as_str(),
            summary.format.variant(),
            summary.bytes_read,
        );
        match completed {
            Ok(()) => Outcome::Done { image_id, summary },
            Err(e) => self.fail(Status::from(e)),
        }
    }

    /// Admits the image once the headers are known.
    fn admit(
        &mut self,
        virtual_size: Option<u64>,
        format: imagefleet_inspect::Format,
    ) -> std::result::Result<(), Status> {
        let mut row = self.job.row.clone();
        row.virtual_size = virtual_size.unwrap_or(0);
        let new = NewImage {
            row,
            content: NewContent::Import {
                size_bytes: self.job.size.unwrap_or(0),
                image_url: self.job.image_url.clone(),
            },
            refusal_context: None,
        };
        let region = self.region;
        region.check_free_space_blocking(0)?;
        let admitted = region
            .store
            .admit(&self.job.owner, &[new], region.limits(), false)?;
        let image_id = admitted
            .first()
            .map(|r| r.image_id.clone())
            .ok_or_else(|| Status::internal("admission returned no image"))?;
        self.image_id = Some(image_id.clone());
        region
            .store
            .set_import_format(&image_id, format.as_str(), format.variant(), None)?;
        tracing::info!(image = %image_id, format = format.variant(), "import admitted");
        if let Some(tell) = self.admitted.take() {
            let _ = tell.send(Ok(image_id));
        }
        Ok(())
    }

    /// Hands the chunks completed so far to a storing thread, which has the region's chunk
    /// writers store them, makes them durable and records them while the worker decodes on.
    /// The batch before must be recorded first, so records keep the file's order and at most
    /// two batches are held.
    fn store_ready(&mut self, bytes_read: u64) -> Result<()> {
        let Some(image_id) = self.image_id.clone() else {
            return Ok(());
        };
        let ready = std::mem::take(&mut self.chunker.ready);
        self.recorded = bytes_read;
        if !ready.is_empty() {
            self.region
                .check_free_space_blocking((ready.len() * CHUNK_SIZE) as u64)?;
        }
        self.wait_stored()?;
        let region = self.region.clone();
        let handle = std::thread::Builder::new()
            .name("import-store".into())
            .spawn(move || store_batch(&region, &image_id, ready, bytes_read))
            .map_err(|e| RegionError::Task(format!("starting a chunk writer: {e}")))?;
        self.in_flight = Some(handle);
        Ok(())
    }

    /// Waits for the batch being stored, if any, and returns how it went.
    fn wait_stored(&mut self) -> Result<()> {
        match self.in_flight.take() {
            None => Ok(()),
            Some(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(RegionError::Task("a chunk writer panicked".into()))),
        }
    }

    /// Ends the import on `status`: before admission, a refusal; after, `IMPORTFAILED` with
    /// every chunk dropped.
    fn fail(&mut self, status: Status) -> Outcome {
        let Some(image_id) = self.image_id.clone() else {
            return Outcome::Refused(status);
        };
        let reason =
            imagefleet_proto::error::reason(&status).unwrap_or_else(|| "InternalError".into());
        tracing::warn!(image = %image_id, %reason, message = status.message(), "import failed");
        match self
            .region
            .store
            .fail_import(&image_id, &reason, status.message())
        {
            Ok(dropped) => {
                if let Err(e) = self.region.reclaim_blocking(&dropped) {
                    tracing::warn!(image = %image_id, error = %e, "chunks of a failed import left for the next sweep");
                }
            }
            Err(e) => {
                tracing::warn!(image = %image_id, error = %e, "could not mark the import failed")
            }
        }
        let mut metadata: Vec<(String, String)> = imagefleet_proto::error::metadata(&status)
            .into_iter()
            .filter(|(k, _)| k != "image_id")
            .collect();
        metadata.push(("image_id".to_string(), image_id));
        Outcome::Failed(imagefleet_proto::error::status_with_metadata(
            status.code(),
            &reason,
            status.message().to_string(),
            metadata,
        ))
    }
}

/// The threads that hash and write the chunks of every import of a region, taking the chunks
/// handed to them in order of arrival. Each chunk is its own fsynced file, so the writers mostly
/// wait on the disk and there are more of them than cores; and since every import goes through
/// them, the threads and fsyncs in flight stay bounded for the region however many imports
/// run, and imports running together take turns chunk by chunk (each hands over at most one
/// batch at a time). Started with the first import; they end when the region is dropped.
#[derive(Default)]
pub(crate) struct ChunkWriters {
    /// `None` if no writer thread could be started: jobs then run on the caller's thread.
    jobs: std::sync::OnceLock<Option<std::sync::mpsc::Sender<WriteJob>>>,
}

type WriteJob = Box<dyn FnOnce() + Send>;

impl ChunkWriters {
    /// Queues `job` for the next free writer (or runs it here if there is none).
    fn run(&self, job: WriteJob) {
        let jobs = self.jobs.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<WriteJob>();
            let rx = Arc::new(std::sync::Mutex::new(rx));
            let mut started_any = false;
            for n in 0..CHUNK_WRITERS {
                let rx = rx.clone();
                let started = std::thread::Builder::new()
                    .name(format!("chunk-writer-{n}"))
                    .spawn(move || loop {
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(job) = next else { return };
                        // A panicking job drops its answer (its batch fails); the writer
                        // goes on.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    });
                match started {
                    Ok(_) => started_any = true,
                    Err(e) => tracing::error!(error = %e, "could not start a chunk writer"),
                }
            }
            started_any.then_some(tx)
        });
        // The writers outlive their jobs' panics and end only with the sender: a job runs
        // here only if none could be started.
        match jobs {
            Some(jobs) => {
                if let Err(unsent) = jobs.send(job) {
                    (unsent.0)()
                }
            }
            None => job(),
        }
    }
}

/// Stores one batch of an import's chunks, makes them durable, then records them in the
/// image's snapshot with the file bytes read by then. On failure the chunks it stored are
/// reclaimed (unless another image holds them) and nothing is recorded.
fn store_batch(
    region: &Region,
    image_id: &str,
    ready: Vec<(u64, Vec<u8>)>,
    bytes_read: u64,
) -> Result<()> {
    let shared = region.chunk_refs.read().unwrap_or_else(|e| e.into_inner());
    let mut entries: Manifest = Vec::with_capacity(ready.len());
    let stored = (|| -> Result<()> {
        // Each chunk is hashed and written (its own file, fsynced) by the region's writers.
        let count = ready.len();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for (idx, data) in ready {
            let (chunks, done) = (region.chunks.clone(), done_tx.clone());
            region.chunk_writers.run(Box::new(move || {
                let _ = done.send((idx, chunks.put(&data)));
            }));
        }
        drop(done_tx);
        let mut failed: Option<RegionError> = None;
        let mut answered = 0;
        for (idx, put) in done_rx {
            answered += 1;
            match put {
                Ok(Some(digest)) => entries.push((idx, digest)),
                Ok(None) => {}
                Err(e) => failed = failed.or(Some(e.into())),
            }
        }
        if answered < count {
            failed = failed.or(Some(RegionError::Task("a chunk writer panicked".into())));
        }
        entries.sort_by_key(|(idx, _)| *idx);
        if let Some(e) = failed {
            return Err(e);
        }
        region.chunks.sync()?;
        region
            .store
            .record_import_chunks(image_id, &entries, bytes_read, region.limits())
    })();
    drop(shared);
    if let Err(e) = stored {
        let digests: Vec<ChunkDigest> = entries.iter().map(|(_, d)| *d).collect();
        if let Err(r) = region.reclaim_blocking(&digests) {
            tracing::warn!(error = %r, "chunks of a refused import batch left for the next sweep");
        }
        return Err(e);
    }
    Ok(())
}

/// Cuts guest extents (in order, contiguous) into chunks; all-zero chunks are skipped
/// without being built.
#[derive(Default)]
struct Chunker {
    /// Guest offset of the next byte.
    pos: u64,
    /// The chunk being filled, once it holds a non-zero byte (zeros elsewhere).
    buf: Option<Vec<u8>>,
    /// Complete non-zero chunks not stored yet, by index.
    ready: Vec<(u64, Vec<u8>)>,
}

impl Chunker {
    const SIZE: u64 = CHUNK_SIZE as u64;

    fn push(&mut self, extent: Extent) {
        // The decoder guarantees order and contiguity; a gap would only shift data.
        match extent {
            Extent::Data { bytes, .. } => self.data(&bytes),
            Extent::Zero { len, .. } => self.zeros(len),
        }
    }

    fn data(&mut self, mut rest: &[u8]) {
        while !rest.is_empty() {
            let within = (self.pos % Self::SIZE) as usize;
            let take = (CHUNK_SIZE - within).min(rest.len());
            let (part, tail) = rest.split_at(take);
            if self.buf.is_some() || !is_zero(part) {
                let buf = self.buf.get_or_insert_with(|| vec![0u8; CHUNK_SIZE]);
                buf[within..within + take].copy_from_slice(part);
            }
            self.pos += take as u64;
            rest = tail;
            if self.pos.is_multiple_of(Self::SIZE) {
                self.complete();
            }
        }
    }

    fn zeros(&mut self, mut len: u64) {
        while len > 0 {
            let within = self.pos % Self::SIZE;
            if within == 0 && len >= Self::SIZE {
                let whole = len / Self::SIZE * Self::SIZE;
                self.pos += whole;
                len -= whole;
                continue;
            }
            let take = (Self::SIZE - within).min(len);
            self.pos += take;
            len -= take;
            if self.pos.is_multiple_of(Self::SIZE) {
                self.complete();
            }
        }
    }

    /// The chunk that just ended (at `pos`, a chunk boundary or the end of the disk).
    fn complete(&mut self) {
        let index = (self.pos.saturating_sub(1)) / Self::SIZE;
        // A buffer exists only once a non-zero byte arrived.
        if let Some(buf) = self.buf.take() {
            self.ready.push((index, buf));
        }
    }

    /// The end of the disk: a partial last chunk is complete (zero-padded).
    fn finish(&mut self) {
        if !self.pos.is_multiple_of(Self::SIZE) {
            self.complete();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_writers_run_every_job_and_outlive_jobs_that_panic() {
        let writers = ChunkWriters::default();
        // As many panicking jobs as there are writers: each writer must survive its own.
        for _ in 0..CHUNK_WRITERS {
            writers.run(Box::new(|| {
                panic!("a job that panics (expected by the test)")
            }));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            writers.run(Box::new(move || tx.send(i).unwrap()));
        }
        let mut ran: Vec<i32> = (0..100)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(10))
                    .expect("a job never ran")
            })
            .collect();
        ran.sort_unstable();
        assert_eq!(ran, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn chunker_cuts_extents_into_non_zero_chunks() {
        let mut c = Chunker::default();
        let size = CHUNK_SIZE as u64;
        c.push(Extent::Data {
            offset: 0,
            bytes: Bytes::from(vec![1u8; CHUNK_SIZE + 10]),
        });
        c.push(Extent::Zero {
            offset: size + 10,
            len: 3 * size,
        });
        c.push(Extent::Data {
            offset: 4 * size + 10,
            bytes: Bytes::from(vec![0u8; 100]),
        });
        c.push(Extent::Data {
            offset: 4 * size + 110,
            bytes: Bytes::from(vec![2u8; 5]),
        });
        c.finish();
        let indices: Vec<u64> = c.ready.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, vec![0, 1, 4]);
        assert_eq!(c.ready[1].1[..10], [1u8; 10]);
        assert!(is_zero(&c.ready[1].1[10..]));
        assert_eq!(c.ready[2].1[110..115], [2u8; 5]);
        assert!(is_zero(&c.ready[2].1[..110]));
    }
}

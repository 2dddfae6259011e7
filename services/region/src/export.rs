//! Exports to disk-image formats (qcow2, VHD, VMDK) through `imagefleet-export`: the image's
//! chunks are read in order, one ahead, and each goes through the writer on a blocking thread
//! (it compresses VMDK grains); the file's bytes are sent as messages of up to 1 MiB at their
//! file offsets. Runs of zeros the writer emits as shared zero pieces are not sent (the client
//! writes a sparse file); the last message carries the file's size as its offset.

use crate::disk::ChunkStream;
use crate::error::RegionError;
use crate::model::Manifest;
use bytes::Bytes;
use futures::StreamExt;
use imagefleet_chunkstore::{ChunkStore, CHUNK_SIZE};
use imagefleet_export::{is_shared_zeros, ExportFormat, Layout, Writer};
use imagefleet_proto::region::v1 as pb;
use tonic::Status;

/// Largest message data.
const MESSAGE_BYTES: usize = 1 << 20;

/// What every message of one export carries besides its piece.
#[derive(Clone)]
pub(crate) struct Header {
    pub virtual_size: u64,
    pub content_digest: String,
    pub format: pb::ExportFormat,
    pub file_size: u64,
}

impl Header {
    fn message(&self, offset: u64, data: Vec<u8>) -> pb::ExportImageChunk {
        pb::ExportImageChunk {
            offset,
            data,
            virtual_size_bytes: self.virtual_size,
            content_digest: self.content_digest.clone(),
            format: self.format as i32,
            file_size_bytes: self.file_size,
        }
    }
}

/// Turns writer pieces into messages: contiguous bytes gathered up to [`MESSAGE_BYTES`],
/// shared zero runs skipped.
struct Packer {
    /// File offset of the next piece.
    offset: u64,
    /// Where `pending` starts in the file.
    start: u64,
    pending: Vec<u8>,
    out: Vec<pb::ExportImageChunk>,
}

impl Packer {
    fn new() -> Packer {
        Packer {
            offset: 0,
            start: 0,
            pending: Vec::new(),
            out: Vec::new(),
        }
    }

    fn add(&mut self, header: &Header, pieces: impl Iterator<Item = Bytes>) {
        for piece in pieces {
            if is_shared_zeros(&piece) {
                self.flush(header);
                self.offset += piece.len() as u64;
                continue;
            }
            let mut rest = &piece[..];
            while !rest.is_empty() {
                if self.pending.is_empty() {
                    self.start = self.offset;
                }
                let take = (MESSAGE_BYTES - self.pending.len()).min(rest.len());
                self.pending.extend_from_slice(&rest[..take]);
                self.offset += take as u64;
                rest = &rest[take..];
                if self.pending.len() == MESSAGE_BYTES {
                    self.flush(header);
                }
            }
        }
    }

    fn flush(&mut self, header: &Header) {
        if !self.pending.is_empty() {
            let data = std::mem::take(&mut self.pending);
            self.out.push(header.message(self.start, data));
        }
    }
}

fn export_error(e: imagefleet_export::ExportError) -> Status {
    Status::from(RegionError::Task(format!("export: {e}")))
}

/// The export format of a request's format (RAW handled by the caller).
pub(crate) fn writer_format(format: pb::ExportFormat) -> Option<ExportFormat> {
    match format {
        pb::ExportFormat::Qcow2 => Some(ExportFormat::Qcow2),
        pb::ExportFormat::Vhd => Some(ExportFormat::Vhd),
        pb::ExportFormat::Vmdk => Some(ExportFormat::Vmdk),
        _ => None,
    }
}

/// Plans the export of a disk of `virtual_size` bytes made of `manifest`: the header its
/// messages carry, and the writer.
pub(crate) fn plan(
    format: pb::ExportFormat,
    virtual_size: u64,
    content_digest: &str,
    manifest: &Manifest,
    id_seed: u64,
) -> Result<(Header, Writer), Status> {
    let kind = writer_format(format).ok_or_else(|| Status::internal("not a file format"))?;
    let chunk_count = virtual_size.div_ceil(CHUNK_SIZE as u64);
    let mut allocated = vec![false; chunk_count as usize];
    for (idx, _) in manifest {
        if let Some(slot) = allocated.get_mut(*idx as usize) {
            *slot = true;
        }
    }
    let layout = Layout {
        virtual_size,
        chunk_size: CHUNK_SIZE as u64,
        allocated,
    };
    let writer = Writer::new(kind, layout, id_seed).map_err(export_error)?;
    let header = Header {
        virtual_size,
        content_digest: content_digest.to_string(),
        format,
        file_size: writer.file_size().unwrap_or(0),
    };
    Ok((header, writer))
}

/// The export stream: the writer's leading bytes, each allocated chunk through the writer,
/// its trailing bytes, then the closing message at the file's end. Chunks are read (and
/// verified) by [`crate::disk::stream_chunks`], one ahead of the writer, so reading the next
/// chunk overlaps writing and sending this one.
pub(crate) fn stream(
    chunks: ChunkStore,
    manifest: Manifest,
    header: Header,
    writer: Writer,
) -> ChunkStream<pb::ExportImageChunk> {
    struct State {
        read: ChunkStream<(u64, Vec<u8>)>,
        header: Header,
        writer: Option<Writer>,
        packer: Packer,
        queued: std::collections::VecDeque<pb::ExportImageChunk>,
        started: bool,
        done: bool,
    }
    let state = State {
        read: crate::disk::stream_chunks(chunks, manifest, true, |idx, data| (idx, data), None),
        header,
        writer: Some(writer),
        packer: Packer::new(),
        queued: Default::default(),
        started: false,
        done: false,
    };
    Box::pin(futures::stream::unfold(Some(state), |state| async move {
        let mut s = state?;
        loop {
            if let Some(message) = s.queued.pop_front() {
                return Some((Ok(message), Some(s)));
            }
            if s.done {
                return None;
            }
            let mut writer = s.writer.take()?;
            if !s.started {
                s.started = true;
                let pieces = writer.start();
                s.packer.add(&s.header, pieces);
                s.writer = Some(writer);
            } else {
                match s.read.next().await {
                    Some(Ok((idx, data))) => {
                        let header = s.header.clone();
                        let mut packer = std::mem::replace(&mut s.packer, Packer::new());
                        // The writer may compress (VMDK grains): off the async threads.
                        let step = tokio::task::spawn_blocking(move || {
                            let len = (header.virtual_size - idx * CHUNK_SIZE as u64)
                                .min(CHUNK_SIZE as u64)
                                as usize;
                            let mut data = Bytes::from(data);
                            data.truncate(len);
                            let pieces = writer.chunk(idx, data).map_err(export_error)?;
                            packer.add(&header, pieces);
                            Ok::<_, Status>((writer, packer))
                        })
                        .await;
                        match step {
                            Ok(Ok((writer, packer))) => {
                                s.writer = Some(writer);
                                s.packer = packer;
                            }
                            Ok(Err(status)) => return Some((Err(status), None)),
                            Err(e) => {
                                return Some((
                                    Err(Status::from(RegionError::Task(e.to_string()))),
                                    None,
                                ))
                            }
                        }
                    }
                    Some(Err(status)) => return Some((Err(status), None)),
                    None => {
                        match writer.finish() {
                            Ok(pieces) => s.packer.add(&s.header, pieces),
                            Err(e) => return Some((Err(export_error(e)), None)),
                        }
                        s.packer.flush(&s.header);
                        let end = s.packer.offset;
                        let closing = s.header.message(end, Vec::new());
                        s.packer.out.push(closing);
                        s.done = true;
                    }
                }
            }
            s.queued.extend(s.packer.out.drain(..));
        }
    }))
}

//! Export writers: turn a guest disk, given as its sequence of chunks, into the bytes of a
//! disk-image file (raw, qcow2, dynamic VHD, or streamOptimized VMDK), produced as a stream of
//! [`bytes::Bytes`] pieces in file order. The crate does no I/O.
//!
//! # Contract
//!
//! The caller knows the disk before streaming: its [`Layout`] gives the virtual size, the
//! chunk size (1 MiB in the chunk store; the last chunk may be shorter) and which chunks are
//! allocated (`false` = all zeros, not stored). Then:
//!
//! 1. [`Writer::new`] checks the layout and plans the whole file.
//! 2. [`Writer::start`] returns the leading bytes (headers, tables).
//! 3. [`Writer::chunk`] is called once per **allocated** chunk, in increasing index order,
//!    with the chunk's full data (`chunk_size` bytes, or the tail length for the last chunk).
//!    Zero chunks are never passed; the writer knows them from the layout. Any other call
//!    order or length is an [`ExportError`], never a panic.
//! 4. [`Writer::finish`] returns the trailing bytes (footers, VMDK directory and end marker)
//!    and fails if an allocated chunk was never passed.
//!
//! A call refused for order or length leaves the writer unchanged, so the caller may retry
//! with the right chunk; after any other error ([`ExportError::Compression`],
//! [`ExportError::FileTooLarge`]) the export must be abandoned.
//!
//! Writing every [`Pieces`] returned, in call order, gives the whole file. When
//! [`Writer::file_size`] is `Some` (raw, qcow2, VHD), the file has exactly that many bytes, so
//! it can be announced up front (a `Content-Length`).
//!
//! # Sparseness and memory
//!
//! Zero chunks cost nothing: they are never compressed, hashed or copied. Where the format can
//! say "unallocated" (qcow2 L2 entries, VHD BAT entries, VMDK grain-table entries) no bytes are
//! written for them. Where zeros must appear in the file (a raw file has no holes in a stream;
//! the zero parts of a VHD block that holds data; padding), the raw writer and the others emit
//! them themselves, as [`Pieces`] zero runs handed out as slices of one static zero buffer:
//! no allocation per zero chunk. [`is_shared_zeros`] tells such a piece apart.
//!
//! A writer keeps only small per-file tables (a qcow2 L1 table, a VHD block map, a VMDK grain
//! directory: a few KiB per GiB of virtual size) plus the output of the current call. Tables
//! that grow with the data (qcow2 L2 tables, VMDK grain tables) are produced one at a time
//! next to the data they describe, so memory per export stays bounded whatever the image size.
//!
//! # Virtual size as each format declares it
//!
//! - raw: exactly `virtual_size` bytes.
//! - qcow2 and VMDK: `virtual_size` rounded up to a multiple of 512 bytes.
//! - VHD: `virtual_size` rounded up to 512 bytes, then up to the next size that a
//!   cylinder/head/sector geometry describes exactly (the VHD specification's algorithm),
//!   so readers that size the disk from its geometry and readers that use the footer's
//!   current size agree. From the maximum geometry (about 127 GiB) on, the size is only
//!   rounded to 512 bytes.
//!
//! Bytes past `virtual_size` are zeros. [`Writer::virtual_size`] gives the declared size.
//!
//! # Formats
//!
//! - [`ExportFormat::Raw`]: the disk bytes.
//! - [`ExportFormat::Qcow2`]: version 3, 64 KiB clusters, 16-bit refcounts, no compression,
//!   no backing file. The whole layout is computed up front: header, refcount table, refcount
//!   blocks sized for the final file, L1 table; then for each 512 MiB guest range that holds
//!   data, its L2 table followed by its data clusters in guest order. Every cluster has
//!   refcount 1 and every L1/L2 entry carries the COPIED flag; zero chunks have unallocated
//!   (zero) L2 entries.
//! - [`ExportFormat::Vhd`]: dynamic VHD with 2 MiB blocks: footer copy, dynamic header, block
//!   allocation table, present blocks in guest order (sector bitmap all ones, then 2 MiB of
//!   data with the block's zero chunks written as zeros), footer. A block is present when any
//!   of its chunks is allocated. Timestamps are zero.
//! - [`ExportFormat::Vmdk`]: a streamOptimized monolithic sparse extent: header with the
//!   embedded descriptor (`createType="streamOptimized"`, `ddb.adapterType = "lsilogic"`,
//!   255/63 geometry), then 64 KiB grains compressed with zlib, each behind its grain marker.
//!   Each grain table follows the grains it maps (when the stream moves past its 32 MiB
//!   range); `finish` writes the last grain table, the grain directory, the footer and the
//!   end-of-stream marker. Grains that are all zeros, including those inside allocated
//!   chunks, are not written; grain tables without grains are left out (directory entry 0).
//!
//! The VMDK descriptor's extent line names `disk.vmdk`: for a monolithic file with an
//! embedded descriptor, the extent is the file itself, whatever it is called.
//!
//! Output is a pure function of the format, the layout, `id_seed` and the chunk data: the
//! VHD unique id and the VMDK content ids are derived from `id_seed`.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use imagefleet_export::{ExportFormat, Layout, Writer};
//!
//! // 3 MiB, of which only the middle chunk holds data.
//! let layout = Layout {
//!     virtual_size: 3 << 20,
//!     chunk_size: 1 << 20,
//!     allocated: vec![false, true, false],
//! };
//! let mut writer = Writer::new(ExportFormat::Qcow2, layout, 7)?;
//! let announced = writer.file_size();
//! let mut file = Vec::new();
//! file.extend(writer.start().flat_map(|piece| piece.to_vec()));
//! let chunk = Bytes::from(vec![1u8; 1 << 20]);
//! file.extend(writer.chunk(1, chunk)?.flat_map(|piece| piece.to_vec()));
//! file.extend(writer.finish()?.flat_map(|piece| piece.to_vec()));
//! assert_eq!(Some(file.len() as u64), announced);
//! # Ok::<(), imagefleet_export::ExportError>(())
//! ```

mod error;
mod layout;
mod pieces;
mod qcow2;
mod raw;
mod vhd;
mod vmdk;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

pub use error::ExportError;
pub use layout::{Layout, MAX_CHUNK_SIZE, MAX_VIRTUAL_SIZE, MIN_CHUNK_SIZE};
pub use pieces::{is_shared_zeros, Pieces, ZERO_PIECE_LEN};

use layout::ChunkOrder;

/// A disk-image file format to export to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// The disk's bytes, zeros included.
    Raw,
    /// qcow2 version 3.
    Qcow2,
    /// Dynamic (sparse) VHD.
    Vhd,
    /// streamOptimized VMDK.
    Vmdk,
}

impl ExportFormat {
    /// Every format, in a stable order.
    pub const ALL: [ExportFormat; 4] = [
        ExportFormat::Raw,
        ExportFormat::Qcow2,
        ExportFormat::Vhd,
        ExportFormat::Vmdk,
    ];

    /// The format's name: `raw`, `qcow2`, `vhd` or `vmdk` (also its usual file extension).
    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Raw => "raw",
            ExportFormat::Qcow2 => "qcow2",
            ExportFormat::Vhd => "vhd",
            ExportFormat::Vmdk => "vmdk",
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExportFormat {
    type Err = ExportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExportFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| ExportError::UnknownFormat(s.to_string()))
    }
}

enum Inner {
    Raw(raw::RawWriter),
    Qcow2(qcow2::Qcow2Writer),
    Vhd(vhd::VhdWriter),
    Vmdk(Box<vmdk::VmdkWriter>),
}

/// Streams one disk into one image file; see the crate documentation for the call contract.
pub struct Writer {
    format: ExportFormat,
    layout: Layout,
    order: ChunkOrder,
    started: bool,
    inner: Inner,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("format", &self.format)
            .field("virtual_size", &self.layout.virtual_size)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Checks `layout` and plans the file. `id_seed` determines the file's identifiers (VHD
    /// unique id, VMDK content ids); pass a different seed per export, e.g. from the image id.
    pub fn new(format: ExportFormat, layout: Layout, id_seed: u64) -> Result<Writer, ExportError> {
        layout.validate()?;
        let inner = match format {
            ExportFormat::Raw => Inner::Raw(raw::RawWriter::new(&layout)),
            ExportFormat::Qcow2 => Inner::Qcow2(qcow2::Qcow2Writer::new(&layout)?),
            ExportFormat::Vhd => Inner::Vhd(vhd::VhdWriter::new(&layout, id_seed)?),
            ExportFormat::Vmdk => Inner::Vmdk(Box::new(vmdk::VmdkWriter::new(&layout, id_seed))),
        };
        Ok(Writer {
            format,
            layout,
            order: ChunkOrder::default(),
            started: false,
            inner,
        })
    }

    /// The format being written.
    pub fn format(&self) -> ExportFormat {
        self.format
    }

    /// The layout being exported.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The virtual size the file declares (see "Virtual size" in the crate docs).
    pub fn virtual_size(&self) -> u64 {
        match &self.inner {
            Inner::Raw(_) => self.layout.virtual_size,
            Inner::Qcow2(w) => w.virtual_size(),
            Inner::Vhd(w) => w.virtual_size(),
            Inner::Vmdk(w) => w.virtual_size(),
        }
    }

    /// The exact file size when known up front (raw, qcow2, VHD); `None` for VMDK, whose
    /// grains are compressed.
    pub fn file_size(&self) -> Option<u64> {
        match &self.inner {
            Inner::Raw(_) => Some(self.layout.virtual_size),
            Inner::Qcow2(w) => Some(w.file_size()),
            Inner::Vhd(w) => Some(w.file_size()),
            Inner::Vmdk(_) => None,
        }
    }

    /// The bytes before the first chunk (headers, tables). A second call returns nothing.
    pub fn start(&mut self) -> Pieces {
        if self.started {
            return Pieces::new();
        }
        self.started = true;
        match &mut self.inner {
            Inner::Raw(_) => Pieces::new(),
            Inner::Qcow2(w) => w.start(&self.layout),
            Inner::Vhd(w) => w.start(&self.layout),
            Inner::Vmdk(w) => w.start(),
        }
    }

    /// The bytes for allocated chunk `index`, preceded by whatever the file holds between the
    /// previous chunk and this one (raw zeros, VHD block padding, qcow2 L2 table, VMDK grain
    /// table). `index` must be the next allocated chunk and `data` its full length.
    pub fn chunk(&mut self, index: u64, data: Bytes) -> Result<Pieces, ExportError> {
        if !self.started {
            return Err(ExportError::NotStarted { index });
        }
        self.order.accept(&self.layout, index, data.len() as u64)?;
        match &mut self.inner {
            Inner::Raw(w) => Ok(w.chunk(&self.layout, index, data)),
            Inner::Qcow2(w) => Ok(w.chunk(&self.layout, index, data)),
            Inner::Vhd(w) => Ok(w.chunk(&self.layout, index, data)),
            Inner::Vmdk(w) => w.chunk(&self.layout, index, &data),
        }
    }

    /// The trailing bytes (raw tail zeros, VHD footer, VMDK tables, footer and end marker).
    /// Fails if an allocated chunk was never passed. Calls `start` first if it never ran.
    pub fn finish(mut self) -> Result<Pieces, ExportError> {
        self.order.finish(&self.layout)?;
        let mut out = self.start();
        let tail = match &mut self.inner {
            Inner::Raw(w) => w.finish(&self.layout),
            Inner::Qcow2(_) => Pieces::new(),
            Inner::Vhd(w) => w.finish(),
            Inner::Vmdk(w) => w.finish()?,
        };
        out.append(tail);
        Ok(out)
    }
}

/// A 64-bit mixer (splitmix64) that turns the caller's seed into file identifiers.
pub(crate) fn mix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

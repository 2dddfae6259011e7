//! The streamOptimized VMDK writer: a monolithic sparse extent with zlib-compressed grains
//! behind markers, written front to back (little-endian structures).
//!
//! File layout:
//!
//! ```text
//! sector 0          sparse extent header (gdOffset = GD_AT_END)
//! sectors 1..21     embedded descriptor
//! sector 128        grains: grain marker (lba, size) + zlib data, padded to a sector,
//!                   for every non-zero 64 KiB grain, in guest order; after the grains of a
//!                   32 MiB range, its grain-table marker and grain table (512 entries)
//! end               grain-directory marker and directory, footer marker and footer (the
//!                   header with the directory's offset), end-of-stream marker
//! ```
//!
//! Only the grain directory (4 bytes per 32 MiB) and the current grain table stay in memory.

use bytes::{BufMut, Bytes};
use flate2::{Compress, Compression, FlushCompress, Status};

use crate::{mix64, pieces, ExportError, Layout, Pieces};

const SECTOR: u64 = 512;
const GRAIN: u64 = 64 << 10;
const GRAIN_SECTORS: u64 = GRAIN / SECTOR;
const GT_ENTRIES: u64 = 512;
/// Guest bytes mapped by one grain table: 32 MiB.
const GT_SPAN: u64 = GT_ENTRIES * GRAIN;
const DESCRIPTOR_OFFSET: u64 = 1;
const DESCRIPTOR_SECTORS: u64 = 20;
/// Sectors before the first grain: header and descriptor, padded to a grain.
const OVERHEAD_SECTORS: u64 = 128;
const GD_AT_END: u64 = u64::MAX;
const FLAG_VALID_NEWLINE_TEST: u32 = 1;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;
/// Bytes of a grain marker before the compressed data: lba (u64) and size (u32).
const GRAIN_MARKER_LEN: usize = 12;
/// Heads and sectors per track declared for the lsilogic adapter.
const HEADS: u64 = 255;
const SECTORS_PER_TRACK: u64 = 63;

pub(crate) struct VmdkWriter {
    /// Capacity in sectors.
    capacity: u64,
    cid: u32,
    long_content_id: u128,
    /// File bytes emitted so far.
    pos: u64,
    /// Grain directory: sector of each grain table, 0 when the range has no grains.
    directory: Vec<u32>,
    /// The grain table being filled and its index in the directory.
    table: Vec<u32>,
    table_index: Option<u64>,
    compressor: Compress,
}

impl VmdkWriter {
    pub(crate) fn new(layout: &Layout, id_seed: u64) -> Self {
        let capacity = layout.virtual_size.div_ceil(SECTOR);
        let tables = (capacity * SECTOR).div_ceil(GT_SPAN);
        let mut cid = mix64(id_seed ^ 0x564d_444b) as u32;
        if cid == u32::MAX {
            cid = 0x1;
        }
        let long_content_id =
            (u128::from(mix64(id_seed ^ 0x4c43_4944)) << 64) | u128::from(mix64(id_seed));
        VmdkWriter {
            capacity,
            cid,
            long_content_id,
            pos: 0,
            directory: vec![0; tables as usize],
            table: vec![0; GT_ENTRIES as usize],
            table_index: None,
            compressor: Compress::new(Compression::default(), true),
        }
    }

    pub(crate) fn virtual_size(&self) -> u64 {
        self.capacity * SECTOR
    }

    fn header(&self, gd_offset: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(SECTOR as usize);
        h.put_slice(b"KDMV");
        h.put_u32_le(3); // version
        h.put_u32_le(FLAG_VALID_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS);
        h.put_u64_le(self.capacity);
        h.put_u64_le(GRAIN_SECTORS);
        h.put_u64_le(DESCRIPTOR_OFFSET);
        h.put_u64_le(DESCRIPTOR_SECTORS);
        h.put_u32_le(GT_ENTRIES as u32);
        h.put_u64_le(0); // no redundant grain directory
        h.put_u64_le(gd_offset);
        h.put_u64_le(OVERHEAD_SECTORS);
        h.put_u8(0); // clean shutdown
        h.put_slice(b"\n \r\n"); // newline-detection characters
        h.put_u16_le(COMPRESSION_DEFLATE);
        h.resize(SECTOR as usize, 0);
        h
    }

    fn descriptor(&self) -> String {
        let cylinders = self.capacity.div_ceil(HEADS * SECTORS_PER_TRACK).min(65535);
        format!(
            "# Disk DescriptorFile\n\
             version=1\n\
             CID={cid:08x}\n\
             parentCID=ffffffff\n\
             createType=\"streamOptimized\"\n\
             \n\
             # Extent description\n\
             RW {capacity} SPARSE \"disk.vmdk\"\n\
             \n\
             # The Disk Data Base\n\
             #DDB\n\
             \n\
             ddb.adapterType = \"lsilogic\"\n\
             ddb.geometry.cylinders = \"{cylinders}\"\n\
             ddb.geometry.heads = \"{HEADS}\"\n\
             ddb.geometry.sectors = \"{SECTORS_PER_TRACK}\"\n\
             ddb.longContentID = \"{long:032x}\"\n\
             ddb.virtualHWVersion = \"4\"\n",
            cid = self.cid,
            capacity = self.capacity,
            long = self.long_content_id,
        )
    }

    pub(crate) fn start(&mut self) -> Pieces {
        let mut out = Pieces::new();
        out.push(self.header(GD_AT_END));
        let descriptor = self.descriptor().into_bytes();
        let descriptor_len = descriptor.len() as u64;
        out.push(descriptor);
        out.push_zeros(OVERHEAD_SECTORS * SECTOR - SECTOR - descriptor_len);
        self.pos = OVERHEAD_SECTORS * SECTOR;
        out
    }

    fn sector_of(&self, pos: u64) -> Result<u32, ExportError> {
        u32::try_from(pos / SECTOR).map_err(|_| ExportError::FileTooLarge {
            format: "vmdk",
            limit: u64::from(u32::MAX) * SECTOR,
        })
    }

    /// A grain marker with the zlib stream of `data` followed by `padding` zeros, padded to a
    /// whole sector.
    fn compress_grain(
        &mut self,
        grain: u64,
        data: &[u8],
        padding: usize,
    ) -> Result<Vec<u8>, ExportError> {
        let failed = |message: String| ExportError::Compression { grain, message };
        let mut out = Vec::with_capacity(GRAIN as usize + GRAIN as usize / 8 + 1024);
        out.resize(GRAIN_MARKER_LEN, 0);
        self.compressor.reset();
        for part in [data, pieces::zeros(padding)] {
            let mut input = part;
            while !input.is_empty() {
                reserve(&mut out);
                let before = self.compressor.total_in();
                self.compressor
                    .compress_vec(input, &mut out, FlushCompress::None)
                    .map_err(|e| failed(e.to_string()))?;
                let used = (self.compressor.total_in() - before) as usize;
                input = input.get(used..).unwrap_or_default();
            }
        }
        let mut rounds = 0;
        loop {
            reserve(&mut out);
            let status = self
                .compressor
                .compress_vec(&[], &mut out, FlushCompress::Finish)
                .map_err(|e| failed(e.to_string()))?;
            if status == Status::StreamEnd {
                break;
            }
            rounds += 1;
            if rounds > 1024 {
                return Err(failed("compressor made no progress".into()));
            }
        }
        let size = (out.len() - GRAIN_MARKER_LEN) as u32;
        out[..8].copy_from_slice(&(grain * GRAIN_SECTORS).to_le_bytes());
        out[8..12].copy_from_slice(&size.to_le_bytes());
        let padded = (out.len() as u64).div_ceil(SECTOR) * SECTOR;
        out.resize(padded as usize, 0);
        Ok(out)
    }

    /// Writes the current grain table, if it maps any grain, and records it in the directory.
    fn flush_table(&mut self, out: &mut Pieces) -> Result<(), ExportError> {
        let Some(index) = self.table_index.take() else {
            return Ok(());
        };
        if self.table.iter().all(|e| *e == 0) {
            return Ok(());
        }
        let table_bytes = GT_ENTRIES * 4;
        out.push(marker(table_bytes / SECTOR, MARKER_GT));
        let sector = self.sector_of(self.pos + SECTOR)?;
        let mut table = Vec::with_capacity(table_bytes as usize);
        for entry in &mut self.table {
            table.put_u32_le(std::mem::take(entry));
        }
        out.push(table);
        self.pos += SECTOR + table_bytes;
        if let Some(slot) = self.directory.get_mut(index as usize) {
            *slot = sector;
        }
        Ok(())
    }

    pub(crate) fn chunk(
        &mut self,
        layout: &Layout,
        index: u64,
        data: &Bytes,
    ) -> Result<Pieces, ExportError> {
        let mut out = Pieces::new();
        let first_grain = index * layout.chunk_size / GRAIN;
        for (k, grain_data) in data.chunks(GRAIN as usize).enumerate() {
            if grain_data.iter().all(|b| *b == 0) {
                continue;
            }
            let grain = first_grain + k as u64;
            let table_index = grain / GT_ENTRIES;
            if self.table_index != Some(table_index) {
                self.flush_table(&mut out)?;
                self.table_index = Some(table_index);
            }
            let padding = GRAIN as usize - grain_data.len();
            let bytes = self.compress_grain(grain, grain_data, padding)?;
            let sector = self.sector_of(self.pos)?;
            if let Some(entry) = self.table.get_mut((grain % GT_ENTRIES) as usize) {
                *entry = sector;
            }
            self.pos += bytes.len() as u64;
            out.push(bytes);
        }
        Ok(out)
    }

    pub(crate) fn finish(&mut self) -> Result<Pieces, ExportError> {
        let mut out = Pieces::new();
        self.flush_table(&mut out)?;

        let directory_bytes = self.directory.len() as u64 * 4;
        let directory_sectors = directory_bytes.div_ceil(SECTOR);
        out.push(marker(directory_sectors, MARKER_GD));
        let gd_sector = self.sector_of(self.pos + SECTOR)?;
        let mut directory = Vec::with_capacity((directory_sectors * SECTOR) as usize);
        for entry in &self.directory {
            directory.put_u32_le(*entry);
        }
        directory.resize((directory_sectors * SECTOR) as usize, 0);
        out.push(directory);
        self.pos += SECTOR + directory_sectors * SECTOR;

        out.push(marker(1, MARKER_FOOTER));
        out.push(self.header(u64::from(gd_sector)));
        out.push(marker(0, MARKER_EOS));
        self.pos += 3 * SECTOR;
        self.sector_of(self.pos)?;
        Ok(out)
    }
}

/// A metadata marker sector: sectors of metadata that follow, size 0, type.
fn marker(sectors: u64, kind: u32) -> Bytes {
    let mut m = Vec::with_capacity(SECTOR as usize);
    m.put_u64_le(sectors);
    m.put_u32_le(0);
    m.put_u32_le(kind);
    m.resize(SECTOR as usize, 0);
    Bytes::from(m)
}

fn reserve(out: &mut Vec<u8>) {
    if out.capacity() - out.len() < 4096 {
        out.reserve(64 << 10);
    }
}

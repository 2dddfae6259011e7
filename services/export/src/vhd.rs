//! The dynamic VHD writer: 2 MiB blocks, big-endian structures, one's-complement checksums.
//!
//! File layout:
//!
//! ```text
//! 0                footer copy (512 bytes)
//! 512              dynamic disk header (1024 bytes)
//! 1536             block allocation table (u32 sector offset per block, or 0xFFFFFFFF),
//!                  padded to a sector
//! ...              present blocks in guest order: sector bitmap (512 bytes, all ones),
//!                  then 2 MiB of data
//! end - 512        footer
//! ```
//!
//! A block is present when any chunk in it is allocated; its zero chunks and any part past
//! the end of the disk are written as zeros. The declared size is rounded up to a size that a
//! CHS geometry describes exactly (see the crate docs).

use bytes::{BufMut, Bytes};

use crate::{mix64, ExportError, Layout, Pieces};

const SECTOR: u64 = 512;
const BLOCK: u64 = 2 << 20;
/// One bit per sector of a block, 512 bytes for 2 MiB blocks: exactly one sector.
const BITMAP: u64 = BLOCK / SECTOR / 8;
const FOOTER_LEN: u64 = 512;
const DYNAMIC_HEADER_LEN: u64 = 1024;
const BAT_OFFSET: u64 = FOOTER_LEN + DYNAMIC_HEADER_LEN;
const UNUSED_BLOCK: u32 = 0xFFFF_FFFF;
/// The largest size a geometry describes: 65535 cylinders, 16 heads, 255 sectors per track.
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// The features field: bit 1 is reserved and always set.
const FEATURES_RESERVED: u32 = 0x0000_0002;
const FORMAT_VERSION: u32 = 0x0001_0000;
const DISK_TYPE_DYNAMIC: u32 = 3;

static BITMAP_ONES: [u8; BITMAP as usize] = [0xFF; BITMAP as usize];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) cylinders: u16,
    pub(crate) heads: u8,
    pub(crate) sectors_per_track: u8,
}

impl Geometry {
    pub(crate) fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }
}

/// The VHD specification's geometry for a disk of `total` sectors (rounds down).
pub(crate) fn geometry(total: u64) -> Geometry {
    let total = total.min(MAX_CHS_SECTORS);
    let (sectors_per_track, heads, cylinder_times_heads);
    if total >= 65535 * 16 * 63 {
        sectors_per_track = 255;
        heads = 16;
        cylinder_times_heads = total / 255;
    } else {
        let mut spt = 17;
        let mut cth = total / 17;
        let mut h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            spt = 31;
            h = 16;
            cth = total / 31;
        }
        if cth >= h * 1024 {
            spt = 63;
            h = 16;
            cth = total / 63;
        }
        sectors_per_track = spt;
        heads = h;
        cylinder_times_heads = cth;
    }
    Geometry {
        cylinders: (cylinder_times_heads / heads) as u16,
        heads: heads as u8,
        sectors_per_track: sectors_per_track as u8,
    }
}

/// The smallest geometry covering `needed` sectors, and the sector count the file declares.
pub(crate) fn declared_size(needed: u64) -> Result<(u64, Geometry), ExportError> {
    if needed >= MAX_CHS_SECTORS {
        return Ok((needed, geometry(MAX_CHS_SECTORS)));
    }
    // A geometry's granularity is at most 16 * 255 sectors; the search ends well before.
    for extra in 0..(1u64 << 16) {
        let g = geometry(needed + extra);
        if g.sectors() >= needed {
            return Ok((g.sectors(), g));
        }
    }
    Err(ExportError::InvalidLayout(format!(
        "no VHD geometry covers {needed} sectors"
    )))
}

fn checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |sum, b| sum.wrapping_add(u32::from(*b)))
}

pub(crate) struct VhdWriter {
    /// Declared size in bytes.
    size: u64,
    footer: Bytes,
    dynamic_header: Bytes,
    /// Blocks in the allocation table (covering the declared size).
    table_entries: u64,
    /// Bytes of the allocation table, padded to a sector.
    table_bytes: u64,
    present_blocks: u64,
    chunks_per_block: u64,
    /// The block being written and how many of its data bytes are out.
    open: Option<(u64, u64)>,
}

impl VhdWriter {
    pub(crate) fn new(layout: &Layout, id_seed: u64) -> Result<Self, ExportError> {
        let (sectors, geometry) = declared_size(layout.virtual_size.div_ceil(SECTOR))?;
        let size = sectors * SECTOR;
        let table_entries = size.div_ceil(BLOCK);
        let table_bytes = (table_entries * 4).div_ceil(SECTOR) * SECTOR;
        let chunks_per_block = BLOCK / layout.chunk_size;
        let mut present_blocks = 0;
        let mut last = None;
        for (index, _) in layout.allocated.iter().enumerate().filter(|(_, a)| **a) {
            let block = index as u64 / chunks_per_block;
            if last != Some(block) {
                present_blocks += 1;
                last = Some(block);
            }
        }
        let file_end = BAT_OFFSET + table_bytes + present_blocks * (BITMAP + BLOCK);
        if file_end / SECTOR > u64::from(u32::MAX - 1) {
            return Err(ExportError::FileTooLarge {
                format: "vhd",
                limit: u64::from(u32::MAX - 1) * SECTOR,
            });
        }

        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&mix64(id_seed).to_be_bytes());
        id[8..].copy_from_slice(&mix64(id_seed ^ 0x5648_4400).to_be_bytes());
        id[6] = (id[6] & 0x0F) | 0x40;
        id[8] = (id[8] & 0x3F) | 0x80;

        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.put_slice(b"conectix");
        footer.put_u32(FEATURES_RESERVED);
        footer.put_u32(FORMAT_VERSION);
        footer.put_u64(FOOTER_LEN); // data offset: the dynamic header
        footer.put_u32(0); // timestamp: zero, so output depends only on the inputs
        footer.put_slice(b"imfl"); // creator application
        footer.put_u32(0x0001_0000); // creator version
        footer.put_slice(b"Wi2k"); // creator host OS
        footer.put_u64(size); // original size
        footer.put_u64(size); // current size
        footer.put_u16(geometry.cylinders);
        footer.put_u8(geometry.heads);
        footer.put_u8(geometry.sectors_per_track);
        footer.put_u32(DISK_TYPE_DYNAMIC);
        let checksum_at = footer.len();
        footer.put_u32(0);
        footer.put_slice(&id);
        footer.put_u8(0); // saved state
        footer.resize(FOOTER_LEN as usize, 0);
        let sum = checksum(&footer);
        footer[checksum_at..checksum_at + 4].copy_from_slice(&sum.to_be_bytes());

        let mut header = Vec::with_capacity(DYNAMIC_HEADER_LEN as usize);
        header.put_slice(b"cxsparse");
        header.put_u64(u64::MAX); // data offset: unused
        header.put_u64(BAT_OFFSET);
        header.put_u32(FORMAT_VERSION);
        header.put_u32(table_entries as u32);
        header.put_u32(BLOCK as u32);
        let checksum_at = header.len();
        header.put_u32(0);
        // Parent id, timestamp, name and locators: none (all zero).
        header.resize(DYNAMIC_HEADER_LEN as usize, 0);
        let sum = checksum(&header);
        header[checksum_at..checksum_at + 4].copy_from_slice(&sum.to_be_bytes());

        Ok(VhdWriter {
            size,
            footer: Bytes::from(footer),
            dynamic_header: Bytes::from(header),
            table_entries,
            table_bytes,
            present_blocks,
            chunks_per_block,
            open: None,
        })
    }

    pub(crate) fn virtual_size(&self) -> u64 {
        self.size
    }

    pub(crate) fn file_size(&self) -> u64 {
        BAT_OFFSET + self.table_bytes + self.present_blocks * (BITMAP + BLOCK) + FOOTER_LEN
    }

    pub(crate) fn start(&mut self, layout: &Layout) -> Pieces {
        let mut out = Pieces::new();
        out.push(self.footer.clone());
        out.push(self.dynamic_header.clone());
        let mut table = Vec::with_capacity(self.table_bytes as usize);
        let mut next_sector = (BAT_OFFSET + self.table_bytes) / SECTOR;
        for block in 0..self.table_entries {
            let first = block * self.chunks_per_block;
            let present = (first..first + self.chunks_per_block).any(|i| layout.is_allocated(i));
            if present {
                table.put_u32(next_sector as u32);
                next_sector += (BITMAP + BLOCK) / SECTOR;
            } else {
                table.put_u32(UNUSED_BLOCK);
            }
        }
        table.resize(self.table_bytes as usize, 0xFF);
        out.push(table);
        out
    }

    fn close_block(&mut self, out: &mut Pieces) {
        if let Some((_, filled)) = self.open.take() {
            out.push_zeros(BLOCK - filled);
        }
    }

    pub(crate) fn chunk(&mut self, layout: &Layout, index: u64, data: Bytes) -> Pieces {
        let mut out = Pieces::new();
        let block = index / self.chunks_per_block;
        let in_block = (index % self.chunks_per_block) * layout.chunk_size;
        if matches!(self.open, Some((open, _)) if open != block) {
            self.close_block(&mut out);
        }
        let filled = match self.open {
            Some((_, filled)) => filled,
            None => {
                out.push(Bytes::from_static(&BITMAP_ONES));
                0
            }
        };
        out.push_zeros(in_block.saturating_sub(filled));
        let len = data.len() as u64;
        out.push(data);
        self.open = Some((block, in_block + len));
        out
    }

    pub(crate) fn finish(&mut self) -> Pieces {
        let mut out = Pieces::new();
        self.close_block(&mut out);
        out.push(self.footer.clone());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_specification() {
        // 10 MiB = 20480 sectors: 17 sectors per track, 4 heads, 301 cylinders.
        let g = geometry(20480);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (301, 4, 17));
        // The maximum geometry.
        let g = geometry(u64::MAX);
        assert_eq!(
            (g.cylinders, g.heads, g.sectors_per_track),
            (65535, 16, 255)
        );
    }

    #[test]
    fn declared_size_covers_and_matches_its_geometry() {
        for needed in [
            1u64,
            100,
            20480,
            20481,
            10_250,
            2_000_000,
            64_000_000,
            MAX_CHS_SECTORS - 1,
        ] {
            let (sectors, g) = declared_size(needed).unwrap();
            assert!(sectors >= needed, "{needed}");
            assert_eq!(sectors, g.sectors(), "{needed}");
            assert!(
                sectors - needed < 16 * 255 * 2,
                "{needed} rounds to {sectors}"
            );
        }
        let (sectors, g) = declared_size(MAX_CHS_SECTORS + 7).unwrap();
        assert_eq!(sectors, MAX_CHS_SECTORS + 7);
        assert_eq!(g.sectors(), MAX_CHS_SECTORS);
    }

    #[test]
    fn checksum_is_ones_complement_of_byte_sum() {
        assert_eq!(checksum(&[1, 2, 3]), !6u32);
    }
}

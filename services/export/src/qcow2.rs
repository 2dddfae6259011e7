//! The qcow2 writer: version 3, 64 KiB clusters, 16-bit refcounts, no compression.
//!
//! File layout, all computed in `new` from the layout's allocation flags:
//!
//! ```text
//! cluster 0            header (104 bytes, no extensions)
//! refcount table       one entry per refcount block
//! refcount blocks      refcount 1 for every cluster of the final file
//! L1 table             one entry per 512 MiB guest range (COPIED | L2 offset, or 0)
//! per range with data  its L2 table, then its data clusters in guest order
//! ```
//!
//! Each L2 table is produced when the first chunk of its range arrives, so only one is in
//! memory at a time. The last data cluster is padded with zeros to a whole cluster, so the
//! file is exactly `clusters * 64 KiB`.

use bytes::{BufMut, Bytes};

use crate::{ExportError, Layout, Pieces};

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// L2 entries per table (one table is one cluster of u64 entries).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Guest bytes mapped by one L2 table: 512 MiB.
const L2_SPAN: u64 = L2_ENTRIES * CLUSTER;
const REFCOUNT_ORDER: u32 = 4;
/// Refcount entries per refcount block (16-bit entries in one cluster).
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
/// L1/L2 entry flag: the cluster's refcount is exactly 1.
const OFLAG_COPIED: u64 = 1 << 63;
const HEADER_LEN: u32 = 104;

pub(crate) struct Qcow2Writer {
    /// Declared virtual size: the layout's rounded up to 512 bytes.
    size: u64,
    /// Per L1 entry: file offset of its L2 table, 0 when its range holds no data.
    l2_offsets: Vec<u64>,
    refcount_table_clusters: u64,
    refcount_blocks: u64,
    l1_clusters: u64,
    total_clusters: u64,
    /// Chunks per L2 range.
    chunks_per_range: u64,
    /// The L2 range whose table was last written.
    range: Option<u64>,
}

fn invalid(msg: &str) -> ExportError {
    ExportError::InvalidLayout(msg.to_string())
}

impl Qcow2Writer {
    pub(crate) fn new(layout: &Layout) -> Result<Self, ExportError> {
        let size = layout.virtual_size.div_ceil(512) * 512;
        let guest_clusters = size.div_ceil(CLUSTER);
        let l1_entries = guest_clusters.div_ceil(L2_ENTRIES);
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
        let chunks_per_range = L2_SPAN / layout.chunk_size;

        // Data clusters per L2 range.
        let mut range_data = vec![0u64; l1_entries as usize];
        for (index, _) in layout.allocated.iter().enumerate().filter(|(_, a)| **a) {
            let index = index as u64;
            let slot = range_data
                .get_mut((index / chunks_per_range) as usize)
                .ok_or_else(|| invalid("chunk beyond the L1 table"))?;
            *slot += layout.chunk_len(index).div_ceil(CLUSTER);
        }
        let l2_tables = range_data.iter().filter(|n| **n > 0).count() as u64;
        let data_clusters: u64 = range_data.iter().sum();

        // Refcount structures sized for the final file, themselves included.
        let fixed = 1 + l1_clusters + l2_tables + data_clusters;
        let (mut table, mut blocks) = (0u64, 0u64);
        loop {
            let total = fixed + table + blocks;
            let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let need_table = (need_blocks * 8).div_ceil(CLUSTER);
            if (need_table, need_blocks) == (table, blocks) {
                break;
            }
            (table, blocks) = (need_table, need_blocks);
        }
        let total_clusters = fixed + table + blocks;

        let mut next = CLUSTER * (1 + table + blocks + l1_clusters);
        let mut l2_offsets = vec![0u64; l1_entries as usize];
        for (offset, data) in l2_offsets.iter_mut().zip(&range_data) {
            if *data > 0 {
                *offset = next;
                next += CLUSTER * (1 + data);
            }
        }
        if next != total_clusters * CLUSTER {
            return Err(invalid("qcow2 plan does not add up"));
        }
        Ok(Qcow2Writer {
            size,
            l2_offsets,
            refcount_table_clusters: table,
            refcount_blocks: blocks,
            l1_clusters,
            total_clusters,
            chunks_per_range,
            range: None,
        })
    }

    pub(crate) fn virtual_size(&self) -> u64 {
        self.size
    }

    pub(crate) fn file_size(&self) -> u64 {
        self.total_clusters * CLUSTER
    }

    fn refcount_table_offset(&self) -> u64 {
        CLUSTER
    }

    fn refcount_blocks_offset(&self) -> u64 {
        CLUSTER * (1 + self.refcount_table_clusters)
    }

    fn l1_offset(&self) -> u64 {
        CLUSTER * (1 + self.refcount_table_clusters + self.refcount_blocks)
    }

    pub(crate) fn start(&mut self, _layout: &Layout) -> Pieces {
        let mut out = Pieces::new();

        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.put_slice(b"QFI\xfb");
        header.put_u32(3); // version
        header.put_u64(0); // backing file offset
        header.put_u32(0); // backing file name length
        header.put_u32(CLUSTER_BITS);
        header.put_u64(self.size);
        header.put_u32(0); // no encryption
        header.put_u32(self.l2_offsets.len() as u32); // L1 entries
        header.put_u64(self.l1_offset());
        header.put_u64(self.refcount_table_offset());
        header.put_u32(self.refcount_table_clusters as u32);
        header.put_u32(0); // snapshots
        header.put_u64(0); // snapshot table offset
        header.put_u64(0); // incompatible features
        header.put_u64(0); // compatible features
        header.put_u64(0); // autoclear features
        header.put_u32(REFCOUNT_ORDER);
        header.put_u32(HEADER_LEN);
        // The zeros after the header end the (empty) header extension list.
        out.push(header);
        out.push_zeros(CLUSTER - u64::from(HEADER_LEN));

        let mut table = Vec::with_capacity(self.refcount_blocks as usize * 8);
        for block in 0..self.refcount_blocks {
            table.put_u64(self.refcount_blocks_offset() + block * CLUSTER);
        }
        let table_len = table.len() as u64;
        out.push(table);
        out.push_zeros(self.refcount_table_clusters * CLUSTER - table_len);

        let full_block = refcount_block(REFCOUNTS_PER_BLOCK);
        for block in 0..self.refcount_blocks {
            let covered =
                (self.total_clusters - block * REFCOUNTS_PER_BLOCK).min(REFCOUNTS_PER_BLOCK);
            if covered == REFCOUNTS_PER_BLOCK {
                out.push(full_block.clone());
            } else {
                out.push(refcount_block(covered));
                out.push_zeros((REFCOUNTS_PER_BLOCK - covered) * 2);
            }
        }

        let mut l1 = Vec::with_capacity(self.l2_offsets.len() * 8);
        for offset in &self.l2_offsets {
            l1.put_u64(if *offset == 0 {
                0
            } else {
                offset | OFLAG_COPIED
            });
        }
        let l1_len = l1.len() as u64;
        out.push(l1);
        out.push_zeros(self.l1_clusters * CLUSTER - l1_len);
        out
    }

    /// The L2 table of `range`: its allocated chunks' clusters, laid out right after it.
    fn l2_table(&self, layout: &Layout, range: u64) -> Bytes {
        let mut entries = vec![0u64; L2_ENTRIES as usize];
        let clusters_per_chunk = layout.chunk_size / CLUSTER;
        let mut next = self.l2_offsets.get(range as usize).copied().unwrap_or(0) + CLUSTER;
        let first = range * self.chunks_per_range;
        let end = (first + self.chunks_per_range).min(layout.chunk_count());
        for index in (first..end).filter(|i| layout.is_allocated(*i)) {
            let base = (index - first) * clusters_per_chunk;
            for k in 0..layout.chunk_len(index).div_ceil(CLUSTER) {
                if let Some(entry) = entries.get_mut((base + k) as usize) {
                    *entry = next | OFLAG_COPIED;
                }
                next += CLUSTER;
            }
        }
        let mut table = Vec::with_capacity(CLUSTER as usize);
        for entry in entries {
            table.put_u64(entry);
        }
        Bytes::from(table)
    }

    pub(crate) fn chunk(&mut self, layout: &Layout, index: u64, data: Bytes) -> Pieces {
        let mut out = Pieces::new();
        let range = index / self.chunks_per_range;
        if self.range != Some(range) {
            out.push(self.l2_table(layout, range));
            self.range = Some(range);
        }
        let len = data.len() as u64;
        out.push(data);
        out.push_zeros(len.div_ceil(CLUSTER) * CLUSTER - len);
        out
    }
}

/// A refcount block whose first `covered` entries are 1 (as many bytes as those entries).
fn refcount_block(covered: u64) -> Bytes {
    let mut block = Vec::with_capacity(covered as usize * 2);
    for _ in 0..covered {
        block.put_u16(1);
    }
    Bytes::from(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// A file over 2 GiB needs several refcount blocks; every cluster must count exactly once.
    #[test]
    fn refcounts_cover_every_cluster_of_a_multi_block_file() {
        const MIB: u64 = 1 << 20;
        let layout = Layout {
            virtual_size: 3 << 30,
            chunk_size: MIB,
            allocated: vec![true; 3072],
        };
        let mut w = Qcow2Writer::new(&layout).unwrap();
        let total = w.total_clusters;
        assert_eq!(w.refcount_blocks, total.div_ceil(REFCOUNTS_PER_BLOCK));
        assert!(w.refcount_blocks > 1);
        let bytes: Vec<u8> = w.start(&layout).flat_map(|b| b.to_vec()).collect();
        assert_eq!(be64(&bytes, 48), CLUSTER, "refcount table offset");
        let mut counted = 0u64;
        for k in 0..w.refcount_blocks as usize {
            let block = be64(&bytes, CLUSTER as usize + k * 8) as usize;
            let entries = &bytes[block..block + CLUSTER as usize];
            for pair in entries.chunks(2) {
                match u16::from_be_bytes([pair[0], pair[1]]) {
                    0 => {}
                    1 => counted += 1,
                    other => panic!("refcount {other}"),
                }
            }
        }
        assert_eq!(counted, total);
        // 3 GiB of data and six L2 tables, plus header, L1 and refcount structures.
        assert_eq!(
            total,
            (3 << 30) / CLUSTER + 6 + 1 + 1 + w.refcount_table_clusters + w.refcount_blocks
        );
        // L1: six tables, each followed by its 512 MiB of data.
        let l1 = be64(&bytes, 40) as usize;
        for range in 0..6 {
            let entry = be64(&bytes, l1 + range * 8);
            assert_eq!(entry & OFLAG_COPIED, OFLAG_COPIED);
            assert_eq!(
                entry & !OFLAG_COPIED,
                w.l1_offset() + CLUSTER + range as u64 * (CLUSTER + L2_SPAN)
            );
        }
        assert_eq!(w.file_size(), total * CLUSTER);
    }
}

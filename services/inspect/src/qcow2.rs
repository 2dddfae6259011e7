//! qcow2 (versions 2 and 3): header and extensions, L1 and L2 tables, compressed clusters
//! (deflate and zstd), zero clusters, extended L2 entries with subclusters.
//!
//! Refused: a backing file, an external data file, encryption, unknown incompatible features,
//! the corrupt bit. Refcounts are not used (the dirty bit is accepted); refcount blocks are only
//! located so that their bytes are skipped rather than held.

use std::collections::HashSet;

use crate::detect::{be32, be64};
use crate::error::{inconsistent, truncated, Refusal, RefusalKind};
use crate::reorder::{Codec, Core, Driver, Layout, Out, Tag};
use crate::{Body, Format, HeaderInfo, Limits};

const L1: u8 = 1;
const L2: u8 = 2;
const REFCOUNT_TABLE: u8 = 3;
const SKIP: u8 = 4;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_CRYPTO: u32 = 0x0537_be77;

struct Qcow2 {
    cluster_bits: u32,
    size: u64,
    extended_l2: bool,
    codec: Codec,
    l1_entries: u64,
    l1_done: bool,
    l2_pending: usize,
    l2_seen: HashSet<u64>,
}

impl Qcow2 {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }

    fn l2_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }
}

fn field32(p: &[u8], at: usize) -> Result<u32, Refusal> {
    be32(p, at).ok_or_else(|| truncated("the file ends inside the qcow2 header"))
}

fn field64(p: &[u8], at: usize) -> Result<u64, Refusal> {
    be64(p, at).ok_or_else(|| truncated("the file ends inside the qcow2 header"))
}

pub(crate) fn open(
    p: &[u8],
    file_size: Option<u64>,
    limits: Limits,
) -> Result<Box<dyn Body>, Refusal> {
    let version = field32(p, 4)?;
    let backing_offset = field64(p, 8)?;
    let cluster_bits = field32(p, 20)?;
    let size = field64(p, 24)?;
    let crypt = field32(p, 32)?;
    let l1_size = field32(p, 36)?;
    let l1_offset = field64(p, 40)?;
    let refcount_offset = field64(p, 48)?;
    let refcount_clusters = field32(p, 56)?;
    let (incompat, header_len, compression) = if version >= 3 {
        let incompat = field64(p, 72)?;
        let header_len = field32(p, 100)?;
        let compression = if header_len > 104 {
            *p.get(104)
                .ok_or_else(|| truncated("the file ends inside the qcow2 header"))?
        } else {
            0
        };
        (incompat, header_len, compression)
    } else {
        (0, 72, 0)
    };
    if backing_offset != 0 {
        return Err(Refusal::new(
            RefusalKind::BackingFile,
            "the qcow2 image has a backing file",
        ));
    }
    if crypt != 0 {
        return Err(Refusal::new(
            RefusalKind::Encrypted,
            "the qcow2 image is encrypted",
        ));
    }
    if incompat & INCOMPAT_DATA_FILE != 0 {
        return Err(Refusal::new(
            RefusalKind::ExternalDataFile,
            "the qcow2 image keeps its data in an external data file",
        ));
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(Refusal::new(
            RefusalKind::UnknownFeature,
            format!(
                "the qcow2 image has unknown incompatible features {:#x}",
                incompat & !INCOMPAT_KNOWN
            ),
        ));
    }
    if incompat & INCOMPAT_CORRUPT != 0 {
        return Err(inconsistent("the qcow2 image is marked corrupt"));
    }
    if !(9..=21).contains(&cluster_bits) {
        return Err(inconsistent(format!(
            "bad qcow2 cluster size 2^{cluster_bits}"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    if version >= 3
        && (header_len < 104 || header_len % 8 != 0 || u64::from(header_len) > cluster_size)
    {
        return Err(inconsistent(format!(
            "bad qcow2 header length {header_len}"
        )));
    }
    let codec = match compression {
        0 => Codec::Deflate,
        1 if incompat & INCOMPAT_COMPRESSION != 0 => Codec::Zstd,
        1 => {
            return Err(inconsistent(
                "zstd compression without the compression-type feature bit",
            ))
        }
        t => {
            return Err(Refusal::new(
                RefusalKind::UnknownFeature,
                format!("unknown qcow2 compression type {t}"),
            ))
        }
    };
    if size > limits.max_virtual_size {
        return Err(Refusal::new(
            RefusalKind::VirtualSizeTooLarge,
            format!(
                "the virtual size is {size} bytes, over the limit of {} bytes",
                limits.max_virtual_size
            ),
        ));
    }
    check_extensions(p, header_len as usize, cluster_size, file_size)?;

    let mut layout = Qcow2 {
        cluster_bits,
        size,
        extended_l2: incompat & INCOMPAT_EXTL2 != 0,
        codec,
        l1_entries: 0,
        l1_done: false,
        l2_pending: 0,
        l2_seen: HashSet::new(),
    };
    let span = layout.l2_span();
    let needed = size.div_ceil(span);
    if u64::from(l1_size) < needed {
        return Err(inconsistent(format!(
            "the L1 table has {l1_size} entries, the virtual size needs {needed}"
        )));
    }
    layout.l1_entries = needed;
    let mut core = Core::new(
        size,
        file_size,
        limits.max_actual_size,
        limits.max_reorder_bytes,
    );
    core.schedule(0, cluster_size, Tag { kind: SKIP, arg: 0 }, true)?;
    if needed > 0 {
        if l1_offset == 0 || l1_offset % cluster_size != 0 {
            return Err(inconsistent(format!("bad L1 table offset {l1_offset}")));
        }
        if l1_offset < cluster_size {
            return Err(inconsistent("the L1 table overlaps the header"));
        }
        let l1_bytes = needed * 8;
        if l1_bytes > limits.max_reorder_bytes as u64 {
            return Err(crate::error::not_streamable(format!(
                "the L1 table is {l1_bytes} bytes"
            )));
        }
        core.schedule(l1_offset, l1_bytes, Tag { kind: L1, arg: 0 }, false)?;
    } else {
        layout.l1_done = true;
    }
    if refcount_offset != 0
        && refcount_offset % cluster_size == 0
        && refcount_offset >= cluster_size
    {
        let len = u64::from(refcount_clusters)
            .checked_mul(cluster_size)
            .filter(|&l| l <= limits.max_reorder_bytes as u64 / 4)
            .ok_or_else(|| inconsistent("the refcount table is too large"))?;
        core.schedule(
            refcount_offset,
            len,
            Tag {
                kind: REFCOUNT_TABLE,
                arg: 0,
            },
            false,
        )?;
    }
    Ok(Box::new(Driver::new(layout, core)))
}

fn check_extensions(
    p: &[u8],
    header_len: usize,
    cluster_size: u64,
    file_size: Option<u64>,
) -> Result<(), Refusal> {
    let mut at = header_len;
    loop {
        if (at as u64) + 8 > cluster_size {
            return Err(inconsistent(
                "qcow2 header extensions run past the first cluster",
            ));
        }
        let (Some(kind), Some(len)) = (be32(p, at), be32(p, at + 4)) else {
            if file_size.is_some_and(|s| s <= p.len() as u64) || p.len() < crate::DETECT_LEN {
                return Err(truncated(
                    "the file ends inside the qcow2 header extensions",
                ));
            }
            return Err(Refusal::new(
                RefusalKind::Unsupported,
                "qcow2 header extensions longer than 32 KiB",
            ));
        };
        match kind {
            EXT_END => return Ok(()),
            EXT_DATA_FILE => {
                return Err(Refusal::new(
                    RefusalKind::ExternalDataFile,
                    "the qcow2 image names an external data file",
                ))
            }
            EXT_CRYPTO => {
                return Err(Refusal::new(
                    RefusalKind::Encrypted,
                    "the qcow2 image has an encryption header",
                ))
            }
            _ => {}
        }
        let padded = (u64::from(len) + 7) & !7;
        at = (at as u64)
            .checked_add(8 + padded)
            .and_then(|a| usize::try_from(a).ok())
            .ok_or_else(|| inconsistent("bad qcow2 header extension length"))?;
    }
}

impl Qcow2 {
    fn on_l1(&mut self, bytes: &[u8], core: &mut Core, out: Out) -> Result<(), Refusal> {
        self.l1_done = true;
        let cs = self.cluster_size();
        let span = self.l2_span();
        for i in 0..self.l1_entries {
            let e = be64(bytes, (i * 8) as usize).ok_or_else(|| truncated("short L1 table"))?;
            let off = e & OFFSET_MASK;
            let guest = i * span;
            if off == 0 {
                core.engine.zero(guest, span, out)?;
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(inconsistent(format!(
                    "L1 entry {i} points to unaligned offset {off}"
                )));
            }
            if !self.l2_seen.insert(off) {
                return Err(inconsistent(format!(
                    "the L2 table at offset {off} is referenced twice"
                )));
            }
            core.schedule(off, cs, Tag { kind: L2, arg: i }, false)?;
            self.l2_pending += 1;
        }
        Ok(())
    }

    fn on_l2(
        &mut self,
        index: u64,
        bytes: &[u8],
        core: &mut Core,
        out: Out,
    ) -> Result<(), Refusal> {
        self.l2_pending = self.l2_pending.saturating_sub(1);
        let cs = self.cluster_size();
        let base = index * self.l2_span();
        let step = if self.extended_l2 { 16 } else { 8 };
        for j in 0..self.l2_entries() {
            let guest = base + (j << self.cluster_bits);
            if guest >= self.size {
                break;
            }
            let at = (j * step) as usize;
            let e = be64(bytes, at).ok_or_else(|| truncated("short L2 table"))?;
            let len = cs.min(self.size - guest);
            if e & COMPRESSED != 0 {
                let shift = 62 - (self.cluster_bits - 8);
                let off = e & ((1u64 << shift) - 1);
                let sectors = ((e >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
                let clen = (sectors * 512)
                    .checked_sub(off & 511)
                    .ok_or_else(|| inconsistent("bad compressed cluster descriptor"))?;
                if off < cs {
                    return Err(inconsistent(format!(
                        "compressed cluster for guest offset {guest} overlaps the header"
                    )));
                }
                core.map_compressed(off, clen, guest, cs, self.codec, out)?;
                continue;
            }
            let off = e & OFFSET_MASK;
            if off != 0 && !off.is_multiple_of(cs) {
                return Err(inconsistent(format!(
                    "L2 entry for guest offset {guest} points to unaligned offset {off}"
                )));
            }
            if off != 0 && off < cs {
                return Err(inconsistent(format!(
                    "L2 entry for guest offset {guest} points into the header"
                )));
            }
            if !self.extended_l2 {
                if e & 1 != 0 || off == 0 {
                    core.engine.zero(guest, len, out)?;
                } else {
                    core.map_raw(off, len, guest, out)?;
                }
                continue;
            }
            let bitmap = be64(bytes, at + 8).ok_or_else(|| truncated("short L2 table"))?;
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & !zero != 0 && off == 0 {
                return Err(inconsistent(format!(
                    "L2 entry for guest offset {guest} has allocated subclusters but no cluster"
                )));
            }
            let sc = cs / 32;
            let mut k = 0u64;
            while k < 32 {
                let data = |k: u64| (alloc >> k) & 1 == 1 && (zero >> k) & 1 == 0;
                let kind = data(k);
                let mut end = k + 1;
                while end < 32 && data(end) == kind {
                    end += 1;
                }
                let g = guest + k * sc;
                if g < self.size {
                    let run = ((end - k) * sc).min(self.size - g);
                    if kind {
                        core.map_raw(off + k * sc, run, g, out)?;
                    } else {
                        core.engine.zero(g, run, out)?;
                    }
                }
                k = end;
            }
        }
        Ok(())
    }

    fn on_refcount_table(&mut self, bytes: &[u8], core: &mut Core) -> Result<(), Refusal> {
        let cs = self.cluster_size();
        for e in bytes.chunks_exact(8) {
            let off = be64(e, 0).unwrap_or(0) & !(cs - 1);
            if off >= cs {
                core.schedule(off, cs, Tag { kind: SKIP, arg: 0 }, true)?;
            }
        }
        Ok(())
    }
}

impl Layout for Qcow2 {
    fn on_meta(
        &mut self,
        tag: Tag,
        _start: u64,
        bytes: Vec<u8>,
        core: &mut Core,
        out: Out,
    ) -> Result<(), Refusal> {
        match tag.kind {
            L1 => self.on_l1(&bytes, core, out),
            L2 => self.on_l2(tag.arg, &bytes, core, out),
            REFCOUNT_TABLE => self.on_refcount_table(&bytes, core),
            _ => Ok(()),
        }
    }

    fn stash_wanted(&self, _core: &Core) -> bool {
        !self.l1_done || self.l2_pending > 0
    }

    fn held(&self) -> usize {
        self.l2_seen.len() * 32
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn info(&self, _core: &Core) -> Option<HeaderInfo> {
        Some(HeaderInfo {
            format: Format::Qcow2,
            virtual_size: Some(self.size),
            provisional: false,
            cluster_size: Some(self.cluster_size()),
        })
    }
}

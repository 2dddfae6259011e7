//! VMDK sparse extents ("KDMV"): monolithicSparse (grain directory and grain tables, raw
//! grains) and streamOptimized (zlib-compressed grains, each with its guest address, and
//! metadata markers; the tables come at the end and are only counted against the grains).
//!
//! The embedded descriptor must say `createType="monolithicSparse"` or `"streamOptimized"`,
//! have no parent, and name exactly one SPARSE extent: anything else refers to other files.

use std::collections::HashSet;

use bytes::Bytes;

use crate::detect::{le16, le32, le64};
use crate::error::{inconsistent, not_streamable, truncated, Refusal, RefusalKind};
use crate::reorder::{decompress, Codec, Core, Driver, Layout, Out, Tag};
use crate::{Body, Format, HeaderInfo, Limits};

const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const FLAG_REDUNDANT_GT: u32 = 1 << 1;
const GD_AT_END: u64 = u64::MAX;
const MAX_DESCRIPTOR: u64 = 1 << 20;

const HEADER: u8 = 0;
const DESCRIPTOR: u8 = 1;
const GD: u8 = 2;
const GT: u8 = 3;
const RGD: u8 = 4;
const SKIP: u8 = 5;
const MARKER: u8 = 6;
const GRAIN: u8 = 7;
const META_GT: u8 = 8;

struct Header {
    flags: u32,
    capacity: u64,
    grain_sectors: u64,
    desc_offset: u64,
    desc_size: u64,
    gtes_per_gt: u64,
    rgd_offset: u64,
    gd_offset: u64,
    overhead: u64,
}

fn le32f(p: &[u8], at: usize) -> Result<u32, Refusal> {
    le32(p, at).ok_or_else(|| truncated("the file ends inside the vmdk header"))
}

fn le64f(p: &[u8], at: usize) -> Result<u64, Refusal> {
    le64(p, at).ok_or_else(|| truncated("the file ends inside the vmdk header"))
}

fn parse_header(p: &[u8], limits: &Limits) -> Result<Header, Refusal> {
    let version = le32f(p, 4)?;
    if !(1..=3).contains(&version) {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVmdk,
            format!("vmdk sparse extent version {version} is not supported"),
        ));
    }
    let h = Header {
        flags: le32f(p, 8)?,
        capacity: le64f(p, 12)?,
        grain_sectors: le64f(p, 20)?,
        desc_offset: le64f(p, 28)?,
        desc_size: le64f(p, 36)?,
        gtes_per_gt: u64::from(le32f(p, 44)?),
        rgd_offset: le64f(p, 48)?,
        gd_offset: le64f(p, 56)?,
        overhead: le64f(p, 64)?,
    };
    h.capacity
        .checked_mul(512)
        .filter(|&s| s <= limits.max_virtual_size)
        .ok_or_else(|| {
            Refusal::new(
                RefusalKind::VirtualSizeTooLarge,
                format!(
                    "the virtual size is {} sectors, over the limit of {} bytes",
                    h.capacity, limits.max_virtual_size
                ),
            )
        })?;
    if !h.grain_sectors.is_power_of_two() || h.grain_sectors > 4096 {
        return Err(inconsistent(format!(
            "bad vmdk grain size of {} sectors",
            h.grain_sectors
        )));
    }
    if !(1..=65536).contains(&h.gtes_per_gt) {
        return Err(inconsistent("bad vmdk grain table size"));
    }
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVmdk,
            "the vmdk extent has no embedded descriptor (it is part of a multi-file vmdk)",
        ));
    }
    if h.desc_size.saturating_mul(512) > MAX_DESCRIPTOR || h.desc_offset > (1 << 40) {
        return Err(inconsistent("bad vmdk descriptor location"));
    }
    if h.flags & FLAG_COMPRESSED != 0 {
        let algo = le16(p, 77).unwrap_or(0);
        if algo != 1 {
            return Err(Refusal::new(
                RefusalKind::UnsupportedVmdk,
                format!("vmdk compression algorithm {algo} is not supported"),
            ));
        }
        if h.flags & FLAG_MARKERS == 0 {
            return Err(Refusal::new(
                RefusalKind::UnsupportedVmdk,
                "compressed vmdk grains without markers are not supported",
            ));
        }
    }
    Ok(h)
}

/// Checks the embedded descriptor text.
fn check_descriptor(text: &[u8], stream: bool, capacity: u64) -> Result<(), Refusal> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let text = String::from_utf8_lossy(&text[..end]);
    let mut create_type: Option<String> = None;
    let mut parent = false;
    let mut extents: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            extents.push(tokens(line));
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "createType" => create_type = Some(v.to_string()),
                "parentCID" if !v.eq_ignore_ascii_case("ffffffff") => parent = true,
                "parentFileNameHint" => parent = true,
                _ => {}
            }
        }
    }
    let Some(create_type) = create_type else {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVmdk,
            "the vmdk descriptor has no createType",
        ));
    };
    if create_type != "monolithicSparse" && create_type != "streamOptimized" {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVmdk,
            format!(
                "vmdk createType {create_type:?} is not accepted (only monolithicSparse and \
                 streamOptimized, which keep the whole disk in one file)"
            ),
        ));
    }
    if parent {
        return Err(Refusal::new(
            RefusalKind::BackingFile,
            "the vmdk is a delta disk with a parent",
        ));
    }
    if extents.len() != 1 {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVmdk,
            format!(
                "the vmdk descriptor names {} extents; exactly one is accepted",
                extents.len()
            ),
        ));
    }
    let ext = &extents[0];
    let kind = ext.get(2).map(String::as_str).unwrap_or("");
    let name = ext.get(3).map(String::as_str).unwrap_or("");
    if kind != "SPARSE" {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVmdk,
            format!("the vmdk extent is {kind:?}, not the file itself (SPARSE)"),
        ));
    }
    if name.is_empty() || name.contains('/') || name.contains('\\') || ext.len() > 4 {
        return Err(Refusal::new(
            RefusalKind::UnsupportedVmdk,
            format!("the vmdk extent names another file ({name:?})"),
        ));
    }
    if (create_type == "streamOptimized") != stream {
        return Err(inconsistent(
            "the vmdk descriptor's createType does not match its header flags",
        ));
    }
    let sectors: Option<u64> = ext.get(1).and_then(|s| s.parse().ok());
    if sectors != Some(capacity) {
        return Err(inconsistent(
            "the vmdk extent size differs from the header capacity",
        ));
    }
    Ok(())
}

/// Splits an extent line into words, a quoted file name counting as one.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            out.push(r[..end].to_string());
            rest = r.get(end + 1..).unwrap_or("").trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = rest[end..].trim_start();
        }
    }
    out
}

pub(crate) fn open(
    p: &[u8],
    format: Format,
    file_size: Option<u64>,
    limits: Limits,
) -> Result<Box<dyn Body>, Refusal> {
    let h = parse_header(p, &limits)?;
    let stream = format == Format::VmdkStreamOptimized;
    let size = h.capacity * 512;
    let mut core = Core::new(
        size,
        file_size,
        limits.max_actual_size,
        limits.max_reorder_bytes,
    );
    core.schedule(
        0,
        512,
        Tag {
            kind: HEADER,
            arg: 0,
        },
        true,
    )?;
    core.schedule(
        h.desc_offset * 512,
        h.desc_size * 512,
        Tag {
            kind: DESCRIPTOR,
            arg: 0,
        },
        false,
    )?;
    let grain = h.grain_sectors * 512;
    let layout = Vmdk {
        stream,
        size,
        capacity: h.capacity,
        grain,
        gt_span: grain * h.gtes_per_gt,
        gt_len: h.gtes_per_gt * 4,
        gd_pending: false,
        gt_pending: 0,
        gt_seen: HashSet::new(),
        grain_head: Vec::new(),
        grains_seen: 0,
        gt_grains: 0,
        gt_markers: 0,
        eos: false,
    };
    let mut layout = layout;
    if stream {
        let first = h
            .overhead
            .checked_mul(512)
            .filter(|&o| o >= (h.desc_offset + h.desc_size) * 512)
            .ok_or_else(|| inconsistent("bad vmdk overhead"))?;
        let desc_end = (h.desc_offset + h.desc_size) * 512;
        core.schedule(desc_end, first - desc_end, Tag { kind: SKIP, arg: 0 }, true)?;
        core.schedule(
            first,
            16,
            Tag {
                kind: MARKER,
                arg: 0,
            },
            false,
        )?;
    } else {
        if h.flags & FLAG_COMPRESSED != 0 {
            return Err(inconsistent("compressed grains in a monolithicSparse vmdk"));
        }
        if h.gd_offset == GD_AT_END || h.gd_offset == 0 {
            return Err(inconsistent("the vmdk has no grain directory"));
        }
        let gd_entries = h.capacity.div_ceil(h.grain_sectors * h.gtes_per_gt);
        let gd_len = gd_entries * 4;
        if gd_len > limits.max_reorder_bytes as u64 {
            return Err(not_streamable(format!(
                "the vmdk grain directory is {gd_len} bytes"
            )));
        }
        let gd_at = h
            .gd_offset
            .checked_mul(512)
            .ok_or_else(|| inconsistent("bad grain directory offset"))?;
        if gd_entries > 0 {
            core.schedule(gd_at, gd_len, Tag { kind: GD, arg: 0 }, false)?;
            layout.gd_pending = true;
        }
        if h.flags & FLAG_REDUNDANT_GT != 0 && h.rgd_offset != 0 && gd_entries > 0 {
            let rgd_at = h
                .rgd_offset
                .checked_mul(512)
                .ok_or_else(|| inconsistent("bad redundant grain directory offset"))?;
            core.schedule(rgd_at, gd_len, Tag { kind: RGD, arg: 0 }, false)?;
        }
    }
    Ok(Box::new(Driver::new(layout, core)))
}

struct Vmdk {
    stream: bool,
    size: u64,
    capacity: u64,
    grain: u64,
    gt_span: u64,
    gt_len: u64,
    gd_pending: bool,
    gt_pending: usize,
    gt_seen: HashSet<u64>,
    /// The first compressed bytes of a grain, read with its marker.
    grain_head: Vec<u8>,
    grains_seen: u64,
    gt_grains: u64,
    gt_markers: u64,
    eos: bool,
}

impl Vmdk {
    fn on_gd(&mut self, b: &[u8], core: &mut Core, out: Out) -> Result<(), Refusal> {
        self.gd_pending = false;
        for (i, e) in b.chunks_exact(4).enumerate() {
            let e = u64::from(le32(e, 0).unwrap_or(0));
            let guest = i as u64 * self.gt_span;
            if e == 0 {
                core.engine.zero(guest, self.gt_span, out)?;
                continue;
            }
            if !self.gt_seen.insert(e) {
                return Err(inconsistent(format!(
                    "the grain table at sector {e} is referenced twice"
                )));
            }
            core.schedule(
                e * 512,
                self.gt_len,
                Tag {
                    kind: GT,
                    arg: i as u64,
                },
                false,
            )?;
            self.gt_pending += 1;
        }
        Ok(())
    }

    fn on_rgd(&mut self, b: &[u8], core: &mut Core) -> Result<(), Refusal> {
        for e in b.chunks_exact(4) {
            let e = u64::from(le32(e, 0).unwrap_or(0));
            if e != 0 {
                core.schedule(e * 512, self.gt_len, Tag { kind: SKIP, arg: 0 }, true)?;
            }
        }
        Ok(())
    }

    fn on_gt(&mut self, index: u64, b: &[u8], core: &mut Core, out: Out) -> Result<(), Refusal> {
        self.gt_pending = self.gt_pending.saturating_sub(1);
        let base = index * self.gt_span;
        for (j, e) in b.chunks_exact(4).enumerate() {
            let guest = base + j as u64 * self.grain;
            if guest >= self.size {
                break;
            }
            let e = u64::from(le32(e, 0).unwrap_or(0));
            let len = self.grain.min(self.size - guest);
            if e <= 1 {
                core.engine.zero(guest, len, out)?;
            } else {
                core.map_raw(e * 512, len, guest, out)?;
            }
        }
        Ok(())
    }

    fn on_marker(&mut self, start: u64, b: &[u8], core: &mut Core) -> Result<(), Refusal> {
        let value = le64(b, 0).unwrap_or(0);
        let size = u64::from(le32(b, 8).unwrap_or(0));
        if size > 0 {
            if size < 4 || size > self.grain * 2 + 4096 {
                return Err(inconsistent(format!(
                    "bad compressed grain size {size} at file offset {start}"
                )));
            }
            self.grain_head = b[12..16].to_vec();
            return core.schedule(
                start + 16,
                size - 4,
                Tag {
                    kind: GRAIN,
                    arg: value,
                },
                false,
            );
        }
        let kind = le32(b, 12).unwrap_or(u32::MAX);
        let body = value
            .checked_mul(512)
            .filter(|&l| l <= 64 << 20)
            .ok_or_else(|| inconsistent("bad vmdk metadata marker"))?;
        let after = start + 512;
        match kind {
            0 => {
                self.eos = true;
                Ok(())
            }
            1..=3 => {
                core.schedule(start + 16, 496, Tag { kind: SKIP, arg: 0 }, true)?;
                let tag = if kind == 1 { META_GT } else { SKIP };
                if kind == 1 {
                    self.gt_markers += 1;
                }
                core.schedule(after, body, Tag { kind: tag, arg: 0 }, tag == SKIP)?;
                core.schedule(
                    after + body,
                    16,
                    Tag {
                        kind: MARKER,
                        arg: 0,
                    },
                    false,
                )
            }
            t => Err(inconsistent(format!("unknown vmdk marker type {t}"))),
        }
    }

    fn on_grain(
        &mut self,
        lba: u64,
        start: u64,
        b: &[u8],
        core: &mut Core,
        out: Out,
    ) -> Result<(), Refusal> {
        let guest = lba
            .checked_mul(512)
            .filter(|&g| g < self.size && lba.is_multiple_of(self.grain / 512))
            .ok_or_else(|| inconsistent(format!("bad grain address {lba}")))?;
        let mut input = std::mem::take(&mut self.grain_head);
        input.extend_from_slice(b);
        let want = self.grain.min(self.size - guest) as usize;
        let data = decompress(Codec::Zlib, &input, want, self.grain as usize)
            .map_err(|e| inconsistent(format!("grain at sector {lba}: {e}")))?;
        let cursor = core.engine.cursor();
        if guest < cursor {
            return Err(not_streamable(format!(
                "the grain for sector {lba} comes after later grains"
            )));
        }
        core.engine.zero(cursor, guest - cursor, out)?;
        core.engine.data(guest, Bytes::from(data), out)?;
        self.grains_seen += 1;
        let end = start + b.len() as u64;
        let next = end.div_ceil(512) * 512;
        core.schedule(end, next - end, Tag { kind: SKIP, arg: 0 }, true)?;
        core.schedule(
            next,
            16,
            Tag {
                kind: MARKER,
                arg: 0,
            },
            false,
        )
    }
}

impl Layout for Vmdk {
    fn on_meta(
        &mut self,
        tag: Tag,
        start: u64,
        bytes: Vec<u8>,
        core: &mut Core,
        out: Out,
    ) -> Result<(), Refusal> {
        match tag.kind {
            DESCRIPTOR => check_descriptor(&bytes, self.stream, self.capacity),
            GD => self.on_gd(&bytes, core, out),
            RGD => self.on_rgd(&bytes, core),
            GT => self.on_gt(tag.arg, &bytes, core, out),
            MARKER => self.on_marker(start, &bytes, core),
            GRAIN => self.on_grain(tag.arg, start, &bytes, core, out),
            META_GT => {
                self.gt_grains += bytes
                    .chunks_exact(4)
                    .filter(|e| le32(e, 0).unwrap_or(0) > 1)
                    .count() as u64;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn stash_wanted(&self, _core: &Core) -> bool {
        !self.stream && (self.gd_pending || self.gt_pending > 0)
    }

    fn held(&self) -> usize {
        self.gt_seen.len() * 32 + self.grain_head.len()
    }

    fn finish(&mut self, core: &mut Core, out: Out) -> Result<(), Refusal> {
        if !self.stream {
            return Ok(());
        }
        if !self.eos {
            return Err(truncated(
                "the streamOptimized vmdk ends without its end-of-stream marker",
            ));
        }
        if self.gt_markers > 0 && self.gt_grains != self.grains_seen {
            return Err(inconsistent(format!(
                "the grain tables list {} grains but the stream holds {}",
                self.gt_grains, self.grains_seen
            )));
        }
        let cursor = core.engine.cursor();
        core.engine.zero(cursor, self.size - cursor, out)
    }

    fn format(&self) -> Format {
        if self.stream {
            Format::VmdkStreamOptimized
        } else {
            Format::VmdkMonolithicSparse
        }
    }

    fn info(&self, _core: &Core) -> Option<HeaderInfo> {
        Some(HeaderInfo {
            format: self.format(),
            virtual_size: Some(self.size),
            provisional: false,
            cluster_size: Some(self.grain),
        })
    }
}

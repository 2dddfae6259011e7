//! VHD (Virtual PC): the 512-byte footer shared by fixed and dynamic disks, and dynamic disks
//! (a footer copy at the start, the "cxsparse" dynamic header, the BAT, blocks made of a sector
//! bitmap and data). Differencing disks are refused as having a backing file.

use crate::detect::{be32, be64};
use crate::error::{inconsistent, truncated, Refusal, RefusalKind};
use crate::reorder::{Core, Driver, Layout, Out, Tag};
use crate::{Body, Format, HeaderInfo, Limits};

pub(crate) const DISK_FIXED: u32 = 2;
pub(crate) const DISK_DYNAMIC: u32 = 3;
pub(crate) const DISK_DIFFERENCING: u32 = 4;

/// The largest CHS geometry a VHD footer can hold; images at it use the footer's size.
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;

/// The fields of a VHD footer that decoding needs.
pub(crate) struct Footer {
    pub disk_type: u32,
    pub data_offset: u64,
    current_size: u64,
    chs_sectors: u64,
    creator: [u8; 4],
}

impl Footer {
    /// Parses and checksums a footer (512 bytes starting with "conectix").
    pub(crate) fn parse(b: &[u8]) -> Result<Footer, Refusal> {
        if b.len() < 512 || !b.starts_with(b"conectix") {
            return Err(truncated("missing VHD footer"));
        }
        let stored = be32(b, 64).unwrap_or(0);
        let mut sum: u32 = 0;
        for (i, &x) in b[..512].iter().enumerate() {
            if !(64..68).contains(&i) {
                sum = sum.wrapping_add(u32::from(x));
            }
        }
        if !sum != stored {
            return Err(inconsistent("the VHD footer checksum is wrong"));
        }
        let cyls = u64::from(u16::from_be_bytes([b[56], b[57]]));
        let heads = u64::from(b[58]);
        let secs = u64::from(b[59]);
        let mut creator = [0u8; 4];
        creator.copy_from_slice(&b[28..32]);
        Ok(Footer {
            disk_type: be32(b, 60).unwrap_or(0),
            data_offset: be64(b, 16).unwrap_or(0),
            current_size: be64(b, 48).unwrap_or(0),
            chs_sectors: cyls * heads * secs,
            creator,
        })
    }

    /// The size the footer states, in bytes.
    pub(crate) fn current_size(&self) -> u64 {
        self.current_size
    }

    /// The guest size, following the convention of the image's creator: Virtual PC and QEMU
    /// ("vpc ", "qemu") size a disk by its CHS geometry, other creators by the current size.
    pub(crate) fn virtual_size(&self) -> u64 {
        let by_size: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];
        let use_chs = !by_size.contains(&&self.creator);
        if use_chs && self.chs_sectors != MAX_CHS_SECTORS {
            self.chs_sectors * 512
        } else {
            self.current_size
        }
    }
}

const DYN_HEADER: u8 = 1;
const BAT: u8 = 2;
const BITMAP: u8 = 3;

struct VhdDynamic {
    size: u64,
    block_size: u64,
    bitmap_len: u64,
    blocks: u64,
    bat_done: bool,
    copy_at_start: Vec<u8>,
}

pub(crate) fn open_dynamic(
    p: &[u8],
    file_size: Option<u64>,
    limits: Limits,
) -> Result<Box<dyn Body>, Refusal> {
    let footer = Footer::parse(p)?;
    match footer.disk_type {
        DISK_DYNAMIC => {}
        DISK_DIFFERENCING => {
            return Err(Refusal::new(
                RefusalKind::BackingFile,
                "a differencing VHD depends on a parent image",
            ))
        }
        t => return Err(inconsistent(format!("unexpected VHD disk type {t}"))),
    }
    let size = footer.virtual_size();
    if size > limits.max_virtual_size {
        return Err(Refusal::new(
            RefusalKind::VirtualSizeTooLarge,
            format!(
                "the virtual size is {size} bytes, over the limit of {} bytes",
                limits.max_virtual_size
            ),
        ));
    }
    if footer.data_offset < 512 || footer.data_offset % 512 != 0 {
        return Err(inconsistent("bad VHD dynamic header offset"));
    }
    let mut core = Core::new(
        size,
        file_size,
        limits.max_actual_size,
        limits.max_reorder_bytes,
    );
    core.schedule(0, 512, Tag { kind: 0, arg: 0 }, true)?;
    core.schedule(
        footer.data_offset,
        1024,
        Tag {
            kind: DYN_HEADER,
            arg: 0,
        },
        false,
    )?;
    let layout = VhdDynamic {
        size,
        block_size: 0,
        bitmap_len: 0,
        blocks: 0,
        bat_done: false,
        copy_at_start: p[..512].to_vec(),
    };
    Ok(Box::new(Driver::new(layout, core)))
}

impl VhdDynamic {
    fn on_header(&mut self, b: &[u8], core: &mut Core, limits_bytes: usize) -> Result<(), Refusal> {
        if !b.starts_with(b"cxsparse") {
            return Err(inconsistent("missing VHD dynamic header"));
        }
        let bat_offset = be64(b, 16).unwrap_or(0);
        let entries = u64::from(be32(b, 28).unwrap_or(0));
        let block_size = u64::from(be32(b, 32).unwrap_or(0));
        if !block_size.is_power_of_two() || !(4096..=(256 << 20)).contains(&block_size) {
            return Err(inconsistent(format!("bad VHD block size {block_size}")));
        }
        let blocks = self.size.div_ceil(block_size);
        if entries < blocks {
            return Err(inconsistent(format!(
                "the VHD BAT has {entries} entries, the disk needs {blocks}"
            )));
        }
        if bat_offset < 512 || !bat_offset.is_multiple_of(512) {
            return Err(inconsistent("bad VHD BAT offset"));
        }
        let bat_len = blocks * 4;
        if bat_len > limits_bytes as u64 {
            return Err(crate::error::not_streamable(format!(
                "the VHD BAT is {bat_len} bytes"
            )));
        }
        self.block_size = block_size;
        self.blocks = blocks;
        self.bitmap_len = (block_size / 512).div_ceil(8).div_ceil(512) * 512;
        if blocks == 0 {
            self.bat_done = true;
            return Ok(());
        }
        core.schedule(bat_offset, bat_len, Tag { kind: BAT, arg: 0 }, false)
    }

    fn on_bat(&mut self, b: &[u8], core: &mut Core, out: Out) -> Result<(), Refusal> {
        self.bat_done = true;
        for i in 0..self.blocks {
            let e = be32(b, (i * 4) as usize).ok_or_else(|| truncated("short VHD BAT"))?;
            let guest = i * self.block_size;
            if e == u32::MAX {
                core.engine.zero(guest, self.block_size, out)?;
                continue;
            }
            let off = u64::from(e) * 512;
            if off < 512 {
                return Err(inconsistent(format!("VHD block {i} overlaps the header")));
            }
            core.schedule(
                off,
                self.bitmap_len,
                Tag {
                    kind: BITMAP,
                    arg: i,
                },
                false,
            )?;
        }
        Ok(())
    }

    fn on_bitmap(
        &mut self,
        block: u64,
        start: u64,
        b: &[u8],
        core: &mut Core,
        out: Out,
    ) -> Result<(), Refusal> {
        let guest = block * self.block_size;
        let data = start + self.bitmap_len;
        let sectors = self.block_size / 512;
        let present = |s: u64| {
            b.get((s / 8) as usize)
                .is_some_and(|x| x & (0x80 >> (s % 8)) != 0)
        };
        let mut s = 0u64;
        while s < sectors {
            let kind = present(s);
            let mut end = s + 1;
            while end < sectors && present(end) == kind {
                end += 1;
            }
            let g = guest + s * 512;
            if g >= self.size {
                break;
            }
            let len = ((end - s) * 512).min(self.size - g);
            if kind {
                core.map_raw(data + s * 512, len, g, out)?;
            } else {
                core.engine.zero(g, len, out)?;
            }
            s = end;
        }
        Ok(())
    }
}

impl Layout for VhdDynamic {
    fn on_meta(
        &mut self,
        tag: Tag,
        start: u64,
        bytes: Vec<u8>,
        core: &mut Core,
        out: Out,
    ) -> Result<(), Refusal> {
        match tag.kind {
            DYN_HEADER => {
                let limit = core.limit;
                self.on_header(&bytes, core, limit)
            }
            BAT => self.on_bat(&bytes, core, out),
            BITMAP => self.on_bitmap(tag.arg, start, &bytes, core, out),
            _ => Ok(()),
        }
    }

    fn stash_wanted(&self, _core: &Core) -> bool {
        !self.bat_done
    }

    fn check_tail(&self, tail: &[u8]) -> Result<(), Refusal> {
        if tail.len() < 512 || !tail.starts_with(b"conectix") {
            return Err(truncated("the dynamic VHD has no footer at its end"));
        }
        if tail[..512] != self.copy_at_start[..] {
            return Err(inconsistent(
                "the VHD footer at the end differs from its copy at the start",
            ));
        }
        Ok(())
    }

    fn format(&self) -> Format {
        Format::VhdDynamic
    }

    fn info(&self, _core: &Core) -> Option<HeaderInfo> {
        Some(HeaderInfo {
            format: Format::VhdDynamic,
            virtual_size: Some(self.size),
            provisional: false,
            cluster_size: (self.block_size > 0).then_some(self.block_size),
        })
    }
}

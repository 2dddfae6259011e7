//! VHDX: the file identifier, the two headers (the valid one with the higher sequence number
//! is current), the two region tables, the metadata region (file parameters, virtual disk
//! size, logical sector size) and the BAT, whose payload block entries are interleaved with a
//! sector bitmap entry every "chunk ratio" blocks.
//!
//! Refused: a parent (differencing disk), a log that would need replaying, unknown required
//! regions or metadata items, partially present blocks.

use crate::detect::{le16, le32, le64};
use crate::error::{inconsistent, not_streamable, Refusal, RefusalKind};
use crate::reorder::{Core, Driver, Layout, Out, Tag};
use crate::{Body, Format, HeaderInfo, Limits};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

const HEADER: u8 = 1;
const REGIONS: u8 = 2;
const METADATA: u8 = 3;
const BAT: u8 = 4;
const SKIP: u8 = 5;

const GUID_BAT: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
const GUID_METADATA: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
const GUID_FILE_PARAMETERS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
const GUID_VIRTUAL_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
const GUID_LOGICAL_SECTOR_SIZE: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
const GUID_PHYSICAL_SECTOR_SIZE: &str = "CDA348C7-445D-4471-9CC9-E9885251C556";
const GUID_VIRTUAL_DISK_ID: &str = "BECA12AB-B2E6-4523-93EF-C309E000C746";
const GUID_PARENT_LOCATOR: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";

/// A GUID in its on-disk byte order (the first three fields little-endian).
fn guid(s: &str) -> [u8; 16] {
    let hex: Vec<u8> = s
        .bytes()
        .filter(|b| b.is_ascii_hexdigit())
        .map(|b| (b as char).to_digit(16).unwrap_or(0) as u8)
        .collect();
    let mut be = [0u8; 16];
    for (i, b) in be.iter_mut().enumerate() {
        *b = (hex.get(2 * i).copied().unwrap_or(0) << 4) | hex.get(2 * i + 1).copied().unwrap_or(0);
    }
    let mut g = be;
    g[0..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    g
}

/// CRC-32C (Castagnoli), as VHDX checksums use.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, v) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *v = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn checksum_ok(b: &[u8]) -> bool {
    let Some(stored) = le32(b, 4) else {
        return false;
    };
    let mut copy = b.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy) == stored
}

#[derive(Clone, Copy)]
struct Head {
    seq: u64,
    log_clean: bool,
    log_offset: u64,
    log_len: u64,
}

struct Params {
    block_size: u64,
    size: u64,
    chunk_ratio: u64,
}

struct Vhdx {
    limits: Limits,
    heads: [Option<Option<Head>>; 2],
    regions_done: bool,
    params: Option<Params>,
    waiting_bat: Option<Vec<u8>>,
    bat_done: bool,
}

pub(crate) fn open(
    _p: &[u8],
    file_size: Option<u64>,
    limits: Limits,
) -> Result<Box<dyn Body>, Refusal> {
    // The virtual size is not known before the metadata region; the engine is sized then.
    let mut core = Core::new(
        0,
        file_size,
        limits.max_actual_size,
        limits.max_reorder_bytes,
    );
    core.schedule(0, 64 * KIB, Tag { kind: SKIP, arg: 0 }, true)?;
    core.schedule(
        64 * KIB,
        4 * KIB,
        Tag {
            kind: HEADER,
            arg: 0,
        },
        false,
    )?;
    core.schedule(
        128 * KIB,
        4 * KIB,
        Tag {
            kind: HEADER,
            arg: 1,
        },
        false,
    )?;
    core.schedule(
        192 * KIB,
        64 * KIB,
        Tag {
            kind: REGIONS,
            arg: 0,
        },
        false,
    )?;
    core.schedule(
        256 * KIB,
        64 * KIB,
        Tag {
            kind: REGIONS,
            arg: 1,
        },
        false,
    )?;
    let layout = Vhdx {
        limits,
        heads: [None, None],
        regions_done: false,
        params: None,
        waiting_bat: None,
        bat_done: false,
    };
    Ok(Box::new(Driver::new(layout, core)))
}

fn parse_head(b: &[u8]) -> Option<Head> {
    if !b.starts_with(b"head") || !checksum_ok(b) {
        return None;
    }
    Some(Head {
        seq: le64(b, 8)?,
        log_clean: b.get(48..64)?.iter().all(|&x| x == 0),
        log_offset: le64(b, 72)?,
        log_len: u64::from(le32(b, 68)?),
    })
}

impl Vhdx {
    fn on_header(&mut self, slot: usize, b: &[u8], core: &mut Core) -> Result<(), Refusal> {
        self.heads[slot] = Some(parse_head(b));
        let (Some(a), Some(c)) = (self.heads[0], self.heads[1]) else {
            return Ok(());
        };
        let current = match (a, c) {
            (Some(a), Some(c)) => {
                if a.seq >= c.seq {
                    a
                } else {
                    c
                }
            }
            (Some(h), None) | (None, Some(h)) => h,
            (None, None) => return Err(inconsistent("neither VHDX header is valid")),
        };
        if !current.log_clean {
            return Err(Refusal::new(
                RefusalKind::Unsupported,
                "the VHDX log must be replayed first (open the image with its hypervisor or \
                 `qemu-img check -r all`)",
            ));
        }
        if current.log_len > 0 && current.log_offset >= MIB {
            core.schedule(
                current.log_offset,
                current.log_len,
                Tag { kind: SKIP, arg: 0 },
                true,
            )?;
        }
        Ok(())
    }

    fn on_regions(&mut self, b: &[u8], core: &mut Core) -> Result<(), Refusal> {
        if self.regions_done {
            return Ok(());
        }
        let valid = b.starts_with(b"regi") && checksum_ok(b);
        if !valid {
            return Ok(());
        }
        self.regions_done = true;
        let count = le32(b, 8).unwrap_or(0) as usize;
        if count > 2047 {
            return Err(inconsistent("too many VHDX regions"));
        }
        let (bat_guid, meta_guid) = (guid(GUID_BAT), guid(GUID_METADATA));
        let mut bat = None;
        let mut meta = None;
        for i in 0..count {
            let at = 16 + 32 * i;
            let id = b
                .get(at..at + 16)
                .ok_or_else(|| inconsistent("short region table"))?;
            let offset = le64(b, at + 16).unwrap_or(0);
            let len = u64::from(le32(b, at + 24).unwrap_or(0));
            let required = le32(b, at + 28).unwrap_or(0) & 1 != 0;
            if offset < MIB || !offset.is_multiple_of(MIB) || len % MIB != 0 {
                return Err(inconsistent(format!("bad VHDX region at offset {offset}")));
            }
            if id == bat_guid {
                bat = Some((offset, len));
            } else if id == meta_guid {
                meta = Some((offset, len));
            } else if required {
                return Err(Refusal::new(
                    RefusalKind::Unsupported,
                    "the VHDX file has an unknown required region",
                ));
            }
        }
        let (Some((bat_at, bat_len)), Some((meta_at, meta_len))) = (bat, meta) else {
            return Err(inconsistent(
                "the VHDX region table lacks the BAT or metadata",
            ));
        };
        if meta_len > 16 * MIB {
            return Err(inconsistent("the VHDX metadata region is too large"));
        }
        if bat_len > self.limits.max_reorder_bytes as u64 {
            return Err(not_streamable(format!("the VHDX BAT is {bat_len} bytes")));
        }
        core.schedule(
            meta_at,
            meta_len,
            Tag {
                kind: METADATA,
                arg: 0,
            },
            false,
        )?;
        core.schedule(bat_at, bat_len, Tag { kind: BAT, arg: 0 }, false)
    }

    fn on_metadata(&mut self, b: &[u8], core: &mut Core, out: Out) -> Result<(), Refusal> {
        if !b.starts_with(b"metadata") {
            return Err(inconsistent("missing VHDX metadata table"));
        }
        let count = usize::from(le16(b, 10).unwrap_or(0));
        if count > 2047 {
            return Err(inconsistent("too many VHDX metadata items"));
        }
        let known = [
            GUID_FILE_PARAMETERS,
            GUID_VIRTUAL_DISK_SIZE,
            GUID_LOGICAL_SECTOR_SIZE,
            GUID_PHYSICAL_SECTOR_SIZE,
            GUID_VIRTUAL_DISK_ID,
        ]
        .map(guid);
        let parent = guid(GUID_PARENT_LOCATOR);
        let mut block_size = None;
        let mut has_parent = false;
        let mut size = None;
        let mut sector = None;
        for i in 0..count {
            let at = 32 + 32 * i;
            let id = b
                .get(at..at + 16)
                .ok_or_else(|| inconsistent("short metadata table"))?;
            let off = le32(b, at + 16).unwrap_or(0) as usize;
            let len = le32(b, at + 20).unwrap_or(0) as usize;
            let required = le32(b, at + 24).unwrap_or(0) & 4 != 0;
            let item = off
                .checked_add(len)
                .and_then(|end| b.get(off..end))
                .ok_or_else(|| inconsistent("a VHDX metadata item lies outside its region"))?;
            if id == parent {
                has_parent = true;
            } else if id == known[0] {
                block_size = le32(item, 0).map(u64::from);
                has_parent |= le32(item, 4).unwrap_or(0) & 2 != 0;
            } else if id == known[1] {
                size = le64(item, 0);
            } else if id == known[2] {
                sector = le32(item, 0).map(u64::from);
            } else if !known.iter().any(|k| k == id) && required {
                return Err(Refusal::new(
                    RefusalKind::Unsupported,
                    "the VHDX file has an unknown required metadata item",
                ));
            }
        }
        if has_parent {
            return Err(Refusal::new(
                RefusalKind::BackingFile,
                "the VHDX is a differencing disk with a parent",
            ));
        }
        let (Some(block_size), Some(size), Some(sector)) = (block_size, size, sector) else {
            return Err(inconsistent("the VHDX metadata lacks a required item"));
        };
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(inconsistent(format!("bad VHDX block size {block_size}")));
        }
        if sector != 512 && sector != 4096 {
            return Err(inconsistent(format!(
                "bad VHDX logical sector size {sector}"
            )));
        }
        if size > self.limits.max_virtual_size {
            return Err(Refusal::new(
                RefusalKind::VirtualSizeTooLarge,
                format!(
                    "the virtual size is {size} bytes, over the limit of {} bytes",
                    self.limits.max_virtual_size
                ),
            ));
        }
        if size % sector != 0 {
            return Err(inconsistent(
                "the VHDX size is not a whole number of sectors",
            ));
        }
        let chunk_ratio = ((1u64 << 23) * sector) / block_size;
        core.engine.set_virtual_size(size);
        self.params = Some(Params {
            block_size,
            size,
            chunk_ratio,
        });
        if let Some(bat) = self.waiting_bat.take() {
            self.on_bat(&bat, core, out)?;
        }
        Ok(())
    }

    fn on_bat(&mut self, b: &[u8], core: &mut Core, out: Out) -> Result<(), Refusal> {
        let Some(p) = &self.params else {
            self.waiting_bat = Some(b.to_vec());
            return Ok(());
        };
        let (bs, size, ratio) = (p.block_size, p.size, p.chunk_ratio);
        self.bat_done = true;
        let blocks = size.div_ceil(bs);
        for i in 0..blocks {
            let index = i + i / ratio;
            let e = le64(b, (index * 8) as usize)
                .ok_or_else(|| inconsistent("the VHDX BAT is too small for the disk"))?;
            let guest = i * bs;
            let len = bs.min(size - guest);
            match e & 7 {
                0..=3 => core.engine.zero(guest, len, out)?,
                6 => {
                    let off = (e >> 20) << 20;
                    if off < MIB {
                        return Err(inconsistent(format!(
                            "VHDX block {i} points into the header area"
                        )));
                    }
                    core.map_raw(off, len, guest, out)?;
                }
                7 => {
                    return Err(inconsistent(format!(
                        "VHDX block {i} is partially present in a disk without a parent"
                    )))
                }
                s => return Err(inconsistent(format!("VHDX block {i} has bad state {s}"))),
            }
        }
        Ok(())
    }
}

impl Layout for Vhdx {
    fn on_meta(
        &mut self,
        tag: Tag,
        _start: u64,
        bytes: Vec<u8>,
        core: &mut Core,
        out: Out,
    ) -> Result<(), Refusal> {
        match tag.kind {
            HEADER => self.on_header(tag.arg as usize & 1, &bytes, core),
            REGIONS => {
                self.on_regions(&bytes, core)?;
                if tag.arg == 1 && !self.regions_done {
                    return Err(inconsistent("neither VHDX region table is valid"));
                }
                Ok(())
            }
            METADATA => self.on_metadata(&bytes, core, out),
            BAT => self.on_bat(&bytes, core, out),
            _ => Ok(()),
        }
    }

    fn stash_wanted(&self, _core: &Core) -> bool {
        !self.bat_done
    }

    fn held(&self) -> usize {
        self.waiting_bat.as_ref().map_or(0, Vec::len)
    }

    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn info(&self, _core: &Core) -> Option<HeaderInfo> {
        let p = self.params.as_ref()?;
        Some(HeaderInfo {
            format: Format::Vhdx,
            virtual_size: Some(p.size),
            provisional: false,
            cluster_size: Some(p.block_size),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn guid_byte_order() {
        assert_eq!(
            guid(GUID_BAT),
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
    }
}

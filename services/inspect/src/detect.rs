//! Format detection from the start of a file: every signature is looked for, and a file that
//! shows two of them is refused as a polyglot.

use crate::error::{Refusal, RefusalKind};
use crate::Format;

/// Bytes of the start of a file looked at before deciding its format (covers the ISO 9660
/// primary volume descriptor at 32769).
pub const DETECT_LEN: usize = 33 * 1024;

const ISO_MAGIC_AT: usize = 32769;

/// Detects the format from the first bytes of a file.
///
/// Returns `Ok(None)` while `prefix` is shorter than [`DETECT_LEN`] and the file may be longer.
/// `Raw` means no signature at the start; a fixed VHD (its footer is at the end) is only told
/// apart from raw once the end is read, which [`crate::Decoder`] does.
pub fn detect(prefix: &[u8], file_size: Option<u64>) -> Result<Option<Format>, Refusal> {
    let whole = file_size.is_some_and(|s| prefix.len() as u64 >= s);
    if prefix.len() < DETECT_LEN && !whole {
        return Ok(None);
    }
    detect_now(prefix).map(Some)
}

/// What the start of a file says, in isolation.
enum Sig {
    Format(Format),
    Refuse(RefusalKind, &'static str),
}

fn head_signature(p: &[u8]) -> Option<Sig> {
    let starts = |m: &[u8]| p.starts_with(m);
    if starts(b"QFI\xfb") {
        let version = be32(p, 4);
        return Some(match version {
            Some(2) | Some(3) => Sig::Format(Format::Qcow2),
            Some(1) => Sig::Refuse(RefusalKind::Unsupported, "qcow version 1 is not supported"),
            _ => Sig::Refuse(RefusalKind::Unsupported, "unknown qcow2 version"),
        });
    }
    if starts(b"QED\0") {
        return Some(Sig::Refuse(RefusalKind::Qed, "QED images are not accepted"));
    }
    if starts(b"KDMV") {
        let flags = le32(p, 8).unwrap_or(0);
        return Some(if flags & (1 << 16) != 0 {
            Sig::Format(Format::VmdkStreamOptimized)
        } else {
            Sig::Format(Format::VmdkMonolithicSparse)
        });
    }
    if starts(b"COWD") {
        return Some(Sig::Refuse(
            RefusalKind::UnsupportedVmdk,
            "ESX sparse (COWD) vmdk extents are not accepted",
        ));
    }
    if starts(b"# Disk DescriptorFile") || starts(b"# Disk Descriptor") {
        return Some(Sig::Refuse(
            RefusalKind::UnsupportedVmdk,
            "a vmdk descriptor file names other files; upload a monolithicSparse or \
             streamOptimized vmdk",
        ));
    }
    if starts(b"conectix") {
        return Some(match be32(p, 60) {
            Some(3) => Sig::Format(Format::VhdDynamic),
            Some(4) => Sig::Refuse(
                RefusalKind::BackingFile,
                "a differencing VHD depends on a parent image",
            ),
            Some(2) => Sig::Refuse(
                RefusalKind::Inconsistent,
                "a fixed VHD footer at the start of the file",
            ),
            _ => Sig::Refuse(RefusalKind::Unsupported, "unknown VHD disk type"),
        });
    }
    if starts(b"vhdxfile") {
        return Some(Sig::Format(Format::Vhdx));
    }
    if starts(b"LUKS\xba\xbe") {
        return Some(Sig::Refuse(
            RefusalKind::Encrypted,
            "LUKS-encrypted images are not accepted",
        ));
    }
    if starts(b"WithoutFreeSpace") || starts(b"WithouFreSpacExt") {
        return Some(Sig::Refuse(
            RefusalKind::Unsupported,
            "Parallels images are not supported",
        ));
    }
    if starts(b"Bochs Virtual HD Image") {
        return Some(Sig::Refuse(
            RefusalKind::Unsupported,
            "Bochs images are not supported",
        ));
    }
    if starts(b"cloop") || starts(b"#!/bin/sh\n#V2.0 Format") {
        return Some(Sig::Refuse(
            RefusalKind::Unsupported,
            "cloop images are not supported",
        ));
    }
    None
}

fn detect_now(p: &[u8]) -> Result<Format, Refusal> {
    let mut sigs: Vec<Sig> = Vec::new();
    let mut names: Vec<&'static str> = Vec::new();
    if let Some(s) = head_signature(p) {
        names.push(match &s {
            Sig::Format(f) => f.as_str(),
            Sig::Refuse(..) => "another disk format",
        });
        sigs.push(s);
    }
    if le32(p, 0x40) == Some(0xbeda_107f) {
        names.push("vdi");
        sigs.push(Sig::Refuse(
            RefusalKind::Unsupported,
            "VirtualBox VDI images are not supported; convert to qcow2 or raw first",
        ));
    }
    if p.get(ISO_MAGIC_AT..ISO_MAGIC_AT + 5) == Some(b"CD001") {
        names.push("iso");
        sigs.push(Sig::Format(Format::Iso));
    }
    if sigs.len() > 1 {
        return Err(Refusal::new(
            RefusalKind::Polyglot,
            format!(
                "the file matches more than one format ({})",
                names.join(" and ")
            ),
        ));
    }
    match sigs.pop() {
        None => Ok(Format::Raw),
        Some(Sig::Format(f)) => Ok(f),
        Some(Sig::Refuse(kind, msg)) => Err(Refusal::new(kind, msg)),
    }
}

pub(crate) fn be32(p: &[u8], at: usize) -> Option<u32> {
    let b = p.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn be64(p: &[u8], at: usize) -> Option<u64> {
    let b = p.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

pub(crate) fn le16(p: &[u8], at: usize) -> Option<u16> {
    let b = p.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

pub(crate) fn le32(p: &[u8], at: usize) -> Option<u32> {
    let b = p.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn le64(p: &[u8], at: usize) -> Option<u64> {
    let b = p.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_prefix_waits_unless_whole() {
        assert_eq!(detect(&[0u8; 100], None).unwrap(), None);
        assert_eq!(detect(&[0u8; 100], Some(100)).unwrap(), Some(Format::Raw));
    }

    #[test]
    fn iso_with_qcow2_head_is_polyglot() {
        let mut p = vec![0u8; DETECT_LEN];
        p[..4].copy_from_slice(b"QFI\xfb");
        p[7] = 3;
        p[ISO_MAGIC_AT..ISO_MAGIC_AT + 5].copy_from_slice(b"CD001");
        let e = detect(&p, None).unwrap_err();
        assert_eq!(e.reason(), "InvalidImage.Polyglot");
    }

    #[test]
    fn qed_is_refused() {
        let mut p = vec![0u8; DETECT_LEN];
        p[..4].copy_from_slice(b"QED\0");
        assert_eq!(detect(&p, None).unwrap_err().reason(), "InvalidImage.Qed");
    }
}

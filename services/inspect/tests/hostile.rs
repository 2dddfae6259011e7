//! A hostile corpus, made with qemu-img and byte edits: each file is refused with its exact
//! reason.

mod common;

use common::*;
use imagefleet_inspect::{DeclaredFormat, Limits};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// A qcow2 image with data, made by qemu-img from a random source.
fn qcow2_with_data(dir: &std::path::Path, size: usize, opts: &str) -> Vec<u8> {
    let src = p(dir, "src.raw");
    std::fs::write(&src, source_disk(size, 99)).unwrap();
    let img = p(dir, "d.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        s(&src),
        s(&img),
    ]);
    std::fs::read(&img).unwrap()
}

fn l1_offset(q: &[u8]) -> usize {
    be64(q, 40) as usize
}

fn l2_offset(q: &[u8], index: usize) -> usize {
    (be64(q, l1_offset(q) + 8 * index) & 0x00ff_ffff_ffff_fe00) as usize
}

fn vhd_footer_checksum(f: &mut [u8]) {
    f[64..68].fill(0);
    let sum: u32 = f[..512].iter().map(|&b| u32::from(b)).sum();
    put_be32(f, 64, !sum);
}

#[test]
fn qcow2_backing_file() {
    let dir = tmp();
    let base = p(dir.path(), "base.qcow2");
    let over = p(dir.path(), "over.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "4M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&over),
    ]);
    let f = std::fs::read(&over).unwrap();
    assert_eq!(refusal(&f, None), "InvalidImage.BackingFile");
}

#[test]
fn qcow2_external_data_file() {
    let dir = tmp();
    let img = p(dir.path(), "d.qcow2");
    let data = format!("data_file={}", s(&p(dir.path(), "d.data")));
    qemu_img(&["create", "-f", "qcow2", "-o", &data, s(&img), "4M"]);
    let f = std::fs::read(&img).unwrap();
    assert_eq!(refusal(&f, None), "InvalidImage.ExternalDataFile");
}

#[test]
fn qcow2_encrypted() {
    let dir = tmp();
    let img = p(dir.path(), "e.qcow2");
    qemu_img(&[
        "create",
        "--object",
        "secret,id=sec0,data=hunter22",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&img),
        "4M",
    ]);
    let f = std::fs::read(&img).unwrap();
    assert_eq!(refusal(&f, None), "InvalidImage.Encrypted");
}

#[test]
fn qcow2_unknown_incompatible_feature() {
    let dir = tmp();
    let mut f = qcow2_with_data(dir.path(), 1 << 20, "compat=1.1");
    f[78] |= 0x04; // incompatible feature bit 10
    assert_eq!(refusal(&f, None), "InvalidImage.UnknownFeature");
}

#[test]
fn qcow2_corrupt_bit() {
    let dir = tmp();
    let mut f = qcow2_with_data(dir.path(), 1 << 20, "compat=1.1");
    f[79] |= 0x02;
    assert_eq!(refusal(&f, None), "InvalidImage.Inconsistent");
}

#[test]
fn qcow2_virtual_size_one_pib() {
    let dir = tmp();
    let mut f = qcow2_with_data(dir.path(), 1 << 20, "compat=1.1");
    put_be64(&mut f, 24, 1 << 50);
    assert_eq!(refusal(&f, None), "InvalidImage.VirtualSizeTooLarge");
}

#[test]
fn qcow2_truncated_header() {
    let dir = tmp();
    let f = qcow2_with_data(dir.path(), 1 << 20, "compat=1.1");
    assert_eq!(refusal(&f[..50], None), "InvalidImage.Truncated");
    assert_eq!(refusal(&f[..90], None), "InvalidImage.Truncated");
}

#[test]
fn qcow2_truncated_tables() {
    let dir = tmp();
    let f = qcow2_with_data(dir.path(), 4 << 20, "compat=1.1");
    let l1 = l1_offset(&f);
    assert_eq!(refusal(&f[..l1 + 4], None), "InvalidImage.Truncated");
    let l2 = l2_offset(&f, 0);
    assert_eq!(refusal(&f[..l2 + 100], None), "InvalidImage.Truncated");
    // Declared length longer than what arrives.
    let mut rng = StdRng::seed_from_u64(1);
    let e = decode_with(
        &f[..l2 + 100],
        Limits::default(),
        None,
        Some(f.len() as u64),
        &mut rng,
        10_000,
    )
    .err()
    .expect("refused");
    assert_eq!(e.reason(), "InvalidImage.Truncated");
}

#[test]
fn qcow2_l2_entry_past_the_end() {
    let dir = tmp();
    let f = qcow2_with_data(dir.path(), 4 << 20, "compat=1.1");
    let l2 = l2_offset(&f, 0);
    // Far past the end (beyond any acceptable file), and just past the end.
    for target in [
        1u64 << 40,
        (f.len() as u64).div_ceil(65536) * 65536 + (1 << 20),
    ] {
        let mut g = f.clone();
        put_be64(&mut g, l2, (1 << 63) | target);
        assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent", "{target}");
    }
}

#[test]
fn qcow2_looping_and_overlapping_tables() {
    let dir = tmp();
    let f = qcow2_with_data(dir.path(), 8 << 20, "cluster_size=4096");
    let l1 = l1_offset(&f);
    let l2 = l2_offset(&f, 0);
    // An L2 entry that points at its own table.
    let mut g = f.clone();
    put_be64(&mut g, l2 + 8, (1 << 63) | l2 as u64);
    assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent");
    // Two L1 entries sharing one L2 table.
    let mut g = f.clone();
    let e0 = be64(&g, l1);
    put_be64(&mut g, l1 + 8, e0);
    assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent");
    // An L1 entry pointing at the L1 table itself.
    let mut g = f.clone();
    put_be64(&mut g, l1 + 8, (1 << 63) | l1 as u64);
    assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent");
    // An L2 entry pointing into the header cluster.
    let mut g = f.clone();
    put_be64(&mut g, l2, (1 << 63) | 512);
    assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent");
    // An L2 entry pointing at the L1 table.
    let mut g = f.clone();
    put_be64(&mut g, l2, (1 << 63) | l1 as u64);
    assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent");
}

#[test]
fn qed() {
    let dir = tmp();
    let img = p(dir.path(), "d.qed");
    qemu_img(&["create", "-f", "qed", s(&img), "4M"]);
    let f = std::fs::read(&img).unwrap();
    assert_eq!(refusal(&f, None), "InvalidImage.Qed");
}

#[test]
fn vmdk_flat_and_split_descriptors() {
    let dir = tmp();
    for (sub, name) in [
        ("monolithicFlat", "flat.vmdk"),
        ("twoGbMaxExtentSparse", "split.vmdk"),
        ("twoGbMaxExtentFlat", "splitflat.vmdk"),
    ] {
        let img = p(dir.path(), name);
        qemu_img(&[
            "create",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&img),
            "8M",
        ]);
        let f = std::fs::read(&img).unwrap();
        assert_eq!(refusal(&f, None), "InvalidImage.UnsupportedVmdk", "{sub}");
    }
    // The extent file of a split sparse vmdk, on its own.
    let extent = p(dir.path(), "split-s001.vmdk");
    let f = std::fs::read(&extent).unwrap();
    assert_eq!(refusal(&f, None), "InvalidImage.UnsupportedVmdk");
}

#[test]
fn vmdk_descriptor_naming_another_extent() {
    let dir = tmp();
    let src = p(dir.path(), "src.raw");
    std::fs::write(&src, source_disk(2 << 20, 5)).unwrap();
    let img = p(dir.path(), "d.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", s(&src), s(&img)]);
    let f = std::fs::read(&img).unwrap();
    let text_at = 512;
    let text_len = 20 * 512;
    let desc = String::from_utf8_lossy(&f[text_at..text_at + text_len]).into_owned();
    let edit = |from: &str, to: &str| -> Vec<u8> {
        assert!(desc.contains(from), "{desc}");
        let new = desc.replacen(from, to, 1);
        let mut g = f.clone();
        let bytes = new.as_bytes();
        g[text_at..text_at + bytes.len().min(text_len)]
            .copy_from_slice(&bytes[..bytes.len().min(text_len)]);
        g
    };
    let g = edit("SPARSE \"d.vmdk\"", "FLAT \"/etc/passwd\" 0");
    assert_eq!(refusal(&g, None), "InvalidImage.UnsupportedVmdk");
    let g = edit("SPARSE \"d.vmdk\"", "SPARSE \"../x.vmdk\"");
    assert_eq!(refusal(&g, None), "InvalidImage.UnsupportedVmdk");
    let g = edit(
        "createType=\"monolithicSparse\"",
        "createType=\"vmfsSparse\"",
    );
    assert_eq!(refusal(&g, None), "InvalidImage.UnsupportedVmdk");
    let g = edit("parentCID=ffffffff", "parentCID=12345678");
    assert_eq!(refusal(&g, None), "InvalidImage.BackingFile");
}

#[test]
fn iso_polyglots() {
    let dir = tmp();
    // A qcow2 file with an ISO volume descriptor at 32769.
    let mut f = qcow2_with_data(dir.path(), 1 << 20, "compat=1.1");
    f[32769..32774].copy_from_slice(b"CD001");
    assert_eq!(refusal(&f, None), "InvalidImage.Polyglot");
    // An ISO with a qcow2 header in its system area.
    let mut iso = source_disk(1 << 20, 7);
    iso[32769..32774].copy_from_slice(b"CD001");
    let q = qcow2_with_data(dir.path(), 1 << 20, "compat=1.1");
    iso[..512].copy_from_slice(&q[..512]);
    assert_eq!(refusal(&iso, None), "InvalidImage.Polyglot");
    // An ISO that ends with a VHD footer.
    let mut iso = source_disk(1 << 20, 8);
    iso[32769..32774].copy_from_slice(b"CD001");
    iso.extend_from_slice(&fixed_vhd_footer(dir.path()));
    let limits = Limits {
        allow_iso: true,
        ..Limits::default()
    };
    let mut rng = StdRng::seed_from_u64(3);
    let e = decode_with(&iso, limits, None, None, &mut rng, 70_000)
        .err()
        .expect("refused");
    assert_eq!(e.reason(), "InvalidImage.Polyglot");
}

fn fixed_vhd_footer(dir: &std::path::Path) -> Vec<u8> {
    let img = p(dir, "fixed.vhd");
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&img),
        "1M",
    ]);
    let f = std::fs::read(&img).unwrap();
    f[f.len() - 512..].to_vec()
}

#[test]
fn qcow2_with_vhd_footer_is_polyglot() {
    let dir = tmp();
    let mut f = qcow2_with_data(dir.path(), 2 << 20, "compat=1.1");
    f.extend_from_slice(&fixed_vhd_footer(dir.path()));
    assert_eq!(refusal(&f, None), "InvalidImage.Polyglot");
}

#[test]
fn iso_needs_force() {
    let mut iso = source_disk(1 << 20, 9);
    iso[32769..32774].copy_from_slice(b"CD001");
    assert_eq!(refusal(&iso, None), "InvalidImage.IsoNeedsForce");
    assert_eq!(
        refusal(&iso, Some(DeclaredFormat::Iso)),
        "InvalidImage.IsoNeedsForce"
    );
}

#[test]
fn declared_format_mismatch() {
    let dir = tmp();
    let q = qcow2_with_data(dir.path(), 1 << 20, "compat=1.1");
    assert_eq!(
        refusal(&q, Some(DeclaredFormat::Raw)),
        "InvalidImage.FormatMismatch"
    );
    assert_eq!(
        refusal(&q, Some(DeclaredFormat::Vmdk)),
        "InvalidImage.FormatMismatch"
    );
    let raw = source_disk(1 << 20, 10);
    assert_eq!(
        refusal(&raw, Some(DeclaredFormat::Qcow2)),
        "InvalidImage.FormatMismatch"
    );
    assert_eq!(
        refusal(&raw, Some(DeclaredFormat::Vhd)),
        "InvalidImage.FormatMismatch"
    );
    // A fixed VHD declared raw.
    let img = p(dir.path(), "f.vhd");
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&img),
        "2M",
    ]);
    let f = std::fs::read(&img).unwrap();
    assert_eq!(
        refusal(&f, Some(DeclaredFormat::Raw)),
        "InvalidImage.FormatMismatch"
    );
    assert!(decode(&f, Some(DeclaredFormat::Vhd)).is_ok());
}

#[test]
fn vhd_differencing() {
    let dir = tmp();
    let img = p(dir.path(), "d.vhd");
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        s(&img),
        "8M",
    ]);
    let mut f = std::fs::read(&img).unwrap();
    let end = f.len() - 512;
    for at in [0, end] {
        put_be32(&mut f, at + 60, 4);
        vhd_footer_checksum(&mut f[at..at + 512]);
    }
    assert_eq!(refusal(&f, None), "InvalidImage.BackingFile");
    // A fixed VHD whose footer says differencing.
    let img = p(dir.path(), "f.vhd");
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&img),
        "2M",
    ]);
    let mut f = std::fs::read(&img).unwrap();
    let end = f.len() - 512;
    put_be32(&mut f, end + 60, 4);
    vhd_footer_checksum(&mut f[end..]);
    assert_eq!(refusal(&f, None), "InvalidImage.BackingFile");
}

#[test]
fn vhdx_differencing_and_dirty_log() {
    let dir = tmp();
    let base = p(dir.path(), "b.vhdx");
    qemu_img(&["create", "-f", "vhdx", s(&base), "8M"]);
    let f = std::fs::read(&base).unwrap();
    // Set the log GUID in both headers (checksums fixed), as an unreplayed log would.
    let mut g = f.clone();
    for h in [64 * 1024, 128 * 1024] {
        g[h + 48] = 1;
        g[h + 4..h + 8].fill(0);
        let crc = crc32c(&g[h..h + 4096]);
        g[h + 4..h + 8].copy_from_slice(&crc.to_le_bytes());
    }
    assert_eq!(refusal(&g, None), "InvalidImage.Unsupported");
    // Break both headers' checksums.
    let mut g = f.clone();
    g[64 * 1024 + 100] ^= 1;
    g[128 * 1024 + 100] ^= 1;
    assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent");
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn other_formats_are_unsupported() {
    let dir = tmp();
    for fmt in ["vdi", "parallels", "bochs"] {
        let img = p(dir.path(), &format!("d.{fmt}"));
        let created = std::process::Command::new("qemu-img")
            .args(["create", "-f", fmt, s(&img), "4M"])
            .output()
            .expect("qemu-img is needed");
        if !created.status.success() {
            // Not every qemu-img build can create every format; vdi always can.
            assert_ne!(fmt, "vdi", "qemu-img cannot create vdi");
            continue;
        }
        let f = std::fs::read(&img).unwrap();
        assert_eq!(refusal(&f, None), "InvalidImage.Unsupported", "{fmt}");
    }
}

#[test]
fn data_far_out_of_guest_order_is_not_streamable() {
    let dir = tmp();
    let img = p(dir.path(), "o.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "16M"]);
    // Write the end of the disk first: its clusters come first in the file.
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 8M 6M", s(&img)]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 9 0 1M", s(&img)]);
    let f = std::fs::read(&img).unwrap();
    let small = Limits {
        max_reorder_bytes: 2 << 20,
        ..Limits::default()
    };
    let mut rng = StdRng::seed_from_u64(4);
    let e = decode_with(&f, small, None, None, &mut rng, 50_000)
        .err()
        .expect("refused");
    assert_eq!(e.reason(), "InvalidImage.NotStreamable");
    assert!(e.message().contains("qemu-img convert"));
    // With the default bound it decodes, and matches qemu-img.
    let d = decode(&f, None).unwrap();
    assert!(d.content == qemu_raw(dir.path(), &img, "qcow2"));
}

#[test]
fn file_too_large() {
    let small = Limits {
        max_actual_size: 1 << 20,
        ..Limits::default()
    };
    let data = vec![1u8; (1 << 20) + 1];
    let mut rng = StdRng::seed_from_u64(5);
    let e = decode_with(&data, small, None, None, &mut rng, 100_000)
        .err()
        .expect("refused");
    assert_eq!(e.reason(), "InvalidImage.FileTooLarge");
    let e = decode_with(
        &data,
        small,
        None,
        Some(data.len() as u64),
        &mut rng,
        100_000,
    )
    .err()
    .expect("refused");
    assert_eq!(e.reason(), "InvalidImage.FileTooLarge");
}

#[test]
fn header_refusals_come_from_feed() {
    let dir = tmp();
    let base = p(dir.path(), "base.qcow2");
    let over = p(dir.path(), "over.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "4M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&over),
    ]);
    let f = std::fs::read(&over).unwrap();
    let mut dec = imagefleet_inspect::Decoder::new(Limits::default(), None, None);
    let mut sink = |_e: imagefleet_inspect::Extent| {};
    let e = dec
        .feed(&f[..64 * 1024], &mut sink)
        .expect_err("refused while feeding");
    assert_eq!(e.reason(), "InvalidImage.BackingFile");
    // The decoder stays refused.
    assert!(dec.feed(&f[64 * 1024..], &mut sink).is_err());
}

#[test]
fn vhdx_with_parent() {
    let dir = tmp();
    let img = p(dir.path(), "d.vhdx");
    qemu_img(&["create", "-f", "vhdx", s(&img), "8M"]);
    let mut f = std::fs::read(&img).unwrap();
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    // Metadata region GUID 8B7CA206-4790-4B9A-B8FE-575F050F886E, on-disk byte order.
    let meta_guid = [
        0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88,
        0x6e,
    ];
    // File parameters item CAA16737-FA36-4D43-B3B6-33F0AA44E76B.
    let params_guid = [
        0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7,
        0x6b,
    ];
    let rt = 192 * 1024;
    let count = le32(&f, rt + 8) as usize;
    let meta = (0..count)
        .map(|i| rt + 16 + 32 * i)
        .find(|&e| f[e..e + 16] == meta_guid)
        .map(|e| le64(&f, e + 16) as usize)
        .expect("metadata region");
    let items = u16::from_le_bytes([f[meta + 10], f[meta + 11]]) as usize;
    let item = (0..items)
        .map(|i| meta + 32 + 32 * i)
        .find(|&e| f[e..e + 16] == params_guid)
        .map(|e| meta + le32(&f, e + 16) as usize)
        .expect("file parameters item");
    f[item + 4] |= 2;
    assert_eq!(refusal(&f, None), "InvalidImage.BackingFile");
}

#[test]
fn header_is_known_early() {
    let dir = tmp();
    let f = qcow2_with_data(dir.path(), 2 << 20, "compat=1.1");
    let mut dec = imagefleet_inspect::Decoder::new(Limits::default(), None, None);
    let mut sink = |_e: imagefleet_inspect::Extent| {};
    dec.feed(&f[..40 * 1024], &mut sink).unwrap();
    let h = dec.header().expect("header known after the first 40 KiB");
    assert_eq!(h.format, imagefleet_inspect::Format::Qcow2);
    assert_eq!(h.virtual_size, Some(2 << 20));
    assert!(!h.provisional);
}

/// A 400 GiB qcow2 with a few MiB written: streams as a handful of extents, within the bound,
/// with the written data where qemu-io put it.
#[test]
fn huge_sparse_qcow2() {
    let dir = tmp();
    let img = p(dir.path(), "big.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "400G"]);
    let writes = [
        (0u64, 0x11u8),
        (100 << 30, 0x22),
        ((400 << 30) - (1 << 20), 0x33),
    ];
    for (off, pat) in writes {
        qemu_io(&[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pat} {off} 1M"),
            s(&img),
        ]);
    }
    let f = std::fs::read(&img).unwrap();
    let mut dec = imagefleet_inspect::Decoder::new(Limits::default(), None, None);
    let mut next = 0u64;
    let mut extents = 0usize;
    let mut data: Vec<(u64, u8, usize)> = Vec::new();
    let mut sink = |e: imagefleet_inspect::Extent| {
        assert_eq!(e.offset(), next);
        next += e.len();
        extents += 1;
        if let imagefleet_inspect::Extent::Data { offset, bytes } = e {
            data.push((offset, bytes[0], bytes.len()));
            assert!(bytes.iter().all(|&b| b == bytes[0]));
        }
    };
    let mut max_held = 0;
    for piece in f.chunks(64 * 1024) {
        dec.feed(piece, &mut sink).unwrap();
        max_held = max_held.max(dec.held_bytes());
    }
    let summary = dec.finish(&mut sink).unwrap();
    assert_eq!(summary.virtual_size, 400 << 30);
    assert_eq!(next, 400 << 30);
    assert!(extents < 100, "{extents} extents");
    assert!(max_held < 4 << 20, "held {max_held}");
    for (off, pat) in writes {
        let total: usize = data
            .iter()
            .filter(|(o, b, _)| *o >= off && *o < off + (1 << 20) && *b == pat)
            .map(|(_, _, l)| *l)
            .sum();
        assert_eq!(total, 1 << 20, "data at {off}");
    }
}

/// L1, grain directory and BAT entries that point past the end of the file.
#[test]
fn tables_out_of_range() {
    let dir = tmp();
    let src = p(dir.path(), "src.raw");
    std::fs::write(&src, source_disk(4 << 20, 12)).unwrap();
    let convert = |fmt: &str, opts: &str, name: &str| -> Vec<u8> {
        let img = p(dir.path(), name);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            fmt,
            "-o",
            opts,
            s(&src),
            s(&img),
        ]);
        std::fs::read(&img).unwrap()
    };
    // qcow2: the first L1 entry, far away and just past the end.
    let f = convert("qcow2", "compat=1.1", "d.qcow2");
    let l1 = l1_offset(&f);
    for target in [1u64 << 40, (f.len() as u64).div_ceil(65536) * 65536 + 65536] {
        let mut g = f.clone();
        put_be64(&mut g, l1, (1 << 63) | target);
        assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent", "{target}");
    }
    // vmdk: the first grain directory entry.
    let f = convert("vmdk", "subformat=monolithicSparse", "d.vmdk");
    let gd = u64::from_le_bytes(f[56..64].try_into().unwrap()) as usize * 512;
    let mut g = f.clone();
    g[gd..gd + 4].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent");
    // vhd: the first BAT entry.
    let f = convert("vpc", "subformat=dynamic", "d.vhd");
    let bat = be64(&f, 512 + 16) as usize;
    let mut g = f.clone();
    put_be32(&mut g, bat, 0x7fff_fff0);
    assert_eq!(refusal(&g, None), "InvalidImage.Inconsistent");
    // qcow2 with a declared file size: the same edit is refused while feeding.
    let f = convert("qcow2", "compat=1.1", "e.qcow2");
    let mut g = f.clone();
    put_be64(
        &mut g,
        l1_offset(&f),
        (1 << 63) | (f.len() as u64 + (1 << 20)),
    );
    let mut dec = imagefleet_inspect::Decoder::new(Limits::default(), None, Some(g.len() as u64));
    let mut sink = |_e: imagefleet_inspect::Extent| {};
    let e = dec.feed(&g, &mut sink).expect_err("refused while feeding");
    assert_eq!(e.reason(), "InvalidImage.Inconsistent");
}

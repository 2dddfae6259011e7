//! Images built by qemu-img in every supported format decode, fed in random-sized pieces, to
//! exactly the guest content qemu-img itself reads from them.

mod common;

use common::*;
use imagefleet_inspect::{DeclaredFormat, Format, Limits};
use rand::rngs::StdRng;
use rand::SeedableRng;

const SIZE: usize = 20 * 1024 * 1024 + 3 * 65536 + 5 * 512;

/// Converts a fresh source disk to `fmt` with `opts`, decodes it, and compares with the
/// source and with qemu-img's own reading.
fn roundtrip(name: &str, fmt: &str, opts: &[&str], expect: Format, seed: u64) {
    roundtrip_sized(name, fmt, opts, expect, seed, SIZE)
}

fn roundtrip_sized(name: &str, fmt: &str, opts: &[&str], expect: Format, seed: u64, size: usize) {
    let dir = tmp();
    let src = p(dir.path(), "src.raw");
    let source = source_disk(size, seed);
    std::fs::write(&src, &source).unwrap();
    let img = p(dir.path(), name);
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    args.extend_from_slice(opts);
    args.push(s(&src));
    args.push(s(&img));
    qemu_img(&args);
    check_image(dir.path(), &img, fmt, expect, &source, seed);
}

fn check_image(
    dir: &std::path::Path,
    img: &std::path::Path,
    fmt: &str,
    expect: Format,
    source: &[u8],
    seed: u64,
) {
    let file = std::fs::read(img).unwrap();
    let judge = qemu_raw(dir, img, fmt);
    let mut rng = StdRng::seed_from_u64(seed);
    for (i, max_piece) in [1 << 20, 4096, 100_003].into_iter().enumerate() {
        let file_size = if i == 1 {
            Some(file.len() as u64)
        } else {
            None
        };
        let d = decode_with(
            &file,
            Limits::default(),
            Some(expect.declared()),
            file_size,
            &mut rng,
            max_piece,
        )
        .unwrap_or_else(|e| panic!("{} refused: {e}", img.display()));
        assert_eq!(d.summary.format, expect);
        assert!(d.header_seen, "the header must be known before finish");
        assert_eq!(d.summary.virtual_size as usize, judge.len(), "virtual size");
        assert!(
            d.content == judge,
            "content differs from qemu-img's reading"
        );
        assert!(
            d.content[..source.len()] == *source,
            "content differs from the source"
        );
        assert!(d.content[source.len()..].iter().all(|&b| b == 0));
        assert!(
            d.max_held <= Limits::default().max_reorder_bytes,
            "held {} bytes",
            d.max_held
        );
    }
    // Undeclared: detection alone finds the same format.
    let d = decode(&file, None).unwrap();
    assert_eq!(d.summary.format, expect);
}

#[test]
fn raw() {
    let dir = tmp();
    let source = source_disk(SIZE, 1);
    let img = p(dir.path(), "d.raw");
    std::fs::write(&img, &source).unwrap();
    check_image(dir.path(), &img, "raw", Format::Raw, &source, 1);
}

#[test]
fn qcow2_v2() {
    roundtrip("d.qcow2", "qcow2", &["-o", "compat=0.10"], Format::Qcow2, 2);
}

#[test]
fn qcow2_v3() {
    roundtrip("d.qcow2", "qcow2", &["-o", "compat=1.1"], Format::Qcow2, 3);
}

#[test]
fn qcow2_small_clusters_many_l2_tables() {
    roundtrip(
        "d.qcow2",
        "qcow2",
        &["-o", "cluster_size=4096"],
        Format::Qcow2,
        4,
    );
}

#[test]
fn qcow2_compressed_deflate() {
    roundtrip("d.qcow2", "qcow2", &["-c"], Format::Qcow2, 5);
}

#[test]
fn qcow2_compressed_zstd() {
    roundtrip(
        "d.qcow2",
        "qcow2",
        &["-c", "-o", "compression_type=zstd"],
        Format::Qcow2,
        6,
    );
}

#[test]
fn qcow2_compressed_v2_small_clusters() {
    roundtrip(
        "d.qcow2",
        "qcow2",
        &["-c", "-o", "compat=0.10,cluster_size=8192"],
        Format::Qcow2,
        7,
    );
}

#[test]
fn qcow2_extended_l2() {
    roundtrip(
        "d.qcow2",
        "qcow2",
        &["-o", "extended_l2=on"],
        Format::Qcow2,
        8,
    );
}

#[test]
fn qcow2_preallocated_metadata() {
    roundtrip(
        "d.qcow2",
        "qcow2",
        &["-o", "preallocation=metadata"],
        Format::Qcow2,
        9,
    );
}

/// Zero clusters (the v3 zero flag, allocated and not) and zeroed subclusters, written with
/// qemu-io over data.
#[test]
fn qcow2_zero_clusters_and_subclusters() {
    for (seed, opts) in [(10u64, "compat=1.1"), (11, "extended_l2=on")] {
        let dir = tmp();
        let src = p(dir.path(), "src.raw");
        let mut source = source_disk(8 << 20, seed);
        std::fs::write(&src, &source).unwrap();
        let img = p(dir.path(), "z.qcow2");
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
        for (off, len, unmap) in [
            (0usize, 1 << 20, false),
            (2 << 20, 256 << 10, true),
            (3 << 20, 2048, false),
            ((5 << 20) + 4096, 8192, false),
        ] {
            let cmd = format!("write -z {} {off} {len}", if unmap { "-u" } else { "" });
            qemu_io(&["-f", "qcow2", "-c", &cmd, s(&img)]);
            source[off..off + len].fill(0);
        }
        check_image(dir.path(), &img, "qcow2", Format::Qcow2, &source, seed);
    }
}

#[test]
fn vmdk_monolithic_sparse() {
    roundtrip(
        "d.vmdk",
        "vmdk",
        &["-o", "subformat=monolithicSparse"],
        Format::VmdkMonolithicSparse,
        12,
    );
}

#[test]
fn vmdk_stream_optimized() {
    roundtrip(
        "d.vmdk",
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        Format::VmdkStreamOptimized,
        13,
    );
}

#[test]
fn vhd_fixed() {
    roundtrip(
        "d.vhd",
        "vpc",
        &["-o", "subformat=fixed"],
        Format::VhdFixed,
        14,
    );
}

#[test]
fn vhd_dynamic() {
    roundtrip(
        "d.vhd",
        "vpc",
        &["-o", "subformat=dynamic"],
        Format::VhdDynamic,
        15,
    );
}

#[test]
fn vhd_fixed_force_size() {
    roundtrip(
        "d.vhd",
        "vpc",
        &["-o", "subformat=fixed,force_size=on"],
        Format::VhdFixed,
        16,
    );
}

#[test]
fn vhdx_dynamic() {
    roundtrip("d.vhdx", "vhdx", &[], Format::Vhdx, 17);
}

#[test]
fn vhdx_small_blocks_and_fixed() {
    roundtrip(
        "d.vhdx",
        "vhdx",
        &["-o", "block_size=1048576,subformat=fixed"],
        Format::Vhdx,
        18,
    );
}

#[test]
fn larger_qcow2_compressed_64mib() {
    roundtrip_sized("d.qcow2", "qcow2", &["-c"], Format::Qcow2, 19, 64 << 20);
}

#[test]
fn iso_is_raw_when_allowed() {
    let mut source = source_disk(2 << 20, 20);
    source[32769..32774].copy_from_slice(b"CD001");
    let mut rng = StdRng::seed_from_u64(20);
    let limits = Limits {
        allow_iso: true,
        ..Limits::default()
    };
    let d = decode_with(&source, limits, None, None, &mut rng, 5000).unwrap();
    assert_eq!(d.summary.format, Format::Iso);
    assert!(d.content == source);
    let d = decode_with(
        &source,
        limits,
        Some(DeclaredFormat::Iso),
        Some(source.len() as u64),
        &mut rng,
        70_000,
    )
    .unwrap();
    assert_eq!(d.summary.format, Format::Iso);
}

#[test]
fn tiny_raw_files() {
    for len in [1usize, 511, 512, 513, 4000, 33 * 1024 + 1] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        let d = decode(&data, None).unwrap();
        assert_eq!(d.summary.format, Format::Raw);
        assert_eq!(d.content, data);
    }
}

#[test]
fn digest_matches_content() {
    use sha2::{Digest, Sha256};
    let source = source_disk(3 << 20, 21);
    let mut dec = imagefleet_inspect::Decoder::new(Limits::default(), None, None);
    dec.set_digest(true);
    let mut sink = |_e: imagefleet_inspect::Extent| {};
    dec.feed(&source, &mut sink).unwrap();
    let summary = dec.finish(&mut sink).unwrap();
    let want: [u8; 32] = Sha256::digest(&source).into();
    assert_eq!(summary.sha256, Some(want));
}

/// Internal snapshots and persistent bitmaps leave clusters no active table refers to; the
/// active disk still decodes to what qemu-img reads.
#[test]
fn qcow2_with_snapshot_and_bitmap() {
    let dir = tmp();
    let src = p(dir.path(), "src.raw");
    let source = source_disk(6 << 20, 22);
    std::fs::write(&src, &source).unwrap();
    let img = p(dir.path(), "s.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&img)]);
    qemu_img(&["snapshot", "-c", "before", s(&img)]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x5a 1M 2M", s(&img)]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    let file = std::fs::read(&img).unwrap();
    let judge = qemu_raw(dir.path(), &img, "qcow2");
    let mut rng = StdRng::seed_from_u64(22);
    let d = decode_with(&file, Limits::default(), None, None, &mut rng, 70_000).unwrap();
    assert!(d.content == judge);
    assert!(d.content[(1 << 20)..(3 << 20)].iter().all(|&b| b == 0x5a));
}

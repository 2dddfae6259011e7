//! Exports checked by `qemu-img`: every format, for disks of several shapes, must pass
//! `qemu-img check` (where the format supports it), compare identical to the raw source, and
//! report the expected format and virtual size.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bytes::Bytes;
use imagefleet_export::{is_shared_zeros, ExportError, ExportFormat, Layout, Writer};

const MIB: u64 = 1 << 20;

/// A disk: its layout and the data of its allocated chunks.
struct Disk {
    layout: Layout,
    data: Vec<Option<Bytes>>,
}

/// Deterministic test bytes for chunk `index`: half pseudo-random, half a repeated pattern
/// (so compression has work of both kinds), with one all-zero 64 KiB grain in the middle
/// of chunks whose index is odd.
fn chunk_data(index: u64, len: u64) -> Bytes {
    let mut state = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len as usize);
    for i in 0..len {
        let byte = if i < len / 2 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        } else {
            (index as u8).wrapping_add((i % 251) as u8)
        };
        out.push(byte);
    }
    if index % 2 == 1 && len >= 3 * (64 << 10) {
        let at = (len / 2) as usize & !((64 << 10) - 1);
        out[at..at + (64 << 10)].fill(0);
    }
    // Never all zero: the first byte is set.
    out[0] = 0xA5;
    Bytes::from(out)
}

fn disk(virtual_size: u64, allocated_chunks: &[u64]) -> Disk {
    disk_with_chunks(virtual_size, MIB, allocated_chunks)
}

fn disk_with_chunks(virtual_size: u64, chunk_size: u64, allocated_chunks: &[u64]) -> Disk {
    let count = virtual_size.div_ceil(chunk_size) as usize;
    let mut allocated = vec![false; count];
    for &i in allocated_chunks {
        allocated[i as usize] = true;
    }
    let layout = Layout {
        virtual_size,
        chunk_size,
        allocated,
    };
    let data = (0..count as u64)
        .map(|i| {
            layout
                .is_allocated(i)
                .then(|| chunk_data(i, layout.chunk_len(i)))
        })
        .collect();
    Disk { layout, data }
}

/// The disk as a sparse raw file.
fn write_source(dir: &Path, disk: &Disk) -> PathBuf {
    let path = dir.join("source.raw");
    let mut f = File::create(&path).unwrap();
    f.set_len(disk.layout.virtual_size).unwrap();
    for (i, data) in disk.data.iter().enumerate() {
        if let Some(data) = data {
            f.seek(SeekFrom::Start(i as u64 * disk.layout.chunk_size))
                .unwrap();
            f.write_all(data).unwrap();
        }
    }
    f.sync_all().unwrap();
    path
}

struct Exported {
    path: PathBuf,
    bytes: u64,
    /// Bytes in pieces that are not slices of the shared zero buffer.
    allocated_bytes: u64,
    file_size: Option<u64>,
    virtual_size: u64,
}

fn export(dir: &Path, disk: &Disk, format: ExportFormat, seed: u64) -> Exported {
    let path = dir.join(format!("export.{format}"));
    let mut out = BufWriter::new(File::create(&path).unwrap());
    // Shared zero pieces become holes, so a raw export of a big sparse disk stays cheap.
    let mut writer = Writer::new(format, disk.layout.clone(), seed).unwrap();
    let file_size = writer.file_size();
    let virtual_size = writer.virtual_size();
    let mut bytes = 0u64;
    let mut allocated_bytes = 0u64;
    let mut put = |pieces: imagefleet_export::Pieces| {
        for piece in pieces {
            bytes += piece.len() as u64;
            if is_shared_zeros(&piece) {
                out.seek(SeekFrom::Current(piece.len() as i64)).unwrap();
            } else {
                allocated_bytes += piece.len() as u64;
                out.write_all(&piece).unwrap();
            }
        }
    };
    put(writer.start());
    for (i, data) in disk.data.iter().enumerate() {
        if let Some(data) = data {
            put(writer.chunk(i as u64, data.clone()).unwrap());
        }
    }
    put(writer.finish().unwrap());
    let file = out.into_inner().unwrap();
    file.set_len(bytes).unwrap();
    file.sync_all().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
    Exported {
        path,
        bytes,
        allocated_bytes,
        file_size,
        virtual_size,
    }
}

fn qemu_name(format: ExportFormat) -> &'static str {
    match format {
        ExportFormat::Raw => "raw",
        ExportFormat::Qcow2 => "qcow2",
        ExportFormat::Vhd => "vpc",
        ExportFormat::Vmdk => "vmdk",
    }
}

fn qemu_img(args: &[&str]) -> Output {
    match Command::new("qemu-img").args(args).output() {
        Ok(output) => output,
        Err(e) => panic!(
            "these tests need `qemu-img` on PATH (Debian/Ubuntu package qemu-utils): \
             running it failed: {e}"
        ),
    }
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn check(format: ExportFormat, path: &Path) {
    let output = qemu_img(&["check", "-f", qemu_name(format), path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if matches!(format, ExportFormat::Raw | ExportFormat::Vhd) && output.status.code() == Some(63) {
        // qemu-img has no consistency check for raw or VHD ("does not support checks").
        assert!(stderr.contains("not support checks"), "{}", text(&output));
        return;
    }
    assert!(
        output.status.success(),
        "qemu-img check {format}: {}",
        text(&output)
    );
    assert!(
        stdout.contains("No errors were found"),
        "qemu-img check {format}: {}",
        text(&output)
    );
    assert!(
        !stdout.contains("leaked"),
        "qemu-img check {format}: {}",
        text(&output)
    );
}

fn compare(format: ExportFormat, source: &Path, path: &Path) {
    let output = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        qemu_name(format),
        source.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "qemu-img compare {format}: {}",
        text(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("Images are identical"),
        "qemu-img compare {format}: {}",
        text(&output)
    );
}

/// (format, virtual size) as `qemu-img info` reports them for the top node.
fn info(path: &Path) -> (String, u64) {
    let output = qemu_img(&["info", path.to_str().unwrap()]);
    assert!(output.status.success(), "qemu-img info: {}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let format = stdout
        .lines()
        .find_map(|l| l.strip_prefix("file format: "))
        .unwrap_or_else(|| panic!("no format in {stdout}"))
        .trim()
        .to_string();
    let size_line = stdout
        .lines()
        .find(|l| l.starts_with("virtual size: "))
        .unwrap_or_else(|| panic!("no virtual size in {stdout}"));
    let bytes = size_line
        .split('(')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparsable {size_line}"));
    (format, bytes)
}

/// `qemu-img convert` back to raw gives the source bytes followed only by zeros.
fn convert_back(format: ExportFormat, dir: &Path, source: &Path, path: &Path) {
    let back = dir.join("back.raw");
    let output = qemu_img(&[
        "convert",
        "-f",
        qemu_name(format),
        "-O",
        "raw",
        path.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "qemu-img convert {format}: {}",
        text(&output)
    );
    let mut original = Vec::new();
    File::open(source)
        .unwrap()
        .read_to_end(&mut original)
        .unwrap();
    let mut converted = Vec::new();
    File::open(&back)
        .unwrap()
        .read_to_end(&mut converted)
        .unwrap();
    assert!(
        converted.len() >= original.len(),
        "{format}: converted file is short"
    );
    assert!(
        converted[..original.len()] == original[..],
        "{format}: content differs"
    );
    assert!(
        converted[original.len()..].iter().all(|b| *b == 0),
        "{format}: bytes past the virtual size are not zero"
    );
    std::fs::remove_file(back).unwrap();
}

/// Exports `disk` in every format and checks each with qemu-img. Returns, per format, the
/// file size and the bytes that were not shared zero pieces.
fn export_all(disk: &Disk, convert: bool) -> Vec<(ExportFormat, u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let source = write_source(dir.path(), disk);
    let mut sizes = Vec::new();
    for format in ExportFormat::ALL {
        let out = export(dir.path(), disk, format, 42);
        if let Some(expected) = out.file_size {
            assert_eq!(
                out.bytes, expected,
                "{format}: file_size() differs from the bytes produced"
            );
        } else {
            assert_eq!(format, ExportFormat::Vmdk);
        }
        let v = disk.layout.virtual_size;
        match format {
            ExportFormat::Raw => assert_eq!(out.virtual_size, v),
            ExportFormat::Qcow2 | ExportFormat::Vmdk => {
                assert_eq!(out.virtual_size, v.div_ceil(512) * 512)
            }
            ExportFormat::Vhd => {
                assert!(out.virtual_size >= v && out.virtual_size.is_multiple_of(512));
                assert!(out.virtual_size - v < 4 * MIB, "{format}: rounded too far");
            }
        }
        check(format, &out.path);
        compare(format, &source, &out.path);
        let (reported_format, reported_size) = info(&out.path);
        assert_eq!(reported_format, qemu_name(format));
        if format == ExportFormat::Raw {
            // qemu counts a raw file in whole sectors.
            assert_eq!(reported_size, v.div_ceil(512) * 512);
        } else {
            assert_eq!(
                reported_size, out.virtual_size,
                "{format}: qemu-img info virtual size"
            );
        }
        if convert {
            convert_back(format, dir.path(), &source, &out.path);
        }
        sizes.push((format, out.bytes, out.allocated_bytes));
        std::fs::remove_file(&out.path).unwrap();
    }
    sizes
}

#[test]
fn size_not_a_multiple_of_a_mebibyte() {
    // 5 MiB + 12345 bytes: six chunks, the last 12345 bytes long (not even whole sectors).
    let disk = disk(5 * MIB + 12345, &[0, 2, 5]);
    export_all(&disk, true);
}

#[test]
fn other_chunk_sizes() {
    // 64 KiB chunks (one cluster or grain each) and 2 MiB chunks (one VHD block each).
    export_all(
        &disk_with_chunks(3 * MIB + 1000, 64 << 10, &[0, 1, 17, 40, 48]),
        true,
    );
    export_all(&disk_with_chunks(9 * MIB + 512, 2 * MIB, &[1, 4]), true);
}

#[test]
fn all_zero_image() {
    let disk = disk(8 * MIB, &[]);
    let sizes = export_all(&disk, true);
    for (format, bytes, allocated) in sizes {
        match format {
            ExportFormat::Raw => assert_eq!((bytes, allocated), (8 * MIB, 0)),
            // Metadata only: no data clusters, blocks or grains.
            _ => assert!(
                bytes <= 5 * (64 << 10),
                "{format}: {bytes} bytes for an empty disk"
            ),
        }
    }
}

#[test]
fn fully_allocated_image() {
    let count = 12;
    let all: Vec<u64> = (0..=count).collect();
    let disk = disk(count * MIB + 4096, &all);
    export_all(&disk, true);
}

#[test]
fn sparse_image_with_scattered_data() {
    let disk = disk(64 * MIB, &[0, 5, 6, 31, 32, 33, 47, 63]);
    let sizes = export_all(&disk, true);
    for (format, bytes, _) in sizes {
        if format != ExportFormat::Raw {
            assert!(
                bytes < 24 * MIB,
                "{format}: {bytes} bytes for 8 MiB of data"
            );
        }
    }
}

#[test]
fn sparse_image_across_many_tables() {
    // Data in three qcow2 L2 ranges (512 MiB each) and many VMDK grain tables (32 MiB each).
    let disk = disk(
        1536 * MIB + 3 * MIB + 700,
        &[3, 511, 512, 700, 1024, 1536, 1539],
    );
    export_all(&disk, false);
}

#[test]
fn zero_chunks_cost_nothing() {
    // 4 GiB with one allocated chunk: every sparse format stays small.
    let disk = disk(4 << 30, &[2049]);
    let vhd_size = Writer::new(ExportFormat::Vhd, disk.layout.clone(), 0)
        .unwrap()
        .virtual_size();
    let vhd_table = (vhd_size.div_ceil(2 * MIB) * 4).div_ceil(512) * 512;
    assert!(vhd_table <= 8704, "4 GiB rounds up by less than one block");
    let sizes = export_all(&disk, false);
    for (format, bytes, allocated) in sizes {
        // Only the one chunk and the metadata were ever allocated.
        assert!(
            allocated < MIB + (128 << 10),
            "{format}: {allocated} bytes allocated"
        );
        match format {
            ExportFormat::Raw => assert_eq!((bytes, allocated), (4 << 30, MIB)),
            // Header, refcount table and block, L1, one L2, 16 data clusters.
            ExportFormat::Qcow2 => assert_eq!(bytes, 21 * (64 << 10)),
            // Footer copy, header, block table, one 2 MiB block with its bitmap, footer.
            ExportFormat::Vhd => assert_eq!(bytes, 512 + 1024 + vhd_table + 512 + 2 * MIB + 512),
            // Header area, one compressed MiB at most, its table, the directory, the footer.
            ExportFormat::Vmdk => assert!(bytes < MIB + (256 << 10), "vmdk: {bytes} bytes"),
        }
    }
}

#[test]
fn output_is_determined_by_the_seed() {
    let disk = disk(3 * MIB, &[1]);
    let dir = tempfile::tempdir().unwrap();
    for format in [ExportFormat::Vhd, ExportFormat::Vmdk, ExportFormat::Qcow2] {
        let a = std::fs::read(export(dir.path(), &disk, format, 1).path).unwrap();
        let b = std::fs::read(export(dir.path(), &disk, format, 1).path).unwrap();
        let c = std::fs::read(export(dir.path(), &disk, format, 2).path).unwrap();
        assert_eq!(a, b, "{format}: same seed, same bytes");
        if format == ExportFormat::Qcow2 {
            assert_eq!(a, c, "qcow2 carries no identifiers");
        } else {
            assert_ne!(a, c, "{format}: the seed sets the identifiers");
        }
    }
}

#[test]
fn vhd_checksums_are_verified_by_qemu() {
    let disk = disk(3 * MIB, &[1]);
    let dir = tempfile::tempdir().unwrap();
    let out = export(dir.path(), &disk, ExportFormat::Vhd, 7);
    let mut bytes = std::fs::read(&out.path).unwrap();
    let len = bytes.len();
    // The creator-application field of both footer copies.
    bytes[28] ^= 1;
    bytes[len - 512 + 28] ^= 1;
    std::fs::write(&out.path, &bytes).unwrap();
    let output = qemu_img(&["info", "-f", "vpc", out.path.to_str().unwrap()]);
    assert!(
        !output.status.success(),
        "a damaged footer must be refused: {}",
        text(&output)
    );
}

#[test]
fn calls_outside_the_contract_are_errors() {
    let layout = Layout {
        virtual_size: 3 * MIB + 10,
        chunk_size: MIB,
        allocated: vec![false, true, false, true],
    };
    let full = Bytes::from(vec![1u8; MIB as usize]);
    for format in ExportFormat::ALL {
        let mut w = Writer::new(format, layout.clone(), 0).unwrap();
        assert_eq!(
            w.chunk(1, full.clone()).unwrap_err(),
            ExportError::NotStarted { index: 1 }
        );
        w.start();
        assert_eq!(
            w.chunk(0, full.clone()).unwrap_err(),
            ExportError::UnexpectedChunk {
                index: 0,
                expected: 1
            }
        );
        assert_eq!(
            w.chunk(1, full.slice(..100)).unwrap_err(),
            ExportError::ChunkLength {
                index: 1,
                expected: MIB,
                got: 100
            }
        );
        w.chunk(1, full.clone()).unwrap();
        assert_eq!(
            w.chunk(1, full.clone()).unwrap_err(),
            ExportError::UnexpectedChunk {
                index: 1,
                expected: 3
            }
        );
        let mut unfinished = Writer::new(format, layout.clone(), 0).unwrap();
        unfinished.start();
        assert_eq!(
            unfinished.finish().unwrap_err(),
            ExportError::MissingChunk { index: 1 }
        );
        w.chunk(3, Bytes::from(vec![3u8; 10])).unwrap();
        assert_eq!(
            w.chunk(4, Bytes::from(vec![3u8; 10])).unwrap_err(),
            ExportError::NoMoreChunks { index: 4 }
        );
        w.finish().unwrap();
    }
}

#[test]
fn bad_layouts_are_refused() {
    let good = Layout {
        virtual_size: 2 * MIB,
        chunk_size: MIB,
        allocated: vec![true, false],
    };
    let cases = [
        Layout {
            virtual_size: 0,
            allocated: vec![],
            ..good.clone()
        },
        Layout {
            allocated: vec![true],
            ..good.clone()
        },
        Layout {
            chunk_size: MIB + 1,
            ..good.clone()
        },
        Layout {
            chunk_size: 0,
            ..good.clone()
        },
        Layout {
            virtual_size: (1 << 40) + 1,
            ..good.clone()
        },
    ];
    for format in ExportFormat::ALL {
        assert!(Writer::new(format, good.clone(), 0).is_ok());
        for layout in &cases {
            assert!(
                Writer::new(format, layout.clone(), 0).is_err(),
                "{format}: {layout:?}"
            );
        }
    }
}

#[test]
fn format_names_round_trip() {
    for format in ExportFormat::ALL {
        assert_eq!(format.as_str().parse::<ExportFormat>().unwrap(), format);
        assert_eq!(format.to_string(), format.as_str());
    }
    assert_eq!(
        "vpc".parse::<ExportFormat>().unwrap_err(),
        ExportError::UnknownFormat("vpc".into())
    );
}

//! A bounded property test: random mutations of valid images of every format, random byte
//! strings, random piece sizes. The decoder never panics, never holds more than its bound,
//! keeps the extent contract on what it accepts, and never accepts a file that qemu-img
//! reads as having a backing file.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use imagefleet_inspect::{DeclaredFormat, Decoder, Extent, Limits, Summary};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const CASES: usize = 2500;
const LIMIT: usize = 1 << 20;

fn limits() -> Limits {
    Limits {
        max_virtual_size: 1 << 40,
        max_actual_size: 64 << 20,
        max_reorder_bytes: LIMIT,
        allow_iso: true,
    }
}

/// Valid images of every format, from one small source disk.
fn corpus(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let src = p(dir, "src.raw");
    let mut source = source_disk(768 * 1024, 42);
    source.resize(1 << 20, 0);
    std::fs::write(&src, &source).unwrap();
    let mut out = vec![("raw".to_string(), source.clone())];
    let variants: &[(&str, &[&str])] = &[
        ("qcow2", &["-o", "compat=0.10"]),
        ("qcow2", &["-o", "compat=1.1,cluster_size=4096"]),
        ("qcow2", &["-c"]),
        (
            "qcow2",
            &["-c", "-o", "compression_type=zstd,cluster_size=16384"],
        ),
        ("qcow2", &["-o", "extended_l2=on"]),
        ("vmdk", &["-o", "subformat=monolithicSparse"]),
        ("vmdk", &["-o", "subformat=streamOptimized"]),
        ("vpc", &["-o", "subformat=dynamic"]),
        ("vpc", &["-o", "subformat=fixed"]),
        ("vhdx", &["-o", "block_size=1M,log_size=1M"]),
    ];
    for (i, (fmt, opts)) in variants.iter().enumerate() {
        let img = p(dir, &format!("c{i}.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.push(s(&src));
        args.push(s(&img));
        qemu_img(&args);
        out.push((format!("{fmt} {opts:?}"), std::fs::read(&img).unwrap()));
    }
    out
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x200,
    0x1_0000,
    0xffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    0x7fff_ffff_ffff_fe00,
    1 << 40,
    0x0000_0001_0000_0000,
];

fn mutate(file: &mut Vec<u8>, rng: &mut StdRng) {
    let n = rng.random_range(1..=6);
    for _ in 0..n {
        if file.is_empty() {
            file.push(rng.random());
            continue;
        }
        let len = file.len();
        // Most edits land in the first 512 KiB, where headers and tables are.
        let at = if rng.random_bool(0.7) {
            rng.random_range(0..len.min(512 * 1024))
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..8) {
            0 | 1 => file[at] ^= 1 << rng.random_range(0..8),
            2 => file[at] = rng.random(),
            3 => {
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let end = (at + 8).min(len);
                let bytes = if rng.random_bool(0.5) {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                file[at..end].copy_from_slice(&bytes[..end - at]);
            }
            4 => file.truncate(at),
            5 => {
                let extra = rng.random_range(1..4096);
                let mut tail = vec![0u8; extra];
                rng.fill_bytes(&mut tail);
                file.extend_from_slice(&tail);
            }
            6 => {
                // A header field of the format: qcow2 backing offset, vhd disk type, etc.
                let (off, val): (usize, &[u8]) = match rng.random_range(0..5) {
                    0 => (8, &[0, 0, 0, 0, 0, 0, 0x02, 0x00]),
                    1 => (60, &[0, 0, 0, 4]),
                    2 => (32769, b"CD001"),
                    3 => (72, &[0, 0, 0, 0, 0, 0, 0, 0x04]),
                    _ => (0, b"QFI\xfb"),
                };
                if off + val.len() <= len {
                    file[off..off + val.len()].copy_from_slice(val);
                }
            }
            _ => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(0..len);
                let n = rng.random_range(1..512).min(len - a).min(len - b);
                let chunk = file[a..a + n].to_vec();
                file[b..b + n].copy_from_slice(&chunk);
            }
        }
    }
}

/// Decodes without reassembling (a mutated size may be huge); checks the contract and the
/// memory bound after every piece.
fn run(
    file: &[u8],
    declared: Option<DeclaredFormat>,
    sized: bool,
    rng: &mut StdRng,
) -> Option<Summary> {
    let file_size = sized.then_some(file.len() as u64);
    let mut dec = Decoder::new(limits(), declared, file_size);
    let mut next = 0u64;
    let mut check = |e: Extent| {
        assert_eq!(e.offset(), next, "extents out of order");
        assert!(!e.is_empty());
        next += e.len();
    };
    let mut at = 0;
    while at < file.len() {
        let max = 1usize << rng.random_range(0..17);
        let n = rng.random_range(1..=max).min(file.len() - at);
        let r = dec.feed(&file[at..at + n], &mut check);
        assert!(
            dec.held_bytes() <= LIMIT + 64 * 1024,
            "held {} bytes",
            dec.held_bytes()
        );
        if let Err(e) = r {
            assert!(e.reason().starts_with("InvalidImage."));
            return None;
        }
        at += n;
    }
    match dec.finish(&mut check) {
        Ok(summary) => {
            assert_eq!(next, summary.virtual_size, "extents do not cover the disk");
            Some(summary)
        }
        Err(e) => {
            assert!(e.reason().starts_with("InvalidImage."));
            None
        }
    }
}

#[test]
fn mutated_images_and_random_bytes() {
    let dir = tmp();
    let corpus = corpus(dir.path());
    let mut rng = StdRng::seed_from_u64(0x1a2b_3c4d);
    let mut accepted_mutants: Vec<(imagefleet_inspect::Format, Vec<u8>)> = Vec::new();
    let mut accepted = 0usize;
    for case in 0..CASES {
        let seed = rng.next_u64();
        let mut crng = StdRng::seed_from_u64(seed);
        let (file, what) = if case % 10 == 9 {
            let len = crng.random_range(0..100_000);
            let mut f = vec![0u8; len];
            crng.fill_bytes(&mut f);
            if crng.random_bool(0.5) && len >= 8 {
                let magic: &[&[u8]] = &[b"QFI\xfb", b"KDMV", b"conectix", b"vhdxfile", b"QED\0"];
                let m = magic[crng.random_range(0..magic.len())];
                f[..m.len()].copy_from_slice(m);
            }
            (f, "random bytes".to_string())
        } else {
            // The 9 MiB vhdx is slow to feed: pick it less often.
            let mut i = crng.random_range(0..corpus.len());
            if i == corpus.len() - 1 && crng.random_bool(0.7) {
                i = crng.random_range(0..corpus.len() - 1);
            }
            let (name, base) = &corpus[i];
            let mut f = base.clone();
            mutate(&mut f, &mut crng);
            (f, name.clone())
        };
        let declared = if crng.random_bool(0.8) {
            None
        } else {
            ["raw", "qcow2", "vmdk", "vhd", "vhdx", "iso"][crng.random_range(0..6)]
                .parse()
                .ok()
        };
        let sized = crng.random_bool(0.5);
        let result = catch_unwind(AssertUnwindSafe(|| run(&file, declared, sized, &mut crng)));
        let summary = match result {
            Ok(s) => s,
            Err(_) => panic!("case {case} (seed {seed:#x}, {what}) panicked"),
        };
        if let Some(summary) = summary {
            accepted += 1;
            let fmt = summary.format;
            let same = accepted_mutants.iter().filter(|(f, _)| *f == fmt).count();
            if what != "random bytes" && same < 8 && file.len() < (4 << 20) {
                accepted_mutants.push((fmt, file));
            }
        }
    }
    eprintln!(
        "{accepted} of {CASES} cases accepted, {} sampled for qemu-img",
        accepted_mutants.len()
    );
    assert!(accepted > CASES / 20, "only {accepted} cases accepted");
    // qemu-img is the judge of backing files, on a sample of the accepted mutants.
    let mut compared = 0usize;
    for (i, (_, f)) in accepted_mutants.iter().enumerate() {
        let path = p(dir.path(), &format!("m{i}.img"));
        std::fs::write(&path, f).unwrap();
        let Some(info) = qemu_info(&path) else {
            continue;
        };
        assert!(
            info.get("backing-filename").is_none(),
            "accepted a file with a backing file: {info}"
        );
        // Where qemu-img reads the mutant as the same format, it reads the same disk.
        let mut drng = StdRng::seed_from_u64(i as u64);
        let Ok(d) = decode_with(f, limits(), None, None, &mut drng, 100_000) else {
            continue;
        };
        let fmt = info.get("format").and_then(|v| v.as_str()).unwrap_or("");
        let ours = match d.summary.format.as_str() {
            "vhd" => "vpc",
            other => other,
        };
        if fmt != ours || d.summary.format == imagefleet_inspect::Format::VhdFixed {
            continue;
        }
        let judged = path.with_extension("judge");
        let ok = std::process::Command::new("qemu-img")
            .args(["convert", "-f", fmt, "-O", "raw"])
            .arg(&path)
            .arg(&judged)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            let mut theirs = std::fs::read(&judged).unwrap();
            compared += 1;
            // qemu-img rounds a raw file up to whole sectors.
            if fmt == "raw" && theirs.len() > d.content.len() {
                assert!(theirs[d.content.len()..].iter().all(|&b| b == 0));
                theirs.truncate(d.content.len());
            }
            assert!(
                d.content == theirs,
                "mutant {i} ({fmt}) decodes differently from qemu-img: {} vs {} bytes, first difference at {:?}",
                d.content.len(),
                theirs.len(),
                d.content.iter().zip(theirs.iter()).position(|(a, b)| a != b)
            );
        }
    }
    eprintln!("{compared} accepted mutants compared with qemu-img's reading");
}

/// Valid images cut at every kind of place are refused, never accepted short, and the
/// decoder holds no more than its bound.
#[test]
fn truncations_of_valid_images() {
    let dir = tmp();
    let corpus = corpus(dir.path());
    let mut rng = StdRng::seed_from_u64(77);
    for (name, file) in &corpus {
        if name == "raw" || name.starts_with("vpc [\"-o\", \"subformat=fixed\"]") {
            continue;
        }
        for _ in 0..20 {
            let cut = rng.random_range(0..file.len());
            let r = catch_unwind(AssertUnwindSafe(|| {
                run(&file[..cut], None, false, &mut rng)
            }));
            let summary = r.unwrap_or_else(|_| panic!("{name} cut at {cut} panicked"));
            if let Some(s) = summary {
                // A cut that only drops bytes no table refers to may still decode (e.g. the
                // unused end of a qcow2 file); it must then decode to the same disk size.
                assert!(
                    s.virtual_size >= 1 << 20 || s.virtual_size as usize == cut,
                    "{name} cut at {cut} accepted as {s:?}"
                );
            }
        }
    }
}

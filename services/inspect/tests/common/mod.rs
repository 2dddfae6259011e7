//! Shared helpers: qemu-img as the independent judge, source disks, and a decode harness that
//! feeds random-sized pieces and checks the extent contract.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use imagefleet_inspect::{DeclaredFormat, Decoder, Extent, Limits, Refusal, Summary};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Runs qemu-img, failing loudly if it is missing or fails.
pub fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", args)
}

pub fn qemu_io(args: &[&str]) -> String {
    run_tool("qemu-io", args)
}

fn run_tool(tool: &str, args: &[&str]) -> String {
    let output = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!(
            "these tests need `{tool}` (Debian package qemu-utils) on PATH to build and judge \
             images; running it failed: {e}"
        )
    });
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `qemu-img info --output json` of a file, or None if qemu-img cannot open it.
pub fn qemu_info(path: &Path) -> Option<serde_json::Value> {
    let output = Command::new("qemu-img")
        .args(["info", "--output", "json"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("these tests need `qemu-img` on PATH: {e}"));
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// The guest content of an image as qemu-img reads it.
pub fn qemu_raw(dir: &Path, image: &Path, fmt: &str) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.judge.raw",
        image
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("image")
    ));
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// A source disk of `size` bytes: random data, zero runs, repeated data, sprinkled blocks.
pub fn source_disk(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = vec![0u8; size];
    let mut at = 0usize;
    let pattern: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    let mut kind = 0usize;
    while at < size {
        let len = rng.random_range(64 * 1024..3 * 1024 * 1024).min(size - at);
        match kind % 4 {
            0 => rng.fill_bytes(&mut d[at..at + len]),
            1 => {}
            2 => {
                for (i, b) in d[at..at + len].iter_mut().enumerate() {
                    *b = pattern[i % pattern.len()];
                }
            }
            _ => {
                // Mostly zero with small random islands (partly allocated clusters).
                let mut p = at;
                while p < at + len {
                    let n = rng.random_range(1..3000).min(at + len - p);
                    if rng.random_bool(0.3) {
                        rng.fill_bytes(&mut d[p..p + n]);
                    }
                    p += n + rng.random_range(0..200_000);
                }
            }
        }
        at += len;
        kind += 1;
    }
    d
}

pub struct Decoded {
    pub summary: Summary,
    pub content: Vec<u8>,
    pub max_held: usize,
    pub header_seen: bool,
}

/// Feeds `file` in random-sized pieces; checks extents are ordered, contiguous, and cover the
/// virtual size; reassembles the guest content.
pub fn decode_with(
    file: &[u8],
    limits: Limits,
    declared: Option<DeclaredFormat>,
    file_size: Option<u64>,
    rng: &mut StdRng,
    max_piece: usize,
) -> Result<Decoded, Refusal> {
    let mut dec = Decoder::new(limits, declared, file_size);
    let mut content: Vec<u8> = Vec::new();
    let mut next = 0u64;
    let mut take = |e: Extent| {
        assert_eq!(e.offset(), next, "extents must be contiguous and in order");
        assert!(!e.is_empty(), "no empty extents");
        next += e.len();
        match e {
            Extent::Data { bytes, .. } => content.extend_from_slice(&bytes),
            Extent::Zero { len, .. } => content.resize(content.len() + len as usize, 0),
        }
    };
    let mut at = 0usize;
    let mut max_held = 0usize;
    let mut header_seen = false;
    while at < file.len() {
        let n = rng.random_range(1..=max_piece).min(file.len() - at);
        dec.feed(&file[at..at + n], &mut take)?;
        at += n;
        max_held = max_held.max(dec.held_bytes());
        header_seen |= dec.header().is_some();
    }
    let summary = dec.finish(&mut take)?;
    assert_eq!(next, summary.virtual_size, "extents must cover the disk");
    Ok(Decoded {
        summary,
        content,
        max_held,
        header_seen,
    })
}

pub fn decode(file: &[u8], declared: Option<DeclaredFormat>) -> Result<Decoded, Refusal> {
    let mut rng = StdRng::seed_from_u64(file.len() as u64);
    decode_with(file, Limits::default(), declared, None, &mut rng, 300_000)
}

pub fn refusal(file: &[u8], declared: Option<DeclaredFormat>) -> String {
    match decode(file, declared) {
        Ok(d) => panic!("expected a refusal, got {:?}", d.summary),
        Err(e) => {
            eprintln!("refused: {e}");
            e.reason().to_string()
        }
    }
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

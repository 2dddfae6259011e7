//! `imagectl images import` and `images export` against `imaged dev`: a qcow2 made by qemu-img
//! becomes an image whose exports qemu-img judges equal to the source; a hostile file is
//! refused with its reason and leaves no image; stdin works as a file.

mod common;

use common::dev::{imagectl, json, start_dev, stop};
use common::IMAGECTL;
use std::path::Path;
use std::process::{Command, Stdio};

const GZ: &str = "ap-guangzhou";

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (tests/run.sh installs qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 12 MiB raw disk: random bytes, a zero gap and a repeated chunk.
fn raw_source(path: &Path) {
    use rand::RngCore;
    let mut bytes = vec![0u8; 12 << 20];
    rand::rng().fill_bytes(&mut bytes[..3 << 20]);
    let (head, tail) = bytes.split_at_mut(8 << 20);
    tail[..1 << 20].copy_from_slice(&head[..1 << 20]);
    rand::rng().fill_bytes(&mut tail[(2 << 20) + 123..(3 << 20) + 5]);
    std::fs::write(path, &bytes).unwrap();
}

fn custom_image_ids(cluster: &Path) -> Vec<String> {
    let listed = json(&imagectl(
        cluster,
        &[
            "images",
            "list",
            "--region",
            GZ,
            "--type",
            "PRIVATE_IMAGE",
            "--all",
            "--output",
            "json",
        ],
    ));
    listed["imageSet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["imageId"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_qcow2_imports_and_exports_in_every_format_equal_to_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("data"), GZ, None);
    let cluster = dir.path().join("data/cluster.json");
    let raw = dir.path().join("disk.raw");
    raw_source(&raw);
    let qcow2 = dir.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-c",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);

    let imported = json(&imagectl(
        &cluster,
        &[
            "images",
            "import",
            "--region",
            GZ,
            "--file",
            qcow2.to_str().unwrap(),
            "--name",
            "from-qcow2",
            "--format",
            "qcow2",
            "--output",
            "json",
        ],
    ));
    let image = &imported["imageSet"][0];
    assert_eq!(image["imageState"], "NORMAL", "{imported}");
    assert_eq!(image["imageSource"], "EXTERNAL_IMPORT", "{imported}");
    assert_eq!(image["virtualSizeBytes"], (12u64 << 20).to_string());
    let id = image["imageId"].as_str().unwrap().to_string();

    for (format, qemu_format) in [
        ("raw", "raw"),
        ("qcow2", "qcow2"),
        ("vhd", "vpc"),
        ("vmdk", "vmdk"),
    ] {
        let out = dir.path().join(format!("export.{format}"));
        let summary = json(&imagectl(
            &cluster,
            &[
                "images",
                "export",
                "--region",
                GZ,
                "--image",
                &id,
                "--format",
                format,
                "--out",
                out.to_str().unwrap(),
                "--output",
                "json",
            ],
        ));
        exported_as(&summary, &out, format, qemu_format, &raw);
    }

    // The same file from stdin (a regular file redirected: its size is known).
    let status = Command::new(IMAGECTL)
        .arg("--cluster")
        .arg(&cluster)
        .args([
            "--output",
            "id",
            "images",
            "import",
            "--region",
            GZ,
            "--file",
            "-",
            "--name",
            "from-stdin",
        ])
        .stdin(std::fs::File::open(&qcow2).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let second = String::from_utf8(status.stdout).unwrap();
    assert!(second.trim().starts_with("img-"), "{second}");
    let second = second.trim().to_string();

    // Both images in one call (ExportImages), each into the directory as <id>.qcow2.
    let into = dir.path().join("both");
    std::fs::create_dir(&into).unwrap();
    let summary = json(&imagectl(
        &cluster,
        &[
            "images",
            "export",
            "--region",
            GZ,
            "--image",
            &id,
            "--image",
            &second,
            "--format",
            "qcow2",
            "--dir",
            into.to_str().unwrap(),
            "--output",
            "json",
        ],
    ));
    let exports = summary["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 2, "{summary}");
    for (export, image_id) in exports.iter().zip([&id, &second]) {
        assert_eq!(export["imageId"], image_id.as_str(), "{summary}");
        let out = into.join(format!("{image_id}.qcow2"));
        assert_eq!(export["out"], out.to_str().unwrap(), "{summary}");
        exported_as(export, &out, "qcow2", "qcow2", &raw);
    }
    // --out takes one image.
    let refused = Command::new(IMAGECTL)
        .arg("--cluster")
        .arg(&cluster)
        .args([
            "images", "export", "--region", GZ, "--image", &id, "--image", &second,
        ])
        .arg("--out")
        .arg(dir.path().join("one-file"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--dir"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    stop(dev);
}

#[test]
fn a_hostile_file_is_refused_with_its_reason_and_leaves_no_image() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("data"), GZ, None);
    let cluster = dir.path().join("data/cluster.json");
    let base = dir.path().join("base.raw");
    raw_source(&base);
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);
    let before = custom_image_ids(&cluster);
    let out = imagectl(
        &cluster,
        &[
            "images",
            "import",
            "--region",
            GZ,
            "--file",
            overlay.to_str().unwrap(),
            "--name",
            "with-a-backing-file",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("InvalidArgument InvalidImage.BackingFile"),
        "{stderr}"
    );
    assert_eq!(
        custom_image_ids(&cluster),
        before,
        "no image is left behind"
    );

    // A declared format the content contradicts.
    let out = imagectl(
        &cluster,
        &[
            "images",
            "import",
            "--region",
            GZ,
            "--file",
            base.to_str().unwrap(),
            "--format",
            "qcow2",
            "--name",
            "not-a-qcow2",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidImage.FormatMismatch"), "{stderr}");
    assert_eq!(custom_image_ids(&cluster), before);

    // The platforms an import may declare.
    let os = json(&imagectl(
        &cluster,
        &["images", "import-os", "--region", GZ, "--output", "json"],
    ));
    assert!(
        !os["importOsListSupport"].as_array().unwrap().is_empty(),
        "{os}"
    );
    stop(dev);
}

/// `out` is the export `summary` describes, in `format` (`qemu_format` to qemu-img), holding
/// the disk `raw`.
fn exported_as(
    summary: &serde_json::Value,
    out: &std::path::Path,
    format: &str,
    qemu_format: &str,
    raw: &std::path::Path,
) {
    assert_eq!(
        summary["fileBytes"].as_u64(),
        Some(std::fs::metadata(out).unwrap().len()),
        "{summary}"
    );
    if matches!(format, "qcow2" | "vmdk") {
        qemu_img(&["check", "-f", qemu_format, out.to_str().unwrap()]);
    }
    // VHD rounds the disk up to a whole geometry: compare the common part, as qemu-img
    // compare does in its default (non-strict) mode.
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        qemu_format,
        raw.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
}

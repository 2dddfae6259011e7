//! Image import and export over gRPC, against real processes: disk files of every format
//! qemu-img writes are uploaded, read back byte for byte and exported to every format (judged
//! by qemu-img); hostile files are refused with their reason and leave nothing behind; imports
//! that fail late, or are cut off by a restart, leave a failed image and no chunk; the
//! per-account limit on imports; URL imports and their address rules.

mod common;

use common::*;
use futures::StreamExt;
use imagefleet_proto::region::v1::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const MIB: usize = 1 << 20;
/// The source disk: 24 MiB.
const SOURCE_CHUNKS: usize = 24;

/// A raw disk of random data, zero regions, a chunk repeated twice and a chunk half zeros.
/// Returns it and its number of distinct non-zero chunks.
fn source_disk() -> (Vec<u8>, usize) {
    let mut disk = vec![0u8; SOURCE_CHUNKS * MIB];
    let random = |disk: &mut Vec<u8>, from: usize, len: usize| {
        disk[from..from + len].copy_from_slice(&random_bytes(len));
    };
    for c in [0, 1, 2, 3, 16, 17, 18, 19] {
        random(&mut disk, c * MIB, MIB);
    }
    random(&mut disk, 9 * MIB, MIB / 2);
    random(&mut disk, SOURCE_CHUNKS * MIB - 4096, 4096);
    let repeated = disk[MIB..2 * MIB].to_vec();
    disk[8 * MIB..9 * MIB].copy_from_slice(&repeated);
    disk[20 * MIB..21 * MIB].copy_from_slice(&repeated);
    // 0-3, 9, 16-19, 23 (8 and 20 repeat 1).
    (disk, 10)
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Converts the raw `source` to `format` with `options` into `dir/name`.
fn convert(source: &Path, dir: &Path, name: &str, format: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", format];
    args.extend_from_slice(extra);
    let (s, o) = (source.to_str().unwrap(), out.to_str().unwrap());
    args.extend_from_slice(&[s, o]);
    qemu_img(&args);
    out
}

fn parameters(name: &str, format: &str) -> ImportImageParameters {
    ImportImageParameters {
        image_name: name.into(),
        format: format.into(),
        platform: "Ubuntu".into(),
        os_version: "22.04".into(),
        ..Default::default()
    }
}

/// The messages of an upload of `file`: parameters and size first, then 1 MiB pieces.
fn upload_messages(params: ImportImageParameters, file: &[u8]) -> Vec<UploadImageRequest> {
    let mut messages = vec![UploadImageRequest {
        parameters: Some(params),
        size_bytes: file.len() as u64,
        data: Vec::new(),
    }];
    for piece in file.chunks(MIB) {
        messages.push(UploadImageRequest {
            data: piece.to_vec(),
            ..Default::default()
        });
    }
    messages
}

async fn upload(
    region: &mut Region,
    params: ImportImageParameters,
    file: &[u8],
) -> Result<UploadImageResponse, tonic::Status> {
    let messages = upload_messages(params, file);
    region
        .upload_image(futures::stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

/// The caller's images named `name`.
async fn images_named(region: &mut Region, name: &str) -> Vec<Image> {
    region
        .describe_images(DescribeImagesRequest {
            filters: vec![Filter {
                name: "image-name".into(),
                values: vec![name.into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set
}

/// Exports `image_id` as `format` and writes the file as the proto says a client does.
async fn export_file(region: &mut Region, image_id: &str, format: ExportFormat) -> Vec<u8> {
    let mut stream = region
        .export_image(ExportImageRequest {
            image_id: image_id.into(),
            format: format as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut file = Vec::new();
    let mut end = 0;
    while let Some(piece) = stream.next().await {
        let piece = piece.unwrap();
        assert_eq!(piece.format, format as i32);
        let at = piece.offset as usize;
        if file.len() < at + piece.data.len() {
            file.resize(at + piece.data.len(), 0);
        }
        file[at..at + piece.data.len()].copy_from_slice(&piece.data);
        end = at;
    }
    file.resize(end, 0);
    file
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_round_trips_and_stores_only_distinct_chunks() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let dir = tempfile::tempdir().unwrap();
    let (disk, distinct) = source_disk();
    let source = write(dir.path(), "source.raw", &disk);
    let chunk_dir = cluster.region_dir("ap-guangzhou");
    let before = chunk_files(&chunk_dir);

    let files = [
        (
            "raw",
            convert(&source, dir.path(), "d.raw", "raw", &[]),
            "raw",
        ),
        (
            "qcow2",
            convert(
                &source,
                dir.path(),
                "v2.qcow2",
                "qcow2",
                &["-o", "compat=0.10"],
            ),
            "qcow2",
        ),
        (
            "qcow2",
            convert(
                &source,
                dir.path(),
                "v3c.qcow2",
                "qcow2",
                &["-c", "-o", "compat=1.1"],
            ),
            "qcow2",
        ),
        (
            "vmdk",
            convert(
                &source,
                dir.path(),
                "sparse.vmdk",
                "vmdk",
                &["-o", "subformat=monolithicSparse"],
            ),
            "monolithicSparse",
        ),
        (
            "vmdk",
            convert(
                &source,
                dir.path(),
                "stream.vmdk",
                "vmdk",
                &["-o", "subformat=streamOptimized"],
            ),
            "streamOptimized",
        ),
        (
            "vhd",
            convert(
                &source,
                dir.path(),
                "fixed.vhd",
                "vpc",
                &["-o", "subformat=fixed,force_size=on"],
            ),
            "fixed",
        ),
        (
            "vhd",
            convert(
                &source,
                dir.path(),
                "dynamic.vhd",
                "vpc",
                &["-o", "subformat=dynamic,force_size=on"],
            ),
            "dynamic",
        ),
        (
            "vhdx",
            convert(&source, dir.path(), "d.vhdx", "vhdx", &[]),
            "vhdx",
        ),
    ];
    let mut digest = None;
    for (i, (format, path, variant)) in files.iter().enumerate() {
        let file = std::fs::read(path).unwrap();
        // Half declare their format, half leave it to detection.
        let declared = if i % 2 == 0 { *format } else { "" };
        let name = format!("import-{i}-{variant}");
        let done = upload(&mut gz, parameters(&name, declared), &file)
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        assert_eq!(done.format, *format, "{}", path.display());
        assert_eq!(done.format_variant, *variant, "{}", path.display());
        assert_eq!(
            done.virtual_size_bytes,
            disk.len() as u64,
            "{}",
            path.display()
        );
        let image = image(&mut gz, &done.image_id).await;
        assert_eq!(image.image_state, ImageState::Normal as i32);
        assert_eq!(image.image_source, ImageSource::ExternalImport as i32);
        assert_eq!(image.platform, "Ubuntu");
        assert_eq!(image.os_name, "Ubuntu 22.04");
        let lineage = image.lineage.clone().unwrap();
        assert_eq!(lineage.ultimate_source_image_id, done.image_id);
        assert!(!lineage.ultimate_source_paid);
        let progress = image.import_progress.clone().unwrap();
        assert_eq!(progress.bytes_read, file.len() as u64);
        assert_eq!(progress.size_bytes, file.len() as u64);
        assert_eq!(progress.format, *format);
        assert!(progress.error_reason.is_empty());
        let exported = export_file(&mut gz, &done.image_id, ExportFormat::Raw).await;
        assert!(
            exported == disk,
            "{}: the exported disk differs",
            path.display()
        );
        // Same content, same digest, and no new chunk after the first import.
        match &digest {
            None => digest = Some(image.content_digest.clone()),
            Some(d) => assert_eq!(&image.content_digest, d, "{}", path.display()),
        }
        assert_eq!(
            chunk_files(&chunk_dir),
            before + distinct,
            "{}: the chunk store holds more than the distinct non-zero chunks",
            path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_export_format_is_a_valid_file_of_the_same_disk() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = source_disk();
    let source = write(dir.path(), "source.raw", &disk);
    let qcow2 = std::fs::read(convert(&source, dir.path(), "in.qcow2", "qcow2", &[])).unwrap();
    let done = upload(&mut gz, parameters("to-export", "qcow2"), &qcow2)
        .await
        .unwrap();
    let src = source.to_str().unwrap();
    for (format, qemu_format, check) in [
        (ExportFormat::Raw, "raw", false),
        (ExportFormat::Qcow2, "qcow2", true),
        (ExportFormat::Vmdk, "vmdk", true),
        (ExportFormat::Vhd, "vpc", false),
    ] {
        let file = export_file(&mut gz, &done.image_id, format).await;
        let path = write(dir.path(), &format!("out.{qemu_format}"), &file);
        let p = path.to_str().unwrap();
        if check {
            qemu_img(&["check", "-f", qemu_format, p]);
        }
        qemu_img(&["compare", "-f", qemu_format, "-F", "raw", p, src]);
    }
}

/// `ExportImages`: several images in one call, each file equal to its own `ExportImage`; one
/// image that cannot be exported refuses the whole call before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_images_sends_each_image_in_turn_or_refuses_the_call_whole() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (disk, _) = source_disk();
    let mut other = disk.clone();
    other[..4096].fill(0x77);
    let first = upload(&mut gz, parameters("multi-1", "raw"), &disk)
        .await
        .unwrap()
        .image_id;
    let second = upload(&mut gz, parameters("multi-2", "raw"), &other)
        .await
        .unwrap()
        .image_id;
    let mut stream = gz
        .export_images(ExportImagesRequest {
            image_ids: vec![second.clone(), first.clone()],
            format: ExportFormat::Qcow2 as i32,
        })
        .await
        .unwrap()
        .into_inner();
    // Files by image, in the order they came.
    let mut files: Vec<(String, Vec<u8>, usize)> = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.unwrap();
        let chunk = piece.chunk.expect("a chunk");
        if files.last().is_none_or(|(id, _, _)| *id != piece.image_id) {
            assert!(
                files.iter().all(|(id, _, _)| *id != piece.image_id),
                "the pieces of one image come together"
            );
            files.push((piece.image_id.clone(), Vec::new(), 0));
        }
        let (_, file, end) = files.last_mut().unwrap();
        let at = chunk.offset as usize;
        if file.len() < at + chunk.data.len() {
            file.resize(at + chunk.data.len(), 0);
        }
        file[at..at + chunk.data.len()].copy_from_slice(&chunk.data);
        *end = at;
    }
    let order: Vec<&str> = files.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(order, [second.as_str(), first.as_str()]);
    for (id, mut file, end) in files {
        file.resize(end, 0);
        assert!(
            file == export_file(&mut gz, &id, ExportFormat::Qcow2).await,
            "{id}: the same file as its own export"
        );
    }

    // A public image among them: the whole call is refused, nothing is sent.
    let public = gz
        .describe_images(DescribeImagesRequest {
            filters: vec![Filter {
                name: "image-type".into(),
                values: vec!["PUBLIC_IMAGE".into()],
            }],
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set[0]
        .image_id
        .clone();
    let refused = gz
        .export_images(ExportImagesRequest {
            image_ids: vec![first.clone(), public],
            format: ExportFormat::Raw as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (
            Code::FailedPrecondition,
            "UnsupportedOperation.PublicImageExportUnsupported"
        ),
        "{refused:?}"
    );
    for (ids, why) in [
        (vec![], "MissingParameter"),
        (
            vec![first.clone(), first.clone()],
            "InvalidParameterValue.Duplicate",
        ),
        (
            vec![first.clone(); 11],
            "InvalidParameterValue.TooManyImages",
        ),
    ] {
        let refused = gz
            .export_images(ExportImagesRequest {
                image_ids: ids,
                format: ExportFormat::Raw as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(
            (refused.code(), reason(&refused).as_str()),
            (Code::InvalidArgument, why),
            "{refused:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_uploads_are_refused_and_leave_nothing_behind() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();
    let (disk, _) = source_disk();
    let source = write(d, "source.raw", &disk);
    let chunk_dir = cluster.region_dir("ap-guangzhou");
    let before = chunk_files(&chunk_dir);

    qemu_img(&["create", "-f", "raw", &path("base.raw"), "16M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &path("base.raw"),
        "-F",
        "raw",
        &path("backed.qcow2"),
    ]);
    let plain = std::fs::read(convert(&source, d, "plain.qcow2", "qcow2", &[])).unwrap();
    let mut polyglot = plain.clone();
    polyglot[32769..32774].copy_from_slice(b"CD001");
    polyglot[32768] = 1;
    qemu_img(&["create", "-f", "qcow2", &path("huge.qcow2"), "1P"]);
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        &path("flat.vmdk"),
        "16M",
    ]);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "backing",
            std::fs::read(path("backed.qcow2")).unwrap(),
            "",
            "InvalidImage.BackingFile",
        ),
        ("polyglot", polyglot, "", "InvalidImage.Polyglot"),
        (
            "truncated",
            plain[..64].to_vec(),
            "",
            "InvalidImage.Truncated",
        ),
        (
            "mismatch",
            plain.clone(),
            "vmdk",
            "InvalidImage.FormatMismatch",
        ),
        (
            "huge",
            std::fs::read(path("huge.qcow2")).unwrap(),
            "",
            "InvalidImage.VirtualSizeTooLarge",
        ),
        (
            "flat",
            std::fs::read(path("flat.vmdk")).unwrap(),
            "",
            "InvalidImage.UnsupportedVmdk",
        ),
    ];
    // A declared size over the file limit is refused before the region looks for room for it.
    let mut messages = upload_messages(parameters("petabyte", ""), &plain);
    messages[0].size_bytes = 1 << 50;
    assert_refused(
        gz.upload_image(futures::stream::iter(messages)).await,
        Code::InvalidArgument,
        "InvalidImage.FileTooLarge",
    );
    for (name, file, declared, reason) in cases {
        let refused = upload(&mut gz, parameters(name, declared), &file).await;
        assert_refused(refused, Code::InvalidArgument, reason);
        assert!(
            images_named(&mut gz, name).await.is_empty(),
            "{name}: an image was left"
        );
        assert_eq!(chunk_files(&chunk_dir), before, "{name}: chunks were left");
    }
}

/// Points the last allocated L2 entry of a qcow2 file past the file's end.
fn break_last_l2_entry(file: &mut [u8]) {
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(file[20..24].try_into().unwrap());
    let l1_offset = be64(file, 40) as usize;
    let l2_offset = (be64(file, l1_offset) & 0x00ff_ffff_ffff_fe00) as usize;
    let entries = 1usize << (cluster_bits - 3);
    let last = (0..entries)
        .rev()
        .find(|i| be64(file, l2_offset + i * 8) & 0x00ff_ffff_ffff_fe00 != 0)
        .expect("an allocated cluster");
    let past_end = (file.len() as u64 + (64 << 20)) & !((1u64 << cluster_bits) - 1);
    let entry = (1u64 << 63) | past_end;
    let at = l2_offset + last * 8;
    file[at..at + 8].copy_from_slice(&entry.to_be_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_found_broken_late_fails_the_import_and_releases_its_chunks() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = source_disk();
    let source = write(dir.path(), "source.raw", &disk);
    let chunk_dir = cluster.region_dir("ap-guangzhou");
    let before = chunk_files(&chunk_dir);

    // A file that ends before its declared size, found once most of it (and chunks) is in.
    let mut messages = upload_messages(parameters("cut-short", "raw"), &disk);
    messages.truncate(1 + 22);
    let status = gz
        .upload_image(futures::stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "InvalidImage.Truncated", "{status:?}");
    let image_id = error_metadata(&status)
        .get("image_id")
        .cloned()
        .expect("the failed image is named");
    let failed = image(&mut gz, &image_id).await;
    assert_eq!(failed.image_state, ImageState::Importfailed as i32);
    assert!(!failed.state_reason.is_empty());
    let progress = failed.import_progress.unwrap();
    assert_eq!(progress.error_reason, "InvalidImage.Truncated");
    assert!(progress.bytes_read >= 16 * MIB as u64, "{progress:?}");
    assert_eq!(
        chunk_files(&chunk_dir),
        before,
        "a failed import left chunks"
    );
    // A failed import can be deleted.
    gz.delete_images(DeleteImagesRequest {
        image_ids: vec![image_id.clone()],
    })
    .await
    .unwrap();
    assert!(find_image(&mut gz, &image_id).await.is_none());

    // A qcow2 whose last L2 entry points past the end of the file.
    let mut broken = std::fs::read(convert(&source, dir.path(), "b.qcow2", "qcow2", &[])).unwrap();
    break_last_l2_entry(&mut broken);
    let status = upload(&mut gz, parameters("broken-l2", ""), &broken)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(reason(&status).starts_with("InvalidImage."), "{status:?}");
    for image in images_named(&mut gz, "broken-l2").await {
        assert_eq!(image.image_state, ImageState::Importfailed as i32);
    }
    assert_eq!(
        chunk_files(&chunk_dir),
        before,
        "a refused import left chunks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_and_the_storage_quota_hold_for_imports() {
    let cluster = Cluster::start_with(
        &["ap-guangzhou"],
        &[(
            "ap-guangzhou",
            RegionOptions::env(&[
                ("IMAGEFLEET_STORAGE_BYTES_QUOTA", &(8 * MIB).to_string()),
                (
                    "IMAGEFLEET_MAX_IMPORT_VIRTUAL_SIZE",
                    &(20 * MIB).to_string(),
                ),
                ("IMAGEFLEET_MAX_IMPORT_FILE_SIZE", &(18 * MIB).to_string()),
            ]),
        )],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let dir = tempfile::tempdir().unwrap();
    let chunk_dir = cluster.region_dir("ap-guangzhou");
    let before = chunk_files(&chunk_dir);
    let (disk, _) = source_disk();
    let source = write(dir.path(), "source.raw", &disk);
    assert_refused(
        upload(&mut gz, parameters("too-big-file", ""), &disk).await,
        Code::InvalidArgument,
        "InvalidImage.FileTooLarge",
    );
    let qcow2 = std::fs::read(convert(&source, dir.path(), "s.qcow2", "qcow2", &[])).unwrap();
    assert!(qcow2.len() < 18 * MIB);
    assert_refused(
        upload(&mut gz, parameters("too-big-disk", ""), &qcow2).await,
        Code::InvalidArgument,
        "InvalidImage.VirtualSizeTooLarge",
    );
    // 16 MiB of data against a quota of 8 MiB: found as the chunks are recorded.
    let status = upload(
        &mut gz,
        parameters("over-quota", "raw"),
        &random_bytes(16 * MIB),
    )
    .await
    .unwrap_err();
    failed_on_the_storage_quota(&mut gz, &status, &chunk_dir, before).await;
}

/// `status` failed an import on the storage quota: the image is `IMPORTFAILED` with that
/// reason, and the region holds as many chunks as `before`, none counted for the account.
async fn failed_on_the_storage_quota(
    region: &mut Region,
    status: &tonic::Status,
    chunk_dir: &std::path::Path,
    before: usize,
) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(status), "LimitExceeded.StorageQuota");
    let image_id = error_metadata(status).get("image_id").cloned().unwrap();
    let failed = image(region, &image_id).await;
    assert_eq!(failed.image_state, ImageState::Importfailed as i32);
    assert_eq!(
        failed.import_progress.unwrap().error_reason,
        "LimitExceeded.StorageQuota"
    );
    assert_eq!(
        chunk_files(chunk_dir),
        before,
        "an import over the quota left chunks"
    );
    let quota = region
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota.storage_bytes_used, 0);
}

/// Batches are stored while the next is decoded: a batch refused by the quota midway fails the
/// import with the batch before it recorded and the one after it in hand, and none of their
/// chunks stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_midway_fails_the_import_without_any_of_its_chunks() {
    let cluster = Cluster::start_with(
        &["ap-guangzhou"],
        &[(
            "ap-guangzhou",
            RegionOptions::env(&[("IMAGEFLEET_STORAGE_BYTES_QUOTA", &(24 * MIB).to_string())]),
        )],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let chunk_dir = cluster.region_dir("ap-guangzhou");
    let before = chunk_files(&chunk_dir);
    // Batches of 16 MiB: the first fits, the second does not, the third is being filled.
    let status = upload(
        &mut gz,
        parameters("over-quota-midway", "raw"),
        &random_bytes(48 * MIB),
    )
    .await
    .unwrap_err();
    failed_on_the_storage_quota(&mut gz, &status, &chunk_dir, before).await;
    // The account can import within its quota afterwards.
    let done = upload(
        &mut gz,
        parameters("within-quota", "raw"),
        &random_bytes(20 * MIB),
    )
    .await
    .unwrap();
    assert_eq!(
        image(&mut gz, &done.image_id).await.image_state,
        ImageState::Normal as i32
    );
}

/// Starts an upload of `file` that sends its first `sent` bytes and then waits; returns the
/// sender that keeps it open and the call's handle.
async fn held_upload(
    region: &Region,
    name: &str,
    file: &[u8],
    sent: usize,
) -> (
    tokio::sync::mpsc::Sender<UploadImageRequest>,
    tokio::task::JoinHandle<Result<UploadImageResponse, tonic::Status>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut messages = upload_messages(parameters(name, "raw"), file);
    let pieces = 1 + sent / MIB;
    for message in messages.drain(..pieces) {
        tx.send(message).await.unwrap();
    }
    let mut client = region.clone();
    let call = tokio::spawn(async move {
        client
            .upload_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner())
    });
    (tx, call)
}

/// Waits for the image `name` to be `IMPORTING` with at least `read` bytes read.
async fn wait_importing(region: &mut Region, name: &str, read: u64) -> Image {
    for _ in 0..200 {
        if let Some(image) = images_named(region, name).await.into_iter().next() {
            if image.image_state == ImageState::Importing as i32
                && image
                    .import_progress
                    .as_ref()
                    .is_some_and(|p| p.bytes_read >= read)
            {
                return image;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{name} never showed as IMPORTING with progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_cut_off_by_a_restart_or_a_client_that_leaves_fails_without_chunks() {
    let mut cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (disk, _) = source_disk();
    let chunk_dir = cluster.region_dir("ap-guangzhou");
    let before = chunk_files(&chunk_dir);

    let (tx, call) = held_upload(&gz, "restarted", &disk, 20 * MIB).await;
    let importing = wait_importing(&mut gz, "restarted", 16 * MIB as u64).await;
    assert!(
        chunk_files(&chunk_dir) > before,
        "the import stored nothing yet"
    );
    assert_eq!(importing.image_source, ImageSource::ExternalImport as i32);
    assert_eq!(
        importing.import_progress.unwrap().size_bytes,
        disk.len() as u64
    );
    // Not while IMPORTING.
    assert_refused(
        gz.delete_images(DeleteImagesRequest {
            image_ids: vec![importing.image_id.clone()],
        })
        .await,
        Code::FailedPrecondition,
        "InvalidImageId.IncorrectState",
    );
    cluster.restart_region("ap-guangzhou").await;
    drop(tx);
    let _ = call.await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let failed = image(&mut gz, &importing.image_id).await;
    assert_eq!(failed.image_state, ImageState::Importfailed as i32);
    assert!(
        failed.state_reason.contains("restart"),
        "{}",
        failed.state_reason
    );
    assert_eq!(
        failed.import_progress.unwrap().error_reason,
        "FailedOperation.ImportInterrupted"
    );
    assert_eq!(
        chunk_files(&chunk_dir),
        before,
        "the interrupted import left chunks"
    );

    // A client that goes away mid-file.
    let (tx, call) = held_upload(&gz, "abandoned", &disk, 20 * MIB).await;
    let importing = wait_importing(&mut gz, "abandoned", 16 * MIB as u64).await;
    // The call is dropped with its stream still open: the connection resets it.
    call.abort();
    let _ = call.await;
    drop(tx);
    let failed = wait_image_state(&mut gz, &importing.image_id, ImageState::Importfailed).await;
    // The transport may close the request stream (the file is then short) or reset it.
    let reason = failed.import_progress.unwrap().error_reason;
    assert!(
        reason == "InvalidImage.Truncated" || reason == "FailedOperation.ImportInterrupted",
        "{reason}"
    );
    assert_eq!(
        wait_chunk_files(&chunk_dir, before, std::time::Duration::from_secs(10)).await,
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_has_a_limited_number_of_imports_under_way() {
    let cluster = Cluster::start_with(
        &["ap-guangzhou"],
        &[(
            "ap-guangzhou",
            RegionOptions::env(&[("IMAGEFLEET_MAX_IMPORTS_PER_ACCOUNT", "1")]),
        )],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let mut other = cluster.region("ap-guangzhou", 1);
    let (disk, _) = source_disk();
    let (tx, call) = held_upload(&gz, "first", &disk, 4 * MIB).await;
    wait_importing(&mut gz, "first", 0).await;
    let refused = upload(&mut gz, parameters("second", "raw"), &disk).await;
    assert_refused(
        refused,
        Code::ResourceExhausted,
        "LimitExceeded.ConcurrentImports",
    );
    // Another account is not held back.
    upload(&mut other, parameters("other", "raw"), &disk)
        .await
        .unwrap();
    // The rest of the first file: it completes, and the limit is free again.
    let messages = upload_messages(parameters("first", "raw"), &disk);
    for message in messages.into_iter().skip(1 + 4) {
        tx.send(message).await.unwrap();
    }
    drop(tx);
    call.await.unwrap().unwrap();
    upload(&mut gz, parameters("second", "raw"), &disk)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_parameters_are_checked_first() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let file = vec![1u8; 2 * MIB];
    let mut bad_platform = parameters("p", "");
    bad_platform.platform = "Plan9".into();
    assert_refused(
        upload(&mut gz, bad_platform, &file).await,
        Code::InvalidArgument,
        "InvalidParameterValue.Platform",
    );
    let mut bad_version = parameters("p", "");
    bad_version.os_version = "99.04".into();
    assert_refused(
        upload(&mut gz, bad_version, &file).await,
        Code::InvalidArgument,
        "InvalidParameterValue.OsVersion",
    );
    assert_refused(
        upload(&mut gz, parameters("p", "qed"), &file).await,
        Code::InvalidArgument,
        "InvalidParameterValue.Format",
    );
    let os = gz
        .describe_import_image_os(DescribeImportImageOsRequest {})
        .await
        .unwrap()
        .into_inner();
    let ubuntu = os
        .import_os_list_support
        .iter()
        .find(|o| o.platform == "Ubuntu")
        .unwrap();
    assert!(ubuntu.os_versions.iter().any(|v| v == "22.04"));
    // Every platform it lists can be imported.
    for (i, entry) in os.import_os_list_support.iter().enumerate() {
        let mut params = parameters(&format!("os-{i}"), "raw");
        params.platform = entry.platform.clone();
        params.os_version = entry.os_versions[0].clone();
        upload(&mut gz, params, &file).await.unwrap();
    }
}

/// A tiny HTTP server on loopback: serves `file` at `/disk.img`, and redirects `/hop` to
/// `redirect`.
async fn serve(file: Vec<u8>, redirect: String) -> u16 {
    serve_on(file, redirect, None).await
}

/// `serve`, in TLS with `tls` when given.
async fn serve_on(file: Vec<u8>, redirect: String, tls: Option<tokio_rustls::TlsAcceptor>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let file = std::sync::Arc::new(file);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let file = file.clone();
            let redirect = redirect.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => answer(socket, &file, &redirect).await,
                    Some(tls) => {
                        if let Ok(socket) = tls.accept(socket).await {
                            answer(socket, &file, &redirect).await;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Answers one request of `serve`.
async fn answer<S>(mut socket: S, file: &[u8], redirect: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    if path == "/disk.img" {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            file.len()
        );
        let _ = socket.write_all(head.as_bytes()).await;
        let _ = socket.write_all(file).await;
    } else if path == "/hop" {
        let head = format!(
                        "HTTP/1.1 302 Found\r\nLocation: {redirect}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
        let _ = socket.write_all(head.as_bytes()).await;
    } else {
        let _ = socket
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    }
    let _ = socket.shutdown().await;
}

/// A CA (its PEM) and a TLS acceptor whose certificate, from that CA, names `localhost` and
/// `127.0.0.1`.
fn https_identity() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio_rustls::rustls;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)
    .unwrap();
    (
        ca.pem(),
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
    )
}

fn url_import(name: &str, url: &str) -> ImportImageRequest {
    ImportImageRequest {
        parameters: Some(parameters(name, "")),
        image_url: url.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_imports_pull_the_file_and_refuse_addresses_that_are_not_public() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = source_disk();
    let source = write(dir.path(), "source.raw", &disk);
    let qcow2 = std::fs::read(convert(&source, dir.path(), "u.qcow2", "qcow2", &["-c"])).unwrap();
    let backed = {
        let base = dir.path().join("base.raw");
        qemu_img(&["create", "-f", "raw", base.to_str().unwrap(), "4M"]);
        let out = dir.path().join("backed.qcow2");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            out.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    };
    let good = serve(qcow2, "http://127.0.0.1:1/disk.img".into()).await;
    let hostile = serve(backed, String::new()).await;
    let cluster = Cluster::start_with(
        &["ap-guangzhou", "ap-shanghai"],
        &[(
            "ap-guangzhou",
            RegionOptions::env(&[("IMAGEFLEET_IMPORT_ALLOW_PRIVATE_URLS", "true")]),
        )],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let mut sh = cluster.region("ap-shanghai", 0);

    let started = gz
        .import_image(url_import(
            "pulled",
            &format!("http://127.0.0.1:{good}/disk.img"),
        ))
        .await
        .unwrap()
        .into_inner();
    let done = wait_image_state(&mut gz, &started.image_id, ImageState::Normal).await;
    assert_eq!(
        done.import_progress.unwrap().image_url,
        format!("http://127.0.0.1:{good}/disk.img")
    );
    let exported = export_file(&mut gz, &started.image_id, ExportFormat::Raw).await;
    assert!(exported == disk, "the pulled disk differs");

    // A refusal the headers show is the call's, and leaves no image.
    assert_refused(
        gz.import_image(url_import(
            "backed",
            &format!("http://127.0.0.1:{hostile}/disk.img"),
        ))
        .await,
        Code::InvalidArgument,
        "InvalidImage.BackingFile",
    );
    assert!(images_named(&mut gz, "backed").await.is_empty());

    for url in [
        "ftp://127.0.0.1/disk.img",
        "file:///etc/passwd",
        "http://",
        "not a url",
    ] {
        assert_refused(
            gz.import_image(url_import("bad-url", url)).await,
            Code::InvalidArgument,
            "InvalidParameterValue.ImageUrl",
        );
    }
    // Where private addresses are not allowed: loopback, private, link-local, unspecified,
    // directly or through a redirect.
    for url in [
        format!("http://127.0.0.1:{good}/disk.img"),
        format!("http://localhost:{good}/disk.img"),
        "http://10.1.2.3/disk.img".to_string(),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://0.0.0.0/disk.img".to_string(),
        "http://[::1]/disk.img".to_string(),
    ] {
        assert_refused(
            sh.import_image(url_import("forbidden", &url)).await,
            Code::InvalidArgument,
            "InvalidParameterValue.ImageUrlForbidden",
        );
    }
    assert!(images_named(&mut sh, "forbidden").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_and_checked_like_the_url() {
    // Allowing private URLs allows loopback and private networks, never link-local (cloud
    // metadata), unspecified or multicast addresses.
    let (disk, _) = source_disk();
    let file_server = serve(disk.clone(), String::new()).await;
    let hop = serve(
        Vec::new(),
        format!("http://127.0.0.1:{file_server}/disk.img"),
    )
    .await;
    let to_metadata = serve(Vec::new(), "http://169.254.169.254/latest/meta-data".into()).await;
    let cluster = Cluster::start_with(
        &["ap-guangzhou"],
        &[(
            "ap-guangzhou",
            RegionOptions::env(&[("IMAGEFLEET_IMPORT_ALLOW_PRIVATE_URLS", "true")]),
        )],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let started = gz
        .import_image(url_import(
            "redirected",
            &format!("http://127.0.0.1:{hop}/hop"),
        ))
        .await
        .unwrap()
        .into_inner();
    wait_image_state(&mut gz, &started.image_id, ImageState::Normal).await;
    let exported = export_file(&mut gz, &started.image_id, ExportFormat::Raw).await;
    assert!(exported == disk, "the redirected disk differs");

    assert_refused(
        gz.import_image(url_import(
            "to-metadata",
            &format!("http://127.0.0.1:{to_metadata}/hop"),
        ))
        .await,
        Code::InvalidArgument,
        "InvalidParameterValue.ImageUrlForbidden",
    );
    assert_refused(
        gz.import_image(url_import("unspecified", "http://0.0.0.0/disk.img"))
            .await,
        Code::InvalidArgument,
        "InvalidParameterValue.ImageUrlForbidden",
    );
    assert!(images_named(&mut gz, "to-metadata").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_urls_need_a_trusted_certificate_and_never_redirect_to_http() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = source_disk();
    let source = write(dir.path(), "source.raw", &disk);
    let qcow2 = std::fs::read(convert(&source, dir.path(), "s.qcow2", "qcow2", &[])).unwrap();
    let (ca, tls) = https_identity();
    let ca_file = write(dir.path(), "ca.pem", ca.as_bytes());
    let secure = serve_on(qcow2.clone(), String::new(), Some(tls.clone())).await;
    let plain = serve(qcow2, String::new()).await;
    let downgrade = serve_on(
        Vec::new(),
        format!("http://127.0.0.1:{plain}/disk.img"),
        Some(tls),
    )
    .await;
    let ca_path = ca_file.display().to_string();
    let cluster = Cluster::start_with(
        &["ap-guangzhou", "ap-shanghai"],
        &[
            (
                "ap-guangzhou",
                RegionOptions::env(&[
                    ("IMAGEFLEET_IMPORT_ALLOW_PRIVATE_URLS", "true"),
                    ("IMAGEFLEET_IMPORT_CA_FILE", &ca_path),
                ]),
            ),
            (
                "ap-shanghai",
                RegionOptions::env(&[("IMAGEFLEET_IMPORT_ALLOW_PRIVATE_URLS", "true")]),
            ),
        ],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let mut sh = cluster.region("ap-shanghai", 0);
    let url = format!("https://127.0.0.1:{secure}/disk.img");

    // Trusted through the region's extra CA file.
    let started = gz
        .import_image(url_import("over-tls", &url))
        .await
        .unwrap()
        .into_inner();
    let done = wait_image_state(&mut gz, &started.image_id, ImageState::Normal).await;
    assert_eq!(done.import_progress.unwrap().image_url, url);
    let exported = export_file(&mut gz, &started.image_id, ExportFormat::Raw).await;
    assert!(exported == disk, "the disk pulled over https differs");

    // A region without that CA does not trust the certificate.
    let refused = sh.import_image(url_import("untrusted", &url)).await;
    let status = refused.as_ref().err().cloned();
    assert_refused(
        refused,
        Code::FailedPrecondition,
        "FailedOperation.ImageUrlUnreachable",
    );
    let message = status.map(|s| s.message().to_string()).unwrap_or_default();
    assert!(message.contains("not trusted"), "{message}");
    assert!(images_named(&mut sh, "untrusted").await.is_empty());

    // https to http is a downgrade, refused even where both hops are allowed.
    let refused = gz
        .import_image(url_import(
            "downgraded",
            &format!("https://127.0.0.1:{downgrade}/hop"),
        ))
        .await;
    let status = refused.as_ref().err().cloned();
    assert_refused(
        refused,
        Code::InvalidArgument,
        "InvalidParameterValue.ImageUrlForbidden",
    );
    let message = status.map(|s| s.message().to_string()).unwrap_or_default();
    assert!(message.contains("https to http"), "{message}");
    assert!(images_named(&mut gz, "downgraded").await.is_empty());
}

//! The README's five-minute tour, run as written against `imaged dev`, and the JSON shape of
//! every `imagectl` command checked against `docs/cli.md`.

mod common;

use common::dev::{imagectl, json, start_dev, stop};
use common::IMAGECTL;
use std::path::Path;
use std::process::Command;

/// The lines of the ```bash blocks of the README section "A five-minute tour", without the
/// line that starts the cluster; and how many such lines there were.
fn tour_script() -> (String, usize) {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme
        .find("\n## A five-minute tour")
        .expect("the tour section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let section = &section[..end];
    let mut script = String::new();
    let mut starts = 0;
    let mut in_bash = false;
    for line in section.lines() {
        if in_bash {
            if line.trim_start().starts_with("```") {
                in_bash = false;
            } else if line.contains("imaged dev") {
                starts += 1;
            } else {
                script.push_str(line);
                script.push('\n');
            }
        } else if line.trim() == "```bash" {
            in_bash = true;
        }
    }
    (script, starts)
}

/// The value of field `name` in `imagectl images describe`'s table output, for each time it
/// appears in `text`.
fn field_values<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == name).then(|| value.trim())
        })
        .collect()
}

#[test]
fn the_readme_tour_runs_as_written() {
    let (script, starts) = tour_script();
    assert_eq!(starts, 1, "one `imaged dev` line starts the cluster");
    assert!(script.contains("imagectl "), "{script}");

    let dir = tempfile::tempdir().unwrap();
    let child = start_dev(dir.path(), "ap-guangzhou,ap-shanghai", None);
    let cluster_file = dir.path().join("cluster.json");
    let bin_dir = Path::new(IMAGECTL).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-e")
        .arg("-c")
        .arg(&script)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PATH", path)
        .env("IMAGEFLEET_CLUSTER", &cluster_file)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the tour failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let context = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");

    // Two instances launched together are web-1 and web-2.
    assert!(
        stdout.lines().any(|l| l.contains(" web-1 "))
            && stdout.lines().any(|l| l.contains(" web-2 ")),
        "{context}"
    );
    // The bytes written were read back, on stdout.
    assert!(
        stdout.lines().any(|l| l == "hello from my app"),
        "{context}"
    );
    // The image made by CreateImage, the one imported from its qcow2 export and its copy are
    // whole, and hold the same content.
    let percents = field_values(&stdout, "SYNC_PERCENT");
    assert_eq!(percents, ["100", "100", "100"], "{context}");
    assert_eq!(
        field_values(&stdout, "SOURCE"),
        ["CREATE_IMAGE", "EXTERNAL_IMPORT", "SYNC"],
        "{context}"
    );
    let digests = field_values(&stdout, "CONTENT_DIGEST");
    assert!(
        digests.len() >= 3 && digests.iter().all(|d| *d == digests[0]),
        "{context}"
    );
    // Before the share, the second account saw nothing, for the right reason.
    assert!(
        stderr.contains("NotFound InvalidImageId.NotFound"),
        "{context}"
    );
    assert!(
        stdout.contains("(not visible before the share)"),
        "{context}"
    );
    // The shared image's row names who shared it (the first account).
    let cluster = imagefleet_rpc::cluster::ClusterFile::load(&cluster_file).unwrap();
    let owner = &cluster.accounts[0].account_id;
    let shared_row = stdout
        .lines()
        .find(|l| l.contains(" SHARED_IMAGE "))
        .unwrap_or_else(|| panic!("no SHARED_IMAGE row\n{context}"));
    assert_eq!(
        shared_row.split_whitespace().nth(4),
        Some(owner.as_str()),
        "{context}"
    );
    // The copy's progress: plain lines on stderr (not a terminal), one total throughout,
    // ending NORMAL without an ETA.
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ap-shanghai img-"))
        .collect();
    assert!(!progress.is_empty(), "{context}");
    assert!(!stderr.contains('\x1b'), "{context}");
    let totals: Vec<&str> = progress
        .iter()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|bytes| bytes.split_once('/').map(|(_, total)| total))
        .collect();
    assert_eq!(totals.len(), progress.len(), "{context}");
    assert!(totals.iter().all(|t| *t == totals[0]), "{context}");
    let last = progress.last().unwrap();
    assert!(
        last.ends_with(" NORMAL") && !last.contains("ETA"),
        "{context}"
    );
    // Billing: the RHEL launch has a licence fee naming its paid root; the tour's own image has
    // none, and its owner sees the snapshot storage it holds; the bill so far has an
    // instance line for each of the tour's instances of the first account.
    let starts = |prefix: &str, text: &str| {
        stdout
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(text))
            .count()
    };
    assert_eq!(
        starts("IMAGE_FEE ", "LICENSED, paid root img-"),
        1,
        "{context}"
    );
    assert_eq!(
        starts("IMAGE_FEE ", "none: the image's ultimate source is free"),
        1,
        "{context}"
    );
    assert_eq!(starts("SNAPSHOT_STORAGE ", ""), 1, "{context}");
    assert!(starts("INSTANCE ", "ap-guangzhou  ins-") >= 3, "{context}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("TOTAL ") && l.ends_with(" USD")),
        "{context}"
    );
    // The list tables end with a total line; the clean-up left no image.
    assert!(stdout.lines().any(|l| l.ends_with(" shown")), "{context}");
    assert_eq!(stdout.lines().last(), Some("no images found"), "{context}");

    stop(child);
}

/// The keys of a JSON object, sorted.
fn keys(value: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    keys
}

/// Checks the image list shape of docs/cli.md: `{"imageSet": [Image], "totalCount",
/// "nextPageToken"}`, every item an Image (with `sourceImageId` where `synced`).
fn assert_image_list(value: &serde_json::Value, synced: bool) -> Vec<String> {
    assert_eq!(
        keys(value),
        ["imageSet", "nextPageToken", "totalCount"],
        "{value}"
    );
    let images = value["imageSet"].as_array().unwrap();
    assert!(value["totalCount"].as_u64().unwrap() >= images.len() as u64);
    for image in images {
        for key in [
            "imageId",
            "imageName",
            "imageType",
            "imageState",
            "imageCreator",
            "architecture",
            "syncPercent",
            "lineage",
            "contentDigest",
            "region",
        ] {
            assert!(image.get(key).is_some(), "{key} missing: {image}");
        }
        assert_eq!(image.get("sourceImageId").is_some(), synced, "{image}");
    }
    images
        .iter()
        .map(|i| i["imageId"].as_str().unwrap().to_string())
        .collect()
}

/// Checks the instance list shape: `{"instanceSet": [Instance], "totalCount",
/// "nextPageToken"}`.
fn assert_instance_list(value: &serde_json::Value) -> Vec<String> {
    assert_eq!(
        keys(value),
        ["instanceSet", "nextPageToken", "totalCount"],
        "{value}"
    );
    let instances = value["instanceSet"].as_array().unwrap();
    for instance in instances {
        for key in [
            "instanceId",
            "instanceName",
            "instanceType",
            "instanceState",
            "imageId",
        ] {
            assert!(instance.get(key).is_some(), "{key} missing: {instance}");
        }
    }
    instances
        .iter()
        .map(|i| i["instanceId"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_command_prints_its_documented_json_shape() {
    let dir = tempfile::tempdir().unwrap();
    let child = start_dev(dir.path(), "ap-guangzhou,ap-shanghai", None);
    let file = dir.path().join("cluster.json");
    let gz = "ap-guangzhou";
    let run = |args: &[&str]| {
        let args: Vec<&str> = args.iter().copied().chain(["--output", "json"]).collect();
        json(&imagectl(&file, &args))
    };

    let regions = run(&["regions", "list"]);
    assert_eq!(keys(&regions), ["regionSet", "totalCount"]);
    let types = run(&["instance-types", "list", "--region", gz]);
    assert_eq!(keys(&types), ["instanceTypeConfigSet"]);

    let public = run(&["images", "list", "--region", gz, "--platform", "Ubuntu"]);
    let ubuntu = assert_image_list(&public, false)[0].clone();
    let described = run(&["images", "describe", "--region", gz, "--image", &ubuntu]);
    assert_eq!(
        assert_image_list(&described, false),
        std::slice::from_ref(&ubuntu)
    );

    let launched = run(&[
        "instances",
        "run",
        "--region",
        gz,
        "--image",
        &ubuntu,
        "--type",
        "S5.SMALL1",
        "--count",
        "2",
        "--wait",
    ]);
    let instances = assert_instance_list(&launched);
    assert_eq!(instances.len(), 2);
    // One naming rule: without --name, each instance is named by its id.
    for instance in launched["instanceSet"].as_array().unwrap() {
        assert_eq!(
            instance["instanceName"], instance["instanceId"],
            "{instance}"
        );
        assert_eq!(instance["instanceState"], "RUNNING", "{instance}");
    }
    // A bad instance type is refused with the valid ones listed.
    let bad = imagectl(
        &file,
        &[
            "instances",
            "run",
            "--region",
            gz,
            "--image",
            &ubuntu,
            "--type",
            "S5.HUGE",
        ],
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("InvalidInstanceType")
            && stderr.contains("valid types: ")
            && stderr.contains("S5.MEDIUM4"),
        "{stderr}"
    );
    let listed = run(&["instances", "list", "--region", gz]);
    assert_eq!(assert_instance_list(&listed).len(), 2);

    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, b"shape").unwrap();
    let wrote = run(&[
        "instances",
        "write",
        "--region",
        gz,
        "--instance",
        &instances[0],
        "--offset",
        "0",
        "--file",
        payload.to_str().unwrap(),
    ]);
    assert_eq!(keys(&wrote), ["bytesWritten", "instanceId", "offset"]);
    let back = dir.path().join("back.bin");
    let read = run(&[
        "instances",
        "read",
        "--region",
        gz,
        "--instance",
        &instances[0],
        "--offset",
        "0",
        "--length",
        "5",
        "--out",
        back.to_str().unwrap(),
    ]);
    assert_eq!(keys(&read), ["bytesRead", "instanceId", "offset", "out"]);
    assert_eq!(std::fs::read(&back).unwrap(), b"shape");

    let started = run(&[
        "images",
        "create",
        "--region",
        gz,
        "--instance",
        &instances[0],
        "--name",
        "shape",
    ]);
    assert_eq!(keys(&started), ["imageId"]);
    let image = started["imageId"].as_str().unwrap().to_string();
    let waited = run(&[
        "images",
        "create",
        "--region",
        gz,
        "--instance",
        &instances[1],
        "--name",
        "shape-2",
        "--wait",
    ]);
    let second = assert_image_list(&waited, false)[0].clone();
    assert_eq!(waited["imageSet"][0]["syncPercent"], 100, "{waited}");

    let exported = dir.path().join("shape.raw");
    let export = run(&[
        "images",
        "export",
        "--region",
        gz,
        "--image",
        &second,
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(
        keys(&export),
        [
            "bytes",
            "bytesReceived",
            "contentDigest",
            "fileBytes",
            "format",
            "imageId",
            "out"
        ]
    );
    // A qcow2 export (small: the disk is mostly zeros) imported back: the image list shape.
    let qcow2 = dir.path().join("shape.qcow2");
    let export = run(&[
        "images",
        "export",
        "--region",
        gz,
        "--image",
        &second,
        "--format",
        "qcow2",
        "--out",
        qcow2.to_str().unwrap(),
    ]);
    assert_eq!(export["format"], "qcow2", "{export}");
    let imported = run(&[
        "images",
        "import",
        "--region",
        gz,
        "--file",
        qcow2.to_str().unwrap(),
        "--name",
        "json-shape-import",
    ]);
    assert_eq!(
        keys(&imported),
        ["imageSet", "nextPageToken", "totalCount"],
        "{imported}"
    );
    assert_eq!(
        imported["imageSet"][0]["imageState"], "NORMAL",
        "{imported}"
    );
    let imported_id = imported["imageSet"][0]["imageId"]
        .as_str()
        .unwrap()
        .to_string();
    let import_os = run(&["images", "import-os", "--region", gz]);
    assert_eq!(
        keys(&import_os),
        ["architectures", "imageFormats", "importOsListSupport"],
        "{import_os}"
    );
    let quota = run(&["images", "quota", "--region", gz]);
    assert!(keys(&quota).contains(&"imageNumQuota"), "{quota}");

    let synced = run(&[
        "images",
        "sync",
        "--region",
        gz,
        "--image",
        &second,
        "--to",
        "ap-shanghai",
        "--wait",
    ]);
    let copies = assert_image_list(&synced, true);
    let started_copy = run(&[
        "images",
        "sync",
        "--region",
        gz,
        "--image",
        &second,
        "--to",
        "ap-shanghai",
        "--name",
        "shape-copy",
    ]);
    let more_copies = assert_image_list(&started_copy, true);
    let dry = run(&[
        "images",
        "sync",
        "--region",
        gz,
        "--image",
        &second,
        "--to",
        "ap-shanghai",
        "--name",
        "shape-dry",
        "--dry-run",
    ]);
    assert_eq!(keys(&dry), ["imageSet"]);

    let second_account = "100000000002";
    for verb in ["share", "unshare"] {
        let shared = run(&[
            "images",
            verb,
            "--region",
            gz,
            "--image",
            &second,
            "--accounts",
            second_account,
        ]);
        assert_eq!(keys(&shared), Vec::<&str>::new());
        if verb == "share" {
            let shares = run(&["images", "shares", "--region", gz, "--image", &second]);
            assert_eq!(keys(&shares), ["sharePermissionSet"]);
            let theirs = run(&[
                "images",
                "list",
                "--region",
                gz,
                "--type",
                "SHARED_IMAGE",
                "--account",
                second_account,
            ]);
            assert_eq!(
                assert_image_list(&theirs, false),
                std::slice::from_ref(&second)
            );
        }
    }
    let modified = run(&[
        "images",
        "modify",
        "--region",
        gz,
        "--image",
        &second,
        "--description",
        "changed",
    ]);
    assert_eq!(keys(&modified), Vec::<&str>::new());
    let reset = run(&[
        "instances",
        "reset",
        "--region",
        gz,
        "--instance",
        &instances[1],
    ]);
    assert_eq!(keys(&reset), Vec::<&str>::new());
    let terminated = run(&[
        "instances",
        "terminate",
        "--region",
        gz,
        "--instance",
        &instances.join(","),
    ]);
    assert_eq!(keys(&terminated), Vec::<&str>::new());
    let mut deleted_copies = copies.clone();
    deleted_copies.extend(more_copies);
    let deleted = run(&[
        "images",
        "delete",
        "--region",
        "ap-shanghai",
        "--image",
        &deleted_copies.join(","),
    ]);
    assert_eq!(keys(&deleted), Vec::<&str>::new());

    // `--output id`: ids alone, one a line.
    let ids = imagectl(
        &file,
        &[
            "--output",
            "id",
            "images",
            "list",
            "--region",
            gz,
            "--type",
            "PRIVATE_IMAGE",
        ],
    );
    assert!(ids.status.success());
    let mut ids: Vec<String> = String::from_utf8(ids.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    ids.sort();
    let mut expected = vec![image, second, imported_id];
    expected.sort();
    assert_eq!(ids, expected);

    stop(child);
}

#[test]
fn completions_and_the_manual_come_from_the_command_line_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(IMAGECTL)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("imagectl"), "{shell}: {script}");
        assert!(script.contains("instance-types"), "{shell}");
    }
    let out = Command::new(IMAGECTL).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
    assert!(page.contains("imagectl"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(IMAGECTL)
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir.path().join("imagectl-images-list.1").exists());
    // No cluster file is needed for either.
    let out = Command::new(IMAGECTL)
        .args([
            "--cluster",
            "/nonexistent/cluster.json",
            "completions",
            "bash",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
}

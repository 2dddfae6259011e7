//! `imaged dev` as a user runs it, driven through `imagectl`: the ready line, cluster.json,
//! a lifecycle walk in tables and JSON, errors with their reasons, and a clean SIGTERM.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn imagectl(cluster_file: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(IMAGECTL)
        .arg("--cluster")
        .arg(cluster_file)
        .args(args)
        .output()
        .expect("imagectl runs")
}

fn json(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "imagectl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Starts `imaged dev` and waits for its ready line.
fn start_dev(dir: &std::path::Path, regions: &str, path_env: Option<&str>) -> std::process::Child {
    std::fs::create_dir_all(dir).unwrap();
    let mut command = Command::new(IMAGED);
    command
        .args(["dev", "--base-port", "0", "--regions", regions])
        .arg("--data-dir")
        .arg(dir)
        .env_remove("REDIS_URL")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("imaged-dev.log")).unwrap());
    if let Some(path) = path_env {
        command.env("PATH", path);
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a ready line");
        if line.contains("ready") {
            break;
        }
    }
    child
}

fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "imaged dev did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "imaged dev exited with {status}");
}

#[test]
fn without_redis_the_embedded_fallback_keeps_the_maps_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // No redis-server on PATH.
    let child = start_dev(&data, "ap-guangzhou", Some("/nonexistent"));
    let cluster_file = data.join("cluster.json");
    let cluster = imagefleet_rpc::cluster::ClusterFile::load(&cluster_file).unwrap();
    assert_eq!(cluster.redis_url, "embedded");
    let log = std::fs::read_to_string(data.join("imaged-dev.log")).unwrap();
    assert!(
        log.contains("embedded"),
        "the fallback is announced in the log"
    );
    let images = json(&imagectl(
        &cluster_file,
        &[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--platform",
            "Debian",
            "--output",
            "json",
        ],
    ));
    let debian = images["imageSet"][0]["imageId"]
        .as_str()
        .unwrap()
        .to_string();
    let launched = json(&imagectl(
        &cluster_file,
        &[
            "instances",
            "run",
            "--region",
            "ap-guangzhou",
            "--image",
            &debian,
            "--type",
            "S5.SMALL1",
            "--output",
            "json",
        ],
    ));
    let instance = launched["instanceIdSet"][0].as_str().unwrap().to_string();
    let created = json(&imagectl(
        &cluster_file,
        &[
            "images",
            "create",
            "--region",
            "ap-guangzhou",
            "--instance",
            &instance,
            "--name",
            "embedded",
            "--wait",
            "--output",
            "json",
        ],
    ));
    assert_eq!(created["imageState"], "NORMAL");
    let image_id = created["imageId"].as_str().unwrap().to_string();
    // A share: an entry of the maps (image -> accounts, account -> images).
    let second = cluster.accounts[1].account_id.clone();
    let shared = imagectl(
        &cluster_file,
        &[
            "images",
            "share",
            "--region",
            "ap-guangzhou",
            "--image",
            &image_id,
            "--accounts",
            &second,
        ],
    );
    assert!(
        shared.status.success(),
        "{}",
        String::from_utf8_lossy(&shared.stderr)
    );
    stop(child);
    assert!(
        data.join("maps").is_dir(),
        "the embedded maps live in the data directory"
    );
    // Restarted on the same directory, everything is still there: the image, and the share
    // in both directions of the maps.
    let child = start_dev(&data, "ap-guangzhou", Some("/nonexistent"));
    let listed = json(&imagectl(
        &cluster_file,
        &[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--name",
            "embedded",
            "--output",
            "json",
        ],
    ));
    assert_eq!(listed["imageSet"][0]["imageState"], "NORMAL");
    assert_eq!(listed["imageSet"][0]["imageId"], image_id.as_str());
    let shares = json(&imagectl(
        &cluster_file,
        &[
            "images",
            "shares",
            "--region",
            "ap-guangzhou",
            "--image",
            &image_id,
            "--output",
            "json",
        ],
    ));
    let accounts: Vec<&str> = shares["sharePermissionSet"]
        .as_array()
        .map(|set| set.iter().filter_map(|s| s["accountId"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(accounts, [second.as_str()], "{shares}");
    let received = json(&imagectl(
        &cluster_file,
        &[
            "--account",
            &second,
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--type",
            "SHARED_IMAGE",
            "--output",
            "json",
        ],
    ));
    let ids: Vec<&str> = received["imageSet"]
        .as_array()
        .map(|set| set.iter().filter_map(|i| i["imageId"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [image_id.as_str()], "{received}");
    stop(child);
}

#[test]
fn imaged_dev_runs_a_cluster_that_imagectl_drives() {
    let dir = tempfile::tempdir().unwrap();
    let child = start_dev(dir.path(), "ap-guangzhou,ap-singapore", None);
    let cluster_file = dir.path().join("cluster.json");
    let cluster = imagefleet_rpc::cluster::ClusterFile::load(&cluster_file).unwrap();
    assert!(cluster.accounts.len() >= 2);
    assert_eq!(cluster.regions.len(), 2);
    assert!(
        cluster.redis_url.starts_with("redis://"),
        "a redis-server child is used when installed"
    );

    let regions = json(&imagectl(
        &cluster_file,
        &["regions", "list", "--output", "json"],
    ));
    assert_eq!(regions["regionSet"].as_array().unwrap().len(), 2);

    let images = json(&imagectl(
        &cluster_file,
        &[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--type",
            "PUBLIC_IMAGE",
            "--output",
            "json",
        ],
    ));
    let ubuntu = images["imageSet"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["platform"] == "Ubuntu")
        .expect("a public Ubuntu image")["imageId"]
        .as_str()
        .unwrap()
        .to_string();
    let table = imagectl(
        &cluster_file,
        &["images", "list", "--region", "ap-guangzhou"],
    );
    assert!(String::from_utf8_lossy(&table.stdout).contains(&ubuntu));

    // Global flags after the subcommand; the second account.
    let second = &cluster.accounts[1].account_id;
    let launched = json(&imagectl(
        &cluster_file,
        &[
            "instances",
            "run",
            "--region",
            "ap-guangzhou",
            "--image",
            &ubuntu,
            "--type",
            "S5.MEDIUM4",
            "--count",
            "2",
            "--output",
            "json",
            "--account",
            second,
        ],
    ));
    let instance = launched["instanceIdSet"][0].as_str().unwrap().to_string();

    let payload = dir.path().join("payload.bin");
    let bytes = random_bytes(1536 * 1024);
    std::fs::write(&payload, &bytes).unwrap();
    let wrote = imagectl(
        &cluster_file,
        &[
            "--account",
            second,
            "instances",
            "write",
            "--region",
            "ap-guangzhou",
            "--instance",
            &instance,
            "--offset",
            "1048576",
            "--file",
            payload.to_str().unwrap(),
        ],
    );
    assert!(
        wrote.status.success(),
        "{}",
        String::from_utf8_lossy(&wrote.stderr)
    );

    let created = json(&imagectl(
        &cluster_file,
        &[
            "--account",
            second,
            "images",
            "create",
            "--region",
            "ap-guangzhou",
            "--instance",
            &instance,
            "--name",
            "from-cli",
            "--wait",
            "--output",
            "json",
        ],
    ));
    let image_id = created["imageId"]
        .as_str()
        .expect("the created image")
        .to_string();
    assert_eq!(created["imageState"], "NORMAL");

    let from_image = json(&imagectl(
        &cluster_file,
        &[
            "--account",
            second,
            "instances",
            "run",
            "--region",
            "ap-guangzhou",
            "--image",
            &image_id,
            "--type",
            "S5.SMALL1",
            "--output",
            "json",
        ],
    ));
    let copy = from_image["instanceIdSet"][0].as_str().unwrap().to_string();
    let out = dir.path().join("readback.bin");
    let read = imagectl(
        &cluster_file,
        &[
            "--account",
            second,
            "instances",
            "read",
            "--region",
            "ap-guangzhou",
            "--instance",
            &copy,
            "--offset",
            "1048576",
            "--length",
            &bytes.len().to_string(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap(), bytes);

    let exported = dir.path().join("export.raw");
    let export = imagectl(
        &cluster_file,
        &[
            "--account",
            second,
            "images",
            "export",
            "--region",
            "ap-guangzhou",
            "--image",
            &image_id,
            "--format",
            "raw",
            "--out",
            exported.to_str().unwrap(),
        ],
    );
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    assert_eq!(std::fs::metadata(&exported).unwrap().len(), 50 << 30);
    let mut raw = vec![0u8; bytes.len()];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(&exported).unwrap();
        file.seek(SeekFrom::Start(1 << 20)).unwrap();
        file.read_exact(&mut raw).unwrap();
    }
    assert_eq!(raw, bytes);

    // The first account cannot see it; errors name code and reason and exit non-zero.
    let hidden = imagectl(
        &cluster_file,
        &[
            "images",
            "describe",
            "--region",
            "ap-guangzhou",
            "--image",
            &image_id,
        ],
    );
    assert!(!hidden.status.success());
    let stderr = String::from_utf8_lossy(&hidden.stderr);
    assert!(stderr.contains("InvalidImageId.NotFound"), "{stderr}");
    let bad = imagectl(
        &cluster_file,
        &[
            "images",
            "describe",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-NOPE",
        ],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("InvalidImageId.Malformed"));

    let quota = json(&imagectl(
        &cluster_file,
        &[
            "--account",
            second,
            "images",
            "quota",
            "--region",
            "ap-guangzhou",
            "--output",
            "json",
        ],
    ));
    assert_eq!(quota["imageNumUsed"], 1);

    // SIGTERM: every service drains and the process exits cleanly (Redis with it).
    stop(child);
    let redis_addr = cluster.redis_url.trim_start_matches("redis://").to_string();
    assert!(
        std::net::TcpStream::connect(&redis_addr).is_err(),
        "the Redis child stops with the cluster"
    );
}

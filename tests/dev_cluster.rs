//! `imaged dev` as a user runs it, driven through `imagectl`: the ready line, cluster.json,
//! a lifecycle walk in tables and JSON, errors with their reasons, and a clean SIGTERM.

mod common;

use common::dev::*;
use common::*;

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
    let instance = launched["instanceSet"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
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
    assert_eq!(created["imageSet"][0]["imageState"], "NORMAL");
    let image_id = created["imageSet"][0]["imageId"]
        .as_str()
        .unwrap()
        .to_string();
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

    // The types `instances run --type` takes, discoverable before launching.
    let types = json(&imagectl(
        &cluster_file,
        &[
            "instance-types",
            "list",
            "--region",
            "ap-guangzhou",
            "--family",
            "S5",
            "--output",
            "json",
        ],
    ));
    let types = types["instanceTypeConfigSet"].as_array().unwrap();
    assert!(
        types.iter().all(|t| t["instanceFamily"] == "S5"),
        "{types:?}"
    );
    let medium = types
        .iter()
        .find(|t| t["instanceType"] == "S5.MEDIUM4")
        .expect("S5.MEDIUM4 is offered");
    assert_eq!(
        (medium["cpu"].as_u64(), medium["memoryGib"].as_u64()),
        (Some(2), Some(4))
    );
    let table = imagectl(
        &cluster_file,
        &["instance-types", "list", "--region", "ap-guangzhou"],
    );
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("SA2.MEDIUM4") && table.contains("MEMORY_GIB"),
        "{table}"
    );
    let unknown = imagectl(
        &cluster_file,
        &[
            "instance-types",
            "list",
            "--region",
            "ap-guangzhou",
            "--family",
            "Z9",
        ],
    );
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("InvalidFilterValue"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );

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
    let instance = launched["instanceSet"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();

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
    let image_id = created["imageSet"][0]["imageId"]
        .as_str()
        .expect("the created image")
        .to_string();
    assert_eq!(created["imageSet"][0]["imageState"], "NORMAL");

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
    let copy = from_image["instanceSet"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
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

//! Storage and instance limits: one account cannot fill a region's disk for the others, nor
//! hold unbounded instances or bytes. A region whose directory is a small filesystem of its own
//! (a tmpfs mounted over `<data dir>/regions/<id>/`, or, where mounting is not allowed, a
//! free-space reserve set just under the real free space) is filled by one account; the other
//! gets `ResourceInsufficient.DiskSpace` (never `INTERNAL`), keeps reading what it has and
//! launching from existing images, and writes again once space is freed, with no restart.

use crate::common::*;
use imagefleet_proto::region::v1::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::Code;

const MIB: u64 = 1 << 20;
const GZ: &str = "ap-guangzhou";
const DISK_SPACE: &str = "ResourceInsufficient.DiskSpace";

/// Free bytes an unprivileged writer has on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(dir)
        .output()
        .expect("stat runs");
    assert!(out.status.success(), "stat -f {}", dir.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    parts.next().unwrap() * parts.next().unwrap()
}

/// A tmpfs mounted over a region's directory; unmounted (lazily: the region may still hold
/// files open) when dropped.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    /// Mounts a tmpfs of `mib` MiB over `dir`; `None` where mounting is not permitted.
    fn tmpfs(dir: &Path, mib: u64) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Mount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The region's directory as a small filesystem of its own: the region is stopped, a tmpfs
/// of `mib` MiB mounted over its directory, and the region started again on it (it seeds its
/// public images afresh) with `env`. Where mounting is not permitted, the region runs on the
/// real filesystem with its free-space reserve set so that about `mib` MiB minus what the
/// seed takes is left above it. Returns the mount (if any) and the reserve in force.
async fn small_region_dir(
    cluster: &mut Cluster,
    mib: u64,
    reserve: u64,
    env: &[(&str, &str)],
) -> (Option<Mount>, u64) {
    let dir = cluster.region_dir(GZ);
    cluster.kill9_region(GZ);
    let mount = Mount::tmpfs(&dir, mib);
    let reserve = match &mount {
        Some(_) => reserve,
        // No mount: the reserve stands in for the small filesystem. What the seed takes was
        // written already (before the region was stopped), so the room left is `mib` minus
        // a margin for the seed's share of a fresh filesystem.
        None => {
            eprintln!("mounting a tmpfs is not permitted here: using the free-space reserve");
            free_bytes(&dir).saturating_sub((mib / 2) * MIB)
        }
    };
    let reserve_text = reserve.to_string();
    let mut all = vec![("IMAGEFLEET_FREE_SPACE_RESERVE_BYTES", reserve_text.as_str())];
    all.extend_from_slice(env);
    cluster.restart_region_with_env(GZ, &all).await;
    (mount, reserve)
}

async fn launch(region: &mut Region) -> String {
    let image = public_image(region, "Debian").await;
    run(region, &image.image_id, 1).await.remove(0)
}

async fn try_write(
    region: &mut Region,
    instance_id: &str,
    offset: u64,
    data: Vec<u8>,
) -> Result<u64, tonic::Status> {
    region
        .write_instance_disk(WriteInstanceDiskRequest {
            instance_id: instance_id.into(),
            offset,
            data,
        })
        .await
        .map(|r| r.into_inner().bytes_written)
}

async fn try_create_image(
    region: &mut Region,
    instance_id: &str,
    name: &str,
) -> Result<String, tonic::Status> {
    region
        .create_image(CreateImageRequest {
            instance_id: instance_id.into(),
            image_name: name.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().image_id)
}

async fn quota(region: &mut Region) -> DescribeImageQuotaResponse {
    region
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn instance_total(region: &mut Region) -> u32 {
    region
        .describe_instances(DescribeInstancesRequest {
            filters: vec![Filter {
                name: "instance-state".into(),
                values: vec!["PENDING".into(), "RUNNING".into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total_count
}

async fn terminate(region: &mut Region, ids: &[String]) {
    region
        .terminate_instances(TerminateInstancesRequest {
            instance_ids: ids.to_vec(),
        })
        .await
        .unwrap();
}

/// Defect: with no reserve, one account filled the region's disk; the other's next write was
/// `INTERNAL`, and nothing (not even a launch, nor freeing space) worked on a full disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_account_filling_the_disk_leaves_the_other_working() {
    let mut cluster = Cluster::start(&[GZ]).await;
    let (mount, reserve) = small_region_dir(&mut cluster, 160, 48 * MIB, &[]).await;
    let dir = cluster.region_dir(GZ);
    let mut alice = cluster.region(GZ, 0);
    let mut bob = cluster.region(GZ, 1);

    let mine = launch(&mut alice).await;
    let data = random_bytes(4 * MIB as usize);
    write(&mut alice, &mine, 0, &data).await;
    let untouched = read(&mut alice, &mine, 8 * MIB, 4096).await;

    // Bob writes distinct chunks until the region refuses him, for space and nothing else.
    let his = launch(&mut bob).await;
    let mut refused = None;
    for n in 0..400u64 {
        match try_write(&mut bob, &his, n * MIB, random_bytes(MIB as usize)).await {
            Ok(_) => {}
            Err(status) => {
                refused = Some((n, status));
                break;
            }
        }
    }
    let (stored, status) = refused.expect("the region never refused the filler");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), DISK_SPACE, "{status:?}");
    assert!(stored > 0, "the filler stored nothing before the refusal");
    let free = free_bytes(&dir);
    assert!(
        free + 2 * MIB >= reserve,
        "the filler went well below the reserve: {free} bytes free, reserve {reserve}"
    );

    // Alice: a write of 4 KiB is refused for space, never INTERNAL; so is a new image.
    let status = try_write(&mut alice, &mine, 8 * MIB, vec![7u8; 4096])
        .await
        .expect_err("a write below the reserve");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), DISK_SPACE, "{status:?}");
    let images_before = custom_image_count(&mut alice).await;
    assert_refused(
        try_create_image(&mut alice, &mine, "while-full").await,
        Code::ResourceExhausted,
        DISK_SPACE,
    );
    assert_eq!(custom_image_count(&mut alice).await, images_before);

    // What she has stays readable; launching from an existing image stores nothing and works.
    assert!(
        read(&mut alice, &mine, 0, 4 * MIB).await == data,
        "her data changed"
    );
    assert!(
        read(&mut alice, &mine, 8 * MIB, 4096).await == untouched,
        "a refused write left part of itself"
    );
    let second = launch(&mut alice).await;
    assert_eq!(read(&mut alice, &second, 0, 4096).await.len(), 4096);

    // Bob frees his space; Alice writes again, no restart.
    let pid = cluster.regions[GZ].pid();
    terminate(&mut bob, std::slice::from_ref(&his)).await;
    let small = random_bytes(4096);
    try_write(&mut alice, &mine, 8 * MIB, small.clone())
        .await
        .expect("the write succeeds once space is freed");
    assert!(read(&mut alice, &mine, 8 * MIB, 4096).await == small);
    assert!(
        read(&mut alice, &mine, 0, 4 * MIB).await == data,
        "her data changed"
    );
    assert_eq!(
        cluster.regions[GZ].pid(),
        pid,
        "the region was not restarted"
    );
    drop(mount);
}

/// Defect: with the metadata disk full, `RunInstances` was `INTERNAL "database or disk is
/// full"` and a chunk write `INTERNAL InternalError.ChunkStore`. Here something outside the
/// region fills its filesystem to the last byte (no reserve can help): every call that would
/// store is refused for space, nothing partial is left, reads go on, and the region recovers
/// by itself once the space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_for_space_and_recovers() {
    let mut cluster = Cluster::start(&[GZ]).await;
    let (mount, reserve) = small_region_dir(&mut cluster, 128, MIB, &[]).await;
    let dir = cluster.region_dir(GZ);
    let mut alice = cluster.region(GZ, 0);
    let mine = launch(&mut alice).await;
    let data = random_bytes(2 * MIB as usize);
    write(&mut alice, &mine, 0, &data).await;
    let instances_before = instance_total(&mut alice).await;
    let chunks_before = chunk_files(&dir);
    let untouched = read(&mut alice, &mine, 4 * MIB, 3 * MIB).await;

    // Fill the filesystem from outside: on the tmpfs to the last block; where mounting is
    // not permitted, past the reserve that stands in for it.
    let filler = dir.join("filler");
    let mut dd = Command::new("dd");
    dd.args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null());
    if mount.is_none() {
        dd.arg("count=128");
    }
    let _ = dd.status();
    match &mount {
        Some(_) => assert_eq!(free_bytes(&dir), 0, "the filler did not fill the tmpfs"),
        None => assert!(
            free_bytes(&dir) < reserve,
            "the filler did not pass the reserve"
        ),
    }

    for offset in [4 * MIB, 6 * MIB + 100] {
        let status = try_write(&mut alice, &mine, offset, random_bytes(MIB as usize))
            .await
            .expect_err("a write on a full disk");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason(&status), DISK_SPACE, "{status:?}");
    }
    assert_refused(
        try_create_image(&mut alice, &mine, "on-a-full-disk").await,
        Code::ResourceExhausted,
        DISK_SPACE,
    );
    // A launch stores only metadata: it either fits, or is refused for space, whole.
    let image = public_image(&mut alice, "Debian").await;
    let launched = alice
        .run_instances(RunInstancesRequest {
            image_id: image.image_id.clone(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 3,
            ..Default::default()
        })
        .await;
    let launched = match launched {
        Ok(r) => r.into_inner().instance_id_set,
        Err(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert_eq!(reason(&status), DISK_SPACE, "{status:?}");
            assert_eq!(instance_total(&mut alice).await, instances_before);
            Vec::new()
        }
    };
    assert!(
        read(&mut alice, &mine, 0, 2 * MIB).await == data,
        "her data changed"
    );
    assert!(
        read(&mut alice, &mine, 4 * MIB, 3 * MIB).await == untouched,
        "a refused write left part of itself"
    );
    assert_eq!(
        chunk_files(&dir),
        chunks_before,
        "a refused write left chunks"
    );

    // Space comes back; the region carries on by itself.
    std::fs::remove_file(&filler).unwrap();
    let more = random_bytes(MIB as usize);
    try_write(&mut alice, &mine, 4 * MIB, more.clone())
        .await
        .expect("a write once space is back");
    assert!(read(&mut alice, &mine, 4 * MIB, MIB).await == more);
    let again = launch(&mut alice).await;
    for id in launched.iter().chain([&again]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let state = alice
                .describe_instances(DescribeInstancesRequest {
                    instance_ids: vec![id.clone()],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .instance_set[0]
                .instance_state;
            if state == InstanceState::Running as i32 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never booted after space came back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    try_create_image(&mut alice, &mine, "after-the-fill")
        .await
        .expect("CreateImage once space is back");
    drop(mount);
}

/// Defect: instances were unlimited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_past_the_quota_are_refused_whole() {
    let cluster = Cluster::start_with(
        &[GZ],
        &[(
            GZ,
            RegionOptions::env(&[("IMAGEFLEET_INSTANCE_QUOTA", "3")]),
        )],
    )
    .await;
    let mut alice = cluster.region(GZ, 0);
    let mut bob = cluster.region(GZ, 1);
    let image = public_image(&mut alice, "Debian").await;
    let first = run(&mut alice, &image.image_id, 2).await;

    let refused = alice
        .run_instances(RunInstancesRequest {
            image_id: image.image_id.clone(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 2,
            ..Default::default()
        })
        .await;
    assert_refused(
        refused,
        Code::ResourceExhausted,
        "LimitExceeded.InstanceQuota",
    );
    assert_eq!(
        instance_total(&mut alice).await,
        2,
        "a refused launch left instances"
    );
    let q = quota(&mut alice).await;
    assert_eq!((q.instance_quota, q.instance_count), (3, 2));

    // The quota is per account; terminated instances do not count.
    run(&mut bob, &image.image_id, 3).await;
    terminate(&mut alice, &first[..1]).await;
    run(&mut alice, &image.image_id, 2).await;
    assert_eq!(quota(&mut alice).await.instance_count, 3);
    assert_refused(
        alice
            .run_instances(RunInstancesRequest {
                image_id: image.image_id.clone(),
                instance_type: "S5.MEDIUM4".into(),
                ..Default::default()
            })
            .await,
        Code::ResourceExhausted,
        "LimitExceeded.InstanceQuota",
    );
}

/// Defect: an account could store without bound (disks up to 2 TiB each, images without end).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_past_the_storage_quota_are_refused_and_nothing_is_left() {
    let quota_bytes = 8 * MIB;
    let cluster = Cluster::start_with(
        &[GZ],
        &[(
            GZ,
            RegionOptions::env(&[("IMAGEFLEET_STORAGE_BYTES_QUOTA", &quota_bytes.to_string())]),
        )],
    )
    .await;
    let dir = cluster.region_dir(GZ);
    let mut alice = cluster.region(GZ, 0);
    let mut bob = cluster.region(GZ, 1);
    let mine = launch(&mut alice).await;
    let data = random_bytes(quota_bytes as usize);
    write(&mut alice, &mine, 0, &data).await;
    let q = quota(&mut alice).await;
    assert_eq!(
        (q.storage_bytes_quota, q.storage_bytes_used),
        (quota_bytes, quota_bytes)
    );

    let chunks_before = chunk_files(&dir);
    let untouched = read(&mut alice, &mine, 16 * MIB, MIB).await;
    assert_refused(
        try_write(&mut alice, &mine, 16 * MIB, random_bytes(MIB as usize)).await,
        Code::ResourceExhausted,
        "LimitExceeded.StorageQuota",
    );
    assert_eq!(
        chunk_files(&dir),
        chunks_before,
        "a refused write left chunks"
    );
    assert!(
        read(&mut alice, &mine, 16 * MIB, MIB).await == untouched,
        "a refused write left part of itself"
    );
    // Rewriting what is there stores nothing more: allowed.
    let rewrite = random_bytes(MIB as usize);
    try_write(&mut alice, &mine, 0, rewrite.clone())
        .await
        .expect("a rewrite within the quota");
    assert!(read(&mut alice, &mine, 0, MIB).await == rewrite);
    // A new image of the disk would store its bytes again: refused, nothing admitted.
    let images = custom_image_count(&mut alice).await;
    assert_refused(
        try_create_image(&mut alice, &mine, "too-much").await,
        Code::ResourceExhausted,
        "LimitExceeded.StorageQuota",
    );
    assert_eq!(custom_image_count(&mut alice).await, images);

    // Bob's quota is his own; Alice's usage goes when her instance does.
    let his = launch(&mut bob).await;
    write(&mut bob, &his, 0, &random_bytes(quota_bytes as usize)).await;
    terminate(&mut alice, std::slice::from_ref(&mine)).await;
    assert_eq!(quota(&mut alice).await.storage_bytes_used, 0);
}

/// Defect: `DescribeImageQuota` and `imagectl images quota` showed only the image quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_answers_show_every_limit_and_usage() {
    let cluster = Cluster::start(&[GZ]).await;
    let mut alice = cluster.region(GZ, 0);
    let mine = launch(&mut alice).await;
    write(&mut alice, &mine, 0, &random_bytes(2 * MIB as usize)).await;
    let q = quota(&mut alice).await;
    assert!(q.image_num_quota > 0, "{q:?}");
    assert!(q.instance_quota > 0, "{q:?}");
    assert!(q.storage_bytes_quota > 0, "{q:?}");
    assert_eq!(q.instance_count, 1, "{q:?}");
    assert_eq!(q.storage_bytes_used, 2 * MIB, "{q:?}");

    let cluster_file = cluster.dir.path().join("cluster.json");
    imagefleet_rpc::cluster::ClusterFile {
        catalog: imagefleet_rpc::cluster::ServiceEndpoint {
            endpoint: cluster.catalog.url(),
            metrics: String::new(),
        },
        sharing: imagefleet_rpc::cluster::ServiceEndpoint {
            endpoint: cluster.sharing.url(),
            metrics: String::new(),
        },
        regions: vec![imagefleet_rpc::cluster::RegionEndpoint {
            region: GZ.into(),
            endpoint: cluster.region_url(GZ),
            metrics: String::new(),
        }],
        accounts: cluster.accounts.clone(),
        redis_url: String::new(),
        service_key_file: String::new(),
        ..Default::default()
    }
    .store(&cluster_file)
    .unwrap();
    let out = Command::new(IMAGECTL)
        .arg("--cluster")
        .arg(&cluster_file)
        .args(["--output", "json", "images", "quota", "--region", GZ])
        .output()
        .expect("imagectl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let number = |key: &str| -> u64 {
        match &json[key] {
            serde_json::Value::Number(n) => n.as_u64().unwrap(),
            serde_json::Value::String(s) => s.parse().unwrap(),
            other => panic!("{key}: {other:?} in {json}"),
        }
    };
    assert!(number("imageNumQuota") > 0, "{json}");
    assert_eq!(
        number("instanceQuota"),
        u64::from(q.instance_quota),
        "{json}"
    );
    assert_eq!(number("storageBytesQuota"), q.storage_bytes_quota, "{json}");
    assert_eq!(number("instanceCount"), 1, "{json}");
    assert_eq!(number("storageBytesUsed"), 2 * MIB, "{json}");

    let out = Command::new(IMAGECTL)
        .arg("--cluster")
        .arg(&cluster_file)
        .args(["images", "quota", "--region", GZ])
        .output()
        .expect("imagectl runs");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("INSTANCE_QUOTA") && table.contains("STORAGE_BYTES_QUOTA"),
        "{table}"
    );
}

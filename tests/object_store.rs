//! Region chunks in an S3-compatible object store, against real Garage processes the tests
//! start: the chunk backend conformance suite, shared-bucket reclaiming, a three-region
//! cluster whose regions keep their chunks in Garage (create, copy, share, launch, delete,
//! reclaim), copies between a region on local disk and one on Garage, and a copy that goes on
//! while one node of a three-zone Garage is down.
//!
//! Every test skips (saying so) when the `garage` binary cannot be found on `PATH` or in
//! `~/.cargo/bin`; `tests/run.sh` installs it first (`deploy/garage/ensure.sh`).

mod common;

use common::garage::{start_or_skip, Garage};
use common::*;
use imagefleet_chunkstore::{ChunkBackend, ChunkDigest, ChunkStore, CHUNK_SIZE};
use imagefleet_proto::region::v1::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tonic::Code;

const MIB: u64 = 1 << 20;

/// A chunk of random bytes and its digest.
fn random_chunk() -> (ChunkDigest, Vec<u8>) {
    let data = random_bytes(CHUNK_SIZE);
    (ChunkDigest::of(&data), data)
}

#[test]
fn conformance_suite_passes_on_garage() {
    let Some(garage) = start_or_skip("conformance_suite_passes_on_garage", 1) else {
        return;
    };
    // Each check gets a fresh, empty backend: its own prefix in the one bucket.
    let next = AtomicUsize::new(0);
    imagefleet_chunkstore::conformance::run_all(&|| {
        let n = next.fetch_add(1, Ordering::SeqCst);
        Box::new(garage.backend(&garage.url(&format!("conformance/{n}"), "")))
    });
    assert!(next.load(Ordering::SeqCst) >= 13, "every check ran");
    // The objects are where the layout says: `<prefix>/<hex>`, one per chunk.
    let store = garage.backend(&garage.url("layout", ""));
    let (d, data) = random_chunk();
    store.put_batch(&[(d, &data)]).unwrap();
    store.sync().unwrap();
    assert_eq!(store.describe(), format!("s3://{}/layout", garage.bucket));
    let nested = garage.backend(&garage.url("layout/nested", ""));
    assert!(
        nested.list().unwrap().is_empty(),
        "a prefix does not list another's chunks"
    );
    assert!(
        garage
            .backend(&garage.url("", ""))
            .list()
            .unwrap()
            .is_empty(),
        "the bucket root holds no chunk objects"
    );
}

#[test]
fn replicas_sharing_a_bucket_never_reclaim_a_chunk_inside_the_grace_window() {
    let Some(garage) = start_or_skip(
        "replicas_sharing_a_bucket_never_reclaim_a_chunk_inside_the_grace_window",
        1,
    ) else {
        return;
    };
    // Two replicas of one region on one prefix, with the default one-hour grace window.
    let url = garage.url("shared/ap-guangzhou", "");
    let first = ChunkStore::new(Arc::new(garage.backend(&url)));
    let second = ChunkStore::new(Arc::new(garage.backend(&url)));
    let (d, data) = random_chunk();
    first.put_verified(&[(d, &data)]).unwrap();
    first.sync().unwrap();
    // The second replica does not reference it, and reclaims: the chunk stays.
    assert!(!second.reclaim(&d).unwrap(), "a fresh chunk was reclaimed");
    assert!(first.contains(&d).unwrap());
    assert_eq!(first.get(&d).unwrap(), data);
    // Putting it again (another replica referencing it) is harmless and keeps it.
    second.put_verified(&[(d, &data)]).unwrap();
    assert!(!first.reclaim(&d).unwrap());
    assert_eq!(second.list().unwrap(), vec![d]);

    // A replica configured without a grace window reclaims at once; a chunk already gone
    // counts as reclaimed.
    let eager = ChunkStore::new(Arc::new(
        garage.backend(&garage.url("shared/ap-guangzhou", "grace=0s")),
    ));
    assert!(eager.reclaim(&d).unwrap());
    assert!(!first.contains(&d).unwrap());
    assert!(eager.reclaim(&d).unwrap());

    // The race the window leaves: a writer re-stores an old chunk (a window so short that
    // every stored chunk is old) while another replica's reclaim deletes it. The writer's
    // `sync` looks again, fails, and the chunk is stored again on retry.
    let writer = ChunkStore::new(Arc::new(
        garage.backend(&garage.url("shared/ap-shanghai", "grace=1ns")),
    ));
    let reclaimer = ChunkStore::new(Arc::new(
        garage.backend(&garage.url("shared/ap-shanghai", "grace=0s")),
    ));
    let (d, data) = random_chunk();
    writer.put_verified(&[(d, &data)]).unwrap();
    writer.sync().unwrap();
    writer.put_verified(&[(d, &data)]).unwrap();
    assert!(reclaimer.reclaim(&d).unwrap());
    let err = writer.sync().unwrap_err();
    assert!(
        err.to_string().contains("reclaimed by another writer"),
        "{err}"
    );
    writer.put_verified(&[(d, &data)]).unwrap();
    writer.sync().unwrap();
    assert_eq!(reclaimer.get(&d).unwrap(), data);

    // A quota bounds what the backend takes, and `space` reports what is left of it.
    let bounded = garage.backend(&garage.url("quota", "quota=2MiB"));
    assert_eq!(bounded.space().unwrap().free_bytes, 2 * MIB);
    let chunks: Vec<_> = (0..3).map(|_| random_chunk()).collect();
    bounded
        .put_batch(&[(chunks[0].0, &chunks[0].1), (chunks[1].0, &chunks[1].1)])
        .unwrap();
    let space = bounded.space().unwrap();
    assert_eq!((space.used_bytes, space.free_bytes), (2 * MIB, 0));
    let full = bounded
        .put_batch(&[(chunks[2].0, &chunks[2].1)])
        .unwrap_err();
    assert!(
        matches!(full, imagefleet_chunkstore::ChunkError::NoSpace(_)),
        "{full:?}"
    );
    // Reopening counts what is there.
    let reopened = garage.backend(&garage.url("quota", "quota=2MiB"));
    assert_eq!(reopened.space().unwrap().used_bytes, 2 * MIB);
}

/// Makes an image in `region` from `platform`'s public image with `data` written at `offset`;
/// returns the image and the instance it was made from.
async fn image_with(
    region: &mut Region,
    platform: &str,
    offset: u64,
    data: &[u8],
    name: &str,
) -> (String, String) {
    let public = public_image(region, platform).await;
    let instance = run(region, &public.image_id, 1).await.remove(0);
    write(region, &instance, offset, data).await;
    let image_id = region
        .create_image(CreateImageRequest {
            instance_id: instance.clone(),
            image_name: name.into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(region, &image_id, ImageState::Normal).await;
    (image_id, instance)
}

async fn sync_to(region: &mut Region, image_id: &str, to: &[&str]) -> Vec<SyncedImage> {
    region
        .sync_images(SyncImagesRequest {
            image_ids: vec![image_id.into()],
            destination_regions: to.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set
}

/// The non-zero exported bytes of an image, by offset.
async fn exported(region: &mut Region, image_id: &str) -> std::collections::BTreeMap<u64, Vec<u8>> {
    export(region, image_id).await.1.into_iter().collect()
}

async fn terminate(region: &mut Region, instances: Vec<String>) {
    region
        .terminate_instances(TerminateInstancesRequest {
            instance_ids: instances,
        })
        .await
        .unwrap();
}

async fn delete_image(region: &mut Region, image_id: &str) {
    region
        .delete_images(DeleteImagesRequest {
            image_ids: vec![image_id.into()],
        })
        .await
        .unwrap();
}

/// Polls until `prefix` holds `expected` chunks (reclaiming runs after the call that freed
/// them returns); returns the last count seen.
async fn wait_chunks(garage: &Garage, prefix: &str, expected: usize) -> usize {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let count = garage.chunk_count(prefix);
        if count == expected || tokio::time::Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_region_cluster_on_garage_creates_copies_shares_launches_deletes_and_reclaims() {
    let Some(garage) = start_or_skip(
        "a_three_region_cluster_on_garage_creates_copies_shares_launches_deletes_and_reclaims",
        1,
    ) else {
        return;
    };
    let regions = ["ap-guangzhou", "ap-shanghai", "ap-beijing"];
    let options: Vec<_> = regions
        .iter()
        .map(|r| (*r, garage.region_options(&format!("regions/{r}"))))
        .collect();
    let cluster = Cluster::start_with(&regions, &options).await;
    let bob_id = cluster.accounts[1].account_id.clone();
    // Nothing on local disk: every chunk (the seeded public images too) is in Garage.
    let mut baseline = std::collections::BTreeMap::new();
    for region in regions {
        assert_eq!(chunk_files(&cluster.region_dir(region)), 0, "{region}");
        let count = garage.chunk_count(&format!("regions/{region}"));
        assert!(count > 0, "{region} seeded its public images into Garage");
        baseline.insert(region, count);
    }
    let prefix = |r: &str| format!("regions/{r}");

    // Create: a launch copies nothing; a 3 MiB write across 4 chunks makes 4 new ones.
    let mut gz = cluster.region("ap-guangzhou", 0);
    let data = random_bytes(3 * MIB as usize);
    let offset = 20 * MIB + 4097;
    let (source, instance) = image_with(&mut gz, "Ubuntu", offset, &data, "on-garage").await;
    assert_eq!(
        garage.chunk_count(&prefix("ap-guangzhou")),
        baseline["ap-guangzhou"] + 4
    );
    let source_bytes = exported(&mut gz, &source).await;
    let source_digest = image(&mut gz, &source).await.content_digest;

    // Copy to both other regions at once.
    let copies = sync_to(&mut gz, &source, &["ap-shanghai", "ap-beijing"]).await;
    assert_eq!(copies.len(), 2);
    for copy in &copies {
        let mut dest = cluster.region(&copy.region, 0);
        let done = wait_copy_normal(&mut dest, &copy.image_id).await;
        assert_eq!(done.content_digest, source_digest);
        assert_eq!(exported(&mut dest, &copy.image_id).await, source_bytes);
        // Only the 4 new chunks travelled, and they are in the destination's prefix.
        assert_eq!(
            done.sync_progress.clone().unwrap().chunks_transferred,
            4,
            "{:?}",
            done.sync_progress
        );
        assert_eq!(
            garage.chunk_count(&prefix(&copy.region)),
            baseline[copy.region.as_str()] + 4
        );
    }
    let in_shanghai = copies
        .iter()
        .find(|c| c.region == "ap-shanghai")
        .unwrap()
        .image_id
        .clone();

    // Share the copy with bob, who launches it and reads the data.
    let mut alice_sh = cluster.region("ap-shanghai", 0);
    let mut bob_sh = cluster.region("ap-shanghai", 1);
    share(
        &mut alice_sh,
        &in_shanghai,
        &[&bob_id],
        SharePermission::Share,
    )
    .await
    .unwrap();
    let bobs = run(&mut bob_sh, &in_shanghai, 1).await;
    assert_eq!(
        read(&mut bob_sh, &bobs[0], offset, data.len() as u64).await,
        data
    );
    // A shared image cannot be deleted; after the share is cancelled it can, and bob's
    // instance keeps working.
    assert_refused(
        alice_sh
            .delete_images(DeleteImagesRequest {
                image_ids: vec![in_shanghai.clone()],
            })
            .await,
        Code::FailedPrecondition,
        "InvalidImageId.InShared",
    );
    share(
        &mut alice_sh,
        &in_shanghai,
        &[&bob_id],
        SharePermission::Cancel,
    )
    .await
    .unwrap();
    delete_image(&mut alice_sh, &in_shanghai).await;
    assert_eq!(
        read(&mut bob_sh, &bobs[0], offset, data.len() as u64).await,
        data
    );
    // Its chunks stay while bob's instance uses them, and are reclaimed when it goes.
    assert_eq!(
        garage.chunk_count(&prefix("ap-shanghai")),
        baseline["ap-shanghai"] + 4
    );
    terminate(&mut bob_sh, bobs).await;
    assert_eq!(
        wait_chunks(&garage, &prefix("ap-shanghai"), baseline["ap-shanghai"]).await,
        baseline["ap-shanghai"]
    );

    // Delete in Beijing: nothing else uses the copy, so its chunks go at once.
    let in_beijing = copies
        .iter()
        .find(|c| c.region == "ap-beijing")
        .unwrap()
        .image_id
        .clone();
    let mut bj = cluster.region("ap-beijing", 0);
    delete_image(&mut bj, &in_beijing).await;
    assert_eq!(
        wait_chunks(&garage, &prefix("ap-beijing"), baseline["ap-beijing"]).await,
        baseline["ap-beijing"]
    );

    // And the source: deleted, its instance terminated, its chunks reclaimed.
    delete_image(&mut gz, &source).await;
    terminate(&mut gz, vec![instance]).await;
    assert_eq!(
        wait_chunks(&garage, &prefix("ap-guangzhou"), baseline["ap-guangzhou"]).await,
        baseline["ap-guangzhou"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_between_a_region_on_local_disk_and_a_region_on_garage() {
    let Some(garage) = start_or_skip(
        "copies_between_a_region_on_local_disk_and_a_region_on_garage",
        1,
    ) else {
        return;
    };
    // Guangzhou on local disk (the default), Shanghai on Garage.
    let cluster = Cluster::start_with(
        &["ap-guangzhou", "ap-shanghai"],
        &[("ap-shanghai", garage.region_options("sh"))],
    )
    .await;
    let gz_dir = cluster.region_dir("ap-guangzhou");
    let local_baseline = chunk_files(&gz_dir);
    assert!(local_baseline > 0);
    assert_eq!(chunk_files(&cluster.region_dir("ap-shanghai")), 0);
    let garage_baseline = garage.chunk_count("sh");

    // Local disk to Garage.
    let mut gz = cluster.region("ap-guangzhou", 0);
    let data = random_bytes(5 * MIB as usize + 123);
    let (source, _) = image_with(&mut gz, "Debian", 7 * MIB, &data, "disk-to-s3").await;
    let source_bytes = exported(&mut gz, &source).await;
    let copy = sync_to(&mut gz, &source, &["ap-shanghai"]).await.remove(0);
    let mut sh = cluster.region("ap-shanghai", 0);
    let done = wait_copy_normal(&mut sh, &copy.image_id).await;
    assert_eq!(exported(&mut sh, &copy.image_id).await, source_bytes);
    let moved = done.sync_progress.unwrap().chunks_transferred as usize;
    assert_eq!(moved, 6);
    assert_eq!(garage.chunk_count("sh"), garage_baseline + moved);

    // Garage to local disk: an image made in Shanghai, copied to Guangzhou.
    let more = random_bytes(2 * MIB as usize);
    let (back, _) = image_with(&mut sh, "CentOS", 3 * MIB, &more, "s3-to-disk").await;
    let back_bytes = exported(&mut sh, &back).await;
    let before = chunk_files(&gz_dir);
    let copy = sync_to(&mut sh, &back, &["ap-guangzhou"]).await.remove(0);
    let done = wait_copy_normal(&mut gz, &copy.image_id).await;
    assert_eq!(exported(&mut gz, &copy.image_id).await, back_bytes);
    let moved = done.sync_progress.unwrap().chunks_transferred as usize;
    assert_eq!(moved, 2);
    assert_eq!(chunk_files(&gz_dir), before + moved);
    // The copy launches on local disk and reads what was written on Garage.
    let instance = run(&mut gz, &copy.image_id, 1).await.remove(0);
    assert_eq!(
        read(&mut gz, &instance, 3 * MIB, more.len() as u64).await,
        more
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_into_a_three_zone_garage_completes_with_one_node_stopped_midway() {
    let Some(mut garage) = start_or_skip(
        "a_copy_into_a_three_zone_garage_completes_with_one_node_stopped_midway",
        3,
    ) else {
        return;
    };
    // Three nodes in zones dc1..dc3, every object on all three; Shanghai talks to the first.
    let layout = garage.cli_retry(&["layout", "show"]);
    for (node, zone) in garage.nodes.iter().zip(["dc1", "dc2", "dc3"]) {
        assert!(
            layout
                .lines()
                .any(|l| l.contains(&node.id[..16]) && l.contains(zone)),
            "node {} is not in zone {zone}:\n{layout}",
            node.id
        );
    }
    let cluster = Cluster::start_with(
        &["ap-guangzhou", "ap-shanghai"],
        &[("ap-shanghai", garage.region_options("sh"))],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let data = random_bytes(48 * MIB as usize);
    let (source, _) = image_with(&mut gz, "Ubuntu", 64 * MIB, &data, "big").await;
    let source_bytes = exported(&mut gz, &source).await;
    let copy = sync_to(&mut gz, &source, &["ap-shanghai"]).await.remove(0);

    // Stop the third node once the copy is under way.
    let mut sh = cluster.region("ap-shanghai", 0);
    loop {
        let now = image(&mut sh, &copy.image_id).await;
        let done = now.sync_progress.map_or(0, |p| p.chunks_done);
        if done > 0 || now.image_state == ImageState::Normal as i32 {
            assert_ne!(
                now.image_state,
                ImageState::Normal as i32,
                "the copy finished before a node could be stopped"
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    garage.kill_node(2);
    let at_kill = image(&mut sh, &copy.image_id)
        .await
        .sync_progress
        .expect("a copy reports its progress");
    eprintln!(
        "node 3 of 3 stopped with {} of {} chunks copied",
        at_kill.chunks_done, at_kill.chunks_total
    );

    let done = wait_copy_normal(&mut sh, &copy.image_id).await;
    assert_eq!(exported(&mut sh, &copy.image_id).await, source_bytes);
    assert_eq!(done.sync_progress.unwrap().chunks_transferred, 48);
    // Launch it with the node still down and read the data back.
    let instance = run(&mut sh, &copy.image_id, 1).await.remove(0);
    assert_eq!(
        read(&mut sh, &instance, 64 * MIB, data.len() as u64).await,
        data
    );
}

#[test]
fn imaged_dev_keeps_every_region_in_the_bucket_and_a_bad_chunk_store_is_refused() {
    let Some(garage) = start_or_skip(
        "imaged_dev_keeps_every_region_in_the_bucket_and_a_bad_chunk_store_is_refused",
        1,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = garage.url("dev", "grace=0s");
    let env = garage.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let dev = common::dev::start_dev_with(
        dir.path(),
        "ap-guangzhou,ap-shanghai",
        &["--chunk-store", &url],
        &env,
    );
    for region in ["ap-guangzhou", "ap-shanghai"] {
        assert!(
            garage.chunk_count(&format!("dev/{region}")) > 0,
            "{region} seeded nothing into the bucket"
        );
        let local = dir.path().join("regions").join(region);
        assert_eq!(
            chunk_files(&local),
            0,
            "{region} wrote chunks to local disk"
        );
    }
    common::dev::stop(dev);

    // A region refuses to start on a chunk store it cannot use, saying why.
    for (spec, says) in [
        (
            "ftp://bucket/x",
            "neither `local` nor an s3://bucket/prefix URL",
        ),
        ("s3://bucket/x?colour=blue", "unknown option"),
    ] {
        let out = std::process::Command::new(IMAGED)
            .args([
                "region",
                "--region",
                "ap-guangzhou",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("refused"))
            .args(["--chunk-store", spec])
            .env("IMAGEFLEET_SERVICE_KEY", "0123456789abcdef0123456789abcdef")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} was accepted");
        assert!(stderr.contains(says), "{spec}: {stderr}");
    }
}

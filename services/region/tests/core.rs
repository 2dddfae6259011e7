//! The region core in-process: admission, lifecycle, the durability contract and the copy
//! engine, on in-memory chunk backends, with no Redis and no child processes.

mod support;

use imagefleet_chunkstore::{ChunkBackend, ChunkStore, Memory, Recording};
use imagefleet_proto::region::v1::*;
use std::sync::Arc;
use std::time::Duration;
use support::*;

const MIB: usize = 1 << 20;

fn recording() -> (Arc<Recording<Memory>>, ChunkStore) {
    let backend = Arc::new(Recording::new(Memory::new()));
    (backend.clone(), ChunkStore::new(backend))
}

fn chunk_count(chunks: &ChunkStore) -> usize {
    chunks.list().expect("list").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_terminated_instance_store_nothing() {
    let h = Harness::start(vec![RegionSpec::memory("ap-guangzhou")]).await;
    let mut c = h.client("ap-guangzhou", 0);
    let base = public_image(&mut c).await;
    let instance = launch(&mut c, &base).await;
    c.terminate_instances(TerminateInstancesRequest {
        instance_ids: vec![instance.clone()],
    })
    .await
    .expect("terminate");
    let chunks = h.region("ap-guangzhou").chunks().clone();
    let before = chunk_count(&chunks);
    for _ in 0..10 {
        let err = write(&mut c, &instance, 0, &random_bytes(4 * MIB))
            .await
            .expect_err("a terminated instance's disk cannot be written");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert_eq!(reason(&err), "UnsupportedOperation.InstanceStateTerminated");
    }
    assert_eq!(
        chunk_count(&chunks),
        before,
        "a refused write stored chunks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_recorded_only_after_its_chunks_are_durable() {
    let (backend, chunks) = recording();
    let h = Harness::start(vec![RegionSpec {
        chunks,
        ..RegionSpec::memory("ap-guangzhou")
    }])
    .await;
    let mut c = h.client("ap-guangzhou", 0);
    let base = public_image(&mut c).await;
    let instance = launch(&mut c, &base).await;
    let first = random_bytes(2 * MIB);
    write(&mut c, &instance, 0, &first).await.expect("write");
    assert!(
        backend.pending().is_empty(),
        "an acknowledged write left chunks not durable"
    );

    // While the backend cannot make chunks durable, writes fail and change nothing.
    let before = backend.list().expect("list").len();
    backend.fail_sync(true);
    let err = write(&mut c, &instance, 0, &random_bytes(2 * MIB))
        .await
        .expect_err("a write whose chunks cannot be made durable fails");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    backend.fail_sync(false);
    let back = c
        .read_instance_disk(ReadInstanceDiskRequest {
            instance_id: instance.clone(),
            offset: 0,
            length: first.len() as u64,
        })
        .await
        .expect("read")
        .into_inner()
        .data;
    assert_eq!(back, first, "a failed write changed the disk");
    assert_eq!(
        backend.list().expect("list").len(),
        before,
        "a failed write left chunks behind"
    );

    // A power loss now loses nothing that was acknowledged.
    backend.inner().crash();
    let back = c
        .read_instance_disk(ReadInstanceDiskRequest {
            instance_id: instance,
            offset: 0,
            length: first.len() as u64,
        })
        .await
        .expect("read after a crash")
        .into_inner()
        .data;
    assert_eq!(back, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_is_normal_only_after_its_chunks_are_durable() {
    let (dest_backend, dest_chunks) = recording();
    let h = Harness::start(vec![
        RegionSpec::memory("ap-guangzhou"),
        RegionSpec {
            chunks: dest_chunks,
            ..RegionSpec::memory("ap-shanghai")
        },
    ])
    .await;
    let mut src = h.client("ap-guangzhou", 0);
    let mut dst = h.client("ap-shanghai", 0);
    let base = public_image(&mut src).await;
    let data = random_bytes(12 * MIB);
    let image = image_with(&mut src, &base, "copied", &data).await;

    dest_backend.fail_sync(true);
    let copy = copy_to(&mut src, &image, "ap-shanghai").await;
    // It waits, says why, and does not become NORMAL while its chunks cannot be made durable.
    let waiting = wait_image(
        &mut dst,
        &copy,
        Duration::from_secs(30),
        |r| matches!(r, Ok(i) if !i.state_reason.is_empty()),
    )
    .await
    .expect("copy");
    assert_eq!(
        waiting.image_state,
        ImageState::Syncing as i32,
        "{waiting:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = describe(&mut dst, &copy).await.expect("copy");
    assert_eq!(still.image_state, ImageState::Syncing as i32);

    dest_backend.fail_sync(false);
    let done = wait_image(
        &mut dst,
        &copy,
        Duration::from_secs(60),
        state_is(ImageState::Normal),
    )
    .await
    .expect("copy");
    assert!(
        dest_backend.pending().is_empty(),
        "NORMAL before every chunk was durable"
    );
    let events = dest_backend.events();
    let last_put = events
        .iter()
        .rposition(|e| matches!(e, imagefleet_chunkstore::Event::Put(_)))
        .expect("chunks were stored");
    assert!(
        events[last_put..].contains(&imagefleet_chunkstore::Event::Sync),
        "no sync after the copy's last chunk"
    );
    // The digest is the destination's own, from what it stored: equal to the source's because
    // the bytes are.
    let source = describe(&mut src, &image).await.expect("source");
    assert_eq!(done.content_digest, source.content_digest);
    assert_eq!(
        export(&mut dst, &copy).await,
        export(&mut src, &image).await
    );
    dest_backend.inner().crash();
    assert_eq!(
        export(&mut dst, &copy).await,
        export(&mut src, &image).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_images_admits_every_copy_or_none_and_the_dry_run_agrees() {
    let h = Harness::start(vec![
        RegionSpec::memory("ap-guangzhou"),
        RegionSpec {
            image_quota: 3,
            ..RegionSpec::memory("ap-shanghai")
        },
        RegionSpec::memory("ap-beijing"),
    ])
    .await;
    let mut src = h.client("ap-guangzhou", 0);
    let mut dst = h.client("ap-shanghai", 0);
    let base = public_image(&mut src).await;
    let mut images = Vec::new();
    for i in 0..3 {
        images.push(image_with(&mut src, &base, &format!("img-{i}"), &random_bytes(MIB)).await);
    }
    // One image already in the destination: 1 of 3 used.
    let there = public_image(&mut dst).await;
    image_with(&mut dst, &there, "already-there", &random_bytes(MIB)).await;
    let own_in_dest = |set: &[Image]| {
        set.iter()
            .filter(|i| i.image_type == ImageType::PrivateImage as i32)
            .count()
    };
    let listed = dst
        .describe_images(DescribeImagesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .image_set;
    assert_eq!(own_in_dest(&listed), 1);

    for (request, code, why) in [
        (
            SyncImagesRequest {
                image_ids: images.clone(),
                destination_regions: vec!["ap-beijing".into(), "ap-shanghai".into()],
                ..Default::default()
            },
            tonic::Code::ResourceExhausted,
            "ImageQuotaLimitExceeded",
        ),
        (
            SyncImagesRequest {
                image_ids: images.clone(),
                destination_regions: vec!["ap-beijing".into()],
                image_name: "same-name".into(),
                ..Default::default()
            },
            tonic::Code::AlreadyExists,
            "InvalidImageName.Duplicate",
        ),
    ] {
        let dry = src
            .sync_images(SyncImagesRequest {
                dry_run: true,
                ..request.clone()
            })
            .await
            .expect_err("the dry run refuses what the call would");
        let real = src.sync_images(request.clone()).await.expect_err("refused");
        for err in [&dry, &real] {
            assert_eq!(err.code(), code, "{err:?}");
            assert_eq!(reason(err), why);
            let meta = imagefleet_proto::error::metadata(err);
            assert!(
                meta.get("region")
                    .is_some_and(|r| request.destination_regions.contains(r)),
                "{meta:?}"
            );
            assert!(
                meta.get("image_id").is_some_and(|i| images.contains(i)),
                "{meta:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for region in ["ap-shanghai", "ap-beijing"] {
            let listed = h
                .client(region, 0)
                .describe_images(DescribeImagesRequest::default())
                .await
                .expect("list")
                .into_inner()
                .image_set;
            let expected = if region == "ap-shanghai" { 1 } else { 0 };
            assert_eq!(
                own_in_dest(&listed),
                expected,
                "{region} got copies of a refused call"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_source_image_does_not_break_a_copy() {
    // The destination has room for 9 chunks, 8 taken by a filler: the copy is admitted (a
    // region admits new images while it has room for a chunk) and waits for space after its
    // first chunk.
    let mut h = Harness::start(vec![
        RegionSpec::memory("ap-guangzhou"),
        RegionSpec {
            chunks: ChunkStore::new(Arc::new(Memory::with_capacity(
                (imagefleet_chunkstore::CHUNK_SIZE * 9 + public_chunks()) as u64,
            ))),
            ..RegionSpec::memory("ap-shanghai")
        },
    ])
    .await;
    let mut src = h.client("ap-guangzhou", 0);
    let mut dst = h.client("ap-shanghai", 0);
    let base = public_image(&mut src).await;
    let data = random_bytes(8 * MIB);
    let image = image_with(&mut src, &base, "doomed", &data).await;
    let expected = export(&mut src, &image).await;
    let there = public_image(&mut dst).await;
    let filler = image_with(&mut dst, &there, "filler", &random_bytes(8 * MIB)).await;

    // A destination that is down refuses the call, which starts nothing.
    h.stop_region("ap-shanghai").await;
    let err = src
        .sync_images(SyncImagesRequest {
            image_ids: vec![image.clone()],
            destination_regions: vec!["ap-shanghai".into()],
            ..Default::default()
        })
        .await
        .expect_err("a destination that is down refuses");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    h.restart_region("ap-shanghai").await;
    let mut dst = h.client("ap-shanghai", 0);

    let copy = copy_to(&mut src, &image, "ap-shanghai").await;
    wait_image(
        &mut dst,
        &copy,
        Duration::from_secs(30),
        |r| matches!(r, Ok(i) if i.state_reason.contains("space")),
    )
    .await
    .expect("copy");

    // The source image goes (its instance first, so nothing else holds its chunks).
    terminate_all(&mut src).await;
    src.delete_images(DeleteImagesRequest {
        image_ids: vec![image.clone()],
    })
    .await
    .expect("the source can be deleted during a copy");
    assert_eq!(
        describe(&mut src, &image)
            .await
            .expect_err("deleted")
            .code(),
        tonic::Code::NotFound
    );
    let source_chunks = h.region("ap-guangzhou").chunks().clone();
    let data_digest = imagefleet_chunkstore::ChunkDigest::of(&data[..MIB]);
    assert!(
        source_chunks.contains(&data_digest).expect("contains"),
        "the copy's source snapshot was not kept"
    );

    // Space comes back: the copy reads the pinned snapshot and completes, byte for byte.
    terminate_all(&mut dst).await;
    dst.delete_images(DeleteImagesRequest {
        image_ids: vec![filler],
    })
    .await
    .expect("delete the filler");
    wait_image(
        &mut dst,
        &copy,
        Duration::from_secs(60),
        state_is(ImageState::Normal),
    )
    .await
    .expect("copy");
    assert_eq!(export(&mut dst, &copy).await, expected);
    // The pin goes with the copy: the source's chunks are reclaimed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while source_chunks.contains(&data_digest).expect("contains") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the source's chunks were never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_syncing_copy_cancels_it_and_reclaims_its_chunks() {
    let mut h = Harness::start(vec![
        RegionSpec::memory("ap-guangzhou"),
        RegionSpec::memory("ap-shanghai"),
    ])
    .await;
    let mut src = h.client("ap-guangzhou", 0);
    let mut dst = h.client("ap-shanghai", 0);
    let base = public_image(&mut src).await;
    let image = image_with(&mut src, &base, "big", &random_bytes(8 * MIB)).await;
    let dest_chunks = h.region("ap-shanghai").chunks().clone();
    let before = chunk_count(&dest_chunks);
    let copy = copy_to(&mut src, &image, "ap-shanghai").await;
    // The source goes away: the copy waits, SYNCING, saying why.
    h.stop_region("ap-guangzhou").await;
    let waiting = wait_image(&mut dst, &copy, Duration::from_secs(30), |r| {
        matches!(r, Ok(i) if i.image_state == ImageState::Syncing as i32 && !i.state_reason.is_empty())
            || matches!(r, Ok(i) if i.image_state == ImageState::Normal as i32)
    })
    .await
    .expect("copy");
    if waiting.image_state == ImageState::Syncing as i32 {
        assert!(
            waiting.state_reason.contains("retry"),
            "{}",
            waiting.state_reason
        );
    }
    dst.delete_images(DeleteImagesRequest {
        image_ids: vec![copy.clone()],
    })
    .await
    .expect("a SYNCING copy can be deleted");
    let gone = describe(&mut dst, &copy).await.expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while chunk_count(&dest_chunks) != before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copy's chunks were never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.restart_region("ap-guangzhou").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_waits_for_space_and_gives_up_at_its_deadline() {
    // The destination has room for 8 chunks, 4 of them taken: the 8-chunk copy cannot fit
    // until space is freed.
    let mut h = Harness::start(vec![
        RegionSpec::memory("ap-guangzhou"),
        RegionSpec {
            chunks: ChunkStore::new(Arc::new(Memory::with_capacity(
                (imagefleet_chunkstore::CHUNK_SIZE * 8 + public_chunks()) as u64,
            ))),
            ..RegionSpec::memory("ap-shanghai")
        },
        RegionSpec {
            copy_deadline: Duration::from_secs(2),
            ..RegionSpec::memory("ap-beijing")
        },
    ])
    .await;
    let mut src = h.client("ap-guangzhou", 0);
    let mut dst = h.client("ap-shanghai", 0);
    let base = public_image(&mut src).await;
    let image = image_with(&mut src, &base, "eight", &random_bytes(8 * MIB)).await;
    let there = public_image(&mut dst).await;
    let filler = image_with(&mut dst, &there, "filler", &random_bytes(4 * MIB)).await;
    let copy = copy_to(&mut src, &image, "ap-shanghai").await;
    let waiting = wait_image(
        &mut dst,
        &copy,
        Duration::from_secs(30),
        |r| matches!(r, Ok(i) if i.state_reason.contains("space")),
    )
    .await
    .expect("copy");
    assert_eq!(
        waiting.image_state,
        ImageState::Syncing as i32,
        "{waiting:?}"
    );
    // Free the space (terminate the filler's instance, delete the filler): the copy completes.
    terminate_all(&mut dst).await;
    dst.delete_images(DeleteImagesRequest {
        image_ids: vec![filler],
    })
    .await
    .expect("delete");
    wait_image(
        &mut dst,
        &copy,
        Duration::from_secs(60),
        state_is(ImageState::Normal),
    )
    .await
    .expect("copy");
    assert_eq!(
        export(&mut dst, &copy).await,
        export(&mut src, &image).await
    );

    // A copy whose source stays down past its deadline fails, saying so.
    let late = copy_to(&mut src, &image, "ap-beijing").await;
    h.stop_region("ap-guangzhou").await;
    let mut bj = h.client("ap-beijing", 0);
    let failed = wait_image(
        &mut bj,
        &late,
        Duration::from_secs(60),
        |r| matches!(r, Ok(i) if i.image_state != ImageState::Syncing as i32),
    )
    .await
    .expect("copy");
    if failed.image_state == ImageState::Createfailed as i32 {
        assert!(
            failed.state_reason.contains("deadline"),
            "{}",
            failed.state_reason
        );
    } else {
        // The copy was quick enough to finish before the source stopped.
        assert_eq!(failed.image_state, ImageState::Normal as i32);
    }
}

/// Bytes the seeded public images take in a region.
fn public_chunks() -> usize {
    let mut seen = std::collections::HashSet::new();
    for def in imagefleet_region::catalogue::PUBLIC_IMAGES {
        for idx in 0..imagefleet_region::seed::chunk_count(def) {
            if let Some(data) = imagefleet_region::seed::chunk(def, idx) {
                seen.insert(imagefleet_chunkstore::ChunkDigest::of(&data));
            }
        }
    }
    seen.len() * imagefleet_chunkstore::CHUNK_SIZE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_chunk_store_refuses_for_space_and_recovers_when_space_is_freed() {
    // Room for the public images and 6 more chunks.
    let chunks = ChunkStore::new(Arc::new(Memory::with_capacity(
        (imagefleet_chunkstore::CHUNK_SIZE * 6 + public_chunks()) as u64,
    )));
    let h = Harness::start(vec![RegionSpec {
        chunks: chunks.clone(),
        ..RegionSpec::memory("ap-guangzhou")
    }])
    .await;
    let mut alice = h.client("ap-guangzhou", 0);
    let mut bob = h.client("ap-guangzhou", 1);
    let base = public_image(&mut alice).await;
    let mine = launch(&mut alice, &base).await;
    let kept = random_bytes(MIB);
    write(&mut alice, &mine, 0, &kept).await.expect("write");
    // Bob takes the rest, one chunk at a time, until he is refused for space.
    let his = launch(&mut bob, &base).await;
    let mut n = 0u64;
    let refused = loop {
        match write(&mut bob, &his, n * MIB as u64, &random_bytes(MIB)).await {
            Ok(()) => n += 1,
            Err(status) => break status,
        }
        assert!(n < 10, "the store never filled");
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(reason(&refused), "ResourceInsufficient.DiskSpace");
    let before = chunk_count(&chunks);
    // Alice: a small write, and one over two chunks, are refused the same way, store nothing.
    for (offset, len) in [(4 * MIB as u64, 4096), (6 * MIB as u64 - 10, MIB)] {
        let status = write(&mut alice, &mine, offset, &random_bytes(len))
            .await
            .expect_err("no room");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason(&status), "ResourceInsufficient.DiskSpace");
    }
    assert_eq!(
        chunk_count(&chunks),
        before,
        "a refused write stored chunks"
    );
    // Reads and launches store nothing: they go on.
    let read = alice
        .read_instance_disk(ReadInstanceDiskRequest {
            instance_id: mine.clone(),
            offset: 0,
            length: MIB as u64,
        })
        .await
        .expect("read")
        .into_inner()
        .data;
    assert!(read == kept, "her data changed");
    launch(&mut alice, &base).await;
    // Bob frees his space: Alice writes again.
    alice
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .expect("quota");
    bob.terminate_instances(TerminateInstancesRequest {
        instance_ids: vec![his],
    })
    .await
    .expect("terminate");
    write(&mut alice, &mine, 4 * MIB as u64, &random_bytes(4096))
        .await
        .expect("a write once space is freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_count_what_an_account_stores_and_runs() {
    let h = Harness::start(vec![RegionSpec::memory("ap-guangzhou")]).await;
    let mut alice = h.client("ap-guangzhou", 0);
    let base = public_image(&mut alice).await;
    let quota = |q: DescribeImageQuotaResponse| (q.instance_count, q.storage_bytes_used);
    let describe = |c: &mut support::Client| {
        let mut c = c.clone();
        async move {
            c.describe_image_quota(DescribeImageQuotaRequest {})
                .await
                .expect("quota")
                .into_inner()
        }
    };
    let q = describe(&mut alice).await;
    assert!(q.instance_quota > 0 && q.storage_bytes_quota > 0, "{q:?}");
    assert_eq!(quota(q), (0, 0));
    let mine = launch(&mut alice, &base).await;
    // Three chunks written, one of them twice, one of them zeros (not stored).
    write(&mut alice, &mine, 0, &random_bytes(2 * MIB))
        .await
        .expect("write");
    write(&mut alice, &mine, 0, &random_bytes(MIB))
        .await
        .expect("write");
    write(&mut alice, &mine, 5 * MIB as u64, &vec![0u8; MIB])
        .await
        .expect("write");
    assert_eq!(quota(describe(&mut alice).await), (1, 2 * MIB as u64));
    // Zeros over a written chunk drop it.
    write(&mut alice, &mine, MIB as u64, &vec![0u8; MIB])
        .await
        .expect("write");
    assert_eq!(quota(describe(&mut alice).await), (1, MIB as u64));
    alice
        .reset_instance(ResetInstanceRequest {
            instance_id: mine.clone(),
            image_id: String::new(),
        })
        .await
        .expect("reset");
    assert_eq!(quota(describe(&mut alice).await), (1, 0));
    alice
        .terminate_instances(TerminateInstancesRequest {
            instance_ids: vec![mine],
        })
        .await
        .expect("terminate");
    assert_eq!(quota(describe(&mut alice).await), (0, 0));
}

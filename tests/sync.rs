//! Cross-region copies (`SyncImages`) between region services running as separate processes:
//! byte-for-byte equality, deduplication, several destinations at once, every rule, the client
//! token, and `kill -9` of either side in the middle of a copy.

mod common;

use common::*;
use imagefleet_proto::region::v1::*;
use tonic::Code;

const MIB: u64 = 1 << 20;
/// Chunks of random data in the images of the tests that stop a copy on the way: enough for
/// the copy to take a while.
const COPY_CHUNKS: u64 = 64;

/// Makes an image in `region` from `platform`'s public image with `data` written at `offset`.
async fn image_with(
    region: &mut Region,
    platform: &str,
    writes: &[(u64, Vec<u8>)],
    name: &str,
) -> (String, String) {
    let public = public_image(region, platform).await;
    let instance = run(region, &public.image_id, 1).await.remove(0);
    for (offset, data) in writes {
        write(region, &instance, *offset, data).await;
    }
    let image_id = region
        .create_image(CreateImageRequest {
            instance_id: instance.clone(),
            image_name: name.into(),
            image_description: format!("{name} for copying"),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(region, &image_id, ImageState::Normal).await;
    (image_id, instance)
}

async fn sync(
    region: &mut Region,
    image_id: &str,
    to: &[&str],
    token: &str,
) -> Result<Vec<SyncedImage>, tonic::Status> {
    region
        .sync_images(SyncImagesRequest {
            image_ids: vec![image_id.into()],
            destination_regions: to.iter().map(|r| r.to_string()).collect(),
            client_token: token.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().image_set)
}

/// The exported bytes of an image as a map offset -> data (non-zero pieces only).
async fn exported(
    region: &mut Region,
    image_id: &str,
) -> (u64, std::collections::BTreeMap<u64, Vec<u8>>) {
    let (size, pieces) = export(region, image_id).await;
    (size, pieces.into_iter().collect())
}

fn progress(image: &Image) -> SyncProgress {
    image
        .sync_progress
        .clone()
        .expect("a copied image reports its transfer")
}

/// Waits for a copy to become `NORMAL` (failing at once if it ends `CREATEFAILED`), checking
/// at every look that its sync percent and chunks done never go backwards; at the end it is at
/// 100% with every chunk done. (100% alone proves nothing: callers compare the bytes too.)
async fn wait_copy_watching_progress(region: &mut Region, image_id: &str) -> Image {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
    let (mut percent, mut chunks_done) = (0, 0);
    loop {
        let image = image(region, image_id).await;
        assert_ne!(
            image.image_state,
            ImageState::Createfailed as i32,
            "the copy failed: {}",
            image.state_reason
        );
        assert!(
            image.sync_percent >= percent && image.sync_percent <= 100,
            "sync percent went from {percent} to {}",
            image.sync_percent
        );
        percent = image.sync_percent;
        if let Some(p) = &image.sync_progress {
            assert!(
                p.chunks_done >= chunks_done,
                "chunks done went from {chunks_done} to {}",
                p.chunks_done
            );
            chunks_done = p.chunks_done;
        }
        if image.image_state == ImageState::Normal as i32 {
            assert_eq!(image.sync_percent, 100);
            let p = progress(&image);
            assert_eq!(
                (p.chunks_done, p.bytes_done),
                (p.chunks_total, p.bytes_total)
            );
            return image;
        }
        assert_eq!(image.image_state, ImageState::Syncing as i32);
        assert!(
            tokio::time::Instant::now() < deadline,
            "{image_id} still copying"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Asserts that a refused `SyncImages` names the destination region and one of the source
/// images: in its `ErrorInfo` metadata (`region`, `image_id`), or else in its message.
#[track_caller]
fn assert_names_the_copy(status: &tonic::Status, region: &str, sources: &[String]) {
    let metadata = error_metadata(status);
    let in_metadata = metadata.get("region").map(String::as_str) == Some(region)
        && metadata
            .get("image_id")
            .is_some_and(|id| sources.contains(id));
    let message = status.message();
    let in_message =
        message.contains(region) && sources.iter().any(|id| message.contains(id.as_str()));
    assert!(
        in_metadata || in_message,
        "the refusal does not name region {region} and a source image of {sources:?}: {status:?}"
    );
}

/// Checks, for `window`, that `region` keeps listing `expected` custom images.
async fn assert_image_count_stays(region: &mut Region, expected: u32, window: std::time::Duration) {
    let end = tokio::time::Instant::now() + window;
    loop {
        assert_eq!(
            custom_image_count(region).await,
            expected,
            "a refused SyncImages created images"
        );
        if tokio::time::Instant::now() >= end {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Three own images in `region`, named `<prefix>-0..2`, with a little data each.
async fn three_images(region: &mut Region, prefix: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..3 {
        let data = random_bytes(4096);
        let (id, _) = image_with(region, "Debian", &[(0, data)], &format!("{prefix}-{n}")).await;
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_are_byte_for_byte_run_concurrently_and_can_be_copied_on() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai", "ap-beijing"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let data = random_bytes(6 * MIB as usize + 777);
    let (source, _) =
        image_with(&mut gz, "Ubuntu", &[(33 * MIB + 5, data.clone())], "app-v1").await;
    let source_image = image(&mut gz, &source).await;

    // Two destinations in one call, running at the same time.
    let copies = sync(&mut gz, &source, &["ap-shanghai", "ap-beijing"], "")
        .await
        .unwrap();
    assert_eq!(copies.len(), 2);
    let (size, source_bytes) = exported(&mut gz, &source).await;
    for copy in &copies {
        assert_eq!(copy.source_image_id, source);
        assert!(copy.image_id.starts_with("img-") && copy.image_id != source);
        let mut dest = cluster.region(&copy.region, 0);
        let syncing = image(&mut dest, &copy.image_id).await;
        assert!(matches!(
            ImageState::try_from(syncing.image_state),
            Ok(ImageState::Syncing | ImageState::Normal)
        ));
        // 100% and every chunk done, reached without going backwards; the bytes are compared
        // below.
        let done = wait_copy_watching_progress(&mut dest, &copy.image_id).await;
        assert_eq!(done.image_source, ImageSource::Sync as i32);
        assert_eq!(done.image_name, "app-v1");
        assert_eq!(done.content_digest, source_image.content_digest);
        assert_eq!(done.virtual_size_bytes, source_image.virtual_size_bytes);
        let lineage = done.lineage.clone().unwrap();
        assert_eq!(
            (
                lineage.parent_image_id.as_str(),
                lineage.parent_region.as_str()
            ),
            (source.as_str(), "ap-guangzhou")
        );
        assert_eq!(
            lineage.ultimate_source_image_id,
            source_image
                .lineage
                .clone()
                .unwrap()
                .ultimate_source_image_id
        );
        // Public-image chunks were already there: only the 7 chunks the write touched travelled.
        let p = progress(&done);
        assert_eq!(p.chunks_transferred, 7, "{p:?}");
        assert_eq!(
            (p.chunks_done, p.bytes_done),
            (p.chunks_total, p.bytes_total)
        );
        // Byte-for-byte equal exports.
        let (dest_size, dest_bytes) = exported(&mut dest, &copy.image_id).await;
        assert_eq!(dest_size, size);
        assert_eq!(dest_bytes, source_bytes);
        // The copy is an image of its own region: launch it and read the data.
        let instance = run(&mut dest, &copy.image_id, 1).await.remove(0);
        assert_eq!(
            read(&mut dest, &instance, 33 * MIB + 5, data.len() as u64).await,
            data
        );
    }

    // Copied on from its new region (under a new name: the first copy has the old one there).
    let in_shanghai = copies
        .iter()
        .find(|c| c.region == "ap-shanghai")
        .unwrap()
        .image_id
        .clone();
    let mut sh = cluster.region("ap-shanghai", 0);
    let onward = sh
        .sync_images(SyncImagesRequest {
            image_ids: vec![in_shanghai.clone()],
            destination_regions: vec!["ap-beijing".into()],
            image_name: "app-v1-onward".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set;
    let mut bj = cluster.region("ap-beijing", 0);
    let onward_image = wait_image_state(&mut bj, &onward[0].image_id, ImageState::Normal).await;
    assert_eq!(onward_image.content_digest, source_image.content_digest);
    assert_eq!(onward_image.lineage.unwrap().parent_region, "ap-shanghai");
    // Beijing already held every chunk (the first copy): nothing travelled.
    assert_eq!(
        progress(&image(&mut bj, &onward[0].image_id).await).chunks_transferred,
        0
    );
    let (_, onward_bytes) = exported(&mut bj, &onward[0].image_id).await;
    assert_eq!(onward_bytes, source_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_slightly_changed_image_sends_only_the_changed_chunks() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let mut sh = cluster.region("ap-shanghai", 0);
    // 100 chunks of random data over the start of a Debian disk.
    let base = random_bytes(100 * MIB as usize);
    let (v1, instance) = image_with(&mut gz, "Debian", &[(0, base)], "data-v1").await;
    let first = sync(&mut gz, &v1, &["ap-shanghai"], "").await.unwrap();
    let first = wait_copy_watching_progress(&mut sh, &first[0].image_id).await;
    let p = progress(&first);
    assert_eq!(p.chunks_total, 100);
    assert_eq!(p.chunks_transferred, 100);
    assert_eq!(p.bytes_transferred, 100 * MIB);
    assert!(
        exported(&mut sh, &first.image_id).await == exported(&mut gz, &v1).await,
        "the first copy's bytes differ from its source's"
    );

    // Change 1% of it (one chunk) and copy the new version: one chunk travels.
    write(&mut gz, &instance, 42 * MIB + 100, &random_bytes(4096)).await;
    let v2 = gz
        .create_image(CreateImageRequest {
            instance_id: instance.clone(),
            image_name: "data-v2".into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(&mut gz, &v2, ImageState::Normal).await;
    let second = sync(&mut gz, &v2, &["ap-shanghai"], "").await.unwrap();
    let second = wait_copy_watching_progress(&mut sh, &second[0].image_id).await;
    let p = progress(&second);
    assert_eq!(p.chunks_total, 100);
    assert_eq!(p.chunks_transferred, 1, "{p:?}");
    assert_eq!(p.bytes_transferred, MIB);
    // The bytes, not only the digests: the copy holds v2 (the changed chunk and the 99 it
    // reused), and differs from the first copy.
    let (v2_size, v2_bytes) = exported(&mut gz, &v2).await;
    let (second_size, second_bytes) = exported(&mut sh, &second.image_id).await;
    assert_eq!(second_size, v2_size);
    assert!(
        second_bytes == v2_bytes,
        "the second copy's bytes differ from v2's"
    );
    assert!(second_bytes != exported(&mut sh, &first.image_id).await.1);
    assert_eq!(
        second.content_digest,
        image(&mut gz, &v2).await.content_digest
    );
    assert_ne!(second.content_digest, first.content_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_is_enforced_with_its_reason_and_refusals_start_nothing() {
    let mut cluster =
        Cluster::start(&["ap-guangzhou", "ap-shanghai", "ap-beijing", "ap-singapore"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (own, instance) = image_with(&mut gz, "CentOS", &[(0, random_bytes(4096))], "rules").await;
    let public = public_image(&mut gz, "CentOS").await;
    let count = |r: &str| {
        let mut client = cluster.region(r, 0);
        async move {
            client
                .describe_image_quota(DescribeImageQuotaRequest {})
                .await
                .unwrap()
                .into_inner()
                .image_num_used
        }
    };

    assert_refused(
        sync(&mut gz, &public.image_id, &["ap-shanghai"], "").await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    assert_refused(
        sync(&mut gz, &own, &["ap-guangzhou"], "").await,
        Code::InvalidArgument,
        "UnsupportedOperation.Region",
    );
    assert_refused(
        sync(&mut gz, &own, &["ap-singapore"], "").await,
        Code::InvalidArgument,
        "UnsupportedOperation.Region",
    );
    assert_refused(
        sync(&mut gz, &own, &["ap-shanghai", "ap-singapore"], "").await,
        Code::InvalidArgument,
        "UnsupportedOperation.Region",
    );
    assert_refused(
        sync(&mut gz, &own, &["ap-nowhere"], "").await,
        Code::InvalidArgument,
        "InvalidRegion.NotFound",
    );
    assert_refused(
        sync(&mut gz, &own, &[], "").await,
        Code::InvalidArgument,
        "MissingParameter",
    );
    assert_refused(
        sync(&mut gz, "img-BAD", &["ap-shanghai"], "").await,
        Code::InvalidArgument,
        "InvalidImageId.Malformed",
    );
    // Another account's image does not exist for you.
    let mut bob = cluster.region("ap-guangzhou", 1);
    assert_refused(
        sync(&mut bob, &own, &["ap-shanghai"], "").await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    // An overseas image goes overseas only.
    let mut sg = cluster.region("ap-singapore", 0);
    let (overseas, _) = image_with(&mut sg, "Debian", &[(0, random_bytes(10))], "overseas").await;
    assert_refused(
        sync(&mut sg, &overseas, &["ap-guangzhou"], "").await,
        Code::InvalidArgument,
        "UnsupportedOperation.Region",
    );

    // A name taken at one destination refuses the whole call: the other destination gets nothing.
    let mut bj = cluster.region("ap-beijing", 0);
    image_with(&mut bj, "Debian", &[], "rules").await;
    let (sh_before, bj_before) = (count("ap-shanghai").await, count("ap-beijing").await);
    assert_refused(
        sync(&mut gz, &own, &["ap-shanghai", "ap-beijing"], "").await,
        Code::AlreadyExists,
        "InvalidImageName.Duplicate",
    );
    assert_eq!(
        (count("ap-shanghai").await, count("ap-beijing").await),
        (sh_before, bj_before)
    );
    // A dry run checks and starts nothing.
    let dry = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![own.clone()],
            destination_regions: vec!["ap-shanghai".into()],
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.image_set.len(), 1);
    assert!(dry.image_set[0].image_id.is_empty());
    assert_eq!(count("ap-shanghai").await, sh_before);

    // Quota at the destination.
    cluster
        .restart_region_with_env("ap-beijing", &[("IMAGEFLEET_IMAGE_QUOTA", "1")])
        .await;
    assert_refused(
        gz.sync_images(SyncImagesRequest {
            image_ids: vec![own.clone()],
            destination_regions: vec!["ap-beijing".into()],
            image_name: "another-name".into(),
            ..Default::default()
        })
        .await,
        Code::ResourceExhausted,
        "ImageQuotaLimitExceeded",
    );

    // A copy in progress cannot be copied on. Its source is stopped right after the call, so
    // that the copy is still SYNCING when it is tried (and stays so until the source is back).
    let _ = instance;
    let (big, _) = image_with(
        &mut gz,
        "CentOS",
        &[(0, random_bytes(64 * MIB as usize))],
        "rules-big",
    )
    .await;
    let copy = sync(&mut gz, &big, &["ap-shanghai"], "")
        .await
        .unwrap()
        .remove(0);
    cluster.kill9_region("ap-guangzhou");
    let mut sh = cluster.region("ap-shanghai", 0);
    let syncing = image(&mut sh, &copy.image_id).await;
    assert_eq!(
        syncing.image_state,
        ImageState::Syncing as i32,
        "the copy was over before its source was stopped: {syncing:?}"
    );
    assert_refused(
        sh.sync_images(SyncImagesRequest {
            image_ids: vec![copy.image_id.clone()],
            destination_regions: vec!["ap-beijing".into()],
            image_name: "onward".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "InvalidImageId.IncorrectState",
    );
    cluster.restart_region("ap-guangzhou").await;
    wait_copy_normal(&mut sh, &copy.image_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_token_makes_retries_return_the_same_copies() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (own, _) = image_with(
        &mut gz,
        "TencentOS",
        &[(0, random_bytes(MIB as usize))],
        "tokened",
    )
    .await;
    let first = sync(&mut gz, &own, &["ap-shanghai"], "retry-me-123")
        .await
        .unwrap();
    let again = sync(&mut gz, &own, &["ap-shanghai"], "retry-me-123")
        .await
        .unwrap();
    assert_eq!(first[0].image_id, again[0].image_id);
    let mut sh = cluster.region("ap-shanghai", 0);
    wait_image_state(&mut sh, &first[0].image_id, ImageState::Normal).await;
    let after = sync(&mut gz, &own, &["ap-shanghai"], "retry-me-123")
        .await
        .unwrap();
    assert_eq!(after[0].image_id, first[0].image_id);
    let quota = sh
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        quota.image_num_used, 1,
        "one copy, however often the call is retried"
    );
    // Without a token (or with another), a new copy is made (which here needs a new name).
    let other = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![own.clone()],
            destination_regions: vec!["ap-shanghai".into()],
            image_name: "tokened-2".into(),
            client_token: "another-token".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set;
    assert_ne!(other[0].image_id, first[0].image_id);
}

/// Waits until the copy has stored at least `fraction` of its chunks; returns its progress.
async fn wait_partly_copied(region: &mut Region, image_id: &str, fraction: f64) -> SyncProgress {
    for _ in 0..20_000 {
        let image = image(region, image_id).await;
        if let Some(p) = image.sync_progress.clone() {
            if p.chunks_total > 0 && p.chunks_done as f64 >= fraction * p.chunks_total as f64 {
                assert_eq!(
                    image.image_state,
                    ImageState::Syncing as i32,
                    "caught too late: {p:?}"
                );
                return p;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("the copy never got going");
}

/// Chunks the destination asks for in one `FetchChunks` call.
const FETCH_BATCH: u64 = 32;
/// Chunks of random data in the big images below (written at offset 0: one chunk per MiB,
/// none of them already in any region).
const BIG_CHUNKS: u64 = 300;

/// Checks that a copy interrupted by `kills` kills did not fetch again what was stored.
///
/// `seen` is the progress read just before the first kill and `on_disk` the number of the
/// copy's chunk files found on the destination's disk at that kill. After it, only the
/// `BIG_CHUNKS - on_disk` missing chunks have to travel. The counter of chunks that travelled
/// may also hold what was recorded between that last look and the kill, and some chunks of a
/// batch in flight at a kill may be fetched again: at most one fetch batch per kill is allowed
/// on top.
#[track_caller]
fn assert_nothing_stored_was_fetched_again(
    seen: &SyncProgress,
    on_disk: u64,
    after: &SyncProgress,
    kills: u64,
) {
    assert!(
        on_disk >= seen.chunks_transferred,
        "chunks reported transferred before the kill are not on disk: {on_disk} files, {seen:?}"
    );
    let travelled_since = after.chunks_transferred - seen.chunks_transferred;
    let allowed = BIG_CHUNKS - on_disk + kills * FETCH_BATCH;
    assert!(
        travelled_since <= allowed,
        "{travelled_since} chunks travelled after the kill, at most {allowed} needed \
         ({on_disk} of {BIG_CHUNKS} were on disk); before {seen:?} after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_destination_mid_copy_resumes_without_resending_what_was_stored() {
    let mut cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (own, _) = image_with(
        &mut gz,
        "Debian",
        &[(0, random_bytes((BIG_CHUNKS * MIB) as usize))],
        "big",
    )
    .await;
    let dest_dir = cluster.region_dir("ap-shanghai");
    let baseline = chunk_files(&dest_dir) as u64;
    let copy = sync(&mut gz, &own, &["ap-shanghai"], "")
        .await
        .unwrap()
        .remove(0);
    let mut sh = cluster.region("ap-shanghai", 0);
    let before = wait_partly_copied(&mut sh, &copy.image_id, 0.2).await;
    cluster.kill9_region("ap-shanghai");
    // The process is gone: what is on disk now is what the kill left.
    let on_disk = chunk_files(&dest_dir) as u64 - baseline;
    cluster.restart_region("ap-shanghai").await;
    let mut sh = cluster.region("ap-shanghai", 0);
    let done = wait_copy_normal(&mut sh, &copy.image_id).await;
    let after = progress(&done);
    assert!(after.attempts >= 2, "{after:?}");
    assert_nothing_stored_was_fetched_again(&before, on_disk, &after, 1);
    // Every chunk once, nothing left over.
    assert_eq!(chunk_files(&dest_dir) as u64, baseline + BIG_CHUNKS);
    assert_eq!(
        done.content_digest,
        image(&mut gz, &own).await.content_digest
    );
    let (_, source_bytes) = exported(&mut gz, &own).await;
    let (_, dest_bytes) = exported(&mut sh, &copy.image_id).await;
    assert!(source_bytes == dest_bytes, "exports differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_source_mid_copy_is_survived() {
    let mut cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (own, _) = image_with(
        &mut gz,
        "Debian",
        &[(0, random_bytes((BIG_CHUNKS * MIB) as usize))],
        "big",
    )
    .await;
    let dest_dir = cluster.region_dir("ap-shanghai");
    let baseline = chunk_files(&dest_dir) as u64;
    let copy = sync(&mut gz, &own, &["ap-shanghai"], "")
        .await
        .unwrap()
        .remove(0);
    let mut sh = cluster.region("ap-shanghai", 0);
    let before = wait_partly_copied(&mut sh, &copy.image_id, 0.2).await;
    cluster.kill9_region("ap-guangzhou");
    // The destination notices, records the failed attempt and keeps trying while the source
    // is down.
    wait_image_until(
        &mut sh,
        &copy.image_id,
        std::time::Duration::from_secs(60),
        "waiting after a failed attempt",
        |i| {
            assert_eq!(
                i.image_state,
                ImageState::Syncing as i32,
                "{}",
                i.state_reason
            );
            i.sync_progress
                .as_ref()
                .is_some_and(|p| !p.last_error.is_empty())
        },
    )
    .await;
    // With the source gone nothing more arrives: what is on disk now is what the kill left.
    let on_disk = chunk_files(&dest_dir) as u64 - baseline;
    // ...and finishes by itself once it is back.
    cluster.restart_region("ap-guangzhou").await;
    let done = wait_copy_normal(&mut sh, &copy.image_id).await;
    let after = progress(&done);
    assert!(after.attempts >= 2, "{after:?}");
    assert!(!after.last_error.is_empty());
    assert_nothing_stored_was_fetched_again(&before, on_disk, &after, 1);
    assert_eq!(chunk_files(&dest_dir) as u64, baseline + BIG_CHUNKS);
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (_, source_bytes) = exported(&mut gz, &own).await;
    let (_, dest_bytes) = exported(&mut sh, &copy.image_id).await;
    assert!(source_bytes == dest_bytes, "exports differ");
}

/// Old code: the copy ended `CREATEFAILED` ("source refused the copy: ... is DELETING" or
/// "... does not exist") and released what it had fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_source_is_deleted_mid_copy_completes_with_the_source_bytes() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (own, _) = image_with(
        &mut gz,
        "Debian",
        &[(0, random_bytes((BIG_CHUNKS * MIB) as usize))],
        "deleted-mid-copy",
    )
    .await;
    let source = image(&mut gz, &own).await;
    let (source_size, source_bytes) = exported(&mut gz, &own).await;
    let copy = sync(&mut gz, &own, &["ap-shanghai"], "")
        .await
        .unwrap()
        .remove(0);
    let mut sh = cluster.region("ap-shanghai", 0);
    wait_partly_copied(&mut sh, &copy.image_id, 0.05).await;
    gz.delete_images(DeleteImagesRequest {
        image_ids: vec![own.clone()],
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while find_image(&mut gz, &own).await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted source is still listed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let done = wait_copy_normal(&mut sh, &copy.image_id).await;
    assert_eq!(done.content_digest, source.content_digest);
    let (copy_size, copy_bytes) = exported(&mut sh, &copy.image_id).await;
    assert_eq!(copy_size, source_size);
    assert!(
        copy_bytes == source_bytes,
        "the copy's bytes differ from the source's"
    );
}

/// Old code: admitted each copy on its own, so the real call made two copies before the third
/// was refused, and the dry run answered OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_over_the_destination_quota_is_refused_whole_and_creates_no_copy() {
    let cluster = Cluster::start_with(
        &["ap-guangzhou", "ap-shanghai"],
        &[(
            "ap-shanghai",
            RegionOptions::env(&[("IMAGEFLEET_IMAGE_QUOTA", "3")]),
        )],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let mut sh = cluster.region("ap-shanghai", 0);
    let sources = three_images(&mut gz, "quota").await;
    // One of the account's 3 images is already used in the destination: 2 more fit, not 3.
    image_with(&mut sh, "Debian", &[], "already-there").await;
    let before = custom_image_count(&mut sh).await;
    assert_eq!(before, 1);
    let request = SyncImagesRequest {
        image_ids: sources.clone(),
        destination_regions: vec!["ap-shanghai".into()],
        ..Default::default()
    };
    let refusal = (Code::ResourceExhausted, "ImageQuotaLimitExceeded");
    assert_refused_whole(&mut gz, &mut sh, request, refusal, &sources).await;
}

/// Old code: admitted each copy on its own, so the real call made the first copy under the
/// name before refusing the second, and the dry run answered OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_giving_several_images_one_name_is_refused_whole_and_creates_no_copy() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let mut sh = cluster.region("ap-shanghai", 0);
    let sources = three_images(&mut gz, "named").await;
    let before = custom_image_count(&mut sh).await;
    assert_eq!(before, 0);
    let request = SyncImagesRequest {
        image_ids: sources.clone(),
        destination_regions: vec!["ap-shanghai".into()],
        image_name: "one-name".into(),
        ..Default::default()
    };
    let refusal = (Code::AlreadyExists, "InvalidImageName.Duplicate");
    assert_refused_whole(&mut gz, &mut sh, request, refusal, &sources).await;
}

/// Sends `request` for real and as a dry run: both are refused with `refusal`, name the copy
/// refused, and no copy appears in ap-shanghai (`sh`), also a few seconds later.
async fn assert_refused_whole(
    gz: &mut Region,
    sh: &mut Region,
    request: SyncImagesRequest,
    refusal: (Code, &str),
    sources: &[String],
) {
    let before = custom_image_count(sh).await;
    for dry_run in [false, true] {
        let status = gz
            .sync_images(SyncImagesRequest {
                dry_run,
                ..request.clone()
            })
            .await
            .map(|r| r.into_inner())
            .expect_err(&format!("dry_run {dry_run}: copies were admitted"));
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            refusal,
            "dry_run {dry_run}: {status:?}"
        );
        assert_eq!(
            custom_image_count(sh).await,
            before,
            "dry_run {dry_run}: the refused call created copies"
        );
        assert_names_the_copy(&status, "ap-shanghai", sources);
    }
    assert_image_count_stays(sh, before, std::time::Duration::from_secs(3)).await;
}

/// Waits until at least `count` more chunk files than `baseline` are in `region_dir` (chunks
/// of a copy arriving), for at most a minute.
async fn wait_chunks_arrived(region_dir: &std::path::Path, baseline: usize, count: usize) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while chunk_files(region_dir) < baseline + count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copy's chunks never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Old code: refused with `InvalidImageId.IncorrectState` (a copy could be deleted only once
/// it had finished or failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_copy_while_it_is_syncing_removes_it_and_reclaims_its_chunks() {
    let mut cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (own, _) = image_with(
        &mut gz,
        "Debian",
        &[(0, random_bytes(COPY_CHUNKS as usize * MIB as usize))],
        "cancelled",
    )
    .await;
    let dest_dir = cluster.region_dir("ap-shanghai");
    let baseline = chunk_files(&dest_dir);
    let copy = sync(&mut gz, &own, &["ap-shanghai"], "")
        .await
        .unwrap()
        .remove(0);
    let mut sh = cluster.region("ap-shanghai", 0);
    // Some chunks arrive, then the source goes: the copy waits, SYNCING.
    wait_chunks_arrived(&dest_dir, baseline, 4).await;
    cluster.kill9_region("ap-guangzhou");
    let syncing = image(&mut sh, &copy.image_id).await;
    assert_eq!(syncing.image_state, ImageState::Syncing as i32);
    assert!(chunk_files(&dest_dir) > baseline);

    sh.delete_images(DeleteImagesRequest {
        image_ids: vec![copy.image_id.clone()],
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    while let Some(left) = find_image(&mut sh, &copy.image_id).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted copy is still listed: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let left = wait_chunk_files(&dest_dir, baseline, std::time::Duration::from_secs(90)).await;
    assert_eq!(left, baseline, "the deleted copy's chunks are reclaimed");
}

/// Old code: the copy stayed SYNCING, but with an empty state reason (the error of each
/// retry went only to `sync_progress.last_error`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_waits_for_its_source_while_it_is_down_and_says_what_it_waits_for() {
    let mut cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (own, _) = image_with(
        &mut gz,
        "Debian",
        &[(0, random_bytes(COPY_CHUNKS as usize * MIB as usize))],
        "patient",
    )
    .await;
    let dest_dir = cluster.region_dir("ap-shanghai");
    let baseline = chunk_files(&dest_dir);
    let copy = sync(&mut gz, &own, &["ap-shanghai"], "")
        .await
        .unwrap()
        .remove(0);
    let mut sh = cluster.region("ap-shanghai", 0);
    wait_chunks_arrived(&dest_dir, baseline, 4).await;
    cluster.kill9_region("ap-guangzhou");
    // For a while (many retries): SYNCING, never CREATEFAILED.
    let window = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut waiting = image(&mut sh, &copy.image_id).await;
    while tokio::time::Instant::now() < window {
        waiting = image(&mut sh, &copy.image_id).await;
        assert_eq!(
            waiting.image_state,
            ImageState::Syncing as i32,
            "with its source down the copy must wait: {}",
            waiting.state_reason
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        !waiting.state_reason.is_empty(),
        "a waiting copy says what it waits for: {waiting:?}"
    );
    cluster.restart_region("ap-guangzhou").await;
    let done = wait_copy_normal(&mut sh, &copy.image_id).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    assert_eq!(
        done.content_digest,
        image(&mut gz, &own).await.content_digest
    );
    let (_, source_bytes) = exported(&mut gz, &own).await;
    let (_, copy_bytes) = exported(&mut sh, &copy.image_id).await;
    assert!(copy_bytes == source_bytes, "exports differ");
}

/// Old code: has no copy deadline (`IMAGEFLEET_COPY_DEADLINE` is ignored): the copy stays
/// SYNCING for as long as the source is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_source_stays_down_past_the_copy_deadline_fails_saying_so() {
    let mut cluster = Cluster::start_with(
        &["ap-guangzhou", "ap-shanghai"],
        &[(
            "ap-shanghai",
            RegionOptions::env(&[("IMAGEFLEET_COPY_DEADLINE", "3s")]),
        )],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let (own, _) = image_with(
        &mut gz,
        "Debian",
        &[(0, random_bytes(COPY_CHUNKS as usize * MIB as usize))],
        "deadline",
    )
    .await;
    let dest_dir = cluster.region_dir("ap-shanghai");
    let baseline = chunk_files(&dest_dir);
    let copy = sync(&mut gz, &own, &["ap-shanghai"], "")
        .await
        .unwrap()
        .remove(0);
    cluster.kill9_region("ap-guangzhou");
    let mut sh = cluster.region("ap-shanghai", 0);
    let syncing = image(&mut sh, &copy.image_id).await;
    assert_eq!(
        syncing.image_state,
        ImageState::Syncing as i32,
        "the copy was over before its source was stopped: {syncing:?}"
    );
    let ended = wait_image_until(
        &mut sh,
        &copy.image_id,
        std::time::Duration::from_secs(45),
        "over (the copy deadline is 3s)",
        |i| i.image_state != ImageState::Syncing as i32,
    )
    .await;
    assert_eq!(
        ended.image_state,
        ImageState::Createfailed as i32,
        "{ended:?}"
    );
    assert!(
        ended.state_reason.to_lowercase().contains("deadline"),
        "the reason names the deadline: {}",
        ended.state_reason
    );
    let left = wait_chunk_files(&dest_dir, baseline, std::time::Duration::from_secs(90)).await;
    assert_eq!(left, baseline, "the failed copy's chunks are released");
}

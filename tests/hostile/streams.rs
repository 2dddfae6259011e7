//! Fair share of a region's streams: one account opening export streams and never reading
//! them must not freeze the region for another account nor grow its memory without bound;
//! a reader that stalls is cut off and gives its place back; per-account limits on streams,
//! exports and copies answer `RESOURCE_EXHAUSTED` with a `LimitExceeded.*` reason.

use crate::common::*;
use futures::StreamExt;
use imagefleet_proto::region::v1::*;
use std::time::{Duration, Instant};
use tonic::Code;

const GZ: &str = "ap-guangzhou";
const SH: &str = "ap-shanghai";
const MIB: usize = 1 << 20;

/// The resident memory of a process, in bytes (`VmRSS` of `/proc/<pid>/status`).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

fn region_pid(cluster: &Cluster, region: &str) -> u32 {
    cluster.regions[region].pid().expect("the region runs")
}

/// A running instance of the client's account, launched from a public image.
async fn instance(region: &mut Region) -> String {
    let base = public_image(region, "Debian").await;
    run(region, &base.image_id, 1).await.remove(0)
}

/// A `NORMAL` image of the client's account holding `bytes` of random data from offset 0.
async fn image_with_data(region: &mut Region, name: &str, bytes: usize) -> String {
    let instance = instance(region).await;
    write(region, &instance, 0, &random_bytes(bytes)).await;
    let image_id = region
        .create_image(CreateImageRequest {
            instance_id: instance,
            image_name: name.into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(region, &image_id, ImageState::Normal).await;
    image_id
}

fn export_request(image_id: &str) -> ExportImageRequest {
    ExportImageRequest {
        image_id: image_id.into(),
        format: ExportFormat::Raw as i32,
    }
}

/// Reads an export stream to its end: the bytes it carried, or the status it ended with.
async fn drain(
    mut stream: tonic::Streaming<ExportImageChunk>,
) -> Result<usize, (usize, tonic::Status)> {
    let mut bytes = 0;
    while let Some(piece) = stream.next().await {
        match piece {
            Ok(piece) => bytes += piece.data.len(),
            Err(status) => return Err((bytes, status)),
        }
    }
    Ok(bytes)
}

/// One round of another account's everyday calls on the region, each under a 1 s deadline:
/// the calls that did not answer in time or failed, with how long each took.
async fn everyday_calls(
    region: &mut Region,
    base_image: &str,
    instance_id: &str,
) -> Vec<(&'static str, Duration, String)> {
    let second = Duration::from_secs(1);
    let mut failures = Vec::new();
    let mut note = |what: &'static str, started: Instant, outcome: Result<(), String>| {
        if let Err(e) = outcome {
            failures.push((what, started.elapsed(), e));
        }
    };
    fn within<T>(
        outcome: Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>,
    ) -> Result<(), String> {
        match outcome {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!("{:?} {}", status.code(), status.message())),
            Err(_) => Err("no answer within 1 s".into()),
        }
    }

    let started = Instant::now();
    let outcome = tokio::time::timeout(
        second,
        region.describe_images(DescribeImagesRequest::default()),
    )
    .await;
    note("DescribeImages", started, within(outcome));

    let started = Instant::now();
    let outcome = tokio::time::timeout(
        second,
        region.run_instances(RunInstancesRequest {
            image_id: base_image.into(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 1,
            ..Default::default()
        }),
    )
    .await;
    note("RunInstances", started, within(outcome));

    let started = Instant::now();
    let outcome = tokio::time::timeout(
        second,
        region.write_instance_disk(WriteInstanceDiskRequest {
            instance_id: instance_id.into(),
            offset: 4096,
            data: vec![7u8; 4096],
        }),
    )
    .await;
    note("WriteInstanceDisk", started, within(outcome));

    let started = Instant::now();
    let outcome = tokio::time::timeout(
        second,
        region.read_instance_disk(ReadInstanceDiskRequest {
            instance_id: instance_id.into(),
            offset: 4096,
            length: 4096,
        }),
    )
    .await;
    note("ReadInstanceDisk", started, within(outcome));
    failures
}

/// What became of an attacker's attempts to open streams.
#[derive(Default, Debug)]
struct Opened {
    held: Vec<tonic::Streaming<ExportImageChunk>>,
    refused: Vec<tonic::Status>,
    no_answer: usize,
}

/// Opens `count` exports of `image_id` over `clients` (one connection each), all at once, and
/// never reads them; an open that gets no answer in 5 s counts as `no_answer`.
async fn open_stalled_exports(clients: Vec<Region>, image_id: &str, count: usize) -> Opened {
    let opens =
        (0..count).map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = export_request(image_id);
            async move {
                tokio::time::timeout(Duration::from_secs(5), client.export_image(request)).await
            }
        });
    let mut opened = Opened::default();
    for outcome in futures::future::join_all(opens).await {
        match outcome {
            Ok(Ok(response)) => opened.held.push(response.into_inner()),
            Ok(Err(status)) => opened.refused.push(status),
            Err(_) => opened.no_answer += 1,
        }
    }
    opened
}

/// Defect: each stalled `ExportImage` stream parked a blocking thread in `blocking_send` with
/// ~7 MiB buffered; ~530 of them froze every account's calls to the region and took its
/// memory from 91 MiB to 3.6 GiB.
///
/// 600 exports of a 32 MiB image, opened at once over 10 connections and never read: the
/// account gets at most its 8 concurrent exports (the default), the rest are refused with
/// `LimitExceeded.ConcurrentExports`; meanwhile another account's describe, launch, disk write
/// and disk read each answer within 1 s, and the region's resident memory stays within
/// `RSS_GROWTH_BOUND` of what it was before the attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_exports_neither_freeze_the_region_nor_fill_its_memory() {
    /// Measured: before the fix the region grew by ~1.1 GiB within the test's first seconds
    /// (~7 MiB per stalled stream, 165 streams open, the rest unanswered); with it, by 27 MiB
    /// (8 stalled exports of ~3 MiB each, 592 refusals). The bound leaves ~4x margin.
    const RSS_GROWTH_BOUND: u64 = 128 << 20;
    const ATTACK: usize = 600;
    const DEFAULT_MAX_EXPORTS: usize = 8;

    // No stream is cut off during the test: the stall timeout is not what saves the region.
    let cluster = Cluster::start_with(
        &[GZ],
        &[(
            GZ,
            RegionOptions::env(&[("IMAGEFLEET_STREAM_STALL_TIMEOUT", "10m")]),
        )],
    )
    .await;
    let (attacker, victim) = (&cluster.accounts[0], &cluster.accounts[1]);
    let mut a = cluster.region_as(GZ, attacker);
    let mut b = cluster.region_as(GZ, victim);
    let image_id = image_with_data(&mut a, "big", 32 * MIB).await;
    let base = public_image(&mut b, "Debian").await.image_id;
    let b_instance = instance(&mut b).await;
    assert!(everyday_calls(&mut b, &base, &b_instance).await.is_empty());

    let pid = region_pid(&cluster, GZ);
    let before = rss_bytes(pid);
    let clients = (0..10).map(|_| cluster.region_as(GZ, attacker)).collect();
    let opened = open_stalled_exports(clients, &image_id, ATTACK).await;

    // The attack is under way: the victim's calls, and the region's memory, several times.
    let mut slow = Vec::new();
    let mut peak = rss_bytes(pid);
    for _ in 0..5 {
        slow.extend(everyday_calls(&mut b, &base, &b_instance).await);
        peak = peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    peak = peak.max(rss_bytes(pid));
    let growth = peak.saturating_sub(before);
    eprintln!(
        "region RSS before {} MiB, peak {} MiB (+{} MiB) with {} streams held, {} refused, {} unanswered",
        before >> 20,
        peak >> 20,
        growth >> 20,
        opened.held.len(),
        opened.refused.len(),
        opened.no_answer
    );

    assert!(
        slow.is_empty(),
        "another account's calls were held up by the stalled streams: {slow:?}"
    );
    assert!(
        growth <= RSS_GROWTH_BOUND,
        "the region grew by {} MiB under {} stalled streams (bound {} MiB)",
        growth >> 20,
        opened.held.len(),
        RSS_GROWTH_BOUND >> 20
    );
    assert_eq!(opened.no_answer, 0, "every open is answered at once");
    assert!(
        opened.held.len() <= DEFAULT_MAX_EXPORTS,
        "{} exports open at once for one account",
        opened.held.len()
    );
    assert_eq!(opened.refused.len(), ATTACK - opened.held.len());
    for status in &opened.refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            reason(status),
            "LimitExceeded.ConcurrentExports",
            "{status:?}"
        );
        assert_eq!(
            error_metadata(status).get("limit").map(String::as_str),
            Some("8"),
            "{status:?}"
        );
    }

    // The attacker's own streams still work once read.
    let held = opened.held;
    let expected = 32 * MIB;
    let first = held.into_iter().next().expect("a stream was opened");
    assert_eq!(drain(first).await.map_err(|(_, s)| s).unwrap(), expected);
}

/// Defect: a stream whose reader stopped reading was kept forever. With a 2 s stall timeout
/// and one export per account: a second export is refused while the first is stalled; the
/// stalled one is cut off (its reader, once it reads again, gets what was sent and then
/// `DEADLINE_EXCEEDED` `RequestTimeout.SlowReader`), and its place is given back, so a new
/// export starts and, read steadily, completes. Another account is not limited by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_reader_is_cut_off_and_gives_its_place_back() {
    let cluster = Cluster::start_with(
        &[GZ],
        &[(
            GZ,
            RegionOptions::env(&[
                ("IMAGEFLEET_STREAM_STALL_TIMEOUT", "2s"),
                ("IMAGEFLEET_MAX_EXPORTS_PER_ACCOUNT", "1"),
            ]),
        )],
    )
    .await;
    let mut a = cluster.region(GZ, 0);
    let mut b = cluster.region(GZ, 1);
    let image_id = image_with_data(&mut a, "big", 16 * MIB).await;
    let b_image = image_with_data(&mut b, "small", 8 * MIB).await;

    let started = Instant::now();
    let stalled = a
        .export_image(export_request(&image_id))
        .await
        .unwrap()
        .into_inner();
    let refused = a.export_image(export_request(&image_id)).await;
    assert_refused(
        refused,
        Code::ResourceExhausted,
        "LimitExceeded.ConcurrentExports",
    );
    // Another account's exports are its own.
    let other = b.export_image(export_request(&b_image)).await.unwrap();
    assert_eq!(drain(other.into_inner()).await.unwrap(), 8 * MIB);

    // Once the stalled stream is cut off, its place is free again.
    let replacement = loop {
        match a.export_image(export_request(&image_id)).await {
            Ok(response) => break response.into_inner(),
            Err(status) => {
                assert_eq!(
                    reason(&status),
                    "LimitExceeded.ConcurrentExports",
                    "{status:?}"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "the stalled stream still holds its place after {:?}",
                    started.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the place was given back before the stall timeout"
    );

    let (sent, status) = drain(stalled)
        .await
        .expect_err("the stalled stream ends cut off, not complete");
    assert!(sent < 16 * MIB, "{sent} bytes arrived of a cut-off stream");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "RequestTimeout.SlowReader", "{status:?}");

    // A reader that keeps reading is not cut off, however long the whole export takes.
    let mut stream = replacement;
    let mut bytes = 0;
    while let Some(piece) = stream.next().await {
        bytes += piece.expect("a steady reader is not cut off").data.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(bytes, 16 * MIB);
}

/// Defect: an account could open any number of streams and run any number of copies into a
/// region at once. With 2 streams and 3 exports per account, the third export is refused
/// `LimitExceeded.ConcurrentStreams`; with 1 copy in flight per account in the destination, a
/// call copying two images there is refused whole with `LimitExceeded.ConcurrentCopies`
/// (naming the image, the region and the limit, nothing admitted), while one image copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_on_streams_and_copies_answer_resource_exhausted() {
    let cluster = Cluster::start_with(
        &[GZ, SH],
        &[
            (
                GZ,
                RegionOptions::env(&[
                    ("IMAGEFLEET_MAX_STREAMS_PER_ACCOUNT", "2"),
                    ("IMAGEFLEET_MAX_EXPORTS_PER_ACCOUNT", "3"),
                    ("IMAGEFLEET_STREAM_STALL_TIMEOUT", "10m"),
                ]),
            ),
            (
                SH,
                RegionOptions::env(&[("IMAGEFLEET_MAX_COPIES_PER_ACCOUNT", "1")]),
            ),
        ],
    )
    .await;
    let mut gz = cluster.region(GZ, 0);
    let mut sh = cluster.region(SH, 0);
    // Larger than a stream's HTTP/2 window: an unread export stays open.
    let first = image_with_data(&mut gz, "first", 16 * MIB).await;
    let second = image_with_data(&mut gz, "second", 8 * MIB).await;

    let one = gz.export_image(export_request(&first)).await.unwrap();
    let two = gz.export_image(export_request(&first)).await.unwrap();
    let three = gz.export_image(export_request(&first)).await;
    let status = three.expect_err("a third stream is over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        reason(&status),
        "LimitExceeded.ConcurrentStreams",
        "{status:?}"
    );
    assert_eq!(error_metadata(&status).get("limit").unwrap(), "2");
    // A stream dropped by its reader gives its place back.
    drop(one);
    let mut three = None;
    for _ in 0..50 {
        if let Ok(r) = gz.export_image(export_request(&first)).await {
            three = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let three = three.expect("a dropped stream gives its place back");
    assert_eq!(drain(two.into_inner()).await.unwrap(), 16 * MIB);
    assert_eq!(drain(three.into_inner()).await.unwrap(), 16 * MIB);

    let refused = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![first.clone(), second.clone()],
            destination_regions: vec![SH.into()],
            ..Default::default()
        })
        .await;
    let status = refused.expect_err("two copies in flight are over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        reason(&status),
        "LimitExceeded.ConcurrentCopies",
        "{status:?}"
    );
    let metadata = error_metadata(&status);
    assert_eq!(metadata.get("region").map(String::as_str), Some(SH));
    assert_eq!(metadata.get("limit").map(String::as_str), Some("1"));
    assert_eq!(metadata.get("image_id"), Some(&first));
    assert_eq!(custom_image_count(&mut sh).await, 0, "nothing was admitted");

    let copied = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![first.clone()],
            destination_regions: vec![SH.into()],
            ..Default::default()
        })
        .await
        .expect("one copy is within the limit")
        .into_inner();
    wait_copy_normal(&mut sh, &copied.image_set[0].image_id).await;
}

/// Defect: under `imaged dev` the services shared one process's threads, and the region's
/// stalled streams held up the catalog too. 600 stalled exports on a region of `imaged dev`
/// (default limits) leave the catalog, and the region for another account, answering every
/// call within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_imaged_dev_a_stalled_region_does_not_hold_up_the_catalog() {
    use imagefleet_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
    use imagefleet_proto::catalog::v1::DescribeRegionsRequest;
    use imagefleet_rpc::auth::Credentials;
    use imagefleet_rpc::client::{region_scope, signed_channel, CATALOG_SCOPE};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = crate::common::dev::start_dev_with_env(
        &data,
        GZ,
        &[("IMAGEFLEET_STREAM_STALL_TIMEOUT", "10m")],
    );
    let cluster = imagefleet_rpc::cluster::ClusterFile::load(&data.join("cluster.json")).unwrap();
    let url = cluster.regions[0].endpoint.clone();
    let credentials = |who: usize| Credentials {
        secret_id: cluster.accounts[who].secret_id.clone(),
        secret_key: cluster.accounts[who].secret_key.clone(),
    };
    let region_as = |who: usize| -> Region {
        Region::new(signed_channel(&url, credentials(who), &region_scope(GZ)).unwrap())
            .max_decoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES)
    };
    let mut catalog = CatalogServiceClient::new(
        signed_channel(&cluster.catalog.endpoint, credentials(1), CATALOG_SCOPE).unwrap(),
    );
    let mut a = region_as(0);
    let mut b = region_as(1);
    let image_id = image_with_data(&mut a, "big", 32 * MIB).await;
    let base = public_image(&mut b, "Debian").await.image_id;
    let b_instance = instance(&mut b).await;

    let opened =
        open_stalled_exports((0..10).map(|_| region_as(0)).collect(), &image_id, 600).await;
    let mut slow = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(1),
            catalog.describe_regions(DescribeRegionsRequest {}),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                slow.push(("DescribeRegions", started.elapsed(), format!("{status:?}")))
            }
            Err(_) => slow.push((
                "DescribeRegions",
                started.elapsed(),
                "no answer within 1 s".into(),
            )),
        }
        slow.extend(everyday_calls(&mut b, &base, &b_instance).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "imaged dev: {} streams held, {} refused, {} unanswered",
        opened.held.len(),
        opened.refused.len(),
        opened.no_answer
    );
    drop(opened);
    // SIGTERM: `imaged dev` stops its Redis child too.
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        slow.is_empty(),
        "calls held up under imaged dev while a region's streams stalled: {slow:?}"
    );
}

//! Cluster benchmarks (`BENCH.md`): `cargo bench --bench cluster`.
//!
//! Starts real processes (Redis, catalog, sharing, a region) from the release build and prints
//! one line per figure, `<name>: <ratio> (<ours> vs <baseline>) [target <target>]`. The load
//! generator (this process) and the services share the machine's cores.
//!
//! - launch_100: wall time of `RunInstances` with count 100 from a 1 GiB image until all 100
//!   are `RUNNING`, against 1 second.
//! - launch_bytes: bytes the region process wrote to storage during those launches
//!   (`/proc/<pid>/io` `write_bytes`), against 100 x 1 MiB.
//! - copy_full: wall time of a cross-region copy of a 1 GiB image of random bytes, from the
//!   call to the destination image being `NORMAL`, against `dd if=<same bytes> of=<file on the
//!   same disk> bs=1M conv=fsync`.
//! - copy_delta_bytes / copy_delta_time: bytes of chunk data sent, and wall time, copying an
//!   image that differs in 1% of its chunks from one the destination holds, against the image's
//!   size and copy_full's time.
//! - copy_wan: throughput of that copy (1 GiB of random bytes) over an emulated link of
//!   100 ms RTT and 500 Mbit/s between the two regions (`SetLinks`), against the link's rate.
//! - copy_rss: peak RSS (VmHWM, reset before the copy) of either region service during
//!   copy_full, against 100 MiB.
//! - share_rps: share checks per second (signed `CheckShare` calls to the sharing service, the
//!   check every launch of a shared image makes) made as the region makes them, through
//!   `imagefleet_region::ShareChecker` and its one channel, at 50 concurrent callers, against
//!   `redis-benchmark` unpipelined GETs with 50 clients on the same Redis.
//! - noisy_neighbour: account A's p99 latency of `DescribeInstances` (default page) and
//!   `DescribeImageQuota` in a region where account B holds 200,000 instances and runs 8
//!   concurrent readers, against A's p99 for the same calls in the same region before B
//!   arrived; the figure is the larger of the two ratios. A's calls alternate, one at a time:
//!   200 warm-up calls (at most 10 s), then 2000 measured ones (at most 10 minutes).
//! - import_1g: wall time of an `UploadImage` of a 1 GiB qcow2 of random bytes, from the call
//!   to its answer (the image `NORMAL`: inspected, chunked, hashed, stored durably), against
//!   `cp` of the same file to the same disk plus `sync`. The image is deleted between rounds
//!   (its chunks reclaimed), so every round stores every chunk.
//! - describe_rps: signed `DescribeImages` calls per second to a region (one image by id, and a
//!   page of 20 images) at 64 concurrent callers on 4 connections, each against a bare tonic
//!   unary echo server built here, driven by the same load generator with the same concurrency:
//!   it answers every request with the same response the region gave (one image, or the page
//!   of 20, decoded and re-encoded by prost as any tonic server does), without signing, store
//!   or paging; the figure is the lower of the two ratios. So the figure is what the region's
//!   work costs over moving the same messages through tonic. The ratio against the
//!   `grpc.health.v1` check (a few bytes each way) is printed too, for comparison with earlier
//!   runs.
//! - export_1g: wall time of an `ExportImage` of that image as QCOW2, written to a local file
//!   as a client does, against `qemu-img convert -O qcow2` of the same raw bytes on the same
//!   disk.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use imagefleet_proto::region::v1::*;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const ROUNDS: usize = 5;
/// Rounds of copy_wan (each moves 1 GiB over the emulated link, about 20 s).
const WAN_ROUNDS: usize = 2;

fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines().find_map(|l| {
                l.strip_prefix("write_bytes:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn report(name: &str, ratio: f64, ours: &str, baseline: &str, target: &str) {
    println!("{name}: {ratio:.3} ({ours} vs {baseline}) [target {target}]");
}

async fn wait_running(region: &mut Region, ids: &[String]) {
    loop {
        let mut running = 0;
        for batch in ids.chunks(100) {
            let page = region
                .describe_instances(DescribeInstancesRequest {
                    instance_ids: batch.to_vec(),
                    limit: 100,
                    ..Default::default()
                })
                .await
                .expect("describe instances");
            running += page
                .into_inner()
                .instance_set
                .iter()
                .filter(|i| i.instance_state == InstanceState::Running as i32)
                .count();
        }
        if running == ids.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A 1 GiB custom image holding `content` (1 GiB), made the way a user would: launch with a
/// 1 GiB system disk, write, create. Returns the image and the instance.
async fn one_gib_image(
    region: &mut Region,
    content: &std::path::Path,
    name: &str,
) -> (String, String) {
    use std::io::Read;
    let debian = public_image(region, "Debian").await;
    let instance = region
        .run_instances(RunInstancesRequest {
            image_id: debian.image_id.clone(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 1,
            system_disk_size_gib: 1,
            ..Default::default()
        })
        .await
        .expect("run")
        .into_inner()
        .instance_id_set
        .remove(0);
    wait_running(region, std::slice::from_ref(&instance)).await;
    let mut file = std::fs::File::open(content).expect("content file");
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..1024u64 {
        file.read_exact(&mut buf).expect("read content");
        region
            .write_instance_disk(WriteInstanceDiskRequest {
                instance_id: instance.clone(),
                offset: i * MIB,
                data: buf.clone(),
            })
            .await
            .expect("write");
    }
    (create_image(region, &instance, name).await, instance)
}

async fn create_image(region: &mut Region, instance: &str, name: &str) -> String {
    let image_id = region
        .create_image(CreateImageRequest {
            instance_id: instance.into(),
            image_name: name.into(),
            image_description: String::new(),
        })
        .await
        .expect("create image")
        .into_inner()
        .image_id;
    wait_image_state(region, &image_id, ImageState::Normal).await;
    image_id
}

/// CPU seconds (user, system) a process has used.
fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Resets a process's peak RSS (VmHWM) to its current RSS.
fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

const COPY_ROUNDS: usize = 3;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `dd if=<content> of=<target> bs=1M conv=fsync`: seconds.
fn dd(content: &std::path::Path, target: &std::path::Path) -> f64 {
    let start = Instant::now();
    let status = std::process::Command::new("dd")
        .arg(format!("if={}", content.display()))
        .arg(format!("of={}", target.display()))
        .args(["bs=1M", "conv=fsync", "status=none"])
        .status()
        .expect("dd runs");
    let secs = start.elapsed().as_secs_f64();
    assert!(status.success(), "dd failed");
    let _ = std::fs::remove_file(target);
    secs
}

/// Copies `image` from gz to sh and waits for NORMAL; returns (seconds, sync progress, copy).
async fn timed_copy(cluster: &Cluster, image: &str) -> (f64, SyncProgress, String) {
    let mut gz = cluster.region("ap-guangzhou", 0);
    let mut sh = cluster.region("ap-shanghai", 0);
    let start = Instant::now();
    let copy = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![image.into()],
            destination_regions: vec!["ap-shanghai".into()],
            ..Default::default()
        })
        .await
        .expect("sync")
        .into_inner()
        .image_set
        .remove(0);
    loop {
        let image = common::image(&mut sh, &copy.image_id).await;
        if image.image_state == ImageState::Normal as i32 {
            return (
                start.elapsed().as_secs_f64(),
                image.sync_progress.unwrap_or_default(),
                copy.image_id,
            );
        }
        assert_ne!(
            image.image_state,
            ImageState::Createfailed as i32,
            "copy failed: {}",
            image.state_reason
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// copy_wan: a 1 GiB copy of random bytes between two regions over an emulated link of
/// 100 ms RTT and 500 Mbit/s (set on both regions through the operators' `SetLinks`), as
/// throughput against the link's rate. The time runs from the call to the destination image
/// being `NORMAL`.
/// A file of 1 GiB of random bytes in the cluster's directory.
fn random_gib_file(cluster: &Cluster) -> std::path::PathBuf {
    use std::io::Write;
    let content = cluster.dir.path().join("content.bin");
    let mut file = std::fs::File::create(&content).expect("content file");
    for _ in 0..1024 {
        file.write_all(&random_bytes(MIB as usize))
            .expect("write content");
    }
    content
}

async fn copy_wan() {
    use imagefleet_proto::region::v1::region_internal_service_client::RegionInternalServiceClient;
    const RATE_MBIT: f64 = 500.0;
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let content = random_gib_file(&cluster);
    let (image, _) = one_gib_image(&mut gz, &content, "bench-copy-wan").await;
    for region in ["ap-guangzhou", "ap-shanghai"] {
        let channel = imagefleet_rpc::client::signed_channel(
            &cluster.region_url(region),
            cluster.service_credentials(),
            &imagefleet_rpc::client::region_scope(region),
        )
        .expect("channel");
        RegionInternalServiceClient::new(channel)
            .set_links(SetLinksRequest {
                links: vec![format!(
                    "ap-guangzhou,ap-shanghai=rtt:100ms,rate:{RATE_MBIT}mbit"
                )],
            })
            .await
            .expect("set links");
    }
    let mut sh = cluster.region("ap-shanghai", 0);
    let mut rates = Vec::new();
    for round in 0..WAN_ROUNDS {
        let (secs, progress, copy_id) = timed_copy(&cluster, &image).await;
        let mbit = progress.bytes_transferred as f64 * 8.0 / 1e6 / secs;
        println!(
            "  round {}: copy {secs:.3}s ({} chunks, {mbit:.0} Mbit/s)",
            round + 1,
            progress.chunks_transferred
        );
        assert_eq!(
            progress.bytes_transferred,
            1024 * MIB,
            "every round copies everything"
        );
        rates.push(mbit);
        if round + 1 < WAN_ROUNDS {
            sh.delete_images(DeleteImagesRequest {
                image_ids: vec![copy_id],
            })
            .await
            .expect("delete the copy");
        }
    }
    let mbit = median(&mut rates);
    report(
        "copy_wan",
        mbit / RATE_MBIT,
        &format!("{mbit:.0} Mbit/s"),
        &format!("link {RATE_MBIT:.0} Mbit/s, 100 ms RTT"),
        ">= 0.8",
    );
}

async fn copy() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let content = random_gib_file(&cluster);
    let (image, instance) = one_gib_image(&mut gz, &content, "bench-copy-1g").await;
    let pids: Vec<u32> = ["ap-guangzhou", "ap-shanghai"]
        .iter()
        .filter_map(|r| cluster.regions[*r].pid())
        .collect();
    if std::env::var_os("IMAGEFLEET_BENCH_PAUSE").is_some() {
        // Time to attach a profiler to the region processes.
        println!("  region pids {pids:?}; copying in 5s");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // Rounds of: the baseline (the same bytes written durably to the same disk), then a full
    // copy, then the copy deleted so that the next round copies everything again.
    let mut sh = cluster.region("ap-shanghai", 0);
    let mut dd_times = Vec::new();
    let mut copy_times = Vec::new();
    let mut rss = 0;
    let mut full = SyncProgress::default();
    for round in 0..COPY_ROUNDS {
        dd_times.push(dd(&content, &cluster.dir.path().join("dd.out")));
        pids.iter().copied().for_each(reset_hwm);
        let split_before: Vec<(f64, f64)> = pids.iter().map(|p| cpu_split(*p)).collect();
        let (secs, progress, copy_id) = timed_copy(&cluster, &image).await;
        rss = rss.max(pids.iter().map(|p| vm_hwm(*p)).max().unwrap_or(0));
        copy_times.push(secs);
        println!(
            "  round {}: dd {:.3}s, copy {secs:.3}s ({} chunks, {:.0} MiB/s)",
            round + 1,
            dd_times[round],
            progress.chunks_transferred,
            progress.bytes_transferred as f64 / MIB as f64 / secs
        );
        for ((name, p), (u, s)) in ["source", "destination"]
            .iter()
            .zip(&pids)
            .zip(&split_before)
        {
            let (u2, s2) = cpu_split(*p);
            println!("    {name} CPU: user {:.2}s system {:.2}s", u2 - u, s2 - s);
        }
        full = progress;
        if round + 1 < COPY_ROUNDS {
            sh.delete_images(DeleteImagesRequest {
                image_ids: vec![copy_id],
            })
            .await
            .expect("delete the copy");
        }
    }
    let dd_secs = median(&mut dd_times);
    let full_secs = median(&mut copy_times);
    assert_eq!(
        full.bytes_transferred,
        1024 * MIB,
        "every round copies everything"
    );
    report(
        "copy_full",
        full_secs / dd_secs,
        &format!("{full_secs:.3}s"),
        &format!("dd {dd_secs:.3}s"),
        "<= 1.3",
    );

    // 1% of the chunks (10 of 1024) change; the new version is copied to where the old one is.
    for i in 0..10u64 {
        gz.write_instance_disk(WriteInstanceDiskRequest {
            instance_id: instance.clone(),
            offset: (i * 101 + 7) * MIB + 512,
            data: random_bytes(4096),
        })
        .await
        .expect("write");
    }
    let changed = create_image(&mut gz, &instance, "bench-copy-1g-v2").await;
    let (delta_secs, delta, _) = timed_copy(&cluster, &changed).await;
    let size = 1024 * MIB;
    report(
        "copy_delta_bytes",
        delta.bytes_transferred as f64 / size as f64,
        &format!("{} B", delta.bytes_transferred),
        &format!("{size} B"),
        "<= 0.03",
    );
    report(
        "copy_delta_time",
        delta_secs / full_secs,
        &format!("{delta_secs:.3}s"),
        &format!("copy_full {full_secs:.3}s"),
        "<= 0.10",
    );
    report(
        "copy_rss",
        rss as f64 / (100 * MIB) as f64,
        &format!("{:.1} MiB", rss as f64 / MIB as f64),
        "100 MiB",
        "<= 1.0",
    );
}

async fn launch(cluster: &Cluster, region: &mut Region, image_id: &str) {
    let pid = cluster.regions["ap-guangzhou"].pid().expect("region pid");
    let mut times = Vec::new();
    let mut bytes = Vec::new();
    for _ in 0..ROUNDS {
        let before = write_bytes(pid);
        let start = Instant::now();
        let ids = region
            .run_instances(RunInstancesRequest {
                image_id: image_id.into(),
                instance_type: "S5.MEDIUM4".into(),
                instance_count: 100,
                ..Default::default()
            })
            .await
            .expect("run instances")
            .into_inner()
            .instance_id_set;
        wait_running(region, &ids).await;
        times.push(start.elapsed().as_secs_f64());
        // Let the page cache write back what the launch dirtied, then count it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        bytes.push(write_bytes(pid).saturating_sub(before));
    }
    times.sort_by(f64::total_cmp);
    bytes.sort();
    let median = times[ROUNDS / 2];
    println!(
        "  launch_100 rounds: min {:.3}s  median {:.3}s  max {:.3}s ({} rounds of 100)",
        times[0],
        median,
        times[ROUNDS - 1],
        ROUNDS
    );
    report(
        "launch_100",
        median,
        &format!("{median:.3}s"),
        "1s",
        "<= 1.0",
    );
    let median_bytes = bytes[ROUNDS / 2];
    report(
        "launch_bytes",
        median_bytes as f64 / (100 * MIB) as f64,
        &format!("{median_bytes} B"),
        &format!("{} B", 100 * MIB),
        "<= 1.0",
    );
}

async fn share_rps() {
    use imagefleet_proto::sharing::v1::SetImageOwnerRequest;
    const REGION: &str = "ap-guangzhou";
    let cluster = Cluster::start(&[]).await;
    // The check as the region's launch path makes it: through the region's own share checker
    // and its one channel to the sharing service, built as `Region::open` builds it.
    let checker = imagefleet_region::ShareChecker::connect(
        &cluster.sharing.url(),
        imagefleet_region::service_credentials(REGION, &cluster.service_key),
    )
    .expect("share checker");
    checker
        .client()
        .set_image_owner(SetImageOwnerRequest {
            image_id: "img-bench001".into(),
            owner_account_id: cluster.accounts[0].account_id.clone(),
        })
        .await
        .expect("owner");
    let bob = cluster.accounts[1].account_id.clone();

    // Baseline: redis-benchmark against the same Redis.
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-p",
            &cluster.redis.port.to_string(),
            "-t",
            "get",
            "-n",
            "200000",
            "-c",
            "50",
            "-q",
        ])
        .output()
        .expect("redis-benchmark runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let baseline: f64 = text
        .split(['\r', '\n'])
        .filter_map(|l| l.trim().strip_prefix("GET: "))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|v| v.parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no GET figure in redis-benchmark output: {text}"));

    const CALLERS: usize = 50;
    let run = |secs: f64| {
        let checker = checker.clone();
        let bob = bob.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let mut tasks = Vec::new();
            for _ in 0..CALLERS {
                let checker = checker.clone();
                let bob = bob.clone();
                tasks.push(tokio::spawn(async move {
                    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                    while Instant::now() < deadline {
                        let start = Instant::now();
                        let shared = checker
                            .is_shared("img-bench001", &bob)
                            .await
                            .expect("check share");
                        assert!(!shared);
                        let _ = hist.record(start.elapsed().as_micros() as u64);
                    }
                    hist
                }));
            }
            let mut total = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            for task in tasks {
                total.add(task.await.expect("caller")).expect("merge");
            }
            total
        }
    };
    run(1.0).await; // warm-up, not counted
    let secs = 5.0;
    let pids = [
        ("sharing", cluster.sharing.pid()),
        ("redis", cluster.redis.pid()),
        ("load generator", Some(std::process::id())),
    ];
    let before: Vec<(f64, f64)> = pids
        .iter()
        .map(|(_, p)| p.map(cpu_split).unwrap_or_default())
        .collect();
    let hist = run(secs).await;
    for ((name, pid), (u, s)) in pids.iter().zip(&before) {
        let (u2, s2) = pid.map(cpu_split).unwrap_or_default();
        println!(
            "  share_rps {name} CPU: user {:.2}s system {:.2}s",
            u2 - u,
            s2 - s
        );
    }
    let rps = hist.len() as f64 / secs;
    println!(
        "  share_rps latency: p50 {}us p99 {}us p999 {}us ({} calls, {CALLERS} callers on the region's share checker)",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.len()
    );
    report(
        "share_rps",
        rps / baseline,
        &format!("{rps:.0} req/s"),
        &format!("redis-benchmark GET {baseline:.0} req/s"),
        ">= 0.5",
    );
}

/// A closed-loop load: `callers` tasks, each making `call(caller)` one after another for
/// `secs` seconds after a second of warm-up; returns calls per second and their latencies.
async fn closed_loop<F>(callers: usize, secs: f64, call: F) -> (f64, hdrhistogram::Histogram<u64>)
where
    F: Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync
        + 'static,
{
    let call = std::sync::Arc::new(call);
    let mut total = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for (phase, length) in [(0, 1.0), (1, secs)] {
        let deadline = Instant::now() + Duration::from_secs_f64(length);
        let mut tasks = Vec::new();
        for caller in 0..callers {
            let call = call.clone();
            tasks.push(tokio::spawn(async move {
                let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                while Instant::now() < deadline {
                    let start = Instant::now();
                    call(caller).await;
                    let _ = hist.record(start.elapsed().as_micros() as u64);
                }
                hist
            }));
        }
        for task in tasks {
            let hist = task.await.expect("caller");
            if phase == 1 {
                total.add(hist).expect("merge");
            }
        }
    }
    (total.len() as f64 / secs, total)
}

async fn describe_rps() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    const CALLERS: usize = 64;
    const CONNECTIONS: usize = 4;
    const SECS: f64 = 5.0;
    // One account's calls: without its per-account rate limit, which would otherwise be the
    // figure measured.
    let cluster = Cluster::start_with(
        &["ap-guangzhou"],
        &[(
            "ap-guangzhou",
            RegionOptions::env(&[("IMAGEFLEET_ACCOUNT_RATE", "0")]),
        )],
    )
    .await;
    let mut region = cluster.region("ap-guangzhou", 0);
    // Twenty images of the account's own (small raw uploads), so a page holds 20.
    let mut ids = Vec::new();
    for n in 0..20 {
        let messages = vec![UploadImageRequest {
            parameters: Some(ImportImageParameters {
                image_name: format!("bench-describe-{n}"),
                platform: "Other".into(),
                os_version: "-".into(),
                ..Default::default()
            }),
            size_bytes: 1 << 20,
            data: random_bytes(1 << 20),
        }];
        let image = region
            .upload_image(futures::stream::iter(messages))
            .await
            .expect("upload")
            .into_inner()
            .image_id;
        ids.push(image);
    }
    for id in &ids {
        wait_image_state(&mut region, id, ImageState::Normal).await;
    }

    // The health-check figure of earlier runs: a bare tonic server answering `grpc.health.v1`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let echo_url = format!("http://{}", listener.local_addr().expect("address"));
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(nodelay_incoming(listener)),
    );
    let echo: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            HealthClient::new(
                imagefleet_rpc::client::endpoint(&echo_url)
                    .expect("endpoint")
                    .connect_lazy(),
            )
        })
        .collect();
    let (health_rps, _) = closed_loop(CALLERS, SECS, move |caller| {
        let mut client = echo[caller % CONNECTIONS].clone();
        Box::pin(async move {
            client
                .check(HealthCheckRequest::default())
                .await
                .expect("echo");
        })
    })
    .await;

    let regions: Vec<_> = (0..CONNECTIONS)
        .map(|_| cluster.region("ap-guangzhou", 0))
        .collect();
    let mut figures = Vec::new();
    for (what, request) in [
        (
            "one image by id",
            DescribeImagesRequest {
                image_ids: vec![ids[0].clone()],
                ..Default::default()
            },
        ),
        (
            "a page of 20",
            DescribeImagesRequest {
                limit: 20,
                ..Default::default()
            },
        ),
    ] {
        let regions = regions.clone();
        let expected = if request.image_ids.is_empty() { 20 } else { 1 };
        // The echo baseline of this request: the region's own answer, sent back by a bare
        // tonic server to the same load.
        let answer = regions[0]
            .clone()
            .describe_images(request.clone())
            .await
            .expect("describe")
            .into_inner();
        assert_eq!(answer.image_set.len(), expected);
        let echo_url = echo_server(answer).await;
        let echo_channels: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                imagefleet_rpc::client::endpoint(&echo_url)
                    .expect("endpoint")
                    .connect_lazy()
            })
            .collect();
        let echo_request = request.clone();
        let (echo_rps, _) = closed_loop(CALLERS, SECS, move |caller| {
            let channel = echo_channels[caller % CONNECTIONS].clone();
            let request = echo_request.clone();
            Box::pin(async move {
                let page = echo_call(channel, request).await;
                assert_eq!(page.image_set.len(), expected);
            })
        })
        .await;
        let pids = [
            ("region", cluster.regions["ap-guangzhou"].pid()),
            ("sharing", cluster.sharing.pid()),
            ("load generator", Some(std::process::id())),
        ];
        let before: Vec<(f64, f64)> = pids
            .iter()
            .map(|(_, p)| p.map(cpu_split).unwrap_or_default())
            .collect();
        let (rps, hist) = closed_loop(CALLERS, SECS, move |caller| {
            let mut client = regions[caller % CONNECTIONS].clone();
            let request = request.clone();
            Box::pin(async move {
                let page = client
                    .describe_images(request)
                    .await
                    .expect("describe")
                    .into_inner();
                assert_eq!(page.image_set.len(), expected);
            })
        })
        .await;
        println!(
            "  describe_rps {what}: {rps:.0} req/s, p50 {}us p99 {}us ({CALLERS} callers on {CONNECTIONS} connections); echo of the same answer {echo_rps:.0} req/s ({:.3}); health check {health_rps:.0} req/s ({:.3})",
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99),
            rps / echo_rps,
            rps / health_rps
        );
        // CPU over the warm-up and the measured calls: per call, over both.
        let calls = rps * (SECS + 1.0);
        for ((name, pid), (u, s)) in pids.iter().zip(&before) {
            let (u2, s2) = pid.map(cpu_split).unwrap_or_default();
            println!(
                "    {name} CPU: user {:.2}s system {:.2}s (~{:.0}us a call)",
                u2 - u,
                s2 - s,
                (u2 - u + s2 - s) / calls * 1e6
            );
        }
        figures.push((what, rps, echo_rps));
    }
    let (what, rps, echo_rps) = figures
        .iter()
        .copied()
        .min_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2)))
        .expect("figures");
    report(
        "describe_rps",
        rps / echo_rps,
        &format!("{rps:.0} req/s ({what})"),
        &format!("bare tonic unary echo of the same answer {echo_rps:.0} req/s"),
        ">= 0.5",
    );
}

/// The connections `listener` accepts, with TCP_NODELAY (as the services set it: tonic's
/// builder does not reach sockets from an incoming stream).
fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(socket) = &conn {
            socket.set_nodelay(true).expect("TCP_NODELAY");
        }
        conn
    })
}

/// The echo baseline's method.
const ECHO_PATH: &str = "/imagefleet.bench.v1.Echo/DescribeImages";

/// A bare tonic server (no signing, no store) answering every `DescribeImagesRequest` at
/// `ECHO_PATH` with `answer`, encoded by prost as any tonic server encodes; returns its URL.
async fn echo_server(answer: DescribeImagesResponse) -> String {
    use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service};

    #[derive(Clone)]
    struct Echo(std::sync::Arc<DescribeImagesResponse>);
    impl tonic::server::NamedService for Echo {
        const NAME: &'static str = "imagefleet.bench.v1.Echo";
    }
    struct Answer(std::sync::Arc<DescribeImagesResponse>);
    impl tonic::server::UnaryService<DescribeImagesRequest> for Answer {
        type Response = DescribeImagesResponse;
        type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;
        fn call(&mut self, _: tonic::Request<DescribeImagesRequest>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new((*self.0).clone())))
        }
    }
    impl<B> Service<http::Request<B>> for Echo
    where
        B: Body + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: http::Request<B>) -> Self::Future {
            let answer = self.0.clone();
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Answer(answer), request).await)
            })
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Echo(std::sync::Arc::new(answer)))
            .serve_with_incoming(nodelay_incoming(listener)),
    );
    url
}

/// One call of the echo baseline.
async fn echo_call(
    channel: tonic::transport::Channel,
    request: DescribeImagesRequest,
) -> DescribeImagesResponse {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("echo ready");
    grpc.unary(
        tonic::Request::new(request),
        http::uri::PathAndQuery::from_static(ECHO_PATH),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .expect("echo")
    .into_inner()
}

/// noisy_neighbour: calls A makes per phase (alternating the two kinds), after warm-up calls.
/// Each part is also bounded in time, so that a slow service still gives a figure (from fewer
/// calls, which the output says).
const NOISY_CALLS: usize = 2000;
const NOISY_WARMUP: usize = 200;
const NOISY_CALLS_MAX: Duration = Duration::from_secs(600);
const NOISY_WARMUP_MAX: Duration = Duration::from_secs(10);
/// Instances account B holds, launched `NOISY_PER_CALL` per `RunInstances` call by
/// `NOISY_LAUNCHERS` concurrent callers.
const NOISY_INSTANCES: usize = 200_000;
const NOISY_PER_CALL: usize = 100;
const NOISY_LAUNCHERS: usize = 8;
/// Account B's concurrent readers while A is measured.
const NOISY_READERS: usize = 8;
/// Instances A holds in both phases, so that its default page is a full one.
const NOISY_A_INSTANCES: u32 = 20;

/// A's latencies, in microseconds, of each call kind.
struct CallLatencies {
    instances: hdrhistogram::Histogram<u64>,
    quota: hdrhistogram::Histogram<u64>,
    /// Whether `NOISY_CALLS_MAX` ran out before `NOISY_CALLS` calls were made.
    cut_short: bool,
}

/// One of A's calls: `DescribeInstances` (default page) for even `call`s, else
/// `DescribeImageQuota`. Returns the latency in microseconds.
async fn account_a_call(region: &mut Region, call: usize) -> u64 {
    let start = Instant::now();
    if call.is_multiple_of(2) {
        let page = region
            .describe_instances(DescribeInstancesRequest::default())
            .await
            .expect("A describe instances")
            .into_inner();
        assert_eq!(page.instance_set.len(), NOISY_A_INSTANCES as usize);
    } else {
        region
            .describe_image_quota(DescribeImageQuotaRequest {})
            .await
            .expect("A describe image quota");
    }
    (start.elapsed().as_micros() as u64).max(1)
}

/// A closed loop, one call at a time, the two kinds alternately: `NOISY_WARMUP` calls not
/// counted, then `NOISY_CALLS` (each part bounded in time).
async fn account_a_calls(region: &mut Region) -> CallLatencies {
    let warm_up = Instant::now();
    for call in 0..NOISY_WARMUP {
        if warm_up.elapsed() >= NOISY_WARMUP_MAX {
            break;
        }
        account_a_call(region, call).await;
    }
    let mut latencies = CallLatencies {
        instances: hdrhistogram::Histogram::new(3).expect("histogram"),
        quota: hdrhistogram::Histogram::new(3).expect("histogram"),
        cut_short: false,
    };
    let start = Instant::now();
    for call in 0..NOISY_CALLS {
        if start.elapsed() >= NOISY_CALLS_MAX {
            latencies.cut_short = true;
            break;
        }
        let micros = account_a_call(region, call).await;
        let hist = if call.is_multiple_of(2) {
            &mut latencies.instances
        } else {
            &mut latencies.quota
        };
        let _ = hist.record(micros);
    }
    latencies
}

fn ms(micros: u64) -> String {
    format!("{:.3} ms", micros as f64 / 1000.0)
}

fn percentiles(hist: &hdrhistogram::Histogram<u64>) -> String {
    format!(
        "p50 {} p99 {} p999 {}",
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.value_at_quantile(0.999))
    )
}

async fn noisy_neighbour() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const REGION: &str = "ap-guangzhou";
    // B's instances are far past the default instance quota: the figure measures pacing.
    let cluster = Cluster::start_with(
        &[REGION],
        &[(
            REGION,
            RegionOptions::env(&[("IMAGEFLEET_INSTANCE_QUOTA", "1000000")]),
        )],
    )
    .await;
    let a = cluster.create_account("noisy-neighbour-a").await;
    let b = cluster.create_account("noisy-neighbour-b").await;
    let mut region_a = cluster.region_as(REGION, &a);
    let debian = public_image(&mut region_a, "Debian").await.image_id;
    run(&mut region_a, &debian, NOISY_A_INSTANCES).await;

    // Baseline: A alone in the region.
    let empty = account_a_calls(&mut region_a).await;

    // B's 200,000 instances, NOISY_PER_CALL per call, NOISY_LAUNCHERS calls at a time.
    let start = Instant::now();
    let calls = NOISY_INSTANCES / NOISY_PER_CALL;
    let next = Arc::new(AtomicU64::new(0));
    let launchers: Vec<_> = (0..NOISY_LAUNCHERS)
        .map(|_| {
            let mut region = cluster.region_as(REGION, &b);
            let image_id = debian.clone();
            let next = next.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < calls as u64 {
                    region
                        .run_instances(RunInstancesRequest {
                            image_id: image_id.clone(),
                            instance_type: "S5.SMALL1".into(),
                            instance_count: NOISY_PER_CALL as u32,
                            ..Default::default()
                        })
                        .await
                        .expect("B run instances");
                }
            })
        })
        .collect();
    for launcher in launchers {
        launcher.await.expect("launcher");
    }
    // Every instance RUNNING before A is measured, so that no launch work overlaps.
    let mut region_b = cluster.region_as(REGION, &b);
    for poll in 0.. {
        assert!(
            poll < 600,
            "B's instances were not all RUNNING after 10 minutes"
        );
        let pending = region_b
            .describe_instances(DescribeInstancesRequest {
                filters: vec![Filter {
                    name: "instance-state".into(),
                    values: vec!["PENDING".into()],
                }],
                limit: 1,
                ..Default::default()
            })
            .await
            .expect("B pending instances")
            .into_inner()
            .total_count;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let held = region_b
        .describe_instances(DescribeInstancesRequest::default())
        .await
        .expect("B describe instances")
        .into_inner()
        .total_count;
    assert_eq!(held as usize, NOISY_INSTANCES, "B's instances");
    println!(
        "  noisy_neighbour: B launched {NOISY_INSTANCES} instances in {:.1}s ({calls} calls of {NOISY_PER_CALL}, {NOISY_LAUNCHERS} at a time)",
        start.elapsed().as_secs_f64()
    );

    // B's readers, each on its own connection, until A is done.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..NOISY_READERS)
        .map(|_| {
            let mut region = cluster.region_as(REGION, &b);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut calls = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if calls.is_multiple_of(2) {
                        region
                            .describe_instances(DescribeInstancesRequest::default())
                            .await
                            .expect("B describe instances");
                    } else {
                        region
                            .describe_image_quota(DescribeImageQuotaRequest {})
                            .await
                            .expect("B describe image quota");
                    }
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let pids = [
        ("region", cluster.regions[REGION].pid()),
        ("load generator", Some(std::process::id())),
    ];
    let before: Vec<(f64, f64)> = pids
        .iter()
        .map(|(_, p)| p.map(cpu_split).unwrap_or_default())
        .collect();
    let start = Instant::now();
    let loaded = account_a_calls(&mut region_a).await;
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut reader_calls = 0;
    for reader in readers {
        reader_calls += reader.await.expect("reader");
    }
    for ((name, pid), (u, s)) in pids.iter().zip(&before) {
        let (u2, s2) = pid.map(cpu_split).unwrap_or_default();
        println!(
            "  noisy_neighbour {name} CPU while A was measured: user {:.2}s system {:.2}s",
            u2 - u,
            s2 - s
        );
    }
    println!(
        "  noisy_neighbour: A's calls took {secs:.1}s while B's {NOISY_READERS} readers made {reader_calls} calls ({:.0} calls/s); services and load generator share this machine's {} cores",
        reader_calls as f64 / secs,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    for (phase, latencies) in [("empty region", &empty), ("B loaded", &loaded)] {
        if latencies.cut_short {
            println!(
                "  noisy_neighbour: {phase}: only {} of A's {NOISY_CALLS} calls made in {}s",
                latencies.instances.len() + latencies.quota.len(),
                NOISY_CALLS_MAX.as_secs()
            );
        }
    }
    for (kind, empty, loaded) in [
        ("DescribeInstances", &empty.instances, &loaded.instances),
        ("DescribeImageQuota", &empty.quota, &loaded.quota),
    ] {
        println!(
            "  noisy_neighbour {kind} latency: empty region {} ({} calls); B loaded {} ({} calls)",
            percentiles(empty),
            empty.len(),
            percentiles(loaded),
            loaded.len()
        );
    }
    let p99 = |hist: &hdrhistogram::Histogram<u64>| hist.value_at_quantile(0.99);
    let ratio = |loaded, empty| p99(loaded) as f64 / p99(empty) as f64;
    report(
        "noisy_neighbour",
        ratio(&loaded.instances, &empty.instances).max(ratio(&loaded.quota, &empty.quota)),
        &format!(
            "DescribeInstances p99 {} vs {}; DescribeImageQuota p99 {}",
            ms(p99(&loaded.instances)),
            ms(p99(&empty.instances)),
            ms(p99(&loaded.quota))
        ),
        &ms(p99(&empty.quota)),
        "<= 2.0",
    );
}

/// The upload of `file` as one image, in 1 MiB messages read as they are sent.
fn upload_stream(
    name: &str,
    file: std::path::PathBuf,
) -> impl futures::Stream<Item = UploadImageRequest> + Send + 'static {
    use std::io::Read;
    let size = std::fs::metadata(&file).expect("file").len();
    let first = UploadImageRequest {
        parameters: Some(ImportImageParameters {
            image_name: name.into(),
            format: "qcow2".into(),
            platform: "Ubuntu".into(),
            os_version: "22.04".into(),
            ..Default::default()
        }),
        size_bytes: size,
        data: Vec::new(),
    };
    let mut reader = std::fs::File::open(&file).expect("file");
    let rest = std::iter::from_fn(move || {
        let mut buf = vec![0u8; MIB as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => panic!("reading the file: {e}"),
            }
        }
        (filled > 0).then(|| {
            buf.truncate(filled);
            UploadImageRequest {
                data: buf,
                ..Default::default()
            }
        })
    });
    futures::stream::iter(std::iter::once(first).chain(rest))
}

fn cp_sync(file: &std::path::Path, target: &std::path::Path) -> f64 {
    let start = Instant::now();
    let cp = std::process::Command::new("cp")
        .arg(file)
        .arg(target)
        .status()
        .expect("cp runs");
    let sync = std::process::Command::new("sync")
        .status()
        .expect("sync runs");
    let secs = start.elapsed().as_secs_f64();
    assert!(cp.success() && sync.success(), "cp or sync failed");
    let _ = std::fs::remove_file(target);
    secs
}

async fn import_export() {
    use futures::StreamExt;
    use std::io::{Seek, SeekFrom, Write};
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut region = cluster.region("ap-guangzhou", 0);
    let dir = cluster.dir.path();
    let raw = dir.join("content.raw");
    std::fs::write(&raw, random_bytes(1024 * MIB as usize)).expect("content file");
    let qcow2 = dir.join("content.qcow2");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .expect("qemu-img runs");
    assert!(converted.success(), "qemu-img convert failed");
    let (mut ours, mut baseline) = (Vec::new(), Vec::new());
    let mut image_id = String::new();
    for round in 0..3 {
        if !image_id.is_empty() {
            region
                .delete_images(DeleteImagesRequest {
                    image_ids: vec![image_id.clone()],
                })
                .await
                .expect("delete");
        }
        let cp = cp_sync(&qcow2, &dir.join("copy.qcow2"));
        let start = Instant::now();
        let done = region
            .upload_image(upload_stream(
                &format!("bench-import-{round}"),
                qcow2.clone(),
            ))
            .await
            .expect("upload")
            .into_inner();
        let secs = start.elapsed().as_secs_f64();
        println!("  round {}: cp+sync {cp:.3}s, import {secs:.3}s", round + 1);
        image_id = done.image_id;
        ours.push(secs);
        baseline.push(cp);
    }
    let (o, b) = (median(&mut ours), median(&mut baseline));
    report(
        "import_1g",
        o / b,
        &format!("{o:.3}s"),
        &format!("cp+sync {b:.3}s"),
        "<= 1.5",
    );
    let (mut ours, mut baseline) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let target = dir.join("qemu.qcow2");
        let start = Instant::now();
        let converted = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&target)
            .status()
            .expect("qemu-img runs");
        let qemu = start.elapsed().as_secs_f64();
        assert!(converted.success());
        let _ = std::fs::remove_file(&target);
        let target = dir.join("export.qcow2");
        let start = Instant::now();
        let mut stream = region
            .export_image(ExportImageRequest {
                image_id: image_id.clone(),
                format: ExportFormat::Qcow2 as i32,
            })
            .await
            .expect("export")
            .into_inner();
        let mut file = std::fs::File::create(&target).expect("export file");
        let mut end = 0;
        while let Some(piece) = stream.next().await {
            let piece = piece.expect("export piece");
            file.seek(SeekFrom::Start(piece.offset)).expect("seek");
            file.write_all(&piece.data).expect("write");
            end = piece.offset;
        }
        file.set_len(end).expect("set_len");
        let secs = start.elapsed().as_secs_f64();
        drop(file);
        let _ = std::fs::remove_file(&target);
        println!(
            "  round {}: qemu-img convert {qemu:.3}s, export {secs:.3}s",
            round + 1
        );
        ours.push(secs);
        baseline.push(qemu);
    }
    let (o, b) = (median(&mut ours), median(&mut baseline));
    report(
        "export_1g",
        o / b,
        &format!("{o:.3}s"),
        &format!("qemu-img convert {b:.3}s"),
        "<= 1.5",
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects figures.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // A filter names a figure (`share_rps`) or a part of its name (`share`).
    let wanted = |name: &str| {
        filter.is_empty()
            || filter
                .iter()
                .any(|f| name.contains(f.as_str()) || f.starts_with(name))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!("# imagefleet cluster benchmarks: services and load generator share this machine's {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        if wanted("launch") {
            // ROUNDS launches of 100 instances: past the default instance quota.
            let cluster = Cluster::start_with(
                &["ap-guangzhou"],
                &[(
                    "ap-guangzhou",
                    RegionOptions::env(&[("IMAGEFLEET_INSTANCE_QUOTA", "100000")]),
                )],
            )
            .await;
            let mut region = cluster.region("ap-guangzhou", 0);
            let content = cluster.dir.path().join("content.bin");
            std::fs::write(&content, random_bytes(1024 * MIB as usize)).expect("content file");
            let (image_id, _) = one_gib_image(&mut region, &content, "bench-launch-1g").await;
            launch(&cluster, &mut region, &image_id).await;
        }
        // copy_full, copy_delta_* and copy_rss come from one run (`-- copy_full` for them alone).
        if wanted("copy_full") {
            copy().await;
        }
        if wanted("copy_wan") {
            copy_wan().await;
        }
        if wanted("share") {
            share_rps().await;
        }
        if wanted("describe") {
            describe_rps().await;
        }
        if wanted("noisy_neighbour") {
            noisy_neighbour().await;
        }
        if wanted("import") || wanted("export") {
            import_export().await;
        }
    });
}

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

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use imagefleet_proto::region::v1::*;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const ROUNDS: usize = 5;

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

/// A 1 GiB custom image of random bytes, made the way a user would: launch, write, create.
async fn one_gib_image(region: &mut Region) -> String {
    let debian = public_image(region, "Debian").await;
    let ids = run(region, &debian.image_id, 1).await;
    let ids_clone = ids.clone();
    let mut client = region.clone();
    let data_start = 0;
    for i in 0..1024u64 {
        client
            .write_instance_disk(WriteInstanceDiskRequest {
                instance_id: ids_clone[0].clone(),
                offset: data_start + i * MIB,
                data: random_bytes(MIB as usize),
            })
            .await
            .expect("write");
    }
    let image_id = region
        .create_image(CreateImageRequest {
            instance_id: ids[0].clone(),
            image_name: "bench-1g".into(),
            image_description: "1 GiB of random bytes".into(),
        })
        .await
        .expect("create image")
        .into_inner()
        .image_id;
    wait_image_state(region, &image_id, ImageState::Normal).await;
    image_id
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

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects figures.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!("# imagefleet cluster benchmarks: services and load generator share this machine's {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        if wanted("launch") {
            let cluster = Cluster::start(&["ap-guangzhou"]).await;
            let mut region = cluster.region("ap-guangzhou", 0);
            let image_id = one_gib_image(&mut region).await;
            launch(&cluster, &mut region, &image_id).await;
        }
    });
}

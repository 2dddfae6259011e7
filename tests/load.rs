//! `imagectl load` against a real `imaged dev`: every built-in scenario sets up on a fresh
//! cluster, runs, and cleans up; the JSON summary has the documented shape (docs/load.md); the
//! HTML report has its charts and the link settings; and the calls the generator says it sent
//! are the calls the regions' own metrics counted.

mod common;

use common::dev::{imagectl, json, start_dev, stop};
use imagefleet_rpc::cluster::ClusterFile;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const REGIONS: &str = "ap-guangzhou,ap-shanghai";

/// Account calls each region counted, by (method, region): `imagefleet_rpc_calls_total` of
/// the RegionService methods, summed over codes and reasons.
fn calls_counted(cluster: &ClusterFile) -> BTreeMap<(String, String), u64> {
    let mut counted = BTreeMap::new();
    for region in &cluster.regions {
        assert!(
            !region.metrics.is_empty(),
            "{} has a metrics URL",
            region.region
        );
        for line in common::scrape_metrics(&region.metrics).lines() {
            let Some(rest) = line.strip_prefix("imagefleet_rpc_calls_total{") else {
                continue;
            };
            let (labels, value) = rest.rsplit_once("} ").expect("a sample");
            let method = labels
                .split("method=\"")
                .nth(1)
                .and_then(|m| m.split('"').next())
                .expect("a method label");
            // The account-facing calls: what the generator sends. (Regions also call each
            // other, for copies, and the report reads the links through the internal service.)
            let Some(method) = method.strip_prefix("/imagefleet.region.v1.RegionService/") else {
                continue;
            };
            let value: f64 = value.trim().parse().expect("a number");
            *counted
                .entry((method.to_string(), region.region.clone()))
                .or_default() += value as u64;
        }
    }
    counted
}

/// Runs `imagectl load ARGS --output json` and returns its summary; stdout must hold it
/// alone.
fn load_json(cluster_file: &Path, args: &[&str]) -> Value {
    let mut all = vec!["load"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    let out = imagectl(cluster_file, &all);
    let summary = json(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("load done:"), "{stderr}");
    summary
}

const PERCENTILES: [&str; 5] = ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"];

/// The documented figures of an operation or an (operation, region).
fn check_figures(what: &str, f: &Value) {
    for key in ["count", "ok", "errors", "warmup_count"] {
        assert!(f[key].is_u64(), "{what}: {key} in {f}");
    }
    assert!(
        f["throughput_per_s"].is_f64() || f["throughput_per_s"].is_u64(),
        "{what}: {f}"
    );
    assert_eq!(
        f["count"].as_u64().unwrap(),
        f["ok"].as_u64().unwrap() + f["errors"].as_u64().unwrap(),
        "{what}: {f}"
    );
    let mut last = 0.0;
    for key in PERCENTILES {
        let v = f[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: {key} in {f}"));
        assert!(v >= last, "{what}: percentiles go up: {f}");
        last = v;
    }
    if f["ok"].as_u64().unwrap() > 0 {
        assert!(f["max_ms"].as_f64().unwrap() > 0.0, "{what}: {f}");
    }
    // Only refusals for pacing or limits are expected under load; none other.
    for e in f["errors_by_reason"].as_array().expect("errors_by_reason") {
        assert_eq!(
            e["code"], "ResourceExhausted",
            "{what}: unexpected error {e}"
        );
    }
}

/// Checks the summary's shape and that `operations` ran with nonzero counts in `region`
/// (an operation named `Op@region` in another region).
fn check_summary(summary: &Value, operations: &[&str], region: &str) {
    check_figures("total", &summary["total"]);
    for op in operations {
        let (op, region) = op.split_once('@').unwrap_or((op, region));
        let o = &summary["operations"][op];
        assert!(o.is_object(), "{op} missing: {summary}");
        check_figures(op, o);
        assert!(o["count"].as_u64().unwrap() > 0, "{op}: {o}");
        let r = &o["regions"][region];
        check_figures(&format!("{op} {region}"), r);
        assert!(r["count"].as_u64().unwrap() > 0, "{op} {region}: {r}");
    }
    assert!(
        summary["cleanup_problems"].as_array().unwrap().is_empty(),
        "{summary}"
    );
}

/// Every call the generator sent is a call a region counted, and no other was counted.
fn check_against_metrics(
    before: &BTreeMap<(String, String), u64>,
    cluster: &ClusterFile,
    summary: &Value,
) {
    let mut sent: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (op, regions) in summary["calls_sent"].as_object().expect("calls_sent") {
        for (region, n) in regions.as_object().unwrap() {
            sent.insert((op.clone(), region.clone()), n.as_u64().unwrap());
        }
    }
    // Measured and warm-up calls are among those sent.
    for (op, o) in summary["operations"].as_object().unwrap() {
        for (region, f) in o["regions"].as_object().unwrap() {
            let n = f["count"].as_u64().unwrap() + f["warmup_count"].as_u64().unwrap();
            assert!(n <= sent[&(op.clone(), region.clone())], "{op} {region}");
        }
    }
    // A region counts a call when its response ends: give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = calls_counted(cluster);
        let delta: BTreeMap<(String, String), u64> = after
            .iter()
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        if delta == sent || Instant::now() > deadline {
            assert_eq!(delta, sent, "the regions' counts against calls_sent");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fresh `imaged dev` of two regions and its cluster file.
fn dev(dir: &Path) -> (common::dev::DevProcess, std::path::PathBuf, ClusterFile) {
    let child = start_dev(dir, REGIONS, None);
    let cluster_file = dir.join("cluster.json");
    let cluster = ClusterFile::load(&cluster_file).expect("cluster.json");
    (child, cluster_file, cluster)
}

/// Runs a built-in scenario closed-loop for a few seconds and checks summary and metrics.
fn run_scenario(name: &str, operations: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (child, cluster_file, cluster) = dev(dir.path());
    let before = calls_counted(&cluster);
    let summary = load_json(
        &cluster_file,
        &[
            name,
            "--duration",
            "3s",
            "--warmup",
            "1s",
            "--concurrency",
            "2",
        ],
    );
    assert_eq!(summary["scenario"], name);
    assert_eq!(summary["mode"], "closed");
    check_summary(&summary, operations, "ap-guangzhou");
    check_against_metrics(&before, &cluster, &summary);
    // Clean-up left nothing: no custom image, no instance that is not terminated.
    for region in ["ap-guangzhou", "ap-shanghai"] {
        for account in cluster.accounts.iter().map(|a| a.account_id.as_str()) {
            let images = json(&imagectl(
                &cluster_file,
                &[
                    "images",
                    "list",
                    "--region",
                    region,
                    "--type",
                    "PRIVATE_IMAGE",
                    "--account",
                    account,
                    "--output",
                    "json",
                ],
            ));
            assert!(
                images["imageSet"].as_array().is_none_or(|s| s.is_empty()),
                "{region} {account}: {images}"
            );
            let quota = json(&imagectl(
                &cluster_file,
                &[
                    "images",
                    "quota",
                    "--region",
                    region,
                    "--account",
                    account,
                    "--output",
                    "json",
                ],
            ));
            assert!(
                quota["instanceCount"].as_u64().unwrap_or(0) == 0,
                "{region} {account}: {quota}"
            );
        }
    }
    stop(child);
}

#[test]
fn describe_runs_closed_and_open_loop_reports_and_matches_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (child, cluster_file, cluster) = dev(dir.path());
    let set = imagectl(
        &cluster_file,
        &[
            "links",
            "set",
            "ap-guangzhou,ap-shanghai=rtt:2ms,rate:900mbit",
        ],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );

    // Closed loop with a report.
    let report = dir.path().join("report.html");
    let before = calls_counted(&cluster);
    let summary = load_json(
        &cluster_file,
        &[
            "describe",
            "--duration",
            "2s",
            "--warmup",
            "1s",
            "--concurrency",
            "3",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    check_summary(&summary, &["DescribeImages"], "ap-guangzhou");
    assert_eq!(summary["concurrency"], 3);
    assert!(
        summary["operations"]["DescribeImages"]["warmup_count"]
            .as_u64()
            .unwrap()
            > 0
    );
    check_against_metrics(&before, &cluster, &summary);
    let html = std::fs::read_to_string(&report).expect("the report");
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    // A chart of every series, then throughput and latency of each operation.
    assert_eq!(html.matches("<svg").count(), 3, "{html}");
    assert_eq!(html.matches("</svg>").count(), 3);
    assert!(html.contains("DescribeImages: throughput by region"));
    assert!(html.contains("DescribeImages: latency by region"));
    assert!(!html.contains("<script") && !html.contains("src=\"http"));
    assert!(html.contains("Link settings in force"), "{html}");
    let links = &html[html.find("Link settings in force").unwrap()..];
    assert!(
        links.contains("<td>ap-guangzhou</td><td>ap-shanghai</td><td>2 ms</td>"),
        "{links}"
    );

    // Open loop: the schedule decides how many operations start (2 s at 40/s: 80, each two
    // DescribeImages calls, the second of the last ones possibly after the end).
    let before = calls_counted(&cluster);
    let summary = load_json(
        &cluster_file,
        &[
            "describe",
            "--rps",
            "40",
            "--duration",
            "2s",
            "--warmup",
            "0s",
        ],
    );
    assert_eq!(summary["mode"], "open");
    assert_eq!(summary["rps"], 40.0);
    check_summary(&summary, &["DescribeImages"], "ap-guangzhou");
    let count = summary["operations"]["DescribeImages"]["count"]
        .as_u64()
        .unwrap();
    assert!((80..=160).contains(&count), "{summary}");
    assert_eq!(summary["operations"]["DescribeImages"]["warmup_count"], 0);
    check_against_metrics(&before, &cluster, &summary);

    // The table: a row per operation and the total; progress on stderr only. Without the
    // service key the report says the link settings are unavailable, and why.
    let mut keyless = cluster.clone();
    keyless.service_key_file = String::new();
    let keyless_file = dir.path().join("keyless.json");
    keyless.store(&keyless_file).unwrap();
    let report = dir.path().join("keyless.html");
    let out = imagectl(
        &keyless_file,
        &[
            "load",
            "describe",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let html = std::fs::read_to_string(&report).expect("the report");
    assert!(
        html.contains("<p>unavailable: ") && html.contains("service_key_file"),
        "{html}"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("OPERATION") && table.contains("P999_MS"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("DescribeImages")),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("TOTAL")), "{table}");
    assert!(!table.contains("load done"), "{table}");
    stop(child);
}

#[test]
fn launch_runs_instances_and_terminates_them() {
    run_scenario("launch", &["RunInstances", "TerminateInstances"]);
}

#[test]
fn copy_copies_a_custom_image_and_deletes_the_copies() {
    run_scenario(
        "copy",
        &[
            "SyncImages",
            "DescribeImages@ap-shanghai",
            "DeleteImages@ap-shanghai",
        ],
    );
}

#[test]
fn share_shares_with_the_second_account_and_cancels() {
    run_scenario(
        "share",
        &[
            "ModifyImageSharePermission",
            "DescribeImages",
            "RunInstances",
        ],
    );
}

#[test]
fn mixed_blends_every_kind() {
    run_scenario("mixed", &["DescribeImages", "RunInstances"]);
}

#[test]
fn a_scenario_file_runs_its_weighted_operations_in_two_regions() {
    let dir = tempfile::tempdir().unwrap();
    let (child, cluster_file, cluster) = dev(dir.path());
    let scenario = dir.path().join("two.toml");
    std::fs::write(
        &scenario,
        r#"
name = "two regions"
regions = ["ap-guangzhou", "ap-shanghai"]

[[operation]]
kind = "describe"
weight = 3

[[operation]]
kind = "launch"
accounts = ["100000000002"]
instance_type = "S5.MEDIUM4"
"#,
    )
    .unwrap();
    let before = calls_counted(&cluster);
    let summary = load_json(
        &cluster_file,
        &[
            scenario.to_str().unwrap(),
            "--rps",
            "30",
            "--duration",
            "2s",
            "--warmup",
            "0s",
        ],
    );
    assert_eq!(summary["scenario"], "two regions");
    for region in ["ap-guangzhou", "ap-shanghai"] {
        check_summary(&summary, &["DescribeImages", "RunInstances"], region);
    }
    check_against_metrics(&before, &cluster, &summary);
    // The launches were the second account's: it has terminated instances, the first none.
    let second = json(&imagectl(
        &cluster_file,
        &[
            "instances",
            "list",
            "--region",
            "ap-guangzhou",
            "--account",
            "100000000002",
            "--state",
            "TERMINATED",
            "--output",
            "json",
        ],
    ));
    assert!(
        second["instanceSet"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "{second}"
    );
    stop(child);
}

#[test]
fn bad_scenarios_and_flags_are_refused_before_any_call() {
    let dir = tempfile::tempdir().unwrap();
    let cluster_file = dir.path().join("cluster.json");
    // No cluster is needed to refuse these.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[operation]]\nkind = \"explode\"\n").unwrap();
    for (args, expected) in [
        (vec!["load", "nosuch"], "neither a built-in scenario"),
        (
            vec!["load", bad.to_str().unwrap()],
            "line 2: unknown variant `explode`",
        ),
        (vec!["load", "describe", "--rps", "0"], "not a rate"),
        (
            vec!["load", "describe", "--duration", "soon"],
            "not a duration",
        ),
        (vec!["load", "describe", "--output", "id"], "--output id"),
    ] {
        let out = imagectl(&cluster_file, &args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

//! Metrics and load shedding of real services: every call is counted by method, code and
//! reason with a latency histogram; a server past its concurrency limit refuses new calls at
//! once with RESOURCE_EXHAUSTED; `imaged dev` names each service's metrics URL in cluster.json;
//! the emulated links between regions count the bytes they carry and the time calls wait on a
//! partition.

mod common;

use common::*;
use imagefleet_proto::region::v1::*;
use std::time::{Duration, Instant};
use tonic::Code;

/// The value of the series `name{labels}` (labels in the order the service writes them).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn metrics_env(port: u16) -> RegionOptions {
    RegionOptions::env(&[
        ("IMAGEFLEET_METRICS_LISTEN", &format!("127.0.0.1:{port}")),
        ("IMAGEFLEET_MAX_CONCURRENT_CALLS", "2"),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_are_counted_by_method_code_and_reason_and_overload_is_shed() {
    let port = free_port();
    let cluster =
        Cluster::start_with(&["ap-guangzhou"], &[("ap-guangzhou", metrics_env(port))]).await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut gz = cluster.region("ap-guangzhou", 0);
    for _ in 0..3 {
        gz.describe_images(DescribeImagesRequest::default())
            .await
            .unwrap();
    }
    let bad = gz
        .describe_images(DescribeImagesRequest {
            image_ids: vec!["not-an-id".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&bad), "InvalidImageId.Malformed");

    let text = scrape_metrics(&url);
    let method = "/imagefleet.region.v1.RegionService/DescribeImages";
    let calls = |code: &str, reason: &str| {
        value(
            &text,
            &format!(
                "imagefleet_rpc_calls_total{{service=\"region-ap-guangzhou\",method=\"{method}\",code=\"{code}\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(calls("Ok", ""), Some(3.0), "{text}");
    assert_eq!(
        calls("InvalidArgument", "InvalidImageId.Malformed"),
        Some(1.0)
    );
    let count = value(
        &text,
        &format!(
            "imagefleet_rpc_call_duration_seconds_count{{service=\"region-ap-guangzhou\",method=\"{method}\"}}"
        ),
    );
    assert_eq!(count, Some(4.0));
    assert!(text.contains("# TYPE imagefleet_rpc_call_duration_seconds histogram"));
    assert!(text.contains(&format!(
        "imagefleet_rpc_call_duration_seconds_bucket{{service=\"region-ap-guangzhou\",method=\"{method}\",le=\"+Inf\"}} 4"
    )));
    assert!(
        value(
            &text,
            "imagefleet_chunk_store_free_bytes{region=\"ap-guangzhou\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{text}"
    );

    // Two uploads held open fill the limit of 2 calls in flight.
    let mut held = Vec::new();
    for n in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(UploadImageRequest {
            parameters: Some(ImportImageParameters {
                image_name: format!("held-{n}"),
                platform: "Other".into(),
                os_version: "-".into(),
                ..Default::default()
            }),
            size_bytes: 1 << 20,
            data: Vec::new(),
        })
        .await
        .unwrap();
        let mut client = cluster.region("ap-guangzhou", 0);
        let call = tokio::spawn(async move {
            client
                .upload_image(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        held.push((tx, call));
    }
    // Both are in flight (the gauge counts them) before the third call is made.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let in_flight = value(
            &scrape_metrics(&url),
            "imagefleet_rpc_calls_in_flight{service=\"region-ap-guangzhou\"}",
        )
        .unwrap_or(0.0);
        if in_flight >= 2.0 {
            break;
        }
        for (_, call) in &held {
            assert!(!call.is_finished(), "a held upload ended early");
        }
        assert!(
            Instant::now() < deadline,
            "the held uploads never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A third call is refused at once, not queued.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shed = loop {
        let started = Instant::now();
        match gz.describe_images(DescribeImagesRequest::default()).await {
            Err(status) if status.code() == Code::ResourceExhausted => {
                break (status, started.elapsed());
            }
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("never shed: {other:?}"),
        }
    };
    assert_eq!(reason(&shed.0), "RequestLimitExceeded.ServerBusy");
    assert!(
        shed.1 < Duration::from_secs(1),
        "shedding took {:?}",
        shed.1
    );
    // Health checks are never shed.
    wait_serving(&cluster.region_url("ap-guangzhou")).await;
    // Once the held calls end, calls are served again.
    for (tx, call) in held {
        drop(tx);
        let _ = call.await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while gz
        .describe_images(DescribeImagesRequest::default())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "calls are still refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = scrape_metrics(&url);
    assert!(
        value(
            &text,
            "imagefleet_rpc_calls_shed_total{service=\"region-ap-guangzhou\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert!(text.contains("code=\"ResourceExhausted\",reason=\"RequestLimitExceeded.ServerBusy\""));
}

/// The sum of the values of every series of `name` whose labels include `labels`.
fn sum_of(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter(|rest| rest.contains(labels))
        .filter_map(|rest| rest.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn link_counters_count_a_copys_bytes_and_the_wait_on_a_partition() {
    use imagefleet_proto::region::v1::region_internal_service_client::RegionInternalServiceClient;
    use imagefleet_rpc::client::{region_scope, signed_channel};
    const GZ: &str = "ap-guangzhou";
    const SH: &str = "ap-shanghai";
    let ports = [free_port(), free_port()];
    let env = |port: u16| {
        RegionOptions::env(&[("IMAGEFLEET_METRICS_LISTEN", &format!("127.0.0.1:{port}"))])
    };
    let cluster = Cluster::start_with(&[GZ, SH], &[(GZ, env(ports[0])), (SH, env(ports[1]))]).await;
    let urls = ports.map(|port| format!("http://127.0.0.1:{port}/metrics"));
    let set_links = |link: &'static str| {
        let clients: Vec<_> = [GZ, SH]
            .iter()
            .map(|region| {
                RegionInternalServiceClient::new(
                    signed_channel(
                        &cluster.region_url(region),
                        cluster.service_credentials(),
                        &region_scope(region),
                    )
                    .unwrap(),
                )
            })
            .collect();
        async move {
            for mut client in clients {
                client
                    .set_links(SetLinksRequest {
                        links: vec![link.to_string()],
                    })
                    .await
                    .unwrap();
            }
        }
    };
    // Data from Guangzhou to Shanghai, counted by whichever region made the connection.
    let pair = format!("from=\"{GZ}\",to=\"{SH}\"");
    let scrape = |name: &str| {
        urls.iter()
            .map(|url| sum_of(&scrape_metrics(url), name, &pair))
            .sum::<f64>()
    };

    let mut gz = cluster.region(GZ, 0);
    let mut sh = cluster.region(SH, 0);
    const SIZE: usize = 4 << 20;
    let image_id = gz
        .upload_image(futures::stream::iter(vec![UploadImageRequest {
            parameters: Some(ImportImageParameters {
                image_name: "linked".into(),
                platform: "Other".into(),
                os_version: "-".into(),
                ..Default::default()
            }),
            size_bytes: SIZE as u64,
            data: random_bytes(SIZE),
        }]))
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(&mut gz, &image_id, ImageState::Normal).await;

    set_links("ap-guangzhou,ap-shanghai=rtt:10ms,rate:1gbit").await;
    let bytes_before = scrape("imagefleet_link_bytes_total");
    let copy = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![image_id.clone()],
            destination_regions: vec![SH.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set
        .remove(0)
        .image_id;
    wait_copy_normal(&mut sh, &copy).await;
    let bytes_after = scrape("imagefleet_link_bytes_total");
    assert!(
        bytes_after - bytes_before >= SIZE as f64,
        "the link carried {} bytes of a {SIZE}-byte copy",
        bytes_after - bytes_before
    );

    // A call over a partitioned link: refused, and the wait counts until the link is up.
    set_links("ap-guangzhou,ap-shanghai=down").await;
    let waited_before = scrape("imagefleet_link_down_wait_seconds_total");
    let refused = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![image_id.clone()],
            destination_regions: vec![SH.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = scrape("imagefleet_link_down_wait_seconds_total");
    assert!(
        waiting - waited_before >= 0.4,
        "waited {}s on the partition",
        waiting - waited_before
    );
    set_links("ap-guangzhou,ap-shanghai=up").await;
    let waited = scrape("imagefleet_link_down_wait_seconds_total");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Up again: the wait stops growing.
    assert_eq!(scrape("imagefleet_link_down_wait_seconds_total"), waited);
    let text = scrape_metrics(&urls[0]);
    assert!(
        text.contains("# TYPE imagefleet_link_throttle_wait_seconds_total counter"),
        "{text}"
    );
}

#[test]
fn imaged_dev_names_every_services_metrics_in_cluster_json() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dev::start_dev(dir.path(), "ap-guangzhou,ap-singapore", None);
    let cluster: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cluster.json")).unwrap())
            .unwrap();
    let mut urls = vec![
        (
            "catalog",
            cluster["catalog"]["metrics"].as_str().unwrap().to_string(),
        ),
        (
            "sharing",
            cluster["sharing"]["metrics"].as_str().unwrap().to_string(),
        ),
    ];
    for region in cluster["regions"].as_array().unwrap() {
        urls.push(("region", region["metrics"].as_str().unwrap().to_string()));
    }
    assert_eq!(urls.len(), 4);
    for (what, url) in urls {
        let text = scrape_metrics(&url);
        assert!(
            text.contains("# TYPE imagefleet_rpc_calls_in_flight gauge"),
            "{what} at {url}: {text}"
        );
    }
    dev::stop(dev);
}

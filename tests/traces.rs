//! Trace context across services: a trace id a client sends with a copy appears in the logs of
//! both regions, and the spans both regions export over OTLP belong to that one trace.

mod common;

use common::*;
use imagefleet_proto::region::v1::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A minimal OTLP/HTTP collector: keeps the JSON body of every POST and answers 200.
fn collector() -> (u16, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(json) = serde_json::from_slice(&body) {
                    kept.lock().unwrap().push(json);
                }
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (port, bodies)
}

/// (service name, span name) of every exported span of `trace_id`.
fn spans_of(bodies: &[serde_json::Value], trace_id: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for body in bodies {
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = resource["resource"]["attributes"][0]["value"]["stringValue"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    if span["traceId"] == trace_id {
                        out.push((service.clone(), span["name"].as_str().unwrap().to_string()));
                    }
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_is_one_trace_across_both_regions() {
    let (port, bodies) = collector();
    let endpoint = format!("http://127.0.0.1:{port}");
    let otlp = || RegionOptions::env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    let cluster = Cluster::start_with(
        &["ap-guangzhou", "ap-shanghai"],
        &[("ap-guangzhou", otlp()), ("ap-shanghai", otlp())],
    )
    .await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let ubuntu = public_image(&mut gz, "Ubuntu").await.image_id;
    let instance = run(&mut gz, &ubuntu, 1).await.remove(0);
    write(&mut gz, &instance, 0, &random_bytes(2 << 20)).await;
    let image = gz
        .create_image(CreateImageRequest {
            instance_id: instance,
            image_name: "traced".into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(&mut gz, &image, ImageState::Normal).await;

    let trace_id = "5e1f0c2a9d8b7c6e4f3a2b1c0d9e8f7a";
    let mut request = tonic::Request::new(SyncImagesRequest {
        image_ids: vec![image.clone()],
        destination_regions: vec!["ap-shanghai".into()],
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-1a2b3c4d5e6f7a8b-01")
            .parse()
            .unwrap(),
    );
    let copy = gz
        .sync_images(request)
        .await
        .unwrap()
        .into_inner()
        .image_set
        .remove(0)
        .image_id;
    let mut sh = cluster.region("ap-shanghai", 0);
    wait_copy_normal(&mut sh, &copy).await;

    // Both regions logged the copy with the client's trace id.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let source = cluster.regions["ap-guangzhou"].log_text();
        let destination = cluster.regions["ap-shanghai"].log_text();
        let source_hit = source
            .lines()
            .any(|l| l.contains(trace_id) && l.contains("copies started"));
        let destination_hit = destination
            .lines()
            .any(|l| l.contains(trace_id) && l.contains("copy starting"));
        let exported = spans_of(&bodies.lock().unwrap(), trace_id);
        let has = |service: &str, name: &str| {
            exported
                .iter()
                .any(|(s, n)| s == service && n.ends_with(name))
        };
        let spans_ok = has("imagefleet-region-ap-guangzhou", "RegionService/SyncImages")
            && has(
                "imagefleet-region-ap-shanghai",
                "RegionInternalService/StartSync",
            )
            && has(
                "imagefleet-region-ap-guangzhou",
                "RegionInternalService/FetchChunks",
            );
        if source_hit && destination_hit && spans_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace_id}: source log {source_hit}, destination log {destination_hit}, spans {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

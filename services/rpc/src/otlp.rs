//! Export of call spans over OTLP/HTTP (JSON), when an endpoint is configured.
//!
//! The endpoint comes from the standard variables: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the
//! full URL, e.g. `http://127.0.0.1:4318/v1/traces`) or `OTEL_EXPORTER_OTLP_ENDPOINT` (the
//! base URL; `/v1/traces` is appended). Plain `http://` only. Every call a server answers
//! becomes a span (`kind` SERVER, named `package.Service/Method`) of the call's trace, parented
//! to the caller's span when the caller sent one. Spans are sent in batches from a thread of
//! their own; when the collector is slow or away, spans beyond a bounded queue are dropped
//! (and counted in the log), never held in memory without bound.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::trace::CallSpan;

/// A call that ended, as exported.
pub struct FinishedSpan {
    pub span: CallSpan,
    /// The identity of the service that answered (`region-ap-guangzhou`).
    pub service: String,
    pub name: String,
    pub started: Instant,
    pub code: tonic::Code,
    pub reason: String,
}

struct Record {
    trace_id: u128,
    span_id: u64,
    parent_id: u64,
    service: String,
    name: String,
    start_nanos: u128,
    end_nanos: u128,
    code: tonic::Code,
    reason: String,
}

/// Spans waiting to be sent, at most.
const QUEUE: usize = 8192;
/// Spans per request, at most.
const BATCH: usize = 512;
/// How long a span waits for its batch to fill.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

static EXPORTER: OnceLock<Option<std::sync::mpsc::SyncSender<Record>>> = OnceLock::new();

/// The URL spans are posted to, from the environment.
pub fn endpoint_from_env() -> Option<String> {
    if let Ok(url) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        if !url.is_empty() {
            return Some(url);
        }
    }
    let base = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()?;
    if base.is_empty() {
        return None;
    }
    Some(format!("{}/v1/traces", base.trim_end_matches('/')))
}

fn exporter() -> Option<&'static std::sync::mpsc::SyncSender<Record>> {
    EXPORTER
        .get_or_init(|| {
            let url = endpoint_from_env()?;
            let Some(target) = Target::parse(&url) else {
                tracing::warn!(%url, "OTLP endpoint must be an http:// URL: spans are not exported");
                return None;
            };
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
            let started = std::thread::Builder::new()
                .name("otlp-export".into())
                .spawn(move || run(target, rx));
            match started {
                Ok(_) => {
                    tracing::info!(%url, "exporting call spans over OTLP");
                    Some(tx)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the OTLP exporter");
                    None
                }
            }
        })
        .as_ref()
}

/// Queues a finished call for export (nothing when no endpoint is configured).
pub fn record(finished: FinishedSpan) {
    let Some(tx) = exporter() else {
        return;
    };
    if !finished.span.context.sampled {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let record = Record {
        trace_id: finished.span.context.trace_id,
        span_id: finished.span.span_id,
        parent_id: finished.span.context.parent_id,
        service: finished.service,
        name: finished.name,
        start_nanos: now.saturating_sub(finished.started.elapsed().as_nanos()),
        end_nanos: now,
        code: finished.code,
        reason: finished.reason,
    };
    // A full queue drops the span rather than slow the call down.
    let _ = tx.try_send(record);
}

/// Where spans are posted: host, port and path of an http:// URL.
struct Target {
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Option<Target> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/v1/traces"),
        };
        (!authority.is_empty()).then(|| Target {
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

fn run(target: Target, rx: std::sync::mpsc::Receiver<Record>) {
    let mut failures = 0u64;
    loop {
        let Ok(first) = rx.recv() else {
            return;
        };
        let mut batch = vec![first];
        let deadline = Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        match post(&target, &body(&batch)) {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, dropped = batch.len(), failures, "OTLP export failed");
                }
            }
        }
    }
}

fn body(batch: &[Record]) -> String {
    use serde_json::json;
    let mut by_service: std::collections::BTreeMap<&str, Vec<serde_json::Value>> =
        Default::default();
    for r in batch {
        let mut span = json!({
            "traceId": format!("{:032x}", r.trace_id),
            "spanId": format!("{:016x}", r.span_id),
            "name": r.name,
            "kind": 2,
            "startTimeUnixNano": r.start_nanos.to_string(),
            "endTimeUnixNano": r.end_nanos.to_string(),
            "attributes": [
                {"key": "rpc.system", "value": {"stringValue": "grpc"}},
                {"key": "rpc.grpc.status_code", "value": {"intValue": (r.code as i32).to_string()}},
            ],
            "status": if r.code == tonic::Code::Ok {
                json!({"code": 1})
            } else {
                json!({"code": 2, "message": format!("{:?} {}", r.code, r.reason)})
            },
        });
        if r.parent_id != 0 {
            span["parentSpanId"] = json!(format!("{:016x}", r.parent_id));
        }
        by_service.entry(&r.service).or_default().push(span);
    }
    let resource_spans: Vec<_> = by_service
        .into_iter()
        .map(|(service, spans)| {
            json!({
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": format!("imagefleet-{service}")}},
                ]},
                "scopeSpans": [{"scope": {"name": "imagefleet"}, "spans": spans}],
            })
        })
        .collect();
    json!({ "resourceSpans": resource_spans }).to_string()
}

fn post(target: &Target, body: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&target.authority)?
        .next()
        .ok_or_else(|| std::io::Error::other("the OTLP endpoint resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.path,
        target.authority,
        body.len()
    )?;
    stream.write_all(body.as_bytes())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let status = String::from_utf8_lossy(&head[9..12]).to_string();
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the collector answered {status}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_grouped_by_service_with_hex_ids_and_parents() {
        let context = crate::trace::TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        let record = |service: &str, parent_id| Record {
            trace_id: context.trace_id,
            span_id: 0xabc,
            parent_id,
            service: service.into(),
            name: "imagefleet.region.v1.RegionService/SyncImages".into(),
            start_nanos: 1,
            end_nanos: 2,
            code: tonic::Code::NotFound,
            reason: "InvalidImageId.NotFound".into(),
        };
        let text = body(&[record("region-a", 0), record("region-b", 7)]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let resources = v["resourceSpans"].as_array().unwrap();
        assert_eq!(resources.len(), 2);
        let first = &resources[0]["scopeSpans"][0]["spans"][0];
        assert_eq!(first["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(first["spanId"], "0000000000000abc");
        assert!(first.get("parentSpanId").is_none());
        assert_eq!(first["status"]["code"], 2);
        let second = &resources[1]["scopeSpans"][0]["spans"][0];
        assert_eq!(second["parentSpanId"], "0000000000000007");
        assert_eq!(
            resources[1]["resource"]["attributes"][0]["value"]["stringValue"],
            "imagefleet-region-b"
        );
    }

    #[test]
    fn targets_are_plain_http() {
        let t = Target::parse("http://127.0.0.1:4318/v1/traces").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("127.0.0.1:4318", "/v1/traces")
        );
        assert!(Target::parse("https://collector:4318").is_none());
        assert!(Target::parse("http:///v1/traces").is_none());
    }
}

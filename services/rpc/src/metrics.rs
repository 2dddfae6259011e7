//! Prometheus metrics: a registry per service, the call metrics and load shedding every server
//! gets, and the HTTP endpoint that serves them (`GET /metrics`, text exposition format 0.0.4).
//!
//! Every server records each call it answers in
//! - `imagefleet_rpc_calls_total{service, method, code, reason}`: calls by gRPC method, status
//!   code and `ErrorInfo` reason (empty for successes);
//! - `imagefleet_rpc_call_duration_seconds{service, method}`: a histogram of the time from the
//!   request's arrival to the end of the response (the whole stream, for streaming calls);
//! - `imagefleet_rpc_calls_in_flight{service}` and `imagefleet_rpc_calls_shed_total{service}`.
//!
//! Services add their own metrics to their registry (`registry(identity)`). Names follow the
//! Prometheus conventions: a unit suffix (`_seconds`, `_bytes`), `_total` on counters.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tonic::body::Body;

/// Latency buckets (seconds) for calls: from a fast unary call to a long copy stream.
pub const CALL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Latency buckets (seconds) for calls to Redis and other stores.
pub const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Counter,
    /// A counter of time: kept in nanoseconds, shown in seconds.
    SecondsCounter,
    Gauge,
    Histogram(&'static [f64]),
}

/// One labelled time series: a counter, a gauge or a histogram.
#[derive(Debug)]
pub struct Series {
    /// Counter value, gauge value, or histogram count.
    value: AtomicI64,
    /// Histogram: per-bucket counts (not cumulative) and the sum in nanoseconds.
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
    bounds: &'static [f64],
}

impl Series {
    fn new(kind: Kind) -> Series {
        let bounds: &'static [f64] = match kind {
            Kind::Histogram(b) => b,
            _ => &[],
        };
        Series {
            value: AtomicI64::new(0),
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            bounds,
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.value
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Counters of time (`Registry::seconds_counter`): adds `d`.
    pub fn add_duration(&self, d: Duration) {
        self.value.fetch_add(
            i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Gauges: the current value.
    pub fn set(&self, v: i64) {
        self.value.store(v, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.value.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }

    /// Histograms: one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.value.fetch_add(1, Ordering::Relaxed);
    }
}

type LabelSet = Vec<(&'static str, String)>;

struct Family {
    help: &'static str,
    kind: Kind,
    series: BTreeMap<LabelSet, Arc<Series>>,
}

/// Refreshes gauges that are read rather than counted (free disk space, say) before a scrape.
type RenderHook = Box<dyn Fn(&Registry) + Send + Sync>;

/// The metrics of one service.
#[derive(Default)]
pub struct Registry {
    families: RwLock<BTreeMap<&'static str, Family>>,
    hooks: Mutex<Vec<RenderHook>>,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

fn write_labels(out: &mut String, labels: &LabelSet, extra: Option<(&str, &str)>) {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if !parts.is_empty() {
        let _ = write!(out, "{{{}}}", parts.join(","));
    }
}

impl Registry {
    fn series(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &[(&'static str, &str)],
    ) -> Arc<Series> {
        let key: LabelSet = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        {
            let families = self.families.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = families.get(name).and_then(|f| f.series.get(&key)) {
                return s.clone();
            }
        }
        let mut families = self.families.write().unwrap_or_else(|e| e.into_inner());
        let family = families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            series: BTreeMap::new(),
        });
        family
            .series
            .entry(key)
            .or_insert_with(|| Arc::new(Series::new(family.kind)))
            .clone()
    }

    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Arc<Series> {
        self.series(name, help, Kind::Counter, labels)
    }

    /// A counter of time in seconds (a `_seconds_total` name), added to with
    /// `Series::add_duration`.
    pub fn seconds_counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Arc<Series> {
        self.series(name, help, Kind::SecondsCounter, labels)
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Arc<Series> {
        self.series(name, help, Kind::Gauge, labels)
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        buckets: &'static [f64],
        labels: &[(&'static str, &str)],
    ) -> Arc<Series> {
        self.series(name, help, Kind::Histogram(buckets), labels)
    }

    /// Runs `hook` before every rendering, to refresh gauges from their source.
    pub fn on_render(&self, hook: impl Fn(&Registry) + Send + Sync + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        for hook in self.hooks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            hook(self);
        }
        let families = self.families.read().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, family) in families.iter() {
            let kind = match family.kind {
                Kind::Counter | Kind::SecondsCounter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, series) in &family.series {
                match family.kind {
                    Kind::Counter | Kind::Gauge => {
                        out.push_str(name);
                        write_labels(&mut out, labels, None);
                        let _ = writeln!(out, " {}", series.get());
                    }
                    Kind::SecondsCounter => {
                        out.push_str(name);
                        write_labels(&mut out, labels, None);
                        let _ = writeln!(out, " {}", series.get() as f64 / 1e9);
                    }
                    Kind::Histogram(bounds) => {
                        let mut cumulative = 0u64;
                        for (i, bound) in bounds.iter().enumerate() {
                            cumulative += series.buckets[i].load(Ordering::Relaxed);
                            let _ = write!(out, "{name}_bucket");
                            write_labels(&mut out, labels, Some(("le", &bound.to_string())));
                            let _ = writeln!(out, " {cumulative}");
                        }
                        let count = series.get();
                        let _ = write!(out, "{name}_bucket");
                        write_labels(&mut out, labels, Some(("le", "+Inf")));
                        let _ = writeln!(out, " {count}");
                        let _ = write!(out, "{name}_sum");
                        write_labels(&mut out, labels, None);
                        let sum = series.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
                        let _ = writeln!(out, " {sum}");
                        let _ = write!(out, "{name}_count");
                        write_labels(&mut out, labels, None);
                        let _ = writeln!(out, " {count}");
                    }
                }
            }
        }
        out
    }
}

/// The registry of the service `identity` (`catalog`, `sharing`, `region-<id>`): one per
/// identity in a process, so that `imaged dev` keeps each service's metrics apart.
pub fn registry(identity: &str) -> Arc<Registry> {
    static REGISTRIES: Mutex<Option<HashMap<String, Arc<Registry>>>> = Mutex::new(None);
    let mut all = REGISTRIES.lock().unwrap_or_else(|e| e.into_inner());
    all.get_or_insert_with(HashMap::new)
        .entry(identity.to_string())
        .or_default()
        .clone()
}

/// The reason a server gives for a call it sheds.
pub const SHED_REASON: &str = "RequestLimitExceeded.ServerBusy";

/// How many calls a server works on at once before it sheds new ones (`--max-concurrent-calls`).
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 1024;

/// The concurrency limit of each identity's server, when set (`set_call_limit`).
static CALL_LIMITS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

/// Sets how many calls the server of `identity` works on at once before shedding.
pub fn set_call_limit(identity: &str, limit: usize) {
    CALL_LIMITS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(identity.to_string(), limit.max(1));
}

/// The concurrency limit of the server of `identity`.
pub fn call_limit(identity: &str) -> usize {
    CALL_LIMITS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|limits| limits.get(identity).copied())
        .unwrap_or(DEFAULT_MAX_CONCURRENT_CALLS)
}

/// Per-server state of the call layer.
struct CallState {
    registry: Arc<Registry>,
    service: String,
    limit: usize,
    in_flight: AtomicUsize,
    in_flight_gauge: Arc<Series>,
    shed: Arc<Series>,
    /// The series of each method, resolved once per method: a call looks its method up once
    /// and records into these handles without building label sets.
    methods: RwLock<HashMap<String, Arc<MethodSeries>>>,
}

/// The series of one method of a server.
struct MethodSeries {
    method: String,
    /// `imagefleet_rpc_calls_total` of the method's successes (code `Ok`, no reason), made at
    /// the first success.
    ok: std::sync::OnceLock<Arc<Series>>,
    /// `imagefleet_rpc_call_duration_seconds` of the method.
    duration: Arc<Series>,
}

impl CallState {
    fn method(&self, method: &str) -> Arc<MethodSeries> {
        if let Some(known) = self
            .methods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(method)
        {
            return known.clone();
        }
        let series = Arc::new(MethodSeries {
            method: method.to_string(),
            ok: std::sync::OnceLock::new(),
            duration: self.registry.histogram(
                "imagefleet_rpc_call_duration_seconds",
                "Time from a call's arrival to the end of its response.",
                CALL_BUCKETS,
                &[("service", &self.service), ("method", method)],
            ),
        });
        let mut methods = self.methods.write().unwrap_or_else(|e| e.into_inner());
        // Any string may arrive as a path: past a bound, unknown ones are not remembered
        // (their series still are, in the registry).
        if methods.len() < MAX_REMEMBERED_METHODS {
            methods
                .entry(method.to_string())
                .or_insert_with(|| series.clone());
        }
        series
    }

    fn calls_series(&self, method: &str, code: tonic::Code, reason: &str) -> Arc<Series> {
        let code = format!("{code:?}");
        self.registry.counter(
            "imagefleet_rpc_calls_total",
            "Calls answered, by method, gRPC status code and ErrorInfo reason.",
            &[
                ("service", &self.service),
                ("method", method),
                ("code", &code),
                ("reason", reason),
            ],
        )
    }

    fn record(&self, method: &MethodSeries, code: tonic::Code, reason: &str, elapsed: Duration) {
        if code == tonic::Code::Ok && reason.is_empty() {
            method
                .ok
                .get_or_init(|| self.calls_series(&method.method, code, reason))
                .inc();
        } else {
            self.calls_series(&method.method, code, reason).inc();
        }
        method.duration.observe(elapsed);
    }
}

/// How many methods a server keeps resolved series handles of.
const MAX_REMEMBERED_METHODS: usize = 1024;

/// The tower layer every server runs calls through: counts and times them, and past
/// `limit` calls in flight answers new ones at once with `RESOURCE_EXHAUSTED`
/// (`RequestLimitExceeded.ServerBusy`) instead of queueing them. Health checks are never shed.
#[derive(Clone)]
pub struct CallLayer {
    state: Arc<CallState>,
}

impl CallLayer {
    pub fn new(identity: &str, limit: usize) -> CallLayer {
        let registry = registry(identity);
        let in_flight_gauge = registry.gauge(
            "imagefleet_rpc_calls_in_flight",
            "Calls being worked on.",
            &[("service", identity)],
        );
        let shed = registry.counter(
            "imagefleet_rpc_calls_shed_total",
            "Calls refused at once because the server was at its concurrency limit.",
            &[("service", identity)],
        );
        CallLayer {
            state: Arc::new(CallState {
                registry,
                service: identity.to_string(),
                limit: limit.max(1),
                in_flight: AtomicUsize::new(0),
                in_flight_gauge,
                shed,
                methods: RwLock::new(HashMap::new()),
            }),
        }
    }
}

impl<S> tower::Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallService<S> {
    inner: S,
    state: Arc<CallState>,
}

/// Decrements the in-flight count when the call's response ends (or is dropped), and records
/// the call then if its status came in the trailers.
struct InFlight {
    state: Arc<CallState>,
    method: Arc<MethodSeries>,
    started: Instant,
    /// Whether the call was recorded already (its status was in the response headers).
    recorded: bool,
    /// The call's span (exported when finished, if an exporter is set up).
    span: Option<crate::trace::CallSpan>,
}

impl InFlight {
    fn finish(&mut self, code: tonic::Code, reason: &str) {
        if !self.recorded {
            self.recorded = true;
            self.state
                .record(&self.method, code, reason, self.started.elapsed());
            if let Some(span) = self.span {
                crate::otlp::record(crate::otlp::FinishedSpan {
                    span,
                    service: self.state.service.clone(),
                    name: self.method.method.trim_start_matches('/').to_string(),
                    started: self.started,
                    code,
                    reason: reason.to_string(),
                });
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // A response dropped before its trailers: the client went away.
        self.finish(tonic::Code::Cancelled, "");
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state.in_flight_gauge.dec();
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<(tonic::Code, String)> {
    headers.get("grpc-status")?;
    let status = tonic::Status::from_header_map(headers)?;
    let reason = imagefleet_proto::error::reason(&status).unwrap_or_default();
    Some((status.code(), reason))
}

/// A response body that reports the call's status when its trailers pass.
struct Observed {
    inner: Body,
    guard: InFlight,
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some((code, reason)) = status_of(trailers) {
                        self.guard.finish(code, &reason);
                    }
                }
            }
            Poll::Ready(None) => self.guard.finish(tonic::Code::Ok, ""),
            Poll::Ready(Some(Err(_))) => self.guard.finish(tonic::Code::Internal, ""),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> tower::Service<Request<B>> for CallService<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let state = self.state.clone();
        let method = state.method(request.uri().path());
        let health = method.method.starts_with("/grpc.health.");
        let started = Instant::now();
        let before = state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.in_flight_gauge.inc();
        let mut guard = InFlight {
            state: state.clone(),
            method,
            started,
            recorded: false,
            span: None,
        };
        if before >= state.limit && !health {
            state.shed.inc();
            let status = imagefleet_proto::error::status(
                tonic::Code::ResourceExhausted,
                SHED_REASON,
                "the server is at its limit of calls in flight; retry with backoff",
            );
            guard.finish(tonic::Code::ResourceExhausted, SHED_REASON);
            drop(guard);
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The call's trace: every log line of the handler carries its id, and the calls the
        // handler makes carry the trace on (`crate::trace`).
        let context = crate::trace::extract(request.headers());
        let call_span = context.child();
        guard.span = Some(call_span);
        let span = tracing::info_span!(
            "rpc",
            service = %state.service,
            method = %guard.method.method,
            trace_id = %context.trace_id_hex()
        );
        let call = async move {
            let response = inner.call(request).await?;
            if let Some((code, reason)) = status_of(response.headers()) {
                guard.finish(code, &reason);
            }
            Ok(response.map(|body| Body::new(Observed { inner: body, guard })))
        };
        Box::pin(crate::trace::scope(
            Some(call_span),
            tracing::Instrument::instrument(call, span),
        ))
    }
}

/// Serves `GET /metrics` (the registry of `identity`) on `listener` until `shutdown`.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    identity: String,
    shutdown: impl Future<Output = ()>,
) {
    let registry = registry(&identity);
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let registry = registry.clone();
                        async move {
                            let response = if req.uri().path() == "/metrics" {
                                Response::builder()
                                    .header("content-type", "text/plain; version=0.0.4")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(
                                        registry.render(),
                                    )))
                            } else {
                                Response::builder()
                                    .status(404)
                                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                        b"metrics are at /metrics\n",
                                    )))
                            };
                            response
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let connection = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(Duration::from_secs(5))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(io, service);
                let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_help_type_labels_and_cumulative_buckets() {
        let r = Registry::default();
        r.counter(
            "x_calls_total",
            "Calls.",
            &[("method", "/a/B"), ("code", "Ok")],
        )
        .add(3);
        let h = r.histogram("x_seconds", "Time.", &[0.1, 1.0], &[("method", "/a/B")]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        r.gauge("x_bytes", "Bytes.", &[]).set(-2);
        r.seconds_counter("x_wait_seconds_total", "Wait.", &[])
            .add_duration(Duration::from_millis(1500));
        r.on_render(|r| r.gauge("x_free_bytes", "Free.", &[]).set(7));
        let text = r.render();
        assert!(text.contains("# TYPE x_calls_total counter\n"));
        assert!(text.contains("x_calls_total{method=\"/a/B\",code=\"Ok\"} 3\n"));
        assert!(text.contains("x_seconds_bucket{method=\"/a/B\",le=\"0.1\"} 1\n"));
        assert!(text.contains("x_seconds_bucket{method=\"/a/B\",le=\"1\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{method=\"/a/B\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("x_seconds_count{method=\"/a/B\"} 3\n"));
        assert!(text.contains("x_seconds_sum{method=\"/a/B\"} 5.55\n"));
        assert!(text.contains("x_bytes -2\n"));
        assert!(text.contains("# TYPE x_wait_seconds_total counter\n"));
        assert!(text.contains("x_wait_seconds_total 1.5\n"), "{text}");
        assert!(text.contains("x_free_bytes 7\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let r = Registry::default();
        r.counter("y_total", "Y.", &[("reason", "a\"b\\c\nd")])
            .inc();
        assert!(r
            .render()
            .contains("y_total{reason=\"a\\\"b\\\\c\\nd\"} 1\n"));
    }
}

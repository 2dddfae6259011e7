//! What a load run measures, in memory that does not grow with the run's length: one latency
//! histogram per (operation, region), counters of errors by code and reason, and time series
//! of a fixed number of buckets that merge pairwise when the run outlasts them. No call is
//! stored on its own.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// (operation, region): the gRPC method and the region it was sent to.
pub type Key = (String, String);

/// A small fixed-size latency histogram (microseconds, four buckets per doubling): cheap
/// enough to keep one per time bucket, exact enough (within 19%) for charts.
#[derive(Clone, Debug, PartialEq)]
pub struct LogHistogram {
    counts: [u32; LogHistogram::BUCKETS],
    total: u64,
}

impl Default for LogHistogram {
    fn default() -> Self {
        LogHistogram {
            counts: [0; LogHistogram::BUCKETS],
            total: 0,
        }
    }
}

impl LogHistogram {
    const BUCKETS: usize = 128;
    const PER_DOUBLING: f64 = 4.0;

    fn index(micros: u64) -> usize {
        if micros == 0 {
            return 0;
        }
        let i = ((micros as f64).log2() * Self::PER_DOUBLING).floor() as usize + 1;
        i.min(Self::BUCKETS - 1)
    }

    /// The middle (geometric) of bucket `i`, in microseconds.
    fn middle(i: usize) -> f64 {
        if i == 0 {
            return 0.0;
        }
        2f64.powf((i as f64 - 0.5) / Self::PER_DOUBLING)
    }

    pub fn record(&mut self, micros: u64) {
        let i = Self::index(micros);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.total += 1;
    }

    pub fn merge(&mut self, other: &LogHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The latency (microseconds) under which fraction `q` of the values fall; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return Self::middle(i);
            }
        }
        Self::middle(Self::BUCKETS - 1)
    }
}

/// One time bucket of one (operation, region).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bucket {
    pub count: u64,
    pub errors: u64,
    /// Latencies of the successful calls.
    pub latency: LogHistogram,
}

impl Bucket {
    fn merge(&mut self, other: &Bucket) {
        self.count += other.count;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
    }
}

/// Time series of every (operation, region) over one run, on a shared time axis of at most
/// `capacity` buckets: when a call lands past the last bucket, adjacent buckets are merged in
/// pairs and the bucket width doubles, so memory is bounded however long the run.
#[derive(Clone, Debug)]
pub struct TimeSeries {
    width: Duration,
    capacity: usize,
    series: BTreeMap<Key, Vec<Bucket>>,
}

impl TimeSeries {
    /// `capacity` buckets (at least 2) of `width` each to start with.
    pub fn new(width: Duration, capacity: usize) -> TimeSeries {
        TimeSeries {
            width: width.max(Duration::from_millis(1)),
            capacity: capacity.max(2),
            series: BTreeMap::new(),
        }
    }

    /// The current bucket width.
    pub fn width(&self) -> Duration {
        self.width
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records a call that ended `at` after the start of measurement.
    pub fn record(&mut self, key: &Key, at: Duration, latency_micros: Option<u64>) {
        let mut index = (at.as_nanos() / self.width.as_nanos()) as usize;
        while index >= self.capacity {
            self.compact();
            index = (at.as_nanos() / self.width.as_nanos()) as usize;
        }
        let buckets = match self.series.get_mut(key) {
            Some(b) => b,
            None => self.series.entry(key.clone()).or_default(),
        };
        if buckets.len() <= index {
            buckets.resize_with(index + 1, Bucket::default);
        }
        let bucket = &mut buckets[index];
        bucket.count += 1;
        match latency_micros {
            Some(micros) => bucket.latency.record(micros),
            None => bucket.errors += 1,
        }
    }

    /// Merges adjacent buckets in pairs: half as many, twice as wide.
    fn compact(&mut self) {
        self.width *= 2;
        for buckets in self.series.values_mut() {
            let merged: Vec<Bucket> = buckets
                .chunks(2)
                .map(|pair| {
                    let mut b = pair[0].clone();
                    if let Some(second) = pair.get(1) {
                        b.merge(second);
                    }
                    b
                })
                .collect();
            *buckets = merged;
        }
    }

    /// Every series, by (operation, region); bucket `i` covers `[i*width, (i+1)*width)`.
    pub fn series(&self) -> &BTreeMap<Key, Vec<Bucket>> {
        &self.series
    }

    /// The buckets of every series of `operation` merged, by bucket index.
    pub fn merged<'a>(&self, keys: impl Iterator<Item = &'a Key>) -> Vec<Bucket> {
        let mut out: Vec<Bucket> = Vec::new();
        for key in keys {
            if let Some(buckets) = self.series.get(key) {
                if out.len() < buckets.len() {
                    out.resize_with(buckets.len(), Bucket::default);
                }
                for (o, b) in out.iter_mut().zip(buckets) {
                    o.merge(b);
                }
            }
        }
        out
    }
}

/// Everything measured of one (operation, region).
#[derive(Clone, Debug)]
pub struct OpStats {
    /// Calls started in the measured window.
    pub count: u64,
    /// Calls started in the warm-up.
    pub warmup_count: u64,
    /// Errors by (gRPC code, ErrorInfo reason).
    pub errors: BTreeMap<(String, String), u64>,
    /// Latencies of successful calls, microseconds.
    pub latency: Histogram<u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            count: 0,
            warmup_count: 0,
            errors: BTreeMap::new(),
            latency: Histogram::new(3).expect("3 significant figures are valid"),
        }
    }
}

impl OpStats {
    fn merge(&mut self, other: &OpStats) {
        self.count += other.count;
        self.warmup_count += other.warmup_count;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        // Auto-resizing histograms take any value of another.
        let _ = self.latency.add(&other.latency);
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The window calls are measured in: started before `from`, a warm-up call; at or after
/// `until`, not counted (the end of the run, clean-up).
#[derive(Clone, Copy, Debug)]
struct Window {
    from: Instant,
    until: Instant,
}

/// The counters shown while the run goes on.
#[derive(Clone, Debug, Default)]
pub struct Live {
    pub count: u64,
    pub errors: u64,
    /// Latencies since the last [`Recorder::live`].
    pub recent: LogHistogram,
    pub recent_count: u64,
}

#[derive(Debug)]
struct Inner {
    window: Option<Window>,
    stats: BTreeMap<Key, OpStats>,
    /// Every call sent (set-up, warm-up, measured and clean-up), as the services count them.
    sent: BTreeMap<Key, u64>,
    series: TimeSeries,
    live: Live,
}

/// Where every call of a load run is recorded; shared by the workers.
#[derive(Debug)]
pub struct Recorder {
    inner: Mutex<Inner>,
}

/// Time-series buckets of a run.
pub const SERIES_CAPACITY: usize = 200;

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new(Duration::from_secs(1), SERIES_CAPACITY)
    }
}

impl Recorder {
    pub fn new(bucket: Duration, capacity: usize) -> Recorder {
        Recorder {
            inner: Mutex::new(Inner {
                window: None,
                stats: BTreeMap::new(),
                sent: BTreeMap::new(),
                series: TimeSeries::new(bucket, capacity),
                live: Live::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From here on calls are measured: started before `from`, warm-up; from `from` until
    /// `until`, measured. Before this call everything is set-up (counted as sent only).
    pub fn measure(&self, from: Instant, until: Instant) {
        self.lock().window = Some(Window { from, until });
    }

    /// Calls started from `at` on are not measured (clean-up): the window ends there if it
    /// has not already.
    pub fn close(&self, at: Instant) {
        if let Some(window) = &mut self.lock().window {
            window.until = window.until.min(at);
        }
    }

    /// Records one call of `operation` to `region`, started at `start` (for the first call of
    /// an open-loop operation: its scheduled start), ended at `end`, failed with `error`.
    pub fn record(
        &self,
        operation: &str,
        region: &str,
        start: Instant,
        end: Instant,
        error: Option<&tonic::Status>,
    ) {
        let key: Key = (operation.to_string(), region.to_string());
        let mut inner = self.lock();
        *inner.sent.entry(key.clone()).or_default() += 1;
        let Some(window) = inner.window else {
            return;
        };
        if start >= window.until {
            return;
        }
        let stats = inner.stats.entry(key.clone()).or_default();
        if start < window.from {
            stats.warmup_count += 1;
            return;
        }
        stats.count += 1;
        let micros = end.saturating_duration_since(start).as_micros() as u64;
        let latency = match error {
            None => {
                let _ = stats.latency.record(micros.max(1));
                Some(micros)
            }
            Some(status) => {
                let code = format!("{:?}", status.code());
                let reason = imagefleet_proto::error::reason(status)
                    .map(|r| r.to_string())
                    .unwrap_or_default();
                *stats.errors.entry((code, reason)).or_default() += 1;
                None
            }
        };
        let at = end.saturating_duration_since(window.from);
        inner.series.record(&key, at, latency);
        inner.live.count += 1;
        inner.live.recent_count += 1;
        match latency {
            Some(micros) => inner.live.recent.record(micros),
            None => inner.live.errors += 1,
        }
    }

    /// The live counters; the recent latencies start over.
    pub fn live(&self) -> Live {
        let mut inner = self.lock();
        let live = inner.live.clone();
        inner.live.recent = LogHistogram::default();
        inner.live.recent_count = 0;
        live
    }

    /// A copy of what was measured.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            stats: inner.stats.clone(),
            sent: inner.sent.clone(),
            series: inner.series.clone(),
        }
    }
}

/// What a run measured, at its end.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub stats: BTreeMap<Key, OpStats>,
    pub sent: BTreeMap<Key, u64>,
    pub series: TimeSeries,
}

/// One error kind and how many calls got it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ErrorCount {
    pub code: String,
    pub reason: String,
    pub count: u64,
}

/// The figures of one operation (all regions) or one (operation, region).
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    /// Calls started in the measured window (successes and errors).
    pub count: u64,
    pub ok: u64,
    pub errors: u64,
    pub errors_by_reason: Vec<ErrorCount>,
    /// Calls per second over the measured window.
    pub throughput_per_s: f64,
    /// Latency of the successful calls, milliseconds.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Calls started in the warm-up (not in the figures above).
    pub warmup_count: u64,
}

impl Figures {
    fn of(stats: &OpStats, seconds: f64) -> Figures {
        let errors = stats.error_count();
        let ms = |q: f64| {
            if stats.latency.is_empty() {
                0.0
            } else {
                round3(stats.latency.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        Figures {
            count: stats.count,
            ok: stats.count - errors,
            errors,
            errors_by_reason: stats
                .errors
                .iter()
                .map(|((code, reason), count)| ErrorCount {
                    code: code.clone(),
                    reason: reason.clone(),
                    count: *count,
                })
                .collect(),
            throughput_per_s: if seconds > 0.0 {
                round3(stats.count as f64 / seconds)
            } else {
                0.0
            },
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: if stats.latency.is_empty() {
                0.0
            } else {
                round3(stats.latency.max() as f64 / 1000.0)
            },
            warmup_count: stats.warmup_count,
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One operation: its figures over every region, and per region.
#[derive(Clone, Debug, Serialize)]
pub struct OperationSummary {
    #[serde(flatten)]
    pub figures: Figures,
    pub regions: BTreeMap<String, Figures>,
}

/// The figures of every operation, and of all of them together.
#[derive(Clone, Debug, Serialize)]
pub struct Figuresets {
    pub total: Figures,
    pub operations: BTreeMap<String, OperationSummary>,
}

/// The figures of a snapshot over a measured window of `seconds`.
pub fn figures(snapshot: &Snapshot, seconds: f64) -> Figuresets {
    let mut total = OpStats::default();
    let mut per_op: BTreeMap<String, (OpStats, BTreeMap<String, Figures>)> = BTreeMap::new();
    for ((op, region), stats) in &snapshot.stats {
        total.merge(stats);
        let entry = per_op.entry(op.clone()).or_default();
        entry.0.merge(stats);
        entry.1.insert(region.clone(), Figures::of(stats, seconds));
    }
    Figuresets {
        total: Figures::of(&total, seconds),
        operations: per_op
            .into_iter()
            .map(|(op, (stats, regions))| {
                (
                    op,
                    OperationSummary {
                        figures: Figures::of(&stats, seconds),
                        regions,
                    },
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(op: &str, region: &str) -> Key {
        (op.to_string(), region.to_string())
    }

    #[test]
    fn time_series_stay_within_their_capacity_and_keep_every_call() {
        let mut series = TimeSeries::new(Duration::from_secs(1), 10);
        let k = key("DescribeImages", "ap-guangzhou");
        // A call every 100 ms for 1000 s: 10,000 calls, far more than 10 one-second buckets.
        for i in 0..10_000u64 {
            series.record(&k, Duration::from_millis(i * 100), Some(1000));
        }
        let buckets = &series.series()[&k];
        assert!(buckets.len() <= 10, "{} buckets", buckets.len());
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 10_000);
        // 1000 s in at most 10 buckets: each at least 100 s wide, a power of two seconds.
        assert_eq!(series.width(), Duration::from_secs(128));
        // Buckets keep what they cover: 128 s of 10 calls a second.
        assert_eq!(buckets[0].count, 1280);
        assert_eq!(buckets[0].latency.count(), 1280);
    }

    #[test]
    fn every_series_shares_the_time_axis() {
        let mut series = TimeSeries::new(Duration::from_secs(1), 4);
        let a = key("RunInstances", "ap-guangzhou");
        let b = key("TerminateInstances", "ap-guangzhou");
        series.record(&a, Duration::from_millis(500), Some(10));
        series.record(&b, Duration::from_millis(2500), None);
        // Past the fourth bucket: every series is merged.
        series.record(&a, Duration::from_secs(7), Some(10));
        assert_eq!(series.width(), Duration::from_secs(2));
        assert_eq!(series.series()[&a].len(), 4);
        assert_eq!(series.series()[&a][0].count, 1);
        assert_eq!(series.series()[&a][3].count, 1);
        assert_eq!(series.series()[&b][1].errors, 1);
        let merged = series.merged([a, b].iter());
        assert_eq!(merged.iter().map(|b| b.count).sum::<u64>(), 3);
    }

    #[test]
    fn log_histograms_estimate_quantiles_within_a_bucket() {
        let mut h = LogHistogram::default();
        for micros in 1..=1000u64 {
            h.record(micros * 1000);
        }
        let p50 = h.quantile(0.5);
        assert!((400_000.0..600_000.0).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((830_000.0..1_190_000.0).contains(&p99), "{p99}");
        assert_eq!(LogHistogram::default().quantile(0.5), 0.0);
    }

    #[test]
    fn the_window_splits_set_up_warm_up_and_measured_calls() {
        let rec = Recorder::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        rec.record("DescribeImages", "r", at(0), at(1), None); // set-up
        rec.measure(at(100), at(1100));
        rec.record("DescribeImages", "r", at(50), at(60), None); // warm-up
        rec.record("DescribeImages", "r", at(100), at(102), None);
        let refused = imagefleet_proto::error::status(
            tonic::Code::ResourceExhausted,
            "RequestLimitExceeded",
            "slow down",
        );
        rec.record("DescribeImages", "r", at(200), at(201), Some(&refused));
        rec.record("DescribeImages", "r", at(1100), at(1101), None); // after the window
        rec.close(at(900));
        rec.record("DescribeImages", "r", at(950), at(951), None); // clean-up
        let snap = rec.snapshot();
        let k = key("DescribeImages", "r");
        assert_eq!(snap.sent[&k], 6);
        let f = figures(&snap, 1.0);
        let op = &f.operations["DescribeImages"];
        assert_eq!(
            (op.figures.count, op.figures.ok, op.figures.errors),
            (2, 1, 1)
        );
        assert_eq!(op.figures.warmup_count, 1);
        assert_eq!(
            op.figures.errors_by_reason,
            [ErrorCount {
                code: "ResourceExhausted".into(),
                reason: "RequestLimitExceeded".into(),
                count: 1
            }]
        );
        assert!((1.9..2.1).contains(&op.figures.p50_ms), "{:?}", op.figures);
        assert_eq!(op.regions["r"].count, 2);
        assert_eq!(f.total.count, 2);
    }
}
